//! Quantized models on disk: an HF-style directory that AutoGPTQ-style
//! readers understand, and the reader that turns it back into a
//! [`Checkpoint`] (dequantized to f32) so every command can run it.
//!
//! ```text
//!   DIR/config.json        the model's config.json fields plus
//!                          "quantization_config": {quant_method "gptq", bits, group_size,
//!                           desc_act, sym, checkpoint_format "gptq" (v1 zeros),
//!                           inferlab_method rtn|gptq|awq, inferlab_rope_layout}
//!   DIR/model.safetensors  per linear `model.layers.{i}.{proj}.{qweight,qzeros,scales,g_idx}`
//!                          (I32, I32, F16, I32; AutoGPTQ v1 packing, see `pack`), everything
//!                          else F32 under its HF name (AWQ's folded norms included)
//! ```
//! AWQ results are stored in the same GPTQ packing: its scales are already folded
//! into the norms and linears, so the model is a plain Llama with group-quantized
//! linears (and 3-bit AWQ has no AWQ-GEMM layout anyway).
//! Written atomically: temp files in DIR's parent, then renames.

use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::f16;
use inferlab_models::{Checkpoint, CheckpointFormat, ModelConfig, RopeLayout, Tensor};
use ndarray::Array2;
use safetensors::tensor::{Dtype, TensorView};

use super::model::QuantizedModel;
use super::pack::{pack_gptq, unpack_gptq, GptqPacked, GptqZeros};
use crate::model::Proj;
use crate::{Error, Result};

/// What `quantization_config` records.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    pub bits: u32,
    pub group_size: i64,
    pub desc_act: bool,
    pub sym: bool,
    pub checkpoint_format: String,
    pub inferlab_method: String,
    pub inferlab_rope_layout: String,
    /// Per-module overrides in GPTQModel's form (module-name regex, `+:`
    /// prefixed, to the fields that differ), written only when some linears
    /// use another group size than `group_size` (see [`recorded_groups`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dynamic: BTreeMap<String, BTreeMap<String, i64>>,
}

/// `quantization_config`'s `group_size` and `dynamic` for the group sizes the
/// linears actually use. `requested` (`-1`: per channel) stands when every
/// linear uses it; otherwise (a size that does not divide a module's input
/// width falls back to a divisor, e.g. 100 -> 96 on width 576) the most common
/// size used (the smaller on a tie) becomes `group_size` and each projection
/// using another gets an override, e.g. `+:model\.layers\.\d+\.mlp\.down_proj`
/// -> `{"group_size": 86}` (one key per layer if a projection's size varied by
/// layer). The loader itself reads every layer's groups from its `g_idx`.
pub fn recorded_groups(
    linears: &BTreeMap<(usize, Proj), super::QuantizedLinear>,
    requested: i64,
) -> (i64, BTreeMap<String, BTreeMap<String, i64>>) {
    let used = |q: &super::QuantizedLinear| {
        if requested <= 0 && q.group_size == q.in_features() {
            -1
        } else {
            q.group_size as i64
        }
    };
    if linears.values().all(|q| used(q) == requested) {
        return (requested, BTreeMap::new());
    }
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for q in linears.values() {
        *counts.entry(used(q)).or_default() += 1;
    }
    let headline = counts
        .iter()
        .max_by_key(|&(&g, &n)| (n, std::cmp::Reverse(g)))
        .map(|(&g, _)| g)
        .unwrap_or(requested);
    let mut per_proj: BTreeMap<&'static str, BTreeMap<usize, i64>> = BTreeMap::new();
    for (&(l, p), q) in linears {
        per_proj.entry(p.hf_name()).or_default().insert(l, used(q));
    }
    let mut dynamic = BTreeMap::new();
    for (name, layers) in per_proj {
        let esc = name.replace('.', "\\.");
        let sizes: std::collections::BTreeSet<i64> = layers.values().copied().collect();
        match sizes.iter().collect::<Vec<_>>()[..] {
            [&g] if g == headline => {}
            [&g] => {
                let key = format!("+:model\\.layers\\.\\d+\\.{esc}");
                dynamic.insert(key, BTreeMap::from([("group_size".to_string(), g)]));
            }
            _ => {
                for (l, g) in layers.into_iter().filter(|&(_, g)| g != headline) {
                    let key = format!("+:model\\.layers\\.{l}\\.{esc}");
                    dynamic.insert(key, BTreeMap::from([("group_size".to_string(), g)]));
                }
            }
        }
    }
    (headline, dynamic)
}

fn file_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn le_bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// True when `dir` holds a quantized model written by [`write_quantized_dir`].
pub fn is_quantized_dir(dir: &Path) -> bool {
    let cfg = dir.join("config.json");
    dir.is_dir()
        && std::fs::read_to_string(cfg)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|v| v.get("quantization_config").is_some())
}

/// Write `qm` (quantized from `ck`) as an HF-style directory at `out`.
pub fn write_quantized_dir(
    out: &Path,
    ck: &Checkpoint,
    qm: &QuantizedModel,
    qc: &QuantizationConfig,
) -> Result<()> {
    let w = qm.model.weights();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let e = &w.embed_tokens;
    owned.push((
        "model.embed_tokens.weight".into(),
        Dtype::F32,
        vec![e.nrows(), e.ncols()],
        le_bytes_f32(&e.iter().copied().collect::<Vec<_>>()),
    ));
    // layers packed in parallel (pack_gptq and the byte conversions were the
    // serial part of writing), then appended in layer order
    let per_layer: Vec<Result<Vec<(String, Dtype, Vec<usize>, Vec<u8>)>>> = w
        .layers
        .par_iter()
        .enumerate()
        .map(|(l, lw)| {
            let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
            let pre = format!("model.layers.{l}");
            owned.push((
                format!("{pre}.input_layernorm.weight"),
                Dtype::F32,
                vec![lw.input_layernorm.len()],
                le_bytes_f32(&lw.input_layernorm),
            ));
            owned.push((
                format!("{pre}.post_attention_layernorm.weight"),
                Dtype::F32,
                vec![lw.post_attention_layernorm.len()],
                le_bytes_f32(&lw.post_attention_layernorm),
            ));
            for p in Proj::ALL {
                let q = qm.linears.get(&(l, p)).ok_or_else(|| {
                    Error::invalid(
                        "quantized model",
                        format!("layer {l} {} missing", p.hf_name()),
                    )
                })?;
                let pk = pack_gptq(q, GptqZeros::V1)?;
                let name = format!("{pre}.{}", p.hf_name());
                let i32b =
                    |a: &[i32]| -> Vec<u8> { a.iter().flat_map(|x| x.to_le_bytes()).collect() };
                owned.push((
                    format!("{name}.qweight"),
                    Dtype::I32,
                    pk.qweight.shape().to_vec(),
                    i32b(&pk.qweight.iter().copied().collect::<Vec<_>>()),
                ));
                owned.push((
                    format!("{name}.qzeros"),
                    Dtype::I32,
                    pk.qzeros.shape().to_vec(),
                    i32b(&pk.qzeros.iter().copied().collect::<Vec<_>>()),
                ));
                owned.push((
                    format!("{name}.scales"),
                    Dtype::F16,
                    pk.scales.shape().to_vec(),
                    pk.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                ));
                owned.push((
                    format!("{name}.g_idx"),
                    Dtype::I32,
                    vec![pk.g_idx.len()],
                    i32b(&pk.g_idx),
                ));
            }
            Ok(owned)
        })
        .collect();
    for layer in per_layer {
        owned.extend(layer?);
    }
    owned.push((
        "model.norm.weight".into(),
        Dtype::F32,
        vec![w.norm.len()],
        le_bytes_f32(&w.norm),
    ));
    if ck.tensors.contains_key("lm_head.weight") {
        let h = w.lm_head.weight();
        owned.push((
            "lm_head.weight".into(),
            Dtype::F32,
            vec![h.nrows(), h.ncols()],
            le_bytes_f32(&h.iter().copied().collect::<Vec<_>>()),
        ));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            Ok((
                n.clone(),
                TensorView::new(*d, s.clone(), b)
                    .map_err(|e| Error::invalid(n.clone(), e.to_string()))?,
            ))
        })
        .collect::<Result<_>>()?;
    let st =
        safetensors::tensor::serialize(views, &None).map_err(|e| file_err(out, e.to_string()))?;
    let mut cfg = serde_json::to_value(&ck.config).map_err(|e| file_err(out, e.to_string()))?;
    cfg["quantization_config"] =
        serde_json::to_value(qc).map_err(|e| file_err(out, e.to_string()))?;
    let cfg_text =
        serde_json::to_string_pretty(&cfg).map_err(|e| file_err(out, e.to_string()))? + "\n";

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| file_err(parent, e.to_string()))?;
    let name = out
        .file_name()
        .ok_or_else(|| file_err(out, "needs a directory name"))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir(&tmp)?;
        std::fs::write(tmp.join("model.safetensors"), &st)?;
        std::fs::write(tmp.join("config.json"), &cfg_text)?;
        if out.exists() {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(out, &old)?;
            std::fs::rename(&tmp, out)?;
            std::fs::remove_dir_all(&old)?;
        } else {
            std::fs::rename(&tmp, out)?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        file_err(out, e.to_string())
    })
}

/// Read a directory written by [`write_quantized_dir`], dequantizing every
/// linear to f32 (`scale·(q − zero)` with the stored f16 scales).
pub fn load_quantized_dir(dir: &Path) -> Result<Checkpoint> {
    let cfg_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e.to_string()))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| file_err(&cfg_path, e.to_string()))?;
    let qv = v
        .as_object_mut()
        .and_then(|o| o.remove("quantization_config"))
        .ok_or_else(|| file_err(&cfg_path, "no quantization_config"))?;
    let qc: QuantizationConfig = serde_json::from_value(qv)
        .map_err(|e| file_err(&cfg_path, format!("quantization_config: {e}")))?;
    if qc.quant_method != "gptq" || qc.checkpoint_format != "gptq" {
        return Err(file_err(
            &cfg_path,
            format!(
                "quant_method {} / format {} not supported (gptq v1 only)",
                qc.quant_method, qc.checkpoint_format
            ),
        ));
    }
    let config: ModelConfig =
        serde_json::from_value(v).map_err(|e| file_err(&cfg_path, e.to_string()))?;
    let rope_layout = match qc.inferlab_rope_layout.as_str() {
        "interleaved" => RopeLayout::Interleaved,
        "rotate_half" => RopeLayout::RotateHalf,
        o => return Err(file_err(&cfg_path, format!("inferlab_rope_layout {o:?}"))),
    };
    let st_path = dir.join("model.safetensors");
    let bytes = std::fs::read(&st_path).map_err(|e| file_err(&st_path, e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(&st_path, e.to_string()))?;
    let get = |name: &str, dt: Dtype| -> Result<TensorView<'_>> {
        let t = st
            .tensor(name)
            .map_err(|e| file_err(&st_path, format!("{name}: {e}")))?;
        if t.dtype() != dt {
            return Err(file_err(
                &st_path,
                format!("{name}: dtype {:?}, expected {dt:?}", t.dtype()),
            ));
        }
        Ok(t)
    };
    let i32s = |t: &TensorView| -> Vec<i32> {
        t.data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let mut tensors = BTreeMap::new();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    for name in &names {
        if let Some(base) = name.strip_suffix(".qweight") {
            let qw = get(name, Dtype::I32)?;
            let qz = get(&format!("{base}.qzeros"), Dtype::I32)?;
            let sc = get(&format!("{base}.scales"), Dtype::F16)?;
            let gi = get(&format!("{base}.g_idx"), Dtype::I32)?;
            let shape2 = |t: &TensorView, what: &str| -> Result<(usize, usize)> {
                match t.shape() {
                    [a, b] => Ok((*a, *b)),
                    s => Err(file_err(
                        &st_path,
                        format!("{base}.{what}: shape {s:?} is not 2-D"),
                    )),
                }
            };
            let in_features = gi.shape().iter().product::<usize>();
            let packed = GptqPacked {
                bits: qc.bits,
                group_size: if qc.group_size > 0 {
                    qc.group_size as usize
                } else {
                    in_features
                },
                qweight: Array2::from_shape_vec(shape2(&qw, "qweight")?, i32s(&qw))
                    .map_err(|e| file_err(&st_path, e.to_string()))?,
                qzeros: Array2::from_shape_vec(shape2(&qz, "qzeros")?, i32s(&qz))
                    .map_err(|e| file_err(&st_path, e.to_string()))?,
                scales: Array2::from_shape_vec(
                    shape2(&sc, "scales")?,
                    sc.data()
                        .chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                )
                .map_err(|e| file_err(&st_path, e.to_string()))?,
                g_idx: i32s(&gi),
            };
            let q = unpack_gptq(&packed, GptqZeros::V1, in_features)
                .map_err(|e| file_err(&st_path, format!("{base}: {e}")))?;
            let w = q.dequantize();
            tensors.insert(
                format!("{base}.weight"),
                Tensor {
                    shape: vec![w.nrows(), w.ncols()],
                    data: w.iter().map(|&x| x as f32).collect(),
                },
            );
        } else if [".qzeros", ".scales", ".g_idx"]
            .iter()
            .any(|s| name.ends_with(s))
        {
            continue;
        } else {
            let t = get(name, Dtype::F32)?;
            tensors.insert(
                name.clone(),
                Tensor {
                    shape: t.shape().to_vec(),
                    data: t
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                },
            );
        }
    }
    Ok(Checkpoint {
        path: PathBuf::from(dir),
        format: CheckpointFormat::Safetensors,
        config,
        rope_layout,
        tensors,
    })
}
