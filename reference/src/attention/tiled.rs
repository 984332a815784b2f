//! The tiled strategy: FlashAttention-2's online softmax, on the CPU.
//!
//! Queries are cut into tiles of `q_tile` rows, keys into tiles of `k_tile`
//! columns (aligned at multiples of `k_tile`, as a kernel's thread blocks
//! are). For one query row, after key tiles `1..=t` the state is
//!
//! ```text
//!   m_t = max(m_{t-1}, rowmax(S_t))                  running maximum
//!   P_t = exp(S_t - m_t)                             (invisible scores are -inf -> 0)
//!   l_t = exp(m_{t-1} - m_t) · l_{t-1} + rowsum(P_t) running sum
//!   O_t = exp(m_{t-1} - m_t) · O_{t-1} + P_t V_t     unnormalized accumulator
//! ```
//! and at the end `out = O_T / l_T`, `lse = m_T + ln l_T` (FlashAttention-2,
//! Algorithm 1; the division is deferred to the end, which is FA-2's change
//! over FA-1). Every quantity lives in `T`, the input precision: this path
//! shows what a kernel that accumulates in the input type gets, and the f32
//! test holds it to FlashAttention's rule (at most 2x the error of a plain f32
//! implementation).
//!
//! Fully-masked tiles and rows: while a row has seen no visible key, `m` is
//! `-inf` and a tile whose row maximum is also `-inf` is skipped for that row
//! (computing `exp(-inf - -inf)` would give NaN). A row that never sees a key
//! keeps `l = 0` and outputs zeros with `lse = -inf`. Key tiles that lie wholly
//! outside the causal/window range of every row of the query tile are not
//! visited at all (the kernel's block skipping).
//!
//! Cost: O(Lq · Hq · Lk · D) time, O(q_tile · (k_tile + D)) scratch.

use ndarray::{Array2, Array3, ArrayView3};

use super::{flat, AttentionConfig, AttentionOutput, Dims, Float};
use crate::{Error, Result};

/// FlashAttention-2 style attention with `q_tile × k_tile` tiles, accumulating in `T`.
pub fn attention_tiled<T: Float>(
    q: ArrayView3<T>,
    k: ArrayView3<T>,
    v: ArrayView3<T>,
    cfg: &AttentionConfig,
    q_tile: usize,
    k_tile: usize,
) -> Result<AttentionOutput<T>> {
    let dims = Dims::check(&q, &k, &v, cfg)?;
    if q_tile == 0 {
        return Err(Error::invalid("q_tile", "must be positive"));
    }
    if k_tile == 0 {
        return Err(Error::invalid("k_tile", "must be positive"));
    }
    let Dims { lq, hq, hkv, d, .. } = dims;
    let group = dims.group();
    let scale = T::from_f64(dims.scale(cfg));
    let zero = T::from_f64(0.0);
    let neg_inf = T::NEG_INFINITY;
    let (q, k, v) = (flat(&q), flat(&k), flat(&v));
    let (q, k, v) = (
        q.as_slice().expect("standard layout"),
        k.as_slice().expect("standard layout"),
        v.as_slice().expect("standard layout"),
    );

    let mut out = Array3::<T>::from_elem((lq, hq, d), zero);
    let mut lse = Array2::<T>::from_elem((lq, hq), neg_inf);
    // Per-row state of one query tile (FA-2 keeps these in registers).
    // Sized by the problem, not by the tile arguments (a tile larger than
    // the sequence is one tile).
    let (qt, kt) = (q_tile.min(lq), k_tile.min(dims.lk));
    let mut m = vec![neg_inf; qt];
    let mut l = vec![zero; qt];
    let mut acc = vec![zero; qt * d];
    let mut s = vec![zero; kt];

    for h in 0..hq {
        let kh = h / group;
        for i0 in (0..lq).step_by(q_tile) {
            let i1 = i0.saturating_add(q_tile).min(lq);
            m.fill(neg_inf);
            l.fill(zero);
            acc.fill(zero);
            // Keys any row of this tile may see (ranges move right with i).
            let lo = dims.key_range(cfg, i0).0;
            let hi = dims.key_range(cfg, i1 - 1).1;
            let first_tile = lo / k_tile * k_tile;
            for j0 in (first_tile..hi).step_by(k_tile) {
                let j1 = j0.saturating_add(k_tile).min(hi);
                for i in i0..i1 {
                    let r = i - i0;
                    let qrow = &q[(i * hq + h) * d..][..d];
                    // S = scale · q Kᵀ over the tile, -inf where invisible.
                    let mut tile_max = neg_inf;
                    for (j, sj) in (j0..j1).zip(s.iter_mut()) {
                        *sj = if dims.visible(cfg, i, j) {
                            let krow = &k[(j * hkv + kh) * d..][..d];
                            let mut dot = zero;
                            for (a, b) in qrow.iter().zip(krow) {
                                dot = dot + *a * *b;
                            }
                            scale * dot
                        } else {
                            neg_inf
                        };
                        if *sj > tile_max {
                            tile_max = *sj;
                        }
                    }
                    let m_new = if tile_max > m[r] { tile_max } else { m[r] };
                    if m_new == neg_inf {
                        continue; // nothing visible yet for this row
                    }
                    // exp(-inf) = 0 when this is the row's first visible tile.
                    let alpha = (m[r] - m_new).exp();
                    let row = &mut acc[r * d..][..d];
                    if alpha != T::from_f64(1.0) {
                        l[r] = alpha * l[r];
                        row.iter_mut().for_each(|o| *o = alpha * *o);
                    }
                    for (j, &sj) in (j0..j1).zip(s.iter()) {
                        if sj == neg_inf {
                            continue;
                        }
                        let p = (sj - m_new).exp();
                        l[r] = l[r] + p;
                        let vrow = &v[(j * hkv + kh) * d..][..d];
                        for (o, x) in row.iter_mut().zip(vrow) {
                            *o = *o + p * *x;
                        }
                    }
                    m[r] = m_new;
                }
            }
            for i in i0..i1 {
                let r = i - i0;
                if m[r] == neg_inf {
                    continue; // saw no key: zeros, lse = -inf
                }
                for x in 0..d {
                    out[[i, h, x]] = acc[r * d + x] / l[r];
                }
                lse[[i, h]] = m[r] + l[r].ln();
            }
        }
    }
    Ok(AttentionOutput { out, lse })
}
