//! COCO caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) reproducing `pycocoevalcap`
//! (`COCOEvalCap` from the `pycocoevalcap` 1.2 package, i.e. tylin/coco-caption ported to
//! Python 3), including its Stanford PTB tokenisation step, in pure Rust (no Java).
//!
//! Pipeline (as `pycocotools.COCO.loadRes` + `COCOEvalCap.evaluate` with
//! `params['image_id'] = cocoRes.getImgIds()`, the usual way of evaluating a subset):
//! 1. predictions must be a JSON array of `{"image_id", "caption"}`; every `image_id` must be
//!    an image of the GT file (`loadRes` asserts this). The evaluated images are the predicted
//!    ones, **in the order of the GT `images` list**.
//! 2. Each evaluated image needs at least one GT caption and exactly one prediction
//!    (pycocoevalcap asserts `len(hypo) == 1` and `len(ref) >= 1`); otherwise we return an
//!    error naming the image.
//! 3. All reference captions (image by image, in annotation order) are tokenised as one
//!    stream, and all predicted captions as another (see [`ptb`]), lower-cased, and the PTB
//!    punctuation tokens are removed.
//! 4. BLEU ([`bleu`]), ROUGE-L ([`rouge`]) and CIDEr-D ([`cider`]; document frequencies come
//!    from the references of the evaluated images only, so scores depend on the evaluated set).
//!
//! METEOR and SPICE are **not computed** (they need Java, METEOR's paraphrase tables and
//! Stanford CoreNLP models); the output lists them under `"not_computed"`.
//!
//! Leniency: when the GT file has no `images` list (the official loader then rejects every
//! prediction), the images referenced by the annotations are used, in first-appearance order.

pub mod bleu;
pub mod cider;
pub mod ptb;
mod ptb_tables;
pub mod py;
pub mod rouge;

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;

/// The six metrics pycocoevalcap reports that we compute, in its key names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaptionScores {
    #[serde(rename = "Bleu_1")]
    pub bleu_1: f64,
    #[serde(rename = "Bleu_2")]
    pub bleu_2: f64,
    #[serde(rename = "Bleu_3")]
    pub bleu_3: f64,
    #[serde(rename = "Bleu_4")]
    pub bleu_4: f64,
    #[serde(rename = "ROUGE_L")]
    pub rouge_l: f64,
    #[serde(rename = "CIDEr")]
    pub cider: f64,
    /// Number of evaluated images.
    pub num_images: usize,
    /// Metrics of pycocoevalcap that this implementation does not compute.
    pub not_computed: Vec<String>,
}

impl CaptionScores {
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("scores serialise")
    }
}

/// Per-image scores, in evaluation order.
#[derive(Debug, Clone, PartialEq)]
pub struct PerImage {
    pub image_id: Value,
    pub bleu: [f64; 4],
    pub rouge_l: f64,
    pub cider: f64,
}

/// A JSON id (Python dict key semantics: `1 == 1.0`, `1 != "1"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Int(i128),
    Str(String),
    Other(String),
}

fn key_of(v: &Value) -> Key {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Key::Int(i as i128)
            } else if let Some(u) = n.as_u64() {
                Key::Int(u as i128)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 1e18 { Key::Int(f as i128) } else { Key::Other(n.to_string()) }
            }
        }
        Value::String(s) => Key::Str(s.clone()),
        Value::Bool(b) => Key::Int(i128::from(*b)),
        other => Key::Other(other.to_string()),
    }
}

/// Scores caption predictions like pycocoevalcap (see the module docs).
///
/// * `gt_json`: COCO captions file (`{"images": [{"id", ...}], "annotations": [{"image_id", "caption", ...}]}`).
/// * `preds_json`: `[{"image_id": ..., "caption": str}, ...]`.
pub fn score_captions(gt_json: &Value, preds_json: &Value) -> Result<Value> {
    Ok(score_captions_typed(gt_json, preds_json)?.0.to_json())
}

/// Typed variant of [`score_captions`], also returning per-image scores.
pub fn score_captions_typed(gt_json: &Value, preds_json: &Value) -> Result<(CaptionScores, Vec<PerImage>)> {
    let (ids, refs, hyps) = collect(gt_json, preds_json)?;
    // tokenisation: references as one stream, predictions as another
    let flat_refs: Vec<&str> = refs.iter().flat_map(|r| r.iter().map(String::as_str)).collect();
    let tok_refs = ptb::tokenize_captions(&flat_refs);
    let flat_hyps: Vec<&str> = hyps.iter().map(String::as_str).collect();
    let tok_hyps = ptb::tokenize_captions(&flat_hyps);
    let mut gts: Vec<Vec<String>> = Vec::with_capacity(ids.len());
    let mut k = 0;
    for r in &refs {
        let mut v = Vec::new();
        for _ in r {
            if let Some(t) = &tok_refs[k] {
                v.push(t.clone());
            }
            k += 1;
        }
        gts.push(v);
    }
    let mut pairs: Vec<(&str, Vec<&str>)> = Vec::with_capacity(ids.len());
    for (idx, g) in gts.iter().enumerate() {
        let hyp = tok_hyps[idx].as_deref().ok_or_else(|| {
            anyhow!(
                "image {}: the tokenizer output has no line for this prediction; pycocoevalcap fails on this input",
                ids[idx]
            )
        })?;
        if g.is_empty() {
            bail!("image {}: no reference caption left after tokenisation", ids[idx]);
        }
        pairs.push((hyp, g.iter().map(String::as_str).collect()));
    }
    let (b, b_img) = bleu::bleu(&pairs);
    let (r, r_img) = rouge::rouge_l(&pairs);
    let (c, c_img) = cider::cider(&pairs);
    let per_image = ids
        .iter()
        .enumerate()
        .map(|(i, id)| PerImage { image_id: id.clone(), bleu: b_img[i], rouge_l: r_img[i], cider: c_img[i] })
        .collect();
    Ok((
        CaptionScores {
            bleu_1: b[0],
            bleu_2: b[1],
            bleu_3: b[2],
            bleu_4: b[3],
            rouge_l: r,
            cider: c,
            num_images: ids.len(),
            not_computed: vec!["METEOR".to_string(), "SPICE".to_string()],
        },
        per_image,
    ))
}

type Collected = (Vec<Value>, Vec<Vec<String>>, Vec<String>);

/// Loads GT and predictions like `COCO` / `COCO.loadRes` and returns, per evaluated image:
/// its id, its raw reference captions and its raw predicted caption.
fn collect(gt_json: &Value, preds_json: &Value) -> Result<Collected> {
    let anns = gt_json
        .get("annotations")
        .ok_or_else(|| anyhow!("GT file: missing top-level field 'annotations'"))?
        .as_array()
        .ok_or_else(|| anyhow!("GT file: 'annotations' must be an array"))?;
    let mut img_to_refs: HashMap<Key, Vec<String>> = HashMap::new();
    let mut ann_order: Vec<(Key, Value)> = Vec::new();
    for (i, a) in anns.iter().enumerate() {
        let id = a.get("image_id").ok_or_else(|| anyhow!("GT file: annotations[{i}] has no 'image_id'"))?;
        let cap = match a.get("caption") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => bail!("GT file: annotations[{i}] (image {id}): 'caption' must be a string, got {other}"),
            None => bail!("GT file: annotations[{i}] (image {id}): missing field 'caption'"),
        };
        let k = key_of(id);
        if !img_to_refs.contains_key(&k) {
            ann_order.push((k.clone(), id.clone()));
        }
        img_to_refs.entry(k).or_default().push(cap);
    }
    // GT image order (COCO.imgs is built from dataset['images'])
    let mut gt_images: Vec<(Key, Value)> = Vec::new();
    match gt_json.get("images") {
        Some(Value::Array(imgs)) => {
            let mut seen = std::collections::HashSet::new();
            for (i, img) in imgs.iter().enumerate() {
                let id = img.get("id").ok_or_else(|| anyhow!("GT file: images[{i}] has no 'id'"))?;
                let k = key_of(id);
                if seen.insert(k.clone()) {
                    gt_images.push((k, id.clone()));
                }
            }
        }
        Some(_) => bail!("GT file: 'images' must be an array"),
        None => gt_images = ann_order,
    }
    let preds = preds_json.as_array().ok_or_else(|| anyhow!("predictions: results is not an array of objects"))?;
    if preds.is_empty() {
        bail!("predictions: empty result list");
    }
    let gt_set: std::collections::HashSet<&Key> = gt_images.iter().map(|(k, _)| k).collect();
    let mut pred_by_img: HashMap<Key, Vec<String>> = HashMap::new();
    for (i, p) in preds.iter().enumerate() {
        let id = p.get("image_id").ok_or_else(|| anyhow!("predictions[{i}] has no 'image_id'"))?;
        let cap = match p.get("caption") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                bail!("predictions[{i}] (image {id}): 'caption' must be a string, got {other}")
            }
            None => bail!("predictions[{i}] (image {id}): missing field 'caption'"),
        };
        let k = key_of(id);
        if !gt_set.contains(&k) {
            bail!("predictions[{i}]: image {id} is not in the GT file (Results do not correspond to current coco set)");
        }
        pred_by_img.entry(k).or_default().push(cap);
    }
    let mut ids = Vec::new();
    let mut refs = Vec::new();
    let mut hyps = Vec::new();
    for (k, id) in &gt_images {
        let Some(p) = pred_by_img.get(k) else {
            continue;
        };
        if p.len() != 1 {
            bail!("image {id}: {} predictions; pycocoevalcap requires exactly one caption per image", p.len());
        }
        let r = img_to_refs
            .get(k)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| anyhow!("image {id}: no reference captions in the GT file"))?;
        ids.push(id.clone());
        refs.push(r.clone());
        hyps.push(p[0].clone());
    }
    Ok((ids, refs, hyps))
}

/// Convenience: parse both files from JSON text and score.
pub fn score_captions_str(gt: &str, preds: &str) -> Result<Value> {
    let g: Value = serde_json::from_str(gt).context("GT captions file is not valid JSON")?;
    let p: Value = serde_json::from_str(preds).context("predictions file is not valid JSON")?;
    score_captions(&g, &p)
}
