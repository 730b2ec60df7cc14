//! The settings of a training run: the sections that each layer owns (`[model]`, `[data]`,
//! `[method]` here; `[data.prompt]` in `data`; `[optim]` and `[log]` in `train`; each method's
//! sections in `adapters`), put together into the `config.toml` a run writes and `--config`
//! reads. Flags given on the command line are laid over the file's values by key, and the whole
//! is deserialised once. Files written by the first version (top-level `vision`/`lm`/`data`,
//! `[data_options]`, `[train]`) are read too.

use crate::adapters::{self, Sections};
use crate::data::DataOptions;
use crate::ops::WeightFormat;
use crate::settings::{Check, Flag, Kind, Rule, check_all, check_toml_finite, set_path};
use crate::train::{LogSettings, OptimSettings};
use crate::vlm::AdapterSettings;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// The run's settings that no method owns.
pub const COMMON_FLAGS: &[Flag] = &[
    Flag {
        name: "vision",
        keys: &["model.vision"],
        kind: Kind::Str,
        help: "CLIP checkpoint directory or random:<preset>[@seed] (presets: tiny, mini, small, bench, vit-b16, vit-l14)",
    },
    Flag {
        name: "lm",
        keys: &["model.lm"],
        kind: Kind::Str,
        help: "LM: Hugging Face directory, .gguf file or Meta's LLaMA directory (params.json + consolidated.NN.pth)",
    },
    Flag {
        name: "lm-dtype",
        keys: &["model.lm_dtype"],
        kind: Kind::Str,
        help: "Format of the LM's frozen matrices: auto (f32 on the CPU, bf16 on a GPU), f32, bf16, f16, keep (as stored; GGUF blocks stay quantized), q8_0, q4_0, q4_1, q4_k, q6_k [default: auto]",
    },
    Flag {
        name: "vision-dtype",
        keys: &["model.vision_dtype"],
        kind: Kind::Str,
        help: "Format of the vision tower's frozen matrices (as --lm-dtype) [default: auto]",
    },
    Flag {
        name: "grad-checkpoint",
        keys: &["model.grad_checkpoint"],
        kind: Kind::Bool,
        help: "Gradient checkpointing: keep only each LM block's input, recompute the blocks in the backward (less memory, about one more LM forward per step)",
    },
    Flag {
        name: "data",
        keys: &["data.source"],
        kind: Kind::Str,
        help: "KIND:PATH with KIND one of scienceqa, easyvqa, jsonl, vqav2, gqa, coco-captions",
    },
    Flag { name: "split", keys: &["data.split"], kind: Kind::Str, help: "Training split [default: train]" },
    Flag {
        name: "max-train-samples",
        keys: &["data.max_train_samples"],
        kind: Kind::UInt,
        help: "Use only the first N training samples",
    },
    Flag {
        name: "max-len",
        keys: &["data.max_len"],
        kind: Kind::UInt,
        help: "Longest prompt + answer in tokens [default: 512]",
    },
    Flag {
        name: "truncate-answers",
        keys: &["data.truncate_answers"],
        kind: Kind::Bool,
        help: "Cut answers longer than --max-len allows instead of refusing the data",
    },
    Flag {
        name: "image-cache-mb",
        keys: &["data.image_cache_mb"],
        kind: Kind::UInt,
        help: "Memory for decoded images kept between epochs [default: 1024]",
    },
    Flag {
        name: "prompt-format",
        keys: &["data.prompt.prompt_format"],
        kind: Kind::Str,
        help: "ScienceQA prompt format (QCM-A, CQM-A, QCM-LA, QCM-EA, ...)",
    },
    Flag {
        name: "use-caption",
        keys: &["data.prompt.use_caption"],
        kind: Kind::Bool,
        help: "ScienceQA: put the image caption into the context",
    },
    Flag {
        name: "vqa-template",
        keys: &["data.prompt.vqa_template"],
        kind: Kind::Str,
        help: "Template for open-ended questions, with {question}",
    },
    Flag {
        name: "caption-prompt",
        keys: &["data.prompt.caption_prompt"],
        kind: Kind::Str,
        help: "Prompt for captioning (coco-captions; default \"caption:\")",
    },
    Flag {
        name: "skip-bad-images",
        keys: &["data.prompt.skip_bad_images"],
        kind: Kind::Bool,
        help: "Skip samples whose image cannot be decoded instead of stopping",
    },
    Flag {
        name: "method",
        keys: &["method.name"],
        kind: Kind::Str,
        help: "What to train: memvp (default), input-space, lora",
    },
    Flag {
        name: "image-blind",
        keys: &["method.image_blind"],
        kind: Kind::Bool,
        help: "Train with every image indicator at 0 (image-blind control)",
    },
    Flag { name: "epochs", keys: &["optim.epochs"], kind: Kind::UInt, help: "Epochs of the schedule [default: 20]" },
    Flag {
        name: "max-steps",
        keys: &["optim.max_steps"],
        kind: Kind::UInt,
        help: "Stop after this many optimizer steps (the schedule still spans --epochs)",
    },
    Flag {
        name: "batch-size",
        keys: &["optim.batch_size"],
        kind: Kind::UInt,
        help: "Samples per micro-batch [default: 4]",
    },
    Flag {
        name: "accum-steps",
        keys: &["optim.accum_steps"],
        kind: Kind::UInt,
        help: "Micro-batches per optimizer step [default: 1]",
    },
    Flag { name: "lr", keys: &["optim.lr"], kind: Kind::Float, help: "Absolute learning rate (instead of --blr)" },
    Flag {
        name: "blr",
        keys: &["optim.blr"],
        kind: Kind::Float,
        help: "Base learning rate, scaled by effective batch / 256 [default: 9e-3]",
    },
    Flag {
        name: "min-lr",
        keys: &["optim.min_lr"],
        kind: Kind::Float,
        help: "Floor of the cosine schedule [default: 0]",
    },
    Flag {
        name: "warmup-epochs",
        keys: &["optim.warmup_epochs"],
        kind: Kind::Float,
        help: "Linear warm-up length in epochs [default: 2]",
    },
    Flag {
        name: "weight-decay",
        keys: &["optim.weight_decay"],
        kind: Kind::Float,
        help: "AdamW weight decay (not on 1-D tensors) [default: 0.02]",
    },
    Flag { name: "beta1", keys: &["optim.beta1"], kind: Kind::Float, help: "AdamW beta1 [default: 0.9]" },
    Flag { name: "beta2", keys: &["optim.beta2"], kind: Kind::Float, help: "AdamW beta2 [default: 0.95]" },
    Flag {
        name: "clip-grad",
        keys: &["optim.clip_grad"],
        kind: Kind::Float,
        help: "Clip the global gradient norm to this value",
    },
    Flag {
        name: "seed",
        keys: &["optim.seed"],
        kind: Kind::UInt,
        help: "Seeds initialisation, data order and dropout [default: 0]",
    },
    Flag {
        name: "max-bad-steps",
        keys: &["optim.max_bad_steps"],
        kind: Kind::UInt,
        help: "Stop after this many steps with a non-finite loss or gradient [default: 20]",
    },
    Flag {
        name: "save-every",
        keys: &["log.save_every"],
        kind: Kind::UInt,
        help: "Checkpoint every N optimizer steps (and always at the end)",
    },
    Flag {
        name: "keep-checkpoints",
        keys: &["log.keep_checkpoints"],
        kind: Kind::UInt,
        help: "How many step checkpoints to keep [default: 3]",
    },
    Flag {
        name: "log-every",
        keys: &["log.log_every"],
        kind: Kind::UInt,
        help: "Without a terminal, print a progress line every N steps [default: 50]",
    },
];

/// The ranges of the common numeric settings; each method adds its own.
pub const COMMON_CHECKS: &[Check] = &[
    Check { key: "data.max_train_samples", rule: Rule::AtLeast(1.0) },
    Check { key: "data.max_len", rule: Rule::AtLeast(2.0) },
    Check { key: "optim.epochs", rule: Rule::AtLeast(1.0) },
    Check { key: "optim.max_steps", rule: Rule::AtLeast(1.0) },
    Check { key: "optim.batch_size", rule: Rule::AtLeast(1.0) },
    Check { key: "optim.accum_steps", rule: Rule::AtLeast(1.0) },
    Check { key: "optim.lr", rule: Rule::Positive },
    Check { key: "optim.blr", rule: Rule::Positive },
    Check { key: "optim.min_lr", rule: Rule::AtLeast(0.0) },
    Check { key: "optim.warmup_epochs", rule: Rule::AtLeast(0.0) },
    Check { key: "optim.weight_decay", rule: Rule::AtLeast(0.0) },
    Check { key: "optim.beta1", rule: Rule::Fraction },
    Check { key: "optim.beta2", rule: Rule::Fraction },
    Check { key: "optim.eps", rule: Rule::Positive },
    Check { key: "optim.clip_grad", rule: Rule::Positive },
    Check { key: "optim.max_bad_steps", rule: Rule::AtLeast(1.0) },
    Check { key: "log.save_every", rule: Rule::AtLeast(1.0) },
    Check { key: "log.keep_checkpoints", rule: Rule::AtLeast(1.0) },
];

/// Every flag of `train`: the common ones and each method's, merged by name (a flag that
/// several methods declare sets all their keys).
pub fn all_flags() -> Vec<Flag> {
    let mut out: Vec<Flag> = COMMON_FLAGS.to_vec();
    let mut extra: Vec<(Flag, Vec<&'static str>)> = Vec::new();
    for m in adapters::METHODS {
        for f in m.flags {
            match extra.iter_mut().find(|(g, _)| g.name == f.name) {
                Some((_, keys)) => {
                    for k in f.keys {
                        if !keys.contains(k) {
                            keys.push(k)
                        }
                    }
                }
                None => extra.push((*f, f.keys.to_vec())),
            }
        }
    }
    for (mut f, keys) in extra {
        f.keys = Box::leak(keys.into_boxed_slice());
        out.push(f);
    }
    out
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// CLIP checkpoint directory or `random:<preset>[@seed]`.
    pub vision: String,
    /// LM directory or `.gguf` file.
    pub lm: String,
    /// The format the LM's frozen matrices are kept in.
    #[serde(skip_serializing_if = "is_auto")]
    pub lm_dtype: WeightFormat,
    /// The format the vision tower's frozen matrices are kept in.
    #[serde(skip_serializing_if = "is_auto")]
    pub vision_dtype: WeightFormat,
    /// Keep only each LM block's input during a training step and recompute the blocks in the
    /// backward (LLaMA-family LMs; MemVP, ADEM-VL and the image-blind control).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub grad_checkpoint: bool,
}

/// Runs on the default format (f32 on the CPU, bf16 on a GPU) write no dtype keys, so their files
/// stay as earlier versions wrote them (which meant f32, what `auto` is on the CPU).
fn is_auto(f: &WeightFormat) -> bool {
    *f == WeightFormat::Auto
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSettings {
    /// `KIND:PATH`.
    pub source: String,
    pub split: String,
    /// Use only the first N training samples.
    pub max_train_samples: Option<usize>,
    /// Longest prompt + answer in tokens.
    pub max_len: usize,
    /// Memory for decoded, resized images kept between epochs.
    pub image_cache_mb: usize,
    /// Cut answers that do not fit in `max_len` instead of refusing the data.
    pub truncate_answers: bool,
    pub prompt: DataOptions,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            source: String::new(),
            split: "train".into(),
            max_train_samples: None,
            max_len: 512,
            image_cache_mb: 1024,
            truncate_answers: false,
            prompt: DataOptions::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodSettings {
    /// A registered method (`adapters::METHODS`).
    pub name: String,
    /// Train with every image indicator at 0 (the image-blind control).
    pub image_blind: bool,
}

impl Default for MethodSettings {
    fn default() -> Self {
        Self { name: "memvp".into(), image_blind: false }
    }
}

/// Every setting of a training run; written resolved into the run directory as `config.toml`.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSettings {
    pub model: ModelSettings,
    pub data: DataSettings,
    pub method: MethodSettings,
    /// The methods' sections (`memvp`, `input_space`, `lora`), defaults filled in.
    pub sections: Sections,
    pub optim: OptimSettings,
    pub log: LogSettings,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self::from_value(Value::Object(Map::new()), "defaults").expect("the defaults are valid")
    }
}

const FIXED: &[&str] = &["model", "data", "method", "optim", "log"];

impl RunSettings {
    /// From a settings tree (a parsed `config.toml`, with flags laid over it). `origin` names
    /// it in messages.
    pub fn from_value(v: Value, origin: &str) -> Result<Self> {
        let Value::Object(mut m) = upgrade(v)? else { bail!("{origin}: expected a table of settings") };
        let mut take = |k: &str| m.remove(k).unwrap_or(Value::Object(Map::new()));
        let model = serde_json::from_value(take("model")).map_err(|e| anyhow::anyhow!("{origin}: [model]: {e}"))?;
        let data = serde_json::from_value(take("data")).map_err(|e| anyhow::anyhow!("{origin}: [data]: {e}"))?;
        let method: MethodSettings =
            serde_json::from_value(take("method")).map_err(|e| anyhow::anyhow!("{origin}: [method]: {e}"))?;
        let optim = serde_json::from_value(take("optim")).map_err(|e| anyhow::anyhow!("{origin}: [optim]: {e}"))?;
        let log = serde_json::from_value(take("log")).map_err(|e| anyhow::anyhow!("{origin}: [log]: {e}"))?;
        let known = adapters::all_sections();
        let mut given = Sections::new();
        for (k, v) in m {
            if !known.contains(&k.as_str()) {
                let mut all: Vec<&str> = FIXED.to_vec();
                all.extend(known.iter().copied());
                bail!("{origin}: unknown section or key `{k}` (known: {})", all.join(", "))
            }
            given.insert(k, v);
        }
        adapters::spec(&method.name).with_context(|| format!("{origin}: [method] name"))?;
        // Every method's sections, defaults filled in and checked.
        let mut sections = Sections::new();
        for spec in adapters::METHODS {
            for (k, v) in (spec.resolve)(&given).with_context(|| format!("{origin}: method {}", spec.name))? {
                sections.insert(k, v);
            }
        }
        Ok(Self { model, data, method, sections, optim, log })
    }

    /// Every numeric setting of the run and of its method in range, and consistent.
    pub fn validate(&self) -> Result<()> {
        let v = self.to_value()?;
        let flags = all_flags();
        check_all(&v, COMMON_CHECKS, &flags)?;
        check_all(&v, adapters::spec(&self.method.name)?.checks, &flags)?;
        if let Some(lr) = self.optim.lr
            && self.optim.min_lr > lr
        {
            bail!("setting optim.min_lr (--min-lr) = {} is above optim.lr (--lr) = {lr}", self.optim.min_lr)
        }
        Ok(())
    }

    pub fn to_value(&self) -> Result<Value> {
        let mut m = Map::new();
        m.insert("model".into(), serde_json::to_value(&self.model)?);
        m.insert("data".into(), serde_json::to_value(&self.data)?);
        m.insert("method".into(), serde_json::to_value(&self.method)?);
        m.insert("optim".into(), serde_json::to_value(&self.optim)?);
        m.insert("log".into(), serde_json::to_value(&self.log)?);
        for (k, v) in &self.sections {
            m.insert(k.clone(), v.clone());
        }
        Ok(Value::Object(m))
    }

    /// `config.toml`'s text (unset optional settings are left out: TOML has no null).
    pub fn to_toml(&self) -> Result<String> {
        let mut v = self.to_value()?;
        strip_nulls(&mut v);
        Ok(toml::to_string_pretty(&v)?)
    }

    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let v = read_toml(path)?;
        Self::from_value(v, &path.display().to_string())
    }

    /// The file's values (if any) with `overrides` (dotted key, value) laid over them.
    pub fn layered(file: Option<&Path>, overrides: &[(String, Value)]) -> Result<Self> {
        let (mut v, origin) = match file {
            Some(p) => (upgrade(read_toml(p)?)?, p.display().to_string()),
            None => (Value::Object(Map::new()), "settings".to_string()),
        };
        for (k, x) in overrides {
            set_path(&mut v, k, x.clone());
        }
        Self::from_value(v, &origin)
    }

    pub fn train_settings(&self) -> crate::train::TrainSettings {
        crate::train::TrainSettings { optim: self.optim.clone(), log: self.log.clone() }
    }

    /// Sets one key of a method's section (`memvp.slots`).
    pub fn set(&mut self, key: &str, v: Value) {
        let (sec, rest) = key.split_once('.').unwrap_or((key, ""));
        let entry = self.sections.entry(sec.to_string()).or_insert_with(|| Value::Object(Map::new()));
        set_path(entry, rest, v);
    }

    /// What a fresh adapter of this run is made from.
    pub fn adapter_settings(&self) -> AdapterSettings {
        AdapterSettings {
            method: self.method.name.clone(),
            sections: self.sections.clone(),
            prompt: self.data.prompt.clone(),
            max_len: self.data.max_len,
            image_blind: self.method.image_blind,
            seed: self.optim.seed,
        }
    }
}

fn read_toml(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let t: toml::Value = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    check_toml_finite(&t, "").map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(serde_json::to_value(t)?)
}

fn strip_nulls(v: &mut Value) {
    if let Value::Object(m) = v {
        m.retain(|_, x| !x.is_null());
        m.values_mut().for_each(strip_nulls);
    }
}

/// Keys of the engine's settings that the first layout kept in `[train]` and that now live in
/// `[log]`.
const LOG_KEYS: &[&str] = &["save_every", "keep_checkpoints", "log_every"];

/// The layout of the first version (`vision`, `lm`, `data`, `split`, `method`, `image_blind`,
/// `max_len`, `max_train_samples`, `image_cache_mb` at the top, `[data_options]`, `[train]`)
/// moved into today's sections; today's layout passes through unchanged.
fn upgrade(v: Value) -> Result<Value> {
    let Value::Object(mut m) = v else { return Ok(v) };
    let legacy = m.get("data").is_some_and(Value::is_string)
        || ["vision", "lm", "split", "train", "data_options", "image_blind", "max_len"]
            .iter()
            .any(|k| m.contains_key(*k))
        || m.get("method").is_some_and(Value::is_string);
    if !legacy {
        return Ok(Value::Object(m));
    }
    let mut out = Value::Object(Map::new());
    let moves: &[(&str, &str)] = &[
        ("vision", "model.vision"),
        ("lm", "model.lm"),
        ("data", "data.source"),
        ("split", "data.split"),
        ("max_train_samples", "data.max_train_samples"),
        ("max_len", "data.max_len"),
        ("image_cache_mb", "data.image_cache_mb"),
        ("data_options", "data.prompt"),
        ("method", "method.name"),
        ("image_blind", "method.image_blind"),
    ];
    for (from, to) in moves {
        if let Some(x) = m.remove(*from) {
            set_path(&mut out, to, x);
        }
    }
    if let Some(Value::Object(t)) = m.remove("train") {
        for (k, x) in t {
            let sec = if LOG_KEYS.contains(&k.as_str()) { "log" } else { "optim" };
            set_path(&mut out, &format!("{sec}.{k}"), x);
        }
    }
    for (k, x) in m {
        set_path(&mut out, &k, x);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `config.toml` as the first version wrote it reads to the same settings as today's
    /// layout of the same values.
    #[test]
    fn first_version_config_reads_as_today() {
        let old = r#"
vision = "random:tiny"
lm = "/models/lm"
data = "jsonl:/data/x.jsonl"
split = "train"
method = "input-space"
image_blind = true
max_len = 64
image_cache_mb = 16

[data_options]
prompt_format = "QCM-A"
use_caption = false
skip_bad_images = true

[train]
epochs = 3
batch_size = 2
accum_steps = 1
blr = 0.009
lr = 0.01
min_lr = 0.0
warmup_epochs = 0.0
weight_decay = 0.02
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
seed = 3
keep_checkpoints = 2
max_bad_steps = 20
log_every = 5

[memvp]
slots = 16
hidden_proj = 8
visual_scale = 0.01
adapter_scale = 0.1
memory_dropout = 0.1
vision_adapter_dim = 4
vision_adapter_scale = 0.1
vision_adapter_dropout = 0.1
vision_layer = -2
norm = "imagenet"
memory_sites = "both"

[lora]
rank = 4
alpha = 8.0
dropout = 0.05
targets = ["q_proj", "v_proj"]
"#;
        let v: Value = serde_json::to_value(toml::from_str::<toml::Value>(old).unwrap()).unwrap();
        let a = RunSettings::from_value(v, "old").unwrap();
        assert_eq!(a.model.vision, "random:tiny");
        assert_eq!(a.data.source, "jsonl:/data/x.jsonl");
        assert_eq!(a.method.name, "input-space");
        assert!(a.method.image_blind && a.data.prompt.skip_bad_images);
        assert_eq!((a.optim.epochs, a.optim.lr, a.log.keep_checkpoints, a.log.log_every), (3, Some(0.01), 2, 5));
        assert_eq!(a.sections["lora"]["rank"], 4);
        assert_eq!(a.sections["memvp"]["slots"], 16);
        // Written in today's layout and read back: the same settings.
        let text = a.to_toml().unwrap();
        assert!(text.contains("[optim]") && text.contains("[log]") && !text.contains("[train]"), "{text}");
        let back: Value = serde_json::to_value(toml::from_str::<toml::Value>(&text).unwrap()).unwrap();
        assert_eq!(RunSettings::from_value(back, "new").unwrap(), a);
    }

    #[test]
    fn flags_lay_over_the_file_and_unknown_keys_are_refused() {
        let over = vec![("optim.lr".to_string(), Value::from(0.5)), ("memvp.slots".to_string(), Value::from(7))];
        let s = RunSettings::layered(None, &over).unwrap();
        assert_eq!(s.optim.lr, Some(0.5));
        assert_eq!(s.sections["memvp"]["slots"], 7);
        let bad = vec![("memvp.slotz".to_string(), Value::from(7))];
        let e = format!("{:#}", RunSettings::layered(None, &bad).unwrap_err());
        assert!(e.contains("slotz"), "{e}");
        let bad = vec![("optimizer.lr".to_string(), Value::from(1))];
        let e = format!("{:#}", RunSettings::layered(None, &bad).unwrap_err());
        assert!(e.contains("optimizer"), "{e}");
    }

    /// Every range check, of the common settings and of each method, refuses a value just out of
    /// its range, naming the key; in-range defaults pass.
    #[test]
    fn every_range_check_refuses_an_out_of_range_value() {
        let mut all: Vec<(&str, Check)> = COMMON_CHECKS.iter().map(|c| ("memvp", *c)).collect();
        for m in adapters::METHODS {
            all.extend(m.checks.iter().map(|c| (m.name, *c)));
        }
        for (method, c) in all {
            let bad = match c.rule {
                Rule::AtLeast(m) => Value::from((m - 1.0) as i64),
                Rule::Positive => Value::from(0.0),
                Rule::Fraction => Value::from(1.0),
                Rule::Unit => Value::from(1.5),
                // JSON has no non-finite numbers; TOML's are refused on reading (next test).
                Rule::Finite => continue,
            };
            let over = vec![("method.name".to_string(), Value::from(method)), (c.key.to_string(), bad.clone())];
            let e = match RunSettings::layered(None, &over).and_then(|s| s.validate()) {
                Ok(()) => panic!("{} = {bad} was accepted", c.key),
                Err(e) => format!("{e:#}"),
            };
            assert!(e.contains(c.key), "{}: {e}", c.key);
            let ok = vec![("method.name".to_string(), Value::from(method))];
            RunSettings::layered(None, &ok).unwrap().validate().unwrap();
        }
    }

    /// Every numeric flag refuses text that is not a finite number of its kind, naming itself.
    #[test]
    fn every_numeric_flag_refuses_non_numbers() {
        for f in all_flags() {
            let bad: &[&str] = match f.kind {
                Kind::Float => &["nan", "inf", "-inf", "x", ""],
                Kind::UInt => &["-1", "1.5", "nan", "x"],
                Kind::Int => &["1.5", "nan", "x"],
                Kind::UIntList => &["1,x", "-1"],
                _ => continue,
            };
            for b in bad {
                let e = format!("{:#}", f.parse(b).unwrap_err());
                assert!(e.contains(&format!("--{}", f.name)), "{e}");
            }
        }
    }

    #[test]
    fn non_finite_toml_values_name_their_key() {
        let t: toml::Value = toml::from_str("[optim]\nlr = nan\n[memvp]\nvisual_scale = inf\n").unwrap();
        let e = format!("{:#}", check_toml_finite(&t, "").unwrap_err());
        assert!(e.contains("memvp.visual_scale") || e.contains("optim.lr"), "{e}");
    }
}
