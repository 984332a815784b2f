//! Exact attention: one function, three strategies.
//!
//! `O = softmax(scale · Q Kᵀ + mask) V` per query head, where query head `h`
//! reads KV head `h / (Hq / Hkv)` (grouped-query attention; MQA when Hkv = 1).
//!
//! Layouts (row-major, as the `inferlab attention` command reads them):
//! ```text
//!   q: [Lq, Hq, D]     k, v: [Lk, Hkv, D]     out: [Lq, Hq, D]    lse: [Lq, Hq]
//! ```
//!
//! ## Causal convention: bottom-right aligned
//! When `Lq < Lk` (decode, chunked prefill, speculative verification with a
//! cache), query row `i` sits at absolute position `p(i) = Lk - Lq + i` and may
//! see key `j` iff `j <= p(i)`. With a sliding window `W`, additionally
//! `p(i) - j < W`. This is FlashAttention-2 (>= 2.1) and vLLM's convention.
//! A query row that sees no key (possible only with an explicit mask) outputs
//! zeros and `lse = -inf`.
//!
//! Strategies ([`Strategy`]): `naive` materializes the scores and accumulates in
//! f64; `tiled` is FlashAttention-2's online softmax over key tiles; `paged`
//! reads K/V through a block table and merges split-KV partitions by their
//! log-sum-exps (flash-decoding, vLLM's v2 kernel).

use ndarray::{Array2, Array3, ArrayView2, ArrayView3};

use crate::{Error, Result};

/// Floating types the oracle runs in.
pub trait Float:
    num_traits_like::FloatLike + ndarray::LinalgScalar + Send + Sync + std::fmt::Debug + 'static
{
}
impl Float for f32 {}
impl Float for f64 {}

/// Minimal float conversions the oracle needs (avoids a num-traits dependency in the API).
pub mod num_traits_like {
    pub trait FloatLike: Copy + PartialOrd {
        fn to_f64(self) -> f64;
        fn from_f64(x: f64) -> Self;
    }
    impl FloatLike for f32 {
        fn to_f64(self) -> f64 {
            self as f64
        }
        fn from_f64(x: f64) -> Self {
            x as f32
        }
    }
    impl FloatLike for f64 {
        fn to_f64(self) -> f64 {
            self
        }
        fn from_f64(x: f64) -> Self {
            x
        }
    }
}

/// Which keys a query may see (besides an explicit mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Masking {
    /// Every query sees every key.
    #[default]
    None,
    /// Bottom-right causal (see the module doc).
    Causal,
}

/// The attention problem's options, shared by all strategies.
#[derive(Debug, Clone, Default)]
pub struct AttentionConfig<'a> {
    pub masking: Masking,
    /// Sliding window `W`: a query at position p sees keys p-W+1..=p.
    pub window: Option<usize>,
    /// Softmax scale; `None` means `1/sqrt(D)`.
    pub scale: Option<f64>,
    /// Explicit boolean mask `[Lq, Lk]`, `true` = may attend; combined (AND)
    /// with the causal mask and window (tree attention uses it).
    pub mask: Option<ArrayView2<'a, bool>>,
}

/// Output of one attention call.
#[derive(Debug, Clone)]
pub struct AttentionOutput<T> {
    /// `[Lq, Hq, D]`
    pub out: Array3<T>,
    /// Natural-log log-sum-exp of the scaled, masked scores, `[Lq, Hq]`.
    pub lse: Array2<T>,
}

/// Shapes checked once, shared by all strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub lq: usize,
    pub lk: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
}

impl Dims {
    /// Validate q/k/v (and mask) shapes.
    pub fn check<T>(
        q: &ArrayView3<T>,
        k: &ArrayView3<T>,
        v: &ArrayView3<T>,
        cfg: &AttentionConfig,
    ) -> Result<Dims> {
        let (lq, hq, d) = q.dim();
        let (lk, hkv, dk) = k.dim();
        if v.dim() != k.dim() {
            return Err(Error::shape(
                "v",
                format!("{:?} (same as k)", k.dim()),
                format!("{:?}", v.dim()),
            ));
        }
        if dk != d {
            return Err(Error::shape(
                "k",
                format!("[Lk, Hkv, {d}] (head dim of q)"),
                format!("{:?}", k.dim()),
            ));
        }
        if hkv == 0 || hq % hkv != 0 {
            return Err(Error::invalid(
                "heads",
                format!("query heads {hq} not divisible by KV heads {hkv}"),
            ));
        }
        if d == 0 {
            return Err(Error::invalid("head_dim", "must be positive"));
        }
        if let Some(m) = &cfg.mask {
            if m.dim() != (lq, lk) {
                return Err(Error::shape(
                    "mask",
                    format!("[{lq}, {lk}]"),
                    format!("{:?}", m.dim()),
                ));
            }
        }
        if cfg.window == Some(0) {
            return Err(Error::invalid("window", "must be at least 1"));
        }
        if let Some(s) = cfg.scale {
            if !s.is_finite() {
                return Err(Error::invalid("scale", format!("{s} is not finite")));
            }
        }
        if lq > lk && cfg.masking == Masking::Causal {
            return Err(Error::invalid(
                "causal",
                format!("bottom-right causal attention needs Lq <= Lk, got Lq = {lq}, Lk = {lk}"),
            ));
        }
        Ok(Dims { lq, lk, hq, hkv, d })
    }

    /// Whether query row `i` may see key `j` (causal + window; not the explicit mask).
    #[inline]
    pub fn visible(&self, cfg: &AttentionConfig, i: usize, j: usize) -> bool {
        let pos = (self.lk + i) as isize - self.lq as isize;
        let j = j as isize;
        if cfg.masking == Masking::Causal && j > pos {
            return false;
        }
        if let Some(w) = cfg.window {
            if pos - j >= w as isize {
                return false;
            }
        }
        if let Some(m) = &cfg.mask {
            if !m[[i, j as usize]] {
                return false;
            }
        }
        true
    }
}

/// The three strategies, selectable from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Naive,
    Tiled {
        q_tile: usize,
        k_tile: usize,
    },
    Paged {
        block_size: usize,
        partition_size: usize,
    },
}

/// Reference attention: materialized scores, f64 accumulation.
pub fn attention_naive<T: Float>(
    q: ArrayView3<T>,
    k: ArrayView3<T>,
    v: ArrayView3<T>,
    cfg: &AttentionConfig,
) -> Result<AttentionOutput<T>> {
    let dims = Dims::check(&q, &k, &v, cfg)?;
    let Dims { lq, lk, hq, hkv, d } = dims;
    let group = hq / hkv;
    let scale = cfg.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let mut out = Array3::<T>::from_elem((lq, hq, d), T::from_f64(0.0));
    let mut lse = Array2::<T>::from_elem((lq, hq), T::from_f64(f64::NEG_INFINITY));
    let mut scores = vec![0f64; lk];
    let mut acc = vec![0f64; d];
    for i in 0..lq {
        for h in 0..hq {
            let kh = h / group;
            let mut m = f64::NEG_INFINITY;
            for j in 0..lk {
                scores[j] = if dims.visible(cfg, i, j) {
                    let mut s = 0f64;
                    for x in 0..d {
                        s += q[[i, h, x]].to_f64() * k[[j, kh, x]].to_f64();
                    }
                    s * scale
                } else {
                    f64::NEG_INFINITY
                };
                if scores[j] > m {
                    m = scores[j];
                }
            }
            if m == f64::NEG_INFINITY {
                continue;
            }
            let mut sum = 0f64;
            acc.iter_mut().for_each(|a| *a = 0.0);
            for j in 0..lk {
                if scores[j] == f64::NEG_INFINITY {
                    continue;
                }
                let p = (scores[j] - m).exp();
                sum += p;
                for x in 0..d {
                    acc[x] += p * v[[j, kh, x]].to_f64();
                }
            }
            for x in 0..d {
                out[[i, h, x]] = T::from_f64(acc[x] / sum);
            }
            lse[[i, h]] = T::from_f64(m + sum.ln());
        }
    }
    Ok(AttentionOutput { out, lse })
}

/// A paged KV cache as the paged strategy reads it (vLLM's layout).
///
/// ```text
///   k_blocks, v_blocks: [num_blocks, block_size, Hkv, D]   (the block pool)
///   block_table: logical block b of this sequence -> physical block id
///   token t lives at k_blocks[block_table[t / block_size], t % block_size]
///   len: tokens in the sequence; the last block may be partial
/// ```
/// Invariant: `block_table.len() == len.div_ceil(block_size)` and every id is
/// `< num_blocks`. Checked by [`PagedKv::check`].
#[derive(Debug, Clone)]
pub struct PagedKv<'a, T> {
    pub k_blocks: ndarray::ArrayView4<'a, T>,
    pub v_blocks: ndarray::ArrayView4<'a, T>,
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
            k.slice_mut(ndarray::s![t, .., ..])
                .assign(&self.k_blocks.slice(ndarray::s![b, t % bs, .., ..]));
            v.slice_mut(ndarray::s![t, .., ..])
                .assign(&self.v_blocks.slice(ndarray::s![b, t % bs, .., ..]));
        }
        Ok((k, v))
    }
}

/// Attention over a paged cache. `q` is `[Lq, Hq, D]`; the cache holds all
/// `len` keys (the queries are its last `Lq` positions under causal masking).
/// `partition_size` splits the keys into partitions merged by their LSEs
/// (flash-decoding); it must be a multiple of the block size.
pub fn attention_paged<T: Float>(
    q: ArrayView3<T>,
    kv: &PagedKv<'_, T>,
    partition_size: usize,
    cfg: &AttentionConfig,
) -> Result<AttentionOutput<T>> {
    let bs = kv.block_size();
    if partition_size == 0 || partition_size % bs.max(1) != 0 {
        return Err(Error::invalid(
            "partition_size",
            format!("{partition_size} is not a positive multiple of the block size {bs}"),
        ));
    }
    // Simple, correct form; the split-KV version replaces this body.
    let (k, v) = kv.gather()?;
    attention_naive(q, k.view(), v.view(), cfg)
}
