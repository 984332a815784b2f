//! `inferlab memory` (the GPU memory breakdown and KV capacity, vLLM's way) and
//! `inferlab roofline` (the per-operator roofline table of one step, and its SVG
//! chart). Both print deterministic tables; the formulas live in `sim::memory`,
//! `sim::cost` and `sim::roofline`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use inferlab_models::{catalog, Dtype, HardwareSpec, ModelConfig};
use inferlab_sim::cost::{CostModel, CostOptions};
use inferlab_sim::memory::{plan_memory, quant_name, MemoryOptions, MemoryPlan};
use inferlab_sim::roofline::{analyze, render_svg, render_table, roofline_plan, Phase};

/// Model, GPU and precision: shared by both commands.
#[derive(clap::Args, Debug)]
pub struct Deployment {
    /// Model: catalog name or path to a descriptor TOML.
    #[arg(long, default_value = "llama-3-8b")]
    pub model: String,
    /// GPU: catalog name or path to a descriptor TOML.
    #[arg(long, default_value = "H100-SXM5-80GB")]
    pub hardware: String,
    /// Weight dtype (f32, f16, bf16, fp8, int8); default: the model's torch_dtype, else bf16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// KV-cache dtype; default: the activation dtype (vLLM's `--kv-cache-dtype auto`).
    #[arg(long)]
    pub kv_dtype: Option<String>,
    /// Weight-only quantization: none, gptq-4bit-g128, awq-4bit-g128, gguf-q4_0, gguf-q4_1, gguf-q8_0.
    #[arg(long, default_value = "none")]
    pub quant: String,
    /// Tensor-parallel degree.
    #[arg(long, default_value_t = 1)]
    pub tp: u32,
}

struct Resolved {
    name: String,
    model: ModelConfig,
    hw: HardwareSpec,
    opts: MemoryOptions,
}

fn parse_dtype(s: &str, flag: &str) -> Result<Dtype> {
    s.parse::<Dtype>()
        .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

impl Deployment {
    fn resolve(&self) -> Result<Resolved> {
        let d = catalog::model(&self.model).with_context(|| format!("--model {}", self.model))?;
        let hw = catalog::gpu(&self.hardware)
            .with_context(|| format!("--hardware {}", self.hardware))?;
        let weight_dtype = match &self.dtype {
            Some(s) => parse_dtype(s, "dtype")?,
            None => match d.config.torch_dtype.as_deref() {
                Some(t) => parse_dtype(t, "dtype (from the model's torch_dtype)")?,
                None => Dtype::Bf16,
            },
        };
        let kv_dtype = match &self.kv_dtype {
            Some(s) => parse_dtype(s, "kv-dtype")?,
            None => inferlab_sim::memory::activation_dtype(weight_dtype),
        };
        let quant = inferlab_sim::memory::parse_quant(&self.quant).context("--quant")?;
        Ok(Resolved {
            name: d.meta.name,
            model: d.config,
            hw,
            opts: MemoryOptions {
                weight_dtype,
                quant,
                kv_dtype,
                tp: self.tp,
                ..Default::default()
            },
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct MemoryArgs {
    #[command(flatten)]
    pub deployment: Deployment,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// Fraction of GPU memory vLLM may use, in (0, 1].
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Token budget per step (size of the profile run).
    #[arg(long, default_value_t = 8192)]
    pub max_batched_tokens: u64,
    /// Sequences per step (rows sampled in the profile run).
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: u64,
    /// Also write the plan (options and every figure) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn gib(b: u64) -> String {
    format!("{:>10.3} GiB", b as f64 / (1u64 << 30) as f64)
}

/// The `inferlab memory` table.
pub fn render_memory(name: &str, opts: &MemoryOptions, p: &MemoryPlan) -> String {
    let w = &p.weights;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{name} on {}, per GPU of tp = {}: weights {}, quant {}, KV cache {}",
        p.hardware,
        p.tp,
        opts.weight_dtype.name(),
        quant_name(opts.quant),
        opts.kv_dtype.name()
    );
    let mut row = |label: &str, b: u64| {
        let _ = writeln!(s, "  {label:<38} {} {b:>16} B", gib(b));
    };
    row("GPU memory (as the driver reports it)", p.total_bytes);
    row(
        &format!("requested (x {})", opts.gpu_memory_utilization),
        p.requested_bytes,
    );
    row("- weights", p.weight_bytes);
    row("    linear layers", w.linear());
    row("    embedding", w.embedding);
    row("    lm head", w.lm_head);
    row(
        "    norms, routers",
        w.layers * (w.norms_per_layer + w.router_per_layer) + w.final_norm,
    );
    row(
        &format!("- activation peak ({} tokens)", opts.max_num_batched_tokens),
        p.activation_peak_bytes,
    );
    row("- non-torch overhead", p.overhead_bytes);
    row("= KV cache budget", p.kv_budget_bytes);
    row("CUDA context (outside the budget)", p.cuda_context_bytes);
    let _ = writeln!(s, "KV cache");
    let _ = writeln!(
        s,
        "  {:<38} {:>16} B",
        "bytes per token (this GPU)", p.kv_bytes_per_token
    );
    let _ = writeln!(
        s,
        "  {:<38} {:>16} B",
        format!("bytes per block ({} tokens)", p.block_size),
        p.kv_bytes_per_block
    );
    let _ = writeln!(s, "  {:<38} {:>16}", "blocks", p.num_kv_blocks);
    let _ = writeln!(
        s,
        "  {:<38} {:>16}",
        "max tokens in flight", p.max_tokens_in_flight
    );
    let _ = writeln!(
        s,
        "  {:<38} {:>16}",
        "full-length sequences at once", p.max_full_length_seqs
    );
    s
}

pub fn memory(a: MemoryArgs) -> Result<()> {
    let mut r = a.deployment.resolve()?;
    r.opts.block_size = a.block_size;
    r.opts.gpu_memory_utilization = a.gpu_memory_utilization;
    r.opts.max_num_batched_tokens = a.max_batched_tokens;
    r.opts.max_num_seqs = a.max_num_seqs;
    let plan = plan_memory(&r.model, &r.hw, &r.opts)
        .with_context(|| format!("{} on {}", r.name, r.hw.name))?;
    print!("{}", render_memory(&r.name, &r.opts, &plan));
    if let Some(p) = &a.json {
        let doc = serde_json::json!({ "model": r.name, "options": r.opts, "plan": plan });
        write_atomic(p, &(serde_json::to_string_pretty(&doc)? + "\n"))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct RooflineArgs {
    #[command(flatten)]
    pub deployment: Deployment,
    /// Sequences in the step.
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    /// Decode: cached tokens per sequence; prefill: prompt length.
    #[arg(long, default_value_t = 1024)]
    pub context: u64,
    /// decode or prefill.
    #[arg(long, default_value = "decode")]
    pub phase: String,
    /// Write the roofline chart to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write the operators (FLOPs, bytes, time, bound) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Fraction of peak FLOP/s reached by GEMMs and attention.
    #[arg(long)]
    pub compute_efficiency: Option<f64>,
    /// Fraction of memory bandwidth reached.
    #[arg(long)]
    pub memory_efficiency: Option<f64>,
}

/// Write `text` to `path` through a temporary name, so nothing is left half-written.
fn write_atomic(path: &std::path::Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The `inferlab roofline` table (and the chart when asked).
pub fn roofline_report(a: &RooflineArgs) -> Result<(String, String, String)> {
    let r = a.deployment.resolve()?;
    let phase: Phase = a.phase.parse().context("--phase")?;
    let mut opts = CostOptions::matching(&r.opts);
    if let Some(e) = a.compute_efficiency {
        opts.compute_efficiency = e;
    }
    if let Some(e) = a.memory_efficiency {
        opts.memory_efficiency = e;
    }
    let cm = CostModel::new(&r.model, &r.hw, opts)
        .with_context(|| format!("{} on {}", r.name, r.hw.name))?;
    let plan = roofline_plan(phase, a.batch, a.context)?;
    let title = format!(
        "{} {} on {} (tp {}): batch {}, context {}, {} weights, quant {}",
        r.name,
        phase.name(),
        r.hw.name,
        r.opts.tp,
        a.batch,
        a.context,
        r.opts.weight_dtype.name(),
        quant_name(r.opts.quant)
    );
    let rl = analyze(&cm, &plan, title);
    let json = serde_json::to_string_pretty(&rl)? + "\n";
    Ok((render_table(&rl), render_svg(&rl), json))
}

pub fn roofline(a: RooflineArgs) -> Result<()> {
    let (table, svg, json) = roofline_report(&a)?;
    print!("{table}");
    for (path, text) in [(&a.plot, &svg), (&a.json, &json)] {
        if let Some(p) = path {
            write_atomic(p, text)?;
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}
