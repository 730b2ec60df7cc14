//! ScienceQA in its official layout: `problems.json`, `pid_splits.json`, optional
//! `captions.json`, images at `images/{split}/{pid}/image.png`. Scoring reproduces the
//! official scorer's breakdown and key names.

use super::prompt::{McParts, multiple_choice, parse_choice};
use super::{DataOptions, Dataset, Sample, Scored, read_json_file, round2};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct ScienceQa {
    dir: PathBuf,
    problems: serde_json::Map<String, Value>,
    splits: serde_json::Map<String, Value>,
    captions: HashMap<String, String>,
    opts: DataOptions,
}

fn field<'a>(file: &Path, pid: &str, p: &'a Value, key: &str) -> Result<&'a Value> {
    p.get(key).with_context(|| format!("{}: problem {pid}: missing field `{key}`", file.display()))
}

fn str_field(file: &Path, pid: &str, p: &Value, key: &str) -> Result<String> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => bail!("{}: problem {pid}: field `{key}` must be a string, found {other}", file.display()),
    }
}

impl ScienceQa {
    pub fn open(dir: &Path, opts: &DataOptions) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: ScienceQA directory not found", dir.display())
        }
        let pf = dir.join("problems.json");
        let problems = match read_json_file(&pf)? {
            Value::Object(m) => m,
            _ => bail!("{}: expected an object of problems keyed by id", pf.display()),
        };
        let sf = dir.join("pid_splits.json");
        let splits = match read_json_file(&sf)? {
            Value::Object(m) => m,
            _ => bail!("{}: expected an object of splits", sf.display()),
        };
        let mut captions = HashMap::new();
        let cf = dir.join("captions.json");
        if cf.is_file() {
            let v = read_json_file(&cf)?;
            let m = v.get("captions").unwrap_or(&v);
            if let Value::Object(m) = m {
                for (k, c) in m {
                    if let Some(s) = c.as_str() {
                        captions.insert(k.clone(), s.to_string());
                    }
                }
            }
        } else if opts.use_caption {
            bail!("{}: --use-caption needs this file", cf.display())
        }
        // Validate the format now so that a bad prompt format fails before any work.
        multiple_choice(
            &opts.prompt_format,
            &McParts { question: "", context: "", choices: &["x".into()], answer: 0, lecture: "", solution: "" },
        )?;
        Ok(Self { dir: dir.to_path_buf(), problems, splits, captions, opts: opts.clone() })
    }

    fn sample(&self, pid: &str) -> Result<Sample> {
        let pf = self.dir.join("problems.json");
        let p = self
            .problems
            .get(pid)
            .with_context(|| format!("{}: problem {pid} listed in pid_splits.json is missing", pf.display()))?;
        let question = match field(&pf, pid, p, "question")? {
            Value::String(s) => s.clone(),
            other => bail!("{}: problem {pid}: field `question` must be a string, found {other}", pf.display()),
        };
        let choices: Vec<String> = match field(&pf, pid, p, "choices")? {
            Value::Array(a) => a
                .iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .with_context(|| format!("{}: problem {pid}: field `choices` must hold strings", pf.display()))?,
            other => bail!("{}: problem {pid}: field `choices` must be a list, found {other}", pf.display()),
        };
        let answer = field(&pf, pid, p, "answer")?
            .as_u64()
            .with_context(|| format!("{}: problem {pid}: field `answer` must be a choice index", pf.display()))?
            as usize;
        if choices.len() > 26 {
            bail!(
                "{}: problem {pid}: {} choices; the prompt formats letter them A-Z, so at most 26 are possible",
                pf.display(),
                choices.len()
            )
        }
        if answer >= choices.len() {
            bail!("{}: problem {pid}: answer {answer} is outside its {} choices", pf.display(), choices.len())
        }
        let hint = str_field(&pf, pid, p, "hint")?;
        let image_name = str_field(&pf, pid, p, "image")?;
        let split = str_field(&pf, pid, p, "split")?;
        let caption =
            if self.opts.use_caption { self.captions.get(pid).cloned().unwrap_or_default() } else { String::new() };
        let context = {
            let c = format!("{hint} {caption}");
            let c = c.trim();
            if c.is_empty() { "N/A".to_string() } else { c.to_string() }
        };
        let lecture = str_field(&pf, pid, p, "lecture")?;
        let solution = str_field(&pf, pid, p, "solution")?;
        let (prompt, target) = multiple_choice(
            &self.opts.prompt_format,
            &McParts {
                question: &question,
                context: &context,
                choices: &choices,
                answer,
                lecture: &lecture,
                solution: &solution,
            },
        )
        .with_context(|| format!("{}: problem {pid}", pf.display()))?;
        let image = (!image_name.is_empty()).then(|| self.dir.join("images").join(&split).join(pid).join(&image_name));
        Ok(Sample {
            id: pid.to_string(),
            image,
            prompt,
            answer: target,
            eval_prefix: "The answer is".into(),
            qtype: None,
            references: vec![],
            extra: json!({
                "answer": answer,
                "n_choices": choices.len(),
                "subject": str_field(&pf, pid, p, "subject")?,
                "grade": str_field(&pf, pid, p, "grade")?,
                "has_text": !hint.is_empty(),
                "has_image": !image_name.is_empty(),
            }),
        })
    }
}

impl Dataset for ScienceQa {
    fn kind(&self) -> &'static str {
        "scienceqa"
    }

    fn samples(&self, split: &str) -> Result<Vec<Sample>> {
        let sf = self.dir.join("pid_splits.json");
        let ids = self.splits.get(split).with_context(|| {
            let mut known: Vec<&String> = self.splits.keys().collect();
            known.sort();
            format!("{}: no split `{split}` (splits: {known:?})", sf.display())
        })?;
        let ids = ids.as_array().with_context(|| format!("{}: split `{split}` must be a list of ids", sf.display()))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let pid = match id {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => bail!("{}: split `{split}`: id {other} is not a string", sf.display()),
            };
            out.push(self.sample(&pid)?);
        }
        if out.is_empty() {
            bail!("{}: split `{split}` is empty", sf.display())
        }
        Ok(out)
    }

    fn max_new_tokens(&self) -> usize {
        1
    }

    fn score(&self, samples: &[Sample], outputs: &[String]) -> Result<Scored> {
        score_scienceqa(samples, outputs)
    }
}

/// The official breakdown: subject (NAT/SOC/LAN), context (TXT/IMG/NO), grade (1-6, 7-12).
pub fn score_scienceqa(samples: &[Sample], outputs: &[String]) -> Result<Scored> {
    let mut preds = serde_json::Map::new();
    let mut rows: Vec<(bool, &Value)> = Vec::new();
    for (s, o) in samples.iter().zip(outputs) {
        let n = s.extra["n_choices"].as_u64().unwrap_or(0) as usize;
        let pred = parse_choice(o, n);
        preds.insert(s.id.clone(), json!(pred));
        rows.push((pred >= 0 && pred as u64 == s.extra["answer"].as_u64().unwrap_or(u64::MAX), &s.extra));
    }
    let acc = |f: &dyn Fn(&Value) -> bool| -> (Option<f64>, usize) {
        let sel: Vec<&(bool, &Value)> = rows.iter().filter(|(_, e)| f(e)).collect();
        if sel.is_empty() {
            return (None, 0);
        }
        (Some(100.0 * sel.iter().filter(|r| r.0).count() as f64 / sel.len() as f64), sel.len())
    };
    let grade = |lo: u32, hi: u32| {
        move |e: &Value| {
            e["grade"]
                .as_str()
                .and_then(|g| g.strip_prefix("grade"))
                .and_then(|g| g.parse::<u32>().ok())
                .is_some_and(|g| (lo..=hi).contains(&g))
        }
    };
    let g16 = grade(1, 6);
    let g712 = grade(7, 12);
    type Part<'a> = (&'a str, &'a str, Box<dyn Fn(&Value) -> bool>);
    let parts: Vec<Part> = vec![
        ("acc_natural", "NAT", Box::new(|e: &Value| e["subject"] == "natural science")),
        ("acc_social", "SOC", Box::new(|e: &Value| e["subject"] == "social science")),
        ("acc_language", "LAN", Box::new(|e: &Value| e["subject"] == "language science")),
        ("acc_has_text", "TXT", Box::new(|e: &Value| e["has_text"] == true)),
        ("acc_has_image", "IMG", Box::new(|e: &Value| e["has_image"] == true)),
        ("acc_no_context", "NO", Box::new(|e: &Value| e["has_text"] == false && e["has_image"] == false)),
        ("acc_grade_1_6", "G1-6", Box::new(g16)),
        ("acc_grade_7_12", "G7-12", Box::new(g712)),
        ("acc_average", "Avg", Box::new(|_: &Value| true)),
    ];
    let mut metrics = serde_json::Map::new();
    let mut table = Vec::new();
    for (key, short, f) in &parts {
        let (a, n) = acc(f.as_ref());
        metrics.insert(key.to_string(), a.map(round2).map(Value::from).unwrap_or(Value::Null));
        table.push((short.to_string(), a.unwrap_or(f64::NAN), n));
    }
    metrics.insert("n".into(), json!(rows.len()));
    Ok(Scored { preds: Value::Object(preds), metrics: Value::Object(metrics), table })
}
