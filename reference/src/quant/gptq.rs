//! GPTQ (Frantar et al., 2022) as the reference code defines it
//! (IST-DASLab/gptq `gptq.py`, AutoGPTQ `quantization/gptq.py`, GPTQModel's
//! damping retry), with its column-at-a-time slow twin [`gptq_slow`].
//!
//! ```text
//!   H = (2/n)·Σ x·xᵀ           running mean over samples  (Hessian::add_batch)
//!   dead = {i : H_ii = 0}:     H_ii = 1, W[:, i] = 0
//!   static groups:             (scale, zero) of each natural-order group, from W now
//!   act-order:                 permute columns by descending diag H (stable sort)
//!   H += percdamp·mean(diag H)·I;  U = upper Cholesky factor of H⁻¹  (UᵀU = H⁻¹)
//!   for each column i (in blocks of 128, updates beyond the block deferred):
//!       at a group start: (scale, zero) = find_params(W[:, i..i+g])
//!       q = Q(W[:, i]);  e = (W[:, i] − q) / U_ii
//!       W[:, j] −= e·U_ij  for j > i          (in block now, past it lazily: W −= E·U)
//! ```
//! Rows are independent (each output row has its own parameters and sees the
//! same `U`), so rows are split into fixed chunks over rayon.
//!
//! Deliberate differences from the reference, each harmless for group sizes
//! that are multiples of 128 (the published setting):
//! - The reference reads a group's parameters from `W`, which inside a 128-column
//!   block misses the updates of the block's earlier columns; so with `g = 64` its
//!   result depends on the block size. Here the block size is chosen so that every
//!   group is either inside one block (read from the up-to-date block copy) or
//!   starts at a block boundary; the result is then exactly the column-at-a-time
//!   algorithm's, which the slow twin checks.
//! - f64 throughout (the reference uses f32), and ties of diag H in act-order are
//!   broken by column index (`torch.argsort` is not stable).
//!
//! Damping: `percdamp` (default 0.01). If `H + damp·I` is still not positive
//! definite, [`Damping::auto_increment`] (GPTQModel's `damp_auto_increment`, default
//! 0.0025) raises `percdamp` step by step while it stays below 1; without it, or
//! when 1 is reached, the result is [`Error::Numerical`].
//!
//! All-zero calibration makes every column dead: the reference would return an
//! all-zero weight. That is a silently wrong layer, so it is an error here;
//! a partly dead input (some channels never active) follows the reference and is
//! counted in [`GptqOutcome::dead_columns`].

use ndarray::{linalg::general_mat_mul, s, Array2, ArrayView2, Axis};
use rayon::prelude::*;

use super::linalg::{par_gemm, upper_cholesky_of_inverse_damped, upper_cholesky_of_inverse_slow};
use super::rtn::{self, find_params, GroupParams};
use super::{check_finite, Grouping, QuantSpec, QuantizedLinear};
use crate::{Error, Result};

/// The running-mean Hessian `H = (2/n)·Σ x·xᵀ` of one layer's inputs.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub h: Array2<f64>,
    pub nsamples: usize,
}

impl Hessian {
    pub fn new(in_features: usize) -> Self {
        Hessian {
            h: Array2::zeros((in_features, in_features)),
            nsamples: 0,
        }
    }

    /// Add a batch of input rows `x` `[rows, in]` counting as `samples` samples
    /// (the reference counts sequences; at the layer level each token is one).
    /// `H ← H·n/(n+t) + (2/(n+t))·XᵀX`.
    pub fn add_batch(&mut self, x: ArrayView2<f64>, samples: usize) -> Result<()> {
        let n = self.h.nrows();
        if x.ncols() != n {
            return Err(Error::shape(
                "calibration activations",
                format!("[tokens, {n}]"),
                format!("{:?}", x.dim()),
            ));
        }
        check_finite("calibration activations", x)?;
        if samples == 0 {
            return Err(Error::invalid(
                "samples",
                "a batch must count at least one sample",
            ));
        }
        let total = self.nsamples + samples;
        let keep = self.nsamples as f64 / total as f64;
        let xt = x.t();
        let mut h = std::mem::replace(&mut self.h, Array2::zeros((0, 0)));
        h.mapv_inplace(|v| v * keep);
        par_gemm(2.0 / total as f64, xt, x, 1.0, h.view_mut());
        self.h = h;
        self.nsamples = total;
        Ok(())
    }

    /// `H = (2/n)·G` from a Gram matrix `G = Σ XᵀX` over `nsamples` samples
    /// (the running mean's value in exact arithmetic). `G` must be square and finite.
    pub fn from_gram(g: Array2<f64>, nsamples: usize) -> Result<Self> {
        if g.nrows() != g.ncols() {
            return Err(Error::shape(
                "Gram matrix",
                "square".to_string(),
                format!("{:?}", g.dim()),
            ));
        }
        check_finite("Gram matrix", g.view())?;
        if nsamples == 0 {
            return Err(Error::invalid(
                "samples",
                "a Hessian needs at least one sample",
            ));
        }
        let f = 2.0 / nsamples as f64;
        // scaled in place, in parallel chunks (a serial pass per group before)
        let mut h = if g.is_standard_layout() {
            g
        } else {
            g.as_standard_layout().into_owned()
        };
        h.as_slice_mut()
            .expect("standard layout")
            .par_chunks_mut(1 << 14)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= f));
        Ok(Hessian { h, nsamples })
    }
}

/// Column order for GPTQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActOrder {
    /// Natural order.
    Off,
    /// Descending `diag H` ("desc_act"), recorded in `g_idx`.
    On,
}

/// When group parameters are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupParamTiming {
    /// At each group's first column, from the partly updated weights (default).
    Dynamic,
    /// All up front from the original weights in natural order (`static_groups`),
    /// so that act-order keeps `g_idx[i] = i / g`.
    Static,
}

/// Damping of the Hessian's diagonal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Damping {
    /// Fraction of mean(diag H) added to the diagonal (reference default 0.01).
    pub percdamp: f64,
    /// Raise `percdamp` by this step while `H` is not positive definite (GPTQModel).
    pub auto_increment: Option<f64>,
}

impl Default for Damping {
    fn default() -> Self {
        Damping {
            percdamp: 0.01,
            auto_increment: Some(0.0025),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    pub spec: QuantSpec,
    pub act_order: ActOrder,
    pub timing: GroupParamTiming,
    pub damping: Damping,
    /// Lazy-batch block size (128 in the reference).
    pub block_size: usize,
}

impl GptqConfig {
    pub fn new(spec: QuantSpec) -> Self {
        GptqConfig {
            spec,
            act_order: ActOrder::Off,
            timing: GroupParamTiming::Dynamic,
            damping: Damping::default(),
            block_size: 128,
        }
    }
}

/// What GPTQ produced and how.
#[derive(Debug, Clone)]
pub struct GptqOutcome {
    pub quantized: QuantizedLinear,
    /// Input columns whose Hessian diagonal was 0 (their weights are zeroed).
    pub dead_columns: usize,
    /// The damping fraction that finally gave a positive-definite `H`.
    pub percdamp: f64,
}

/// Everything before the column loop: dead columns, static groups, permutation, `U`.
struct Prepared<'f> {
    /// Weights in processing (permuted) order.
    w: Array2<f64>,
    /// Processing position → original column.
    perm: Vec<usize>,
    /// The factor's `U`, borrowed from a shared [`HessianFactor`] (a group's
    /// linears use one; a copy per linear was a serial 1536² f64 copy).
    u: std::borrow::Cow<'f, Array2<f64>>,
    /// Per-row parameters fixed in advance: `[groups][out]` of natural-order groups
    /// (static) or one group (per channel / per tensor).
    fixed: Option<Vec<Vec<GroupParams>>>,
    group_len: usize,
    dead: usize,
    percdamp: f64,
}

/// `U` (upper, `Uᵀ·U = (H + damp·I)⁻¹`) from `H` and `damp`.
type Factor = fn(ArrayView2<f64>, f64) -> Result<Array2<f64>>;

/// The slow twin's [`Factor`]: a damped copy of `H`, then the reference's
/// three-step route.
fn factor_slow(h: ArrayView2<f64>, damp: f64) -> Result<Array2<f64>> {
    let mut hd = h.to_owned();
    hd.diag_mut().mapv_inplace(|v| v + damp);
    upper_cholesky_of_inverse_slow(hd.view())
}

/// The Hessian side of GPTQ's preparation: dead columns, column order, the
/// damping that made `H` positive definite, and `U`. It depends on `H` and the
/// config only, so linears that share an input (q, k, v; gate, up) share one
/// ([`factor`] once, [`gptq_factored`] per linear), as they share `H`; the
/// reference recomputes it per linear with the same result.
#[derive(Debug, Clone)]
pub struct HessianFactor {
    n: usize,
    dead: Vec<usize>,
    perm: Vec<usize>,
    u: Array2<f64>,
    percdamp: f64,
    act_order: ActOrder,
    damping: Damping,
}

/// Factor `hess` for GPTQ with `cfg` (see [`HessianFactor`]).
pub fn factor(hess: &Hessian, cfg: &GptqConfig) -> Result<HessianFactor> {
    factor_with(hess, cfg, upper_cholesky_of_inverse_damped)
}

fn factor_with(hess: &Hessian, cfg: &GptqConfig, factor: Factor) -> Result<HessianFactor> {
    let n = hess.h.nrows();
    if hess.h.ncols() != n {
        return Err(Error::shape(
            "Hessian",
            "square".to_string(),
            format!("{:?}", hess.h.dim()),
        ));
    }
    check_finite("Hessian", hess.h.view())?;
    if cfg.block_size == 0 {
        return Err(Error::invalid("block_size", "must be at least 1"));
    }
    let d = cfg.damping;
    if !(d.percdamp > 0.0 && d.percdamp < 1.0) {
        return Err(Error::invalid(
            "damp",
            format!("{} is not in (0, 1)", d.percdamp),
        ));
    }
    // H as given unless a dead column or act-order changes it (a copy of
    // 1536² f64 was a serial step of every group)
    let dead: Vec<usize> = (0..n).filter(|&i| hess.h[[i, i]] == 0.0).collect();
    let mut h = std::borrow::Cow::Borrowed(&hess.h);
    if !dead.is_empty() {
        let h = h.to_mut();
        for &i in &dead {
            h[[i, i]] = 1.0;
        }
    }
    if dead.len() == n {
        return Err(Error::Numerical {
            what: "GPTQ Hessian".into(),
            reason: "the calibration activations are all zero (every diagonal entry of H is 0), \
                     so GPTQ has nothing to fit; use RTN or real calibration data"
                .into(),
        });
    }
    let mut perm: Vec<usize> = (0..n).collect();
    if cfg.act_order == ActOrder::On {
        perm.sort_by(|&a, &b| h[[b, b]].total_cmp(&h[[a, a]]).then(a.cmp(&b)));
        h = std::borrow::Cow::Owned(h.select(Axis(0), &perm).select(Axis(1), &perm));
    }
    let mean_diag = h.diag().sum() / n as f64;
    let mut percdamp = d.percdamp;
    let u = loop {
        match factor(h.view(), percdamp * mean_diag) {
            Ok(u) if u.is_standard_layout() => break u,
            Ok(u) => break u.as_standard_layout().into_owned(),
            Err(Error::Numerical { reason, .. }) => match d.auto_increment {
                Some(step) if step > 0.0 && percdamp + step < 1.0 => percdamp += step,
                _ => {
                    return Err(Error::Numerical {
                        what: "GPTQ Hessian".into(),
                        reason: format!("not positive definite with percdamp {percdamp}: {reason}"),
                    })
                }
            },
            Err(e) => return Err(e),
        }
    };
    Ok(HessianFactor {
        n,
        dead,
        perm,
        u,
        percdamp,
        act_order: cfg.act_order,
        damping: cfg.damping,
    })
}

/// The weight is finite and its input dimension is the Hessian's (`h_dim`).
fn check_weight(w: ArrayView2<f64>, h_dim: (usize, usize)) -> Result<()> {
    let n = w.ncols();
    check_finite("weight", w)?;
    if h_dim != (n, n) {
        return Err(Error::shape(
            "Hessian",
            format!("[{n}, {n}] (the weight's input dimension)"),
            format!("{h_dim:?}"),
        ));
    }
    Ok(())
}

fn prepare(
    w: ArrayView2<f64>,
    hess: &Hessian,
    cfg: &GptqConfig,
    f: Factor,
) -> Result<Prepared<'static>> {
    // the weight is checked before the Hessian is factored
    check_weight(w, hess.h.dim())?;
    let hf = factor_with(hess, cfg, f)?;
    let Prepared {
        w,
        perm,
        fixed,
        group_len,
        dead,
        percdamp,
        ..
    } = prepare_checked(w, &hf, cfg)?;
    Ok(Prepared {
        w,
        perm,
        u: std::borrow::Cow::Owned(hf.u),
        fixed,
        group_len,
        dead,
        percdamp,
    })
}

/// The weight side of the preparation, on a factored Hessian.
fn prepare_with<'f>(
    w: ArrayView2<f64>,
    hf: &'f HessianFactor,
    cfg: &GptqConfig,
) -> Result<Prepared<'f>> {
    check_weight(w, (hf.n, hf.n))?;
    prepare_checked(w, hf, cfg)
}

/// [`prepare_with`] for a weight [`check_weight`] accepted.
fn prepare_checked<'f>(
    w: ArrayView2<f64>,
    hf: &'f HessianFactor,
    cfg: &GptqConfig,
) -> Result<Prepared<'f>> {
    let n = w.ncols();
    if hf.act_order != cfg.act_order || hf.damping != cfg.damping {
        return Err(Error::invalid(
            "GPTQ factor",
            "factored with another act-order or damping setting",
        ));
    }
    cfg.spec.maxq()?;
    let g = cfg.spec.grouping.group_len(n)?;
    // Per-channel / per-tensor parameters come from the weights before dead columns
    // are zeroed, as in the reference (`find_params` runs before that step).
    let mut fixed = match cfg.spec.grouping {
        Grouping::PerTensor | Grouping::PerChannel => Some(rtn::params_for(w, &cfg.spec)?),
        Grouping::Group(_) => None,
    };
    let mut w = w.to_owned();
    for &i in &hf.dead {
        w.column_mut(i).fill(0.0);
    }
    if cfg.timing == GroupParamTiming::Static && fixed.is_none() {
        fixed = Some(rtn::params_for(w.view(), &cfg.spec)?);
    }
    if cfg.act_order == ActOrder::On {
        w = w.select(Axis(1), &hf.perm);
    }
    Ok(Prepared {
        w: if w.is_standard_layout() {
            w
        } else {
            w.as_standard_layout().into_owned()
        },
        perm: hf.perm.clone(),
        u: std::borrow::Cow::Borrowed(&hf.u),
        fixed,
        group_len: g,
        dead: hf.dead.len(),
        percdamp: hf.percdamp,
    })
}

/// Parameters of processing column `i` (`pos` in permuted order) for row `r`, when fixed.
fn fixed_params(
    p: &Prepared,
    timing: GroupParamTiming,
    pos: usize,
    r: usize,
) -> Option<GroupParams> {
    let f = p.fixed.as_ref()?;
    Some(if f.len() == 1 && timing == GroupParamTiming::Dynamic {
        f[0][r]
    } else {
        f[p.perm[pos] / p.group_len][r]
    })
}

/// Codes, parameters and g_idx back in natural column order.
fn finish(
    p: &Prepared,
    cfg: &GptqConfig,
    codes_perm: Array2<u8>,
    dyn_params: Vec<Vec<GroupParams>>,
) -> GptqOutcome {
    let (o, n) = codes_perm.dim();
    let g = p.group_len;
    let mut codes = Array2::<u8>::zeros((o, n));
    for (pos, &col) in p.perm.iter().enumerate() {
        codes.column_mut(col).assign(&codes_perm.column(pos));
    }
    let (params, g_idx): (Vec<Vec<GroupParams>>, Vec<u32>) = match &p.fixed {
        Some(f) => (f.clone(), (0..n).map(|c| (c / g) as u32).collect()),
        None => {
            let mut g_idx = vec![0u32; n];
            for (pos, &col) in p.perm.iter().enumerate() {
                g_idx[col] = (pos / g) as u32;
            }
            (dyn_params, g_idx)
        }
    };
    GptqOutcome {
        quantized: rtn::assemble(codes, &params, cfg.spec.bits, g, g_idx),
        dead_columns: p.dead,
        percdamp: p.percdamp,
    }
}

/// Block size such that each dynamic group lies inside one block or starts one.
fn effective_block(cfg: &GptqConfig, g: usize, n: usize, dynamic_groups: bool) -> usize {
    let b = cfg.block_size.min(n).max(1);
    if !dynamic_groups {
        return b;
    }
    if g <= b {
        g * (b / g)
    } else {
        (1..=b).rev().find(|d| g % d == 0).unwrap_or(1)
    }
}

/// Rows per rayon task in the column loop; fixed, so output is thread-count independent.
const ROWS_PER_TASK: usize = 96;

/// GPTQ with lazy batch updates (the fast path).
pub fn gptq(w: ArrayView2<f64>, hess: &Hessian, cfg: &GptqConfig) -> Result<GptqOutcome> {
    let p = prepare(w, hess, cfg, upper_cholesky_of_inverse_damped)?;
    gptq_prepared(p, cfg)
}

/// [`gptq`] on a Hessian already factored by [`factor`] with the same
/// act-order and damping (checked); identical results.
pub fn gptq_factored(
    w: ArrayView2<f64>,
    hf: &HessianFactor,
    cfg: &GptqConfig,
) -> Result<GptqOutcome> {
    gptq_prepared(prepare_with(w, hf, cfg)?, cfg)
}

fn gptq_prepared(mut p: Prepared<'_>, cfg: &GptqConfig) -> Result<GptqOutcome> {
    let maxq = cfg.spec.maxq()?;
    let maxq_f = maxq as f64;
    let (o, n) = p.w.dim();
    let g = p.group_len;
    let dynamic = p.fixed.is_none();
    let b = effective_block(cfg, g, n, dynamic);
    let groups = n / g;
    let u = &p.u;

    let mut wp = std::mem::take(&mut p.w);
    let mut codes = Array2::<u8>::zeros((o, n));
    // [out][groups] per chunk, transposed at the end.
    let mut dyn_rows: Vec<Vec<GroupParams>> = vec![Vec::new(); o];

    let tasks: Vec<_> = wp
        .axis_chunks_iter_mut(Axis(0), ROWS_PER_TASK)
        .zip(codes.axis_chunks_iter_mut(Axis(0), ROWS_PER_TASK))
        .zip(dyn_rows.chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .collect();
    tasks
        .into_par_iter()
        .for_each(|(t, ((mut wc, mut cc), dr))| {
            // AVX-512 where the CPU has it: the row updates vectorize 8 wide
            // instead of baseline SSE2's 2, same operations in the same order
            // (Rust contracts no `a - e·u` into an FMA), so the same bits.
            crate::simd::wide(
                #[inline(always)]
                || {
                    let r0 = t * ROWS_PER_TASK;
                    let rows = wc.nrows();
                    let mut cur = vec![
                        GroupParams {
                            scale: 1.0,
                            zero: 0.0
                        };
                        rows
                    ];
                    for i1 in (0..n).step_by(b) {
                        let i2 = (i1 + b).min(n);
                        let mut w1 = wc.slice(s![.., i1..i2]).as_standard_layout().into_owned();
                        let mut err = Array2::<f64>::zeros((rows, i2 - i1));
                        for i in i1..i2 {
                            let k = i - i1;
                            let d = u[[i, i]];
                            let urow = u.slice(s![i, i..i2]);
                            let urow = urow.as_slice().expect("U rows are contiguous");
                            for r in 0..rows {
                                let prm = if dynamic {
                                    if i % g == 0 {
                                        // inside this block (g ≤ b) or starting it (g > b)
                                        let vals = if i + g <= i2 {
                                            w1.slice(s![r, k..k + g])
                                        } else {
                                            wc.slice(s![r, i..i + g])
                                        };
                                        let vals = vals.as_slice().expect("rows are contiguous");
                                        cur[r] =
                                            find_params(vals, maxq, cfg.spec.scheme, cfg.spec.mse);
                                        dr[r].push(cur[r]);
                                    }
                                    cur[r]
                                } else {
                                    fixed_params(&p, cfg.timing, i, r0 + r)
                                        .expect("fixed parameters")
                                };
                                let x = w1[[r, k]];
                                let c = rtn::code(x, prm, maxq_f);
                                cc[[r, i]] = c as u8;
                                let q = prm.scale * (c - prm.zero);
                                let e = (x - q) / d;
                                err[[r, k]] = e;
                                let mut row = w1.row_mut(r);
                                let row = row.as_slice_mut().expect("block copy is contiguous");
                                for (wv, uv) in row[k + 1..].iter_mut().zip(&urow[1..]) {
                                    *wv -= e * uv;
                                }
                            }
                        }
                        if i2 < n {
                            let mut rest = wc.slice_mut(s![.., i2..]);
                            general_mat_mul(-1.0, &err, &u.slice(s![i1..i2, i2..]), 1.0, &mut rest);
                        }
                    }
                },
            )
        });
    let dyn_params: Vec<Vec<GroupParams>> = if dynamic {
        (0..groups)
            .map(|k| (0..o).map(|r| dyn_rows[r][k]).collect())
            .collect()
    } else {
        Vec::new()
    };
    Ok(finish(&p, cfg, codes, dyn_params))
}

/// The slow twin: one column at a time, every update applied at once, the
/// reference's three-step factorization. Same result as [`gptq`] to rounding.
pub fn gptq_slow(w: ArrayView2<f64>, hess: &Hessian, cfg: &GptqConfig) -> Result<GptqOutcome> {
    let p = prepare(w, hess, cfg, factor_slow)?;
    let maxq = cfg.spec.maxq()?;
    let (o, n) = p.w.dim();
    let g = p.group_len;
    let dynamic = p.fixed.is_none();
    let mut wp = p.w.clone();
    let mut codes = Array2::<u8>::zeros((o, n));
    let mut dyn_params: Vec<Vec<GroupParams>> = Vec::new();
    let mut cur = vec![
        GroupParams {
            scale: 1.0,
            zero: 0.0
        };
        o
    ];
    for i in 0..n {
        if dynamic && i % g == 0 {
            for r in 0..o {
                let vals: Vec<f64> = wp.slice(s![r, i..i + g]).to_vec();
                cur[r] = find_params(&vals, maxq, cfg.spec.scheme, cfg.spec.mse);
            }
            dyn_params.push(cur.clone());
        }
        for r in 0..o {
            let prm = if dynamic {
                cur[r]
            } else {
                fixed_params(&p, cfg.timing, i, r).expect("fixed parameters")
            };
            let x = wp[[r, i]];
            let c = rtn::code(x, prm, maxq as f64);
            codes[[r, i]] = c as u8;
            let e = (x - prm.scale * (c - prm.zero)) / p.u[[i, i]];
            for j in i + 1..n {
                wp[[r, j]] -= e * p.u[[i, j]];
            }
        }
    }
    Ok(finish(&p, cfg, codes, dyn_params))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::quant::{output_error, Scheme};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    /// Correlated activations: x = z·M with a random mixing matrix and
    /// per-channel scales spanning two decades (outlier channels, as in LLMs).
    pub(crate) fn correlated(tokens: usize, n: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut normal = || -> f64 { StandardNormal.sample(&mut rng) };
        let z = Array2::from_shape_fn((tokens, n), |_| normal());
        let m = Array2::from_shape_fn((n, n), |(i, j)| {
            if i == j {
                1.0
            } else {
                0.3 * normal() / (n as f64).sqrt()
            }
        });
        let mut x = z.dot(&m);
        for (j, mut col) in x.columns_mut().into_iter().enumerate() {
            col *= 10f64.powf(2.0 * (j * 7 % n) as f64 / n as f64 - 1.0);
        }
        x
    }

    pub(crate) fn weights(o: usize, n: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((o, n), |_| {
            let v: f64 = StandardNormal.sample(&mut rng);
            v * 0.05
        })
    }

    fn hessian(x: &Array2<f64>) -> Hessian {
        let mut h = Hessian::new(x.ncols());
        // two batches: exercises the running mean
        let half = x.nrows() / 2;
        h.add_batch(x.slice(s![..half, ..]), half).unwrap();
        h.add_batch(x.slice(s![half.., ..]), x.nrows() - half)
            .unwrap();
        h
    }

    fn cfg(
        bits: u32,
        grouping: Grouping,
        scheme: Scheme,
        act: ActOrder,
        timing: GroupParamTiming,
    ) -> GptqConfig {
        let mut c = GptqConfig::new(QuantSpec::new(bits, grouping, scheme));
        c.act_order = act;
        c.timing = timing;
        c
    }

    #[test]
    fn running_mean_equals_batch_formula() {
        let x = correlated(50, 6, 1);
        let h = hessian(&x);
        let want = x.t().dot(&x) * (2.0 / 50.0);
        for (a, b) in h.h.iter().zip(want.iter()) {
            assert!((a - b).abs() < 1e-12 * b.abs().max(1.0));
        }
    }

    /// Lazy blocks and the column-at-a-time twin give the same codes, parameters
    /// and g_idx. Both run the same arithmetic up to summation order (≈1e-13
    /// relative), so a code could only differ if a value sat within that of a
    /// rounding boundary; dequantized weights are compared to 1e-9.
    #[test]
    fn lazy_equals_slow_twin() {
        let (o, n) = (40, 256);
        let x = correlated(400, n, 2);
        let w = weights(o, n, 3);
        let h = hessian(&x);
        let check = |c: GptqConfig, block: usize| {
            let mut c = c;
            c.block_size = block;
            let fast = gptq(w.view(), &h, &c).unwrap();
            let slow = gptq_slow(w.view(), &h, &c).unwrap();
            assert_eq!(fast.quantized.codes, slow.quantized.codes, "{c:?}");
            assert_eq!(fast.quantized.g_idx, slow.quantized.g_idx, "{c:?}");
            assert_eq!(fast.quantized.zeros, slow.quantized.zeros, "{c:?}");
            let (a, b) = (fast.quantized.dequantize(), slow.quantized.dequantize());
            let diff = a
                .iter()
                .zip(b.iter())
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-9, "{c:?}: {diff}");
        };
        use ActOrder::*;
        use GroupParamTiming::*;
        use Scheme::*;
        check(cfg(4, Grouping::Group(128), Asymmetric, Off, Dynamic), 128);
        check(cfg(4, Grouping::Group(64), Symmetric, Off, Dynamic), 128);
        check(cfg(3, Grouping::Group(32), Asymmetric, On, Dynamic), 128);
        check(cfg(3, Grouping::Group(128), Asymmetric, On, Static), 128);
        check(cfg(2, Grouping::PerChannel, Symmetric, On, Dynamic), 128);
        check(cfg(8, Grouping::PerTensor, Asymmetric, Off, Dynamic), 128);
        check(cfg(4, Grouping::Group(128), Asymmetric, On, Dynamic), 48);
        check(cfg(4, Grouping::Group(64), Asymmetric, Off, Dynamic), 100);
    }

    /// GPTQ minimizes the output error given the Hessian; on correlated data it
    /// beats RTN with the same parameters at every setting tried.
    #[test]
    fn beats_rtn_on_correlated_data() {
        let (o, n) = (32, 128);
        let x = correlated(512, n, 4);
        let w = weights(o, n, 5);
        let h = hessian(&x);
        for (bits, grouping, act) in [
            (4, Grouping::Group(32), ActOrder::Off),
            (3, Grouping::Group(64), ActOrder::On),
            (2, Grouping::PerChannel, ActOrder::Off),
            (3, Grouping::PerChannel, ActOrder::On),
        ] {
            let c = cfg(
                bits,
                grouping,
                Scheme::Asymmetric,
                act,
                GroupParamTiming::Dynamic,
            );
            let q = gptq(w.view(), &h, &c).unwrap();
            let r = rtn::quantize(w.view(), &c.spec).unwrap();
            let eg = output_error(x.view(), w.view(), q.quantized.dequantize().view());
            let er = output_error(x.view(), w.view(), r.dequantize().view());
            assert!(eg < er, "{bits} {grouping:?} {act:?}: gptq {eg} rtn {er}");
        }
    }

    /// With act-order, g_idx[perm[pos]] = pos / g: each group holds exactly g
    /// columns, and group k holds the columns with the k-th largest block of diag H.
    #[test]
    fn act_order_g_idx_is_consistent() {
        let (o, n, g) = (8, 128, 32);
        let x = correlated(300, n, 6);
        let h = hessian(&x);
        let w = weights(o, n, 7);
        let c = cfg(
            4,
            Grouping::Group(g),
            Scheme::Asymmetric,
            ActOrder::On,
            GroupParamTiming::Dynamic,
        );
        let q = gptq(w.view(), &h, &c).unwrap().quantized;
        q.validate().unwrap();
        let mut counts = vec![0; n / g];
        for &k in &q.g_idx {
            counts[k as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == g));
        let diag = h.h.diag();
        for a in 0..n {
            for b in 0..n {
                if q.g_idx[a] < q.g_idx[b] {
                    assert!(diag[a] >= diag[b]);
                }
            }
        }
        assert!(
            q.g_idx.windows(2).any(|p| p[0] != p[1] && p[0] > p[1]),
            "order is actually permuted"
        );
        // static groups keep natural g_idx
        let cs = cfg(
            4,
            Grouping::Group(g),
            Scheme::Asymmetric,
            ActOrder::On,
            GroupParamTiming::Static,
        );
        let qs = gptq(w.view(), &h, &cs).unwrap().quantized;
        assert!(qs
            .g_idx
            .iter()
            .enumerate()
            .all(|(i, &k)| k as usize == i / g));
    }

    #[test]
    fn dead_columns_follow_reference_and_all_dead_is_an_error() {
        let (o, n) = (4, 16);
        let mut x = correlated(64, n, 8);
        x.column_mut(3).fill(0.0);
        let w = weights(o, n, 9) + 1.0;
        let c = cfg(
            4,
            Grouping::Group(8),
            Scheme::Asymmetric,
            ActOrder::Off,
            GroupParamTiming::Dynamic,
        );
        let out = gptq(w.view(), &hessian(&x), &c).unwrap();
        assert_eq!(out.dead_columns, 1);
        let deq = out.quantized.dequantize();
        assert!(
            deq.column(3).iter().all(|v| v.abs() < 0.5),
            "dead column quantized from 0"
        );
        let zero = Array2::<f64>::zeros((64, n));
        let e = gptq(w.view(), &hessian(&zero), &c).unwrap_err().to_string();
        assert!(e.contains("all zero"), "{e}");
    }

    #[test]
    fn damping_retry_rescues_slightly_indefinite_h() {
        // eigenvalues 2.02 and −0.02: percdamp must exceed 0.02
        let h = Hessian {
            h: ndarray::array![[1.0, 1.02], [1.02, 1.0]],
            nsamples: 1,
        };
        let w = ndarray::array![[0.3, -0.7]];
        let mut c = cfg(
            4,
            Grouping::PerChannel,
            Scheme::Asymmetric,
            ActOrder::Off,
            GroupParamTiming::Dynamic,
        );
        c.damping.auto_increment = None;
        let e = gptq(w.view(), &h, &c).unwrap_err().to_string();
        assert!(e.contains("not positive definite"), "{e}");
        c.damping.auto_increment = Some(0.0025);
        let out = gptq(w.view(), &h, &c).unwrap();
        assert!(
            out.percdamp > 0.02 && out.percdamp < 0.0226,
            "{}",
            out.percdamp
        );
        // hopeless: eigenvalue −1 needs percdamp > 1
        let bad = Hessian {
            h: ndarray::array![[1.0, 2.0], [2.0, 1.0]],
            nsamples: 1,
        };
        assert!(gptq(w.view(), &bad, &c).is_err());
    }

    #[test]
    fn bad_inputs() {
        let w = weights(4, 16, 1);
        let h = Hessian::new(8);
        let c = cfg(
            4,
            Grouping::PerChannel,
            Scheme::Asymmetric,
            ActOrder::Off,
            GroupParamTiming::Dynamic,
        );
        assert!(gptq(w.view(), &h, &c)
            .unwrap_err()
            .to_string()
            .contains("Hessian"));
        let mut hh = Hessian::new(16);
        let mut x = correlated(10, 16, 1);
        assert!(hh.add_batch(x.slice(s![.., ..8]), 10).is_err());
        x[[2, 5]] = f64::INFINITY;
        assert!(hh
            .add_batch(x.view(), 10)
            .unwrap_err()
            .to_string()
            .contains("[2, 5]"));
    }
}
