//! The data directory of the PyPI package `easy-vqa`: `{split}/questions.json` (a list of
//! `[question, answer, image_id]`), `{split}/images/{id}.png`, `answers.txt`. Open-ended short
//! answers; the question type (yes/no, colour, shape) is derived from the answer.

use super::prompt::open_ended;
use super::{DataOptions, Dataset, Sample, Scored, exact_match, read_json_file};
use anyhow::{Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct EasyVqa {
    dir: PathBuf,
    opts: DataOptions,
    answers: Vec<String>,
}

const COLOURS: &[&str] = &["red", "green", "blue", "black", "gray", "grey", "teal", "brown", "yellow"];

pub fn question_type(answer: &str) -> &'static str {
    match answer {
        "yes" | "no" => "yes/no",
        a if COLOURS.contains(&a) => "colour",
        _ => "shape",
    }
}

impl EasyVqa {
    pub fn open(dir: &Path, opts: &DataOptions) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: easy-VQA data directory not found (expected train/, test/, answers.txt)", dir.display())
        }
        let af = dir.join("answers.txt");
        let answers = std::fs::read_to_string(&af)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", af.display()))?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        Ok(Self { dir: dir.to_path_buf(), opts: opts.clone(), answers })
    }

    pub fn answers(&self) -> &[String] {
        &self.answers
    }
}

impl Dataset for EasyVqa {
    fn kind(&self) -> &'static str {
        "easyvqa"
    }

    fn samples(&self, split: &str) -> Result<Vec<Sample>> {
        let qf = self.dir.join(split).join("questions.json");
        if !qf.is_file() {
            bail!("{}: split `{split}` not found", qf.display())
        }
        let Value::Array(rows) = read_json_file(&qf)? else {
            bail!("{}: expected a list of [question, answer, image_id]", qf.display())
        };
        let mut out = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let (q, a, id) = match r.as_array().map(|a| a.as_slice()) {
                Some([Value::String(q), Value::String(a), Value::Number(id)]) if id.as_u64().is_some() => {
                    (q, a, id.as_u64().unwrap())
                }
                _ => bail!(
                    "{}: entry {i}: expected [question (string), answer (string), image_id (integer)], found {r}",
                    qf.display()
                ),
            };
            out.push(Sample {
                id: format!("{split}-{i}"),
                image: Some(self.dir.join(split).join("images").join(format!("{id}.png"))),
                prompt: open_ended(self.opts.vqa_template.as_deref(), q),
                answer: a.clone(),
                eval_prefix: String::new(),
                qtype: Some(question_type(a).to_string()),
                references: vec![],
                extra: Value::Null,
            });
        }
        if out.is_empty() {
            bail!("{}: split `{split}` is empty", qf.display())
        }
        Ok(out)
    }

    fn max_new_tokens(&self) -> usize {
        8
    }

    fn score(&self, samples: &[Sample], outputs: &[String]) -> Result<Scored> {
        Ok(exact_match(samples, outputs))
    }
}
