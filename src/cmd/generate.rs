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
    /// Also print the token ids (prompt incl. BOS, then generated) to stderr
    /// as one line `[ids prompt: ...; generated: ...]` (scripts/runc_parity.sh
    /// compares them token for token with llama2.c's run.c).
    #[arg(long)]
    pub print_ids: bool,
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
    if a.print_ids {
        let join = |v: &[u32]| {
            v.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        eprintln!(
            "[ids prompt: {}; generated: {}]",
            join(&prompt),
            join(&tokens)
        );
    }
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
pub struct PerplexityArgs {
    /// Checkpoint: llama2.c .bin or .gguf.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// UTF-8 text, tokenized whole and as-is (for WikiText-2 pass the raw test
    /// file: it already is the dataset's lines joined with "\n\n", the GPTQ text).
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens (non-overlapping windows).
    #[arg(long)]
    pub context: usize,
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Start at window K (skip the first K windows of `context` tokens). Windows
    /// never overlap, so disjoint ranges run in separate processes add up exactly:
    /// combine their `sum NLL` and `tokens scored`.
    #[arg(long, default_value_t = 0)]
    pub skip_windows: usize,
    /// Score only the second half of each window, first token set to BOS
    /// (llama.cpp's perplexity tool); default: every prediction (GPTQ).
    #[arg(long)]
    pub score_second_half: bool,
    /// The forward pass's arithmetic: `exact` is the oracle (f32, run.c's order);
    /// `bf16` rounds every linear's and the causal attention's inputs to bf16 with
    /// f32 sums (AMX tiles when present), as a bf16 model runs on a GPU: several
    /// times faster, not the oracle (see docs/quantization.md for the measured gap).
    #[arg(long, value_enum, default_value_t = ArithmeticArg::Exact)]
    pub arithmetic: ArithmeticArg,
}

/// Exact (the oracle) or bf16 arithmetic: `perplexity --arithmetic` and
/// `quantize model --calibration`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArithmeticArg {
    Exact,
    Bf16,
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    use inferlab_reference::perplexity::{perplexity, PerplexityConfig, Scoring};
    let (mut m, tok) = load(&a.model, a.tokenizer.as_deref())?;
    if a.arithmetic == ArithmeticArg::Bf16 {
        m.matmul = model::MatmulPath::Bf16;
    }
    let bytes = std::fs::read(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 ({e})", a.text.display()))?;
    // One BOS at the start of the stream (what HF's Llama tokenizer adds when
    // GPTQ tokenizes the joined text; GPT-2-style tokenizers add none).
    let all_tokens = prompt_tokens(tok.as_ref(), &text);
    let skip = a.skip_windows.saturating_mul(a.context);
    if a.skip_windows > 0 && skip >= all_tokens.len() {
        anyhow::bail!(
            "--skip-windows {}: {} has only {} tokens ({} windows of {})",
            a.skip_windows,
            a.text.display(),
            all_tokens.len(),
            all_tokens.len() / a.context.max(1),
            a.context
        );
    }
    let tokens = &all_tokens[skip.min(all_tokens.len())..];
    let cfg = PerplexityConfig {
        context: a.context,
        max_windows: a.max_windows,
        scoring: if a.score_second_half {
            Scoring::SecondHalf
        } else {
            Scoring::All
        },
        bos: tok.bos(),
    };
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} windows {elapsed}<{eta}")
            .expect("template"),
    );
    let t0 = Instant::now();
    let r = perplexity(&m, &tokens, &cfg, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    println!(
        "model {}\ntext {} ({} tokens)\ncontext {} windows {} (from window {}) scoring {}{}\ntokens scored {}\nsum NLL {:.9}\nmean NLL {:.6}\nperplexity {:.4}",
        a.model.display(),
        a.text.display(),
        tokens.len(),
        a.context,
        r.windows,
        a.skip_windows,
        match cfg.scoring {
            Scoring::All => "all (GPTQ)",
            Scoring::SecondHalf => "second half (llama.cpp)",
        },
        match a.arithmetic {
            ArithmeticArg::Exact => "",
            ArithmeticArg::Bf16 => " arithmetic bf16",
        },
        r.tokens_scored,
        r.nll_sum,
        r.mean_nll(),
        r.perplexity()
    );
    eprintln!("[{:.1} s]", t0.elapsed().as_secs_f64());
    Ok(())
}

/// `inferlab bench generate`: greedy generation speed on stories260K.
///
/// The peer is llama2.c's `run.c`, built here with `gcc -O3 -lm` from a source
/// file the user supplies (`--runc` or `INFERLAB_RUNC`): no package registry
/// reachable from this project ships it, and the project does not vendor it.
/// When given, both run the same prompt and step count in this process's run,
/// the ratio is printed, and their texts are compared. Always measured as well:
/// the in-process slow twin ([`MatmulPath::Slow`]: the scalar matmul loop, same sums, in
/// Rust), labelled as such; it is not run.c.
#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "Once upon a time")]
    pub prompt: String,
    /// Sequence positions per run (prompt included), run.c's `-n`.
    #[arg(long, default_value_t = 256)]
    pub steps: usize,
    /// Runs per implementation; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Path to llama2.c's run.c (or set INFERLAB_RUNC).
    #[arg(long)]
    pub runc: Option<PathBuf>,
    /// Also write the report (text) here, via a temporary file and rename.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

struct Measured {
    positions: usize,
    secs: Vec<f64>,
    text: String,
}

impl Measured {
    fn median_tok_s(&self) -> f64 {
        let mut r: Vec<f64> = self
            .secs
            .iter()
            .map(|s| self.positions as f64 / s)
            .collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    }
}

/// Greedy generation over `steps` positions, counted as run.c's `-n` counts
/// them: run.c runs one forward per position 0..steps (BOS first, the prompt's
/// tokens forced) and prints the token each forward yields, so it emits
/// `steps - prompt_text_tokens` new tokens. Here the prompt carries BOS, so the
/// same sequence needs `steps + 1 - prompt.len()` new tokens (the last one
/// comes from the forward at position `steps - 1`). Appends one timed run to
/// `m_out`.
fn measure_ours_once(
    m: &Llama,
    tok: &dyn Tokenizer,
    prompt: &str,
    steps: usize,
    m_out: &mut Measured,
) -> Result<()> {
    let p = prompt_tokens(tok, prompt);
    if p.len() > steps {
        bail!(
            "prompt has {} tokens (BOS included), more than --steps {steps}",
            p.len()
        );
    }
    let stops: Vec<u32> = tok.eos().into_iter().chain(tok.bos()).collect();
    let mut sampler = Sampler::new(SamplingConfig::GREEDY, 0)?;
    let mut cache = m.try_new_cache(CacheKind::Contiguous)?;
    let t0 = Instant::now();
    let (out, _) = model::generate(
        m,
        &mut cache,
        &p,
        steps + 1 - p.len(),
        &mut sampler,
        &stops,
        |_| {},
    )?;
    m_out.secs.push(t0.elapsed().as_secs_f64());
    m_out.positions = cache.len();
    let ctx: Vec<u32> = p[usize::from(tok.bos().is_some())..].to_vec();
    let full = tok.decode(&[&ctx[..], &out[..]].concat());
    m_out.text = full.get(tok.decode(&ctx).len()..).unwrap_or("").to_string();
    Ok(())
}

/// Build run.c with gcc -O3 (no -fopenmp: its pragmas stay off, one thread,
/// as ours runs for this model size).
fn build_runc(src: &Path, dir: &Path) -> Result<PathBuf> {
    let exe = dir.join("run");
    let st = std::process::Command::new("gcc")
        .args(["-O3", "-o"])
        .arg(&exe)
        .arg(src)
        .arg("-lm")
        .status()
        .context("running gcc")?;
    if !st.success() {
        bail!("gcc -O3 {} failed", src.display());
    }
    Ok(exe)
}

/// One greedy run of run.c: (tok/s as run.c reports it, wall seconds of the
/// whole process, stdout). run.c's CLI at the GQA-capable versions:
/// `run CHECKPOINT -t 0 -n STEPS [-i PROMPT] -z TOKENIZER`; its timer starts
/// after the first forward, has millisecond resolution, and prints
/// `achieved tok/s: X` to stderr. An empty prompt is passed as no `-i` (run.c
/// would otherwise force its dummy-prefix token).
fn run_runc_once(
    exe: &Path,
    model: &Path,
    tok: &Path,
    prompt: &str,
    steps: usize,
) -> Result<(f64, f64, String)> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(model).args(["-t", "0", "-n", &steps.to_string()]);
    if !prompt.is_empty() {
        cmd.args(["-i", prompt]);
    }
    cmd.arg("-z").arg(tok);
    let t0 = Instant::now();
    let out = cmd.output().context("running run.c")?;
    let wall = t0.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("run.c exited with {}: {err}", out.status);
    }
    let rate: f64 = err
        .lines()
        .find_map(|l| l.strip_prefix("achieved tok/s: "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("run.c printed no `achieved tok/s`: {err}"))?;
    Ok((
        rate,
        wall,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("inferlab-runc-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {n} hardware threads")
}

pub fn bench(a: BenchArgs) -> Result<()> {
    use inferlab_reference::model::MatmulPath;
    let model_path = a
        .model
        .clone()
        .unwrap_or_else(inferlab_models::assets::stories260k_model);
    let (m, tok) = load(&model_path, a.tokenizer.as_deref())?;
    let tok_path = a
        .tokenizer
        .clone()
        .unwrap_or_else(|| model_path.with_file_name(format!("tok{}.bin", m.config.vocab)));
    let mut slow_model = m.clone();
    slow_model.matmul = MatmulPath::Slow;
    let runc = a
        .runc
        .clone()
        .or_else(|| std::env::var_os("INFERLAB_RUNC").map(PathBuf::from));
    let dir = tempfile_dir()?;
    let exe = match &runc {
        Some(src) => Some(build_runc(src, &dir)?),
        None => None,
    };
    let empty = || Measured {
        positions: 0,
        secs: Vec::new(),
        text: String::new(),
    };
    let (mut ours, mut slow) = (empty(), empty());
    let (mut rc_rates, mut rc_walls, mut rc_text) = (Vec::new(), Vec::new(), String::new());
    // Interleaved, so that load from other jobs on a shared machine hits
    // every implementation alike: ours, run.c, slow twin, ours, run.c, ...
    for _ in 0..a.repeats.max(1) {
        measure_ours_once(&m, tok.as_ref(), &a.prompt, a.steps, &mut ours)?;
        if let Some(exe) = &exe {
            let (r, w, t) = run_runc_once(exe, &model_path, &tok_path, &a.prompt, a.steps)?;
            rc_rates.push(r);
            rc_walls.push(w);
            rc_text = t;
        }
        measure_ours_once(&slow_model, tok.as_ref(), &a.prompt, a.steps, &mut slow)?;
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mut rep = String::new();
    use std::fmt::Write as _;
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    writeln!(rep, "# inferlab bench generate")?;
    writeln!(rep, "date     {date}")?;
    writeln!(rep, "machine  {}", machine())?;
    writeln!(
        rep,
        "model    {} (greedy, prompt {:?}, {} positions incl. prompt, median of {})",
        model_path.display(),
        a.prompt,
        ours.positions,
        a.repeats.max(1)
    )?;
    writeln!(
        rep,
        "timing   inferlab: positions / wall time of generate (prompt prefill incl.); \
         run.c: (positions-1) / its ms timer started after the first forward; \
         runs interleaved ours, run.c, slow twin"
    )?;
    writeln!(rep, "{:<44} {:>12}", "implementation", "tok/s")?;
    writeln!(
        rep,
        "{:<44} {:>12.1}",
        "inferlab (fast path, 1 thread for this size)",
        ours.median_tok_s()
    )?;
    writeln!(
        rep,
        "{:<44} {:>12.1}",
        "inferlab slow twin (scalar matmul, same sums)",
        slow.median_tok_s()
    )?;
    writeln!(
        rep,
        "ratio fast / slow twin: {:.2} (same tokens: {})",
        ours.median_tok_s() / slow.median_tok_s(),
        ours.text == slow.text
    )?;
    match &runc {
        Some(_) => {
            let r = median(rc_rates.clone());
            writeln!(
                rep,
                "{:<44} {:>12.1}",
                "llama2.c run.c (gcc -O3, its own timer)", r
            )?;
            writeln!(
                rep,
                "{:<44} {:>12.1}",
                "  run.c, whole process (load incl.), wall",
                ours.positions as f64 / median(rc_walls.clone())
            )?;
            writeln!(
                rep,
                "run.c per-run tok/s: {}",
                rc_rates
                    .iter()
                    .map(|r| format!("{r:.1}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )?;
            writeln!(
                rep,
                "inferlab per-run tok/s: {}",
                ours.secs
                    .iter()
                    .map(|s| format!("{:.1}", ours.positions as f64 / s))
                    .collect::<Vec<_>>()
                    .join(" ")
            )?;
            writeln!(
                rep,
                "ratio inferlab / run.c (medians): {:.2}",
                ours.median_tok_s() / r
            )?;
            // run.c prints the prompt too, then the continuation, then "\n".
            let same = rc_text
                .strip_suffix('\n')
                .unwrap_or(&rc_text)
                .ends_with(&ours.text);
            writeln!(rep, "run.c text ends with ours: {same}")?;
        }
        None => writeln!(
            rep,
            "peer llama2.c run.c: NOT MEASURED (no registry reachable here ships run.c; \
             pass --runc PATH/run.c or set INFERLAB_RUNC to build it with gcc -O3)"
        )?,
    }
    print!("{rep}");
    if let Some(out) = a.out {
        let tmp = out.with_extension("tmp");
        std::fs::write(&tmp, &rep).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &out).with_context(|| format!("renaming to {}", out.display()))?;
    }
    Ok(())
}
