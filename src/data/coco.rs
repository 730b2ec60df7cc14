//! COCO Captions with the Karpathy split: `DIR/dataset_coco.json` (`{"images": [{"filepath":
//! "val2014", "filename": "COCO_val2014_....jpg", "cocoid": int, "split":
//! "train"|"restval"|"val"|"test", "sentences": [{"raw": str, ...}, ...]}, ...]}`), images at
//! `DIR/{filepath}/{filename}`, and optionally the official caption annotations
//! `DIR/annotations/captions_{train2014,val2014}.json` for evaluation.
//!
//! Splits (Karpathy convention):
//! * `train` = Karpathy `train` + `restval` (113,287 images), `restval` alone, `val`, `test`
//!   (5,000 images each);
//! * unit: `train` and `restval` give **one sample per (image, caption)** (every reference is a
//!   training target; `id` = `{cocoid}#{k}`), `val` and `test` give **one sample per image**
//!   (`id` = cocoid; target = the first caption; `references` = all of them);
//! * the suffixes `.captions` / `.images` override the unit: `val.captions` trains on the val
//!   captions, `train.images` evaluates on train images.
//!
//! * Prompt: `DataOptions::caption_prompt`, default the VL-T5 prefix `caption:`.
//! * Captions are the `raw` sentences, trimmed.
//! * Scoring: predictions `[{"image_id": cocoid, "caption": str}]` (generated text trimmed; when
//!   several samples share an image, the first one's caption is kept: pycocoevalcap takes one
//!   caption per image), scored by [`crate::eval::captions`]. Ground truth: the official
//!   `DIR/annotations/captions_{filepath}.json` when it exists for every evaluated image folder
//!   (the official evaluation), else the same structure built from the Karpathy references
//!   (`{"images": [{"id"}], "annotations": [{"image_id", "id", "caption"}]}`). `eval.json` is the
//!   scorer output (raw values as pycocoevalcap reports them, e.g. CIDEr 1.17) plus `gt_source`;
//!   the printed table shows them x100 (CIDEr 117.0), as papers report them.

use super::json::{check_int, check_list, check_str, find_file, read_typed, show};
use super::{DataOptions, Dataset, Sample, Scored, read_json_file};
use crate::eval::captions;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The VL-T5 prefix for captioning.
pub const DEFAULT_PROMPT: &str = "caption:";
pub const KARPATHY_FILE: &str = "dataset_coco.json";

pub struct CocoCaptions {
    dir: PathBuf,
    opts: DataOptions,
}

#[derive(Deserialize)]
struct KarpathyFile {
    images: Vec<KImage>,
}

#[derive(Deserialize)]
struct KImage {
    filepath: String,
    filename: String,
    cocoid: i64,
    split: String,
    sentences: Vec<KSentence>,
}

#[derive(Deserialize)]
struct KSentence {
    raw: String,
}

/// One sample per caption or one per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Caption,
    Image,
}

/// The Karpathy splits a split name covers and its unit (see the module docs).
pub fn parse_split(split: &str) -> Result<(Vec<&'static str>, Unit)> {
    let (base, unit) = match split.rsplit_once('.') {
        Some((b, "captions")) => (b, Some(Unit::Caption)),
        Some((b, "images")) => (b, Some(Unit::Image)),
        _ => (split, None),
    };
    let (parts, default): (Vec<&'static str>, Unit) = match base {
        "train" => (vec!["train", "restval"], Unit::Caption),
        "restval" => (vec!["restval"], Unit::Caption),
        "val" => (vec!["val"], Unit::Image),
        "test" => (vec!["test"], Unit::Image),
        other => bail!(
            "coco-captions: unknown split `{other}` (splits: train (= Karpathy train + restval), restval, val, test; add .captions or .images to choose one sample per caption or per image)"
        ),
    };
    Ok((parts, unit.unwrap_or(default)))
}

fn diagnose(v: &Value) -> Result<()> {
    let top = || "top level".to_string();
    let images = check_list(v, "images", &top)?;
    for (i, img) in images.iter().enumerate() {
        let at = || match img.get("cocoid") {
            Some(id) => format!("images[{i}] (cocoid {})", show(id)),
            None => format!("images[{i}]"),
        };
        check_int(img, "cocoid", &at)?;
        check_str(img, "filepath", &at)?;
        check_str(img, "filename", &at)?;
        check_str(img, "split", &at)?;
        let sents = check_list(img, "sentences", &at)?;
        for (j, s) in sents.iter().enumerate() {
            let at2 = || format!("{}: sentences[{j}]", at());
            check_str(s, "raw", &at2)?;
        }
    }
    Ok(())
}

impl CocoCaptions {
    pub fn open(dir: &Path, opts: &DataOptions) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "{}: COCO directory not found (expected {KARPATHY_FILE} and the image folders train2014/, val2014/)",
                dir.display()
            )
        }
        Ok(Self { dir: dir.to_path_buf(), opts: opts.clone() })
    }

    pub fn karpathy_path(&self) -> PathBuf {
        find_file(&self.dir, KARPATHY_FILE, &["annotations", "karpathy"])
    }

    /// `DIR/annotations/captions_{folder}.json`.
    pub fn official_path(&self, folder: &str) -> PathBuf {
        self.dir.join("annotations").join(format!("captions_{folder}.json"))
    }
}

impl Dataset for CocoCaptions {
    fn kind(&self) -> &'static str {
        "coco-captions"
    }

    fn samples(&self, split: &str) -> Result<Vec<Sample>> {
        let (parts, unit) = parse_split(split)?;
        let kf = self.karpathy_path();
        let file: KarpathyFile = read_typed(&kf, "Karpathy split file", diagnose)?;
        let prompt = self.opts.caption_prompt.clone().unwrap_or_else(|| DEFAULT_PROMPT.to_string());
        let mut out = Vec::new();
        for (i, img) in file.images.iter().enumerate() {
            if !parts.contains(&img.split.as_str()) {
                continue;
            }
            let refs: Vec<String> = img.sentences.iter().map(|s| s.raw.trim().to_string()).collect();
            if refs.is_empty() {
                bail!("{}: images[{i}] (cocoid {}): field `sentences` is empty", kf.display(), img.cocoid)
            }
            let image = self.dir.join(&img.filepath).join(&img.filename);
            let extra = json!({"image_id": img.cocoid, "filepath": img.filepath});
            let sample = |id: String, answer: &String| Sample {
                id,
                image: Some(image.clone()),
                prompt: prompt.clone(),
                answer: answer.clone(),
                eval_prefix: String::new(),
                qtype: None,
                references: refs.clone(),
                extra: extra.clone(),
            };
            match unit {
                Unit::Image => out.push(sample(img.cocoid.to_string(), &refs[0])),
                Unit::Caption => {
                    for (k, r) in refs.iter().enumerate() {
                        out.push(sample(format!("{}#{k}", img.cocoid), r));
                    }
                }
            }
        }
        if out.is_empty() {
            bail!("{}: split `{split}` is empty (no image has split {})", kf.display(), parts.join(" or "))
        }
        Ok(out)
    }

    fn max_new_tokens(&self) -> usize {
        20
    }

    fn score(&self, samples: &[Sample], outputs: &[String]) -> Result<Scored> {
        super::check_outputs("coco-captions", samples, outputs, "captions")?;
        // one prediction per image: the first sample's
        let mut seen = HashSet::new();
        let mut preds = Vec::new();
        let mut images: Vec<&Sample> = Vec::new();
        let mut folders: Vec<String> = Vec::new();
        for (s, o) in samples.iter().zip(outputs) {
            let id = s.extra["image_id"]
                .as_i64()
                .with_context(|| format!("coco-captions: sample {} has no image_id (not a COCO sample)", s.id))?;
            if !seen.insert(id) {
                continue;
            }
            preds.push(json!({"image_id": id, "caption": o.trim()}));
            images.push(s);
            let folder = s.extra["filepath"].as_str().unwrap_or_default().to_string();
            if !folders.contains(&folder) {
                folders.push(folder);
            }
        }
        let official: Vec<PathBuf> = folders.iter().map(|f| self.official_path(f)).collect();
        let (gt, source, gt_name) = if official.iter().all(|p| p.is_file()) {
            let mut all_images = Vec::new();
            let mut all_anns = Vec::new();
            for p in &official {
                let v = read_json_file(p)?;
                match v.get("images") {
                    Some(Value::Array(a)) => all_images.extend(a.iter().cloned()),
                    None => {}
                    Some(other) => bail!("{}: field `images` must be a list, found {}", p.display(), show(other)),
                }
                match v.get("annotations") {
                    Some(Value::Array(a)) => all_anns.extend(a.iter().cloned()),
                    Some(other) => bail!("{}: field `annotations` must be a list, found {}", p.display(), show(other)),
                    None => bail!("{}: missing field `annotations`", p.display()),
                }
            }
            let names: Vec<String> = official.iter().map(|p| p.display().to_string()).collect();
            (
                json!({"images": all_images, "annotations": all_anns}),
                format!("official {}", names.join(", ")),
                names.join(", "),
            )
        } else {
            let mut imgs = Vec::new();
            let mut anns = Vec::new();
            for s in &images {
                let id = s.extra["image_id"].clone();
                imgs.push(json!({"id": id}));
                for r in &s.references {
                    anns.push(json!({"image_id": id, "id": anns.len(), "caption": r}));
                }
            }
            let kf = self.karpathy_path();
            (
                json!({"images": imgs, "annotations": anns}),
                format!("karpathy {} (references of the evaluated images)", kf.display()),
                kf.display().to_string(),
            )
        };
        let preds = Value::Array(preds);
        let (s, _) = captions::score_captions_typed(&gt, &preds)
            .with_context(|| format!("coco-captions: scoring against {gt_name}"))?;
        let mut metrics = s.to_json();
        if let Value::Object(m) = &mut metrics {
            m.insert("gt_source".into(), json!(source));
        }
        let n = s.num_images;
        let table = vec![
            ("Bleu_1".to_string(), 100.0 * s.bleu_1, n),
            ("Bleu_2".to_string(), 100.0 * s.bleu_2, n),
            ("Bleu_3".to_string(), 100.0 * s.bleu_3, n),
            ("Bleu_4".to_string(), 100.0 * s.bleu_4, n),
            ("ROUGE_L".to_string(), 100.0 * s.rouge_l, n),
            ("CIDEr".to_string(), 100.0 * s.cider, n),
        ];
        Ok(Scored { preds, metrics, table })
    }
}
