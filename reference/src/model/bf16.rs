//! bf16 matrix products with f32 sums: the calibration fast path, not the oracle.
//!
//! GPTQ and AWQ calibrate on activations, and AutoGPTQ / AutoAWQ run that pass
//! in the model's fp16 or bf16 on a GPU. The oracle's forward (run.c's f32 order,
//! bit for bit) runs at ~30 GFLOP/s per core here, which puts a whole-model
//! calibration at ~10^3 CPU-seconds. This module computes the same products with
//! every input rounded to bf16 and f32 sums, on Intel AMX tiles (`TDPBF16PS`)
//! when the CPU and the kernel allow it. Nothing that claims bit-exactness runs
//! through here; [`crate::model::MatmulPath::Bf16`] opts in.
//!
//! Numerics, both paths: inputs are rounded to bf16 (round to nearest even;
//! subnormals become zero, as AMX reads them), a product of two bf16 values is
//! exact in f32, and sums are f32. The slow twin ([`Kernel::Slow`]) sums in
//! index order; AMX sums pairs and then 32-deep dot products in the hardware's
//! order. Tests hold the fast path's error against f64 to at most twice the
//! slow twin's (FlashAttention's rule).
//!
//! Operands (`K` padded to a multiple of 32, `M` and `N` to 32, with zeros),
//! both stored tile by tile so that every AMX tile load reads 1 KiB of
//! contiguous memory:
//! ```text
//!   A  [Mp, Kp]    bf16 rows                                        (Bf16Rows)
//!   B  [Kp/2, Np]  u32 pairs along K: B[p][n] = b[2p][n] | b[2p+1][n] << 16   (Bf16Vnni)
//!   C  [Mp, Np]    f32
//!   one AMX block, C[32x32] = 4 tiles of 16x16 f32, per k-step of 32:
//!     A0 = A[i..i+16, k..k+32]      A1 = A[i+16..i+32, k..k+32]   (16 rows x 64 B)
//!     B0 = B[k/2..k/2+16, j..j+16]  B1 = B[k/2..k/2+16, j+16..j+32]
//!     C00 += A0·B0   C01 += A0·B1   C10 += A1·B0   C11 += A1·B1   (4 x TDPBF16PS)
//! ```
//! Row blocks of C are split over rayon; each element is computed by one task in
//! a fixed order, so results do not depend on the thread count.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::aligned::{self, Aligned};
use super::attend::{Heads, LayerKv};

/// Padding granule of every dimension (one AMX block is 32x32, a k-step 32).
const B: usize = 32;
/// Rows per chunk of [`gram`]: f32 sums run over at most this many rows, the
/// chunks are added in f64.
pub const GRAM_CHUNK: usize = 2048;

/// Which implementation runs the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles when [`amx_available`], otherwise the slow twin.
    Fast,
    /// Plain loops: bf16-rounded inputs, one f32 sum per element in index order.
    Slow,
}

/// `x` rounded to bf16 (nearest even), as bits. Subnormals flush to signed
/// zero (AMX treats bf16 subnormal inputs as zero), NaN stays NaN.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    // branch-free (selects), so that loops over slices vectorize
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let zero = ((b >> 16) & 0x8000) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    let r = if b & 0x7f80_0000 == 0 { zero } else { rounded };
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        r
    }
}

use crate::simd::wide;

/// `out[j] = bf16_bits(x[j])`: one `VCVTNEPS2BF16` per 16 values where the
/// CPU has AVX512-BF16 (every CPU with AMX-BF16 does), else [`convert_slow`].
/// The instruction's definition (Intel SDM, `convert_fp32_to_bfloat16`) is
/// [`bf16_bits`]'s: zero or subnormal -> signed zero, NaN -> its top 16 bits
/// with the quiet bit set, otherwise round to nearest even; so both give the
/// same bits (a property test runs random bit patterns through both). The
/// calibration converts ~2·10^10 values (every linear's and Hessian's input,
/// K, V and the softmax rows); the integer version took 8 % of it.
#[inline]
pub fn convert(x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len(), "bf16 convert: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if has_bf16_convert() {
            // SAFETY: the features were detected (has_bf16_convert).
            unsafe { convert_avx512bf16(x, out) };
            return;
        }
    }
    convert_slow(x, out)
}

/// The twin of [`convert`]: [`bf16_bits`] 32 at a time (a fixed-width inner
/// loop the compiler turns into vector code), [`wide`] where the CPU allows.
#[inline]
pub fn convert_slow(x: &[f32], out: &mut [u16]) {
    wide(
        #[inline(always)]
        || convert_lanes(x, out),
    )
}

/// Whether [`convert`] runs on `VCVTNEPS2BF16` here.
#[cfg(target_arch = "x86_64")]
#[inline]
fn has_bf16_convert() -> bool {
    std::is_x86_feature_detected!("avx512bf16")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
}

/// [`convert`] on AVX512-BF16: 16 values per instruction, the tail masked.
///
/// # Safety
/// The CPU has AVX512-F, -BW, -VL and -BF16; `out.len() == x.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn convert_avx512bf16(x: &[f32], out: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    // SAFETY (all blocks): loads and stores stay inside `x` and `out` (16 at
    // a time while 16 remain, then a mask of the n - i < 16 left).
    while i + 16 <= n {
        unsafe {
            let b = _mm512_cvtneps_pbh(_mm512_loadu_ps(xp.add(i)));
            _mm256_storeu_si256(
                op.add(i).cast(),
                std::mem::transmute::<__m256bh, __m256i>(b),
            );
        }
        i += 16;
    }
    if i < n {
        let m: __mmask16 = (1u16 << (n - i)) - 1;
        unsafe {
            let b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, xp.add(i)));
            _mm256_mask_storeu_epi16(
                op.add(i).cast(),
                m,
                std::mem::transmute::<__m256bh, __m256i>(b),
            );
        }
    }
}

#[inline(always)]
fn convert_lanes(x: &[f32], out: &mut [u16]) {
    let (xc, xt) = x.split_at(x.len() / 32 * 32);
    let (oc, ot) = out.split_at_mut(xc.len());
    for (o, v) in oc.chunks_exact_mut(32).zip(xc.chunks_exact(32)) {
        let o: &mut [u16; 32] = o.try_into().expect("32");
        let v: &[f32; 32] = v.try_into().expect("32");
        for j in 0..32 {
            o[j] = bf16_bits(v[j]);
        }
    }
    for (o, &v) in ot.iter_mut().zip(xt) {
        *o = bf16_bits(v);
    }
}

/// The f32 value of bf16 bits.
#[inline]
pub fn bf16_value(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to bf16 and back.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16_value(bf16_bits(x))
}

/// Elements of one A tile (16 rows x 32 bf16) and one B tile (16 pair-rows x 16 u32).
const A_TILE: usize = 16 * 32;
const B_TILE: usize = 16 * 16;

/// The A operand: `[m, k]` rows of bf16, padded to `[mp, kp]`, stored tile by
/// tile (each AMX load reads 1 KiB of contiguous memory):
/// ```text
///   element (i, k) at ((i/16)·(kp/32) + k/32)·512 + (i%16)·32 + k%32
/// ```
#[derive(Debug, Clone)]
pub struct Bf16Rows {
    m: usize,
    k: usize,
    mp: usize,
    kp: usize,
    data: Aligned<u16>,
}

impl Bf16Rows {
    /// From rows `x [m, k]`.
    pub fn new(x: ArrayView2<f32>) -> Self {
        let (m, k) = x.dim();
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        Self::build(m, k, |i, out| convert(&xs[i * k..(i + 1) * k], out))
    }

    /// `fill(i, row)` writes all `k` values of row `i` (the buffer is reused
    /// across rows); rows are then scattered into tiles. Every element of the
    /// padded storage is written exactly once (padding with zeros), so the
    /// storage needs no zeroing first.
    fn build(m: usize, k: usize, fill: impl Fn(usize, &mut [u16]) + Sync) -> Self {
        let (mp, kp) = (pad(m), pad(k));
        let ks = kp / B;
        let init = |spare: &mut [std::mem::MaybeUninit<u16>]| {
            spare
                .par_chunks_mut(16 * kp)
                .enumerate()
                .for_each(|(rb, blk)| {
                    let mut row = vec![0u16; kp];
                    for r in 0..16 {
                        let i = rb * 16 + r;
                        if i < m {
                            fill(i, &mut row[..k]);
                        } else {
                            row.fill(0);
                        }
                        for s in 0..ks {
                            let dst = &mut blk[s * A_TILE + r * 32..s * A_TILE + r * 32 + 32];
                            // SAFETY: 32 u16 from `row` into 32 slots of `dst`
                            // (MaybeUninit<u16> has u16's layout); one copy, not
                            // 32 scalar stores
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    row[s * 32..s * 32 + 32].as_ptr(),
                                    dst.as_mut_ptr().cast::<u16>(),
                                    32,
                                )
                            };
                        }
                    }
                })
        };
        // SAFETY: `init` writes every one of the mp·kp elements (each 16-row
        // block writes 16 rows x ks tiles x 32 values).
        let data = unsafe { Aligned::init_with(mp * kp, init) };
        Bf16Rows { m, k, mp, kp, data }
    }

    fn at(&self, i: usize, k: usize) -> f32 {
        let ks = self.kp / B;
        bf16_value(self.data[((i / 16) * ks + k / 32) * A_TILE + (i % 16) * 32 + k % 32])
    }
}

fn pad(n: usize) -> usize {
    n.div_ceil(B).max(1) * B
}

/// The B operand `b [k, n]` as bf16 pairs along `k`, padded to `[kp/2, np]`,
/// stored tile by tile:
/// ```text
///   pair-row p = (b[2p][n], b[2p+1][n]) of column n at
///   ((n/16)·(kp/32) + p/16)·256 + (p%16)·16 + n%16
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Bf16Vnni {
    k: usize,
    n: usize,
    kp: usize,
    np: usize,
    data: Aligned<u32>,
}

impl Bf16Vnni {
    /// `b[k][n] = w[n][k]` for a PyTorch-layout weight `w [n, k]` (`y = x·wᵀ`).
    /// Per 16 rows of `w` in bf16, the tile of k-step `s` is the transpose of
    /// their u32 pairs `s·16..s·16 + 16` ([`transpose16`]): pair-row `p`,
    /// column `c` = `(w[c][2p], w[c][2p+1])`. [`Bf16Vnni::from_nk_slow`] is the twin.
    pub fn from_nk(w: ArrayView2<f32>) -> Self {
        let (n, k) = w.dim();
        let w = w.as_standard_layout();
        let ws = w.as_slice().expect("standard layout");
        let (kp, np) = (pad(k), pad(n));
        let ks = kp / B;
        let mut data = Aligned::<u32>::zeroed(kp / 2 * np);
        data.par_chunks_mut(16 * kp / 2)
            .enumerate()
            .for_each(|(cb, blk)| {
                // rows cb·16.. of w in bf16, k padded with zeros (absent rows 0)
                let mut rows = vec![0u32; 16 * kp / 2];
                let mut line = vec![0u16; kp];
                for c in 0..16.min(n.saturating_sub(cb * 16)) {
                    let j = cb * 16 + c;
                    convert(&ws[j * k..(j + 1) * k], &mut line[..k]);
                    for (d, pair) in rows[c * kp / 2..(c + 1) * kp / 2]
                        .iter_mut()
                        .zip(line.chunks_exact(2))
                    {
                        *d = pair[0] as u32 | (pair[1] as u32) << 16;
                    }
                }
                let mut block = [0u32; B_TILE];
                for st in 0..ks {
                    for c in 0..16 {
                        block[c * 16..(c + 1) * 16]
                            .copy_from_slice(&rows[c * kp / 2 + st * 16..][..16]);
                    }
                    let tile: &mut [u32; B_TILE] = (&mut blk[st * B_TILE..(st + 1) * B_TILE])
                        .try_into()
                        .expect("one tile");
                    transpose16(&block, tile);
                }
            });
        Bf16Vnni { k, n, kp, np, data }
    }

    /// The twin of [`Bf16Vnni::from_nk`]: column by column.
    pub fn from_nk_slow(w: ArrayView2<f32>) -> Self {
        let (n, k) = w.dim();
        let w = w.as_standard_layout();
        let ws = w.as_slice().expect("standard layout");
        Self::build(k, n, |j, col| convert(&ws[j * k..(j + 1) * k], col))
    }

    /// `b[k][n] = x[k][n]`: per 32 rows of `x` in bf16 (a k-step), the tile of
    /// columns `cb·16..` is [`pair_tile`]'s. [`Bf16Vnni::from_kn_slow`] is the twin.
    pub fn from_kn(x: ArrayView2<f32>) -> Self {
        let (k, n) = x.dim();
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        let (kp, np) = (pad(k), pad(n));
        let ks = kp / B;
        let mut data = Aligned::<u32>::zeroed(kp / 2 * np);
        // rows in bf16, padded to [kp, np] with zeros
        let mut rows = vec![0u16; kp * np];
        rows.par_chunks_mut(np)
            .take(k)
            .enumerate()
            .for_each(|(i, r)| {
                convert(&xs[i * n..(i + 1) * n], &mut r[..n]);
            });
        let nb = np / 16;
        data.par_chunks_mut(B_TILE)
            .enumerate()
            .for_each(|(t, tile)| {
                let (cb, st) = (t / ks, t % ks);
                let tile: &mut [u32; B_TILE] = tile.try_into().expect("one tile");
                debug_assert!(cb < nb);
                pair_tile(&rows[st * B * np..(st + 1) * B * np], np, cb * 16, tile);
            });
        Bf16Vnni { k, n, kp, np, data }
    }

    /// The twin of [`Bf16Vnni::from_kn`]: column by column.
    pub fn from_kn_slow(x: ArrayView2<f32>) -> Self {
        let (k, n) = x.dim();
        Self::build(k, n, |j, col| {
            for (c, &v) in col.iter_mut().zip(x.column(j)) {
                *c = bf16_bits(v);
            }
        })
    }

    /// `fill(j, col)` writes column `j` of `b` (`k` values), then pairs go into tiles.
    fn build(k: usize, n: usize, fill: impl Fn(usize, &mut [u16]) + Sync) -> Self {
        let (kp, np) = (pad(k), pad(n));
        let ks = kp / B;
        let mut data = Aligned::<u32>::zeroed(kp / 2 * np);
        data.par_chunks_mut(16 * kp / 2)
            .enumerate()
            .for_each(|(cb, blk)| {
                let mut col = vec![0u16; kp];
                for c in 0..16 {
                    let j = cb * 16 + c;
                    if j >= n {
                        break;
                    }
                    fill(j, &mut col[..k]);
                    for p in 0..kp / 2 {
                        blk[(p / 16) * B_TILE + (p % 16) * 16 + c] =
                            col[2 * p] as u32 | (col[2 * p + 1] as u32) << 16;
                    }
                }
                debug_assert_eq!(blk.len(), ks * B_TILE);
            });
        Bf16Vnni { k, n, kp, np, data }
    }

    fn at(&self, k: usize, n: usize) -> f32 {
        let (ks, p) = (self.kp / B, k / 2);
        let pair = self.data[((n / 16) * ks + p / 16) * B_TILE + (p % 16) * 16 + n % 16];
        bf16_value(if k % 2 == 0 {
            pair as u16
        } else {
            (pair >> 16) as u16
        })
    }
}

/// C block `(bi, bj)` (32x32) of `a·b` over the k-steps `ksteps`, into `c`
/// (row stride `ldc`) on AMX, starting from zero or from `c`'s values.
///
/// # Safety
/// Tiles configured ([`amx::with_tiles`]); `bi < a.mp/32`, `bj < b.np/32`,
/// `a.kp == b.kp`, `ksteps.end <= kp/32`; 32 rows of 32 f32 writable (and,
/// for [`Start::Accumulate`], initialized) at `c` with stride `ldc`.
unsafe fn amx_block(
    a: &Bf16Rows,
    b: &Bf16Vnni,
    (bi, bj): (usize, usize),
    ksteps: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
    let ks = a.kp / B;
    let a0 = a.data.as_ptr().add((2 * bi * ks + ksteps.start) * A_TILE);
    let b0 = b.data.as_ptr().add((2 * bj * ks + ksteps.start) * B_TILE);
    amx::block(
        a0,
        a0.add(ks * A_TILE),
        b0,
        b0.add(ks * B_TILE),
        ksteps.len(),
        c,
        ldc,
        start,
    )
}

/// How an AMX block starts its C tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// From zero.
    Zero,
    /// From the f32 values already at `c` (continuing a sum over more k-steps).
    Accumulate,
}

/// Which part of a product is needed (row `i` of `a` is position `start + i`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// All of it.
    Full,
    /// Causal scores `Q·Kᵀ`: only columns (keys) `<= start + i` are needed;
    /// 32x32 blocks entirely beyond that are left 0 (the caller masks them).
    CausalScores { start: usize },
    /// `P·V` for causal probabilities (`P[i][k] = 0` for `k > start + i`):
    /// k-steps entirely beyond a row block's last visible key are skipped,
    /// which changes nothing since their terms are zero.
    CausalValues { start: usize },
    /// A symmetric product (a Gram matrix): only the 32x32 blocks on and above
    /// the diagonal; those below are left 0.
    Upper,
}

impl Region {
    /// The k-steps block `(bi, bj)` needs out of `ks`, or `None` if the block
    /// is outside the region (left 0).
    fn ksteps(self, (bi, bj): (usize, usize), ks: usize) -> Option<usize> {
        let last = (bi + 1) * B - 1; // the block's last row
        match self {
            Region::Full => Some(ks),
            Region::CausalScores { start } => (bj * B <= start + last).then_some(ks),
            Region::CausalValues { start } => Some(ks.min((start + last + 1).div_ceil(B))),
            Region::Upper => (bj >= bi).then_some(ks),
        }
    }
}

/// A raw pointer that rayon tasks writing disjoint blocks may share.
struct Shared<T>(*mut T);
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
// SAFETY: every task writes a disjoint set of blocks or tiles (see the users).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// `a·b` `[m, n]` in f32 (module doc). Panics if the inner dimensions differ
/// (a programming error: operands are built by this crate).
pub fn matmul(a: &Bf16Rows, b: &Bf16Vnni, kernel: Kernel) -> Array2<f32> {
    matmul_region(a, b, Region::Full, kernel)
}

/// [`matmul`] restricted to `region` (the slow twin computes everything).
pub fn matmul_region(a: &Bf16Rows, b: &Bf16Vnni, region: Region, kernel: Kernel) -> Array2<f32> {
    assert_eq!(a.k, b.k, "bf16 matmul: inner dimensions");
    let c = match kernel {
        Kernel::Fast if amx::available() => {
            let (mb, nb, ks) = (a.mp / B, b.np / B, a.kp / B);
            // One task per 32-column block of C: its B panel (32 columns x K)
            // stays in L1 while the row blocks of A stream past it.
            let write = |out: Shared<f32>| {
                (0..nb).into_par_iter().for_each(|bj| {
                    let out = out;
                    amx::with_tiles(|| {
                        for bi in 0..mb {
                            let Some(ksteps) = region.ksteps((bi, bj), ks) else {
                                // SAFETY: as below; the block is zeroed instead.
                                unsafe {
                                    for r in 0..B {
                                        let row = out.0.add((bi * B + r) * b.np + bj * B);
                                        std::ptr::write_bytes(row, 0, B);
                                    }
                                }
                                continue;
                            };
                            // SAFETY: tiles configured; block (bi, bj) lies inside C,
                            // and only this task writes column block bj.
                            unsafe {
                                let dst = out.0.add(bi * B * b.np + bj * B);
                                amx_block(a, b, (bi, bj), 0..ksteps, dst, b.np, Start::Zero)
                            }
                        }
                    })
                })
            };
            // SAFETY: every 32x32 block of the mp x np output is written
            // (computed or zeroed) by exactly one task of `write`.
            unsafe { aligned::array2_with(a.mp, b.np, |c| write(Shared(c.as_mut_ptr().cast()))) }
        }
        _ => Array2::from_shape_vec((a.mp, b.np), slow_product(a, b)).expect("padded shape"),
    };
    if (a.m, b.n) == (a.mp, b.np) {
        c
    } else {
        c.slice(ndarray::s![..a.m, ..b.n]).to_owned()
    }
}

/// One 32x32 f32 block on a cache line (the AMX tile stores of
/// [`swiglu_rows`] land here, then are read once).
#[repr(C, align(64))]
struct Block([f32; B * B]);

/// SwiGLU's hidden activations `silu(a·g)·(a·u)` `[m, n]` ([`silu_mul`]'s
/// function on the two products). On AMX, one task per 16 output columns:
/// each 32-row block computes those columns of both products in one AMX
/// block (`g`'s 16 columns as the left two C tiles, `u`'s as the right two,
/// sharing the A tiles), stores it to a 4 KiB block that stays in L1, and
/// writes `silu(g)·u` from it. The B panels (16 columns of each, 36 KiB at
/// K = 576) stay in L1 while A streams past, as in [`matmul`]; no `[m, n]`
/// product is ever stored. Each element is the same AMX sum and the same
/// element-wise function as [`swiglu_rows_slow`]'s: the same bits (tested).
/// (Before: 64 rows per task against all of `g` and `u`, 3.4 MiB of B panels
/// streamed from L3 per task: half [`matmul`]'s rate.)
///
/// ```text
///   task j (columns j·16..j·16+16), per row block bi:
///     C00 = A0·G_j  C01 = A0·U_j        block [32 x 32]: | g (16) | u (16) |
///     C10 = A1·G_j  C11 = A1·U_j        out[bi·32 + r][j·16 + c] = silu(g)·u
/// ```
pub fn swiglu_rows(a: &Bf16Rows, g: &Bf16Vnni, u: &Bf16Vnni, kernel: Kernel) -> Array2<f32> {
    assert_eq!((a.k, g.k, g.n), (u.k, u.k, u.n), "swiglu: operand shapes");
    if !(kernel == Kernel::Fast && amx::available()) {
        return swiglu_rows_slow(a, g, u, kernel);
    }
    let (mb, ks, np) = (a.mp / B, a.kp / B, g.np);
    let groups = np / 16;
    let write = |out: Shared<f32>| {
        (0..groups).into_par_iter().for_each(|j| {
            let out = out;
            let mut c = Block([0.0; B * B]);
            amx::with_tiles(|| {
                for bi in 0..mb {
                    // SAFETY: tiles configured; row block bi and column group
                    // j lie inside the padded operands (A: 2·mb row tiles of
                    // ks k-steps; G, U: `groups` runs of ks tiles each); the C
                    // block is `c` (32 rows of 32, stride 32).
                    unsafe {
                        let a0 = a.data.as_ptr().add(2 * bi * ks * A_TILE);
                        let g0 = g.data.as_ptr().add(j * ks * B_TILE);
                        let u0 = u.data.as_ptr().add(j * ks * B_TILE);
                        amx::block(
                            a0,
                            a0.add(ks * A_TILE),
                            g0,
                            u0,
                            ks,
                            c.0.as_mut_ptr(),
                            B,
                            Start::Zero,
                        );
                    }
                    // SAFETY: rows bi·32.. and columns j·16.. of `out` are this
                    // task's alone (no other task has column group j).
                    unsafe { silu_mul_block(&c, out.0.add(bi * B * np + j * 16), np) };
                }
            })
        })
    };
    // SAFETY: the tasks cover every column group and every row block.
    let out = unsafe { aligned::array2_with(a.mp, np, |o| write(Shared(o.as_mut_ptr().cast()))) };
    if (a.m, g.n) == (a.mp, np) {
        out
    } else {
        out.slice(ndarray::s![..a.m, ..g.n]).to_owned()
    }
}

/// `out[r][c] = silu(g)·u` for the 32 rows of a [`swiglu_rows`] block
/// (`g = c[r][c]`, `u = c[r][16 + c]`, c < 16), [`silu_mul`]'s function.
///
/// # Safety
/// 32 rows of 16 writable f32 at `out`, row stride `ld`.
unsafe fn silu_mul_block(c: &Block, out: *mut f32, ld: usize) {
    wide(
        #[inline(always)]
        || {
            for (r, row) in c.0.chunks_exact(B).enumerate() {
                let (g, u) = row.split_at(16);
                // SAFETY: the caller's promise (row r of 16 at out + r·ld).
                let o = unsafe { std::slice::from_raw_parts_mut(out.add(r * ld), 16) };
                for ((o, &a), &b) in o.iter_mut().zip(g).zip(u) {
                    *o = silu_times(a, b);
                }
            }
        },
    )
}

/// [`swiglu_rows`] as two whole products, then [`silu_mul`] over them.
pub fn swiglu_rows_slow(a: &Bf16Rows, g: &Bf16Vnni, u: &Bf16Vnni, kernel: Kernel) -> Array2<f32> {
    let mut h = matmul(a, g, kernel);
    let h2 = matmul(a, u, kernel);
    silu_mul(
        h.as_slice_mut().expect("standard layout"),
        h2.as_slice().expect("standard layout"),
    );
    h
}

/// The slow twin of the product: `c[i][j] = Σ_k a[i][k]·b[k][j]`, `k` in order.
fn slow_product(a: &Bf16Rows, b: &Bf16Vnni) -> Vec<f32> {
    let mut c = vec![0f32; a.mp * b.np];
    let bf: Vec<f32> = (0..a.k * b.np)
        .map(|idx| b.at(idx / b.np, idx % b.np))
        .collect();
    c.par_chunks_mut(b.np)
        .take(a.m)
        .enumerate()
        .for_each(|(i, row)| {
            for k in 0..a.k {
                let x = a.at(i, k);
                for (c, &w) in row.iter_mut().zip(&bf[k * b.np..(k + 1) * b.np]) {
                    *c += x * w;
                }
            }
        });
    c
}

/// `Σ_s X_sᵀ·X_s` `[d, d]` over the rows of every `X_s [T_s, d]`, inputs rounded
/// to bf16: the rows (all samples in order) are cut into chunks of
/// [`GRAM_CHUNK`], each chunk's product summed in f32, the chunks in f64.
/// Only the 32x32 blocks on and above the diagonal are computed; the result is
/// made exactly symmetric from them.
pub fn gram(xs: &[ArrayView2<f32>], kernel: Kernel) -> Array2<f64> {
    let d = xs.first().map_or(0, |x| x.ncols());
    let owned: Vec<_> = xs.iter().map(|x| x.as_standard_layout()).collect();
    let rows: Vec<&[f32]> = owned
        .iter()
        .flat_map(|x| {
            x.as_slice()
                .expect("standard layout")
                .chunks_exact(d.max(1))
        })
        .collect();
    // the upper 32x32 blocks (bi <= bj) of the f64 sum, block-major:
    // block (bi, bj) at (bj·(bj+1)/2 + bi)·1024, so each column block's
    // blocks are one contiguous run (one task's output below)
    let nb = pad(d) / B;
    let mut acc = vec![0f64; nb * (nb + 1) / 2 * B * B];
    // the operands of one pass, rebuilt in place pass after pass (a fresh
    // pair per pass allocated 3 MiB at d = 1536)
    let mut ops = None;
    // the chunks' f32 blocks, one buffer for all chunks (each chunk's first
    // pass overwrites every block)
    let mut c = Aligned::<f32>::zeroed(match kernel {
        Kernel::Fast if amx::available() => acc.len(),
        _ => 0,
    });
    for chunk in rows.chunks(GRAM_CHUNK) {
        match kernel {
            Kernel::Fast if amx::available() => {
                gram_chunk_passes(chunk, d, &mut acc, &mut c, &mut ops)
            }
            _ => {
                let (a, b) = gram_operands(chunk, d);
                let c = matmul_region(&a, &b, Region::Upper, kernel);
                for_each_entry(&mut acc, nb, d, |i, j, s| *s += c[[i, j]] as f64);
            }
        }
    }
    // [d, d] from the upper triangle (diagonal blocks: their entries j >= i),
    // mirrored, so that the result is exactly symmetric; rows in parallel
    let at = |i: usize, j: usize| {
        let (bi, bj) = (i / B, j / B);
        acc[(bj * (bj + 1) / 2 + bi) * B * B + i % B * B + j % B]
    };
    let mut g = vec![0f64; d * d];
    g.par_chunks_mut(d.max(1)).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = if j >= i { at(i, j) } else { at(j, i) };
        }
    });
    Array2::from_shape_vec((d, d), g).expect("[d, d] entries")
}

/// `f(i, j, entry)` for every entry of [`gram`]'s block-major accumulator
/// that lies inside `[d, d]` (padding skipped).
fn for_each_entry(acc: &mut [f64], nb: usize, d: usize, mut f: impl FnMut(usize, usize, &mut f64)) {
    for (bj, run) in column_runs(acc, nb).into_iter().enumerate() {
        for (e, s) in run.iter_mut().enumerate() {
            let (i, j) = (e / (B * B) * B + e / B % B, bj * B + e % B);
            if i < d && j < d {
                f(i, j, s);
            }
        }
    }
}

/// [`gram`]'s block-major accumulator cut into its column blocks' runs
/// (run `bj` holds blocks `(0..=bj, bj)`).
fn column_runs<T>(acc: &mut [T], nb: usize) -> Vec<&mut [T]> {
    let mut runs = Vec::with_capacity(nb);
    let mut rest = acc;
    for bj in 0..nb {
        let (run, tail) = rest.split_at_mut((bj + 1) * B * B);
        runs.push(run);
        rest = tail;
    }
    runs
}

/// k-steps per pass of [`gram_chunk_passes`]: a pass's operands (16·32 rows
/// by d, 1.5 MiB each at d = 1536) fit in L2 beside the C blocks in use, and a
/// column block's B slice (32 columns x 512 rows, 32 KiB) in L1.
const GRAM_KSUB: usize = 16;

/// One [`gram`] chunk on AMX, pass by pass: the operands of each pass's
/// [`GRAM_KSUB`]·32 rows (1.5 MiB each at d = 1536: they stay in L2 while
/// every column block reads them) are built just before it, and all C blocks
/// of the chunk (f32, block-major like `acc`) advance one pass at a time, then
/// are added into `acc` in f64. Each C block sees the same k-steps in the same
/// order, restarting from its stored tiles (exact: tile loads and stores of
/// f32 are), as one unbroken AMX product of the whole chunk would: the same
/// bits (tested). Building the whole chunk's operands instead (6 MiB each at
/// d = 1536) streamed them from memory once per column block. `c` is the
/// chunk's f32 blocks, as many as `acc`'s, 64-byte aligned like every AMX
/// output here (its old values are never read: the first pass starts every
/// block from zero).
fn gram_chunk_passes(
    chunk: &[&[f32]],
    d: usize,
    acc: &mut [f64],
    c: &mut [f32],
    ops: &mut Option<(Bf16Rows, Bf16Vnni)>,
) {
    let nb = pad(d) / B;
    for (p, rows) in chunk.chunks(GRAM_KSUB * B).enumerate() {
        let (a, b) = match ops {
            Some((a, b)) => {
                gram_operands_into(rows, d, a, b);
                (&*a, &*b)
            }
            None => {
                let (a, b) = ops.insert(gram_operands(rows, d));
                (&*a, &*b)
            }
        };
        let ks = a.kp / B;
        let start = if p == 0 {
            Start::Zero
        } else {
            Start::Accumulate
        };
        column_runs(c, nb)
            .into_par_iter()
            .enumerate()
            .for_each(|(bj, run)| {
                amx::with_tiles(|| {
                    for bi in 0..=bj {
                        // SAFETY: tiles configured; bi, bj inside the padded
                        // operands; block bi of this run is 32x32 f32 (stride
                        // 32), written by the first pass before later ones read it.
                        unsafe {
                            let dst = run.as_mut_ptr().add(bi * B * B);
                            amx_block(a, b, (bi, bj), 0..ks, dst, B, start)
                        }
                    }
                })
            });
    }
    acc.par_chunks_mut(B * B)
        .zip(c.par_chunks(B * B))
        .for_each(|(s, v)| {
            wide(
                #[inline(always)]
                || {
                    for (s, &v) in s.iter_mut().zip(v) {
                        *s += v as f64;
                    }
                },
            )
        });
}

/// The operands of one [`gram`] chunk from its rows `x_t [d]`: `B = X` `[T, d]`
/// as pairs along `T`, and `A = Xᵀ` `[d, T]`, from one bf16 rounding of each value.
fn gram_operands(rows: &[&[f32]], d: usize) -> (Bf16Rows, Bf16Vnni) {
    let (dp, tp) = (pad(d), pad(rows.len()));
    let mut a = None;
    // SAFETY: `gram_write` writes all (dp/16)·ks tiles of each buffer.
    let bt = unsafe {
        Aligned::init_with(tp / 2 * dp, |b| {
            a = Some(Aligned::init_with(tp * dp, |a| {
                gram_write(
                    rows,
                    d,
                    Shared(b.as_mut_ptr().cast()),
                    Shared(a.as_mut_ptr().cast()),
                )
            }))
        })
    };
    let a = a.expect("built with bt");
    let (m, k) = (d, rows.len());
    (
        Bf16Rows {
            m,
            k,
            mp: dp,
            kp: tp,
            data: a,
        },
        Bf16Vnni {
            k,
            n: m,
            kp: tp,
            np: dp,
            data: bt,
        },
    )
}

/// [`gram_operands`] into the buffers of an earlier pair (same `d`), when
/// they have room; otherwise a fresh pair. Every used element is rewritten,
/// so the result is the same as a fresh pair's.
fn gram_operands_into(rows: &[&[f32]], d: usize, a: &mut Bf16Rows, b: &mut Bf16Vnni) {
    let (dp, tp) = (pad(d), pad(rows.len()));
    if a.mp != dp || a.data.capacity() < tp * dp || b.data.capacity() < tp / 2 * dp {
        (*a, *b) = gram_operands(rows, d);
        return;
    }
    a.data.resize_within(tp * dp);
    b.data.resize_within(tp / 2 * dp);
    let (ap, bp) = (Shared(a.data.as_mut_ptr()), Shared(b.data.as_mut_ptr()));
    // SAFETY: the buffers hold (dp/16)·(tp/32) tiles each (resized above).
    unsafe { gram_write(rows, d, bp, ap) };
    (a.k, a.kp, b.k, b.kp) = (rows.len(), tp, rows.len(), tp);
}

/// Write both operands of [`gram_operands`] for `rows`: one task per k-step
/// (32 tokens): its rows are rounded to bf16 once (sequential reads), then
/// for each 16 features the B tile (pairs of tokens per feature) and the A
/// tile (features x tokens) are written in place, 1 KiB each; padding is
/// written as zeros, so every element of both buffers is written exactly once.
///
/// # Safety
/// `bp` / `ap` point at `pad(d)/16 · pad(rows.len())/32` tiles each (B: 256
/// u32, A: 512 u16 per tile), written by nothing else meanwhile.
unsafe fn gram_write(rows: &[&[f32]], d: usize, bp: Shared<u32>, ap: Shared<u16>) {
    let (dp, ks) = (pad(d), pad(rows.len()) / B);
    (0..ks).into_par_iter().for_each(|s| {
        let (bp, ap) = (bp, ap);
        let mut buf = vec![0u16; B * dp];
        // SAFETY: `gram_tiles` writes only tiles (_, s) of each buffer.
        wide(
            #[inline(always)]
            || unsafe { gram_tiles(rows, s, d, ks, &mut buf, bp, ap) },
        )
    })
}

/// [`gram_operands`]' task for k-step `s`: tiles `(cb, s)` of B (pairs) and A.
///
/// # Safety
/// `bp` / `ap` point at buffers of `ks` tiles per 16 features (B: 256 u32,
/// A: 512 u16 each) for `pad(d)` features; no other task writes tiles `(_, s)`.
#[inline(always)]
unsafe fn gram_tiles(
    rows: &[&[f32]],
    s: usize,
    d: usize,
    ks: usize,
    buf: &mut [u16],
    bp: Shared<u32>,
    ap: Shared<u16>,
) {
    let dp = pad(d);
    for r in 0..B {
        let line = &mut buf[r * dp..(r + 1) * dp];
        match rows.get(s * B + r) {
            Some(row) => {
                convert(row, &mut line[..d]);
                line[d..].fill(0);
            }
            None => line.fill(0),
        }
    }
    let mut btile = [0u32; B_TILE];
    let mut atile = [0u32; B_TILE];
    for cb in 0..dp / 16 {
        pair_tile(buf, dp, cb * 16, &mut btile);
        // The A tile (16 features x 32 tokens, element (f, k) = x[k][f0 + f])
        // read as u32 pairs (f, k/2) holds exactly B's pair (k/2, f): it is
        // the 16x16 transpose of the B tile.
        transpose16(&btile, &mut atile);
        // SAFETY: tile (cb, s) lies inside each buffer (cb < dp/16, s < ks);
        // the caller guarantees no other writer. An A tile is 512 u16 = the
        // 256 u32 of `atile` (little-endian pairs: even token low).
        unsafe {
            std::ptr::copy_nonoverlapping(btile.as_ptr(), bp.0.add((cb * ks + s) * B_TILE), B_TILE);
            std::ptr::copy_nonoverlapping(
                atile.as_ptr().cast::<u16>(),
                ap.0.add((cb * ks + s) * A_TILE),
                A_TILE,
            );
        }
    }
}

/// The B tile of features `f0..f0 + 16` from 32 token rows of bf16 (`buf`, row
/// stride `dp`): pair-row `p`, column `c` = `(x[2p][f0 + c], x[2p + 1][f0 + c])`
/// as one u32 (even token low). AVX-512 (zero-extend, shift, or: 16 pairs per
/// three instructions) where the CPU has it, else element by element.
#[inline]
fn pair_tile(buf: &[u16], dp: usize, f0: usize, btile: &mut [u32; 256]) {
    assert!(
        f0 + 16 <= dp && buf.len() >= 32 * dp,
        "pair_tile: 32 rows of {dp}"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected just above; the reads stay
            // inside `buf` (asserted).
            unsafe { pair_tile_avx512(buf, dp, f0, btile) };
            return;
        }
    }
    pair_tile_slow(buf, dp, f0, btile)
}

fn pair_tile_slow(buf: &[u16], dp: usize, f0: usize, btile: &mut [u32; 256]) {
    for p in 0..16 {
        for c in 0..16 {
            let (lo, hi) = (buf[2 * p * dp + f0 + c], buf[(2 * p + 1) * dp + f0 + c]);
            btile[p * 16 + c] = lo as u32 | (hi as u32) << 16;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pair_tile_avx512(buf: &[u16], dp: usize, f0: usize, btile: &mut [u32; 256]) {
    use std::arch::x86_64::*;
    let src = buf.as_ptr();
    let dst = btile.as_mut_ptr().cast::<__m512i>();
    for p in 0..16 {
        let lo = _mm256_loadu_si256(src.add(2 * p * dp + f0).cast());
        let hi = _mm256_loadu_si256(src.add((2 * p + 1) * dp + f0).cast());
        let v = _mm512_or_si512(
            _mm512_cvtepu16_epi32(lo),
            _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
        );
        _mm512_storeu_si512(dst.add(p), v);
    }
}

/// `dst = srcᵀ` for 16x16 u32 (row-major): AVX-512 shuffles where the CPU has
/// them (three rounds of unpack/shuffle, 64 instructions), else element by
/// element ([`transpose16_slow`], the twin the test compares with).
#[inline]
fn transpose16(src: &[u32; 256], dst: &mut [u32; 256]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected just above.
            unsafe { transpose16_avx512(src, dst) };
            return;
        }
    }
    transpose16_slow(src, dst)
}

fn transpose16_slow(src: &[u32; 256], dst: &mut [u32; 256]) {
    for i in 0..16 {
        for j in 0..16 {
            dst[j * 16 + i] = src[i * 16 + j];
        }
    }
}

/// The shuffle network: with `u_(4g+c)` = lane `L` holding column `4L + c`,
/// rows `4g..4g+4` (after 32- then 64-bit unpacks), output row `j = 4L + c`
/// is lane `L` of `u_c, u_(4+c), u_(8+c), u_(12+c)`, gathered by two rounds
/// of 128-bit lane shuffles (0x88 takes lanes 0 and 2 of each source, 0xdd
/// lanes 1 and 3).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16_avx512(src: &[u32; 256], dst: &mut [u32; 256]) {
    use std::arch::x86_64::*;
    let p = src.as_ptr().cast::<__m512i>();
    let r: [__m512i; 16] = std::array::from_fn(|i| _mm512_loadu_si512(p.add(i)));
    let t: [__m512i; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    // u[4g + c]: c = 0: lo64(t0, t2), 1: hi64(t0, t2), 2: lo64(t1, t3), 3: hi64(t1, t3)
    let u: [__m512i; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
        if c % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    // v[c] = (u_c, u_(4+c)) and w[c] = (u_(8+c), u_(12+c)), lanes 0/2 then 1/3
    let v: [__m512i; 8] = std::array::from_fn(|i| {
        let c = i % 4;
        if i < 4 {
            _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c])
        } else {
            _mm512_shuffle_i32x4::<0xdd>(u[c], u[4 + c])
        }
    });
    let w: [__m512i; 8] = std::array::from_fn(|i| {
        let c = i % 4;
        if i < 4 {
            _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c])
        } else {
            _mm512_shuffle_i32x4::<0xdd>(u[8 + c], u[12 + c])
        }
    });
    // row c from (v[c], w[c]) lanes 0/2, row 8+c lanes 1/3; rows 4+c and
    // 12+c likewise from the 0xdd halves v[4+c], w[4+c]
    let q = dst.as_mut_ptr().cast::<__m512i>();
    for c in 0..4 {
        _mm512_storeu_si512(q.add(c), _mm512_shuffle_i32x4::<0x88>(v[c], w[c]));
        _mm512_storeu_si512(q.add(8 + c), _mm512_shuffle_i32x4::<0xdd>(v[c], w[c]));
        _mm512_storeu_si512(
            q.add(4 + c),
            _mm512_shuffle_i32x4::<0x88>(v[4 + c], w[4 + c]),
        );
        _mm512_storeu_si512(
            q.add(12 + c),
            _mm512_shuffle_i32x4::<0xdd>(v[4 + c], w[4 + c]),
        );
    }
}

/// `e^x`, vectorizable (no calls, no branches): `x` clamped to [-87, 88],
/// `x = n·ln2 + r` with `|r| <= ln2/2`, a degree-6 Taylor polynomial for `e^r`
/// (relative error < 5e-7, far below bf16's 4e-3), `2^n` from exponent bits.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `n` as an integer without a float-to-int cast (Rust's saturating `as`
    // kept the loops scalar): `t = 1.5·2^23 + n` lies in [2^23, 2^24), where
    // the spacing of f32 is 1, so its bits are ROUND's bits plus `n`
    // (|n| <= 127); then `2^n` is `n + 127` in the exponent field. The same
    // value as `(n as i32 + 127) << 23` (NaN aside: a NaN `x` gives a NaN
    // `p` either way).
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    p * f32::from_bits(ni << 23)
}

/// SwiGLU's `silu(g)·u` in place on `g`, with [`exp_fast`] (the bf16 path's MLP).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    wide(
        #[inline(always)]
        || {
            for (a, &b) in g.iter_mut().zip(u) {
                *a = silu_times(*a, b);
            }
        },
    )
}

/// `silu(g)·u` of one pair, the element function of [`silu_mul`] and of
/// [`swiglu_rows`]' blocks (one definition, so both give the same bits).
#[inline(always)]
fn silu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_fast(-g)) * u
}

/// One causal softmax row into the bf16 operand of `P·V`: `out[..n]` =
/// bf16(softmax(scores[..n] / div)) with [`exp_fast`], `out[n..]` = 0.
/// `e` is scratch.
#[inline(always)]
fn softmax_row(scores: &[f32], n: usize, div: f32, e: &mut Vec<f32>, out: &mut [u16]) {
    e.resize(n, 0.0);
    for (v, &x) in e.iter_mut().zip(&scores[..n]) {
        *v = x / div;
    }
    let max = max_lanes(e);
    for v in e.iter_mut() {
        *v = exp_fast(*v - max);
    }
    let sum = sum_lanes(e);
    // normalized in place, then rounded to bf16 ([`convert`])
    for v in e.iter_mut() {
        *v /= sum;
    }
    convert(e, &mut out[..n]);
    out[n..].fill(0);
}

/// Lanes of the vectorizable reductions below (fixed: results do not depend on the CPU).
const LANES: usize = 16;

/// `max(x)` in 16 independent lanes, then across them (vectorizes; exact).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    tail.iter()
        .chain(&m)
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v))
}

/// `Σ x` in 16 interleaved f32 partial sums, then the partials in order.
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut s = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (s, &v) in s.iter_mut().zip(c) {
            *s += v;
        }
    }
    s.iter().chain(tail).sum()
}

thread_local! {
    /// One softmax row per thread (attention calls this per query row).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Causal attention in bf16 (scores and output through [`matmul`], softmax in
/// f32 with [`exp_fast`]): query row `r` is position `start + r` and sees
/// positions `0..=start + r` of `kv`. `q [T, n_heads·D]`, returns `[T, n_heads·D]`.
/// Same definition as run.c's attention (scores divided by `sqrt(D)`), in bf16.
/// On AMX, [`attention_causal_fused`]; else (and as its twin) the three whole
/// products of [`attention_causal_unfused`].
pub(crate) fn attention_causal(
    q: ArrayView2<f32>,
    kv: LayerKv<'_>,
    start: usize,
    heads: Heads,
    kernel: Kernel,
) -> Array2<f32> {
    match kernel {
        Kernel::Fast if amx::available() => attention_causal_fused(q, kv, start, heads),
        _ => attention_causal_unfused(q, kv, start, heads, kernel),
    }
}

/// K and V of KV head `g` for positions `0..end`, `[end, D]` each.
fn gather_head(src: &[f32], offs: &[usize], g: usize, hd: usize) -> Array2<f32> {
    let mut a = Vec::with_capacity(offs.len() * hd);
    for &off in offs {
        a.extend_from_slice(&src[off + g * hd..off + (g + 1) * hd]);
    }
    Array2::from_shape_vec((offs.len(), hd), a).expect("end x hd")
}

/// [`attention_causal`] 32 query rows at a time, each head in one task: the
/// row block's scores (32 x keys, f32), their softmax (into a 32-row bf16
/// operand) and its `P·V` stay in L1/L2 instead of a `[T, keys]` score matrix
/// and a `[T, keys]` probability operand per head. Every AMX block runs the
/// same k-steps over the same tiles as in the whole products (the causal
/// regions' rules, [`Region::ksteps`]), and each softmax row is the same call,
/// so the output equals [`attention_causal_unfused`]'s with [`Kernel::Fast`]
/// bit for bit (tested).
fn attention_causal_fused(
    q: ArrayView2<f32>,
    kv: LayerKv<'_>,
    start: usize,
    heads: Heads,
) -> Array2<f32> {
    let (t, hd) = (q.nrows(), heads.head_dim);
    let end = start + t;
    let group = heads.n_heads / heads.n_kv_heads;
    let kvb: Vec<(Bf16Vnni, Bf16Vnni)> = (0..heads.n_kv_heads)
        .into_par_iter()
        .map(|g| {
            let offs = &kv.offs[..end];
            (
                Bf16Vnni::from_nk(gather_head(kv.k, offs, g, hd).view()),
                Bf16Vnni::from_kn(gather_head(kv.v, offs, g, hd).view()),
            )
        })
        .collect();
    let div = (hd as f32).sqrt();
    let per_head: Vec<Array2<f32>> = (0..heads.n_heads)
        .into_par_iter()
        .map(|h| {
            let (kb, vb) = &kvb[h / group];
            let qh = Bf16Rows::new(q.slice(ndarray::s![.., h * hd..(h + 1) * hd]));
            let (mb, ks_q) = (qh.mp / B, qh.kp / B);
            let (ldc, kp) = (kb.np, vb.kp);
            let mut o = aligned::array2_zeroed(qh.mp, vb.np);
            let mut scores = Aligned::<f32>::zeroed(B * ldc);
            let mut p = Bf16Rows {
                m: B,
                k: end,
                mp: B,
                kp,
                data: Aligned::zeroed(B * kp),
            };
            let mut line = vec![0u16; kp];
            amx::with_tiles(|| {
                for bi in 0..mb {
                    // (bi, bj) as Region::CausalScores / CausalValues decide
                    let last = (bi + 1) * B - 1;
                    let score_blocks = ((start + last) / B + 1).min(ldc / B);
                    for bj in 0..score_blocks {
                        // SAFETY: tiles configured; blocks inside both operands;
                        // the C block lies inside `scores` (32 rows of ldc).
                        unsafe {
                            let dst = scores.as_mut_ptr().add(bj * B);
                            amx_block(&qh, kb, (bi, bj), 0..ks_q, dst, ldc, Start::Zero)
                        }
                    }
                    for r in 0..B {
                        let i = bi * B + r;
                        if i < t {
                            let n = start + i + 1;
                            let row = &scores[r * ldc..r * ldc + end];
                            SCRATCH.with_borrow_mut(|e| {
                                wide(
                                    #[inline(always)]
                                    || softmax_row(row, n, div, e, &mut line[..end]),
                                )
                            });
                        } else {
                            line.fill(0);
                        }
                        // row r of the 32-row operand, tile by tile (Bf16Rows layout)
                        for st in 0..kp / B {
                            let at = ((r / 16) * (kp / B) + st) * A_TILE + (r % 16) * 32;
                            p.data[at..at + 32].copy_from_slice(&line[st * 32..st * 32 + 32]);
                        }
                    }
                    let ksteps = (kp / B).min((start + last + 1).div_ceil(B));
                    for bj in 0..vb.np / B {
                        // SAFETY: as above; the C block lies inside `o`.
                        unsafe {
                            let dst = o.as_mut_ptr().add(bi * B * vb.np + bj * B);
                            amx_block(&p, vb, (0, bj), 0..ksteps, dst, vb.np, Start::Zero)
                        }
                    }
                }
            });
            o.slice(ndarray::s![..t, ..hd]).to_owned()
        })
        .collect();
    concat_heads(&per_head, t, hd)
}

/// The per-head outputs `[T, hd]` side by side: `[T, heads·hd]`.
fn concat_heads(per_head: &[Array2<f32>], t: usize, hd: usize) -> Array2<f32> {
    let mut out = Array2::zeros((t, per_head.len() * hd));
    for (h, o) in per_head.iter().enumerate() {
        out.slice_mut(ndarray::s![.., h * hd..(h + 1) * hd])
            .assign(o);
    }
    out
}

/// [`attention_causal`] as three whole products per head (scores `[T, keys]`,
/// probabilities, `P·V`): the twin of [`attention_causal_fused`] on AMX and
/// the path without it.
fn attention_causal_unfused(
    q: ArrayView2<f32>,
    kv: LayerKv<'_>,
    start: usize,
    heads: Heads,
    kernel: Kernel,
) -> Array2<f32> {
    let (t, hd) = (q.nrows(), heads.head_dim);
    let end = start + t;
    let group = heads.n_heads / heads.n_kv_heads;
    let per_head: Vec<Array2<f32>> = (0..heads.n_kv_heads)
        .into_par_iter()
        .flat_map_iter(|g| {
            let offs = &kv.offs[..end];
            let kb = Bf16Vnni::from_nk(gather_head(kv.k, offs, g, hd).view());
            let vb = Bf16Vnni::from_kn(gather_head(kv.v, offs, g, hd).view());
            (g * group..(g + 1) * group)
                .map(|h| {
                    let qh = Bf16Rows::new(q.slice(ndarray::s![.., h * hd..(h + 1) * hd]));
                    let s = matmul_region(&qh, &kb, Region::CausalScores { start }, kernel);
                    let div = (hd as f32).sqrt();
                    // softmax of each row's visible scores, written straight
                    // into the bf16 operand of P·V (masked keys are 0)
                    let p = Bf16Rows::build(t, end, |r, out| {
                        let row = s.row(r);
                        let row = row.as_slice().expect("standard layout");
                        let n = start + r + 1;
                        SCRATCH.with_borrow_mut(|e| {
                            wide(
                                #[inline(always)]
                                || softmax_row(row, n, div, e, out),
                            )
                        });
                    });
                    matmul_region(&p, &vb, Region::CausalValues { start }, kernel)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    concat_heads(&per_head, t, hd)
}

/// Intel AMX: detection (CPUID, then the Linux permission request) and the
/// 32x32 block kernel in inline assembly (stable Rust has no AMX intrinsics).
mod amx {
    use std::sync::OnceLock;

    /// Whether AMX-BF16 tiles can be used by this process. `INFERLAB_NO_AMX`
    /// set (to anything) turns them off, to run the portable path on an AMX host.
    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| std::env::var_os("INFERLAB_NO_AMX").is_none() && detect())
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn detect() -> bool {
        use std::arch::x86_64::__cpuid_count;
        let leaf7 = __cpuid_count(7, 0);
        let (bf16, tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
        if !(bf16 && tile) {
            return false;
        }
        // Linux >= 5.16 hands out the 8 KiB tile-data state on request.
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        const SYS_ARCH_PRCTL: i64 = 158;
        let rc: i64;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only changes this process's
        // permitted xsave features; rcx and r11 are clobbered by `syscall`.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => rc,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            );
        }
        rc == 0
    }

    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    fn detect() -> bool {
        false
    }

    /// Palette 1 with all 8 tiles 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
        reserved2: [u8; 16],
    }

    /// Run `f` with the tiles configured, then release them.
    #[cfg(target_arch = "x86_64")]
    pub fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
            reserved2: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        // SAFETY: only called when `available()`; the config is 64 bytes, aligned.
        unsafe { std::arch::asm!("ldtilecfg [{0}]", in(reg) &cfg, options(nostack)) };
        let r = f();
        // SAFETY: as above.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
        r
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn with_tiles<R>(_f: impl FnOnce() -> R) -> R {
        unreachable!("AMX is never available off x86_64")
    }

    /// `C[32x32] = Σ_s A_s·B_s` over `ksteps` k-steps of tile-ordered operands:
    /// `a0`/`a1` point at the first A tile of row blocks 0 and 1 (rows 0..16,
    /// 16..32), `b0`/`b1` at the first B tile of column blocks 0 and 1; each
    /// k-step advances every pointer by one 1 KiB tile. `c`: C's first element,
    /// `ldc` f32 per row.
    ///
    /// # Safety
    /// Tiles configured by [`with_tiles`] on this thread; `ksteps` tiles
    /// readable from each of `a0`, `a1`, `b0`, `b1`; 32 rows of 32 f32
    /// writable at `c` (stride `ldc`).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(
        a0: *const u16,
        a1: *const u16,
        b0: *const u32,
        b1: *const u32,
        ksteps: usize,
        c: *mut f32,
        ldc: usize,
        start: super::Start,
    ) {
        use std::arch::asm;
        match start {
            super::Start::Zero => asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            ),
            // C's f32 values as they are: a sum continued from a store is
            // the same sum (tile loads and stores of f32 are exact).
            super::Start::Accumulate => asm!(
                "tileloadd tmm0, [{c0} + {sc}*1]",
                "tileloadd tmm1, [{c1} + {sc}*1]",
                "tileloadd tmm2, [{c2} + {sc}*1]",
                "tileloadd tmm3, [{c3} + {sc}*1]",
                c0 = in(reg) c,
                c1 = in(reg) c.add(16),
                c2 = in(reg) c.add(16 * ldc),
                c3 = in(reg) c.add(16 * ldc + 16),
                sc = in(reg) ldc * 4,
                options(nostack, readonly)
            ),
        }
        let stride = 64usize;
        // Prefetches (no effect on results): C's 32 rows of 128 bytes for
        // writing, since the k-loop takes long enough to hide their misses
        // (the tile stores at the end otherwise wait for them), and each
        // k-step the A tiles two k-steps ahead (B's panel is the task's
        // reused operand). On the 2-core dev box: 10-25 % off the
        // K = 576 products (best of 15 alternating runs).
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
        for r in 0..32 {
            let p = c.add(r * ldc).cast::<i8>();
            _mm_prefetch::<_MM_HINT_ET0>(p);
            _mm_prefetch::<_MM_HINT_ET0>(p.add(64));
        }
        for s in 0..ksteps {
            let ahead = (s + 2).min(ksteps - 1) * 512;
            for line in 0..16 {
                _mm_prefetch::<_MM_HINT_T0>(a0.add(ahead + line * 32).cast::<i8>());
                _mm_prefetch::<_MM_HINT_T0>(a1.add(ahead + line * 32).cast::<i8>());
            }
            asm!(
                "tileloadd tmm4, [{a0} + {st}*1]",
                "tileloadd tmm6, [{b0} + {st}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {st}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {st}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(s * 512),
                a1 = in(reg) a1.add(s * 512),
                b0 = in(reg) b0.add(s * 256),
                b1 = in(reg) b1.add(s * 256),
                st = in(reg) stride,
                options(nostack, readonly)
            );
        }
        let sc = ldc * 4;
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) c.add(16 * ldc),
            c3 = in(reg) c.add(16 * ldc + 16),
            sc = in(reg) sc,
            options(nostack)
        );
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(
        _a0: *const u16,
        _a1: *const u16,
        _b0: *const u32,
        _b1: *const u32,
        _ksteps: usize,
        _c: *mut f32,
        _ldc: usize,
        _start: super::Start,
    ) {
        unreachable!("AMX is never available off x86_64")
    }
}

/// Whether the fast kernel runs on AMX tiles in this process.
pub fn amx_available() -> bool {
    amx::available()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn randn(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((rows, cols), |_| StandardNormal.sample(&mut rng))
    }

    /// f64 product of the bf16-rounded inputs: the value both kernels approximate
    /// (their only error is the f32 summation, since bf16 products are exact in f32).
    fn exact(a: &Array2<f32>, b_kn: &Array2<f32>) -> Array2<f64> {
        let a = a.mapv(|v| round_bf16(v) as f64);
        let b = b_kn.mapv(|v| round_bf16(v) as f64);
        a.dot(&b)
    }

    fn rms_err(x: &Array2<f32>, want: &Array2<f64>) -> f64 {
        let s: f64 = x
            .iter()
            .zip(want)
            .map(|(&v, &w)| (v as f64 - w).powi(2))
            .sum();
        (s / x.len() as f64).sqrt()
    }

    #[test]
    fn rounding_matches_half_and_flushes_subnormals() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..100_000 {
            let v: f32 = StandardNormal.sample(&mut rng);
            let v = v * 1e3;
            assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
        for v in [0.0f32, -0.0, 1.0, -2.5, f32::MAX, f32::INFINITY, 65504.0] {
            assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
        assert_eq!(bf16_bits(1e-40), 0);
        assert_eq!(bf16_bits(-1e-40), 0x8000);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        // ties go to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
    }

    /// [`convert`] (`VCVTNEPS2BF16` where the CPU has it) against its twin on
    /// every kind of f32: random bit patterns (NaNs with every payload,
    /// subnormals, infinities, ties), lengths around the 16-value steps so the
    /// masked tail runs. Where the instruction is absent both sides are the
    /// twin, which the test says.
    #[test]
    fn convert_equals_its_twin_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if !has_bf16_convert() {
            eprintln!("no AVX512-BF16 here: convert is its twin");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        use rand::Rng;
        for len in (0..70).chain([255, 256, 257, 1000]) {
            for _ in 0..50 {
                let x: Vec<f32> = (0..len)
                    .map(|i| match i % 3 {
                        0 => f32::from_bits(rng.random()),
                        1 => StandardNormal.sample(&mut rng),
                        // ties and values next to them: low 16 bits near 0x8000
                        _ => f32::from_bits(
                            (rng.random::<u32>() & 0xffff_0000) | rng.random_range(0x7ffe..=0x8001),
                        ),
                    })
                    .collect();
                let (mut fast, mut slow) = (vec![0u16; len], vec![1u16; len]);
                convert(&x, &mut fast);
                convert_slow(&x, &mut slow);
                for ((f, s), v) in fast.iter().zip(&slow).zip(&x) {
                    assert_eq!(
                        f,
                        s,
                        "{v:e} ({:#010x}): fast {f:#06x}, twin {s:#06x}",
                        v.to_bits()
                    );
                }
            }
        }
        let edge = [
            0.0f32,
            -0.0,
            1e-40,
            -1e-40,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1.0 + 1.0 / 256.0,
        ];
        let (mut fast, mut slow) = ([0u16; 11], [0u16; 11]);
        convert(&edge, &mut fast);
        convert_slow(&edge, &mut slow);
        assert_eq!(fast, slow);
    }

    /// One check per shape, run on both kernels: the slow twin's error against
    /// the f64 product of the rounded inputs is pure f32 summation error
    /// (~sqrt(K)·2^-24·|terms|); the fast kernel must stay within 2x of it.
    /// Awkward shapes exercise every padding edge (m, k, n not multiples of 32).
    #[test]
    fn matmul_fast_within_twice_the_slow_twins_error() {
        let check = |m: usize, k: usize, n: usize| {
            let a = randn(m, k, (m * 1000 + k) as u64);
            let w = randn(n, k, (n * 7 + k) as u64);
            let want = exact(&a, &w.t().to_owned());
            let ar = Bf16Rows::new(a.view());
            let b = Bf16Vnni::from_nk(w.view());
            let slow = matmul(&ar, &b, Kernel::Slow);
            let fast = matmul(&ar, &b, Kernel::Fast);
            assert_eq!(fast.dim(), (m, n));
            let (es, ef) = (rms_err(&slow, &want), rms_err(&fast, &want));
            // the slow twin sums in order: its error is f32 rounding only
            let scale = (k as f64).sqrt();
            assert!(es < 1e-6 * scale, "{m}x{k}x{n}: slow error {es}");
            assert!(ef <= 2.0 * es + 1e-7, "{m}x{k}x{n}: fast {ef} vs slow {es}");
            // from_kn of the transposed weight is the same operand
            assert_eq!(Bf16Vnni::from_kn(w.t()), b);
        };
        check(1, 1, 1);
        check(5, 33, 7);
        check(32, 32, 32);
        check(97, 576, 192);
        check(64, 1536, 65);
        check(513, 64, 129);
    }

    #[test]
    fn gram_is_symmetric_and_close_to_f64() {
        let xs: Vec<Array2<f32>> = [(300, 70), (1900, 70), (1, 70)]
            .iter()
            .enumerate()
            .map(|(i, &(t, d))| randn(t, d, 50 + i as u64))
            .collect();
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let all = ndarray::concatenate(ndarray::Axis(0), &views).unwrap();
        let r = all.mapv(|v| round_bf16(v) as f64);
        let want = r.t().dot(&r);
        let err = |g: &Array2<f64>| {
            (g.iter()
                .zip(&want)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                / g.len() as f64)
                .sqrt()
        };
        let slow = gram(&views, Kernel::Slow);
        let fast = gram(&views, Kernel::Fast);
        for g in [&slow, &fast] {
            assert_eq!(g, &g.t().to_owned(), "exactly symmetric");
        }
        // the slow twin's f32 sums obey the worst-case bound of a serial sum of
        // n terms: |error| <= n·2^-24·Σ|terms| (Higham), n = GRAM_CHUNK
        let abs = r.t().mapv(f64::abs).dot(&r.mapv(f64::abs));
        let u = GRAM_CHUNK as f64 * 2f64.powi(-24);
        for ((&g, &w), &a) in slow.iter().zip(&want).zip(&abs) {
            assert!((g - w).abs() <= u * a, "slow {g} vs {w} (bound {})", u * a);
        }
        let (es, ef) = (err(&slow), err(&fast));
        assert!(ef <= 2.0 * es + 1e-6, "fast {ef} vs slow {es}");
        // the k-pass kernel (C tiles stored and reloaded every GRAM_KSUB
        // k-steps) gives exactly the sums of one unbroken AMX product per chunk
        let rows: Vec<&[f32]> = xs
            .iter()
            .flat_map(|x| x.as_slice().unwrap().chunks_exact(70))
            .collect();
        let mut whole = Array2::<f64>::zeros((70, 70));
        for chunk in rows.chunks(GRAM_CHUNK) {
            let (a, b) = gram_operands(chunk, 70);
            let c = matmul_region(&a, &b, Region::Upper, Kernel::Fast);
            for i in 0..70 {
                for j in i..70 {
                    whole[[i, j]] += c[[i, j]] as f64;
                    whole[[j, i]] = whole[[i, j]];
                }
            }
        }
        assert_eq!(fast, whole, "k passes change no bit");
    }

    /// One attention case: 9 query heads over 3 KV heads of 64, `t` query rows
    /// after `start` cached positions; q, k, v from `seed` and the row offsets.
    struct AttentionCase {
        heads: Heads,
        q: Array2<f32>,
        k: Array2<f32>,
        v: Array2<f32>,
        offs: Vec<usize>,
    }

    impl AttentionCase {
        fn new(start: usize, t: usize, seed: u64) -> Self {
            let heads = Heads {
                n_heads: 9,
                n_kv_heads: 3,
                head_dim: 64,
            };
            let end = start + t;
            let kvd = heads.n_kv_heads * heads.head_dim;
            AttentionCase {
                heads,
                q: randn(t, heads.n_heads * heads.head_dim, seed + t as u64),
                k: randn(end, kvd, seed + 1 + t as u64),
                v: randn(end, kvd, seed + 2 + t as u64),
                offs: (0..end).map(|p| p * kvd).collect(),
            }
        }

        fn kv(&self) -> LayerKv<'_> {
            LayerKv {
                k: self.k.as_slice().unwrap(),
                v: self.v.as_slice().unwrap(),
                offs: &self.offs,
            }
        }
    }

    /// Causal GQA attention (9 query heads over 3 KV heads, a prefix already in
    /// the cache and a fresh prompt) against f64 attention of the bf16-rounded
    /// q, k, v: the fast kernel within 2x the slow twin's error; both round the
    /// probabilities to bf16, so both errors are ~2^-9 relative.
    #[test]
    fn attention_fast_within_twice_the_slow_twins_error() {
        for (start, t) in [(0, 1), (0, 97), (40, 57)] {
            let case = AttentionCase::new(start, t, 11);
            let (heads, q, k, v, kv) = (case.heads, &case.q, &case.k, &case.v, case.kv());
            let hd = heads.head_dim;
            let want = Array2::from_shape_fn((t, heads.n_heads * hd), |(r, c)| {
                let (h, e) = (c / hd, c % hd);
                let g = h / (heads.n_heads / heads.n_kv_heads);
                let rb = |x: f32| round_bf16(x) as f64;
                let s: Vec<f64> = (0..=start + r)
                    .map(|p| {
                        (0..hd)
                            .map(|d| rb(q[[r, h * hd + d]]) * rb(k[[p, g * hd + d]]))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                s.iter()
                    .enumerate()
                    .map(|(p, x)| (x - m).exp() / z * rb(v[[p, g * hd + e]]))
                    .sum()
            });
            let slow = attention_causal(q.view(), kv, start, heads, Kernel::Slow);
            let fast = attention_causal(q.view(), kv, start, heads, Kernel::Fast);
            let (es, ef) = (rms_err(&slow, &want), rms_err(&fast, &want));
            assert!(es < 1e-2, "start {start} t {t}: slow {es}");
            assert!(
                ef <= 2.0 * es + 1e-7,
                "start {start} t {t}: fast {ef} vs slow {es}"
            );
        }
    }

    /// The fused (32 query rows at a time) attention equals the three whole
    /// products on AMX bit for bit: same AMX blocks, same softmax rows. Shapes
    /// with a partial row block, a start offset that is not a block multiple,
    /// and more than one row block (1025 = 32 blocks + 1 row).
    #[test]
    fn fused_attention_equals_whole_products() {
        if !amx_available() {
            eprintln!("skipped: no AMX on this machine (the fused path needs it)");
            return;
        }
        for (start, t) in [(0, 1), (0, 97), (40, 57), (0, 1025), (513, 100)] {
            let case = AttentionCase::new(start, t, 21);
            let (q, kv, heads) = (case.q.view(), case.kv(), case.heads);
            let fused = attention_causal_fused(q, kv, start, heads);
            let whole = attention_causal_unfused(q, kv, start, heads, Kernel::Fast);
            assert!(
                fused
                    .iter()
                    .zip(&whole)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "start {start} t {t}"
            );
        }
    }

    /// Row-chunked SwiGLU equals the two whole products and SiLU bit for bit
    /// (odd rows, a partial last chunk, padded columns).
    #[test]
    fn swiglu_rows_equal_whole_products() {
        for (m, k, n) in [(1, 64, 32), (97, 100, 70), (200, 576, 96)] {
            let a = Bf16Rows::new(randn(m, k, 31).view());
            let g = Bf16Vnni::from_nk(randn(n, k, 32).view());
            let u = Bf16Vnni::from_nk(randn(n, k, 33).view());
            let fast = swiglu_rows(&a, &g, &u, Kernel::Fast);
            let slow = swiglu_rows_slow(&a, &g, &u, Kernel::Fast);
            assert_eq!(fast.dim(), (m, n));
            assert!(
                fast.iter()
                    .zip(&slow)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{m}x{k}x{n}"
            );
        }
    }

    /// The tiled builders equal the column-by-column twins, padding included
    /// (dimensions not multiples of 16 or 32, and a single row or column).
    #[test]
    fn vnni_builders_equal_their_slow_twins() {
        for (r, c) in [(1, 1), (64, 512), (97, 33), (33, 70), (576, 192), (5, 300)] {
            let x = randn(r, c, (r * 1000 + c) as u64);
            assert_eq!(
                Bf16Vnni::from_nk(x.view()),
                Bf16Vnni::from_nk_slow(x.view()),
                "nk {r}x{c}"
            );
            assert_eq!(
                Bf16Vnni::from_kn(x.view()),
                Bf16Vnni::from_kn_slow(x.view()),
                "kn {r}x{c}"
            );
            assert_eq!(
                Bf16Vnni::from_kn(x.t()),
                Bf16Vnni::from_nk(x.view()),
                "kn of the transpose {r}x{c}"
            );
        }
    }

    #[test]
    fn pair_tile_equals_its_slow_twin() {
        let dp = 96;
        let buf: Vec<u16> = (0..32 * dp)
            .map(|i| (i as u16).wrapping_mul(40_503))
            .collect();
        for f0 in [0, 16, 80] {
            let (mut fast, mut slow) = ([0u32; 256], [0u32; 256]);
            pair_tile(&buf, dp, f0, &mut fast);
            pair_tile_slow(&buf, dp, f0, &mut slow);
            assert_eq!(fast, slow, "f0 {f0}");
            assert_eq!(
                slow[16 + 3],
                buf[2 * dp + f0 + 3] as u32 | (buf[3 * dp + f0 + 3] as u32) << 16
            );
        }
    }

    #[test]
    fn transpose16_equals_its_slow_twin() {
        let src: [u32; 256] = std::array::from_fn(|i| (i as u32).wrapping_mul(0x9e37_79b9) ^ 7);
        let (mut fast, mut slow) = ([0u32; 256], [0u32; 256]);
        transpose16(&src, &mut fast);
        transpose16_slow(&src, &mut slow);
        assert_eq!(fast, slow);
        assert_eq!(slow[1], src[16]);
        assert_eq!(slow[16 * 3 + 5], src[16 * 5 + 3]);
    }

    #[test]
    fn exp_is_accurate_and_reductions_are_exact() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = (-87.0 + i as f32 * 1e-5 * 175.0).min(88.0);
            let got = exp_fast(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        // the exponent from t's bits gives the same bits as the saturating
        // cast it replaced (which kept the loops scalar)
        let by_cast = |x: f32| {
            let x = x.clamp(-87.0, 88.0);
            let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
            let p = 1.0
                + r * (1.0
                    + r * (0.5
                        + r * (1.0 / 6.0
                            + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
            p * f32::from_bits(((n as i32 + 127) as u32) << 23)
        };
        for i in 0..=400_000 {
            let x = -100.0 + i as f32 * 5e-4;
            assert_eq!(exp_fast(x).to_bits(), by_cast(x).to_bits(), "x = {x}");
        }
        assert!(exp_fast(f32::NAN).is_nan());
        assert_eq!(exp_fast(0.0), 1.0);
        assert!(exp_fast(-1e4) < 1e-37);
        assert!(exp_fast(1e4).is_finite());
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 - 50.5).collect();
        for n in [0, 1, 15, 16, 17, 1000] {
            let want_max = x[..n].iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            assert_eq!(max_lanes(&x[..n]), want_max);
            // integers and halves: every partial sum is exact, so any order gives the same
            assert_eq!(sum_lanes(&x[..n]), x[..n].iter().sum::<f32>());
        }
    }
}
