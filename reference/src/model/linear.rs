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
//! in column panels of `P` outputs, each panel transposed and contiguous,
//! ```text
//!   panel p = [in, P]:  panel[p][j][c] = W[p*P + c][j]   (last panel zero-padded)
//! ```
//! so one step of `j` updates `P` consecutive outputs of `R` tokens from one
//! contiguous, vectorizable load, with the accumulators in registers and the
//! panel streamed once per block of rows. Large products are split over panels
//! with rayon (each element still sums serially, so threads change nothing).

use std::sync::OnceLock;

use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

use super::bf16::{self, Bf16Rows, Bf16Vnni};

/// Outputs per panel.
const P: usize = 16;
/// Token rows per tile in prefill.
const R: usize = 4;
/// Panels per tile for single rows (decode): 64 outputs, 8 independent
/// accumulator vectors hide the add latency.
const NP1: usize = 4;
/// Multiply-adds above which a product is split over threads.
const PARALLEL_MACS: usize = 1 << 22;

/// A linear layer without bias, stored for fast `x Wᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    out: usize,
    inp: usize,
    /// `ceil(out / P)` panels of `[in, P]`.
    panels: Vec<f32>,
    /// The weight as a bf16 operand, built on first use by [`Linear::forward_bf16`].
    bf16: Bf16Cache,
}

/// A lazily built copy of the weight in bf16; derived from the panels, so it
/// takes no part in equality.
#[derive(Clone, Default)]
struct Bf16Cache(OnceLock<Bf16Vnni>);

impl PartialEq for Bf16Cache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Bf16Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Bf16Cache(built)"
        } else {
            "Bf16Cache(empty)"
        })
    }
}

impl Linear {
    /// From a weight `[out, in]` (PyTorch / Hugging Face layout).
    pub fn from_weight(w: ArrayView2<f32>) -> Self {
        let (out, inp) = w.dim();
        let np = out.div_ceil(P);
        let mut panels = vec![0f32; np * inp * P];
        // panel p holds rows p·P.. as [in, P]: row i's values go to column
        // i % P (padding rows stay 0); panels are filled in parallel
        panels
            .par_chunks_mut((inp * P).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for ii in 0..P.min(out - p * P) {
                    for (j, &x) in w.row(p * P + ii).iter().enumerate() {
                        panel[j * P + ii] = x;
                    }
                }
            });
        Self {
            out,
            inp,
            panels,
            bf16: Bf16Cache::default(),
        }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> Array2<f32> {
        let mut w = Array2::<f32>::zeros((self.out, self.inp));
        let inp = self.inp;
        let chunks: Vec<_> = w.axis_chunks_iter_mut(Axis(0), P).enumerate().collect();
        chunks.into_par_iter().for_each(|(p, mut rows)| {
            let panel = &self.panels[p * inp * P..(p + 1) * inp * P];
            for (ii, mut row) in rows.rows_mut().into_iter().enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = panel[j * P + ii];
                }
            }
        });
        w
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
        let np = self.out.div_ceil(P);
        let padded = np * P;
        // Panels per task: a group of NP1 for decode, 1 for prefill.
        let group = if t >= R { 1 } else { NP1 };
        let n_groups = np.div_ceil(group);
        let mut y = vec![0f32; t * padded];
        let macs = t * self.inp * self.out;
        if macs >= PARALLEL_MACS && n_groups > 1 {
            let tiles: Vec<Vec<f32>> = (0..n_groups)
                .into_par_iter()
                .map(|g| {
                    let p0 = g * group;
                    let k = group.min(np - p0);
                    let mut tile = vec![0f32; t * k * P];
                    self.panels_into(xs, t, p0, k, &mut tile, k * P, 0);
                    tile
                })
                .collect();
            for (g, tile) in tiles.into_iter().enumerate() {
                let p0 = g * group;
                let w = tile.len() / t;
                for r in 0..t {
                    y[r * padded + p0 * P..r * padded + p0 * P + w]
                        .copy_from_slice(&tile[r * w..(r + 1) * w]);
                }
            }
        } else {
            for g in 0..n_groups {
                let p0 = g * group;
                let k = group.min(np - p0);
                self.panels_into(xs, t, p0, k, &mut y, padded, p0 * P);
            }
        }
        let mut y = Array2::from_shape_vec((t, padded), y).expect("shape");
        if padded != self.out {
            y = y.slice(ndarray::s![.., ..self.out]).to_owned();
        }
        y
    }

    /// Panels `p0..p0+k` for all `t` rows into `dst[r * ld + col + c]`.
    #[allow(clippy::too_many_arguments)]
    fn panels_into(
        &self,
        xs: &[f32],
        t: usize,
        p0: usize,
        k: usize,
        dst: &mut [f32],
        ld: usize,
        col: usize,
    ) {
        let n = self.inp * P;
        let pw = &self.panels[p0 * n..(p0 + k) * n];
        #[cfg(target_arch = "x86_64")]
        {
            if t >= R512 && std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { kernel_avx512(pw, self.inp, k, xs, t, dst, ld, col) };
                return;
            }
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { kernel_avx2(pw, self.inp, k, xs, t, dst, ld, col) };
                return;
            }
        }
        kernel(pw, self.inp, k, xs, t, dst, ld, col);
    }

    /// `x [T, in] -> [T, out]` with `x` and `W` rounded to bf16 and f32 sums
    /// ([`super::bf16`]; AMX tiles when present): the calibration fast path, not
    /// bit-exact. The bf16 weight is built on the first call and kept.
    pub fn forward_bf16(&self, x: ArrayView2<f32>) -> Array2<f32> {
        assert_eq!(x.ncols(), self.inp, "Linear::forward_bf16: input width");
        self.forward_bf16_rows(&Bf16Rows::new(x))
    }

    /// [`Linear::forward_bf16`] on an input already in bf16 (shared by the
    /// linears that read the same input: q, k, v; gate, up).
    pub fn forward_bf16_rows(&self, x: &Bf16Rows) -> Array2<f32> {
        bf16::matmul(x, self.bf16_weight(), bf16::Kernel::Fast)
    }

    /// The weight as a bf16 operand (built on first use, then kept).
    pub(crate) fn bf16_weight(&self) -> &Bf16Vnni {
        self.bf16
            .0
            .get_or_init(|| Bf16Vnni::from_nk(self.weight().view()))
    }

    /// `x [T, in] -> [T, out]`, slow twin: run.c's `matmul` loop verbatim
    /// (`val = 0; for j { val += w[i][j] * x[j] }`) for each row.
    pub fn forward_slow(&self, x: ArrayView2<f32>) -> Array2<f32> {
        assert_eq!(x.ncols(), self.inp, "Linear::forward_slow: input width");
        let w = self.weight();
        let mut y = Array2::zeros((x.nrows(), self.out));
        for r in 0..x.nrows() {
            for i in 0..self.out {
                let mut val = 0f32;
                for j in 0..self.inp {
                    val += w[[i, j]] * x[[r, j]];
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
unsafe fn kernel_avx2(
    pw: &[f32],
    inp: usize,
    k: usize,
    xs: &[f32],
    t: usize,
    dst: &mut [f32],
    ld: usize,
    col: usize,
) {
    // Same body compiled with 256-bit vectors. Mul and add stay separate
    // instructions (Rust never contracts to FMA), so the bits match.
    kernel(pw, inp, k, xs, t, dst, ld, col)
}

/// Token rows per tile of the AVX-512 prefill kernel: eight independent
/// accumulator vectors (one 16-lane vector per row) keep both vector ports
/// busy despite the 4-cycle add latency of each serial sum.
#[cfg(target_arch = "x86_64")]
const R512: usize = 8;

/// `k` panels times `t >= R512` rows with explicit AVX-512 vectors: one
/// 16-float panel row (`P = 16` outputs) times one broadcast input per row.
/// Every lane still computes `acc = acc + w * x` for `j = 0, 1, ...` in order
/// (separate multiply and add, no FMA), so the bits equal [`kernel`]'s and
/// run.c's. Rows left over after the 8-row tiles go through [`kernel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512(
    pw: &[f32],
    inp: usize,
    k: usize,
    xs: &[f32],
    t: usize,
    dst: &mut [f32],
    ld: usize,
    col: usize,
) {
    use std::arch::x86_64::*;
    const _: () = assert!(P == 16, "one zmm register per panel row");
    let n = inp * P;
    assert!(pw.len() >= k * n && xs.len() >= t * inp);
    let full = t - t % R512;
    for q in 0..k {
        let panel = pw[q * n..(q + 1) * n].as_ptr();
        let mut r0 = 0;
        while r0 < full {
            assert!(dst.len() >= (r0 + R512 - 1) * ld + col + q * P + P);
            let x = xs[r0 * inp..(r0 + R512) * inp].as_ptr();
            let mut acc = [_mm512_setzero_ps(); R512];
            for j in 0..inp {
                // SAFETY: j < inp, so panel row j and x[r * inp + j] are in bounds.
                let w = unsafe { _mm512_loadu_ps(panel.add(j * P)) };
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = unsafe { _mm512_set1_ps(*x.add(r * inp + j)) };
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(w, xv));
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let o = (r0 + r) * ld + col + q * P;
                // SAFETY: bounds asserted above for the last row of the tile.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(o), *a) };
            }
            r0 += R512;
        }
    }
    if full < t {
        kernel(
            pw,
            inp,
            k,
            &xs[full * inp..],
            t - full,
            &mut dst[full * ld..],
            ld,
            col,
        );
    }
}

/// `k` panels (`pw`, each `[inp, P]`) times `t` rows of `xs`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kernel(
    pw: &[f32],
    inp: usize,
    k: usize,
    xs: &[f32],
    t: usize,
    dst: &mut [f32],
    ld: usize,
    col: usize,
) {
    let n = inp * P;
    for q in 0..k {
        let panel = &pw[q * n..(q + 1) * n];
        let mut r0 = 0;
        while r0 + R <= t {
            let mut acc = [[0f32; P]; R];
            let xr: [&[f32]; R] = std::array::from_fn(|r| &xs[(r0 + r) * inp..(r0 + r + 1) * inp]);
            for (j, wrow) in panel.chunks_exact(P).enumerate() {
                let wrow: &[f32; P] = wrow.try_into().expect("P");
                for r in 0..R {
                    let xv = xr[r][j];
                    for c in 0..P {
                        acc[r][c] += wrow[c] * xv;
                    }
                }
            }
            for r in 0..R {
                let o = (r0 + r) * ld + col + q * P;
                dst[o..o + P].copy_from_slice(&acc[r]);
            }
            r0 += R;
        }
        if r0 < t && k == NP1 && q == 0 {
            // Single rows through all NP1 panels at once (decode).
            for r in r0..t {
                let x = &xs[r * inp..(r + 1) * inp];
                let mut acc = [[0f32; P]; NP1];
                for (j, &xv) in x.iter().enumerate() {
                    for (qq, a) in acc.iter_mut().enumerate() {
                        let wrow: &[f32; P] = pw[qq * n + j * P..qq * n + j * P + P]
                            .try_into()
                            .expect("P");
                        for c in 0..P {
                            a[c] += wrow[c] * xv;
                        }
                    }
                }
                for (qq, a) in acc.iter().enumerate() {
                    let o = r * ld + col + qq * P;
                    dst[o..o + P].copy_from_slice(a);
                }
            }
            return;
        }
        for r in r0..t {
            let x = &xs[r * inp..(r + 1) * inp];
            let mut acc = [0f32; P];
            for (j, &xv) in x.iter().enumerate() {
                let wrow: &[f32; P] = panel[j * P..j * P + P].try_into().expect("P");
                for c in 0..P {
                    acc[c] += wrow[c] * xv;
                }
            }
            let o = r * ld + col + q * P;
            dst[o..o + P].copy_from_slice(&acc);
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
            (8, 5, 16),    // exactly one AVX-512 tile
            (17, 70, 50),  // two tiles and a remainder row
            (23, 576, 33), // remainder through the R = 4 tiles
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
        // Parallel split: above PARALLEL_MACS, for a decode row and a prefill block.
        let w = random(&mut rng, 9000, 512);
        let lin = Linear::from_weight(w.view());
        assert!(512 * 9000 >= PARALLEL_MACS);
        for t in [1, 9] {
            let x = random(&mut rng, t, 512);
            assert_eq!(lin.forward(x.view()), lin.forward_slow(x.view()));
        }
    }
}
