//! The common in-memory form every checkpoint loader produces.
//!
//! Loaders (llama2.c, GGUF, safetensors) map their tensors to **Hugging Face
//! names** and dequantize to f32, so the forward pass has one input shape:
//! ```text
//!   model.embed_tokens.weight                      [vocab, hidden]
//!   model.layers.{i}.input_layernorm.weight        [hidden]
//!   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  [out, in]  (PyTorch Linear layout)
//!   model.layers.{i}.post_attention_layernorm.weight  [hidden]
//!   model.layers.{i}.mlp.{gate,up,down}_proj.weight   [out, in]
//!   model.norm.weight                              [hidden]
//!   lm_head.weight                                 [vocab, hidden]  (absent when tied)
//! ```
//! [`RopeLayout`] records how q/k rows pair dimensions for RoPE: llama2.c
//! checkpoints pair (2i, 2i+1) (interleaved); HF checkpoints pair (i, i+D/2)
//! (rotate-half). GGUF stores llama.cpp's interleaved permutation, which the
//! GGUF loader undoes, so GGUF models come out rotate-half like HF.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::ModelConfig;

/// How RoPE pairs the dimensions of each q/k head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (2i, 2i+1): llama2.c, Meta's original code.
    Interleaved,
    /// Pairs (i, i + D/2): Hugging Face transformers.
    RotateHalf,
}

/// A dense f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where the checkpoint came from and what format it was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    Llama2c,
    Gguf,
    Safetensors,
}

/// A loaded model: its config, RoPE layout and tensors under HF names.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub format: CheckpointFormat,
    pub config: ModelConfig,
    pub rope_layout: RopeLayout,
    pub tensors: BTreeMap<String, Tensor>,
}
