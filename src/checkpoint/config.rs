//! Typed access to `config.json` fields with errors that name the file and the field.

use anyhow::{Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Cfg {
    pub v: Value,
    pub file: PathBuf,
    /// Dotted path of this object inside the file, for messages (`vision_config.`).
    pub prefix: String,
}

impl Cfg {
    pub fn load(path: &Path) -> Result<Self> {
        super::require_file(path)?;
        let v = super::read_json(path)?;
        if !v.is_object() {
            bail!("{}: expected a JSON object", path.display())
        }
        Ok(Self { v, file: path.to_path_buf(), prefix: String::new() })
    }

    pub fn from_value(v: Value, file: &Path) -> Self {
        Self { v, file: file.to_path_buf(), prefix: String::new() }
    }

    fn where_(&self, key: &str) -> String {
        format!("{}: field `{}{}`", self.file.display(), self.prefix, key)
    }

    pub fn sub(&self, key: &str) -> Option<Cfg> {
        self.v.get(key).filter(|x| x.is_object()).map(|x| Cfg {
            v: x.clone(),
            file: self.file.clone(),
            prefix: format!("{}{}.", self.prefix, key),
        })
    }

    pub fn has(&self, key: &str) -> bool {
        self.v.get(key).is_some_and(|x| !x.is_null())
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => bail!("{}: expected a non-negative integer, found {x}", self.where_(key)),
            },
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| anyhow::anyhow!("{}: missing", self.where_(key)))
    }

    pub fn usize_or(&self, key: &str, d: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(d))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_f64() {
                Some(n) => Ok(Some(n)),
                None => bail!("{}: expected a number, found {x}", self.where_(key)),
            },
        }
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| anyhow::anyhow!("{}: missing", self.where_(key)))
    }

    pub fn f64_or(&self, key: &str, d: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(d))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(x) => bail!("{}: expected true or false, found {x}", self.where_(key)),
        }
    }

    pub fn bool_or(&self, key: &str, d: bool) -> Result<bool> {
        Ok(self.opt_bool(key)?.unwrap_or(d))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(x) => bail!("{}: expected a string, found {x}", self.where_(key)),
        }
    }

    /// A token id given as a number or a list of numbers (`eos_token_id`).
    pub fn ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(vec![n.as_u64().unwrap() as u32]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|n| n as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| anyhow::anyhow!("{}: expected token ids", self.where_(key))),
            Some(x) => bail!("{}: expected a token id or a list of them, found {x}", self.where_(key)),
        }
    }

    pub fn err(&self, key: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}: {msg}", self.where_(key))
    }
}
