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

/// A rule a numeric setting must satisfy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    /// Any finite number.
    Finite,
    /// `>= x`.
    AtLeast(f64),
    /// `> 0`.
    Positive,
    /// In `[0, 1)`: a dropout probability or an AdamW beta.
    Fraction,
    /// In `(0, 1]`.
    Unit,
}

impl Rule {
    pub fn holds(self, x: f64) -> bool {
        x.is_finite()
            && match self {
                Rule::Finite => true,
                Rule::AtLeast(m) => x >= m,
                Rule::Positive => x > 0.0,
                Rule::Fraction => (0.0..1.0).contains(&x),
                Rule::Unit => x > 0.0 && x <= 1.0,
            }
    }

    pub fn describe(self) -> String {
        match self {
            Rule::Finite => "a finite number".into(),
            Rule::AtLeast(m) => format!("a finite number of at least {m}"),
            Rule::Positive => "a finite number above 0".into(),
            Rule::Fraction => "a number in [0, 1)".into(),
            Rule::Unit => "a number in (0, 1]".into(),
        }
    }
}

/// `key` (a dotted path of the settings) must satisfy `rule` when it is set.
#[derive(Clone, Copy, Debug)]
pub struct Check {
    pub key: &'static str,
    pub rule: Rule,
}

/// Checks every rule against a settings tree; the message names the key, the flag that sets
/// it, the value and the rule.
pub fn check_all(v: &Value, checks: &[Check], flags: &[Flag]) -> Result<()> {
    for c in checks {
        let mut cur = Some(v);
        for part in c.key.split('.') {
            cur = cur.and_then(|x| x.get(part));
        }
        let Some(x) = cur.filter(|x| !x.is_null()) else { continue };
        let ok = x.as_f64().is_some_and(|f| c.rule.holds(f));
        if !ok {
            let flag =
                flags.iter().find(|f| f.keys.contains(&c.key)).map(|f| format!(" (--{})", f.name)).unwrap_or_default();
            bail!("setting {}{flag} = {x}: must be {}", c.key, c.rule.describe())
        }
    }
    Ok(())
}

/// Fails on the first float that is NaN or infinite in a TOML document, naming its key (JSON,
/// which the settings pass through, has no such numbers).
pub fn check_toml_finite(v: &toml::Value, path: &str) -> Result<()> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => bail!("`{path}` = {f}: settings must be finite numbers"),
        toml::Value::Table(t) => {
            for (k, x) in t {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                check_toml_finite(x, &p)?;
            }
            Ok(())
        }
        toml::Value::Array(a) => {
            a.iter().enumerate().try_for_each(|(i, x)| check_toml_finite(x, &format!("{path}[{i}]")))
        }
        _ => Ok(()),
    }
}
