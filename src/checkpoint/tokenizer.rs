//! Tokenizers: `tokenizer.json` of Hugging Face directories, or one built from GGUF metadata.

use super::GgufFile;
use anyhow::{Result, anyhow};
use std::path::Path;

pub struct Tok {
    pub inner: tokenizers::Tokenizer,
}

impl Tok {
    pub fn from_file(path: &Path) -> Result<Self> {
        super::require_file(path)?;
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Self { inner })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let e = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(e.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("tokenizer: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }
}

pub fn tokenizer_from_gguf(_g: &GgufFile) -> Result<Tok> {
    anyhow::bail!("not yet")
}
