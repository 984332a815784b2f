//! GPU memory accounting: weights, the activation peak, fixed overheads and the
//! KV-cache capacity, computed the way vLLM computes it.
//!
//! vLLM (v0.10, V1 engine, `gpu_worker.determine_available_memory`) loads the
//! weights, runs one dummy forward pass over `max_num_batched_tokens` tokens
//! (the *profile run*), and gives the KV cache what is left of
//! `total × gpu_memory_utilization`:
//!
//! ```text
//!   requested  = total_memory × gpu_memory_utilization
//!   non_kv     = weights + torch activation peak + non-torch increase
//!   available  = requested − non_kv
//!   num_blocks = floor(available / (block_size × kv_bytes_per_token_per_gpu))
//!              ( = vLLM's  available // page_size // num_layers  with
//!                page_size = 2·block_size·kv_heads_per_gpu·head_dim·dtype_bytes )
//! ```
//!
//! `total_memory` is what `cudaMemGetInfo` reports (79.18 GiB on an "80 GB"
//! H100), recorded as `driver_total_bytes` in the hardware catalog where it
//! was measured; the datasheet capacity stands in elsewhere.
//!
//! The CUDA context is created before vLLM's baseline snapshot, so vLLM does not
//! subtract it: it lives in the `1 − utilization` slack. We report it
//! ([`MemoryOptions::cuda_context_bytes`]) and check that it fits beside the
//! requested memory, but, like vLLM, do not take it from the KV budget.
//!
//! Weights come from one source: every linear layer's bytes are
//! [`QuantFormat::packed_bytes`] of the shard one GPU holds (column-parallel
//! layers split their output features over `tp`, row-parallel layers their input
//! features; so a GPTQ group must divide the per-GPU input width, as in vLLM).
//! Embeddings, the LM head, norms, biases and MoE routers stay in the dense
//! `weight_dtype`. The vocabulary is padded to a multiple of 64 as vLLM's
//! `VocabParallelEmbedding` does.
//!
//! The activation peak models the profile run from its largest live tensors
//! (per GPU, `T = max_num_batched_tokens`, `b` = activation bytes, `S` =
//! `min(max_num_seqs, T)` sampled rows, `V'` = padded vocabulary):
//!
//! ```text
//!   attention phase:  T·b·(2h + (q_dim + 2·kv_dim)/tp + q_dim/tp)       residual, normed input, qkv, attn out
//!   MLP phase (gated): T·b·(2h + k·3·I/tp) [+ T·k·h·b for MoE]            residual, normed input, gate_up, act out
//!   MLP phase (plain): T·b·(2h + k·2·I/tp)
//!   logits phase:     T·h·b + S·V'/tp·b + S·V'·b + 2·S·V·4                hidden, logits shard, gathered logits,
//!                                                                         fp32 logits and probabilities
//!   activation_peak = max(attention, MLP, logits)
//! ```
//! (`k` = experts per token, 1 for dense models.) vLLM measures this with the
//! PyTorch allocator; this closed form is the part of it that scales with the
//! token budget, and ignores allocator fragmentation.

use inferlab_models::config::MlpKind;
use inferlab_models::{Dtype, HardwareSpec, ModelConfig};
use inferlab_reference::quant::bytes::QuantFormat;
use serde::Serialize;

use crate::{Error, Result};

const MIB: u64 = 1 << 20;

/// vLLM pads the vocabulary of its parallel embedding and LM head to this.
pub const VOCAB_PADDING: u64 = 64;

/// What a deployment looks like, for memory purposes.
///
/// `Default` follows vLLM v0.10 (V1 engine, `vllm serve`): bf16 weights and KV
/// cache (`--dtype auto` on a bf16 checkpoint, `--kv-cache-dtype auto`), block
/// size 16, `gpu_memory_utilization` 0.9, `max_num_batched_tokens` 8192 and
/// `max_num_seqs` 256 (v0.10 raises `max_num_seqs` to 1024 on GPUs with at least
/// 70 GiB; we keep 256 so the default does not depend on the GPU).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryOptions {
    /// Dense dtype of the weights (and of embeddings, norms and the LM head
    /// when `quant` is set).
    pub weight_dtype: Dtype,
    /// Weight-only quantization of the linear layers; `None` = dense.
    pub quant: Option<QuantFormat>,
    pub kv_dtype: Dtype,
    /// Tensor-parallel degree (GPUs per replica).
    pub tp: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Fraction of the GPU's memory this process may use, in (0, 1].
    pub gpu_memory_utilization: f64,
    /// Token budget of one step (the profile run's size).
    pub max_num_batched_tokens: u64,
    /// Sequences per step (rows of the profile run's sampler).
    pub max_num_seqs: u64,
    /// CUDA context; reported, not subtracted (see module doc). Default
    /// 552,402,944 B: total − free after creating a bare primary context,
    /// measured on the lent H100 and H200 (driver 580), identical on both.
    pub cuda_context_bytes: u64,
    /// Non-torch memory the profile run adds with one GPU: cuBLAS/cuBLASLt
    /// workspaces and the like. Default 128 MiB (vLLM logs about 0.13 GiB of
    /// "non-torch" memory for single-GPU models on H100).
    pub cublas_workspace_bytes: u64,
    /// Extra non-torch memory per GPU when `tp > 1` (NCCL buffers, custom
    /// all-reduce IPC buffers). Default 384 MiB (about 0.55 GiB vs 0.13 GiB
    /// logged by vLLM for TP=2 vs TP=1).
    pub nccl_bytes: u64,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            weight_dtype: Dtype::Bf16,
            quant: None,
            kv_dtype: Dtype::Bf16,
            tp: 1,
            block_size: 16,
            gpu_memory_utilization: 0.9,
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            cuda_context_bytes: 552_402_944,
            cublas_workspace_bytes: 128 * MIB,
            nccl_bytes: 384 * MIB,
        }
    }
}

/// Per-GPU weight bytes, by part. Per-layer figures are for one decoder layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WeightBytes {
    /// Fused q, k, v projection (column-parallel), plus biases.
    pub qkv_per_layer: u64,
    /// Output projection (row-parallel).
    pub o_per_layer: u64,
    /// Gate and up projections of one expert (column-parallel).
    pub gate_up_per_expert: u64,
    /// Down projection of one expert (row-parallel).
    pub down_per_expert: u64,
    /// Experts per layer (1 for dense models).
    pub experts: u64,
    /// MoE router (replicated, dense dtype).
    pub router_per_layer: u64,
    /// Norm weights (replicated, dense dtype).
    pub norms_per_layer: u64,
    pub layers: u64,
    /// Token embedding shard (vocab-parallel, dense dtype).
    pub embedding: u64,
    /// LM head shard (0 when tied to the embedding).
    pub lm_head: u64,
    /// Final norm.
    pub final_norm: u64,
}

impl WeightBytes {
    /// One expert's MLP (all of its matrices).
    pub fn mlp_per_expert(&self) -> u64 {
        self.gate_up_per_expert + self.down_per_expert
    }
    pub fn per_layer(&self) -> u64 {
        self.qkv_per_layer
            + self.o_per_layer
            + self.experts * self.mlp_per_expert()
            + self.router_per_layer
            + self.norms_per_layer
    }
    /// Linear layers of all decoder layers (what quantization shrinks).
    pub fn linear(&self) -> u64 {
        self.layers * (self.qkv_per_layer + self.o_per_layer + self.experts * self.mlp_per_expert())
    }
    pub fn total(&self) -> u64 {
        self.layers * self.per_layer() + self.embedding + self.lm_head + self.final_norm
    }
}

/// The memory picture of one GPU of a replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub hardware: String,
    pub tp: u32,
    /// The GPU's memory as the driver reports it
    /// ([`HardwareSpec::usable_memory_bytes`]: measured, else the datasheet's).
    pub total_bytes: u64,
    /// `floor(total × gpu_memory_utilization)`.
    pub requested_bytes: u64,
    pub weights: WeightBytes,
    pub weight_bytes: u64,
    pub activation_peak_bytes: u64,
    /// Non-torch memory counted against the budget (cuBLAS workspace, NCCL).
    pub overhead_bytes: u64,
    /// CUDA context: outside the budget (see module doc).
    pub cuda_context_bytes: u64,
    /// `requested − weights − activation peak − overhead`.
    pub kv_budget_bytes: u64,
    /// KV bytes per token on one GPU (its share of the KV heads).
    pub kv_bytes_per_token: u64,
    pub block_size: u32,
    pub kv_bytes_per_block: u64,
    pub num_kv_blocks: u64,
    /// `num_kv_blocks × block_size`.
    pub max_tokens_in_flight: u64,
    /// How many sequences of `max_position_embeddings` tokens fit at once.
    pub max_full_length_seqs: u64,
    /// `kv_budget_bytes − num_kv_blocks × kv_bytes_per_block` (less than a block).
    pub unused_bytes: u64,
}

/// Activation bytes per element: the weight dtype when it is a 16- or 32-bit
/// float, else bf16 (8-bit and quantized weights run with 16-bit activations).
pub fn activation_dtype(weight_dtype: Dtype) -> Dtype {
    match weight_dtype {
        Dtype::F32 | Dtype::F16 | Dtype::Bf16 => weight_dtype,
        _ => Dtype::Bf16,
    }
}

/// Vocabulary padded as vLLM pads it ([`VOCAB_PADDING`]).
pub fn padded_vocab(model: &ModelConfig) -> u64 {
    model.vocab_size.div_ceil(VOCAB_PADDING) * VOCAB_PADDING
}

/// KV heads one GPU holds: `kv_heads / tp`, or 1 when `tp > kv_heads` (vLLM
/// replicates KV heads when there are fewer than GPUs).
pub fn kv_heads_per_gpu(model: &ModelConfig, tp: u32) -> u64 {
    (model.num_kv_heads() / tp as u64).max(1)
}

/// KV bytes per token on one GPU, from [`ModelConfig::kv_bytes_per_token`].
pub fn kv_bytes_per_token_per_gpu(model: &ModelConfig, kv_dtype: Dtype, tp: u32) -> u64 {
    let all = model.kv_bytes_per_token(kv_dtype);
    // kv_bytes_per_token is linear in the number of KV heads.
    all / model.num_kv_heads() * kv_heads_per_gpu(model, tp)
}

/// Check that `tp` splits the model the way vLLM requires.
pub fn validate_tp(model: &ModelConfig, tp: u32) -> Result<()> {
    let bad = |reason: String| Err(Error::invalid("tp", reason));
    if tp == 0 {
        return bad("must be at least 1".into());
    }
    let t = tp as u64;
    if model.num_attention_heads % t != 0 {
        return bad(format!(
            "{tp} does not divide num_attention_heads = {}",
            model.num_attention_heads
        ));
    }
    let kv = model.num_kv_heads();
    if kv % t != 0 && t % kv != 0 {
        return bad(format!(
            "{tp} neither divides nor is a multiple of num_key_value_heads = {kv}"
        ));
    }
    if model.intermediate_size % t != 0 {
        return bad(format!(
            "{tp} does not divide intermediate_size = {}",
            model.intermediate_size
        ));
    }
    Ok(())
}

/// The format of the linear layers: `quant`, or dense `weight_dtype`.
pub fn linear_format(weight_dtype: Dtype, quant: Option<QuantFormat>) -> QuantFormat {
    quant.unwrap_or(QuantFormat::Dense {
        bits: weight_dtype.bits(),
    })
}

fn packed(fmt: QuantFormat, layer: &str, out: u64, inp: u64) -> Result<u64> {
    fmt.packed_bytes(out, inp).map(|b| b.total()).map_err(|e| {
        Error::invalid(
            "quant",
            format!("layer {layer} [{out}, {inp}] per GPU: {e}"),
        )
    })
}

/// Per-GPU weight bytes of `model` with `tp`-way tensor parallelism.
pub fn weight_bytes(
    model: &ModelConfig,
    weight_dtype: Dtype,
    quant: Option<QuantFormat>,
    tp: u32,
) -> Result<WeightBytes> {
    validate_tp(model, tp)?;
    let t = tp as u64;
    let fmt = linear_format(weight_dtype, quant);
    let dense = |n: u64| weight_dtype.bytes_for(n);
    let h = model.hidden_size;
    let q = model.q_dim() / t;
    let kv = model.head_dim() * kv_heads_per_gpu(model, tp);
    let i = model.intermediate_size / t;
    let qkv_bias = if model.attention_bias.unwrap_or(false) {
        dense(q + 2 * kv)
    } else {
        0
    };
    let gate_up = match model.mlp_kind() {
        MlpKind::Gated => packed(fmt, "gate_up_proj", 2 * i, h)?,
        MlpKind::Plain => packed(fmt, "up_proj", i, h)?,
    };
    let vocab = padded_vocab(model) / t;
    let norm_w = if model.norm_type.as_deref() == Some("layer") {
        2 * h
    } else {
        h
    };
    let emb = dense(vocab * h);
    Ok(WeightBytes {
        qkv_per_layer: packed(fmt, "qkv_proj", q + 2 * kv, h)? + qkv_bias,
        o_per_layer: packed(fmt, "o_proj", h, q)?,
        gate_up_per_expert: gate_up,
        down_per_expert: packed(fmt, "down_proj", h, i)?,
        experts: model.num_experts(),
        router_per_layer: dense(model.router_params_per_layer()),
        norms_per_layer: dense(model.norm_params_per_layer()),
        layers: model.num_hidden_layers,
        embedding: emb,
        lm_head: if model.tie_word_embeddings { 0 } else { emb },
        final_norm: dense(norm_w),
    })
}

/// Activation peak of the profile run (formula in the module doc), per GPU.
pub fn activation_peak_bytes(
    model: &ModelConfig,
    act_dtype: Dtype,
    tp: u32,
    max_num_batched_tokens: u64,
    max_num_seqs: u64,
) -> u64 {
    // u128: an absurd token budget must read as "does not fit", not wrap.
    let t = tp as u128;
    let tok = max_num_batched_tokens as u128;
    let b = act_dtype.bytes_for(1) as u128;
    let h = model.hidden_size as u128;
    let q = model.q_dim() as u128 / t;
    let kv = (model.head_dim() * kv_heads_per_gpu(model, tp)) as u128;
    let i = model.intermediate_size as u128 / t;
    let k = model.experts_per_token() as u128;
    let attn = tok * b * (2 * h + q + 2 * kv + q);
    let mlp_width = match model.mlp_kind() {
        MlpKind::Gated => 3 * i,
        MlpKind::Plain => 2 * i,
    };
    let moe_out = if model.num_experts() > 1 { k * h } else { 0 };
    let mlp = tok * b * (2 * h + k * mlp_width + moe_out);
    let rows = (max_num_seqs as u128).min(tok);
    let vp = padded_vocab(model) as u128;
    let logits =
        tok * h * b + rows * (vp / t) * b + rows * vp * b + 2 * rows * model.vocab_size as u128 * 4;
    u64::try_from(attn.max(mlp).max(logits)).unwrap_or(u64::MAX)
}

fn check_options(opts: &MemoryOptions) -> Result<()> {
    let u = opts.gpu_memory_utilization;
    if !(u.is_finite() && u > 0.0 && u <= 1.0) {
        return Err(Error::invalid(
            "gpu_memory_utilization",
            format!("{u} is not in (0, 1]"),
        ));
    }
    if opts.block_size == 0 {
        return Err(Error::invalid("block_size", "must be at least 1"));
    }
    if opts.max_num_batched_tokens == 0 {
        return Err(Error::invalid(
            "max_num_batched_tokens",
            "must be at least 1",
        ));
    }
    if opts.max_num_seqs == 0 {
        return Err(Error::invalid("max_num_seqs", "must be at least 1"));
    }
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// The memory plan of one GPU of a `tp`-way replica (see the module doc).
pub fn plan_memory(
    model: &ModelConfig,
    hw: &HardwareSpec,
    opts: &MemoryOptions,
) -> Result<MemoryPlan> {
    check_options(opts)?;
    let weights = weight_bytes(model, opts.weight_dtype, opts.quant, opts.tp)?;
    let weight_bytes = weights.total();
    let activation_peak_bytes = activation_peak_bytes(
        model,
        activation_dtype(opts.weight_dtype),
        opts.tp,
        opts.max_num_batched_tokens,
        opts.max_num_seqs,
    );
    let overhead_bytes =
        opts.cublas_workspace_bytes + if opts.tp > 1 { opts.nccl_bytes } else { 0 };
    let total_bytes = hw.usable_memory_bytes();
    // floor(total × u): u ≤ 1 and total < 2^53 in practice, so f64 is exact
    // enough for a byte count (the product is rounded down, as int() does in vLLM).
    let requested_bytes = (total_bytes as f64 * opts.gpu_memory_utilization).floor() as u64;
    let kv_bytes_per_token = kv_bytes_per_token_per_gpu(model, opts.kv_dtype, opts.tp);
    let kv_bytes_per_block = (opts.block_size as u64).saturating_mul(kv_bytes_per_token);
    let non_kv = weight_bytes
        .saturating_add(activation_peak_bytes)
        .saturating_add(overhead_bytes);
    let detail = format!(
        "weights {} + activation peak {} + overhead {} + one KV block {}",
        gib(weight_bytes),
        gib(activation_peak_bytes),
        gib(overhead_bytes),
        kv_bytes_per_block
    );
    let does_not_fit = || Error::DoesNotFit {
        hardware: hw.name.clone(),
        needed_bytes: non_kv.saturating_add(kv_bytes_per_block),
        usable_bytes: requested_bytes,
        detail: detail.clone(),
    };
    if non_kv.saturating_add(kv_bytes_per_block) > requested_bytes {
        return Err(does_not_fit());
    }
    if requested_bytes + opts.cuda_context_bytes > total_bytes {
        return Err(Error::invalid(
            "gpu_memory_utilization",
            format!(
                "{} leaves {} for the CUDA context ({} needed) on {}",
                opts.gpu_memory_utilization,
                gib(total_bytes - requested_bytes),
                gib(opts.cuda_context_bytes),
                hw.name
            ),
        ));
    }
    let kv_budget_bytes = requested_bytes - non_kv;
    let num_kv_blocks = kv_budget_bytes / kv_bytes_per_block;
    let max_tokens_in_flight = num_kv_blocks * opts.block_size as u64;
    Ok(MemoryPlan {
        hardware: hw.name.clone(),
        tp: opts.tp,
        total_bytes,
        requested_bytes,
        weights,
        weight_bytes,
        activation_peak_bytes,
        overhead_bytes,
        cuda_context_bytes: opts.cuda_context_bytes,
        kv_budget_bytes,
        kv_bytes_per_token,
        block_size: opts.block_size,
        kv_bytes_per_block,
        num_kv_blocks,
        max_tokens_in_flight,
        max_full_length_seqs: max_tokens_in_flight / model.max_position_embeddings,
        unused_bytes: kv_budget_bytes - num_kv_blocks * kv_bytes_per_block,
    })
}

/// Parse a quantization name: `none`/`dense`, `gptq-4bit-g128`, `awq-4bit-g128`,
/// `gguf-q4_0`, `gguf-q4_1`, `gguf-q8_0` (the `gguf-` prefix is optional).
pub fn parse_quant(name: &str) -> Result<Option<QuantFormat>> {
    let s = name.trim().to_ascii_lowercase();
    let bad = |why: &str| {
        Err(Error::invalid(
            "quant",
            format!(
                "`{name}`: {why} (known: none, gptq-<bits>bit-g<group>, awq-<bits>bit-g<group>, \
                 gguf-q4_0, gguf-q4_1, gguf-q8_0)"
            ),
        ))
    };
    match s.trim_start_matches("gguf-") {
        "none" | "dense" => return Ok(None),
        "q4_0" => return Ok(Some(QuantFormat::GgufQ4_0)),
        "q4_1" => return Ok(Some(QuantFormat::GgufQ4_1)),
        "q8_0" => return Ok(Some(QuantFormat::GgufQ8_0)),
        _ => {}
    }
    let parts: Vec<&str> = s.split('-').collect();
    let [kind, bits, group] = parts.as_slice() else {
        return bad("not a known name");
    };
    let Some(bits) = bits.strip_suffix("bit").and_then(|b| b.parse::<u32>().ok()) else {
        return bad("bits must be written like `4bit`");
    };
    let Some(group_size) = group.strip_prefix('g').and_then(|g| g.parse::<u32>().ok()) else {
        return bad("group size must be written like `g128`");
    };
    if !(2..=8).contains(&bits) {
        return bad("bits must be in 2..=8");
    }
    if group_size == 0 {
        return bad("group size must be positive");
    }
    match *kind {
        "gptq" => Ok(Some(QuantFormat::Gptq { bits, group_size })),
        "awq" => Ok(Some(QuantFormat::Awq { bits, group_size })),
        _ => bad("unknown method"),
    }
}

/// The name [`parse_quant`] reads back.
pub fn quant_name(q: Option<QuantFormat>) -> String {
    match q {
        None => "none".into(),
        Some(QuantFormat::Dense { bits }) => format!("dense-{bits}bit"),
        Some(QuantFormat::Gptq { bits, group_size }) => format!("gptq-{bits}bit-g{group_size}"),
        Some(QuantFormat::Awq { bits, group_size }) => format!("awq-{bits}bit-g{group_size}"),
        Some(QuantFormat::GgufQ4_0) => "gguf-q4_0".into(),
        Some(QuantFormat::GgufQ4_1) => "gguf-q4_1".into(),
        Some(QuantFormat::GgufQ8_0) => "gguf-q8_0".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_models::*;

    #[test]
    fn memory_kv_bytes_per_token_first_principles() {
        // 2 (K and V) · layers · kv_heads · head_dim · dtype bytes, divided by tp
        // as whole KV heads (replicated when tp > kv_heads).
        fn check(
            m: ModelConfig,
            dtype: Dtype,
            tp: u32,
            layers: u64,
            kv_heads: u64,
            head_dim: u64,
            bytes: u64,
        ) {
            assert_eq!(m.num_hidden_layers, layers);
            assert_eq!(m.num_kv_heads(), kv_heads);
            assert_eq!(m.head_dim(), head_dim);
            let heads_per_gpu = if tp as u64 > kv_heads {
                1
            } else {
                kv_heads / tp as u64
            };
            let expect = 2 * layers * heads_per_gpu * head_dim * bytes;
            assert_eq!(
                kv_bytes_per_token_per_gpu(&m, dtype, tp),
                expect,
                "{dtype:?} tp={tp}"
            );
        }
        check(llama2_7b(), Dtype::F16, 1, 32, 32, 128, 2); // 524,288 B
        check(llama3_8b(), Dtype::Bf16, 1, 32, 8, 128, 2); // 131,072 B
        check(llama3_8b(), Dtype::Fp8, 1, 32, 8, 128, 1); // 65,536 B
        check(llama3_8b(), Dtype::Bf16, 2, 32, 8, 128, 2);
        check(llama3_70b(), Dtype::Bf16, 4, 80, 8, 128, 2);
        check(llama3_70b(), Dtype::Bf16, 16, 80, 8, 128, 2); // replicated: 1 head per GPU
        check(mixtral_8x7b(), Dtype::Bf16, 1, 32, 8, 128, 2);
        check(falcon_7b(), Dtype::Bf16, 1, 32, 1, 64, 2); // multi-query: 8,192 B
        check(llama31_405b(), Dtype::Bf16, 8, 126, 8, 128, 2);
        assert_eq!(
            kv_bytes_per_token_per_gpu(&llama2_7b(), Dtype::F16, 1),
            524_288
        );
        assert_eq!(
            kv_bytes_per_token_per_gpu(&falcon_7b(), Dtype::Bf16, 1),
            8_192
        );
    }

    #[test]
    fn memory_weights_match_parameter_count_when_dense() {
        // tp = 1 and no vocabulary padding (32000 and 128256 are multiples of
        // 64): per-GPU weight bytes = parameters · 2 for 16-bit dtypes.
        for m in [llama2_7b(), llama3_8b(), mixtral_8x7b()] {
            let w = weight_bytes(&m, Dtype::F16, None, 1).unwrap();
            assert_eq!(w.total(), 2 * m.num_params(), "{}", m.model_type);
        }
        // Llama-2-7B: 6,738,415,616 parameters (model card "7B").
        assert_eq!(llama2_7b().num_params(), 6_738_415_616);
        // tp = 2 halves every sharded part exactly and keeps norms whole.
        let m = llama2_7b();
        let w1 = weight_bytes(&m, Dtype::F16, None, 1).unwrap();
        let w2 = weight_bytes(&m, Dtype::F16, None, 2).unwrap();
        assert_eq!(2 * w2.linear(), w1.linear());
        assert_eq!(2 * w2.embedding, w1.embedding);
        assert_eq!(w2.norms_per_layer, w1.norms_per_layer);
    }

    #[test]
    fn memory_gptq_layer_bytes_by_hand() {
        // Llama-2-7B o_proj [4096, 4096], GPTQ 4-bit, group 128:
        //   qweight 4096·4096/2 = 8,388,608; scales (4096/128)·4096·2 = 262,144;
        //   qzeros 32·4096/2 = 65,536; g_idx 4096·4 = 16,384  → 8,732,672.
        let q = parse_quant("gptq-4bit-g128").unwrap();
        let w = weight_bytes(&llama2_7b(), Dtype::F16, q, 1).unwrap();
        assert_eq!(w.o_per_layer, 8_732_672);
        // Embedding and LM head stay f16: 32000·4096·2 each.
        assert_eq!(w.embedding, 262_144_000);
        assert_eq!(w.lm_head, 262_144_000);
        // A group that does not divide the per-GPU input width is an error
        // (11008 / 4 = 2752 = 21.5 groups of 128).
        let e = weight_bytes(&llama2_7b(), Dtype::F16, q, 4).unwrap_err();
        assert!(e.to_string().contains("down_proj"), "{e}");
    }

    #[test]
    fn memory_vllm_block_count_llama2_7b_a100_80gb() {
        // vLLM: num_blocks = floor((total·u − weights − activation peak − non-torch)
        //                          / (block_size · kv_bytes_per_token)).
        // Llama-2-7B f16 on A100-SXM4-80GB, u = 0.9, T = 8192, 256 seqs:
        //   total            = 80 GiB                      = 85,899,345,920
        //   total · 0.9                                     = 77,309,411,328
        //   weights          = 6,738,415,616 · 2            = 13,476,831,232
        //   activation peak  = MLP phase 8192·2·(2·4096 + 3·11008)
        //                    = 8192·2·41,216                =    675,282,944
        //                      (attention phase 8192·2·24,576 = 402,653,184 and
        //                       logits phase 165,412,864 are smaller)
        //   non-torch        = 128 MiB                      =    134,217,728
        //   available                                       = 63,023,079,424
        //   block bytes      = 16 · 2·32·32·128·2           =      8,388,608
        //   num_blocks       = floor(63,023,079,424 / 8,388,608) = 7,512
        let opts = MemoryOptions {
            weight_dtype: Dtype::F16,
            kv_dtype: Dtype::F16,
            ..Default::default()
        };
        let p = plan_memory(&llama2_7b(), &gpu("A100-SXM4-80GB"), &opts).unwrap();
        assert_eq!(p.requested_bytes, 77_309_411_328);
        assert_eq!(p.weight_bytes, 13_476_831_232);
        assert_eq!(p.activation_peak_bytes, 675_282_944);
        assert_eq!(p.overhead_bytes, 134_217_728);
        assert_eq!(p.kv_budget_bytes, 63_023_079_424);
        assert_eq!(p.kv_bytes_per_block, 8_388_608);
        assert_eq!(p.num_kv_blocks, 7_512);
        assert_eq!(p.max_tokens_in_flight, 7_512 * 16);
        assert_eq!(p.max_full_length_seqs, 120_192 / 4096);
    }

    #[test]
    fn memory_405b_bf16_does_not_fit_one_h100() {
        let e = plan_memory(
            &llama31_405b(),
            &gpu("H100-SXM5-80GB"),
            &MemoryOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::DoesNotFit { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("does not fit on H100-SXM5-80GB"), "{msg}");
        // ...but fits over 8 H200s.
        let opts = MemoryOptions {
            tp: 8,
            ..Default::default()
        };
        let p = plan_memory(&llama31_405b(), &gpu("H200-SXM-141GB"), &opts).unwrap();
        assert!(p.num_kv_blocks > 0);
    }

    #[test]
    fn memory_rejects_nonsensical_options() {
        let m = llama3_8b();
        let hw = gpu("H100-SXM5-80GB");
        let check = |opts: MemoryOptions, field: &str| {
            let e = plan_memory(&m, &hw, &opts).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument { name, .. } if name == field),
                "{field}: {e}"
            );
        };
        let d = MemoryOptions::default;
        check(
            MemoryOptions {
                gpu_memory_utilization: 0.0,
                ..d()
            },
            "gpu_memory_utilization",
        );
        check(
            MemoryOptions {
                gpu_memory_utilization: -0.5,
                ..d()
            },
            "gpu_memory_utilization",
        );
        check(
            MemoryOptions {
                gpu_memory_utilization: 1.5,
                ..d()
            },
            "gpu_memory_utilization",
        );
        check(
            MemoryOptions {
                gpu_memory_utilization: f64::NAN,
                ..d()
            },
            "gpu_memory_utilization",
        );
        // 1.0 leaves nothing for the CUDA context (vLLM refuses it too).
        check(
            MemoryOptions {
                gpu_memory_utilization: 1.0,
                ..d()
            },
            "gpu_memory_utilization",
        );
        check(MemoryOptions { tp: 0, ..d() }, "tp");
        check(MemoryOptions { tp: 3, ..d() }, "tp"); // 32 heads
        check(MemoryOptions { tp: 64, ..d() }, "tp");
        check(
            MemoryOptions {
                block_size: 0,
                ..d()
            },
            "block_size",
        );
        check(
            MemoryOptions {
                max_num_batched_tokens: 0,
                ..d()
            },
            "max_num_batched_tokens",
        );
        check(
            MemoryOptions {
                max_num_seqs: 0,
                ..d()
            },
            "max_num_seqs",
        );
        // An absurd token budget does not wrap around: it does not fit.
        let huge = MemoryOptions {
            max_num_batched_tokens: u64::MAX,
            ..d()
        };
        assert!(matches!(
            plan_memory(&m, &hw, &huge),
            Err(Error::DoesNotFit { .. })
        ));
    }

    #[test]
    fn memory_quant_names_round_trip() {
        fn check(name: &str, q: Option<QuantFormat>) {
            assert_eq!(parse_quant(name).unwrap(), q, "{name}");
            assert_eq!(parse_quant(&quant_name(q)).unwrap(), q, "{name}");
        }
        check("none", None);
        check(
            "gptq-4bit-g128",
            Some(QuantFormat::Gptq {
                bits: 4,
                group_size: 128,
            }),
        );
        check(
            "GPTQ-8bit-g64",
            Some(QuantFormat::Gptq {
                bits: 8,
                group_size: 64,
            }),
        );
        check(
            "awq-4bit-g128",
            Some(QuantFormat::Awq {
                bits: 4,
                group_size: 128,
            }),
        );
        check("gguf-q4_0", Some(QuantFormat::GgufQ4_0));
        check("q4_1", Some(QuantFormat::GgufQ4_1));
        check("gguf-q8_0", Some(QuantFormat::GgufQ8_0));
        for bad in [
            "gptq",
            "gptq-4-g128",
            "gptq-4bit-128",
            "gptq-9bit-g128",
            "gptq-4bit-g0",
            "foo-4bit-g128",
            "",
        ] {
            assert!(parse_quant(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_quantization_grows_kv_capacity() {
        let hw = gpu("H100-SXM5-80GB");
        let m = llama3_8b();
        let dense = plan_memory(&m, &hw, &MemoryOptions::default()).unwrap();
        let q = MemoryOptions {
            quant: parse_quant("awq-4bit-g128").unwrap(),
            ..Default::default()
        };
        let quant = plan_memory(&m, &hw, &q).unwrap();
        // Weights shrink by exactly the bytes the linear layers lose, and the KV
        // budget grows by the same amount (activations do not change).
        let saved = dense.weights.linear() - quant.weights.linear();
        assert_eq!(dense.weight_bytes - quant.weight_bytes, saved);
        assert_eq!(quant.kv_budget_bytes - dense.kv_budget_bytes, saved);
    }
}
