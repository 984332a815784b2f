//! Tests of the three attention strategies.
//!
//! ## How results are compared
//! Output: normwise relative error `max|a - b| / max(max|naive|, TINY)`
//! over the whole `[Lq, Hq, D]` tensor. Each output coordinate is a convex
//! combination of V values, and its rounding error is of order
//! `ε · Σ_j p_j |v_j| <= ε · max|V|`: it does not shrink when the coordinate
//! is small by cancellation, so a per-element relative error would be
//! ill-conditioned near zero. Dividing by the largest output magnitude is the
//! usual normwise measure; `TINY` only guards the all-masked case, where every
//! strategy must return exact zeros (then the error is 0/TINY = 0).
//!
//! LSE: `|a - b| <= tol · max(1, |naive|)` per element, both `-inf` counting
//! as equal. An LSE error `δ` is a relative error `e^δ - 1 ≈ δ` in every
//! softmax weight, so the absolute error is what matters; it is of order
//! `ε · (|m| + ln Lk)` (the max score plus the log of the sum), hence the
//! relative form with a floor of 1.
//!
//! f64 tolerance 1e-12: the longest sums here have 1025 terms; recursive
//! summation's worst case is `(n-1)·ε ≈ 1.1e-13` relative, and the dot
//! products (D <= 64) add less. 1e-12 leaves an order of magnitude over the
//! worst case and is still 10^4 times tighter than any indexing bug (which
//! moves results by O(1)).

use ndarray::{s, Array2, Array3, ArrayView3, Axis};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::Strategy;
use super::*;
use proptest::strategy::Strategy as _;

const TINY: f64 = 1e-300;
const TOL: f64 = 1e-12;

// ---------------------------------------------------------------- helpers

fn normal3(rng: &mut ChaCha8Rng, shape: (usize, usize, usize), sd: f64) -> Array3<f64> {
    Array3::from_shape_fn(shape, |_| sd * rng.sample::<f64, _>(StandardNormal))
}

/// Max normwise relative error of `a.out` against `reference.out`, and max
/// relative-with-floor LSE error (see the module doc). NaN propagates as NaN
/// so `assert!(e <= tol)` fails on it.
fn errors<T: Float>(a: &AttentionOutput<T>, reference: &AttentionOutput<T>) -> (f64, f64) {
    assert_eq!(a.out.dim(), reference.out.dim());
    assert_eq!(a.lse.dim(), reference.lse.dim());
    let mut num = 0f64;
    let mut den = TINY;
    for (x, y) in a.out.iter().zip(reference.out.iter()) {
        let (x, y) = (x.to_f64(), y.to_f64());
        let e = (x - y).abs();
        if e.is_nan() || e > num {
            num = if num.is_nan() { num } else { e };
        }
        den = den.max(y.abs());
    }
    let mut lse_err = 0f64;
    for (x, y) in a.lse.iter().zip(reference.lse.iter()) {
        let (x, y) = (x.to_f64(), y.to_f64());
        let e = if x == f64::NEG_INFINITY && y == f64::NEG_INFINITY {
            0.0
        } else {
            (x - y).abs() / y.abs().max(1.0)
        };
        if e.is_nan() || e > lse_err {
            lse_err = if lse_err.is_nan() { lse_err } else { e };
        }
    }
    (num / den, lse_err)
}

/// All strategies under test, by name: tiled and paged through the public
/// dispatch (paged on a scrambled pool), and paged's slow twin (gather, then
/// naive) so that one generic test covers the fast path and its twin.
fn strategies(block: usize, partition: usize, q_tile: usize, k_tile: usize) -> Vec<Strategy> {
    vec![
        Strategy::Naive,
        Strategy::Tiled { q_tile, k_tile },
        Strategy::Paged {
            block_size: block,
            partition_size: partition,
        },
    ]
}

fn run_all<T: Float>(
    q: ArrayView3<T>,
    k: ArrayView3<T>,
    v: ArrayView3<T>,
    cfg: &AttentionConfig,
    strategies: &[Strategy],
) -> Vec<(String, AttentionOutput<T>)> {
    let mut res: Vec<(String, AttentionOutput<T>)> = strategies
        .iter()
        .map(|&s| {
            (
                format!("{s:?}"),
                attention(q, k, v, cfg, s).expect("valid problem"),
            )
        })
        .collect();
    // The slow twin of paged: gather from the same scrambled pool, then naive.
    if let Some(&Strategy::Paged { block_size, .. }) = strategies
        .iter()
        .find(|s| matches!(s, Strategy::Paged { .. }))
    {
        let pool = PagedPool::scrambled(k, v, block_size, SCRAMBLE_SEED).unwrap();
        let (kg, vg) = pool.view().gather().unwrap();
        res.push((
            "paged-gather".into(),
            attention_naive(q, kg.view(), vg.view(), cfg).unwrap(),
        ));
    }
    res
}

/// One randomly drawn problem.
#[derive(Debug, Clone)]
struct Case {
    lq: usize,
    lk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    masking: Masking,
    window: Option<usize>,
    scale: Option<f64>,
    /// Probability that a mask entry is true; `None` = no explicit mask.
    mask_p: Option<f64>,
    block: usize,
    partition: usize,
    q_tile: usize,
    k_tile: usize,
    seed: u64,
}

struct Problem {
    q: Array3<f64>,
    k: Array3<f64>,
    v: Array3<f64>,
    mask: Option<Array2<bool>>,
}

impl Case {
    fn problem(&self) -> Problem {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let q = normal3(&mut rng, (self.lq, self.hq, self.d), 1.0);
        let k = normal3(&mut rng, (self.lk, self.hkv, self.d), 1.0);
        let v = normal3(&mut rng, (self.lk, self.hkv, self.d), 1.0);
        let mask = self
            .mask_p
            .map(|p| Array2::from_shape_fn((self.lq, self.lk), |_| rng.random_bool(p)));
        Problem { q, k, v, mask }
    }

    fn cfg<'a>(&self, p: &'a Problem) -> AttentionConfig<'a> {
        AttentionConfig {
            masking: self.masking,
            window: self.window,
            scale: self.scale,
            mask: p.mask.as_ref().map(|m| m.view()),
        }
    }

    fn strategies(&self) -> Vec<Strategy> {
        strategies(self.block, self.partition, self.q_tile, self.k_tile)
    }
}

/// The agreement check: every strategy (and paged's twin) matches naive to
/// `TOL` in output and LSE.
fn check_agree(c: &Case) {
    let p = c.problem();
    let cfg = c.cfg(&p);
    let res = run_all(p.q.view(), p.k.view(), p.v.view(), &cfg, &c.strategies());
    let naive = &res[0].1;
    for (name, r) in &res[1..] {
        let (eo, el) = errors(r, naive);
        assert!(eo <= TOL, "{name}: output error {eo:e} > {TOL:e} in {c:?}");
        assert!(el <= TOL, "{name}: lse error {el:e} > {TOL:e} in {c:?}");
    }
}

fn heads() -> impl proptest::strategy::Strategy<Value = (usize, usize)> {
    prop_oneof![
        3 => Just((9usize, 3usize)),
        2 => Just((4, 1)), // MQA
        1 => Just((1, 1)),
        1 => Just((3, 3)),
        1 => Just((6, 2)),
    ]
}

fn length() -> impl proptest::strategy::Strategy<Value = usize> {
    prop_oneof![6 => 1usize..=40, 2 => Just(1usize), 2 => Just(97usize)]
}

fn case() -> impl proptest::strategy::Strategy<Value = Case> {
    let shape = (length(), length(), heads(), 1usize..=16);
    let masks = (
        any::<bool>(),
        prop::option::weighted(0.4, 1usize..=50),
        prop::option::weighted(0.3, 0.05f64..4.0),
        prop::option::weighted(0.3, prop_oneof![Just(0.1f64), Just(0.5), Just(0.9)]),
    );
    let layout = (
        prop_oneof![Just(1usize), Just(8), Just(16)],
        prop_oneof![Just(1usize), Just(2), Just(3), Just(4), Just(32)],
        prop_oneof![Just(1usize), Just(3), Just(16), Just(64)],
        prop_oneof![Just(1usize), Just(5), Just(16), Just(64)],
        any::<u64>(),
    );
    (shape, masks, layout).prop_map(
        |((lq, lk, (hq, hkv), d), (causal, window, scale, mask_p), (block, pm, qt, kt, seed))| {
            let masking = if causal {
                Masking::Causal
            } else {
                Masking::None
            };
            // Causal needs Lq <= Lk: keep the chunk shorter than the cache.
            let lq = if causal { lq.min(lk) } else { lq };
            Case {
                lq,
                lk,
                hq,
                hkv,
                d,
                masking,
                window,
                scale,
                mask_p,
                block,
                partition: block * pm,
                q_tile: qt,
                k_tile: kt,
                seed,
            }
        },
    )
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------- property tests

proptest! {
    #![proptest_config(config(96))]

    /// Naive, tiled, paged (scrambled pool) and gather+naive agree to 1e-12.
    #[test]
    fn prop_strategies_agree(c in case()) {
        check_agree(&c);
    }

    /// Each output coordinate lies within [min, max] of the visible V rows'
    /// coordinates; a row that sees nothing is exactly zero with lse = -inf.
    #[test]
    fn prop_convex_combination(c in case()) {
        let p = c.problem();
        let cfg = c.cfg(&p);
        let dims = Dims::check(&p.q.view(), &p.k.view(), &p.v.view(), &cfg).unwrap();
        let vmax = p.v.iter().fold(0f64, |a, x| a.max(x.abs()));
        let slack = TOL * vmax.max(TINY);
        for (name, r) in run_all(p.q.view(), p.k.view(), p.v.view(), &cfg, &c.strategies()) {
            for i in 0..c.lq {
                let vis: Vec<usize> = (0..c.lk).filter(|&j| dims.visible(&cfg, i, j)).collect();
                for h in 0..c.hq {
                    let kh = h / dims.group();
                    if vis.is_empty() {
                        prop_assert!(r.out.slice(s![i, h, ..]).iter().all(|&x| x == 0.0), "{name}");
                        prop_assert_eq!(r.lse[[i, h]], f64::NEG_INFINITY, "{}", name);
                        continue;
                    }
                    for x in 0..c.d {
                        let (lo, hi) = vis.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &j| {
                            let y = p.v[[j, kh, x]];
                            (a.min(y), b.max(y))
                        });
                        let o = r.out[[i, h, x]];
                        prop_assert!(o >= lo - slack && o <= hi + slack,
                            "{name}: out[{i},{h},{x}] = {o} outside [{lo}, {hi}]");
                    }
                }
            }
        }
    }

    /// With V one-hot per row (D = Lk, V[j] = e_j), the output row is the
    /// attention distribution itself: nonnegative, summing to 1, and exactly
    /// zero on every invisible key.
    #[test]
    fn prop_one_hot_values_give_probabilities(c in case().prop_filter("D = Lk small", |c| c.lk <= 40)) {
        let mut c = c;
        c.d = c.lk;
        let p = c.problem();
        let v = Array3::from_shape_fn((c.lk, c.hkv, c.lk), |(j, _, x)| if j == x { 1.0 } else { 0.0 });
        let cfg = c.cfg(&p);
        let dims = Dims::check(&p.q.view(), &p.k.view(), &v.view(), &cfg).unwrap();
        for (name, r) in run_all(p.q.view(), p.k.view(), v.view(), &cfg, &c.strategies()) {
            for i in 0..c.lq {
                let any_visible = (0..c.lk).any(|j| dims.visible(&cfg, i, j));
                for h in 0..c.hq {
                    let row = r.out.slice(s![i, h, ..]);
                    prop_assert!(row.iter().all(|&x| x >= 0.0), "{name}: negative probability");
                    for j in 0..c.lk {
                        if !dims.visible(&cfg, i, j) {
                            prop_assert_eq!(row[j], 0.0, "{}: weight on invisible key {}", name, j);
                        }
                    }
                    let sum: f64 = row.sum();
                    let want = if any_visible { 1.0 } else { 0.0 };
                    prop_assert!((sum - want).abs() <= TOL, "{name}: weights sum to {sum}");
                }
            }
        }
    }

    /// Non-causal attention without a window is invariant to permuting the
    /// K/V rows together (and the mask's columns with them).
    #[test]
    fn prop_permutation_invariance(c in case()) {
        let mut c = c;
        c.masking = Masking::None;
        c.window = None;
        let p = c.problem();
        let mut perm: Vec<usize> = (0..c.lk).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(c.seed ^ 0x9e37));
        let kp = p.k.select(Axis(0), &perm);
        let vp = p.v.select(Axis(0), &perm);
        let mp = p.mask.as_ref().map(|m| m.select(Axis(1), &perm));
        let cfg = c.cfg(&p);
        let cfg_p = AttentionConfig { mask: mp.as_ref().map(|m| m.view()), ..cfg.clone() };
        let reference = attention_naive(p.q.view(), p.k.view(), p.v.view(), &cfg).unwrap();
        for (name, r) in run_all(p.q.view(), kp.view(), vp.view(), &cfg_p, &c.strategies()) {
            let (eo, el) = errors(&r, &reference);
            prop_assert!(eo <= TOL && el <= TOL, "{name}: permuted differs: out {eo:e}, lse {el:e}");
        }
    }
}

fn long_case() -> impl proptest::strategy::Strategy<Value = Case> {
    (
        case(),
        prop_oneof![Just(1usize), Just(97), Just(1025)],
        any::<bool>(),
    )
        .prop_map(|(c, other, keys_long)| {
            // One side 1025 long; D small so a case stays well under a second.
            let (lq, lk) = if keys_long {
                (other, 1025)
            } else {
                (1025, other)
            };
            let lq = if c.masking == Masking::Causal {
                lq.min(lk)
            } else {
                lq
            };
            Case {
                lq,
                lk,
                d: c.d.min(4),
                ..c
            }
        })
}

proptest! {
    #![proptest_config(config(4))]

    /// A few random problems with a 1025-long side (the deterministic list
    /// below pins the important shapes).
    #[test]
    fn prop_long_strategies_agree(c in long_case()) {
        check_agree(&c);
    }
}

/// Lengths of 1025 (more than one 1024-token partition, 65 16-token blocks,
/// an odd tail): few cases, one line each, so the suite stays fast.
#[test]
fn long_sequences_agree() {
    let base = Case {
        lq: 1,
        lk: 1025,
        hq: 9,
        hkv: 3,
        d: 8,
        masking: Masking::Causal,
        window: None,
        scale: None,
        mask_p: None,
        block: 16,
        partition: 512,
        q_tile: 64,
        k_tile: 64,
        seed: 1,
    };
    let cases = [
        // decode against a 1025-token cache, vLLM's v2 partitioning
        Case { ..base.clone() },
        // full causal prefill, block 8, partitions of 3 blocks
        Case {
            lq: 1025,
            block: 8,
            partition: 24,
            seed: 2,
            ..base.clone()
        },
        // chunked prefill of 97 tokens with a sliding window
        Case {
            lq: 97,
            window: Some(300),
            block: 1,
            partition: 100,
            k_tile: 16,
            seed: 3,
            ..base.clone()
        },
        // MQA, non-causal, explicit mask, queries longer than keys
        Case {
            lq: 1025,
            lk: 97,
            hq: 4,
            hkv: 1,
            masking: Masking::None,
            mask_p: Some(0.5),
            q_tile: 3,
            k_tile: 5,
            seed: 4,
            ..base.clone()
        },
        // long keys, larger scale (peaky softmax), tiles of 1
        Case {
            lq: 97,
            scale: Some(2.0),
            q_tile: 1,
            k_tile: 1,
            partition: 1024,
            seed: 5,
            ..base.clone()
        },
    ];
    for c in &cases {
        check_agree(c);
    }
}

// ------------------------------------------------------ hand-computed cases

fn arr3(lx: usize, h: usize, d: usize, data: &[f64]) -> Array3<f64> {
    Array3::from_shape_vec((lx, h, d), data.to_vec()).unwrap()
}

/// Every strategy with small, awkward tile/block/partition sizes.
fn all_small() -> Vec<Strategy> {
    let mut v = strategies(1, 1, 1, 1);
    v.extend(strategies(2, 4, 2, 3)[1..].iter().copied());
    v.extend(strategies(16, 512, 64, 64)[1..].iter().copied());
    v
}

/// One query, two keys, scale 1: scores (1, 0), weights e/(e+1), 1/(e+1).
#[test]
fn one_query_two_keys() {
    let q = arr3(1, 1, 2, &[1.0, 0.0]);
    let k = arr3(2, 1, 2, &[1.0, 0.0, 0.0, 1.0]);
    let v = arr3(2, 1, 2, &[1.0, 2.0, 3.0, 4.0]);
    let e = std::f64::consts::E;
    let (w0, w1) = (e / (e + 1.0), 1.0 / (e + 1.0));
    let want = [w0 * 1.0 + w1 * 3.0, w0 * 2.0 + w1 * 4.0];
    let want_lse = (e + 1.0).ln();
    let cfg = AttentionConfig {
        scale: Some(1.0),
        ..Default::default()
    };
    for (name, r) in run_all(q.view(), k.view(), v.view(), &cfg, &all_small()) {
        for x in 0..2 {
            assert!(
                (r.out[[0, 0, x]] - want[x]).abs() < 1e-15,
                "{name}: {:?}",
                r.out
            );
        }
        assert!(
            (r.lse[[0, 0]] - want_lse).abs() < 1e-15,
            "{name}: {:?}",
            r.lse
        );
    }
    // Default scale 1/sqrt(2): scores (1/sqrt 2, 0).
    let a = std::f64::consts::FRAC_1_SQRT_2.exp();
    let want0 = (a * 1.0 + 3.0) / (a + 1.0);
    for (name, r) in run_all(
        q.view(),
        k.view(),
        v.view(),
        &Default::default(),
        &all_small(),
    ) {
        assert!((r.out[[0, 0, 0]] - want0).abs() < 1e-15, "{name}");
        assert!((r.lse[[0, 0]] - (a + 1.0).ln()).abs() < 1e-15, "{name}");
    }
}

/// Zero queries make every score 0, so each output is the mean of the
/// visible values and lse = ln(#visible): the visibility rule, checked by
/// hand. D = 1 and v_j = 10^j so the mean identifies the visible set.
fn check_visible_sets(
    lq: usize,
    lk: usize,
    masking: Masking,
    window: Option<usize>,
    mask: Option<&[&[u8]]>,
    want: &[&[usize]],
) {
    let q = Array3::zeros((lq, 1, 1));
    let v = Array3::from_shape_fn((lk, 1, 1), |(j, _, _)| 10f64.powi(j as i32));
    let k = Array3::from_elem((lk, 1, 1), 1.0);
    let mask = mask.map(|rows| Array2::from_shape_fn((lq, lk), |(i, j)| rows[i][j] == 1));
    let cfg = AttentionConfig {
        masking,
        window,
        scale: None,
        mask: mask.as_ref().map(|m| m.view()),
    };
    for (name, r) in run_all(q.view(), k.view(), v.view(), &cfg, &all_small()) {
        assert_eq!(r.out.dim(), (lq, 1, 1), "{name}");
        assert_eq!(r.lse.dim(), (lq, 1), "{name}");
        for (i, vis) in want.iter().enumerate() {
            let ctx = format!("{name}: row {i} of lq={lq} lk={lk} {masking:?} {window:?}");
            if vis.is_empty() {
                assert_eq!(r.out[[i, 0, 0]], 0.0, "{ctx}");
                assert_eq!(r.lse[[i, 0]], f64::NEG_INFINITY, "{ctx}");
                continue;
            }
            let mean = vis.iter().map(|&j| 10f64.powi(j as i32)).sum::<f64>() / vis.len() as f64;
            assert!(
                (r.out[[i, 0, 0]] - mean).abs() <= 1e-12 * mean,
                "{ctx}: {} vs {mean}",
                r.out[[i, 0, 0]]
            );
            assert!(
                (r.lse[[i, 0]] - (vis.len() as f64).ln()).abs() < 1e-14,
                "{ctx}"
            );
        }
    }
}

#[test]
fn visibility_rules_by_hand() {
    use Masking::{Causal, None as Full};
    // decode: the single query is the last position and sees everything
    check_visible_sets(1, 3, Causal, None, None, &[&[0, 1, 2]]);
    // decode with a window of 2
    check_visible_sets(1, 3, Causal, Some(2), None, &[&[1, 2]]);
    // chunked prefill, bottom-right: query 0 sits at position 3
    check_visible_sets(2, 5, Causal, None, None, &[&[0, 1, 2, 3], &[0, 1, 2, 3, 4]]);
    check_visible_sets(2, 5, Causal, Some(2), None, &[&[2, 3], &[3, 4]]);
    // square causal prefill
    check_visible_sets(3, 3, Causal, None, None, &[&[0], &[0, 1], &[0, 1, 2]]);
    // window without causality: keys after the position stay visible
    check_visible_sets(2, 4, Full, Some(2), None, &[&[1, 2, 3], &[2, 3]]);
    // explicit mask (tree attention), AND-ed with causality (row 0 sits at
    // position 1, so its mask entries 2, 3 are hidden anyway); row 1 fully masked
    check_visible_sets(
        3,
        4,
        Causal,
        None,
        Some(&[&[1, 0, 1, 1], &[0, 0, 0, 0], &[0, 1, 0, 1]]),
        &[&[0], &[], &[1, 3]],
    );
    // no keys at all; no queries at all
    check_visible_sets(2, 0, Full, None, None, &[&[], &[]]);
    check_visible_sets(0, 3, Causal, None, None, &[]);
}

/// Decode (Lq = 1): causal masking changes nothing, bit for bit.
#[test]
fn decode_causal_equals_full() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let q = normal3(&mut rng, (1, 9, 8), 1.0);
    let k = normal3(&mut rng, (37, 3, 8), 1.0);
    let v = normal3(&mut rng, (37, 3, 8), 1.0);
    let causal = AttentionConfig {
        masking: Masking::Causal,
        ..Default::default()
    };
    let full = AttentionConfig::default();
    for s in strategies(8, 16, 1, 5) {
        let a = attention(q.view(), k.view(), v.view(), &causal, s).unwrap();
        let b = attention(q.view(), k.view(), v.view(), &full, s).unwrap();
        assert_eq!(a.out, b.out, "{s:?}");
        assert_eq!(a.lse, b.lse, "{s:?}");
    }
}

/// Chunked prefill (Lq < Lk) equals the last Lq rows of the full causal
/// prefill over all Lk queries: the bottom-right convention, checked against
/// the case everyone agrees on.
#[test]
fn chunked_equals_tail_of_full_prefill() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (lk, lq) = (53, 17);
    let q_full = normal3(&mut rng, (lk, 6, 4), 1.0);
    let k = normal3(&mut rng, (lk, 2, 4), 1.0);
    let v = normal3(&mut rng, (lk, 2, 4), 1.0);
    let q_chunk = q_full.slice(s![lk - lq.., .., ..]).to_owned();
    for window in [None, Some(7)] {
        let cfg = AttentionConfig {
            masking: Masking::Causal,
            window,
            ..Default::default()
        };
        for s in strategies(8, 16, 4, 8) {
            let full = attention(q_full.view(), k.view(), v.view(), &cfg, s).unwrap();
            let chunk = attention(q_chunk.view(), k.view(), v.view(), &cfg, s).unwrap();
            let tail = AttentionOutput {
                out: full.out.slice(s![lk - lq.., .., ..]).to_owned(),
                lse: full.lse.slice(s![lk - lq.., ..]).to_owned(),
            };
            let (eo, el) = errors(&chunk, &tail);
            assert!(
                eo <= TOL && el <= TOL,
                "{s:?} window {window:?}: {eo:e} {el:e}"
            );
        }
    }
}

/// GQA: query head h reads KV head h / (Hq/Hkv), i.e. the same as running
/// multi-head attention on K/V with each KV head repeated Hq/Hkv times
/// consecutively (Hugging Face's `repeat_kv`). MQA is Hkv = 1.
#[test]
fn gqa_equals_repeated_kv() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (hq, hkv) in [(9, 3), (4, 1), (8, 2)] {
        let q = normal3(&mut rng, (5, hq, 4), 1.0);
        let k = normal3(&mut rng, (12, hkv, 4), 1.0);
        let v = normal3(&mut rng, (12, hkv, 4), 1.0);
        let g = hq / hkv;
        let rep =
            |a: &Array3<f64>| Array3::from_shape_fn((12, hq, 4), |(j, h, x)| a[[j, h / g, x]]);
        let (kr, vr) = (rep(&k), rep(&v));
        let cfg = AttentionConfig {
            masking: Masking::Causal,
            ..Default::default()
        };
        for s in strategies(4, 8, 2, 5) {
            let a = attention(q.view(), k.view(), v.view(), &cfg, s).unwrap();
            let b = attention(q.view(), kr.view(), vr.view(), &cfg, s).unwrap();
            assert_eq!(a.out, b.out, "{s:?} {hq}/{hkv}");
            assert_eq!(a.lse, b.lse, "{s:?} {hq}/{hkv}");
        }
    }
}

/// Strided (non-standard-layout) views give the same answer as contiguous ones.
#[test]
fn strided_inputs() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let q = normal3(&mut rng, (4, 6, 8), 1.0); // [Lq, D, Hq] -> [Lq, Hq, D]
    let k = normal3(&mut rng, (6, 9, 4), 1.0); // [D, Lk, Hkv] -> permuted to [Lk, Hkv, D]
    let v = normal3(&mut rng, (6, 9, 4), 1.0);
    let (qs, ks, vs) = (
        q.view().permuted_axes([0, 2, 1]),
        k.view().permuted_axes([1, 2, 0]),
        v.view().permuted_axes([1, 2, 0]),
    );
    let (qc, kc, vc) = (qs.to_owned(), ks.to_owned(), vs.to_owned());
    for s in strategies(4, 8, 2, 5) {
        let a = attention(qs, ks, vs, &Default::default(), s).unwrap();
        let b = attention(qc.view(), kc.view(), vc.view(), &Default::default(), s).unwrap();
        assert_eq!(a.out, b.out, "{s:?}");
    }
}

// ---------------------------------------------------------- the paged pool

#[test]
fn scrambled_pool_layout() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let k = normal3(&mut rng, (21, 2, 3), 1.0);
    let v = normal3(&mut rng, (21, 2, 3), 1.0);
    let a = PagedPool::scrambled(k.view(), v.view(), 4, 42).unwrap();
    let b = PagedPool::scrambled(k.view(), v.view(), 4, 42).unwrap();
    assert_eq!(a.block_table, b.block_table, "same seed, same table");
    assert_eq!(a.block_table.len(), 6);
    assert_eq!(a.k_blocks.dim(), (6 + 3 + 1, 4, 2, 3));
    let mut ids = a.block_table.clone();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 6, "distinct physical blocks");
    assert_ne!(a.block_table, (0..6).collect::<Vec<u32>>(), "scrambled");
    let (kg, vg) = a.view().gather().unwrap();
    assert_eq!(kg, k);
    assert_eq!(vg, v);
    // The tail of the last block (token 21..24) is NaN: never to be read.
    let last = a.block_table[5] as usize;
    assert!(a
        .k_blocks
        .slice(s![last, 1.., .., ..])
        .iter()
        .all(|x| x.is_nan()));
    let c = PagedPool::scrambled(k.view(), v.view(), 4, 43).unwrap();
    assert_ne!(a.block_table, c.block_table, "another seed, another table");
}

/// A hand-built pool (the module doc's picture): 10 tokens, block 4, table
/// [5, 0, 3]; blocks shared by another sequence's tokens are ignored.
#[test]
fn paged_hand_built_table() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let k = normal3(&mut rng, (10, 1, 2), 1.0);
    let v = normal3(&mut rng, (10, 1, 2), 1.0);
    let q = normal3(&mut rng, (3, 2, 2), 1.0);
    let mut kb = ndarray::Array4::from_elem((6, 4, 1, 2), 1e9);
    let mut vb = kb.clone();
    let table = [5u32, 0, 3];
    for t in 0..10 {
        let b = table[t / 4] as usize;
        kb.slice_mut(s![b, t % 4, .., ..])
            .assign(&k.slice(s![t, .., ..]));
        vb.slice_mut(s![b, t % 4, .., ..])
            .assign(&v.slice(s![t, .., ..]));
    }
    let kv = PagedKv {
        k_blocks: kb.view(),
        v_blocks: vb.view(),
        block_table: &table,
        len: 10,
    };
    let cfg = AttentionConfig {
        masking: Masking::Causal,
        ..Default::default()
    };
    let want = attention_naive(q.view(), k.view(), v.view(), &cfg).unwrap();
    for part in [4, 8, 12] {
        let got = attention_paged(q.view(), &kv, part, &cfg).unwrap();
        let (eo, el) = errors(&got, &want);
        assert!(eo <= TOL && el <= TOL, "partition {part}: {eo:e} {el:e}");
    }
}

/// Logical blocks may share a physical block (prefix sharing, beam search):
/// table [1, 1, 0] reads tokens 0..4 twice, then 4 more.
#[test]
fn paged_shared_physical_blocks() {
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let kb = ndarray::Array4::from_shape_fn((2, 4, 2, 3), |_| rng.random_range(-1.0..1.0));
    let vb = ndarray::Array4::from_shape_fn((2, 4, 2, 3), |_| rng.random_range(-1.0..1.0));
    let q = normal3(&mut rng, (2, 4, 3), 1.0);
    let table = [1u32, 1, 0];
    let kv = PagedKv {
        k_blocks: kb.view(),
        v_blocks: vb.view(),
        block_table: &table,
        len: 11,
    };
    let (k, v) = kv.gather().unwrap();
    assert_eq!(k.slice(s![0..4, .., ..]), k.slice(s![4..8, .., ..]));
    assert_eq!(k.slice(s![8..11, .., ..]), kb.slice(s![0, 0..3, .., ..]));
    for masking in [Masking::None, Masking::Causal] {
        let cfg = AttentionConfig {
            masking,
            ..Default::default()
        };
        let want = attention_naive(q.view(), k.view(), v.view(), &cfg).unwrap();
        for part in [4, 8] {
            let got = attention_paged(q.view(), &kv, part, &cfg).unwrap();
            let (eo, el) = errors(&got, &want);
            assert!(
                eo <= TOL && el <= TOL,
                "{masking:?} partition {part}: {eo:e} {el:e}"
            );
        }
    }
}

/// Merging two halves' (out, lse) equals attention over the whole.
#[test]
fn merge_by_lse_of_halves() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let q = normal3(&mut rng, (1, 1, 4), 1.0);
    let k = normal3(&mut rng, (10, 1, 4), 1.0);
    let v = normal3(&mut rng, (10, 1, 4), 1.0);
    let cfg = AttentionConfig::default();
    let whole = attention_naive(q.view(), k.view(), v.view(), &cfg).unwrap();
    let a = attention_naive(
        q.view(),
        k.slice(s![..3, .., ..]),
        v.slice(s![..3, .., ..]),
        &cfg,
    )
    .unwrap();
    let b = attention_naive(
        q.view(),
        k.slice(s![3.., .., ..]),
        v.slice(s![3.., .., ..]),
        &cfg,
    )
    .unwrap();
    let outs: Vec<f64> = a.out.iter().chain(b.out.iter()).copied().collect();
    let mut merged = vec![0.0; 4];
    let lse = merge_by_lse(&[a.lse[[0, 0]], b.lse[[0, 0]]], &outs, &mut merged);
    assert!((lse - whole.lse[[0, 0]]).abs() < 1e-14);
    for x in 0..4 {
        assert!((merged[x] - whole.out[[0, 0, x]]).abs() < 1e-14);
    }
    // An empty partition (lse = -inf) weighs nothing; all empty gives zeros.
    let lse2 = merge_by_lse(
        &[f64::NEG_INFINITY, whole.lse[[0, 0]]],
        &[f64::NAN; 4]
            .iter()
            .chain(whole.out.iter())
            .copied()
            .collect::<Vec<_>>(),
        &mut merged,
    );
    assert_eq!(lse2, whole.lse[[0, 0]]);
    assert!(merged
        .iter()
        .zip(whole.out.iter())
        .all(|(a, b)| (a - b).abs() < 1e-15));
    let lse3 = merge_by_lse(&[f64::NEG_INFINITY; 2], &[0.0; 8], &mut merged);
    assert_eq!(lse3, f64::NEG_INFINITY);
    assert!(merged.iter().all(|&x| x == 0.0));
}

// ------------------------------------------------------------ bad arguments

#[test]
fn invalid_arguments_are_errors() {
    let z = |a, b, c| Array3::<f64>::zeros((a, b, c));
    let mask23 = Array2::from_elem((2, 3), true);
    let pool_k = ndarray::Array4::<f64>::zeros((2, 4, 1, 2));
    // (what, result, expected message fragment)
    let check = |what: &str, r: Result<AttentionOutput<f64>>, want: &str| match r {
        Ok(_) => panic!("{what}: expected an error containing {want:?}"),
        Err(e) => assert!(e.to_string().contains(want), "{what}: {e} lacks {want:?}"),
    };
    let causal = AttentionConfig {
        masking: Masking::Causal,
        ..Default::default()
    };
    let d = AttentionConfig::default();
    check(
        "causal Lq > Lk",
        attention_naive(
            z(3, 1, 2).view(),
            z(2, 1, 2).view(),
            z(2, 1, 2).view(),
            &causal,
        ),
        "Lq <= Lk",
    );
    check(
        "heads",
        attention_naive(z(1, 9, 2).view(), z(2, 2, 2).view(), z(2, 2, 2).view(), &d),
        "not divisible",
    );
    check(
        "head dim",
        attention_naive(z(1, 1, 3).view(), z(2, 1, 2).view(), z(2, 1, 2).view(), &d),
        "head dim of q",
    );
    check(
        "v shape",
        attention_naive(z(1, 1, 2).view(), z(2, 1, 2).view(), z(3, 1, 2).view(), &d),
        "same as k",
    );
    check(
        "mask shape",
        attention_naive(
            z(2, 1, 2).view(),
            z(2, 1, 2).view(),
            z(2, 1, 2).view(),
            &AttentionConfig {
                mask: Some(mask23.view()),
                ..Default::default()
            },
        ),
        "mask",
    );
    check(
        "window 0",
        attention_naive(
            z(1, 1, 2).view(),
            z(2, 1, 2).view(),
            z(2, 1, 2).view(),
            &AttentionConfig {
                window: Some(0),
                ..Default::default()
            },
        ),
        "window",
    );
    check(
        "scale NaN",
        attention_naive(
            z(1, 1, 2).view(),
            z(2, 1, 2).view(),
            z(2, 1, 2).view(),
            &AttentionConfig {
                scale: Some(f64::NAN),
                ..Default::default()
            },
        ),
        "scale",
    );
    check(
        "q_tile 0",
        attention_tiled(
            z(1, 1, 2).view(),
            z(2, 1, 2).view(),
            z(2, 1, 2).view(),
            &d,
            0,
            4,
        ),
        "q_tile",
    );
    check(
        "k_tile 0",
        attention_tiled(
            z(1, 1, 2).view(),
            z(2, 1, 2).view(),
            z(2, 1, 2).view(),
            &d,
            4,
            0,
        ),
        "k_tile",
    );
    check(
        "block 0",
        attention(
            z(1, 1, 2).view(),
            z(2, 1, 2).view(),
            z(2, 1, 2).view(),
            &d,
            Strategy::Paged {
                block_size: 0,
                partition_size: 4,
            },
        ),
        "block_size",
    );
    check(
        "partition 0",
        attention(
            z(1, 1, 2).view(),
            z(2, 1, 2).view(),
            z(2, 1, 2).view(),
            &d,
            Strategy::Paged {
                block_size: 4,
                partition_size: 0,
            },
        ),
        "partition_size",
    );
    check(
        "partition 6 / block 4",
        attention(
            z(1, 1, 2).view(),
            z(2, 1, 2).view(),
            z(2, 1, 2).view(),
            &d,
            Strategy::Paged {
                block_size: 4,
                partition_size: 6,
            },
        ),
        "multiple of the block size 4",
    );
    let q = z(1, 1, 2);
    let table_bad = [0u32, 2];
    check(
        "table id",
        attention_paged(
            q.view(),
            &PagedKv {
                k_blocks: pool_k.view(),
                v_blocks: pool_k.view(),
                block_table: &table_bad,
                len: 5,
            },
            4,
            &d,
        ),
        "entry 1 = 2 is not < 2",
    );
    check(
        "table len",
        attention_paged(
            q.view(),
            &PagedKv {
                k_blocks: pool_k.view(),
                v_blocks: pool_k.view(),
                block_table: &[0],
                len: 5,
            },
            4,
            &d,
        ),
        "need 2",
    );
    check(
        "pool head dim",
        attention_paged(
            z(1, 1, 3).view(),
            &PagedKv {
                k_blocks: pool_k.view(),
                v_blocks: pool_k.view(),
                block_table: &[0, 1],
                len: 5,
            },
            4,
            &d,
        ),
        "head dim of q",
    );
}

// ------------------------------------------------- f32: FlashAttention's rule

/// Plain f32 attention, the way a framework computes it in the input
/// precision: S = scale·QKᵀ in f32, row max, P = exp(S - max) in f32,
/// l = Σ P and O = (P V) / l accumulated in f32, in key order.
fn plain_f32(
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    cfg: &AttentionConfig,
) -> AttentionOutput<f32> {
    let dims = Dims::check(&q, &k, &v, cfg).unwrap();
    let Dims { lq, lk, hq, d, .. } = dims;
    let scale = dims.scale(cfg) as f32;
    let mut out = Array3::zeros((lq, hq, d));
    let mut lse = Array2::from_elem((lq, hq), f32::NEG_INFINITY);
    for i in 0..lq {
        for h in 0..hq {
            let kh = h / dims.group();
            let s: Vec<f32> = (0..lk)
                .map(|j| {
                    if !dims.visible(cfg, i, j) {
                        return f32::NEG_INFINITY;
                    }
                    let mut dot = 0f32;
                    for x in 0..d {
                        dot += q[[i, h, x]] * k[[j, kh, x]];
                    }
                    scale * dot
                })
                .collect();
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let p: Vec<f32> = s.iter().map(|&x| (x - m).exp()).collect();
            let l: f32 = p.iter().fold(0.0, |a, &x| a + x);
            for x in 0..d {
                let mut o = 0f32;
                for j in 0..lk {
                    o += p[j] * v[[j, kh, x]];
                }
                out[[i, h, x]] = o / l;
            }
            lse[[i, h]] = m + l.ln();
        }
    }
    AttentionOutput { out, lse }
}

/// Max absolute difference from an f64 reference (one metric for all, so
/// the ratio does not depend on normalization).
fn abs_err(a: &AttentionOutput<f32>, r: &AttentionOutput<f64>) -> (f64, f64) {
    let eo = a
        .out
        .iter()
        .zip(r.out.iter())
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max);
    let el = a
        .lse
        .iter()
        .zip(r.lse.iter())
        .map(|(&x, &y)| {
            if y == f64::NEG_INFINITY && x == f32::NEG_INFINITY {
                0.0
            } else {
                (x as f64 - y).abs()
            }
        })
        .fold(0.0, f64::max);
    (eo, el)
}

/// FlashAttention's rule: the f32 tiled (and paged) error against the f64
/// answer (f64 naive on the same f32 inputs) is at most twice the error of
/// plain f32 attention ([`plain_f32`]).
///
/// Why 2x bounds it (first order in the unit roundoff u = 2^-24, one query
/// row, `w_j = exp(s_j - m)`, `l = Σ w_j`, `O = Σ w_j v_j`):
/// - Scores: both paths compute `s_j` with the same f32 dot products in the
///   same order: identical bits, identical error.
/// - Plain: `exp(s_j - m)` has relative error `≲ (|s_j - m| + 1)·u` (the
///   subtraction's rounding, amplified by exp, plus exp's own); recursive
///   summation of `l` and of `O` adds `≤ (Lk - 1)·u` each; the division `u`.
/// - Tiled: key j gets `exp(s_j - m_t) · Π α`, with `α = exp(m_old - m_new)`
///   for each later increase of the running max. The exponents telescope to
///   `s_j - m` and all have one sign, so their argument errors sum to the same
///   `|s_j - m|·u` as plain's. The additions are the same `Lk - 1` in the same
///   order. What is new: each rescale rounds α (one exp) and `α·l`, `α·O`
///   (one multiply each), but only when the max actually grows (`α = 1` is
///   skipped). With `T = ceil(Lk / k_tile)` tiles that is at most `2T·u`
///   more, so the bound is at most `(1 + 2T/(Lk-1))` times plain's: <= 2x for
///   k_tile >= 2. With k_tile = 1 the max grows at every new record of the
///   score sequence: ~ln(Lk) times for exchangeable scores (harmonic number),
///   so the extra `2·(1 + ln Lk)·u` is far below `(Lk-1)·u`.
/// - Paged: plain f32 over each partition (shorter sums, partition max `m_p`
///   with `|s_j - m_p| <= |s_j - m|`), then the LSE merge: per partition one
///   `lse_p - lse` subtraction, one exp and one multiply-add, i.e. `O(P)·u`
///   with `P = ceil(Lk / partition) <= Lk / 2` for partitions of >= 2 tokens,
///   plus `|lse|·u`, the size of plain's argument term.
///
/// The test measures both on several shapes (k_tile = 1 for the most
/// rescales, 1025 keys, a peaky softmax) and requires the ratio <= 2; it
/// also requires the plain error to be nonzero and small, so the comparison
/// is meaningful. Measured ratios (output / lse): tiled 0.85-1.00, paged
/// 0.60-0.95.
#[test]
fn f32_error_within_twice_plain_f32() {
    // (lq, lk, hq, hkv, d, causal, q_tile, k_tile, block, partition, scale)
    let cases: &[(
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
        usize,
        usize,
        usize,
        usize,
        Option<f64>,
    )] = &[
        (64, 1025, 4, 2, 64, true, 64, 64, 16, 512, None),
        (1, 1025, 8, 1, 64, true, 1, 64, 16, 256, None),
        (96, 96, 4, 4, 32, false, 16, 1, 1, 8, None),
        (128, 512, 2, 1, 64, true, 32, 16, 8, 64, Some(0.5)),
    ];
    for (n, &(lq, lk, hq, hkv, d, causal, qt, kt, bs, part, scale)) in cases.iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(100 + n as u64);
        let q32 = normal3(&mut rng, (lq, hq, d), 1.0).mapv(|x| x as f32);
        let k32 = normal3(&mut rng, (lk, hkv, d), 1.0).mapv(|x| x as f32);
        let v32 = normal3(&mut rng, (lk, hkv, d), 1.0).mapv(|x| x as f32);
        let (q64, k64, v64) = (
            q32.mapv(f64::from),
            k32.mapv(f64::from),
            v32.mapv(f64::from),
        );
        let cfg = AttentionConfig {
            masking: if causal {
                Masking::Causal
            } else {
                Masking::None
            },
            scale,
            ..Default::default()
        };
        let exact = attention_naive(q64.view(), k64.view(), v64.view(), &cfg).unwrap();
        let (plain_o, plain_l) =
            abs_err(&plain_f32(q32.view(), k32.view(), v32.view(), &cfg), &exact);
        assert!(
            plain_o > 0.0 && plain_o < 1e-4,
            "case {n}: plain f32 error {plain_o:e}"
        );
        assert!(
            plain_l > 0.0 && plain_l < 1e-4,
            "case {n}: plain f32 lse error {plain_l:e}"
        );
        for s in [
            Strategy::Tiled {
                q_tile: qt,
                k_tile: kt,
            },
            Strategy::Paged {
                block_size: bs,
                partition_size: part,
            },
        ] {
            let r = attention(q32.view(), k32.view(), v32.view(), &cfg, s).unwrap();
            let (eo, el) = abs_err(&r, &exact);
            eprintln!("case {n} {s:?}: out err {eo:.3e} (plain {plain_o:.3e}, ratio {:.2}), lse err {el:.3e} (plain {plain_l:.3e}, ratio {:.2})", eo / plain_o, el / plain_l);
            assert!(
                eo <= 2.0 * plain_o,
                "case {n} {s:?}: out error {eo:e} > 2 x plain {plain_o:e}"
            );
            assert!(
                el <= 2.0 * plain_l,
                "case {n} {s:?}: lse error {el:e} > 2 x plain {plain_l:e}"
            );
        }
        // The f32 naive path is the f64 answer rounded once: far better.
        let naive32 = attention_naive(q32.view(), k32.view(), v32.view(), &cfg).unwrap();
        let (no, _) = abs_err(&naive32, &exact);
        assert!(
            no <= 2f64.powi(-24) * exact.out.iter().fold(0f64, |a, x| a.max(x.abs())),
            "case {n}: naive f32 {no:e}"
        );
    }
}
