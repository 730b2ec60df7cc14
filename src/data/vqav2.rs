//! VQA v2 in its official layout:
//!
//! * questions `v2_OpenEnded_mscoco_{split}_questions.json`
//!   (`{"questions": [{"image_id", "question", "question_id"}, ...]}`),
//! * annotations `v2_mscoco_{split}_annotations.json` (`{"annotations": [{"question_id",
//!   "question_type", "answer_type", "multiple_choice_answer", "answers": [{"answer",
//!   "answer_confidence", "answer_id"} x 10]}, ...]}`),
//! * images `{image split}/COCO_{image split}_{image_id:012}.jpg`,
//!
//! all under `DIR` (the two JSON files may also sit in `DIR/annotations/` or `DIR/questions/`,
//! the images in `DIR/images/{image split}/`).
//!
//! Splits are named as in the file names (`train2014`, `val2014`, `test2015`,
//! `test-dev2015`); the short names `train`, `val`, `test`, `test-dev` map to them. The
//! images of `test-dev2015` are those of `test2015`.
//!
//! * Prompt: the VL-T5 task prefix `vqa: {question}` unless `DataOptions::vqa_template` is set.
//! * Training target: the most frequent of the ten answers (after the official tool's
//!   whitespace cleaning: tab/newline to space, trimmed), ties broken by first occurrence in the
//!   `answers` list. `multiple_choice_answer` is not used as the target (its tie rule is not
//!   documented). VL-T5 instead samples one answer per step in proportion to its VQA score; a
//!   fixed target keeps training deterministic.
//! * References: the ten answers (cleaned); question type for breakdowns: `answer_type`.
//! * Test splits (names starting with `test`) may come without an annotation file: their
//!   samples have an empty answer and no references, and scoring them is an error.
//! * Scoring: the predictions are written in the official results format
//!   `[{"question_id": int, "answer": str}]` (generated text trimmed; submit it as is) and
//!   scored by [`crate::eval::vqa`] against the annotations of the evaluated questions, in
//!   annotation-file order. `eval.json` is the scorer's output without `perQuestion`.

use super::json::{check_int, check_list, check_opt_str, check_str, find_file, read_typed, show};
use super::prompt::open_ended;
use super::{DataOptions, Dataset, Sample, Scored};
use crate::eval::vqa;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The VL-T5 prefix for VQA.
pub const DEFAULT_TEMPLATE: &str = "vqa: {question}";

pub struct VqaV2 {
    dir: PathBuf,
    opts: DataOptions,
}

/// `train` -> `train2014`, `val` -> `val2014`, `test` -> `test2015`, `test-dev` ->
/// `test-dev2015`; other names are kept.
pub fn split_name(split: &str) -> String {
    match split {
        "train" => "train2014",
        "val" => "val2014",
        "test" => "test2015",
        "test-dev" | "testdev" => "test-dev2015",
        s => s,
    }
    .to_string()
}

/// The image folder (and file-name infix) of a question split.
pub fn image_split(split: &str) -> &str {
    if split.starts_with("test") { "test2015" } else { split }
}

pub fn questions_file_name(split: &str) -> String {
    format!("v2_OpenEnded_mscoco_{split}_questions.json")
}

pub fn annotations_file_name(split: &str) -> String {
    format!("v2_mscoco_{split}_annotations.json")
}

/// `tab`/`newline` to space, then trimmed: the official tool's cleaning of answers.
pub fn clean_answer(s: &str) -> String {
    s.replace(['\n', '\t'], " ").trim().to_string()
}

/// The most frequent string, ties broken by first occurrence.
pub fn most_frequent(answers: &[String]) -> Option<&String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for a in answers {
        *counts.entry(a.as_str()).or_default() += 1;
    }
    let mut best: Option<(&String, usize)> = None;
    for a in answers {
        let c = counts[a.as_str()];
        if best.is_none_or(|(_, b)| c > b) {
            best = Some((a, c));
        }
    }
    best.map(|(a, _)| a)
}

// ---------------------------------------------------------------------------------------------
// The official files, typed.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct QuestionsFile {
    questions: Vec<Question>,
}

#[derive(Deserialize)]
struct Question {
    question_id: i64,
    image_id: i64,
    question: String,
}

#[derive(Deserialize)]
struct AnnotationsFile {
    annotations: Vec<Annotation>,
}

#[derive(Deserialize)]
struct Annotation {
    question_id: i64,
    question_type: String,
    answer_type: String,
    #[serde(default)]
    multiple_choice_answer: Option<String>,
    answers: Vec<Answer>,
}

#[derive(Deserialize)]
struct Answer {
    answer: String,
    #[serde(default)]
    answer_confidence: Option<Value>,
    #[serde(default)]
    answer_id: Option<Value>,
}

impl Annotation {
    /// The annotation as the official file has it (the fields the scorer reads).
    fn to_official(&self) -> Value {
        let answers: Vec<Value> = self
            .answers
            .iter()
            .map(|a| {
                let mut m = Map::new();
                m.insert("answer".into(), Value::String(a.answer.clone()));
                if let Some(c) = &a.answer_confidence {
                    m.insert("answer_confidence".into(), c.clone());
                }
                if let Some(i) = &a.answer_id {
                    m.insert("answer_id".into(), i.clone());
                }
                Value::Object(m)
            })
            .collect();
        let mut m = Map::new();
        m.insert("question_id".into(), json!(self.question_id));
        m.insert("question_type".into(), json!(self.question_type));
        m.insert("answer_type".into(), json!(self.answer_type));
        if let Some(mc) = &self.multiple_choice_answer {
            m.insert("multiple_choice_answer".into(), json!(mc));
        }
        m.insert("answers".into(), Value::Array(answers));
        Value::Object(m)
    }
}

fn diagnose_questions(v: &Value) -> Result<()> {
    let top = || "top level".to_string();
    let qs = check_list(v, "questions", &top)?;
    for (i, q) in qs.iter().enumerate() {
        let at = || match q.get("question_id") {
            Some(id) => format!("questions[{i}] (question_id {})", show(id)),
            None => format!("questions[{i}]"),
        };
        check_int(q, "question_id", &at)?;
        check_int(q, "image_id", &at)?;
        check_str(q, "question", &at)?;
    }
    Ok(())
}

fn diagnose_annotations(v: &Value) -> Result<()> {
    let top = || "top level".to_string();
    let anns = check_list(v, "annotations", &top)?;
    for (i, a) in anns.iter().enumerate() {
        let at = || match a.get("question_id") {
            Some(id) => format!("annotations[{i}] (question_id {})", show(id)),
            None => format!("annotations[{i}]"),
        };
        check_int(a, "question_id", &at)?;
        check_str(a, "question_type", &at)?;
        check_str(a, "answer_type", &at)?;
        check_opt_str(a, "multiple_choice_answer", &at)?;
        let answers = check_list(a, "answers", &at)?;
        for (j, x) in answers.iter().enumerate() {
            let at2 = || format!("{}: answers[{j}]", at());
            check_str(x, "answer", &at2)?;
        }
    }
    Ok(())
}

impl VqaV2 {
    pub fn open(dir: &Path, opts: &DataOptions) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "{}: VQA v2 directory not found (expected {} and {} and the image folders)",
                dir.display(),
                questions_file_name("{split}"),
                annotations_file_name("{split}")
            )
        }
        Ok(Self { dir: dir.to_path_buf(), opts: opts.clone() })
    }

    pub fn questions_path(&self, split: &str) -> PathBuf {
        find_file(&self.dir, &questions_file_name(&split_name(split)), &["questions", "annotations"])
    }

    pub fn annotations_path(&self, split: &str) -> PathBuf {
        find_file(&self.dir, &annotations_file_name(&split_name(split)), &["annotations", "questions"])
    }

    fn image_dir(&self, split: &str) -> PathBuf {
        let folder = image_split(split);
        let direct = self.dir.join(folder);
        let nested = self.dir.join("images").join(folder);
        if !direct.is_dir() && nested.is_dir() { nested } else { direct }
    }

    fn load_annotations(&self, split: &str) -> Result<(PathBuf, Vec<Annotation>)> {
        let af = self.annotations_path(split);
        let f: AnnotationsFile = read_typed(&af, "VQA v2 annotation file", diagnose_annotations)?;
        Ok((af, f.annotations))
    }
}

impl Dataset for VqaV2 {
    fn default_template(&self) -> Option<&'static str> {
        Some(DEFAULT_TEMPLATE)
    }

    fn kind(&self) -> &'static str {
        "vqav2"
    }

    fn samples(&self, split: &str) -> Result<Vec<Sample>> {
        let split = split_name(split);
        let qf = self.questions_path(&split);
        if !qf.is_file() {
            bail!(
                "{}: VQA v2 questions file for split `{split}` not found (splits are named like train2014, val2014, test2015, test-dev2015; train, val, test, test-dev map to those)",
                qf.display()
            )
        }
        let questions: QuestionsFile = read_typed(&qf, "VQA v2 questions file", diagnose_questions)?;
        if questions.questions.is_empty() {
            bail!("{}: split `{split}` has no questions", qf.display())
        }
        let af = self.annotations_path(&split);
        let annotations: Option<HashMap<i64, Annotation>> = if af.is_file() {
            let (_, anns) = self.load_annotations(&split)?;
            Some(anns.into_iter().map(|a| (a.question_id, a)).collect())
        } else if split.starts_with("test") {
            None
        } else {
            bail!(
                "{}: VQA v2 annotation file not found (needed for split `{split}`; only test splits may come without annotations)",
                af.display()
            )
        };
        let img_dir = self.image_dir(&split);
        let infix = image_split(&split);
        let template = self.opts.vqa_template.as_deref().unwrap_or(DEFAULT_TEMPLATE);
        let mut out = Vec::with_capacity(questions.questions.len());
        for q in &questions.questions {
            let image = img_dir.join(format!("COCO_{infix}_{:012}.jpg", q.image_id));
            let (answer, references, qtype, question_type) = match &annotations {
                None => (String::new(), vec![], None, None),
                Some(m) => {
                    let a = m.get(&q.question_id).with_context(|| {
                        format!("{}: no annotation for question_id {} of {}", af.display(), q.question_id, qf.display())
                    })?;
                    let refs: Vec<String> = a.answers.iter().map(|x| clean_answer(&x.answer)).collect();
                    let target = match most_frequent(&refs) {
                        Some(t) => t.clone(),
                        None => bail!("{}: question_id {}: field `answers` is empty", af.display(), q.question_id),
                    };
                    (target, refs, Some(a.answer_type.clone()), Some(a.question_type.clone()))
                }
            };
            out.push(Sample {
                id: q.question_id.to_string(),
                image: Some(image),
                prompt: open_ended(Some(template), &q.question),
                answer,
                eval_prefix: String::new(),
                qtype,
                references,
                extra: json!({
                    "question_id": q.question_id,
                    "image_id": q.image_id,
                    "split": split,
                    "question_type": question_type,
                }),
            });
        }
        Ok(out)
    }

    fn max_new_tokens(&self) -> usize {
        10
    }

    fn score(&self, samples: &[Sample], outputs: &[String]) -> Result<Scored> {
        super::check_outputs("vqav2", samples, outputs, "answers")?;
        // predictions in the official results format
        let mut preds = Vec::with_capacity(samples.len());
        // question ids per split, splits in first-seen order
        let mut splits: Vec<(String, HashSet<i64>)> = Vec::new();
        for (s, o) in samples.iter().zip(outputs) {
            let qid = s.extra["question_id"]
                .as_i64()
                .with_context(|| format!("vqav2: sample {} has no question_id (not a VQA v2 sample)", s.id))?;
            let split = s.extra["split"].as_str().unwrap_or_default().to_string();
            preds.push(json!({"question_id": qid, "answer": o.trim()}));
            match splits.iter_mut().find(|(k, _)| *k == split) {
                Some((_, set)) => {
                    set.insert(qid);
                }
                None => splits.push((split, HashSet::from([qid]))),
            }
        }
        // ground truth: the annotations of the evaluated questions, in file order
        let mut gt_anns = Vec::with_capacity(samples.len());
        let mut files = Vec::new();
        for (split, qids) in &splits {
            let af = self.annotations_path(split);
            if !af.is_file() {
                // Test splits: keep the predictions (official results format, ready for the
                // evaluation server) and say why there is no score.
                let reason = format!(
                    "vqav2 split `{split}` has no annotations ({} not found); VQA v2 test answers are only scored by the official evaluation server: submit preds.json there",
                    af.display()
                );
                eprintln!("{reason}");
                return Ok(Scored {
                    preds: Value::Array(preds),
                    metrics: json!({"scored": false, "reason": reason}),
                    table: vec![],
                });
            }
            let (_, anns) = self.load_annotations(split)?;
            let mut found = HashSet::new();
            for a in anns.iter().filter(|a| qids.contains(&a.question_id)) {
                if found.insert(a.question_id) {
                    gt_anns.push(a.to_official());
                }
            }
            if let Some(missing) = qids.iter().find(|q| !found.contains(q)) {
                bail!("{}: no annotation for question_id {missing}", af.display())
            }
            files.push(af.display().to_string());
        }
        let n_by_type = {
            let mut m: HashMap<String, usize> = HashMap::new();
            for a in &gt_anns {
                *m.entry(a["answer_type"].as_str().unwrap_or_default().to_string()).or_default() += 1;
            }
            m
        };
        let gt = json!({ "annotations": gt_anns });
        let preds = Value::Array(preds);
        let scores = vqa::score_vqa_typed(&gt, None, &preds)
            .with_context(|| format!("vqav2: scoring against {}", files.join(", ")))?;
        let mut metrics = scores.to_json();
        if let Value::Object(m) = &mut metrics {
            m.remove("perQuestion");
        }
        let mut table = vec![("overall".to_string(), scores.overall, scores.num_questions)];
        for (t, v) in &scores.per_answer_type {
            table.push((t.clone(), *v, n_by_type.get(t).copied().unwrap_or(0)));
        }
        Ok(Scored { preds, metrics, table })
    }
}
