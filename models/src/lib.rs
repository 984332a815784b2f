//! # inferlab-models: descriptors and loaders
//!
//! What a model *is* (its published shape) and how its bytes are read, with no
//! arithmetic beyond counting. Everything downstream (the reference forward pass,
//! the GPU path, the simulator's memory and cost models) reads shapes from here,
//! so there is exactly one place where "Llama-3-8B has 8 KV heads" is written.
//!
//! - [`config`]: [`ModelConfig`] (Hugging Face `config.json` field names) and
//!   [`HardwareSpec`], plus [`Dtype`]. Descriptors are TOML data files under
//!   `models/catalog/`, embedded at build time and also loadable from a path.
//! - [`catalog`]: the built-in catalog of published models and GPUs.
//! - loaders for llama2.c, GGUF and safetensors checkpoints, and tokenizers.
//!
//! Loaders never allocate from an unchecked header field: every size read from a
//! file is checked against the file's length before anything is sized by it.

pub mod assets;
#[cfg(test)]
mod bad_input;
pub mod catalog;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod gguf;
pub mod llama2c;
pub mod report;
pub mod safetensors_io;
pub mod tokenizer;

pub use checkpoint::{Checkpoint, CheckpointFormat, RopeLayout, Tensor};
pub use config::{Dtype, HardwareSpec, ModelConfig};
pub use error::{ModelsError, Result};
