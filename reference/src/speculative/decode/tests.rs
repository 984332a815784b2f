//! Draft-then-verify on stories260K (real weights, fast): greedy equivalence
//! for every draft kind and cache kind, the law of the first two tokens with
//! speculation against the target's exact law, acceptance vs the TV
//! prediction, n-gram lookup and tokenizer checks.

use super::*;
use crate::model::{generate, load_checkpoint};
use crate::sampling::{Sampler, SamplingConfig};
use crate::speculative::lossless::chi_square_gof;
use inferlab_models::assets;
use inferlab_models::tokenizer::Llama2cTokenizer;
use rand::SeedableRng;

fn stories() -> Option<(Llama, Llama2cTokenizer)> {
    let p = assets::require(assets::stories260k_model(), "speculative decode")?;
    let t = assets::require(assets::stories260k_tokenizer(), "speculative decode")?;
    let m = Llama::from_checkpoint(&load_checkpoint(&p).unwrap()).unwrap();
    let tok = Llama2cTokenizer::load_with_vocab(&t, 512).unwrap();
    Some((m, tok))
}

fn greedy_cfg(k: usize, cache: CacheKind, max_new: usize) -> SpecConfig {
    SpecConfig {
        k,
        warp: Warp {
            temperature: 0.0,
            ..Warp::default()
        },
        max_new_tokens: max_new,
        stop_tokens: vec![],
        rule: VerifyRule::Lossless,
        cache,
    }
}

#[test]
fn greedy_speculative_equals_plain_greedy_for_every_draft() {
    let Some((m, tok)) = stories() else { return };
    let max_new = 48;
    for text in [
        "Once upon a time",
        "Lily and Tom went to the park. Lily saw a",
    ] {
        let prompt = tok.encode_with(text, true, false);
        let mut s = Sampler::new(SamplingConfig::GREEDY, 0).unwrap();
        let mut cache = m.new_cache(CacheKind::Contiguous);
        let (want, _) = generate(&m, &mut cache, &prompt, max_new, &mut s, &[], |_| {}).unwrap();
        assert_eq!(want.len(), max_new);
        for cache in [CacheKind::Contiguous, CacheKind::Paged { block_size: 4 }] {
            for k in [1, 3, 6] {
                let cfg = greedy_cfg(k, cache, max_new);
                let mut rng = ChaCha8Rng::seed_from_u64(0);
                let mut check = |p: &mut dyn Proposer| {
                    let (got, st) = speculative_generate(&m, p, &prompt, &cfg, &mut rng).unwrap();
                    assert_eq!(got, want, "{} k={k} {cache:?} prompt {text:?}", p.name());
                    assert_eq!(st.tokens, max_new as u64);
                    // Greedy: β ∈ {0, 1} equals the outcome, so prediction is exact.
                    assert_eq!(st.acceptance(), st.predicted_acceptance(), "{}", p.name());
                    st
                };
                for layers in [1, 3, m.config.n_layers] {
                    let st = check(&mut ModelProposer::layers(&m, cache, layers).unwrap());
                    if layers == m.config.n_layers {
                        // The full model drafts itself: everything accepted.
                        assert_eq!(st.acceptance(), 1.0);
                    }
                }
                check(&mut ModelProposer::model(&m, cache, "same model").unwrap());
                check(&mut NgramProposer::new(m.config.vocab));
            }
        }
    }
}

/// The target's exact laws of the first and (marginally) the second generated
/// token after `prompt`: `p1 = softmax(logits)`, `p2 = Σ_y p1(y)·p(· | prompt, y)`.
pub(super) fn exact_first_two_laws(m: &Llama, prompt: &[u32], warp: &Warp) -> (Vec<f64>, Vec<f64>) {
    let mut cache = m.new_cache(CacheKind::Contiguous);
    let l = m.forward(&mut cache, prompt).unwrap();
    let p1 = warp.probs_from_logits(l.row(l.nrows() - 1).as_slice().unwrap());
    let mut p2 = vec![0.0; m.config.vocab];
    for (y1, &w) in p1.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        let mut c = cache.clone();
        let l = m.forward(&mut c, &[y1 as u32]).unwrap();
        let q = warp.probs_from_logits(l.row(0).as_slice().unwrap());
        for (a, b) in p2.iter_mut().zip(&q) {
            *a += w * b;
        }
    }
    (p1, p2)
}

/// The first two generated tokens, with speculation (self-speculative draft of
/// 2 layers, k = 3, T = 1), against the target's exact laws: the first token's
/// `p(y1)` and the second token's marginal `Σ_y1 p(y1) p(y2 | y1)` (512 forward
/// passes). N = 20 000 seeded runs, chi-square with bins of expected count < 5
/// pooled, significance 1e-3. Plain sampling with the same seeds is run
/// through the same test as a control, and the draft's own law (no
/// verification) as a negative control.
///
/// History: a first version (15-token prompt, N = 4000, seeds 0..4000) gave
/// p = 1.8e-4 on the first token. Rerun with seeds 0..20 000 and
/// 300 000..320 000 it gave p = 0.56 and 0.74: a bias that produced the
/// N = 4000 excess (λ ≈ 37) would have given λ ≈ 185 at N = 20 000, so that
/// was a chance event, not a bias. N was raised to 20 000 (the prompt
/// shortened to keep the test fast) so the test resolves smaller biases.
#[test]
fn first_tokens_follow_the_target_law_with_speculation() {
    let Some((m, tok)) = stories() else { return };
    let prompt = tok.encode_with("Lily saw a", true, false);
    let v = m.config.vocab;
    let warp = Warp::default();
    let (p1, p2) = exact_first_two_laws(&m, &prompt, &warp);
    let n = 20_000u64;
    let cfg = SpecConfig {
        k: 3,
        warp,
        max_new_tokens: 2,
        stop_tokens: vec![],
        rule: VerifyRule::Lossless,
        cache: CacheKind::Contiguous,
    };
    let mut c1 = vec![0u64; v];
    let mut c2 = vec![0u64; v];
    let mut stats = SpecStats::default();
    // The prompt's KV is computed once; each run starts from clones.
    let head = &prompt[..prompt.len() - 1];
    let mut ver0 = Verifier::new(&m, cfg.cache).unwrap();
    ver0.prefill(head).unwrap();
    let mut d0 = ModelProposer::layers(&m, cfg.cache, 2).unwrap();
    d0.prefill(head).unwrap();
    for seed in 0..n {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut d = d0.clone();
        let mut ver = ver0.clone();
        let (out, st) =
            speculative_generate_with(&m, &mut ver, &mut d, &prompt, &cfg, &mut rng).unwrap();
        c1[out[0] as usize] += 1;
        c2[out[1] as usize] += 1;
        stats.merge(&st);
    }
    let t1 = chi_square_gof(&c1, &p1).unwrap();
    let t2 = chi_square_gof(&c2, &p2).unwrap();
    println!("speculative: first {t1:?}\nsecond {t2:?}");
    assert!(t1.p_value > 1e-3 && t2.p_value > 1e-3, "{t1:?} {t2:?}");
    assert!(
        t1.df >= 5 && t2.df >= 5,
        "too few bins to test anything: {t1:?} {t2:?}"
    );
    // Some drafts were rejected, so the residual path was exercised.
    assert!(
        stats.acceptance() < 0.95,
        "acceptance {}",
        stats.acceptance()
    );
    // Control: plain sampling through the same test.
    let mut c1 = vec![0u64; v];
    for seed in 0..n {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let out = plain_generate(&m, &prompt, &warp, 1, CacheKind::Contiguous, &mut rng).unwrap();
        c1[out[0] as usize] += 1;
    }
    assert!(chi_square_gof(&c1, &p1).unwrap().p_value > 1e-3);
    // A biased sampler (the draft's own law, i.e. no verification) is rejected.
    let mut c1 = vec![0u64; v];
    for seed in 0..n {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut d = d0.clone();
        let dr = d.propose(&prompt, 1, &warp, &mut rng).unwrap();
        c1[dr.tokens[0] as usize] += 1;
    }
    assert!(chi_square_gof(&c1, &p1).unwrap().p_value < 1e-3);
}

/// Measured acceptance agrees with the mean β over the same positions (an
/// unbiased predictor: given the position is reached, the draft token is
/// accepted with probability β). Tolerance: 4 binomial standard errors.
#[test]
fn acceptance_matches_tv_prediction() {
    let Some((m, tok)) = stories() else { return };
    let prompt = tok.encode_with("Once upon a time", true, false);
    let cfg = SpecConfig {
        k: 4,
        warp: Warp {
            temperature: 0.8,
            ..Warp::default()
        },
        max_new_tokens: 200,
        stop_tokens: vec![],
        rule: VerifyRule::Lossless,
        cache: CacheKind::Paged { block_size: 8 },
    };
    let mut stats = SpecStats::default();
    for seed in 0..4 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut d = ModelProposer::layers(&m, cfg.cache, 3).unwrap();
        let (_, st) = speculative_generate(&m, &mut d, &prompt, &cfg, &mut rng).unwrap();
        stats.merge(&st);
    }
    let r: u64 = stats.reached.iter().sum();
    let a = stats.acceptance();
    let se = stats.acceptance_diff_se();
    // The conditional SE is at most the binomial one at the mean β̄
    // (Σβ(1−β) ≤ nβ̄(1−β̄) by concavity).
    let b = stats.predicted_acceptance();
    assert!(
        se > 0.0 && se <= (b * (1.0 - b) / r as f64).sqrt() * (1.0 + 1e-12),
        "se {se}"
    );
    println!(
        "reached {r}, acceptance {a:.4} vs predicted {:.4} (se {se:.4}); tokens/pass {:.3} vs {:.3}",
        stats.predicted_acceptance(),
        stats.tokens_per_pass(),
        stats.predicted_tokens_per_pass()
    );
    assert!(
        (a - stats.predicted_acceptance()).abs() < 4.0 * se,
        "{a} vs {}",
        stats.predicted_acceptance()
    );
    assert!(stats.tokens_per_pass() > 1.0);
}

#[test]
fn ngram_lookup_cases() {
    let ng = NgramProposer::new(100);
    let check = |ctx: &[u32], k: usize, want: &[u32]| {
        assert_eq!(ng.lookup(ctx, k), want, "context {ctx:?} k {k}");
    };
    check(&[1, 2, 3, 4, 1, 2], 2, &[3, 4]); // trigram miss, bigram [1,2] at 0
    check(&[1, 2, 3, 4, 1, 2], 9, &[3, 4, 1, 2]); // clipped at the context end
    check(&[5, 6, 7, 5, 6, 8, 5, 6], 1, &[8]); // latest occurrence wins
    check(&[1, 2, 3], 3, &[]); // no repeat
    check(&[7], 3, &[]);
    check(&[9, 1, 9], 2, &[1, 9]); // unigram
}

struct FakeTok {
    vocab: usize,
    shift: u32,
}
impl Tokenizer for FakeTok {
    fn encode(&self, _: &str) -> Vec<u32> {
        vec![]
    }
    fn decode(&self, t: &[u32]) -> String {
        t.iter()
            .map(|&x| format!("<{}>", x.min(self.shift)))
            .collect()
    }
    fn bos(&self) -> Option<u32> {
        Some(1)
    }
    fn eos(&self) -> Option<u32> {
        Some(2)
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

#[test]
fn tokenizer_mismatch_is_an_error() {
    let a = FakeTok {
        vocab: 10,
        shift: 100,
    };
    assert!(same_tokenizer(
        &a,
        &FakeTok {
            vocab: 10,
            shift: 100
        }
    )
    .is_ok());
    let e = same_tokenizer(
        &a,
        &FakeTok {
            vocab: 11,
            shift: 100,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("vocabulary size 11 differs from the target's 10"),
        "{e}"
    );
    let e = same_tokenizer(
        &a,
        &FakeTok {
            vocab: 10,
            shift: 5,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("token 6 decodes to \"<5>\""), "{e}");
}

#[test]
fn bad_arguments_are_errors() {
    let Some((m, _)) = stories() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut ng = NgramProposer::new(m.config.vocab);
    let cfg = greedy_cfg(0, CacheKind::Contiguous, 4);
    assert!(speculative_generate(&m, &mut ng, &[1], &cfg, &mut rng).is_err());
    let cfg = greedy_cfg(2, CacheKind::Contiguous, 4);
    assert!(speculative_generate(&m, &mut ng, &[], &cfg, &mut rng).is_err());
    assert!(ModelProposer::layers(&m, CacheKind::Contiguous, 0).is_err());
    assert!(ModelProposer::layers(&m, CacheKind::Contiguous, m.config.n_layers + 1).is_err());
}
