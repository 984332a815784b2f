//! The boundary between the scheduler and the cost model.
//!
//! `Scheduler::schedule(&mut self, ...) -> StepPlan`; `CostModel::step_cost(&StepPlan) -> StepCost`;
//! for the engine's decode runs, `StepCostModel::price_decode_run` prices a
//! run's steps (in O(1) each where the model can, else step by step).
//! A step runs some prefill chunks and some decodes in one forward pass
//! (continuous batching with chunked prefill, as vLLM's V1 engine does).

use serde::Serialize;

/// One request's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SeqWork {
    /// Tokens computed for this request in this step (1 for a decode).
    pub new_tokens: u64,
    /// Tokens already in its KV cache before this step (the attention context
    /// is `cached + new_tokens`).
    pub cached: u64,
}

/// What one engine step computes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StepPlan {
    /// Prefill (or chunked-prefill) pieces.
    pub prefills: Vec<SeqWork>,
    /// Decodes (`new_tokens` is 1, or k+1 when verifying speculative drafts).
    pub decodes: Vec<SeqWork>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> u64 {
        self.prefills
            .iter()
            .chain(&self.decodes)
            .map(|s| s.new_tokens)
            .sum()
    }
    pub fn num_seqs(&self) -> usize {
        self.prefills.len() + self.decodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.num_seqs() == 0
    }
}

/// The time of one step, one field per component, in integer nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StepCost {
    pub qkv_proj_ns: u64,
    pub attn_prefill_ns: u64,
    pub attn_decode_ns: u64,
    pub o_proj_ns: u64,
    pub mlp_ns: u64,
    pub norm_rope_ns: u64,
    pub lm_head_ns: u64,
    pub sampling_ns: u64,
    pub allreduce_ns: u64,
    pub draft_ns: u64,
    pub launch_overhead_ns: u64,
    pub cpu_overhead_ns: u64,
}

impl StepCost {
    pub fn total_ns(&self) -> u64 {
        self.qkv_proj_ns
            + self.attn_prefill_ns
            + self.attn_decode_ns
            + self.o_proj_ns
            + self.mlp_ns
            + self.norm_rope_ns
            + self.lm_head_ns
            + self.sampling_ns
            + self.allreduce_ns
            + self.draft_ns
            + self.launch_overhead_ns
            + self.cpu_overhead_ns
    }
}

/// What the engine needs from a cost model (implemented by `cost::CostModel`;
/// tests may use a simple closed form).
pub trait StepCostModel {
    fn step_cost(&self, plan: &StepPlan) -> StepCost;

    /// Price the steps of a decode run (the engine's fast-forward). `plan`
    /// holds only decodes; step `j` (1, 2, ...) of the run is `plan` with
    /// every decode's `cached` increased by `j`. Calls `step(j, ns)` with
    /// `ns = step_cost(step j).total_ns()` for `j = 1, 2, ...` until it
    /// returns false (the step it was offered is then not taken); `plan` is
    /// left in an unspecified state. The default,
    /// [`price_decode_run_stepwise`], shifts the plan and calls `step_cost`
    /// per step; a model may override it to price a step in O(1), with the
    /// same numbers.
    fn price_decode_run(&self, plan: &mut StepPlan, step: &mut dyn FnMut(u64, u64) -> bool) {
        price_decode_run_stepwise(self, plan, 0, step)
    }
}

/// Test helper: price `steps` steps of the decode run `base` with the model's
/// [`StepCostModel::price_decode_run`] and with [`price_decode_run_stepwise`]
/// (its slow twin), returning both `(step, ns)` sequences for comparison.
#[cfg(test)]
pub(crate) fn decode_run_fast_and_stepwise<C: StepCostModel>(
    cost: &C,
    base: &StepPlan,
    steps: u64,
) -> (Vec<(u64, u64)>, Vec<(u64, u64)>) {
    let collect = |stepwise: bool| {
        let mut plan = base.clone();
        let mut out = Vec::new();
        let mut take = |j: u64, ns: u64| {
            out.push((j, ns));
            j < steps
        };
        if stepwise {
            price_decode_run_stepwise(cost, &mut plan, 0, &mut take);
        } else {
            cost.price_decode_run(&mut plan, &mut take);
        }
        out
    };
    (collect(false), collect(true))
}

/// [`StepCostModel::price_decode_run`] step by step, starting after run step
/// `done` (`plan` holds the run's base contexts): the default and the slow
/// twin of any override.
pub fn price_decode_run_stepwise<C: StepCostModel + ?Sized>(
    cost: &C,
    plan: &mut StepPlan,
    done: u64,
    step: &mut dyn FnMut(u64, u64) -> bool,
) {
    for w in plan.decodes.iter_mut() {
        w.cached += done;
    }
    let mut j = done;
    loop {
        j += 1;
        for w in plan.decodes.iter_mut() {
            w.cached += 1;
        }
        if !step(j, cost.step_cost(plan).total_ns()) {
            return;
        }
    }
}
