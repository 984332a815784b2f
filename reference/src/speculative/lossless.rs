//! Proof that speculative sampling is lossless: analytic output distributions,
//! exact enumeration of a k-token step, and the chi-square machinery the
//! statistical tests (and `inferlab speculative check`) use.
//!
//! ## One step, analytically
//! A draft token `x ~ q` is kept with probability `min(1, p(x)/q(x))`, otherwise a
//! token is drawn from `r = (p − q)₊ / Σ(p − q)₊`. Hence
//! `P(out = y) = q(y)·min(1, p(y)/q(y)) + (1 − β)·r(y) = min(p, q)(y) + (p − q)₊(y) = p(y)`
//! because `1 − β = Σ(p − q)₊` ([`output_distribution`] evaluates the left side).
//!
//! ## A k-token step, exactly
//! [`enumerate_step`] walks every draft sequence and every accept/reject branch
//! for context-dependent tables `p(·|prefix)`, `q(·|prefix)` and returns the
//! exact distribution of the emitted token sequences under a [`Rule`]: the
//! lossless rule or one of three named mutants. [`complete`] extends each
//! emitted sequence to length k+1 by sampling the rest from the target; the
//! rule is lossless iff the completed distribution equals the target's joint
//! `Π p(y_i | y_<i)` (tested to 1e-12).
//!
//! ## Statistics
//! [`chi_square_gof`] (Pearson, bins with expected count < 5 pooled) and
//! [`noncentral_chi2_sf`] (the power of that test against a known alternative,
//! as a Poisson mixture of central chi-squares) let a test choose its sample
//! count so that each mutant is caught with power ≥ 0.99.

use std::collections::BTreeMap;

use ndarray::ArrayView2;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use statrs::distribution::{ChiSquared, ContinuousCDF};

use super::theory;
use super::verify::{self, Float, VerifyUniforms};
use crate::{Error, Result};

/// The analytic distribution of one verification step's output:
/// `P(out = y) = q(y)·min(1, p(y)/q(y)) + (1 − β)·r(y)/Σr`, `r = (p − q)₊`,
/// `β = Σ min(p, q)`. Equals `p` for normalised rows.
pub fn output_distribution(p: &[f64], q: &[f64]) -> Vec<f64> {
    assert_eq!(
        p.len(),
        q.len(),
        "output_distribution: rows of different length"
    );
    let beta = theory::acceptance(p, q);
    let r: Vec<f64> = p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
    let rs: f64 = r.iter().sum();
    p.iter()
        .zip(q)
        .zip(&r)
        .map(|((&py, &qy), &ry)| {
            let kept = if qy > 0.0 {
                qy * (py / qy).min(1.0)
            } else {
                0.0
            };
            let resampled = if rs > 0.0 {
                (1.0 - beta) * ry / rs
            } else {
                0.0
            };
            kept + resampled
        })
        .collect()
}

/// A verification rule: the lossless one and three named wrong ones that the
/// statistical tests must detect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Accept with probability `min(1, p/q)`, resample from `(p − q)₊`, bonus from `p`.
    Lossless,
    /// Mutant: resample from `p` instead of `(p − q)₊`.
    ResampleFromP,
    /// Mutant: no bonus token when all k drafts are accepted.
    NoBonus,
    /// Mutant: accept iff `p(x) > q(x)` instead of `u < p(x)/q(x)`.
    AcceptIfPGreaterQ,
}

/// A conditional distribution table: the row for the token after `prefix`.
pub type Table<'a> = &'a dyn Fn(&[u32]) -> Vec<f64>;

fn residual_or_p(p: &[f64], q: &[f64]) -> Vec<f64> {
    let r: Vec<f64> = p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
    let s: f64 = r.iter().sum();
    if s > 0.0 {
        r.iter().map(|x| x / s).collect()
    } else {
        p.to_vec()
    }
}

/// Exact distribution of the token sequence emitted by one k-token step
/// (drafts from `q`, verified against `p`), keyed by the emitted sequence.
pub fn enumerate_step(
    rule: Rule,
    k: usize,
    target: Table,
    draft: Table,
) -> BTreeMap<Vec<u32>, f64> {
    let mut out = BTreeMap::new();
    enumerate_rec(rule, k, target, draft, &mut Vec::new(), 1.0, &mut out);
    out
}

fn emit(out: &mut BTreeMap<Vec<u32>, f64>, seq: Vec<u32>, mass: f64) {
    if mass > 0.0 {
        *out.entry(seq).or_insert(0.0) += mass;
    }
}

fn enumerate_rec(
    rule: Rule,
    k: usize,
    target: Table,
    draft: Table,
    prefix: &mut Vec<u32>,
    mass: f64,
    out: &mut BTreeMap<Vec<u32>, f64>,
) {
    let p = target(prefix);
    let q = draft(prefix);
    for (x, &qx) in q.iter().enumerate() {
        if qx <= 0.0 {
            continue;
        }
        let px = p[x];
        let a = match rule {
            Rule::AcceptIfPGreaterQ => {
                if px > qx {
                    1.0
                } else {
                    0.0
                }
            }
            _ => (px / qx).min(1.0),
        };
        // Accepted.
        let m_acc = mass * qx * a;
        if m_acc > 0.0 {
            prefix.push(x as u32);
            if prefix.len() < k {
                enumerate_rec(rule, k, target, draft, prefix, m_acc, out);
            } else if rule == Rule::NoBonus {
                emit(out, prefix.clone(), m_acc);
            } else {
                for (y, &py) in target(prefix).iter().enumerate() {
                    let mut s = prefix.clone();
                    s.push(y as u32);
                    emit(out, s, m_acc * py);
                }
            }
            prefix.pop();
        }
        // Rejected.
        let m_rej = mass * qx * (1.0 - a);
        if m_rej > 0.0 {
            let r = match rule {
                Rule::ResampleFromP => p.clone(),
                _ => residual_or_p(&p, &q),
            };
            for (y, &ry) in r.iter().enumerate() {
                let mut s = prefix.clone();
                s.push(y as u32);
                emit(out, s, m_rej * ry);
            }
        }
    }
}

/// Extend every emitted sequence to `len` tokens by sampling the remaining
/// positions from the target (what the next steps do, in law).
pub fn complete(
    dist: &BTreeMap<Vec<u32>, f64>,
    len: usize,
    target: Table,
) -> BTreeMap<Vec<u32>, f64> {
    let mut out = BTreeMap::new();
    for (seq, &m) in dist {
        extend(seq.clone(), m, len, target, &mut out);
    }
    out
}

fn extend(seq: Vec<u32>, m: f64, len: usize, target: Table, out: &mut BTreeMap<Vec<u32>, f64>) {
    if seq.len() >= len {
        emit(out, seq, m);
        return;
    }
    for (y, &py) in target(&seq).iter().enumerate() {
        let mut s = seq.clone();
        s.push(y as u32);
        extend(s, m * py, len, target, out);
    }
}

/// The target's joint distribution of `len` tokens, `Π p(y_i | y_<i)`.
pub fn target_joint(len: usize, target: Table) -> BTreeMap<Vec<u32>, f64> {
    let mut out = BTreeMap::new();
    extend(Vec::new(), 1.0, len, target, &mut out);
    out
}

/// Exact distribution of the first token emitted at a tree node whose `m`
/// children are i.i.d. draws from `q`, under SpecInfer's multi-draft rule
/// (see [`verify::tree_verify`]): `min(p, q) + (1 − β)·[rule on r = norm((p−q)₊)]`.
pub fn multi_draft_output_distribution(p: &[f64], q: &[f64], m: usize) -> Vec<f64> {
    if m == 0 {
        return p.to_vec();
    }
    let beta = theory::acceptance(p, q);
    let r = residual_or_p(p, q);
    let rest = multi_draft_output_distribution(&r, q, m - 1);
    p.iter()
        .zip(q)
        .zip(&rest)
        .map(|((&py, &qy), &ry)| py.min(qy) + (1.0 - beta) * ry)
        .collect()
}

/// Result of a Pearson chi-square goodness-of-fit test.
#[derive(Debug, Clone, PartialEq)]
pub struct ChiSquare {
    pub statistic: f64,
    /// Degrees of freedom: bins after pooling minus one.
    pub df: usize,
    pub p_value: f64,
    /// Bins after pooling.
    pub bins: usize,
}

/// Pearson's chi-square of `counts` against probabilities `probs` (summing to
/// 1). Categories with expected count `N·p < 5` are pooled into one bin (the
/// usual validity condition of the chi-square approximation); a count in a
/// category of probability 0 gives statistic ∞ and p-value 0.
pub fn chi_square_gof(counts: &[u64], probs: &[f64]) -> Result<ChiSquare> {
    if counts.len() != probs.len() {
        return Err(Error::shape(
            "chi-square counts",
            format!("[{}] (one per category)", probs.len()),
            format!("[{}]", counts.len()),
        ));
    }
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return Err(Error::invalid("chi-square counts", "no samples"));
    }
    let nf = n as f64;
    let mut bins: Vec<(f64, f64)> = Vec::new(); // (observed, expected)
    let mut pooled = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(probs) {
        if p <= 0.0 {
            if c > 0 {
                return Ok(ChiSquare {
                    statistic: f64::INFINITY,
                    df: 0,
                    p_value: 0.0,
                    bins: 0,
                });
            }
            continue;
        }
        let e = nf * p;
        if e < 5.0 {
            pooled.0 += c as f64;
            pooled.1 += e;
        } else {
            bins.push((c as f64, e));
        }
    }
    if pooled.1 > 0.0 {
        if pooled.1 < 5.0 && !bins.is_empty() {
            // Merge a small pooled bin into the smallest regular bin.
            let j = (0..bins.len())
                .min_by(|&a, &b| bins[a].1.total_cmp(&bins[b].1))
                .unwrap();
            bins[j].0 += pooled.0;
            bins[j].1 += pooled.1;
        } else {
            bins.push(pooled);
        }
    }
    if bins.len() < 2 {
        return Ok(ChiSquare {
            statistic: 0.0,
            df: 0,
            p_value: 1.0,
            bins: bins.len(),
        });
    }
    let statistic: f64 = bins.iter().map(|(o, e)| (o - e) * (o - e) / e).sum();
    let df = bins.len() - 1;
    let p_value = ChiSquared::new(df as f64)
        .map_err(|e| Error::Numerical {
            what: "chi-square".into(),
            reason: e.to_string(),
        })?
        .sf(statistic);
    Ok(ChiSquare {
        statistic,
        df,
        p_value,
        bins: bins.len(),
    })
}

/// Pearson's chi-square test of homogeneity of two samples over the same
/// categories (`a[j]`, `b[j]`: counts of category j in each sample): are
/// they draws from one distribution? Expected counts under the null are
/// `E_ij = n_i (a_j + b_j) / (n_a + n_b)`; df = bins − 1 (two rows).
///
/// Pooling rule (stated for reports): a category is its own bin when both
/// its expected counts are ≥ 5; all other categories are pooled into one
/// bin, which is merged into the smallest kept bin when its own smaller
/// expected count is < 5 (or kept alone if no bin was kept).
pub fn chi_square_homogeneity(a: &[u64], b: &[u64]) -> Result<ChiSquare> {
    if a.len() != b.len() {
        return Err(Error::shape(
            "homogeneity counts",
            format!("[{}] (one per category, both samples)", a.len()),
            format!("[{}]", b.len()),
        ));
    }
    let (na, nb) = (a.iter().sum::<u64>() as f64, b.iter().sum::<u64>() as f64);
    if na == 0.0 || nb == 0.0 {
        return Err(Error::invalid("homogeneity counts", "a sample is empty"));
    }
    let n = na + nb;
    let mut bins: Vec<(f64, f64)> = Vec::new(); // observed a, observed b
    let mut pooled = (0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let tot = (x + y) as f64;
        if tot == 0.0 {
            continue;
        }
        if na.min(nb) * tot / n >= 5.0 {
            bins.push((x as f64, y as f64));
        } else {
            pooled.0 += x as f64;
            pooled.1 += y as f64;
        }
    }
    let ptot = pooled.0 + pooled.1;
    if ptot > 0.0 {
        if na.min(nb) * ptot / n < 5.0 && !bins.is_empty() {
            let j = (0..bins.len())
                .min_by(|&i, &k| (bins[i].0 + bins[i].1).total_cmp(&(bins[k].0 + bins[k].1)))
                .expect("non-empty");
            bins[j].0 += pooled.0;
            bins[j].1 += pooled.1;
        } else {
            bins.push(pooled);
        }
    }
    if bins.len() < 2 {
        return Ok(ChiSquare {
            statistic: 0.0,
            df: 0,
            p_value: 1.0,
            bins: bins.len(),
        });
    }
    let mut statistic = 0.0;
    for &(x, y) in &bins {
        let tot = x + y;
        let (ea, eb) = (na * tot / n, nb * tot / n);
        statistic += (x - ea) * (x - ea) / ea + (y - eb) * (y - eb) / eb;
    }
    let df = bins.len() - 1;
    let p_value = ChiSquared::new(df as f64)
        .map_err(|e| Error::Numerical {
            what: "chi-square".into(),
            reason: e.to_string(),
        })?
        .sf(statistic);
    Ok(ChiSquare {
        statistic,
        df,
        p_value,
        bins: bins.len(),
    })
}

/// The critical value `c` with `P(χ²_df > c) = alpha`.
pub fn chi2_critical(df: usize, alpha: f64) -> f64 {
    ChiSquared::new(df as f64)
        .expect("df ≥ 1")
        .inverse_cdf(1.0 - alpha)
}

/// `P(X > x)` for the noncentral chi-square `X ~ χ²(df, λ)`, as the Poisson
/// mixture `Σ_j e^{−λ/2} (λ/2)^j / j! · P(χ²_{df+2j} > x)` (summed until the
/// Poisson tail is below 1e-15).
pub fn noncentral_chi2_sf(df: usize, lambda: f64, x: f64) -> f64 {
    let half = lambda / 2.0;
    let mut total = 0.0;
    let mut cum_weight = 0.0;
    let mut j = 0usize;
    loop {
        let log_w = -half + (j as f64) * half.max(f64::MIN_POSITIVE).ln()
            - statrs::function::gamma::ln_gamma(j as f64 + 1.0);
        let w = if lambda == 0.0 {
            if j == 0 {
                1.0
            } else {
                0.0
            }
        } else {
            log_w.exp()
        };
        let sf = ChiSquared::new((df + 2 * j) as f64).expect("df ≥ 1").sf(x);
        total += w * sf;
        cum_weight += w;
        j += 1;
        if (1.0 - cum_weight < 1e-15 && j as f64 > half) || j > 100_000 {
            break;
        }
    }
    total.clamp(0.0, 1.0)
}

/// Non-centrality of the chi-square test against the alternative `wrong` when
/// the null is `right`: `λ = N·Σ (wrong − right)² / right` over categories with
/// `right > 0` (∞ if `wrong` puts mass where `right` has none).
pub fn noncentrality(n: u64, right: &[f64], wrong: &[f64]) -> f64 {
    let mut s = 0.0;
    for (&r, &w) in right.iter().zip(wrong) {
        if r > 0.0 {
            s += (w - r) * (w - r) / r;
        } else if w > 0.0 {
            return f64::INFINITY;
        }
    }
    n as f64 * s
}

/// Power of [`chi_square_gof`] at level `alpha` with `n` samples when the
/// data follow `wrong` instead of `right` (no pooling assumed: every positive
/// `right` category has expected count ≥ 5). Two ways to reject: a sample in a
/// category where `right` is 0 (statistic ∞), with probability
/// `1 − (1 − m₀)^n` (`m₀` the mass `wrong` puts there), or the noncentral
/// chi-square exceeding the critical value, with `λ` from [`noncentrality`]
/// over the other categories. Returns the larger of the two: a lower bound on
/// the power.
pub fn chi_square_power(n: u64, right: &[f64], wrong: &[f64], alpha: f64) -> f64 {
    let m0: f64 = right
        .iter()
        .zip(wrong)
        .filter(|(&r, _)| r <= 0.0)
        .map(|(_, &w)| w)
        .sum();
    let via_zero = 1.0 - (1.0 - m0).powf(n as f64);
    let df = right.iter().filter(|&&r| r > 0.0).count().saturating_sub(1);
    if df == 0 {
        return via_zero;
    }
    let mut lambda = 0.0;
    for (&r, &w) in right.iter().zip(wrong) {
        if r > 0.0 {
            lambda += (w - r) * (w - r) / r;
        }
    }
    let via_stat = noncentral_chi2_sf(df, n as f64 * lambda, chi2_critical(df, alpha));
    via_zero.max(via_stat)
}

/// Per-position and length statistics of many seeded verification steps on
/// fixed rows (what `inferlab speculative check` prints).
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Analytic distribution of the token emitted at position i given the
    /// step reaches position i (`output_distribution(p_i, q_i)`, and `p_k` for the bonus).
    pub analytic: Vec<Vec<f64>>,
    /// Empirical counts of the token emitted at each position.
    pub counts: Vec<Vec<u64>>,
    pub chi_square: Vec<ChiSquare>,
    /// Analytic distribution of the number of accepted drafts (0..=k).
    pub accepted_analytic: Vec<f64>,
    pub accepted_counts: Vec<u64>,
    pub accepted_chi_square: ChiSquare,
    /// `β_i = Σ min(p_i, q_i)`.
    pub beta: Vec<f64>,
}

/// Run `samples` seeded steps: drafts `x_i ~ q_i` (inverse CDF, one uniform
/// each), then [`verify::verify_step`]. Rows are context-independent, so the
/// token emitted at position i (when reached) is distributed as
/// `output_distribution(p_i, q_i)` and the accepted count as
/// [`theory::accepted_count_distribution`] of the `β_i`.
pub fn check_sampling<T: Float>(
    target: ArrayView2<T>,
    draft: ArrayView2<T>,
    samples: u64,
    rng: &mut ChaCha8Rng,
) -> Result<CheckReport> {
    let k = draft.nrows();
    if k == 0 {
        return Err(Error::invalid(
            "k",
            "the draft has no rows (k = 0); k ≥ 1 is required",
        ));
    }
    if samples == 0 {
        return Err(Error::invalid("samples", "at least one sample is required"));
    }
    if target.nrows() != k + 1 || target.ncols() != draft.ncols() {
        return Err(Error::shape(
            "target probabilities",
            format!(
                "[k+1 = {}, V = {}] (k and V of the draft)",
                k + 1,
                draft.ncols()
            ),
            format!("{:?}", target.shape()),
        ));
    }
    verify::validate_rows("target probabilities", target)?;
    verify::validate_rows("draft probabilities", draft)?;
    let v = target.ncols();
    let row =
        |a: ArrayView2<T>, i: usize| -> Vec<f64> { a.row(i).iter().map(|x| x.to_f64()).collect() };
    let mut analytic = Vec::with_capacity(k + 1);
    let mut beta = Vec::with_capacity(k);
    for i in 0..k {
        let (p, q) = (row(target, i), row(draft, i));
        analytic.push(output_distribution(&p, &q));
        beta.push(theory::acceptance(&p, &q));
    }
    analytic.push(row(target, k));
    let mut counts = vec![vec![0u64; v]; k + 1];
    let mut accepted_counts = vec![0u64; k + 1];
    let mut drafts = vec![0u32; k];
    for _ in 0..samples {
        for (i, d) in drafts.iter_mut().enumerate() {
            let u = rng.random::<f64>();
            *d = verify::sample_inverse_cdf(draft.row(i), u).expect("validated row") as u32;
        }
        let uniforms = VerifyUniforms::draw(rng, k);
        let out = verify::rejection_sample(target, draft, &drafts, &uniforms)?;
        for (i, &t) in out.tokens.iter().enumerate() {
            counts[i][t as usize] += 1;
        }
        accepted_counts[out.accepted] += 1;
    }
    let mut chi_square = Vec::with_capacity(k + 1);
    for i in 0..=k {
        if counts[i].iter().sum::<u64>() == 0 {
            chi_square.push(ChiSquare {
                statistic: 0.0,
                df: 0,
                p_value: 1.0,
                bins: 0,
            });
        } else {
            chi_square.push(chi_square_gof(&counts[i], &analytic[i])?);
        }
    }
    let accepted_analytic = theory::accepted_count_distribution(&beta);
    let accepted_chi_square = chi_square_gof(&accepted_counts, &accepted_analytic)?;
    Ok(CheckReport {
        analytic,
        counts,
        chi_square,
        accepted_analytic,
        accepted_counts,
        accepted_chi_square,
        beta,
    })
}

#[cfg(test)]
mod tests;
