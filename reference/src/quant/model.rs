//! Whole-model quantization: every linear of every block, in order, each
//! calibrated on the outputs of the already-quantized layers before it.
//!
//! ```text
//!   x_s = embed(sample s)                                  for each calibration sample
//!   for block l:
//!     AWQ only: for each group, search s on the full-precision block and fold it
//!               into the op before (see below)
//!     for group in [q k v] [o] [gate up] [down]:           (GPTQ's "true sequential")
//!       the group's input on every x_s, earlier groups quantized (each block stage
//!       computed once: `BlockStages`; the reference's re-run of the whole block
//!       per group is the slow twin, `InputPass::Recompute`)
//!       quantize each linear of the group (AWQ: after its clip search); put its
//!       dequantized weight back
//!     x_s = block l (fully quantized) applied to x_s
//! ```
//! GPTQ accumulates one Hessian per group (each sample one batch, as the
//! reference counts sequences); the per-layer output error before (RTN, same
//! settings) and after is measured on the same calibration inputs through that
//! Hessian: `Σ_t ‖(W − Ŵ)·x_t‖² = (n/2)·Σ_rows d·H·dᵀ`.
//!
//! AWQ's Llama folding rules (AutoAWQ `llama.py`), with the block loss each uses:
//! ```text
//!   q,k,v    ← input_layernorm          loss: attention output (o_proj of attention)
//!   o        ← v   only when v.out == o.in (no GQA); otherwise no scaling
//!   gate,up  ← post_attention_layernorm loss: MLP output
//!   down     ← up                       loss: down_proj output
//!   clipping on every linear except q and k; then zero-point group quantization
//! ```
//! Unlike AutoAWQ, which feeds each block the full-precision outputs of the block
//! before it, all three methods here feed quantized outputs forward.
//! The classifier and embeddings stay in full precision (as GPTQ and AWQ do).

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, ArrayView2, Axis};
use rayon::prelude::*;

use super::awq::{
    activation_mean, quantize_scaled, search_clip, search_scales, AwqConfig, ClipSearch,
};
use super::gptq::{self, Hessian};
use super::layer::{Calibration, LayerOptions, Method};
use super::{check_finite, rtn, Grouping, QuantizedLinear};
use crate::model::{bf16, CacheKind, Linear, Llama, MatmulPath, Proj};
use crate::{Error, Result};

/// The groups of one block, in the order they are quantized.
pub const GROUPS: [&[Proj]; 4] = [
    &[Proj::Q, Proj::K, Proj::V],
    &[Proj::O],
    &[Proj::Gate, Proj::Up],
    &[Proj::Down],
];

/// One linear layer's outcome.
#[derive(Debug, Clone)]
pub struct LinearReport {
    pub layer: usize,
    pub proj: Proj,
    pub error_rtn: f64,
    pub error: f64,
    pub output_norm: f64,
}

/// A quantized model: the model with dequantized weights in place (ready to
/// run), the codes of every linear, and the per-layer report.
#[derive(Debug, Clone)]
pub struct QuantizedModel {
    pub model: Llama,
    pub linears: BTreeMap<(usize, Proj), QuantizedLinear>,
    pub reports: Vec<LinearReport>,
}

/// Progress callback: `(linears done, linears total, layer, proj)`.
pub type Progress<'a> = dyn FnMut(usize, usize, usize, Proj) + 'a;

fn f64m(a: ArrayView2<f32>) -> Array2<f64> {
    a.mapv(f64::from)
}

/// A fresh contiguous KV cache with room for `rows` rows of block `l` only
/// (calibration runs one block per cache).
fn block_cache(m: &Llama, l: usize, rows: usize) -> Result<crate::model::KvCache> {
    let mut cache = m.try_new_cache(CacheKind::Contiguous)?;
    cache.reserve_layer(l, rows)?;
    Ok(cache)
}

/// Run block `l` on every sample, returning the inputs `proj` saw, one array per sample.
fn capture(m: &Llama, l: usize, xs: &[Array2<f32>], proj: Proj) -> Result<Vec<Array2<f32>>> {
    let mut out = Vec::with_capacity(xs.len());
    for x in xs {
        let mut cache = block_cache(m, l, x.nrows())?;
        let mut x = x.clone();
        let mut got: Option<Array2<f32>> = None;
        let mut obs = |_l: usize, p: Proj, v: ArrayView2<f32>| {
            if p == proj {
                got = Some(v.to_owned());
            }
        };
        m.layer_forward(l, &mut x, &mut cache, 0, Some(&mut obs))?;
        out.push(got.expect("every projection is observed"));
    }
    Ok(out)
}

/// o_proj's input for every sample of block `l` (the attention stage on
/// `rms(x)`), samples in parallel: what `capture(m, l, xs, Proj::O)` observes,
/// bit for bit (tested), without running the rest of the block.
fn attention_inputs(m: &Llama, l: usize, xs: &[Array2<f32>]) -> Result<Vec<Array2<f32>>> {
    let w = &m.weights().layers[l];
    xs.par_iter()
        .map(|x| {
            let xb = crate::model::rms_norm_rows(x.view(), &w.input_layernorm, m.config.rms_eps);
            let mut cache = block_cache(m, l, x.nrows())?;
            m.attention_stage(l, xb.view(), &mut cache, 0)
        })
        .collect()
}

/// Run block `l` on every sample in place.
fn advance(m: &Llama, l: usize, xs: &mut [Array2<f32>]) -> Result<()> {
    for x in xs.iter_mut() {
        let mut cache = block_cache(m, l, x.nrows())?;
        m.layer_forward(l, x, &mut cache, 0, None)?;
    }
    Ok(())
}

/// How the calibration inputs of each group are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputPass {
    /// Each stage of the block computed once per sample ([`BlockStages`]).
    Staged,
    /// The slow twin: the whole block re-run for every group (`capture`), then
    /// once more to advance; the reference code's loop.
    Recompute,
}

/// The calibration samples inside block `l`, stage by stage.
///
/// GPTQ's true-sequential order needs each group's input computed with the
/// groups before it already quantized. Re-running the block per group (the
/// reference code) costs five block passes; here every stage runs once, from
/// the weights quantized so far, and later groups start from the saved stage:
/// ```text
///   stage   computed when the group is reached        input of
///   xb      rms(x)                                    q, k, v
///   att     attention_stage(xb)  (q, k, v quantized)  o
///   h, xb2  h = x + o(att), rms(h)  (o quantized)     gate, up
///   hb      mlp_hidden_stage(xb2) (gate, up quantized) down
///   x'      h + down(hb)          (down quantized)    the next block
/// ```
/// Invariant: stages are reached in this order, each exactly once; every value
/// equals what the full block would observe at that point, bit for bit (each
/// stage is the code `Llama::layer_forward` runs).
struct BlockStages {
    l: usize,
    x: Vec<Array2<f32>>,
    /// The latest stage's outputs (the current group's inputs).
    current: Vec<Array2<f32>>,
    /// `h = x + o(att)` once the gate/up stage is reached.
    h: Vec<Array2<f32>>,
    reached: Option<Proj>,
}

impl BlockStages {
    fn new(l: usize, x: Vec<Array2<f32>>) -> Self {
        BlockStages {
            l,
            x,
            current: Vec::new(),
            h: Vec::new(),
            reached: None,
        }
    }

    /// Advance to the input of `group` (its first projection) and return it.
    fn inputs(&mut self, m: &Llama, first: Proj) -> Result<&[Array2<f32>]> {
        let (l, c) = (self.l, &m.config);
        let w = &m.weights().layers[l];
        let expected = match self.reached {
            None => Proj::Q,
            Some(Proj::Q) => Proj::O,
            Some(Proj::O) => Proj::Gate,
            Some(Proj::Gate) => Proj::Down,
            Some(p) => {
                return Err(Error::invalid(
                    "calibration",
                    format!("no stage after {p:?}"),
                ))
            }
        };
        if first != expected {
            return Err(Error::invalid(
                "calibration",
                format!("stage {first:?} reached out of order (expected {expected:?})"),
            ));
        }
        // samples in parallel (each sample's stage is independent of the others)
        self.current = match first {
            Proj::Q => self
                .x
                .par_iter()
                .map(|x| crate::model::rms_norm_rows(x.view(), &w.input_layernorm, c.rms_eps))
                .collect(),
            Proj::O => self
                .current
                .par_iter()
                .map(|xb| {
                    let mut cache = block_cache(m, l, xb.nrows())?;
                    m.attention_stage(l, xb.view(), &mut cache, 0)
                })
                .collect::<Result<_>>()?,
            Proj::Gate => {
                self.h = self
                    .x
                    .par_iter()
                    .zip(self.current.par_iter())
                    .map(|(x, att)| x + &m.linear(&w.o_proj, att.view()))
                    .collect();
                self.h
                    .par_iter()
                    .map(|h| {
                        crate::model::rms_norm_rows(
                            h.view(),
                            &w.post_attention_layernorm,
                            c.rms_eps,
                        )
                    })
                    .collect()
            }
            _ => self
                .current
                .par_iter()
                .map(|xb2| m.mlp_hidden_stage(l, xb2.view()))
                .collect(),
        };
        self.reached = Some(first);
        Ok(&self.current)
    }

    /// The block's outputs `h + down(hb)` (all groups quantized).
    fn finish(self, m: &Llama) -> Result<Vec<Array2<f32>>> {
        if self.reached != Some(Proj::Down) {
            return Err(Error::invalid(
                "calibration",
                "block finished before its last stage",
            ));
        }
        let w = &m.weights().layers[self.l];
        Ok(self
            .h
            .into_par_iter()
            .zip(self.current.par_iter())
            .map(|(h, hb)| h + &m.linear(&w.down_proj, hb.view()))
            .collect())
    }
}

/// A group's `H` as the error reports use it: f64 for [`Calibration::Exact`];
/// f32 for [`Calibration::Bf16`], whose `H` already comes from bf16 inputs
/// (relative error of f32 sums over `in` terms, ~1e-6, far below the 4e-3 of
/// the inputs' bf16 rounding). Built once per group, shared by its linears.
enum FormHessian<'h> {
    Exact(&'h Array2<f64>),
    F32(Array2<f32>),
}

impl<'h> FormHessian<'h> {
    fn new(h: &'h Hessian, calibration: Calibration) -> Self {
        match calibration {
            Calibration::Exact => FormHessian::Exact(&h.h),
            Calibration::Bf16 => FormHessian::F32(to_f32(h.h.view())),
        }
    }
}

/// `a` rounded to f32 (`as`), in parallel chunks.
fn to_f32(a: ArrayView2<f64>) -> Array2<f32> {
    let src = a.as_standard_layout();
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(1 << 14)
        .zip(src.as_slice().expect("standard layout").par_chunks(1 << 14))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &v)| *d = v as f32));
    Array2::from_shape_vec(a.dim(), out).expect("same shape")
}

/// `[W − Ŵ_rtn; W − Ŵ; W]` `[3·out, in]`, each entry the f64 value (the
/// differences taken in f64) cast by `cast`; rows in parallel.
fn stacked_diffs<T: Copy + Default + Send>(
    w: ArrayView2<f64>,
    w_rtn: ArrayView2<f64>,
    w_hat: ArrayView2<f64>,
    cast: impl Fn(f64) -> T + Sync,
) -> Array2<T> {
    let (o, n) = w.dim();
    let mut out = vec![T::default(); 3 * o * n];
    out.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(row, dst)| {
            let (part, r) = (row / o, row % o);
            let wr = w.row(r);
            match part {
                0 | 1 => {
                    let sub = if part == 0 {
                        w_rtn.row(r)
                    } else {
                        w_hat.row(r)
                    };
                    for ((d, &a), &b) in dst.iter_mut().zip(wr).zip(sub) {
                        *d = cast(a - b);
                    }
                }
                _ => {
                    for (d, &a) in dst.iter_mut().zip(wr) {
                        *d = cast(a);
                    }
                }
            }
        });
    Array2::from_shape_vec((3 * o, n), out).expect("[3·out, in] entries")
}

/// `Σ_t ‖D·x_t‖²` for each `D` of `W − Ŵ_rtn`, `W − Ŵ` and `W` (the RTN error,
/// the error, the output norm) from the Hessian `H = (2/n)·Σ x xᵀ` (n =
/// samples): `(n/2)·Σ_rows D·H·Dᵀ`, by [`quad_forms`] on the stacked `D`s in
/// [`FormHessian`]'s precision, each row's form summed in f64.
fn errors_via_hessian(
    h: &Hessian,
    forms: &FormHessian<'_>,
    w: ArrayView2<f64>,
    w_rtn: ArrayView2<f64>,
    w_hat: ArrayView2<f64>,
) -> [f64; 3] {
    let rows = w.nrows();
    let forms = match forms {
        FormHessian::Exact(h64) => {
            let d = stacked_diffs(w, w_rtn, w_hat, |v| v);
            quad_forms(d.view(), h64.view())
        }
        FormHessian::F32(h32) => {
            let d = stacked_diffs(w, w_rtn, w_hat, |v| v as f32);
            quad_forms(d.view(), h32.view())
        }
    };
    let f = h.nsamples as f64 / 2.0;
    std::array::from_fn(|i| forms[i * rows..(i + 1) * rows].iter().sum::<f64>() * f)
}

/// Column block of [`quad_forms`].
const FORM_BLOCK: usize = 128;
/// Rows per task of [`quad_forms`] (each task packs H's blocks once for its
/// rows; a row's form does not depend on the chunking).
const FORM_ROWS: usize = 192;

/// `d_r·H·d_rᵀ` for every row `d_r` of `d [m, n]`, `H [n, n]` symmetric, from
/// the blocks on and above H's block diagonal only (half the products of
/// `D·H`): with column blocks `J` of [`FORM_BLOCK`],
/// ```text
///   d·H·dᵀ = Σ_J d_J·(H_JJ·d_Jᵀ + 2·Σ_{I<J} H_IJᵀ·d_Iᵀ)
///            └ per J: Z = d_{<J}·H_{<J,J} (one product), then Σ d_J∘(2Z + d_J·H_JJ)
/// ```
/// Rows are split in fixed chunks over rayon, so the result does not depend on
/// the thread count; each row's sum over blocks is in f64. [`quad_forms_slow`]
/// is the twin (the whole `D·H`).
fn quad_forms<T>(d: ArrayView2<T>, h: ArrayView2<T>) -> Vec<f64>
where
    T: ndarray::LinalgScalar + Into<f64> + Send + Sync,
{
    let n = d.ncols();
    assert_eq!(h.dim(), (n, n), "quad_forms: H must be [n, n]");
    let mut out = vec![0f64; d.nrows()];
    let two = T::one() + T::one();
    let chunks: Vec<_> = d
        .axis_chunks_iter(Axis(0), FORM_ROWS)
        .zip(out.chunks_mut(FORM_ROWS))
        .collect();
    chunks.into_par_iter().for_each(|(dc, oc)| {
        let mut z = Array2::<T>::zeros((dc.nrows(), FORM_BLOCK));
        for j0 in (0..n).step_by(FORM_BLOCK) {
            let j1 = (j0 + FORM_BLOCK).min(n);
            let mut z = z.slice_mut(ndarray::s![.., ..j1 - j0]);
            let dj = dc.slice(ndarray::s![.., j0..j1]);
            // z = d_J·H_JJ + 2·d_{<J}·H_{<J,J}
            ndarray::linalg::general_mat_mul(
                T::one(),
                &dj,
                &h.slice(ndarray::s![j0..j1, j0..j1]),
                T::zero(),
                &mut z,
            );
            if j0 > 0 {
                ndarray::linalg::general_mat_mul(
                    two,
                    &dc.slice(ndarray::s![.., ..j0]),
                    &h.slice(ndarray::s![..j0, j0..j1]),
                    T::one(),
                    &mut z,
                );
            }
            for ((o, zr), dr) in oc.iter_mut().zip(z.rows()).zip(dj.rows()) {
                *o += zr
                    .iter()
                    .zip(dr)
                    .map(|(&a, &b)| a.into() * b.into())
                    .sum::<f64>();
            }
        }
    });
    out
}

/// The slow twin of [`quad_forms`]: the whole `D·H`, then `Σ (D·H)∘D` per row.
#[cfg(test)]
fn quad_forms_slow<T>(d: ArrayView2<T>, h: ArrayView2<T>) -> Vec<f64>
where
    T: ndarray::LinalgScalar + Into<f64>,
{
    let dh = d.dot(&h);
    dh.rows()
        .into_iter()
        .zip(d.rows())
        .map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| x.into() * y.into()).sum())
        .collect()
}

/// One group's Hessian from its calibration inputs (one sample per array):
/// the reference's running mean in f64, or bf16 products ([`Calibration::Bf16`]).
fn group_hessian(inputs: &[Array2<f32>], calibration: Calibration) -> Result<Hessian> {
    match calibration {
        Calibration::Exact => {
            let mut h = Hessian::new(inputs[0].ncols());
            for x in inputs {
                h.add_batch(f64m(x.view()).view(), 1)?;
            }
            Ok(h)
        }
        Calibration::Bf16 => {
            // A NaN or Inf input makes its own diagonal entry of the Gram
            // matrix non-finite (x² or x·0 = NaN), so the inputs are scanned
            // only then, to name the sample; a finite Gram of finite inputs
            // costs no scan (it was 2 % of a whole-model run).
            let views: Vec<_> = inputs.iter().map(|x| x.view()).collect();
            let g = bf16::gram(&views, bf16::Kernel::Fast);
            if !g.iter().all(|v| v.is_finite()) {
                for (s, x) in inputs.iter().enumerate() {
                    check_finite(&format!("calibration activations, sample {s}"), x.view())?;
                }
            }
            Hessian::from_gram(g, inputs.len())
        }
    }
}

fn set_weight(m: &mut Llama, l: usize, p: Proj, w: &Array2<f64>) {
    *m.weights_mut().layers[l].linear_mut(p) = Linear::from_weight(to_f32(w.view()).view());
}

fn weight(m: &Llama, l: usize, p: Proj) -> Array2<f64> {
    f64m(m.weights().layers[l].linear(p).weight().view())
}

/// Quantize every linear of every block of `model` calibrated on `calib` (token
/// sequences). The model is taken by value (it becomes [`QuantizedModel::model`],
/// its linears replaced block by block): a caller that still needs the original
/// passes a clone.
pub fn quantize_model(
    model: Llama,
    calib: &[Vec<u32>],
    opt: &LayerOptions,
    progress: &mut Progress<'_>,
) -> Result<QuantizedModel> {
    quantize_model_with(model, calib, opt, InputPass::Staged, progress)
}

/// [`quantize_model`] with the group inputs produced by `pass`; both passes
/// give bit-identical results (tested), `Recompute` is the slow twin.
pub fn quantize_model_with(
    model: Llama,
    calib: &[Vec<u32>],
    opt: &LayerOptions,
    pass: InputPass,
    progress: &mut Progress<'_>,
) -> Result<QuantizedModel> {
    if calib.is_empty() || calib.iter().any(|s| s.is_empty()) {
        return Err(Error::invalid(
            "calibration",
            "needs at least one non-empty sample",
        ));
    }
    let matmul = model.matmul;
    let mut m = model;
    if opt.calibration == Calibration::Bf16 {
        m.matmul = MatmulPath::Bf16;
    }
    let n_layers = m.config.n_layers;
    let total = 7 * n_layers;
    let mut done = 0;
    let mut xs: Vec<Array2<f32>> = calib.iter().map(|s| m.embed(s)).collect::<Result<_>>()?;
    let mut linears = BTreeMap::new();
    let mut reports = Vec::new();
    for l in 0..n_layers {
        // AWQ (as AutoAWQ per block): search and fold every group's scales on the
        // full-precision block first (folding into v / up must happen before those
        // are quantized), then clip and quantize group by group.
        if opt.method == Method::Awq {
            for group in GROUPS {
                let inputs = capture(&m, l, &xs, group[0])?;
                awq_group(&mut m, l, group, &inputs, &xs, opt)?;
            }
        }
        let mut stages = BlockStages::new(l, std::mem::take(&mut xs));
        let mut recomputed: Vec<Array2<f32>>;
        for group in GROUPS {
            let inputs: &[Array2<f32>] = match pass {
                InputPass::Staged => stages.inputs(&m, group[0])?,
                InputPass::Recompute => {
                    recomputed = capture(&m, l, &stages.x, group[0])?;
                    &recomputed
                }
            };
            let h = group_hessian(inputs, opt.calibration).map_err(|e| {
                Error::invalid(format!("layer {l} {}", group[0].hf_name()), e.to_string())
            })?;
            // The group's linears share H, hence GPTQ's factor of it; then they
            // are quantized in parallel (each from the same model state: a
            // group's linears do not feed each other) and applied in order.
            let factor = match opt.method {
                Method::Gptq => {
                    let cfg = spec_for(opt, h.h.nrows()).gptq_config();
                    Some(gptq::factor(&h, &cfg).map_err(|e| {
                        Error::invalid(format!("layer {l} {}", group[0].hf_name()), e.to_string())
                    })?)
                }
                _ => None,
            };
            let fit = GroupFit {
                forms: FormHessian::new(&h, opt.calibration),
                h: &h,
                factor,
            };
            // Collected whole, then the first error in group order is returned
            // (rayon's `collect::<Result<_>>` would report whichever failed first
            // in time, so the message could change from run to run).
            let done_group: Vec<Result<(QuantizedLinear, Array2<f64>, LinearReport)>> = group
                .par_iter()
                .map(|&p| {
                    quantize_one(&m, l, p, inputs, &fit, opt).map_err(|e| {
                        Error::invalid(format!("layer {l} {}", p.hf_name()), e.to_string())
                    })
                })
                .collect();
            let done_group: Vec<_> = done_group.into_iter().collect::<Result<_>>()?;
            for (&p, (q, w_hat, report)) in group.iter().zip(done_group) {
                reports.push(report);
                set_weight(&mut m, l, p, &w_hat);
                linears.insert((l, p), q);
                done += 1;
                progress(done, total, l, p);
            }
        }
        xs = match pass {
            InputPass::Staged => stages.finish(&m)?,
            InputPass::Recompute => {
                let mut xs = stages.x;
                advance(&m, l, &mut xs)?;
                xs
            }
        };
    }
    m.matmul = matmul;
    Ok(QuantizedModel {
        model: m,
        linears,
        reports,
    })
}

/// What a group's linears share: its Hessian, GPTQ's factor of it, and the
/// Hessian in the error reports' precision.
struct GroupFit<'h> {
    h: &'h Hessian,
    factor: Option<gptq::HessianFactor>,
    forms: FormHessian<'h>,
}

/// Quantize linear `p` of block `l` from the group's calibration `inputs` and
/// Hessian `h` (and GPTQ's factor of it): its codes (f16 scales, as the
/// checkpoint holds them), its dequantized weight and its report.
fn quantize_one(
    m: &Llama,
    l: usize,
    p: Proj,
    inputs: &[Array2<f32>],
    fit: &GroupFit<'_>,
    opt: &LayerOptions,
) -> Result<(QuantizedLinear, Array2<f64>, LinearReport)> {
    let (h, factored) = (fit.h, fit.factor.as_ref());
    let w = weight(m, l, p);
    let opt = &spec_for(opt, w.ncols());
    let rtn_q = rtn::quantize(w.view(), &opt.spec)?;
    let mut q = match (opt.method, factored) {
        (Method::Rtn, _) => rtn_q.clone(),
        (Method::Gptq, Some(hf)) => {
            gptq::gptq_factored(w.view(), hf, &opt.gptq_config())?.quantized
        }
        (Method::Gptq, None) => gptq::gptq(w.view(), h, &opt.gptq_config())?.quantized,
        (Method::Awq, _) => {
            let cfg = awq_cfg(opt, w.ncols())?;
            let clip = match (p, opt.awq_clip) {
                (Proj::Q | Proj::K, _) | (_, ClipSearch::Off) => None,
                _ => {
                    let x = concat_f64(inputs);
                    Some(search_clip(w.view(), x.view(), &cfg)?)
                }
            };
            quantize_scaled(w.view(), clip.as_ref(), &cfg)?
        }
    };
    // The model keeps what the checkpoint will hold: f16 scales.
    q.scales.mapv_inplace(|v| half::f16::from_f64(v).to_f64());
    let w_hat = q.dequantize();
    let [error_rtn, error, output_norm] = errors_via_hessian(
        h,
        &fit.forms,
        w.view(),
        rtn_q.dequantize().view(),
        w_hat.view(),
    );
    let report = LinearReport {
        layer: l,
        proj: p,
        error_rtn,
        error,
        output_norm,
    };
    Ok((q, w_hat, report))
}

/// The settings for one linear of input width `n`: a group size that does not
/// divide `n` falls back to the largest divisor of `n` below it (stories260K's
/// down_proj has 172 inputs: g128 → 86), recorded in the layer's codes.
pub fn spec_for(opt: &LayerOptions, n: usize) -> LayerOptions {
    let mut o = *opt;
    if let Grouping::Group(g) = opt.spec.grouping {
        if g > 0 && n % g != 0 {
            let d = (1..=g.min(n)).rev().find(|d| n % d == 0).unwrap_or(1);
            o.spec.grouping = Grouping::Group(d);
        }
    }
    o
}

fn awq_cfg(opt: &LayerOptions, n: usize) -> Result<AwqConfig> {
    let opt = &spec_for(opt, n);
    let g = match opt.spec.grouping {
        Grouping::Group(g) => g,
        Grouping::PerChannel => n,
        Grouping::PerTensor => {
            return Err(Error::invalid(
                "group_size",
                "AWQ quantizes per group or per channel",
            ))
        }
    };
    let mut cfg = AwqConfig::new(opt.spec.bits, g);
    cfg.scheme = opt.spec.scheme;
    cfg.scale_search = opt.awq_scales;
    cfg.clip = opt.awq_clip;
    Ok(cfg)
}

fn concat_f64(xs: &[Array2<f32>]) -> Array2<f64> {
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    ndarray::concatenate(Axis(0), &views)
        .expect("same widths")
        .mapv(f64::from)
}

/// Mean of squared differences over all elements of all samples.
fn mse(a: &[Array2<f64>], b: &[Array2<f64>]) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for (x, y) in a.iter().zip(b) {
        s += (x - y).mapv(|d| d * d).sum();
        n += x.len();
    }
    s / n as f64
}

/// AWQ's scale search for one group of block `l`, folded into the model.
fn awq_group(
    m: &mut Llama,
    l: usize,
    group: &[Proj],
    inputs: &[Array2<f32>],
    xs: &[Array2<f32>],
    opt: &LayerOptions,
) -> Result<()> {
    let c = m.config.clone();
    // o is scaled against v only without GQA (shapes must match).
    if group == [Proj::O] && c.n_kv_heads != c.n_heads {
        return Ok(());
    }
    let x = concat_f64(inputs);
    let x_mean = activation_mean(x.view());
    let ws: Vec<Array2<f64>> = group.iter().map(|&p| weight(m, l, p)).collect();
    let views: Vec<ArrayView2<f64>> = ws.iter().map(|w| w.view()).collect();
    let cfg = awq_cfg(opt, x.ncols())?;
    let xin: Vec<Array2<f64>> = inputs.iter().map(|v| f64m(v.view())).collect();
    let choice = match group[0] {
        Proj::Q => {
            // loss: attention output = o_proj(attention) with candidate q, k, v
            let wo = weight(m, l, Proj::O).mapv(|v| v as f32);
            let reference: Vec<Array2<f64>> = attention_inputs(m, l, xs)?
                .iter()
                .map(|a| f64m(a.dot(&wo.t()).view()))
                .collect();
            let mut trial = m.clone();
            search_scales(&x_mean, &views, &cfg, |cands| {
                for (&p, w) in group.iter().zip(cands) {
                    set_weight(&mut trial, l, p, w);
                }
                let out: Vec<Array2<f64>> = attention_inputs(&trial, l, xs)
                    .expect("same shapes as the reference pass")
                    .iter()
                    .map(|a| f64m(a.dot(&wo.t()).view()))
                    .collect();
                mse(&reference, &out)
            })?
        }
        Proj::Gate => {
            let wd = weight(m, l, Proj::Down);
            let mlp = |wg: &Array2<f64>, wu: &Array2<f64>| -> Vec<Array2<f64>> {
                xin.par_iter()
                    .map(|x| {
                        let mut g = x.dot(&wg.t());
                        let u = x.dot(&wu.t());
                        g.zip_mut_with(&u, |a, &b| *a = *a / (1.0 + (-*a).exp()) * b);
                        g.dot(&wd.t())
                    })
                    .collect()
            };
            let reference = mlp(&ws[0], &ws[1]);
            search_scales(&x_mean, &views, &cfg, |cands| {
                mse(&reference, &mlp(&cands[0], &cands[1]))
            })?
        }
        _ => {
            let reference: Vec<Array2<f64>> = xin.par_iter().map(|x| x.dot(&ws[0].t())).collect();
            search_scales(&x_mean, &views, &cfg, |cands| {
                let out: Vec<Array2<f64>> = xin.par_iter().map(|x| x.dot(&cands[0].t())).collect();
                mse(&reference, &out)
            })?
        }
    };
    fold_scales(m, l, group, &choice.scales);
    Ok(())
}

/// Multiply the group's weight columns by `s` and divide the previous op's
/// output by `s` (norm weights, or the rows of v / up), leaving the block's
/// function unchanged in exact arithmetic.
fn fold_scales(m: &mut Llama, l: usize, group: &[Proj], s: &Array1<f64>) {
    for &p in group {
        let w = weight(m, l, p) * s;
        set_weight(m, l, p, &w);
    }
    let lw = &mut m.weights_mut().layers[l];
    match group[0] {
        Proj::Q => lw
            .input_layernorm
            .iter_mut()
            .zip(s)
            .for_each(|(v, s)| *v = (*v as f64 / s) as f32),
        Proj::Gate => lw
            .post_attention_layernorm
            .iter_mut()
            .zip(s)
            .for_each(|(v, s)| *v = (*v as f64 / s) as f32),
        Proj::O | Proj::Down => {
            let prev = if group[0] == Proj::O {
                Proj::V
            } else {
                Proj::Up
            };
            let w = weight(m, l, prev);
            let w = &w / &s.view().insert_axis(Axis(1));
            set_weight(m, l, prev, &w);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::load_checkpoint;
    use crate::quant::io::{load_quantized_dir, write_quantized_dir, QuantizationConfig};
    use crate::quant::{QuantSpec, Scheme};
    use inferlab_models::assets;

    fn stories() -> Option<(inferlab_models::Checkpoint, Llama)> {
        let p = assets::require(assets::stories260k_model(), "quant model-level")?;
        let ck = load_checkpoint(p).unwrap();
        let m = Llama::from_checkpoint(&ck).unwrap();
        Some((ck, m))
    }

    fn logits(m: &Llama, toks: &[u32]) -> Array2<f32> {
        let mut c = m.new_cache(CacheKind::Contiguous);
        m.forward(&mut c, toks).unwrap()
    }

    fn calib() -> Vec<Vec<u32>> {
        (0..3)
            .map(|s| {
                (0..48)
                    .map(|i| ((i * 37 + s * 101) % 500 + 3) as u32)
                    .collect()
            })
            .collect()
    }

    /// A NaN or Inf in any sample's activations is reported with that sample
    /// by both calibrations (bf16 scans the inputs only when the Gram matrix
    /// is not finite), and finite inputs give a finite Hessian.
    /// The half-product quadratic forms equal the whole product's, in f64 and
    /// f32, within the standard bound for two sums of the same `n²` terms in
    /// different orders: `|a − b| ≤ 2·γ_n·Σ|d||H||d|` with `γ_n = n·ε/(1 − n·ε)`
    /// (ε of the product's type; each side's error is at most `γ_n` times the
    /// sum of absolute terms). Shapes cover a partial last block (n = 300) and
    /// a single block (n = 100); 70 rows make a partial row chunk.
    #[test]
    fn quad_forms_equal_the_whole_product() {
        fn check<T>(n: usize, eps: f64, cast: fn(f64) -> T)
        where
            T: ndarray::LinalgScalar + Into<f64> + Send + Sync,
        {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
            let x = Array2::from_shape_fn((2 * n, n), |_| rng.random_range(-1.0..1.0f64));
            let h = x.t().dot(&x);
            let d = Array2::from_shape_fn((70, n), |_| rng.random_range(-1.0..1.0f64));
            let (h_t, d_t) = (h.mapv(cast), d.mapv(cast));
            let fast = quad_forms(d_t.view(), h_t.view());
            let slow = quad_forms_slow(d_t.view(), h_t.view());
            let gamma = n as f64 * eps / (1.0 - n as f64 * eps);
            for (r, (f, s)) in fast.iter().zip(&slow).enumerate() {
                let da = d_t.row(r).mapv(|v| v.into().abs());
                let ha = h_t.mapv(|v| v.into().abs());
                let bound = 2.0 * gamma * da.dot(&ha).dot(&da);
                assert!(
                    (f - s).abs() <= bound,
                    "n {n} row {r}: {f} vs {s} (bound {bound:e})"
                );
                assert!(*s > 0.0, "H is positive definite");
            }
        }
        check::<f64>(300, f64::EPSILON / 2.0, |v| v);
        check::<f64>(100, f64::EPSILON / 2.0, |v| v);
        check::<f32>(300, f32::EPSILON as f64 / 2.0, |v| v as f32);
        check::<f32>(100, f32::EPSILON as f64 / 2.0, |v| v as f32);
    }

    #[test]
    fn non_finite_activations_name_their_sample() {
        let ok: Vec<Array2<f32>> = (0..3)
            .map(|s| {
                Array2::from_shape_fn((40, 70), |(i, j)| ((i * 7 + j * 3 + s) % 11) as f32 - 5.0)
            })
            .collect();
        for cal in [Calibration::Exact, Calibration::Bf16] {
            assert!(group_hessian(&ok, cal).is_ok(), "{cal:?}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut xs = ok.clone();
                xs[1][[17, 33]] = bad;
                let e = group_hessian(&xs, cal).unwrap_err().to_string();
                let want = match cal {
                    Calibration::Exact => "[17, 33]",
                    Calibration::Bf16 => "sample 1",
                };
                assert!(e.contains(want), "{cal:?} {bad}: {e}");
            }
        }
    }

    /// Folding AWQ scales into norms / v / up leaves the model's function
    /// unchanged up to f32 rounding of the rescaled weights (≈ a few ulps per
    /// weight, so logits agree to ~1e-4 relative for these O(1)-O(10) logits).
    #[test]
    fn awq_folding_preserves_the_function() {
        let Some((_, m)) = stories() else { return };
        let toks: Vec<u32> = (1..40).collect();
        let before = logits(&m, &toks);
        let mut f = m.clone();
        let h = f.config.hidden;
        let inter = f.config.intermediate;
        let s_h = Array1::from_shape_fn(h, |j| 0.5 + (j % 5) as f64 * 0.4);
        let s_i = Array1::from_shape_fn(inter, |j| 0.7 + (j % 3) as f64 * 0.3);
        fold_scales(&mut f, 0, &[Proj::Q, Proj::K, Proj::V], &s_h);
        fold_scales(&mut f, 1, &[Proj::Gate, Proj::Up], &s_h);
        fold_scales(&mut f, 2, &[Proj::Down], &s_i);
        let after = logits(&f, &toks);
        let scale = before.iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = before
            .iter()
            .zip(after.iter())
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(diff < 1e-4 * scale, "diff {diff} (max |logit| {scale})");
        // and it is a real change of weights
        assert_ne!(
            f.weights().layers[0].input_layernorm,
            m.weights().layers[0].input_layernorm
        );
    }

    /// The staged calibration pass (each block stage once) and its slow twin
    /// (the whole block re-run per group, as the reference code does) give the
    /// same codes, scales, reports and model, bit for bit, for each method.
    #[test]
    fn staged_inputs_equal_recomputed_inputs() {
        let Some((_, m)) = stories() else { return };
        for method in [Method::Rtn, Method::Gptq, Method::Awq] {
            let opt = LayerOptions::new(
                method,
                QuantSpec::new(4, Grouping::Group(32), Scheme::Asymmetric),
            );
            let run =
                |pass| quantize_model_with(m.clone(), &calib(), &opt, pass, &mut |_, _, _, _| {});
            let fast = run(InputPass::Staged).unwrap();
            let slow = run(InputPass::Recompute).unwrap();
            assert_eq!(fast.linears, slow.linears, "{method:?} codes");
            let toks: Vec<u32> = (1..30).collect();
            assert_eq!(
                logits(&fast.model, &toks),
                logits(&slow.model, &toks),
                "{method:?} model"
            );
            let bits = |q: &QuantizedModel| -> Vec<u64> {
                q.reports
                    .iter()
                    .flat_map(|r| [r.error.to_bits(), r.error_rtn.to_bits()])
                    .collect()
            };
            assert_eq!(bits(&fast), bits(&slow), "{method:?} reports");
        }
    }

    /// bf16 calibration (AMX when present) is deterministic, returns the
    /// oracle model (exact matmul path restored), and its GPTQ still beats RTN
    /// summed over the layers, as exact calibration does. A sanity bound, not a
    /// derived one: its summed relative error stays within 2x of exact
    /// calibration's (bf16 inputs move H by ~2^-8 relative, so codes may
    /// differ; a broken Hessian or forward would miss it by far).
    #[test]
    fn bf16_calibration_is_deterministic_and_fits_like_exact() {
        let Some((_, m)) = stories() else { return };
        let mut opt = LayerOptions::new(
            Method::Gptq,
            QuantSpec::new(3, Grouping::Group(32), Scheme::Asymmetric),
        );
        let exact = quantize_model(m.clone(), &calib(), &opt, &mut |_, _, _, _| {}).unwrap();
        opt.calibration = Calibration::Bf16;
        let a = quantize_model(m.clone(), &calib(), &opt, &mut |_, _, _, _| {}).unwrap();
        let b = quantize_model(m.clone(), &calib(), &opt, &mut |_, _, _, _| {}).unwrap();
        assert_eq!(a.linears, b.linears, "deterministic");
        assert_eq!(a.model.matmul, MatmulPath::Fast);
        let rel = |q: &QuantizedModel| -> (f64, f64) {
            q.reports.iter().fold((0.0, 0.0), |s, r| {
                (
                    s.0 + r.error / r.output_norm,
                    s.1 + r.error_rtn / r.output_norm,
                )
            })
        };
        let (e, er) = rel(&a);
        assert!(e < er, "bf16 GPTQ {e} vs RTN {er}");
        let (ex, _) = rel(&exact);
        assert!(e < 2.0 * ex && ex < 2.0 * e, "bf16 {e} vs exact {ex}");
    }

    /// AWQ's attention-loss inputs equal what the full block observes at o_proj.
    #[test]
    fn attention_inputs_equal_captured_o_inputs() {
        let Some((_, m)) = stories() else { return };
        let xs: Vec<Array2<f32>> = calib().iter().map(|s| m.embed(s).unwrap()).collect();
        for l in [0, m.config.n_layers - 1] {
            assert_eq!(
                attention_inputs(&m, l, &xs).unwrap(),
                capture(&m, l, &xs, Proj::O).unwrap()
            );
        }
    }

    /// The directory round trip gives the very model that was evaluated
    /// (bit-identical logits), for a GPTQ act-order and an AWQ model.
    #[test]
    fn written_directory_loads_back_bit_identical() {
        let Some((ck, m)) = stories() else { return };
        for (method, act) in [
            (Method::Gptq, crate::quant::gptq::ActOrder::On),
            (Method::Awq, crate::quant::gptq::ActOrder::Off),
        ] {
            let mut opt = LayerOptions::new(
                method,
                QuantSpec::new(3, Grouping::Group(128), Scheme::Asymmetric),
            );
            opt.act_order = act;
            let mut n = 0;
            let qm = quantize_model(m.clone(), &calib(), &opt, &mut |d, _, _, _| n = d).unwrap();
            assert_eq!(n, 35);
            // 3-bit GPTQ/AWQ lose less output than RTN summed over the layers
            let (e, er): (f64, f64) = qm.reports.iter().fold((0.0, 0.0), |a, r| {
                (
                    a.0 + r.error / r.output_norm,
                    a.1 + r.error_rtn / r.output_norm,
                )
            });
            assert!(e < er, "{method:?}: {e} vs RTN {er}");
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("q");
            let qc = QuantizationConfig {
                quant_method: "gptq".into(),
                bits: 3,
                group_size: 128,
                desc_act: act == crate::quant::gptq::ActOrder::On,
                sym: false,
                checkpoint_format: "gptq".into(),
                inferlab_method: method.name().into(),
                inferlab_rope_layout: "interleaved".into(),
                dynamic: Default::default(),
            };
            write_quantized_dir(&out, &ck, &qm, &qc).unwrap();
            let back = load_checkpoint(&out).unwrap();
            let lm = Llama::from_checkpoint(&back).unwrap();
            let toks: Vec<u32> = (1..30).collect();
            assert_eq!(logits(&lm, &toks), logits(&qm.model, &toks), "{method:?}");
            // and differs from the float model
            assert_ne!(logits(&lm, &toks), logits(&m, &toks));
        }
    }

    #[test]
    fn corrupt_directory_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"quantization_config": {}}"#,
        )
        .unwrap();
        let e = load_quantized_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("quantization_config"),
            "{e}"
        );
        let Some((ck, m)) = stories() else { return };
        let opt = LayerOptions::new(
            Method::Rtn,
            QuantSpec::new(4, Grouping::Group(64), Scheme::Asymmetric),
        );
        let qm = quantize_model(m.clone(), &calib()[..1], &opt, &mut |_, _, _, _| {}).unwrap();
        let out = dir.path().join("q");
        let qc = QuantizationConfig {
            quant_method: "gptq".into(),
            bits: 4,
            group_size: 64,
            desc_act: false,
            sym: false,
            checkpoint_format: "gptq".into(),
            inferlab_method: "rtn".into(),
            inferlab_rope_layout: "interleaved".into(),
            dynamic: Default::default(),
        };
        write_quantized_dir(&out, &ck, &qm, &qc).unwrap();
        let st = out.join("model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_checkpoint(&out).unwrap_err().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
    }
}
