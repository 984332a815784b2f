//! End-to-end replays with the closed-form cost model: determinism, first
//! principles, scheduler properties, bad input, and golden reports.

use std::cell::RefCell;

use inferlab_models::{catalog, Dtype};
use inferlab_sim::block_manager::{KvConfig, KvLayout, PrefixCaching};
use inferlab_sim::closed_form::ClosedFormCost;
use inferlab_sim::engine::{replay, EngineConfig, FastForward};
use inferlab_sim::memory::{parse_quant, plan_memory, MemoryOptions};
use inferlab_sim::metrics::{LogHistogram, Metrics, Slo};
use inferlab_sim::plan::{StepCost, StepCostModel, StepPlan};
use inferlab_sim::report::{Report, RunInfo};
use inferlab_sim::scheduler::{
    Batching, ChunkedPrefill, Policy, Preemption, SchedulerConfig, Speculation,
};
use inferlab_sim::synth::{Arrivals, SynthSpec};
use inferlab_sim::trace::Request;
use inferlab_sim::Error;

fn cost() -> ClosedFormCost {
    let m = catalog::model("llama-3-8b").unwrap();
    let hw = catalog::gpu("h100-sxm5-80gb").unwrap();
    ClosedFormCost::for_model(&m.config, &hw, Dtype::Bf16, 1)
}

fn cfg(num_blocks: u32) -> EngineConfig {
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
        fast_forward: FastForward::On,
    }
}

fn info(c: &EngineConfig, name: &str) -> RunInfo {
    RunInfo {
        trace: name.into(),
        model: "llama-3-8b".into(),
        hardware: "H100-SXM5-80GB".into(),
        tp: 1,
        dtype: "bf16".into(),
        cost_model: "closed-form".into(),
        batching: format!("{:?}", c.scheduler.batching),
        policy: format!("{:?}", c.scheduler.policy),
        kv_layout: format!("{:?}", c.kv.layout),
        prefix_caching: c.kv.prefix_caching == PrefixCaching::On,
        preemption: format!("{:?}", c.scheduler.preemption),
        max_num_seqs: c.scheduler.max_num_seqs,
        max_num_batched_tokens: c.scheduler.max_num_batched_tokens,
        block_size: c.kv.block_size,
        num_kv_blocks: c.kv.num_blocks,
        kv_capacity_tokens: c.kv.num_blocks as u64 * c.kv.block_size as u64,
        seed: c.seed,
    }
}

fn synth(n: u64, rate: f64, seed: u64) -> SynthSpec {
    let mut s = SynthSpec::azure_conv_like(n, seed);
    s.arrivals = Arrivals::Gamma { rate, cv: 1.5 };
    s
}

fn run(
    c: &EngineConfig,
    model: &dyn StepCostModel,
    reqs: impl Iterator<Item = inferlab_sim::Result<Request>>,
) -> Metrics {
    replay(c.clone(), model, reqs, &mut |_| {}).unwrap()
}

fn run_report(c: &EngineConfig, spec: &SynthSpec, name: &str) -> Report {
    let m = run(c, &cost(), spec.iter().unwrap());
    Report::new(info(c, name), &m)
}

/// Records every plan it prices, and checks the scheduler's limits.
struct Recorder<'a> {
    inner: &'a dyn StepCostModel,
    plans: RefCell<Vec<(usize, usize, u64)>>,
    max_tokens: u64,
    max_seqs: usize,
}

impl StepCostModel for Recorder<'_> {
    fn step_cost(&self, plan: &StepPlan) -> StepCost {
        assert!(
            plan.num_tokens() <= self.max_tokens,
            "token budget exceeded: {}",
            plan.num_tokens()
        );
        assert!(
            plan.num_seqs() <= self.max_seqs,
            "max_num_seqs exceeded: {}",
            plan.num_seqs()
        );
        self.plans.borrow_mut().push((
            plan.prefills.len(),
            plan.decodes.len(),
            plan.decodes.iter().map(|d| d.new_tokens).sum(),
        ));
        self.inner.step_cost(plan)
    }
}

#[test]
fn same_inputs_and_seed_give_identical_json() {
    let c = cfg(3000);
    let a = run_report(&c, &synth(400, 8.0, 5), "s").to_json();
    let b = run_report(&c, &synth(400, 8.0, 5), "s").to_json();
    assert_eq!(a, b);
    let other = run_report(&c, &synth(400, 8.0, 6), "s").to_json();
    assert_ne!(a, other, "a different seed must change the trace");
    // speculative decoding draws from the engine's RNG: seeded as well
    let mut s = c.clone();
    s.scheduler.speculation = Some(Speculation { k: 3, alpha: 0.6 });
    let x = run_report(&s, &synth(200, 8.0, 5), "s").to_json();
    let y = run_report(&s, &synth(200, 8.0, 5), "s").to_json();
    assert_eq!(x, y);
}

/// Decode runs (fast) against step-by-step scheduling (slow twin): identical reports.
#[test]
fn decode_runs_are_exact() {
    let check = |name: &str, c: EngineConfig, spec: SynthSpec| {
        let fast = run_report(&c, &spec, name).to_json();
        let slow = run_report(
            &EngineConfig {
                fast_forward: FastForward::Off,
                ..c
            },
            &spec,
            name,
        )
        .to_json();
        assert_eq!(fast, slow, "{name}");
    };
    check("light load", cfg(3000), synth(300, 2.0, 1));
    check("preempting", cfg(1500), synth(300, 20.0, 2));
    let mut k = cfg(4000);
    k.kv.layout = KvLayout::Contiguous;
    check("contiguous", k, synth(300, 8.0, 3));
    let mut f = cfg(3000);
    f.scheduler.policy = Policy::PrefillFirst;
    f.scheduler.preemption = Preemption::Swap;
    check("prefill-first swap", f, synth(300, 12.0, 4));
}

#[test]
fn decode_tpot_at_batch_one_is_weight_bytes_over_bandwidth() {
    // With no KV traffic the closed form prices a batch-1 decode as
    // weight bytes / (bandwidth · efficiency) + launch overhead; a lone
    // request's TPOT must be exactly that.
    let mut cm = cost();
    cm.kv_bytes_per_token = 0.0;
    let step_ns = (cm.weight_bytes / (cm.bandwidth * cm.memory_efficiency) * 1e9).round() as u64
        + cm.overhead_ns;
    let req = Request {
        id: 0,
        arrival_ns: 0,
        prompt_tokens: 100,
        output_tokens: 50,
        prefix_id: None,
        prefix_tokens: 0,
    };
    let m = run(&cfg(1000), &cm, std::iter::once(Ok(req)));
    assert_eq!(m.completed, 1);
    assert_eq!(m.tpot.max(), step_ns);
    assert_eq!(m.itl.quantile(0.5), step_ns.min(m.itl.quantile(0.5)));
    // E2E = prefill step + 49 decode steps
    let prefill = cm
        .step_cost(&StepPlan {
            prefills: vec![inferlab_sim::plan::SeqWork {
                new_tokens: 100,
                cached: 0,
            }],
            decodes: vec![],
        })
        .total_ns();
    assert_eq!(m.e2e.max(), prefill + 49 * step_ns);
    // Llama-3-8B bf16 on H100: 16.06 GB / (3.35 TB/s · 0.8) ≈ 5.99 ms + 2 ms
    assert!((step_ns as f64 * 1e-6 - 7.99).abs() < 0.01, "{step_ns}");
}

#[test]
fn every_token_is_delivered_and_limits_hold() {
    let c = cfg(2000);
    let base = cost();
    let rec = Recorder {
        inner: &base,
        plans: RefCell::new(vec![]),
        max_tokens: 2048,
        max_seqs: 64,
    };
    let spec = synth(600, 20.0, 1);
    let want: u64 = spec
        .iter()
        .unwrap()
        .map(|r| r.unwrap().output_tokens as u64)
        .sum();
    let m = run(&c, &rec, spec.iter().unwrap());
    assert_eq!((m.arrived, m.completed), (600, 600));
    assert_eq!(m.tokens_out, want);
    assert!(m.preemptions > 0, "2000 blocks at 20 req/s must run out");
    assert!(
        rec.plans.borrow().iter().any(|p| p.0 > 0 && p.1 > 0),
        "chunked prefill mixes prefills and decodes"
    );
}

#[test]
fn swap_preemption_costs_pcie_time_and_completes() {
    let mut c = cfg(2000);
    c.scheduler.preemption = Preemption::Swap;
    let m = run(&c, &cost(), synth(600, 20.0, 1).iter().unwrap());
    assert_eq!(m.completed, 600);
    assert!(m.preemptions > 0 && m.swap_out_blocks > 0 && m.swap_in_blocks > 0);
    assert_eq!(
        m.swap_out_blocks, m.swap_in_blocks,
        "everything swapped out comes back"
    );
    let bytes = (m.swap_in_blocks + m.swap_out_blocks) * c.kv_bytes_per_block;
    let ideal_ns = bytes as f64 / c.pcie_bandwidth * 1e9;
    // per-step ceil() adds at most 1 ns per step
    assert!(
        m.swap_ns as f64 >= ideal_ns && (m.swap_ns as f64) < ideal_ns + m.steps as f64,
        "{} vs {ideal_ns}",
        m.swap_ns
    );
}

#[test]
fn impossible_requests_are_rejected_and_counted_not_hung() {
    let r = |id, p, o| {
        Ok(Request {
            id,
            arrival_ns: id * 1000,
            prompt_tokens: p,
            output_tokens: o,
            prefix_id: None,
            prefix_tokens: 0,
        })
    };
    let mut c = cfg(100); // 1600 tokens of KV, minus a 1-block watermark
    c.scheduler.max_model_len = 4096;
    let reqs = vec![
        r(0, 100, 10),
        r(1, 5000, 10),
        r(2, 1590, 10),
        r(3, 1500, 84),
        r(4, 1500, 85),
        r(5, 20, 1),
    ];
    let m = run(&c, &cost(), reqs.into_iter());
    assert_eq!(m.rejected_longer_than_model, 1, "5010 > 4096");
    assert_eq!(m.rejected_longer_than_kv, 2, "1600 and 1585 tokens need 100 blocks; 1584 (99 blocks) is the most that fits above the watermark");
    assert_eq!(m.completed, 3);
    assert_eq!(m.arrived, 6);
}

#[test]
fn model_that_does_not_fit_is_a_clear_error() {
    let m = catalog::model("llama-3-8b").unwrap();
    let mut hw = catalog::gpu("h100-sxm5-80gb").unwrap();
    hw.memory_bytes = 16 << 30;
    hw.driver_total_bytes = None;
    let o = MemoryOptions::default();
    match plan_memory(&m.config, &hw, &o) {
        Err(e @ Error::DoesNotFit { .. }) => {
            let Error::DoesNotFit {
                needed_bytes,
                usable_bytes,
                ..
            } = e
            else {
                unreachable!()
            };
            assert!(needed_bytes > usable_bytes);
        }
        other => panic!("expected DoesNotFit, got {other:?}"),
    }
    // 4-bit GPTQ weights fit in the same 16 GiB
    let q = MemoryOptions {
        quant: parse_quant("gptq-4bit-g128").unwrap(),
        ..o.clone()
    };
    assert!(plan_memory(&m.config, &hw, &q).unwrap().num_kv_blocks > 0);
    let bad = MemoryOptions {
        gpu_memory_utilization: 1.5,
        ..o
    };
    assert!(matches!(
        plan_memory(&m.config, &hw, &bad),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn continuous_beats_static_and_paged_beats_contiguous() {
    let spec = synth(300, 6.0, 2);
    let c = cfg(4000);
    let cont = run(&c, &cost(), spec.iter().unwrap());
    let mut s = c.clone();
    s.scheduler.batching = Batching::Static;
    let stat = run(&s, &cost(), spec.iter().unwrap());
    assert_eq!((cont.completed, stat.completed), (300, 300));
    assert!(
        stat.e2e.mean() > 1.5 * cont.e2e.mean(),
        "static {} vs continuous {}",
        stat.e2e.mean(),
        cont.e2e.mean()
    );
    assert!(stat.last_finish_ns > cont.last_finish_ns);
    let mut k = c.clone();
    k.kv.layout = KvLayout::Contiguous;
    let contig = run(&k, &cost(), spec.iter().unwrap());
    assert_eq!(contig.completed, 300);
    let waste = |m: &Metrics| m.int_waste / m.busy_ns as f64;
    assert!(
        waste(&contig) > 0.5 && waste(&cont) < 0.05,
        "contiguous {} paged {}",
        waste(&contig),
        waste(&cont)
    );
    assert!(contig.max_running < cont.max_running);
}

#[test]
fn speculative_decoding_emits_expected_tokens_per_pass() {
    let (k, alpha) = (4u32, 0.7);
    let mut c = cfg(20000);
    c.scheduler.speculation = Some(Speculation { k, alpha });
    c.scheduler.max_model_len = 100_000;
    let base = cost();
    let rec = Recorder {
        inner: &base,
        plans: RefCell::new(vec![]),
        max_tokens: 2048,
        max_seqs: 64,
    };
    // one long request: every decode pass verifies k drafts (until the end)
    let req = Request {
        id: 0,
        arrival_ns: 0,
        prompt_tokens: 10,
        output_tokens: 60_000,
        prefix_id: None,
        prefix_tokens: 0,
    };
    let m = run(&c, &rec, std::iter::once(Ok(req)));
    let passes = rec.plans.borrow().iter().filter(|p| p.1 > 0).count() as f64;
    let per_pass = (m.tokens_out - 1) as f64 / passes;
    let want = inferlab_reference::speculative::theory::expected_tokens_per_pass(alpha, k);
    // tokens per pass is 1 + min(Geometric, k): variance below 2.2 here, so the
    // mean of ~25,000 passes has SE < 0.0094; allow 4 SE.
    assert!((per_pass - want).abs() < 0.038, "{per_pass} vs {want}");
}

#[test]
fn prefix_caching_hits_shared_prompts() {
    let reqs: Vec<_> = (0..200u64)
        .map(|i| Request {
            id: i,
            arrival_ns: i * 50_000_000,
            prompt_tokens: 1200,
            output_tokens: 20,
            prefix_id: Some(i % 4),
            prefix_tokens: 1000,
        })
        .collect();
    let mut c = cfg(4000);
    let off = run(&c, &cost(), reqs.clone().into_iter().map(Ok));
    c.kv.prefix_caching = PrefixCaching::On;
    let on = run(&c, &cost(), reqs.into_iter().map(Ok));
    assert_eq!(on.completed, 200);
    // 62 of the 74 prompt blocks are shared (1000/16), hit by all but the first of each prefix
    let rate = on.prefix_hit_blocks as f64 / on.prefix_query_blocks as f64;
    assert!(rate > 0.7, "{rate}");
    assert!(on.tokens_computed < off.tokens_computed * 2 / 5);
    assert!(on.ttft.mean() < off.ttft.mean());
}

#[test]
fn prefill_first_policy_also_serves_everything() {
    let mut c = cfg(2000);
    c.scheduler.policy = Policy::PrefillFirst;
    c.scheduler.chunked_prefill = ChunkedPrefill::Off;
    c.scheduler.max_num_batched_tokens = 8192;
    let m = run(&c, &cost(), synth(300, 20.0, 4).iter().unwrap());
    assert_eq!(m.completed, 300);
}

/// The log histogram (fast) against sorting (its slow twin): every quantile
/// lies in the bucket of the exact nearest-rank value, so within 1/512.
#[test]
fn histogram_quantiles_match_exact_order_statistics() {
    let mut h = LogHistogram::default();
    let mut v: Vec<u64> = (0..50_000u64)
        .map(|i| inferlab_sim::block_manager::mix64(i, 3) % 5_000_000_000)
        .collect();
    v.extend(0..300); // exact region
    for &x in &v {
        h.record(x);
    }
    v.sort_unstable();
    for q in [0.0, 0.001, 0.5, 0.9, 0.99, 0.999, 1.0] {
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        let exact = v[rank - 1] as f64;
        let got = h.quantile(q) as f64;
        assert!(
            (got - exact).abs() <= exact / 512.0 + 0.5,
            "q={q}: {got} vs {exact}"
        );
    }
    assert_eq!(
        h.mean(),
        v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
    );
}

#[test]
fn golden_reports() {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../golden"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        let c = cfg(3000);
        insta::assert_snapshot!(
            "replay_continuous_small",
            run_report(&c, &synth(150, 6.0, 11), "synthetic-150").table()
        );
        let mut s = c.clone();
        s.scheduler.batching = Batching::Static;
        s.scheduler.max_num_seqs = 16;
        insta::assert_snapshot!(
            "replay_static_small",
            run_report(&s, &synth(150, 6.0, 11), "synthetic-150").table()
        );
        let mut k = cfg(1200);
        k.kv.layout = KvLayout::Contiguous;
        k.scheduler.contiguous_output_reserve = Some(1024);
        k.scheduler.preemption = Preemption::Swap;
        insta::assert_snapshot!(
            "replay_contiguous_swap_small",
            run_report(&k, &synth(150, 6.0, 11), "synthetic-150").to_json()
        );
        let mut p = cfg(3000);
        p.scheduler.speculation = Some(Speculation { k: 3, alpha: 0.8 });
        p.scheduler.policy = Policy::PrefillFirst;
        insta::assert_snapshot!(
            "replay_speculative_small",
            run_report(&p, &synth(100, 4.0, 12), "synthetic-100").table()
        );
    });
}
