//! A closed-form step cost: one roofline for the whole step.
//!
//! `time = max(FLOPs / (peak · e_c), bytes / (bandwidth · e_m)) + overhead`, with
//! FLOPs = `2 · active params · tokens + 4 · layers · q_dim · Σ new · (cached + new/2)`
//! (projections plus attention scores and values) and bytes = weights + KV read.
//! It is the simulator's test double for `cost::CostModel` (kept so scheduler
//! tests and golden replays do not move when the detailed model is tuned).
//!
//! Decode runs are priced in O(1) per step: for one-token decodes the sum
//! `pairs` adds `c + 0.5` per sequence, and while twice the total stays below
//! 2^53 every partial sum is a multiple of 0.5 that f64 holds exactly, so the
//! per-step f64 sum equals the integer formula `(2·Σc + 2·B·j + B) / 2`
//! (tested against the step-by-step twin).

use inferlab_models::{Dtype, HardwareSpec, ModelConfig};

use crate::plan::{price_decode_run_stepwise, StepCost, StepCostModel, StepPlan};

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

impl ClosedFormCost {
    fn cost_of(&self, tokens: u64, pairs: f64, ctx: u64) -> StepCost {
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

impl StepCostModel for ClosedFormCost {
    fn step_cost(&self, plan: &StepPlan) -> StepCost {
        let (mut tokens, mut pairs, mut ctx) = (0u64, 0f64, 0u64);
        for w in plan.prefills.iter().chain(&plan.decodes) {
            tokens += w.new_tokens;
            ctx += w.cached + w.new_tokens;
            pairs += w.new_tokens as f64 * (w.cached as f64 + w.new_tokens as f64 * 0.5);
        }
        self.cost_of(tokens, pairs, ctx)
    }

    /// O(1) per step while `2·pairs < 2^53` (see the module doc), then step
    /// by step.
    fn price_decode_run(&self, plan: &mut StepPlan, step: &mut dyn FnMut(u64, u64) -> bool) {
        const EXACT: u64 = 1 << 53;
        if !plan.prefills.is_empty() || plan.decodes.iter().any(|w| w.new_tokens != 1) {
            return price_decode_run_stepwise(self, plan, 0, step);
        }
        let b = plan.decodes.len() as u64;
        let sum_c = plan
            .decodes
            .iter()
            .try_fold(0u64, |acc, w| acc.checked_add(w.cached));
        // twice the pairs of step j: 2·Σc + 2·B·j + B, below 2^53
        let twice = |j: u64| {
            let s = sum_c?.checked_mul(2)?;
            s.checked_add(b.checked_mul(2)?.checked_mul(j)?)?
                .checked_add(b)
                .filter(|&t| t < EXACT)
        };
        let mut j = 0;
        while let Some(t) = twice(j + 1) {
            j += 1;
            let ctx = sum_c.unwrap_or(0) + b * (j + 1);
            if !step(j, self.cost_of(b, t as f64 * 0.5, ctx).total_ns()) {
                return;
            }
        }
        price_decode_run_stepwise(self, plan, j, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::SeqWork;
    use crate::test_models::{gpu, llama3_8b};

    #[test]
    fn closed_form_decode_runs_match_stepwise() {
        // O(1) pricing against the step-by-step twin, including runs that
        // cross the 2^53 exactness limit mid-run.
        use rand::{Rng, SeedableRng};
        let cm = ClosedFormCost::for_model(&llama3_8b(), &gpu("H100-SXM5-80GB"), Dtype::Bf16, 1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        for case in 0..200 {
            let batch = rng.random_range(1..300usize);
            let big = case % 10 == 4;
            let limit = (1u64 << 52) / batch as u64;
            let base = StepPlan {
                prefills: Vec::new(),
                decodes: (0..batch)
                    .map(|_| SeqWork {
                        new_tokens: 1,
                        cached: if big {
                            limit - rng.random_range(1..200)
                        } else {
                            rng.random_range(0..9000)
                        },
                    })
                    .collect(),
            };
            let steps = rng.random_range(1..600u64);
            let (fast, slow) = crate::plan::decode_run_fast_and_stepwise(&cm, &base, steps);
            assert_eq!(fast.len() as u64, steps);
            assert_eq!(fast, slow, "case {case}");
        }
        // The bound itself: just below 2^53, the sequential f64 sum of
        // `c + 0.5` equals the integer formula exactly.
        for _ in 0..2000 {
            let batch = rng.random_range(1..64u64);
            let mut cs: Vec<u64> = (0..batch)
                .map(|_| rng.random_range(0..(1u64 << 52) / batch))
                .collect();
            let t = |cs: &[u64]| 2 * cs.iter().sum::<u64>() + batch;
            let room = ((1u64 << 53) - 1 - t(&cs)) / 2;
            cs[0] += room; // the largest total the fast path accepts
            assert!(t(&cs) < 1 << 53);
            let seq = cs
                .iter()
                .fold(0f64, |p, &c| p + 1.0 * (c as f64 + 1.0 * 0.5));
            assert_eq!(seq, t(&cs) as f64 * 0.5, "{cs:?}");
        }
    }
}
