//! The roofline cost model: one engine step ([`StepPlan`]) → nanoseconds.
//!
//! Each operator of the forward pass gets FLOPs and bytes derived from the
//! model descriptor, for one GPU of a `tp`-way replica, summed over the layers:
//!
//! ```text
//!   op time = max(FLOPs / (peak × compute_efficiency), bytes / (bandwidth × memory_efficiency))
//!   step    = Σ op times + kernels × kernel_launch_ns + all-reduces + cpu_overhead_ns (+ draft)
//! ```
//!
//! Operators (T = tokens in the step, R = rows that get logits, b = activation
//! bytes, per GPU: q = q_dim/tp, kv = kv_dim/tp, I = intermediate/tp):
//!
//! | operator        | FLOPs                                   | bytes                                          |
//! |-----------------|-----------------------------------------|------------------------------------------------|
//! | qkv_proj        | 2·T·h·(q+2kv)                           | W_qkv + T·h·b + T·(q+2kv)·b                    |
//! | attn_prefill    | 4·H·d·Σ n·(c + (n+1)/2)                 | Σ (c+n)·2kv·kvb (KV read) + n·2kv·kvb (write) + 2·n·q·b |
//! | attn_decode     | same, over decode sequences             | same: each sequence reads its whole context    |
//! | o_proj          | 2·T·q·h                                 | W_o + T·q·b + T·h·b                            |
//! | mlp_gate_up     | 2·T·k·h·2I (gated) / 2·T·k·h·I          | E_touched·W_gu + T·h·b + T·k·2I·b              |
//! | mlp_act         | 4·T·k·I                                 | 3·T·k·I·b                                      |
//! | mlp_down        | 2·T·k·I·h                               | E_touched·W_down + T·k·I·b + T·h·b             |
//! | norm_rope       | 2 norms (8·T·h) + RoPE (3·T·(q+kv))     | 2 × (3·T·h·b) + 2·T·(q+kv)·b                   |
//! | embedding       | 0                                       | 2·T·h·b                                        |
//! | lm_head         | 2·R·h·V'/tp                             | W_lm + R·h·b + R·V'/tp·b                       |
//! | sampling        | 5·R·V                                   | sampling_passes · R·V·4                        |
//! | allreduce       | ring: 2(tp−1)/tp · msg / (link × eff) + latency, 2 per layer + 1 (embedding), plus the logits all-gather |
//!
//! `H` = heads per GPU, `d` = head_dim, `n` = new tokens, `c` = cached tokens of
//! a sequence (a sliding window `w` caps the keys per query at `w` and the KV
//! read at `w + n − 1`); MoE layers (`E` experts, `k` per token) read the weights of the
//! expected number of distinct experts the step touches, `E·(1 − (1 − k/E)^T)`.
//! R = one row per prefill piece (vLLM's V1 engine computes the logits of every
//! scheduled request's last token) plus every decode token (a speculative
//! verification of k drafts scores k+1 positions).
//!
//! Weight-only quantization: weight bytes are [`QuantFormat::packed_bytes`] (the
//! same source as the memory plan), and each weight is dequantized once per
//! GEMM call at `dequant_ops_per_weight` ops on the CUDA cores (fp32 peak).
//!
//! Speculative decoding: decodes in the plan carry `k+1` new tokens; the draft
//! proposes them in `k` sequential passes, each costing `draft_cost_ratio` ×
//! a one-token target step of the same decode batch. Tokens emitted per pass
//! come from `reference::speculative::theory`.
//!
//! All arithmetic is f64; each [`StepCost`] component is rounded to integer
//! nanoseconds once (`f64::round`, deterministic).
//!
//! ## Speed: memo and decode runs (exact)
//!
//! A replay prices tens of millions of steps, so [`StepCostModel::step_cost`]
//! is a fast path with a slow twin, [`CostModel::step_cost_direct`] (every
//! operator visited per step). Both give the same [`StepCost`] bit for bit
//! (tested over random plans), because the fast path evaluates the same f64
//! expressions in the same order, only fewer times:
//!
//! - Every component except the two attention ones is a function of the
//!   step's token count `T` and logit rows `R` alone (attention is the only
//!   operator that reads the per-sequence sums, and it is alone in its
//!   component). Those components, already rounded, are memoized in a
//!   direct-mapped table keyed by the integers `(T, R)`. Invariant: a slot
//!   holds exactly what `target_cost` would compute for its key, so a hit
//!   and a miss give the same bits, and the table's state never shows in a
//!   result (collisions only cost a recomputation). The memo is a `RefCell`:
//!   a `CostModel` is not `Sync`.
//! - Launch overhead depends only on which attention operators run (kernel
//!   counts are per-model constants): four values, computed in `new`.
//! - Decode runs ([`StepCostModel::price_decode_run`]): run step `j` adds `j`
//!   to every context of a decode-only plan. While every sequence stays on
//!   [`attention_sums`]' integer path and under the sliding window's caps,
//!   its sums are `Σ(2c+2) + 2·B·j` and `Σ(c+1) + B·j` as integers, converted
//!   to f64 once, exactly as the per-step pass would; the other components
//!   are fixed for the run. Past that range (a window reached mid-run), the
//!   run continues step by step ([`crate::plan::price_decode_run_stepwise`],
//!   the slow twin, tested equal).

use inferlab_models::config::MlpKind;
use inferlab_models::{Dtype, HardwareSpec, ModelConfig};
use inferlab_reference::quant::bytes::QuantFormat;
use inferlab_reference::speculative::theory;
use std::cell::RefCell;

use serde::Serialize;

use crate::memory::{
    activation_dtype, kv_heads_per_gpu, padded_vocab, validate_tp, weight_bytes, MemoryOptions,
    WeightBytes,
};
use crate::plan::{price_decode_run_stepwise, SeqWork, StepCost, StepCostModel, StepPlan};
use crate::{Error, Result};

/// Per-position or i.i.d. draft acceptance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Acceptance {
    /// Every position accepted with this probability.
    Rate(f64),
    /// `alphas[i]`: acceptance at position i+1 given all before were accepted;
    /// its length is the number of speculative tokens.
    PerPosition(Vec<f64>),
}

/// Speculative decoding with a draft model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpeculativeOptions {
    /// Draft tokens proposed per step (k).
    pub num_speculative_tokens: u32,
    pub acceptance: Acceptance,
    /// One draft forward pass / one target decode step at the same batch.
    pub draft_cost_ratio: f64,
}

/// The deployment and the efficiencies of the roofline.
///
/// Efficiencies are placeholders until a later issue fits them to measured
/// runs; the defaults are typical fractions of peak reached by cuBLAS GEMMs
/// (0.7) and by bandwidth-bound kernels on HBM (0.8).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostOptions {
    pub weight_dtype: Dtype,
    pub quant: Option<QuantFormat>,
    pub kv_dtype: Dtype,
    pub tp: u32,
    /// Fraction of the dtype's dense peak reached by GEMMs and attention.
    pub compute_efficiency: f64,
    /// Fraction of memory bandwidth reached by every kernel.
    pub memory_efficiency: f64,
    /// Fraction of the per-direction link bandwidth reached by all-reduce.
    pub allreduce_efficiency: f64,
    /// Fixed cost of each all-reduce / all-gather call (ns).
    pub allreduce_latency_ns: f64,
    /// Launch (or CUDA-graph node) overhead per kernel (ns).
    pub kernel_launch_ns: f64,
    /// Scheduler and host work per step (ns); 0 until fitted.
    pub cpu_overhead_ns: f64,
    /// fp32 passes over the logits by the sampler (softmax, top-k/p, draw).
    pub sampling_passes: f64,
    /// CUDA-core ops to dequantize one packed weight (scale and zero).
    pub dequant_ops_per_weight: f64,
    pub speculative: Option<SpeculativeOptions>,
}

impl Default for CostOptions {
    fn default() -> Self {
        CostOptions {
            weight_dtype: Dtype::Bf16,
            quant: None,
            kv_dtype: Dtype::Bf16,
            tp: 1,
            compute_efficiency: 0.7,
            memory_efficiency: 0.8,
            allreduce_efficiency: 0.7,
            allreduce_latency_ns: 5_000.0,
            kernel_launch_ns: 1_500.0,
            cpu_overhead_ns: 0.0,
            sampling_passes: 4.0,
            dequant_ops_per_weight: 2.0,
            speculative: None,
        }
    }
}

impl CostOptions {
    /// Default efficiencies with the dtypes and `tp` of a memory plan's options.
    pub fn matching(m: &MemoryOptions) -> Self {
        CostOptions {
            weight_dtype: m.weight_dtype,
            quant: m.quant,
            kv_dtype: m.kv_dtype,
            tp: m.tp,
            ..Default::default()
        }
    }
}

/// Which [`StepCost`] field an operator's time lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Component {
    QkvProj,
    AttnPrefill,
    AttnDecode,
    OProj,
    Mlp,
    NormRope,
    LmHead,
    Sampling,
    AllReduce,
}

/// What limits an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Bound {
    Compute,
    Memory,
    /// Communication (all-reduce), neither roof.
    Network,
}

impl Bound {
    pub fn name(self) -> &'static str {
        match self {
            Bound::Compute => "compute",
            Bound::Memory => "memory",
            Bound::Network => "network",
        }
    }
}

/// One operator of a step, summed over the layers (per GPU).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpCost {
    pub name: &'static str,
    pub component: Component,
    /// FLOPs on tensor cores (or the compute dtype's units).
    pub flops: f64,
    /// Extra CUDA-core ops (dequantization), timed at the fp32 peak.
    pub aux_ops: f64,
    pub bytes: f64,
    /// Kernel launches this operator costs in the step.
    pub kernels: u64,
    /// Time without launch overhead, ns (f64, not yet rounded).
    pub time_ns: f64,
    pub bound: Bound,
}

impl OpCost {
    /// Arithmetic intensity, FLOP per byte (all ops over all bytes).
    pub fn intensity(&self) -> f64 {
        if self.bytes > 0.0 {
            (self.flops + self.aux_ops) / self.bytes
        } else {
            0.0
        }
    }
}

/// The roofline cost model of one model on one GPU type.
#[derive(Debug, Clone)]
pub struct CostModel {
    model: ModelConfig,
    hw: HardwareSpec,
    opts: CostOptions,
    weights: WeightBytes,
    /// Tensor-core peak of the compute dtype, FLOP/s.
    peak: f64,
    /// Per-direction link bandwidth used by all-reduce, bytes/s.
    link: f64,
    /// Seconds per tensor-core FLOP, per CUDA-core op and per HBM byte at the
    /// effective rates (reciprocals, so a step's cost does no division).
    s_per_flop: f64,
    /// Attention runs at the activation dtype's peak (bf16/f16 FlashAttention)
    /// even when GEMMs run in fp8/int8.
    s_per_attn_flop: f64,
    s_per_aux_op: f64,
    s_per_byte: f64,
    /// Per-model constants of the attention operators (see [`AttnShape`]).
    attn: AttnShape,
    /// Launch overhead by `[has prefill][has decode]` (the kernel count of a
    /// step depends only on which attention operators it runs).
    launch_ns: [[u64; 2]; 2],
    cpu_ns: u64,
    /// The memo of [`Self::fixed_components`] (see the module doc).
    memo: RefCell<Vec<MemoEntry>>,
}

/// The model constants attention's FLOPs and bytes are built from, computed
/// once (the same expressions, so the same f64 bits, as per step).
#[derive(Debug, Clone, Copy)]
struct AttnShape {
    l: f64,
    heads: f64,
    d: f64,
    q: f64,
    kv: f64,
    kvb: f64,
    b: f64,
}

/// One slot of the direct-mapped memo: the rounded non-attention components
/// of a step with `tokens` tokens and `rows` logit rows.
#[derive(Debug, Clone, Copy)]
struct MemoEntry {
    tokens: u64,
    rows: u64,
    comps: [u64; 9],
}

/// Slots in the memo (a power of two). A replay's steps have few distinct
/// `(tokens, rows)` shapes at a time (the decode batch moves slowly), so a
/// small table hits almost always; a collision only costs a recomputation.
const MEMO_SLOTS: usize = 1024;

fn check_fraction(name: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0 && v <= 1.0) {
        return Err(Error::invalid(name, format!("{v} is not in (0, 1]")));
    }
    Ok(())
}

fn check_nonneg(name: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(Error::invalid(
            name,
            format!("{v} is not a finite number ≥ 0"),
        ));
    }
    Ok(())
}

impl CostModel {
    pub fn new(model: &ModelConfig, hw: &HardwareSpec, opts: CostOptions) -> Result<CostModel> {
        validate_tp(model, opts.tp)?;
        check_fraction("compute_efficiency", opts.compute_efficiency)?;
        check_fraction("memory_efficiency", opts.memory_efficiency)?;
        check_fraction("allreduce_efficiency", opts.allreduce_efficiency)?;
        check_nonneg("allreduce_latency_ns", opts.allreduce_latency_ns)?;
        check_nonneg("kernel_launch_ns", opts.kernel_launch_ns)?;
        check_nonneg("cpu_overhead_ns", opts.cpu_overhead_ns)?;
        check_nonneg("sampling_passes", opts.sampling_passes)?;
        check_nonneg("dequant_ops_per_weight", opts.dequant_ops_per_weight)?;
        if let Some(s) = &opts.speculative {
            if s.num_speculative_tokens == 0 {
                return Err(Error::invalid(
                    "num_speculative_tokens",
                    "must be at least 1",
                ));
            }
            check_nonneg("draft_cost_ratio", s.draft_cost_ratio)?;
            let alphas: &[f64] = match &s.acceptance {
                Acceptance::Rate(a) => std::slice::from_ref(a),
                Acceptance::PerPosition(v) => {
                    if v.len() != s.num_speculative_tokens as usize {
                        return Err(Error::invalid(
                            "acceptance",
                            format!(
                                "{} per-position rates for {} speculative tokens",
                                v.len(),
                                s.num_speculative_tokens
                            ),
                        ));
                    }
                    v
                }
            };
            if let Some(a) = alphas
                .iter()
                .find(|a| !(a.is_finite() && (0.0..=1.0).contains(*a)))
            {
                return Err(Error::invalid(
                    "acceptance",
                    format!("{a} is not in [0, 1]"),
                ));
            }
        }
        let compute_dtype = compute_dtype(opts.weight_dtype, opts.quant);
        let act = activation_dtype(opts.weight_dtype);
        let attn_peak = hw.peak_for(act).ok_or_else(|| {
            Error::invalid(
                "dtype",
                format!("{} has no {} tensor cores", hw.name, act.name()),
            )
        })?;
        let peak = hw.peak_for(compute_dtype).ok_or_else(|| {
            Error::invalid(
                "dtype",
                format!("{} has no {} tensor cores", hw.name, compute_dtype.name()),
            )
        })?;
        for (name, v) in [
            ("memory_bandwidth", hw.memory_bandwidth),
            ("peak_flops", peak),
            ("peak_flops.fp32", hw.peak_flops.fp32),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::invalid(
                    format!("hardware {} {name}", hw.name),
                    format!("{v} is not positive"),
                ));
            }
        }
        let link = if hw.nvlink_bandwidth > 0.0 {
            hw.nvlink_bandwidth / 2.0
        } else {
            hw.pcie_bandwidth
        };
        if opts.tp > 1 && !(link.is_finite() && link > 0.0) {
            return Err(Error::invalid(
                "tp",
                format!("{} has no NVLink or PCIe bandwidth for all-reduce", hw.name),
            ));
        }
        let weights = weight_bytes(model, opts.weight_dtype, opts.quant, opts.tp)?;
        let tp = opts.tp as f64;
        let heads = model.num_attention_heads as f64 / tp;
        let d = model.head_dim() as f64;
        let attn = AttnShape {
            l: model.num_hidden_layers as f64,
            heads,
            d,
            q: heads * d,
            kv: (kv_heads_per_gpu(model, opts.tp) * model.head_dim()) as f64,
            kvb: opts.kv_dtype.bits() as f64 / 8.0,
            b: activation_dtype(opts.weight_dtype).bytes_for(1) as f64,
        };
        let mut cm = CostModel {
            model: model.clone(),
            hw: hw.clone(),
            s_per_flop: 1.0 / (peak * opts.compute_efficiency),
            s_per_attn_flop: 1.0 / (attn_peak * opts.compute_efficiency),
            s_per_aux_op: 1.0 / (hw.peak_flops.fp32 * opts.compute_efficiency),
            s_per_byte: 1.0 / (hw.memory_bandwidth * opts.memory_efficiency),
            cpu_ns: round_ns(opts.cpu_overhead_ns),
            opts,
            weights,
            peak,
            link,
            attn,
            launch_ns: [[0; 2]; 2],
            memo: RefCell::new(Vec::new()),
        };
        // Kernel counts do not depend on the sums' values, only on which
        // attention operators run: count them once per combination.
        let zero = AttnSums {
            nk2: 0.0,
            read: 0.0,
            new: 0.0,
        };
        for p in 0..2 {
            for d in 0..2 {
                let sums = StepSums {
                    tokens: 1.0,
                    rows: 1.0,
                    prefill: (p == 1).then_some(zero),
                    decode: (d == 1).then_some(zero),
                };
                let mut kernels = 0u64;
                cm.visit(&sums, &mut |op| kernels += op.kernels);
                cm.launch_ns[p][d] = round_ns(kernels as f64 * cm.opts.kernel_launch_ns);
            }
        }
        Ok(cm)
    }

    pub fn options(&self) -> &CostOptions {
        &self.opts
    }
    pub fn hardware(&self) -> &HardwareSpec {
        &self.hw
    }
    pub fn weights(&self) -> &WeightBytes {
        &self.weights
    }
    /// Tensor-core peak used for GEMMs and attention, FLOP/s.
    pub fn peak_flops(&self) -> f64 {
        self.peak
    }

    /// Expected tokens emitted per decode step (1 without speculation).
    pub fn expected_tokens_per_pass(&self) -> f64 {
        match &self.opts.speculative {
            None => 1.0,
            Some(s) => match &s.acceptance {
                Acceptance::Rate(a) => {
                    theory::expected_tokens_per_pass(*a, s.num_speculative_tokens)
                }
                Acceptance::PerPosition(v) => theory::expected_tokens_per_pass_vec(v),
            },
        }
    }

    fn roof(
        &self,
        name: &'static str,
        component: Component,
        flops: f64,
        aux: f64,
        bytes: f64,
        kernels: u64,
    ) -> OpCost {
        let per_flop = match component {
            Component::AttnPrefill | Component::AttnDecode => self.s_per_attn_flop,
            _ => self.s_per_flop,
        };
        let (time_ns, compute_bound) = self.roof_time(per_flop, flops, aux, bytes);
        OpCost {
            name,
            component,
            flops,
            aux_ops: aux,
            bytes,
            kernels,
            time_ns,
            bound: if compute_bound {
                Bound::Compute
            } else {
                Bound::Memory
            },
        }
    }

    /// An operator's time (ns, unrounded) and whether compute bounds it: the
    /// one formula every path uses.
    #[inline(always)]
    fn roof_time(&self, per_flop: f64, flops: f64, aux: f64, bytes: f64) -> (f64, bool) {
        let t_compute = flops * per_flop + aux * self.s_per_aux_op;
        let t_mem = bytes * self.s_per_byte;
        (t_compute.max(t_mem) * 1e9, t_compute >= t_mem)
    }

    /// Attention's FLOPs and bytes over the layers, from a phase's sums.
    #[inline(always)]
    fn attn_flops_bytes(&self, a: &AttnSums) -> (f64, f64) {
        let AttnShape {
            l,
            heads,
            d,
            q,
            kv,
            kvb,
            b,
        } = self.attn;
        let flops = 4.0 * heads * d * a.nk2 / 2.0;
        let bytes = a.read * 2.0 * kv * kvb + a.new * 2.0 * kv * kvb + 2.0 * a.new * q * b;
        (l * flops, l * bytes)
    }

    /// An attention component's rounded time, as [`Self::target_cost`]
    /// accumulates and rounds it (one operator in its component).
    #[inline(always)]
    fn attn_component_ns(&self, a: &AttnSums) -> u64 {
        let (f, by) = self.attn_flops_bytes(a);
        let mut acc = 0.0f64;
        acc += self.roof_time(self.s_per_attn_flop, f, 0.0, by).0;
        round_ns(acc)
    }

    /// Ring all-reduce (or all-gather, `factor` 1 instead of 2) of `msg` bytes, `calls` times.
    fn collective(&self, name: &'static str, calls: f64, msg: f64, factor: f64) -> OpCost {
        let tp = self.opts.tp as f64;
        let moved = factor * (tp - 1.0) / tp * msg;
        let t = calls
            * (moved / (self.link * self.opts.allreduce_efficiency)
                + self.opts.allreduce_latency_ns * 1e-9);
        OpCost {
            name,
            component: Component::AllReduce,
            flops: 0.0,
            aux_ops: 0.0,
            bytes: calls * moved,
            kernels: calls as u64,
            time_ns: t * 1e9,
            bound: Bound::Network,
        }
    }

    /// Dequantization ops for reading `bytes` of packed weights covering `n` weights.
    fn dequant(&self, n_weights: f64) -> f64 {
        match self.opts.quant {
            Some(QuantFormat::Dense { .. }) | None => 0.0,
            Some(_) => n_weights * self.opts.dequant_ops_per_weight,
        }
    }

    /// Every operator of `plan`, per GPU, summed over layers. Empty for an empty plan.
    pub fn operators(&self, plan: &StepPlan) -> Vec<OpCost> {
        let mut ops = Vec::with_capacity(14);
        if let Some(sums) = self.sums(plan) {
            self.visit(&sums, &mut |op| ops.push(op));
        }
        ops
    }

    /// What a step's cost depends on (None for an empty plan): one pass over
    /// the sequences, no allocation.
    fn sums(&self, plan: &StepPlan) -> Option<StepSums> {
        if plan.is_empty() {
            return None;
        }
        let w = self.model.sliding_window;
        let decode_tokens: u64 = plan.decodes.iter().map(|s| s.new_tokens).sum();
        Some(StepSums {
            tokens: plan.num_tokens() as f64,
            rows: (plan.prefills.len() as u64 + decode_tokens) as f64,
            prefill: (!plan.prefills.is_empty())
                .then(|| attention_sums(plan.prefills.iter().copied(), w)),
            decode: (!plan.decodes.is_empty())
                .then(|| attention_sums(plan.decodes.iter().copied(), w)),
        })
    }

    /// Call `sink` with every operator of a step, in table order.
    fn visit(&self, sums: &StepSums, sink: &mut impl FnMut(OpCost)) {
        let m = &self.model;
        let w = &self.weights;
        let tp = self.opts.tp as f64;
        let AttnShape { l, q, kv, b, .. } = self.attn;
        let h = m.hidden_size as f64;
        let i = m.intermediate_size as f64 / tp;
        let t = sums.tokens;
        let e = m.num_experts() as f64;
        let k = m.experts_per_token() as f64;
        let vp = padded_vocab(m) as f64;
        let v = m.vocab_size as f64;
        let rows = sums.rows;
        // Distinct experts a step's tokens touch (expected, uniform routing).
        let touched = if e > 1.0 {
            e * (1.0 - (1.0 - k / e).powf(t))
        } else {
            1.0
        };
        let gated = m.mlp_kind() == MlpKind::Gated;
        let gu_width = if gated { 2.0 * i } else { i };

        sink(self.roof(
            "embedding",
            Component::NormRope,
            0.0,
            0.0,
            2.0 * t * h * b,
            1,
        ));
        sink(self.roof(
            "qkv_proj",
            Component::QkvProj,
            l * 2.0 * t * h * (q + 2.0 * kv),
            l * self.dequant(h * (q + 2.0 * kv)),
            l * (w.qkv_per_layer as f64 + t * h * b + t * (q + 2.0 * kv) * b),
            m.num_hidden_layers,
        ));
        sink(self.roof(
            "norm_rope",
            Component::NormRope,
            l * (2.0 * 8.0 * t * h + 3.0 * t * (q + kv)),
            0.0,
            l * (2.0 * 3.0 * t * h * b + 2.0 * t * (q + kv) * b) + w.norms_per_layer as f64 * l,
            3 * m.num_hidden_layers + 1,
        ));
        let attn = |a: &AttnSums| self.attn_flops_bytes(a);
        if let Some(a) = &sums.prefill {
            let (f, by) = attn(a);
            sink(self.roof(
                "attn_prefill",
                Component::AttnPrefill,
                f,
                0.0,
                by,
                m.num_hidden_layers,
            ));
        }
        if let Some(a) = &sums.decode {
            let (f, by) = attn(a);
            sink(self.roof(
                "attn_decode",
                Component::AttnDecode,
                f,
                0.0,
                by,
                m.num_hidden_layers,
            ));
        }
        sink(self.roof(
            "o_proj",
            Component::OProj,
            l * 2.0 * t * q * h,
            l * self.dequant(q * h),
            l * (w.o_per_layer as f64 + t * q * b + t * h * b),
            m.num_hidden_layers,
        ));
        let router = if e > 1.0 {
            l * (w.router_per_layer as f64)
        } else {
            0.0
        };
        sink(self.roof(
            "mlp_gate_up",
            Component::Mlp,
            l * 2.0 * t * k * h * gu_width + if e > 1.0 { l * 2.0 * t * h * e } else { 0.0 },
            l * touched * self.dequant(h * gu_width),
            l * (touched * w.gate_up_per_expert as f64 + t * h * b + t * k * gu_width * b) + router,
            m.num_hidden_layers * if e > 1.0 { 2 } else { 1 },
        ));
        sink(self.roof(
            "mlp_act",
            Component::Mlp,
            l * 4.0 * t * k * i,
            0.0,
            l * (gu_width + i) * t * k * b,
            m.num_hidden_layers,
        ));
        sink(self.roof(
            "mlp_down",
            Component::Mlp,
            l * 2.0 * t * k * i * h,
            l * touched * self.dequant(i * h),
            l * (touched * w.down_per_expert as f64 + t * k * i * b + t * h * b),
            m.num_hidden_layers,
        ));
        let lm_w = if m.tie_word_embeddings {
            w.embedding
        } else {
            w.lm_head
        } as f64;
        sink(self.roof(
            "lm_head",
            Component::LmHead,
            2.0 * rows * h * vp / tp,
            0.0,
            lm_w + rows * h * b + rows * vp / tp * b,
            1,
        ));
        sink(self.roof(
            "sampling",
            Component::Sampling,
            5.0 * rows * v,
            0.0,
            self.opts.sampling_passes * rows * v * 4.0,
            5,
        ));
        if self.opts.tp > 1 {
            sink(self.collective("allreduce", 2.0 * l + 1.0, t * h * b, 2.0));
            sink(self.collective("logits_gather", 1.0, rows * vp * b, 1.0));
        }
    }

    /// Step cost without the draft model (the target's forward pass).
    fn target_cost(&self, sums: &StepSums) -> StepCost {
        let mut acc = [0.0f64; 9];
        let mut kernels = 0u64;
        self.visit(sums, &mut |op| {
            acc[op.component as usize] += op.time_ns;
            kernels += op.kernels;
        });
        let ns = round_ns_direct;
        StepCost {
            qkv_proj_ns: ns(acc[Component::QkvProj as usize]),
            attn_prefill_ns: ns(acc[Component::AttnPrefill as usize]),
            attn_decode_ns: ns(acc[Component::AttnDecode as usize]),
            o_proj_ns: ns(acc[Component::OProj as usize]),
            mlp_ns: ns(acc[Component::Mlp as usize]),
            norm_rope_ns: ns(acc[Component::NormRope as usize]),
            lm_head_ns: ns(acc[Component::LmHead as usize]),
            sampling_ns: ns(acc[Component::Sampling as usize]),
            allreduce_ns: ns(acc[Component::AllReduce as usize]),
            draft_ns: 0,
            launch_overhead_ns: ns(kernels as f64 * self.opts.kernel_launch_ns),
            cpu_overhead_ns: ns(self.opts.cpu_overhead_ns),
        }
    }
}

/// What one step's cost depends on, summed over its sequences.
#[derive(Debug, Clone, Copy)]
struct StepSums {
    tokens: f64,
    rows: f64,
    prefill: Option<AttnSums>,
    decode: Option<AttnSums>,
}

/// Sums over a step's sequences that attention's FLOPs and bytes need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnSums {
    /// Σ n · 2·keys, where keys = c + (n+1)/2 is the mean number of keys a new
    /// token attends to (capped at the sliding window `w`).
    pub nk2: f64,
    /// Σ KV tokens read: c + n (capped at w + n − 1).
    pub read: f64,
    /// Σ n.
    pub new: f64,
}

/// [`attention_sums`] over a slice, with `Σ new_tokens` as an integer (the
/// step's token count) from the same pass.
#[inline]
fn attention_sums_and_tokens(seqs: &[SeqWork], window: Option<u64>) -> (u64, AttnSums) {
    let mut tokens = 0u64;
    let a = attention_sums(
        seqs.iter().map(|s| {
            tokens += s.new_tokens;
            *s
        }),
        window,
    );
    (tokens, a)
}

/// [`AttnSums`], fast: integer sums (this loop is the only part of a step's
/// cost that grows with the batch). Sequences with n or c ≥ 2^31 take the f64
/// path of [`attention_sums_slow`].
pub fn attention_sums(seqs: impl IntoIterator<Item = SeqWork>, window: Option<u64>) -> AttnSums {
    const SMALL: u64 = 1 << 31;
    let (mut nk2_f, mut read_f, mut new_f) = (0f64, 0f64, 0f64);
    let (mut nk2, mut read, mut new) = (0u64, 0u64, 0u64);
    for s in seqs {
        let (n, c) = (s.new_tokens, s.cached);
        if n >= SMALL || c >= SMALL || read >= 1 << 62 {
            let one = attention_sums_slow([s], window);
            nk2_f += one.nk2;
            read_f += one.read;
            new_f += one.new;
            continue;
        }
        let (mut k2, mut r) = (2 * c + n + 1, c + n);
        if let Some(w) = window {
            k2 = k2.min(w.saturating_mul(2));
            r = r.min(w.saturating_add(n) - 1);
        }
        // n·k2 < 2^31 · 2^33 = 2^64; move the sum to f64 before it wraps.
        let p = n * k2;
        if nk2.checked_add(p).is_none() {
            nk2_f += nk2 as f64;
            nk2 = 0;
        }
        nk2 += p;
        read += r;
        new += n;
    }
    AttnSums {
        nk2: nk2_f + nk2 as f64,
        read: read_f + read as f64,
        new: new_f + new as f64,
    }
}

/// [`AttnSums`], slow twin: the formula as written, in f64.
pub fn attention_sums_slow(
    seqs: impl IntoIterator<Item = SeqWork>,
    window: Option<u64>,
) -> AttnSums {
    let mut out = AttnSums {
        nk2: 0.0,
        read: 0.0,
        new: 0.0,
    };
    for s in seqs {
        let (n, c) = (s.new_tokens as f64, s.cached as f64);
        let mut keys = c + (n + 1.0) / 2.0;
        let mut read = c + n;
        if let Some(w) = window {
            keys = keys.min(w as f64);
            read = read.min(w as f64 + n - 1.0);
        }
        out.nk2 += n * 2.0 * keys;
        out.read += read;
        out.new += n;
    }
    out
}

/// The tensor-core dtype GEMMs run in: W8A8 for dense 8-bit weights, else the
/// activation dtype (weight-only quantization dequantizes to 16 bits).
pub fn compute_dtype(weight_dtype: Dtype, quant: Option<QuantFormat>) -> Dtype {
    match (quant, weight_dtype) {
        (None, Dtype::Fp8 | Dtype::Int8) => weight_dtype,
        _ => activation_dtype(weight_dtype),
    }
}

/// A component's time, rounded once to integer nanoseconds: exactly
/// [`round_ns_direct`] (`f64::round`, half away from zero), without the
/// library call. Below 2^52, `y - trunc(y)` is exact, so comparing it with
/// 0.5 decides the rounding exactly; from 2^52 on every f64 is an integer.
#[inline(always)]
fn round_ns(x: f64) -> u64 {
    let y = x.max(0.0);
    if y < 4_503_599_627_370_496.0 {
        let t = y as u64;
        t + (y - t as f64 >= 0.5) as u64
    } else {
        y as u64
    }
}

/// [`round_ns`]'s slow twin (used by [`CostModel::step_cost_direct`]).
fn round_ns_direct(x: f64) -> u64 {
    x.max(0.0).round() as u64
}

impl CostModel {
    /// The step cost, slow twin of [`StepCostModel::step_cost`]: every
    /// operator visited per step, nothing memoized. Equal to the fast path
    /// bit for bit (tested).
    pub fn step_cost_direct(&self, plan: &StepPlan) -> StepCost {
        let Some(sums) = self.sums(plan) else {
            return StepCost::default();
        };
        let mut cost = self.target_cost(&sums);
        if let (Some(s), false) = (&self.opts.speculative, plan.decodes.is_empty()) {
            // k sequential draft passes over the decode batch, one token each,
            // each `draft_cost_ratio` of the target's one-token step.
            let n = plan.decodes.len() as f64;
            let one = StepSums {
                tokens: n,
                rows: n,
                prefill: None,
                decode: Some(attention_sums(
                    plan.decodes.iter().map(|d| SeqWork {
                        new_tokens: 1,
                        cached: d.cached,
                    }),
                    self.model.sliding_window,
                )),
            };
            let mut base = self.target_cost(&one);
            base.cpu_overhead_ns = 0;
            let draft =
                s.num_speculative_tokens as f64 * s.draft_cost_ratio * base.total_ns() as f64;
            cost.draft_ns = draft.round() as u64;
        }
        cost
    }

    /// The rounded components of every operator but attention, for a step of
    /// `tokens` tokens and `rows` logit rows (attention slots 0): computed
    /// as [`Self::target_cost`] does, so the same bits. Memoized.
    #[inline]
    fn fixed_components(&self, tokens: u64, rows: u64) -> [u64; 9] {
        let slot = (tokens
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(rows.wrapping_mul(0xbf58_476d_1ce4_e5b9))
            >> 54) as usize
            % MEMO_SLOTS;
        let mut memo = self.memo.borrow_mut();
        if memo.is_empty() {
            // an entry that can never match: tokens = 0 is an empty plan
            memo.resize(
                MEMO_SLOTS,
                MemoEntry {
                    tokens: 0,
                    rows: 0,
                    comps: [0; 9],
                },
            );
        }
        let e = &mut memo[slot];
        if e.tokens != tokens || e.rows != rows || tokens == 0 {
            *e = MemoEntry {
                tokens,
                rows,
                comps: self.fixed_components_direct(tokens, rows),
            };
        }
        e.comps
    }

    fn fixed_components_direct(&self, tokens: u64, rows: u64) -> [u64; 9] {
        let sums = StepSums {
            tokens: tokens as f64,
            rows: rows as f64,
            prefill: None,
            decode: None,
        };
        let mut acc = [0.0f64; 9];
        self.visit(&sums, &mut |op| acc[op.component as usize] += op.time_ns);
        acc.map(round_ns)
    }

    /// [`Self::target_cost`] from integer totals, with the memo.
    fn target_cost_fast(
        &self,
        tokens: u64,
        rows: u64,
        prefill: Option<&AttnSums>,
        decode: Option<&AttnSums>,
    ) -> StepCost {
        let c = self.fixed_components(tokens, rows);
        StepCost {
            qkv_proj_ns: c[Component::QkvProj as usize],
            attn_prefill_ns: prefill.map_or(0, |a| self.attn_component_ns(a)),
            attn_decode_ns: decode.map_or(0, |a| self.attn_component_ns(a)),
            o_proj_ns: c[Component::OProj as usize],
            mlp_ns: c[Component::Mlp as usize],
            norm_rope_ns: c[Component::NormRope as usize],
            lm_head_ns: c[Component::LmHead as usize],
            sampling_ns: c[Component::Sampling as usize],
            allreduce_ns: c[Component::AllReduce as usize],
            draft_ns: 0,
            launch_overhead_ns: self.launch_ns[prefill.is_some() as usize]
                [decode.is_some() as usize],
            cpu_overhead_ns: self.cpu_ns,
        }
    }

    /// The exact range of the O(1) decode-run pricing: for a decode-only
    /// plan of one-token decodes, the largest `j` such that every run step
    /// up to `j` takes [`attention_sums`]' integer path with no window cap,
    /// so its sums are `(Σ(2c+2) + 2·B·j, Σ(c+1) + B·j, B)` exactly; with the
    /// base sums. None when the plan is not such a plan.
    fn decode_run_base(&self, plan: &StepPlan) -> Option<(u64, u64, u64)> {
        const SMALL: u64 = 1 << 31;
        if !plan.prefills.is_empty()
            || plan.decodes.is_empty()
            || self.opts.speculative.is_some()
            || plan.decodes.len() as u64 >= 1 << 30
        {
            return None;
        }
        let (mut nk2, mut read, mut max_c) = (0u64, 0u64, 0u64);
        for s in &plan.decodes {
            if s.new_tokens != 1 || s.cached >= SMALL {
                return None;
            }
            nk2 += 2 * s.cached + 2;
            read += s.cached + 1;
            max_c = max_c.max(s.cached);
        }
        // c + j < 2^31 keeps every sequence on the integer path (and with
        // B < 2^30 the sums stay below 2^62: no f64 flush); c + j + 1 ≤ w
        // keeps every sequence under the sliding window's caps.
        let mut j_max = SMALL - 1 - max_c;
        if let Some(w) = self.model.sliding_window {
            j_max = j_max.min(w.saturating_sub(max_c + 1));
        }
        Some((nk2, read, j_max))
    }
}

impl StepCostModel for CostModel {
    /// Memoized: the components that depend only on the step's token and
    /// row counts come from the memo; attention is computed from one pass
    /// over the sequences. Equal to [`CostModel::step_cost_direct`].
    fn step_cost(&self, plan: &StepPlan) -> StepCost {
        if plan.is_empty() {
            return StepCost::default();
        }
        let w = self.model.sliding_window;
        let (p_tokens, prefill) = if plan.prefills.is_empty() {
            (0, None)
        } else {
            let (n, a) = attention_sums_and_tokens(&plan.prefills, w);
            (n, Some(a))
        };
        let (d_tokens, decode) = if plan.decodes.is_empty() {
            (0, None)
        } else {
            let (n, a) = attention_sums_and_tokens(&plan.decodes, w);
            (n, Some(a))
        };
        let rows = plan.prefills.len() as u64 + d_tokens;
        let mut cost =
            self.target_cost_fast(p_tokens + d_tokens, rows, prefill.as_ref(), decode.as_ref());
        if let (Some(s), Some(_)) = (&self.opts.speculative, &decode) {
            let n = plan.decodes.len() as u64;
            let one = attention_sums(
                plan.decodes.iter().map(|d| SeqWork {
                    new_tokens: 1,
                    cached: d.cached,
                }),
                w,
            );
            let mut base = self.target_cost_fast(n, n, None, Some(&one));
            base.cpu_overhead_ns = 0;
            let draft =
                s.num_speculative_tokens as f64 * s.draft_cost_ratio * base.total_ns() as f64;
            cost.draft_ns = draft.round() as u64;
        }
        cost
    }

    /// O(1) per step within the exact range described in the module doc
    /// (the attention sums grow by `2B` and `B` per step; everything else is
    /// fixed for the run), then step by step.
    fn price_decode_run(&self, plan: &mut StepPlan, step: &mut dyn FnMut(u64, u64) -> bool) {
        let Some((nk2, read, j_max)) = self.decode_run_base(plan) else {
            return price_decode_run_stepwise(self, plan, 0, step);
        };
        let b = plan.decodes.len() as u64;
        let mut cost = self.target_cost_fast(b, b, None, None);
        cost.launch_overhead_ns = self.launch_ns[0][1];
        // every component but attn_decode (0 here) is fixed for the run; the
        // integer sum is associative, so adding attn_decode last is exact
        let fixed = cost.total_ns();
        for j in 1..=j_max {
            let a = AttnSums {
                nk2: (nk2 + 2 * b * j) as f64,
                read: (read + b * j) as f64,
                new: b as f64,
            };
            if !step(j, fixed + self.attn_component_ns(&a)) {
                return;
            }
        }
        price_decode_run_stepwise(self, plan, j_max, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::parse_quant;
    use crate::test_models::*;

    fn decode_plan(batch: u64, context: u64) -> StepPlan {
        StepPlan {
            prefills: Vec::new(),
            decodes: vec![
                SeqWork {
                    new_tokens: 1,
                    cached: context
                };
                batch as usize
            ],
        }
    }
    fn prefill_plan(batch: u64, len: u64) -> StepPlan {
        StepPlan {
            prefills: vec![
                SeqWork {
                    new_tokens: len,
                    cached: 0
                };
                batch as usize
            ],
            decodes: Vec::new(),
        }
    }
    fn kernels(cm: &CostModel, plan: &StepPlan) -> u64 {
        cm.operators(plan).iter().map(|o| o.kernels).sum()
    }

    #[test]
    fn cost_decode_tpot_batch1_is_weight_bytes_over_bandwidth() {
        // At batch 1 every operator is memory-bound, so
        //   TPOT = (weights streamed + KV read + activation/logit traffic) / (bw · eff)
        //          + kernels · launch.
        // Weights streamed = every decoder layer + LM head (the embedding table is
        // gathered, one row per token). KV read for a context c is c+1 tokens ·
        // kv_bytes_per_token (the new token is also written: one more token).
        // The remainder (activations, a few MB of logits) is < 0.1% of 16 GB,
        // which is the tolerance.
        let m = llama3_8b();
        let hw = gpu("H100-SXM5-80GB");
        let cm = CostModel::new(&m, &hw, CostOptions::default()).unwrap();
        let c = 1000;
        let plan = decode_plan(1, c);
        assert!(cm.operators(&plan).iter().all(|o| o.bound == Bound::Memory));
        let cost = cm.step_cost(&plan);
        let w = cm.weights();
        let streamed = (w.layers * w.per_layer() + w.lm_head) as f64;
        let kv = ((c + 2) * m.kv_bytes_per_token(Dtype::Bf16)) as f64;
        let bw = hw.memory_bandwidth * 0.8;
        let launch = kernels(&cm, &plan) as f64 * 1500.0;
        let expect = (streamed + kv) / bw * 1e9 + launch;
        let got = cost.total_ns() as f64;
        assert!(got >= expect, "{got} < {expect}");
        assert!((got - expect) / expect < 1e-3, "got {got} expect {expect}");
        // About 16.06 GB / 2.68 TB/s = 6.0 ms + launches.
        assert!((6.0e6..7.0e6).contains(&got), "{got}");
        assert_eq!(cost.launch_overhead_ns, launch.round() as u64);
    }

    #[test]
    fn cost_bounds_prefill_compute_decode_memory() {
        let cm =
            CostModel::new(&llama3_8b(), &gpu("H100-SXM5-80GB"), CostOptions::default()).unwrap();
        let gemms = ["qkv_proj", "o_proj", "mlp_gate_up", "mlp_down"];
        for op in cm.operators(&prefill_plan(8, 1024)) {
            if gemms.contains(&op.name) || op.name == "attn_prefill" {
                assert_eq!(op.bound, Bound::Compute, "{}", op.name);
            }
        }
        for op in cm.operators(&decode_plan(1, 4096)) {
            assert_eq!(op.bound, Bound::Memory, "{}", op.name);
        }
        // The ridge: a GEMM with T tokens has intensity ≈ T (2·T·n·k FLOPs over
        // n·k·2 bytes), so decode GEMMs turn compute-bound once T exceeds
        // peak·eff_c / (bw·eff_m) = 989.5e12·0.7 / (3.35e12·0.8) ≈ 258.
        let below = cm.operators(&decode_plan(200, 1));
        let above = cm.operators(&decode_plan(320, 1));
        let mlp = |ops: &[OpCost]| ops.iter().find(|o| o.name == "mlp_down").unwrap().bound;
        assert_eq!(mlp(&below), Bound::Memory);
        assert_eq!(mlp(&above), Bound::Compute);
    }

    #[test]
    fn cost_quantized_decode_scales_with_bytes() {
        // Memory-bound decode: time without launches ∝ bytes moved. GPTQ-4bit
        // shrinks only the linear layers; the expected ratio is the byte ratio.
        let m = llama3_8b();
        let hw = gpu("H100-SXM5-80GB");
        let dense = CostModel::new(&m, &hw, CostOptions::default()).unwrap();
        let q = CostModel::new(
            &m,
            &hw,
            CostOptions {
                quant: parse_quant("gptq-4bit-g128").unwrap(),
                ..Default::default()
            },
        )
        .unwrap();
        let plan = decode_plan(1, 512);
        let t = |cm: &CostModel| {
            let ops = cm.operators(&plan);
            assert!(ops.iter().all(|o| o.bound == Bound::Memory));
            (
                ops.iter().map(|o| o.time_ns).sum::<f64>(),
                ops.iter().map(|o| o.bytes).sum::<f64>(),
            )
        };
        let (td, bd) = t(&dense);
        let (tq, bq) = t(&q);
        assert!(
            (tq / td - bq / bd).abs() < 1e-12,
            "{} vs {}",
            tq / td,
            bq / bd
        );
        // Linear bytes: 4.25 + a bit bits/weight vs 16, so decode is ~3x faster
        // (LM head and KV stay 16-bit).
        assert!((0.25..0.4).contains(&(tq / td)), "{}", tq / td);
        // Dequantization adds CUDA-core work.
        let aux: f64 = q.operators(&plan).iter().map(|o| o.aux_ops).sum();
        assert!(aux > 0.0);
        assert_eq!(
            dense
                .operators(&plan)
                .iter()
                .map(|o| o.aux_ops)
                .sum::<f64>(),
            0.0
        );
    }

    #[test]
    fn cost_attention_flops_and_kv_reads() {
        // attn_decode reads each sequence's whole context: doubling the context
        // of a long decode nearly doubles its bytes; prefill FLOPs follow
        // 4·H·d·n(n+1)/2 per layer.
        let m = llama3_8b();
        let cm = CostModel::new(&m, &gpu("H100-SXM5-80GB"), CostOptions::default()).unwrap();
        let bytes = |c| {
            cm.operators(&decode_plan(4, c))
                .into_iter()
                .find(|o| o.name == "attn_decode")
                .unwrap()
                .bytes
        };
        let kvt = m.kv_bytes_per_token(Dtype::Bf16) as f64;
        // Per sequence: (c+1) read + 1 written tokens of KV, + q in and out.
        let q_io = 32.0 * 2.0 * 4096.0 * 2.0;
        assert_eq!(bytes(1000), 4.0 * ((1002.0) * kvt + q_io));
        let f = cm
            .operators(&prefill_plan(1, 100))
            .into_iter()
            .find(|o| o.name == "attn_prefill")
            .unwrap()
            .flops;
        assert_eq!(f, 32.0 * 4.0 * 32.0 * 128.0 * (100.0 * 101.0 / 2.0));
        // A sliding window (Mistral-7B-v0.1: 4096) caps the KV a decode reads.
        let mut mistral = llama3_8b();
        mistral.sliding_window = Some(4096);
        let cm = CostModel::new(&mistral, &gpu("H100-SXM5-80GB"), CostOptions::default()).unwrap();
        let attn = |c| {
            cm.operators(&decode_plan(1, c))
                .into_iter()
                .find(|o| o.name == "attn_decode")
                .unwrap()
        };
        assert_eq!(attn(5000).bytes, attn(20000).bytes);
        assert_eq!(attn(5000).bytes, (4096.0 + 1.0) * kvt + q_io);
        assert!(attn(1000).bytes < attn(5000).bytes);
    }

    #[test]
    fn cost_attention_sums_fast_matches_slow() {
        // One seeded set of plans through both twins: integer sums are exact,
        // the f64 twin is exact below 2^53, so they agree exactly on ordinary
        // sizes; the huge ones (f64 fallback) agree to f64 rounding.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for case in 0..300 {
            let len = rng.random_range(0..300);
            let huge = case % 10 == 9;
            let seqs: Vec<SeqWork> = (0..len)
                .map(|_| SeqWork {
                    new_tokens: if huge && rng.random_bool(0.1) {
                        1 << 40
                    } else {
                        rng.random_range(1..3000)
                    },
                    cached: if huge && rng.random_bool(0.1) {
                        u64::MAX >> 12
                    } else {
                        rng.random_range(0..200_000)
                    },
                })
                .collect();
            for window in [None, Some(4096), Some(1), Some(u64::MAX)] {
                let (f, s) = (
                    attention_sums(seqs.iter().copied(), window),
                    attention_sums_slow(seqs.iter().copied(), window),
                );
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
                if huge {
                    assert!(
                        close(f.nk2, s.nk2) && close(f.read, s.read) && close(f.new, s.new),
                        "{case} {window:?}: {f:?} vs {s:?}"
                    );
                } else {
                    assert_eq!(f, s, "{case} {window:?}");
                }
            }
        }
    }

    /// Models and options that reach every branch of the cost model.
    fn twin_models() -> Vec<(&'static str, CostModel)> {
        let hw = gpu("H100-SXM5-80GB");
        let mut windowed = llama3_8b();
        windowed.sliding_window = Some(600);
        let spec = CostOptions {
            speculative: Some(SpeculativeOptions {
                num_speculative_tokens: 3,
                acceptance: Acceptance::Rate(0.7),
                draft_cost_ratio: 0.15,
            }),
            ..Default::default()
        };
        let d = CostOptions::default;
        [
            ("llama3-8b", llama3_8b(), d()),
            ("llama3-70b tp4", llama3_70b(), CostOptions { tp: 4, ..d() }),
            ("mixtral tp2", mixtral_8x7b(), CostOptions { tp: 2, ..d() }),
            ("window 600", windowed, d()),
            (
                "gptq",
                llama3_8b(),
                CostOptions {
                    quant: parse_quant("gptq-4bit-g128").unwrap(),
                    ..d()
                },
            ),
            ("speculative", llama3_8b(), spec),
            (
                "overheads",
                falcon_7b(),
                CostOptions {
                    cpu_overhead_ns: 12_345.6,
                    kernel_launch_ns: 1_234.5,
                    ..d()
                },
            ),
        ]
        .into_iter()
        .map(|(name, m, o)| (name, CostModel::new(&m, &hw, o).unwrap()))
        .collect()
    }

    #[test]
    fn cost_memoized_step_cost_matches_direct() {
        // The fast path (memo + one pass) against the slow twin, bit for bit,
        // over random plans; shapes repeat so the memo both hits and
        // collides (more shapes than slots).
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (name, cm) in twin_models() {
            let spec = cm.options().speculative.is_some();
            for case in 0..3000 {
                let seq = |rng: &mut rand_chacha::ChaCha8Rng, new: u64| SeqWork {
                    new_tokens: new,
                    cached: if case % 50 == 7 {
                        rng.random_range((1u64 << 31) - 3..(1 << 31) + 3)
                    } else {
                        rng.random_range(0..6000)
                    },
                };
                let np = rng.random_range(0..4usize);
                let nd = if case % 3 == 0 {
                    rng.random_range(0..8usize)
                } else {
                    rng.random_range(0..300usize)
                };
                let plan = StepPlan {
                    prefills: (0..np)
                        .map(|_| {
                            let n = rng.random_range(1..5000);
                            seq(&mut rng, n)
                        })
                        .collect(),
                    decodes: (0..nd)
                        .map(|_| {
                            let n = if spec { rng.random_range(1..5) } else { 1 };
                            seq(&mut rng, n)
                        })
                        .collect(),
                };
                let slow = cm.step_cost_direct(&plan);
                assert_eq!(cm.step_cost(&plan), slow, "{name} case {case}");
                assert_eq!(cm.step_cost(&plan), slow, "{name} case {case} (memo hit)");
            }
        }
    }

    #[test]
    fn cost_decode_run_pricing_matches_stepwise() {
        // O(1) per step against shifting the plan and pricing each step
        // (the trait's default), over runs that cross the sliding window
        // and the integer path's 2^31 limit mid-run.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        for (name, cm) in twin_models() {
            for case in 0..60 {
                let batch = rng.random_range(1..200usize);
                let near_limit = case % 10 == 3;
                let base = StepPlan {
                    prefills: Vec::new(),
                    decodes: (0..batch)
                        .map(|_| SeqWork {
                            new_tokens: 1,
                            cached: if near_limit {
                                (1 << 31) - rng.random_range(1..400)
                            } else {
                                rng.random_range(0..1000)
                            },
                        })
                        .collect(),
                };
                let steps = rng.random_range(1..900u64);
                let (fast, slow) = crate::plan::decode_run_fast_and_stepwise(&cm, &base, steps);
                assert_eq!(fast.len() as u64, steps);
                assert_eq!(fast, slow, "{name} case {case}");
            }
        }
    }

    #[test]
    fn cost_round_ns_matches_f64_round() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        let two52 = 4_503_599_627_370_496.0f64;
        let mut xs = vec![
            0.0,
            -0.0,
            -1.5,
            0.5,
            1.5,
            2.5,
            0.49999999999999994,
            two52 - 0.5,
            two52 - 1.5,
            two52,
            two52 + 1.0,
            2.0 * two52 + 2.0,
            1.8e19,
            1.9e19,
            f64::MAX,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MIN_POSITIVE,
            5e-324,
        ];
        for _ in 0..200_000 {
            let x = match rng.random_range(0..4) {
                0 => rng.random_range(0u64..1 << 40) as f64 + 0.5,
                1 => rng.random_range(0.0..1e7),
                2 => f64::from_bits(rng.random::<u64>()),
                _ => rng.random_range(0.0..1.0) * two52 * 4.0,
            };
            xs.push(x);
            xs.push(x.next_up());
            xs.push(x.next_down());
        }
        for x in xs {
            assert_eq!(round_ns(x), round_ns_direct(x), "{x:e}");
        }
    }

    #[test]
    fn cost_tensor_parallel_allreduce_ring() {
        // Two all-reduces per layer plus one after the embedding, each moving
        // 2(tp−1)/tp · T·h·b bytes over NVLink (900 GB/s both ways = 450 per
        // direction) at efficiency 0.7, plus 5 µs each.
        let m = llama3_70b();
        let hw = gpu("H100-SXM5-80GB");
        let opts = CostOptions {
            tp: 4,
            ..Default::default()
        };
        let cm = CostModel::new(&m, &hw, opts).unwrap();
        let plan = prefill_plan(1, 2048);
        let ar = cm
            .operators(&plan)
            .into_iter()
            .find(|o| o.name == "allreduce")
            .unwrap();
        let msg = 2048.0 * 8192.0 * 2.0;
        let per = 2.0 * 3.0 / 4.0 * msg / (450e9 * 0.7) + 5e-6;
        assert!((ar.time_ns - 161.0 * per * 1e9).abs() < 1e-6 * ar.time_ns);
        assert!(cm.step_cost(&plan).allreduce_ns > 0);
        let one = CostModel::new(&llama3_8b(), &hw, CostOptions::default()).unwrap();
        assert_eq!(one.step_cost(&plan).allreduce_ns, 0);
    }

    #[test]
    fn cost_speculative_draft_and_expected_tokens() {
        let m = llama3_8b();
        let hw = gpu("H100-SXM5-80GB");
        let spec = |acceptance| CostOptions {
            speculative: Some(SpeculativeOptions {
                num_speculative_tokens: 4,
                acceptance,
                draft_cost_ratio: 0.1,
            }),
            ..Default::default()
        };
        let cm = CostModel::new(&m, &hw, spec(Acceptance::Rate(0.8))).unwrap();
        // (1 − 0.8^5) / (1 − 0.8) = 3.3616
        assert!((cm.expected_tokens_per_pass() - 3.3616).abs() < 1e-12);
        let verify = StepPlan {
            prefills: Vec::new(),
            decodes: vec![
                SeqWork {
                    new_tokens: 5,
                    cached: 100
                };
                2
            ],
        };
        let plain = CostModel::new(&m, &hw, CostOptions::default()).unwrap();
        let base = plain.step_cost(&decode_plan(2, 100)).total_ns() as f64;
        let c = cm.step_cost(&verify);
        assert_eq!(c.draft_ns, (4.0 * 0.1 * base).round() as u64);
        // Verification of 5 tokens costs about one decode (memory-bound).
        let v = c.total_ns() - c.draft_ns;
        assert!((v as f64 / base - 1.0).abs() < 0.02, "{v} vs {base}");
        let vec = CostModel::new(
            &m,
            &hw,
            spec(Acceptance::PerPosition(vec![0.9, 0.8, 0.7, 0.6])),
        )
        .unwrap();
        // 1 + .9 + .72 + .504 + .3024
        assert!((vec.expected_tokens_per_pass() - 3.4264).abs() < 1e-12);
        assert!(CostModel::new(&m, &hw, spec(Acceptance::PerPosition(vec![0.9]))).is_err());
        assert!(CostModel::new(&m, &hw, spec(Acceptance::Rate(1.5))).is_err());
    }

    #[test]
    fn cost_is_deterministic_and_moe_reads_touched_experts() {
        let hw = gpu("H100-SXM5-80GB");
        let cm = CostModel::new(&llama3_8b(), &hw, CostOptions::default()).unwrap();
        let plan = StepPlan {
            prefills: vec![SeqWork {
                new_tokens: 300,
                cached: 200,
            }],
            decodes: vec![
                SeqWork {
                    new_tokens: 1,
                    cached: 77
                };
                13
            ],
        };
        assert_eq!(cm.step_cost(&plan), cm.step_cost(&plan.clone()));
        assert_eq!(cm.step_cost(&StepPlan::default()), StepCost::default());
        // Mixtral at batch 1 reads 2 of 8 experts; at a large batch, all 8.
        let mx = CostModel::new(&mixtral_8x7b(), &hw, CostOptions::default()).unwrap();
        let w = mx.weights().gate_up_per_expert as f64 * 32.0;
        let gu = |p: &StepPlan| {
            mx.operators(p)
                .into_iter()
                .find(|o| o.name == "mlp_gate_up")
                .unwrap()
                .bytes
        };
        // bytes = 32 · (E·(1 − (1 − k/E)^T) · W_gate_up + T·h·b + T·k·2I·b) + router
        let expect = |t: f64| {
            let touched = 8.0 * (1.0 - (0.75f64).powf(t));
            w * touched
                + 32.0 * (t * 4096.0 * 2.0 + t * 2.0 * 28672.0 * 2.0)
                + 32.0 * 4096.0 * 8.0 * 2.0
        };
        for t in [1u64, 4, 256] {
            let got = gu(&decode_plan(t, 10));
            assert!((got / expect(t as f64) - 1.0).abs() < 1e-12, "T={t}: {got}");
        }
        // T = 1 touches exactly k = 2 experts; T = 256 all 8 (to 1e-31).
        assert!((expect(1.0) - 32.0 * 4096.0 * 8.0 * 2.0) / w - 2.0 < 1e-3);
    }

    #[test]
    fn cost_and_memory_every_catalog_model_and_gpu() {
        // Every descriptor × GPU × tp: a plan or a typed error, never a panic;
        // where it fits, step costs are positive and grow with the context
        // and the batch.
        let models = inferlab_models::catalog::models().unwrap();
        let gpus = inferlab_models::catalog::hardware().unwrap();
        let mut fits = 0;
        for d in &models {
            for hw in &gpus {
                for tp in [1u32, 2, 4, 8] {
                    let mo = crate::memory::MemoryOptions {
                        tp,
                        ..Default::default()
                    };
                    match crate::memory::plan_memory(&d.config, hw, &mo) {
                        Ok(p) => assert!(p.num_kv_blocks > 0),
                        Err(Error::DoesNotFit { .. }) => continue,
                        Err(Error::InvalidArgument { name, .. })
                            if name == "tp" || name == "gpu_memory_utilization" =>
                        {
                            continue
                        }
                        Err(e) => panic!("{} on {} tp {tp}: {e}", d.meta.name, hw.name),
                    }
                    fits += 1;
                    let cm = CostModel::new(&d.config, hw, CostOptions::matching(&mo)).unwrap();
                    let c = |b, ctx| cm.step_cost(&decode_plan(b, ctx)).total_ns();
                    assert!(c(1, 10) > 0, "{}", d.meta.name);
                    assert!(
                        c(1, 10) <= c(1, 2000) && c(1, 2000) <= c(8, 2000),
                        "{}",
                        d.meta.name
                    );
                }
            }
        }
        assert!(fits >= gpus.len(), "{fits}");
    }

    #[test]
    fn cost_fp8_gemms_bf16_attention() {
        // W8A8 fp8 doubles the GEMM peak on H100 but attention stays bf16.
        let m = llama3_8b();
        let hw = gpu("H100-SXM5-80GB");
        let bf = CostModel::new(&m, &hw, CostOptions::default()).unwrap();
        let f8 = CostModel::new(
            &m,
            &hw,
            CostOptions {
                weight_dtype: Dtype::Fp8,
                ..Default::default()
            },
        )
        .unwrap();
        let plan = prefill_plan(4, 4096);
        let op = |cm: &CostModel, name: &str| {
            cm.operators(&plan)
                .into_iter()
                .find(|o| o.name == name)
                .unwrap()
        };
        assert_eq!(
            op(&bf, "attn_prefill").time_ns,
            op(&f8, "attn_prefill").time_ns
        );
        let (a, b) = (op(&bf, "mlp_down").time_ns, op(&f8, "mlp_down").time_ns);
        assert!((a / b - 2.0).abs() < 1e-9, "{a} {b}");
    }

    #[test]
    fn cost_rejects_bad_options() {
        let m = llama3_8b();
        let check = |hw: &str, opts: CostOptions, field: &str| {
            let e = CostModel::new(&m, &gpu(hw), opts).unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        };
        let d = CostOptions::default;
        check(
            "H100-SXM5-80GB",
            CostOptions {
                compute_efficiency: 0.0,
                ..d()
            },
            "compute_efficiency",
        );
        check(
            "H100-SXM5-80GB",
            CostOptions {
                memory_efficiency: 1.2,
                ..d()
            },
            "memory_efficiency",
        );
        check(
            "H100-SXM5-80GB",
            CostOptions {
                kernel_launch_ns: f64::NAN,
                ..d()
            },
            "kernel_launch_ns",
        );
        check("H100-SXM5-80GB", CostOptions { tp: 3, ..d() }, "tp");
        check(
            "A100-SXM4-80GB",
            CostOptions {
                weight_dtype: Dtype::Fp8,
                ..d()
            },
            "fp8",
        );
    }
}
