//! `inferlab replay` / `trace` end to end: byte-identical JSON, plots, bad input.

use std::process::Command;

fn inferlab(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inferlab"))
        .args(args)
        .output()
        .expect("runs")
}

#[test]
fn replay_json_is_byte_identical_and_plots_are_written() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.json"), d.path().join("b.json"));
    let plots = d.path().join("plots");
    for out in [&a, &b] {
        let o = inferlab(&[
            "replay",
            "--requests",
            "300",
            "--seed",
            "7",
            "--out",
            out.to_str().unwrap(),
            "--plots",
            plots.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let ja = std::fs::read(&a).unwrap();
    assert_eq!(ja, std::fs::read(&b).unwrap());
    let v: serde_json::Value = serde_json::from_slice(&ja).unwrap();
    assert_eq!(v["requests"]["completed"], 300);
    for f in ["latency_cdf.svg", "kv_usage.svg", "batch_size.svg"] {
        let svg = std::fs::read_to_string(plots.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<path"), "{f}");
    }
}

#[test]
fn bad_inputs_fail_with_clear_messages() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.csv");
    std::fs::write(
        &bad,
        "arrival_ns,prompt_tokens,output_tokens\n0,5,5\n10,five,5\n",
    )
    .unwrap();
    let unsorted = d.path().join("unsorted.csv");
    std::fs::write(
        &unsorted,
        "arrival_ns,prompt_tokens,output_tokens\n10,5,5\n0,5,5\n",
    )
    .unwrap();
    let check = |args: &[&str], want: &str| {
        let o = inferlab(args);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    };
    check(
        &["trace", "stats", bad.to_str().unwrap()],
        "bad.csv:3: field `prompt_tokens`",
    );
    check(
        &["replay", "--trace", unsorted.to_str().unwrap()],
        "unsorted.csv:3: arrival 0 ns is earlier",
    );
    check(
        &[
            "replay",
            "--requests",
            "10",
            "--hardware",
            "a100-sxm4-40gb",
            "--model",
            "llama-3-8b",
            "--gpu-memory-utilization",
            "0.2",
        ],
        "does not fit",
    );
    check(
        &[
            "replay",
            "--requests",
            "10",
            "--gpu-memory-utilization",
            "1.5",
        ],
        "gpu_memory_utilization",
    );
    let o = inferlab(&[
        "replay",
        "--trace",
        unsorted.to_str().unwrap(),
        "--unsorted",
        "sort",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
