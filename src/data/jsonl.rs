//! Users' own data: one JSON object per line with `image` (a path relative to the file, or
//! null), `question`, `answer`, and optionally `choices` (multiple choice, answered with a
//! letter as in ScienceQA) and `type` (for per-type accuracy). A split `S` of `FILE.jsonl` is
//! read from `FILE.S.jsonl` when that exists (`data.train.jsonl`, `data.test.jsonl`), else
//! every split is the file itself.

use super::prompt::{McParts, multiple_choice, open_ended, parse_choice};
use super::{DataOptions, Dataset, Sample, Scored, exact_match};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

pub struct Jsonl {
    file: PathBuf,
    opts: DataOptions,
}

impl Jsonl {
    pub fn open(file: &Path, opts: &DataOptions) -> Result<Self> {
        if !file.is_file() {
            bail!("{}: file not found", file.display())
        }
        Ok(Self { file: file.to_path_buf(), opts: opts.clone() })
    }

    fn split_file(&self, split: &str) -> PathBuf {
        let stem = self.file.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let cand = self.file.with_file_name(format!("{stem}.{split}.jsonl"));
        if cand.is_file() { cand } else { self.file.clone() }
    }
}

fn get_str(v: &Value, key: &str, file: &Path, line: usize) -> Result<String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None => bail!("{}:{line}: missing field `{key}`", file.display()),
        Some(other) => bail!("{}:{line}: field `{key}` must be a string, found {other}", file.display()),
    }
}

impl Dataset for Jsonl {
    fn kind(&self) -> &'static str {
        "jsonl"
    }

    fn samples(&self, split: &str) -> Result<Vec<Sample>> {
        let file = self.split_file(split);
        let text = std::fs::read_to_string(&file).with_context(|| format!("{}: cannot read", file.display()))?;
        let base = file.parent().unwrap_or(Path::new("."));
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let ln = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("{}:{ln}: malformed JSON", file.display()))?;
            if !v.is_object() {
                bail!("{}:{ln}: expected a JSON object", file.display())
            }
            let question = get_str(&v, "question", &file, ln)?;
            let image = match v.get("image") {
                None | Some(Value::Null) => None,
                Some(Value::String(p)) => Some(base.join(p)),
                Some(other) => bail!("{}:{ln}: field `image` must be a path or null, found {other}", file.display()),
            };
            let qtype = match v.get("type") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => bail!("{}:{ln}: field `type` must be a string, found {other}", file.display()),
            };
            let id = match v.get("id") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => format!("{split}-{ln}"),
            };
            let sample = match v.get("choices") {
                None | Some(Value::Null) => Sample {
                    id,
                    image,
                    prompt: open_ended(self.opts.vqa_template.as_deref(), &question),
                    answer: get_str(&v, "answer", &file, ln)?,
                    eval_prefix: String::new(),
                    qtype,
                    references: vec![],
                    extra: Value::Null,
                },
                Some(Value::Array(cs)) => {
                    let choices: Vec<String> = cs
                        .iter()
                        .map(|c| c.as_str().map(str::to_string))
                        .collect::<Option<_>>()
                        .with_context(|| format!("{}:{ln}: field `choices` must hold strings", file.display()))?;
                    let answer = match v.get("answer") {
                        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().unwrap() as usize,
                        Some(Value::String(s)) => choices
                            .iter()
                            .position(|c| c == s)
                            .or_else(|| {
                                (s.len() == 1)
                                    .then(|| (s.as_bytes()[0].wrapping_sub(b'A')) as usize)
                                    .filter(|&i| i < choices.len())
                            })
                            .with_context(|| {
                                format!(
                                    "{}:{ln}: answer `{s}` is neither one of the choices nor their letter",
                                    file.display()
                                )
                            })?,
                        _ => bail!("{}:{ln}: field `answer` must be a string or a choice index", file.display()),
                    };
                    let (prompt, target) = multiple_choice(
                        "QCM-A",
                        &McParts {
                            question: &question,
                            context: "N/A",
                            choices: &choices,
                            answer,
                            lecture: "",
                            solution: "",
                        },
                    )
                    .with_context(|| format!("{}:{ln}", file.display()))?;
                    Sample {
                        id,
                        image,
                        prompt,
                        answer: target,
                        eval_prefix: "The answer is".into(),
                        qtype,
                        references: vec![],
                        extra: json!({"answer": answer, "n_choices": choices.len()}),
                    }
                }
                Some(other) => bail!("{}:{ln}: field `choices` must be a list, found {other}", file.display()),
            };
            out.push(sample);
        }
        if out.is_empty() {
            bail!("{}: split `{split}` is empty", file.display())
        }
        Ok(out)
    }

    fn score(&self, samples: &[Sample], outputs: &[String]) -> Result<Scored> {
        // Multiple-choice samples are scored by letter, open ones by exact match.
        let mc = samples.iter().all(|s| s.extra.get("n_choices").is_some());
        if !mc {
            return Ok(exact_match(samples, outputs));
        }
        let letters: Vec<String> = samples
            .iter()
            .zip(outputs)
            .map(|(s, o)| {
                let p = parse_choice(o, s.extra["n_choices"].as_u64().unwrap_or(0) as usize);
                if p < 0 { String::new() } else { ((b'A' + p as u8) as char).to_string() }
            })
            .collect();
        let keyed: Vec<Sample> = samples
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.references = vec![((b'A' + s.extra["answer"].as_u64().unwrap_or(0) as u8) as char).to_string()];
                s
            })
            .collect();
        Ok(exact_match(&keyed, &letters))
    }
}
