//! GGUF v3 reader (llama.cpp's model file format) and a small writer for tests.
//!
//! ```text
//!   offset 0   "GGUF" magic (4 bytes), version u32 (= 3; 2 is read too)
//!              n_tensors u64, n_kv u64
//!              n_kv x { key: string, type: u32, value }      metadata
//!              n_tensors x { name: string, n_dims: u32,       tensor infos
//!                            ne[n_dims]: u64, ggml_type: u32, offset: u64 }
//!              padding to `general.alignment` (default 32)
//!   data_offset  tensor data; each tensor at data_offset + offset
//!   string = u64 length + UTF-8 bytes; array = elem type u32, n u64, n values
//! ```
//! `ne[0]` is the fastest-varying dimension, so a linear weight stored with
//! `ne = [in, out]` is the row-major `[out, in]` matrix of PyTorch; [`GgufTensorInfo::shape`]
//! gives the row-major (reversed) shape.
//!
//! Why shaped so: the file is memory-mapped ([`memmap2`]) and parsed by a bounds-checked
//! cursor. Every length read from the header is checked against the bytes that remain
//! *before* anything is allocated from it (an array of `n` strings needs at least `8n`
//! bytes, a tensor info at least 24), so a corrupt or hostile file produces a
//! [`ModelsError`] naming the file and the field, never a panic or a huge allocation.
//!
//! [`load_checkpoint`] turns a `llama`-architecture file into the crate's common
//! [`Checkpoint`]: llama.cpp tensor names become Hugging Face names, every tensor is
//! dequantized to f32 ([`dequantize`]: F32, F16, BF16, Q8_0, Q4_0, Q4_1 with llama.cpp's
//! exact block layouts), and the q/k row permutation that `convert_hf_to_gguf.py`
//! applies for llama.cpp's interleaved RoPE is undone ([`unpermute_qk_rows`]), so the
//! result is in HF layout with [`RopeLayout::RotateHalf`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::checkpoint::{check_complete, expected_shape};
use crate::{Checkpoint, CheckpointFormat, ModelConfig, ModelsError, Result, RopeLayout, Tensor};

/// `"GGUF"` read as a little-endian u32.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml supports at most 4 dimensions.
pub const MAX_DIMS: u32 = 4;
/// Nesting limit for arrays of arrays (guards the parser's recursion).
const MAX_ARRAY_DEPTH: u32 = 4;

// ---------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------

/// A ggml tensor element type, with its id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    Bf16,
}

impl GgmlType {
    /// The type for a file's type id; `None` for ids this reader does not know
    /// the block layout of (their tensors could not even be bounds-checked).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => Bf16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            Bf16 => 30,
        }
    }

    /// llama.cpp's name for the type.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            Bf16 => "BF16",
        }
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | F16 | Bf16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 => 32,
            Q2K | Q3K | Q4K | Q5K | Q6K | Q8K => 256,
        }
    }

    /// Bytes per block (ggml's `type_size`), from the C structs in `ggml-common.h`.
    pub fn type_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | Bf16 | I16 => 2,
            I8 => 1,
            I64 | F64 => 8,
            Q4_0 => 2 + 16,           // d: f16, qs[16]
            Q4_1 => 2 + 2 + 16,       // d, m: f16, qs[16]
            Q5_0 => 2 + 4 + 16,       // d, qh[4], qs[16]
            Q5_1 => 4 + 4 + 16,       // d, m, qh[4], qs[16]
            Q8_0 => 2 + 32,           // d: f16, qs: i8[32]
            Q8_1 => 4 + 32,           // d, s: f16, qs: i8[32]
            Q2K => 16 + 64 + 4,       // scales[16], qs[64], d, dmin
            Q3K => 32 + 64 + 12 + 2,  // hmask[32], qs[64], scales[12], d
            Q4K => 4 + 12 + 128,      // d, dmin, scales[12], qs[128]
            Q5K => 4 + 12 + 32 + 128, // d, dmin, scales[12], qh[32], qs[128]
            Q6K => 128 + 64 + 16 + 2, // ql, qh, scales: i8[16], d
            Q8K => 4 + 256 + 32,      // d: f32, qs[256], bsums: i16[16]
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------
// metadata values
// ---------------------------------------------------------------------------

/// GGUF metadata value type ids.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetaArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored by element type (no per-element enum overhead, so a
/// 49,152-entry vocabulary costs what its strings cost).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetaArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl MetaArray {
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Integer elements as i64 (any integer element type), else `None`.
    pub fn as_i64s(&self) -> Option<Vec<i64>> {
        Some(match self {
            MetaArray::U8(v) => v.iter().map(|&x| x as i64).collect(),
            MetaArray::I8(v) => v.iter().map(|&x| x as i64).collect(),
            MetaArray::U16(v) => v.iter().map(|&x| x as i64).collect(),
            MetaArray::I16(v) => v.iter().map(|&x| x as i64).collect(),
            MetaArray::U32(v) => v.iter().map(|&x| x as i64).collect(),
            MetaArray::I32(v) => v.iter().map(|&x| x as i64).collect(),
            MetaArray::I64(v) => v.clone(),
            MetaArray::U64(v) => v.iter().map(|&x| x as i64).collect(),
            _ => return None,
        })
    }
}

impl MetaValue {
    /// Any integer type as u64 (negative values give `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// Any numeric type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// The GGUF type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }
}

// ---------------------------------------------------------------------------
// bounds-checked cursor
// ---------------------------------------------------------------------------

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let start = self.pos as u64;
        let len = self.buf.len() as u64;
        match start.checked_add(n) {
            Some(end) if end <= len => {
                let s = &self.buf[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            end => Err(ModelsError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                start,
                end: end.unwrap_or(u64::MAX),
                len,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        Ok(s.try_into().expect("take returned N bytes"))
    }
    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &dyn Fn() -> String) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(&|| format!("{} (string length)", what()))?;
        let bytes = self.take(n, &|| format!("{} (string of {n} bytes)", what()))?;
        String::from_utf8(bytes.to_vec()).map_err(|e| ModelsError::Corrupt {
            path: self.path.to_path_buf(),
            what: format!("{}: string is not UTF-8 ({e})", what()),
        })
    }

    /// Checks that `n` elements of at least `min_size` bytes each fit in what
    /// remains, so a lying count cannot size an allocation.
    fn check_count(&self, n: u64, min_size: u64, what: &dyn Fn() -> String) -> Result<usize> {
        let need = n.checked_mul(min_size);
        match need {
            Some(need) if need <= self.remaining() => Ok(n as usize),
            _ => Err(ModelsError::Corrupt {
                path: self.path.to_path_buf(),
                what: format!(
                    "{}: count {n} x at least {min_size} bytes each exceeds the {} bytes left in the file",
                    what(),
                    self.remaining()
                ),
            }),
        }
    }
}

fn min_value_size(ty: u32) -> u64 {
    match ty {
        vt::U8 | vt::I8 | vt::BOOL => 1,
        vt::U16 | vt::I16 => 2,
        vt::U32 | vt::I32 | vt::F32 => 4,
        vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
        vt::ARRAY => 12,
        _ => 1,
    }
}

fn read_value(c: &mut Cursor<'_>, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
    let what = || format!("metadata `{key}`");
    Ok(match ty {
        vt::U8 => MetaValue::U8(c.u8(&what)?),
        vt::I8 => MetaValue::I8(c.u8(&what)? as i8),
        vt::U16 => MetaValue::U16(c.u16(&what)?),
        vt::I16 => MetaValue::I16(c.u16(&what)? as i16),
        vt::U32 => MetaValue::U32(c.u32(&what)?),
        vt::I32 => MetaValue::I32(c.u32(&what)? as i32),
        vt::F32 => MetaValue::F32(f32::from_bits(c.u32(&what)?)),
        vt::U64 => MetaValue::U64(c.u64(&what)?),
        vt::I64 => MetaValue::I64(c.u64(&what)? as i64),
        vt::F64 => MetaValue::F64(f64::from_bits(c.u64(&what)?)),
        vt::BOOL => MetaValue::Bool(read_bool(c, key)?),
        vt::STRING => MetaValue::String(c.string(&what)?),
        vt::ARRAY => MetaValue::Array(read_array(c, key, depth)?),
        other => {
            return Err(ModelsError::Corrupt {
                path: c.path.to_path_buf(),
                what: format!("metadata `{key}`: unknown value type {other}"),
            })
        }
    })
}

fn read_bool(c: &mut Cursor<'_>, key: &str) -> Result<bool> {
    match c.u8(&|| format!("metadata `{key}`"))? {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(ModelsError::Corrupt {
            path: c.path.to_path_buf(),
            what: format!("metadata `{key}`: bool byte is {b}, not 0 or 1"),
        }),
    }
}

fn read_array(c: &mut Cursor<'_>, key: &str, depth: u32) -> Result<MetaArray> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(ModelsError::Corrupt {
            path: c.path.to_path_buf(),
            what: format!("metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"),
        });
    }
    let what = || format!("metadata `{key}` (array header)");
    let ty = c.u32(&what)?;
    let n = c.u64(&what)?;
    let n = c.check_count(n, min_value_size(ty), &|| format!("metadata `{key}` array"))?;
    macro_rules! prim {
        ($variant:ident, $read:expr) => {{
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push($read);
            }
            MetaArray::$variant(v)
        }};
    }
    let ew = || format!("metadata `{key}` (array element)");
    Ok(match ty {
        vt::U8 => MetaArray::U8(c.take(n as u64, &ew)?.to_vec()),
        vt::I8 => MetaArray::I8(c.take(n as u64, &ew)?.iter().map(|&b| b as i8).collect()),
        vt::U16 => prim!(U16, c.u16(&ew)?),
        vt::I16 => prim!(I16, c.u16(&ew)? as i16),
        vt::U32 => prim!(U32, c.u32(&ew)?),
        vt::I32 => prim!(I32, c.u32(&ew)? as i32),
        vt::F32 => prim!(F32, f32::from_bits(c.u32(&ew)?)),
        vt::U64 => prim!(U64, c.u64(&ew)?),
        vt::I64 => prim!(I64, c.u64(&ew)? as i64),
        vt::F64 => prim!(F64, f64::from_bits(c.u64(&ew)?)),
        vt::BOOL => prim!(Bool, read_bool(c, key)?),
        vt::STRING => prim!(String, c.string(&ew)?),
        vt::ARRAY => prim!(Array, read_array(c, key, depth + 1)?),
        other => {
            return Err(ModelsError::Corrupt {
                path: c.path.to_path_buf(),
                what: format!("metadata `{key}`: unknown array element type {other}"),
            })
        }
    })
}

// ---------------------------------------------------------------------------
// the file
// ---------------------------------------------------------------------------

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` varies fastest.
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes of data (checked to lie inside the file).
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    pub fn numel(&self) -> u64 {
        self.ne.iter().product()
    }
    /// Row-major shape (`ne` reversed): `[out, in]` for a linear weight.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened, fully validated GGUF file (memory-mapped).
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    h: Header,
}

/// Everything the header says, validated against the file length.
#[derive(Debug, Clone)]
struct Header {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: BTreeMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.h.version)
            .field("n_kv", &self.h.metadata.len())
            .field("n_tensors", &self.h.tensors.len())
            .field("alignment", &self.h.alignment)
            .field("data_offset", &self.h.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses `path`; every header field is checked (see the module doc).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let io = |source| ModelsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath by another
        // process is outside this program's contract (as for every mmap loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let h = parse(path, &map)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            h,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.h.version
    }
    pub fn alignment(&self) -> u64 {
        self.h.alignment
    }
    /// File offset where tensor data starts.
    pub fn data_offset(&self) -> u64 {
        self.h.data_offset
    }
    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.h.metadata
    }
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.h.metadata.get(key)
    }
    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.h.tensors
    }
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.h.by_name.get(name).map(|&i| &self.h.tensors[i])
    }

    fn field_err(&self, key: &str, reason: String) -> ModelsError {
        ModelsError::Field {
            path: self.path.clone(),
            field: key.into(),
            reason,
        }
    }

    /// A required unsigned integer (any integer type).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self
            .get(key)
            .ok_or_else(|| self.field_err(key, "missing".into()))?;
        v.as_u64().ok_or_else(|| {
            self.field_err(
                key,
                format!("expected an unsigned integer, found {}", v.type_name()),
            )
        })
    }
    /// A required number (any numeric type).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self
            .get(key)
            .ok_or_else(|| self.field_err(key, "missing".into()))?;
        v.as_f64().ok_or_else(|| {
            self.field_err(key, format!("expected a number, found {}", v.type_name()))
        })
    }
    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self
            .get(key)
            .ok_or_else(|| self.field_err(key, "missing".into()))?;
        v.as_str().ok_or_else(|| {
            self.field_err(key, format!("expected a string, found {}", v.type_name()))
        })
    }
    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.get(key) {
            None => Err(self.field_err(key, "missing".into())),
            Some(MetaValue::Array(MetaArray::String(v))) => Ok(v),
            Some(v) => Err(self.field_err(
                key,
                format!("expected an array of strings, found {}", v.type_name()),
            )),
        }
    }
    /// Optional unsigned integer: `Ok(None)` when absent, an error when mistyped.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        if self.get(key).is_some() {
            self.get_u64(key).map(Some)
        } else {
            Ok(None)
        }
    }
    /// Optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        if self.get(key).is_some() {
            self.get_f64(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `general.architecture` (e.g. `llama`).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// The raw bytes of a tensor (already bounds-checked at open).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let start = (self.h.data_offset + info.offset) as usize;
        &self.map[start..start + info.n_bytes as usize]
    }

    /// A tensor dequantized to f32, in row-major (reversed `ne`) shape.
    pub fn dequantize(&self, name: &str) -> Result<Tensor> {
        let info = self.tensor_info(name).ok_or_else(|| ModelsError::Tensor {
            path: self.path.clone(),
            name: name.into(),
            reason: "not in the file".into(),
        })?;
        let data = dequantize(
            info.ggml_type,
            self.tensor_bytes(info),
            info.numel() as usize,
        )
        .map_err(|reason| ModelsError::Tensor {
            path: self.path.clone(),
            name: name.into(),
            reason,
        })?;
        Ok(Tensor {
            shape: info.shape(),
            data,
        })
    }

    /// The model shape from `{arch}.*` metadata, in HF `config.json` terms.
    ///
    /// `vocab_size` comes from `{arch}.vocab_size`, else the token list, else the
    /// embedding's shape; the classifier is tied when `output.weight` is absent
    /// (llama.cpp then reuses `token_embd.weight`).
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?.to_string();
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.get_u64(&k("embedding_length"))?;
        let heads = self.get_u64(&k("attention.head_count"))?;
        let kv_heads = self
            .opt_u64(&k("attention.head_count_kv"))?
            .unwrap_or(heads);
        let vocab = match self.opt_u64(&k("vocab_size"))? {
            Some(v) => v,
            None => match self.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
                Some(a) => a.len() as u64,
                None => match self.tensor_info("token_embd.weight") {
                    Some(t) if t.ne.len() == 2 => t.ne[1],
                    _ => {
                        return Err(self.field_err(
                            &k("vocab_size"),
                            "missing (and no token list or embedding to infer it from)".into(),
                        ))
                    }
                },
            },
        };
        let head_dim = match self.opt_u64(&k("attention.key_length"))? {
            Some(d) if heads > 0 && d != hidden / heads => Some(d),
            _ => None,
        };
        let eps = self
            .opt_f64(&k("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        let cfg = ModelConfig {
            model_type: arch.clone(),
            hidden_size: hidden,
            intermediate_size: self.get_u64(&k("feed_forward_length"))?,
            num_hidden_layers: self.get_u64(&k("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim,
            vocab_size: vocab,
            max_position_embeddings: self.get_u64(&k("context_length"))?,
            rope_theta: self.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rms_norm_eps: eps,
            tie_word_embeddings: self.tensor_info("output.weight").is_none(),
            sliding_window: None,
            num_local_experts: self.opt_u64(&k("expert_count"))?.filter(|&e| e > 0),
            num_experts_per_tok: self.opt_u64(&k("expert_used_count"))?.filter(|&e| e > 0),
            hidden_act: "silu".into(),
            attention_bias: if self.tensor_info("blk.0.attn_q.bias").is_some() {
                Some(true)
            } else {
                None
            },
            parallel_attn: None,
            norm_type: None,
            torch_dtype: None,
            bos_token_id: self.opt_u64("tokenizer.ggml.bos_token_id")?,
            eos_token_id: self.opt_u64("tokenizer.ggml.eos_token_id")?,
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }
}

/// Parses and validates the header of `buf` (the whole file).
fn parse(path: &Path, buf: &[u8]) -> Result<Header> {
    let mut c = Cursor { buf, pos: 0, path };
    let corrupt = |what: String| ModelsError::Corrupt {
        path: path.to_path_buf(),
        what,
    };
    let magic = c.array::<4>(&|| "magic".into())?;
    if magic != GGUF_MAGIC {
        return Err(corrupt(format!(
            "bad magic {magic:02x?} (expected \"GGUF\"); not a GGUF file"
        )));
    }
    let version = c.u32(&|| "version".into())?;
    if !(2..=3).contains(&version) {
        return Err(ModelsError::Unsupported {
            path: path.to_path_buf(),
            what: format!("GGUF version {version} (this reader reads 2 and 3)"),
        });
    }
    let n_tensors = c.u64(&|| "n_tensors".into())?;
    let n_kv = c.u64(&|| "n_kv".into())?;
    // A kv pair needs >= 8 (key len) + 4 (type) + 1 bytes; a tensor info >= 8 + 4 + 4 + 8.
    let n_kv = c.check_count(n_kv, 13, &|| "n_kv (metadata count)".into())?;
    let n_tensors_checked = c.check_count(n_tensors, 24, &|| "n_tensors".into())?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let ty = c.u32(&|| format!("metadata `{key}` (type)"))?;
        let v = read_value(&mut c, ty, &key, 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(corrupt(format!("metadata key `{key}` appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(ModelsError::Field {
                    path: path.to_path_buf(),
                    field: "general.alignment".into(),
                    reason: format!("{v:?} is not a positive power of two"),
                })
            }
        },
    };

    let mut tensors = Vec::with_capacity(n_tensors_checked);
    let mut by_name = BTreeMap::new();
    for i in 0..n_tensors_checked {
        let name = c.string(&|| format!("tensor info #{i} (name)"))?;
        let w = || format!("tensor info `{name}`");
        let n_dims = c.u32(&w)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(ModelsError::Tensor {
                path: path.to_path_buf(),
                name,
                reason: format!("n_dims = {n_dims}, expected 1..={MAX_DIMS}"),
            });
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(c.u64(&w)?);
        }
        let type_id = c.u32(&w)?;
        let offset = c.u64(&w)?;
        let terr = |reason: String| ModelsError::Tensor {
            path: path.to_path_buf(),
            name: name.clone(),
            reason,
        };
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| terr(format!("unknown ggml type {type_id}")))?;
        let numel = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| terr(format!("dimensions {ne:?} overflow")))?;
        if ne[0] % ggml_type.block_size() != 0 {
            return Err(terr(format!(
                "ne[0] = {} is not a multiple of the {} block size {}",
                ne[0],
                ggml_type,
                ggml_type.block_size()
            )));
        }
        let n_bytes = (numel / ggml_type.block_size())
            .checked_mul(ggml_type.type_size())
            .ok_or_else(|| terr(format!("byte size of {ne:?} overflows")))?;
        if offset % alignment != 0 {
            return Err(terr(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if by_name.insert(name.clone(), i).is_some() {
            return Err(terr("name appears twice".into()));
        }
        tensors.push(GgufTensorInfo {
            name,
            ne,
            ggml_type,
            offset,
            n_bytes,
        });
    }
    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    let len = buf.len() as u64;
    for t in &tensors {
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(_), Some(end)) if end <= len => {}
            _ => {
                return Err(ModelsError::Truncated {
                    path: path.to_path_buf(),
                    what: format!("tensor `{}` ({} {:?})", t.name, t.ggml_type, t.ne),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    len,
                })
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        by_name,
        alignment,
        data_offset,
    })
}

// ---------------------------------------------------------------------------
// dequantization
// ---------------------------------------------------------------------------

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` elements of `ty` from `bytes` to f32.
///
/// Block layouts (llama.cpp `ggml-common.h`, `dequantize_row_*` in `ggml-quants.c`):
/// ```text
///   Q8_0  [d: f16][qs: i8 x 32]               y[j] = d * qs[j]
///   Q4_0  [d: f16][qs: u8 x 16]               y[j] = d * ((qs[j] & 15) - 8),
///                                             y[j+16] = d * ((qs[j] >> 4) - 8)
///   Q4_1  [d: f16][m: f16][qs: u8 x 16]       y[j] = d * (qs[j] & 15) + m,
///                                             y[j+16] = d * (qs[j] >> 4) + m
/// ```
/// Errors (as a reason string) for types without a dequantizer here, and when
/// `bytes` does not hold exactly `n` elements.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let bs = ty.block_size() as usize;
    let ts = ty.type_size() as usize;
    if n % bs != 0 || bytes.len() != n / bs * ts {
        return Err(format!(
            "{ty}: {} bytes do not hold {n} elements ({ts} bytes per {bs})",
            bytes.len()
        ));
    }
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| d * ((q & 15) as i32 - 8) as f32));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
            }
        }
        GgmlType::Q4_1 => {
            for b in bytes.chunks_exact(20) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| d * (q & 15) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
        other => return Err(format!("ggml type {other} has no dequantizer here (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")),
    }
    Ok(out)
}

/// Reference quantizers (llama.cpp's `quantize_row_*_ref`), used by tests and
/// by the test-file writer: they make blocks the dequantizer must invert.
pub mod quant_ref {
    use half::f16;

    /// Q8_0: `d = amax / 127`, `q = round(x / d)`.
    pub fn q8_0(x: &[f32]) -> Vec<u8> {
        assert!(x.len() % 32 == 0, "Q8_0 needs whole blocks of 32");
        let mut out = Vec::with_capacity(x.len() / 32 * 34);
        for blk in x.chunks_exact(32) {
            let amax = blk.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend(blk.iter().map(|&v| (v * id).round() as i8 as u8));
        }
        out
    }

    /// Q4_0: `d = max / -8` (signed value of largest magnitude), `q = min(15, x/d + 8.5)`.
    pub fn q4_0(x: &[f32]) -> Vec<u8> {
        assert!(x.len() % 32 == 0, "Q4_0 needs whole blocks of 32");
        let mut out = Vec::with_capacity(x.len() / 32 * 18);
        for blk in x.chunks_exact(32) {
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in blk {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            for j in 0..16 {
                let q0 = ((blk[j] * id + 8.5) as u8).min(15);
                let q1 = ((blk[j + 16] * id + 8.5) as u8).min(15);
                out.push(q0 | (q1 << 4));
            }
        }
        out
    }

    /// Q4_1: `d = (max - min) / 15`, `m = min`, `q = min(15, (x - m)/d + 0.5)`.
    pub fn q4_1(x: &[f32]) -> Vec<u8> {
        assert!(x.len() % 32 == 0, "Q4_1 needs whole blocks of 32");
        let mut out = Vec::with_capacity(x.len() / 32 * 20);
        for blk in x.chunks_exact(32) {
            let min = blk.iter().cloned().fold(f32::INFINITY, f32::min);
            let max = blk.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
            for j in 0..16 {
                let q0 = (((blk[j] - min) * id + 0.5) as u8).min(15);
                let q1 = (((blk[j + 16] - min) * id + 0.5) as u8).min(15);
                out.push(q0 | (q1 << 4));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// llama.cpp -> Hugging Face
// ---------------------------------------------------------------------------

/// The Hugging Face name of a llama.cpp tensor name (llama family), or `None`
/// for tensors with no HF counterpart in the common checkpoint form.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes `convert_hf_to_gguf.py`'s `permute(w, n_head, n_head_kv)` on the rows
/// of a q or k projection (weight `[heads*D, in]` or bias `[heads*D]`, `row_len`
/// = `in` or 1).
///
/// The converter reshapes rows as `[heads, 2, D/2]` and swaps the last two axes,
/// so GGUF row `h*D + 2i + s` holds HF row `h*D + s*D/2 + i` (s in {0, 1}):
/// llama.cpp's RoPE then rotates adjacent pairs, HF's rotates halves.
pub fn unpermute_qk_rows(data: &[f32], heads: usize, row_len: usize) -> Vec<f32> {
    let rows = data.len() / row_len;
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let src = h * d + 2 * i + s;
                let dst = h * d + s * half + i;
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

/// The converter's `permute` (HF -> GGUF), the inverse of [`unpermute_qk_rows`];
/// the slow twin the tests check it against.
pub fn permute_qk_rows(data: &[f32], heads: usize, row_len: usize) -> Vec<f32> {
    let rows = data.len() / row_len;
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0f32; data.len()];
    // reshape(heads, 2, half, row) -> swapaxes(1, 2) -> (heads, half, 2, row)
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let src = (h * 2 + s) * half + i; // index in (heads, 2, half)
                let dst = (h * half + i) * 2 + s; // index in (heads, half, 2)
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

/// Loads a llama-family GGUF as a [`Checkpoint`] (HF names, f32, rotate-half).
///
/// Every tensor of a standard Llama layout must be present with the shape the
/// metadata implies; tensors with no HF counterpart (e.g. `rope_freqs.weight`)
/// are an error rather than silently dropped, since the forward pass would
/// ignore them.
pub fn load_checkpoint(path: impl AsRef<Path>) -> Result<Checkpoint> {
    let f = GgufFile::open(path)?;
    f.to_checkpoint()
}

impl GgufFile {
    /// See [`load_checkpoint`].
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        let arch = self.architecture()?;
        // Only llama-architecture files carry the permuted q/k rows; qwen2 files
        // are converted without it.
        let permuted = match arch {
            "llama" => true,
            "qwen2" => false,
            other => {
                return Err(ModelsError::Unsupported {
                    path: self.path.clone(),
                    what: format!(
                        "general.architecture `{other}` (this loader reads llama and qwen2)"
                    ),
                })
            }
        };
        let cfg = self.model_config()?;
        // Tensors are converted in parallel (each on its own), then inserted in
        // file order; the first error in file order is returned, so the message
        // does not depend on which thread failed first.
        use rayon::prelude::*;
        let converted: Vec<Result<(String, Tensor)>> = self
            .h
            .tensors
            .par_iter()
            .map(|info| {
                let terr = |reason: String| ModelsError::Tensor {
                    path: self.path.clone(),
                    name: info.name.clone(),
                    reason,
                };
                let hf = hf_name(&info.name).ok_or_else(|| {
                    terr("no Hugging Face counterpart for this llama.cpp tensor name".into())
                })?;
                let want = expected_shape(&cfg, &hf).ok_or_else(|| {
                    terr(format!(
                        "`{hf}` is not part of a {arch} model with this config"
                    ))
                })?;
                let mut t = self.dequantize(&info.name)?;
                if t.shape != want {
                    return Err(terr(format!(
                        "shape {:?} but the metadata implies {want:?} for `{hf}`",
                        t.shape
                    )));
                }
                if permuted {
                    let heads = if hf.contains(".q_proj.") {
                        Some(cfg.num_attention_heads as usize)
                    } else if hf.contains(".k_proj.") {
                        Some(cfg.num_kv_heads() as usize)
                    } else {
                        None
                    };
                    if let Some(heads) = heads {
                        let row_len = if t.shape.len() == 2 { t.shape[1] } else { 1 };
                        t.data = unpermute_qk_rows(&t.data, heads, row_len);
                    }
                }
                Ok((hf, t))
            })
            .collect();
        let mut tensors = BTreeMap::new();
        for c in converted {
            let (hf, t) = c?;
            tensors.insert(hf, t);
        }
        check_complete(&cfg, &tensors, &self.path)?;
        Ok(Checkpoint {
            path: self.path.clone(),
            format: CheckpointFormat::Gguf,
            config: cfg,
            rope_layout: RopeLayout::RotateHalf,
            tensors,
        })
    }
}

// ---------------------------------------------------------------------------
// writer (tests, fixtures)
// ---------------------------------------------------------------------------

/// Builds small GGUF v3 files in memory: for tests and fixtures, not for
/// converting real models.
#[derive(Debug, Default, Clone)]
pub struct GgufWriter {
    kv: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    alignment: Option<u64>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => vt::U8,
        MetaValue::I8(_) => vt::I8,
        MetaValue::U16(_) => vt::U16,
        MetaValue::I16(_) => vt::I16,
        MetaValue::U32(_) => vt::U32,
        MetaValue::I32(_) => vt::I32,
        MetaValue::F32(_) => vt::F32,
        MetaValue::Bool(_) => vt::BOOL,
        MetaValue::String(_) => vt::STRING,
        MetaValue::Array(_) => vt::ARRAY,
        MetaValue::U64(_) => vt::U64,
        MetaValue::I64(_) => vt::I64,
        MetaValue::F64(_) => vt::F64,
    }
}

fn array_type(a: &MetaArray) -> u32 {
    match a {
        MetaArray::U8(_) => vt::U8,
        MetaArray::I8(_) => vt::I8,
        MetaArray::U16(_) => vt::U16,
        MetaArray::I16(_) => vt::I16,
        MetaArray::U32(_) => vt::U32,
        MetaArray::I32(_) => vt::I32,
        MetaArray::F32(_) => vt::F32,
        MetaArray::Bool(_) => vt::BOOL,
        MetaArray::String(_) => vt::STRING,
        MetaArray::Array(_) => vt::ARRAY,
        MetaArray::U64(_) => vt::U64,
        MetaArray::I64(_) => vt::I64,
        MetaArray::F64(_) => vt::F64,
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    out.extend_from_slice(&array_type(a).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        MetaArray::U8(v) => out.extend_from_slice(v),
        MetaArray::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        MetaArray::U16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::I16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::U32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::I32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::Bool(v) => out.extend(v.iter().map(|&x| x as u8)),
        MetaArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
        MetaArray::Array(v) => v.iter().for_each(|a| put_array(out, a)),
        MetaArray::U64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::I64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::F64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => put_array(out, a),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a metadata pair (written in insertion order).
    pub fn kv(&mut self, key: &str, v: MetaValue) -> &mut Self {
        if key == "general.alignment" {
            self.alignment = v.as_u64();
        }
        self.kv.push((key.into(), v));
        self
    }
    /// Adds a tensor: `ne` in ggml order, `data` already encoded as `ty`.
    pub fn tensor(&mut self, name: &str, ne: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), ne.to_vec(), ty, data));
        self
    }
    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment.unwrap_or(DEFAULT_ALIGNMENT).max(1);
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, ne, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(ne.len() as u32).to_le_bytes());
            for d in ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(align) * align;
        }
        let data_start = (out.len() as u64).div_ceil(align) * align;
        out.resize(data_start as usize, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests;
