//! Model and hardware descriptors.
//!
//! A model descriptor is a TOML file with a `[meta]` table (name, source, the
//! published parameter count) and a `[config]` table whose keys are exactly the
//! Hugging Face `config.json` field names (`hidden_size`, `num_key_value_heads`,
//! ...). Both reject unknown fields, so a typo is an error, not a silent default.
//!
//! All counting lives here: parameters, bytes per dtype, KV-cache bytes per token.
//! The simulator and the reference read these, never their own formulas.

use serde::{Deserialize, Serialize};

/// Element types of weights, activations and KV caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F64,
    F32,
    Tf32,
    F16,
    Bf16,
    Fp8,
    Int8,
    Int4,
}

impl Dtype {
    /// Storage bits per element.
    pub fn bits(self) -> u32 {
        match self {
            Dtype::F64 => 64,
            Dtype::F32 | Dtype::Tf32 => 32,
            Dtype::F16 | Dtype::Bf16 => 16,
            Dtype::Fp8 | Dtype::Int8 => 8,
            Dtype::Int4 => 4,
        }
    }

    /// Storage bytes for `n` elements (rounded up to whole bytes).
    pub fn bytes_for(self, n: u64) -> u64 {
        (n * self.bits() as u64).div_ceil(8)
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "f64",
            Dtype::F32 => "f32",
            Dtype::Tf32 => "tf32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::Fp8 => "fp8",
            Dtype::Int8 => "int8",
            Dtype::Int4 => "int4",
        }
    }

    pub const ALL: [Dtype; 8] = [
        Dtype::F64,
        Dtype::F32,
        Dtype::Tf32,
        Dtype::F16,
        Dtype::Bf16,
        Dtype::Fp8,
        Dtype::Int8,
        Dtype::Int4,
    ];
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Dtype::ALL
            .into_iter()
            .find(|d| {
                d.name().eq_ignore_ascii_case(s)
                    || (s == "float16" && *d == Dtype::F16)
                    || (s == "bfloat16" && *d == Dtype::Bf16)
                    || (s == "float32" && *d == Dtype::F32)
            })
            .ok_or_else(|| {
                format!("unknown dtype `{s}` (known: f64, f32, tf32, f16, bf16, fp8, int8, int4)")
            })
    }
}

/// The MLP shape of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// Llama's SwiGLU: gate, up and down projections (3 matrices).
    Gated,
    /// GPT/Falcon: up and down projections (2 matrices).
    Plain,
}

/// A decoder-only transformer, in Hugging Face `config.json` terms.
///
/// Fields that some families omit are optional; the accessors below give the
/// family default (for example `num_key_value_heads` defaults to
/// `num_attention_heads`, as transformers does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// HF `model_type`: `llama`, `mistral`, `mixtral`, `qwen2`, `falcon`.
    pub model_type: String,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<u64>,
    pub vocab_size: u64,
    pub max_position_embeddings: u64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<u64>,
    /// Mixture of experts: experts per layer (Mixtral: 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_local_experts: Option<u64>,
    /// Mixture of experts: experts each token is routed to (Mixtral: 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<u64>,
    /// HF `hidden_act`: `silu` (gated MLP) or `gelu` (plain MLP).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Bias on the q/k/v projections (Qwen2: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Falcon: attention and MLP read the same layer norm (one norm per layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_attn: Option<bool>,
    /// Norm kind: `rms` (Llama) or `layer` (Falcon: weight and bias).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u64>,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "silu".into()
}

impl ModelConfig {
    pub fn num_kv_heads(&self) -> u64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> u64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn mlp_kind(&self) -> MlpKind {
        if self.hidden_act.starts_with("gelu") {
            MlpKind::Plain
        } else {
            MlpKind::Gated
        }
    }
    pub fn num_experts(&self) -> u64 {
        self.num_local_experts.unwrap_or(1)
    }
    pub fn experts_per_token(&self) -> u64 {
        self.num_experts_per_tok.unwrap_or(1)
    }
    /// Query projection output width (`num_attention_heads * head_dim`).
    pub fn q_dim(&self) -> u64 {
        self.num_attention_heads * self.head_dim()
    }
    /// K (or V) projection output width (`num_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> u64 {
        self.num_kv_heads() * self.head_dim()
    }

    /// Parameters of one decoder layer's attention (q, k, v, o and biases).
    pub fn attention_params_per_layer(&self) -> u64 {
        let h = self.hidden_size;
        let w = h * self.q_dim() + 2 * h * self.kv_dim() + self.q_dim() * h;
        let b = if self.attention_bias.unwrap_or(false) {
            self.q_dim() + 2 * self.kv_dim()
        } else {
            0
        };
        w + b
    }

    /// Parameters of one expert's MLP.
    pub fn mlp_params_per_expert(&self) -> u64 {
        let mats = match self.mlp_kind() {
            MlpKind::Gated => 3,
            MlpKind::Plain => 2,
        };
        mats * self.hidden_size * self.intermediate_size
    }

    /// Parameters of one layer's norms.
    pub fn norm_params_per_layer(&self) -> u64 {
        let per_norm = if self.norm_type.as_deref() == Some("layer") {
            2 * self.hidden_size
        } else {
            self.hidden_size
        };
        let norms = if self.parallel_attn.unwrap_or(false) {
            1
        } else {
            2
        };
        norms * per_norm
    }

    /// Router parameters of one MoE layer (zero for dense models).
    pub fn router_params_per_layer(&self) -> u64 {
        if self.num_experts() > 1 {
            self.hidden_size * self.num_experts()
        } else {
            0
        }
    }

    pub fn params_per_layer(&self) -> u64 {
        self.attention_params_per_layer()
            + self.num_experts() * self.mlp_params_per_expert()
            + self.router_params_per_layer()
            + self.norm_params_per_layer()
    }

    /// Embedding + untied classifier + final norm.
    pub fn embedding_params(&self) -> u64 {
        let emb = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        let final_norm = if self.norm_type.as_deref() == Some("layer") {
            2 * self.hidden_size
        } else {
            self.hidden_size
        };
        emb + head + final_norm
    }

    /// Total parameters, as published model cards count them (all experts).
    pub fn num_params(&self) -> u64 {
        self.num_hidden_layers * self.params_per_layer() + self.embedding_params()
    }

    /// Parameters touched per token (MoE: only the routed experts).
    pub fn active_params(&self) -> u64 {
        let per_layer = self.attention_params_per_layer()
            + self.experts_per_token() * self.mlp_params_per_expert()
            + self.router_params_per_layer()
            + self.norm_params_per_layer();
        self.num_hidden_layers * per_layer + self.embedding_params()
    }

    /// KV-cache bytes per token: 2 (K and V) x layers x kv_heads x head_dim x dtype.
    pub fn kv_bytes_per_token(&self, dtype: Dtype) -> u64 {
        dtype.bytes_for(2 * self.num_hidden_layers * self.num_kv_heads() * self.head_dim())
    }

    /// Check the shape is self-consistent; `origin` names the file for errors.
    pub fn validate(&self, origin: &std::path::Path) -> crate::Result<()> {
        let field = |f: &str, r: String| crate::ModelsError::Field {
            path: origin.to_path_buf(),
            field: f.into(),
            reason: r,
        };
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(field(name, "must be positive".into()));
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || self.num_attention_heads % kv != 0 {
            return Err(field(
                "num_key_value_heads",
                format!(
                    "{kv} does not divide num_attention_heads = {}",
                    self.num_attention_heads
                ),
            ));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(field(
                "hidden_size",
                format!(
                    "{} is not a multiple of num_attention_heads = {} (give head_dim)",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(field(
                "rope_theta",
                format!("{} is not a positive number", self.rope_theta),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(field(
                "rms_norm_eps",
                format!("{} is not a positive number", self.rms_norm_eps),
            ));
        }
        if let (Some(e), Some(k)) = (self.num_local_experts, self.num_experts_per_tok) {
            if k == 0 || k > e {
                return Err(field(
                    "num_experts_per_tok",
                    format!("{k} is not in 1..={e}"),
                ));
            }
        }
        Ok(())
    }
}

/// Dense peak throughput per dtype, FLOP/s (or OP/s for integers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeakFlops {
    pub fp32: f64,
    pub tf32: f64,
    pub bf16: f64,
    pub fp16: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8: Option<f64>,
    pub int8: f64,
}

/// A GPU, from its datasheet. Units: bytes, bytes/s, FLOP/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareSpec {
    pub name: String,
    pub memory_bytes: u64,
    pub memory_bandwidth: f64,
    pub peak_flops: PeakFlops,
    pub sm_count: u32,
    pub l2_bytes: u64,
    /// Total NVLink bandwidth per GPU (both directions), bytes/s; 0 for none.
    pub nvlink_bandwidth: f64,
    /// PCIe host link, bytes/s per direction (swap to host memory).
    pub pcie_bandwidth: f64,
    /// Total memory the CUDA driver reports (`cudaMemGetInfo`), measured on a
    /// real device: what vLLM multiplies by `gpu_memory_utilization`. Absent
    /// when not measured; then `memory_bytes` stands in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_total_bytes: Option<u64>,
}

impl HardwareSpec {
    /// The memory vLLM's budget starts from: the measured driver total when
    /// known, else the datasheet capacity (never more than `memory_bytes`, so
    /// lowering `memory_bytes` models a smaller GPU).
    pub fn usable_memory_bytes(&self) -> u64 {
        self.driver_total_bytes
            .map_or(self.memory_bytes, |d| d.min(self.memory_bytes))
    }

    /// Dense peak for a compute dtype; `None` when the GPU has no such unit.
    pub fn peak_for(&self, dtype: Dtype) -> Option<f64> {
        let p = &self.peak_flops;
        match dtype {
            Dtype::F64 => None,
            Dtype::F32 => Some(p.fp32),
            Dtype::Tf32 => Some(p.tf32),
            Dtype::F16 => Some(p.fp16),
            Dtype::Bf16 => Some(p.bf16),
            Dtype::Fp8 => p.fp8,
            Dtype::Int8 | Dtype::Int4 => Some(p.int8),
        }
    }
}
