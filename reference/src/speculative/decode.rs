//! The draft-then-verify loop on real models.
//!
//! ```text
//!  context c_0..c_{t-1}          (prompt + emitted tokens)
//!  Proposer:  x_1..x_n ~ q       (n ≤ k; draft model, own first N layers, or n-gram table)
//!  Verifier:  one target forward over [c_{t-1}, x_1..x_n]   (n+1-token prefill,
//!             bottom-right causal mask over the cached c_0..c_{t-2})
//!             -> p_0..p_n  (p_i: target law of the token after x_1..x_i)
//!  verify:    rejection_sample(p, q, x, uniforms)  (greedy_verify at T = 0)
//!             -> a accepted drafts + 1 corrected/bonus token
//!  rollback:  both caches truncated to t + a tokens (c ++ x_1..x_a); the
//!             corrected token is fed at the next step
//! ```
//!
//! Caches: the verifier's [`KvCache`] holds the context minus its last token
//! between steps; a model proposer's cache holds a prefix of the context. Each
//! keeps the token list its cache was built from, so "rollback" is a
//! [`KvCache::truncate`] to the accepted length and the next call feeds exactly
//! the tokens the cache lacks. Both cache kinds (contiguous, paged) behave the
//! same; the tests run both.
//!
//! Trees ([`speculative_generate_tree_with`], SpecInfer): the draft proposes a
//! tree ([`TreeShape`]: children per node at each depth), the target scores
//! every node in one pass with a tree attention mask and per-node positions
//! ([`Llama::forward_masked`]), and after verification both caches keep only
//! the accepted path's rows, moved to consecutive positions
//! ([`KvCache::compact`]).
//!
//! Self-speculative drafts run the target's first N layers plus its final norm
//! and head ([`Llama::forward_layers`]) over their own cache (the first N layers'
//! KV equal the target's, so sharing them is a possible optimisation, not done
//! here: the oracle keeps the two caches independent).
//!
//! Randomness: one `ChaCha8Rng`, consumed in a fixed order per step: one
//! uniform per sampled draft token (model proposers at T > 0), then
//! [`VerifyUniforms::draw`] (k accept uniforms, one resample) for the verifier.

use ndarray::{s, Array2, ArrayView1};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use inferlab_models::tokenizer::Tokenizer;

use super::theory;
use super::verify::{self, Typical, VerifyUniforms, Warp};
use crate::model::{CacheKind, KvCache, Llama};
use crate::{Error, Result};

/// A model over its own KV cache, remembering which tokens the cache holds.
#[derive(Clone)]
pub struct CachedModel<'m> {
    model: &'m Llama,
    cache: KvCache,
    tokens: Vec<u32>,
    layers: usize,
}

impl<'m> CachedModel<'m> {
    /// `layers`: how many blocks to run (`model.config.n_layers` for the full model).
    pub fn new(model: &'m Llama, kind: CacheKind, layers: usize) -> Result<Self> {
        if layers == 0 || layers > model.config.n_layers {
            return Err(Error::invalid(
                "draft layers",
                format!(
                    "{layers} is not in 1..={} (the model's layer count)",
                    model.config.n_layers
                ),
            ));
        }
        Ok(CachedModel {
            model,
            cache: model.try_new_cache(kind)?,
            tokens: Vec::new(),
            layers,
        })
    }

    /// Tokens whose KV the cache holds.
    pub fn cached(&self) -> &[u32] {
        &self.tokens
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Roll back to the first `keep` cached tokens (KV truncate).
    pub fn rollback(&mut self, keep: usize) {
        if keep < self.tokens.len() {
            self.tokens.truncate(keep);
            self.cache.truncate(keep);
        }
    }

    /// Make the cache hold `seq` and return the logits of the positions fed
    /// now: rows for `seq[seq.len() - rows..]` (at least one row: the last
    /// token is always fed). Cached tokens beyond the common prefix with `seq`
    /// are rolled back first.
    pub fn extend(&mut self, seq: &[u32]) -> Result<Array2<f32>> {
        if seq.is_empty() {
            return Err(Error::invalid("sequence", "needs at least one token"));
        }
        let lcp = self
            .tokens
            .iter()
            .zip(seq)
            .take_while(|(a, b)| a == b)
            .count();
        self.rollback(lcp.min(seq.len() - 1));
        let start = self.tokens.len();
        if seq.len() > self.cache.max_len() {
            return Err(Error::invalid(
                "sequence",
                format!(
                    "{} tokens exceed the model's context of {}",
                    seq.len(),
                    self.cache.max_len()
                ),
            ));
        }
        let logits = self
            .model
            .forward_layers(&mut self.cache, &seq[start..], self.layers)?;
        self.tokens.extend_from_slice(&seq[start..]);
        debug_assert_eq!(self.tokens.len(), self.cache.len());
        Ok(logits)
    }
}

impl CachedModel<'_> {
    /// Append tree nodes: `tokens` at RoPE `positions`, each seeing the
    /// cached rows `visible[r, ..]` marks (`[T, cached + T]`, see
    /// [`Llama::forward_masked`]). The token list records them in row order
    /// (no longer one sequence until [`CachedModel::compact`]).
    pub fn extend_masked<'a>(
        &mut self,
        tokens: &[u32],
        positions: &'a [usize],
        visible: ndarray::ArrayView2<'a, bool>,
    ) -> Result<Array2<f32>> {
        let logits =
            self.model
                .forward_masked(&mut self.cache, tokens, positions, visible, self.layers)?;
        self.tokens.extend_from_slice(tokens);
        Ok(logits)
    }

    /// Keep rows `0..from` and `rows` (see [`KvCache::compact`]), the token list alike.
    pub fn compact(&mut self, from: usize, rows: &[usize]) -> Result<()> {
        self.cache.compact(from, rows)?;
        let kept: Vec<u32> = rows.iter().map(|&r| self.tokens[r]).collect();
        self.tokens.truncate(from);
        self.tokens.extend(kept);
        Ok(())
    }

    /// Make the cache hold exactly `seq` (possibly empty): roll back past the
    /// common prefix and feed the rest.
    fn sync(&mut self, seq: &[u32]) -> Result<()> {
        let lcp = self
            .tokens
            .iter()
            .zip(seq)
            .take_while(|(a, b)| a == b)
            .count();
        self.rollback(lcp);
        if lcp < seq.len() {
            self.extend(seq)?;
        }
        Ok(())
    }
}

/// The shape of a draft tree: `branching[d]` children for every node at depth
/// `d` (SpecInfer's expansion configuration). `[1, 1, 1]` is a chain of 3;
/// `[3, 1, 1]` is three branches of depth 3 (9 nodes); `[2, 2]` is a binary
/// tree of depth 2 (6 nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeShape {
    pub branching: Vec<usize>,
}

impl TreeShape {
    /// The most non-root nodes a tree may have.
    pub const MAX_NODES: usize = 1024;

    /// Parse `"3,1,1"` (children per node at depth 0, 1, …).
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |reason: String| Error::invalid("tree branching", reason);
        let mut branching = Vec::new();
        for part in spec.split(',') {
            let b: usize = part.trim().parse().map_err(|_| {
                bad(format!(
                    "{spec:?}: {part:?} is not a positive integer (expected e.g. 3,1,1: children per node at each depth)"
                ))
            })?;
            branching.push(b);
        }
        let t = TreeShape { branching };
        t.validate()?;
        Ok(t)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::invalid("tree branching", reason);
        if self.branching.is_empty() {
            return Err(bad("empty: at least one depth is required".into()));
        }
        if let Some(d) = self.branching.iter().position(|&b| b == 0) {
            return Err(bad(format!("depth {d} has 0 children (each must be ≥ 1)")));
        }
        if self.nodes() > Self::MAX_NODES {
            return Err(bad(format!(
                "{:?} has more than {} nodes",
                self.branching,
                Self::MAX_NODES
            )));
        }
        Ok(())
    }

    /// Depth (draft tokens on each root-to-leaf path).
    pub fn depth(&self) -> usize {
        self.branching.len()
    }

    /// Non-root nodes: `Σ_d Π_{e ≤ d} branching[e]` (saturating).
    pub fn nodes(&self) -> usize {
        let (mut width, mut total) = (1usize, 0usize);
        for &b in &self.branching {
            width = width.saturating_mul(b);
            total = total.saturating_add(width);
        }
        total
    }

    /// The first `depth` levels.
    pub fn truncated(&self, depth: usize) -> TreeShape {
        TreeShape {
            branching: self.branching[..depth.min(self.depth())].to_vec(),
        }
    }
}

/// A drafted tree: nodes in breadth-first order (parents before children)
/// and, per node, the draft row its children were drawn from (`[nodes, V]`,
/// node 0 the root; leaves get a uniform row, never read).
#[derive(Debug, Clone)]
pub struct TreeDraft {
    pub tree: verify::DraftTree,
    pub probs: Array2<f64>,
}

/// Indices of the `b` largest entries (ties: lowest index first).
fn top_indices(row: &[f32], b: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &c| row[c].total_cmp(&row[a]).then(a.cmp(&c)));
    idx.truncate(b);
    idx
}

/// Drafted tokens and the draft rows they were drawn from (`[n, V]`, after the
/// same warp as the target; one-hot for deterministic proposers).
#[derive(Debug, Clone)]
pub struct Draft {
    pub tokens: Vec<u32>,
    pub probs: Array2<f64>,
}

/// Something that proposes draft tokens.
pub trait Proposer {
    /// A short description (for reports).
    fn name(&self) -> String;
    /// Propose up to `k` tokens continuing `context` (non-empty).
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        warp: &Warp,
        rng: &mut ChaCha8Rng,
    ) -> Result<Draft>;
    /// The first `keep` tokens of the last context + draft are accepted:
    /// discard the rest of any state (KV entries).
    fn rollback(&mut self, keep: usize);
    /// Propose a tree of the given shape continuing `context`: at T > 0 each
    /// node's children are independent draws from its draft row (what makes
    /// SpecInfer's rule lossless); at T = 0 they are the draft's top tokens.
    fn propose_tree(
        &mut self,
        _context: &[u32],
        _shape: &TreeShape,
        _warp: &Warp,
        _rng: &mut ChaCha8Rng,
    ) -> Result<TreeDraft> {
        Err(Error::invalid(
            "draft",
            format!("{} cannot propose trees (use a model draft)", self.name()),
        ))
    }
    /// After tree verification: `context_len` context tokens plus the tree
    /// nodes `path` (root excluded, increasing) are accepted.
    fn rollback_tree(&mut self, context_len: usize, path: &[usize]) -> Result<()> {
        self.rollback(context_len + path.len());
        Ok(())
    }
}

/// A draft model (a smaller model with the target's tokenizer, or the
/// target's own first N layers).
#[derive(Clone)]
pub struct ModelProposer<'m> {
    inner: CachedModel<'m>,
    label: String,
}

impl<'m> ModelProposer<'m> {
    /// A separate draft model (check its tokenizer with [`same_tokenizer`]).
    pub fn model(model: &'m Llama, kind: CacheKind, label: &str) -> Result<Self> {
        Ok(ModelProposer {
            inner: CachedModel::new(model, kind, model.config.n_layers)?,
            label: label.to_string(),
        })
    }
    /// Self-speculative: the target's first `layers` blocks + final norm + head.
    pub fn layers(target: &'m Llama, kind: CacheKind, layers: usize) -> Result<Self> {
        Ok(ModelProposer {
            inner: CachedModel::new(target, kind, layers)?,
            label: format!(
                "self-speculative, first {layers} of {} layers",
                target.config.n_layers
            ),
        })
    }
    pub fn cache(&self) -> &KvCache {
        self.inner.cache()
    }
    /// Run `tokens` into the cache now (a shared prompt prefix, cloned per run).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.inner.extend(tokens).map(|_| ())
    }
}

impl Proposer for ModelProposer<'_> {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        warp: &Warp,
        rng: &mut ChaCha8Rng,
    ) -> Result<Draft> {
        let v = self.inner.model.config.vocab;
        let mut seq = context.to_vec();
        let mut tokens = Vec::with_capacity(k);
        let mut probs = Array2::zeros((k, v));
        for i in 0..k {
            let logits = self.inner.extend(&seq)?;
            let last = logits.row(logits.nrows() - 1);
            let row = warp.probs_from_logits(last.as_slice().expect("contiguous row"));
            let x = if warp.is_greedy() {
                verify::argmax(ArrayView1::from(&row[..]))
            } else {
                verify::sample_inverse_cdf(ArrayView1::from(&row[..]), rng.random::<f64>())
                    .expect("warped row has mass")
            } as u32;
            probs.row_mut(i).assign(&ArrayView1::from(&row[..]));
            tokens.push(x);
            seq.push(x);
        }
        Ok(Draft { tokens, probs })
    }
    fn rollback(&mut self, keep: usize) {
        self.inner.rollback(keep);
    }
    /// Level by level: the draft runs once over the context, then once per
    /// non-leaf level over that level's new nodes with the tree mask (node
    /// `n ≥ 1` is cache row `context.len() + n − 1`, at position
    /// `context.len() − 1 + depth(n)`).
    fn propose_tree(
        &mut self,
        context: &[u32],
        shape: &TreeShape,
        warp: &Warp,
        rng: &mut ChaCha8Rng,
    ) -> Result<TreeDraft> {
        shape.validate()?;
        let v = self.inner.model.config.vocab;
        let ctx = context.len();
        let logits = self.inner.extend(context)?;
        let root = logits.row(logits.nrows() - 1).to_vec();
        let mut rows: Vec<Vec<f64>> = vec![warp.probs_from_logits(&root)];
        let mut node_logits: Vec<Vec<f32>> = vec![root];
        let (mut parents, mut tokens, mut depth) = (Vec::new(), Vec::new(), vec![0usize]);
        let mut level = vec![0usize];
        for (d, &b) in shape.branching.iter().enumerate() {
            let mut next = Vec::new();
            for &n in &level {
                let children: Vec<u32> = if warp.is_greedy() {
                    top_indices(&node_logits[n], b)
                        .into_iter()
                        .map(|t| t as u32)
                        .collect()
                } else {
                    (0..b)
                        .map(|_| {
                            verify::sample_inverse_cdf(
                                ArrayView1::from(&rows[n][..]),
                                rng.random::<f64>(),
                            )
                            .expect("warped row has mass") as u32
                        })
                        .collect()
                };
                for t in children {
                    parents.push(n);
                    tokens.push(t);
                    depth.push(d + 1);
                    next.push(tokens.len());
                }
            }
            if d + 1 < shape.depth() {
                let len = self.inner.cache.len();
                debug_assert_eq!(len, ctx + next[0] - 1);
                let toks: Vec<u32> = next.iter().map(|&m| tokens[m - 1]).collect();
                let positions: Vec<usize> = next.iter().map(|&m| ctx - 1 + depth[m]).collect();
                let mut visible = Array2::from_elem((next.len(), len + next.len()), false);
                for (r, &m) in next.iter().enumerate() {
                    visible.slice_mut(s![r, ..ctx]).fill(true);
                    let mut a = m;
                    while a != 0 {
                        visible[[r, ctx + a - 1]] = true;
                        a = parents[a - 1];
                    }
                }
                let l = self
                    .inner
                    .extend_masked(&toks, &positions, visible.view())?;
                for row in l.outer_iter() {
                    let row = row.to_vec();
                    rows.push(warp.probs_from_logits(&row));
                    node_logits.push(row);
                }
            } else {
                for _ in &next {
                    rows.push(vec![1.0 / v as f64; v]);
                }
            }
            level = next;
        }
        let mut probs = Array2::zeros((rows.len(), v));
        for (i, r) in rows.iter().enumerate() {
            probs.row_mut(i).assign(&ArrayView1::from(&r[..]));
        }
        Ok(TreeDraft {
            tree: verify::DraftTree { parents, tokens },
            probs,
        })
    }
    fn rollback_tree(&mut self, context_len: usize, path: &[usize]) -> Result<()> {
        let held = self.inner.cache.len();
        let rows: Vec<usize> = path
            .iter()
            .map(|&m| context_len + m - 1)
            .take_while(|&r| r < held)
            .collect();
        self.inner.compact(context_len, &rows)
    }
}

/// Prompt lookup / n-gram drafts (Saxena 2023; vLLM's `ngram` proposer): find
/// the most recent earlier occurrence of the context's last `n` tokens
/// (`n = max_n` down to `min_n`) and propose the tokens that followed it.
/// Deterministic: the draft rows are one-hot. Proposes nothing when no n-gram
/// matches (the step is then a plain decode step).
pub struct NgramProposer {
    pub vocab: usize,
    pub min_n: usize,
    pub max_n: usize,
}

impl NgramProposer {
    pub fn new(vocab: usize) -> Self {
        NgramProposer {
            vocab,
            min_n: 1,
            max_n: 3,
        }
    }
    /// The proposal for `context` (pure function of the context).
    pub fn lookup(&self, context: &[u32], k: usize) -> Vec<u32> {
        let len = context.len();
        for n in (self.min_n.max(1)..=self.max_n).rev() {
            if n >= len {
                continue;
            }
            let suffix = &context[len - n..];
            // Latest start j < len - n with context[j..j+n] == suffix.
            for j in (0..len - n).rev() {
                if &context[j..j + n] == suffix {
                    let end = (j + n + k).min(len);
                    return context[j + n..end].to_vec();
                }
            }
        }
        Vec::new()
    }
}

impl Proposer for NgramProposer {
    fn name(&self) -> String {
        format!("n-gram prompt lookup (n = {}..={})", self.min_n, self.max_n)
    }
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        _: &Warp,
        _: &mut ChaCha8Rng,
    ) -> Result<Draft> {
        let tokens = self.lookup(context, k);
        let mut probs = Array2::zeros((tokens.len(), self.vocab));
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= self.vocab {
                return Err(Error::invalid(
                    "context",
                    format!("token {t} is not < vocab size {}", self.vocab),
                ));
            }
            probs[[i, t as usize]] = 1.0;
        }
        Ok(Draft { tokens, probs })
    }
    fn rollback(&mut self, _: usize) {}
}

/// The target side: scores `[last context token, drafts…]` in one forward pass.
#[derive(Clone)]
pub struct Verifier<'m> {
    inner: CachedModel<'m>,
}

impl<'m> Verifier<'m> {
    pub fn new(target: &'m Llama, kind: CacheKind) -> Result<Self> {
        Ok(Verifier {
            inner: CachedModel::new(target, kind, target.config.n_layers)?,
        })
    }
    /// Logits `[n+1, V]`: row i is the target's next-token logits after
    /// `context ++ drafts[..i]`. One forward call over the uncached tokens
    /// (the whole prompt at the first step, else `n + 1` tokens).
    pub fn score(&mut self, context: &[u32], drafts: &[u32]) -> Result<Array2<f32>> {
        let mut seq = context.to_vec();
        seq.extend_from_slice(drafts);
        let logits = self.inner.extend(&seq)?;
        let n = drafts.len() + 1;
        Ok(logits.slice(s![logits.nrows() - n.., ..]).to_owned())
    }
    pub fn rollback(&mut self, keep: usize) {
        self.inner.rollback(keep);
    }
    /// Logits `[nodes, V]` of a draft tree in one forward pass: row `n` is
    /// the target's next-token logits after `context` plus node `n`'s path.
    /// The cache is brought to `context` minus its last token, then the last
    /// token (the root, at position `len − 1`) and the nodes (node `n` at
    /// position `len − 1 + depth(n)`, row `len − 1 + n`) are run through the
    /// tree mask. Follow with [`Verifier::accept_tree`].
    pub fn score_tree(&mut self, context: &[u32], tree: &verify::DraftTree) -> Result<Array2<f32>> {
        let ctx = context.len();
        if ctx == 0 {
            return Err(Error::invalid("context", "needs at least one token"));
        }
        self.inner.sync(&context[..ctx - 1])?;
        let mut toks = vec![context[ctx - 1]];
        toks.extend_from_slice(&tree.tokens);
        let positions: Vec<usize> = tree.depths().iter().map(|d| ctx - 1 + d).collect();
        let mask = tree.attention_mask();
        let cached = self.inner.cache.len();
        let mut visible = Array2::from_elem((toks.len(), cached + toks.len()), true);
        visible.slice_mut(s![.., cached..]).assign(&mask);
        self.inner.extend_masked(&toks, &positions, visible.view())
    }
    /// Keep `context` (`context_len` tokens) and the accepted `path`'s rows.
    pub fn accept_tree(&mut self, context_len: usize, path: &[usize]) -> Result<()> {
        let rows: Vec<usize> = path.iter().map(|&m| context_len - 1 + m).collect();
        self.inner.compact(context_len, &rows)
    }
    pub fn cache(&self) -> &KvCache {
        self.inner.cache()
    }
    /// Tokens whose KV the cache holds.
    pub fn cached(&self) -> &[u32] {
        self.inner.cached()
    }
    /// Run `tokens` into the cache now (a shared prompt prefix, cloned per run).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.inner.extend(tokens).map(|_| ())
    }
}

/// How drafts are verified.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum VerifyRule {
    /// Rejection sampling (greedy matching at temperature 0): lossless.
    #[default]
    Lossless,
    /// Medusa's typical acceptance: lossy.
    Typical(Typical),
}

/// Options of a speculative generation.
#[derive(Debug, Clone)]
pub struct SpecConfig {
    /// Draft tokens per target pass (≥ 1).
    pub k: usize,
    pub warp: Warp,
    pub max_new_tokens: usize,
    /// Tokens that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
    pub rule: VerifyRule,
    pub cache: CacheKind,
}

/// Acceptance statistics of a run (summable over prompts).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecStats {
    /// Target forward passes (one per step).
    pub passes: u64,
    /// Tokens emitted (before truncation at stop/max tokens, i.e. accepted + 1 per step).
    pub step_tokens: u64,
    /// Tokens kept in the output.
    pub tokens: u64,
    /// Draft tokens proposed.
    pub proposed: u64,
    /// Per draft position i: steps that reached it (all earlier drafts accepted).
    pub reached: Vec<u64>,
    /// Per draft position i: accepted when reached.
    pub accepted: Vec<u64>,
    /// Per draft position i: Σ over reaching steps of β_i = Σ_x min(p_i, q_i).
    pub beta_sum: Vec<f64>,
    /// Per draft position i: Σ over reaching steps of β_i (1 − β_i), the
    /// variance of that step's accept indicator given its context.
    pub beta_var_sum: Vec<f64>,
    /// Σ over steps of the product-form prediction `1 + β_1 + β_1β_2 + …`.
    pub predicted_tokens_sum: f64,
}

impl SpecStats {
    fn ensure(&mut self, k: usize) {
        if self.reached.len() < k {
            self.reached.resize(k, 0);
            self.accepted.resize(k, 0);
            self.beta_sum.resize(k, 0.0);
            self.beta_var_sum.resize(k, 0.0);
        }
    }
    pub fn merge(&mut self, o: &SpecStats) {
        self.ensure(o.reached.len());
        self.passes += o.passes;
        self.step_tokens += o.step_tokens;
        self.tokens += o.tokens;
        self.proposed += o.proposed;
        for i in 0..o.reached.len() {
            self.reached[i] += o.reached[i];
            self.accepted[i] += o.accepted[i];
            self.beta_sum[i] += o.beta_sum[i];
            self.beta_var_sum[i] += o.beta_var_sum[i];
        }
        self.predicted_tokens_sum += o.predicted_tokens_sum;
    }
    /// Measured acceptance over all reached draft positions.
    pub fn acceptance(&self) -> f64 {
        let r: u64 = self.reached.iter().sum();
        self.accepted.iter().sum::<u64>() as f64 / r.max(1) as f64
    }
    /// TV-predicted acceptance: mean β over the same reached positions.
    pub fn predicted_acceptance(&self) -> f64 {
        let r: u64 = self.reached.iter().sum();
        self.beta_sum.iter().sum::<f64>() / r.max(1) as f64
    }
    /// Standard error of `acceptance() − predicted_acceptance()`: given its
    /// context, each reached position's accept indicator is Bernoulli with
    /// mean β_i, so the difference is a mean of n zero-mean terms that are
    /// uncorrelated (martingale differences), with variance
    /// `Σ β_i (1 − β_i) / n²`.
    pub fn acceptance_diff_se(&self) -> f64 {
        let r: u64 = self.reached.iter().sum();
        self.beta_var_sum.iter().sum::<f64>().sqrt() / r.max(1) as f64
    }
    /// Measured tokens per target pass.
    pub fn tokens_per_pass(&self) -> f64 {
        self.step_tokens as f64 / self.passes.max(1) as f64
    }
    /// Predicted tokens per pass (mean of the per-step product form of β).
    pub fn predicted_tokens_per_pass(&self) -> f64 {
        self.predicted_tokens_sum / self.passes.max(1) as f64
    }
}

/// Check that a draft's tokenizer is the target's: same vocabulary size,
/// BOS/EOS, and the same text for every token id.
pub fn same_tokenizer(target: &dyn Tokenizer, draft: &dyn Tokenizer) -> Result<()> {
    let mismatch = |reason: String| Error::invalid("draft tokenizer", reason);
    if target.vocab_size() != draft.vocab_size() {
        return Err(mismatch(format!(
            "vocabulary size {} differs from the target's {}",
            draft.vocab_size(),
            target.vocab_size()
        )));
    }
    if target.bos() != draft.bos() || target.eos() != draft.eos() {
        return Err(mismatch(format!(
            "BOS/EOS {:?}/{:?} differ from the target's {:?}/{:?}",
            draft.bos(),
            draft.eos(),
            target.bos(),
            target.eos()
        )));
    }
    for t in 0..target.vocab_size() as u32 {
        let (a, b) = (target.decode(&[t]), draft.decode(&[t]));
        if a != b {
            return Err(mismatch(format!(
                "token {t} decodes to {b:?}, the target's to {a:?}"
            )));
        }
    }
    Ok(())
}

/// Speculative generation of up to `cfg.max_new_tokens` tokens after `prompt`.
pub fn speculative_generate(
    target: &Llama,
    proposer: &mut dyn Proposer,
    prompt: &[u32],
    cfg: &SpecConfig,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<u32>, SpecStats)> {
    let mut verifier = Verifier::new(target, cfg.cache)?;
    speculative_generate_with(target, &mut verifier, proposer, prompt, cfg, rng)
}

/// [`speculative_generate`] with a given verifier (whose cache may already
/// hold a prefix of `prompt`: it is reused, anything else is rolled back).
pub fn speculative_generate_with(
    target: &Llama,
    verifier: &mut Verifier,
    proposer: &mut dyn Proposer,
    prompt: &[u32],
    cfg: &SpecConfig,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<u32>, SpecStats)> {
    if prompt.is_empty() {
        return Err(Error::invalid(
            "prompt",
            "needs at least one token (e.g. BOS)",
        ));
    }
    if cfg.k == 0 {
        return Err(Error::invalid(
            "k",
            "at least one draft token per pass is required (k ≥ 1)",
        ));
    }
    cfg.warp.validate()?;
    let max_len = target.config.max_seq_len;
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    let mut stats = SpecStats::default();
    stats.ensure(cfg.k);
    while out.len() < cfg.max_new_tokens && context.len() < max_len {
        // The verifier caches context + drafts: at most max_len tokens.
        let room = max_len - context.len();
        let k = cfg.k.min(cfg.max_new_tokens - out.len()).min(room);
        let draft = if k == 0 {
            Draft {
                tokens: Vec::new(),
                probs: Array2::zeros((0, target.config.vocab)),
            }
        } else {
            proposer.propose(&context, k, &cfg.warp, rng)?
        };
        let n = draft.tokens.len();
        let logits = verifier.score(&context, &draft.tokens)?;
        stats.passes += 1;
        stats.proposed += n as u64;
        let mut p = Array2::zeros(logits.raw_dim());
        for (i, row) in logits.outer_iter().enumerate() {
            let w = cfg
                .warp
                .probs_from_logits(row.as_slice().expect("contiguous"));
            p.row_mut(i).assign(&ArrayView1::from(&w[..]));
        }
        let outcome = if n == 0 {
            let y = if cfg.warp.is_greedy() {
                verify::argmax(logits.row(0))
            } else {
                verify::sample_inverse_cdf(p.row(0), rng.random::<f64>()).expect("mass")
            };
            verify::VerifyOutcome {
                accepted: 0,
                tokens: vec![y as u32],
            }
        } else {
            match cfg.rule {
                VerifyRule::Lossless if cfg.warp.is_greedy() => {
                    verify::greedy_verify(logits.view(), &draft.tokens)?
                }
                VerifyRule::Lossless => {
                    let u = VerifyUniforms::draw(rng, n);
                    verify::rejection_sample(p.view(), draft.probs.view(), &draft.tokens, &u)?
                }
                VerifyRule::Typical(t) => {
                    verify::typical_accept(p.view(), &draft.tokens, &t, rng.random::<f64>())?
                }
            }
        };
        // Statistics: β_i for every drafted position; reached/accepted counts.
        let betas: Vec<f64> = (0..n)
            .map(|i| {
                theory::acceptance(
                    p.row(i).as_slice().expect("contiguous"),
                    draft.probs.row(i).as_slice().expect("contiguous"),
                )
            })
            .collect();
        stats.predicted_tokens_sum += theory::expected_tokens_per_pass_vec(&betas);
        for i in 0..n.min(outcome.accepted + 1) {
            stats.reached[i] += 1;
            stats.beta_sum[i] += betas[i];
            stats.beta_var_sum[i] += betas[i] * (1.0 - betas[i]);
            if i < outcome.accepted {
                stats.accepted[i] += 1;
            }
        }
        stats.step_tokens += outcome.tokens.len() as u64;
        // Roll back both caches to context ++ accepted drafts.
        let keep = context.len() + outcome.accepted;
        verifier.rollback(keep);
        proposer.rollback(keep);
        let mut stop = false;
        for &t in &outcome.tokens {
            if cfg.stop_tokens.contains(&t) || out.len() == cfg.max_new_tokens {
                stop = true;
                break;
            }
            out.push(t);
            context.push(t);
        }
        if stop {
            break;
        }
    }
    stats.tokens = out.len() as u64;
    Ok((out, stats))
}

/// Speculative generation with a draft *tree* per target pass (SpecInfer):
/// the proposer drafts a tree of `shape` ([`Proposer::propose_tree`]), the
/// target scores every node in one pass through the tree mask
/// ([`Verifier::score_tree`]), [`verify::tree_verify_path`] (or
/// [`verify::greedy_tree_verify`] at T = 0) picks the accepted path, and both
/// caches keep only that path's K/V ([`KvCache::compact`]). `cfg.k` is not
/// used (the tree's depth is the number of draft tokens per path); near the
/// end of generation or of the context the tree is cut to fewer levels.
///
/// Randomness per step: the proposer's draws (one uniform per sampled child,
/// breadth-first), then one accept uniform per node and one resample uniform.
///
/// Statistics: position `d` is depth `d` of the accepted path (reached when
/// `d` drafts were accepted; accepted when a child of that node was); the
/// predicted acceptance there is SpecInfer's `1 − Π_j (1 − β_j)`
/// ([`verify::multi_draft_acceptance`]; at T = 0, whether the target's argmax
/// is among the children), and the predicted tokens per pass is the expected
/// path length + 1 under those per-child probabilities.
pub fn speculative_generate_tree_with(
    target: &Llama,
    verifier: &mut Verifier,
    proposer: &mut dyn Proposer,
    prompt: &[u32],
    cfg: &SpecConfig,
    shape: &TreeShape,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<u32>, SpecStats)> {
    if prompt.is_empty() {
        return Err(Error::invalid(
            "prompt",
            "needs at least one token (e.g. BOS)",
        ));
    }
    shape.validate()?;
    cfg.warp.validate()?;
    if let VerifyRule::Typical(_) = cfg.rule {
        return Err(Error::invalid(
            "verify rule",
            "typical acceptance is not defined for trees (use lossless verification)",
        ));
    }
    let greedy = cfg.warp.is_greedy();
    let max_len = target.config.max_seq_len;
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    let mut stats = SpecStats::default();
    stats.ensure(shape.depth());
    while out.len() < cfg.max_new_tokens && context.len() < max_len {
        // The verifier caches context + the non-root nodes: at most max_len rows.
        let room = max_len - context.len();
        let mut depth = shape.depth().min(cfg.max_new_tokens - out.len());
        while depth > 0 && shape.truncated(depth).nodes() > room {
            depth -= 1;
        }
        stats.passes += 1;
        if depth == 0 {
            let logits = verifier.score(&context, &[])?;
            let row = logits.row(0);
            let y = if greedy {
                verify::argmax(row)
            } else {
                let w = cfg
                    .warp
                    .probs_from_logits(row.as_slice().expect("contiguous"));
                verify::sample_inverse_cdf(ArrayView1::from(&w[..]), rng.random::<f64>())
                    .expect("mass")
            } as u32;
            stats.step_tokens += 1;
            stats.predicted_tokens_sum += 1.0;
            verifier.rollback(context.len());
            proposer.rollback(context.len());
            if cfg.stop_tokens.contains(&y) {
                break;
            }
            out.push(y);
            context.push(y);
            continue;
        }
        let sh = shape.truncated(depth);
        let draft = proposer.propose_tree(&context, &sh, &cfg.warp, rng)?;
        let tree = &draft.tree;
        let nodes = tree.len();
        let logits = verifier.score_tree(&context, tree)?;
        stats.proposed += tree.tokens.len() as u64;
        let mut p = Array2::zeros(logits.raw_dim());
        for (i, row) in logits.outer_iter().enumerate() {
            let w = cfg
                .warp
                .probs_from_logits(row.as_slice().expect("contiguous"));
            p.row_mut(i).assign(&ArrayView1::from(&w[..]));
        }
        let res = if greedy {
            verify::greedy_tree_verify(logits.view(), tree)?
        } else {
            let u = verify::TreeUniforms {
                accept: (1..nodes).map(|_| rng.random::<f64>()).collect(),
                resample: rng.random::<f64>(),
            };
            verify::tree_verify_path(p.view(), draft.probs.view(), tree, &u)?
        };
        // Per node: the probability that each child is the accepted one.
        let children: Vec<Vec<usize>> = (0..nodes).map(|n| tree.children(n)).collect();
        let child_probs: Vec<Vec<f64>> = (0..nodes)
            .map(|n| tree_child_probs(&p, &draft.probs, tree, &children[n], n, greedy))
            .collect();
        // Expected accepted drafts below each node (children have larger indices).
        let mut below = vec![0.0; nodes];
        for n in (0..nodes).rev() {
            below[n] = children[n]
                .iter()
                .zip(&child_probs[n])
                .map(|(&c, &pc)| pc * (1.0 + below[c]))
                .sum();
        }
        stats.predicted_tokens_sum += 1.0 + below[0];
        let accepted = res.outcome.accepted;
        for d in 0..depth.min(accepted + 1) {
            let node = if d == 0 { 0 } else { res.path[d - 1] };
            let a: f64 = child_probs[node].iter().sum::<f64>().min(1.0);
            stats.reached[d] += 1;
            stats.beta_sum[d] += a;
            stats.beta_var_sum[d] += a * (1.0 - a);
            if d < accepted {
                stats.accepted[d] += 1;
            }
        }
        stats.step_tokens += res.outcome.tokens.len() as u64;
        verifier.accept_tree(context.len(), &res.path)?;
        proposer.rollback_tree(context.len(), &res.path)?;
        let mut stop = false;
        for &t in &res.outcome.tokens {
            if cfg.stop_tokens.contains(&t) || out.len() == cfg.max_new_tokens {
                stop = true;
                break;
            }
            out.push(t);
            context.push(t);
        }
        if stop {
            break;
        }
    }
    stats.tokens = out.len() as u64;
    Ok((out, stats))
}

/// [`speculative_generate_tree_with`] with a fresh verifier.
pub fn speculative_generate_tree(
    target: &Llama,
    proposer: &mut dyn Proposer,
    prompt: &[u32],
    cfg: &SpecConfig,
    shape: &TreeShape,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<u32>, SpecStats)> {
    let mut verifier = Verifier::new(target, cfg.cache)?;
    speculative_generate_tree_with(target, &mut verifier, proposer, prompt, cfg, shape, rng)
}

/// `P(child j of node n is the accepted one)` for each child, marginal over
/// the children's i.i.d. draws (T > 0: `Π_{i<j}(1 − β_i)·β_j` along the
/// residual chain of [`verify::multi_draft_acceptance`]); at T = 0, 1 for
/// the first child holding the target's argmax.
fn tree_child_probs(
    p: &Array2<f64>,
    q: &Array2<f64>,
    tree: &verify::DraftTree,
    children: &[usize],
    n: usize,
    greedy: bool,
) -> Vec<f64> {
    if greedy {
        let y = verify::argmax(p.row(n)) as u32;
        let hit = children.iter().position(|&c| tree.tokens[c - 1] == y);
        return (0..children.len())
            .map(|j| f64::from(Some(j) == hit))
            .collect();
    }
    let (pr, qr) = (p.row(n).to_vec(), q.row(n).to_vec());
    let mut none = 1.0;
    let mut cur = pr;
    let mut out = Vec::with_capacity(children.len());
    for _ in children {
        let beta = theory::acceptance(&cur, &qr).min(1.0);
        out.push(none * beta);
        none *= 1.0 - beta;
        let r: Vec<f64> = cur
            .iter()
            .zip(&qr)
            .map(|(a, b)| if a > b { a - b } else { 0.0 })
            .collect();
        let total: f64 = r.iter().sum();
        if total > 0.0 {
            cur = r.into_iter().map(|x| x / total).collect();
        }
    }
    out
}

/// Plain autoregressive sampling with the same warp and the same uniform
/// convention (one `rng.random::<f64>()` per token, inverse CDF), for
/// comparisons with [`speculative_generate`].
pub fn plain_generate(
    target: &Llama,
    prompt: &[u32],
    warp: &Warp,
    max_new_tokens: usize,
    kind: CacheKind,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<u32>> {
    warp.validate()?;
    let mut m = CachedModel::new(target, kind, target.config.n_layers)?;
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_new_tokens && context.len() < target.config.max_seq_len {
        let logits = m.extend(&context)?;
        let last = logits.row(logits.nrows() - 1);
        let y = if warp.is_greedy() {
            verify::argmax(last)
        } else {
            let w = warp.probs_from_logits(last.as_slice().expect("contiguous"));
            verify::sample_inverse_cdf(ArrayView1::from(&w[..]), rng.random::<f64>()).expect("mass")
        } as u32;
        out.push(y);
        context.push(y);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod tree_tests;
