//! `inferlab speculative {theory, check}`: rendered output (insta snapshots in
//! `golden/`) and bad inputs (one line per case, each must fail with a clear
//! message naming the file or flag).

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::Array2;

fn inferlab(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_inferlab"))
        .args(args)
        .output()
        .expect("run inferlab");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn npy(dir: &Path, name: &str, rows: &[&[f64]], cols: usize) -> PathBuf {
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    let a = Array2::from_shape_vec((rows.len(), cols), flat).unwrap();
    let path = dir.join(name);
    ndarray_npy::write_npy(&path, &a).unwrap();
    path
}

fn snapshot(name: &str, text: &str) {
    insta::with_settings!({snapshot_path => concat!(env!("CARGO_MANIFEST_DIR"), "/golden"), prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(name, text);
    });
}

const P: &[&[f64]] = &[&[0.5, 0.3, 0.2], &[0.1, 0.6, 0.3], &[0.3, 0.3, 0.4]];
const Q: &[&[f64]] = &[&[0.2, 0.3, 0.5], &[0.3, 0.4, 0.3]];

#[test]
fn theory_table() {
    let (ok, out, err) = inferlab(&[
        "speculative",
        "theory",
        "--alpha",
        "0.8",
        "--k",
        "4",
        "--cost-ratio",
        "0.1",
        "--k-max",
        "8",
    ]);
    assert!(ok, "{err}");
    // Hand values: (1 − 0.8^5)/0.2 = 3.3616; best k = 6 (3.951424/1.6 = 2.4696).
    assert!(
        out.contains("expected tokens per target pass: 3.3616"),
        "{out}"
    );
    assert!(out.contains("best k in 1..=8: 6 (speedup 2.4696)"), "{out}");
    snapshot("speculative_theory", &out);
}

#[test]
fn check_report_is_deterministic_and_passes() {
    let dir = tempfile::tempdir().unwrap();
    let p = npy(dir.path(), "p.npy", P, 3);
    let q = npy(dir.path(), "q.npy", Q, 3);
    let args = [
        "speculative",
        "check",
        "--target-probs",
        p.to_str().unwrap(),
        "--draft-probs",
        q.to_str().unwrap(),
        "--samples",
        "20000",
        "--seed",
        "1",
    ];
    let (ok, out, err) = inferlab(&args);
    assert!(ok, "{err}");
    let (_, out2, _) = inferlab(&args);
    assert_eq!(out, out2, "same seed, same output");
    assert!(
        out.contains("beta_i = sum min(p_i, q_i): [0.700000, 0.800000]"),
        "{out}"
    );
    snapshot("speculative_check", &out);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good_p = npy(d, "good_p.npy", P, 3);
    let good_q = npy(d, "good_q.npy", Q, 3);
    let garbage = d.join("garbage.npy");
    std::fs::write(&garbage, b"not an npy file").unwrap();
    let f32_q = d.join("q32.npy");
    ndarray_npy::write_npy(
        &f32_q,
        &Array2::<f32>::from_shape_vec((2, 3), vec![0.2, 0.3, 0.5, 0.3, 0.4, 0.3]).unwrap(),
    )
    .unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // (what, target file, draft file, extra args, expected fragment of the error)
    let check = |what: &str, p: PathBuf, q: PathBuf, extra: &[&str], want: &[&str]| {
        let mut args = vec![
            "speculative".to_string(),
            "check".into(),
            "--target-probs".into(),
            s(&p),
            "--draft-probs".into(),
            s(&q),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let argv: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        let (ok, _, err) = inferlab(&argv);
        assert!(!ok, "{what}: should fail");
        for w in want {
            assert!(
                err.contains(w),
                "{what}: error {err:?} should mention {w:?}"
            );
        }
        assert!(!err.contains("panicked"), "{what}: panicked: {err}");
    };
    check(
        "row sum > 1",
        npy(d, "p1.npy", &[&[0.5, 0.3, 0.3], P[1], P[2]], 3),
        good_q.clone(),
        &[],
        &["p1.npy", "row 0 sums to 1.1", "tolerance"],
    );
    check(
        "row sum < 1",
        good_p.clone(),
        npy(d, "q1.npy", &[Q[0], &[0.3, 0.4, 0.2]], 3),
        &[],
        &["q1.npy", "draft probabilities", "row 1 sums to 0.899"],
    );
    check(
        "negative entry",
        npy(d, "p2.npy", &[&[1.2, -0.2, 0.0], P[1], P[2]], 3),
        good_q.clone(),
        &[],
        &["p2.npy", "negative probability -0.2 at [0, 1]"],
    );
    check(
        "NaN",
        npy(d, "p3.npy", &[&[f64::NAN, 0.5, 0.5], P[1], P[2]], 3),
        good_q.clone(),
        &[],
        &["p3.npy", "non-finite", "[0, 0]"],
    );
    check(
        "mismatched V",
        npy(d, "p4.npy", &[&[0.25; 4], &[0.25; 4], &[0.25; 4]], 4),
        good_q.clone(),
        &[],
        &["vocabulary sizes differ", "V = 4", "V = 3"],
    );
    check(
        "k = 0",
        npy(d, "p5.npy", &[P[0]], 3),
        npy(d, "q5.npy", &[], 3),
        &[],
        &["q5.npy", "k = 0"],
    );
    check(
        "rows not k+1",
        npy(d, "p6.npy", &[P[0], P[1]], 3),
        good_q.clone(),
        &[],
        &["p6.npy", "k+1 = 3 rows", "got 2"],
    );
    check(
        "missing file",
        d.join("nope.npy"),
        good_q.clone(),
        &[],
        &["nope.npy", "no such file"],
    );
    check(
        "not npy",
        garbage.clone(),
        good_q.clone(),
        &[],
        &["garbage.npy", "not a 2-D float32/float64 .npy"],
    );
    check(
        "dtypes differ",
        good_p.clone(),
        f32_q.clone(),
        &[],
        &["dtypes differ", "float64", "float32"],
    );
    check(
        "zero samples",
        good_p.clone(),
        good_q.clone(),
        &["--samples", "0"],
        &["--samples 0"],
    );

    let theory = |what: &str, args: &[&str], want: &str| {
        let mut argv = vec!["speculative", "theory"];
        argv.extend_from_slice(args);
        let (ok, _, err) = inferlab(&argv);
        assert!(!ok, "{what}: should fail");
        assert!(
            err.contains(want),
            "{what}: error {err:?} should mention {want:?}"
        );
    };
    theory(
        "alpha > 1",
        &["--alpha", "1.5", "--k", "4", "--cost-ratio", "0.1"],
        "--alpha 1.5",
    );
    theory(
        "alpha NaN",
        &["--alpha", "NaN", "--k", "4", "--cost-ratio", "0.1"],
        "--alpha NaN",
    );
    theory(
        "k = 0",
        &["--alpha", "0.5", "--k", "0", "--cost-ratio", "0.1"],
        "k ≥ 1",
    );
    theory(
        "negative cost",
        &["--alpha", "0.5", "--k", "2", "--cost-ratio=-1"],
        "--cost-ratio -1",
    );
}

/// `speculative run` on stories260K: at temperature 0 every draft gives the
/// same text (the target's greedy continuation), the JSON is written, and bad
/// runs fail clearly.
#[test]
fn run_greedy_outputs_agree_across_drafts() {
    use inferlab_models::assets;
    let Some(model) = assets::require(assets::stories260k_model(), "speculative run CLI") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "Once upon a time\n\nLily saw a\n").unwrap();
    let json = dir.path().join("out.json");
    let (m, p, j) = (
        model.to_str().unwrap(),
        prompts.to_str().unwrap(),
        json.to_str().unwrap(),
    );
    let (ok, out, err) = inferlab(&[
        "speculative",
        "run",
        "--target",
        m,
        "--draft-layers",
        "1,3",
        "--draft",
        "ngram",
        "--draft",
        m,
        "--k",
        "1,4",
        "--temperature",
        "0",
        "--prompts",
        p,
        "--max-tokens",
        "24",
        "--cache",
        "paged",
        "--block-size",
        "4",
        "--json",
        j,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("2 prompts"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v.as_array().unwrap();
    assert_eq!(runs.len(), 4 * 2, "4 drafts x 2 values of k");
    let first = &runs[0]["outputs"];
    for r in runs {
        assert_eq!(&r["outputs"], first, "{} k={}", r["draft"], r["k"]);
        // Greedy: the TV prediction (β ∈ {0,1}) equals the measured acceptance.
        assert_eq!(r["acceptance"], r["predicted_acceptance"]);
        assert_eq!(r["tokens"], 48);
    }
    // The target drafting itself accepts everything: k+1 tokens per pass until the end.
    let own = runs
        .iter()
        .find(|r| r["draft"].as_str().unwrap().starts_with("model:") && r["k"] == 4)
        .unwrap();
    assert_eq!(own["acceptance"], 1.0);

    let bad = |what: &str, args: &[&str], want: &str| {
        let mut argv = vec!["speculative", "run", "--target", m, "--prompts", p];
        argv.extend_from_slice(args);
        let (ok, _, err) = inferlab(&argv);
        assert!(!ok, "{what}: should fail");
        assert!(
            err.contains(want),
            "{what}: {err:?} should mention {want:?}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    };
    bad("k = 0", &["--draft", "ngram", "--k", "0"], "k ≥ 1");
    bad("no draft", &["--k", "2"], "no draft");
    bad(
        "layers 0",
        &["--draft-layers", "0", "--k", "2"],
        "--draft-layers 0: must be in 1..=5",
    );
    bad(
        "layers > n",
        &["--draft-layers", "6", "--k", "2"],
        "--draft-layers 6",
    );
    bad(
        "negative T",
        &["--draft", "ngram", "--k", "2", "--temperature=-1"],
        "--temperature -1",
    );
    bad(
        "missing draft",
        &["--draft", "/nonexistent/draft.bin", "--k", "2"],
        "/nonexistent/draft.bin",
    );
    let (ok, _, err) = inferlab(&[
        "speculative",
        "run",
        "--target",
        m,
        "--prompts",
        "/nonexistent/p.txt",
        "--draft",
        "ngram",
        "--k",
        "2",
    ]);
    assert!(!ok && err.contains("/nonexistent/p.txt"), "{err}");
    // A draft with a different tokenizer (SmolLM2's 49152-token BPE) is refused.
    if let Some(smol) = assets::require(
        assets::smollm2_gguf(),
        "speculative run CLI: tokenizer mismatch",
    ) {
        bad(
            "tokenizer differs",
            &["--draft", smol.to_str().unwrap(), "--k", "2"],
            "vocabulary size 49152 differs from the target's 512",
        );
    }
}

/// `speculative run --tree-branching` on stories260K: at T = 0 the tree gives
/// the chain's (= greedy) outputs with the prediction exact; bad tree specs fail.
#[test]
fn run_tree_greedy_matches_chain() {
    use inferlab_models::assets;
    let Some(model) = assets::require(assets::stories260k_model(), "speculative run --tree") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "Once upon a time\nLily saw a\n").unwrap();
    let (m, p) = (model.to_str().unwrap(), prompts.to_str().unwrap());
    let run = |extra: &[&str]| {
        let json = dir.path().join("out.json");
        let mut argv = vec![
            "speculative",
            "run",
            "--target",
            m,
            "--draft-layers",
            "3",
            "--temperature",
            "0",
            "--prompts",
            p,
            "--max-tokens",
            "24",
            "--json",
            json.to_str().unwrap(),
        ];
        argv.extend_from_slice(extra);
        let (ok, out, err) = inferlab(&argv);
        assert!(ok, "{err}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        (out, v[0].clone())
    };
    let (_, chain) = run(&["--k", "3"]);
    let (out, tree) = run(&[
        "--tree-branching",
        "3,1,1",
        "--cache",
        "paged",
        "--block-size",
        "4",
    ]);
    assert!(out.contains("tree branching 3,1,1"), "{out}");
    assert!(out.contains("SE(diff)"), "{out}");
    assert_eq!(tree["outputs"], chain["outputs"]);
    assert_eq!(tree["k"], 3);
    assert_eq!(tree["tree"], "3,1,1");
    assert_eq!(tree["acceptance"], tree["predicted_acceptance"]);
    assert_eq!(tree["acceptance_diff_se"], 0.0);
    // Three branches accept at least as often per pass as one.
    assert!(
        tree["passes"].as_u64() <= chain["passes"].as_u64(),
        "{tree} {chain}"
    );
    for (args, want) in [
        (&["--tree-branching", "3,0"][..], "depth 1 has 0 children"),
        (&["--tree-branching", "3,x"][..], "not a positive integer"),
        (
            &["--tree-branching", "2", "--k", "2"][..],
            "cannot be used with",
        ),
        (
            &["--tree-branching", "2", "--draft", "ngram"][..],
            "n-gram drafts cannot propose trees",
        ),
    ] {
        let mut argv = vec![
            "speculative",
            "run",
            "--target",
            m,
            "--prompts",
            p,
            "--draft-layers",
            "2",
        ];
        argv.extend_from_slice(args);
        let (ok, _, err) = inferlab(&argv);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `speculative compare` on stories260K: speculative and plain samples of the
/// first two tokens pass the homogeneity test; the output names the
/// statistic, dof and p-value; bad arguments fail clearly.
#[test]
fn compare_speculative_vs_plain() {
    use inferlab_models::assets;
    let Some(model) = assets::require(assets::stories260k_model(), "speculative compare") else {
        return;
    };
    let m = model.to_str().unwrap();
    let base = [
        "speculative",
        "compare",
        "--target",
        m,
        "--draft-layers",
        "2",
        "--temperature",
        "1",
        "--prompt",
        "Lily saw a",
        "--seeds",
        "3000",
        "--tokens",
        "2",
    ];
    let parse = |out: &str, prefix: &str| -> (f64, usize, f64) {
        let line = out
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{out}"));
        let num = |key: &str| -> String {
            let s = &line[line.find(key).unwrap() + key.len()..];
            s.split([',', ' ']).next().unwrap().to_string()
        };
        (
            num("chi-square = ").parse().unwrap(),
            num("dof = ").parse().unwrap(),
            num("p-value = ").parse().unwrap(),
        )
    };
    for extra in [&["--k", "3"][..], &["--tree-branching", "2,1"][..]] {
        let mut argv = base.to_vec();
        argv.extend_from_slice(extra);
        let (ok, out, err) = inferlab(&argv);
        assert!(ok, "{err}");
        let (stat, dof, p) = parse(&out, "homogeneity");
        assert!(dof >= 20 && stat > 0.0, "{out}");
        assert!(p > 1e-3, "{extra:?}: speculative and plain differ: {out}");
        let (_, dof1, p1) = parse(&out, "first token vs exact softmax, speculative");
        assert!(dof1 >= 10 && p1 > 1e-3, "{out}");
        // Deterministic: the same seeds give the same counts.
        let (_, again, _) = inferlab(&argv);
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with("speculative:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&out), strip(&again));
    }
    for (args, want) in [
        (&["--temperature", "0", "--k", "2"][..], "--temperature 0"),
        (&["--seeds", "0", "--k", "2"][..], "--seeds 0"),
        (&["--k", "0"][..], "--k 0"),
        (&["--draft-layers", "9", "--k", "2"][..], "--draft-layers 9"),
        (&["--k", "2"][..], "no draft"),
    ] {
        let mut argv = vec!["speculative", "compare", "--target", m, "--prompt", "Lily"];
        argv.extend_from_slice(args);
        let (ok, _, err) = inferlab(&argv);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
