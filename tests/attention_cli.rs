//! `inferlab attention` end to end: the built binary on .npy files in a
//! temporary directory. Results must equal the library's bit for bit (the
//! command is a thin shell around `inferlab_reference::attention::attention`),
//! and every bad input must fail with a message naming the file and leave
//! no output (nor temporary file) behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{Array, Array2, Array3, Dimension, ShapeBuilder};
use ndarray_npy::{read_npy, WritableElement, WriteNpyExt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use inferlab_reference::attention::{attention, AttentionConfig, Float, Masking, Strategy};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_inferlab"))
}

fn npy_bytes<A: WritableElement, D: Dimension>(a: &Array<A, D>) -> Vec<u8> {
    let mut buf = Vec::new();
    a.write_npy(&mut buf).unwrap();
    buf
}

/// An .npy file written by hand (for dtypes ndarray-npy does not write, and
/// headers that lie): v1.0 header padded to a multiple of 64 bytes.
fn raw_npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend_from_slice(data);
    out
}

fn random3(rng: &mut ChaCha8Rng, shape: (usize, usize, usize)) -> Array3<f64> {
    Array3::from_shape_fn(shape, |_| rng.random_range(-2.0..2.0))
}

fn run(args: &[String]) -> (bool, String) {
    let o = bin()
        .arg("attention")
        .args(args)
        .output()
        .expect("run inferlab");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

// ---------------------------------------------------- results = library

struct Good {
    imp: &'static str,
    strategy: Strategy,
    flags: &'static [&'static str],
    lq: usize,
    lk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    window: Option<usize>,
    scale: Option<f64>,
    mask: bool,
}

fn check_matches<T: Float + WritableElement + ndarray_npy::ReadableElement>(c: &Good, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let q = random3(&mut rng, (c.lq, c.hq, c.d)).mapv(T::from_f64);
    let k = random3(&mut rng, (c.lk, c.hkv, c.d)).mapv(T::from_f64);
    let v = random3(&mut rng, (c.lk, c.hkv, c.d)).mapv(T::from_f64);
    let mask = Array2::from_shape_fn((c.lq, c.lk), |_| rng.random_bool(0.7));
    std::fs::write(dir.path().join("q.npy"), npy_bytes(&q)).unwrap();
    std::fs::write(dir.path().join("k.npy"), npy_bytes(&k)).unwrap();
    std::fs::write(dir.path().join("v.npy"), npy_bytes(&v)).unwrap();
    std::fs::write(dir.path().join("mask.npy"), npy_bytes(&mask)).unwrap();
    let d = dir.path();
    let mut args: Vec<String> = [
        "--q",
        &p(d, "q.npy"),
        "--k",
        &p(d, "k.npy"),
        "--v",
        &p(d, "v.npy"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--impl".into(),
        c.imp.into(),
        "--out".into(),
        p(d, "o.npy"),
        "--lse".into(),
        p(d, "lse.npy"),
    ]);
    args.extend(c.flags.iter().map(|s| s.to_string()));
    if c.causal {
        args.push("--causal".into());
    }
    if let Some(w) = c.window {
        args.extend(["--window".into(), w.to_string()]);
    }
    if let Some(s) = c.scale {
        args.extend(["--scale".into(), s.to_string()]);
    }
    if c.mask {
        args.extend(["--mask".into(), p(d, "mask.npy")]);
    }
    let (ok, err) = run(&args);
    assert!(ok, "{} {}: {err}", c.imp, T::NAME);
    let out: Array3<T> = read_npy(d.join("o.npy")).unwrap();
    let lse: Array2<T> = read_npy(d.join("lse.npy")).unwrap();
    let cfg = AttentionConfig {
        masking: if c.causal {
            Masking::Causal
        } else {
            Masking::None
        },
        window: c.window,
        scale: c.scale,
        mask: c.mask.then(|| mask.view()),
    };
    let want = attention(q.view(), k.view(), v.view(), &cfg, c.strategy).unwrap();
    let same = |a: &[T], b: &[T]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits())
    };
    assert!(
        same(out.as_slice().unwrap(), want.out.as_slice().unwrap()),
        "{} {}: output differs",
        c.imp,
        T::NAME
    );
    assert!(
        same(lse.as_slice().unwrap(), want.lse.as_slice().unwrap()),
        "{} {}: lse differs",
        c.imp,
        T::NAME
    );
}

#[test]
fn results_equal_the_library() {
    use Strategy::*;
    let g = |imp, strategy, flags| Good {
        imp,
        strategy,
        flags,
        lq: 5,
        lk: 19,
        hq: 6,
        hkv: 2,
        d: 4,
        causal: false,
        window: None,
        scale: None,
        mask: false,
    };
    #[rustfmt::skip]
    let cases = [
        g("naive", Naive, &[]),
        g("tiled", Tiled { q_tile: 64, k_tile: 64 }, &[]),
        g("paged", Paged { block_size: 16, partition_size: 512 }, &[]),
        Good { causal: true, ..g("tiled", Tiled { q_tile: 2, k_tile: 3 }, &["--q-tile", "2", "--k-tile", "3"]) },
        Good { causal: true, window: Some(4), ..g("paged", Paged { block_size: 4, partition_size: 8 }, &["--block-size", "4", "--partition-size", "8"]) },
        // default partition: 512 rounded up to a multiple of the block size
        Good { lq: 1, ..g("paged", Paged { block_size: 6, partition_size: 516 }, &["--block-size", "6"]) },
        Good { mask: true, scale: Some(-0.7), ..g("naive", Naive, &[]) },
        Good { mask: true, causal: true, hkv: 1, ..g("paged", Paged { block_size: 1, partition_size: 3 }, &["--block-size", "1", "--partition-size", "3"]) },
        // tiles and partitions far larger than the problem: one tile, no huge allocation
        g("tiled", Tiled { q_tile: 1 << 40, k_tile: 1 << 40 }, &["--q-tile", "1099511627776", "--k-tile", "1099511627776"]),
        g("paged", Paged { block_size: 2, partition_size: 1 << 40 }, &["--block-size", "2", "--partition-size", "1099511627776"]),
    ];
    for (n, c) in cases.iter().enumerate() {
        check_matches::<f64>(c, n as u64);
        check_matches::<f32>(c, n as u64);
    }
}

/// Fortran-ordered input (numpy's `np.asfortranarray`) reads as the same array.
#[test]
fn fortran_order_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let q = random3(&mut rng, (3, 2, 4));
    let k = random3(&mut rng, (5, 1, 4));
    let v = random3(&mut rng, (5, 1, 4));
    let mut qf = Array3::<f64>::zeros((3, 2, 4).f());
    qf.assign(&q);
    std::fs::write(d.join("qf.npy"), npy_bytes(&qf)).unwrap();
    let header = std::fs::read(d.join("qf.npy")).unwrap();
    assert!(String::from_utf8_lossy(&header[..128]).contains("'fortran_order': True"));
    std::fs::write(d.join("k.npy"), npy_bytes(&k)).unwrap();
    std::fs::write(d.join("v.npy"), npy_bytes(&v)).unwrap();
    let args: Vec<String> = [
        "--q",
        &p(d, "qf.npy"),
        "--k",
        &p(d, "k.npy"),
        "--v",
        &p(d, "v.npy"),
        "--out",
        &p(d, "o.npy"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    let out: Array3<f64> = read_npy(d.join("o.npy")).unwrap();
    let want = attention(
        q.view(),
        k.view(),
        v.view(),
        &AttentionConfig::default(),
        Strategy::Naive,
    )
    .unwrap();
    assert_eq!(out, want.out);
    // Same inputs, same bytes out.
    let first = std::fs::read(d.join("o.npy")).unwrap();
    assert!(run(&args).0);
    assert_eq!(first, std::fs::read(d.join("o.npy")).unwrap());
}

// ------------------------------------------------------------- bad inputs

/// One bad-input case: files to (re)write (None = delete) over a good set,
/// extra arguments, and fragments the error message must contain.
struct Bad {
    name: &'static str,
    files: Vec<(&'static str, Option<Vec<u8>>)>,
    args: &'static [&'static str],
    want: &'static [&'static str],
}

fn check_bad(c: &Bad) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // Good inputs: q [3, 4, 2], k/v [5, 2, 2], f64.
    std::fs::write(d.join("q.npy"), npy_bytes(&random3(&mut rng, (3, 4, 2)))).unwrap();
    std::fs::write(d.join("k.npy"), npy_bytes(&random3(&mut rng, (5, 2, 2)))).unwrap();
    std::fs::write(d.join("v.npy"), npy_bytes(&random3(&mut rng, (5, 2, 2)))).unwrap();
    for (name, bytes) in &c.files {
        match bytes {
            Some(b) => std::fs::write(d.join(name), b).unwrap(),
            None => {
                let _ = std::fs::remove_file(d.join(name));
            }
        }
    }
    // Base flags with their files; a case's argument naming one of these
    // flags replaces its value. "@name" means a file in the temp dir.
    let mut base: Vec<(String, String)> = [
        "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy", "--lse", "lse.npy",
    ]
    .chunks(2)
    .map(|kv| (kv[0].to_string(), p(d, kv[1])))
    .collect();
    let resolve = |a: &str| {
        a.strip_prefix('@')
            .map(|f| p(d, f))
            .unwrap_or_else(|| a.to_string())
    };
    let mut extra = Vec::new();
    let mut it = c.args.iter();
    while let Some(a) = it.next() {
        match base.iter_mut().find(|(f, _)| f == a) {
            Some(slot) => slot.1 = resolve(it.next().expect("flag value")),
            None => extra.push(resolve(a)),
        }
    }
    let mut args: Vec<String> = base.into_iter().flat_map(|(f, v)| [f, v]).collect();
    args.extend(extra);
    let before: Vec<PathBuf> = listing(d);
    let (ok, err) = run(&args);
    assert!(!ok, "{}: expected failure, got success", c.name);
    eprintln!("{:<40} {}", c.name, err.trim());
    assert!(!err.contains("panicked"), "{}: panicked: {err}", c.name);
    for w in c.want {
        assert!(err.contains(w), "{}: message {err:?} lacks {w:?}", c.name);
    }
    assert_eq!(listing(d), before, "{}: files written on error", c.name);
}

fn listing(d: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn f64_bytes(xs: &[f64]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn bad_inputs_fail_naming_the_file() {
    let good_q = npy_bytes(&Array3::<f64>::zeros((3, 4, 2)));
    let mut truncated = good_q.clone();
    truncated.truncate(good_q.len() - 8);
    let mut extra = good_q.clone();
    extra.extend_from_slice(&[0u8; 8]);
    let mut nan_k = Array3::<f64>::zeros((5, 2, 2));
    nan_k[[2, 0, 1]] = f64::NAN;
    let mut inf_v = Array3::<f64>::zeros((5, 2, 2));
    inf_v[[4, 1, 0]] = f64::INFINITY;
    let q32 = npy_bytes(&Array3::<f32>::zeros((3, 4, 2)));
    let some = |b: Vec<u8>| Some(b);
    #[rustfmt::skip]
    let cases = vec![
        Bad { name: "missing file", files: vec![("q.npy", None)], args: &[], want: &["q.npy", "cannot open --q"] },
        Bad { name: "not an npy", files: vec![("k.npy", some(b"hello, world\n".to_vec()))], args: &[], want: &["k.npy", "not an .npy"] },
        Bad { name: "empty file", files: vec![("v.npy", some(vec![]))], args: &[], want: &["v.npy", "not an .npy"] },
        Bad { name: "truncated data", files: vec![("q.npy", some(truncated))], args: &[], want: &["q.npy", "truncated"] },
        Bad { name: "header lies about size", files: vec![("k.npy", some(raw_npy("<f8", "(100000000, 100000, 8)", &f64_bytes(&[0.0; 20]))))], args: &[], want: &["k.npy", "truncated"] },
        Bad { name: "header shape overflows", files: vec![("k.npy", some(raw_npy("<f8", "(18446744073709551615, 4, 2)", &[])))], args: &[], want: &["k.npy", "overflow"] },
        Bad { name: "garbage header", files: vec![("q.npy", some(raw_npy("<f8", "[[[", &[])))], args: &[], want: &["q.npy", "not a valid .npy"] },
        Bad { name: "trailing bytes", files: vec![("q.npy", some(extra))], args: &[], want: &["q.npy", "bytes after the data"] },
        Bad { name: "wrong rank", files: vec![("q.npy", some(npy_bytes(&Array2::<f64>::zeros((3, 8)))))], args: &[], want: &["q.npy", "rank 3", "got rank 2"] },
        Bad { name: "int32", files: vec![("q.npy", some(npy_bytes(&Array3::<i32>::zeros((3, 4, 2)))))], args: &[], want: &["q.npy", "<i4", "int32"] },
        Bad { name: "float16", files: vec![("v.npy", some(raw_npy("<f2", "(5, 2, 2)", &[0u8; 40])))], args: &[], want: &["v.npy", "<f2", "float16"] },
        Bad { name: "big-endian", files: vec![("k.npy", some(raw_npy(">f8", "(5, 2, 2)", &[0u8; 160])))], args: &[], want: &["k.npy", "big-endian"] },
        Bad { name: "mixed dtypes", files: vec![("q.npy", some(q32))], args: &[], want: &["k.npy", "float64", "float32", "q.npy"] },
        Bad { name: "head dim differs", files: vec![("k.npy", some(npy_bytes(&Array3::<f64>::zeros((5, 2, 3))))), ("v.npy", some(npy_bytes(&Array3::<f64>::zeros((5, 2, 3)))))], args: &[], want: &["k.npy", "head dim 3", "head dim 2"] },
        Bad { name: "v shape differs from k", files: vec![("v.npy", some(npy_bytes(&Array3::<f64>::zeros((6, 2, 2)))))], args: &[], want: &["v.npy", "[6, 2, 2]", "[5, 2, 2]"] },
        Bad { name: "heads not divisible", files: vec![("k.npy", some(npy_bytes(&Array3::<f64>::zeros((5, 3, 2))))), ("v.npy", some(npy_bytes(&Array3::<f64>::zeros((5, 3, 2)))))], args: &[], want: &["q.npy", "k.npy", "not divisible"] },
        Bad { name: "NaN in k", files: vec![("k.npy", some(npy_bytes(&nan_k)))], args: &[], want: &["k.npy", "NaN at index [2, 0, 1]"] },
        Bad { name: "Inf in v", files: vec![("v.npy", some(npy_bytes(&inf_v)))], args: &[], want: &["v.npy", "inf at index [4, 1, 0]"] },
        Bad { name: "causal Lq > Lk", files: vec![("q.npy", some(npy_bytes(&Array3::<f64>::zeros((6, 4, 2)))))], args: &["--causal"], want: &["q.npy", "k.npy", "Lq <= Lk"] },
        Bad { name: "mask shape", files: vec![("m.npy", some(npy_bytes(&Array2::from_elem((3, 4), true))))], args: &["--mask", "@m.npy"], want: &["m.npy", "[3, 5]", "[3, 4]"] },
        Bad { name: "mask dtype", files: vec![("m.npy", some(npy_bytes(&Array2::<f64>::zeros((3, 5)))))], args: &["--mask", "@m.npy"], want: &["m.npy", "bool", "<f8"] },
        Bad { name: "mask not bool bytes", files: vec![("m.npy", some(raw_npy("|b1", "(3, 5)", &[2u8; 15])))], args: &["--mask", "@m.npy"], want: &["m.npy", "not a bool"] },
        Bad { name: "mask missing", files: vec![], args: &["--mask", "@nope.npy"], want: &["nope.npy", "cannot open --mask"] },
        Bad { name: "output dir missing", files: vec![], args: &["--out", "@no/such/dir/o.npy"], want: &["o.npy", "cannot write output"] },
        Bad { name: "lse dir missing (out not written either)", files: vec![], args: &["--lse", "@no/lse.npy"], want: &["lse.npy", "cannot write output"] },
        Bad { name: "partition not a multiple", files: vec![], args: &["--impl", "paged", "--block-size", "4", "--partition-size", "6"], want: &["--partition-size 6", "--block-size 4"] },
        Bad { name: "block size absurd", files: vec![], args: &["--impl", "paged", "--block-size", "1099511627776"], want: &["--block-size 1099511627776", "1..=65536"] },
        Bad { name: "block size 0", files: vec![], args: &["--impl", "paged", "--block-size", "0"], want: &["--block-size 0"] },
        Bad { name: "tile 0", files: vec![], args: &["--impl", "tiled", "--k-tile", "0"], want: &["--k-tile"] },
        Bad { name: "window 0", files: vec![], args: &["--window", "0"], want: &["--window"] },
        Bad { name: "scale NaN", files: vec![], args: &["--scale", "NaN"], want: &["--scale"] },
        Bad { name: "out = lse", files: vec![], args: &["--lse", "@o.npy"], want: &["same file"] },
    ];
    for c in &cases {
        check_bad(c);
    }
    // Sanity: the good set itself succeeds (so each failure above is the case's own).
    let dir = tempfile::tempdir().unwrap();
    check_good_set(dir.path());
}

fn check_good_set(d: &Path) {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    std::fs::write(d.join("q.npy"), npy_bytes(&random3(&mut rng, (3, 4, 2)))).unwrap();
    std::fs::write(d.join("k.npy"), npy_bytes(&random3(&mut rng, (5, 2, 2)))).unwrap();
    std::fs::write(d.join("v.npy"), npy_bytes(&random3(&mut rng, (5, 2, 2)))).unwrap();
    let args: Vec<String> = [
        "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy", "--lse", "lse.npy",
    ]
    .chunks(2)
    .flat_map(|kv| [kv[0].to_string(), p(d, kv[1])])
    .collect();
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    assert_eq!(listing(d).len(), 5, "q, k, v, o, lse and nothing else");
}
