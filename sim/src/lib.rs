//! # inferlab-sim: deterministic replay of LLM serving
//!
//! A discrete-event simulator in the shape of vLLM's engine loop: a scheduler
//! picks each step's tokens, a block manager hands out KV blocks, and a
//! roofline cost model turns each step into nanoseconds. Time is integer
//! nanoseconds, events are ordered by `(time, seq)`, the RNG is a field, and
//! nothing reads a clock or iterates a hash map into output.
//!
//! - [`trace`] / [`synth`]: streaming trace readers and seeded generators.
//! - [`block_manager`]: paged KV blocks with prefix caching; contiguous baseline.
//! - [`scheduler`]: continuous batching (vLLM) and static batching (HF generate).
//! - [`engine`]: the event loop; [`metrics`], [`report`], [`plot`]: the output.
//! - [`plan`]: the boundary with the cost model; [`closed_form`]: a one-line
//!   roofline used as a test double.

pub mod block_manager;
pub mod closed_form;
pub mod cost;
pub mod engine;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod plan;
pub mod plot;
pub mod report;
pub mod roofline;
pub mod scheduler;
pub mod synth;
#[cfg(test)]
pub(crate) mod test_models;
pub mod trace;

pub use error::{Error, Result};
