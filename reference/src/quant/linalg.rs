//! Dense f64 linear algebra for GPTQ: Cholesky, triangular inverse, and the
//! upper Cholesky factor of `H⁻¹`, each fast (blocked on matrix products, rows
//! split over rayon) with its textbook slow twin beside it.
//!
//! GPTQ's reference computes `U = chol(cholesky_inverse(chol(H)), upper)`, three
//! O(n³) steps. The same `U` (the factor with positive diagonal is unique) comes
//! from one Cholesky and one triangular inverse by reversing the index order
//! (`J` = the reversal permutation):
//! ```text
//!   J·H·J = L·Lᵀ  ⇒  H = (J·L·J)(J·L·J)ᵀ = Ũ·Ũᵀ, Ũ upper
//!   H⁻¹ = Ũ⁻ᵀ·Ũ⁻¹ = Uᵀ·U  with  U = Ũ⁻¹ = J·L⁻¹·J
//! ```
//! [`upper_cholesky_of_inverse_slow`] is the reference's three-step route; the
//! tests hold the two together.
//!
//! Products go through `ndarray`'s `general_mat_mul` (matrixmultiply's dgemm) on
//! fixed row chunks, so the result does not depend on the thread count.

use ndarray::{linalg::general_mat_mul, s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use crate::{Error, Result};

/// Rows per parallel task in [`par_gemm`]; fixed so results are thread-count independent.
const ROW_CHUNK: usize = 64;
/// Panel width of the blocked Cholesky and base size of the recursive inverse.
const BLOCK: usize = 128;

/// `C = alpha·A·B + beta·C`, rows of `A`/`C` split into fixed chunks over rayon
/// (f64 for GPTQ; f32 for the bf16 calibration mode's error reports).
pub fn par_gemm<T: ndarray::LinalgScalar + Send + Sync>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
    c: ArrayViewMut2<T>,
) {
    let mut c = c;
    let chunks: Vec<(ArrayView2<T>, ArrayViewMut2<T>)> = a
        .axis_chunks_iter(Axis(0), ROW_CHUNK)
        .zip(c.axis_chunks_iter_mut(Axis(0), ROW_CHUNK))
        .collect();
    chunks
        .into_par_iter()
        .for_each(|(ac, mut cc)| general_mat_mul(alpha, &ac, &b, beta, &mut cc));
}

fn not_pd(what: &str, j: usize, v: f64) -> Error {
    Error::Numerical {
        what: what.to_string(),
        reason: format!("matrix is not positive definite (pivot {j} is {v:e})"),
    }
}

/// Textbook Cholesky–Crout: lower `L` with `L·Lᵀ = a`.
pub fn cholesky_slow(a: ArrayView2<f64>) -> Result<Array2<f64>> {
    let n = a.nrows();
    let mut l = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let mut d = a[[j, j]];
        for k in 0..j {
            d -= l[[j, k]] * l[[j, k]];
        }
        if !(d > 0.0) || !d.is_finite() {
            return Err(not_pd("cholesky", j, d));
        }
        let d = d.sqrt();
        l[[j, j]] = d;
        for i in j + 1..n {
            let mut v = a[[i, j]];
            for k in 0..j {
                v -= l[[i, k]] * l[[j, k]];
            }
            l[[i, j]] = v / d;
        }
    }
    Ok(l)
}

/// Blocked right-looking Cholesky: per panel of [`BLOCK`] columns, factor the
/// diagonal block ([`cholesky_base`]), solve the panel below it with the
/// block's inverse, and subtract the panel's outer product from the trailing
/// matrix (gemm). [`cholesky_in_place`] with the upper triangle zeroed.
pub fn cholesky(a: ArrayView2<f64>) -> Result<Array2<f64>> {
    let mut l = a.to_owned();
    cholesky_in_place(&mut l)?;
    for (i, mut row) in l.rows_mut().into_iter().enumerate() {
        row.slice_mut(s![i + 1..]).fill(0.0);
    }
    Ok(l)
}

/// [`cholesky`] in the lower triangle of `w` (diagonal included), reading
/// only that triangle; the entries above the diagonal are left unspecified.
/// No copy of the matrix: the factor is the serial step of GPTQ's
/// preparation, and its copies were a third of it.
pub fn cholesky_in_place(w: &mut Array2<f64>) -> Result<()> {
    let n = w.nrows();
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + BLOCK).min(n);
        let l11 = cholesky_base(w.slice(s![j0..j1, j0..j1])).map_err(|e| match e {
            Error::Numerical { reason, .. } => Error::Numerical {
                what: "cholesky".into(),
                reason: format!("{reason} (block at {j0})"),
            },
            e => e,
        })?;
        w.slice_mut(s![j0..j1, j0..j1]).assign(&l11);
        if j1 < n {
            let inv_t = tri_inverse_base(l11.view()).reversed_axes();
            // L21 = A21 · L11⁻ᵀ
            let mut l21 = Array2::<f64>::zeros((n - j1, j1 - j0));
            par_gemm(
                1.0,
                w.slice(s![j1.., j0..j1]),
                inv_t.view(),
                0.0,
                l21.view_mut(),
            );
            // A22 −= L21 · L21ᵀ, on and below the diagonal only (the later
            // panels read nothing above it): per column block c0..c1, rows c0..
            // — half the products of the full update, each entry computed as
            // the full product would (same operands, same k order). One task
            // per column block, one product each (row chunks of a block gave
            // the same entries from many small products, a third of whose time
            // went to packing operands).
            let l21t = l21.t();
            let mut tail = w.slice_mut(s![j1.., j1..]);
            let blocks: Vec<_> = tail
                .axis_chunks_iter_mut(Axis(1), BLOCK)
                .enumerate()
                .collect();
            blocks.into_par_iter().for_each(|(b, cols)| {
                let (c0, c1) = (b * BLOCK, b * BLOCK + cols.ncols());
                let mut dst = cols.slice_move(s![c0.., ..]);
                general_mat_mul(
                    -1.0,
                    &l21.slice(s![c0.., ..]),
                    &l21t.slice(s![.., c0..c1]),
                    1.0,
                    &mut dst,
                );
            });
            w.slice_mut(s![j1.., j0..j1]).assign(&l21);
        }
        j0 = j1;
    }
    Ok(())
}

/// Inverse of a lower-triangular matrix by forward substitution, column by column.
pub fn tri_inverse_lower_slow(l: ArrayView2<f64>) -> Array2<f64> {
    let n = l.nrows();
    let mut m = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        m[[j, j]] = 1.0 / l[[j, j]];
        for i in j + 1..n {
            let mut v = 0.0;
            for k in j..i {
                v += l[[i, k]] * m[[k, j]];
            }
            m[[i, j]] = -v / l[[i, i]];
        }
    }
    m
}

/// [`cholesky_slow`] on row slices: the same operations in the same order
/// (each sum runs over `k` upward), so the same bits (tested), without
/// per-entry index arithmetic. The blocked [`cholesky`] runs it on each
/// diagonal block, one after another: it is the serial part of the factor.
fn cholesky_base(a: ArrayView2<f64>) -> Result<Array2<f64>> {
    let n = a.nrows();
    let mut l = vec![0f64; n * n];
    for j in 0..n {
        let mut d = a[[j, j]];
        for &v in &l[j * n..j * n + j] {
            d -= v * v;
        }
        if !(d > 0.0) || !d.is_finite() {
            return Err(not_pd("cholesky", j, d));
        }
        let d = d.sqrt();
        l[j * n + j] = d;
        // the rows below j, from their own prefix and row j's (final now)
        let (head, below) = l.split_at_mut((j + 1) * n);
        let lj = &head[j * n..j * n + j];
        for (r, li) in below.chunks_exact_mut(n).enumerate() {
            let mut v = a[[j + 1 + r, j]];
            for (&x, &y) in li[..j].iter().zip(lj) {
                v -= x * y;
            }
            li[j] = v / d;
        }
    }
    Ok(Array2::from_shape_vec((n, n), l).expect("[n, n] entries"))
}

/// [`tri_inverse_lower_slow`] on row slices: column `j` of the inverse is
/// built as row `j` of its transpose, so both operands of each sum are
/// contiguous; the same operations in the same order, so the same bits.
fn tri_inverse_base(l: ArrayView2<f64>) -> Array2<f64> {
    let n = l.nrows();
    let l = l.as_standard_layout();
    let l = l.as_slice().expect("standard layout");
    let mut mt = vec![0f64; n * n];
    for j in 0..n {
        let col = &mut mt[j * n..(j + 1) * n];
        col[j] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            let li = &l[i * n..i * n + n];
            let mut v = 0.0;
            for (&x, &y) in li[j..i].iter().zip(&col[j..i]) {
                v += x * y;
            }
            col[i] = -v / li[i];
        }
    }
    Array2::from_shape_vec((n, n), mt)
        .expect("[n, n] entries")
        .reversed_axes()
        .as_standard_layout()
        .into_owned()
}

/// Recursive inverse of a lower-triangular matrix:
/// `[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹·B·A⁻¹, C⁻¹]]`.
pub fn tri_inverse_lower(l: ArrayView2<f64>) -> Array2<f64> {
    let n = l.nrows();
    if n <= BLOCK {
        return tri_inverse_base(l);
    }
    let h = n / 2;
    let (ai, ci) = rayon::join(
        || tri_inverse_lower(l.slice(s![..h, ..h])),
        || tri_inverse_lower(l.slice(s![h.., h..])),
    );
    let mut ba = Array2::<f64>::zeros((n - h, h));
    par_gemm(1.0, l.slice(s![h.., ..h]), ai.view(), 0.0, ba.view_mut());
    let mut m = Array2::<f64>::zeros((n, n));
    par_gemm(-1.0, ci.view(), ba.view(), 0.0, m.slice_mut(s![h.., ..h]));
    m.slice_mut(s![..h, ..h]).assign(&ai);
    m.slice_mut(s![h.., h..]).assign(&ci);
    m
}

/// Upper `U` with `Uᵀ·U = H⁻¹` by the reversal identity (module doc).
pub fn upper_cholesky_of_inverse(h: ArrayView2<f64>) -> Result<Array2<f64>> {
    upper_cholesky_of_inverse_damped(h, 0.0)
}

/// [`upper_cholesky_of_inverse`] of `H + damp·I` (GPTQ's damping), `H` read
/// once: `J·H·J` is built in one parallel pass and damped on its diagonal,
/// factored in place, inverted, and reversed back in one more pass. The same bits as damping a copy
/// of `H` first (the same additions), and as [`upper_cholesky_of_inverse`]
/// for `damp = 0` (`x + 0 = x` for the positive diagonal).
pub fn upper_cholesky_of_inverse_damped(h: ArrayView2<f64>, damp: f64) -> Result<Array2<f64>> {
    let mut w = reversed(h);
    w.diag_mut().mapv_inplace(|v| v + damp);
    cholesky_in_place(&mut w)?;
    let m = tri_inverse_lower(w.view());
    Ok(reversed(m.view()))
}

/// `J·a·J` (rows and columns in reverse order) as a new standard-layout
/// array, rows in parallel.
fn reversed(a: ArrayView2<f64>) -> Array2<f64> {
    let (r, c) = a.dim();
    let mut out = vec![0f64; r * c];
    out.par_chunks_mut(c.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            for (d, &v) in row.iter_mut().zip(a.row(r - 1 - i).iter().rev()) {
                *d = v;
            }
        });
    Array2::from_shape_vec((r, c), out).expect("[rows, cols] entries")
}

/// The reference's route: `L = chol(H)`, `H⁻¹ = L⁻ᵀ·L⁻¹`, `U = chol(H⁻¹)ᵀ`.
pub fn upper_cholesky_of_inverse_slow(h: ArrayView2<f64>) -> Result<Array2<f64>> {
    let l = cholesky_slow(h)?;
    let li = tri_inverse_lower_slow(l.view());
    let hinv = li.t().dot(&li);
    Ok(cholesky_slow(hinv.view())?
        .reversed_axes()
        .as_standard_layout()
        .into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn spd(n: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = Array2::from_shape_fn((n + 8, n), |_| StandardNormal.sample(&mut rng));
        let mut h = x.t().dot(&x);
        for i in 0..n {
            h[[i, i]] += 0.1;
        }
        h
    }

    fn max_abs_diff(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Fast and slow agree to a few hundred ulps of the entries (both are
    /// backward-stable for these well-conditioned matrices; only summation order differs).
    #[test]
    fn fast_equals_slow() {
        for n in [1, 7, 128, 300] {
            let h = spd(n, n as u64);
            let l = cholesky(h.view()).unwrap();
            let ls = cholesky_slow(h.view()).unwrap();
            assert!(max_abs_diff(&l, &ls) < 1e-10, "chol n={n}");
            assert!(max_abs_diff(&l.dot(&l.t()), &h) < 1e-9 * n as f64);
            let m = tri_inverse_lower(l.view());
            let ms = tri_inverse_lower_slow(l.view());
            assert!(max_abs_diff(&m, &ms) < 1e-10, "inv n={n}");
            let u = upper_cholesky_of_inverse(h.view()).unwrap();
            let us = upper_cholesky_of_inverse_slow(h.view()).unwrap();
            assert!(
                max_abs_diff(&u, &us) < 1e-10,
                "U n={n}: {}",
                max_abs_diff(&u, &us)
            );
            // U is upper with positive diagonal and UᵀU·H = I
            for i in 0..n {
                assert!(u[[i, i]] > 0.0);
                for j in 0..i {
                    assert_eq!(u[[i, j]], 0.0);
                }
            }
            let eye = u.t().dot(&u).dot(&h);
            for i in 0..n {
                for j in 0..n {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((eye[[i, j]] - want).abs() < 1e-8, "{i},{j}");
                }
            }
        }
    }

    /// The base cases are their slow twins, bit for bit.
    #[test]
    fn base_cases_equal_the_slow_twins() {
        for n in [1, 2, 7, 128, 131] {
            let h = spd(n, 40 + n as u64);
            let l = cholesky_base(h.view()).unwrap();
            assert_eq!(l, cholesky_slow(h.view()).unwrap(), "cholesky n={n}");
            assert_eq!(
                tri_inverse_base(l.view()),
                tri_inverse_lower_slow(l.view()),
                "inverse n={n}"
            );
        }
        let bad = ndarray::array![[1.0, 2.0], [2.0, 1.0]];
        assert!(cholesky_base(bad.view()).is_err());
    }

    #[test]
    fn indefinite_is_an_error() {
        let h = ndarray::array![[1.0, 2.0], [2.0, 1.0]];
        for r in [cholesky(h.view()), cholesky_slow(h.view())] {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("not positive definite"), "{e}");
        }
    }
}
