//! run.c's attention loop, fast and slow, with identical bits.
//!
//! For query row `r` (position `pos = start + r`) and head `h`, run.c computes
//! ```text
//!   score[t] = (Σ_d q[d]·k[t][d], summed serially over d from 0) / sqrtf(D)   t = 0..=pos
//!   a        = softmax(score)                                   (run.c's softmax)
//!   out[d]   = Σ_t a[t]·v[t][d], summed serially over t from 0
//! ```
//! The slow twin is that loop verbatim: each score is a scalar dependency chain
//! of `D` adds, which no compiler may vectorize. The fast path keeps every sum in
//! the same order but vectorizes *across keys*: K is transposed once per call
//! into `kt[kv_head][d][t]`, so the update `score[t] += q[d]·kt[d][t]` for all
//! `t` at one `d` is an elementwise vector operation and `score[t]` still sees
//! `d = 0, 1, ...` in order. The transpose costs `end·kv_dim` copies, so it is
//! used only when the call has enough query rows to amortize it (prefill,
//! verification); decode keeps the scalar scores. Query rows are independent and
//! are split over rayon threads for long prefills. Both paths are compiled with
//! AVX-512 or AVX2 when the CPU has them ([`crate::simd::wide`]); Rust never fuses
//! a multiply and an add, so vector width does not change a bit.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::llama::softmax_in_place;

/// Query rows from which the transposed-K path pays for its transpose.
const TRANSPOSE_MIN_ROWS: usize = 16;
/// Query rows from which rows are split over threads.
const PARALLEL_MIN_ROWS: usize = 64;

/// The cached keys and values of one layer, read through the cache's row map.
#[derive(Clone, Copy)]
pub(crate) struct LayerKv<'a> {
    /// K rows: position `t`'s row starts at `k[offs[t]]`, `n_kv_heads · head_dim` wide.
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Row offset of every position `0..end`.
    pub offs: &'a [usize],
}

/// Head layout of the attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Which implementation computes the scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScorePath {
    /// Scalar dot products (run.c verbatim).
    Slow,
    /// Vectorized across keys over a transposed K (same bits).
    Fast,
}

/// Attention of `q [T, n_heads·D]` (query `r` at position `start + r`, seeing
/// positions `0..=start + r`) over `kv`; returns `[T, n_heads·D]`.
pub(crate) fn attention_llama2c(
    q: ArrayView2<f32>,
    kv: LayerKv<'_>,
    start: usize,
    heads: Heads,
    path: ScorePath,
) -> Array2<f32> {
    let t_len = q.nrows();
    let end = start + t_len;
    assert!(kv.offs.len() >= end, "row map covers every position");
    let q = q.as_standard_layout();
    let qs = q.as_slice().expect("standard layout");
    let qd = heads.n_heads * heads.head_dim;
    let kt = (path == ScorePath::Fast && t_len >= TRANSPOSE_MIN_ROWS)
        .then(|| transpose_keys(kv, end, heads));
    let mut out = vec![0f32; t_len * qd];
    let row = |(r, orow): (usize, &mut [f32])| {
        let mut att = vec![0f32; end];
        let qrow = &qs[r * qd..(r + 1) * qd];
        dispatch_row(
            qrow,
            kv,
            kt.as_deref(),
            start + r,
            end,
            heads,
            &mut att,
            orow,
        );
    };
    if t_len >= PARALLEL_MIN_ROWS {
        out.par_chunks_mut(qd).enumerate().for_each(row);
    } else {
        out.chunks_mut(qd).enumerate().for_each(row);
    }
    Array2::from_shape_vec((t_len, qd), out).expect("shape")
}

/// `kt[g][d][t] = k[t][g·D + d]` for positions `0..end`.
fn transpose_keys(kv: LayerKv<'_>, end: usize, h: Heads) -> Vec<f32> {
    let d = h.head_dim;
    let mut kt = vec![0f32; h.n_kv_heads * d * end];
    for t in 0..end {
        let row = &kv.k[kv.offs[t]..kv.offs[t] + h.n_kv_heads * d];
        for (i, &x) in row.iter().enumerate() {
            kt[i * end + t] = x;
        }
    }
    kt
}

/// [`row_generic`] compiled for the widest vectors the CPU has ([`crate::simd::wide`]).
#[allow(clippy::too_many_arguments)]
fn dispatch_row(
    qrow: &[f32],
    kv: LayerKv<'_>,
    kt: Option<&[f32]>,
    pos: usize,
    end: usize,
    heads: Heads,
    att: &mut [f32],
    out: &mut [f32],
) {
    crate::simd::wide(
        #[inline(always)]
        || row_generic(qrow, kv, kt, pos, end, heads, att, out),
    )
}

/// One query row, all heads: run.c's loop, with the scores from `kt` when given.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_generic(
    qrow: &[f32],
    kv: LayerKv<'_>,
    kt: Option<&[f32]>,
    pos: usize,
    end: usize,
    heads: Heads,
    att: &mut [f32],
    out: &mut [f32],
) {
    let hd = heads.head_dim;
    let kv_mul = heads.n_heads / heads.n_kv_heads;
    let div = (hd as f32).sqrt();
    for h in 0..heads.n_heads {
        let qh = &qrow[h * hd..(h + 1) * hd];
        let g = h / kv_mul;
        let koff = g * hd;
        let s = &mut att[..=pos];
        match kt {
            Some(kt) => {
                s.fill(0.0);
                for (d, &qv) in qh.iter().enumerate() {
                    let krow = &kt[(g * hd + d) * end..(g * hd + d) * end + pos + 1];
                    for (a, &k) in s.iter_mut().zip(krow) {
                        *a += qv * k;
                    }
                }
                for a in s.iter_mut() {
                    *a /= div;
                }
            }
            None => {
                for (t, a) in s.iter_mut().enumerate() {
                    let kr = &kv.k[kv.offs[t] + koff..kv.offs[t] + koff + hd];
                    let mut score = 0f32;
                    for (&qv, &k) in qh.iter().zip(kr) {
                        score += qv * k;
                    }
                    *a = score / div;
                }
            }
        }
        softmax_in_place(s);
        let xb = &mut out[h * hd..(h + 1) * hd];
        for (t, &a) in s.iter().enumerate() {
            let vr = &kv.v[kv.offs[t] + koff..kv.offs[t] + koff + hd];
            for (x, &vv) in xb.iter_mut().zip(vr) {
                *x += a * vv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// One check on both paths: the fast path equals the slow twin bit for bit,
    /// across call sizes on both sides of the transpose and thread thresholds,
    /// GQA, a cache offset (`start > 0`) and a scattered row map (paged cache).
    #[test]
    fn fast_equals_slow_bitwise() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        // (query rows, cached rows before them, heads, kv heads, head dim)
        for &(t_len, start, nh, nkv, hd) in &[
            (1, 0, 2, 1, 8),
            (1, 37, 9, 3, 64),
            (15, 3, 4, 4, 16),
            (16, 0, 9, 3, 64),
            (40, 25, 6, 2, 32),
            (97, 0, 9, 3, 64),
            (130, 7, 4, 1, 8),
        ] {
            let end = start + t_len;
            let kvd = nkv * hd;
            // Scattered rows: position t lives in slot perm[t] of a larger pool.
            let mut slots: Vec<usize> = (0..end + 5).collect();
            for i in (1..slots.len()).rev() {
                slots.swap(i, rng.random_range(0..=i));
            }
            let offs: Vec<usize> = slots[..end].iter().map(|&s| s * kvd).collect();
            let pool = (end + 5) * kvd;
            let k: Vec<f32> = (0..pool).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let v: Vec<f32> = (0..pool).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let q = Array2::from_shape_fn((t_len, nh * hd), |_| rng.random_range(-2.0f32..2.0));
            let kv = LayerKv {
                k: &k,
                v: &v,
                offs: &offs,
            };
            let heads = Heads {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
            };
            let fast = attention_llama2c(q.view(), kv, start, heads, ScorePath::Fast);
            let slow = attention_llama2c(q.view(), kv, start, heads, ScorePath::Slow);
            let same = fast
                .iter()
                .zip(&slow)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "t_len={t_len} start={start} heads={nh}/{nkv} hd={hd}");
            // The last row alone (decode) gives the batch's bits.
            let last = attention_llama2c(
                q.slice(ndarray::s![t_len - 1.., ..]),
                kv,
                end - 1,
                heads,
                ScorePath::Fast,
            );
            assert_eq!(last.row(0), fast.row(t_len - 1));
        }
    }
}
