//! The draft-then-verify loop on real models.
//!
//! ```text
//!  context c_0..c_{t-1}          (prompt + emitted tokens)
//!  Proposer:  x_1..x_n ~ q       (n ≤ k; draft model, own first N layers, or n-gram table)
//!  Verifier:  one target forward over [c_{t-1}, x_1..x_n]   (n+1-token prefill,
//!             bottom-right causal mask over the cached c_0..c_{t-2})
//!             -> p_0..p_n  (p_i: target law of the token after x_1..x_i)
//!  verify:    rejection_sample(p, q, x, uniforms)  (greedy_verify at T = 0)
//!             -> a accepted drafts + 1 corrected/bonus token
//!  rollback:  both caches truncated to t + a tokens (c ++ x_1..x_a); the
//!             corrected token is fed at the next step
//! ```
//!
//! Caches: the verifier's [`KvCache`] holds the context minus its last token
//! between steps; a model proposer's cache holds a prefix of the context. Each
//! keeps the token list its cache was built from, so "rollback" is a
//! [`KvCache::truncate`] to the accepted length and the next call feeds exactly
//! the tokens the cache lacks. Both cache kinds (contiguous, paged) behave the
//! same; the tests run both.
//!
//! Self-speculative drafts run the target's first N layers plus its final norm
//! and head ([`Llama::forward_layers`]) over their own cache (the first N layers'
//! KV equal the target's, so sharing them is a possible optimisation, not done
//! here: the oracle keeps the two caches independent).
//!
//! Randomness: one `ChaCha8Rng`, consumed in a fixed order per step: one
//! uniform per sampled draft token (model proposers at T > 0), then
//! [`VerifyUniforms::draw`] (k accept uniforms, one resample) for the verifier.

use ndarray::{s, Array2, ArrayView1};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use inferlab_models::tokenizer::Tokenizer;

use super::theory;
use super::verify::{self, Typical, VerifyUniforms, Warp};
use crate::model::{CacheKind, KvCache, Llama};
use crate::{Error, Result};

/// A model over its own KV cache, remembering which tokens the cache holds.
#[derive(Clone)]
pub struct CachedModel<'m> {
    model: &'m Llama,
    cache: KvCache,
    tokens: Vec<u32>,
    layers: usize,
}

impl<'m> CachedModel<'m> {
    /// `layers`: how many blocks to run (`model.config.n_layers` for the full model).
    pub fn new(model: &'m Llama, kind: CacheKind, layers: usize) -> Result<Self> {
        if layers == 0 || layers > model.config.n_layers {
            return Err(Error::invalid(
                "draft layers",
                format!(
                    "{layers} is not in 1..={} (the model's layer count)",
                    model.config.n_layers
                ),
            ));
        }
        Ok(CachedModel {
            model,
            cache: model.try_new_cache(kind)?,
            tokens: Vec::new(),
            layers,
        })
    }

    /// Tokens whose KV the cache holds.
    pub fn cached(&self) -> &[u32] {
        &self.tokens
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Roll back to the first `keep` cached tokens (KV truncate).
    pub fn rollback(&mut self, keep: usize) {
        if keep < self.tokens.len() {
            self.tokens.truncate(keep);
            self.cache.truncate(keep);
        }
    }

    /// Make the cache hold `seq` and return the logits of the positions fed
    /// now: rows for `seq[seq.len() - rows..]` (at least one row: the last
    /// token is always fed). Cached tokens beyond the common prefix with `seq`
    /// are rolled back first.
    pub fn extend(&mut self, seq: &[u32]) -> Result<Array2<f32>> {
        if seq.is_empty() {
            return Err(Error::invalid("sequence", "needs at least one token"));
        }
        let lcp = self
            .tokens
            .iter()
            .zip(seq)
            .take_while(|(a, b)| a == b)
            .count();
        self.rollback(lcp.min(seq.len() - 1));
        let start = self.tokens.len();
        if seq.len() > self.cache.max_len() {
            return Err(Error::invalid(
                "sequence",
                format!(
                    "{} tokens exceed the model's context of {}",
                    seq.len(),
                    self.cache.max_len()
                ),
            ));
        }
        let logits = self
            .model
            .forward_layers(&mut self.cache, &seq[start..], self.layers)?;
        self.tokens.extend_from_slice(&seq[start..]);
        debug_assert_eq!(self.tokens.len(), self.cache.len());
        Ok(logits)
    }
}

/// Drafted tokens and the draft rows they were drawn from (`[n, V]`, after the
/// same warp as the target; one-hot for deterministic proposers).
#[derive(Debug, Clone)]
pub struct Draft {
    pub tokens: Vec<u32>,
    pub probs: Array2<f64>,
}

/// Something that proposes draft tokens.
pub trait Proposer {
    /// A short description (for reports).
    fn name(&self) -> String;
    /// Propose up to `k` tokens continuing `context` (non-empty).
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        warp: &Warp,
        rng: &mut ChaCha8Rng,
    ) -> Result<Draft>;
    /// The first `keep` tokens of the last context + draft are accepted:
    /// discard the rest of any state (KV entries).
    fn rollback(&mut self, keep: usize);
}

/// A draft model (a smaller model with the target's tokenizer, or the
/// target's own first N layers).
#[derive(Clone)]
pub struct ModelProposer<'m> {
    inner: CachedModel<'m>,
    label: String,
}

impl<'m> ModelProposer<'m> {
    /// A separate draft model (check its tokenizer with [`same_tokenizer`]).
    pub fn model(model: &'m Llama, kind: CacheKind, label: &str) -> Result<Self> {
        Ok(ModelProposer {
            inner: CachedModel::new(model, kind, model.config.n_layers)?,
            label: label.to_string(),
        })
    }
    /// Self-speculative: the target's first `layers` blocks + final norm + head.
    pub fn layers(target: &'m Llama, kind: CacheKind, layers: usize) -> Result<Self> {
        Ok(ModelProposer {
            inner: CachedModel::new(target, kind, layers)?,
            label: format!(
                "self-speculative, first {layers} of {} layers",
                target.config.n_layers
            ),
        })
    }
    pub fn cache(&self) -> &KvCache {
        self.inner.cache()
    }
    /// Run `tokens` into the cache now (a shared prompt prefix, cloned per run).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.inner.extend(tokens).map(|_| ())
    }
}

impl Proposer for ModelProposer<'_> {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        warp: &Warp,
        rng: &mut ChaCha8Rng,
    ) -> Result<Draft> {
        let v = self.inner.model.config.vocab;
        let mut seq = context.to_vec();
        let mut tokens = Vec::with_capacity(k);
        let mut probs = Array2::zeros((k, v));
        for i in 0..k {
            let logits = self.inner.extend(&seq)?;
            let last = logits.row(logits.nrows() - 1);
            let row = warp.probs_from_logits(last.as_slice().expect("contiguous row"));
            let x = if warp.is_greedy() {
                verify::argmax(ArrayView1::from(&row[..]))
            } else {
                verify::sample_inverse_cdf(ArrayView1::from(&row[..]), rng.random::<f64>())
                    .expect("warped row has mass")
            } as u32;
            probs.row_mut(i).assign(&ArrayView1::from(&row[..]));
            tokens.push(x);
            seq.push(x);
        }
        Ok(Draft { tokens, probs })
    }
    fn rollback(&mut self, keep: usize) {
        self.inner.rollback(keep);
    }
}

/// Prompt lookup / n-gram drafts (Saxena 2023; vLLM's `ngram` proposer): find
/// the most recent earlier occurrence of the context's last `n` tokens
/// (`n = max_n` down to `min_n`) and propose the tokens that followed it.
/// Deterministic: the draft rows are one-hot. Proposes nothing when no n-gram
/// matches (the step is then a plain decode step).
pub struct NgramProposer {
    pub vocab: usize,
    pub min_n: usize,
    pub max_n: usize,
}

impl NgramProposer {
    pub fn new(vocab: usize) -> Self {
        NgramProposer {
            vocab,
            min_n: 1,
            max_n: 3,
        }
    }
    /// The proposal for `context` (pure function of the context).
    pub fn lookup(&self, context: &[u32], k: usize) -> Vec<u32> {
        let len = context.len();
        for n in (self.min_n.max(1)..=self.max_n).rev() {
            if n >= len {
                continue;
            }
            let suffix = &context[len - n..];
            // Latest start j < len - n with context[j..j+n] == suffix.
            for j in (0..len - n).rev() {
                if &context[j..j + n] == suffix {
                    let end = (j + n + k).min(len);
                    return context[j + n..end].to_vec();
                }
            }
        }
        Vec::new()
    }
}

impl Proposer for NgramProposer {
    fn name(&self) -> String {
        format!("n-gram prompt lookup (n = {}..={})", self.min_n, self.max_n)
    }
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        _: &Warp,
        _: &mut ChaCha8Rng,
    ) -> Result<Draft> {
        let tokens = self.lookup(context, k);
        let mut probs = Array2::zeros((tokens.len(), self.vocab));
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= self.vocab {
                return Err(Error::invalid(
                    "context",
                    format!("token {t} is not < vocab size {}", self.vocab),
                ));
            }
            probs[[i, t as usize]] = 1.0;
        }
        Ok(Draft { tokens, probs })
    }
    fn rollback(&mut self, _: usize) {}
}

/// The target side: scores `[last context token, drafts…]` in one forward pass.
#[derive(Clone)]
pub struct Verifier<'m> {
    inner: CachedModel<'m>,
}

impl<'m> Verifier<'m> {
    pub fn new(target: &'m Llama, kind: CacheKind) -> Result<Self> {
        Ok(Verifier {
            inner: CachedModel::new(target, kind, target.config.n_layers)?,
        })
    }
    /// Logits `[n+1, V]`: row i is the target's next-token logits after
    /// `context ++ drafts[..i]`. One forward call over the uncached tokens
    /// (the whole prompt at the first step, else `n + 1` tokens).
    pub fn score(&mut self, context: &[u32], drafts: &[u32]) -> Result<Array2<f32>> {
        let mut seq = context.to_vec();
        seq.extend_from_slice(drafts);
        let logits = self.inner.extend(&seq)?;
        let n = drafts.len() + 1;
        Ok(logits.slice(s![logits.nrows() - n.., ..]).to_owned())
    }
    pub fn rollback(&mut self, keep: usize) {
        self.inner.rollback(keep);
    }
    pub fn cache(&self) -> &KvCache {
        self.inner.cache()
    }
    /// Run `tokens` into the cache now (a shared prompt prefix, cloned per run).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.inner.extend(tokens).map(|_| ())
    }
}

/// How drafts are verified.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum VerifyRule {
    /// Rejection sampling (greedy matching at temperature 0): lossless.
    #[default]
    Lossless,
    /// Medusa's typical acceptance: lossy.
    Typical(Typical),
}

/// Options of a speculative generation.
#[derive(Debug, Clone)]
pub struct SpecConfig {
    /// Draft tokens per target pass (≥ 1).
    pub k: usize,
    pub warp: Warp,
    pub max_new_tokens: usize,
    /// Tokens that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
    pub rule: VerifyRule,
    pub cache: CacheKind,
}

/// Acceptance statistics of a run (summable over prompts).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecStats {
    /// Target forward passes (one per step).
    pub passes: u64,
    /// Tokens emitted (before truncation at stop/max tokens, i.e. accepted + 1 per step).
    pub step_tokens: u64,
    /// Tokens kept in the output.
    pub tokens: u64,
    /// Draft tokens proposed.
    pub proposed: u64,
    /// Per draft position i: steps that reached it (all earlier drafts accepted).
    pub reached: Vec<u64>,
    /// Per draft position i: accepted when reached.
    pub accepted: Vec<u64>,
    /// Per draft position i: Σ over reaching steps of β_i = Σ_x min(p_i, q_i).
    pub beta_sum: Vec<f64>,
    /// Σ over steps of the product-form prediction `1 + β_1 + β_1β_2 + …`.
    pub predicted_tokens_sum: f64,
}

impl SpecStats {
    fn ensure(&mut self, k: usize) {
        if self.reached.len() < k {
            self.reached.resize(k, 0);
            self.accepted.resize(k, 0);
            self.beta_sum.resize(k, 0.0);
        }
    }
    pub fn merge(&mut self, o: &SpecStats) {
        self.ensure(o.reached.len());
        self.passes += o.passes;
        self.step_tokens += o.step_tokens;
        self.tokens += o.tokens;
        self.proposed += o.proposed;
        for i in 0..o.reached.len() {
            self.reached[i] += o.reached[i];
            self.accepted[i] += o.accepted[i];
            self.beta_sum[i] += o.beta_sum[i];
        }
        self.predicted_tokens_sum += o.predicted_tokens_sum;
    }
    /// Measured acceptance over all reached draft positions.
    pub fn acceptance(&self) -> f64 {
        let r: u64 = self.reached.iter().sum();
        self.accepted.iter().sum::<u64>() as f64 / r.max(1) as f64
    }
    /// TV-predicted acceptance: mean β over the same reached positions.
    pub fn predicted_acceptance(&self) -> f64 {
        let r: u64 = self.reached.iter().sum();
        self.beta_sum.iter().sum::<f64>() / r.max(1) as f64
    }
    /// Measured tokens per target pass.
    pub fn tokens_per_pass(&self) -> f64 {
        self.step_tokens as f64 / self.passes.max(1) as f64
    }
    /// Predicted tokens per pass (mean of the per-step product form of β).
    pub fn predicted_tokens_per_pass(&self) -> f64 {
        self.predicted_tokens_sum / self.passes.max(1) as f64
    }
}

/// Check that a draft's tokenizer is the target's: same vocabulary size,
/// BOS/EOS, and the same text for every token id.
pub fn same_tokenizer(target: &dyn Tokenizer, draft: &dyn Tokenizer) -> Result<()> {
    let mismatch = |reason: String| Error::invalid("draft tokenizer", reason);
    if target.vocab_size() != draft.vocab_size() {
        return Err(mismatch(format!(
            "vocabulary size {} differs from the target's {}",
            draft.vocab_size(),
            target.vocab_size()
        )));
    }
    if target.bos() != draft.bos() || target.eos() != draft.eos() {
        return Err(mismatch(format!(
            "BOS/EOS {:?}/{:?} differ from the target's {:?}/{:?}",
            draft.bos(),
            draft.eos(),
            target.bos(),
            target.eos()
        )));
    }
    for t in 0..target.vocab_size() as u32 {
        let (a, b) = (target.decode(&[t]), draft.decode(&[t]));
        if a != b {
            return Err(mismatch(format!(
                "token {t} decodes to {b:?}, the target's to {a:?}"
            )));
        }
    }
    Ok(())
}

/// Speculative generation of up to `cfg.max_new_tokens` tokens after `prompt`.
pub fn speculative_generate(
    target: &Llama,
    proposer: &mut dyn Proposer,
    prompt: &[u32],
    cfg: &SpecConfig,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<u32>, SpecStats)> {
    let mut verifier = Verifier::new(target, cfg.cache)?;
    speculative_generate_with(target, &mut verifier, proposer, prompt, cfg, rng)
}

/// [`speculative_generate`] with a given verifier (whose cache may already
/// hold a prefix of `prompt`: it is reused, anything else is rolled back).
pub fn speculative_generate_with(
    target: &Llama,
    verifier: &mut Verifier,
    proposer: &mut dyn Proposer,
    prompt: &[u32],
    cfg: &SpecConfig,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<u32>, SpecStats)> {
    if prompt.is_empty() {
        return Err(Error::invalid(
            "prompt",
            "needs at least one token (e.g. BOS)",
        ));
    }
    if cfg.k == 0 {
        return Err(Error::invalid(
            "k",
            "at least one draft token per pass is required (k ≥ 1)",
        ));
    }
    cfg.warp.validate()?;
    let max_len = target.config.max_seq_len;
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    let mut stats = SpecStats::default();
    stats.ensure(cfg.k);
    while out.len() < cfg.max_new_tokens && context.len() < max_len {
        // The verifier caches context + drafts: at most max_len tokens.
        let room = max_len - context.len();
        let k = cfg.k.min(cfg.max_new_tokens - out.len()).min(room);
        let draft = if k == 0 {
            Draft {
                tokens: Vec::new(),
                probs: Array2::zeros((0, target.config.vocab)),
            }
        } else {
            proposer.propose(&context, k, &cfg.warp, rng)?
        };
        let n = draft.tokens.len();
        let logits = verifier.score(&context, &draft.tokens)?;
        stats.passes += 1;
        stats.proposed += n as u64;
        let mut p = Array2::zeros(logits.raw_dim());
        for (i, row) in logits.outer_iter().enumerate() {
            let w = cfg
                .warp
                .probs_from_logits(row.as_slice().expect("contiguous"));
            p.row_mut(i).assign(&ArrayView1::from(&w[..]));
        }
        let outcome = if n == 0 {
            let y = if cfg.warp.is_greedy() {
                verify::argmax(logits.row(0))
            } else {
                verify::sample_inverse_cdf(p.row(0), rng.random::<f64>()).expect("mass")
            };
            verify::VerifyOutcome {
                accepted: 0,
                tokens: vec![y as u32],
            }
        } else {
            match cfg.rule {
                VerifyRule::Lossless if cfg.warp.is_greedy() => {
                    verify::greedy_verify(logits.view(), &draft.tokens)?
                }
                VerifyRule::Lossless => {
                    let u = VerifyUniforms::draw(rng, n);
                    verify::rejection_sample(p.view(), draft.probs.view(), &draft.tokens, &u)?
                }
                VerifyRule::Typical(t) => {
                    verify::typical_accept(p.view(), &draft.tokens, &t, rng.random::<f64>())?
                }
            }
        };
        // Statistics: β_i for every drafted position; reached/accepted counts.
        let betas: Vec<f64> = (0..n)
            .map(|i| {
                theory::acceptance(
                    p.row(i).as_slice().expect("contiguous"),
                    draft.probs.row(i).as_slice().expect("contiguous"),
                )
            })
            .collect();
        stats.predicted_tokens_sum += theory::expected_tokens_per_pass_vec(&betas);
        for i in 0..n.min(outcome.accepted + 1) {
            stats.reached[i] += 1;
            stats.beta_sum[i] += betas[i];
            if i < outcome.accepted {
                stats.accepted[i] += 1;
            }
        }
        stats.step_tokens += outcome.tokens.len() as u64;
        // Roll back both caches to context ++ accepted drafts.
        let keep = context.len() + outcome.accepted;
        verifier.rollback(keep);
        proposer.rollback(keep);
        let mut stop = false;
        for &t in &outcome.tokens {
            if cfg.stop_tokens.contains(&t) || out.len() == cfg.max_new_tokens {
                stop = true;
                break;
            }
            out.push(t);
            context.push(t);
        }
        if stop {
            break;
        }
    }
    stats.tokens = out.len() as u64;
    Ok((out, stats))
}

/// Plain autoregressive sampling with the same warp and the same uniform
/// convention (one `rng.random::<f64>()` per token, inverse CDF), for
/// comparisons with [`speculative_generate`].
pub fn plain_generate(
    target: &Llama,
    prompt: &[u32],
    warp: &Warp,
    max_new_tokens: usize,
    kind: CacheKind,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<u32>> {
    warp.validate()?;
    let mut m = CachedModel::new(target, kind, target.config.n_layers)?;
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_new_tokens && context.len() < target.config.max_seq_len {
        let logits = m.extend(&context)?;
        let last = logits.row(logits.nrows() - 1);
        let y = if warp.is_greedy() {
            verify::argmax(last)
        } else {
            let w = warp.probs_from_logits(last.as_slice().expect("contiguous"));
            verify::sample_inverse_cdf(ArrayView1::from(&w[..]), rng.random::<f64>()).expect("mass")
        } as u32;
        out.push(y);
        context.push(y);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
