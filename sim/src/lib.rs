//! # inferlab-sim: deterministic replay of LLM serving
//!
//! A discrete-event simulator in the shape of vLLM's engine loop: a scheduler
//! picks each step's tokens, a block manager hands out KV blocks, and a
//! roofline cost model turns each step into nanoseconds. Time is integer
//! nanoseconds, events are ordered by `(time, seq)`, the RNG is a field, and
//! nothing reads a clock or iterates a hash map into output.

pub mod plan;
