use super::*;
use proptest::prelude::*;

/// The slow twin of [`dequantize`]: element `i` computed on its own from the
/// block layout (block index, then position inside the block), written
/// independently of the fast loop.
fn dequant_one(ty: GgmlType, b: &[u8], i: usize) -> f32 {
    let blk = i / 32;
    let j = i % 32;
    match ty {
        GgmlType::Q8_0 => {
            let base = blk * 34;
            f16_at(b, base) * (b[base + 2 + j] as i8) as f32
        }
        GgmlType::Q4_0 => {
            let base = blk * 18;
            let byte = b[base + 2 + (j % 16)];
            let q = if j < 16 { byte & 0x0f } else { byte >> 4 };
            f16_at(b, base) * (q as f32 - 8.0)
        }
        GgmlType::Q4_1 => {
            let base = blk * 20;
            let byte = b[base + 4 + (j % 16)];
            let q = if j < 16 { byte & 0x0f } else { byte >> 4 };
            f16_at(b, base) * q as f32 + f16_at(b, base + 2)
        }
        _ => unreachable!(),
    }
}

fn check_fast_vs_slow(ty: GgmlType, bytes: &[u8]) {
    let n = bytes.len() / ty.type_size() as usize * 32;
    let fast = dequantize(ty, bytes, n).unwrap();
    for (i, &f) in fast.iter().enumerate() {
        let s = dequant_one(ty, bytes, i);
        assert_eq!(f.to_bits(), s.to_bits(), "{ty} element {i}");
    }
}

#[test]
fn hand_made_blocks() {
    // Q8_0: d = 0.5, q = -3, 0, 7, ...
    let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
    let qs: Vec<i8> = (0..32).map(|j| j as i8 - 16).collect();
    b.extend(qs.iter().map(|&q| q as u8));
    let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
    for j in 0..32 {
        assert_eq!(y[j], 0.5 * (j as f32 - 16.0));
    }
    // Q4_0: d = 2, byte j = lo (j%16) | hi ((15-j)%16) << 4.
    let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
    for j in 0..16 {
        assert_eq!(y[j], 2.0 * (j as f32 - 8.0), "low nibble {j}");
        assert_eq!(y[j + 16], 2.0 * ((15 - j) as f32 - 8.0), "high nibble {j}");
    }
    // Q4_1: d = 0.25, m = -1.
    let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
    b.extend(f16::from_f32(-1.0).to_le_bytes());
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
    for j in 0..16 {
        assert_eq!(y[j], 0.25 * j as f32 - 1.0);
        assert_eq!(y[j + 16], 0.25 * (15 - j) as f32 - 1.0);
    }
    // F16 / BF16 / F32
    let v = [1.5f32, -2.25, 0.0, 65504.0];
    let b16: Vec<u8> = v
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect();
    assert_eq!(dequantize(GgmlType::F16, &b16, 4).unwrap(), v);
    let bb: Vec<u8> = v[..3]
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect();
    assert_eq!(dequantize(GgmlType::Bf16, &bb, 3).unwrap(), v[..3]);
    let b32: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(dequantize(GgmlType::F32, &b32, 4).unwrap(), v);
}

#[test]
fn unsupported_and_wrong_length() {
    let e = dequantize(GgmlType::Q4K, &[0; 144], 256).unwrap_err();
    assert!(e.contains("Q4_K"), "{e}");
    let e = dequantize(GgmlType::Q8_0, &[0; 33], 32).unwrap_err();
    assert!(e.contains("33 bytes"), "{e}");
}

#[test]
fn permutation_by_hand() {
    // 2 heads of D = 4: converter puts HF rows (0,2,1,3) of each head in order.
    let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
    let g = permute_qk_rows(&hf, 2, 1);
    assert_eq!(g, [0., 2., 1., 3., 4., 6., 5., 7.]);
    assert_eq!(unpermute_qk_rows(&g, 2, 1), hf);
}

fn block_data(n_blocks: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-4.0f32..4.0, n_blocks * 32)
}

proptest! {
    #[test]
    fn fast_dequant_equals_slow_twin(x in (1usize..5).prop_flat_map(block_data)) {
        check_fast_vs_slow(GgmlType::Q8_0, &quant_ref::q8_0(&x));
        check_fast_vs_slow(GgmlType::Q4_0, &quant_ref::q4_0(&x));
        check_fast_vs_slow(GgmlType::Q4_1, &quant_ref::q4_1(&x));
    }

    /// Round trip through llama.cpp's reference quantizers. Q8_0 error: at most
    /// d/2 from rounding x/d, plus |q| <= 127 times the f16 rounding of d
    /// (relative 2^-11): 127 * d * 2^-11 ~ 0.062 d; so 0.57 d bounds it.
    /// Q4_1: (x-m)/d rounded (d/2), plus 15 * d * 2^-11 for d's rounding and
    /// |m| * 2^-11 for m's rounding.
    #[test]
    fn quantize_dequantize_error_bounds(x in block_data(2)) {
        let y = dequantize(GgmlType::Q8_0, &quant_ref::q8_0(&x), x.len()).unwrap();
        for (blk_x, blk_y) in x.chunks(32).zip(y.chunks(32)) {
            let d = blk_x.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            for (a, b) in blk_x.iter().zip(blk_y) {
                prop_assert!((a - b).abs() <= 0.57 * d + 1e-7, "{a} vs {b}, d = {d}");
            }
        }
        let y = dequantize(GgmlType::Q4_1, &quant_ref::q4_1(&x), x.len()).unwrap();
        for (blk_x, blk_y) in x.chunks(32).zip(y.chunks(32)) {
            let min = blk_x.iter().cloned().fold(f32::INFINITY, f32::min);
            let max = blk_x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let tol = 0.5 * d + 15.0 * d / 2048.0 + min.abs() / 2048.0 + 1e-6;
            for (a, b) in blk_x.iter().zip(blk_y) {
                prop_assert!((a - b).abs() <= tol, "{a} vs {b}, d = {d}");
            }
        }
    }

    #[test]
    fn unpermute_inverts_permute(heads in 1usize..5, half in 1usize..5, row_len in 1usize..4) {
        let n = heads * 2 * half * row_len;
        let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
        prop_assert_eq!(unpermute_qk_rows(&permute_qk_rows(&x, heads, row_len), heads, row_len), x.clone());
        prop_assert_eq!(permute_qk_rows(&unpermute_qk_rows(&x, heads, row_len), heads, row_len), x);
    }
}

#[test]
fn metadata_of_every_type_round_trips() {
    let kvs = vec![
        ("a.u8", MetaValue::U8(200)),
        ("a.i8", MetaValue::I8(-5)),
        ("a.u16", MetaValue::U16(60000)),
        ("a.i16", MetaValue::I16(-30000)),
        ("a.u32", MetaValue::U32(4_000_000_000)),
        ("a.i32", MetaValue::I32(-2_000_000_000)),
        ("a.f32", MetaValue::F32(1.25)),
        ("a.bool", MetaValue::Bool(true)),
        ("a.str", MetaValue::String("héllo".into())),
        ("a.u64", MetaValue::U64(u64::MAX)),
        ("a.i64", MetaValue::I64(i64::MIN)),
        ("a.f64", MetaValue::F64(-0.1)),
        ("b.u8s", MetaValue::Array(MetaArray::U8(vec![1, 2, 3]))),
        ("b.i8s", MetaValue::Array(MetaArray::I8(vec![-1, 2]))),
        ("b.u16s", MetaValue::Array(MetaArray::U16(vec![1, 65535]))),
        ("b.i16s", MetaValue::Array(MetaArray::I16(vec![-1]))),
        ("b.u32s", MetaValue::Array(MetaArray::U32(vec![7]))),
        ("b.i32s", MetaValue::Array(MetaArray::I32(vec![-7, 8]))),
        ("b.f32s", MetaValue::Array(MetaArray::F32(vec![0.5, -0.5]))),
        (
            "b.bools",
            MetaValue::Array(MetaArray::Bool(vec![true, false])),
        ),
        (
            "b.strs",
            MetaValue::Array(MetaArray::String(vec!["x".into(), "".into()])),
        ),
        ("b.u64s", MetaValue::Array(MetaArray::U64(vec![1 << 40]))),
        ("b.i64s", MetaValue::Array(MetaArray::I64(vec![-(1 << 40)]))),
        ("b.f64s", MetaValue::Array(MetaArray::F64(vec![1e300]))),
        (
            "b.nested",
            MetaValue::Array(MetaArray::Array(vec![
                MetaArray::U32(vec![1, 2]),
                MetaArray::U32(vec![]),
            ])),
        ),
        ("b.empty", MetaValue::Array(MetaArray::String(vec![]))),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &kvs {
        w.kv(k, v.clone());
    }
    w.tensor("t", &[4], GgmlType::F32, vec![0; 16]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, w.to_bytes()).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.metadata().len(), kvs.len());
    for (k, v) in &kvs {
        assert_eq!(f.get(k), Some(v), "{k}");
    }
    assert_eq!(f.data_offset() % 32, 0);
    assert_eq!(f.tensors().len(), 1);
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = GgufWriter::new();
    w.kv("general.alignment", MetaValue::U32(64));
    w.tensor(
        "a",
        &[3],
        GgmlType::F32,
        [1f32, 2., 3.]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    );
    w.tensor(
        "b",
        &[2],
        GgmlType::F32,
        [4f32, 5.].iter().flat_map(|x| x.to_le_bytes()).collect(),
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, w.to_bytes()).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor_info("b").unwrap().offset, 64);
    assert_eq!(f.dequantize("a").unwrap().data, [1., 2., 3.]);
    assert_eq!(f.dequantize("b").unwrap().data, [4., 5.]);
}

/// A tiny llama: hidden 64, 2 layers, 4 heads over 2 KV heads (head_dim 16),
/// ffn 96, vocab 32. Tensors are written from known HF-layout values, q/k
/// permuted as the converter does; linear weights as Q8_0 (64 columns = 2 blocks).
pub(crate) fn tiny_llama_gguf(tied: bool) -> (Vec<u8>, BTreeMap<String, Vec<f32>>) {
    let (h, layers, heads, kvh, ff, vocab) = (64u64, 2u64, 4u64, 2u64, 96u64, 32u64);
    let hd = h / heads;
    let mut w = GgufWriter::new();
    w.kv("general.architecture", MetaValue::String("llama".into()))
        .kv("llama.embedding_length", MetaValue::U32(h as u32))
        .kv("llama.block_count", MetaValue::U32(layers as u32))
        .kv("llama.feed_forward_length", MetaValue::U32(ff as u32))
        .kv("llama.attention.head_count", MetaValue::U32(heads as u32))
        .kv("llama.attention.head_count_kv", MetaValue::U32(kvh as u32))
        .kv("llama.context_length", MetaValue::U32(128))
        .kv("llama.rope.freq_base", MetaValue::F32(10000.0))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        )
        .kv("llama.vocab_size", MetaValue::U32(vocab as u32));
    let mut want = BTreeMap::new();
    let mut seed = 1u32;
    let mut values = |n: u64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((seed >> 8) as f32 / (1u32 << 24) as f32) - 0.5
            })
            .collect()
    };
    let mut add = |w: &mut GgufWriter,
                   gname: &str,
                   hfname: &str,
                   rows: u64,
                   cols: u64,
                   perm: Option<u64>,
                   vals: Vec<f32>| {
        // Store what the dequantizer will give back, so the test can compare exactly.
        let (ty, bytes) = if cols % 32 == 0 && rows > 1 {
            let q = quant_ref::q8_0(&vals);
            (GgmlType::Q8_0, q)
        } else {
            (
                GgmlType::F32,
                vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        };
        let deq = dequantize(ty, &bytes, vals.len()).unwrap();
        // deq is in HF order; the file holds it permuted.
        let stored = match perm {
            Some(hh) => permute_qk_rows(&deq, hh as usize, cols as usize),
            None => deq.clone(),
        };
        let bytes = if ty == GgmlType::Q8_0 {
            // Re-quantizing dequantized Q8_0 values reproduces them exactly only
            // in general not; so permute the encoded blocks instead (rows are
            // whole blocks since cols % 32 == 0).
            let bpr = (cols / 32 * 34) as usize;
            let rows_bytes: Vec<&[u8]> = bytes.chunks(bpr).collect();
            let idx: Vec<f32> = (0..rows).map(|r| r as f32).collect();
            let order = match perm {
                Some(hh) => permute_qk_rows(&idx, hh as usize, 1),
                None => idx,
            };
            order
                .iter()
                .flat_map(|&r| rows_bytes[r as usize].to_vec())
                .collect()
        } else {
            stored.iter().flat_map(|x| x.to_le_bytes()).collect()
        };
        let ne: Vec<u64> = if rows == 1 {
            vec![cols]
        } else {
            vec![cols, rows]
        };
        w.tensor(gname, &ne, ty, bytes);
        want.insert(hfname.to_string(), deq);
    };
    add(
        &mut w,
        "token_embd.weight",
        "model.embed_tokens.weight",
        vocab,
        h,
        None,
        values(vocab * h),
    );
    for l in 0..layers {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        let m = |s: &str| format!("model.layers.{l}.{s}.weight");
        add(
            &mut w,
            &b("attn_norm"),
            &m("input_layernorm"),
            1,
            h,
            None,
            values(h),
        );
        add(
            &mut w,
            &b("attn_q"),
            &m("self_attn.q_proj"),
            heads * hd,
            h,
            Some(heads),
            values(heads * hd * h),
        );
        add(
            &mut w,
            &b("attn_k"),
            &m("self_attn.k_proj"),
            kvh * hd,
            h,
            Some(kvh),
            values(kvh * hd * h),
        );
        add(
            &mut w,
            &b("attn_v"),
            &m("self_attn.v_proj"),
            kvh * hd,
            h,
            None,
            values(kvh * hd * h),
        );
        add(
            &mut w,
            &b("attn_output"),
            &m("self_attn.o_proj"),
            h,
            heads * hd,
            None,
            values(h * h),
        );
        add(
            &mut w,
            &b("ffn_norm"),
            &m("post_attention_layernorm"),
            1,
            h,
            None,
            values(h),
        );
        add(
            &mut w,
            &b("ffn_gate"),
            &m("mlp.gate_proj"),
            ff,
            h,
            None,
            values(ff * h),
        );
        add(
            &mut w,
            &b("ffn_up"),
            &m("mlp.up_proj"),
            ff,
            h,
            None,
            values(ff * h),
        );
        add(
            &mut w,
            &b("ffn_down"),
            &m("mlp.down_proj"),
            h,
            ff,
            None,
            values(h * ff),
        );
    }
    add(
        &mut w,
        "output_norm.weight",
        "model.norm.weight",
        1,
        h,
        None,
        values(h),
    );
    if !tied {
        add(
            &mut w,
            "output.weight",
            "lm_head.weight",
            vocab,
            h,
            None,
            values(vocab * h),
        );
    }
    (w.to_bytes(), want)
}

#[test]
fn tiny_llama_loads_in_hf_layout() {
    for tied in [true, false] {
        let (bytes, want) = tiny_llama_gguf(tied);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        std::fs::write(&p, bytes).unwrap();
        let ck = load_checkpoint(&p).unwrap();
        assert_eq!(ck.rope_layout, RopeLayout::RotateHalf);
        assert_eq!(ck.config.tie_word_embeddings, tied);
        assert_eq!(ck.config.num_kv_heads(), 2);
        assert_eq!(ck.config.head_dim(), 16);
        assert_eq!(ck.tensors.len(), want.len());
        for (name, data) in &want {
            assert_eq!(&ck.tensors[name].data, data, "{name}");
        }
        assert_eq!(
            ck.tensors["model.layers.1.self_attn.k_proj.weight"].shape,
            [32, 64]
        );
    }
}

#[test]
fn smollm2_real_file() {
    let Some(p) = crate::assets::require(crate::assets::smollm2_gguf(), "gguf::smollm2_real_file")
    else {
        return;
    };
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    let c = f.model_config().unwrap();
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_kv_heads(), c.head_dim()),
        (9, 3, 64)
    );
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!(c.rope_theta, 100000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-12);
    assert!(c.tie_word_embeddings);
    // 9 tensors per layer + token_embd + output_norm (no output.weight: tied).
    assert_eq!(f.tensors().len(), 30 * 9 + 2);
    let count = |t: GgmlType| f.tensors().iter().filter(|i| i.ggml_type == t).count();
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(count(GgmlType::Q8_0), 1);
    assert_eq!(count(GgmlType::F32), 61);
    // The real Q4_1 and Q8_0 data: fast dequantizer equals the slow twin.
    for name in ["blk.0.attn_q.weight", "token_embd.weight"] {
        let info = f.tensor_info(name).unwrap();
        check_fast_vs_slow(info.ggml_type, f.tensor_bytes(info));
    }
    let ck = f.to_checkpoint().unwrap();
    assert_eq!(ck.tensors.len(), 272);
    assert_eq!(ck.tensors["model.embed_tokens.weight"].shape, [49152, 576]);
    assert_eq!(
        ck.tensors["model.layers.29.self_attn.k_proj.weight"].shape,
        [192, 576]
    );
    assert_eq!(
        ck.tensors["model.layers.0.mlp.down_proj.weight"].shape,
        [576, 1536]
    );
    assert!(!ck.tensors.contains_key("lm_head.weight"));
    // q rows are the converter's permutation undone: re-permuting gives the file's rows.
    let q_file = f.dequantize("blk.3.attn_q.weight").unwrap();
    let q_hf = &ck.tensors["model.layers.3.self_attn.q_proj.weight"];
    assert_ne!(q_file.data, q_hf.data);
    assert_eq!(permute_qk_rows(&q_hf.data, 9, 576), q_file.data);
    for t in ck.tensors.values() {
        assert!(t.data.iter().all(|x| x.is_finite()));
    }
}

/// Why the un-permutation is the right way round: llama.cpp applies RoPE to
/// adjacent pairs (2i, 2i+1) of the GGUF rows, HF to (i, i + D/2) of its rows,
/// both with frequency base^(-2i/D). With W_gguf = permute(W_hf), interleaved
/// RoPE of W_gguf x must equal permute(rotate-half RoPE of W_hf x) for every
/// position, and q.k scores must agree. D = 16 (the permutation is not an
/// involution for D >= 8, so a reversed direction would fail).
#[test]
fn permutation_maps_interleaved_rope_to_rotate_half() {
    let (heads, d, cols) = (2usize, 16usize, 5usize);
    let rows = heads * d;
    let w_hf: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.7).sin()).collect();
    let matvec = |w: &[f32]| -> Vec<f64> {
        (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[c] as f64)
                    .sum()
            })
            .collect()
    };
    let freq = |i: usize| 10000f64.powf(-2.0 * i as f64 / d as f64);
    let rope_interleaved = |v: &[f64], pos: f64| -> Vec<f64> {
        let mut o = v.to_vec();
        for h in 0..heads {
            for i in 0..d / 2 {
                let (a, b) = (v[h * d + 2 * i], v[h * d + 2 * i + 1]);
                let (s, c) = (pos * freq(i)).sin_cos();
                o[h * d + 2 * i] = a * c - b * s;
                o[h * d + 2 * i + 1] = a * s + b * c;
            }
        }
        o
    };
    let rope_half = |v: &[f64], pos: f64| -> Vec<f64> {
        let mut o = v.to_vec();
        for h in 0..heads {
            for i in 0..d / 2 {
                let (a, b) = (v[h * d + i], v[h * d + i + d / 2]);
                let (s, c) = (pos * freq(i)).sin_cos();
                o[h * d + i] = a * c - b * s;
                o[h * d + i + d / 2] = a * s + b * c;
            }
        }
        o
    };
    let w_gguf = permute_qk_rows(&w_hf, heads, cols);
    assert_eq!(unpermute_qk_rows(&w_gguf, heads, cols), w_hf);
    for pos in [0.0, 1.0, 7.0, 1000.0] {
        let g = rope_interleaved(&matvec(&w_gguf), pos);
        let h = rope_half(&matvec(&w_hf), pos);
        let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
        let hp: Vec<f64> = permute_qk_rows(&h32, heads, 1)
            .iter()
            .map(|&v| v as f64)
            .collect();
        for (a, b) in g.iter().zip(&hp) {
            // hp went through f32: compare at f32 resolution of the values (|v| < 20).
            assert!((a - b).abs() < 1e-5, "pos {pos}: {a} vs {b}");
        }
        // Scores between two positions are the same either way.
        let g2 = rope_interleaved(&matvec(&w_gguf), pos + 3.0);
        let h2 = rope_half(&matvec(&w_hf), pos + 3.0);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        assert!((dot(&g, &g2) - dot(&h, &h2)).abs() < 1e-9 * dot(&h, &h).abs().max(1.0));
    }
    // The wrong direction fails: un-permuting instead of permuting breaks it.
    let wrong = unpermute_qk_rows(&w_hf, heads, cols);
    let g = rope_interleaved(&matvec(&wrong), 7.0);
    let h = rope_half(&matvec(&w_hf), 7.0);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let g2 = rope_interleaved(&matvec(&wrong), 10.0);
    let h2 = rope_half(&matvec(&w_hf), 10.0);
    assert!((dot(&g, &g2) - dot(&h, &h2)).abs() > 1e-3);
}
