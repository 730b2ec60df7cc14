//! GQA in its official layout: `{split}_balanced_questions.json` (an object
//! `{questionId: {"imageId", "question", "answer", "fullAnswer", "types": {"structural",
//! "semantic", "detailed"}, "isBalanced", ...}}`, read in file order) and images
//! `images/{imageId}.jpg`, under `DIR` (the questions files may also sit in `DIR/questions/`).
//!
//! Splits are named as in the file names: `train`, `val`, `testdev` (also `test-dev`), `test`,
//! `challenge`.
//!
//! * Prompt: the VL-T5 task prefix `gqa: {question}` unless `DataOptions::vqa_template` is set.
//! * Target: `answer` (the short answer, not `fullAnswer`); question type: `types.structural`.
//! * Questions without `answer` (the public test / challenge files) give samples with an empty
//!   answer; scoring them is an error.
//! * Scoring: predictions in the official format `[{"questionId": str, "prediction": str}]`
//!   (generated text trimmed), scored by [`crate::eval::gqa`] against the evaluated questions
//!   (re-read from the questions file; unbalanced ones are skipped as the official script does).

use super::json::{check_opt_str, check_str, find_file, read_typed, show};
use super::prompt::open_ended;
use super::{DataOptions, Dataset, Sample, Scored};
use crate::eval::gqa;
use anyhow::{Context, Result, bail};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The VL-T5 prefix for GQA.
pub const DEFAULT_TEMPLATE: &str = "gqa: {question}";

pub struct Gqa {
    dir: PathBuf,
    opts: DataOptions,
}

/// `test-dev` / `test_dev` -> `testdev`; other names are kept.
pub fn split_name(split: &str) -> String {
    match split {
        "test-dev" | "test_dev" => "testdev",
        s => s,
    }
    .to_string()
}

pub fn questions_file_name(split: &str) -> String {
    format!("{split}_balanced_questions.json")
}

/// A JSON object read into a list, keeping the file's key order.
struct Ordered<T>(Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of questions keyed by question id")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(m.size_hint().unwrap_or(0));
                while let Some((k, v)) = m.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(serde::Deserialize)]
#[allow(non_snake_case)]
struct Question {
    imageId: String,
    question: String,
    #[serde(default)]
    answer: Option<String>,
    #[serde(default)]
    types: Option<Types>,
    #[serde(default)]
    isBalanced: Option<bool>,
}

#[derive(serde::Deserialize, Clone)]
struct Types {
    #[serde(default)]
    structural: Option<String>,
    #[serde(default)]
    semantic: Option<String>,
    #[serde(default)]
    detailed: Option<String>,
}

fn diagnose(v: &Value) -> Result<()> {
    let Value::Object(m) = v else { bail!("expected an object of questions keyed by question id, found {}", show(v)) };
    for (qid, q) in m {
        let at = || format!("question {qid}");
        check_str(q, "imageId", &at)?;
        check_str(q, "question", &at)?;
        check_opt_str(q, "answer", &at)?;
        match q.get("isBalanced") {
            None | Some(Value::Null) | Some(Value::Bool(_)) => {}
            Some(other) => bail!("{}: field `isBalanced` must be a boolean, found {}", at(), show(other)),
        }
        match q.get("types") {
            None | Some(Value::Null) => {}
            Some(t @ Value::Object(_)) => {
                let at2 = || format!("question {qid}: field `types`");
                check_opt_str(t, "structural", &at2)?;
                check_opt_str(t, "semantic", &at2)?;
                check_opt_str(t, "detailed", &at2)?;
            }
            Some(other) => bail!("{}: field `types` must be an object, found {}", at(), show(other)),
        }
    }
    Ok(())
}

impl Gqa {
    pub fn open(dir: &Path, opts: &DataOptions) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: GQA directory not found (expected {{split}}_balanced_questions.json and images/)", dir.display())
        }
        Ok(Self { dir: dir.to_path_buf(), opts: opts.clone() })
    }

    pub fn questions_path(&self, split: &str) -> PathBuf {
        find_file(&self.dir, &questions_file_name(&split_name(split)), &["questions"])
    }

    fn load(&self, split: &str) -> Result<(PathBuf, Vec<(String, Question)>)> {
        let qf = self.questions_path(split);
        if !qf.is_file() {
            bail!(
                "{}: GQA questions file for split `{split}` not found (splits: train, val, testdev, test, challenge)",
                qf.display()
            )
        }
        let q: Ordered<Question> = read_typed(&qf, "GQA questions file", diagnose)?;
        Ok((qf, q.0))
    }
}

impl Dataset for Gqa {
    fn default_template(&self) -> Option<&'static str> {
        Some(DEFAULT_TEMPLATE)
    }

    fn kind(&self) -> &'static str {
        "gqa"
    }

    fn samples(&self, split: &str) -> Result<Vec<Sample>> {
        let split = split_name(split);
        let (qf, questions) = self.load(&split)?;
        if questions.is_empty() {
            bail!("{}: split `{split}` has no questions", qf.display())
        }
        let template = self.opts.vqa_template.as_deref().unwrap_or(DEFAULT_TEMPLATE);
        let images = self.dir.join("images");
        Ok(questions
            .into_iter()
            .map(|(qid, q)| Sample {
                id: qid,
                image: Some(images.join(format!("{}.jpg", q.imageId))),
                prompt: open_ended(Some(template), &q.question),
                answer: q.answer.unwrap_or_default(),
                eval_prefix: String::new(),
                qtype: q.types.and_then(|t| t.structural),
                references: vec![],
                extra: json!({"split": split, "image_id": q.imageId}),
            })
            .collect())
    }

    fn max_new_tokens(&self) -> usize {
        10
    }

    fn score(&self, samples: &[Sample], outputs: &[String]) -> Result<Scored> {
        super::check_outputs("gqa", samples, outputs, "answers")?;
        let mut preds = Vec::with_capacity(samples.len());
        let mut splits: Vec<(String, HashSet<&str>)> = Vec::new();
        for (s, o) in samples.iter().zip(outputs) {
            preds.push(json!({"questionId": s.id, "prediction": o.trim()}));
            let split = s.extra["split"]
                .as_str()
                .with_context(|| format!("gqa: sample {} is not a GQA sample", s.id))?
                .to_string();
            match splits.iter_mut().find(|(k, _)| *k == split) {
                Some((_, set)) => {
                    set.insert(s.id.as_str());
                }
                None => splits.push((split, HashSet::from([s.id.as_str()]))),
            }
        }
        // ground truth: the evaluated questions, with the fields the official script reads
        let mut gt = Map::new();
        let mut files = Vec::new();
        for (split, ids) in &splits {
            let (qf, questions) = self.load(split)?;
            let by_id: HashMap<&str, &Question> = questions.iter().map(|(k, q)| (k.as_str(), q)).collect();
            for id in ids {
                let q = by_id.get(id).with_context(|| format!("{}: no question {id}", qf.display()))?;
                let Some(answer) = &q.answer else {
                    bail!(
                        "{}: question {id} has no `answer` (GQA test and challenge answers are only scored by the official evaluation server)",
                        qf.display()
                    )
                };
                let mut e = Map::new();
                e.insert("answer".into(), json!(answer));
                if let Some(b) = q.isBalanced {
                    e.insert("isBalanced".into(), json!(b));
                }
                if let Some(t) = &q.types {
                    let mut tm = Map::new();
                    for (k, v) in [("structural", &t.structural), ("semantic", &t.semantic), ("detailed", &t.detailed)]
                    {
                        if let Some(v) = v {
                            tm.insert(k.into(), json!(v));
                        }
                    }
                    e.insert("types".into(), Value::Object(tm));
                }
                gt.insert(id.to_string(), Value::Object(e));
            }
            files.push(qf.display().to_string());
        }
        let preds = Value::Array(preds);
        let s = gqa::score_gqa_typed(&Value::Object(gt), &preds)
            .with_context(|| format!("gqa: scoring against {}", files.join(", ")))?;
        let n_open = s.count_structural_type.get("query").copied().unwrap_or(0);
        let mut table = vec![
            ("overall".to_string(), s.accuracy, s.num_questions),
            ("binary".to_string(), s.binary, s.num_questions - n_open),
            ("open".to_string(), s.open, n_open),
        ];
        for (k, v) in &s.per_structural_type {
            table.push((k.clone(), *v, s.count_structural_type[k]));
        }
        for (k, v) in &s.per_semantic_type {
            table.push((k.clone(), *v, s.count_semantic_type[k]));
        }
        Ok(Scored { preds, metrics: s.to_json(), table })
    }
}
