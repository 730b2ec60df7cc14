//! Reading checkpoints: Hugging Face directories (`config.json`, safetensors, sharded or not,
//! `tokenizer.json`) and GGUF files. Every error names the file and the tensor or field.

mod config;
mod gguf;
pub mod spm;
mod store;
mod tokenizer;

pub use config::Cfg;
pub use gguf::GgufFile;
pub use store::{Weights, safetensors_bytes, save_safetensors_atomic};
pub use tokenizer::{Tok, tokenizer_from_gguf, tokenizer_from_spm};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Reads and parses a JSON file, naming it in every error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    if path.is_dir() {
        bail!("{}: is a directory, not a JSON file", path.display())
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read file", path.display()))?;
    // A UTF-8 byte-order mark, as some editors write it, is not part of the JSON.
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    serde_json::from_slice(bytes).with_context(|| format!("{}: malformed JSON", path.display()))
}

/// Fails with a clear message when a required file is missing.
pub fn require_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("{}: is a directory, expected a file", path.display())
    }
    if !path.is_file() {
        bail!("{}: file not found", path.display())
    }
    Ok(())
}

/// The weight files of a Hugging Face directory: `model.safetensors` or the shards listed in
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: missing object field `weight_map`", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .map(|f| f.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .with_context(|| format!("{}: `weight_map` values must be file names", index.display()))?;
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.is_file() {
                bail!("{}: shard listed in {} not found", f.display(), index.display())
            }
        }
        return Ok(files);
    }
    bail!("{}: no model.safetensors or model.safetensors.index.json in this directory", dir.display())
}

/// A content hash of a base model: SHA-256 over its config and every weight file, so that an
/// adapter can refuse a base model it was not trained on.
pub fn fingerprint(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for f in files {
        let mut r = std::fs::File::open(f).with_context(|| format!("{}: cannot open", f.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).with_context(|| format!("{}: read error", f.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex(&h.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_str(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}
