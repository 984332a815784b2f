//! `inferlab replay`, `inferlab trace stats|synth`: the simulator's commands.
//!
//! `replay` with no arguments replays a built-in synthetic trace shaped like
//! the Azure LLM conversation trace (2,000 requests, seed 0) with Llama-3-8B
//! in bf16 on one H100-SXM5-80GB and vLLM-like defaults.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use inferlab_models::{catalog, Dtype};
use inferlab_sim::block_manager::{KvConfig, KvLayout, PrefixCaching};
use inferlab_sim::closed_form::ClosedFormCost;
use inferlab_sim::cost::{Acceptance, CostModel, CostOptions, SpeculativeOptions};
use inferlab_sim::engine::{self, EngineConfig, FastForward};
use inferlab_sim::memory::{self, MemoryOptions};
use inferlab_sim::metrics::{Metrics, Slo};
use inferlab_sim::plan::StepCostModel;
use inferlab_sim::report::{Report, RunInfo};
use inferlab_sim::scheduler::{
    Batching, ChunkedPrefill, Policy, Preemption, SchedulerConfig, Speculation,
};
use inferlab_sim::synth::{Arrivals, LengthDist, Lengths, SynthSpec};
use inferlab_sim::trace::{self, Request, Unsorted};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerArg {
    Continuous,
    Static,
}
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyArg {
    DecodeFirst,
    PrefillFirst,
}
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvArg {
    Paged,
    Contiguous,
}
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreemptionArg {
    Recompute,
    Swap,
}
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CostArg {
    /// Per-operator roofline (`sim::cost`).
    Roofline,
    /// One roofline per step (the simulator's test double).
    ClosedForm,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ReplayArgs {
    /// Trace file (CSV or JSONL); default: a synthetic Azure-conversation-like trace.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Requests in the built-in synthetic trace (when no --trace).
    #[arg(long, default_value_t = 2000)]
    pub requests: u64,
    /// What to do when trace arrivals decrease: reject (error naming the line) or sort (in memory).
    #[arg(long, default_value = "reject")]
    pub unsorted: Unsorted,
    #[arg(long, default_value = "llama-3-8b")]
    pub model: String,
    #[arg(long, default_value = "h100-sxm5-80gb")]
    pub hardware: String,
    #[arg(long, default_value_t = 1)]
    pub tp: u32,
    /// Weight dtype (activations follow it; fp8/int8 weights run W8A8).
    #[arg(long, default_value = "bf16")]
    pub dtype: Dtype,
    /// KV-cache dtype (default: the activation dtype).
    #[arg(long)]
    pub kv_dtype: Option<Dtype>,
    /// Weight-only quantization: none, gptq-4bit-g128, awq-4bit-g128, gguf-q4_0, ...
    #[arg(long, default_value = "none")]
    pub quant: String,
    #[arg(long, value_enum, default_value_t = SchedulerArg::Continuous)]
    pub scheduler: SchedulerArg,
    #[arg(long, value_enum, default_value_t = PolicyArg::DecodeFirst)]
    pub policy: PolicyArg,
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: u32,
    #[arg(long, default_value_t = 8192)]
    pub max_batched_tokens: u32,
    /// Turn chunked prefill off (a prompt is then prefilled in one step).
    #[arg(long)]
    pub no_chunked_prefill: bool,
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Fraction of KV blocks admissions must leave free.
    #[arg(long, default_value_t = 0.01)]
    pub watermark: f64,
    /// KV layout: paged (PagedAttention) or contiguous (reserve the maximum length).
    #[arg(long, value_enum, default_value_t = KvArg::Paged)]
    pub kv: KvArg,
    /// Contiguous reserve: output tokens reserved past the prompt (default: up to max_model_len).
    #[arg(long)]
    pub contiguous_reserve: Option<u32>,
    #[arg(long)]
    pub prefix_caching: bool,
    #[arg(long, value_enum, default_value_t = PreemptionArg::Recompute)]
    pub preemption: PreemptionArg,
    /// Speculative decoding: draft tokens per pass (0 = off).
    #[arg(long, default_value_t = 0)]
    pub speculative_k: u32,
    /// Speculative decoding: per-token acceptance rate.
    #[arg(long, default_value_t = 0.7)]
    pub acceptance: f64,
    /// Speculative decoding: one draft pass / one target decode step.
    #[arg(long, default_value_t = 0.1)]
    pub draft_cost_ratio: f64,
    #[arg(long, default_value_t = 2000.0)]
    pub slo_ttft_ms: f64,
    #[arg(long, default_value_t = 100.0)]
    pub slo_tpot_ms: f64,
    #[arg(long, value_enum, default_value_t = CostArg::Roofline)]
    pub cost: CostArg,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write SVG plots into this folder.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Print the JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Replay arrivals this many times faster (arrival times divided by it).
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Schedule every step (no decode runs; same result, slower).
    #[arg(long)]
    pub no_fast_forward: bool,
}

impl Default for ReplayArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            a: ReplayArgs,
        }
        W::parse_from(["replay"]).a
    }
}

/// Write `text` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("out")
    ));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Everything a replay needs, resolved from the arguments.
pub struct Setup {
    pub cfg: EngineConfig,
    pub cost: Box<dyn StepCostModel>,
    pub info: RunInfo,
    pub synth: Option<SynthSpec>,
}

pub fn setup(a: &ReplayArgs) -> Result<Setup> {
    let model = catalog::model(&a.model)?;
    let hw = catalog::gpu(&a.hardware)?;
    let mem_opts = MemoryOptions {
        weight_dtype: a.dtype,
        quant: memory::parse_quant(&a.quant)?,
        kv_dtype: a.kv_dtype.unwrap_or(memory::activation_dtype(a.dtype)),
        tp: a.tp,
        block_size: a.block_size,
        gpu_memory_utilization: a.gpu_memory_utilization,
        max_num_batched_tokens: a.max_batched_tokens as u64,
        max_num_seqs: a.max_num_seqs as u64,
        ..MemoryOptions::default()
    };
    let plan = memory::plan_memory(&model.config, &hw, &mem_opts)?;
    let num_kv_blocks = u32::try_from(plan.num_kv_blocks)
        .ok()
        .filter(|&n| n < u32::MAX)
        .with_context(|| {
            format!(
                "{} KV blocks is more than the block manager indexes",
                plan.num_kv_blocks
            )
        })?;
    let cost: Box<dyn StepCostModel> = match a.cost {
        CostArg::Roofline => {
            let mut o = CostOptions::matching(&mem_opts);
            if a.speculative_k > 0 {
                o.speculative = Some(SpeculativeOptions {
                    num_speculative_tokens: a.speculative_k,
                    acceptance: Acceptance::Rate(a.acceptance),
                    draft_cost_ratio: a.draft_cost_ratio,
                });
            }
            Box::new(CostModel::new(&model.config, &hw, o)?)
        }
        CostArg::ClosedForm => {
            let mut c = ClosedFormCost::for_model(
                &model.config,
                &hw,
                memory::activation_dtype(a.dtype),
                a.tp,
            );
            c.weight_bytes = plan.weight_bytes as f64;
            c.kv_bytes_per_token = plan.kv_bytes_per_token as f64;
            Box::new(c)
        }
    };
    let speculation = (a.speculative_k > 0).then_some(Speculation {
        k: a.speculative_k,
        alpha: a.acceptance,
    });
    let max_model_len = model.config.max_position_embeddings.min(u32::MAX as u64) as u32;
    let cfg = EngineConfig {
        kv: KvConfig {
            num_blocks: num_kv_blocks,
            block_size: a.block_size,
            watermark: a.watermark,
            prefix_caching: if a.prefix_caching {
                PrefixCaching::On
            } else {
                PrefixCaching::Off
            },
            layout: match a.kv {
                KvArg::Paged => KvLayout::Paged,
                KvArg::Contiguous => KvLayout::Contiguous,
            },
        },
        scheduler: SchedulerConfig {
            batching: match a.scheduler {
                SchedulerArg::Continuous => Batching::Continuous,
                SchedulerArg::Static => Batching::Static,
            },
            policy: match a.policy {
                PolicyArg::DecodeFirst => Policy::DecodeFirst,
                PolicyArg::PrefillFirst => Policy::PrefillFirst,
            },
            max_num_seqs: a.max_num_seqs,
            max_num_batched_tokens: a.max_batched_tokens,
            chunked_prefill: if a.no_chunked_prefill {
                ChunkedPrefill::Off
            } else {
                ChunkedPrefill::On
            },
            preemption: match a.preemption {
                PreemptionArg::Recompute => Preemption::Recompute,
                PreemptionArg::Swap => Preemption::Swap,
            },
            max_model_len,
            contiguous_output_reserve: a.contiguous_reserve,
            speculation,
        },
        slo: Slo {
            ttft_ms: a.slo_ttft_ms,
            tpot_ms: a.slo_tpot_ms,
        },
        seed: a.seed,
        kv_bytes_per_block: plan.kv_bytes_per_block,
        pcie_bandwidth: hw.pcie_bandwidth,
        fast_forward: if a.no_fast_forward {
            FastForward::Off
        } else {
            FastForward::On
        },
    };
    let synth = a
        .trace
        .is_none()
        .then(|| SynthSpec::azure_conv_like(a.requests, a.seed));
    let info = RunInfo {
        trace: match &a.trace {
            Some(p) => p
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            None => format!(
                "synthetic azure-conv-like ({} requests, seed {})",
                a.requests, a.seed
            ),
        },
        model: model.meta.name.clone(),
        hardware: hw.name.clone(),
        tp: a.tp,
        dtype: format!(
            "{}, quant {}, kv {}",
            a.dtype.name(),
            memory::quant_name(mem_opts.quant),
            mem_opts.kv_dtype.name()
        ),
        cost_model: match a.cost {
            CostArg::Roofline => "roofline".into(),
            CostArg::ClosedForm => "closed-form".into(),
        },
        batching: format!("{:?}", cfg.scheduler.batching).to_lowercase(),
        policy: format!("{:?}", cfg.scheduler.policy),
        kv_layout: format!("{:?}", cfg.kv.layout).to_lowercase(),
        prefix_caching: a.prefix_caching,
        preemption: format!("{:?}", cfg.scheduler.preemption).to_lowercase(),
        max_num_seqs: a.max_num_seqs,
        max_num_batched_tokens: a.max_batched_tokens,
        block_size: a.block_size,
        num_kv_blocks,
        kv_capacity_tokens: plan.max_tokens_in_flight,
        seed: a.seed,
    };
    Ok(Setup {
        cfg,
        cost,
        info,
        synth,
    })
}

/// Run a replay; `show_progress` draws a bar on stderr.
pub fn run_replay(a: &ReplayArgs, show_progress: bool) -> Result<(Report, Metrics)> {
    let s = setup(a)?;
    let bar = if show_progress {
        let len = s.synth.as_ref().map(|x| x.requests);
        let b = match len {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} replay [{elapsed_precise}] {bar:30} {pos}/{len} completed {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut progress = |p: engine::Progress| {
        bar.set_position(p.completed);
        bar.set_message(format!("sim time {:.0} s", p.now_ns as f64 * 1e-9));
    };
    let trace: Box<dyn Iterator<Item = inferlab_sim::Result<Request>>> = match (&a.trace, &s.synth)
    {
        (Some(p), _) => Box::new(trace::open(p, a.unsorted)?),
        (None, Some(spec)) => Box::new(spec.iter()?),
        (None, None) => bail!("no trace"),
    };
    if !(a.speedup.is_finite() && a.speedup > 0.0) {
        bail!("--speedup {} is not a positive number", a.speedup);
    }
    let trace: Box<dyn Iterator<Item = inferlab_sim::Result<Request>>> = if a.speedup == 1.0 {
        trace
    } else {
        // compress inter-arrival times: arrival / speedup (integer ns, monotone)
        let k = a.speedup;
        Box::new(trace.map(move |r| {
            r.map(|mut r| {
                r.arrival_ns = (r.arrival_ns as f64 / k).round() as u64;
                r
            })
        }))
    };
    let m = engine::replay(s.cfg, s.cost.as_ref(), trace, &mut progress)?;
    bar.finish_and_clear();
    Ok((Report::new(s.info, &m), m))
}

pub fn replay(a: ReplayArgs) -> Result<()> {
    let (report, m) = run_replay(&a, true)?;
    let json = report.to_json();
    if let Some(out) = &a.out {
        write_atomic(out, &json)?;
    }
    if let Some(dir) = &a.plots {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, svg) in inferlab_sim::plot::standard_plots(&m) {
            write_atomic(&dir.join(name), &svg)?;
        }
    }
    if a.json {
        print!("{json}");
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    which: TraceCmd,
}

#[derive(clap::Subcommand)]
enum TraceCmd {
    /// Request count, rate, burstiness and length statistics of a trace.
    Stats {
        file: PathBuf,
        #[arg(long, default_value = "reject")]
        unsorted: Unsorted,
        #[arg(long)]
        json: bool,
    },
    /// Write a synthetic trace (CSV). Default: shaped like the Azure conversation trace.
    Synth(SynthArgs),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ArrivalArg {
    Poisson,
    Gamma,
    Fixed,
}

#[derive(clap::Args)]
struct SynthArgs {
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    #[arg(long, value_enum, default_value_t = ArrivalArg::Gamma)]
    arrival: ArrivalArg,
    /// Requests per second.
    #[arg(long, default_value_t = 5.5)]
    rate: f64,
    /// Coefficient of variation of gamma inter-arrival gaps.
    #[arg(long, default_value_t = inferlab_sim::synth::AZURE_CONV_INTERARRIVAL_CV)]
    cv: f64,
    /// Prompt lengths: fixed:N | uniform:LO:HI | lognormal:MEAN:MEDIAN[:MIN:MAX].
    #[arg(long, default_value = "lognormal:1155:1020:1:14050")]
    prompt: String,
    /// Output lengths, same syntax (default: unclipped mean 228.86 so the clipped mean is 211).
    #[arg(long, default_value = "lognormal:228.86:129:1:1000")]
    output: String,
    /// Resample (prompt, output) pairs from this trace instead.
    #[arg(long)]
    resample: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

fn parse_len(opt: &str, s: &str) -> Result<LengthDist> {
    let parts: Vec<&str> = s.split(':').collect();
    let n = |i: usize| -> Result<f64> {
        parts
            .get(i)
            .with_context(|| format!("--{opt} {s}: missing field {i}"))?
            .parse::<f64>()
            .with_context(|| format!("--{opt} {s}: field {i} is not a number"))
    };
    let u = |i: usize| -> Result<u32> {
        let v = n(i)?;
        if v < 0.0 || v.fract() != 0.0 || v > u32::MAX as f64 {
            bail!("--{opt} {s}: field {i} is not a token count");
        }
        Ok(v as u32)
    };
    Ok(match parts[0] {
        "fixed" => LengthDist::Fixed(u(1)?),
        "uniform" => LengthDist::Uniform {
            lo: u(1)?,
            hi: u(2)?,
        },
        "lognormal" => LengthDist::LogNormal {
            mean: n(1)?,
            median: n(2)?,
            min: if parts.len() > 3 { u(3)? } else { 1 },
            max: if parts.len() > 4 { u(4)? } else { u32::MAX },
        },
        other => bail!("--{opt}: unknown distribution `{other}` (fixed, uniform, lognormal)"),
    })
}

pub fn trace(a: TraceArgs) -> Result<()> {
    match a.which {
        TraceCmd::Stats {
            file,
            unsorted,
            json,
        } => {
            let st = inferlab_sim::trace::TraceStats::compute(trace::open(&file, unsorted)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("{}: {} requests over {:.3} s ({:.4} req/s), inter-arrival CV {:.4}, {} with a prefix id", file.display(), st.requests, st.duration_s, st.rate_per_s, st.interarrival_cv, st.with_prefix);
                println!(
                    "{:<8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>14}",
                    "tokens", "mean", "median", "p99", "min", "max", "total"
                );
                for (n, l) in [("prompt", &st.prompt), ("output", &st.output)] {
                    println!(
                        "{:<8} {:>10.2} {:>8} {:>8} {:>8} {:>8} {:>14}",
                        n, l.mean, l.median, l.p99, l.min, l.max, l.total
                    );
                }
            }
            Ok(())
        }
        TraceCmd::Synth(s) => {
            let arrivals = match s.arrival {
                ArrivalArg::Poisson => Arrivals::Poisson { rate: s.rate },
                ArrivalArg::Gamma => Arrivals::Gamma {
                    rate: s.rate,
                    cv: s.cv,
                },
                ArrivalArg::Fixed => Arrivals::Fixed { rate: s.rate },
            };
            let lengths = match &s.resample {
                Some(p) => Lengths::Resample(
                    trace::open(p, Unsorted::Sort)?
                        .map(|r| r.map(|r| (r.prompt_tokens, r.output_tokens)))
                        .collect::<inferlab_sim::Result<Vec<_>>>()?,
                ),
                None => Lengths::Independent {
                    prompt: parse_len("prompt", &s.prompt)?,
                    output: parse_len("output", &s.output)?,
                },
            };
            let spec = SynthSpec {
                requests: s.requests,
                arrivals,
                lengths,
                seed: s.seed,
            };
            let n = trace::write_csv(&s.out, spec.iter()?)?;
            eprintln!("wrote {n} requests to {}", s.out.display());
            Ok(())
        }
    }
}

/// `inferlab bench replay`: 1,000,000 synthetic Azure-like requests on one
/// core against the 10 s goal.
pub fn bench_replay(requests: u64, cost: CostArg) -> Result<()> {
    let a = ReplayArgs {
        requests,
        cost,
        ..ReplayArgs::default()
    };
    let t0 = std::time::Instant::now();
    let (report, _) = run_replay(&a, true)?;
    let secs = t0.elapsed().as_secs_f64();
    let goal = 10.0 * requests as f64 / 1e6;
    println!(
        "bench replay: cost model {}, {}",
        report.run.cost_model, report.run.trace
    );
    println!("bench replay: {} requests ({} steps, {} output tokens simulated over {:.0} s of trace time)", requests, report.batch.steps, (report.throughput.output_tokens_per_s * report.throughput.duration_s).round(), report.throughput.duration_s);
    println!(
        "  wall time {secs:.3} s on one core = {:.0} requests/s, {:.0} steps/s",
        requests as f64 / secs,
        report.batch.steps as f64 / secs
    );
    println!(
        "  goal <= {goal:.1} s: ratio goal/actual = {:.2}x ({})",
        goal / secs,
        if secs <= goal { "met" } else { "MISSED" }
    );
    Ok(())
}
