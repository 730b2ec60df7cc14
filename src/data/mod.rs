//! Data sets behind one small trait. A data set yields [`Sample`]s (prompt text, answer text,
//! optional image) for a split and scores generated answers the way its official tools do.

pub mod batch;
pub mod coco;
pub mod easyvqa;
pub mod gqa;
pub mod image;
pub mod json;
pub mod jsonl;
pub mod prompt;
pub mod scienceqa;
pub mod synthetic;
pub mod vqav2;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One question about (optionally) one image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub id: String,
    pub image: Option<PathBuf>,
    /// The LM input before the answer (decoder-only) or the encoder input (encoder-decoder).
    pub prompt: String,
    /// The training target, without EOS.
    pub answer: String,
    /// Text put after the prompt before generating at evaluation ("The answer is").
    pub eval_prefix: String,
    /// Question type for per-type accuracy, where the data has types.
    pub qtype: Option<String>,
    /// Every acceptable reference answer (captions, VQA answers); defaults to `answer`.
    #[serde(default)]
    pub references: Vec<String>,
    /// Format-specific fields needed by the scorer.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// What an evaluation produced: the predictions file, the metrics file, and table rows.
pub struct Scored {
    pub preds: serde_json::Value,
    pub metrics: serde_json::Value,
    /// (row name, value in percent or score, number of samples or 0)
    pub table: Vec<(String, f64, usize)>,
}

/// Options that shape prompts and image handling.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DataOptions {
    /// ScienceQA prompt format (`QCM-A`, `CQM-A`, `QCM-LA`, `QCM-EA`, ...).
    pub prompt_format: String,
    pub use_caption: bool,
    /// Template for open-ended questions, with `{question}` (default per data set: easyvqa and
    /// jsonl `Question: {question}\nAnswer:`, vqav2 `vqa: {question}`, gqa `gqa: {question}`).
    pub vqa_template: Option<String>,
    pub skip_bad_images: bool,
    /// Captioning prompt (coco-captions); default the VL-T5 prefix `caption:`.
    #[serde(default)]
    pub caption_prompt: Option<String>,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            prompt_format: "QCM-A".into(),
            use_caption: false,
            vqa_template: None,
            skip_bad_images: false,
            caption_prompt: None,
        }
    }
}

pub trait Dataset: Send + Sync {
    /// `scienceqa`, `easyvqa`, ...
    fn kind(&self) -> &'static str;
    fn samples(&self, split: &str) -> Result<Vec<Sample>>;
    /// Scores generated texts (one per sample, after `eval_prefix`).
    fn score(&self, samples: &[Sample], outputs: &[String]) -> Result<Scored>;
    /// How many tokens evaluation needs to generate.
    /// The template it builds open-ended prompts with when none is configured (written into
    /// the run's settings, so that `generate --run` asks questions the way training did).
    fn default_template(&self) -> Option<&'static str> {
        None
    }
    fn max_new_tokens(&self) -> usize {
        16
    }
}

/// The data set kinds [`open`] knows.
pub const KINDS: &str = "scienceqa, easyvqa, jsonl, vqav2, gqa, coco-captions";

/// Opens `KIND:PATH`.
pub fn open(spec: &str, opts: &DataOptions) -> Result<Box<dyn Dataset>> {
    let Some((kind, path)) = spec.split_once(':') else { bail!("data `{spec}`: expected KIND:PATH (kinds: {KINDS})") };
    let p = PathBuf::from(path);
    Ok(match kind {
        "scienceqa" => Box::new(scienceqa::ScienceQa::open(&p, opts)?),
        "easyvqa" => Box::new(easyvqa::EasyVqa::open(&p, opts)?),
        "jsonl" => Box::new(jsonl::Jsonl::open(&p, opts)?),
        "vqav2" => Box::new(vqav2::VqaV2::open(&p, opts)?),
        "gqa" => Box::new(gqa::Gqa::open(&p, opts)?),
        "coco-captions" => Box::new(coco::CocoCaptions::open(&p, opts)?),
        other => bail!("data `{spec}`: unknown kind `{other}` (kinds: {KINDS})"),
    })
}

/// The samples of `split`, which may take a slice of a split as Python does:
/// `train[:-2000]` (all but the last 2,000), `train[-2000:]` (the last 2,000), `test[100:200]`.
/// A validation set cut from the training split this way is disjoint from what the rest trains
/// on, in the split's own order.
pub fn split_samples(ds: &dyn Dataset, split: &str) -> Result<Vec<Sample>> {
    let Some((name, rest)) = split.split_once('[') else { return ds.samples(split) };
    let Some(range) = rest.strip_suffix(']') else {
        bail!("split `{split}`: expected NAME[START:END] (for example train[-2000:])")
    };
    let Some((a, b)) = range.split_once(':') else {
        bail!("split `{split}`: expected NAME[START:END] (for example train[-2000:])")
    };
    let all = ds.samples(name)?;
    let n = all.len() as i64;
    let bound = |x: &str, default: i64| -> Result<usize> {
        let v = if x.trim().is_empty() {
            default
        } else {
            x.trim().parse::<i64>().map_err(|_| anyhow::anyhow!("split `{split}`: `{x}` is not an integer"))?
        };
        Ok((if v < 0 { n + v } else { v }).clamp(0, n) as usize)
    };
    let (lo, hi) = (bound(a, 0)?, bound(b, n)?);
    Ok(all.into_iter().skip(lo).take(hi.saturating_sub(lo)).collect())
}

pub(crate) fn read_json_file(path: &Path) -> Result<serde_json::Value> {
    crate::checkpoint::read_json(path)
}

/// Checks that an image exists and decodes completely (header and pixel data, within the
/// decoder's memory limits); the message names the file.
pub fn check_image(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("{}: is a directory, not an image", path.display())
    }
    if !path.is_file() {
        bail!("{}: image not found", path.display())
    }
    image::load_rgb(path).map(|_| ())
}

/// What every scorer checks first: one output per sample, and something to score.
pub fn check_outputs(kind: &str, samples: &[Sample], outputs: &[String], what: &str) -> Result<()> {
    if samples.len() != outputs.len() {
        bail!("{kind}: {} samples but {} generated {what}", samples.len(), outputs.len())
    }
    if samples.is_empty() {
        bail!("{kind}: nothing to score")
    }
    Ok(())
}

/// Drops (and counts) samples whose image is missing or unreadable when `skip`, else fails on
/// the first such image.
pub fn filter_images(samples: Vec<Sample>, skip: bool) -> Result<(Vec<Sample>, usize)> {
    filter_images_on(samples, skip, &crate::dist::Single)
}

/// [`filter_images`] with the decoding shared by the ranks of `comm`: rank r decodes every
/// N-th distinct image, rank 0 gathers what failed (naming the rank that saw it) and every rank
/// applies the same verdict.
pub fn filter_images_on(
    samples: Vec<Sample>,
    skip: bool,
    comm: &dyn crate::dist::Comm,
) -> Result<(Vec<Sample>, usize)> {
    use rayon::prelude::*;
    // Each distinct image once: VQA v2 asks ~5 questions per image, COCO has ~5 captions.
    let mut distinct: Vec<PathBuf> = samples.iter().filter_map(|s| s.image.clone()).collect();
    distinct.sort();
    distinct.dedup();
    let (rank, ranks) = (comm.rank(), comm.size());
    let mine: Vec<PathBuf> =
        distinct.into_iter().enumerate().filter(|(i, _)| i % ranks == rank).map(|(_, p)| p).collect();
    let mut bad: std::collections::HashMap<PathBuf, String> =
        mine.into_par_iter().filter_map(|p| check_image(&p).err().map(|e| (p, format!("{e:#}")))).collect();
    if ranks > 1 {
        let who = crate::dist::who();
        let list: Vec<(PathBuf, String)> = bad.drain().map(|(p, e)| (p, format!("{who}{e}"))).collect();
        let all = comm.gather(&serde_json::to_vec(&list)?)?;
        let merged: Vec<(PathBuf, String)> = match all {
            Some(parts) => {
                let mut m = Vec::new();
                for part in parts {
                    m.extend(serde_json::from_slice::<Vec<(PathBuf, String)>>(&part)?);
                }
                m
            }
            None => Vec::new(),
        };
        let merged: Vec<(PathBuf, String)> = serde_json::from_slice(&comm.broadcast(serde_json::to_vec(&merged)?)?)?;
        bad = merged.into_iter().collect();
    }
    let mut kept = Vec::with_capacity(samples.len());
    let mut skipped = 0;
    for s in samples {
        match s.image.as_ref().and_then(|p| bad.get(p)) {
            None => kept.push(s),
            Some(e) if skip => {
                skipped += 1;
                if skipped <= 10 {
                    eprintln!("skipping a sample: {e}");
                } else if skipped == 11 {
                    eprintln!("(further skipped samples are only counted)");
                }
            }
            Some(e) => return Err(anyhow::anyhow!("{e}").context("use --skip-bad-images to skip such samples")),
        }
    }
    Ok((kept, skipped))
}

/// Exact-match accuracy after lower-casing and trimming, overall and per question type.
pub fn exact_match(samples: &[Sample], outputs: &[String]) -> Scored {
    use std::collections::BTreeMap;
    let norm = |s: &str| s.trim().to_lowercase();
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut ok, mut n) = (0, 0);
    let mut preds = serde_json::Map::new();
    for (s, o) in samples.iter().zip(outputs) {
        let pred = norm(o);
        let refs: Vec<String> = if s.references.is_empty() {
            vec![norm(&s.answer)]
        } else {
            s.references.iter().map(|r| norm(r)).collect()
        };
        let hit = refs.contains(&pred);
        ok += hit as usize;
        n += 1;
        if let Some(t) = &s.qtype {
            let e = per.entry(t.clone()).or_default();
            e.0 += hit as usize;
            e.1 += 1;
        }
        preds.insert(s.id.clone(), serde_json::Value::String(o.trim().to_string()));
    }
    let pct = |a: usize, b: usize| {
        if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 }
    };
    let mut table = vec![("overall".to_string(), pct(ok, n), n)];
    let mut per_type = serde_json::Map::new();
    for (t, (a, b)) in &per {
        table.push((t.clone(), pct(*a, *b), *b));
        per_type.insert(t.clone(), serde_json::json!(round2(pct(*a, *b))));
    }
    Scored {
        preds: serde_json::Value::Object(preds),
        metrics: serde_json::json!({"accuracy": round2(pct(ok, n)), "per_type": per_type, "n": n}),
        table,
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod split_tests {
    use super::*;

    struct Ten;
    impl Dataset for Ten {
        fn kind(&self) -> &'static str {
            "ten"
        }
        fn samples(&self, split: &str) -> Result<Vec<Sample>> {
            if split != "train" {
                bail!("no split `{split}`")
            }
            Ok((0..10)
                .map(|i| Sample {
                    id: i.to_string(),
                    image: None,
                    prompt: String::new(),
                    answer: String::new(),
                    eval_prefix: String::new(),
                    qtype: None,
                    references: vec![],
                    extra: serde_json::Value::Null,
                })
                .collect())
        }
        fn score(&self, samples: &[Sample], outputs: &[String]) -> Result<Scored> {
            Ok(exact_match(samples, outputs))
        }
    }

    fn ids(split: &str) -> Vec<String> {
        split_samples(&Ten, split).unwrap().into_iter().map(|s| s.id).collect()
    }

    #[test]
    fn slices_cut_splits_as_python_does() {
        assert_eq!(ids("train").len(), 10);
        assert_eq!(ids("train[-3:]"), ["7", "8", "9"]);
        assert_eq!(ids("train[:-8]"), ["0", "1"]);
        assert_eq!(ids("train[2:4]"), ["2", "3"]);
        assert_eq!(ids("train[8:100]"), ["8", "9"]);
        assert!(ids("train[5:2]").is_empty());
        // The two halves of a cut are disjoint and cover the split.
        let (a, b) = (ids("train[:-4]"), ids("train[-4:]"));
        assert_eq!([a, b].concat(), ids("train"));
        for bad in ["train[3]", "train[a:]", "train[1:2"] {
            assert!(split_samples(&Ten, bad).unwrap_err().to_string().contains(bad), "{bad}");
        }
        assert!(split_samples(&Ten, "val[1:2]").is_err());
    }
}
