//! llama2.c checkpoints (Karpathy's `run.c` / `runq.c` formats) into a [`Checkpoint`].
//!
//! Two layouts exist, both little-endian:
//! ```text
//! legacy (export.py legacy_export, run.c):
//!   header  7 x i32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
//!           vocab_size < 0 means "classifier not shared" (wcls stored at the end)
//!   f32: tok_embeddings [vocab, dim]
//!        rms_att [L, dim] | wq [L, dim, dim] | wk [L, kv_dim, dim] | wv [L, kv_dim, dim]
//!        wo [L, dim, dim] | rms_ffn [L, dim] | w1 [L, hidden, dim] | w2 [L, dim, hidden]
//!        w3 [L, hidden, dim] | rms_final [dim]
//!        freq_cis_real [seq_len, head_size/2] | freq_cis_imag [same]   (skipped: RoPE is recomputed)
//!        [wcls [vocab, dim]]                                          (only when unshared)
//!
//! versioned (export.py version1/version2_export): 256-byte header
//!   u32 magic 0x616b3432 ("ak42") | i32 version | 7 x i32 (as above, vocab > 0)
//!   | u8 shared_classifier | (v2: i32 group_size) | zero padding to 256
//!   v1 (fp32):   rms_att [L, dim] | rms_ffn [L, dim] | rms_final [dim] | tok_embeddings
//!                | wq | wk | wv | wo | w1 | w2 | w3 | [wcls]
//!   v2 (Q8_0):   the three norms in f32 as in v1, then each of tok_embeddings, wq.., w3,
//!                [wcls], one tensor at a time: i8 values [numel] then f32 scales
//!                [numel / group_size]; w = q * scale[index / group_size]
//! ```
//! Weights are PyTorch `Linear` layout `[out, in]`, the same as Hugging Face, and
//! llama2.c's RoPE pairs dimensions (2i, 2i+1), so the checkpoint comes out with
//! [`RopeLayout::Interleaved`] and no row permutation.
//!
//! Every size is computed with checked arithmetic from the header and compared
//! with the file's length before any tensor is allocated; the file must be
//! exactly as long as its header says (a longer file means the header lies too).

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Checkpoint, CheckpointFormat, ModelConfig, ModelsError, Result, RopeLayout, Tensor};

/// The versioned header's magic number ("ak42" read as a little-endian u32).
pub const MAGIC: u32 = 0x616b_3432;
/// The versioned header's length in bytes.
pub const VERSIONED_HEADER_BYTES: usize = 256;
const LEGACY_HEADER_BYTES: usize = 28;

/// The seven header integers shared by both layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Llama2cHeader {
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    pub seq_len: usize,
    /// Classifier tied to the token embedding.
    pub shared_classifier: bool,
}

/// Which of the llama2.c layouts a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Llama2cLayout {
    Legacy,
    /// Version 1: fp32.
    V1,
    /// Version 2: int8 Q8_0 groups of `group_size`.
    V2Q8 {
        group_size: usize,
    },
}

fn read_i32(bytes: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn field_err(path: &Path, field: &str, reason: impl Into<String>) -> ModelsError {
    ModelsError::Field {
        path: path.to_path_buf(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parse and validate the header; returns it with its layout and the byte offset
/// where tensor data begins. Reads no more than the first 256 bytes.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<(Llama2cHeader, Llama2cLayout, usize)> {
    let len = bytes.len() as u64;
    let need = |n: usize, what: &str| -> Result<()> {
        if bytes.len() < n {
            Err(ModelsError::Truncated {
                path: path.to_path_buf(),
                what: what.into(),
                start: 0,
                end: n as u64,
                len,
            })
        } else {
            Ok(())
        }
    };
    need(4, "header")?;
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let (ints_at, layout, data_at) = if magic == MAGIC {
        need(VERSIONED_HEADER_BYTES, "versioned header")?;
        let version = read_i32(bytes, 4);
        let layout = match version {
            1 => Llama2cLayout::V1,
            2 => {
                let g = read_i32(bytes, 8 + 28 + 1);
                if g <= 0 {
                    return Err(field_err(
                        path,
                        "group_size",
                        format!("{g} is not positive"),
                    ));
                }
                Llama2cLayout::V2Q8 {
                    group_size: g as usize,
                }
            }
            v => {
                return Err(ModelsError::Unsupported {
                    path: path.to_path_buf(),
                    what: format!("llama2.c checkpoint version {v} (known: 1 fp32, 2 int8)"),
                })
            }
        };
        (8, layout, VERSIONED_HEADER_BYTES)
    } else {
        need(LEGACY_HEADER_BYTES, "legacy header (7 x int32)")?;
        (0, Llama2cLayout::Legacy, LEGACY_HEADER_BYTES)
    };
    let names = [
        "dim",
        "hidden_dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "seq_len",
    ];
    let mut v = [0i64; 7];
    for (i, slot) in v.iter_mut().enumerate() {
        *slot = read_i32(bytes, ints_at + 4 * i) as i64;
    }
    let shared_classifier = match layout {
        Llama2cLayout::Legacy => v[5] > 0,
        _ => match bytes[ints_at + 28] {
            0 => false,
            1 => true,
            b => {
                return Err(field_err(
                    path,
                    "shared_classifier",
                    format!("byte {b} is neither 0 nor 1"),
                ))
            }
        },
    };
    if layout == Llama2cLayout::Legacy {
        v[5] = v[5].abs();
    }
    for (name, &x) in names.iter().zip(&v) {
        if x <= 0 {
            return Err(field_err(path, name, format!("{x} is not positive")));
        }
    }
    let h = Llama2cHeader {
        dim: v[0] as usize,
        hidden_dim: v[1] as usize,
        n_layers: v[2] as usize,
        n_heads: v[3] as usize,
        n_kv_heads: v[4] as usize,
        vocab_size: v[5] as usize,
        seq_len: v[6] as usize,
        shared_classifier,
    };
    if h.dim % h.n_heads != 0 {
        return Err(field_err(
            path,
            "n_heads",
            format!("{} does not divide dim {}", h.n_heads, h.dim),
        ));
    }
    if h.n_kv_heads > h.n_heads || h.n_heads % h.n_kv_heads != 0 {
        return Err(field_err(
            path,
            "n_kv_heads",
            format!("{} does not divide n_heads {}", h.n_kv_heads, h.n_heads),
        ));
    }
    if (h.dim / h.n_heads) % 2 != 0 {
        return Err(field_err(
            path,
            "n_heads",
            format!("head size {} is odd; RoPE needs pairs", h.dim / h.n_heads),
        ));
    }
    Ok((h, layout, data_at))
}

/// One tensor in file order: HF name and shape.
struct Entry {
    name: String,
    shape: Vec<usize>,
}

fn entry(name: String, shape: &[usize]) -> Entry {
    Entry {
        name,
        shape: shape.to_vec(),
    }
}

/// Per-layer tensors stacked in the file as `[L, ...]`: (llama2.c name, HF suffix, shape).
fn layer_stack(h: &Llama2cHeader, which: &str) -> (String, Vec<usize>) {
    let kv_dim = h.dim / h.n_heads * h.n_kv_heads;
    let (suffix, shape): (&str, Vec<usize>) = match which {
        "rms_att" => ("input_layernorm.weight", vec![h.dim]),
        "rms_ffn" => ("post_attention_layernorm.weight", vec![h.dim]),
        "wq" => ("self_attn.q_proj.weight", vec![h.dim, h.dim]),
        "wk" => ("self_attn.k_proj.weight", vec![kv_dim, h.dim]),
        "wv" => ("self_attn.v_proj.weight", vec![kv_dim, h.dim]),
        "wo" => ("self_attn.o_proj.weight", vec![h.dim, h.dim]),
        "w1" => ("mlp.gate_proj.weight", vec![h.hidden_dim, h.dim]),
        "w2" => ("mlp.down_proj.weight", vec![h.dim, h.hidden_dim]),
        "w3" => ("mlp.up_proj.weight", vec![h.hidden_dim, h.dim]),
        _ => unreachable!("internal table"),
    };
    (suffix.to_string(), shape)
}

fn push_stack(out: &mut Vec<Entry>, h: &Llama2cHeader, which: &str) {
    let (suffix, shape) = layer_stack(h, which);
    for l in 0..h.n_layers {
        out.push(entry(format!("model.layers.{l}.{suffix}"), &shape));
    }
}

/// Load a llama2.c checkpoint (any of the three layouts).
pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| ModelsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &bytes)
}

/// Parse a llama2.c checkpoint held in memory (`path` names it in errors).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    let (h, layout, data_at) = parse_header(path, bytes)?;
    let head = h.dim / h.n_heads;
    let emb = "model.embed_tokens.weight".to_string();
    let cls = "lm_head.weight".to_string();
    let norm = "model.norm.weight".to_string();

    // File order of tensors (None = skipped f32 region of that many elements).
    let mut order: Vec<Result<Entry, u64>> = Vec::new();
    let push = |v: &mut Vec<Result<Entry, u64>>, es: Vec<Entry>| v.extend(es.into_iter().map(Ok));
    match layout {
        Llama2cLayout::Legacy => {
            let mut es = vec![entry(emb, &[h.vocab_size, h.dim])];
            for w in [
                "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
            ] {
                push_stack(&mut es, &h, w);
            }
            es.push(entry(norm, &[h.dim]));
            push(&mut order, es);
            // freq_cis_real and freq_cis_imag: seq_len * head/2 each.
            let skip = (h.seq_len as u64)
                .checked_mul(head as u64)
                .ok_or_else(|| field_err(path, "seq_len", "size overflows"))?;
            order.push(Err(skip));
            if !h.shared_classifier {
                order.push(Ok(entry(cls, &[h.vocab_size, h.dim])));
            }
        }
        Llama2cLayout::V1 | Llama2cLayout::V2Q8 { .. } => {
            let mut es = Vec::new();
            push_stack(&mut es, &h, "rms_att");
            push_stack(&mut es, &h, "rms_ffn");
            es.push(entry(norm, &[h.dim]));
            es.push(entry(emb, &[h.vocab_size, h.dim]));
            for w in ["wq", "wk", "wv", "wo", "w1", "w2", "w3"] {
                push_stack(&mut es, &h, w);
            }
            if !h.shared_classifier {
                es.push(entry(cls, &[h.vocab_size, h.dim]));
            }
            push(&mut order, es);
        }
    }

    // Byte extent of each entry; checked before allocating anything.
    let group = match layout {
        Llama2cLayout::V2Q8 { group_size } => Some(group_size as u64),
        _ => None,
    };
    let mut extents = Vec::with_capacity(order.len());
    let mut off = data_at as u64;
    for e in &order {
        let nbytes = match e {
            Err(skip) => skip.checked_mul(4),
            Ok(e) => {
                let numel = e
                    .shape
                    .iter()
                    .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
                    .ok_or_else(|| field_err(path, &e.name, "size overflows"))?;
                match group {
                    // Norms stay f32 in version 2.
                    Some(g) if e.shape.len() == 2 => {
                        if numel % g != 0 {
                            return Err(field_err(
                                path,
                                "group_size",
                                format!("{g} does not divide {} elements of `{}`", numel, e.name),
                            ));
                        }
                        numel.checked_add((numel / g) * 4)
                    }
                    _ => numel.checked_mul(4),
                }
            }
        }
        .ok_or_else(|| field_err(path, "header", "tensor sizes overflow"))?;
        let end = off
            .checked_add(nbytes)
            .ok_or_else(|| field_err(path, "header", "tensor sizes overflow"))?;
        if end > bytes.len() as u64 {
            let what = match e {
                Ok(e) => format!("tensor `{}` (shape {:?} from the header)", e.name, e.shape),
                Err(_) => "freq_cis tables (legacy layout)".to_string(),
            };
            return Err(ModelsError::Truncated {
                path: path.to_path_buf(),
                what,
                start: off,
                end,
                len: bytes.len() as u64,
            });
        }
        extents.push((off as usize, end as usize));
        off = end;
    }
    if off != bytes.len() as u64 {
        return Err(field_err(
            path,
            "header",
            format!(
                "the header describes {off} bytes but the file has {} ({} trailing bytes; \
                 wrong dimensions or shared_classifier flag?)",
                bytes.len(),
                bytes.len() as u64 - off
            ),
        ));
    }

    let mut tensors = BTreeMap::new();
    for (e, (start, end)) in order.into_iter().zip(extents) {
        let Ok(e) = e else { continue };
        let raw = &bytes[start..end];
        let data = match group {
            Some(g) if e.shape.len() == 2 => {
                let g = g as usize;
                let numel: usize = e.shape.iter().product();
                let (q, s) = raw.split_at(numel);
                let scales: Vec<f32> = s
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                if let Some(i) = scales.iter().position(|x| !x.is_finite()) {
                    return Err(ModelsError::Tensor {
                        path: path.to_path_buf(),
                        name: e.name,
                        reason: format!("scale {i} is not finite"),
                    });
                }
                q.iter()
                    .enumerate()
                    .map(|(i, &b)| (b as i8) as f32 * scales[i / g])
                    .collect()
            }
            _ => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        };
        tensors.insert(
            e.name,
            Tensor {
                shape: e.shape,
                data,
            },
        );
    }

    Ok(Checkpoint {
        path: path.to_path_buf(),
        format: CheckpointFormat::Llama2c,
        config: config_of(&h),
        rope_layout: RopeLayout::Interleaved,
        tensors,
    })
}

/// The Hugging Face-style config of a llama2.c header (rope_theta 10000 and
/// eps 1e-5 are hard-coded in run.c; BOS = 1, EOS = 2 as in Llama 2's vocabulary).
pub fn config_of(h: &Llama2cHeader) -> ModelConfig {
    ModelConfig {
        model_type: "llama".into(),
        hidden_size: h.dim as u64,
        intermediate_size: h.hidden_dim as u64,
        num_hidden_layers: h.n_layers as u64,
        num_attention_heads: h.n_heads as u64,
        num_key_value_heads: Some(h.n_kv_heads as u64),
        head_dim: None,
        vocab_size: h.vocab_size as u64,
        max_position_embeddings: h.seq_len as u64,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: h.shared_classifier,
        sliding_window: None,
        num_local_experts: None,
        num_experts_per_tok: None,
        hidden_act: "silu".into(),
        attention_bias: None,
        parallel_attn: None,
        norm_type: None,
        torch_dtype: Some("float32".into()),
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

/// Whether `path`'s first bytes look like a llama2.c checkpoint (versioned magic,
/// or a legacy header of seven plausible integers). Used to dispatch on format.
pub fn sniff(path: &Path) -> bool {
    use std::io::Read;
    let mut buf = [0u8; LEGACY_HEADER_BYTES];
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    if f.read_exact(&mut buf).is_err() {
        return false;
    }
    let magic = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    magic == MAGIC || parse_header(path, &buf).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny legacy checkpoint: header ints, then `n` f32 values 0.0, 1.0, ...
    fn legacy_bytes(hdr: [i32; 7], floats: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for x in hdr {
            b.extend_from_slice(&x.to_le_bytes());
        }
        for i in 0..floats {
            b.extend_from_slice(&(i as f32).to_le_bytes());
        }
        b
    }

    /// Float count of a legacy file with the given header.
    fn legacy_floats(h: [i32; 7]) -> usize {
        let [dim, hid, l, nh, nkv, vocab, seq] = h.map(|x| x.unsigned_abs() as usize);
        let kv = dim / nh * nkv;
        let per_layer = 2 * dim + dim * dim * 2 + 2 * kv * dim + 3 * dim * hid;
        let cls = if h[5] < 0 { vocab * dim } else { 0 };
        vocab * dim + l * per_layer + dim + seq * (dim / nh) + cls
    }

    const HDR: [i32; 7] = [8, 12, 2, 2, 1, 10, 4];

    #[test]
    fn legacy_layout_order_and_shapes() {
        let n = legacy_floats(HDR);
        let ck = parse(Path::new("t.bin"), &legacy_bytes(HDR, n)).unwrap();
        assert_eq!(ck.rope_layout, RopeLayout::Interleaved);
        assert!(ck.config.tie_word_embeddings);
        assert!(!ck.tensors.contains_key("lm_head.weight"));
        // Embedding is first: values 0..80.
        let emb = &ck.tensors["model.embed_tokens.weight"];
        assert_eq!(emb.shape, vec![10, 8]);
        assert_eq!(emb.data[79], 79.0);
        // rms_att of layer 1 follows layer 0's: starts at 80 + 8.
        assert_eq!(
            ck.tensors["model.layers.1.input_layernorm.weight"].data[0],
            88.0
        );
        // wk [kv_dim=4, 8] of layer 0 after rms_att (16) and wq (2*64).
        let wk = &ck.tensors["model.layers.0.self_attn.k_proj.weight"];
        assert_eq!(wk.shape, vec![4, 8]);
        assert_eq!(wk.data[0], (80 + 16 + 128) as f32);
        // Final norm sits right before the freq_cis tables (4 * 4 * 2 floats).
        let norm = &ck.tensors["model.norm.weight"];
        assert_eq!(norm.data[7] as usize, n - 1 - 4 * 4);
    }

    #[test]
    fn legacy_unshared_classifier_after_freq_cis() {
        let mut h = HDR;
        h[5] = -10;
        let n = legacy_floats(h);
        let ck = parse(Path::new("t.bin"), &legacy_bytes(h, n)).unwrap();
        assert!(!ck.config.tie_word_embeddings);
        let cls = &ck.tensors["lm_head.weight"];
        assert_eq!(cls.shape, vec![10, 8]);
        assert_eq!(cls.data[0] as usize, n - 80);
    }

    fn versioned_bytes(version: i32, shared: u8, group: i32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&version.to_le_bytes());
        for x in HDR {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b.push(shared);
        if version == 2 {
            b.extend_from_slice(&group.to_le_bytes());
        }
        b.resize(VERSIONED_HEADER_BYTES, 0);
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn versioned_v1_and_v2_roundtrip() {
        // v1: norms (2*2*8 + 8), emb 80, per-layer matrices.
        let norms = 2 * 2 * 8 + 8;
        let mats = 80 + 2 * (64 + 32 + 32 + 64 + 3 * 96);
        let mut p = Vec::new();
        for i in 0..norms + mats {
            p.extend_from_slice(&(i as f32).to_le_bytes());
        }
        let ck = parse(Path::new("v1.bin"), &versioned_bytes(1, 1, 0, &p)).unwrap();
        assert_eq!(
            ck.tensors["model.layers.0.post_attention_layernorm.weight"].data[0],
            16.0
        );
        assert_eq!(
            ck.tensors["model.embed_tokens.weight"].data[0],
            norms as f32
        );

        // v2 with group 4: norms f32, then each matrix as i8 then scales.
        let mut p = Vec::new();
        for _ in 0..norms {
            p.extend_from_slice(&1f32.to_le_bytes());
        }
        let sizes: Vec<usize> = std::iter::once(80)
            .chain([64, 64, 32, 32, 32, 32, 64, 64, 96, 96, 96, 96, 96, 96])
            .collect();
        for &n in &sizes {
            p.extend((0..n).map(|i| (i as i8 - 3) as u8));
            for g in 0..n / 4 {
                p.extend_from_slice(&(0.5 * (g + 1) as f32).to_le_bytes());
            }
        }
        let ck = parse(Path::new("v2.bin"), &versioned_bytes(2, 1, 4, &p)).unwrap();
        let emb = &ck.tensors["model.embed_tokens.weight"];
        // element 5: q = 2, group 1 -> scale 1.0
        assert_eq!(emb.data[5], 2.0);
        assert_eq!(emb.data[0], -3.0 * 0.5);
    }

    /// One line per bad file: (description, bytes, text the error must contain).
    #[test]
    fn bad_files_name_file_and_field() {
        let n = legacy_floats(HDR);
        let good = legacy_bytes(HDR, n);
        let mut zero_dim = HDR;
        zero_dim[0] = 0;
        let mut lying_vocab = HDR;
        lying_vocab[5] = 1_000_000_000;
        let mut odd_heads = HDR;
        odd_heads[3] = 3;
        let mut bad_kv = HDR;
        bad_kv[4] = 3;
        let mut neg_vocab = HDR; // says unshared but the file has no classifier
        neg_vocab[5] = -10;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "truncated: header"),
            ("short header", good[..20].to_vec(), "legacy header"),
            (
                "truncated tensors",
                good[..good.len() - 4].to_vec(),
                "freq_cis",
            ),
            (
                "trailing bytes",
                [good.clone(), vec![0; 8]].concat(),
                "field `header`",
            ),
            ("zero dim", legacy_bytes(zero_dim, n), "field `dim`"),
            (
                "huge vocab",
                legacy_bytes(lying_vocab, n),
                "model.embed_tokens.weight",
            ),
            (
                "dim not divisible",
                legacy_bytes(odd_heads, n),
                "field `n_heads`",
            ),
            ("kv heads", legacy_bytes(bad_kv, n), "field `n_kv_heads`"),
            ("unshared lie", legacy_bytes(neg_vocab, n), "lm_head.weight"),
            ("bad version", versioned_bytes(7, 1, 0, &[]), "version 7"),
            (
                "bad shared flag",
                versioned_bytes(1, 9, 0, &[]),
                "shared_classifier",
            ),
            ("bad group", versioned_bytes(2, 1, 0, &[]), "group_size"),
            (
                "group not dividing",
                versioned_bytes(2, 1, 3, &[0; 4096]),
                "group_size",
            ),
        ];
        for (what, bytes, expect) in cases {
            let err = parse(Path::new("/x/model.bin"), &bytes)
                .err()
                .unwrap_or_else(|| panic!("{what}: parsed"));
            let msg = err.to_string();
            assert!(msg.contains("/x/model.bin"), "{what}: {msg}");
            assert!(msg.contains(expect), "{what}: `{msg}` lacks `{expect}`");
        }
    }

    #[test]
    fn stories260k_loads() {
        let Some(p) =
            crate::assets::require(crate::assets::stories260k_model(), "stories260k_loads")
        else {
            return;
        };
        let ck = load(&p).unwrap();
        let c = &ck.config;
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (64, 172, 5)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_kv_heads(), c.vocab_size),
            (8, 4, 512)
        );
        assert!(c.tie_word_embeddings);
        // 3 global + 9 per layer.
        assert_eq!(ck.tensors.len(), 2 + 9 * 5);
        assert_eq!(
            ck.tensors["model.layers.4.self_attn.k_proj.weight"].shape,
            vec![32, 64]
        );
    }
}
