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
