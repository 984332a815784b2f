//! The built-in catalog: every TOML file under `models/catalog/{models,hardware}`,
//! embedded at build time (see `build.rs`). A user may also pass a path to a
//! descriptor of their own wherever a catalog name is accepted.
//!
//! Model file layout:
//! ```toml
//! [meta]
//! name = "llama-3-8b"            # catalog key, lower-case
//! hf_id = "meta-llama/Meta-Llama-3-8B"
//! published_params = 8.03e9     # from the model card; a test checks the count
//! source = "https://huggingface.co/meta-llama/Meta-Llama-3-8B (config.json, model card)"
//! [config]                      # Hugging Face config.json field names
//! model_type = "llama"
//! hidden_size = 4096
//! ...
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{HardwareSpec, ModelConfig, ModelsError, Result};

include!(concat!(env!("OUT_DIR"), "/catalog_files.rs"));

/// Where a descriptor came from and what its publisher says about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_id: Option<String>,
    /// Parameter count published by the model's authors.
    pub published_params: f64,
    /// Where `published_params` and the config come from.
    pub source: String,
}

/// A model descriptor: provenance plus the HF config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDescriptor {
    pub meta: ModelMeta,
    pub config: ModelConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HardwareFile {
    hardware: HardwareSpec,
}

fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| ModelsError::Descriptor {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn embedded(kind: &str) -> impl Iterator<Item = (PathBuf, &'static str)> + '_ {
    CATALOG_FILES
        .iter()
        .filter(move |(k, _, _)| *k == kind)
        .map(|(k, f, text)| (PathBuf::from(format!("models/catalog/{k}/{f}")), *text))
}

/// Every built-in model descriptor, sorted by name.
pub fn models() -> Result<Vec<ModelDescriptor>> {
    let mut v = embedded("models")
        .map(|(p, t)| {
            let d: ModelDescriptor = parse_toml(&p, t)?;
            d.config.validate(&p)?;
            Ok(d)
        })
        .collect::<Result<Vec<_>>>()?;
    v.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
    Ok(v)
}

/// Every built-in GPU, sorted by name.
pub fn hardware() -> Result<Vec<HardwareSpec>> {
    let mut v = embedded("hardware")
        .map(|(p, t)| Ok(parse_toml::<HardwareFile>(&p, t)?.hardware))
        .collect::<Result<Vec<_>>>()?;
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(v)
}

/// A model by catalog name (case-insensitive), or a path to a descriptor TOML.
pub fn model(name_or_path: &str) -> Result<ModelDescriptor> {
    let p = Path::new(name_or_path);
    if name_or_path.ends_with(".toml") || p.exists() {
        let text = std::fs::read_to_string(p).map_err(|source| ModelsError::Io {
            path: p.to_path_buf(),
            source,
        })?;
        let d: ModelDescriptor = parse_toml(p, &text)?;
        d.config.validate(p)?;
        return Ok(d);
    }
    let all = models()?;
    let known = all
        .iter()
        .map(|d| d.meta.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    all.iter()
        .find(|d| d.meta.name.eq_ignore_ascii_case(name_or_path))
        .cloned()
        .ok_or(ModelsError::Unknown {
            kind: "model",
            name: name_or_path.into(),
            known,
        })
}

/// A GPU by catalog name (case-insensitive), or a path to a descriptor TOML.
pub fn gpu(name_or_path: &str) -> Result<HardwareSpec> {
    let p = Path::new(name_or_path);
    if name_or_path.ends_with(".toml") || p.exists() {
        let text = std::fs::read_to_string(p).map_err(|source| ModelsError::Io {
            path: p.to_path_buf(),
            source,
        })?;
        return Ok(parse_toml::<HardwareFile>(p, &text)?.hardware);
    }
    let all = hardware()?;
    let known = all
        .iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    all.iter()
        .find(|d| d.name.eq_ignore_ascii_case(name_or_path))
        .cloned()
        .ok_or(ModelsError::Unknown {
            kind: "hardware",
            name: name_or_path.into(),
            known,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One unit in the last written digit of a published figure: "6.74e9" ->
    /// 1e7, "361821120" -> 1. Published counts are rounded (Hugging Face shows
    /// three significant digits) or truncated (Qwen's card: 7.6156B is
    /// "7.61B"), so the computed count must lie strictly within one such unit;
    /// a figure written with every digit must match exactly.
    fn ulp(published: &str) -> f64 {
        let (mant, exp) = match published.split_once('e') {
            Some((m, e)) => (m, e.parse::<i32>().unwrap()),
            None => (published, 0),
        };
        let decimals = mant.split_once('.').map_or(0, |(_, f)| f.len() as i32);
        10f64.powi(exp - decimals)
    }

    /// `published`: the figure as its source writes it (see each TOML's
    /// `source`); `exact`: the count the descriptor gives, pinned so a formula
    /// change shows up (for the Llama family these equal the sums of tensor
    /// sizes of the released checkpoints, which the published figures round).
    fn check(name: &str, published: &str, exact: u64) {
        let d = model(name).unwrap();
        let n = d.config.num_params();
        let p: f64 = published.parse().unwrap();
        assert_eq!(
            d.meta.published_params, p,
            "{name}: TOML published_params vs the test's figure"
        );
        let tol = ulp(published);
        assert!(
            ((n as f64) - p).abs() < tol,
            "{name}: computed {n} vs published {published} (tolerance {tol})"
        );
        assert_eq!(n, exact, "{name}: exact count");
    }

    #[test]
    fn parameter_counts_match_published() {
        check("llama-2-7b", "6.74e9", 6_738_415_616);
        check("llama-2-13b", "13.0e9", 13_015_864_320);
        check("llama-2-70b", "69.0e9", 68_976_648_192);
        check("llama-3-8b", "8.03e9", 8_030_261_248);
        check("llama-3-70b", "70.6e9", 70_553_706_496);
        check("llama-3.1-405b", "405e9", 405_853_388_800);
        check("mistral-7b-v0.1", "7.24e9", 7_241_732_096);
        check("mixtral-8x7b", "46.7e9", 46_702_792_704);
        // Qwen2.5: q/k/v biases (attention_bias) count 28 x 4,608.
        check("qwen2.5-7b", "7.61e9", 7_615_616_512);
        // Falcon: fused query_key_value (71 + 2 heads of 64), no linear biases,
        // one LayerNorm (weight + bias) per layer (parallel_attn), plain GELU MLP.
        check("falcon-7b", "7e9", 6_921_720_704);
        check("smollm2-135m", "135e6", 134_515_008);
        check("smollm2-360m", "361821120", 361_821_120);
        check("smollm2-1.7b", "1.71e9", 1_711_376_384);
        check("stories260k", "260032", 260_032);
        assert_eq!(
            models().unwrap().len(),
            14,
            "every catalog model has a check line"
        );
    }

    #[test]
    fn mixtral_active_parameters() {
        // Mistral AI: "12.9B active parameters per token" (2 of 8 experts).
        let c = model("mixtral-8x7b").unwrap().config;
        let a = c.active_params();
        assert!(((a as f64) - 12.9e9).abs() < ulp("12.9e9"), "{a}");
        assert_eq!(a, 12_879_925_248);
        // Dense models: active = total.
        let l = model("llama-3-8b").unwrap().config;
        assert_eq!(l.active_params(), l.num_params());
    }

    #[test]
    fn qwen_non_embedding_count() {
        // Qwen2.5-7B card: 6.53B non-embedding parameters (total less the
        // embedding and the untied classifier).
        let c = model("qwen2.5-7b").unwrap().config;
        let non_emb = c.num_params() - 2 * c.vocab_size * c.hidden_size;
        assert!(
            ((non_emb as f64) - 6.53e9).abs() < ulp("6.53e9"),
            "{non_emb}"
        );
    }

    #[test]
    fn stories260k_matches_its_file_size() {
        // Legacy llama2.c file: 7 x i32 header, all weights f32, then the RoPE
        // tables (seq_len x head_dim/2 cos and sin).
        let c = model("stories260k").unwrap().config;
        let rope = 2 * c.max_position_embeddings * c.head_dim() / 2;
        assert_eq!(28 + 4 * (c.num_params() + rope), 1_056_540);
    }

    #[test]
    fn stories260k_matches_its_header() {
        // The descriptor is the config the llama2.c loader derives from the
        // asset's own header (dim 64, hidden 172, 5 layers, 8 heads, 4 KV heads,
        // vocab 512, seq 512, shared classifier), field for field.
        let Some(path) = crate::assets::require(
            crate::assets::stories260k_model(),
            "stories260k_matches_its_header",
        ) else {
            return;
        };
        let bytes = std::fs::read(&path).unwrap();
        let (h, _, _) = crate::llama2c::parse_header(&path, &bytes).unwrap();
        assert_eq!(
            model("stories260k").unwrap().config,
            crate::llama2c::config_of(&h)
        );
    }

    #[test]
    fn kv_cache_bytes() {
        // Llama-3-8B: 2 x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB per token in bf16.
        let c = model("llama-3-8b").unwrap().config;
        assert_eq!(c.kv_bytes_per_token(crate::Dtype::Bf16), 131_072);
        // Falcon-7B (MQA): 2 x 32 x 1 x 64 x 2 = 8 KiB.
        let f = model("falcon-7b").unwrap().config;
        assert_eq!(f.kv_bytes_per_token(crate::Dtype::Bf16), 8_192);
    }
}
