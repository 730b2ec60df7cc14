//! Loading a vision tower: a CLIP checkpoint directory, or `random:<preset>[@seed]` for a
//! randomly initialised tower of a built-in shape (no pretrained weights needed).

use crate::checkpoint::{self, Cfg, Weights};
use crate::models::clip::{ClipVision, ClipVisionConfig};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use std::path::Path;

pub struct LoadedVision {
    pub model: ClipVision,
    /// The spec it was loaded from (a path or `random:...`).
    pub source: String,
    pub fingerprint: String,
}

pub fn load_vision(spec: &str, dtype: DType, dev: &Device) -> Result<LoadedVision> {
    if let Some(rest) = spec.strip_prefix("random:") {
        let (preset, seed) = match rest.split_once('@') {
            Some((p, s)) => {
                (p, s.parse::<u64>().with_context(|| format!("vision `{spec}`: seed `{s}` is not an integer"))?)
            }
            None => (rest, 0),
        };
        let cfg = ClipVisionConfig::preset(preset)?;
        let tensors = cfg.random_weights(seed, dtype, dev)?;
        let w = Weights::from_tensors(spec, tensors, dtype, dev);
        let model = ClipVision::load(&w, cfg.clone())?;
        let fingerprint = checkpoint::sha256_str(&format!("{spec}:{}", serde_json::to_string(&cfg)?));
        return Ok(LoadedVision { model, source: spec.to_string(), fingerprint });
    }
    let dir = Path::new(spec);
    if !dir.exists() {
        bail!("{spec}: no such directory (expected a CLIP checkpoint directory or random:<preset>)")
    }
    let cfg_path = dir.join("config.json");
    let cfg = Cfg::load(&cfg_path)?;
    let vc = ClipVisionConfig::from_hf(&cfg)?;
    let files = checkpoint::safetensors_files(dir)?;
    let mut hashed = vec![cfg_path];
    hashed.extend(files.iter().cloned());
    let fingerprint = checkpoint::fingerprint(&hashed)?;
    let w = Weights::from_safetensors(&files, dtype, dev)?;
    let w = if w.contains("vision_model.embeddings.class_embedding") { w.pp("vision_model") } else { w };
    let model = ClipVision::load(&w, vc)?;
    Ok(LoadedVision { model, source: spec.to_string(), fingerprint })
}
