//! Where real test data lives: one setting for all of it.
//!
//! - `INFERLAB_ASSETS` (default `<workspace>/../shared/assets`): stories260K, corpora.
//! - `INFERLAB_CACHE` (default `<workspace>/.assets-cache`): files that
//!   `scripts/setup.sh` fetches and verifies (SmolLM2-135M-Instruct GGUF).
//! - traces: `<assets>/../traces` (the shared folder's layout).
//!
//! Tests that need an absent asset print `SKIP: ... (missing PATH)` and return;
//! CI runs `scripts/setup.sh` first and has `../shared`, so it never skips.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    // models/ sits directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("models crate has a parent")
        .to_path_buf()
}

/// The shared assets folder.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("INFERLAB_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/assets"))
}

/// The set-up cache (fetched, checksum-verified files).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("INFERLAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".assets-cache"))
}

/// The shared traces folder.
pub fn traces_dir() -> PathBuf {
    assets_dir().join("../traces")
}

pub fn stories260k_model() -> PathBuf {
    assets_dir().join("models/stories260K/stories260K.bin")
}
pub fn stories260k_tokenizer() -> PathBuf {
    assets_dir().join("models/stories260K/tok512.bin")
}
pub fn smollm2_gguf() -> PathBuf {
    cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}
pub fn wikitext2_test() -> PathBuf {
    assets_dir().join("corpus/wikitext-2-raw.wiki.test.raw")
}
pub fn tinystories_valid() -> PathBuf {
    assets_dir().join("corpus/tinystories-valid.snippet.txt")
}
pub fn tinystories_train() -> PathBuf {
    assets_dir().join("corpus/tinystories-train.head200k.txt")
}
pub fn azure_conv_trace() -> PathBuf {
    traces_dir().join("azure-llm-2023-conv.csv")
}

/// `Some(path)` if it exists; otherwise prints a SKIP line naming it.
pub fn require(path: PathBuf, test: &str) -> Option<PathBuf> {
    if path.exists() {
        Some(path)
    } else if std::env::var_os("INFERLAB_REQUIRE_ASSETS").is_some() {
        panic!(
            "{test}: missing asset {} and INFERLAB_REQUIRE_ASSETS is set (CI must not skip)",
            path.display()
        );
    } else {
        eprintln!(
            "SKIP {test}: missing asset {} (run scripts/setup.sh, or set INFERLAB_ASSETS)",
            path.display()
        );
        None
    }
}
