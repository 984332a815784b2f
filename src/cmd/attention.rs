//! `inferlab attention`: exact attention on `.npy` inputs, the oracle other
//! languages' test suites call.
//!
//! ```text
//! inferlab attention --q q.npy --k k.npy --v v.npy [--causal] [--window W]
//!     [--scale S] [--impl naive|tiled|paged] [--block-size B]
//!     [--partition-size P] [--q-tile T] [--k-tile T] [--mask mask.npy]
//!     --out o.npy [--lse lse.npy]
//! ```
//! q is `[Lq, Hq, D]`, k and v `[Lk, Hkv, D]`, all float32 or all float64
//! (little-endian, C or Fortran order); the outputs (`[Lq, Hq, D]` and
//! `[Lq, Hq]`) have the inputs' dtype. The mask is bool `[Lq, Lk]`. Causal
//! masking is bottom-right aligned (see `inferlab_reference::attention`).
//!
//! Input handling, in this order, each failure naming the file: the file is
//! read whole (so no allocation is sized by a header field: ndarray-npy's
//! view checks the header's shape against the bytes actually present), the
//! magic, the header, the dtype, truncation or trailing bytes, the rank, a
//! common dtype across q/k/v, shapes against each other, NaN/Inf (with the
//! index of the first). Outputs are written to temporary names beside their
//! targets and renamed only when every output is complete; on error nothing
//! is left behind.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{ArrayD, ArrayViewD, Ix2, Ix3};
use ndarray_npy::{ReadNpyExt, ViewNpyError, ViewNpyExt, WritableElement, WriteNpyExt};

use inferlab_reference::attention::{
    attention, AttentionConfig, Float, Masking, Strategy, MAX_BLOCK_SIZE, SCRAMBLE_SEED,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Impl {
    /// Materialized scores, f64 accumulation (the oracle).
    Naive,
    /// FlashAttention-2 online softmax, accumulating in the input dtype.
    Tiled,
    /// Paged K/V (scrambled block table), split-KV partitions merged by LSE.
    Paged,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Queries, [Lq, Hq, D], float32 or float64.
    #[arg(long, value_name = "q.npy")]
    pub q: PathBuf,
    /// Keys, [Lk, Hkv, D], same dtype as q.
    #[arg(long, value_name = "k.npy")]
    pub k: PathBuf,
    /// Values, [Lk, Hkv, D], same dtype as q.
    #[arg(long, value_name = "v.npy")]
    pub v: PathBuf,
    /// Bottom-right causal masking (query i sits at position Lk - Lq + i).
    #[arg(long)]
    pub causal: bool,
    /// Sliding window: a query at position p sees keys p-W+1..=p (with --causal) or p-W+1.. (without).
    #[arg(long, value_name = "W")]
    pub window: Option<usize>,
    /// Softmax scale (default 1/sqrt(D)).
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub scale: Option<f64>,
    /// Which implementation computes the result.
    #[arg(long = "impl", value_enum, default_value_t = Impl::Naive)]
    pub implementation: Impl,
    /// Tokens per KV block (paged).
    #[arg(long, default_value_t = 16, value_name = "B")]
    pub block_size: usize,
    /// Tokens per split-KV partition (paged); a multiple of the block size.
    /// Default: 512 rounded up to a multiple of the block size (vLLM's v2).
    #[arg(long, value_name = "P")]
    pub partition_size: Option<usize>,
    /// Query rows per tile (tiled).
    #[arg(long, default_value_t = 64, value_name = "T")]
    pub q_tile: usize,
    /// Keys per tile (tiled).
    #[arg(long, default_value_t = 64, value_name = "T")]
    pub k_tile: usize,
    /// Boolean mask [Lq, Lk], true = may attend; AND-ed with --causal/--window.
    #[arg(long, value_name = "mask.npy")]
    pub mask: Option<PathBuf>,
    /// Output [Lq, Hq, D], the inputs' dtype.
    #[arg(long, value_name = "o.npy")]
    pub out: PathBuf,
    /// Log-sum-exp of the scaled, masked scores [Lq, Hq] (-inf for rows that see no key).
    #[arg(long, value_name = "lse.npy")]
    pub lse: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(s) = a.scale {
        if !s.is_finite() {
            bail!("--scale {s} is not finite");
        }
    }
    if a.window == Some(0) {
        bail!("--window must be at least 1");
    }
    if a.lse.as_ref() == Some(&a.out) {
        bail!("--out and --lse name the same file {}", a.out.display());
    }
    let strategy = match a.implementation {
        Impl::Naive => Strategy::Naive,
        Impl::Tiled => {
            if a.q_tile == 0 || a.k_tile == 0 {
                bail!("--q-tile and --k-tile must be positive");
            }
            Strategy::Tiled {
                q_tile: a.q_tile,
                k_tile: a.k_tile,
            }
        }
        Impl::Paged => {
            let bs = a.block_size;
            if bs == 0 || bs > MAX_BLOCK_SIZE {
                bail!("--block-size {bs} is not in 1..={MAX_BLOCK_SIZE}");
            }
            let partition_size = a.partition_size.unwrap_or(512usize.div_ceil(bs) * bs);
            if partition_size == 0 || partition_size % bs != 0 {
                bail!("--partition-size {partition_size} is not a positive multiple of --block-size {bs}");
            }
            Strategy::Paged {
                block_size: bs,
                partition_size,
            }
        }
    };

    let q = read_float(&a.q, "--q")?;
    let k = read_float(&a.k, "--k")?;
    let v = read_float(&a.v, "--v")?;
    for (t, path, flag) in [(&k, &a.k, "--k"), (&v, &a.v, "--v")] {
        if t.dtype() != q.dtype() {
            bail!(
                "{}: {flag} is {} but --q {} is {}: q, k and v must share one dtype",
                path.display(),
                t.dtype(),
                a.q.display(),
                q.dtype()
            );
        }
    }
    let mask = a.mask.as_ref().map(|p| read_mask(p)).transpose()?;
    let inputs = Inputs {
        args: &a,
        mask: mask.as_ref().map(|m| m.view()),
        strategy,
    };
    match (q, k, v) {
        (Tensor::F32(q), Tensor::F32(k), Tensor::F32(v)) => inputs.compute(q, k, v),
        (Tensor::F64(q), Tensor::F64(k), Tensor::F64(v)) => inputs.compute(q, k, v),
        _ => unreachable!("dtypes checked above"),
    }
}

struct Inputs<'a> {
    args: &'a Args,
    mask: Option<ArrayViewD<'a, bool>>,
    strategy: Strategy,
}

impl Inputs<'_> {
    fn compute<T: Float + WritableElement>(
        &self,
        q: ArrayD<T>,
        k: ArrayD<T>,
        v: ArrayD<T>,
    ) -> Result<()> {
        let a = self.args;
        let q = rank3(q, &a.q, "--q", "[Lq, Hq, D]")?;
        let k = rank3(k, &a.k, "--k", "[Lk, Hkv, D]")?;
        let v = rank3(v, &a.v, "--v", "[Lk, Hkv, D]")?;
        let ((lq, hq, d), (lk, hkv, dk)) = (q.dim(), k.dim());
        if v.dim() != k.dim() {
            bail!(
                "{}: --v has shape {:?} but --k {} has {:?}; they must match",
                a.v.display(),
                v.shape(),
                a.k.display(),
                k.shape()
            );
        }
        if dk != d {
            bail!(
                "{}: --k head dim {dk} differs from --q {} head dim {d}",
                a.k.display(),
                a.q.display()
            );
        }
        if hkv == 0 || hq % hkv != 0 {
            bail!(
                "{}: --q's {hq} query heads are not divisible by --k {}'s {hkv} KV heads",
                a.q.display(),
                a.k.display()
            );
        }
        if d == 0 {
            bail!("{}: head dim D is 0", a.q.display());
        }
        if a.causal && lq > lk {
            bail!(
                "--causal needs Lq <= Lk (bottom-right alignment): --q {} has Lq = {lq}, --k {} has Lk = {lk}",
                a.q.display(),
                a.k.display()
            );
        }
        let mask = match (&self.mask, &a.mask) {
            (Some(m), Some(path)) => {
                if m.ndim() != 2 || m.shape() != [lq, lk] {
                    bail!(
                        "{}: --mask must have shape [Lq, Lk] = [{lq}, {lk}], got {:?}",
                        path.display(),
                        m.shape()
                    );
                }
                Some(m.view().into_dimensionality::<Ix2>()?)
            }
            _ => None,
        };
        finite(&q, &a.q, "--q")?;
        finite(&k, &a.k, "--k")?;
        finite(&v, &a.v, "--v")?;
        let cfg = AttentionConfig {
            masking: if a.causal {
                Masking::Causal
            } else {
                Masking::None
            },
            window: a.window,
            scale: a.scale,
            mask,
        };
        let res = attention(q.view(), k.view(), v.view(), &cfg, self.strategy)
            .with_context(|| format!("attention on {}", a.q.display()))?;
        let mut pending = vec![stage(&a.out, &res.out)?];
        if let Some(lse_path) = &a.lse {
            match stage(lse_path, &res.lse) {
                Ok(p) => pending.push(p),
                Err(e) => {
                    pending.iter().for_each(|p| p.discard());
                    return Err(e);
                }
            }
        }
        commit(pending)?;
        let seed_note = match self.strategy {
            Strategy::Paged { .. } => {
                format!(", block table scrambled with seed {SCRAMBLE_SEED:#x}")
            }
            _ => String::new(),
        };
        eprintln!(
            "attention: q [{lq}, {hq}, {d}] k/v [{lk}, {hkv}, {d}] {}, {:?}{seed_note} -> {}{}",
            T::NAME,
            self.strategy,
            a.out.display(),
            a.lse
                .as_ref()
                .map(|p| format!(", {}", p.display()))
                .unwrap_or_default()
        );
        Ok(())
    }
}

// ------------------------------------------------------------------ reading

enum Tensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
}

impl Tensor {
    fn dtype(&self) -> &'static str {
        match self {
            Tensor::F32(_) => "float32",
            Tensor::F64(_) => "float64",
        }
    }
}

/// The whole file, in a buffer whose start is 16-byte aligned, so the data
/// (at a header length that is a multiple of 16 or 64) is aligned for f64
/// and can be viewed in place. Sized by the file, never by its header.
struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn read(path: &Path, flag: &str) -> Result<Aligned> {
        let mut f = File::open(path)
            .map_err(|e| anyhow!("{}: cannot open {flag} file: {e}", path.display()))?;
        let len = f
            .metadata()
            .map_err(|e| anyhow!("{}: cannot stat {flag} file: {e}", path.display()))?
            .len();
        let len = usize::try_from(len)
            .map_err(|_| anyhow!("{}: {flag} file too large", path.display()))?;
        let mut buf = vec![0u8; len + 16];
        let start = buf.as_ptr().align_offset(16);
        f.read_exact(&mut buf[start..start + len])
            .map_err(|e| anyhow!("{}: cannot read {flag} file: {e}", path.display()))?;
        let magic = b"\x93NUMPY";
        if len < magic.len() || &buf[start..start + magic.len()] != magic {
            bail!(
                "{}: {flag} is not an .npy file (no \\x93NUMPY magic)",
                path.display()
            );
        }
        Ok(Aligned { buf, start, len })
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// numpy's name for a dtype descriptor, for messages.
fn dtype_name(descr: &str) -> &'static str {
    let d = descr.trim_matches(|c| c == '\'' || c == '"');
    match d.trim_start_matches(['<', '>', '|', '=']) {
        "f2" | "e" => "float16",
        "f4" | "f" => "float32",
        "f8" | "d" => "float64",
        "i1" | "b" => "int8",
        "u1" | "B" => "uint8",
        "i2" => "int16",
        "u2" => "uint16",
        "i4" => "int32",
        "u4" => "uint32",
        "i8" => "int64",
        "u8" => "uint64",
        "b1" | "?" => "bool",
        _ => "unsupported",
    }
}

/// Explain a view error of `path`'s contents; `wrong_descr` is what a
/// descriptor mismatch means for this argument.
fn view_error(path: &Path, flag: &str, e: ViewNpyError, wanted: &str) -> anyhow::Error {
    let p = path.display();
    match e {
        ViewNpyError::WrongDescriptor(d) => {
            let d = d.to_string();
            anyhow!(
                "{p}: {flag} has dtype {d} ({}); expected {wanted}",
                dtype_name(&d)
            )
        }
        ViewNpyError::NonNativeEndian => anyhow!(
            "{p}: {flag} is big-endian, which is not supported; expected {wanted} (numpy's default)"
        ),
        ViewNpyError::MissingBytes(n) => anyhow!(
            "{p}: {flag} is truncated: its header's shape needs {n} more data bytes than the file holds"
        ),
        ViewNpyError::ExtraBytes(n) => anyhow!(
            "{p}: {flag} has {n} bytes after the data its header describes (corrupt or wrong header)"
        ),
        ViewNpyError::LengthOverflow => {
            anyhow!("{p}: {flag} header's shape overflows the address space")
        }
        other => anyhow!("{p}: {flag} is not a valid .npy file: {other}"),
    }
}

fn read_float(path: &Path, flag: &str) -> Result<Tensor> {
    let file = Aligned::read(path, flag)?;
    let bytes = file.bytes();
    let wanted = "float32 ('<f4') or float64 ('<f8')";
    // Length is checked before alignment, so on a misaligned (but
    // well-sized) file falling back to a copying read is safe.
    let t = match ArrayViewD::<f32>::view_npy(bytes) {
        Ok(a) => Tensor::F32(a.to_owned()),
        Err(ViewNpyError::MisalignedData) => Tensor::F32(
            ArrayD::<f32>::read_npy(bytes)
                .map_err(|e| anyhow!("{}: {flag}: {e}", path.display()))?,
        ),
        Err(ViewNpyError::WrongDescriptor(_)) => match ArrayViewD::<f64>::view_npy(bytes) {
            Ok(a) => Tensor::F64(a.to_owned()),
            Err(ViewNpyError::MisalignedData) => Tensor::F64(
                ArrayD::<f64>::read_npy(bytes)
                    .map_err(|e| anyhow!("{}: {flag}: {e}", path.display()))?,
            ),
            Err(e) => return Err(view_error(path, flag, e, wanted)),
        },
        Err(e) => return Err(view_error(path, flag, e, wanted)),
    };
    Ok(t)
}

fn read_mask(path: &Path) -> Result<ArrayD<bool>> {
    let file = Aligned::read(path, "--mask")?;
    ArrayViewD::<bool>::view_npy(file.bytes())
        .map(|a| a.to_owned())
        .map_err(|e| match e {
            ViewNpyError::InvalidData(inner) => anyhow!(
                "{}: --mask holds a byte that is not a bool (0 or 1): {inner}",
                path.display()
            ),
            e => view_error(path, "--mask", e, "bool ('|b1')"),
        })
}

fn rank3<T>(a: ArrayD<T>, path: &Path, flag: &str, axes: &str) -> Result<ndarray::Array3<T>> {
    if a.ndim() != 3 {
        bail!(
            "{}: {flag} must have rank 3 {axes}, got rank {} with shape {:?}",
            path.display(),
            a.ndim(),
            a.shape()
        );
    }
    Ok(a.into_dimensionality::<Ix3>()?)
}

/// Reject NaN/Inf, naming the first offending index.
fn finite<T: Float>(a: &ndarray::Array3<T>, path: &Path, flag: &str) -> Result<()> {
    if let Some(((i, j, x), val)) = a.indexed_iter().find(|(_, v)| !v.is_finite()) {
        bail!(
            "{}: {flag} contains {} at index [{i}, {j}, {x}]",
            path.display(),
            val.to_f64()
        );
    }
    Ok(())
}

// ------------------------------------------------------------------ writing

/// A finished output under a temporary name beside its target.
struct Staged {
    tmp: PathBuf,
    target: PathBuf,
}

impl Staged {
    fn discard(&self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

fn stage<A: WriteNpyExt>(target: &Path, arr: &A) -> Result<Staged> {
    let name = target
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file name", target.display()))?;
    let tmp = target.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let staged = Staged {
        tmp,
        target: target.to_path_buf(),
    };
    let write = || -> Result<()> {
        let f = File::create(&staged.tmp)?;
        let mut w = BufWriter::new(f);
        arr.write_npy(&mut w)?;
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        staged.discard();
        return Err(anyhow!("{}: cannot write output: {e:#}", target.display()));
    }
    Ok(staged)
}

/// Rename every staged file onto its target; on the first failure remove
/// the temporaries not yet renamed.
fn commit(pending: Vec<Staged>) -> Result<()> {
    for (n, s) in pending.iter().enumerate() {
        if let Err(e) = fs::rename(&s.tmp, &s.target) {
            pending[n..].iter().for_each(Staged::discard);
            bail!("{}: cannot move output into place: {e}", s.target.display());
        }
    }
    Ok(())
}
