//! `y = x Wᵀ` for a PyTorch-layout weight `W [out, in]`, fast and slow.
//!
//! Both compute every output element as llama2.c's `matmul` does: a single f32
//! accumulator starting at 0, adding `W[i][j] * x[j]` for `j = 0, 1, ..., in-1`
//! in order (no FMA, no split of the sum). The results are therefore bit-identical
//! to run.c (built without `-ffast-math`), to each other, and independent of how
//! many tokens are processed at once: prefill and token-by-token decode give the
//! same bits.
//!
//! The fast path gets its speed without reordering any sum: the weight is stored
//! transposed (`wt[j * out + i] = W[i][j]`), so one step of `j` updates a tile of
//! `C` consecutive outputs for `R` tokens with contiguous, vectorizable loads;
//! the tile's accumulators live in registers. Large products are split over
//! output tiles with rayon (each element still sums serially).

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

/// A linear layer without bias, stored for fast `x Wᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    out: usize,
    inp: usize,
    /// `[in, out]`: column `i` of this is row `i` of `W`.
    wt: Vec<f32>,
}

/// Token rows per tile in prefill, output columns per tile.
const R: usize = 4;
const C: usize = 16;
/// Output columns per tile for single rows (decode).
const C1: usize = 64;
/// Multiply-adds above which a product is split over threads.
const PARALLEL_MACS: usize = 1 << 22;

impl Linear {
    /// From a weight `[out, in]` (PyTorch / Hugging Face layout).
    pub fn from_weight(w: ArrayView2<f32>) -> Self {
        let (out, inp) = w.dim();
        let mut wt = vec![0f32; out * inp];
        for ((i, j), &x) in w.indexed_iter() {
            wt[j * out + i] = x;
        }
        Self { out, inp, wt }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> Array2<f32> {
        Array2::from_shape_fn((self.out, self.inp), |(i, j)| self.wt[j * self.out + i])
    }

    pub fn out_features(&self) -> usize {
        self.out
    }
    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// `x [T, in] -> [T, out]`, fast path.
    pub fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        assert_eq!(x.ncols(), self.inp, "Linear::forward: input width");
        let t = x.nrows();
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        let mut y = vec![0f32; t * self.out];
        let macs = t * self.inp * self.out;
        // Column bands: each band owns columns [c0, c0 + band) of every row.
        let band = if t >= R { C } else { C1 };
        let n_bands = self.out.div_ceil(band);
        if macs >= PARALLEL_MACS && n_bands > 1 {
            let tiles: Vec<(usize, Vec<f32>)> = (0..n_bands)
                .into_par_iter()
                .map(|b| {
                    let c0 = b * band;
                    let w = band.min(self.out - c0);
                    let mut tile = vec![0f32; t * w];
                    self.band(xs, t, c0, w, &mut tile, w, 0);
                    (c0, tile)
                })
                .collect();
            for (c0, tile) in tiles {
                let w = tile.len() / t;
                for r in 0..t {
                    y[r * self.out + c0..r * self.out + c0 + w]
                        .copy_from_slice(&tile[r * w..(r + 1) * w]);
                }
            }
        } else {
            for b in 0..n_bands {
                let c0 = b * band;
                let w = band.min(self.out - c0);
                self.band(xs, t, c0, w, &mut y, self.out, c0);
            }
        }
        Array2::from_shape_vec((t, self.out), y).expect("shape")
    }

    /// Columns `[c0, c0 + w)` of all `t` rows into `dst[r * ld + col + c]`.
    #[allow(clippy::too_many_arguments)]
    fn band(
        &self,
        xs: &[f32],
        t: usize,
        c0: usize,
        w: usize,
        dst: &mut [f32],
        ld: usize,
        col: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { band_avx2(&self.wt, self.out, self.inp, xs, t, c0, w, dst, ld, col) };
                return;
            }
        }
        band_generic(&self.wt, self.out, self.inp, xs, t, c0, w, dst, ld, col);
    }

    /// `x [T, in] -> [T, out]`, slow twin: run.c's `matmul` loop verbatim
    /// (`val = 0; for j { val += w[i][j] * x[j] }`) for each row.
    pub fn forward_slow(&self, x: ArrayView2<f32>) -> Array2<f32> {
        assert_eq!(x.ncols(), self.inp, "Linear::forward_slow: input width");
        let mut y = Array2::zeros((x.nrows(), self.out));
        for r in 0..x.nrows() {
            for i in 0..self.out {
                let mut val = 0f32;
                for j in 0..self.inp {
                    val += self.wt[j * self.out + i] * x[[r, j]];
                }
                y[[r, i]] = val;
            }
        }
        y
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn band_avx2(
    wt: &[f32],
    out: usize,
    inp: usize,
    xs: &[f32],
    t: usize,
    c0: usize,
    w: usize,
    dst: &mut [f32],
    ld: usize,
    col: usize,
) {
    // Same body; compiled with 256-bit vectors. Mul and add stay separate
    // instructions (Rust never contracts to FMA), so the bits match the generic path.
    band_generic(wt, out, inp, xs, t, c0, w, dst, ld, col)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn band_generic(
    wt: &[f32],
    out: usize,
    inp: usize,
    xs: &[f32],
    t: usize,
    c0: usize,
    w: usize,
    tile: &mut [f32],
    ld: usize,
    col: usize,
) {
    let mut r0 = 0;
    if w == C {
        while r0 + R <= t {
            let mut acc = [[0f32; C]; R];
            for j in 0..inp {
                let wrow: &[f32; C] = wt[j * out + c0..j * out + c0 + C]
                    .try_into()
                    .expect("C columns");
                for r in 0..R {
                    let xv = xs[(r0 + r) * inp + j];
                    for c in 0..C {
                        acc[r][c] += wrow[c] * xv;
                    }
                }
            }
            for r in 0..R {
                tile[(r0 + r) * ld + col..(r0 + r) * ld + col + w].copy_from_slice(&acc[r]);
            }
            r0 += R;
        }
    }
    // Remaining rows one at a time (decode: all of them), full-width tiles of C1.
    for r in r0..t {
        let x = &xs[r * inp..(r + 1) * inp];
        let dst = &mut tile[r * ld + col..r * ld + col + w];
        if w == C1 {
            let mut acc = [0f32; C1];
            for (j, &xv) in x.iter().enumerate() {
                let wrow: &[f32; C1] = wt[j * out + c0..j * out + c0 + C1]
                    .try_into()
                    .expect("C1 columns");
                for c in 0..C1 {
                    acc[c] += wrow[c] * xv;
                }
            }
            dst.copy_from_slice(&acc);
        } else {
            dst.iter_mut().for_each(|d| *d = 0.0);
            for (j, &xv) in x.iter().enumerate() {
                let wrow = &wt[j * out + c0..j * out + c0 + w];
                for (d, &wv) in dst.iter_mut().zip(wrow) {
                    *d += wv * xv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, r: usize, c: usize) -> Array2<f32> {
        Array2::from_shape_fn((r, c), |_| rng.random_range(-1.0f32..1.0))
    }

    /// One generic check on both paths: the fast path must equal the slow twin
    /// bit for bit (same summation order), for shapes hitting every tile branch.
    #[test]
    fn fast_equals_slow_bitwise() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &(t, inp, out) in &[
            (1, 1, 1),
            (1, 64, 64),
            (1, 64, 172),
            (3, 17, 33),
            (4, 64, 16),
            (9, 37, 130),
            (33, 64, 512),
            (64, 300, 70), // 64*300*70 > parallel threshold? no; next one is
            (128, 256, 160),
        ] {
            let w = random(&mut rng, out, inp);
            let x = random(&mut rng, t, inp);
            let lin = Linear::from_weight(w.view());
            assert_eq!(lin.weight(), w);
            let fast = lin.forward(x.view());
            let slow = lin.forward_slow(x.view());
            assert_eq!(fast, slow, "shape t={t} in={inp} out={out}");
            // And each row alone gives the same bits as in the batch.
            let row = lin.forward(x.slice(ndarray::s![t - 1..t, ..]));
            assert_eq!(row.row(0), fast.row(t - 1));
        }
        // Parallel split: above PARALLEL_MACS.
        let w = random(&mut rng, 1000, 512);
        let x = random(&mut rng, 9, 512);
        let lin = Linear::from_weight(w.view());
        assert!(9 * 512 * 1000 >= PARALLEL_MACS);
        assert_eq!(lin.forward(x.view()), lin.forward_slow(x.view()));
    }
}
