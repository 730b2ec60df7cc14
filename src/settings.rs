//! Command-line flags as data: each setting a flag sets is a row ([`Flag`]) naming its keys in
//! the run's settings tree, so the command line sets settings without copying them field by
//! field, and each method can declare its own flags beside its settings section. A leaf module:
//! it knows no setting itself.

use anyhow::{Result, bail};
use serde_json::Value;

/// How a flag's text becomes a settings value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A switch: present = `true`.
    Bool,
    UInt,
    Int,
    Float,
    Str,
    /// Comma-separated unsigned integers.
    UIntList,
    /// Comma-separated words.
    StrList,
}

/// One command-line flag of `train`: `--NAME VALUE` sets every key in `keys` (dotted paths).
#[derive(Clone, Copy, Debug)]
pub struct Flag {
    pub name: &'static str,
    pub keys: &'static [&'static str],
    pub kind: Kind,
    pub help: &'static str,
}

impl Flag {
    /// The settings value of the flag's text.
    pub fn parse(&self, text: &str) -> Result<Value> {
        let bad = |what: &str| anyhow::anyhow!("--{}: `{text}` is not {what}", self.name);
        Ok(match self.kind {
            Kind::Bool => Value::Bool(true),
            Kind::UInt => Value::from(text.trim().parse::<u64>().map_err(|_| bad("a non-negative integer"))?),
            Kind::Int => Value::from(text.trim().parse::<i64>().map_err(|_| bad("an integer"))?),
            Kind::Float => {
                let x = text.trim().parse::<f64>().map_err(|_| bad("a number"))?;
                if !x.is_finite() {
                    bail!("--{}: `{text}` is not a finite number", self.name)
                }
                Value::from(x)
            }
            Kind::Str => Value::from(text),
            Kind::UIntList => Value::Array(
                text.split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| {
                        s.trim().parse::<u64>().map(Value::from).map_err(|_| bad("a list of non-negative integers"))
                    })
                    .collect::<Result<_>>()?,
            ),
            Kind::StrList => {
                Value::Array(text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(Value::from).collect())
            }
        })
    }
}

/// Sets `path` (`a.b.c`) in a tree of objects, creating the objects on the way.
pub fn set_path(v: &mut Value, path: &str, x: Value) {
    let mut cur = v;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(serde_json::Map::new());
        }
        let m = cur.as_object_mut().expect("made an object above");
        if i + 1 == parts.len() {
            m.insert(p.to_string(), x);
            return;
        }
        cur = m.entry(p.to_string()).or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
}
