//! Round-to-nearest (RTN) quantization and the group-parameter search it
//! shares with GPTQ.
//!
//! [`find_params`] is GPTQ's reference `Quantizer.find_params` (IST-DASLab/gptq
//! `quant.py`, identical in AutoGPTQ), line for line:
//! ```text
//!   xmin = min(min x, 0), xmax = max(max x, 0)          range always holds 0
//!   sym:  xmax = max(|xmin|, xmax); if xmin < 0: xmin = −xmax
//!   xmin = xmax = 0  →  xmin = −1, xmax = +1
//!   scale = (xmax − xmin) / maxq
//!   zero  = sym ? (maxq+1)/2 : round(−xmin / scale)
//!   mse:  for p = 1 − k/grid, k < maxshrink·grid: keep (scale, zero) of p·[xmin, xmax]
//!         with least Σ|x − Q(x)|^norm  (sym keeps its zero)
//! ```
//! and `Q(x) = scale·(clamp(round(x/scale) + zero, 0, maxq) − zero)` with
//! round-half-to-even (`torch.round`). Two quirks are kept on purpose: the sym
//! range `[−zero·Δ, (maxq−zero)·Δ]` is one code short on the positive side, so
//! `xmax` itself lands Δ/2 away; and a symmetric group with no negative weight
//! keeps `xmin = 0`, so its scale covers only the lower half of the codes'
//! positive reach. Both are what published GPTQ checkpoints contain.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::{check_finite, Grouping, MseSearch, QuantSpec, QuantizedLinear, Scheme};
use crate::Result;

/// `(scale, zero)` for one run of values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupParams {
    pub scale: f64,
    pub zero: f64,
}

/// The code of `x`: `clamp(round(x/scale) + zero, 0, maxq)`.
#[inline]
pub fn code(x: f64, p: GroupParams, maxq: f64) -> f64 {
    (round_even(x / p.scale) + p.zero).clamp(0.0, maxq)
}

/// `v.round_ties_even()` without a libm call (`rint` is not inlined on the
/// baseline x86-64 target): adding and subtracting 1.5·2^52 rounds to an
/// integer in the default rounding mode, exact for |v| < 2^51; larger values
/// are first clamped to ±1e15, which no code in 0..=255 can tell apart.
/// Tested equal to `round_ties_even` below.
#[inline]
pub fn round_even(v: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    let v = v.clamp(-1e15, 1e15);
    ((v + MAGIC) - MAGIC).copysign(v) // the sign of a zero result, as rint gives
}

/// `Q(x) = scale·(code − zero)`.
#[inline]
pub fn fake_quant(x: f64, p: GroupParams, maxq: f64) -> f64 {
    p.scale * (code(x, p, maxq) - p.zero)
}

/// GPTQ's `Quantizer.find_params` for one row of values (see the module doc).
pub fn find_params(x: &[f64], maxq: u32, scheme: Scheme, mse: Option<MseSearch>) -> GroupParams {
    let maxq_f = maxq as f64;
    let mut xmin = x.iter().copied().fold(f64::INFINITY, f64::min).min(0.0);
    let mut xmax = x.iter().copied().fold(f64::NEG_INFINITY, f64::max).max(0.0);
    if scheme == Scheme::Symmetric {
        xmax = xmax.max(xmin.abs());
        if xmin < 0.0 {
            xmin = -xmax;
        }
    }
    if xmin == 0.0 && xmax == 0.0 {
        xmin = -1.0;
        xmax = 1.0;
    }
    let scale = (xmax - xmin) / maxq_f;
    let sym_zero = (maxq_f + 1.0) / 2.0;
    let zero = match scheme {
        Scheme::Symmetric => sym_zero,
        Scheme::Asymmetric => (-xmin / scale).round_ties_even(),
    };
    let mut best = GroupParams { scale, zero };
    if let Some(m) = mse {
        let mut best_err = f64::INFINITY;
        let steps = (m.max_shrink * m.grid as f64) as usize;
        for i in 0..steps {
            let p = 1.0 - i as f64 / m.grid as f64;
            let (xmin1, xmax1) = (p * xmin, p * xmax);
            let scale1 = (xmax1 - xmin1) / maxq_f;
            let zero1 = match scheme {
                Scheme::Symmetric => sym_zero,
                Scheme::Asymmetric => (-xmin1 / scale1).round_ties_even(),
            };
            let cand = GroupParams {
                scale: scale1,
                zero: zero1,
            };
            let err: f64 = x
                .iter()
                .map(|&v| (fake_quant(v, cand, maxq_f) - v).abs().powf(m.norm))
                .sum();
            if err < best_err {
                best_err = err;
                best = cand;
            }
        }
    }
    best
}

/// Parameters of every (group, row) of `w` `[out, in]`: `[groups][out]`.
pub fn params_for(w: ArrayView2<f64>, spec: &QuantSpec) -> Result<Vec<Vec<GroupParams>>> {
    let maxq = spec.maxq()?;
    let (o, n) = w.dim();
    let g = spec.grouping.group_len(n)?;
    if spec.grouping == Grouping::PerTensor {
        let all: Vec<f64> = w.iter().copied().collect();
        let p = find_params(&all, maxq, spec.scheme, spec.mse);
        return Ok(vec![vec![p; o]]);
    }
    // groups in parallel (rayon keeps their order); a group of a row is
    // read in place when the row is contiguous
    Ok((0..n / g)
        .into_par_iter()
        .map(|k| {
            (0..o)
                .map(|r| {
                    let part = w.slice(ndarray::s![r, k * g..(k + 1) * g]);
                    match part.as_slice() {
                        Some(row) => find_params(row, maxq, spec.scheme, spec.mse),
                        None => find_params(&part.to_vec(), maxq, spec.scheme, spec.mse),
                    }
                })
                .collect()
        })
        .collect())
}

/// Round-to-nearest quantization of `w` `[out, in]`.
pub fn quantize(w: ArrayView2<f64>, spec: &QuantSpec) -> Result<QuantizedLinear> {
    check_finite("weight", w)?;
    let maxq = spec.maxq()? as f64;
    let (o, n) = w.dim();
    let g = spec.grouping.group_len(n)?;
    let params = params_for(w, spec)?;
    let mut codes = vec![0u8; o * n];
    codes
        .par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(r, cr)| {
            let wr = w.row(r);
            for (k, (qg, wg)) in cr.chunks_mut(g).zip(wr.exact_chunks(g)).enumerate() {
                let p = params[k][r];
                for (q, &x) in qg.iter_mut().zip(wg) {
                    *q = code(x, p, maxq) as u8;
                }
            }
        });
    let codes = Array2::from_shape_vec((o, n), codes).expect("o x n codes");
    Ok(assemble(
        codes,
        &params,
        spec.bits,
        g,
        (0..n).map(|c| (c / g) as u32).collect(),
    ))
}

/// Build a [`QuantizedLinear`] from codes and `[groups][out]` parameters.
pub(crate) fn assemble(
    codes: Array2<u8>,
    params: &[Vec<GroupParams>],
    bits: u32,
    group_size: usize,
    g_idx: Vec<u32>,
) -> QuantizedLinear {
    let o = codes.nrows();
    let groups = params.len();
    QuantizedLinear {
        bits,
        group_size,
        codes,
        scales: Array2::from_shape_fn((groups, o), |(k, r)| params[k][r].scale),
        zeros: Array2::from_shape_fn((groups, o), |(k, r)| params[k][r].zero as u8),
        g_idx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_even_equals_round_ties_even() {
        let mut cases = vec![
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.49999999999999994,
            1e15,
            -3e20,
            0.0,
            -0.0,
        ];
        cases.extend((0..20_000).map(|i| (i as f64 - 10_000.0) * 0.0137));
        for v in cases {
            let want = v.round_ties_even().clamp(-1e15, 1e15);
            assert_eq!(round_even(v).to_bits(), want.to_bits(), "{v}");
        }
        assert!(round_even(f64::NAN).is_nan());
    }
    use proptest::prelude::*;

    fn spec(bits: u32, grouping: Grouping, scheme: Scheme) -> QuantSpec {
        QuantSpec::new(bits, grouping, scheme)
    }

    #[test]
    fn find_params_matches_hand_values() {
        // asym 4-bit on [-1, 2]: scale 3/15 = 0.2, zero = round(1/0.2) = 5
        let p = find_params(&[-1.0, 0.5, 2.0], 15, Scheme::Asymmetric, None);
        assert!((p.scale - 0.2).abs() < 1e-15 && p.zero == 5.0);
        // sym 4-bit on [-1, 2]: xmax 2, xmin −2, scale 4/15, zero 8
        let p = find_params(&[-1.0, 0.5, 2.0], 15, Scheme::Symmetric, None);
        assert!((p.scale - 4.0 / 15.0).abs() < 1e-15 && p.zero == 8.0);
        // sym with no negative weight keeps xmin = 0 (reference quirk)
        let p = find_params(&[0.5, 3.0], 15, Scheme::Symmetric, None);
        assert!((p.scale - 0.2).abs() < 1e-15 && p.zero == 8.0);
        // all zeros: range [−1, 1]
        let p = find_params(&[0.0, 0.0], 3, Scheme::Asymmetric, None);
        assert!((p.scale - 2.0 / 3.0).abs() < 1e-15 && p.zero == 2.0);
        // positive-only asym: range [0, max], zero 0
        let p = find_params(&[1.0, 3.0], 3, Scheme::Asymmetric, None);
        assert!((p.scale - 1.0).abs() < 1e-15 && p.zero == 0.0);
    }

    #[test]
    fn round_half_even_like_torch() {
        let p = GroupParams {
            scale: 1.0,
            zero: 0.0,
        };
        assert_eq!(code(2.5, p, 15.0), 2.0);
        assert_eq!(code(3.5, p, 15.0), 4.0);
    }

    #[test]
    fn mse_search_never_worse_than_plain() {
        let x: Vec<f64> = (0..128)
            .map(|i| ((i * 37 % 101) as f64 - 50.0).powi(3) / 1e4)
            .collect();
        for scheme in [Scheme::Symmetric, Scheme::Asymmetric] {
            let err = |p: GroupParams| -> f64 {
                x.iter()
                    .map(|&v| (fake_quant(v, p, 7.0) - v).abs().powf(2.4))
                    .sum()
            };
            let plain = find_params(&x, 7, scheme, None);
            let mse = find_params(&x, 7, scheme, Some(MseSearch::default()));
            assert!(err(mse) <= err(plain));
            // heavy-tailed data: the search shrinks the range
            assert!(mse.scale < plain.scale, "{scheme:?}");
        }
    }

    #[test]
    fn bad_arguments() {
        let w = Array2::<f64>::zeros((4, 12));
        let check = |s: QuantSpec, needle: &str| {
            let e = quantize(w.view(), &s).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        };
        check(spec(1, Grouping::PerChannel, Scheme::Symmetric), "bits");
        check(spec(9, Grouping::PerChannel, Scheme::Symmetric), "bits");
        check(spec(4, Grouping::Group(5), Scheme::Symmetric), "group_size");
        check(spec(4, Grouping::Group(0), Scheme::Symmetric), "group_size");
        let mut w2 = w.clone();
        w2[[1, 3]] = f64::NAN;
        let e = quantize(w2.view(), &spec(4, Grouping::PerChannel, Scheme::Symmetric)).unwrap_err();
        assert!(e.to_string().contains("[1, 3]"), "{e}");
    }

    fn grouping_strategy() -> impl Strategy<Value = Grouping> {
        prop_oneof![
            Just(Grouping::PerTensor),
            Just(Grouping::PerChannel),
            Just(Grouping::Group(4)),
            Just(Grouping::Group(8)),
        ]
    }

    proptest! {
        /// Inside the clipping range `[−zero·Δ, (maxq−zero)·Δ]` the error is at most
        /// Δ/2 (plus f64 rounding of the division); without the MSE search every
        /// asymmetric weight, and every symmetric weight of a group holding a negative
        /// value, lies within Δ/2 of that range (the range covers the data).
        #[test]
        fn error_at_most_half_step(
            bits in 2u32..=8,
            grouping in grouping_strategy(),
            sym in any::<bool>(),
            vals in proptest::collection::vec(-10.0f64..10.0, 3 * 16),
        ) {
            let scheme = if sym { Scheme::Symmetric } else { Scheme::Asymmetric };
            let w = Array2::from_shape_vec((3, 16), vals).unwrap();
            let s = spec(bits, grouping, scheme);
            let q = quantize(w.view(), &s).unwrap();
            q.validate().unwrap();
            let deq = q.dequantize();
            // the fast dequantizer is its slow twin, bit for bit
            prop_assert_eq!(&deq, &q.dequantize_slow());
            let maxq = ((1u32 << bits) - 1) as f64;
            for ((r, c), &x) in w.indexed_iter() {
                let g = q.g_idx[c] as usize;
                let (d, z) = (q.scales[[g, r]], q.zeros[[g, r]] as f64);
                let (lo, hi) = (-z * d, (maxq - z) * d);
                let err = (x - deq[[r, c]]).abs();
                let tol = d / 2.0 + 1e-12 * d.max(x.abs());
                if x >= lo && x <= hi {
                    prop_assert!(err <= tol, "x {x} q {} d {d}", deq[[r, c]]);
                }
                let group_has_negative = match grouping {
                    Grouping::PerTensor => w.iter().any(|&v| v < 0.0),
                    _ => {
                        let gl = s.grouping.group_len(16).unwrap();
                        (0..gl).any(|k| w[[r, g * gl + k]] < 0.0)
                    }
                };
                if !sym || group_has_negative {
                    prop_assert!(x >= lo - tol && x <= hi + tol, "x {x} outside [{lo}, {hi}]");
                }
            }
        }
    }
}
