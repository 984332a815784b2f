//! Exact attention: one function, three strategies.
//!
//! `O = softmax(scale · Q Kᵀ + mask) V` per query head, where query head `h`
//! reads KV head `h / (Hq / Hkv)` (grouped-query attention; MQA when Hkv = 1).
//! This is the grouping of Hugging Face's `repeat_kv`: query heads
//! `g·G .. (g+1)·G` share KV head `g`, with `G = Hq / Hkv`.
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
//! `p(i) - j < W` (the window applies with or without causal masking; without
//! it, keys after `p(i)` stay visible). This is FlashAttention-2 (>= 2.1) and
//! vLLM's convention.
//! ```text
//!   Lq = 2, Lk = 5, causal        keys: 0 1 2 3 4
//!   query 0 (position 3)                x x x x .
//!   query 1 (position 4)                x x x x x
//! ```
//! Causal masking with `Lq > Lk` is rejected (the first rows would sit at
//! negative positions). A query row that sees no key (possible with an
//! explicit mask, a window without causality, or `Lk = 0`) outputs zeros and
//! `lse = -inf`, never NaN.
//!
//! ## Strategies ([`Strategy`], one entry point [`attention`])
//! - [`attention_naive`] (`naive.rs`): materializes a row of scores and
//!   accumulates in f64 whatever `T` is. The oracle the other two answer to.
//! - [`attention_tiled`] (`tiled.rs`): FlashAttention-2's online softmax over
//!   `q_tile × k_tile` tiles, accumulating in `T` (the point: it shows what a
//!   kernel working in the input precision gets).
//! - [`attention_paged`] (`paged.rs`): K/V read through a block table
//!   ([`PagedKv`]); the keys are split into partitions whose `(out, lse)` are
//!   merged by their log-sum-exps ([`merge_by_lse`]) as vLLM's
//!   `paged_attention_v2` reduce kernel and flash-decoding do. Its slow twin is
//!   [`PagedKv::gather`] followed by the naive path.
//!
//! All three share [`Dims`] (shape checks and the visibility rule), so they
//! disagree only in arithmetic, which the property tests bound.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3};

use crate::{Error, Result};

mod naive;
mod paged;
mod tiled;

#[cfg(test)]
mod tests;

pub use naive::attention_naive;
pub use paged::{attention_paged, merge_by_lse, PagedKv, PagedPool, MAX_BLOCK_SIZE, SCRAMBLE_SEED};
pub use tiled::attention_tiled;

/// Floating types the oracle runs in.
pub trait Float:
    num_traits_like::FloatLike + ndarray::LinalgScalar + Send + Sync + std::fmt::Debug + 'static
{
}
impl Float for f32 {}
impl Float for f64 {}

/// Minimal float operations the oracle needs (avoids a num-traits dependency in the API).
pub mod num_traits_like {
    pub trait FloatLike: Copy + PartialOrd {
        /// Name as numpy spells the dtype (`float32`, `float64`).
        const NAME: &'static str;
        const NEG_INFINITY: Self;
        fn to_f64(self) -> f64;
        fn from_f64(x: f64) -> Self;
        fn exp(self) -> Self;
        fn ln(self) -> Self;
        fn is_finite(self) -> bool;
    }
    macro_rules! impl_float_like {
        ($t:ty, $name:expr) => {
            impl FloatLike for $t {
                const NAME: &'static str = $name;
                const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
                #[inline]
                fn to_f64(self) -> f64 {
                    self as f64
                }
                #[inline]
                fn from_f64(x: f64) -> Self {
                    x as $t
                }
                #[inline]
                fn exp(self) -> Self {
                    <$t>::exp(self)
                }
                #[inline]
                fn ln(self) -> Self {
                    <$t>::ln(self)
                }
                #[inline]
                fn is_finite(self) -> bool {
                    <$t>::is_finite(self)
                }
            }
        };
    }
    impl_float_like!(f32, "float32");
    impl_float_like!(f64, "float64");
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
    /// `-inf` for a row that sees no key.
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
        if v.dim() != k.dim() {
            return Err(Error::shape(
                "v",
                format!("{:?} (same as k)", k.dim()),
                format!("{:?}", v.dim()),
            ));
        }
        Dims::from_shapes(q.dim(), k.dim(), cfg)
    }

    /// Validate the problem given `q`'s shape `(Lq, Hq, D)` and the keys'
    /// shape `(Lk, Hkv, D)` (contiguous or paged).
    pub fn from_shapes(
        q: (usize, usize, usize),
        k: (usize, usize, usize),
        cfg: &AttentionConfig,
    ) -> Result<Dims> {
        let (lq, hq, d) = q;
        let (lk, hkv, dk) = k;
        if dk != d {
            return Err(Error::shape(
                "k",
                format!("[Lk, Hkv, {d}] (head dim of q)"),
                format!("{k:?}"),
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

    /// Query heads per KV head.
    #[inline]
    pub fn group(&self) -> usize {
        self.hq / self.hkv
    }

    /// The softmax scale this problem uses.
    #[inline]
    pub fn scale(&self, cfg: &AttentionConfig) -> f64 {
        cfg.scale.unwrap_or(1.0 / (self.d as f64).sqrt())
    }

    /// Absolute position of query row `i` (bottom-right alignment); may be
    /// negative only without causal masking.
    #[inline]
    pub fn position(&self, i: usize) -> isize {
        (self.lk + i) as isize - self.lq as isize
    }

    /// The half-open key range `[lo, hi)` that causality and the window allow
    /// query row `i` to see (the explicit mask may hide more). Every key
    /// outside it is invisible; strategies use it to skip whole tiles,
    /// blocks and partitions.
    #[inline]
    pub fn key_range(&self, cfg: &AttentionConfig, i: usize) -> (usize, usize) {
        let pos = self.position(i);
        let hi = match cfg.masking {
            Masking::Causal => (pos + 1).clamp(0, self.lk as isize) as usize,
            Masking::None => self.lk,
        };
        let lo = match cfg.window {
            Some(w) => (pos - w as isize + 1).clamp(0, self.lk as isize) as usize,
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// Whether query row `i` may see key `j` (causal, window and the explicit mask).
    #[inline]
    pub fn visible(&self, cfg: &AttentionConfig, i: usize, j: usize) -> bool {
        let pos = self.position(i);
        let js = j as isize;
        if cfg.masking == Masking::Causal && js > pos {
            return false;
        }
        if let Some(w) = cfg.window {
            if pos - js >= w as isize {
                return false;
            }
        }
        if let Some(m) = &cfg.mask {
            if !m[[i, j]] {
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

/// Run one strategy on contiguous `q`, `k`, `v`.
///
/// For [`Strategy::Paged`] the keys and values are first scattered into a
/// block pool with a deliberately scrambled block table
/// ([`PagedPool::scrambled`] with [`SCRAMBLE_SEED`]; unused slots hold NaN),
/// so a paged path that reads the wrong block, or past the sequence's end,
/// shows up as a wrong or NaN result rather than passing by luck.
pub fn attention<T: Float>(
    q: ArrayView3<T>,
    k: ArrayView3<T>,
    v: ArrayView3<T>,
    cfg: &AttentionConfig,
    strategy: Strategy,
) -> Result<AttentionOutput<T>> {
    match strategy {
        Strategy::Naive => attention_naive(q, k, v, cfg),
        Strategy::Tiled { q_tile, k_tile } => attention_tiled(q, k, v, cfg, q_tile, k_tile),
        Strategy::Paged {
            block_size,
            partition_size,
        } => {
            Dims::check(&q, &k, &v, cfg)?;
            let pool = PagedPool::scrambled(k, v, block_size, SCRAMBLE_SEED)?;
            attention_paged(q, &pool.view(), partition_size, cfg)
        }
    }
}

/// `q`, `k`, `v` in standard (row-major) layout as flat slices; copies only
/// when a view is strided.
pub(crate) fn flat<'a, T: Float>(
    a: &'a ArrayView3<'_, T>,
) -> ndarray::CowArray<'a, T, ndarray::Ix3> {
    a.as_standard_layout()
}
