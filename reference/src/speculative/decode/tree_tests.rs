//! Tree verification through the model (stories260K, fast): every tree
//! node's logits equal its root-to-node path run sequentially, bit for bit;
//! after compaction the cache continues exactly like one built from the
//! accepted path; at T = 0 tree speculation is plain greedy decoding; at
//! T > 0 the first two tokens follow the target's exact laws.
//!
//! Why bit-identical and not a tolerance: with the Llama2c kernel every
//! operation but attention is per row (the matmul sums in the same order
//! whatever the batch), RoPE takes the node's explicit position, and
//! attention reads the visible rows in row order — the prefix, then the
//! ancestors (stored before the node: parents precede children), then the
//! node — which is exactly the key order of the sequential path, so the same
//! f32 scores are softmaxed and summed in the same order.

use super::tests::exact_first_two_laws;
use super::*;
use crate::model::load_checkpoint;
use crate::speculative::lossless::chi_square_gof;
use crate::speculative::verify::DraftTree;
use inferlab_models::assets;
use inferlab_models::tokenizer::Llama2cTokenizer;
use rand::SeedableRng;

fn stories() -> Option<(Llama, Llama2cTokenizer)> {
    let p = assets::require(assets::stories260k_model(), "tree speculation")?;
    let t = assets::require(assets::stories260k_tokenizer(), "tree speculation")?;
    let m = Llama::from_checkpoint(&load_checkpoint(&p).unwrap()).unwrap();
    let tok = Llama2cTokenizer::load_with_vocab(&t, 512).unwrap();
    Some((m, tok))
}

const CACHES: [CacheKind; 3] = [
    CacheKind::Contiguous,
    CacheKind::Paged { block_size: 3 },
    CacheKind::Paged { block_size: 16 },
];

/// A tree with interleaved branches (node 5's parent is 2, node 6's is 4, …)
/// so ancestors are not contiguous rows.
fn sample_tree() -> DraftTree {
    DraftTree {
        parents: vec![0, 0, 1, 2, 1, 4, 3, 0, 6],
        tokens: vec![40, 71, 300, 9, 40, 256, 3, 71, 100],
    }
}

fn path_of(tree: &DraftTree, mut n: usize) -> Vec<usize> {
    let mut p = Vec::new();
    while n != 0 {
        p.push(n);
        n = tree.parents[n - 1];
    }
    p.reverse();
    p
}

/// Root + tree through `forward_tree` over a cache holding `prompt[..len-1]`.
fn tree_pass(m: &Llama, cache: &mut KvCache, prompt: &[u32], tree: &DraftTree) -> Array2<f32> {
    let ctx = prompt.len();
    let mut toks = vec![prompt[ctx - 1]];
    toks.extend_from_slice(&tree.tokens);
    let pos: Vec<usize> = tree.depths().iter().map(|d| ctx - 1 + d).collect();
    m.forward_tree(
        cache,
        &toks,
        &pos,
        tree.attention_mask().view(),
        m.config.n_layers,
    )
    .unwrap()
}

#[test]
fn tree_node_logits_equal_sequential_paths() {
    let Some((m, tok)) = stories() else { return };
    let prompt = tok.encode_with("Lily and Tom went to the park", true, false);
    let ctx = prompt.len();
    let tree = sample_tree();
    for kind in CACHES {
        let mut base = m.new_cache(kind);
        m.forward(&mut base, &prompt[..ctx - 1]).unwrap();
        let mut c = base.clone();
        let logits = tree_pass(&m, &mut c, &prompt, &tree);
        assert_eq!(c.len(), ctx - 1 + tree.len());
        c.check_invariants().unwrap();
        for n in 0..tree.len() {
            let mut seq = vec![prompt[ctx - 1]];
            seq.extend(path_of(&tree, n).iter().map(|&a| tree.tokens[a - 1]));
            let mut s = base.clone();
            let l = m.forward(&mut s, &seq).unwrap();
            assert_eq!(
                logits.row(n),
                l.row(l.nrows() - 1),
                "node {n} {kind:?}: tree logits differ from the sequential path"
            );
        }
    }
    // Negative control: a mask that lets node 3 see node 2 (not an ancestor)
    // changes node 3's logits.
    let mut c = m.new_cache(CacheKind::Contiguous);
    m.forward(&mut c, &prompt[..ctx - 1]).unwrap();
    let good = tree_pass(&m, &mut c.clone(), &prompt, &tree);
    let mut mask = tree.attention_mask();
    mask[[3, 2]] = true;
    let mut toks = vec![prompt[ctx - 1]];
    toks.extend_from_slice(&tree.tokens);
    let pos: Vec<usize> = tree.depths().iter().map(|d| ctx - 1 + d).collect();
    let bad = m
        .forward_tree(&mut c, &toks, &pos, mask.view(), m.config.n_layers)
        .unwrap();
    assert_ne!(good.row(3), bad.row(3));
    assert_eq!(good.row(4), bad.row(4));
}

#[test]
fn compacted_cache_continues_like_the_sequential_one() {
    let Some((m, tok)) = stories() else { return };
    let prompt = tok.encode_with("Once upon a time there was", true, false);
    let ctx = prompt.len();
    let tree = sample_tree();
    let next = [35u32, 200, 7];
    for kind in CACHES {
        for leaf in [6, 9, 5, 2, 0] {
            let path = path_of(&tree, leaf);
            let mut c = m.new_cache(kind);
            m.forward(&mut c, &prompt[..ctx - 1]).unwrap();
            tree_pass(&m, &mut c, &prompt, &tree);
            let rows: Vec<usize> = path.iter().map(|&n| ctx - 1 + n).collect();
            c.compact(ctx, &rows).unwrap();
            c.check_invariants().unwrap();
            let mut seq = prompt.clone();
            seq.extend(path.iter().map(|&n| tree.tokens[n - 1]));
            assert_eq!(c.len(), seq.len());
            let mut s = m.new_cache(kind);
            m.forward(&mut s, &seq).unwrap();
            for l in 0..m.config.n_layers {
                assert_eq!(
                    c.gather_layer(l),
                    s.gather_layer(l),
                    "layer {l} leaf {leaf}"
                );
            }
            let a = m.forward(&mut c, &next).unwrap();
            let b = m.forward(&mut s, &next).unwrap();
            assert_eq!(a, b, "{kind:?} leaf {leaf}: continuation differs");
        }
    }
}

#[test]
fn masked_forward_and_compact_reject_bad_input() {
    let Some((m, _)) = stories() else { return };
    let mut c = m.new_cache(CacheKind::Contiguous);
    m.forward(&mut c, &[1, 5, 9]).unwrap();
    let mask = Array2::from_elem((2, 2), true);
    let e = m
        .forward_tree(&mut c.clone(), &[3, 4], &[3], mask.view(), 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tree positions"), "{e}");
    let e = m
        .forward_tree(&mut c.clone(), &[3, 4], &[3, 4], mask.slice(s![.., ..1]), 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tree attention mask"), "{e}");
    let mut no_self = mask.clone();
    no_self[[1, 1]] = false;
    let e = m
        .forward_tree(&mut c.clone(), &[3, 4], &[3, 4], no_self.view(), 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not see itself"), "{e}");
    let mut r = m.clone();
    r.attention_kernel = crate::model::AttentionKernel::Reference;
    let e = r
        .forward_tree(&mut c.clone(), &[3, 4], &[3, 4], mask.view(), 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Llama2c"), "{e}");
    let mut d = c.clone();
    assert!(d.compact(2, &[1]).is_err());
    assert!(d.compact(1, &[2, 2]).is_err());
    assert!(d.compact(1, &[3]).is_err());
    assert!(d.compact(4, &[]).is_err());
    assert_eq!(c.len(), 3);
    for (spec, want) in [
        ("", "not a positive integer"),
        ("2,0", "0 children"),
        ("x", "not"),
    ] {
        let e = TreeShape::parse(spec).unwrap_err().to_string();
        assert!(e.contains(want), "{spec:?}: {e}");
    }
    assert_eq!(TreeShape::parse("3, 1,1").unwrap().nodes(), 9);
    assert_eq!(TreeShape::parse("2,2").unwrap().nodes(), 6);
    assert!(TreeShape::parse("32,32,32").is_err());
    let mut ng = NgramProposer::new(m.config.vocab);
    let cfg = tree_cfg(0.0, CacheKind::Contiguous, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let shape = TreeShape::parse("2,1").unwrap();
    let e = speculative_generate_tree(&m, &mut ng, &[1, 5], &cfg, &shape, &mut rng)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot propose trees"), "{e}");
}

fn tree_cfg(temperature: f64, cache: CacheKind, max_new: usize) -> SpecConfig {
    SpecConfig {
        k: 1,
        warp: Warp {
            temperature,
            ..Warp::default()
        },
        max_new_tokens: max_new,
        stop_tokens: vec![],
        rule: VerifyRule::Lossless,
        cache,
    }
}

#[test]
fn greedy_tree_speculation_equals_plain_greedy() {
    let Some((m, tok)) = stories() else { return };
    let max_new = 40;
    for text in [
        "Once upon a time",
        "Lily and Tom went to the park. Lily saw a",
    ] {
        let prompt = tok.encode_with(text, true, false);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let want = plain_generate(
            &m,
            &prompt,
            &Warp {
                temperature: 0.0,
                ..Warp::default()
            },
            max_new,
            CacheKind::Contiguous,
            &mut rng,
        )
        .unwrap();
        for cache in [CacheKind::Contiguous, CacheKind::Paged { block_size: 4 }] {
            for spec in ["1,1,1", "3,1,1", "2,2", "4"] {
                let shape = TreeShape::parse(spec).unwrap();
                for layers in [1, 3] {
                    let cfg = tree_cfg(0.0, cache, max_new);
                    let mut d = ModelProposer::layers(&m, cache, layers).unwrap();
                    let (got, st) =
                        speculative_generate_tree(&m, &mut d, &prompt, &cfg, &shape, &mut rng)
                            .unwrap();
                    assert_eq!(got, want, "tree {spec} layers {layers} {cache:?} {text:?}");
                    // Greedy: the prediction (argmax among the children) is the outcome.
                    assert_eq!(st.acceptance(), st.predicted_acceptance());
                    assert_eq!(st.tokens_per_pass(), st.predicted_tokens_per_pass());
                    println!(
                        "tree {spec} layers {layers}: acceptance {:.3}, tokens/pass {:.3}",
                        st.acceptance(),
                        st.tokens_per_pass()
                    );
                    assert_eq!(st.tokens, max_new as u64);
                }
            }
        }
        // Wider trees accept at least as much as the chain with the same draft.
        let run = |spec: &str| {
            let cfg = tree_cfg(0.0, CacheKind::Contiguous, max_new);
            let mut d = ModelProposer::layers(&m, CacheKind::Contiguous, 1).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            speculative_generate_tree(
                &m,
                &mut d,
                &prompt,
                &cfg,
                &TreeShape::parse(spec).unwrap(),
                &mut rng,
            )
            .unwrap()
            .1
        };
        assert!(run("4,1,1").passes <= run("1,1,1").passes);
    }
}

/// The first two tokens with tree speculation (2-layer draft, tree 3,1,1,
/// T = 1) against the target's exact laws, as in the chain test
/// (`first_tokens_follow_the_target_law_with_speculation`): chi-square,
/// bins of expected count < 5 pooled, significance 1e-3. Negative control:
/// the same tree verified with deterministic top-3 children (Medusa-style)
/// instead of i.i.d. draws is biased and rejected.
#[test]
fn tree_speculation_first_tokens_follow_the_target_law() {
    let Some((m, tok)) = stories() else { return };
    let prompt = tok.encode_with("Lily saw a", true, false);
    let v = m.config.vocab;
    let warp = Warp::default();
    let (p1, p2) = exact_first_two_laws(&m, &prompt, &warp);
    let n = 8_000u64;
    let cfg = tree_cfg(1.0, CacheKind::Paged { block_size: 4 }, 2);
    let shape = TreeShape::parse("3,1,1").unwrap();
    let head = &prompt[..prompt.len() - 1];
    let mut ver0 = Verifier::new(&m, cfg.cache).unwrap();
    ver0.prefill(head).unwrap();
    let mut d0 = ModelProposer::layers(&m, cfg.cache, 2).unwrap();
    d0.prefill(head).unwrap();
    let (mut c1, mut c2) = (vec![0u64; v], vec![0u64; v]);
    let mut stats = SpecStats::default();
    for seed in 0..n {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut d, mut ver) = (d0.clone(), ver0.clone());
        let (out, st) =
            speculative_generate_tree_with(&m, &mut ver, &mut d, &prompt, &cfg, &shape, &mut rng)
                .unwrap();
        c1[out[0] as usize] += 1;
        c2[out[1] as usize] += 1;
        stats.merge(&st);
    }
    let t1 = chi_square_gof(&c1, &p1).unwrap();
    let t2 = chi_square_gof(&c2, &p2).unwrap();
    println!(
        "tree: first {t1:?}\nsecond {t2:?}\nacceptance {:.4} predicted {:.4}",
        stats.acceptance(),
        stats.predicted_acceptance()
    );
    assert!(t1.p_value > 1e-3 && t2.p_value > 1e-3, "{t1:?} {t2:?}");
    assert!(t1.df >= 5 && t2.df >= 5, "{t1:?} {t2:?}");
    assert!(stats.acceptance() < 0.95 && stats.acceptance() > 0.05);
    // Negative control: top-3 children (not i.i.d. draws) under the same rule.
    let mut c1 = vec![0u64; v];
    for seed in 0..n {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut d = d0.clone();
        let mut ver = ver0.clone();
        let mut td = d
            .propose_tree(
                &prompt,
                &TreeShape::parse("3").unwrap(),
                &Warp {
                    temperature: 0.0,
                    ..warp
                },
                &mut rng,
            )
            .unwrap();
        // Keep the top-3 tokens but use the T = 1 draft row as q.
        let q = d0
            .clone()
            .propose_tree(&prompt, &TreeShape::parse("1").unwrap(), &warp, &mut rng)
            .unwrap()
            .probs;
        td.probs.row_mut(0).assign(&q.row(0));
        let logits = ver.score_tree(&prompt, &td.tree).unwrap();
        let mut p = Array2::zeros(logits.raw_dim());
        for (i, row) in logits.outer_iter().enumerate() {
            let w = warp.probs_from_logits(row.as_slice().unwrap());
            p.row_mut(i).assign(&ArrayView1::from(&w[..]));
        }
        let u = verify::TreeUniforms {
            accept: (0..3).map(|_| rng.random::<f64>()).collect(),
            resample: rng.random::<f64>(),
        };
        let o = verify::tree_verify(p.view(), td.probs.view(), &td.tree, &u).unwrap();
        c1[o.tokens[0] as usize] += 1;
    }
    let bad = chi_square_gof(&c1, &p1).unwrap();
    println!("top-3 children: {bad:?}");
    assert!(bad.p_value < 1e-3, "{bad:?}");
}
