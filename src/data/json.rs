//! Reading the official JSON files of VQA v2, GQA and COCO: typed and fast, with messages that
//! name the file, the entry and the field when the content is not what the format says.

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `dir/name`, else the first of `dir/{alt}/name` that exists, else `dir/name` (so that the
/// error names the primary location).
pub(crate) fn find_file(dir: &Path, name: &str, alts: &[&str]) -> PathBuf {
    let primary = dir.join(name);
    if primary.is_file() {
        return primary;
    }
    alts.iter().map(|a| dir.join(a).join(name)).find(|p| p.is_file()).unwrap_or(primary)
}

/// Reads a JSON file into `T` (fast, typed). When that fails, re-reads it as a generic value
/// and runs `diagnose`, which names the entry and the field at fault; its message (or, if it
/// finds nothing, serde's) is returned prefixed with the file.
pub(crate) fn read_typed<T: DeserializeOwned>(
    path: &Path,
    what: &str,
    diagnose: impl Fn(&Value) -> Result<()>,
) -> Result<T> {
    if !path.is_file() {
        bail!("{}: {what} not found", path.display())
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read file", path.display()))?;
    match serde_json::from_slice::<T>(&bytes) {
        Ok(t) => Ok(t),
        Err(typed_err) => {
            let v: Value =
                serde_json::from_slice(&bytes).with_context(|| format!("{}: malformed JSON", path.display()))?;
            drop(bytes);
            match diagnose(&v) {
                Err(e) => bail!("{}: {e:#}", path.display()),
                Ok(()) => bail!("{}: unexpected content: {typed_err}", path.display()),
            }
        }
    }
}

/// A short rendering of a JSON value for messages.
pub(crate) fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 { format!("{}...", s.chars().take(60).collect::<String>()) } else { s }
}

/// `v[key]` of an object, or an error naming `at` and the field.
pub(crate) fn get<'a>(v: &'a Value, key: &str, at: &dyn Fn() -> String) -> Result<&'a Value> {
    match v {
        Value::Object(m) => m.get(key).with_context(|| format!("{}: missing field `{key}`", at())),
        other => bail!("{}: expected an object, found {}", at(), show(other)),
    }
}

pub(crate) fn check_str(v: &Value, key: &str, at: &dyn Fn() -> String) -> Result<()> {
    match get(v, key, at)? {
        Value::String(_) => Ok(()),
        other => bail!("{}: field `{key}` must be a string, found {}", at(), show(other)),
    }
}

pub(crate) fn check_opt_str(v: &Value, key: &str, at: &dyn Fn() -> String) -> Result<()> {
    match v.get(key) {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(other) => bail!("{}: field `{key}` must be a string, found {}", at(), show(other)),
    }
}

pub(crate) fn check_int(v: &Value, key: &str, at: &dyn Fn() -> String) -> Result<()> {
    match get(v, key, at)? {
        Value::Number(n) if n.is_i64() => Ok(()),
        other => bail!("{}: field `{key}` must be an integer, found {}", at(), show(other)),
    }
}

pub(crate) fn check_list<'a>(v: &'a Value, key: &str, at: &dyn Fn() -> String) -> Result<&'a Vec<Value>> {
    match get(v, key, at)? {
        Value::Array(a) => Ok(a),
        other => bail!("{}: field `{key}` must be a list, found {}", at(), show(other)),
    }
}
