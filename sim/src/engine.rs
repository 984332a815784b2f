//! The discrete-event loop.
//!
//! Two kinds of events, ordered by `(time_ns, seq)`: a request arrival (the
//! trace is pulled lazily, so at most one arrival is pending) and the end of
//! the running step. At each event time all events due are applied first
//! (arrivals join the waiting queue; a finished step emits tokens), then, if
//! no step is running, the scheduler picks the next step and the cost model
//! prices it. Time is integer nanoseconds; the RNG (speculative acceptance)
//! and the sequence counter are fields; nothing reads a clock.
//!
//! A request that can never run (longer than the model's context, or whose
//! KV alone exceeds the cache) is rejected at arrival and counted in the
//! metrics; if the scheduler ever stalled with work queued and nothing
//! pending, the run ends with an error instead of spinning.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::block_manager::{BlockManager, KvConfig, PrefixCaching};
use crate::metrics::{Metrics, Slo};
use crate::plan::{StepCostModel, StepPlan};
use crate::scheduler::{Rejection, Scheduler, SchedulerConfig};
use crate::trace::Request;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct EngineConfig {
    pub kv: KvConfig,
    pub scheduler: SchedulerConfig,
    pub slo: Slo,
    pub seed: u64,
    /// Bytes of one KV block on one GPU (for swap traffic).
    pub kv_bytes_per_block: u64,
    /// Host link bandwidth, bytes/s (swap); from `HardwareSpec::pcie_bandwidth`.
    pub pcie_bandwidth: f64,
    pub fast_forward: FastForward,
}

/// Decode runs: when the batch cannot change (see
/// [`Scheduler::decode_run_length`]), have the cost model price the
/// following steps (the same plan with each decode's context bumped; see
/// [`StepCostModel::price_decode_run`]) and record their latencies in bulk,
/// instead of scheduling each step. Exact: `On` and `Off` give
/// byte-identical reports (tested); `Off` is the slow twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FastForward {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    StepDone,
    Arrival,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    time_ns: u64,
    seq: u64,
    kind: Kind,
}

/// Progress of a replay, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub now_ns: u64,
    pub arrived: u64,
    pub completed: u64,
}

/// How often (in steps) the progress callback runs.
pub const PROGRESS_EVERY_STEPS: u64 = 1 << 14;

pub struct Engine<'c> {
    cost: &'c dyn StepCostModel,
    cfg: EngineConfig,
    kv: BlockManager,
    sched: Scheduler,
    metrics: Metrics,
    rng: ChaCha8Rng,
    now_ns: u64,
    seq: u64,
    events: BinaryHeap<Reverse<Event>>,
    pending_arrival: Option<Request>,
    last_arrival_ns: u64,
    in_flight: Option<StepPlan>,
    /// Scratch for decode runs (kept to avoid reallocating).
    run_bounds: Vec<Reverse<(u64, u32)>>,
}

impl<'c> Engine<'c> {
    pub fn new(cfg: EngineConfig, cost: &'c dyn StepCostModel) -> Result<Self> {
        if !(cfg.pcie_bandwidth.is_finite() && cfg.pcie_bandwidth > 0.0) {
            return Err(Error::invalid(
                "pcie_bandwidth",
                format!("{} is not a positive number", cfg.pcie_bandwidth),
            ));
        }
        Ok(Engine {
            cost,
            kv: BlockManager::new(cfg.kv.clone())?,
            sched: Scheduler::new(cfg.scheduler.clone())?,
            metrics: Metrics::new(cfg.slo),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            now_ns: 0,
            seq: 0,
            events: BinaryHeap::new(),
            pending_arrival: None,
            last_arrival_ns: 0,
            in_flight: None,
            run_bounds: Vec::new(),
            cfg,
        })
    }

    fn push(&mut self, time_ns: u64, kind: Kind) {
        self.seq += 1;
        self.events.push(Reverse(Event {
            time_ns,
            seq: self.seq,
            kind,
        }));
    }

    fn pull_arrival(&mut self, trace: &mut impl Iterator<Item = Result<Request>>) -> Result<()> {
        if let Some(r) = trace.next() {
            let r = r?;
            if r.arrival_ns < self.last_arrival_ns {
                return Err(Error::invalid(
                    "trace",
                    format!("request {} arrives at {} ns, before the previous one ({} ns): traces must be sorted", r.id, r.arrival_ns, self.last_arrival_ns),
                ));
            }
            self.last_arrival_ns = r.arrival_ns;
            self.pending_arrival = Some(r);
            self.push(r.arrival_ns, Kind::Arrival);
        }
        Ok(())
    }

    /// Price and apply the steps of a decode run (see [`FastForward`]).
    fn decode_run(&mut self, plan: &mut StepPlan, progress: &mut dyn FnMut(Progress)) {
        let max = self.sched.decode_run_length();
        if max == 0 {
            return;
        }
        let next_arrival = self
            .pending_arrival
            .map(|r| r.arrival_ns)
            .unwrap_or(u64::MAX);
        let batch = plan.decodes.len() as u64;
        let block_size = self.kv.block_size() as u64;
        let total_blocks = self.kv.num_blocks() as u64;
        let base_live = self.kv.live_tokens();
        // block boundaries: (run step that needs a new block, slot), soonest first
        let mut bounds = std::mem::take(&mut self.run_bounds);
        bounds.clear();
        self.sched.decode_run_boundaries(&self.kv, &mut bounds);
        let mut heap: BinaryHeap<Reverse<(u64, u32)>> = BinaryHeap::from(bounds);
        let mut n = 0u64;
        let (sched, kv, metrics, now_ns) = (
            &self.sched,
            &mut self.kv,
            &mut self.metrics,
            &mut self.now_ns,
        );
        // the cost model offers step j = n + 1 with its cost; take it or stop
        self.cost.price_decode_run(plan, &mut |j, ns| {
            debug_assert_eq!(j, n + 1);
            if n >= max || next_arrival <= *now_ns {
                return false;
            }
            // the blocks `schedule` would allocate for this step, all or none
            let due = match heap.peek() {
                Some(Reverse((step, _))) if *step == j => {
                    heap.iter().filter(|Reverse((step, _))| *step == j).count() as u32
                }
                _ => 0,
            };
            if due > 0 {
                if kv.num_free_blocks() < due {
                    return false; // the step-by-step path preempts here
                }
                while let Some(&Reverse((step, slot))) = heap.peek() {
                    if step != j {
                        break;
                    }
                    heap.pop();
                    let ok = sched.decode_run_allocate(slot, j, kv);
                    debug_assert!(ok, "free blocks were counted");
                    heap.push(Reverse((j + block_size, slot)));
                }
            }
            n = j;
            let dt = ns.max(1);
            let used = kv.num_used_blocks() as u64;
            let slots = used * block_size;
            let live = base_live + n * batch;
            let waste = if slots == 0 {
                0.0
            } else {
                1.0 - (live.min(slots) as f64 / slots as f64)
            };
            metrics.record_step(*now_ns, dt, batch, batch, used, total_blocks, waste);
            if metrics.steps % PROGRESS_EVERY_STEPS == 0 {
                progress(Progress {
                    now_ns: *now_ns,
                    arrived: metrics.arrived,
                    completed: metrics.completed,
                });
            }
            *now_ns += dt;
            metrics.tokens_computed += batch;
            metrics.tokens_out += batch;
            metrics.itl.record_n(dt, batch);
            true
        });
        self.sched.apply_decode_run(n, self.now_ns, &mut self.kv);
        self.run_bounds = heap.into_vec();
    }

    /// Replay `trace` to the end; returns the metrics.
    pub fn run(
        mut self,
        mut trace: impl Iterator<Item = Result<Request>>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Metrics> {
        self.pull_arrival(&mut trace)?;
        let block_size = self.kv.block_size() as u64;
        let total_blocks = self.kv.num_blocks() as u64;
        while let Some(Reverse(ev)) = self.events.pop() {
            // a decode run may have moved the clock past an arrival that fell
            // inside its last step; it is applied at the run's end, exactly
            // when the step-by-step loop would have scheduled with it
            self.now_ns = self.now_ns.max(ev.time_ns);
            match ev.kind {
                Kind::Arrival => {
                    let r = self
                        .pending_arrival
                        .take()
                        .expect("one pending arrival per event");
                    self.metrics.arrived += 1;
                    match self.sched.add(r, &self.kv) {
                        Ok(()) => {}
                        Err(Rejection::LongerThanModel) => {
                            self.metrics.rejected_longer_than_model += 1
                        }
                        Err(Rejection::LongerThanKvCapacity) => {
                            self.metrics.rejected_longer_than_kv += 1
                        }
                    }
                    self.pull_arrival(&mut trace)?;
                }
                Kind::StepDone => {
                    self.sched.complete_step(
                        self.now_ns,
                        &mut self.kv,
                        &mut self.metrics,
                        &mut self.rng,
                    );
                    if let Some(mut p) = self.in_flight.take() {
                        if self.cfg.fast_forward == FastForward::On
                            && self.kv.config().prefix_caching == PrefixCaching::Off
                            && p.prefills.is_empty()
                        {
                            self.decode_run(&mut p, progress);
                        }
                        self.sched.recycle(p);
                    }
                }
            }
            // apply every event due now before scheduling
            if self.in_flight.is_some()
                || matches!(self.events.peek(), Some(Reverse(e)) if e.time_ns <= self.now_ns)
            {
                continue;
            }
            let plan = self.sched.schedule(&mut self.kv);
            let extras = self.sched.extras();
            self.metrics.preemptions += extras.preemptions;
            if plan.is_empty() {
                self.sched.recycle(plan);
                if self.events.is_empty() && !self.sched.is_idle() {
                    return Err(Error::invalid(
                        "scheduler",
                        format!(
                            "stalled at {} ns with {} waiting and {} running and nothing pending (KV blocks {}, free {}; {})",
                            self.now_ns,
                            self.sched.num_waiting(),
                            self.sched.num_running(),
                            self.kv.num_blocks(),
                            self.kv.num_free_blocks(),
                            self.sched.describe_head()
                        ),
                    ));
                }
                continue;
            }
            let swap_blocks = extras.swap_in_blocks + extras.swap_out_blocks;
            let swap_ns = if swap_blocks > 0 {
                self.metrics.swap_in_blocks += extras.swap_in_blocks;
                self.metrics.swap_out_blocks += extras.swap_out_blocks;
                ((swap_blocks * self.cfg.kv_bytes_per_block) as f64 / self.cfg.pcie_bandwidth * 1e9)
                    .ceil() as u64
            } else {
                0
            };
            self.metrics.swap_ns += swap_ns;
            let dt = (self.cost.step_cost(&plan).total_ns() + swap_ns).max(1);
            let used = self.kv.num_used_blocks() as u64;
            let slots = used * block_size;
            let waste = if slots == 0 {
                0.0
            } else {
                1.0 - (self.kv.live_tokens().min(slots) as f64 / slots as f64)
            };
            self.metrics.record_step(
                self.now_ns,
                dt,
                plan.num_seqs() as u64,
                plan.num_tokens(),
                used,
                total_blocks,
                waste,
            );
            if self.metrics.steps % PROGRESS_EVERY_STEPS == 0 {
                progress(Progress {
                    now_ns: self.now_ns,
                    arrived: self.metrics.arrived,
                    completed: self.metrics.completed,
                });
            }
            self.in_flight = Some(plan);
            self.push(self.now_ns + dt, Kind::StepDone);
        }
        self.metrics.prefix_hit_blocks = self.kv.counters.prefix_hit_blocks;
        self.metrics.prefix_query_blocks = self.kv.counters.prefix_queries_blocks;
        self.metrics.evictions = self.kv.counters.evictions;
        Ok(self.metrics)
    }
}

/// Replay a trace with a cost model; the one-call form of [`Engine`].
pub fn replay(
    cfg: EngineConfig,
    cost: &dyn StepCostModel,
    trace: impl Iterator<Item = Result<Request>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Metrics> {
    Engine::new(cfg, cost)?.run(trace, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_manager::KvLayout;
    use crate::cost::{CostModel, CostOptions};
    use crate::scheduler::{Batching, ChunkedPrefill, Policy, Preemption};
    use crate::synth::{Arrivals, SynthSpec};
    use crate::test_models::{gpu, llama3_8b};

    fn cfg(num_blocks: u32, fast_forward: FastForward) -> EngineConfig {
        EngineConfig {
            kv: KvConfig {
                num_blocks,
                block_size: 16,
                watermark: 0.01,
                prefix_caching: PrefixCaching::Off,
                layout: KvLayout::Paged,
            },
            scheduler: SchedulerConfig {
                batching: Batching::Continuous,
                policy: Policy::DecodeFirst,
                max_num_seqs: 64,
                max_num_batched_tokens: 2048,
                chunked_prefill: ChunkedPrefill::On,
                preemption: Preemption::Recompute,
                max_model_len: 8192,
                contiguous_output_reserve: None,
                speculation: None,
            },
            slo: Slo::default(),
            seed: 0,
            kv_bytes_per_block: 16 * 131072,
            pcie_bandwidth: 6.4e10,
            fast_forward,
        }
    }

    /// Decode runs priced in O(1) by the roofline model (fast) against
    /// step-by-step scheduling with per-step pricing (slow twin): the whole
    /// metrics state is identical, with and without a sliding window that
    /// runs cross.
    #[test]
    fn roofline_decode_runs_are_exact() {
        let hw = gpu("H100-SXM5-80GB");
        let mut windowed = llama3_8b();
        windowed.sliding_window = Some(700);
        for (model, blocks, rate) in [
            (llama3_8b(), 3000, 3.0),
            (llama3_8b(), 1200, 20.0),
            (windowed, 2000, 6.0),
        ] {
            let cm = CostModel::new(&model, &hw, CostOptions::default()).unwrap();
            let mut spec = SynthSpec::azure_conv_like(300, 7);
            spec.arrivals = Arrivals::Gamma { rate, cv: 1.5 };
            let run = |ff| {
                let m = replay(cfg(blocks, ff), &cm, spec.iter().unwrap(), &mut |_| {}).unwrap();
                format!("{m:?}")
            };
            let fast = run(FastForward::On);
            assert!(fast.contains("completed: 300"), "{fast}");
            assert_eq!(fast, run(FastForward::Off), "{blocks} blocks, rate {rate}");
        }
    }
}
