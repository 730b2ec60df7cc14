//! Loading frozen backbones from whatever the user points at: a Hugging Face directory (LLaMA
//! family, T5, BART, CLIP), a GGUF file (LLaMA family), or `random:<preset>[@seed]` for a
//! randomly initialised CLIP tower of a built-in shape. The family registry is here: a new
//! family is one file in `models/` plus one line in [`FAMILIES`].

use super::LanguageModel;
use super::bart::{Bart, BartConfig};
use super::clip::{ClipVision, ClipVisionConfig};
use super::llama::{Llama, LlamaConfig};
use super::t5::{T5, T5Config};
use crate::checkpoint::{self, Cfg, GgufFile, Tok, Weights};
use crate::ops::WeightFormat;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The formats the frozen base models' matrices are kept in (`--lm-dtype`, `--vision-dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Precision {
    pub lm: WeightFormat,
    pub vision: WeightFormat,
}

/// A language model with its tokenizer and identity.
pub struct LoadedLm {
    pub model: Box<dyn LanguageModel>,
    pub tok: Tok,
    /// Ids that end generation.
    pub eos: Vec<u32>,
    /// Where it was loaded from, and a content hash of its files.
    pub path: PathBuf,
    pub fingerprint: String,
    /// A content hash of its tokenizer files (Hugging Face directories; a GGUF file's tokenizer
    /// is covered by `fingerprint`).
    pub tokenizer_fingerprint: Option<String>,
}

impl LoadedLm {
    pub fn family(&self) -> &'static str {
        self.model.family()
    }
    pub fn llama(&self) -> Option<&Llama> {
        self.model.downcast::<Llama>()
    }
    pub fn encdec(&self) -> Option<&dyn super::encdec::EncoderDecoder> {
        self.model.as_encdec()
    }
}

/// A family's loader: the model and its end-of-sequence ids from config.json and the weights.
type FamilyLoader = fn(&Cfg, &Weights) -> Result<(Box<dyn LanguageModel>, Vec<u32>)>;

/// Hugging Face `model_type`s and how to load each.
const FAMILIES: &[(&[&str], FamilyLoader)] = &[
    (&["llama", "mistral", "smollm"], |c, w| {
        let c = LlamaConfig::from_hf(c)?;
        let eos = c.eos_token_ids.clone();
        Ok((Box::new(Llama::load(w, c)?), eos))
    }),
    (&["t5"], |c, w| {
        let c = T5Config::from_hf(c)?;
        let eos = c.eos_token_ids.clone();
        Ok((Box::new(T5::load(w, c)?), eos))
    }),
    (&["bart"], |c, w| {
        let c = BartConfig::from_hf(c)?;
        let eos = c.eos_token_ids.clone();
        Ok((Box::new(Bart::load(w, c)?), eos))
    }),
];

/// The model of a config.json's `model_type` on the given weights (no tokenizer).
pub fn model_from_config(cfg: &Cfg, w: &Weights) -> Result<(Box<dyn LanguageModel>, Vec<u32>)> {
    loader(cfg)?(cfg, w)
}

fn loader(cfg: &Cfg) -> Result<FamilyLoader> {
    let mt = cfg.opt_str("model_type")?.unwrap_or_default();
    match FAMILIES.iter().find(|(types, _)| types.contains(&mt.as_str())) {
        Some((_, load)) => Ok(*load),
        None => {
            let arch =
                cfg.v.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str()).unwrap_or("").to_string();
            let known: Vec<&str> = FAMILIES.iter().flat_map(|f| f.0.iter().copied()).collect();
            bail!(
                "{}: unknown architecture `{}` (field model_type{}); supported language models: {}",
                cfg.file.display(),
                if mt.is_empty() { "<missing>" } else { mt.as_str() },
                if arch.is_empty() { String::new() } else { format!(", architectures: {arch}") },
                known.join(", ")
            )
        }
    }
}

/// Loads a language model, its frozen matrices kept in `format` (`--lm-dtype`).
pub fn load_lm(path: &Path, dtype: DType, format: WeightFormat, dev: &Device) -> Result<LoadedLm> {
    if path.is_file() {
        return load_gguf(path, dtype, format, dev);
    }
    if !path.exists() {
        bail!("{}: no such file or directory (expected a Hugging Face model directory or a .gguf file)", path.display())
    }
    if !path.join("config.json").is_file() && path.join("params.json").is_file() {
        return super::meta::load_meta(path, dtype, format, dev);
    }
    let cfg_path = path.join("config.json");
    let cfg = Cfg::load(&cfg_path)?;
    // An unknown family fails before the weights are read.
    let load = loader(&cfg)?;
    let files = checkpoint::safetensors_files(path)?;
    let mut hashed = vec![cfg_path.clone()];
    hashed.extend(files.iter().cloned());
    let fingerprint = checkpoint::fingerprint(&hashed)?;
    let tok = Tok::from_file(&path.join("tokenizer.json"))?;
    let tok_files: Vec<PathBuf> =
        ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
            .iter()
            .map(|f| path.join(f))
            .filter(|p| p.is_file())
            .collect();
    let tokenizer_fingerprint = Some(checkpoint::fingerprint(&tok_files)?);
    let weights = Weights::from_safetensors(&files, dtype, dev)?.with_format(format);
    let (model, mut eos) = load(&cfg, &weights)?;
    extend_eos_from_generation_config(path, &mut eos)?;
    Ok(LoadedLm { model, tok, eos, path: path.to_path_buf(), fingerprint, tokenizer_fingerprint })
}

fn extend_eos_from_generation_config(dir: &Path, eos: &mut Vec<u32>) -> Result<()> {
    let p = dir.join("generation_config.json");
    if p.is_file() {
        let g = Cfg::load(&p)?;
        for id in g.ids("eos_token_id")? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    Ok(())
}

fn load_gguf(path: &Path, dtype: DType, format: WeightFormat, dev: &Device) -> Result<LoadedLm> {
    let g = Arc::new(GgufFile::open(path)?);
    let tok =
        checkpoint::tokenizer_from_gguf(&g).with_context(|| format!("{}: building the tokenizer", path.display()))?;
    let cfg = LlamaConfig::from_gguf(&g, tok.vocab_size())?;
    let eos = cfg.eos_token_ids.clone();
    let fingerprint = checkpoint::fingerprint(&[path.to_path_buf()])?;
    let weights = Weights::from_gguf(g, dtype, dev).with_format(format);
    let m = Llama::load(&weights, cfg)?;
    Ok(LoadedLm { model: Box::new(m), tok, eos, path: path.to_path_buf(), fingerprint, tokenizer_fingerprint: None })
}

pub struct LoadedVision {
    pub model: ClipVision,
    /// The spec it was loaded from (a path or `random:...`).
    pub source: String,
    pub fingerprint: String,
}

/// Loads a CLIP vision tower, its frozen matrices kept in `format` (`--vision-dtype`).
pub fn load_vision(spec: &str, dtype: DType, format: WeightFormat, dev: &Device) -> Result<LoadedVision> {
    if let Some(rest) = spec.strip_prefix("random:") {
        let (preset, seed) = match rest.split_once('@') {
            Some((p, s)) => {
                (p, s.parse::<u64>().with_context(|| format!("vision `{spec}`: seed `{s}` is not an integer"))?)
            }
            None => (rest, 0),
        };
        let cfg = ClipVisionConfig::preset(preset)?;
        let tensors = cfg.random_weights(seed, dtype, dev)?;
        let w = Weights::from_tensors(spec, tensors, dtype, dev).with_format(format);
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
    let w = Weights::from_safetensors(&files, dtype, dev)?.with_format(format);
    let w = if w.contains("vision_model.embeddings.class_embedding") { w.pp("vision_model") } else { w };
    let model = ClipVision::load(&w, vc)?;
    Ok(LoadedVision { model, source: spec.to_string(), fingerprint })
}
