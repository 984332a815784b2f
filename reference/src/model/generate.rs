//! The decoding loop: prefill the prompt in one call, then one token at a time.

use super::cache::KvCache;
use super::llama::Llama;
use crate::sampling::Sampler;
use crate::{Error, Result};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was sampled (not included in the output).
    StopToken(u32),
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// The cache reached the model's context.
    Context,
}

/// Sample up to `max_new_tokens` continuation tokens of `prompt` (which includes
/// any BOS). `on_token` sees each kept token as it is produced.
pub fn generate(
    model: &Llama,
    cache: &mut KvCache,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    stop_tokens: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, StopReason)> {
    if prompt.is_empty() {
        return Err(Error::invalid(
            "prompt",
            "needs at least one token (e.g. BOS)",
        ));
    }
    let mut out = Vec::new();
    if max_new_tokens == 0 {
        return Ok((out, StopReason::MaxTokens));
    }
    let logits = model.forward(cache, prompt)?;
    let mut last = logits.row(logits.nrows() - 1).to_vec();
    loop {
        let next = sampler.sample(&last)?;
        if stop_tokens.contains(&next) {
            return Ok((out, StopReason::StopToken(next)));
        }
        out.push(next);
        on_token(next);
        if out.len() == max_new_tokens {
            return Ok((out, StopReason::MaxTokens));
        }
        if cache.len() >= cache.max_len() {
            return Ok((out, StopReason::Context));
        }
        let logits = model.forward(cache, &[next])?;
        last = logits.row(0).to_vec();
    }
}
