//! Checkpoints of a run: `checkpoints/step-NNNNNNNN/` with the adapter, the optimizer moments
//! and `state.json` (schedule and data position, RNG state, the settings that must not change).
//! Each is written into a temporary directory and renamed into place, so a killed run leaves
//! only complete checkpoints.

use super::{OptimSettings, Task, Trainer};
use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct State {
    pub opt_step: u64,
    pub epoch: usize,
    pub next_batch: usize,
    pub skipped_steps: u64,
    pub skipped_samples: u64,
    pub optimizer_t: u64,
    /// [`OptimSettings::identity`] of the run (files of the first version hold the logging
    /// settings beside them).
    pub settings: serde_json::Value,
    /// What the run is (base models, data, every setting that changes the model or the data
    /// order), as the caller describes it; a resume must describe the same. Absent in
    /// checkpoints of the first version.
    #[serde(default)]
    pub identity: serde_json::Value,
}

/// Keys that the first version's `settings` held besides today's [`OptimSettings`].
const OLD_LOG_KEYS: &[&str] = &["save_every", "keep_checkpoints", "log_every"];

impl State {
    pub fn fresh(s: &OptimSettings) -> Self {
        State {
            opt_step: 0,
            epoch: 0,
            next_batch: 0,
            skipped_steps: 0,
            skipped_samples: 0,
            optimizer_t: 0,
            settings: serde_json::to_value(s.identity()).expect("settings serialise"),
            identity: serde_json::Value::Null,
        }
    }

    fn saved_settings(&self) -> Result<OptimSettings> {
        let mut v = self.settings.clone();
        if let Some(m) = v.as_object_mut() {
            m.retain(|k, _| !OLD_LOG_KEYS.contains(&k.as_str()));
        }
        Ok(serde_json::from_value(v)?)
    }
}

/// Complete checkpoints of `run`, oldest first.
pub fn list(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(run.join("checkpoints")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok())
                && e.path().join("state.json").is_file()
            {
                v.push((n, e.path()));
            }
        }
    }
    v.sort();
    v
}

/// Writes a checkpoint of the trainer's state, the newest adapter at the run's top level, and
/// keeps the newest `keep` checkpoints.
pub fn write<T: Task>(tr: &Trainer<'_, T>, run: &Path, keep: usize) -> Result<PathBuf> {
    let state = &tr.st;
    let dir = run.join("checkpoints");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let final_dir = dir.join(format!("step-{:08}", state.opt_step));
    let tmp = dir.join(format!(".step-{:08}.tmp-{}", state.opt_step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    tr.task.save_adapter(&tmp)?;
    crate::checkpoint::save_safetensors_atomic(&tr.opt.state_tensors(), None, &tmp.join("optimizer.safetensors"))?;
    crate::util::write_json_atomic(&tmp.join("state.json"), state)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("{}: cannot rename into place", final_dir.display()))?;
    // The run directory's top level always holds the newest adapter.
    tr.task.save_adapter(run)?;
    let all = list(run);
    if all.len() > keep.max(1) {
        for (_, p) in &all[..all.len() - keep.max(1)] {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(final_dir)
}

/// The files of one checkpoint, read and parsed.
struct Loaded {
    state: State,
    adapter: std::collections::HashMap<String, candle_core::Tensor>,
    optimizer: std::collections::HashMap<String, candle_core::Tensor>,
}

fn load(dir: &Path) -> Result<Loaded> {
    let sp = dir.join("state.json");
    let state: State = serde_json::from_value(crate::checkpoint::read_json(&sp)?)
        .with_context(|| format!("{}: malformed state", sp.display()))?;
    let adapter = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .with_context(|| format!("{}: cannot read the adapter", dir.display()))?;
    let optimizer = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)
        .with_context(|| format!("{}: cannot read the optimizer state", dir.display()))?;
    Ok(Loaded { state, adapter, optimizer })
}

/// `a.b.c` keys and their values of a tree of objects.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut std::collections::BTreeMap<String, serde_json::Value>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, x, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// `key: checkpoint X, now Y` for every key whose value differs.
pub fn differences(saved: &serde_json::Value, now: &serde_json::Value, prefix: &str) -> Vec<String> {
    differences_as(saved, now, prefix, ("checkpoint", "now"))
}

/// `key: A X, B Y` for every key whose value differs, `labels` naming the two sides.
pub fn differences_as(
    saved: &serde_json::Value,
    now: &serde_json::Value,
    prefix: &str,
    labels: (&str, &str),
) -> Vec<String> {
    let (la, lb) = labels;
    let (mut a, mut b) = (Default::default(), Default::default());
    flatten(prefix, saved, &mut a);
    flatten(prefix, now, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let show = |v: Option<&serde_json::Value>| v.map_or("(absent)".to_string(), |v| v.to_string());
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {la} {}, {lb} {}", show(a.get(k)), show(b.get(k))))
        .collect()
}

/// Restores the newest readable checkpoint of `run` into the trainer (an unreadable newest one
/// is reported and the previous one used); returns its step. Refused, with every difference
/// listed, when the run is not the same as the checkpoint's (`identity`, optimisation settings).
pub fn resume<T: Task>(tr: &mut Trainer<'_, T>, run: &Path, identity: &serde_json::Value) -> Result<u64> {
    let all = list(run);
    if all.is_empty() {
        bail!("{}: --resume given but no checkpoint found in checkpoints/", run.display())
    }
    let mut found = None;
    for (step, dir) in all.iter().rev() {
        match load(dir) {
            Ok(l) => {
                found = Some((*step, dir.clone(), l));
                break;
            }
            Err(e) => eprintln!("warning: checkpoint {} is unreadable ({e:#}); trying the previous one", dir.display()),
        }
    }
    let Some((step, dir, l)) = found else {
        bail!("{}: no readable checkpoint in checkpoints/ (every one failed to load; see above)", run.display())
    };
    let saved = l.state;
    let given = tr.s.identity();
    let was = saved.saved_settings().with_context(|| format!("{}: malformed settings", dir.display()))?;
    let mut diffs = differences(&serde_json::to_value(&was)?, &serde_json::to_value(&given)?, "optim");
    // Settings free to change on resume.
    diffs.retain(|d| !d.starts_with("optim.max_steps:"));
    if !saved.identity.is_null() {
        diffs.extend(differences(&saved.identity, identity, ""));
    }
    let mut seen = std::collections::BTreeSet::new();
    diffs.retain(|d| seen.insert(d.clone()));
    if !diffs.is_empty() {
        bail!(
            "{}: refusing to resume: the checkpoint was made with other settings, models or data:\n  {}\n(resume with the same models, data and settings, or start a new run with another --out)",
            dir.display(),
            diffs.join("\n  ")
        )
    }
    for (name, v) in tr.task.params() {
        let t = l
            .adapter
            .get(&name)
            .with_context(|| format!("{}: tensor `{name}` missing from the checkpoint", dir.display()))?;
        v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
    }
    tr.opt.load_state(saved.optimizer_t, &l.optimizer)?;
    eprintln!("resuming from {} (step {step}, epoch {}, batch {})", dir.display(), saved.epoch, saved.next_batch);
    tr.st = State { settings: serde_json::to_value(&given)?, identity: identity.clone(), ..saved };
    tr.stream = None;
    Ok(step)
}
