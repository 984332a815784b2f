//! safetensors checkpoints: a Hugging Face model directory in, f32
//! [`Checkpoint`] out; and an atomic writer for the files later stages produce
//! (quantized GPTQ tensors, test fixtures).
//!
//! ```text
//!   file   = [N: u64 LE][header: N bytes of JSON][data]
//!   header = { "__metadata__": {str: str}?,
//!              name: { "dtype": "F32"|"F16"|"BF16"|"I32"|..., "shape": [..],
//!                      "data_offsets": [begin, end] }, ... }   offsets relative to data
//!   dir    = config.json + (model.safetensors
//!                          | model.safetensors.index.json {"weight_map": {name: shard}} + shards)
//! ```
//! The header is parsed here rather than by the `safetensors` crate so that
//! every error names the tensor and the numbers that disagree. The checks, each
//! before anything is sized from the header: `N` within the file (and at most
//! 100 MB, the format's own limit); every dtype known; `numel x size ==
//! end - begin` with checked arithmetic; the tensors tile the data section
//! exactly (no gap, no overlap, ending at the end of the file, as the format
//! requires). Shapes are then checked against `config.json`.
//!
//! `config.json` is read leniently: real files carry dozens of fields this
//! crate does not model (`architectures`, `rope_scaling`, `transformers_version`,
//! ...), so only the fields [`ModelConfig`] has are read, each type-checked.
//! (The TOML catalog, which this project writes, denies unknown fields.)
//!
//! Writing goes to a temporary name in the target directory, is synced, then
//! renamed over the target: a reader never sees half a file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value;

pub use safetensors::Dtype as StDtype;

use crate::checkpoint::{check_complete, expected_shape};
use crate::{Checkpoint, CheckpointFormat, ModelConfig, ModelsError, Result, RopeLayout, Tensor};

/// The format's header size limit (`safetensors::tensor::MAX_HEADER_SIZE`).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

fn corrupt(path: &Path, what: String) -> ModelsError {
    ModelsError::Corrupt {
        path: path.to_path_buf(),
        what,
    }
}

fn dtype_from_name(s: &str) -> Option<StDtype> {
    use StDtype::*;
    Some(match s {
        "BOOL" => BOOL,
        "U8" => U8,
        "I8" => I8,
        "F8_E5M2" => F8_E5M2,
        "F8_E4M3" => F8_E4M3,
        "I16" => I16,
        "U16" => U16,
        "F16" => F16,
        "BF16" => BF16,
        "I32" => I32,
        "U32" => U32,
        "F32" => F32,
        "F64" => F64,
        "I64" => I64,
        "U64" => U64,
        _ => return None,
    })
}

/// One tensor's header entry, validated against the file.
#[derive(Debug, Clone, PartialEq)]
pub struct StTensorInfo {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// An opened, validated safetensors file (memory-mapped).
pub struct SafetensorsFile {
    path: PathBuf,
    map: memmap2::Mmap,
    tensors: BTreeMap<String, StTensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Parses and validates a safetensors header; `buf` is the whole file.
fn parse_header(
    path: &Path,
    buf: &[u8],
) -> Result<(BTreeMap<String, StTensorInfo>, BTreeMap<String, String>)> {
    let len = buf.len() as u64;
    if len < 8 {
        return Err(ModelsError::Truncated {
            path: path.to_path_buf(),
            what: "header length (u64)".into(),
            start: 0,
            end: 8,
            len,
        });
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(corrupt(
            path,
            format!("header length {n} exceeds the format's limit of {MAX_HEADER_BYTES} bytes"),
        ));
    }
    if 8 + n > len {
        return Err(ModelsError::Truncated {
            path: path.to_path_buf(),
            what: format!("JSON header of {n} bytes"),
            start: 8,
            end: 8 + n,
            len,
        });
    }
    let data_start = 8 + n as usize;
    let text = std::str::from_utf8(&buf[8..data_start])
        .map_err(|e| corrupt(path, format!("header is not UTF-8: {e}")))?;
    let json: BTreeMap<String, Value> = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| corrupt(path, format!("header is not a JSON object: {e}")))?;
    let data_len = buf.len() - data_start;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in json {
        if name == "__metadata__" {
            let obj = v
                .as_object()
                .ok_or_else(|| corrupt(path, "`__metadata__` is not an object".into()))?;
            for (k, v) in obj {
                let s = v
                    .as_str()
                    .ok_or_else(|| corrupt(path, format!("`__metadata__.{k}` is not a string")))?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let terr = |reason: String| ModelsError::Tensor {
            path: path.to_path_buf(),
            name: name.clone(),
            reason,
        };
        let dtype_s = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| terr("header entry has no string `dtype`".into()))?;
        let dtype =
            dtype_from_name(dtype_s).ok_or_else(|| terr(format!("unknown dtype `{dtype_s}`")))?;
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| terr("header entry has no `shape` array".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| terr("`shape` holds a non-integer".into()))?;
        let offs = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| terr("`data_offsets` is not [begin, end]".into()))?;
        let (b, e) = offs;
        if b > e || e > data_len as u64 {
            return Err(terr(format!(
                "data_offsets [{b}, {e}] do not lie inside the {data_len}-byte data section"
            )));
        }
        let nbytes = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        if nbytes as u64 != e - b {
            return Err(terr(format!(
                "shape {shape:?} of {dtype:?} needs {nbytes} bytes but data_offsets [{b}, {e}] span {}",
                e - b
            )));
        }
        tensors.insert(
            name.clone(),
            StTensorInfo {
                name,
                dtype,
                shape,
                start: data_start + b as usize,
                end: data_start + e as usize,
            },
        );
    }
    // The tensors must tile the data section: sorted by start, each begins
    // where the previous ended, and the last ends at the end of the file.
    let mut by_start: Vec<&StTensorInfo> = tensors.values().collect();
    by_start.sort_by_key(|t| (t.start, t.end));
    let mut at = data_start;
    for t in &by_start {
        if t.start != at {
            return Err(ModelsError::Tensor {
                path: path.to_path_buf(),
                name: t.name.clone(),
                reason: format!(
                    "data starts at data offset {} but the previous tensor ends at {} ({})",
                    t.start - data_start,
                    at - data_start,
                    if t.start < at { "overlap" } else { "gap" }
                ),
            });
        }
        at = t.end;
    }
    if at != buf.len() {
        return Err(corrupt(
            path,
            format!(
                "tensors cover {} of the {data_len} data bytes (the format requires exact cover)",
                at - data_start
            ),
        ));
    }
    Ok((tensors, metadata))
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref();
        let io = |source| ModelsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: read-only map; concurrent modification is outside the contract.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let (tensors, metadata) = parse_header(path, &map)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            tensors,
            metadata,
        })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Tensor infos by name.
    pub fn tensors(&self) -> &BTreeMap<String, StTensorInfo> {
        &self.tensors
    }
    /// The `__metadata__` table.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// Raw bytes of a tensor (bounds checked at open).
    pub fn bytes(&self, info: &StTensorInfo) -> &[u8] {
        &self.map[info.start..info.end]
    }
    /// A floating-point tensor converted to f32.
    pub fn to_f32(&self, name: &str) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| ModelsError::Tensor {
            path: self.path.clone(),
            name: name.into(),
            reason: "not in the file".into(),
        })?;
        let b = self.bytes(info);
        let data = match info.dtype {
            StDtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            StDtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelsError::Tensor {
                    path: self.path.clone(),
                    name: name.into(),
                    reason: format!(
                        "dtype {other:?} is not a float type this loader converts (F32, F16, BF16)"
                    ),
                })
            }
        };
        Ok(Tensor {
            shape: info.shape.clone(),
            data,
        })
    }
}

// ---------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------

/// Reads a Hugging Face `config.json` leniently (see the module doc).
pub fn read_hf_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| corrupt(path, format!("not JSON: {e}")))?;
    ModelConfig::from_hf_json(&v, path)
}

impl ModelConfig {
    /// The config from a parsed HF `config.json`; unknown fields are ignored,
    /// known ones type-checked; `origin` names the file in errors.
    ///
    /// `eos_token_id` may be a list in real files (Llama 3.1); the first id is
    /// kept. Falcon's `new_decoder_architecture`/`alibi` variants are not
    /// modelled: Falcon configs set `parallel_attn`, and `n_head_kv` /
    /// `num_kv_heads` map to `num_key_value_heads`.
    pub fn from_hf_json(v: &Value, origin: &Path) -> Result<ModelConfig> {
        let obj = v
            .as_object()
            .ok_or_else(|| corrupt(origin, "config is not a JSON object".into()))?;
        let field = |f: &str, reason: String| ModelsError::Field {
            path: origin.to_path_buf(),
            field: f.into(),
            reason,
        };
        let opt_u64 = |names: &[&str]| -> Result<Option<u64>> {
            for n in names {
                match obj.get(*n) {
                    None | Some(Value::Null) => continue,
                    Some(x) => {
                        return x.as_u64().map(Some).ok_or_else(|| {
                            field(n, format!("expected a non-negative integer, found {x}"))
                        })
                    }
                }
            }
            Ok(None)
        };
        let req_u64 = |names: &[&str]| -> Result<u64> {
            opt_u64(names)?.ok_or_else(|| field(names[0], "missing".into()))
        };
        let opt_f64 = |n: &str| -> Result<Option<f64>> {
            match obj.get(n) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| field(n, format!("expected a number, found {x}"))),
            }
        };
        let opt_bool = |n: &str| -> Result<Option<bool>> {
            match obj.get(n) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| field(n, format!("expected true/false, found {x}"))),
            }
        };
        let opt_str = |n: &str| -> Result<Option<String>> {
            match obj.get(n) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_str()
                    .map(|s| Some(s.to_string()))
                    .ok_or_else(|| field(n, format!("expected a string, found {x}"))),
            }
        };
        let first_id = |n: &str| -> Result<Option<u64>> {
            match obj.get(n) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) => match a.first() {
                    None => Ok(None),
                    Some(x) => x
                        .as_u64()
                        .map(Some)
                        .ok_or_else(|| field(n, format!("expected integer ids, found {x}"))),
                },
                Some(x) => x
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| field(n, format!("expected an integer id, found {x}"))),
            }
        };
        let model_type =
            opt_str("model_type")?.ok_or_else(|| field("model_type", "missing".into()))?;
        let hidden = req_u64(&["hidden_size", "n_embd", "d_model"])?;
        let heads = req_u64(&["num_attention_heads", "n_head"])?;
        let falcon = model_type == "falcon";
        let intermediate = match opt_u64(&["intermediate_size", "ffn_hidden_size"])? {
            Some(i) => i,
            // Falcon-7B's config has no intermediate size: its MLP is 4 x hidden.
            None if falcon => 4 * hidden,
            None => return Err(field("intermediate_size", "missing".into())),
        };
        let kv = match opt_u64(&["num_key_value_heads", "num_kv_heads", "n_head_kv"])? {
            Some(k) => Some(k),
            // Falcon-7B: multi_query = true means one KV head.
            None if falcon && opt_bool("multi_query")? == Some(true) => Some(1),
            None => None,
        };
        let cfg = ModelConfig {
            model_type: model_type.clone(),
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: req_u64(&["num_hidden_layers", "n_layer"])?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: opt_u64(&["head_dim"])?,
            vocab_size: req_u64(&["vocab_size"])?,
            max_position_embeddings: match opt_u64(&["max_position_embeddings", "n_positions"])? {
                Some(m) => m,
                None if falcon => 2048,
                None => return Err(field("max_position_embeddings", "missing".into())),
            },
            rope_theta: opt_f64("rope_theta")?.unwrap_or(10000.0),
            rms_norm_eps: match opt_f64("rms_norm_eps")? {
                Some(e) => e,
                None => opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
            },
            tie_word_embeddings: opt_bool("tie_word_embeddings")?.unwrap_or(falcon),
            sliding_window: match opt_bool("use_sliding_window")? {
                Some(false) => None,
                _ => opt_u64(&["sliding_window"])?,
            },
            num_local_experts: opt_u64(&["num_local_experts"])?,
            num_experts_per_tok: opt_u64(&["num_experts_per_tok"])?,
            hidden_act: opt_str("hidden_act")?.unwrap_or_else(|| {
                if falcon {
                    "gelu".into()
                } else {
                    "silu".into()
                }
            }),
            attention_bias: opt_bool("attention_bias")?.or(opt_bool("bias")?.filter(|_| falcon)),
            parallel_attn: opt_bool("parallel_attn")?,
            norm_type: if falcon { Some("layer".into()) } else { None },
            torch_dtype: opt_str("torch_dtype")?,
            bos_token_id: first_id("bos_token_id")?,
            eos_token_id: first_id("eos_token_id")?,
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// This config as a Hugging Face `config.json` object (the field names are
    /// HF's already), plus `architectures` for a `llama` model.
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("ModelConfig serializes");
        if self.model_type == "llama" {
            v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        }
        v
    }
}

// ---------------------------------------------------------------------------
// HF directory -> Checkpoint
// ---------------------------------------------------------------------------

/// Buffers the HF loader keeps that the forward pass does not use.
fn ignorable(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// Loads an HF model directory (`config.json` + `model.safetensors`, or the
/// sharded `model.safetensors.index.json`) as an f32 [`Checkpoint`].
///
/// Every tensor must have the shape the config implies; a name the Llama layout
/// does not know is an error (so a Falcon or MoE checkpoint is refused rather
/// than half-loaded). Also accepts the path of a `.safetensors` file whose
/// directory holds `config.json`.
pub fn load_hf_dir(dir: impl AsRef<Path>) -> Result<Checkpoint> {
    let mut dir = dir.as_ref().to_path_buf();
    let mut single = dir.join("model.safetensors");
    if dir.is_file() {
        single = dir.clone();
        dir = dir.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    let cfg_path = dir.join("config.json");
    let cfg = read_hf_config(&cfg_path)?;
    let index = dir.join("model.safetensors.index.json");
    // (shard path, names the index assigns to it; None = take all)
    let mut shards: Vec<(PathBuf, Option<Vec<String>>)> = Vec::new();
    if single.is_file() {
        shards.push((single, None));
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelsError::Io {
            path: index.clone(),
            source,
        })?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| corrupt(&index, format!("not JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelsError::Field {
                path: index.clone(),
                field: "weight_map".into(),
                reason: "missing or not an object".into(),
            })?;
        let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| ModelsError::Field {
                path: index.clone(),
                field: format!("weight_map.{name}"),
                reason: "not a file name".into(),
            })?;
            if shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(ModelsError::Field {
                    path: index.clone(),
                    field: format!("weight_map.{name}"),
                    reason: format!("shard `{shard}` is not a plain file name"),
                });
            }
            by_shard
                .entry(shard.to_string())
                .or_default()
                .push(name.clone());
        }
        for (shard, names) in by_shard {
            shards.push((dir.join(shard), Some(names)));
        }
    } else {
        return Err(ModelsError::Io {
            path: single,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors nor model.safetensors.index.json exists",
            ),
        });
    }
    let mut tensors = BTreeMap::new();
    for (shard, names) in shards {
        let f = SafetensorsFile::open(&shard)?;
        if let Some(names) = &names {
            for n in names {
                if !f.tensors().contains_key(n) {
                    return Err(ModelsError::Tensor {
                        path: shard.clone(),
                        name: n.clone(),
                        reason: "the index places it in this shard, which does not hold it".into(),
                    });
                }
            }
        }
        for (name, info) in f.tensors() {
            if let Some(names) = &names {
                if !names.contains(name) {
                    // The index assigns it elsewhere (or nowhere): not loaded from here.
                    continue;
                }
            }
            if ignorable(name) {
                continue;
            }
            let terr = |reason: String| ModelsError::Tensor {
                path: shard.clone(),
                name: name.clone(),
                reason,
            };
            let want = expected_shape(&cfg, name).ok_or_else(|| {
                terr(format!(
                    "not part of a {} model with this config.json",
                    cfg.model_type
                ))
            })?;
            if info.shape != want {
                return Err(terr(format!(
                    "shape {:?} but config.json implies {want:?}",
                    info.shape
                )));
            }
            let t = f.to_f32(name)?;
            if tensors.insert(name.clone(), t).is_some() {
                return Err(terr("appears in more than one shard".into()));
            }
        }
    }
    check_complete(&cfg, &tensors, &dir)?;
    Ok(Checkpoint {
        path: dir,
        format: CheckpointFormat::Safetensors,
        config: cfg,
        rope_layout: RopeLayout::RotateHalf,
        tensors,
    })
}

// ---------------------------------------------------------------------------
// writer
// ---------------------------------------------------------------------------

/// One tensor to write: raw little-endian bytes of `dtype`.
#[derive(Debug, Clone, Copy)]
pub struct TensorToWrite<'a> {
    pub name: &'a str,
    pub dtype: StDtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl safetensors::View for TensorToWrite<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}
/// Little-endian bytes of f32 values rounded to f16.
pub fn f16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect()
}
/// Little-endian bytes of f32 values rounded to bf16.
pub fn bf16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect()
}
/// Little-endian bytes of i32 values (GPTQ's packed `qweight`, `qzeros`, `g_idx`).
pub fn i32_bytes(x: &[i32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, synced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| ModelsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no file name",
        ))
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// Writes a safetensors file atomically. Every tensor's byte length must equal
/// `numel x dtype size`; names must be distinct. Output is deterministic (the
/// `safetensors` crate orders tensors by dtype alignment, then name).
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorToWrite<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for t in tensors {
        let terr = |reason: String| ModelsError::Tensor {
            path: path.to_path_buf(),
            name: t.name.into(),
            reason,
        };
        if !seen.insert(t.name) {
            return Err(terr("name given twice".into()));
        }
        let want = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(t.dtype.size()));
        if want != Some(t.data.len()) {
            return Err(terr(format!(
                "{} bytes of data for shape {:?} of {:?}",
                t.data.len(),
                t.shape,
                t.dtype
            )));
        }
    }
    write_atomic(path, &serialize(tensors, metadata))
}

/// The file bytes: tensors in the order given, data contiguous, the JSON
/// header (keys sorted: `__metadata__` then tensor names) padded with spaces
/// to a multiple of 8 bytes so the data section starts aligned, as the
/// `safetensors` crate does. Built by hand rather than by the crate because its
/// `__metadata__` comes from a `HashMap`, whose order would leak into the bytes.
fn serialize(tensors: &[TensorToWrite<'_>], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let js = |x: &str| serde_json::to_string(x).expect("strings serialize");
    // (key, JSON text of the value), written in sorted key order by hand, so
    // the bytes do not depend on serde_json's map type.
    let mut entries: Vec<(String, String)> = Vec::new();
    if !metadata.is_empty() {
        let body: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", js(k), js(v)))
            .collect();
        entries.push(("__metadata__".into(), format!("{{{}}}", body.join(","))));
    }
    let mut offset = 0usize;
    let mut tensor_entries = Vec::new();
    for t in tensors {
        let end = offset + t.data.len();
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        tensor_entries.push((
            t.name.to_string(),
            format!(
                "{{\"dtype\":{},\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
                js(&format!("{:?}", t.dtype)),
                shape.join(",")
            ),
        ));
        offset = end;
    }
    tensor_entries.sort();
    entries.extend(tensor_entries);
    let body: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}:{}", js(k), v))
        .collect();
    let mut text = format!("{{{}}}", body.join(","));
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + offset);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    for t in tensors {
        out.extend_from_slice(t.data);
    }
    out
}

/// Writes an HF model directory: `config.json` and `model.safetensors`, each
/// atomically (the directory is created if needed).
pub fn write_hf_dir(dir: &Path, config_json: &Value, tensors: &[TensorToWrite<'_>]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| ModelsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_safetensors(&dir.join("model.safetensors"), tensors, &BTreeMap::new())?;
    let text = serde_json::to_string_pretty(config_json).expect("JSON value serializes");
    write_atomic(&dir.join("config.json"), text.as_bytes())
}

#[cfg(test)]
pub(crate) mod tests;
