//! Loading a language model from whatever the user points at: a Hugging Face directory
//! (LLaMA family, T5, BART) or a GGUF file (LLaMA family).

use crate::checkpoint::{self, Cfg, GgufFile, Tok, Weights};
use crate::models::bart::{Bart, BartConfig};
use crate::models::encdec::EncoderDecoder;
use crate::models::llama::{Llama, LlamaConfig};
use crate::models::t5::{T5, T5Config};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub enum LanguageModel {
    Llama(Llama),
    T5(T5),
    Bart(Bart),
}

impl LanguageModel {
    /// The encoder-decoder view of T5 and BART.
    pub fn encdec(&self) -> Option<&dyn EncoderDecoder> {
        match self {
            LanguageModel::Llama(_) => None,
            LanguageModel::T5(m) => Some(m),
            LanguageModel::Bart(m) => Some(m),
        }
    }
}

/// A language model with its tokenizer and identity.
pub struct LoadedLm {
    pub model: LanguageModel,
    pub tok: Tok,
    /// Ids that end generation.
    pub eos: Vec<u32>,
    /// Where it was loaded from, and a content hash of its files.
    pub path: PathBuf,
    pub fingerprint: String,
    pub family: &'static str,
}

impl LoadedLm {
    pub fn llama(&self) -> Option<&Llama> {
        match &self.model {
            LanguageModel::Llama(m) => Some(m),
            _ => None,
        }
    }
}

pub fn load_lm(path: &Path, dtype: DType, dev: &Device) -> Result<LoadedLm> {
    if path.is_file() {
        return load_gguf(path, dtype, dev);
    }
    if !path.exists() {
        bail!("{}: no such file or directory (expected a Hugging Face model directory or a .gguf file)", path.display())
    }
    let cfg_path = path.join("config.json");
    let cfg = Cfg::load(&cfg_path)?;
    let mt = cfg.opt_str("model_type")?.unwrap_or_default();
    let files = checkpoint::safetensors_files(path)?;
    let mut hashed = vec![cfg_path.clone()];
    hashed.extend(files.iter().cloned());
    let fingerprint = checkpoint::fingerprint(&hashed)?;
    let tok = Tok::from_file(&path.join("tokenizer.json"))?;
    let weights = Weights::from_safetensors(&files, dtype, dev)?;
    match mt.as_str() {
        "llama" | "mistral" | "smollm" => {
            let c = LlamaConfig::from_hf(&cfg)?;
            let mut eos = c.eos_token_ids.clone();
            extend_eos_from_generation_config(path, &mut eos)?;
            let m = Llama::load(&weights, c)?;
            Ok(LoadedLm {
                model: LanguageModel::Llama(m),
                tok,
                eos,
                path: path.to_path_buf(),
                fingerprint,
                family: "llama",
            })
        }
        "t5" => {
            let c = T5Config::from_hf(&cfg)?;
            let mut eos = c.eos_token_ids.clone();
            extend_eos_from_generation_config(path, &mut eos)?;
            let m = T5::load(&weights, c)?;
            Ok(LoadedLm { model: LanguageModel::T5(m), tok, eos, path: path.to_path_buf(), fingerprint, family: "t5" })
        }
        "bart" => {
            let c = BartConfig::from_hf(&cfg)?;
            let mut eos = c.eos_token_ids.clone();
            extend_eos_from_generation_config(path, &mut eos)?;
            let m = Bart::load(&weights, c)?;
            Ok(LoadedLm {
                model: LanguageModel::Bart(m),
                tok,
                eos,
                path: path.to_path_buf(),
                fingerprint,
                family: "bart",
            })
        }
        other => {
            let arch =
                cfg.v.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str()).unwrap_or("").to_string();
            bail!(
                "{}: unknown architecture `{}` (field model_type{}); supported language models: llama, mistral, t5, bart",
                cfg_path.display(),
                if other.is_empty() { "<missing>" } else { other },
                if arch.is_empty() { String::new() } else { format!(", architectures: {arch}") }
            )
        }
    }
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

fn load_gguf(path: &Path, dtype: DType, dev: &Device) -> Result<LoadedLm> {
    let g = Arc::new(GgufFile::open(path)?);
    let tok =
        checkpoint::tokenizer_from_gguf(&g).with_context(|| format!("{}: building the tokenizer", path.display()))?;
    let cfg = LlamaConfig::from_gguf(&g, tok.vocab_size())?;
    let eos = cfg.eos_token_ids.clone();
    let fingerprint = checkpoint::fingerprint(&[path.to_path_buf()])?;
    let weights = Weights::from_gguf(g, dtype, dev);
    let m = Llama::load(&weights, cfg)?;
    Ok(LoadedLm { model: LanguageModel::Llama(m), tok, eos, path: path.to_path_buf(), fingerprint, family: "llama" })
}
