//! Choosing the next token from logits: greedy, temperature, top-k, top-p.
//!
//! - Greedy is run.c's `argmax`: the first index holding the maximum (a later
//!   equal value does not replace it).
//! - Otherwise the distribution is `softmax(logits / T)` (run.c's f32 softmax),
//!   restricted to the `k` most likely tokens (ties broken by lower id), then to
//!   the smallest prefix of the probability-sorted list whose cumulative
//!   probability exceeds `p` (run.c's and HF's nucleus rule: the token that
//!   crosses `p` is kept), then renormalized.
//! - A draw inverts the CDF of that distribution at one uniform `u ∈ [0, 1)`
//!   taken from an explicitly seeded `ChaCha8Rng`; [`sample_from`] takes `u`
//!   directly so other implementations (GPU sampler, speculative decoding) can be
//!   fed the same numbers. Same seed, same tokens.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// How to pick tokens. `temperature == 0` means greedy (top-k/top-p ignored).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
}

impl SamplingConfig {
    pub const GREEDY: SamplingConfig = SamplingConfig {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(
                "temperature",
                format!("{} is not a finite value >= 0", self.temperature),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid("top_k", "must be at least 1"));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid("top_p", format!("{p} is not in (0, 1]")));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// run.c's argmax: first index of the maximum. `None` for empty input.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best = 0usize;
    let mut max = *logits.first()?;
    for (i, &v) in logits.iter().enumerate().skip(1) {
        if v > max {
            best = i;
            max = v;
        }
    }
    Some(best as u32)
}

fn check_finite(logits: &[f32]) -> Result<()> {
    if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "logits".into(),
            index: i.to_string(),
        });
    }
    if logits.is_empty() {
        return Err(Error::invalid("logits", "empty"));
    }
    Ok(())
}

/// The distribution a non-greedy draw samples from: `(token, probability)`
/// sorted by probability descending (ties: lower id first), filtered by top-k
/// and top-p and renormalized to sum to 1.
pub fn distribution(logits: &[f32], cfg: &SamplingConfig) -> Result<Vec<(u32, f32)>> {
    cfg.validate()?;
    check_finite(logits)?;
    if cfg.is_greedy() {
        return Ok(vec![(argmax(logits).expect("non-empty"), 1.0)]);
    }
    let mut p: Vec<f32> = logits.iter().map(|&l| l / cfg.temperature).collect();
    crate::model::softmax_in_place(&mut p);
    let mut idx: Vec<(u32, f32)> = p.iter().enumerate().map(|(i, &q)| (i as u32, q)).collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = cfg.top_k {
        idx.truncate(k);
    }
    if let Some(top_p) = cfg.top_p {
        let mut cum = 0f32;
        let mut keep = idx.len();
        for (i, &(_, q)) in idx.iter().enumerate() {
            cum += q;
            if cum > top_p {
                keep = i + 1;
                break;
            }
        }
        idx.truncate(keep);
    }
    let total: f32 = idx.iter().map(|x| x.1).sum();
    for x in idx.iter_mut() {
        x.1 /= total;
    }
    Ok(idx)
}

/// Invert the CDF of `dist` at `u ∈ [0, 1)`: the first token whose cumulative
/// probability exceeds `u` (the last one if rounding leaves `u` beyond the total).
pub fn sample_from(dist: &[(u32, f32)], u: f32) -> Result<u32> {
    if !(0.0..1.0).contains(&u) {
        return Err(Error::invalid("u", format!("{u} is not in [0, 1)")));
    }
    let mut cdf = 0f32;
    for &(t, q) in dist {
        cdf += q;
        if u < cdf {
            return Ok(t);
        }
    }
    dist.last()
        .map(|x| x.0)
        .ok_or_else(|| Error::invalid("distribution", "empty"))
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub config: SamplingConfig,
    pub rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(config: SamplingConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// The next token. Greedy draws no random number.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if self.config.is_greedy() {
            check_finite(logits)?;
            return Ok(argmax(logits).expect("non-empty"));
        }
        let dist = distribution(logits, &self.config)?;
        let u: f32 = self.rng.random();
        sample_from(&dist, u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[]), None);
    }

    fn cfg(t: f32, k: Option<usize>, p: Option<f32>) -> SamplingConfig {
        SamplingConfig {
            temperature: t,
            top_k: k,
            top_p: p,
        }
    }

    #[test]
    fn filters_keep_what_they_should() {
        // probabilities of softmax([ln 4, ln 3, ln 2, ln 1]) = .4 .3 .2 .1
        let logits: Vec<f32> = [4f32, 3.0, 2.0, 1.0].iter().map(|x| x.ln()).collect();
        let ids = |c| {
            distribution(&logits, &c)
                .unwrap()
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>()
        };
        let check = |c: SamplingConfig, want: &[u32]| assert_eq!(ids(c), want, "{c:?}");
        check(cfg(1.0, None, None), &[0, 1, 2, 3]);
        check(cfg(1.0, Some(2), None), &[0, 1]);
        check(cfg(1.0, None, Some(0.5)), &[0, 1]); // .4 < .5, .7 > .5
        check(cfg(1.0, None, Some(0.35)), &[0]);
        check(cfg(1.0, Some(3), Some(0.95)), &[0, 1, 2]);
        check(cfg(0.0, None, None), &[0]);
        let d = distribution(&logits, &cfg(1.0, Some(2), None)).unwrap();
        assert!((d[0].1 - 4.0 / 7.0).abs() < 1e-6);
        assert_eq!(sample_from(&d, 0.0).unwrap(), 0);
        assert_eq!(sample_from(&d, 0.99).unwrap(), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_match() {
        let logits: Vec<f32> = [4f32, 3.0, 2.0, 1.0].iter().map(|x| x.ln()).collect();
        let c = cfg(1.0, None, None);
        let draw = |seed| {
            let mut s = Sampler::new(c, seed).unwrap();
            (0..4000)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(42);
        assert_eq!(a, draw(42));
        assert_ne!(a, draw(43));
        // Frequencies within 5 standard errors of .4 .3 .2 .1 (n = 4000).
        for (tok, p) in [(0u32, 0.4f64), (1, 0.3), (2, 0.2), (3, 0.1)] {
            let f = a.iter().filter(|&&t| t == tok).count() as f64 / 4000.0;
            let se = (p * (1.0 - p) / 4000.0).sqrt();
            assert!((f - p).abs() < 5.0 * se, "token {tok}: {f} vs {p}");
        }
    }

    #[test]
    fn bad_settings_and_logits() {
        assert!(Sampler::new(cfg(-1.0, None, None), 0).is_err());
        assert!(Sampler::new(cfg(f32::NAN, None, None), 0).is_err());
        assert!(Sampler::new(cfg(1.0, Some(0), None), 0).is_err());
        assert!(Sampler::new(cfg(1.0, None, Some(1.5)), 0).is_err());
        let mut s = Sampler::new(SamplingConfig::GREEDY, 0).unwrap();
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
    }
}
