//! Verification of drafted tokens on distributions: the lossless rejection
//! sampling rule (Leviathan et al. 2023, Chen et al. 2023) and its variants,
//! written against **explicit uniforms** so that a GPU kernel fed the same
//! numbers must produce the same tokens, bit for bit.
//!
//! ## The rule, precisely ([`rejection_sample`])
//! Inputs: target rows `p` `[k+1, V]` (row `i` is the target's distribution for
//! the token after the context plus drafts `x_0..x_{i-1}`), draft rows `q`
//! `[k, V]` (row `i` is the distribution `x_i` was drawn from), the drafted
//! tokens `x_0..x_{k-1}`, and uniforms `accept[0..k]`, `resample`, all in
//! `[0, 1)`. All arithmetic below is in the element type `T` (f32 or f64);
//! `T(u)` is the uniform rounded to `T` (`u as f32` for f32).
//!
//! ```text
//! for i in 0..k:
//!     pi = p[i, x_i]; qi = q[i, x_i]
//!     if pi >= qi                   -> accept x_i         (outright, no uniform read)
//!     else if T(accept[i]) * qi < pi -> accept x_i
//!     else:                            reject: emit sample(r, resample) and stop,
//!                                      r[j] = (p[i,j] > q[i,j]) ? p[i,j] - q[i,j] : 0
//! all k accepted                    -> emit the bonus token sample(p[k, :], resample)
//!
//! sample(w, u):   total = w[0] + w[1] + ... + w[V-1]    (sequential, in T, from index 0)
//!                 t = T(u) * total
//!                 c = 0; for j in 0..V: c = c + w[j]; if c > t: return j
//!                 return the last j with w[j] > 0        (only reached through rounding)
//! ```
//! If the residual `r` is identically zero (possible only through rounding: `p`
//! and `q` both within tolerance of 1 with `p ≤ q` everywhere), the corrected
//! token is sampled from `p[i, :]` instead. The emitted tokens are the accepted
//! drafts followed by exactly one corrected or bonus token, so
//! `tokens.len() == accepted + 1`. In exact arithmetic the rule makes each
//! emitted token distributed exactly as the target's `p` (see
//! [`super::lossless`] for the proof, exact and statistical).
//!
//! [`verify_step`] draws the uniforms from a `ChaCha8Rng` in a fixed order:
//! `accept[0], …, accept[k-1], resample` (`rng.random::<f64>()` each), even when
//! some are not used, so the stream position after a step does not depend on
//! the outcome.
//!
//! ## Validation
//! Every probability row must be finite, non-negative and sum to 1 within
//! [`row_sum_tolerance`]`::<T>(V) = (V + 2)·ε_T` (ε_T the machine epsilon of
//! `T`). Derivation: a softmax row in `T` has per-entry error ≤ 3u (exp within
//! one ulp = 2u, the division u; u = ε_T/2 the unit roundoff) and a normaliser
//! whose sequential sum has relative error ≤ (V−1)u, so `|Σp − 1| ≤ (V+2)u`
//! to first order; a row rounded from exact probabilities is within `(2V−1)u`.
//! The tolerance is twice the softmax bound, which covers both (f32, V = 512:
//! 3.1e-5; V = 49152: 5.9e-3; f64, V = 512: 1.1e-13).
//!
//! ## Variants
//! - [`greedy_verify`]: temperature 0, accept while the target's argmax equals
//!   the draft token (ties: lowest index), then emit the target's argmax.
//!   Equal to [`rejection_sample`] on one-hot rows for any uniforms.
//! - [`Warp`]: temperature, top-k, top-p applied to `p` and `q` alike
//!   ([`rejection_sample_warped`]); lossless with respect to the warped target.
//! - [`Typical`]: Medusa's typical acceptance (lossy, not the default).
//! - [`tree_verify`]: multi-draft (SpecInfer) verification of a token tree
//!   ([`tree_verify_path`] also returns the accepted nodes, [`greedy_tree_verify`]
//!   is its temperature-0 form).

use ndarray::{Array2, ArrayView1, ArrayView2};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// The element types verification runs in: the attention oracle's floats plus
/// their machine epsilon (for the row-sum tolerance).
pub trait Float: crate::attention::Float {
    /// Machine epsilon ε (2× the unit roundoff).
    const EPSILON: f64;
}
impl Float for f32 {
    const EPSILON: f64 = f32::EPSILON as f64;
}
impl Float for f64 {
    const EPSILON: f64 = f64::EPSILON;
}

/// The uniforms one verification step consumes (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyUniforms {
    /// One per draft token, in `[0, 1)`.
    pub accept: Vec<f64>,
    /// For the corrected or bonus token, in `[0, 1)`.
    pub resample: f64,
}

impl VerifyUniforms {
    /// Draw `k` accept uniforms then the resample uniform, in that order.
    pub fn draw(rng: &mut ChaCha8Rng, k: usize) -> Self {
        let accept = (0..k).map(|_| rng.random::<f64>()).collect();
        let resample = rng.random::<f64>();
        VerifyUniforms { accept, resample }
    }
}

/// What a verification step emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOutcome {
    /// How many draft tokens were accepted (0..=k).
    pub accepted: usize,
    /// The accepted drafts followed by one corrected or bonus token.
    pub tokens: Vec<u32>,
}

/// `|Σ row − 1|` allowed for a probability row of length `v` in `T`
/// (derivation in the module doc).
pub fn row_sum_tolerance<T: Float>(v: usize) -> f64 {
    (v as f64 + 2.0) * T::EPSILON
}

/// Check that every row of `rows` is a probability distribution: finite,
/// non-negative, summing to 1 within [`row_sum_tolerance`].
pub fn validate_rows<T: Float>(what: &str, rows: ArrayView2<T>) -> Result<()> {
    let v = rows.ncols();
    if v == 0 {
        return Err(Error::shape(
            what,
            "[rows, V ≥ 1]",
            format!("{:?}", rows.shape()),
        ));
    }
    let tol = row_sum_tolerance::<T>(v);
    for (i, row) in rows.outer_iter().enumerate() {
        let mut sum = 0.0f64;
        for (j, &x) in row.iter().enumerate() {
            let x = x.to_f64();
            if !x.is_finite() {
                return Err(Error::NonFinite {
                    what: what.to_string(),
                    index: format!("[{i}, {j}]"),
                });
            }
            if x < 0.0 {
                return Err(Error::invalid(
                    what,
                    format!("negative probability {x} at [{i}, {j}]"),
                ));
            }
            sum += x;
        }
        if (sum - 1.0).abs() > tol {
            return Err(Error::invalid(
                what,
                format!(
                    "row {i} sums to {sum} (|sum - 1| = {:.3e} > tolerance {tol:.3e} for V = {v})",
                    (sum - 1.0).abs()
                ),
            ));
        }
    }
    Ok(())
}

fn check_uniform(name: &str, u: f64) -> Result<()> {
    if !(0.0..1.0).contains(&u) {
        return Err(Error::invalid(
            name,
            format!("uniform {u} is not in [0, 1)"),
        ));
    }
    Ok(())
}

/// Check shapes, tokens and rows for a k-token verification.
fn check_inputs<T: Float>(
    target: ArrayView2<T>,
    draft: ArrayView2<T>,
    draft_tokens: &[u32],
) -> Result<usize> {
    let k = draft_tokens.len();
    if k == 0 {
        return Err(Error::invalid(
            "k",
            "at least one draft token is required (k ≥ 1)",
        ));
    }
    let v = target.ncols();
    if target.nrows() != k + 1 {
        return Err(Error::shape(
            "target probabilities",
            format!("[k+1 = {}, V]", k + 1),
            format!("{:?}", target.shape()),
        ));
    }
    if draft.nrows() != k || draft.ncols() != v {
        return Err(Error::shape(
            "draft probabilities",
            format!("[k = {k}, V = {v}] (V of the target)"),
            format!("{:?}", draft.shape()),
        ));
    }
    for (i, &t) in draft_tokens.iter().enumerate() {
        if t as usize >= v {
            return Err(Error::invalid(
                "draft tokens",
                format!("token {t} at position {i} is not < V = {v}"),
            ));
        }
    }
    validate_rows("target probabilities", target)?;
    validate_rows("draft probabilities", draft)?;
    Ok(k)
}

/// Inverse-CDF sampling of unnormalised non-negative weights, exactly as the
/// module doc's `sample(w, u)`. `None` when every weight is zero.
pub fn sample_inverse_cdf<T: Float>(weights: ArrayView1<T>, u: f64) -> Option<usize> {
    let zero = T::from_f64(0.0);
    let mut total = zero;
    for &w in weights.iter() {
        total = total + w;
    }
    if !(total > zero) {
        return None;
    }
    let t = T::from_f64(u) * total;
    let mut c = zero;
    let mut last_positive = None;
    for (j, &w) in weights.iter().enumerate() {
        c = c + w;
        if w > zero {
            last_positive = Some(j);
        }
        if c > t {
            return Some(j);
        }
    }
    last_positive
}

/// The residual `max(p − q, 0)` in `T`.
pub fn residual<T: Float>(p: ArrayView1<T>, q: ArrayView1<T>) -> Vec<T> {
    p.iter()
        .zip(q.iter())
        .map(|(&a, &b)| if a > b { a - b } else { T::from_f64(0.0) })
        .collect()
}

/// The lossless rejection-sampling verification (the rule in the module doc).
pub fn rejection_sample<T: Float>(
    target: ArrayView2<T>,
    draft: ArrayView2<T>,
    draft_tokens: &[u32],
    uniforms: &VerifyUniforms,
) -> Result<VerifyOutcome> {
    let k = check_inputs(target, draft, draft_tokens)?;
    if uniforms.accept.len() != k {
        return Err(Error::shape(
            "accept uniforms",
            format!("[k = {k}]"),
            format!("[{}]", uniforms.accept.len()),
        ));
    }
    for &u in &uniforms.accept {
        check_uniform("accept uniform", u)?;
    }
    check_uniform("resample uniform", uniforms.resample)?;
    Ok(rejection_sample_unchecked(
        target,
        draft,
        draft_tokens,
        uniforms,
    ))
}

/// [`rejection_sample`] without validation (inputs already checked).
fn rejection_sample_unchecked<T: Float>(
    target: ArrayView2<T>,
    draft: ArrayView2<T>,
    draft_tokens: &[u32],
    uniforms: &VerifyUniforms,
) -> VerifyOutcome {
    let k = draft_tokens.len();
    let mut tokens = Vec::with_capacity(k + 1);
    for (i, &x) in draft_tokens.iter().enumerate() {
        let p = target[[i, x as usize]];
        let q = draft[[i, x as usize]];
        if p >= q || T::from_f64(uniforms.accept[i]) * q < p {
            tokens.push(x);
            continue;
        }
        let r = residual(target.row(i), draft.row(i));
        let y = sample_inverse_cdf(ArrayView1::from(&r[..]), uniforms.resample)
            .or_else(|| sample_inverse_cdf(target.row(i), uniforms.resample))
            .expect("validated target row has positive mass");
        tokens.push(y as u32);
        return VerifyOutcome {
            accepted: i,
            tokens,
        };
    }
    let y = sample_inverse_cdf(target.row(k), uniforms.resample)
        .expect("validated target row has positive mass");
    tokens.push(y as u32);
    VerifyOutcome {
        accepted: k,
        tokens,
    }
}

/// Draw the uniforms from `rng` (order in the module doc) and verify.
pub fn verify_step<T: Float>(
    rng: &mut ChaCha8Rng,
    target: ArrayView2<T>,
    draft: ArrayView2<T>,
    draft_tokens: &[u32],
) -> Result<VerifyOutcome> {
    let uniforms = VerifyUniforms::draw(rng, draft_tokens.len());
    rejection_sample(target, draft, draft_tokens, &uniforms)
}

/// Index of the largest entry; ties go to the lowest index. NaN entries are
/// never chosen unless all are NaN (then 0).
pub fn argmax<T: Float>(row: ArrayView1<T>) -> usize {
    let mut best = 0;
    let mut best_v: Option<T> = None;
    for (j, &x) in row.iter().enumerate() {
        match best_v {
            Some(b) if !(x > b) => {}
            _ if x.to_f64().is_nan() => {}
            _ => {
                best = j;
                best_v = Some(x);
            }
        }
    }
    best
}

/// Greedy verification (temperature 0): accept `x_i` while
/// `argmax(target[i]) == x_i`; then emit `argmax(target[accepted])`.
/// `target` may hold logits or probabilities (`[k+1, V]`), only the argmax
/// matters; no draft distribution is needed.
pub fn greedy_verify<T: Float>(
    target: ArrayView2<T>,
    draft_tokens: &[u32],
) -> Result<VerifyOutcome> {
    let k = draft_tokens.len();
    if k == 0 {
        return Err(Error::invalid(
            "k",
            "at least one draft token is required (k ≥ 1)",
        ));
    }
    if target.nrows() != k + 1 || target.ncols() == 0 {
        return Err(Error::shape(
            "target",
            format!("[k+1 = {}, V ≥ 1]", k + 1),
            format!("{:?}", target.shape()),
        ));
    }
    let v = target.ncols();
    let mut tokens = Vec::with_capacity(k + 1);
    for (i, &x) in draft_tokens.iter().enumerate() {
        if x as usize >= v {
            return Err(Error::invalid(
                "draft tokens",
                format!("token {x} at position {i} is not < V = {v}"),
            ));
        }
        let best = argmax(target.row(i)) as u32;
        if best != x {
            tokens.push(best);
            return Ok(VerifyOutcome {
                accepted: i,
                tokens,
            });
        }
        tokens.push(x);
    }
    tokens.push(argmax(target.row(k)) as u32);
    Ok(VerifyOutcome {
        accepted: k,
        tokens,
    })
}

/// Sampling warps, applied in Hugging Face's order: temperature, then top-k,
/// then top-p. The same warp must be applied to the target and the draft rows;
/// rejection sampling is then lossless with respect to the *warped* target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Warp {
    /// `p ∝ p^{1/T}` (equivalently `softmax(logits / T)`); `0` means greedy
    /// (one-hot at the argmax).
    pub temperature: f64,
    /// Keep the `k` most probable tokens (ties: lower index first).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most probable tokens whose mass reaches
    /// `top_p` (the token that crosses the threshold is kept).
    pub top_p: Option<f64>,
}

impl Default for Warp {
    fn default() -> Self {
        Warp {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }
}

impl Warp {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return Err(Error::invalid(
                "temperature",
                format!("{} is not a finite number ≥ 0", self.temperature),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid("top_k", "must be ≥ 1"));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid("top_p", format!("{p} is not in (0, 1]")));
            }
        }
        Ok(())
    }

    /// Is this greedy decoding (temperature 0)?
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Warp logits into a probability row (f64): `softmax(logits / T)`, then
    /// top-k and top-p, renormalised.
    pub fn probs_from_logits(&self, logits: &[f32]) -> Vec<f64> {
        if self.is_greedy() {
            return one_hot(logits.len(), argmax(ArrayView1::from(logits)));
        }
        let scaled: Vec<f64> = logits
            .iter()
            .map(|&x| x as f64 / self.temperature)
            .collect();
        self.softmax_truncated(&scaled)
    }

    /// Warp a probability row: `p^{1/T}` renormalised, then top-k and top-p.
    pub fn probs_from_probs(&self, p: &[f64]) -> Vec<f64> {
        if self.is_greedy() {
            return one_hot(p.len(), argmax(ArrayView1::from(p)));
        }
        let logs: Vec<f64> = p
            .iter()
            .map(|&x| {
                if x > 0.0 {
                    x.ln() / self.temperature
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        self.softmax_truncated(&logs)
    }

    /// `softmax(scaled)` (max-subtracted, in f64), then top-k and top-p.
    fn softmax_truncated(&self, scaled: &[f64]) -> Vec<f64> {
        let m = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut out: Vec<f64> = scaled.iter().map(|&x| (x - m).exp()).collect();
        normalise(&mut out);
        self.truncate(&mut out);
        out
    }

    fn truncate(&self, out: &mut [f64]) {
        if self.top_k.is_none() && self.top_p.is_none() {
            return;
        }
        let mut order: Vec<usize> = (0..out.len()).collect();
        order.sort_by(|&a, &b| out[b].total_cmp(&out[a]).then(a.cmp(&b)));
        let mut keep = out.len();
        if let Some(k) = self.top_k {
            keep = keep.min(k);
        }
        if let Some(tp) = self.top_p {
            let mut c = 0.0;
            for (n, &j) in order.iter().enumerate().take(keep) {
                c += out[j];
                if c >= tp {
                    keep = n + 1;
                    break;
                }
            }
        }
        for &j in &order[keep..] {
            out[j] = 0.0;
        }
        normalise(out);
    }
}

/// The distribution that puts all mass on `best`.
fn one_hot(v: usize, best: usize) -> Vec<f64> {
    let mut out = vec![0.0; v];
    out[best] = 1.0;
    out
}

fn normalise(x: &mut [f64]) {
    let s: f64 = x.iter().sum();
    for v in x.iter_mut() {
        *v /= s;
    }
}

/// Apply `warp` to every row of a probability matrix (f64).
pub fn warp_rows<T: Float>(warp: &Warp, rows: ArrayView2<T>) -> Array2<f64> {
    let mut out = Array2::zeros(rows.raw_dim());
    for (i, row) in rows.outer_iter().enumerate() {
        let r: Vec<f64> = row.iter().map(|x| x.to_f64()).collect();
        let w = warp.probs_from_probs(&r);
        for (j, x) in w.into_iter().enumerate() {
            out[[i, j]] = x;
        }
    }
    out
}

/// Rejection sampling after warping target and draft rows alike. With
/// temperature 0 this is [`greedy_verify`] on the target (one-hot rows make the
/// two rules coincide). Warped rows are computed and verified in f64.
pub fn rejection_sample_warped<T: Float>(
    target: ArrayView2<T>,
    draft: ArrayView2<T>,
    draft_tokens: &[u32],
    uniforms: &VerifyUniforms,
    warp: &Warp,
) -> Result<VerifyOutcome> {
    warp.validate()?;
    check_inputs(target, draft, draft_tokens)?;
    if warp.is_greedy() {
        return greedy_verify(target, draft_tokens);
    }
    let p = warp_rows(warp, target);
    let q = warp_rows(warp, draft);
    rejection_sample(p.view(), q.view(), draft_tokens, uniforms)
}

/// Medusa's typical acceptance (Cai et al. 2024, §2.3.1): **lossy**, off by
/// default. A draft token `x` at position `i` is accepted iff
/// `p_i(x) > min(ε, δ·exp(−H(p_i)))`, `H(p) = −Σ p ln p` (natural log,
/// `0 ln 0 = 0`; Medusa's code adds 1e-5 inside the log, we use the exact
/// entropy). Names as in Medusa's code: ε = `posterior_threshold`,
/// δ = `posterior_alpha`. After the accepted prefix one token is sampled
/// from the target row at that position by inverse CDF with `resample`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Typical {
    /// ε: the hard threshold (Medusa's default 0.09).
    pub posterior_threshold: f64,
    /// δ: the entropy-scaled threshold factor (Medusa's default 0.3).
    pub posterior_alpha: f64,
}

impl Default for Typical {
    fn default() -> Self {
        Typical {
            posterior_threshold: 0.09,
            posterior_alpha: 0.3,
        }
    }
}

/// Entropy in nats, `0 ln 0 = 0`.
pub fn entropy(p: &[f64]) -> f64 {
    -p.iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x * x.ln())
        .sum::<f64>()
}

/// Typical acceptance on distributions (see [`Typical`]). Lossy: the emitted
/// tokens are *not* distributed as `p`.
pub fn typical_accept<T: Float>(
    target: ArrayView2<T>,
    draft_tokens: &[u32],
    typical: &Typical,
    resample: f64,
) -> Result<VerifyOutcome> {
    let k = draft_tokens.len();
    if k == 0 {
        return Err(Error::invalid(
            "k",
            "at least one draft token is required (k ≥ 1)",
        ));
    }
    if target.nrows() != k + 1 {
        return Err(Error::shape(
            "target probabilities",
            format!("[k+1 = {}, V]", k + 1),
            format!("{:?}", target.shape()),
        ));
    }
    validate_rows("target probabilities", target)?;
    check_uniform("resample uniform", resample)?;
    if !(typical.posterior_threshold >= 0.0) || !(typical.posterior_alpha >= 0.0) {
        return Err(Error::invalid(
            "typical acceptance",
            "posterior_threshold and posterior_alpha must be ≥ 0",
        ));
    }
    let v = target.ncols();
    let mut tokens = Vec::with_capacity(k + 1);
    let mut accepted = k;
    for (i, &x) in draft_tokens.iter().enumerate() {
        if x as usize >= v {
            return Err(Error::invalid(
                "draft tokens",
                format!("token {x} at position {i} is not < V = {v}"),
            ));
        }
        let row: Vec<f64> = target.row(i).iter().map(|x| x.to_f64()).collect();
        let threshold = typical
            .posterior_threshold
            .min(typical.posterior_alpha * (-entropy(&row)).exp());
        if row[x as usize] > threshold {
            tokens.push(x);
        } else {
            accepted = i;
            break;
        }
    }
    let y = sample_inverse_cdf(target.row(accepted), resample)
        .expect("validated target row has positive mass");
    tokens.push(y as u32);
    Ok(VerifyOutcome { accepted, tokens })
}

/// A tree of draft tokens. Node 0 is the root (the last context position,
/// no token); node `n ≥ 1` holds `tokens[n-1]` and has parent `parents[n-1] < n`.
/// Children of a node are tried in index order.
///
/// ```text
///   node:    0 (root)
///           / \
///          1   2        parents = [0, 0, 1, 1, 2]
///         / \   \       tokens  = [a, b, c, d, e]
///        3   4   5
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftTree {
    pub parents: Vec<usize>,
    pub tokens: Vec<u32>,
}

impl DraftTree {
    /// A chain of `k` tokens (ordinary speculative decoding).
    pub fn chain(tokens: &[u32]) -> Self {
        DraftTree {
            parents: (0..tokens.len()).collect(),
            tokens: tokens.to_vec(),
        }
    }
    /// Number of nodes including the root.
    pub fn len(&self) -> usize {
        self.tokens.len() + 1
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Children of `node`, in index order.
    pub fn children(&self, node: usize) -> Vec<usize> {
        (1..self.len())
            .filter(|&n| self.parents[n - 1] == node)
            .collect()
    }
    /// Depth of each node (root = 0): the position offset the tree attention
    /// mask gives it.
    pub fn depths(&self) -> Vec<usize> {
        let mut d = vec![0; self.len()];
        for n in 1..self.len() {
            d[n] = d[self.parents[n - 1]] + 1;
        }
        d
    }
    /// `mask[a][b]`: may node `a` attend to node `b` (b is an ancestor of a or a itself).
    pub fn attention_mask(&self) -> Array2<bool> {
        let n = self.len();
        let mut m = Array2::from_elem((n, n), false);
        for a in 0..n {
            let mut b = a;
            loop {
                m[[a, b]] = true;
                if b == 0 {
                    break;
                }
                b = self.parents[b - 1];
            }
        }
        m
    }
    /// Check parents (each an earlier node) and tokens (`< v`).
    pub fn validate(&self, v: usize) -> Result<()> {
        if self.tokens.is_empty() {
            return Err(Error::invalid(
                "draft tree",
                "at least one draft token is required",
            ));
        }
        if self.parents.len() != self.tokens.len() {
            return Err(Error::shape(
                "draft tree parents",
                format!("[{}] (one per token)", self.tokens.len()),
                format!("[{}]", self.parents.len()),
            ));
        }
        for (i, (&p, &t)) in self.parents.iter().zip(&self.tokens).enumerate() {
            if p > i {
                return Err(Error::invalid(
                    "draft tree parents",
                    format!(
                        "node {} has parent {p}, which is not an earlier node",
                        i + 1
                    ),
                ));
            }
            if t as usize >= v {
                return Err(Error::invalid(
                    "draft tree tokens",
                    format!("token {t} at node {} is not < V = {v}", i + 1),
                ));
            }
        }
        Ok(())
    }
}

/// Uniforms for [`tree_verify`]: one accept uniform per non-root node (read
/// when that node is tried), one resample uniform for the final token.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeUniforms {
    pub accept: Vec<f64>,
    pub resample: f64,
}

/// Tree verification with SpecInfer's multi-step speculative sampling
/// (Miao et al. 2024, Algorithm 2), on distributions.
///
/// `target` `[nodes, V]`: row `n` is the target's distribution for the token
/// after node `n`'s path. `draft` `[nodes, V]`: row `n` is the draft
/// distribution node `n`'s children were drawn from (rows of leaves are
/// validated but unused).
///
/// At the current node (starting at the root) with target row `p`: for each
/// child `c` in index order with token `x`: accept iff `p(x) ≥ q(x)` or
/// `T(accept[c-1])·q(x) < p(x)` (the chain rule above); on acceptance move to
/// `c` and repeat there; on rejection set `p ← norm((p − q)₊)` (normalised
/// in T by its sequential sum; `q` stays the node's draft row) and try the
/// next child. When no child is accepted, or the node is a leaf, emit
/// `sample(p, resample)`. A chain tree gives exactly [`rejection_sample`]
/// (the normalisation does not change the inverse-CDF pick beyond rounding,
/// and a chain has at most one rejection per node).
///
/// **Lossless iff** the children of each node are independent draws (with
/// replacement) from that node's draft row `q` — SpecInfer's Theorem 4.2. With
/// deterministic top-k children (Medusa's trees) the rule is *not* lossless;
/// use [`greedy`](greedy_verify)-style matching or accept the bias.
pub fn tree_verify<T: Float>(
    target: ArrayView2<T>,
    draft: ArrayView2<T>,
    tree: &DraftTree,
    uniforms: &TreeUniforms,
) -> Result<VerifyOutcome> {
    tree_verify_path(target, draft, tree, uniforms).map(|t| t.outcome)
}

/// What tree verification emits, with the accepted nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeOutcome {
    pub outcome: VerifyOutcome,
    /// The accepted nodes, root excluded, root to leaf (`outcome.accepted` of
    /// them; increasing, since a child's index exceeds its parent's): the
    /// rows to keep when compacting the KV caches.
    pub path: Vec<usize>,
}

/// [`tree_verify`], also returning the accepted path's nodes.
pub fn tree_verify_path<T: Float>(
    target: ArrayView2<T>,
    draft: ArrayView2<T>,
    tree: &DraftTree,
    uniforms: &TreeUniforms,
) -> Result<TreeOutcome> {
    let v = target.ncols();
    tree.validate(v)?;
    let n = tree.len();
    if target.nrows() != n {
        return Err(Error::shape(
            "target probabilities",
            format!("[nodes = {n}, V]"),
            format!("{:?}", target.shape()),
        ));
    }
    if draft.nrows() != n || draft.ncols() != v {
        return Err(Error::shape(
            "draft probabilities",
            format!("[nodes = {n}, V = {v}]"),
            format!("{:?}", draft.shape()),
        ));
    }
    if uniforms.accept.len() != n - 1 {
        return Err(Error::shape(
            "accept uniforms",
            format!("[{}] (one per non-root node)", n - 1),
            format!("[{}]", uniforms.accept.len()),
        ));
    }
    for &u in &uniforms.accept {
        check_uniform("accept uniform", u)?;
    }
    check_uniform("resample uniform", uniforms.resample)?;
    validate_rows("target probabilities", target)?;
    validate_rows("draft probabilities", draft)?;

    let zero = T::from_f64(0.0);
    let mut node = 0;
    let mut tokens = Vec::new();
    let mut path = Vec::new();
    loop {
        let mut p: Vec<T> = target.row(node).to_vec();
        let q = draft.row(node);
        let mut moved = false;
        for c in tree.children(node) {
            let x = tree.tokens[c - 1] as usize;
            let (px, qx) = (p[x], q[x]);
            if px >= qx || T::from_f64(uniforms.accept[c - 1]) * qx < px {
                tokens.push(x as u32);
                path.push(c);
                node = c;
                moved = true;
                break;
            }
            // Residual (p − q)₊, renormalised in T (sequential sum).
            let mut r: Vec<T> = p
                .iter()
                .zip(q.iter())
                .map(|(&a, &b)| if a > b { a - b } else { zero })
                .collect();
            let mut total = zero;
            for &w in &r {
                total = total + w;
            }
            if total > zero {
                for w in r.iter_mut() {
                    *w = *w / total;
                }
                p = r;
            }
            // total == 0 only through rounding (p ≤ q everywhere): keep p.
        }
        if !moved {
            let y = sample_inverse_cdf(ArrayView1::from(&p[..]), uniforms.resample)
                .expect("validated target row has positive mass");
            tokens.push(y as u32);
            let accepted = tokens.len() - 1;
            return Ok(TreeOutcome {
                outcome: VerifyOutcome { accepted, tokens },
                path,
            });
        }
    }
}

/// Greedy tree verification (temperature 0): from the root, move to the
/// first child whose token is the argmax of the current node's target row
/// (`target` `[nodes, V]`, logits or probabilities); when none matches, emit
/// that argmax. The emitted tokens are exactly plain greedy decoding's.
pub fn greedy_tree_verify<T: Float>(
    target: ArrayView2<T>,
    tree: &DraftTree,
) -> Result<TreeOutcome> {
    let v = target.ncols();
    tree.validate(v)?;
    if target.nrows() != tree.len() {
        return Err(Error::shape(
            "target logits",
            format!("[nodes = {}, V]", tree.len()),
            format!("{:?}", target.shape()),
        ));
    }
    let (mut node, mut tokens, mut path) = (0, Vec::new(), Vec::new());
    loop {
        let y = argmax(target.row(node)) as u32;
        tokens.push(y);
        match tree
            .children(node)
            .into_iter()
            .find(|&c| tree.tokens[c - 1] == y)
        {
            Some(c) => {
                path.push(c);
                node = c;
            }
            None => {
                let accepted = tokens.len() - 1;
                return Ok(TreeOutcome {
                    outcome: VerifyOutcome { accepted, tokens },
                    path,
                });
            }
        }
    }
}

/// Probability that SpecInfer's rule ([`tree_verify`]) accepts one of the
/// `m` children drawn from `q` at a node with target row `p`, *given* the
/// children's tokens are not yet known: children are tried in turn against
/// `p_1 = p, p_{j+1} = norm((p_j − q)₊)` (kept when the residual vanishes),
/// each accepted with probability `β_j = Σ_x min(p_j, q)` (marginal over its
/// i.i.d. draw), so `P(accept) = 1 − Π_j (1 − β_j)`. With `m = 1` it is
/// `1 − TV(p, q)`.
pub fn multi_draft_acceptance(p: &[f64], q: &[f64], m: usize) -> f64 {
    let mut cur = p.to_vec();
    let mut none = 1.0;
    for _ in 0..m {
        let beta: f64 = cur.iter().zip(q).map(|(a, b)| a.min(*b)).sum();
        none *= 1.0 - beta.min(1.0);
        let r: Vec<f64> = cur
            .iter()
            .zip(q)
            .map(|(a, b)| if a > b { a - b } else { 0.0 })
            .collect();
        let total: f64 = r.iter().sum();
        if total > 0.0 {
            cur = r.into_iter().map(|x| x / total).collect();
        }
    }
    1.0 - none
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn uni(accept: &[f64], resample: f64) -> VerifyUniforms {
        VerifyUniforms {
            accept: accept.to_vec(),
            resample,
        }
    }

    #[test]
    fn accept_threshold_is_u_times_q_less_than_p() {
        // p(x)/q(x) = 0.25 / 0.5 = 0.5: accepted iff u < 0.5.
        let p = array![[0.25, 0.75], [0.5, 0.5]];
        let q = array![[0.5, 0.5]];
        let check = |u: f64, accepted: usize| {
            let o = rejection_sample(p.view(), q.view(), &[0], &uni(&[u], 0.0)).unwrap();
            assert_eq!(o.accepted, accepted, "u = {u}");
        };
        check(0.0, 1);
        check(0.49999999, 1);
        check(0.5, 0);
        check(0.9, 0);
    }

    #[test]
    fn rejection_resamples_from_residual_and_bonus_from_p() {
        // Residual r = (p - q)+ = [0, 0.25, 0.25] over a 3-token vocabulary.
        let p = array![[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]];
        let q = array![[0.75, 0.25, 0.0]];
        let check = |accept: f64, resample: f64, tokens: &[u32]| {
            let o = rejection_sample(p.view(), q.view(), &[0], &uni(&[accept], resample)).unwrap();
            assert_eq!(o.tokens, tokens, "u = {accept}, resample = {resample}");
            assert_eq!(o.accepted, tokens.len() - 1);
        };
        // x = 0 rejected (u·0.75 ≥ 0.25 for u ≥ 1/3): residual CDF over [0, .25, .5]
        check(0.5, 0.0, &[1]);
        check(0.5, 0.49, &[1]);
        check(0.5, 0.5, &[2]); // c = 0.25 is not > 0.25: next index
        check(0.5, 0.99, &[2]);
        // accepted: bonus from p[1] = [0.1, 0.2, 0.7], CDF [0.1, 0.3, 1.0]
        check(0.1, 0.05, &[0, 0]);
        check(0.1, 0.1, &[0, 1]);
        check(0.1, 0.31, &[0, 2]); // (at 0.3 exactly, 0.1 + 0.2 = 0.30000000000000004 > 0.3 picks 1)
    }

    #[test]
    fn accepted_outright_when_p_at_least_q_even_for_u_near_one() {
        // In f32, 0.99999999 rounds to 1.0: u·q < p would fail for p == q.
        let p = array![[0.5f32, 0.5], [0.5, 0.5]];
        let q = array![[0.5f32, 0.5]];
        let o = rejection_sample(p.view(), q.view(), &[1], &uni(&[0.99999999], 0.0)).unwrap();
        assert_eq!(o.accepted, 1);
    }

    #[test]
    fn inverse_cdf_falls_back_to_last_positive() {
        let w = array![0.0f32, 0.3, 0.7, 0.0];
        assert_eq!(sample_inverse_cdf(w.view(), 0.0), Some(1));
        // u just below 1 rounds to 1.0 in f32: t = total, nothing exceeds it.
        assert_eq!(sample_inverse_cdf(w.view(), 0.999999999), Some(2));
        assert_eq!(sample_inverse_cdf(array![0.0f64, 0.0].view(), 0.5), None);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let p = array![[0.5, 0.5], [0.5, 0.5]];
        let q = array![[0.5, 0.5]];
        let u = uni(&[0.1], 0.1);
        let check =
            |p: Array2<f64>, q: Array2<f64>, t: &[u32], u: &VerifyUniforms, needle: &str| {
                let e = rejection_sample(p.view(), q.view(), t, u)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(needle), "{e:?} should mention {needle:?}");
            };
        check(p.clone(), q.clone(), &[], &uni(&[], 0.1), "k ≥ 1");
        check(p.clone(), q.clone(), &[2], &u, "not < V = 2");
        check(
            array![[0.5, 0.6], [0.5, 0.5]],
            q.clone(),
            &[0],
            &u,
            "row 0 sums to",
        );
        check(
            array![[1.5, -0.5], [0.5, 0.5]],
            q.clone(),
            &[0],
            &u,
            "negative",
        );
        check(
            array![[f64::NAN, 0.5], [0.5, 0.5]],
            q.clone(),
            &[0],
            &u,
            "non-finite",
        );
        check(
            p.clone(),
            array![[0.5, 0.5, 0.0]],
            &[0],
            &u,
            "draft probabilities",
        );
        check(array![[0.5, 0.5]], q.clone(), &[0], &u, "k+1 = 2");
        check(
            p.clone(),
            q.clone(),
            &[0],
            &uni(&[1.0], 0.1),
            "not in [0, 1)",
        );
        check(
            p.clone(),
            q.clone(),
            &[0],
            &uni(&[0.1, 0.1], 0.1),
            "accept uniforms",
        );
    }

    #[test]
    fn tolerance_derivation_values() {
        assert!((row_sum_tolerance::<f32>(512) - 514.0 * f32::EPSILON as f64).abs() < 1e-20);
        // A float32 softmax of length 49152 passes; a row off by 1e-2 fails.
        let v = 49152;
        let logits: Vec<f32> = (0..v).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
        let m = logits.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = logits.iter().map(|&x| (x - m).exp()).collect();
        let s: f32 = e.iter().sum();
        let row: Vec<f32> = e.iter().map(|&x| x / s).collect();
        let a = Array2::from_shape_vec((1, v), row.clone()).unwrap();
        validate_rows("p", a.view()).unwrap();
        let mut bad = row;
        bad[0] += 1e-2;
        let b = Array2::from_shape_vec((1, v), bad).unwrap();
        assert!(validate_rows("p", b.view()).is_err());
    }

    #[test]
    fn greedy_equals_rejection_sampling_on_one_hot_rows() {
        // Target argmaxes [2, 0, 1]; drafts one-hot at their tokens.
        let logits = array![[0.1, 0.2, 3.0], [5.0, 1.0, 0.0], [0.0, 2.0, 1.0]];
        let warp = Warp {
            temperature: 0.0,
            ..Warp::default()
        };
        let p = warp_rows(&warp, logits.view());
        for drafts in [[2u32, 0], [2, 1], [0, 0], [1, 2]] {
            let g = greedy_verify(logits.view(), &drafts).unwrap();
            let mut q = Array2::zeros((2, 3));
            for (i, &x) in drafts.iter().enumerate() {
                q[[i, x as usize]] = 1.0;
            }
            for u in [0.0, 0.3, 0.999] {
                let r = rejection_sample(p.view(), q.view(), &drafts, &uni(&[u, u], u)).unwrap();
                assert_eq!(g, r, "drafts {drafts:?} u {u}");
            }
        }
        let g = greedy_verify(logits.view(), &[2, 0]).unwrap();
        assert_eq!(g.tokens, vec![2, 0, 1]);
        let g = greedy_verify(logits.view(), &[2, 1]).unwrap();
        assert_eq!(g.tokens, vec![2, 0]);
    }

    #[test]
    fn warp_hand_values() {
        let p = [0.1, 0.2, 0.3, 0.4];
        let check = |w: Warp, want: &[f64]| {
            let got = w.probs_from_probs(&p);
            for (g, e) in got.iter().zip(want) {
                assert!((g - e).abs() < 1e-12, "{w:?}: {got:?} vs {want:?}");
            }
        };
        check(Warp::default(), &p);
        // T = 0.5 squares: [.01,.04,.09,.16]/.30
        check(
            Warp {
                temperature: 0.5,
                ..Warp::default()
            },
            &[0.01 / 0.3, 0.04 / 0.3, 0.09 / 0.3, 0.16 / 0.3],
        );
        check(
            Warp {
                top_k: Some(2),
                ..Warp::default()
            },
            &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0],
        );
        // top-p 0.5: 0.4 < 0.5, 0.4 + 0.3 ≥ 0.5 → keep {3, 2}
        check(
            Warp {
                top_p: Some(0.5),
                ..Warp::default()
            },
            &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0],
        );
        check(
            Warp {
                top_p: Some(0.4),
                ..Warp::default()
            },
            &[0.0, 0.0, 0.0, 1.0],
        );
        check(
            Warp {
                temperature: 0.0,
                ..Warp::default()
            },
            &[0.0, 0.0, 0.0, 1.0],
        );
        // logits path agrees with probs path: softmax(ln p / T)
        let l: Vec<f32> = p.iter().map(|x: &f64| x.ln() as f32).collect();
        let w = Warp {
            temperature: 0.7,
            top_k: Some(3),
            top_p: Some(0.9),
        };
        let a = w.probs_from_logits(&l);
        let b = w.probs_from_probs(&p);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6);
        }
        assert!(Warp {
            temperature: -1.0,
            ..Warp::default()
        }
        .validate()
        .is_err());
        assert!(Warp {
            top_p: Some(0.0),
            ..Warp::default()
        }
        .validate()
        .is_err());
        assert!(Warp {
            top_k: Some(0),
            ..Warp::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn typical_acceptance_thresholds() {
        // Row 0 uniform over 4: H = ln 4, δ·exp(−H) = 0.3/4 = 0.075 < ε = 0.09;
        // p(x) = 0.25 > 0.075 → accepted. Row 1 peaked: H small so the
        // threshold is ε = 0.09; p(x=1) = 0.05 is rejected.
        let p = array![
            [0.25, 0.25, 0.25, 0.25],
            [0.85, 0.05, 0.05, 0.05],
            [0.0, 0.0, 0.0, 1.0]
        ];
        let t = Typical::default();
        let o = typical_accept(p.view(), &[3, 1], &t, 0.5).unwrap();
        assert_eq!(o.accepted, 1);
        assert_eq!(o.tokens, vec![3, 0]);
        let o = typical_accept(p.view(), &[3, 0], &t, 0.5).unwrap();
        assert_eq!(o.tokens, vec![3, 0, 3]);
        // exp(−H) for row 1: H = −(.85 ln .85 + 3·.05 ln .05) ≈ 0.5875; 0.3·e^−H ≈ 0.1667 > 0.09
        let h = entropy(&[0.85, 0.05, 0.05, 0.05]);
        assert!((h - 0.587_500_93).abs() < 1e-7, "{h}");
    }

    #[test]
    fn tree_chain_equals_rejection_sample() {
        let p = array![[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]];
        let q = array![
            [0.5, 0.3, 0.2],
            [0.1, 0.1, 0.8],
            [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]
        ];
        for drafts in [[0u32, 2], [1, 0], [2, 2]] {
            for u in [0.05, 0.35, 0.6, 0.95] {
                let a = rejection_sample(
                    p.view(),
                    q.slice(ndarray::s![..2, ..]),
                    &drafts,
                    &uni(&[u, 1.0 - u], u),
                )
                .unwrap();
                let b = tree_verify(
                    p.view(),
                    q.view(),
                    &DraftTree::chain(&drafts),
                    &TreeUniforms {
                        accept: vec![u, 1.0 - u],
                        resample: u,
                    },
                )
                .unwrap();
                assert_eq!(a, b, "drafts {drafts:?} u {u}");
            }
        }
    }

    #[test]
    fn tree_mask_and_depths() {
        let t = DraftTree {
            parents: vec![0, 0, 1, 1, 2],
            tokens: vec![0, 1, 2, 3, 4],
        };
        assert_eq!(t.depths(), vec![0, 1, 1, 2, 2, 2]);
        assert_eq!(t.children(1), vec![3, 4]);
        let m = t.attention_mask();
        assert!(m[[5, 2]] && m[[5, 0]] && !m[[5, 1]] && m[[5, 5]] && !m[[3, 4]]);
        let bad = DraftTree {
            parents: vec![0, 2],
            tokens: vec![0, 1],
        };
        let p = Array2::from_elem((3, 5), 0.2);
        let e = tree_verify(
            p.view(),
            p.view(),
            &bad,
            &TreeUniforms {
                accept: vec![0.1, 0.1],
                resample: 0.1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("not an earlier node"), "{e}");
    }
}
