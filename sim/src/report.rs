//! The replay report: a serde struct (field order is the JSON order),
//! rounded so the text is stable, and a readable table.
//!
//! Latencies are in milliseconds with 3 decimals (microseconds); quantiles
//! come from [`crate::metrics::LogHistogram`] (within 0.2 %); rates have 3
//! decimals; fractions 4.

use serde::Serialize;

use crate::metrics::{LogHistogram, Metrics, Slo};

/// Round to `digits` decimals (half away from zero); `-0.0` becomes `0.0`.
pub fn round(x: f64, digits: i32) -> f64 {
    if !x.is_finite() {
        return 0.0;
    }
    let p = 10f64.powi(digits);
    let r = (x * p).round() / p;
    if r == 0.0 {
        0.0
    } else {
        r
    }
}

/// What was replayed, for the report header.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub trace: String,
    pub model: String,
    pub hardware: String,
    pub tp: u32,
    pub dtype: String,
    pub cost_model: String,
    pub batching: String,
    pub policy: String,
    pub kv_layout: String,
    pub prefix_caching: bool,
    pub preemption: String,
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    pub block_size: u32,
    pub num_kv_blocks: u32,
    pub kv_capacity_tokens: u64,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub count: u64,
}

impl Summary {
    fn ms(h: &LogHistogram) -> Summary {
        let ms = |ns: f64| round(ns * 1e-6, 3);
        Summary {
            mean: ms(h.mean()),
            p50: ms(h.quantile(0.5) as f64),
            p90: ms(h.quantile(0.9) as f64),
            p99: ms(h.quantile(0.99) as f64),
            max: ms(h.max() as f64),
            count: h.count(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Requests {
    pub arrived: u64,
    pub completed: u64,
    pub rejected_longer_than_model: u64,
    pub rejected_longer_than_kv: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Goodput {
    pub slo: Slo,
    pub requests_within_slo: u64,
    pub fraction_within_slo: f64,
    pub goodput_requests_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2e_ms: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct KvUsage {
    pub num_blocks: u32,
    pub mean_utilization: f64,
    pub peak_utilization: f64,
    /// Time-average of reserved-but-unfilled slots over allocated slots.
    pub mean_waste_fraction: f64,
    pub prefix_hit_rate: f64,
    pub evictions: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Batch {
    pub steps: u64,
    pub mean_running: f64,
    pub max_running: u64,
    pub mean_tokens_per_step: f64,
    pub busy_fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Preemptions {
    pub preemptions: u64,
    pub swap_out_blocks: u64,
    pub swap_in_blocks: u64,
    pub swap_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run: RunInfo,
    pub requests: Requests,
    pub throughput: Throughput,
    pub goodput: Goodput,
    pub latency: Latency,
    pub kv: KvUsage,
    pub batch: Batch,
    pub preemption: Preemptions,
}

impl Report {
    pub fn new(run: RunInfo, m: &Metrics) -> Report {
        let dur_s = m.last_finish_ns as f64 * 1e-9;
        let per_s = |x: f64| round(if dur_s > 0.0 { x / dur_s } else { 0.0 }, 3);
        let busy = m.busy_ns.max(1) as f64;
        let nb = run.num_kv_blocks;
        Report {
            requests: Requests {
                arrived: m.arrived,
                completed: m.completed,
                rejected_longer_than_model: m.rejected_longer_than_model,
                rejected_longer_than_kv: m.rejected_longer_than_kv,
            },
            throughput: Throughput {
                duration_s: round(dur_s, 3),
                requests_per_s: per_s(m.completed as f64),
                output_tokens_per_s: per_s(m.tokens_out as f64),
                total_tokens_per_s: per_s((m.tokens_out + m.prompt_tokens_done) as f64),
            },
            goodput: Goodput {
                slo: m.slo,
                requests_within_slo: m.within_slo,
                fraction_within_slo: round(m.within_slo as f64 / m.completed.max(1) as f64, 4),
                goodput_requests_per_s: per_s(m.within_slo as f64),
            },
            latency: Latency {
                ttft_ms: Summary::ms(&m.ttft),
                tpot_ms: Summary::ms(&m.tpot),
                itl_ms: Summary::ms(&m.itl),
                e2e_ms: Summary::ms(&m.e2e),
            },
            kv: KvUsage {
                num_blocks: nb,
                mean_utilization: round(m.int_used_blocks / busy / nb.max(1) as f64, 4),
                peak_utilization: round(m.max_used_blocks as f64 / nb.max(1) as f64, 4),
                mean_waste_fraction: round(m.int_waste / busy, 4),
                prefix_hit_rate: round(
                    m.prefix_hit_blocks as f64 / m.prefix_query_blocks.max(1) as f64,
                    4,
                ),
                evictions: m.evictions,
            },
            batch: Batch {
                steps: m.steps,
                mean_running: round(m.int_running / busy, 3),
                max_running: m.max_running,
                mean_tokens_per_step: round(m.int_tokens_per_step / m.steps.max(1) as f64, 3),
                busy_fraction: round(m.busy_ns as f64 / m.last_finish_ns.max(1) as f64, 4),
            },
            preemption: Preemptions {
                preemptions: m.preemptions,
                swap_out_blocks: m.swap_out_blocks,
                swap_in_blocks: m.swap_in_blocks,
                swap_ms: round(m.swap_ns as f64 * 1e-6, 3),
            },
            run,
        }
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("report serializes");
        s.push('\n');
        s
    }

    /// A readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let r = &self.run;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "replay of {}: {} on {} x{} ({}), cost model {}",
            r.trace, r.model, r.hardware, r.tp, r.dtype, r.cost_model
        );
        let _ = writeln!(
            s,
            "  {} batching, {}, KV {} ({} blocks x {} tokens = {} tokens), prefix caching {}, preemption {}, max_num_seqs {}, max_batched_tokens {}, seed {}",
            r.batching, r.policy, r.kv_layout, r.num_kv_blocks, r.block_size, r.kv_capacity_tokens,
            if r.prefix_caching { "on" } else { "off" }, r.preemption, r.max_num_seqs, r.max_num_batched_tokens, r.seed
        );
        let q = &self.requests;
        let _ = writeln!(
            s,
            "requests   arrived {}  completed {}  rejected: longer than model {}, longer than KV {}",
            q.arrived, q.completed, q.rejected_longer_than_model, q.rejected_longer_than_kv
        );
        let t = &self.throughput;
        let _ = writeln!(
            s,
            "throughput {:.3} req/s  {:.1} output tok/s  {:.1} total tok/s  over {:.3} s",
            t.requests_per_s, t.output_tokens_per_s, t.total_tokens_per_s, t.duration_s
        );
        let g = &self.goodput;
        let _ = writeln!(
            s,
            "goodput    {:.3} req/s within SLO (TTFT <= {} ms, TPOT <= {} ms): {:.2} % of completed",
            g.goodput_requests_per_s, g.slo.ttft_ms, g.slo.tpot_ms, g.fraction_within_slo * 100.0
        );
        let _ = writeln!(
            s,
            "{:<10} {:>12} {:>12} {:>12} {:>12} {:>12}",
            "latency ms", "mean", "p50", "p90", "p99", "max"
        );
        for (name, x) in [
            ("TTFT", &self.latency.ttft_ms),
            ("TPOT", &self.latency.tpot_ms),
            ("ITL", &self.latency.itl_ms),
            ("E2E", &self.latency.e2e_ms),
        ] {
            let _ = writeln!(
                s,
                "{:<10} {:>12.3} {:>12.3} {:>12.3} {:>12.3} {:>12.3}",
                name, x.mean, x.p50, x.p90, x.p99, x.max
            );
        }
        let k = &self.kv;
        let _ = writeln!(
            s,
            "KV         mean use {:.2} %  peak {:.2} %  waste {:.2} %  prefix hits {:.2} %  evictions {}",
            k.mean_utilization * 100.0, k.peak_utilization * 100.0, k.mean_waste_fraction * 100.0, k.prefix_hit_rate * 100.0, k.evictions
        );
        let b = &self.batch;
        let _ =
            writeln!(
            s,
            "batch      {} steps  mean running {:.2}  max {}  mean tokens/step {:.1}  busy {:.2} %",
            b.steps, b.mean_running, b.max_running, b.mean_tokens_per_step, b.busy_fraction * 100.0
        );
        let p = &self.preemption;
        let _ = writeln!(
            s,
            "preemption {}  swapped out {} / in {} blocks ({:.3} ms on PCIe)",
            p.preemptions, p.swap_out_blocks, p.swap_in_blocks, p.swap_ms
        );
        s
    }
}
