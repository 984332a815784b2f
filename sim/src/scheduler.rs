//! Iteration-level scheduling (continuous batching, as vLLM) and a static
//! batching baseline.
//!
//! ```text
//!  arrivals -> waiting (FIFO; preempted requests go back to its front)
//!                 |  admit while running < max_num_seqs, budget > 0, and the
//!                 v  first chunk's blocks fit above the watermark
//!              running (admission order; the last one is preempted first)
//!                 |  each step: every running request gets its remaining
//!                 v  known tokens (1 for a decode), chunked to the token budget
//!              StepPlan { prefills, decodes }  -> cost model -> complete_step
//! ```
//!
//! A request with prompt `P` that has emitted `g` tokens knows `P + g` tokens;
//! `computed` of them hold KV. A step computes up to `P + g - computed` tokens
//! for it; when they are all computed the request emits its next token
//! (or, with speculative decoding, `1 + accepted` tokens). It finishes when
//! `g` reaches its trace output length.
//!
//! Policies: [`Policy::DecodeFirst`] (vLLM V1: running requests first, then
//! admissions with the leftover budget; no admission in a step that
//! preempted) and [`Policy::PrefillFirst`] (admissions first, then running
//! requests with what is left). When a running request needs a block and none
//! is free, the last running request not yet scheduled this step is preempted:
//! by recomputation (its blocks are freed, it re-prefills `P + g` tokens) or
//! by swapping (its KV goes to host memory over PCIe and comes back on resume;
//! host memory is unbounded).
//!
//! Admission control: a request whose `P + O` exceeds `max_model_len`, or whose
//! maximum KV (`P + O` tokens, plus the watermark) exceeds the whole cache, is
//! rejected at arrival and counted; it can never run, and waiting for it would hang.
//!
//! Static batching ([`Batching::Static`]) is a plain HF `generate` loop: when
//! idle, take up to `max_num_seqs` waiting requests (FIFO, while their padded
//! KV fits), prefill them padded to the longest prompt, decode every member
//! (finished ones too, as padding) until the longest output is done, and
//! complete them all at the batch's end.
//!
//! Complexity: `schedule` and `complete_step` are O(running + admitted) per
//! step; no allocation on the steady path (the plan's vectors are recycled).

use std::collections::VecDeque;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::block_manager::{Admission, BlockManager, KvLayout, SeqId};
use crate::metrics::Metrics;
use crate::plan::{SeqWork, StepPlan};
use crate::trace::{Request, SyntheticTokens};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Policy {
    DecodeFirst,
    PrefillFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Batching {
    Continuous,
    Static,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Preemption {
    Recompute,
    Swap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ChunkedPrefill {
    On,
    Off,
}

/// Speculative decoding: `k` draft tokens per pass, i.i.d. acceptance `alpha`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Speculation {
    pub k: u32,
    pub alpha: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SchedulerConfig {
    pub batching: Batching,
    pub policy: Policy,
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    pub chunked_prefill: ChunkedPrefill,
    pub preemption: Preemption,
    pub max_model_len: u32,
    /// Contiguous layout reserve: `None` reserves `max_model_len` (Orca "Max"),
    /// `Some(n)` reserves `P + n` capped at `max_model_len`; the request's own
    /// output length is the floor ("Oracle" when `n = 0`).
    pub contiguous_output_reserve: Option<u32>,
    pub speculation: Option<Speculation>,
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_num_seqs == 0 {
            return Err(Error::invalid("max-num-seqs", "must be positive"));
        }
        if self.max_num_batched_tokens == 0 {
            return Err(Error::invalid("max-batched-tokens", "must be positive"));
        }
        if self.chunked_prefill == ChunkedPrefill::Off
            && self.max_num_batched_tokens < self.max_model_len
        {
            return Err(Error::invalid(
                "max-batched-tokens",
                format!(
                    "{} is below max_model_len {} and chunked prefill is off: long prompts could never be scheduled",
                    self.max_num_batched_tokens, self.max_model_len
                ),
            ));
        }
        if let Some(s) = self.speculation {
            if !(0.0..=1.0).contains(&s.alpha) || s.k == 0 {
                return Err(Error::invalid(
                    "speculative",
                    format!(
                        "need k >= 1 and alpha in [0, 1] (got k={}, alpha={})",
                        s.k, s.alpha
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Swapped,
    Free,
}

#[derive(Debug, Clone, Copy)]
struct Seq {
    req: Request,
    tokens: SyntheticTokens,
    /// Tokens holding KV.
    computed: u64,
    /// Output tokens emitted.
    generated: u32,
    /// Reservation (contiguous layout) / bound on the KV length.
    max_tokens: u64,
    state: State,
    first_token_ns: u64,
    last_token_ns: u64,
    /// Step stamp of the last step that scheduled it.
    scheduled_at: u64,
    /// Tokens scheduled in the current step.
    new_tokens: u32,
}

impl Seq {
    #[inline]
    fn known(&self) -> u64 {
        self.req.prompt_tokens as u64 + self.generated as u64
    }
    #[inline]
    fn is_decode(&self) -> bool {
        self.computed >= self.req.prompt_tokens as u64 && self.known() - self.computed == 1
    }
}

/// Why a request was turned away at arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Rejection {
    /// `prompt + output` exceeds the model's context length.
    LongerThanModel,
    /// Its KV alone (plus the watermark) exceeds the whole cache.
    LongerThanKvCapacity,
}

/// Per-step side effects the cost model does not see (swap traffic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StepExtras {
    pub swap_out_blocks: u64,
    pub swap_in_blocks: u64,
    pub preemptions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StaticPhase {
    Idle,
    Prefill,
    Decode { step: u32 },
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    seqs: Vec<Seq>,
    free_slots: Vec<SeqId>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    /// Slots scheduled this step, parallel to the plan's entries.
    scheduled: Vec<SeqId>,
    plan_buf: Option<StepPlan>,
    step: u64,
    extras: StepExtras,
    // static batching
    phase: StaticPhase,
    pad_prompt: u32,
    pad_output: u32,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Scheduler {
            cfg,
            seqs: Vec::new(),
            free_slots: Vec::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            scheduled: Vec::new(),
            plan_buf: Some(StepPlan::default()),
            step: 0,
            extras: StepExtras::default(),
            phase: StaticPhase::Idle,
            pad_prompt: 0,
            pad_output: 0,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }
    /// A one-line description of the request at the head of the queue (for errors).
    pub fn describe_head(&self) -> String {
        match self.waiting.front() {
            None => "no request waiting".into(),
            Some(&slot) => {
                let s = &self.seqs[slot as usize];
                format!(
                    "head request {}: {:?}, prompt {}, output {}, generated {}, computed {}, max_tokens {}",
                    s.req.id, s.state, s.req.prompt_tokens, s.req.output_tokens, s.generated, s.computed, s.max_tokens
                )
            }
        }
    }

    /// Swap traffic and preemptions of the last `schedule` call.
    pub fn extras(&self) -> StepExtras {
        self.extras
    }

    fn max_tokens_for(&self, r: &Request, kv: &BlockManager) -> u64 {
        let need = r.prompt_tokens as u64 + r.output_tokens as u64;
        match kv.config().layout {
            KvLayout::Paged => need,
            KvLayout::Contiguous => match self.cfg.contiguous_output_reserve {
                None => (self.cfg.max_model_len as u64).max(need),
                Some(n) => (r.prompt_tokens as u64 + n as u64)
                    .min(self.cfg.max_model_len as u64)
                    .max(need),
            },
        }
    }

    /// Queue an arrived request, or reject it if it can never run.
    pub fn add(&mut self, r: Request, kv: &BlockManager) -> Result<(), Rejection> {
        let need = r.prompt_tokens as u64 + r.output_tokens as u64;
        if need > self.cfg.max_model_len as u64 {
            return Err(Rejection::LongerThanModel);
        }
        let max_tokens = self.max_tokens_for(&r, kv);
        // the peak KV of a sequence, plus one spare block for speculative lookahead
        let spec = self.cfg.speculation.map(|s| s.k as u64).unwrap_or(0);
        let peak_blocks = kv.blocks_for(max_tokens + spec);
        let watermark = (kv.config().watermark * kv.num_blocks() as f64) as u64;
        if peak_blocks + watermark > kv.num_blocks() as u64 {
            return Err(Rejection::LongerThanKvCapacity);
        }
        let seq = Seq {
            tokens: SyntheticTokens::of(&r),
            req: r,
            computed: 0,
            generated: 0,
            max_tokens,
            state: State::Waiting,
            first_token_ns: 0,
            last_token_ns: 0,
            scheduled_at: u64::MAX,
            new_tokens: 0,
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.seqs[s as usize] = seq;
                s
            }
            None => {
                self.seqs.push(seq);
                (self.seqs.len() - 1) as SeqId
            }
        };
        self.waiting.push_back(slot);
        Ok(())
    }

    /// Give back a plan returned by `schedule`, so its buffers are reused.
    pub fn recycle(&mut self, mut plan: StepPlan) {
        plan.prefills.clear();
        plan.decodes.clear();
        self.plan_buf = Some(plan);
    }

    /// Choose this step's work. An empty plan means nothing can run now.
    pub fn schedule(&mut self, kv: &mut BlockManager) -> StepPlan {
        let mut plan = self.plan_buf.take().unwrap_or_default();
        plan.prefills.clear();
        plan.decodes.clear();
        self.scheduled.clear();
        self.extras = StepExtras::default();
        self.step += 1;
        match self.cfg.batching {
            Batching::Continuous => self.schedule_continuous(kv, &mut plan),
            Batching::Static => self.schedule_static(kv, &mut plan),
        }
        plan
    }

    fn push_work(&mut self, slot: SeqId, new: u64, plan: &mut StepPlan) {
        let s = &mut self.seqs[slot as usize];
        s.scheduled_at = self.step;
        s.new_tokens = new as u32;
        let w = SeqWork {
            new_tokens: new,
            cached: s.computed,
        };
        if s.is_decode() {
            plan.decodes.push(w);
        } else {
            plan.prefills.push(w);
        }
        self.scheduled.push(slot);
    }

    /// Tokens to compute for `slot` this step, given `budget`; 0 if none fit.
    #[inline]
    fn want(&self, slot: SeqId, budget: u64) -> u64 {
        let s = &self.seqs[slot as usize];
        let rem = s.known() - s.computed;
        if s.is_decode() {
            let n = match self.cfg.speculation {
                // verify k drafts plus the last token, never past the output length
                Some(sp) => 1 + (sp.k as u64).min((s.req.output_tokens - s.generated) as u64 - 1),
                None => 1,
            };
            return if n <= budget { n } else { 0 };
        }
        match self.cfg.chunked_prefill {
            ChunkedPrefill::On => rem.min(budget),
            ChunkedPrefill::Off => {
                if rem <= budget {
                    rem
                } else {
                    0
                }
            }
        }
    }

    fn preempt(&mut self, victim: SeqId, kv: &mut BlockManager) {
        let s = &mut self.seqs[victim as usize];
        self.extras.preemptions += 1;
        match self.cfg.preemption {
            Preemption::Recompute => {
                s.computed = 0;
                s.state = State::Waiting;
            }
            Preemption::Swap => {
                self.extras.swap_out_blocks += kv.table(victim).len() as u64;
                s.state = State::Swapped;
            }
        }
        kv.free(victim);
        self.waiting.push_front(victim);
    }

    fn schedule_running(&mut self, kv: &mut BlockManager, plan: &mut StepPlan, budget: &mut u64) {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let slot = self.running[i];
            // admitted earlier in this step (prefill-first): already scheduled
            if self.seqs[slot as usize].scheduled_at == self.step {
                i += 1;
                continue;
            }
            let new = self.want(slot, *budget);
            if new == 0 {
                i += 1;
                continue;
            }
            loop {
                let s = &self.seqs[slot as usize];
                let (total, max) = (s.computed + new, s.max_tokens);
                if kv
                    .allocate_slots(slot, total, max, Admission::Running)
                    .is_ok()
                {
                    self.push_work(slot, new, plan);
                    *budget -= new;
                    i += 1;
                    break;
                }
                // preempt the last running request not scheduled this step
                let victim_pos = (i..self.running.len())
                    .rev()
                    .find(|&p| self.seqs[self.running[p] as usize].scheduled_at != self.step);
                match victim_pos {
                    Some(p) if p != i => {
                        let v = self.running.remove(p);
                        self.preempt(v, kv);
                    }
                    _ => {
                        // nobody else to take from: preempt this one
                        let v = self.running.remove(i);
                        self.preempt(v, kv);
                        break;
                    }
                }
            }
        }
    }

    fn schedule_waiting(&mut self, kv: &mut BlockManager, plan: &mut StepPlan, budget: &mut u64) {
        while *budget > 0 && (self.running.len() as u32) < self.cfg.max_num_seqs {
            let Some(&slot) = self.waiting.front() else {
                break;
            };
            let s = self.seqs[slot as usize];
            let swapped = s.state == State::Swapped;
            let mut looked_up = false;
            if !swapped && s.computed == 0 && kv.table(slot).is_empty() {
                let hit = kv.lookup_prefix(slot, &s.tokens, s.known());
                self.seqs[slot as usize].computed = hit;
                looked_up = hit > 0;
            }
            let new = self.want(slot, *budget);
            let s = self.seqs[slot as usize];
            let ok = new > 0
                && kv
                    .allocate_slots(slot, s.computed + new, s.max_tokens, Admission::New)
                    .is_ok();
            if !ok {
                if looked_up {
                    kv.free(slot);
                    self.seqs[slot as usize].computed = 0;
                }
                break;
            }
            if swapped {
                self.extras.swap_in_blocks += kv.blocks_for(s.computed);
            }
            self.waiting.pop_front();
            self.seqs[slot as usize].state = State::Running;
            self.running.push(slot);
            self.push_work(slot, new, plan);
            *budget -= new;
        }
    }

    fn schedule_continuous(&mut self, kv: &mut BlockManager, plan: &mut StepPlan) {
        let mut budget = self.cfg.max_num_batched_tokens as u64;
        match self.cfg.policy {
            Policy::DecodeFirst => {
                self.schedule_running(kv, plan, &mut budget);
                if self.extras.preemptions == 0 {
                    self.schedule_waiting(kv, plan, &mut budget);
                }
            }
            Policy::PrefillFirst => {
                self.schedule_waiting(kv, plan, &mut budget);
                self.schedule_running(kv, plan, &mut budget);
            }
        }
    }

    fn schedule_static(&mut self, kv: &mut BlockManager, plan: &mut StepPlan) {
        if self.phase == StaticPhase::Idle {
            // form a batch: FIFO while the padded KV of all members fits
            let (mut lp, mut lo, mut n) = (0u32, 0u32, 0u64);
            let free = kv.num_free_blocks() as u64;
            for &slot in self.waiting.iter() {
                if n as u32 >= self.cfg.max_num_seqs {
                    break;
                }
                let r = self.seqs[slot as usize].req;
                let (p2, o2) = (lp.max(r.prompt_tokens), lo.max(r.output_tokens));
                if kv.blocks_for(p2 as u64 + o2 as u64) * (n + 1) > free {
                    break;
                }
                (lp, lo, n) = (p2, o2, n + 1);
            }
            if n == 0 {
                return;
            }
            for _ in 0..n {
                let slot = self.waiting.pop_front().expect("counted above");
                let total = lp as u64 + lo as u64;
                kv.allocate_slots(slot, total, total, Admission::Running)
                    .expect("fit checked above");
                self.seqs[slot as usize].state = State::Running;
                self.running.push(slot);
            }
            (self.pad_prompt, self.pad_output) = (lp, lo);
            self.phase = StaticPhase::Prefill;
        }
        let lp = self.pad_prompt as u64;
        match self.phase {
            StaticPhase::Prefill => {
                for i in 0..self.running.len() {
                    let slot = self.running[i];
                    self.seqs[slot as usize].scheduled_at = self.step;
                    plan.prefills.push(SeqWork {
                        new_tokens: lp,
                        cached: 0,
                    });
                    self.scheduled.push(slot);
                }
            }
            StaticPhase::Decode { step } => {
                for i in 0..self.running.len() {
                    let slot = self.running[i];
                    self.seqs[slot as usize].scheduled_at = self.step;
                    plan.decodes.push(SeqWork {
                        new_tokens: 1,
                        cached: lp + step as u64,
                    });
                    self.scheduled.push(slot);
                }
            }
            StaticPhase::Idle => {}
        }
    }

    /// How many further steps would repeat the step just completed with the
    /// same requests, each decoding one token, with no scheduling decision to
    /// make: continuous batching, no speculation, nobody waiting, every
    /// running request decoded in that step, and none finishing within the
    /// run (the finishing step goes through `schedule`). Block boundaries are
    /// handled by the engine with [`Self::decode_run_boundaries`]. 0 when the
    /// shortcut does not apply.
    pub fn decode_run_length(&self) -> u64 {
        if self.cfg.batching != Batching::Continuous
            || self.cfg.speculation.is_some()
            || !self.waiting.is_empty()
            || self.running.is_empty()
            || self.running.len() != self.scheduled.len()
            || (self.running.len() as u64) > self.cfg.max_num_batched_tokens as u64
        {
            return 0;
        }
        let mut run = u64::MAX;
        for (&slot, &sched) in self.running.iter().zip(&self.scheduled) {
            let s = &self.seqs[slot as usize];
            if slot != sched || s.scheduled_at != self.step || !s.is_decode() || s.new_tokens != 1 {
                return 0;
            }
            let to_finish = (s.req.output_tokens - s.generated) as u64 - 1;
            run = run.min(to_finish);
            if run == 0 {
                return 0;
            }
        }
        run
    }

    /// For each running request, the step of the run (1-based) whose token
    /// first needs a new block, pushed into `out` as `(step, slot)`.
    pub fn decode_run_boundaries(
        &self,
        kv: &BlockManager,
        out: &mut Vec<std::cmp::Reverse<(u64, SeqId)>>,
    ) {
        let bs = kv.block_size() as u64;
        for &slot in &self.running {
            let s = &self.seqs[slot as usize];
            out.push(std::cmp::Reverse((
                kv.table(slot).len() as u64 * bs - s.computed + 1,
                slot,
            )));
        }
    }

    /// Grow `slot`'s KV for the token computed in step `j` of a decode run
    /// (exactly what `schedule` would allocate for it).
    pub fn decode_run_allocate(&self, slot: SeqId, j: u64, kv: &mut BlockManager) -> bool {
        let s = &self.seqs[slot as usize];
        kv.allocate_slots(slot, s.computed + j, s.max_tokens, Admission::Running)
            .is_ok()
    }

    /// Apply `n` steps of the run measured by [`Self::decode_run_length`]
    /// (the engine priced them): every running request computed and emitted
    /// `n` tokens, the last at `now_ns`.
    pub fn apply_decode_run(&mut self, n: u64, now_ns: u64, kv: &mut BlockManager) {
        for &slot in &self.running {
            let s = &mut self.seqs[slot as usize];
            s.computed += n;
            s.generated += n as u32;
            s.last_token_ns = now_ns;
            kv.allocate_slots(slot, s.computed, s.max_tokens, Admission::Running)
                .expect("a decode run allocated its blocks step by step");
        }
    }

    /// Apply a finished step at time `now_ns`: advance computed tokens, emit
    /// tokens, record latencies, free finished requests.
    pub fn complete_step(
        &mut self,
        now_ns: u64,
        kv: &mut BlockManager,
        metrics: &mut Metrics,
        rng: &mut ChaCha8Rng,
    ) {
        match self.cfg.batching {
            Batching::Continuous => self.complete_continuous(now_ns, kv, metrics, rng),
            Batching::Static => self.complete_static(now_ns, kv, metrics),
        }
    }

    fn emit(s: &mut Seq, n: u32, now_ns: u64, metrics: &mut Metrics) {
        if s.generated == 0 {
            s.first_token_ns = now_ns;
            metrics.record_first_token(now_ns - s.req.arrival_ns);
        } else {
            metrics.record_itl(now_ns - s.last_token_ns);
        }
        s.generated += n;
        s.last_token_ns = now_ns;
        metrics.tokens_out += n as u64;
    }

    fn finish(s: &Seq, now_ns: u64, metrics: &mut Metrics) {
        let out = s.req.output_tokens as u64;
        let tpot = if out > 1 {
            Some((now_ns - s.first_token_ns) / (out - 1))
        } else {
            None
        };
        metrics.record_finish(
            now_ns,
            now_ns - s.req.arrival_ns,
            now_ns - s.first_token_ns,
            tpot,
            s.req.prompt_tokens,
            s.first_token_ns - s.req.arrival_ns,
        );
    }

    fn complete_continuous(
        &mut self,
        now_ns: u64,
        kv: &mut BlockManager,
        metrics: &mut Metrics,
        rng: &mut ChaCha8Rng,
    ) {
        let mut any_finished = false;
        for idx in 0..self.scheduled.len() {
            let slot = self.scheduled[idx];
            let s = &mut self.seqs[slot as usize];
            if s.state != State::Running || s.scheduled_at != self.step {
                continue;
            }
            let new = s.new_tokens as u64;
            let was_decode = s.is_decode();
            metrics.tokens_computed += new;
            if was_decode && new > 1 {
                // speculative verification: accept a prefix of the k drafts
                let alpha = self.cfg.speculation.map(|sp| sp.alpha).unwrap_or(0.0);
                let mut acc = 0u64;
                while acc < new - 1 && rng.random::<f64>() < alpha {
                    acc += 1;
                }
                s.computed += 1 + acc;
                let room = (s.req.output_tokens - s.generated) as u64;
                let n = (1 + acc).min(room) as u32;
                Self::emit(s, n, now_ns, metrics);
                // rejected drafts' KV slots are released logically (the
                // block stays allocated; it is reused by the next pass)
            } else {
                s.computed += new;
                if s.computed == s.known() {
                    Self::emit(s, 1, now_ns, metrics);
                }
            }
            debug_assert!(s.computed <= s.known(), "computed past the known tokens");
            let s = &self.seqs[slot as usize];
            if kv.config().prefix_caching == crate::block_manager::PrefixCaching::On {
                kv.cache_full_blocks(slot, &s.tokens, s.computed);
            }
            if s.generated >= s.req.output_tokens {
                Self::finish(s, now_ns, metrics);
                kv.free(slot);
                self.seqs[slot as usize].state = State::Free;
                self.free_slots.push(slot);
                any_finished = true;
            }
        }
        if any_finished {
            let seqs = &self.seqs;
            self.running
                .retain(|&s| seqs[s as usize].state == State::Running);
        }
    }

    fn complete_static(&mut self, now_ns: u64, kv: &mut BlockManager, metrics: &mut Metrics) {
        match self.phase {
            StaticPhase::Idle => {}
            StaticPhase::Prefill => {
                for &slot in &self.running {
                    let s = &mut self.seqs[slot as usize];
                    metrics.tokens_computed += self.pad_prompt as u64;
                    s.computed = s.req.prompt_tokens as u64;
                    Self::emit(s, 1, now_ns, metrics);
                }
                self.phase = StaticPhase::Decode { step: 0 };
            }
            StaticPhase::Decode { step } => {
                let step = step + 1;
                for &slot in &self.running {
                    let s = &mut self.seqs[slot as usize];
                    metrics.tokens_computed += 1;
                    if s.generated < s.req.output_tokens {
                        s.computed += 1;
                        Self::emit(s, 1, now_ns, metrics);
                    }
                }
                self.phase = StaticPhase::Decode { step };
            }
        }
        // the batch ends when its longest output is done (the first token came from prefill)
        let done = match self.phase {
            StaticPhase::Decode { step } => step + 1 >= self.pad_output,
            _ => false,
        };
        if done {
            for i in 0..self.running.len() {
                let slot = self.running[i];
                let s = self.seqs[slot as usize];
                Self::finish(&s, now_ns, metrics);
                kv.free(slot);
                self.seqs[slot as usize].state = State::Free;
                self.free_slots.push(slot);
            }
            self.running.clear();
            self.phase = StaticPhase::Idle;
        }
    }
}
