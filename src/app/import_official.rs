//! `memvp import-official`: the authors' released MemVP checkpoint (`checkpoint-19.pth`, a
//! PyTorch pickle `{"model": state_dict}`, keys possibly prefixed `module.` by DDP) as a normal
//! run directory, with the released settings, so `memvp eval --run` reproduces the paper's
//! protocol with those weights.
//!
//! Released name → memvp name:
//! `adapter_proj.fc{1,2}.{weight,bias}` → `projector.fc{1,2}.*`;
//! `adapter_emb1` / `adapter_emb2` `[1, M, d]` → `memory.key_embed` / `memory.value_embed` `[M, d]`;
//! `backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc1/fc2.weight` →
//! `vision.layers.{i}.adapter.down/up.weight`.

use super::run::load_vlm;
use super::settings::RunSettings;
use crate::train::rundir::{self, RunLock};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct ImportArgs {
    /// The released checkpoint (`checkpoint-19.pth`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The CLIP ViT the checkpoint was trained with (a CLIP directory).
    #[arg(long)]
    pub vision: String,
    /// The LLaMA it was trained with (Hugging Face directory, .gguf, or Meta's original directory:
    /// params.json, consolidated.NN.pth, tokenizer.model).
    #[arg(long)]
    pub lm: PathBuf,
    /// The run directory to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Memory slots M (released: 320 for 7B, 400 for 13B); read from `adapter_emb1` when not
    /// given, refused when it disagrees.
    #[arg(long)]
    pub slots: Option<usize>,
    /// Replace what the run directory holds.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
pub struct ImportReport {
    pub run: PathBuf,
    pub checkpoint: PathBuf,
    pub checkpoint_sha256: String,
    /// memvp name ← released name.
    pub imported: BTreeMap<String, String>,
    /// Released tensors not carried over: frozen base weights and the unused modality embedding.
    pub skipped: Vec<String>,
    pub settings: serde_json::Value,
}

/// The memvp name of a released trained tensor; `Ok(None)` for tensors to skip, an error
/// string for names that belong to no MemVP checkpoint.
fn map_name(name: &str) -> Result<Option<String>, ()> {
    if let Some(rest) = name.strip_prefix("adapter_proj.") {
        return match rest {
            "fc1.weight" | "fc1.bias" | "fc2.weight" | "fc2.bias" => Ok(Some(format!("projector.{rest}"))),
            _ => Err(()),
        };
    }
    match name {
        "adapter_emb1" => return Ok(Some("memory.key_embed".into())),
        "adapter_emb2" => return Ok(Some("memory.value_embed".into())),
        // Created by the released code, never used in its forward.
        "adapter_modality_embedding.weight" => return Ok(None),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("backbone.visual.transformer.resblocks.")
        && let Some((i, tail)) = rest.split_once('.')
        && i.parse::<usize>().is_ok()
    {
        return Ok(match tail {
            "adapter_mlp.fc1.weight" => Some(format!("vision.layers.{i}.adapter.down.weight")),
            "adapter_mlp.fc2.weight" => Some(format!("vision.layers.{i}.adapter.up.weight")),
            t if t.starts_with("adapter") => return Err(()),
            // The frozen CLIP itself.
            _ => None,
        });
    }
    // The frozen LLaMA and CLIP (a checkpoint saved with the whole state dict).
    const FROZEN: &[&str] = &["layers.", "tok_embeddings.", "norm.", "output.", "backbone.", "freqs_cis"];
    if FROZEN.iter().any(|p| name.starts_with(p)) {
        return Ok(None);
    }
    Err(())
}

fn read_checkpoint(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        bail!("{}: no such file", path.display())
    }
    let tensors = candle_core::pickle::read_all_with_key(path, Some("model"))
        .or_else(|_| candle_core::pickle::read_all(path))
        .with_context(|| format!("{}: not a PyTorch checkpoint that memvp can read", path.display()))?;
    if tensors.is_empty() {
        bail!("{}: holds no tensors (expected {{\"model\": state_dict}})", path.display())
    }
    Ok(tensors.into_iter().map(|(k, t)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), t)).collect())
}

pub fn run(a: &ImportArgs) -> Result<ImportReport> {
    let src = a.checkpoint.display().to_string();
    let raw = read_checkpoint(&a.checkpoint)?;
    let mut mapped: BTreeMap<String, (String, Tensor)> = BTreeMap::new();
    let (mut skipped, mut unknown) = (Vec::new(), Vec::new());
    for (name, t) in raw {
        match map_name(&name) {
            Ok(Some(ours)) => {
                mapped.insert(ours, (name, t));
            }
            Ok(None) => skipped.push(name),
            Err(()) => unknown.push(name),
        }
    }
    if !unknown.is_empty() {
        bail!(
            "{src}: not a MemVP checkpoint of the released code: unknown trained tensors {} \
             (a checkpoint of another method?)",
            unknown.join(", ")
        )
    }
    let get = |ours: &str| -> Result<&(String, Tensor)> {
        mapped.get(ours).with_context(|| format!("{src}: the released tensor for `{ours}` is missing"))
    };
    // Settings from the shapes, the rest as released (../shared/METHOD.md).
    let (emb_name, emb) = get("memory.key_embed")?;
    let slots = match emb.dims() {
        [1, m, _] | [m, _] => *m,
        d => bail!("{src}: tensor `{emb_name}` has shape {d:?}, expected [1, M, d]"),
    };
    if let Some(want) = a.slots
        && want != slots
    {
        bail!("{src}: tensor `{emb_name}` has {slots} slots ({:?}), but --slots {want} was given", emb.dims())
    }
    let (fc1_name, fc1) = get("projector.fc1.weight")?;
    let hidden_proj = fc1.dims().first().copied().with_context(|| format!("{src}: `{fc1_name}` is a scalar"))?;
    let adapter_dim =
        mapped.iter().find(|(k, _)| k.ends_with(".adapter.down.weight")).map(|(_, (_, t))| t.dims()[0]).with_context(
            || format!("{src}: no vision adapter (`backbone.visual.transformer.resblocks.*.adapter_mlp`)"),
        )?;
    // Absolute paths, so the run directory works from anywhere.
    let vision = match std::fs::canonicalize(&a.vision) {
        Ok(p) if Path::new(&a.vision).is_dir() => p.display().to_string(),
        _ => a.vision.clone(),
    };
    let lm = std::fs::canonicalize(&a.lm).unwrap_or_else(|_| a.lm.clone());
    let tree = serde_json::json!({
        "model": { "vision": vision, "lm": lm.display().to_string() },
        "method": { "name": "memvp" },
        "memvp": {
            "slots": slots,
            "hidden_proj": hidden_proj,
            "visual_scale": 0.01,
            "adapter_scale": 0.1,
            "vision_adapter_dim": adapter_dim,
            "vision_adapter_scale": 0.1,
            "vision_layer": -2,
            "norm": "imagenet",
        },
        "data": { "max_len": 512, "prompt": { "prompt_format": "QCM-A" } },
    });
    let cfg = RunSettings::from_value(tree, "import-official")?;
    let vlm = load_vlm(&cfg)?;
    // Every tensor of the adapter from the checkpoint, shapes checked against the bases.
    let named = vlm.named();
    let mut imported = BTreeMap::new();
    for (ours, var) in &named {
        let (theirs, t) = get(ours)?;
        let t = if ours.starts_with("memory.") && t.rank() == 3 { t.squeeze(0)? } else { t.clone() };
        if t.dims() != var.dims() {
            bail!(
                "{src}: tensor `{theirs}` has shape {:?}, but these base models need {:?} for it \
                 (vision width {}, {} blocks; LM width {}): the checkpoint was trained on other bases",
                t.dims(),
                var.dims(),
                vlm.cfg.dims.vision_width,
                vlm.cfg.dims.vision_blocks,
                vlm.cfg.dims.lm_width
            )
        }
        var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        imported.insert(ours.clone(), theirs.clone());
    }
    let extra: Vec<&String> = mapped.values().map(|(n, _)| n).filter(|n| !imported.values().any(|v| v == *n)).collect();
    if let Some(first) = extra.first() {
        bail!("{src}: tensor `{first}` has no place in these base models (a vision adapter beyond the tower's blocks?)")
    }
    let _lock = RunLock::acquire(&a.out)?;
    let held = rundir::trained_state(&a.out);
    if !held.is_empty() {
        if !a.overwrite {
            bail!(
                "{}: this run directory already holds a trained run ({}); pass --overwrite to replace it or choose another --out",
                a.out.display(),
                held.join(", ")
            )
        }
        rundir::clear_trained_state(&a.out)?;
    }
    vlm.save(&a.out)?;
    crate::util::write_atomic(&a.out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let report = ImportReport {
        run: a.out.clone(),
        checkpoint: a.checkpoint.clone(),
        checkpoint_sha256: crate::checkpoint::fingerprint(std::slice::from_ref(&a.checkpoint))?,
        imported,
        skipped,
        settings: serde_json::to_value(&vlm.cfg.sections)?,
    };
    crate::util::write_json_atomic(&a.out.join("import.json"), &report)?;
    Ok(report)
}
