//! # inferlab-sim: deterministic replay of LLM serving
//!
//! A discrete-event simulator in the shape of vLLM's engine loop: a scheduler
//! picks each step's tokens, a block manager hands out KV blocks, and a
//! roofline cost model turns each step into nanoseconds. Time is integer
//! nanoseconds, events are ordered by `(time, seq)`, the RNG is a field, and
//! nothing reads a clock or iterates a hash map into output.

pub mod cost;
pub mod error;
pub mod memory;
pub mod plan;
pub mod roofline;
#[cfg(test)]
pub(crate) mod test_models;

pub use error::{Error, Result};
