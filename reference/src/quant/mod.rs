//! Weight quantization: RTN, GPTQ, AWQ and their on-disk formats.
//!
//! [`bytes`] is the single source of truth for how many bytes a packed format
//! takes; the simulator's memory accounting calls it rather than its own formula.

pub mod bytes;
