//! Losslessness tests: exact (analytic and enumerated, f64 to 1e-12) and
//! statistical (seeded chi-square with a power analysis against three named
//! wrong implementations).

use super::*;
use crate::speculative::verify::{tree_verify, DraftTree, TreeUniforms};
use ndarray::{array, Array2};
use rand::SeedableRng;

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn one_step_output_distribution_is_p() {
    let check = |p: &[f64], q: &[f64]| {
        let out = output_distribution(p, q);
        let d = max_abs_diff(&out, p);
        assert!(d <= 1e-12, "p {p:?} q {q:?}: out {out:?} (diff {d:e})");
        let m = multi_draft_output_distribution(p, q, 3);
        assert!(
            max_abs_diff(&m, p) <= 1e-12,
            "multi-draft p {p:?} q {q:?}: {m:?}"
        );
    };
    check(&[0.2, 0.3, 0.5], &[0.5, 0.3, 0.2]); // generic
    check(&[0.0, 0.4, 0.6], &[0.5, 0.5, 0.0]); // zeros in both
    check(&[1.0, 0.0, 0.0], &[0.2, 0.3, 0.5]); // one-hot target
    check(&[0.2, 0.3, 0.5], &[0.0, 1.0, 0.0]); // one-hot draft (n-gram proposer)
    check(&[0.0, 1.0], &[1.0, 0.0]); // disjoint one-hots
    check(&[0.5, 0.5, 0.0, 0.0], &[0.0, 0.0, 0.25, 0.75]); // disjoint supports
    check(&[0.3, 0.7], &[0.3, 0.7]); // equal
    check(&[0.3 + 1e-12, 0.7 - 1e-12], &[0.3, 0.7]); // near-equal
    check(&[0.25; 4], &[0.97, 0.01, 0.01, 0.01]); // peaked draft
}

/// Deterministic pseudo-random conditional table: the row after `prefix`,
/// with about a third of the entries zero (never all).
fn table(seed: u64, v: usize, prefix: &[u32]) -> Vec<f64> {
    let mut h = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &t in prefix {
        h = (h ^ (t as u64 + 1)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    }
    h ^= prefix.len() as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(h);
    let mut row: Vec<f64> = (0..v)
        .map(|_| {
            if rng.random::<f64>() < 0.33 {
                0.0
            } else {
                rng.random::<f64>()
            }
        })
        .collect();
    if row.iter().all(|&x| x == 0.0) {
        row[rng.random_range(0..v)] = 1.0;
    }
    let s: f64 = row.iter().sum();
    row.iter().map(|x| x / s).collect()
}

fn max_map_diff(a: &BTreeMap<Vec<u32>, f64>, b: &BTreeMap<Vec<u32>, f64>) -> f64 {
    let mut d: f64 = 0.0;
    for (k, &x) in a {
        d = d.max((x - b.get(k).copied().unwrap_or(0.0)).abs());
    }
    for (k, &x) in b {
        d = d.max((x - a.get(k).copied().unwrap_or(0.0)).abs());
    }
    d
}

#[test]
fn k_token_step_joint_equals_target_exactly() {
    // Context-dependent tables, V ≤ 4, k ≤ 3, several seeds: the emitted
    // sequence completed from the target has the target's joint law.
    for v in 2..=4 {
        for k in 1..=3 {
            for seed in 0..4u64 {
                let p = move |pre: &[u32]| table(2 * seed, v, pre);
                let q = move |pre: &[u32]| table(2 * seed + 1, v, pre);
                let step = enumerate_step(Rule::Lossless, k, &p, &q);
                let total: f64 = step.values().sum();
                assert!((total - 1.0).abs() < 1e-12, "mass {total}");
                let got = complete(&step, k + 1, &p);
                let want = target_joint(k + 1, &p);
                let d = max_map_diff(&got, &want);
                assert!(d <= 1e-12, "V={v} k={k} seed={seed}: diff {d:e}");
                // The first emitted token is p(·|∅) exactly.
                let mut first = vec![0.0; v];
                for (s, m) in &step {
                    first[s[0] as usize] += m;
                }
                assert!(max_abs_diff(&first, &p(&[])) <= 1e-12);
            }
        }
    }
}

#[test]
fn mutants_are_not_lossless_in_enumeration() {
    let (v, k) = (3, 2);
    let p = |pre: &[u32]| table(10, v, pre);
    let q = |pre: &[u32]| table(11, v, pre);
    let want = target_joint(k + 1, &p);
    for rule in [Rule::ResampleFromP, Rule::AcceptIfPGreaterQ] {
        let got = complete(&enumerate_step(rule, k, &p, &q), k + 1, &p);
        let d = max_map_diff(&got, &want);
        assert!(d > 1e-3, "{rule:?} should be lossy, diff {d:e}");
    }
    // Dropping the bonus token is lossless in law (the next step samples that
    // position anyway) but emits different sequences per step: that is what
    // the statistical test below catches, by testing emitted sequences.
    let nb = enumerate_step(Rule::NoBonus, k, &p, &q);
    assert!(max_map_diff(&complete(&nb, k + 1, &p), &want) <= 1e-12);
    assert!(max_map_diff(&nb, &enumerate_step(Rule::Lossless, k, &p, &q)) > 1e-3);
}

// ---------------------------------------------------------------------------
// Statistical test.
//
// Setup: V = 3, k = 2, context-independent rows P [3, 3], Q [2, 3] (below).
// Category = the emitted sequence of one step (lengths 1..=3: 3 + 9 + 27 = 39
// categories). Under the lossless rule 31 have positive probability (a
// resampled token never lies where p ≤ q: r_0 = (p_0 − q_0)₊ = [.3, 0, 0] and
// r_1 = [0, .2, 0]), the smallest 0.006, so N·min e = 120 ≥ 5: no pooling.
// Null: the enumerated law of the lossless rule (equal to the target's, proved
// exactly above). Test: Pearson chi-square, df = 30, significance α = 1e-3
// (critical value χ²_30(0.999) = 59.70).
//
// Power: a wrong implementation with law w is rejected when a sample falls in
// a null-zero category (probability 1 − (1 − m₀)^N, m₀ = w's mass there) or
// when the statistic, ≈ noncentral χ²(df, λ) with λ = N·Σ (w − e)²/e over the
// other categories, exceeds the critical value. `chi_square_power` takes the
// larger; the test asserts ≥ 0.99 for each mutant at N = 20 000.
// resample-from-p and no-bonus put mass on null-zero categories (m₀ = 0.206
// = .3·(.3+.2) + .7·.2·(.1+.3), and 0.28 = .56·(.1+.3)/.8: power 1); accept-iff-p>q gives λ ≈ 3.1e4 (power 1).
// `first_token_test_with_minimal_sample_count` below is the tighter design
// where only the noncentral term acts and N is the smallest that reaches 0.99.
// Seeds are fixed, so the tests are deterministic; the lossless
// implementation's p-value (seed 7) is 0.043 > α.

const N: u64 = 20_000;
const ALPHA: f64 = 1e-3;

fn rows() -> (Array2<f64>, Array2<f64>) {
    let p = array![[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]];
    let q = array![[0.2, 0.3, 0.5], [0.3, 0.4, 0.3]];
    (p, q)
}

fn categories(v: u32, k: usize) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = vec![vec![]];
    let mut all = Vec::new();
    for _ in 0..=k {
        let mut next = Vec::new();
        for s in &out {
            for y in 0..v {
                let mut t = s.clone();
                t.push(y);
                next.push(t);
            }
        }
        all.extend(next.iter().cloned());
        out = next;
    }
    all
}

fn law(rule: Rule, p: &Array2<f64>, q: &Array2<f64>, cats: &[Vec<u32>]) -> Vec<f64> {
    let k = q.nrows();
    let pt = |pre: &[u32]| p.row(pre.len()).to_vec();
    let qt = |pre: &[u32]| q.row(pre.len()).to_vec();
    let m = enumerate_step(rule, k, &pt, &qt);
    cats.iter()
        .map(|c| m.get(c).copied().unwrap_or(0.0))
        .collect()
}

/// One step under `rule`. The lossless rule runs the real implementation
/// (`verify_step`); the mutants are written out here.
fn sample_step(rule: Rule, p: &Array2<f64>, q: &Array2<f64>, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let k = q.nrows();
    let drafts: Vec<u32> = (0..k)
        .map(|i| verify::sample_inverse_cdf(q.row(i), rng.random::<f64>()).unwrap() as u32)
        .collect();
    if rule == Rule::Lossless {
        return verify::verify_step(rng, p.view(), q.view(), &drafts)
            .unwrap()
            .tokens;
    }
    let u = VerifyUniforms::draw(rng, k);
    let mut out = Vec::new();
    for (i, &x) in drafts.iter().enumerate() {
        let (px, qx) = (p[[i, x as usize]], q[[i, x as usize]]);
        let accept = match rule {
            Rule::AcceptIfPGreaterQ => px > qx,
            _ => u.accept[i] * qx < px,
        };
        if accept {
            out.push(x);
            continue;
        }
        let r = match rule {
            Rule::ResampleFromP => p.row(i).to_vec(),
            _ => verify::residual(p.row(i), q.row(i)),
        };
        let y = verify::sample_inverse_cdf(ndarray::ArrayView1::from(&r[..]), u.resample).unwrap();
        out.push(y as u32);
        return out;
    }
    if rule != Rule::NoBonus {
        out.push(verify::sample_inverse_cdf(p.row(k), u.resample).unwrap() as u32);
    }
    out
}

fn run_test(rule: Rule, seed: u64) -> ChiSquare {
    let (p, q) = rows();
    let cats = categories(3, q.nrows());
    let null = law(Rule::Lossless, &p, &q, &cats);
    let index: BTreeMap<Vec<u32>, usize> = cats.iter().cloned().zip(0..).collect();
    let mut counts = vec![0u64; cats.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..N {
        let s = sample_step(rule, &p, &q, &mut rng);
        counts[index[&s]] += 1;
    }
    chi_square_gof(&counts, &null).unwrap()
}

#[test]
fn power_against_each_mutant_is_at_least_099() {
    let (p, q) = rows();
    let cats = categories(3, q.nrows());
    let null = law(Rule::Lossless, &p, &q, &cats);
    assert!((null.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    let min_e = null
        .iter()
        .cloned()
        .filter(|&e| e > 0.0)
        .fold(f64::INFINITY, f64::min)
        * N as f64;
    println!("min expected {min_e}");
    assert!(
        min_e >= 5.0,
        "smallest expected count {min_e}: chi-square invalid"
    );
    let df = null.iter().filter(|&&e| e > 0.0).count() - 1;
    let crit = chi2_critical(df, ALPHA);
    println!("df {df} critical {crit}");
    // Sanity of the power function: at λ = 0 it is α.
    assert!((noncentral_chi2_sf(df, 0.0, crit) - ALPHA).abs() < 1e-9);
    for rule in [Rule::ResampleFromP, Rule::NoBonus, Rule::AcceptIfPGreaterQ] {
        let w = law(rule, &p, &q, &cats);
        let lambda = noncentrality(N, &null, &w);
        let power = chi_square_power(N, &null, &w, ALPHA);
        let m0: f64 = null
            .iter()
            .zip(&w)
            .filter(|(&e, _)| e == 0.0)
            .map(|(_, &x)| x)
            .sum();
        println!("{rule:?}: mass on null-zero categories {m0}");
        println!("{rule:?}: lambda = {lambda:.1}, power = {power}");
        assert!(power >= 0.99, "{rule:?}: lambda {lambda}, power {power}");
    }
    // The λ needed for power 0.99 at df 38, α 1e-3 is about 60 (a check of the
    // mixture against the known value band).
    let p60 = noncentral_chi2_sf(df, 60.0, crit);
    assert!(p60 > 0.95 && p60 < 0.999, "power at λ = 60: {p60}");
}

#[test]
fn chi_square_accepts_lossless_and_rejects_each_mutant() {
    let ok = run_test(Rule::Lossless, 7);
    println!("lossless: {ok:?}");
    assert_eq!(ok.df, 30);
    assert!(ok.p_value > ALPHA, "lossless rejected: {ok:?}");
    for rule in [Rule::ResampleFromP, Rule::NoBonus, Rule::AcceptIfPGreaterQ] {
        let r = run_test(rule, 7);
        println!("{rule:?}: {r:?}");
        assert!(r.p_value < ALPHA, "{rule:?} not detected: {r:?}");
    }
}

#[test]
fn tree_verify_first_token_is_p_statistically() {
    // Root with m = 3 children drawn i.i.d. from q (with replacement), V = 4;
    // children are leaves. The first emitted token must follow p.
    let p_root = [0.1, 0.2, 0.3, 0.4];
    let q_root = [0.4, 0.3, 0.2, 0.1];
    let leaf = [0.25; 4];
    let mut target = Array2::zeros((4, 4));
    let mut draft = Array2::zeros((4, 4));
    for j in 0..4 {
        target[[0, j]] = p_root[j];
        draft[[0, j]] = q_root[j];
        for n in 1..4 {
            target[[n, j]] = leaf[j];
            draft[[n, j]] = leaf[j];
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut counts = [0u64; 4];
    for _ in 0..N {
        let tokens: Vec<u32> = (0..3)
            .map(|_| verify::sample_inverse_cdf(draft.row(0), rng.random::<f64>()).unwrap() as u32)
            .collect();
        let tree = DraftTree {
            parents: vec![0, 0, 0],
            tokens,
        };
        let u = TreeUniforms {
            accept: (0..3).map(|_| rng.random::<f64>()).collect(),
            resample: rng.random::<f64>(),
        };
        let out = tree_verify(target.view(), draft.view(), &tree, &u).unwrap();
        counts[out.tokens[0] as usize] += 1;
    }
    let c = chi_square_gof(&counts, &p_root).unwrap();
    assert!(c.p_value > ALPHA, "{c:?} counts {counts:?}");
    // A chain-style verifier that stops at the first rejected child and
    // resamples (ignoring the other children) is also lossless; but emitting
    // the first child unconditionally is not: its law is q, rejected here.
    let wrong = [
        N as f64 * 0.4,
        N as f64 * 0.3,
        N as f64 * 0.2,
        N as f64 * 0.1,
    ]
    .map(|x| x as u64);
    assert!(chi_square_gof(&wrong, &p_root).unwrap().p_value < ALPHA);
}

#[test]
fn check_sampling_reports_consistent_statistics() {
    let (p, q) = rows();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let r = check_sampling(p.view(), q.view(), 5000, &mut rng).unwrap();
    assert_eq!(r.accepted_counts.iter().sum::<u64>(), 5000);
    assert_eq!(r.counts[0].iter().sum::<u64>(), 5000);
    for (i, c) in r.chi_square.iter().enumerate() {
        assert!(c.p_value > ALPHA, "position {i}: {c:?}");
        assert!(max_abs_diff(&r.analytic[i], &p.row(i).to_vec()) < 1e-12);
    }
    assert!(r.accepted_chi_square.p_value > ALPHA);
    // β_0 = .2 + .3 + .2 = .7, β_1 = .1 + .4 + .3 = .8
    assert!((r.beta[0] - 0.7).abs() < 1e-12 && (r.beta[1] - 0.8).abs() < 1e-12);
    // Same seed, same report.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let r2 = check_sampling(p.view(), q.view(), 5000, &mut rng).unwrap();
    assert_eq!(r.counts, r2.counts);
}

/// The same design on the first emitted token alone (V = 3 categories, all of
/// positive probability, so the noncentral chi-square governs the power).
/// Null: p_0 = [.5, .3, .2]. Resample-from-p emits min(p,q) + (1−β)p =
/// [.35, .39, .26] (Σ (w−p)²/p = 0.09); accept-iff-p>q always emits token 0.
/// No-bonus leaves the first token's law unchanged (it is caught by the
/// sequence test above). N is the smallest multiple of 50 with power ≥ 0.99 at
/// α = 1e-3 against both mutants (df 2, critical value 13.82; resample-from-p
/// is the weaker: λ = 0.09·N, power 0.977 at N = 350 and 0.991 at N = 400).
#[test]
fn first_token_test_with_minimal_sample_count() {
    let (p, q) = rows();
    let cats: Vec<Vec<u32>> = (0..3).map(|y| vec![y]).collect();
    let first = |rule: Rule| -> Vec<f64> {
        let pt = |pre: &[u32]| p.row(pre.len()).to_vec();
        let qt = |pre: &[u32]| q.row(pre.len()).to_vec();
        let m = enumerate_step(rule, 2, &pt, &qt);
        let mut f = vec![0.0; 3];
        for (s, w) in m {
            f[s[0] as usize] += w;
        }
        f
    };
    let null = first(Rule::Lossless);
    assert!(max_abs_diff(&null, &p.row(0).to_vec()) < 1e-12);
    let w1 = first(Rule::ResampleFromP);
    assert!(max_abs_diff(&w1, &[0.35, 0.39, 0.26]) < 1e-12, "{w1:?}");
    let w2 = first(Rule::AcceptIfPGreaterQ);
    let n = (1..)
        .map(|i| 50 * i as u64)
        .find(|&n| {
            chi_square_power(n, &null, &w1, ALPHA) >= 0.99
                && chi_square_power(n, &null, &w2, ALPHA) >= 0.99
        })
        .unwrap();
    println!("minimal N = {n}");
    assert!((250..=400).contains(&n), "N = {n}");
    let _ = cats;
    let run = |rule: Rule, seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut counts = vec![0u64; 3];
        for _ in 0..n {
            counts[sample_step(rule, &p, &q, &mut rng)[0] as usize] += 1;
        }
        chi_square_gof(&counts, &null).unwrap()
    };
    let ok = run(Rule::Lossless, 11);
    assert!(ok.p_value > ALPHA, "{ok:?}");
    for rule in [Rule::ResampleFromP, Rule::AcceptIfPGreaterQ] {
        let r = run(rule, 11);
        println!("{rule:?} at N = {n}: {r:?}");
        assert!(r.p_value < ALPHA, "{rule:?}: {r:?}");
    }
}

/// The noncentral chi-square survival function against Monte Carlo values
/// (2·10⁵ draws of (Z₁ + √λ)² + Z₂², standard error ≤ 5e-4): df 2, x = 13.8155.
#[test]
fn noncentral_chi2_matches_monte_carlo() {
    let x = -2.0 * 0.001f64.ln();
    for (lambda, mc) in [(27.9, 0.953025), (31.5, 0.97723), (36.0, 0.991355)] {
        let got = noncentral_chi2_sf(2, lambda, x);
        assert!((got - mc).abs() < 2e-3, "λ {lambda}: {got} vs {mc}");
    }
    // λ = 0 is the central chi-square: sf(x) = e^{−x/2} = 0.001 for df 2.
    assert!((noncentral_chi2_sf(2, 0.0, x) - 0.001).abs() < 1e-12);
}

#[test]
fn homogeneity_accepts_same_law_and_rejects_a_shift() {
    let p = [0.1, 0.2, 0.3, 0.35, 0.04, 0.01];
    let shifted = [0.15, 0.2, 0.25, 0.35, 0.04, 0.01];
    let draw = |probs: &[f64], seed: u64, n: usize| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut c = vec![0u64; probs.len()];
        for _ in 0..n {
            let u = rng.random::<f64>();
            c[verify::sample_inverse_cdf(ndarray::ArrayView1::from(probs), u).unwrap()] += 1;
        }
        c
    };
    let same = chi_square_homogeneity(&draw(&p, 1, 4000), &draw(&p, 2, 5000)).unwrap();
    assert!(same.p_value > 1e-3, "{same:?}");
    assert_eq!(same.df, 5);
    let diff = chi_square_homogeneity(&draw(&p, 1, 4000), &draw(&shifted, 2, 5000)).unwrap();
    assert!(diff.p_value < 1e-6, "{diff:?}");
    // Small categories pool: 3 kept bins + the pooled one merged (expected < 5).
    let small = chi_square_homogeneity(&[100, 100, 100, 1, 2], &[100, 100, 100, 2, 1]).unwrap();
    assert_eq!(small.bins, 3);
    assert!(chi_square_homogeneity(&[1, 2], &[1]).is_err());
    assert!(chi_square_homogeneity(&[0, 0], &[1, 2]).is_err());
}
