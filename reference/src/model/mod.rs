//! The Llama-family forward pass on real weights, its KV caches and loaders.
//!
//! - [`linear`]: `x Wᵀ` with run.c's summation order (fast path + slow twin).
//! - `attend`: run.c's attention loop, vectorized across keys for prefill (same bits).
//! - [`bf16`]: bf16 products with f32 sums on AMX tiles, for calibration passes
//!   ([`MatmulPath::Bf16`]); not the oracle.
//! - [`cache`]: [`KvCache`], contiguous or paged (block pool + block table), with
//!   `truncate` for speculative decoding's rollback.
//! - [`llama`]: [`Llama`]: RMSNorm, RoPE (interleaved or rotate-half, `rope_theta`),
//!   GQA attention over the cache, SwiGLU, tied or separate classifier.
//! - [`load_checkpoint`] / [`load_tokenizer`]: pick the loader from the file.
//!
//! ```text
//!   let ck = load_checkpoint(path)?;            // Checkpoint (HF names, f32)
//!   let model = Llama::from_checkpoint(&ck)?;   // shapes checked
//!   let mut cache = model.new_cache(CacheKind::Contiguous);
//!   let logits = model.forward(&mut cache, &prompt)?;   // prefill: [T, vocab]
//!   let logits = model.forward(&mut cache, &[next])?;   // decode:  [1, vocab]
//! ```

mod aligned;
mod attend;
pub mod bf16;
pub mod cache;
pub mod generate;
pub mod linear;
pub mod llama;
mod load;

pub use cache::{CacheKind, KvCache};
pub use generate::{generate, StopReason};
pub use linear::Linear;
pub use llama::{
    rms_norm, rms_norm_rows, rope, rope_cos_sin, softmax_in_place, AttentionKernel, LayerWeights,
    LinearObserver, Llama, LlamaConfig, LlamaWeights, MatmulPath, Proj,
};
pub use load::{load_checkpoint, load_tokenizer};

#[cfg(test)]
mod tests;
