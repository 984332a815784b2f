//! Acceptance theory for speculative decoding.
//!
//! With per-position acceptance probabilities `α_1..α_k` (the draft token at
//! position i is accepted given all before it were), one verification pass emits
//! `1 + α_1 + α_1α_2 + ... + α_1⋯α_k` tokens in expectation (the accepted prefix
//! plus one corrected or bonus token). For i.i.d. `α` this is
//! `(1 − α^{k+1}) / (1 − α)` (Leviathan et al., eq. 1).

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
