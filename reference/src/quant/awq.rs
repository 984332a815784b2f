//! AWQ (Lin et al., 2023) as llm-awq and AutoAWQ define it
//! (`awq/quantize/auto_scale.py`, `auto_clip.py`; AutoAWQ `quantizer.py`).
//!
//! ```text
//!   x̄_j  = mean_t |x_tj|                        per input channel
//!   w̄_j  = mean_o |w_oj| / max_group|w|          (duo scaling only)
//!   for α = k/20, k = 0..19:
//!       s = x̄^α  (duo: x̄^α / (w̄^(1−α) + 1e-4)),  clamp ≥ 1e-4,  s /= sqrt(max s · min s)
//!       loss(α) = mean (block(x; W) − block(x; Q(W·s)/s))²
//!   keep the best s; the weight becomes W·s, its input x/s (folded upstream)
//!   clip: per (row, group), m = max|w|·(1 − i/20), i = 0..9; keep the m whose
//!         clamp(w, −m, m) → Q gives the least mean-over-tokens squared group output error
//!   Q = zero-point group quantization with AWQ's own parameters:
//!       scale = max(max − min, 1e-5)/maxq, zero = clamp(−round(min/scale), 0, maxq)
//!       (unlike GPTQ's find_params the range need not contain 0)
//! ```
//! At the layer level the "block" is the one linear; [`search_scales`] takes the
//! block loss as a closure so the model level can pass a whole attention or MLP
//! block. Clipping samples at most 512 tokens (`n_sample_token`), every
//! `tokens/512`-th one, as AutoAWQ does. AutoAWQ batches output channels by 64 or
//! 256 only to bound GPU memory; the search is per (row, group) either way.

use ndarray::{s, Array1, Array2, ArrayView2, Axis};
use rayon::prelude::*;

use super::rtn::{self, GroupParams};
use super::{check_bits, check_finite, QuantizedLinear, Scheme};
use crate::{Error, Result};

/// How candidate scales are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleSearch {
    /// `s = x̄^α` (llm-awq).
    ActivationOnly,
    /// `s = x̄^α / w̄^(1−α)` (AutoAWQ's `duo_scaling`).
    Duo,
}

/// Whether the weight-clipping search runs (AutoAWQ skips it for q and k).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipSearch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwqConfig {
    pub bits: u32,
    pub group_size: usize,
    /// Zero-point (AWQ default) or symmetric.
    pub scheme: Scheme,
    pub scale_search: ScaleSearch,
    pub clip: ClipSearch,
    /// Grid points for α (20).
    pub n_grid: usize,
    /// Largest fraction the clipping search shrinks the range by (0.5).
    pub max_shrink: f64,
    /// Tokens the clipping search samples at most (512).
    pub clip_tokens: usize,
}

impl AwqConfig {
    pub fn new(bits: u32, group_size: usize) -> Self {
        AwqConfig {
            bits,
            group_size,
            scheme: Scheme::Asymmetric,
            scale_search: ScaleSearch::ActivationOnly,
            clip: ClipSearch::On,
            n_grid: 20,
            max_shrink: 0.5,
            clip_tokens: 512,
        }
    }
    fn check(&self, in_features: usize) -> Result<()> {
        check_bits(self.bits)?;
        if self.group_size == 0 || in_features % self.group_size != 0 {
            return Err(Error::invalid(
                "group_size",
                format!(
                    "{} does not divide the input dimension {in_features}",
                    self.group_size
                ),
            ));
        }
        Ok(())
    }
}

/// AWQ's `pseudo_quantize_tensor` parameters of one group, in code form
/// (`ŵ = scale·(q − zero)`; symmetric uses zero = 2^(bits−1)).
pub fn group_params(x: &[f64], bits: u32, scheme: Scheme) -> GroupParams {
    let maxq = ((1u32 << bits) - 1) as f64;
    match scheme {
        Scheme::Asymmetric => {
            let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let min = x.iter().copied().fold(f64::INFINITY, f64::min);
            let scale = (max - min).max(1e-5) / maxq;
            let zero = (-(min / scale).round_ties_even()).clamp(0.0, maxq);
            GroupParams { scale, zero }
        }
        Scheme::Symmetric => {
            let amax = x.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-5);
            let half = (1u32 << (bits - 1)) as f64;
            GroupParams {
                scale: amax / (half - 1.0),
                zero: half,
            }
        }
    }
}

/// Fake-quantize every row-group of `w` in place with AWQ's parameters.
/// (Symmetric codes clamp to `[−2^(b−1), 2^(b−1)−1]`, i.e. `[0, maxq]` after the offset.)
pub fn pseudo_quantize(w: &mut Array2<f64>, bits: u32, group: usize, scheme: Scheme) {
    let maxq = ((1u32 << bits) - 1) as f64;
    let n = w.ncols();
    if !w.is_standard_layout() {
        *w = w.as_standard_layout().into_owned();
    }
    let data = w.as_slice_mut().expect("standard layout");
    data.par_chunks_mut(n).for_each(|row| {
        for chunk in row.chunks_mut(group) {
            let p = group_params(chunk, bits, scheme);
            for v in chunk.iter_mut() {
                *v = rtn::fake_quant(*v, p, maxq);
            }
        }
    });
}

/// Per-input-channel mean |x| of `x` `[tokens, in]`.
pub fn activation_mean(x: ArrayView2<f64>) -> Array1<f64> {
    x.mapv(f64::abs)
        .mean_axis(Axis(0))
        .expect("at least one token")
}

/// AutoAWQ's `w_mean`: |w| normalised by its group's max, averaged over all rows
/// of all the weights that share the input.
pub fn weight_mean(weights: &[ArrayView2<f64>], group: usize) -> Array1<f64> {
    let n = weights[0].ncols();
    let mut acc = Array1::<f64>::zeros(n);
    let mut rows = 0usize;
    for w in weights {
        for row in w.rows() {
            for k in 0..n / group {
                let g = row.slice(s![k * group..(k + 1) * group]);
                let m = g.iter().fold(0.0f64, |m, v| m.max(v.abs())) + 1e-6;
                for (j, v) in g.iter().enumerate() {
                    acc[k * group + j] += v.abs() / m;
                }
            }
            rows += 1;
        }
    }
    acc / rows as f64
}

/// The outcome of the scale search.
#[derive(Debug, Clone)]
pub struct ScaleChoice {
    pub scales: Array1<f64>,
    pub alpha: f64,
    /// Loss at each α on the grid.
    pub history: Vec<f64>,
}

/// AWQ's grid search over α. `loss` receives the candidate effective weights
/// `Q(W·s)/s`, one per entry of `weights`, and returns the block's output MSE.
pub fn search_scales(
    x_mean: &Array1<f64>,
    weights: &[ArrayView2<f64>],
    cfg: &AwqConfig,
    mut loss: impl FnMut(&[Array2<f64>]) -> f64,
) -> Result<ScaleChoice> {
    let n = x_mean.len();
    for w in weights {
        cfg.check(w.ncols())?;
        if w.ncols() != n {
            return Err(Error::shape(
                "AWQ weight",
                format!("[_, {n}]"),
                format!("{:?}", w.dim()),
            ));
        }
    }
    let w_mean = match cfg.scale_search {
        ScaleSearch::Duo => Some(weight_mean(weights, cfg.group_size)),
        ScaleSearch::ActivationOnly => None,
    };
    let mut best: Option<(f64, f64, Array1<f64>)> = None;
    let mut history = Vec::with_capacity(cfg.n_grid);
    for k in 0..cfg.n_grid {
        let alpha = k as f64 / cfg.n_grid as f64;
        let mut s: Array1<f64> = match &w_mean {
            None => x_mean.mapv(|v| v.powf(alpha).max(1e-4)),
            Some(wm) => Array1::from_shape_fn(n, |j| {
                (x_mean[j].powf(alpha) / (wm[j].powf(1.0 - alpha) + 1e-4)).max(1e-4)
            }),
        };
        let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mn = s.iter().copied().fold(f64::INFINITY, f64::min);
        let norm = (mx * mn).sqrt();
        s.mapv_inplace(|v| {
            let r = v / norm;
            if r.is_finite() {
                r
            } else {
                1.0
            }
        });
        let cands: Vec<Array2<f64>> = weights
            .iter()
            .map(|w| {
                let mut ws = w.to_owned() * &s;
                pseudo_quantize(&mut ws, cfg.bits, cfg.group_size, cfg.scheme);
                ws / &s
            })
            .collect();
        let l = loss(&cands);
        history.push(l);
        if best.as_ref().is_none_or(|b| l < b.0) {
            best = Some((l, alpha, s));
        }
    }
    let (_, alpha, scales) = best.ok_or_else(|| Error::invalid("n_grid", "must be at least 1"))?;
    Ok(ScaleChoice {
        scales,
        alpha,
        history,
    })
}

/// Clipping search on an (already scaled) weight `w` `[out, in]` with its
/// (already scaled) inputs `x`: per (row, group) the best max |w|, `[out, groups]`.
pub fn search_clip(w: ArrayView2<f64>, x: ArrayView2<f64>, cfg: &AwqConfig) -> Result<Array2<f64>> {
    let (o, n) = w.dim();
    cfg.check(n)?;
    let g = cfg.group_size;
    let step = (x.nrows() / cfg.clip_tokens.max(1)).max(1);
    let xs = x.slice(s![..;step, ..]);
    let t = xs.nrows();
    let maxq = ((1u32 << cfg.bits) - 1) as f64;
    let steps = (cfg.max_shrink * cfg.n_grid as f64) as usize;
    let rows: Vec<Vec<f64>> = (0..o)
        .into_par_iter()
        .map(|r| {
            let mut out = vec![0.0; n / g];
            for k in 0..n / g {
                let wg = w.slice(s![r, k * g..(k + 1) * g]);
                let xg = xs.slice(s![.., k * g..(k + 1) * g]);
                let org_out = xg.dot(&wg);
                let org_max = wg.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let mut best_err = 1e9f64;
                let mut best_max = org_max;
                let mut cur = vec![0.0; g];
                for i in 0..steps {
                    let m = org_max * (1.0 - i as f64 / cfg.n_grid as f64);
                    for (c, v) in cur.iter_mut().zip(wg.iter()) {
                        *c = v.clamp(-m, m);
                    }
                    let p = group_params(&cur, cfg.bits, cfg.scheme);
                    for c in cur.iter_mut() {
                        *c = rtn::fake_quant(*c, p, maxq);
                    }
                    let q = ndarray::ArrayView1::from(&cur[..]);
                    let out_q = xg.dot(&q);
                    let err = (&out_q - &org_out).mapv(|d| d * d).sum() / t as f64;
                    if err < best_err {
                        best_err = err;
                        best_max = m;
                    }
                }
                out[k] = best_max;
            }
            out
        })
        .collect();
    Ok(Array2::from_shape_fn((o, n / g), |(r, k)| rows[r][k]))
}

/// Quantize with AWQ parameters, clamping each row-group to `±clip` first.
pub fn quantize_scaled(
    w: ArrayView2<f64>,
    clip: Option<&Array2<f64>>,
    cfg: &AwqConfig,
) -> Result<QuantizedLinear> {
    let (o, n) = w.dim();
    cfg.check(n)?;
    let g = cfg.group_size;
    let maxq = ((1u32 << cfg.bits) - 1) as f64;
    let mut codes = Array2::<u8>::zeros((o, n));
    let mut params = vec![
        vec![
            GroupParams {
                scale: 1.0,
                zero: 0.0
            };
            o
        ];
        n / g
    ];
    for r in 0..o {
        for k in 0..n / g {
            let vals: Vec<f64> = w
                .slice(s![r, k * g..(k + 1) * g])
                .iter()
                .map(|&v| match clip {
                    Some(c) => v.clamp(-c[[r, k]], c[[r, k]]),
                    None => v,
                })
                .collect();
            let p = group_params(&vals, cfg.bits, cfg.scheme);
            params[k][r] = p;
            for (j, v) in vals.iter().enumerate() {
                codes[[r, k * g + j]] = rtn::code(*v, p, maxq) as u8;
            }
        }
    }
    Ok(rtn::assemble(
        codes,
        &params,
        cfg.bits,
        g,
        (0..n).map(|c| (c / g) as u32).collect(),
    ))
}

/// AWQ of one linear layer.
#[derive(Debug, Clone)]
pub struct AwqOutcome {
    /// Codes of `W·diag(s)` (clipped): what a checkpoint stores.
    pub quantized: QuantizedLinear,
    /// Per-input-channel scales `s`; the layer's input must be divided by them
    /// (folded into the previous op at the model level).
    pub input_scales: Array1<f64>,
    pub alpha: f64,
}

impl AwqOutcome {
    /// The weight the layer effectively applies to unscaled inputs: `Q(W·s)/s`.
    pub fn effective_weight(&self) -> Array2<f64> {
        self.quantized.dequantize() / &self.input_scales
    }
}

/// AWQ on one linear layer: `w` `[out, in]`, `x` `[tokens, in]`.
pub fn awq_layer(w: ArrayView2<f64>, x: ArrayView2<f64>, cfg: &AwqConfig) -> Result<AwqOutcome> {
    check_finite("weight", w)?;
    check_finite("calibration activations", x)?;
    if x.ncols() != w.ncols() {
        return Err(Error::shape(
            "calibration activations",
            format!("[tokens, {}]", w.ncols()),
            format!("{:?}", x.dim()),
        ));
    }
    if x.nrows() == 0 {
        return Err(Error::invalid("calibration activations", "no tokens"));
    }
    let x_mean = activation_mean(x);
    let reference = x.dot(&w.t());
    let numel = reference.len() as f64;
    let choice = search_scales(&x_mean, &[w], cfg, |cands| {
        let out = x.dot(&cands[0].t());
        (&out - &reference).mapv(|d| d * d).sum() / numel
    })?;
    let s = &choice.scales;
    let ws = &w * s;
    let clip = match cfg.clip {
        ClipSearch::On => {
            let xs = &x / s;
            Some(search_clip(ws.view(), xs.view(), cfg)?)
        }
        ClipSearch::Off => None,
    };
    let quantized = quantize_scaled(ws.view(), clip.as_ref(), cfg)?;
    Ok(AwqOutcome {
        quantized,
        input_scales: choice.scales,
        alpha: choice.alpha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gptq::tests::{correlated, weights};
    use crate::quant::{output_error, Grouping, QuantSpec};

    #[test]
    fn awq_group_params_hand_values() {
        // asym 4-bit on [0.5, 2]: range need not hold 0: scale 1.5/15 = 0.1, zero = −round(5) → clamp 0
        let p = group_params(&[0.5, 1.0, 2.0], 4, Scheme::Asymmetric);
        assert!((p.scale - 0.1).abs() < 1e-15 && p.zero == 0.0);
        let p = group_params(&[-1.0, 2.0], 4, Scheme::Asymmetric);
        assert!((p.scale - 0.2).abs() < 1e-15 && p.zero == 5.0);
        let p = group_params(&[-1.0, 0.7], 4, Scheme::Symmetric);
        assert!((p.scale - 1.0 / 7.0).abs() < 1e-15 && p.zero == 8.0);
    }

    /// With activation outliers, AWQ's scaled weights give a smaller output error
    /// than RTN with the same (AWQ) quantizer; α = 0 is RTN itself, so the scale
    /// search can only match or improve it, and the clip search likewise.
    #[test]
    fn beats_rtn_and_alpha_zero_is_rtn() {
        let (o, n) = (32, 128);
        let x = correlated(512, n, 11);
        let w = weights(o, n, 12);
        for bits in [3, 4] {
            for search in [ScaleSearch::ActivationOnly, ScaleSearch::Duo] {
                let mut cfg = AwqConfig::new(bits, 32);
                cfg.scale_search = search;
                let out = awq_layer(w.view(), x.view(), &cfg).unwrap();
                let e_awq = output_error(x.view(), w.view(), out.effective_weight().view());
                let rtn = quantize_scaled(w.view(), None, &cfg).unwrap();
                let e_rtn = output_error(x.view(), w.view(), rtn.dequantize().view());
                assert!(e_awq < e_rtn, "{bits} {search:?}: awq {e_awq} rtn {e_rtn}");
                assert!(out.alpha > 0.0);
                // GPTQ's RTN (range holds 0) is the other baseline
                let g = rtn::quantize(
                    w.view(),
                    &QuantSpec::new(bits, Grouping::Group(32), Scheme::Asymmetric),
                )
                .unwrap();
                let e_g = output_error(x.view(), w.view(), g.dequantize().view());
                assert!(e_awq < e_g, "{bits}: awq {e_awq} gptq-rtn {e_g}");
            }
        }
        // α grid of one point (α = 0, s = 1) without clipping is exactly RTN
        let mut cfg = AwqConfig::new(4, 32);
        cfg.n_grid = 1;
        cfg.clip = ClipSearch::Off;
        let out = awq_layer(w.view(), x.view(), &cfg).unwrap();
        assert!(out.input_scales.iter().all(|&s| (s - 1.0).abs() < 1e-12));
        assert_eq!(
            out.quantized.codes,
            quantize_scaled(w.view(), None, &cfg).unwrap().codes
        );
    }

    /// The search's candidates include shrink 0 (no clipping), so each
    /// (row, group)'s own criterion — mean over tokens of the squared group
    /// output error — is never worse with the chosen clip; and the clip lies in
    /// [max|w|·(1 − 9/20), max|w|].
    #[test]
    fn clip_never_increases_group_error() {
        let (o, n, g) = (8, 64, 32);
        let x = correlated(300, n, 13);
        let w = weights(o, n, 14);
        let cfg = AwqConfig::new(3, g);
        let clip = search_clip(w.view(), x.view(), &cfg).unwrap();
        let with = quantize_scaled(w.view(), Some(&clip), &cfg)
            .unwrap()
            .dequantize();
        let without = quantize_scaled(w.view(), None, &cfg).unwrap().dequantize();
        let mut strictly_better = 0;
        for r in 0..o {
            for k in 0..n / g {
                let (c0, c1) = (k * g, (k + 1) * g);
                let xg = x.slice(s![.., k * g..(k + 1) * g]);
                let wg = w.slice(s![r, c0..c1]);
                let err = |q: &Array2<f64>| {
                    (xg.dot(&q.slice(s![r, c0..c1])) - xg.dot(&wg))
                        .mapv(|d| d * d)
                        .sum()
                };
                let (e1, e0) = (err(&with), err(&without));
                assert!(e1 <= e0 * (1.0 + 1e-12), "row {r} group {k}: {e1} > {e0}");
                if e1 < e0 {
                    strictly_better += 1;
                }
                let m = wg.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let c = clip[[r, k]];
                assert!(c <= m && c >= 0.55 * m - 1e-15, "clip {c} of max {m}");
            }
        }
        assert!(strictly_better > 0, "the search clipped something");
    }

    #[test]
    fn bad_inputs() {
        let w = weights(4, 16, 1);
        let x = correlated(8, 12, 1);
        assert!(awq_layer(w.view(), x.view(), &AwqConfig::new(4, 8))
            .unwrap_err()
            .to_string()
            .contains("[tokens, 16]"));
        let x = correlated(8, 16, 1);
        assert!(awq_layer(w.view(), x.view(), &AwqConfig::new(4, 5))
            .unwrap_err()
            .to_string()
            .contains("group_size"));
        assert!(awq_layer(w.view(), x.view(), &AwqConfig::new(9, 8))
            .unwrap_err()
            .to_string()
            .contains("bits"));
    }
}
