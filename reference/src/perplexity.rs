//! Perplexity over non-overlapping windows, in the two conventions people quote.
//!
//! The token stream is cut into `W = floor(n / ctx)` windows of `ctx` tokens
//! (the tail shorter than `ctx` is dropped), each run from an empty cache:
//! ```text
//!   tokens:  [BOS] t1 t2 ... | window 0: [0, ctx) | window 1: [ctx, 2ctx) | ... | tail (dropped)
//! ```
//! - [`Scoring::All`] (GPTQ / AWQ papers, `datautils.py` + `llama_eval`): in every
//!   window each position `j < ctx-1` predicts token `j+1`; `ctx - 1` tokens are
//!   scored per window. GPTQ multiplies each window's mean loss by `ctx` and
//!   divides the total by `W * ctx`; with equal-length windows that is exactly
//!   the mean over all scored tokens, which is what we compute.
//! - [`Scoring::SecondHalf`] (llama.cpp's `perplexity` tool): the window's first
//!   token is replaced by BOS (when the tokenizer has one) and only predictions
//!   from position `ctx/2` on are scored (tokens `ctx/2 + 1 .. ctx`), so every
//!   scored token sees at least `ctx/2` tokens of context.
//!
//! `perplexity = exp(mean NLL)`, the NLL of a token being `logsumexp(logits) -
//! logit[target]` computed in f64 from the f32 logits. [`perplexity_slow`] is the
//! slow twin: token-by-token decoding and `-ln(softmax)` written out directly.

use crate::model::{CacheKind, Llama};
use crate::{Error, Result};

/// Which positions of a window are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Every prediction in the window (GPTQ's WikiText-2 convention).
    All,
    /// Only predictions from the middle on, first token set to BOS (llama.cpp).
    SecondHalf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerplexityConfig {
    pub context: usize,
    pub max_windows: Option<usize>,
    pub scoring: Scoring,
    /// BOS id used by [`Scoring::SecondHalf`] to replace each window's first token.
    pub bos: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerplexityResult {
    pub windows: usize,
    pub tokens_scored: usize,
    pub nll_sum: f64,
}

impl PerplexityResult {
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.tokens_scored as f64
    }
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// Window plan: `(window count, first scored prediction position)`.
fn plan(n_tokens: usize, cfg: &PerplexityConfig, model: &Llama) -> Result<(usize, usize)> {
    if cfg.context < 2 {
        return Err(Error::invalid(
            "context",
            format!("{} < 2 tokens", cfg.context),
        ));
    }
    if cfg.context > model.config.max_seq_len {
        return Err(Error::invalid(
            "context",
            format!(
                "{} exceeds the model's context of {}",
                cfg.context, model.config.max_seq_len
            ),
        ));
    }
    let mut w = n_tokens / cfg.context;
    if let Some(m) = cfg.max_windows {
        w = w.min(m);
    }
    if w == 0 {
        return Err(Error::invalid(
            "text",
            format!("{n_tokens} tokens make no window of {} tokens", cfg.context),
        ));
    }
    let first = match cfg.scoring {
        Scoring::All => 0,
        Scoring::SecondHalf => cfg.context / 2,
    };
    Ok((w, first))
}

fn window(tokens: &[u32], i: usize, cfg: &PerplexityConfig) -> Vec<u32> {
    let mut w = tokens[i * cfg.context..(i + 1) * cfg.context].to_vec();
    if let (Scoring::SecondHalf, Some(b)) = (cfg.scoring, cfg.bos) {
        w[0] = b;
    }
    w
}

/// `logsumexp(row) - row[target]` in f64.
pub fn nll(row: &[f32], target: u32) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
    m + s.ln() - row[target as usize] as f64
}

/// Perplexity of `model` on `tokens`; `progress(done, total)` after each window.
///
/// Windows run in parallel (rayon; each from its own empty cache), and their
/// NLLs are summed afterwards in window and position order, so the result is
/// bit-identical whatever the thread count or completion order. An error names
/// the first failing window in window order.
pub fn perplexity(
    model: &Llama,
    tokens: &[u32],
    cfg: &PerplexityConfig,
    progress: impl Fn(usize, usize) + Sync,
) -> Result<PerplexityResult> {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (w, first) = plan(tokens.len(), cfg, model)?;
    let done = AtomicUsize::new(0);
    let per_window: Vec<Result<Vec<f64>>> = (0..w)
        .into_par_iter()
        .map(|i| {
            let win = window(tokens, i, cfg);
            let mut cache = model.try_new_cache(CacheKind::Contiguous)?;
            let logits = model.forward(&mut cache, &win)?;
            let mut nlls = Vec::with_capacity(cfg.context - 1 - first);
            for j in first..cfg.context - 1 {
                let row = logits.row(j);
                let l = nll(row.as_slice().expect("standard layout"), win[j + 1]);
                if !l.is_finite() {
                    return Err(Error::NonFinite {
                        what: "negative log-likelihood".into(),
                        index: format!("window {i}, position {j}"),
                    });
                }
                nlls.push(l);
            }
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, w);
            Ok(nlls)
        })
        .collect();
    let mut res = PerplexityResult {
        windows: w,
        tokens_scored: 0,
        nll_sum: 0.0,
    };
    for nlls in per_window {
        for l in nlls? {
            res.nll_sum += l;
            res.tokens_scored += 1;
        }
    }
    Ok(res)
}

/// Slow twin: one token per forward call, NLL as `-ln(exp(l_t - m) / Σ exp(l - m))`.
pub fn perplexity_slow(
    model: &Llama,
    tokens: &[u32],
    cfg: &PerplexityConfig,
) -> Result<PerplexityResult> {
    let (w, first) = plan(tokens.len(), cfg, model)?;
    let mut res = PerplexityResult {
        windows: w,
        tokens_scored: 0,
        nll_sum: 0.0,
    };
    for i in 0..w {
        let win = window(tokens, i, cfg);
        let mut cache = model.try_new_cache(CacheKind::Contiguous)?;
        for j in 0..cfg.context - 1 {
            let logits = model.forward(&mut cache, &win[j..j + 1])?;
            if j < first {
                continue;
            }
            let row: Vec<f64> = logits.row(0).iter().map(|&v| v as f64).collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
            let p = (row[win[j + 1] as usize] - m).exp() / z;
            res.nll_sum += -p.ln();
            res.tokens_scored += 1;
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use inferlab_models::{assets, tokenizer::Llama2cTokenizer};

    /// stories260K on the TinyStories validation snippet: fast equals the slow
    /// twin (same logits bits, f64 NLL sums differing only by rounding), and the
    /// value is plausible for a 260K-parameter TinyStories model (a uniform
    /// guess over 512 tokens would give 512; the model is far better than that
    /// but far from perfect).
    #[test]
    fn stories260k_tinystories_perplexity() {
        let (Some(mp), Some(tp), Some(text)) = (
            assets::require(assets::stories260k_model(), "stories260k perplexity"),
            assets::require(assets::stories260k_tokenizer(), "stories260k perplexity"),
            assets::require(assets::tinystories_valid(), "stories260k perplexity"),
        ) else {
            return;
        };
        let model = Llama::from_checkpoint(&crate::model::load_checkpoint(&mp).unwrap()).unwrap();
        let tok = Llama2cTokenizer::load_with_vocab(&tp, 512).unwrap();
        let text = std::fs::read_to_string(text).unwrap();
        let tokens = tok.encode_with(&text, true, false);
        for scoring in [Scoring::All, Scoring::SecondHalf] {
            let cfg = PerplexityConfig {
                context: 256,
                max_windows: Some(3),
                scoring,
                bos: Some(1),
            };
            let calls = std::sync::atomic::AtomicUsize::new(0);
            let fast = perplexity(&model, &tokens, &cfg, |_, _| {
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .unwrap();
            // The parallel windows sum in window order: one thread gives the same bits.
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| perplexity(&model, &tokens, &cfg, |_, _| {}).unwrap());
            assert_eq!(fast.nll_sum.to_bits(), one.nll_sum.to_bits());
            let slow = perplexity_slow(&model, &tokens, &cfg).unwrap();
            assert_eq!(calls.into_inner(), 3);
            assert_eq!(fast.tokens_scored, slow.tokens_scored);
            let per_window = match scoring {
                Scoring::All => 255,
                Scoring::SecondHalf => 127,
            };
            assert_eq!(fast.tokens_scored, 3 * per_window);
            // Both sum the same f64 NLLs computed two ways; each term's rounding
            // is ~1e-16 relative, so 1e-12 on the total is generous.
            let rel = (fast.nll_sum - slow.nll_sum).abs() / slow.nll_sum;
            assert!(
                rel < 1e-12,
                "{scoring:?}: {} vs {}",
                fast.nll_sum,
                slow.nll_sum
            );
            let ppl = fast.perplexity();
            assert!((1.5..20.0).contains(&ppl), "{scoring:?}: perplexity {ppl}");
            eprintln!("stories260K TinyStories {scoring:?} ctx 256 x3: ppl {ppl:.4}");
        }
    }

    #[test]
    fn bad_configs() {
        let ck = crate::model::load_checkpoint(assets::stories260k_model());
        let Ok(ck) = ck else { return };
        let model = Llama::from_checkpoint(&ck).unwrap();
        let cfg = |context| PerplexityConfig {
            context,
            max_windows: None,
            scoring: Scoring::All,
            bos: None,
        };
        assert!(perplexity(&model, &[1; 100], &cfg(1), |_, _| {}).is_err());
        assert!(perplexity(&model, &[1; 100], &cfg(1000), |_, _| {}).is_err());
        assert!(perplexity(&model, &[1; 10], &cfg(16), |_, _| {}).is_err());
    }
}
