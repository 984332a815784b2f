//! `inferlab gpu check` and `inferlab gpu bench`: the GPU path's tests and
//! benchmarks (CI has no GPU; these run on a lent device).
//!
//! `check` runs every kernel against the reference (see `inferlab_gpu::check`)
//! and exits non-zero on any failure. `bench` times every kernel, measures the
//! device's ceilings in the same process, and (with `--peers`) joins the
//! PyTorch peer figures measured by `bench/gpu/peers.py` in the same device
//! call into one table with ratios. On a machine without CUDA both say so and
//! exit non-zero.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use inferlab_gpu::{bench, check, Gpu};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Check every kernel against the reference; prints a pass/fail table.
    Check {
        #[arg(long, default_value_t = 0x1f2e3d)]
        seed: u64,
        /// Also write check.md and check.json into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only one family (elementwise, rejection_sample, reshape_and_cache,
        /// w4a16, paged_decode, prefill).
        #[arg(long)]
        only: Option<String>,
    },
    /// Time every kernel, the device's ceilings and (with --peers) PyTorch.
    Bench {
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// JSON written by bench/gpu/peers.py in the same device call.
        #[arg(long)]
        peers: Option<PathBuf>,
        /// Write bench.md and bench.json into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only one family (prefill, decode, w4a16; w4a16:M for one M), no ceilings: for ncu;
        /// or decode-rule[:HQ/HKV/D/BS]: the paged-decode plan sweep (not in the default bench).
        #[arg(long)]
        only: Option<String>,
    },
}

fn open() -> Result<Gpu> {
    Gpu::new(0).context("inferlab gpu needs an NVIDIA GPU with driver and NVRTC")
}

/// Write `name` under `dir` atomically (temp name, then rename).
fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming to {name}"))?;
    Ok(())
}

fn header(gpu: &Gpu) -> String {
    format!(
        "device: {} ({}, {} SMs)\n\n",
        gpu.name, gpu.arch, gpu.sm_count
    )
}

pub fn run(a: Args) -> Result<()> {
    match a.cmd {
        Cmd::Check { seed, out, only } => {
            let gpu = open()?;
            let rows = check::run_only(&gpu, seed, only.as_deref(), &|k| {
                eprintln!("checking {k} ...")
            })?;
            if rows.is_empty() {
                bail!(
                    "no GPU check family is named {:?}",
                    only.unwrap_or_default()
                );
            }
            let table = format!("{}{}", header(&gpu), check::render(&rows));
            println!("{table}");
            if let Some(dir) = out {
                write(&dir, "check.md", &table)?;
                write(&dir, "check.json", &serde_json::to_string_pretty(&rows)?)?;
            }
            let failed = rows.iter().filter(|r| !r.pass).count();
            if failed > 0 {
                bail!("{failed} of {} GPU checks failed", rows.len());
            }
            eprintln!("all {} GPU checks passed", rows.len());
            Ok(())
        }
        Cmd::Bench {
            seed,
            peers,
            out,
            only,
        } => {
            let gpu = open()?;
            let rows = bench::run_all(&gpu, seed, only.as_deref(), &|k| {
                eprintln!("timing {k} ...")
            })?;
            let mut text = format!(
                "{}{}{}",
                header(&gpu),
                bench::render(&rows),
                bench::rule_summary(&rows)
            );
            let peer_rows: Vec<Peer> = match &peers {
                Some(p) => {
                    let s = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    serde_json::from_str(&s).with_context(|| format!("parsing {}", p.display()))?
                }
                None => Vec::new(),
            };
            if !peer_rows.is_empty() {
                text += "\n## PyTorch peers (same device call)\n\n| peer | shape | ms | figure |\n|---|---|---|---|\n";
                for p in &peer_rows {
                    text += &format!(
                        "| {} | {} | {:.4} | {:.1} {} |\n",
                        p.name, p.shape, p.ms, p.value, p.unit
                    );
                }
                text += &combined(&rows, &peer_rows);
            }
            println!("{text}");
            if let Some(dir) = out {
                write(&dir, "bench.md", &text)?;
                let json = serde_json::json!({ "device": gpu.name, "arch": gpu.arch.to_string(), "rows": rows, "peers": peer_rows });
                write(&dir, "bench.json", &serde_json::to_string_pretty(&json)?)?;
                // registers and spills of the W4A16 tensor-core kernels
                write(&dir, "resources.txt", &bench::w4a16_resources(&gpu)?)?;
            }
            Ok(())
        }
    }
}

/// One figure from bench/gpu/peers.py.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
struct Peer {
    name: String,
    shape: String,
    ms: f64,
    value: f64,
    unit: String,
}

/// The goal table: ours against the peers, ratio > 1 means ours is faster.
fn combined(rows: &[bench::BenchRow], peers: &[Peer]) -> String {
    let best = |prefix: &str| -> Option<&bench::BenchRow> {
        rows.iter()
            .filter(|r| r.kernel.starts_with(prefix))
            .min_by(|a, b| a.ms.total_cmp(&b.ms))
    };
    let peer = |name: &str| peers.iter().find(|p| p.name == name);
    let mut s = String::from("\n## Goals: ours vs peers (ratio = peer time / our time)\n\nPeers are timed by triton's do_bench (L2 flushed, one launch per event pair). Rows without \"flushed\" time ours back to back (the model-stream figure, see `time_ms`); \"flushed\" rows time ours exactly as the peers are: compare those like for like.\n\n| kernel | shape | ours | peer | peer figure | ratio |\n|---|---|---|---|---|---|\n");
    let mut line = |ours: Option<&bench::BenchRow>, pname: &str| {
        if let (Some(o), Some(p)) = (ours, peer(pname)) {
            s += &format!(
                "| {} | {} | {:.1} {} ({:.4} ms) | {} | {:.1} {} ({:.4} ms) | {:.2} |\n",
                o.kernel,
                o.shape,
                o.value,
                o.unit,
                o.ms,
                p.name,
                p.value,
                p.unit,
                p.ms,
                p.ms / o.ms
            );
        }
    };
    line(best("prefill bf16 causal"), "sdpa_flash causal");
    line(best("prefill bf16 causal"), "sdpa_cudnn causal");
    line(best("prefill bf16 full"), "sdpa_flash full");
    line(best("prefill bf16 full"), "sdpa_cudnn full");
    line(best("paged_decode bf16"), "decode sdpa_cudnn");
    line(best("paged_decode bf16"), "decode sdpa_flash");
    // like for like: ours timed as do_bench times the peers (L2 flushed, one launch)
    for flushed in rows
        .iter()
        .filter(|r| r.kernel.starts_with("flushed paged_decode bf16"))
    {
        line(Some(flushed), "decode sdpa_cudnn");
    }
    for m in [1, 16, 64] {
        let ours = rows
            .iter()
            .filter(|r| {
                r.kernel.starts_with("w4a16 gptq") && r.shape.starts_with(&format!("M{m} "))
            })
            .min_by(|a, b| a.ms.total_cmp(&b.ms));
        line(ours, &format!("cublas bf16 M{m}"));
        line(ours, &format!("tinygemm int4 M{m}"));
        // the default plan flushed, and with its weights under L2 evict_first
        for flushed in rows.iter().filter(|r| {
            r.kernel.starts_with("w4a16 flushed gptq") && r.shape.starts_with(&format!("M{m} "))
        }) {
            line(Some(flushed), &format!("cublas bf16 M{m}"));
            line(Some(flushed), &format!("tinygemm int4 M{m}"));
        }
    }
    if let (Some(d), Some(c)) = (
        best("paged_decode bf16"),
        rows.iter().find(|r| r.kernel.starts_with("ceiling: copy")),
    ) {
        s += &format!(
            "\npaged decode at {:.0}% of the measured copy bandwidth ({:.0} GB/s)\n",
            100.0 * d.value / c.value,
            c.value
        );
    }
    s
}
