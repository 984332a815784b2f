//! Forward-pass tests: random tiny models (every branch, both RoPE layouts,
//! GQA, untied head) and stories260K (real weights).

use std::collections::BTreeMap;
use std::path::PathBuf;

use inferlab_models::{assets, Checkpoint, CheckpointFormat, ModelConfig, RopeLayout, Tensor};
use ndarray::{s, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::sampling::{Sampler, SamplingConfig};

fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        model_type: "llama".into(),
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 3,
        num_attention_heads: 6,
        num_key_value_heads: Some(2),
        head_dim: Some(4),
        vocab_size: 37,
        max_position_embeddings: 64,
        rope_theta: 500.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: tied,
        sliding_window: None,
        num_local_experts: None,
        num_experts_per_tok: None,
        hidden_act: "silu".into(),
        attention_bias: None,
        parallel_attn: None,
        norm_type: None,
        torch_dtype: None,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

/// A random checkpoint with HF names (q_dim 24 = 6 heads x 4, kv_dim 8).
fn tiny_checkpoint(seed: u64, layout: RopeLayout, tied: bool) -> Checkpoint {
    let cfg = tiny_config(tied);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = BTreeMap::new();
    let mut add = |name: String, shape: &[usize], scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| offset + scale * rng.random_range(-1.0f32..1.0))
            .collect();
        t.insert(
            name,
            Tensor {
                shape: shape.to_vec(),
                data,
            },
        );
    };
    add("model.embed_tokens.weight".into(), &[37, 24], 1.0, 0.0);
    for l in 0..3 {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        add(p("input_layernorm"), &[24], 0.2, 1.0);
        add(p("self_attn.q_proj"), &[24, 24], 0.4, 0.0);
        add(p("self_attn.k_proj"), &[8, 24], 0.4, 0.0);
        add(p("self_attn.v_proj"), &[8, 24], 0.4, 0.0);
        add(p("self_attn.o_proj"), &[24, 24], 0.3, 0.0);
        add(p("post_attention_layernorm"), &[24], 0.2, 1.0);
        add(p("mlp.gate_proj"), &[40, 24], 0.3, 0.0);
        add(p("mlp.up_proj"), &[40, 24], 0.3, 0.0);
        add(p("mlp.down_proj"), &[24, 40], 0.3, 0.0);
    }
    add("model.norm.weight".into(), &[24], 0.2, 1.0);
    if !tied {
        add("lm_head.weight".into(), &[37, 24], 0.5, 0.0);
    }
    Checkpoint {
        path: PathBuf::from("tiny.bin"),
        format: CheckpointFormat::Llama2c,
        config: cfg,
        rope_layout: layout,
        tensors: t,
    }
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..37u32)).collect()
}

/// Logits of each position, one token per forward call.
fn one_by_one(m: &Llama, kind: CacheKind, toks: &[u32]) -> Array2<f32> {
    let mut cache = m.new_cache(kind);
    let mut out = Array2::zeros((toks.len(), m.config.vocab));
    for (i, &t) in toks.iter().enumerate() {
        out.row_mut(i)
            .assign(&m.forward(&mut cache, &[t]).unwrap().row(0));
    }
    out
}

const KINDS: [CacheKind; 4] = [
    CacheKind::Contiguous,
    CacheKind::Paged { block_size: 1 },
    CacheKind::Paged { block_size: 8 },
    CacheKind::Paged { block_size: 16 },
];

#[test]
fn prefill_then_decode_equals_token_by_token_bitwise() {
    for (layout, tied) in [
        (RopeLayout::Interleaved, true),
        (RopeLayout::RotateHalf, false),
    ] {
        let m = Llama::from_checkpoint(&tiny_checkpoint(1, layout, tied)).unwrap();
        let toks = tokens(40, 2);
        let reference = one_by_one(&m, CacheKind::Contiguous, &toks);
        for kind in KINDS {
            // Prefill 29 (not a multiple of the row tile), then decode the rest,
            // then a chunk of 3 (chunked prefill / speculative verification).
            let mut cache = m.new_cache(kind);
            let a = m.forward(&mut cache, &toks[..29]).unwrap();
            let mut got = a.clone();
            for &t in &toks[29..37] {
                let r = m.forward(&mut cache, &[t]).unwrap();
                got.push_row(r.row(0)).unwrap();
            }
            let c = m.forward(&mut cache, &toks[37..]).unwrap();
            for r in c.rows() {
                got.push_row(r).unwrap();
            }
            cache.check_invariants().unwrap();
            assert_eq!(cache.len(), 40);
            // Same bits: every op is per row and the matmul sums in one order.
            assert_eq!(got, reference, "{layout:?} {kind:?}");
            // And a paged cache alone, token by token, too.
            assert_eq!(one_by_one(&m, kind, &toks), reference, "{kind:?}");
        }
    }
}

#[test]
fn truncate_rolls_back_exactly() {
    let m = Llama::from_checkpoint(&tiny_checkpoint(3, RopeLayout::Interleaved, true)).unwrap();
    let toks = tokens(30, 4);
    let other = tokens(12, 5);
    for kind in KINDS {
        let mut fresh = m.new_cache(kind);
        let want = m.forward(&mut fresh, &toks).unwrap();
        let mut cache = m.new_cache(kind);
        m.forward(&mut cache, &toks[..17]).unwrap();
        m.forward(&mut cache, &other).unwrap(); // rejected draft
        cache.truncate(17);
        cache.check_invariants().unwrap();
        assert_eq!(cache.len(), 17);
        let got = m.forward(&mut cache, &toks[17..]).unwrap();
        assert_eq!(got, want.slice(s![17.., ..]), "{kind:?}");
        if let CacheKind::Paged { block_size: 8 } = kind {
            // The rollback reused freed blocks: the table is not just 0, 1, 2, ...
            cache.truncate(3);
            m.forward(&mut cache, &toks[3..20]).unwrap();
            cache.check_invariants().unwrap();
            assert_eq!(cache.block_table().unwrap().len(), 3);
        }
    }
}

#[test]
fn forward_layers_all_equals_forward_and_fewer_differs() {
    let m = Llama::from_checkpoint(&tiny_checkpoint(6, RopeLayout::RotateHalf, true)).unwrap();
    let toks = tokens(9, 7);
    let full = m
        .forward(&mut m.new_cache(CacheKind::Contiguous), &toks)
        .unwrap();
    let all = m
        .forward_layers(&mut m.new_cache(CacheKind::Contiguous), &toks, 3)
        .unwrap();
    assert_eq!(full, all);
    // The slow matmul twin gives the same bits through the whole model.
    let mut slow = m.clone();
    slow.matmul = MatmulPath::Slow;
    let s = slow
        .forward(&mut slow.new_cache(CacheKind::Contiguous), &toks)
        .unwrap();
    assert_eq!(full, s);
    let one = m
        .forward_layers(&mut m.new_cache(CacheKind::Contiguous), &toks, 1)
        .unwrap();
    assert_ne!(full, one);
    assert!(m
        .forward_layers(&mut m.new_cache(CacheKind::Contiguous), &toks, 4)
        .is_err());
}

/// The largest |a - b| relative to the largest |b|.
fn rel_err(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The reference kernel (attention_naive / attention_paged, f64 accumulation)
/// against run.c's f32 kernel. Both round to f32 at the attention output; the
/// f32 kernel's softmax and weighted sums over <= 40 keys carry relative errors
/// of order 40 * 2^-24 ≈ 2.4e-6, amplified by at most a few through 3 layers of
/// norms and matmuls of width <= 40; 1e-4 leaves a wide margin yet fails on
/// any real bug (a wrong mask, head mapping or rotation changes logits by O(1)).
#[test]
fn reference_kernel_agrees_with_llama2c_kernel() {
    let mut m =
        Llama::from_checkpoint(&tiny_checkpoint(8, RopeLayout::Interleaved, false)).unwrap();
    let toks = tokens(40, 9);
    let fast = m
        .forward(&mut m.new_cache(CacheKind::Contiguous), &toks)
        .unwrap();
    m.attention_kernel = AttentionKernel::Reference;
    for kind in KINDS {
        let mut cache = m.new_cache(kind);
        let mut got = m.forward(&mut cache, &toks[..25]).unwrap();
        for &t in &toks[25..] {
            got.push_row(m.forward(&mut cache, &[t]).unwrap().row(0))
                .unwrap();
        }
        let e = rel_err(&got, &fast);
        assert!(e < 1e-4, "{kind:?}: relative error {e}");
    }
}

/// Permuting each q/k head's rows from interleaved pairs (2i, 2i+1) to
/// rotate-half pairs (i, i + D/2) gives the same model: what the GGUF loader
/// relies on. Only the order of the 4-term score sums changes (f32 rounding).
#[test]
fn rope_layouts_are_a_row_permutation_apart() {
    let ck = tiny_checkpoint(10, RopeLayout::Interleaved, true);
    let mut rh = ck.clone();
    rh.rope_layout = RopeLayout::RotateHalf;
    let d = 4;
    for l in 0..3 {
        for (name, heads) in [("q_proj", 6), ("k_proj", 2)] {
            let key = format!("model.layers.{l}.self_attn.{name}.weight");
            let src = &ck.tensors[&key];
            let dst = rh.tensors.get_mut(&key).unwrap();
            for h in 0..heads {
                for i in 0..d / 2 {
                    for (new, old) in [(i, 2 * i), (i + d / 2, 2 * i + 1)] {
                        let (nr, or) = ((h * d + new) * 24, (h * d + old) * 24);
                        dst.data[nr..nr + 24].copy_from_slice(&src.data[or..or + 24]);
                    }
                }
            }
        }
    }
    let a = Llama::from_checkpoint(&ck).unwrap();
    let b = Llama::from_checkpoint(&rh).unwrap();
    let toks = tokens(20, 11);
    let la = a
        .forward(&mut a.new_cache(CacheKind::Contiguous), &toks)
        .unwrap();
    let lb = b
        .forward(&mut b.new_cache(CacheKind::Contiguous), &toks)
        .unwrap();
    let e = rel_err(&la, &lb);
    assert!(e < 1e-5, "relative error {e}");
    // Without the permutation the models differ: the test can fail.
    let mut wrong = ck.clone();
    wrong.rope_layout = RopeLayout::RotateHalf;
    let c = Llama::from_checkpoint(&wrong).unwrap();
    let lc = c
        .forward(&mut c.new_cache(CacheKind::Contiguous), &toks)
        .unwrap();
    assert!(rel_err(&lc, &la) > 1e-2);
}

#[test]
fn bad_checkpoints_and_inputs_are_errors() {
    let ck = tiny_checkpoint(12, RopeLayout::Interleaved, true);
    let mut missing = ck.clone();
    missing.tensors.remove("model.layers.2.mlp.up_proj.weight");
    let mut wrong = ck.clone();
    wrong
        .tensors
        .get_mut("model.layers.1.self_attn.k_proj.weight")
        .unwrap()
        .shape = vec![24, 8];
    let mut kv = ck.clone();
    kv.config.num_key_value_heads = Some(4);
    let check = |c: &Checkpoint, want: &str| {
        let msg = Llama::from_checkpoint(c).unwrap_err().to_string();
        assert!(msg.contains(want), "`{msg}` lacks `{want}`");
        assert!(msg.contains("tiny.bin"), "`{msg}` lacks the file");
    };
    check(&missing, "model.layers.2.mlp.up_proj.weight");
    check(&wrong, "model.layers.1.self_attn.k_proj.weight");
    check(&kv, "num_key_value_heads");

    let m = Llama::from_checkpoint(&ck).unwrap();
    let mut cache = m.new_cache(CacheKind::Contiguous);
    assert!(m.forward(&mut cache, &[37]).is_err());
    assert!(m.forward(&mut cache, &vec![0; 65]).is_err());
    assert_eq!(cache.len(), 0);
    m.forward(&mut cache, &vec![0; 64]).unwrap();
    assert!(m.forward(&mut cache, &[0]).is_err());
    assert!(m.try_new_cache(CacheKind::Paged { block_size: 0 }).is_err());
}

#[test]
fn observer_sees_every_linear_input() {
    let m = Llama::from_checkpoint(&tiny_checkpoint(13, RopeLayout::Interleaved, true)).unwrap();
    let toks = tokens(5, 14);
    let mut seen = Vec::new();
    let mut obs = |l: usize, p: Proj, x: ndarray::ArrayView2<f32>| seen.push((l, p, x.dim()));
    let mut cache = m.new_cache(CacheKind::Contiguous);
    m.forward_observed(&mut cache, &toks, 3, Some(&mut obs))
        .unwrap();
    assert_eq!(seen.len(), 3 * 7);
    assert!(seen.contains(&(2, Proj::Down, (5, 40))));
    assert!(seen.contains(&(0, Proj::O, (5, 24))));
}

fn stories() -> Option<(Llama, inferlab_models::tokenizer::Llama2cTokenizer)> {
    let p = assets::require(assets::stories260k_model(), "stories260K forward")?;
    let t = assets::require(assets::stories260k_tokenizer(), "stories260K forward")?;
    let m = Llama::from_checkpoint(&load_checkpoint(&p).unwrap()).unwrap();
    let tok = inferlab_models::tokenizer::Llama2cTokenizer::load_with_vocab(&t, 512).unwrap();
    Some((m, tok))
}

/// The assets README's known continuation, and the same tokens on every cache
/// kind and on the reference attention kernel.
#[test]
fn stories260k_greedy_once_upon_a_time() {
    use inferlab_models::tokenizer::Tokenizer;
    let Some((mut m, tok)) = stories() else {
        return;
    };
    let prompt = tok.encode_with("Once upon a time", true, false);
    let run = |m: &Llama, kind| {
        let mut s = Sampler::new(SamplingConfig::GREEDY, 0).unwrap();
        let mut cache = m.new_cache(kind);
        generate(m, &mut cache, &prompt, 200, &mut s, &[1, 2], |_| {})
            .unwrap()
            .0
    };
    let out = run(&m, CacheKind::Contiguous);
    let text = tok.decode(&[&prompt[1..], &out[..]].concat());
    let want = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.";
    assert!(text.starts_with(want), "{text}");
    assert_eq!(run(&m, CacheKind::Paged { block_size: 16 }), out);
    m.attention_kernel = AttentionKernel::Reference;
    let n = 60; // the f64 kernel is slower; the first 60 tokens suffice
    assert_eq!(run(&m, CacheKind::Paged { block_size: 16 })[..n], out[..n]);
}

/// SmolLM2-135M-Instruct (GGUF Q4_1, rotate-half after the loader undoes
/// llama.cpp's q/k permutation, GQA 9/3, tied head): the known greedy answer.
#[test]
fn smollm2_capital_of_france() {
    let Some(p) = assets::require(assets::smollm2_gguf(), "smollm2_capital_of_france") else {
        return;
    };
    let m = Llama::from_checkpoint(&load_checkpoint(&p).unwrap()).unwrap();
    let tok = load_tokenizer(&p, None).unwrap();
    assert_eq!(m.config.rope_layout, RopeLayout::RotateHalf);
    let prompt: Vec<u32> = tok
        .bos()
        .into_iter()
        .chain(tok.encode("The capital of France is"))
        .collect();
    let mut s = Sampler::new(SamplingConfig::GREEDY, 0).unwrap();
    let mut cache = m.new_cache(CacheKind::Paged { block_size: 16 });
    let stops: Vec<u32> = tok.eos().into_iter().collect();
    let (out, _) = generate(&m, &mut cache, &prompt, 4, &mut s, &stops, |_| {}).unwrap();
    let ctx = tok.decode(&prompt);
    let full = tok.decode(&[&prompt[..], &out[..]].concat());
    let cont = &full[ctx.len()..];
    assert!(cont.starts_with(" Paris."), "{cont:?}");
}
