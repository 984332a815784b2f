//! Acceptance theory for speculative decoding.
//!
//! - Per-position acceptance of the lossless rule (Leviathan et al., §3.3):
//!   `β(p, q) = Σ_x min(p(x), q(x)) = 1 − TV(p, q)`, `TV = ½ Σ |p − q|`.
//! - With per-position acceptance probabilities `α_1..α_k` (the draft token at
//!   position i is accepted given all before it were), one verification pass
//!   emits `1 + α_1 + α_1α_2 + ... + α_1⋯α_k` tokens in expectation (the
//!   accepted prefix plus one corrected or bonus token). For i.i.d. `α` this is
//!   `(1 − α^{k+1}) / (1 − α)` (Leviathan et al., eq. 1).
//! - Expected rejections over a generation = `Σ_t E[TV(p_t, q_t)]` (Yin et al.
//!   2024, "A Theoretical Perspective for Speculative Decoding Algorithm",
//!   Thm. 1): each position's draft is rejected with probability `TV`.
//! - Wall-time speedup with a draft/target cost ratio `c` (one draft step costs
//!   `c` target passes): `(1 − α^{k+1}) / ((1 − α)(k·c + 1))` (Leviathan et al.,
//!   Thm. 3.8); [`best_k`] maximises it.
//!
//! [`expected_tokens_per_pass`] and [`expected_tokens_per_pass_vec`] are called by
//! the simulator's cost model; their signatures are fixed.

/// Expected tokens emitted per target pass for i.i.d. acceptance `alpha`.
pub fn expected_tokens_per_pass(alpha: f64, k: u32) -> f64 {
    if (1.0 - alpha).abs() < 1e-12 {
        return (k + 1) as f64;
    }
    (1.0 - alpha.powi(k as i32 + 1)) / (1.0 - alpha)
}

/// Expected tokens per pass for position-dependent acceptance (product form).
pub fn expected_tokens_per_pass_vec(alphas: &[f64]) -> f64 {
    let mut total = 1.0;
    let mut prefix = 1.0;
    for &a in alphas {
        prefix *= a;
        total += prefix;
    }
    total
}

/// Total variation distance `½ Σ |p − q|` (rows of equal length).
pub fn total_variation(p: &[f64], q: &[f64]) -> f64 {
    assert_eq!(
        p.len(),
        q.len(),
        "total_variation: rows of different length"
    );
    0.5 * p.iter().zip(q).map(|(a, b)| (a - b).abs()).sum::<f64>()
}

/// Acceptance probability of the lossless rule, `β = Σ min(p, q)` (`= 1 − TV`
/// for normalised rows).
pub fn acceptance(p: &[f64], q: &[f64]) -> f64 {
    assert_eq!(p.len(), q.len(), "acceptance: rows of different length");
    p.iter().zip(q).map(|(a, b)| a.min(*b)).sum()
}

/// Expected number of rejections over a generation, given the TV distance at
/// each generated position (Yin et al.): `Σ TV_t`.
pub fn expected_rejections(tvs: &[f64]) -> f64 {
    tvs.iter().sum()
}

/// Probability that a pass emits exactly `j + 1` tokens (`j` accepted), for
/// position-dependent acceptances `alphas` (length k): `α_1⋯α_j (1 − α_{j+1})`
/// for `j < k` and `α_1⋯α_k` for `j = k`. Sums to 1.
pub fn accepted_count_distribution(alphas: &[f64]) -> Vec<f64> {
    let k = alphas.len();
    let mut out = Vec::with_capacity(k + 1);
    let mut prefix = 1.0;
    for &a in alphas {
        out.push(prefix * (1.0 - a));
        prefix *= a;
    }
    out.push(prefix);
    debug_assert_eq!(out.len(), k + 1);
    out
}

/// Wall-time speedup over plain decoding for i.i.d. acceptance `alpha`, `k`
/// drafts per pass and draft/target cost ratio `c`:
/// `(1 − α^{k+1}) / ((1 − α)(k·c + 1))`. `k = 0` gives 1.
pub fn speedup(alpha: f64, k: u32, cost_ratio: f64) -> f64 {
    expected_tokens_per_pass(alpha, k) / (k as f64 * cost_ratio + 1.0)
}

/// The `k` in `0..=k_max` maximising [`speedup`] (ties: the smaller k; `0`
/// means speculation does not pay), with its speedup.
pub fn best_k(alpha: f64, cost_ratio: f64, k_max: u32) -> (u32, f64) {
    let mut best = (0, 1.0);
    for k in 1..=k_max {
        let s = speedup(alpha, k, cost_ratio);
        if s > best.1 {
            best = (k, s);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn hand_values() {
        // α = 0.8, k = 4: (1 − 0.8^5)/0.2 = (1 − 0.32768)/0.2 = 3.3616
        close(expected_tokens_per_pass(0.8, 4), 3.3616, 1e-12);
        close(expected_tokens_per_pass_vec(&[0.8; 4]), 3.3616, 1e-12);
        // 1 + .9 + .9·.5 + .9·.5·.2 = 2.44
        close(expected_tokens_per_pass_vec(&[0.9, 0.5, 0.2]), 2.44, 1e-12);
        close(expected_tokens_per_pass(1.0, 3), 4.0, 0.0);
        close(expected_tokens_per_pass(0.0, 3), 1.0, 0.0);
        // speedup c = 0.1: 3.3616 / 1.4
        close(speedup(0.8, 4, 0.1), 3.3616 / 1.4, 1e-12);
        close(speedup(0.5, 0, 0.3), 1.0, 0.0);
        // k=5: 3.68928/1.5 = 2.45952; k=6: 3.951424/1.6 = 2.46964; k=7: 4.1611392/1.7 = 2.44773
        let (k, s) = best_k(0.8, 0.1, 16);
        assert_eq!(k, 6);
        close(s, 3.951424 / 1.6, 1e-12);
        // A draft as expensive as the target never pays: 1 + α < 2 for α < 1.
        assert_eq!(best_k(0.9, 1.0, 8).0, 0);
    }

    #[test]
    fn beta_is_one_minus_tv() {
        let p = [0.1, 0.2, 0.3, 0.4];
        let q = [0.4, 0.3, 0.2, 0.1];
        // min: .1 + .2 + .2 + .1 = .6; TV = ½(.3+.1+.1+.3) = .4
        close(acceptance(&p, &q), 0.6, 1e-15);
        close(total_variation(&p, &q), 0.4, 1e-15);
        close(acceptance(&p, &p), 1.0, 1e-15);
        close(acceptance(&[1.0, 0.0], &[0.0, 1.0]), 0.0, 0.0);
        close(expected_rejections(&[0.4, 0.1, 0.25]), 0.75, 1e-15);
    }

    #[test]
    fn accepted_count_distribution_hand_values() {
        let d = accepted_count_distribution(&[0.9, 0.5]);
        // [0.1, 0.9·0.5, 0.45]
        for (g, e) in d.iter().zip([0.1, 0.45, 0.45]) {
            close(*g, e, 1e-15);
        }
        // mean of (j + 1) equals the product form
        let mean: f64 = d.iter().enumerate().map(|(j, p)| (j + 1) as f64 * p).sum();
        close(mean, expected_tokens_per_pass_vec(&[0.9, 0.5]), 1e-15);
    }
}
