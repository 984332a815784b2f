//! `inferlab generate` and `inferlab perplexity`: the reference forward pass on
//! a checkpoint (llama2.c `.bin`, GGUF), with its tokenizer.
//!
//! generate prints only the continuation (streamed as it is produced) and stops
//! at the end-of-sequence token, at BOS (llama2.c's run.c ends a sequence there:
//! its models are trained on BOS-delimited stories), at `--max-tokens`, or at the
//! model's context. Statistics go to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use inferlab_models::tokenizer::Tokenizer;
use inferlab_reference::model::{self, CacheKind, Llama};
use inferlab_reference::sampling::{Sampler, SamplingConfig};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint: llama2.c .bin or .gguf.
    #[arg(long)]
    pub model: PathBuf,
    /// Tokenizer file; default: found beside the model (tok{vocab}.bin /
    /// tokenizer.bin for llama2.c) or embedded (GGUF).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// KV cache layout: contiguous or paged.
    #[arg(long, default_value = "contiguous", value_parser = ["contiguous", "paged"])]
    pub cache: String,
    /// Block size of the paged cache.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
}

/// Load model and tokenizer and check they agree on the vocabulary.
pub fn load(model_path: &Path, tok: Option<&Path>) -> Result<(Llama, Box<dyn Tokenizer>)> {
    let ck = model::load_checkpoint(model_path)?;
    let m = Llama::from_checkpoint(&ck)?;
    let t = model::load_tokenizer(model_path, tok)?;
    if t.vocab_size() > m.config.vocab {
        bail!(
            "tokenizer has {} tokens but the model {} has a vocabulary of {}",
            t.vocab_size(),
            model_path.display(),
            m.config.vocab
        );
    }
    Ok((m, t))
}

/// The prompt's tokens: BOS (if the tokenizer has one) then the text.
pub fn prompt_tokens(t: &dyn Tokenizer, text: &str) -> Vec<u32> {
    t.bos().into_iter().chain(t.encode(text)).collect()
}

/// Streams the text of a growing token list: decodes `context + new` and
/// prints what was not printed yet, holding back trailing replacement
/// characters (an incomplete UTF-8 sequence that later tokens may finish).
struct TextStream<'a> {
    tok: &'a dyn Tokenizer,
    context: Vec<u32>,
    skip: usize,
    printed: usize,
}

impl<'a> TextStream<'a> {
    fn new(tok: &'a dyn Tokenizer, context: Vec<u32>) -> Self {
        let skip = tok.decode(&context).len();
        Self {
            tok,
            context,
            skip,
            printed: 0,
        }
    }
    fn text(&self, new: &[u32]) -> String {
        let mut ids = self.context.clone();
        ids.extend_from_slice(new);
        let full = self.tok.decode(&ids);
        full.get(self.skip..).unwrap_or("").to_string()
    }
    fn push(&mut self, new: &[u32], out: &mut impl Write) -> Result<()> {
        let t = self.text(new);
        let stable = t.trim_end_matches('\u{FFFD}');
        if stable.len() > self.printed {
            if let Some(s) = stable.get(self.printed..) {
                out.write_all(s.as_bytes())?;
                out.flush()?;
                self.printed = stable.len();
            }
        }
        Ok(())
    }
    fn finish(&mut self, new: &[u32], out: &mut impl Write) -> Result<()> {
        let t = self.text(new);
        if let Some(s) = t.get(self.printed..) {
            out.write_all(s.as_bytes())?;
        }
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(())
    }
}

pub fn cache_kind(name: &str, block_size: usize) -> Result<CacheKind> {
    Ok(match name {
        "contiguous" => CacheKind::Contiguous,
        "paged" => {
            if block_size == 0 {
                bail!("--block-size must be positive");
            }
            CacheKind::Paged { block_size }
        }
        other => bail!("unknown cache `{other}` (contiguous, paged)"),
    })
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let (m, tok) = load(&a.model, a.tokenizer.as_deref())?;
    let cfg = SamplingConfig {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    let mut sampler = Sampler::new(cfg, a.seed)?;
    let prompt = prompt_tokens(tok.as_ref(), &a.prompt);
    if prompt.is_empty() {
        bail!("empty prompt and the tokenizer has no BOS token");
    }
    if prompt.len() >= m.config.max_seq_len {
        bail!(
            "prompt has {} tokens; the model's context is {}",
            prompt.len(),
            m.config.max_seq_len
        );
    }
    let stops: Vec<u32> = tok.eos().into_iter().chain(tok.bos()).collect();
    let mut cache = m.try_new_cache(cache_kind(&a.cache, a.block_size)?)?;
    // Decode continuation text in the context of the prompt (without BOS), so
    // leading spaces and merged bytes come out as in the full text.
    let context: Vec<u32> = prompt
        .iter()
        .copied()
        .skip(usize::from(tok.bos().is_some()))
        .collect();
    let mut stream = TextStream::new(tok.as_ref(), context);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut produced = Vec::new();
    let mut io_err = None;
    let t0 = Instant::now();
    let (tokens, stop) = model::generate(
        &m,
        &mut cache,
        &prompt,
        a.max_tokens,
        &mut sampler,
        &stops,
        |t| {
            produced.push(t);
            if io_err.is_none() {
                if let Err(e) = stream.push(&produced, &mut out) {
                    io_err = Some(e);
                }
            }
        },
    )?;
    let secs = t0.elapsed().as_secs_f64();
    if let Some(e) = io_err {
        return Err(e).context("writing to stdout");
    }
    stream.finish(&tokens, &mut out)?;
    eprintln!(
        "[{} prompt tokens, {} generated, stop: {:?}, {:.1} tok/s]",
        prompt.len(),
        tokens.len(),
        stop,
        tokens.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct PerplexityArgs {}
pub fn perplexity(_a: PerplexityArgs) -> Result<()> {
    bail!("not yet implemented")
}
