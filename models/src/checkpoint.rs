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
use std::path::{Path, PathBuf};

use crate::{ModelConfig, ModelsError, Result};

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

/// Expected row-major shape of an HF tensor under `cfg`, `None` if unknown.
pub fn expected_shape(cfg: &ModelConfig, name: &str) -> Option<Vec<usize>> {
    let h = cfg.hidden_size as usize;
    let q = cfg.q_dim() as usize;
    let kv = cfg.kv_dim() as usize;
    let ff = cfg.intermediate_size as usize;
    let v = cfg.vocab_size as usize;
    match name {
        "model.embed_tokens.weight" | "lm_head.weight" => return Some(vec![v, h]),
        "model.norm.weight" => return Some(vec![h]),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    if layer >= cfg.num_hidden_layers {
        return None;
    }
    Some(match part {
        "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
        "self_attn.q_proj.weight" => vec![q, h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
        "self_attn.o_proj.weight" => vec![h, q],
        "self_attn.q_proj.bias" => vec![q],
        "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![kv],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![ff, h],
        "mlp.down_proj.weight" => vec![h, ff],
        _ => return None,
    })
}

/// Checks that every tensor a Llama-layout model of `cfg` needs is present
/// (`lm_head.weight` only when untied); `origin` names the checkpoint.
pub fn check_complete(
    cfg: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    origin: &Path,
) -> Result<()> {
    let mut required = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !cfg.tie_word_embeddings {
        required.push("lm_head.weight".into());
    }
    let mut per_layer = vec![
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];
    if cfg.attention_bias.unwrap_or(false) {
        per_layer.extend([
            "self_attn.q_proj.bias",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.bias",
        ]);
    }
    for l in 0..cfg.num_hidden_layers {
        for p in &per_layer {
            required.push(format!("model.layers.{l}.{p}"));
        }
    }
    for r in required {
        if !tensors.contains_key(&r) {
            return Err(ModelsError::Tensor {
                path: origin.to_path_buf(),
                name: r,
                reason: "missing (the config requires it)".into(),
            });
        }
    }
    Ok(())
}

/// Loads a checkpoint by what `path` is: a `.gguf` file ([`crate::gguf::load_checkpoint`]),
/// or a Hugging Face directory / `.safetensors` file next to a `config.json`
/// ([`crate::safetensors_io::load_hf_dir`]), or a llama2.c `.bin`
/// ([`crate::llama2c::load`]); anything else is `Unsupported`.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("gguf") => crate::gguf::load_checkpoint(path),
        Some("safetensors") => crate::safetensors_io::load_hf_dir(path),
        Some("bin") => crate::llama2c::load(path),
        _ if path.is_dir() => crate::safetensors_io::load_hf_dir(path),
        _ => Err(ModelsError::Unsupported {
            path: path.to_path_buf(),
            what: "checkpoint kind (expected a .gguf, a llama2.c .bin, or a Hugging Face directory / .safetensors)".into(),
        }),
    }
}
