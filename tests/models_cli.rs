//! `inferlab models list|show`: the binary prints exactly the snapshot-tested
//! text of `inferlab_models::report`, and an unknown name fails naming the
//! known ones.

use std::process::Command;

use inferlab_models::{catalog, report};

fn run(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_inferlab"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

#[test]
fn list_and_show_print_the_report() {
    let (ok, out, _) = run(&["models", "list"]);
    assert!(ok);
    assert_eq!(out, report::render_list().unwrap());
    for d in catalog::models().unwrap() {
        let (ok, out, _) = run(&["models", "show", &d.meta.name]);
        assert!(ok, "{}", d.meta.name);
        assert_eq!(out, report::render_show(&d));
    }
}

#[test]
fn bad_names_fail_clearly() {
    let check = |args: &[&str], want: &str| {
        let (ok, _, err) = run(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    check(
        &["models", "show", "llama-9"],
        "unknown model `llama-9` (known: falcon-7b",
    );
    check(
        &["models", "show", "/nonexistent/x.toml"],
        "/nonexistent/x.toml",
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[meta]\nname = \"x\"\npublished_params = 1.0\nsource = \"s\"\n[config]\nhidden_sise = 3\n",
    )
    .unwrap();
    check(&["models", "show", p.to_str().unwrap()], "hidden_sise");
}
