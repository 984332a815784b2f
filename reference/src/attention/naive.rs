//! The naive strategy: the definition, written out.
//!
//! For each query row and head, materialize the row of scaled scores over all
//! `Lk` keys (`-inf` where invisible), subtract the row maximum, exponentiate,
//! normalize and multiply by V. Everything after the inputs is f64, whatever
//! `T` is: in f64 this is as exact as the definition allows (errors of a few
//! ulps times `Lk`), in f32 it is the f64 answer to the f32 inputs, rounded
//! once. It is the oracle the tiled and paged strategies are checked against.
//!
//! Cost: O(Lq · Hq · Lk · D) time, O(Lk + D) scratch.

use ndarray::{Array2, Array3, ArrayView3};

use super::{flat, AttentionConfig, AttentionOutput, Dims, Float};
use crate::Result;

/// Reference attention: materialized scores, f64 accumulation.
pub fn attention_naive<T: Float>(
    q: ArrayView3<T>,
    k: ArrayView3<T>,
    v: ArrayView3<T>,
    cfg: &AttentionConfig,
) -> Result<AttentionOutput<T>> {
    let dims = Dims::check(&q, &k, &v, cfg)?;
    let Dims { lq, lk, hq, hkv, d } = dims;
    let group = dims.group();
    let scale = dims.scale(cfg);
    let (q, k, v) = (flat(&q), flat(&k), flat(&v));
    let (q, k, v) = (
        q.as_slice().expect("standard layout"),
        k.as_slice().expect("standard layout"),
        v.as_slice().expect("standard layout"),
    );
    let mut out = Array3::<T>::from_elem((lq, hq, d), T::from_f64(0.0));
    let mut lse = Array2::<T>::from_elem((lq, hq), T::NEG_INFINITY);
    let mut scores = vec![0f64; lk];
    let mut acc = vec![0f64; d];
    for i in 0..lq {
        for h in 0..hq {
            let kh = h / group;
            let qrow = &q[(i * hq + h) * d..][..d];
            let mut m = f64::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = if dims.visible(cfg, i, j) {
                    let krow = &k[(j * hkv + kh) * d..][..d];
                    let mut dot = 0f64;
                    for (a, b) in qrow.iter().zip(krow) {
                        dot += a.to_f64() * b.to_f64();
                    }
                    dot * scale
                } else {
                    f64::NEG_INFINITY
                };
                if *s > m {
                    m = *s;
                }
            }
            if m == f64::NEG_INFINITY {
                // Sees no key: zeros and lse = -inf (already there).
                continue;
            }
            let mut sum = 0f64;
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (j, &s) in scores.iter().enumerate() {
                if s == f64::NEG_INFINITY {
                    continue;
                }
                let p = (s - m).exp();
                sum += p;
                let vrow = &v[(j * hkv + kh) * d..][..d];
                for (a, x) in acc.iter_mut().zip(vrow) {
                    *a += p * x.to_f64();
                }
            }
            for (x, a) in acc.iter().enumerate() {
                out[[i, h, x]] = T::from_f64(a / sum);
            }
            lse[[i, h]] = T::from_f64(m + sum.ln());
        }
    }
    Ok(AttentionOutput { out, lse })
}
