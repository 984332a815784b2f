//! A closed-form step cost: one roofline for the whole step.
//!
//! `time = max(FLOPs / (peak · e_c), bytes / (bandwidth · e_m)) + overhead`, with
//! FLOPs = `2 · active params · tokens + 4 · layers · q_dim · Σ new · (cached + new/2)`
//! (projections plus attention scores and values) and bytes = weights + KV read.
//! It is the simulator's test double for `cost::CostModel` (kept so scheduler
//! tests and golden replays do not move when the detailed model is tuned).

use inferlab_models::{Dtype, HardwareSpec, ModelConfig};

use crate::plan::{StepCost, StepCostModel, StepPlan};

#[derive(Debug, Clone, PartialEq)]
pub struct ClosedFormCost {
    pub weight_bytes: f64,
    pub flops_per_token: f64,
    /// Attention FLOPs per (query token × context token).
    pub attn_flops_per_pair: f64,
    pub kv_bytes_per_token: f64,
    pub peak_flops: f64,
    pub bandwidth: f64,
    pub compute_efficiency: f64,
    pub memory_efficiency: f64,
    pub overhead_ns: u64,
}

impl ClosedFormCost {
    /// Dense model in `dtype`, split over `tp` GPUs (weights and KV divided by `tp`).
    pub fn for_model(model: &ModelConfig, hw: &HardwareSpec, dtype: Dtype, tp: u32) -> Self {
        let tp = tp.max(1) as f64;
        ClosedFormCost {
            weight_bytes: dtype.bytes_for(model.num_params()) as f64 / tp,
            flops_per_token: 2.0 * model.active_params() as f64 / tp,
            attn_flops_per_pair: 4.0 * (model.num_hidden_layers * model.q_dim()) as f64 / tp,
            kv_bytes_per_token: model.kv_bytes_per_token(dtype) as f64 / tp,
            peak_flops: hw.peak_for(dtype).unwrap_or(hw.peak_flops.bf16),
            bandwidth: hw.memory_bandwidth,
            compute_efficiency: 0.6,
            memory_efficiency: 0.8,
            overhead_ns: 2_000_000,
        }
    }
}

impl StepCostModel for ClosedFormCost {
    fn step_cost(&self, plan: &StepPlan) -> StepCost {
        let (mut tokens, mut pairs, mut ctx) = (0u64, 0f64, 0u64);
        for w in plan.prefills.iter().chain(&plan.decodes) {
            tokens += w.new_tokens;
            ctx += w.cached + w.new_tokens;
            pairs += w.new_tokens as f64 * (w.cached as f64 + w.new_tokens as f64 * 0.5);
        }
        let flops = self.flops_per_token * tokens as f64 + self.attn_flops_per_pair * pairs;
        let bytes = self.weight_bytes + self.kv_bytes_per_token * ctx as f64;
        let t_c = flops / (self.peak_flops * self.compute_efficiency);
        let t_m = bytes / (self.bandwidth * self.memory_efficiency);
        StepCost {
            mlp_ns: (t_c.max(t_m) * 1e9).round() as u64,
            launch_overhead_ns: self.overhead_ns,
            ..StepCost::default()
        }
    }
}
