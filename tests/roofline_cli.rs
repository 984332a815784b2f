//! `inferlab memory` and `inferlab roofline` end to end: golden tables (insta
//! snapshots under `golden/`), the SVG file, and clear errors on bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn inferlab(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_inferlab"))
        .args(args)
        .output()
        .expect("run inferlab");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn ok(args: &[&str]) -> String {
    let (success, stdout, stderr) = inferlab(args);
    assert!(success, "inferlab {args:?} failed: {stderr}");
    stdout
}

fn fails(args: &[&str], needle: &str) {
    let (success, _, stderr) = inferlab(args);
    assert!(!success, "inferlab {args:?} should fail");
    assert!(
        stderr.contains(needle),
        "inferlab {args:?}: `{needle}` not in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A descriptor written for the test (published config.json shapes), so the
/// test does not depend on which models the catalog holds.
fn descriptor(dir: &Path, name: &str, config: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    let text = format!(
        "[meta]\nname = \"{name}\"\npublished_params = 1.0\nsource = \"test\"\n\n[config]\n\
         model_type = \"llama\"\n{config}"
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn llama2_7b(dir: &Path) -> PathBuf {
    descriptor(
        dir,
        "llama-2-7b",
        "hidden_size = 4096\nintermediate_size = 11008\nnum_hidden_layers = 32\n\
         num_attention_heads = 32\nvocab_size = 32000\nmax_position_embeddings = 4096\n",
    )
}

fn llama31_405b(dir: &Path) -> PathBuf {
    descriptor(
        dir,
        "llama-3.1-405b",
        "hidden_size = 16384\nintermediate_size = 53248\nnum_hidden_layers = 126\n\
         num_attention_heads = 128\nnum_key_value_heads = 8\nvocab_size = 128256\n\
         max_position_embeddings = 131072\n",
    )
}

macro_rules! golden {
    ($name:expr, $text:expr) => {
        insta::with_settings!({snapshot_path => "../golden", prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!($name, $text);
        })
    };
}

#[test]
fn memory_golden_llama3_8b_h100() {
    let out = ok(&[
        "memory",
        "--model",
        "llama-3-8b",
        "--hardware",
        "H100-SXM5-80GB",
    ]);
    golden!("memory_llama3_8b_h100", out);
}

#[test]
fn memory_golden_llama2_7b_fp16_a100_80gb() {
    let dir = tempfile::tempdir().unwrap();
    let m = llama2_7b(dir.path());
    let out = ok(&[
        "memory",
        "--model",
        m.to_str().unwrap(),
        "--hardware",
        "A100-SXM4-80GB",
        "--dtype",
        "f16",
    ]);
    // vLLM's formula by hand: see sim::memory's test of the same case.
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("blocks") && l.trim_end().ends_with(" 7512")),
        "{out}"
    );
    golden!("memory_llama2_7b_f16_a100_80gb", out);
}

#[test]
fn memory_quantized_and_tensor_parallel() {
    let out = ok(&[
        "memory",
        "--quant",
        "gptq-4bit-g128",
        "--tp",
        "2",
        "--block-size",
        "32",
    ]);
    assert!(out.contains("quant gptq-4bit-g128"), "{out}");
    assert!(out.contains("per GPU of tp = 2"), "{out}");
    golden!("memory_llama3_8b_h100_gptq4_tp2", out);
}

#[test]
fn roofline_golden_tables() {
    let out = ok(&[
        "roofline",
        "--model",
        "llama-3-8b",
        "--hardware",
        "H100-SXM5-80GB",
        "--batch",
        "1",
        "--context",
        "1024",
    ]);
    golden!("roofline_llama3_8b_h100_decode_b1_c1024", out);
    let out = ok(&[
        "roofline",
        "--phase",
        "prefill",
        "--batch",
        "4",
        "--context",
        "2048",
    ]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("mlp_gate_up") && l.ends_with("compute")),
        "{out}"
    );
    golden!("roofline_llama3_8b_h100_prefill_b4_c2048", out);
    let dir = tempfile::tempdir().unwrap();
    let m = llama2_7b(dir.path());
    let out = ok(&[
        "roofline",
        "--model",
        m.to_str().unwrap(),
        "--hardware",
        "A100-SXM4-80GB",
        "--dtype",
        "f16",
        "--batch",
        "32",
        "--context",
        "512",
    ]);
    golden!("roofline_llama2_7b_f16_a100_80gb_decode_b32_c512", out);
}

#[test]
fn roofline_plot_writes_svg() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("roof.svg");
    ok(&["roofline", "--batch", "8", "--plot", svg.to_str().unwrap()]);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert!(text.contains("qkv_proj") && text.contains("ridge"));
    assert!(!dir.path().join("roof.svg.tmp").exists());
    // JSON beside the chart and the table; the same run twice is byte-identical.
    let json = dir.path().join("roof.json");
    let args = ["roofline", "--batch", "8", "--json", json.to_str().unwrap()];
    ok(&args);
    let first = std::fs::read(&json).unwrap();
    ok(&args);
    assert_eq!(first, std::fs::read(&json).unwrap());
    let v: serde_json::Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(v["ops"][1]["name"], "qkv_proj");
    let mem = dir.path().join("mem.json");
    ok(&["memory", "--json", mem.to_str().unwrap()]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mem).unwrap()).unwrap();
    assert_eq!(v["plan"]["num_kv_blocks"], 28363);
}

#[test]
fn memory_and_roofline_reject_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let big = llama31_405b(dir.path());
    fails(
        &[
            "memory",
            "--model",
            big.to_str().unwrap(),
            "--hardware",
            "H100-SXM5-80GB",
        ],
        "does not fit on H100-SXM5-80GB",
    );
    fails(
        &["memory", "--gpu-memory-utilization", "0"],
        "gpu_memory_utilization",
    );
    fails(
        &["memory", "--gpu-memory-utilization", "1.5"],
        "gpu_memory_utilization",
    );
    fails(
        &["memory", "--gpu-memory-utilization", "NaN"],
        "gpu_memory_utilization",
    );
    fails(
        &["memory", "--tp", "3"],
        "does not divide num_attention_heads",
    );
    fails(&["memory", "--quant", "gptq-4bit"], "quant");
    fails(&["memory", "--dtype", "f12"], "unknown dtype");
    fails(&["memory", "--block-size", "0"], "block_size");
    fails(&["memory", "--model", "no-such-model"], "unknown model");
    fails(&["memory", "--hardware", "TPU-v9"], "unknown hardware");
    fails(&["roofline", "--phase", "sideways"], "phase");
    fails(&["roofline", "--batch", "0"], "batch");
    fails(
        &["roofline", "--hardware", "A100-SXM4-80GB", "--dtype", "fp8"],
        "fp8",
    );
    fails(
        &["roofline", "--memory-efficiency", "0"],
        "memory_efficiency",
    );
    let missing = dir.path().join("nope").join("x.svg");
    fails(&["roofline", "--plot", missing.to_str().unwrap()], "x.svg");
}
