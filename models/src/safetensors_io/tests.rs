use super::*;

/// A tiny Llama config: hidden 8, 2 layers, 2 heads over 1 KV head, ffn 12, vocab 10.
pub(crate) fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        model_type: "llama".into(),
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: Some(1),
        head_dim: None,
        vocab_size: 10,
        max_position_embeddings: 32,
        rope_theta: 10000.0,
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
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// Every tensor of `cfg` with deterministic values, as (name, shape, values).
pub(crate) fn tiny_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !cfg.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for l in 0..cfg.num_hidden_layers {
        for p in [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            names.push(format!("model.layers.{l}.{p}"));
        }
    }
    names
        .into_iter()
        .enumerate()
        .map(|(k, n)| {
            let shape = expected_shape(cfg, &n).unwrap();
            let numel: usize = shape.iter().product();
            // Values exact in bf16 (8 significant bits), so every dtype round-trips.
            let vals = (0..numel)
                .map(|i| ((i * 7 + k * 3) % 64) as f32 / 16.0 - 2.0)
                .collect();
            (n, shape, vals)
        })
        .collect()
}

fn encode(vals: &[f32], dtype: StDtype) -> Vec<u8> {
    match dtype {
        StDtype::F32 => f32_bytes(vals),
        StDtype::F16 => f16_bytes(vals),
        StDtype::BF16 => bf16_bytes(vals),
        _ => unreachable!(),
    }
}

#[test]
fn hf_dir_round_trip_single_and_sharded() {
    for tied in [true, false] {
        let cfg = tiny_config(tied);
        let ts = tiny_tensors(&cfg);
        let dtypes = [StDtype::F32, StDtype::F16, StDtype::BF16];
        let bytes: Vec<Vec<u8>> = ts
            .iter()
            .enumerate()
            .map(|(i, (_, _, v))| encode(v, dtypes[i % 3]))
            .collect();
        let views: Vec<TensorToWrite> = ts
            .iter()
            .zip(&bytes)
            .enumerate()
            .map(|(i, ((n, s, _), b))| TensorToWrite {
                name: n,
                dtype: dtypes[i % 3],
                shape: s,
                data: b,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        write_hf_dir(dir.path(), &cfg.to_hf_json(), &views).unwrap();
        let ck = load_hf_dir(dir.path()).unwrap();
        assert_eq!(ck.config, cfg);
        assert_eq!(ck.format, CheckpointFormat::Safetensors);
        assert_eq!(ck.tensors.len(), ts.len());
        for (n, s, v) in &ts {
            assert_eq!(&ck.tensors[n].shape, s, "{n}");
            assert_eq!(&ck.tensors[n].data, v, "{n}");
        }
        // Sharded: split the tensors over two files and an index.
        let sdir = tempfile::tempdir().unwrap();
        let (a, b) = views.split_at(views.len() / 2);
        write_safetensors(
            &sdir.path().join("model-00001-of-00002.safetensors"),
            a,
            &BTreeMap::new(),
        )
        .unwrap();
        write_safetensors(
            &sdir.path().join("model-00002-of-00002.safetensors"),
            b,
            &BTreeMap::new(),
        )
        .unwrap();
        let mut map = serde_json::Map::new();
        for t in a {
            map.insert(t.name.into(), "model-00001-of-00002.safetensors".into());
        }
        for t in b {
            map.insert(t.name.into(), "model-00002-of-00002.safetensors".into());
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(
            sdir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        std::fs::write(
            sdir.path().join("config.json"),
            cfg.to_hf_json().to_string(),
        )
        .unwrap();
        let ck2 = load_hf_dir(sdir.path()).unwrap();
        assert_eq!(ck2.tensors, ck.tensors);
    }
}

#[test]
fn writer_output_is_read_by_the_safetensors_crate_and_back() {
    let q: Vec<i32> = vec![-1, 0, 7, i32::MAX, i32::MIN, 3];
    let qb = i32_bytes(&q);
    let s = f16_bytes(&[0.5, -0.25]);
    let f = f32_bytes(&[1.0, 2.0, 3.0]);
    let views = [
        TensorToWrite {
            name: "w.qweight",
            dtype: StDtype::I32,
            shape: &[2, 3],
            data: &qb,
        },
        TensorToWrite {
            name: "w.scales",
            dtype: StDtype::F16,
            shape: &[2],
            data: &s,
        },
        TensorToWrite {
            name: "b",
            dtype: StDtype::F32,
            shape: &[3],
            data: &f,
        },
    ];
    let meta: BTreeMap<String, String> = [
        ("format".to_string(), "pt".to_string()),
        ("bits".into(), "4".into()),
    ]
    .into();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.safetensors");
    write_safetensors(&p, &views, &meta).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    // Deterministic: the same call gives the same bytes.
    let p2 = dir.path().join("q2.safetensors");
    write_safetensors(&p2, &views, &meta).unwrap();
    assert_eq!(std::fs::read(&p2).unwrap(), bytes);
    // Independent reader: the safetensors crate.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let qw = st.tensor("w.qweight").unwrap();
    assert_eq!(qw.dtype(), StDtype::I32);
    assert_eq!(qw.shape(), [2, 3]);
    assert_eq!(qw.data(), &qb[..]);
    assert_eq!(st.tensor("w.scales").unwrap().data(), &s[..]);
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(m.metadata().as_ref().unwrap()["bits"], "4");
    // Our reader.
    let ours = SafetensorsFile::open(&p).unwrap();
    assert_eq!(ours.metadata(), &meta);
    assert_eq!(ours.bytes(&ours.tensors()["w.qweight"]), &qb[..]);
    assert_eq!(ours.to_f32("b").unwrap().data, [1.0, 2.0, 3.0]);
    assert_eq!(ours.to_f32("w.scales").unwrap().data, [0.5, -0.25]);
    assert!(ours
        .to_f32("w.qweight")
        .unwrap_err()
        .to_string()
        .contains("I32"));
    // And the crate's writer output through our reader.
    let crate_bytes = safetensors::serialize(views.iter().map(|t| (t.name, *t)), &None).unwrap();
    let p3 = dir.path().join("c.safetensors");
    std::fs::write(&p3, crate_bytes).unwrap();
    let theirs = SafetensorsFile::open(&p3).unwrap();
    assert_eq!(theirs.bytes(&theirs.tensors()["w.qweight"]), &qb[..]);
    assert_eq!(theirs.to_f32("b").unwrap().data, [1.0, 2.0, 3.0]);
}

#[test]
fn writer_refuses_bad_tensors_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let d = f32_bytes(&[1.0, 2.0]);
    let check = |views: &[TensorToWrite], want: &str| {
        let e = write_safetensors(&p, views, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.safetensors") && e.contains(want), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing written"
        );
    };
    check(
        &[TensorToWrite {
            name: "a",
            dtype: StDtype::F32,
            shape: &[3],
            data: &d,
        }],
        "8 bytes of data for shape [3]",
    );
    check(
        &[
            TensorToWrite {
                name: "a",
                dtype: StDtype::F32,
                shape: &[2],
                data: &d,
            },
            TensorToWrite {
                name: "a",
                dtype: StDtype::F32,
                shape: &[2],
                data: &d,
            },
        ],
        "twice",
    );
    // A failed rename (target is a directory) removes the temporary file.
    std::fs::create_dir(&p).unwrap();
    let e = write_safetensors(
        &p,
        &[TensorToWrite {
            name: "a",
            dtype: StDtype::F32,
            shape: &[2],
            data: &d,
        }],
        &BTreeMap::new(),
    );
    assert!(e.is_err());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only the directory"
    );
}

#[test]
fn real_config_json_is_read_leniently() {
    // Meta-Llama-3-8B's config.json as published (extra fields included).
    let text = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
      "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
      "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
      "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
      "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.40.0.dev0", "use_cache": true, "vocab_size": 128256
    }"#;
    let v: Value = serde_json::from_str(text).unwrap();
    let cfg = ModelConfig::from_hf_json(&v, Path::new("config.json")).unwrap();
    let cat = crate::catalog::model("llama-3-8b").unwrap().config;
    assert_eq!(cfg.num_params(), cat.num_params());
    assert_eq!(cfg.num_kv_heads(), 8);
    // Llama 3.1 lists several EOS ids: the first is kept.
    let mut v2 = v.clone();
    v2["eos_token_id"] = serde_json::json!([128001, 128008, 128009]);
    assert_eq!(
        ModelConfig::from_hf_json(&v2, Path::new("c.json"))
            .unwrap()
            .eos_token_id,
        Some(128001)
    );
    // A known field of the wrong type is an error naming file and field.
    let check = |key: &str, val: Value, want: &str| {
        let mut b = v.clone();
        b[key] = val;
        let e = ModelConfig::from_hf_json(&b, Path::new("bad/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad/config.json") && e.contains(key) && e.contains(want),
            "{e}"
        );
    };
    check("hidden_size", serde_json::json!("4096"), "integer");
    check(
        "num_key_value_heads",
        serde_json::json!(5),
        "does not divide",
    );
    check("rope_theta", serde_json::json!(-1.0), "positive");
    check("tie_word_embeddings", serde_json::json!(1), "true/false");
}
