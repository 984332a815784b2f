//! The Llama-family decoder: embedding, `n` blocks of
//! `x += Wo·attn(rope(Wq·rms(x)), rope(Wk·rms(x)), Wv·rms(x))` and
//! `x += Wdown·(silu(Wgate·rms(x)) * Wup·rms(x))`, final RMSNorm, classifier.
//!
//! Numerics follow llama2.c's `run.c` operation for operation in f32 (its RMSNorm
//! `w * (x * 1/sqrtf(mean(x²) + eps))`, its RoPE angles `pos * 1/powf(theta, 2i/D)`
//! with `cosf`/`sinf`, scores divided by `sqrtf(D)`, its softmax, its SiLU
//! `x * (1 / (1 + expf(-x)))`, serial f32 dot products), so greedy decoding
//! reproduces run.c token for token. Every operation is per token row, and the
//! matmul sums in the same order whatever the batch ([`super::linear`]), so a
//! whole-prompt prefill produces the same bits as token-by-token decoding.
//!
//! Attention has two kernels ([`AttentionKernel`]): `Llama2c` (the default: run.c's
//! f32 loop, reading K/V rows through the cache's row map, so contiguous and
//! paged caches give identical bits) and `Reference` (the crate's exact attention
//! functions: [`attention_naive`] over the contiguous cache, [`attention_paged`]
//! over the paged one, accumulating in f64).
//!
//! Tree attention ([`Llama::forward_masked`], [`Llama::forward_tree`]): new
//! tokens with explicit positions and an explicit visibility mask over the
//! cached and new rows (Llama2c kernel only), bit-identical to running each
//! node's path sequentially.

use ndarray::{Array2, Array3, ArrayView2, ArrayView4};
use rayon::prelude::*;

use inferlab_models::{Checkpoint, RopeLayout};

use super::attend::{self, Heads, LayerKv, ScorePath};
use super::bf16::Kernel;
use super::cache::{CacheKind, KvCache};
use super::linear::Linear;
use crate::attention::{attention_naive, attention_paged, AttentionConfig, Masking, PagedKv};
use crate::{Error, Result};

/// Shapes and constants of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub max_seq_len: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub rope_layout: RopeLayout,
    pub tied_embeddings: bool,
}

impl LlamaConfig {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// One decoder block's weights (HF names without the `model.layers.{i}.` prefix).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub input_layernorm: Vec<f32>,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// All weights. `lm_head` is a copy of the embedding when tied.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    /// `[vocab, hidden]`
    pub embed_tokens: Array2<f32>,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    pub lm_head: Linear,
}

/// Which linear layer (for capturing inputs and substituting weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];
    /// The HF name suffix, e.g. `self_attn.q_proj`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }
}

impl LayerWeights {
    pub fn linear(&self, p: Proj) -> &Linear {
        match p {
            Proj::Q => &self.q_proj,
            Proj::K => &self.k_proj,
            Proj::V => &self.v_proj,
            Proj::O => &self.o_proj,
            Proj::Gate => &self.gate_proj,
            Proj::Up => &self.up_proj,
            Proj::Down => &self.down_proj,
        }
    }
    pub fn linear_mut(&mut self, p: Proj) -> &mut Linear {
        match p {
            Proj::Q => &mut self.q_proj,
            Proj::K => &mut self.k_proj,
            Proj::V => &mut self.v_proj,
            Proj::O => &mut self.o_proj,
            Proj::Gate => &mut self.gate_proj,
            Proj::Up => &mut self.up_proj,
            Proj::Down => &mut self.down_proj,
        }
    }
}

/// The attention kernel used inside the forward pass (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// run.c's f32 loop; bit-identical across cache layouts.
    #[default]
    Llama2c,
    /// `attention_naive` (contiguous) / `attention_paged` (paged), f64 accumulation.
    Reference,
}

/// Which matmul the forward pass uses: the tiled fast path or its slow twin
/// (run.c's loop verbatim). Both give the same bits; the slow one is the
/// benchmark's in-process stand-in for run.c's scalar code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulPath {
    #[default]
    Fast,
    Slow,
    /// Not the oracle: every linear and the causal attention with inputs rounded
    /// to bf16 and f32 sums ([`super::bf16`], AMX tiles when present), as a
    /// bf16 model runs; for calibration passes (`quantize model --calibration bf16`).
    /// Masked (tree) attention stays run.c's loop.
    Bf16,
}

/// How the rows of one forward call map to positions and keys.
enum RowMap<'a> {
    /// Row `r` is position `start + r` and sees rows `0..=start + r`.
    Causal,
    /// Row `r` is position `positions[r]` and sees the cache rows `visible[r, ..]` marks.
    Masked {
        positions: &'a [usize],
        visible: ArrayView2<'a, bool>,
    },
}

impl RowMap<'_> {
    fn position(&self, start: usize, r: usize) -> usize {
        match self {
            RowMap::Causal => start + r,
            RowMap::Masked { positions, .. } => positions[r],
        }
    }
}

/// Called with the input of every linear layer: `(layer, proj, x [T, in])`.
pub type LinearObserver<'a> = dyn FnMut(usize, Proj, ArrayView2<f32>) + 'a;

/// A Llama-family model ready to run.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    weights: LlamaWeights,
    pub attention_kernel: AttentionKernel,
    pub matmul: MatmulPath,
    rope: std::sync::OnceLock<RopeTable>,
}

/// RMSNorm of one row, run.c's arithmetic: `o = w * (x * 1/sqrtf(mean(x²) + eps))`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mut ss = 0f32;
    for &v in x {
        ss += v * v;
    }
    ss /= x.len() as f32;
    ss += eps;
    ss = 1.0 / ss.sqrt();
    for ((o, &w), &v) in out.iter_mut().zip(weight).zip(x) {
        *o = w * (ss * v);
    }
}

/// RMSNorm of every row of `x [T, n]`.
pub fn rms_norm_rows(x: ArrayView2<f32>, weight: &[f32], eps: f32) -> Array2<f32> {
    let (t, d) = x.dim();
    let mut out = vec![0f32; t * d];
    for (xr, or) in x.rows().into_iter().zip(out.chunks_exact_mut(d.max(1))) {
        match xr.as_slice() {
            Some(xs) => rms_norm(xs, weight, eps, or),
            None => rms_norm(&xr.to_vec(), weight, eps, or),
        }
    }
    Array2::from_shape_vec((t, d), out).expect("[T, d] entries")
}

/// RoPE angles' cosines and sines for position `pos`: pair `i` (of `D/2`) uses
/// `pos * 1/powf(theta, 2i/D)`, computed in f32 as run.c and transformers do.
pub fn rope_cos_sin(pos: usize, head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut c = Vec::with_capacity(half);
    let mut s = Vec::with_capacity(half);
    for i in 0..half {
        let freq = 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32);
        let val = pos as f32 * freq;
        c.push(val.cos());
        s.push(val.sin());
    }
    (c, s)
}

/// Positions [`RopeTable`] covers (at most; a model's `max_seq_len` if less).
const ROPE_TABLE_POSITIONS: usize = 8192;

/// [`rope_cos_sin`] for positions `0..len`, computed once per model on first
/// use: the forward pass rotates every row of every block, and recomputing the
/// angles per row was 1.6 % of a whole-model calibration. The same values (the
/// same function of the position); a position past the table, or a config
/// whose head size or theta changed since, is computed on the spot.
#[derive(Debug, Clone)]
struct RopeTable {
    head_dim: usize,
    theta: f32,
    /// `[len, head_dim / 2]` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn new(len: usize, head_dim: usize, theta: f32) -> Self {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in 0..len {
            let (c, s) = rope_cos_sin(pos, head_dim, theta);
            cos.extend(c);
            sin.extend(s);
        }
        RopeTable {
            head_dim,
            theta,
            cos,
            sin,
        }
    }

    /// Position `pos`'s cosines and sines, when the table holds them for
    /// `head_dim` and `theta`.
    fn get(&self, pos: usize, head_dim: usize, theta: f32) -> Option<(&[f32], &[f32])> {
        let half = head_dim / 2;
        let range = pos * half..(pos + 1) * half;
        let same = self.head_dim == head_dim && self.theta.to_bits() == theta.to_bits();
        (same && range.end <= self.cos.len()).then(|| (&self.cos[range.clone()], &self.sin[range]))
    }
}

/// Rotate every head of `v` (heads of `head_dim` floats, back to back) in place.
/// Interleaved pairs (2i, 2i+1); rotate-half pairs (i, i + D/2).
pub fn rope(v: &mut [f32], head_dim: usize, layout: RopeLayout, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in v.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = match layout {
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                RopeLayout::RotateHalf => (i, i + half),
            };
            let (fcr, fci) = (cos[i], sin[i]);
            let v0 = head[a];
            let v1 = head[b];
            head[a] = v0 * fcr - v1 * fci;
            head[b] = v0 * fci + v1 * fcr;
        }
    }
}

/// run.c's softmax, in place.
pub fn softmax_in_place(x: &mut [f32]) {
    let Some(&first) = x.first() else { return };
    let mut max = first;
    for &v in &x[1..] {
        if v > max {
            max = v;
        }
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

fn tensor<'a>(ck: &'a Checkpoint, name: &str, shape: &[usize]) -> Result<&'a [f32]> {
    let t = ck.tensors.get(name).ok_or_else(|| Error::File {
        path: ck.path.clone(),
        reason: format!("missing tensor `{name}`"),
    })?;
    if t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
        return Err(Error::shape(
            format!("{}: tensor `{name}`", ck.path.display()),
            format!("{shape:?}"),
            format!("{:?} ({} values)", t.shape, t.data.len()),
        ));
    }
    Ok(&t.data)
}

fn linear(ck: &Checkpoint, name: &str, out: usize, inp: usize) -> Result<Linear> {
    let d = tensor(ck, name, &[out, inp])?;
    Ok(Linear::from_weight(
        ArrayView2::from_shape((out, inp), d).expect("checked shape"),
    ))
}

fn positive(ck: &Checkpoint, field: &str, v: u64) -> Result<usize> {
    if v == 0 {
        return Err(Error::File {
            path: ck.path.clone(),
            reason: format!("config field `{field}` is 0"),
        });
    }
    usize::try_from(v).map_err(|_| Error::File {
        path: ck.path.clone(),
        reason: format!("config field `{field}` = {v} is too large"),
    })
}

impl Llama {
    /// Build from a checkpoint, checking every tensor's name and shape against the config.
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        let c = &ck.config;
        let cfg = LlamaConfig {
            hidden: positive(ck, "hidden_size", c.hidden_size)?,
            intermediate: positive(ck, "intermediate_size", c.intermediate_size)?,
            n_layers: positive(ck, "num_hidden_layers", c.num_hidden_layers)?,
            n_heads: positive(ck, "num_attention_heads", c.num_attention_heads)?,
            n_kv_heads: positive(ck, "num_key_value_heads", c.num_kv_heads())?,
            head_dim: positive(ck, "head_dim", c.head_dim())?,
            vocab: positive(ck, "vocab_size", c.vocab_size)?,
            max_seq_len: positive(ck, "max_position_embeddings", c.max_position_embeddings)?,
            rope_theta: c.rope_theta as f32,
            rms_eps: c.rms_norm_eps as f32,
            rope_layout: ck.rope_layout,
            tied_embeddings: !ck.tensors.contains_key("lm_head.weight"),
        };
        let bad = |field: &str, reason: String| Error::File {
            path: ck.path.clone(),
            reason: format!("config field `{field}`: {reason}"),
        };
        if cfg.n_heads % cfg.n_kv_heads != 0 {
            return Err(bad(
                "num_key_value_heads",
                format!("{} does not divide {} heads", cfg.n_kv_heads, cfg.n_heads),
            ));
        }
        if cfg.head_dim % 2 != 0 {
            return Err(bad("head_dim", format!("{} is odd", cfg.head_dim)));
        }
        if !(cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0) {
            return Err(bad(
                "rope_theta",
                format!("{} is not positive", c.rope_theta),
            ));
        }
        if !(cfg.rms_eps.is_finite() && cfg.rms_eps >= 0.0) {
            return Err(bad("rms_norm_eps", format!("{}", c.rms_norm_eps)));
        }
        let (h, q, kv, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate);
        let emb = tensor(ck, "model.embed_tokens.weight", &[cfg.vocab, h])?;
        let embed_tokens = Array2::from_shape_vec((cfg.vocab, h), emb.to_vec()).expect("shape");
        // Layers are built in parallel; the first error in layer order is returned.
        let layers: Vec<Result<LayerWeights>> = (0..cfg.n_layers)
            .into_par_iter()
            .map(|l| {
                let p = |s: &str| format!("model.layers.{l}.{s}.weight");
                Ok(LayerWeights {
                    input_layernorm: tensor(ck, &p("input_layernorm"), &[h])?.to_vec(),
                    q_proj: linear(ck, &p("self_attn.q_proj"), q, h)?,
                    k_proj: linear(ck, &p("self_attn.k_proj"), kv, h)?,
                    v_proj: linear(ck, &p("self_attn.v_proj"), kv, h)?,
                    o_proj: linear(ck, &p("self_attn.o_proj"), h, q)?,
                    post_attention_layernorm: tensor(ck, &p("post_attention_layernorm"), &[h])?
                        .to_vec(),
                    gate_proj: linear(ck, &p("mlp.gate_proj"), f, h)?,
                    up_proj: linear(ck, &p("mlp.up_proj"), f, h)?,
                    down_proj: linear(ck, &p("mlp.down_proj"), h, f)?,
                })
            })
            .collect();
        let layers = layers.into_iter().collect::<Result<Vec<_>>>()?;
        let norm = tensor(ck, "model.norm.weight", &[h])?.to_vec();
        let lm_head = if cfg.tied_embeddings {
            Linear::from_weight(embed_tokens.view())
        } else {
            linear(ck, "lm_head.weight", cfg.vocab, h)?
        };
        Ok(Self {
            config: cfg,
            weights: LlamaWeights {
                embed_tokens,
                layers,
                norm,
                lm_head,
            },
            attention_kernel: AttentionKernel::default(),
            matmul: MatmulPath::default(),
            rope: std::sync::OnceLock::new(),
        })
    }

    pub fn weights(&self) -> &LlamaWeights {
        &self.weights
    }

    /// Mutable weights (quantization substitutes dequantized or fake-quantized linears).
    pub fn weights_mut(&mut self) -> &mut LlamaWeights {
        &mut self.weights
    }

    /// An empty KV cache sized for this model's context.
    pub fn new_cache(&self, kind: CacheKind) -> KvCache {
        self.try_new_cache(kind)
            .expect("cache kinds are validated by try_new_cache")
    }

    /// [`Llama::new_cache`] that reports a bad `block_size` (0) instead of panicking.
    pub fn try_new_cache(&self, kind: CacheKind) -> Result<KvCache> {
        KvCache::new(
            kind,
            self.config.n_layers,
            self.config.kv_dim(),
            self.config.max_seq_len,
        )
    }

    /// Embedding rows of `tokens`: `[T, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Array2<f32>> {
        let h = self.config.hidden;
        let mut x = Array2::zeros((tokens.len(), h));
        for (r, &t) in tokens.iter().enumerate() {
            if t as usize >= self.config.vocab {
                return Err(Error::invalid(
                    "tokens",
                    format!(
                        "token id {t} at index {r} is not < vocab size {}",
                        self.config.vocab
                    ),
                ));
            }
            x.row_mut(r)
                .assign(&self.weights.embed_tokens.row(t as usize));
        }
        Ok(x)
    }

    /// Append `tokens` to `cache`; logits `[T, vocab]` for every position.
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Array2<f32>> {
        self.forward_layers(cache, tokens, self.config.n_layers)
    }

    /// Like [`Llama::forward`] but through the first `n_layers` blocks only, then
    /// the final norm and head (a self-speculative draft). Layers `n_layers..` of
    /// the cache are not written for these positions: truncate the cache back
    /// before running the full model over them.
    pub fn forward_layers(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        n_layers: usize,
    ) -> Result<Array2<f32>> {
        self.forward_observed(cache, tokens, n_layers, None)
    }

    /// The forward pass, calling `observer` with the input of every linear layer
    /// of the blocks (GPTQ/AWQ calibration); [`Llama::final_hidden`] gives the
    /// classifier's input.
    pub fn forward_observed(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        n_layers: usize,
        mut observer: Option<&mut LinearObserver<'_>>,
    ) -> Result<Array2<f32>> {
        let x = self.hidden_states(cache, tokens, n_layers, observer.as_deref_mut())?;
        Ok(self.head(x.view()))
    }

    /// Final-normed hidden states `[T, hidden]` after the first `n_layers` blocks
    /// (the classifier's input), appending to the cache like `forward`.
    pub fn final_hidden(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        n_layers: usize,
    ) -> Result<Array2<f32>> {
        let x = self.hidden_states(cache, tokens, n_layers, None)?;
        Ok(rms_norm_rows(
            x.view(),
            &self.weights.norm,
            self.config.rms_eps,
        ))
    }

    /// Final norm and classifier: `x [T, hidden] -> logits [T, vocab]`.
    pub fn head(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let xn = rms_norm_rows(x, &self.weights.norm, self.config.rms_eps);
        self.linear(&self.weights.lm_head, xn.view())
    }

    /// `x Wᵀ` through the selected [`MatmulPath`].
    pub fn linear(&self, w: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
        match self.matmul {
            MatmulPath::Fast => w.forward(x),
            MatmulPath::Slow => w.forward_slow(x),
            MatmulPath::Bf16 => w.forward_bf16(x),
        }
    }

    fn hidden_states(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        n_layers: usize,
        mut observer: Option<&mut LinearObserver<'_>>,
    ) -> Result<Array2<f32>> {
        self.hidden_states_rows(
            cache,
            tokens,
            n_layers,
            &RowMap::Causal,
            observer.as_deref_mut(),
        )
    }

    fn hidden_states_rows(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        n_layers: usize,
        rows: &RowMap<'_>,
        mut observer: Option<&mut LinearObserver<'_>>,
    ) -> Result<Array2<f32>> {
        if n_layers > self.config.n_layers {
            return Err(Error::invalid(
                "n_layers",
                format!("{n_layers} > the model's {} layers", self.config.n_layers),
            ));
        }
        if cache.n_layers != self.config.n_layers || cache.kv_dim != self.config.kv_dim() {
            return Err(Error::invalid(
                "cache",
                "built for another model (layers or KV width differ)",
            ));
        }
        let mut x = self.embed(tokens)?;
        let start = cache.len;
        cache.reserve(tokens.len())?;
        for l in 0..n_layers {
            self.layer_forward_rows(l, &mut x, cache, start, rows, observer.as_deref_mut())?;
        }
        cache.len = start + tokens.len();
        Ok(x)
    }

    /// Tree attention (SpecInfer, Medusa): run `tokens` over the cached rows
    /// with explicit RoPE `positions` and an explicit visibility mask, through
    /// the first `n_layers` blocks, then the final norm and head. Logits `[T, vocab]`.
    ///
    /// The new tokens are appended to the cache as rows `len..len+T` (whatever
    /// their positions); `visible[r, j]` says whether new token `r` attends to
    /// cache row `j` (`j < len`: an existing row; `j = len + r'`: new token
    /// `r'`), so `visible` is `[T, len + T]` and `visible[r, len + r]` must be
    /// set (a token sees itself). Keys are read in row order, so a node whose
    /// visible rows are the prefix and its ancestors (stored before it) gets
    /// the same bits as the same path run sequentially: every operation is per
    /// row, and attention sums the same scores in the same order. After
    /// verification keep the accepted rows with [`KvCache::compact`].
    ///
    /// Only the `Llama2c` attention kernel takes a mask: the `Reference`
    /// kernel gives an error.
    pub fn forward_masked<'a>(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        positions: &'a [usize],
        visible: ArrayView2<'a, bool>,
        n_layers: usize,
    ) -> Result<Array2<f32>> {
        let t_len = tokens.len();
        let len = cache.len;
        if self.attention_kernel != AttentionKernel::Llama2c {
            return Err(Error::invalid(
                "attention kernel",
                "tree attention (an explicit mask) needs the Llama2c kernel",
            ));
        }
        if positions.len() != t_len {
            return Err(Error::shape(
                "tree positions",
                format!("[{t_len}] (one per token)"),
                format!("[{}]", positions.len()),
            ));
        }
        if visible.dim() != (t_len, len + t_len) {
            return Err(Error::shape(
                "tree attention mask",
                format!(
                    "[{t_len}, {}] (new tokens x cached + new rows)",
                    len + t_len
                ),
                format!("{:?}", visible.shape()),
            ));
        }
        for (r, &p) in positions.iter().enumerate() {
            if p >= self.config.max_seq_len {
                return Err(Error::invalid(
                    "tree positions",
                    format!(
                        "position {p} of token {r} is not < the context of {}",
                        self.config.max_seq_len
                    ),
                ));
            }
            if !visible[[r, len + r]] {
                return Err(Error::invalid(
                    "tree attention mask",
                    format!(
                        "token {r} does not see itself (mask[{r}, {}] is false)",
                        len + r
                    ),
                ));
            }
        }
        let rows = RowMap::Masked { positions, visible };
        let x = self.hidden_states_rows(cache, tokens, n_layers, &rows, None)?;
        Ok(self.head(x.view()))
    }

    /// [`Llama::forward_masked`] where every cached row is visible and
    /// `mask [T, T]` says which new tokens each new token sees (a tree: each
    /// node sees the cached prefix plus its ancestors and itself).
    pub fn forward_tree(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        positions: &[usize],
        mask: ArrayView2<bool>,
        n_layers: usize,
    ) -> Result<Array2<f32>> {
        let (t_len, len) = (tokens.len(), cache.len);
        if mask.dim() != (t_len, t_len) {
            return Err(Error::shape(
                "tree attention mask",
                format!("[{t_len}, {t_len}] (new tokens x new tokens)"),
                format!("{:?}", mask.shape()),
            ));
        }
        let mut visible = Array2::from_elem((t_len, len + t_len), true);
        visible.slice_mut(ndarray::s![.., len..]).assign(&mask);
        self.forward_masked(cache, tokens, positions, visible.view(), n_layers)
    }

    /// Block `l` over rows `x [T, hidden]` at positions `start..start+T`, in place.
    /// Writes this layer's K/V rows into `cache` (which must have room reserved).
    ///
    /// The block is the composition of its stages, each also public so that
    /// calibration (GPTQ's true-sequential order) can run a block piecewise
    /// with the same bits:
    /// ```text
    ///   xb  = input_norm(x)                  -> q, k, v see xb
    ///   att = attention_stage(xb)            -> o sees att
    ///   h   = x + o(att);  xb2 = post_norm(h) -> gate, up see xb2
    ///   hb  = mlp_hidden_stage(xb2)          -> down sees hb
    ///   x   = h + down(hb)
    /// ```
    pub fn layer_forward(
        &self,
        l: usize,
        x: &mut Array2<f32>,
        cache: &mut KvCache,
        start: usize,
        observer: Option<&mut LinearObserver<'_>>,
    ) -> Result<()> {
        self.layer_forward_rows(l, x, cache, start, &RowMap::Causal, observer)
    }

    fn layer_forward_rows(
        &self,
        l: usize,
        x: &mut Array2<f32>,
        cache: &mut KvCache,
        start: usize,
        rows: &RowMap<'_>,
        mut observer: Option<&mut LinearObserver<'_>>,
    ) -> Result<()> {
        let c = &self.config;
        let w = &self.weights.layers[l];
        let mut observe = |p: Proj, v: ArrayView2<f32>| {
            if let Some(o) = observer.as_deref_mut() {
                o(l, p, v)
            }
        };

        // Attention.
        let xb = rms_norm_rows(x.view(), &w.input_layernorm, c.rms_eps);
        observe(Proj::Q, xb.view());
        observe(Proj::K, xb.view());
        observe(Proj::V, xb.view());
        let att = self.attention_stage_rows(l, xb.view(), cache, start, rows)?;
        observe(Proj::O, att.view());
        let o = self.linear(&w.o_proj, att.view());
        *x += &o;

        // MLP.
        let xb = rms_norm_rows(x.view(), &w.post_attention_layernorm, c.rms_eps);
        observe(Proj::Gate, xb.view());
        observe(Proj::Up, xb.view());
        let hb = self.mlp_hidden_stage(l, xb.view());
        observe(Proj::Down, hb.view());
        let d = self.linear(&w.down_proj, hb.view());
        *x += &d;
        Ok(())
    }

    /// Attention of block `l` from the normed input `xb [T, hidden]` at positions
    /// `start..start+T`: q, k, v projections, RoPE, K/V written into `cache`
    /// (room must be reserved), attention over the cache. Returns o_proj's input
    /// `[T, n_heads·head_dim]`.
    pub fn attention_stage(
        &self,
        l: usize,
        xb: ArrayView2<f32>,
        cache: &mut KvCache,
        start: usize,
    ) -> Result<Array2<f32>> {
        self.attention_stage_rows(l, xb, cache, start, &RowMap::Causal)
    }

    fn attention_stage_rows(
        &self,
        l: usize,
        xb: ArrayView2<f32>,
        cache: &mut KvCache,
        start: usize,
        rows: &RowMap<'_>,
    ) -> Result<Array2<f32>> {
        let c = &self.config;
        let w = &self.weights.layers[l];
        let t_len = xb.nrows();
        let (mut q, mut k, v) = match self.matmul {
            // one bf16 copy of the input for the three products
            MatmulPath::Bf16 => {
                let x = super::bf16::Bf16Rows::new(xb);
                (
                    w.q_proj.forward_bf16_rows(&x),
                    w.k_proj.forward_bf16_rows(&x),
                    w.v_proj.forward_bf16_rows(&x),
                )
            }
            _ => (
                self.linear(&w.q_proj, xb),
                self.linear(&w.k_proj, xb),
                self.linear(&w.v_proj, xb),
            ),
        };
        let table = self.rope.get_or_init(|| {
            let len = c.max_seq_len.min(ROPE_TABLE_POSITIONS);
            RopeTable::new(len, c.head_dim, c.rope_theta)
        });
        for r in 0..t_len {
            let pos = rows.position(start, r);
            let computed;
            let (cos, sin) = match table.get(pos, c.head_dim, c.rope_theta) {
                Some(cs) => cs,
                None => {
                    computed = rope_cos_sin(pos, c.head_dim, c.rope_theta);
                    (&computed.0[..], &computed.1[..])
                }
            };
            let qr = q.row_mut(r).into_slice().expect("standard layout");
            rope(qr, c.head_dim, c.rope_layout, cos, sin);
            let kr = k.row_mut(r).into_slice().expect("standard layout");
            rope(kr, c.head_dim, c.rope_layout, cos, sin);
        }
        {
            let kvd = c.kv_dim();
            let offs: Vec<usize> = (0..t_len).map(|r| cache.row_offset(start + r)).collect();
            let (kc, vc) = cache.layer_mut(l);
            for r in 0..t_len {
                let o = offs[r];
                kc[o..o + kvd].copy_from_slice(k.row(r).as_slice().expect("std"));
                vc[o..o + kvd].copy_from_slice(v.row(r).as_slice().expect("std"));
            }
        }
        match self.attention_kernel {
            AttentionKernel::Llama2c => Ok(self.attention_llama2c(l, q.view(), cache, start, rows)),
            AttentionKernel::Reference => match rows {
                RowMap::Causal => self.attention_reference(l, q.view(), cache, start),
                RowMap::Masked { .. } => Err(Error::invalid(
                    "attention kernel",
                    "tree attention (an explicit mask) needs the Llama2c kernel",
                )),
            },
        }
    }

    /// The MLP of block `l` up to down_proj's input: `silu(gate(xb2)) * up(xb2)`
    /// (run.c's SiLU `x * (1 / (1 + expf(-x)))`), `[T, intermediate]`.
    pub fn mlp_hidden_stage(&self, l: usize, xb2: ArrayView2<f32>) -> Array2<f32> {
        let w = &self.weights.layers[l];
        if self.matmul == MatmulPath::Bf16 {
            let x = super::bf16::Bf16Rows::new(xb2);
            return super::bf16::swiglu_rows(
                &x,
                w.gate_proj.bf16_weight(),
                w.up_proj.bf16_weight(),
                super::bf16::Kernel::Fast,
            );
        }
        let mut hb = self.linear(&w.gate_proj, xb2);
        let hb2 = self.linear(&w.up_proj, xb2);
        hb.zip_mut_with(&hb2, |a, &b| {
            let s = *a * (1.0f32 / (1.0f32 + (-*a).exp()));
            *a = s * b;
        });
        hb
    }

    /// run.c's attention for each query row, reading K/V rows through the
    /// cache's row map. Causal: query `r` at position `start + r` sees keys
    /// `0..=start + r` ([`super::attend`]: vectorized across keys for prefill,
    /// same bits). Masked: the rows `visible` marks, in row order (scalar loop).
    fn attention_llama2c(
        &self,
        l: usize,
        q: ArrayView2<f32>,
        cache: &KvCache,
        start: usize,
        rows: &RowMap<'_>,
    ) -> Array2<f32> {
        let c = &self.config;
        let end = start + q.nrows();
        let offs: Vec<usize> = (0..end).map(|t| cache.row_offset(t)).collect();
        let RowMap::Masked { visible, .. } = rows else {
            let (k, v) = cache.layer(l);
            let heads = Heads {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
            };
            let kv = LayerKv { k, v, offs: &offs };
            let path = match self.matmul {
                MatmulPath::Fast => ScorePath::Fast,
                MatmulPath::Slow => ScorePath::Slow,
                MatmulPath::Bf16 => {
                    return super::bf16::attention_causal(q, kv, start, heads, Kernel::Fast)
                }
            };
            return attend::attention_llama2c(q, kv, start, heads, path);
        };
        let (t_len, hd, kv_mul) = (q.nrows(), c.head_dim, c.n_heads / c.n_kv_heads);
        let (kc, vc) = cache.layer(l);
        let mut out = Array2::zeros((t_len, c.q_dim()));
        let mut att = vec![0f32; end];
        let mut keys: Vec<usize> = Vec::with_capacity(end);
        let div = (hd as f32).sqrt();
        for r in 0..t_len {
            keys.clear();
            keys.extend((0..end).filter(|&j| visible[[r, j]]));
            let n = keys.len();
            let qrow = q.row(r);
            let qs = qrow.as_slice().expect("standard layout");
            let mut orow = out.row_mut(r);
            let os = orow.as_slice_mut().expect("standard layout");
            for h in 0..c.n_heads {
                let qh = &qs[h * hd..(h + 1) * hd];
                let koff = (h / kv_mul) * hd;
                for (&t, a) in keys.iter().zip(att[..n].iter_mut()) {
                    let kr = &kc[offs[t] + koff..offs[t] + koff + hd];
                    let mut score = 0f32;
                    for (&qv, &kv) in qh.iter().zip(kr) {
                        score += qv * kv;
                    }
                    *a = score / div;
                }
                softmax_in_place(&mut att[..n]);
                let xb = &mut os[h * hd..(h + 1) * hd];
                for (&t, &a) in keys.iter().zip(att[..n].iter()) {
                    let vr = &vc[offs[t] + koff..offs[t] + koff + hd];
                    for (x, &vv) in xb.iter_mut().zip(vr) {
                        *x += a * vv;
                    }
                }
            }
        }
        out
    }

    /// Attention through the crate's exact attention functions.
    fn attention_reference(
        &self,
        l: usize,
        q: ArrayView2<f32>,
        cache: &KvCache,
        start: usize,
    ) -> Result<Array2<f32>> {
        let c = &self.config;
        let t_len = q.nrows();
        let end = start + t_len;
        let q3 = q
            .to_owned()
            .into_shape_with_order((t_len, c.n_heads, c.head_dim))
            .expect("q width = heads * head_dim");
        let cfg = AttentionConfig {
            masking: Masking::Causal,
            scale: Some(1.0 / (c.head_dim as f64).sqrt()),
            ..Default::default()
        };
        let out = match cache.kind() {
            CacheKind::Contiguous => {
                let (kc, vc) = cache.layer(l);
                let shape = (end, c.n_kv_heads, c.head_dim);
                let k = ndarray::ArrayView3::from_shape(shape, &kc[..end * c.kv_dim()])
                    .expect("cache rows");
                let v = ndarray::ArrayView3::from_shape(shape, &vc[..end * c.kv_dim()])
                    .expect("cache rows");
                attention_naive(q3.view(), k, v, &cfg)?.out
            }
            CacheKind::Paged { block_size } => {
                let (kc, vc) = cache.layer(l);
                let table = cache.block_table().expect("paged");
                let nb = kc.len() / (block_size * c.kv_dim());
                let shape = (nb, block_size, c.n_kv_heads, c.head_dim);
                let kv = PagedKv {
                    k_blocks: ArrayView4::from_shape(shape, kc).expect("pool shape"),
                    v_blocks: ArrayView4::from_shape(shape, vc).expect("pool shape"),
                    block_table: &table[..end.div_ceil(block_size)],
                    len: end,
                };
                // Two blocks per partition: exercises the split-KV merge.
                attention_paged(q3.view(), &kv, 2 * block_size, &cfg)?.out
            }
        };
        let out: Array3<f32> = out;
        Ok(out
            .into_shape_with_order((t_len, c.q_dim()))
            .expect("out width"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table holds `rope_cos_sin`'s values bit for bit, and answers only
    /// for its own positions, head size and theta.
    #[test]
    fn rope_table_equals_rope_cos_sin() {
        let t = RopeTable::new(300, 64, 10000.0);
        for pos in [0, 1, 97, 299] {
            let (c, s) = rope_cos_sin(pos, 64, 10000.0);
            let (tc, ts) = t.get(pos, 64, 10000.0).expect("inside the table");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!((bits(tc), bits(ts)), (bits(&c), bits(&s)), "pos {pos}");
        }
        assert!(t.get(300, 64, 10000.0).is_none(), "past the end");
        assert!(t.get(5, 128, 10000.0).is_none(), "other head size");
        assert!(t.get(5, 64, 500000.0).is_none(), "other theta");
    }
}
