//! Bad-input tests for the GGUF and safetensors loaders: small valid files are
//! built here, corrupted one way per line, and each must give a `ModelsError`
//! naming the file and what is wrong (never a panic, never a huge allocation).

use std::path::{Path, PathBuf};

use crate::gguf::{self, GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};
use crate::safetensors_io::{self as st, StDtype, TensorToWrite};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------

/// A small valid GGUF: some metadata (a string array among it), a Q8_0 and an
/// F32 tensor.
fn small_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", MetaValue::String("llama".into()))
        .kv("x.count", MetaValue::U32(7))
        .kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::String(vec![
                "a".into(),
                "bc".into(),
                "def".into(),
            ])),
        )
        .kv("x.scores", MetaValue::Array(MetaArray::F32(vec![0.5, 1.5])));
    let vals: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
    w.tensor(
        "blk.0.attn_q.weight",
        &[32, 2],
        GgmlType::Q8_0,
        gguf::quant_ref::q8_0(&vals),
    );
    w.tensor(
        "output_norm.weight",
        &[4],
        GgmlType::F32,
        st::f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
    );
    w.to_bytes()
}

/// Position just after the first occurrence of `needle` (a key or tensor name).
fn after(bytes: &[u8], needle: &str) -> usize {
    let n = needle.as_bytes();
    bytes.windows(n.len()).position(|w| w == n).unwrap() + n.len()
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes `bytes` to a temp file, opens it, and expects an error whose text
/// names the file and contains `want`.
fn gguf_case(case: &str, bytes: &[u8], want: &str) {
    let dir = tmp();
    let p = dir.path().join(format!("{case}.gguf"));
    std::fs::write(&p, bytes).unwrap();
    let err = GgufFile::open(&p).map(|f| {
        // Opening validated the header; make every tensor's data be read too.
        for t in f.tensors() {
            let _ = gguf::dequantize(t.ggml_type, f.tensor_bytes(t), t.numel() as usize);
        }
    });
    let e = match err {
        Ok(()) => panic!("{case}: corrupt file opened without error"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains(&p.display().to_string()),
        "{case}: error does not name the file: {e}"
    );
    if std::env::var_os("SHOW_ERRORS").is_some() && !case.starts_with("truncated") {
        eprintln!("{case}: {e}");
    }
    assert!(e.contains(want), "{case}: expected `{want}` in: {e}");
}

#[test]
fn gguf_bad_inputs() {
    let good = small_gguf();
    {
        let dir = tmp();
        let p = dir.path().join("good.gguf");
        std::fs::write(&p, &good).unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(
            f.dequantize("output_norm.weight").unwrap().data,
            [1.0, 2.0, 3.0, 4.0]
        );
    }
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    // Header fields.
    gguf_case(
        "bad_magic",
        &edit(&|b| b[..4].copy_from_slice(b"GGML")),
        "bad magic",
    );
    gguf_case("version_1", &edit(&|b| put_u32(b, 4, 1)), "GGUF version 1");
    gguf_case("version_4", &edit(&|b| put_u32(b, 4, 4)), "GGUF version 4");
    gguf_case(
        "n_tensors_absurd",
        &edit(&|b| put_u64(b, 8, u64::MAX)),
        "n_tensors",
    );
    gguf_case(
        "n_tensors_one_more",
        &edit(&|b| put_u64(b, 8, 3)),
        "tensor info #2",
    );
    gguf_case("n_kv_absurd", &edit(&|b| put_u64(b, 16, 1 << 60)), "n_kv");
    // Metadata.
    let tokens_len = after(&good, "tokenizer.ggml.tokens") + 4 + 4; // value type, element type
    gguf_case(
        "array_len_lies_huge",
        &edit(&|b| put_u64(b, tokens_len, 1 << 40)),
        "tokenizer.ggml.tokens",
    );
    gguf_case(
        "array_len_lies_by_one",
        &edit(&|b| put_u64(b, tokens_len, 4)),
        "",
    );
    let scores_len = after(&good, "x.scores") + 4 + 4;
    gguf_case(
        "f32_array_len_lies",
        &edit(&|b| put_u64(b, scores_len, 1 << 61)),
        "x.scores",
    );
    let value_type = after(&good, "x.count");
    gguf_case(
        "unknown_value_type",
        &edit(&|b| put_u32(b, value_type, 77)),
        "unknown value type 77",
    );
    gguf_case(
        "string_len_lies",
        &edit(&|b| put_u64(b, 24, u64::MAX - 3)),
        "metadata key #0",
    );
    // Tensor infos: name, n_dims u32, ne[n_dims] u64, type u32, offset u64.
    let q = after(&good, "blk.0.attn_q.weight");
    gguf_case("n_dims_zero", &edit(&|b| put_u32(b, q, 0)), "n_dims = 0");
    gguf_case(
        "n_dims_too_many",
        &edit(&|b| put_u32(b, q, 9)),
        "n_dims = 9",
    );
    gguf_case(
        "dims_overflow",
        &edit(&|b| put_u64(b, q + 4 + 8, u64::MAX / 2)),
        "overflow",
    );
    gguf_case(
        "dims_beyond_file",
        &edit(&|b| put_u64(b, q + 4 + 8, 1 << 30)),
        "blk.0.attn_q.weight",
    );
    gguf_case(
        "unknown_ggml_type",
        &edit(&|b| put_u32(b, q + 4 + 16, 99)),
        "unknown ggml type 99",
    );
    gguf_case(
        "row_not_whole_blocks",
        &edit(&|b| put_u64(b, q + 4, 33)),
        "not a multiple of the Q8_0 block size",
    );
    gguf_case(
        "offset_beyond_file",
        &edit(&|b| put_u64(b, q + 4 + 16 + 4, 1 << 20)),
        "blk.0.attn_q.weight",
    );
    gguf_case(
        "offset_overflows",
        &edit(&|b| put_u64(b, q + 4 + 16 + 4, u64::MAX - 31)),
        "blk.0.attn_q.weight",
    );
    gguf_case(
        "offset_misaligned",
        &edit(&|b| put_u64(b, q + 4 + 16 + 4, 3)),
        "not a multiple of the alignment",
    );
    // Truncation at every byte: each cut loses header or tensor data.
    for cut in 0..good.len() {
        gguf_case(&format!("truncated_at_{cut}"), &good[..cut], "");
    }
    // An unsupported (known) type reads, but refuses to dequantize by name.
    let dir = tmp();
    let p = dir.path().join("q4k.gguf");
    let mut w = GgufWriter::new();
    w.tensor("t", &[256], GgmlType::Q4K, vec![0; 144]);
    std::fs::write(&p, w.to_bytes()).unwrap();
    let e = GgufFile::open(&p)
        .unwrap()
        .dequantize("t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("q4k.gguf") && e.contains("Q4_K"), "{e}");
}

#[test]
fn gguf_checkpoint_shape_and_completeness() {
    let (good, _) = crate::gguf::tests::tiny_llama_gguf(true);
    let dir = tmp();
    let check = |case: &str, bytes: &[u8], want: &str| {
        let p = dir.path().join(format!("{case}.gguf"));
        std::fs::write(&p, bytes).unwrap();
        let e = gguf::load_checkpoint(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains(want),
            "{case}: {e}"
        );
    };
    // Metadata says 3 layers; the file has 2.
    let mut b = good.clone();
    let at = after(&b, "llama.block_count") + 4;
    put_u32(&mut b, at, 3);
    check("missing_layer", &b, "model.layers.2.");
    // Metadata says hidden 32: every tensor's shape disagrees.
    let mut b = good.clone();
    let at = after(&b, "llama.embedding_length") + 4;
    put_u32(&mut b, at, 32);
    check("wrong_shape", &b, "but the metadata implies");
    // A required key missing (renamed).
    let mut b = good.clone();
    let at = after(&b, "llama.feed_forward_length") - 6;
    b[at..at + 6].copy_from_slice(b"FORWRD");
    check("missing_key", &b, "llama.feed_forward_length");
}

// ---------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------

/// A safetensors file from a header text and data bytes.
fn st_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn st_case(case: &str, bytes: &[u8], want: &str) {
    let dir = tmp();
    let p = dir.path().join(format!("{case}.safetensors"));
    std::fs::write(&p, bytes).unwrap();
    let e = match st::SafetensorsFile::open(&p) {
        Ok(_) => panic!("{case}: corrupt file opened without error"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains(&p.display().to_string()),
        "{case}: error does not name the file: {e}"
    );
    if std::env::var_os("SHOW_ERRORS").is_some() && !case.starts_with("truncated") {
        eprintln!("{case}: {e}");
    }
    assert!(e.contains(want), "{case}: expected `{want}` in: {e}");
}

#[test]
fn safetensors_bad_inputs() {
    let data = [0u8; 24];
    let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[2,4],"data_offsets":[8,24]}}"#;
    {
        let dir = tmp();
        let p = dir.path().join("ok.safetensors");
        std::fs::write(&p, st_bytes(ok, &data)).unwrap();
        st::SafetensorsFile::open(&p).unwrap();
    }
    let good = st_bytes(ok, &data);
    let case = |name: &str, header: &str, want: &str| st_case(name, &st_bytes(header, &data), want);
    case("not_json", r#"{"a":{"dtype":"F32""#, "not a JSON object");
    case("not_object", r#"[1,2,3]"#, "not a JSON object");
    case(
        "unknown_dtype",
        r#"{"a":{"dtype":"F7","shape":[6],"data_offsets":[0,24]}}"#,
        "unknown dtype `F7`",
    );
    case(
        "no_shape",
        r#"{"a":{"dtype":"F32","data_offsets":[0,24]}}"#,
        "no `shape`",
    );
    case(
        "negative_dim",
        r#"{"a":{"dtype":"F32","shape":[-6],"data_offsets":[0,24]}}"#,
        "non-integer",
    );
    case(
        "offsets_not_pair",
        r#"{"a":{"dtype":"F32","shape":[6],"data_offsets":[0]}}"#,
        "data_offsets",
    );
    case(
        "end_beyond_data",
        r#"{"a":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}}"#,
        "do not lie inside",
    );
    case(
        "begin_after_end",
        r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[24,0]}}"#,
        "do not lie inside",
    );
    case(
        "shape_vs_offsets",
        r#"{"a":{"dtype":"F32","shape":[5],"data_offsets":[0,24]}}"#,
        "needs 20 bytes",
    );
    case(
        "shape_overflow",
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,24]}}"#,
        "overflows",
    );
    case(
        "overlap",
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        "overlap",
    );
    case(
        "gap",
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        "gap",
    );
    case(
        "short_cover",
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        "cover 8 of the 24",
    );
    case(
        "metadata_not_strings",
        r#"{"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}"#,
        "__metadata__.k",
    );
    // Header length field.
    let mut b = good.clone();
    put_u64(&mut b, 0, good.len() as u64 + 100);
    st_case("header_len_beyond_file", &b, "JSON header");
    let mut b = good.clone();
    put_u64(&mut b, 0, u64::MAX);
    st_case("header_len_absurd", &b, "exceeds the format's limit");
    let mut b = good.clone();
    b[8] = 0xff;
    st_case("header_not_utf8", &b, "not UTF-8");
    // Truncation at every byte.
    for cut in 0..good.len() {
        st_case(&format!("truncated_at_{cut}"), &good[..cut], "");
    }
}

#[test]
fn hf_dir_bad_inputs() {
    use crate::safetensors_io::tests::{tiny_config, tiny_tensors};
    let cfg = tiny_config(true);
    let ts = tiny_tensors(&cfg);
    let bytes: Vec<Vec<u8>> = ts.iter().map(|(_, _, v)| st::f32_bytes(v)).collect();
    let write = |dir: &Path,
                 skip: Option<&str>,
                 reshape: Option<(&str, Vec<usize>)>,
                 config: serde_json::Value| {
        let shapes: Vec<Vec<usize>> = ts
            .iter()
            .map(|(n, s, _)| match &reshape {
                Some((name, shape)) if name == n => shape.clone(),
                _ => s.clone(),
            })
            .collect();
        let views: Vec<TensorToWrite> = ts
            .iter()
            .zip(&bytes)
            .zip(&shapes)
            .filter(|(((n, _, _), _), _)| Some(n.as_str()) != skip)
            .map(|(((n, _, _), b), s)| TensorToWrite {
                name: n,
                dtype: StDtype::F32,
                shape: s,
                data: b,
            })
            .collect();
        st::write_hf_dir(dir, &config, &views).unwrap();
    };
    let check = |case: &str, dir: &Path, file: PathBuf, want: &str| {
        let e = st::load_hf_dir(dir).unwrap_err().to_string();
        assert!(
            e.contains(&file.display().to_string()) && e.contains(want),
            "{case}: {e}"
        );
    };
    // gate_proj [12, 8] written as [8, 12]: same bytes, wrong shape for the config.
    let d = tmp();
    write(
        d.path(),
        None,
        Some(("model.layers.1.mlp.gate_proj.weight", vec![8, 12])),
        cfg.to_hf_json(),
    );
    check(
        "wrong_shape",
        d.path(),
        d.path().join("model.safetensors"),
        "config.json implies [12, 8]",
    );
    let d = tmp();
    write(
        d.path(),
        Some("model.layers.0.mlp.up_proj.weight"),
        None,
        cfg.to_hf_json(),
    );
    check(
        "missing_tensor",
        d.path(),
        d.path().to_path_buf(),
        "model.layers.0.mlp.up_proj.weight",
    );
    let d = tmp();
    let mut c = cfg.to_hf_json();
    c.as_object_mut().unwrap().remove("num_hidden_layers");
    write(d.path(), None, None, c);
    check(
        "config_missing_field",
        d.path(),
        d.path().join("config.json"),
        "num_hidden_layers",
    );
    let d = tmp();
    let mut c = cfg.to_hf_json();
    c["num_hidden_layers"] = serde_json::json!(1);
    write(d.path(), None, None, c);
    check(
        "extra_layer_tensors",
        d.path(),
        d.path().join("model.safetensors"),
        "not part of a llama model",
    );
    // Untied config but no lm_head.
    let d = tmp();
    let mut c = cfg.to_hf_json();
    c["tie_word_embeddings"] = serde_json::json!(false);
    write(d.path(), None, None, c);
    check(
        "untied_without_lm_head",
        d.path(),
        d.path().to_path_buf(),
        "lm_head.weight",
    );
    // An index pointing at a shard that lacks the tensor.
    let d = tmp();
    write(d.path(), None, None, cfg.to_hf_json());
    std::fs::rename(
        d.path().join("model.safetensors"),
        d.path().join("s1.safetensors"),
    )
    .unwrap();
    let mut map = serde_json::Map::new();
    for (n, _, _) in &ts {
        map.insert(n.clone(), "s1.safetensors".into());
    }
    map.insert(
        "model.layers.0.self_attn.q_proj.bias".into(),
        "s1.safetensors".into(),
    );
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        serde_json::json!({ "weight_map": map }).to_string(),
    )
    .unwrap();
    check(
        "index_lies",
        d.path(),
        d.path().join("s1.safetensors"),
        "q_proj.bias",
    );
    // An index naming a shard outside the directory.
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        r#"{"weight_map":{"model.norm.weight":"../x.safetensors"}}"#,
    )
    .unwrap();
    check(
        "index_escapes",
        d.path(),
        d.path().join("model.safetensors.index.json"),
        "not a plain file name",
    );
}

#[test]
fn checkpoint_load_dispatches_by_kind() {
    use crate::checkpoint::load;
    use crate::CheckpointFormat;
    let d = tmp();
    let g = d.path().join("m.gguf");
    std::fs::write(&g, crate::gguf::tests::tiny_llama_gguf(false).0).unwrap();
    assert_eq!(load(&g).unwrap().format, CheckpointFormat::Gguf);
    let cfg = crate::safetensors_io::tests::tiny_config(true);
    let ts = crate::safetensors_io::tests::tiny_tensors(&cfg);
    let bytes: Vec<Vec<u8>> = ts.iter().map(|(_, _, v)| st::f32_bytes(v)).collect();
    let views: Vec<TensorToWrite> = ts
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| TensorToWrite {
            name: n,
            dtype: StDtype::F32,
            shape: s,
            data: b,
        })
        .collect();
    let hf = d.path().join("hf");
    st::write_hf_dir(&hf, &cfg.to_hf_json(), &views).unwrap();
    assert_eq!(load(&hf).unwrap().format, CheckpointFormat::Safetensors);
    assert_eq!(
        load(&hf.join("model.safetensors")).unwrap().format,
        CheckpointFormat::Safetensors
    );
    if let Some(p) = crate::assets::require(
        crate::assets::stories260k_model(),
        "checkpoint_load_dispatches_by_kind",
    ) {
        assert_eq!(load(&p).unwrap().format, CheckpointFormat::Llama2c);
    }
    let other = d.path().join("m.onnx");
    std::fs::write(&other, b"x").unwrap();
    let e = load(&other).unwrap_err().to_string();
    assert!(e.contains("m.onnx") && e.contains("unsupported"), "{e}");
}
