//! The paged strategy: K/V in fixed-size blocks, split-KV partitions merged
//! by their log-sum-exps (vLLM's `paged_attention_v2`, flash-decoding).
//!
//! ## Layout and invariants ([`PagedKv`])
//! ```text
//!   block pool  k_blocks, v_blocks: [num_blocks, block_size, Hkv, D]
//!   block_table (one sequence):      logical block b -> physical block id
//!
//!   tokens     0 1 2 3 | 4 5 6 7 | 8 9 . .        len = 10, block_size = 4
//!   logical    block 0 | block 1 | block 2 (partial: 2 of 4 slots used)
//!   table      [   5   ,    0    ,    3   ]
//!   pool       #0: tokens 4..8   #3: tokens 8,9 + 2 unused slots   #5: tokens 0..4
//!
//!   token t lives at pool[block_table[t / block_size], t % block_size]
//! ```
//! Invariants (checked by [`PagedKv::check`], O(len / block_size)):
//! `block_table.len() == ceil(len / block_size)`, every id `< num_blocks`.
//! Physical ids need not be distinct for correctness of reading (prefix
//! sharing maps several sequences' blocks to one), and slots past `len` in
//! the last block are never read: the pool built by [`PagedPool::scrambled`]
//! fills them with NaN to prove it.
//!
//! ## Algorithm ([`attention_paged`])
//! The keys `0..len` are split into partitions of `partition_size` tokens (a
//! multiple of the block size, so a partition is whole blocks, as in vLLM).
//! For each query row `i` and head `h`, each partition that overlaps the row's
//! causal/window key range is processed like one vLLM v2 thread block: walk its
//! blocks through the block table, materialize its logits (scale · q·k, `-inf`
//! where invisible), take their maximum `m_p` and exp-sum `l_p`, and write the
//! normalized partial output `o_p = Σ exp(s - m_p) v / l_p` and
//! `lse_p = m_p + ln l_p`. The reduce step ([`merge_by_lse`]) then combines
//!
//! ```text
//!   lse = M + ln Σ_p exp(lse_p - M),   M = max_p lse_p
//!   out = Σ_p exp(lse_p - lse) · o_p
//! ```
//! which is flash-decoding's combine; vLLM's reduce kernel writes the same
//! weights as `l_p · exp(m_p - max m) / Σ_q l_q · exp(m_q - max m)`.
//! Partitions wholly outside the row's range (and rows with `Lq > 1` under
//! causal masking: chunked prefill, speculative verification) are skipped,
//! as vLLM skips partitions past the context length. Accumulation is in `T`.
//!
//! Cost: O(Lq · Hq · len · D) time, O(partition_size + partitions · D) scratch
//! per row. The slow twin is [`PagedKv::gather`] followed by the naive path.

use ndarray::{s, Array2, Array3, Array4, ArrayView3, ArrayView4};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{AttentionConfig, AttentionOutput, Dims, Float};
use crate::{Error, Result};

/// A paged KV cache as the paged strategy reads it (vLLM's layout; see the
/// module doc for the picture).
///
/// Invariant: `block_table.len() == len.div_ceil(block_size)` and every id is
/// `< num_blocks`. Checked by [`PagedKv::check`].
#[derive(Debug, Clone)]
pub struct PagedKv<'a, T> {
    pub k_blocks: ArrayView4<'a, T>,
    pub v_blocks: ArrayView4<'a, T>,
    pub block_table: &'a [u32],
    pub len: usize,
}

impl<T: Float> PagedKv<'_, T> {
    pub fn block_size(&self) -> usize {
        self.k_blocks.dim().1
    }

    pub fn check(&self) -> Result<()> {
        if self.k_blocks.dim() != self.v_blocks.dim() {
            return Err(Error::shape(
                "v_blocks",
                format!("{:?}", self.k_blocks.dim()),
                format!("{:?}", self.v_blocks.dim()),
            ));
        }
        let (nb, bs, _, _) = self.k_blocks.dim();
        if bs == 0 {
            return Err(Error::invalid("block_size", "must be positive"));
        }
        let need = self.len.div_ceil(bs);
        if self.block_table.len() != need {
            return Err(Error::invalid(
                "block_table",
                format!(
                    "{} entries for {} tokens at block size {bs}; need {need}",
                    self.block_table.len(),
                    self.len
                ),
            ));
        }
        if let Some((i, &b)) = self
            .block_table
            .iter()
            .enumerate()
            .find(|(_, &b)| b as usize >= nb)
        {
            return Err(Error::invalid(
                "block_table",
                format!("entry {i} = {b} is not < {nb} blocks"),
            ));
        }
        Ok(())
    }

    /// Copy the sequence's K and V out of the pool into contiguous `[len, Hkv, D]`.
    pub fn gather(&self) -> Result<(Array3<T>, Array3<T>)> {
        self.check()?;
        let (_, bs, hkv, d) = self.k_blocks.dim();
        let mut k = Array3::from_elem((self.len, hkv, d), T::from_f64(0.0));
        let mut v = k.clone();
        for t in 0..self.len {
            let b = self.block_table[t / bs] as usize;
            k.slice_mut(s![t, .., ..])
                .assign(&self.k_blocks.slice(s![b, t % bs, .., ..]));
            v.slice_mut(s![t, .., ..])
                .assign(&self.v_blocks.slice(s![b, t % bs, .., ..]));
        }
        Ok((k, v))
    }
}

/// Largest block size [`PagedPool::scrambled`] accepts (real caches use
/// 1..=256 tokens; a bigger block only wastes memory on unused slots).
pub const MAX_BLOCK_SIZE: usize = 1 << 16;

/// Seed [`attention`](super::attention) uses to scramble the block table.
pub const SCRAMBLE_SEED: u64 = 0x1f_e41a_b5ee_d000;

/// An owned block pool holding one sequence, for tests and the command line.
#[derive(Debug, Clone)]
pub struct PagedPool<T> {
    pub k_blocks: Array4<T>,
    pub v_blocks: Array4<T>,
    pub block_table: Vec<u32>,
    pub len: usize,
}

impl<T: Float> PagedPool<T> {
    /// Scatter contiguous `k`, `v` (`[len, Hkv, D]`) into a pool of
    /// `ceil(len / block_size) + ceil(len / block_size) / 2 + 1` blocks whose
    /// physical order is a seeded shuffle (ChaCha8), so logical block `b`
    /// rarely sits at physical `b`. Every slot not holding a token (spare
    /// blocks, the tail of the last block) is NaN.
    pub fn scrambled(
        k: ArrayView3<T>,
        v: ArrayView3<T>,
        block_size: usize,
        seed: u64,
    ) -> Result<Self> {
        if k.dim() != v.dim() {
            return Err(Error::shape(
                "v",
                format!("{:?} (same as k)", k.dim()),
                format!("{:?}", v.dim()),
            ));
        }
        if block_size == 0 || block_size > MAX_BLOCK_SIZE {
            return Err(Error::invalid(
                "block_size",
                format!("{block_size} is not in 1..={MAX_BLOCK_SIZE}"),
            ));
        }
        let (len, hkv, d) = k.dim();
        let need = len.div_ceil(block_size);
        let total = need + need / 2 + 1;
        if u32::try_from(total).is_err() {
            return Err(Error::invalid(
                "block_size",
                format!("{total} blocks do not fit u32 block ids"),
            ));
        }
        if total
            .checked_mul(block_size)
            .and_then(|x| x.checked_mul(hkv))
            .and_then(|x| x.checked_mul(d))
            .is_none()
        {
            return Err(Error::invalid("block_size", "pool size overflows"));
        }
        let mut ids: Vec<u32> = (0..total as u32).collect();
        ids.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        ids.truncate(need);
        let nan = T::from_f64(f64::NAN);
        let mut k_blocks = Array4::from_elem((total, block_size, hkv, d), nan);
        let mut v_blocks = k_blocks.clone();
        for t in 0..len {
            let b = ids[t / block_size] as usize;
            k_blocks
                .slice_mut(s![b, t % block_size, .., ..])
                .assign(&k.slice(s![t, .., ..]));
            v_blocks
                .slice_mut(s![b, t % block_size, .., ..])
                .assign(&v.slice(s![t, .., ..]));
        }
        Ok(PagedPool {
            k_blocks,
            v_blocks,
            block_table: ids,
            len,
        })
    }

    pub fn view(&self) -> PagedKv<'_, T> {
        PagedKv {
            k_blocks: self.k_blocks.view(),
            v_blocks: self.v_blocks.view(),
            block_table: &self.block_table,
            len: self.len,
        }
    }
}

/// Merge split-KV partial results by their log-sum-exps (flash-decoding's
/// combine, vLLM v2's reduce). `lses[p]` and the row `outs[p·D .. (p+1)·D]`
/// are partition `p`'s LSE and normalized output; `out` (length D) receives
/// the merged output and the merged LSE is returned. Partitions with
/// `lse = -inf` (nothing visible) weigh zero; if all do, `out` is zeros and
/// the result is `-inf`.
pub fn merge_by_lse<T: Float>(lses: &[T], outs: &[T], out: &mut [T]) -> T {
    let d = out.len();
    assert_eq!(outs.len(), lses.len() * d, "outs must hold one row per lse");
    let zero = T::from_f64(0.0);
    out.fill(zero);
    let mut max = T::NEG_INFINITY;
    for &x in lses {
        if x > max {
            max = x;
        }
    }
    if max == T::NEG_INFINITY {
        return max;
    }
    let mut sum = zero;
    for &x in lses {
        sum = sum + (x - max).exp();
    }
    let lse = max + sum.ln();
    for (p, &x) in lses.iter().enumerate() {
        if x == T::NEG_INFINITY {
            continue;
        }
        let w = (x - lse).exp();
        for (o, y) in out.iter_mut().zip(&outs[p * d..][..d]) {
            *o = *o + w * *y;
        }
    }
    lse
}

/// Attention over a paged cache. `q` is `[Lq, Hq, D]`; the cache holds all
/// `len` keys (the queries are its last `Lq` positions under causal masking).
/// `partition_size` splits the keys into partitions merged by their LSEs
/// (flash-decoding); it must be a positive multiple of the block size.
pub fn attention_paged<T: Float>(
    q: ArrayView3<T>,
    kv: &PagedKv<'_, T>,
    partition_size: usize,
    cfg: &AttentionConfig,
) -> Result<AttentionOutput<T>> {
    kv.check()?;
    let (_, bs, hkv_pool, d_pool) = kv.k_blocks.dim();
    if partition_size == 0 || partition_size % bs != 0 {
        return Err(Error::invalid(
            "partition_size",
            format!("{partition_size} is not a positive multiple of the block size {bs}"),
        ));
    }
    let dims = Dims::from_shapes(q.dim(), (kv.len, hkv_pool, d_pool), cfg)?;
    let Dims { lq, hq, hkv, d, .. } = dims;
    let group = dims.group();
    let scale = T::from_f64(dims.scale(cfg));
    let zero = T::from_f64(0.0);
    let neg_inf = T::NEG_INFINITY;
    let q = q.as_standard_layout();
    let q = q.as_slice().expect("standard layout");
    let kp = kv.k_blocks.as_standard_layout();
    let vp = kv.v_blocks.as_standard_layout();
    let (kp, vp) = (
        kp.as_slice().expect("standard layout"),
        vp.as_slice().expect("standard layout"),
    );
    // Offset of (physical block, slot, kv head) in the flat pool.
    let at = |block: usize, slot: usize, kh: usize| ((block * bs + slot) * hkv + kh) * d;

    let num_partitions = kv.len.div_ceil(partition_size);
    let mut out = Array3::<T>::from_elem((lq, hq, d), zero);
    let mut lse = Array2::<T>::from_elem((lq, hq), neg_inf);
    // A partition holds at most min(partition_size, len) tokens.
    let mut logits = vec![zero; partition_size.min(kv.len)];
    let mut part_out = vec![zero; num_partitions * d];
    let mut part_lse = vec![neg_inf; num_partitions];
    let mut merged = vec![zero; d];

    for i in 0..lq {
        let (lo, hi) = dims.key_range(cfg, i);
        if lo >= hi {
            continue; // sees no key
        }
        let (p_first, p_end) = (lo / partition_size, hi.div_ceil(partition_size));
        for h in 0..hq {
            let kh = h / group;
            let qrow = &q[(i * hq + h) * d..][..d];
            for p in p_first..p_end {
                // Tokens of this partition the row may see by causality/window.
                let t0 = (p * partition_size).max(lo);
                let t1 = ((p + 1) * partition_size).min(hi);
                let base = p * partition_size;
                // Logits, walking whole blocks through the block table.
                let mut m = neg_inf;
                for b in t0 / bs..t1.div_ceil(bs) {
                    let phys = kv.block_table[b] as usize;
                    for t in (b * bs).max(t0)..((b + 1) * bs).min(t1) {
                        let sl = &mut logits[t - base];
                        *sl = if dims.visible(cfg, i, t) {
                            let krow = &kp[at(phys, t - b * bs, kh)..][..d];
                            let mut dot = zero;
                            for (a, c) in qrow.iter().zip(krow) {
                                dot = dot + *a * *c;
                            }
                            scale * dot
                        } else {
                            neg_inf
                        };
                        if *sl > m {
                            m = *sl;
                        }
                    }
                }
                let o = &mut part_out[p * d..][..d];
                o.fill(zero);
                if m == neg_inf {
                    part_lse[p] = neg_inf; // nothing visible in this partition
                    continue;
                }
                let mut sum = zero;
                for t in t0..t1 {
                    let sl = &mut logits[t - base];
                    *sl = if *sl == neg_inf {
                        zero
                    } else {
                        (*sl - m).exp()
                    };
                    sum = sum + *sl;
                }
                // vLLM normalizes the partition's probabilities before P·V.
                for b in t0 / bs..t1.div_ceil(bs) {
                    let phys = kv.block_table[b] as usize;
                    for t in (b * bs).max(t0)..((b + 1) * bs).min(t1) {
                        let pr = logits[t - base];
                        if pr == zero {
                            continue; // invisible (or underflowed): never touch its V
                        }
                        let pr = pr / sum;
                        let vrow = &vp[at(phys, t - b * bs, kh)..][..d];
                        for (oo, x) in o.iter_mut().zip(vrow) {
                            *oo = *oo + pr * *x;
                        }
                    }
                }
                part_lse[p] = m + sum.ln();
            }
            let l = merge_by_lse(
                &part_lse[p_first..p_end],
                &part_out[p_first * d..p_end * d],
                &mut merged,
            );
            lse[[i, h]] = l;
            out.slice_mut(s![i, h, ..])
                .iter_mut()
                .zip(&merged)
                .for_each(|(o, &x)| *o = x);
        }
    }
    Ok(AttentionOutput { out, lse })
}
