//! Embeds every descriptor under `catalog/` so the binary needs no data files.
//! Generates `$OUT_DIR/catalog_files.rs`: `&[(kind, file_name, contents)]`,
//! sorted by path so the order never depends on the file system.
use std::{env, fs, path::Path};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("catalog");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut entries = Vec::new();
    for kind in ["models", "hardware"] {
        let dir = root.join(kind);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<_> = fs::read_dir(&dir)
            .expect("catalog dir")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        for f in files {
            println!("cargo:rerun-if-changed={}", f.display());
            entries.push(format!(
                "({kind:?}, {:?}, include_str!({:?})),",
                f.file_name().unwrap().to_str().unwrap(),
                f.display().to_string()
            ));
        }
    }
    let out = Path::new(&env::var("OUT_DIR").unwrap()).join("catalog_files.rs");
    fs::write(
        out,
        format!(
            "pub(crate) static CATALOG_FILES: &[(&str, &str, &str)] = &[\n{}\n];\n",
            entries.join("\n")
        ),
    )
    .unwrap();
}
