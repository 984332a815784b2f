//! # inferlab-reference: the exact CPU oracle
//!
//! Every operation here is written to be read and trusted first and fast second:
//! kernels in `gpu/` and formulas in `sim/` are checked against it. Shapes follow
//! the published definitions (FlashAttention-2, vLLM's paged attention, GPTQ,
//! AWQ, speculative sampling) and each module cites what it follows.
//!
//! Layout:
//! - [`attention`]: naive, tiled (online softmax) and paged attention, one
//!   function under three strategies, generic over f32/f64.
//! - [`quant`]: RTN, GPTQ, AWQ and their packed formats; [`quant::bytes`] is the
//!   single source of packed byte counts (the simulator calls it).
//! - [`speculative`]: rejection sampling, its variants, and the acceptance
//!   theory ([`speculative::theory`]) the simulator's cost model uses.
//!
//! Randomness is always an explicit `&mut ChaCha8Rng` or explicit uniforms.

pub mod attention;
pub mod error;
pub mod model;
pub mod perplexity;
pub mod quant;
pub mod sampling;
mod simd;
pub mod speculative;

pub use error::{Error, Result};
