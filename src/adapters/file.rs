//! The adapter files of a run directory, in the manner of PEFT: `adapter_config.json` (every
//! setting, the base models' identities and shapes) and `adapter_model.safetensors` (the trained
//! tensors only, f32). One routine reads them ([`read`]); loading refuses base models whose
//! content differs from those the adapter was trained on.

use super::Sections;
use crate::checkpoint::{read_json, require_file, save_safetensors_atomic};
use crate::data::DataOptions;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const ADAPTER_FORMAT: &str = "memvp-adapter/1";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A base model an adapter was trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaseModel {
    /// Path (absolute) or `random:<preset>@seed`.
    pub source: String,
    /// SHA-256 of its config and weight files (or of the preset for random towers).
    pub sha256: String,
    /// SHA-256 of its tokenizer files (absent in adapters of the first version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_sha256: Option<String>,
    pub family: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dims {
    pub vision_width: usize,
    pub vision_blocks: usize,
    pub image_size: usize,
    pub visual_tokens: usize,
    pub lm_width: usize,
    pub lm_layers: usize,
}

/// `adapter_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub format: String,
    /// A registered method name (`adapters::METHODS`).
    pub method: String,
    /// Trained with every image indicator at 0 (the image-blind control).
    #[serde(default)]
    pub image_blind: bool,
    /// The method's settings sections (`memvp`, `input_space`, `lora`).
    #[serde(flatten)]
    pub sections: Sections,
    pub prompt: DataOptions,
    pub max_len: usize,
    pub vision: BaseModel,
    pub lm: BaseModel,
    pub dims: Dims,
    pub trainable_parameters: usize,
}

impl AdapterConfig {
    /// Reads and checks `dir/adapter_config.json`: the format, a known method, and exactly the
    /// settings sections that method has.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        require_file(&path)?;
        let cfg: AdapterConfig = serde_json::from_value(read_json(&path)?)
            .map_err(|e| anyhow::anyhow!("{}: not a memvp adapter config: {e}", path.display()))?;
        if cfg.format != ADAPTER_FORMAT {
            bail!("{}: unknown adapter format `{}` (expected {ADAPTER_FORMAT})", path.display(), cfg.format)
        }
        let spec = super::spec(&cfg.method).with_context(|| format!("{}: field `method`", path.display()))?;
        for k in cfg.sections.keys() {
            if !spec.sections.contains(&k.as_str()) {
                bail!(
                    "{}: unknown key `{k}` (a `{}` adapter has the sections {})",
                    path.display(),
                    cfg.method,
                    spec.sections.join(", ")
                )
            }
        }
        for k in spec.sections {
            if !cfg.sections.contains_key(*k) {
                bail!("{}: the `{k}` section of the {} settings is missing", path.display(), cfg.method)
            }
        }
        Ok(cfg)
    }
}

/// Writes both files into `dir` (each atomically).
pub fn write(dir: &Path, cfg: &AdapterConfig, named: &[(String, Var)]) -> Result<()> {
    let tensors: Vec<(String, Tensor)> =
        named.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::F32)?))).collect::<Result<_>>()?;
    let meta = [("format".to_string(), "pt".to_string()), ("method".to_string(), format!("\"{}\"", cfg.method))];
    save_safetensors_atomic(&tensors, Some(meta.into_iter().collect()), &dir.join(WEIGHTS_FILE))?;
    crate::util::write_json_atomic(&dir.join(CONFIG_FILE), cfg)
}

/// Sets every trained tensor from `dir/adapter_model.safetensors`, checking names and shapes.
pub fn load_weights(dir: &Path, named: &[(String, Var)]) -> Result<()> {
    let wf = dir.join(WEIGHTS_FILE);
    require_file(&wf)?;
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&wf, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", wf.display()))?;
    let mut unknown: Vec<&String> = tensors.keys().filter(|k| !named.iter().any(|(n, _)| n == *k)).collect();
    if !unknown.is_empty() {
        unknown.sort();
        bail!(
            "{}: tensors this adapter does not have: {} (an adapter of another method or shape?)",
            wf.display(),
            unknown.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
        )
    }
    for (name, var) in named {
        let t = tensors.get(name).with_context(|| format!("{}: tensor `{name}` missing", wf.display()))?;
        let bad = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            bail!("{}: tensor `{name}` holds {bad} NaN or infinite values; refusing a broken adapter", wf.display())
        }
        if t.dims() != var.dims() {
            bail!("{}: tensor `{name}` has shape {:?}, this base model needs {:?}", wf.display(), t.dims(), var.dims())
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}
