//! `inferlab quantize layer|model`: RTN, GPTQ and AWQ from the command line.
//!
//! `layer` reads W `[out, in]` and X `[tokens, in]` (.npy, f32 or f64), runs
//! [`inferlab_reference::quant::layer::quantize_layer`] and writes, atomically
//! (a temporary sibling directory renamed into place):
//! ```text
//!   qweight.npy  int32 [⌈in·bits/32⌉, out]   AutoGPTQ v1 packing
//!   qzeros.npy   int32 [groups, ⌈out·bits/32⌉] (zero − 1)
//!   scales.npy   float16 [groups, out]
//!   g_idx.npy    int32 [in]
//!   dequant.npy  float32 [out, in]   the weight the layer applies (AWQ: Q(W·s)/s)
//!   awq_scales.npy float32 [in]      AWQ only: divide the layer's input by these
//!   summary.json method, settings, output errors, packed bytes, wall time
//! ```
//! Everything but `summary.json`'s `wall_time_s` is byte-identical across runs.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::{Array1, Array2};
use ndarray_npy::{read_npy, write_npy};

use super::generate::ArithmeticArg;
use inferlab_reference::model::bf16;
use inferlab_reference::quant::bytes::QuantFormat;
use inferlab_reference::quant::gptq::{ActOrder, Damping, GroupParamTiming};
use inferlab_reference::quant::layer::{quantize_layer, Calibration, LayerOptions, Method};
use inferlab_reference::quant::pack::{pack_gptq, GptqZeros};
use inferlab_reference::quant::{Grouping, QuantSpec, Scheme};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Subcommand)]
enum Which {
    /// Quantize one linear layer from .npy weight and calibration activations.
    Layer(LayerArgs),
    /// Quantize a whole model sequentially and write an HF-style directory.
    Model(ModelArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum MethodArg {
    Rtn,
    Gptq,
    Awq,
}

/// The quantization flags `quantize layer` and `quantize model` share.
#[derive(clap::Args)]
pub struct QuantFlags {
    #[arg(long, value_enum)]
    method: MethodArg,
    /// Bits per weight, 2..=8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Group size along the input dimension; -1 = one group per output row.
    /// `quantize layer`: a size that does not divide the input dimension is an
    /// error. `quantize model`: such a linear uses the largest divisor of its
    /// input dimension below the size (recorded in its codes; docs/quantization.md).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    group_size: i64,
    /// Symmetric quantization (default: asymmetric zero-point).
    #[arg(long)]
    sym: bool,
    /// GPTQ: process columns by descending Hessian diagonal.
    #[arg(long)]
    act_order: bool,
    /// GPTQ: compute all group parameters up front.
    #[arg(long)]
    static_groups: bool,
    /// GPTQ: damping fraction of mean(diag H).
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
}

impl QuantFlags {
    /// The library's options for these flags.
    fn options(&self) -> Result<LayerOptions> {
        let grouping = match self.group_size {
            -1 => Grouping::PerChannel,
            g if g > 0 => Grouping::Group(g as usize),
            g => bail!(
                "--group-size {g}: use a positive size dividing the input dimension, or -1 for one group per row"
            ),
        };
        let scheme = if self.sym {
            Scheme::Symmetric
        } else {
            Scheme::Asymmetric
        };
        let method = match self.method {
            MethodArg::Rtn => Method::Rtn,
            MethodArg::Gptq => Method::Gptq,
            MethodArg::Awq => Method::Awq,
        };
        let mut opt = LayerOptions::new(method, QuantSpec::new(self.bits, grouping, scheme));
        opt.act_order = if self.act_order {
            ActOrder::On
        } else {
            ActOrder::Off
        };
        opt.timing = if self.static_groups {
            GroupParamTiming::Static
        } else {
            GroupParamTiming::Dynamic
        };
        opt.damping = Damping {
            percdamp: self.damp,
            ..Damping::default()
        };
        Ok(opt)
    }
}

#[derive(clap::Args)]
pub struct LayerArgs {
    /// Weight [out, in] (.npy, f32 or f64).
    #[arg(long)]
    weight: PathBuf,
    /// Calibration activations [tokens, in] (.npy, f32 or f64).
    #[arg(long)]
    calib: PathBuf,
    #[command(flatten)]
    q: QuantFlags,
    /// Output directory (replaced atomically).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    match a.which {
        Which::Layer(l) => layer(l),
        Which::Model(m) => model(m),
    }
}

/// Read a 2-D .npy of f64 or f32 as f64.
pub fn read_matrix(path: &Path, what: &str) -> Result<Array2<f64>> {
    match read_npy::<_, Array2<f64>>(path) {
        Ok(a) => Ok(a),
        Err(e64) => match read_npy::<_, Array2<f32>>(path) {
            Ok(a) => Ok(a.mapv(f64::from)),
            Err(_) => bail!(
                "{}: cannot read {what} as a 2-D f32 or f64 .npy: {e64}",
                path.display()
            ),
        },
    }
}

/// Write a float16 .npy (ndarray-npy has no f16): NPY 1.0 header, raw LE data.
pub fn write_npy_f16(path: &Path, shape: &[usize], bits: &[u16]) -> Result<()> {
    let dims = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let dims = if shape.len() == 1 {
        format!("{dims},")
    } else {
        dims
    };
    let mut header = format!("{{'descr': '<f2', 'fortran_order': False, 'shape': ({dims}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut buf = Vec::with_capacity(10 + header.len() + 2 * bits.len());
    buf.extend_from_slice(b"\x93NUMPY\x01\x00");
    buf.extend_from_slice(&(header.len() as u16).to_le_bytes());
    buf.extend_from_slice(header.as_bytes());
    for b in bits {
        buf.extend_from_slice(&b.to_le_bytes());
    }
    fs::File::create(path)
        .and_then(|mut f| f.write_all(&buf))
        .with_context(|| format!("writing {}", path.display()))
}

/// Write into a fresh sibling temp dir via `fill`, then move it to `out`.
pub fn write_dir_atomically(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out
        .file_name()
        .context("--out needs a directory name")?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        fs::rename(out, &old).with_context(|| format!("moving aside {}", out.display()))?;
        fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
    }
    Ok(())
}

fn layer(a: LayerArgs) -> Result<()> {
    let w = read_matrix(&a.weight, "the weight")?;
    let x = read_matrix(&a.calib, "the calibration activations")?;
    let (o, n) = w.dim();
    let opt = a.q.options()?;
    let method = opt.method;
    let t0 = Instant::now();
    let res = quantize_layer(w.view(), x.view(), &opt).with_context(|| {
        format!(
            "quantizing {} (weight) with {} (calibration)",
            a.weight.display(),
            a.calib.display()
        )
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let q = &res.quantized;
    let packed = pack_gptq(q, GptqZeros::V1)?;
    let group_size = q.group_size;
    let bytes = QuantFormat::Gptq {
        bits: a.q.bits,
        group_size: group_size as u32,
    }
    .packed_bytes(o as u64, n as u64)?;
    let summary = serde_json::json!({
        "method": method.name(),
        "bits": a.q.bits,
        "group_size": group_size,
        "sym": a.q.sym,
        "act_order": a.q.act_order,
        "static_groups": a.q.static_groups,
        "damp_requested": a.q.damp,
        "damp_used": res.percdamp,
        "out_features": o,
        "in_features": n,
        "tokens": x.nrows(),
        "output_error_rtn": res.error_rtn,
        "output_error": res.error,
        "output_norm": res.output_norm,
        "relative_error_rtn": res.error_rtn / res.output_norm,
        "relative_error": res.error / res.output_norm,
        "dead_columns": res.dead_columns,
        "awq_alpha": res.awq_alpha,
        "format": "gptq_v1",
        "bytes": bytes,
        "bytes_total": bytes.total(),
        "wall_time_s": wall,
    });
    write_dir_atomically(&a.out, |dir| {
        let npy = |name: &str| dir.join(name);
        write_npy(npy("qweight.npy"), &packed.qweight)?;
        write_npy(npy("qzeros.npy"), &packed.qzeros)?;
        let sbits: Vec<u16> = packed.scales.iter().map(|s| s.to_bits()).collect();
        write_npy_f16(
            &npy("scales.npy"),
            &[packed.scales.nrows(), packed.scales.ncols()],
            &sbits,
        )?;
        write_npy(npy("g_idx.npy"), &Array1::from(packed.g_idx.clone()))?;
        write_npy(npy("dequant.npy"), &res.effective.mapv(|v| v as f32))?;
        if let Some(s) = &res.input_scales {
            write_npy(npy("awq_scales.npy"), &s.mapv(|v| v as f32))?;
        }
        fs::write(
            npy("summary.json"),
            serde_json::to_string_pretty(&summary)? + "\n",
        )?;
        Ok(())
    })?;
    println!(
        "{} {}-bit g{}: output error {:.4e} (RTN {:.4e}, relative {:.4e} vs {:.4e}), {} bytes, {:.2} s -> {}",
        method.name(),
        a.q.bits,
        group_size,
        res.error,
        res.error_rtn,
        res.error / res.output_norm,
        res.error_rtn / res.output_norm,
        bytes.total(),
        wall,
        a.out.display()
    );
    Ok(())
}

/// `inferlab bench gptq` arguments.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Square layer size.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Calibration tokens.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Size at which the column-at-a-time twin is timed as the peer.
    #[arg(long, default_value_t = 1024)]
    peer_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Synthetic correlated activations `[tokens, n]`: i.i.d. noise plus a rank-16
/// shared factor, with every 7th channel 10x larger (outlier channels).
pub fn synthetic_activations(tokens: usize, n: usize, seed: u64) -> Array2<f64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut u = || rng.random::<f64>() * 2.0 - 1.0;
    let f = Array2::from_shape_fn((tokens, 16), |_| u());
    let a = Array2::from_shape_fn((16, n), |_| u());
    let mut x = f.dot(&a) + Array2::from_shape_fn((tokens, n), |_| u());
    for (j, mut c) in x.columns_mut().into_iter().enumerate() {
        if j % 7 == 0 {
            c *= 10.0;
        }
    }
    x
}

pub fn bench_gptq(a: BenchArgs) -> Result<()> {
    use inferlab_reference::quant::gptq::{gptq, gptq_slow, GptqConfig, Hessian};
    use inferlab_reference::quant::{linalg, output_error, rtn};
    use rand::{Rng, SeedableRng};
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("# GPTQ benchmark ({} threads)", threads);
    let layer = |n: usize, tokens: usize, seed: u64| {
        let x = synthetic_activations(tokens, n, seed);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 1);
        let w = Array2::from_shape_fn((n, n), |_| 0.02 * (rng.random::<f64>() * 2.0 - 1.0));
        (w, x)
    };
    let spec = QuantSpec::new(4, Grouping::Group(128), Scheme::Asymmetric);
    let cfg = GptqConfig::new(spec);

    // Peer: lazy blocks vs the column-at-a-time twin, same small layer.
    let (w, x) = layer(a.peer_size, a.peer_size, a.seed);
    let mut h = Hessian::new(a.peer_size);
    h.add_batch(x.view(), x.nrows())?;
    let t = Instant::now();
    let fast = gptq(w.view(), &h, &cfg)?;
    let t_fast = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let slow = gptq_slow(w.view(), &h, &cfg)?;
    let t_slow = t.elapsed().as_secs_f64();
    println!(
        "peer {n}x{n}: lazy blocks {t_fast:.2} s, column-at-a-time twin {t_slow:.2} s, ratio {:.1}x, same codes: {}",
        t_slow / t_fast,
        fast.quantized.codes == slow.quantized.codes,
        n = a.peer_size
    );

    let n = a.size;
    let t = Instant::now();
    let (w, x) = layer(n, a.tokens, a.seed);
    let t_data = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut h = Hessian::new(n);
    h.add_batch(x.view(), x.nrows())?;
    let t_h = t.elapsed().as_secs_f64();
    let t = Instant::now();
    // the factor GPTQ runs: H damped by 1 % of its mean diagonal
    let mean = h.h.diag().sum() / n as f64;
    let _u = linalg::upper_cholesky_of_inverse_damped(h.h.view(), 0.01 * mean)?;
    let t_factor = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = gptq(w.view(), &h, &cfg)?;
    let t_gptq = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let r = rtn::quantize(w.view(), &spec)?;
    let t_rtn = t.elapsed().as_secs_f64();
    let sub = x.slice(ndarray::s![..;(a.tokens / 512).max(1), ..]);
    let e_g = output_error(sub, w.view(), out.quantized.dequantize().view());
    let e_r = output_error(sub, w.view(), r.dequantize().view());
    println!("layer {n}x{n}, {} tokens, 4-bit g128 asym:", a.tokens);
    println!("  synthetic data        {t_data:8.2} s");
    println!("  Hessian (f64)         {t_h:8.2} s");
    println!("  GPTQ total            {t_gptq:8.2} s   (of which Cholesky + inverse ≈ {t_factor:.2} s, timed alone)");
    println!("  Hessian + GPTQ        {:8.2} s", t_h + t_gptq);
    println!(
        "  RTN (peer)            {t_rtn:8.2} s   ratio GPTQ/RTN {:.0}x",
        t_gptq / t_rtn
    );
    println!(
        "  output error on {} tokens: GPTQ {e_g:.4e}, RTN {e_r:.4e} (GPTQ/RTN {:.3})",
        sub.nrows(),
        e_g / e_r
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ModelArgs {
    /// Checkpoint (llama2.c .bin, .gguf, or a quantized directory).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    q: QuantFlags,
    /// Calibration text (UTF-8).
    #[arg(long)]
    calib: PathBuf,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Seed for the window offsets.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Arithmetic of the calibration pass: `exact` (the oracle's f32 forward,
    /// f64 Hessians) or `bf16` (bf16 inputs with f32 sums on AMX tiles when the
    /// CPU has them, as a bf16 model calibrates; the GPTQ/AWQ solve stays f64).
    #[arg(long, value_enum, default_value_t = ArithmeticArg::Exact)]
    calibration: ArithmeticArg,
    #[arg(long)]
    out: PathBuf,
}

/// `samples` windows of `seq_len` tokens at seeded random offsets (GPTQ's
/// `get_wikitext2`/`get_c4`: `random.randint(0, n − seq_len − 1)` per sample).
pub fn calibration_windows(
    tokens: &[u32],
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    use rand::{Rng, SeedableRng};
    if seq_len == 0 || samples == 0 {
        bail!("--samples and --seq-len must be positive");
    }
    if tokens.len() <= seq_len + 1 {
        bail!(
            "calibration text has {} tokens, fewer than --seq-len {} + 2",
            tokens.len(),
            seq_len
        );
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Ok((0..samples)
        .map(|_| {
            let i = rng.random_range(0..tokens.len() - seq_len - 1);
            tokens[i..i + seq_len].to_vec()
        })
        .collect())
}

fn model(a: ModelArgs) -> Result<()> {
    use inferlab_reference::model::{load_checkpoint, load_tokenizer, Llama};
    use inferlab_reference::quant::io::{recorded_groups, write_quantized_dir, QuantizationConfig};
    use inferlab_reference::quant::model::quantize_model;
    let ck = load_checkpoint(&a.model)?;
    let m = Llama::from_checkpoint(&ck)?;
    if a.seq_len > m.config.max_seq_len {
        bail!(
            "--seq-len {} exceeds the model's context {}",
            a.seq_len,
            m.config.max_seq_len
        );
    }
    let tok = load_tokenizer(&a.model, a.tokenizer.as_deref())?;
    let text =
        fs::read_to_string(&a.calib).with_context(|| format!("reading {}", a.calib.display()))?;
    let tokens: Vec<u32> = tok.bos().into_iter().chain(tok.encode(&text)).collect();
    let calib = calibration_windows(&tokens, a.samples, a.seq_len, a.seed)
        .with_context(|| format!("calibration text {}", a.calib.display()))?;
    let mut opt = a.q.options()?;
    opt.calibration = match a.calibration {
        ArithmeticArg::Exact => Calibration::Exact,
        ArithmeticArg::Bf16 => Calibration::Bf16,
    };
    let method = opt.method;
    let bar = indicatif::ProgressBar::new((7 * m.config.n_layers) as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} linears {msg} {elapsed}<{eta}",
        )
        .expect("template"),
    );
    let t0 = Instant::now();
    let qm = quantize_model(m, &calib, &opt, &mut |done, _total, l, p| {
        bar.set_position(done as u64);
        bar.set_message(format!("layer {l} {}", p.hf_name()));
    })
    .with_context(|| format!("quantizing {}", a.model.display()))?;
    bar.finish_and_clear();
    let wall = t0.elapsed().as_secs_f64();
    let (group_size, dynamic) = recorded_groups(&qm.linears, a.q.group_size);
    let qc = QuantizationConfig {
        quant_method: "gptq".into(),
        bits: a.q.bits,
        group_size,
        desc_act: a.q.act_order,
        sym: a.q.sym,
        checkpoint_format: "gptq".into(),
        inferlab_method: method.name().into(),
        inferlab_rope_layout: match ck.rope_layout {
            inferlab_models::RopeLayout::Interleaved => "interleaved".into(),
            inferlab_models::RopeLayout::RotateHalf => "rotate_half".into(),
        },
        dynamic,
    };
    write_quantized_dir(&a.out, &ck, &qm, &qc)?;
    let mut linear_bytes = 0u64;
    for q in qm.linears.values() {
        linear_bytes += QuantFormat::Gptq {
            bits: a.q.bits,
            group_size: q.group_size as u32,
        }
        .packed_bytes(q.out_features() as u64, q.in_features() as u64)?
        .total();
    }
    let file_bytes = fs::metadata(a.out.join("model.safetensors"))?.len();
    let (mut er, mut e) = (0.0, 0.0);
    for r in &qm.reports {
        er += r.error_rtn / r.output_norm;
        e += r.error / r.output_norm;
    }
    let n = qm.reports.len() as f64;
    println!(
        "{} {}-bit g{}{}{}: {} linears in {:.1} s; mean relative output error {:.4e} (RTN {:.4e}); linear bytes {} ; model.safetensors {} bytes -> {}",
        method.name(),
        a.q.bits,
        a.q.group_size,
        if a.q.act_order { " act-order" } else { "" },
        match opt.calibration {
            Calibration::Exact => "",
            Calibration::Bf16 if bf16::amx_available() => " (bf16 calibration, AMX)",
            Calibration::Bf16 => " (bf16 calibration, no AMX: portable loops)",
        },
        qm.reports.len(),
        wall,
        e / n,
        er / n,
        linear_bytes,
        file_bytes,
        a.out.display()
    );
    Ok(())
}
