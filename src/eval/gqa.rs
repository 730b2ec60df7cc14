//! GQA accuracy, reproducing the accuracy part of the official GQA evaluation script
//! (`eval.py` v1.1, distributed with the dataset at <https://cs.stanford.edu/people/dorarad/gqa/evaluate.html>).
//!
//! What the official script does, and this module does identically:
//! * predictions file: `[{"questionId": str, "prediction": str}, ...]`, turned into a dict
//!   (the **last** prediction for a question id wins); predictions for unknown ids are ignored;
//! * every question with `isBalanced` true must have a prediction, otherwise it raises
//!   `"no prediction for question {qid}"` (we return that error);
//! * only questions with `isBalanced` true are scored;
//! * a question is correct iff `prediction == answer` on the **raw strings**: no lower-casing,
//!   no stripping, no punctuation handling (LLaVA-style scripts that normalise answers first
//!   are doing their own preprocessing, not the official evaluation);
//! * `accuracy` = `avg(scores) * 100` with `avg(l) = float(sum(l)) / len(l)` (0 for an empty
//!   list), likewise `binary` (structural type != `query`) and `open` (structural type
//!   `query`), and per `types.structural` / `types.semantic` value. Values are not rounded
//!   (the script only prints them with `%.2f`).
//!
//! Not computed (they need the choices / scene-graph / attention files or the full
//! `all_questions` file): validity, plausibility, consistency, grounding, distribution, and the
//! per-length / per-steps breakdowns. The output lists them under `"not_computed"`.
//!
//! Leniencies (inputs the official script would reject): a missing `isBalanced` is treated as
//! `true`; an integer `questionId` is matched against the question key with the same decimal
//! text. A prediction that is not a string is an error (the script would silently count it
//! as wrong).

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;

/// Scores in percent, as the official script's `scores` dict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GqaScores {
    pub accuracy: f64,
    pub binary: f64,
    pub open: f64,
    #[serde(rename = "accuracyPerStructuralType")]
    pub per_structural_type: BTreeMap<String, f64>,
    #[serde(rename = "accuracyPerSemanticType")]
    pub per_semantic_type: BTreeMap<String, f64>,
    #[serde(rename = "questionsPerStructuralType")]
    pub count_structural_type: BTreeMap<String, usize>,
    #[serde(rename = "questionsPerSemanticType")]
    pub count_semantic_type: BTreeMap<String, usize>,
    #[serde(rename = "numQuestions")]
    pub num_questions: usize,
    pub not_computed: Vec<String>,
}

impl GqaScores {
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("scores serialise")
    }
}

/// `avg(l) * 100` of the official script, for a list of 0.0/1.0 scores given as a count.
fn avg_pct(correct: usize, total: usize) -> f64 {
    if total == 0 {
        return 0.0;
    }
    // float(sum(l)) / len(l): the sum of 1.0s and 0.0s is exact
    (correct as f64 / total as f64) * 100.0
}

/// Scores GQA predictions like the official `eval.py` (accuracy part).
///
/// * `questions_json`: a GQA questions file, e.g. `testdev_balanced_questions.json`
///   (`{qid: {"answer": str, "isBalanced": bool, "types": {"structural": str,
///   "semantic": str, ...}, ...}}`).
/// * `preds_json`: `[{"questionId": str, "prediction": str}, ...]`.
pub fn score_gqa(questions_json: &Value, preds_json: &Value) -> Result<Value> {
    Ok(score_gqa_typed(questions_json, preds_json)?.to_json())
}

/// Typed variant of [`score_gqa`].
pub fn score_gqa_typed(questions_json: &Value, preds_json: &Value) -> Result<GqaScores> {
    let questions = questions_json
        .as_object()
        .ok_or_else(|| anyhow!("questions file: expected an object {{questionId: question}}"))?;
    let preds =
        preds_json.as_array().ok_or_else(|| anyhow!("predictions: expected an array of {{questionId, prediction}}"))?;
    let mut predictions: HashMap<String, String> = HashMap::with_capacity(preds.len());
    for (i, p) in preds.iter().enumerate() {
        let qid = match p.get("questionId") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
            Some(other) => bail!("predictions[{i}]: 'questionId' must be a string, got {other}"),
            None => bail!("predictions[{i}]: missing field 'questionId'"),
        };
        let pred = match p.get("prediction") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => bail!("predictions[{i}] (questionId {qid}): 'prediction' must be a string, got {other}"),
            None => bail!("predictions[{i}] (questionId {qid}): missing field 'prediction'"),
        };
        predictions.insert(qid, pred);
    }

    let mut correct_total = (0usize, 0usize);
    let mut binary = (0usize, 0usize);
    let mut open = (0usize, 0usize);
    let mut per_struct: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut per_sem: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (qid, q) in questions {
        let balanced = match q.get("isBalanced") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(Value::Null) => false,
            Some(other) => bail!("question {qid}: 'isBalanced' must be a boolean, got {other}"),
        };
        if !balanced {
            continue;
        }
        let gold = q
            .get("answer")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("question {qid}: missing string field 'answer'"))?;
        let types = q.get("types").ok_or_else(|| anyhow!("question {qid}: missing field 'types'"))?;
        let structural = types
            .get("structural")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("question {qid}: missing string field 'types.structural'"))?;
        let semantic = types
            .get("semantic")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("question {qid}: missing string field 'types.semantic'"))?;
        let predicted = predictions
            .get(qid)
            .ok_or_else(|| anyhow!("no prediction for question {qid}. Please add prediction for all questions."))?;
        let ok = usize::from(predicted == gold);
        correct_total.0 += ok;
        correct_total.1 += 1;
        let bucket = if structural == "query" { &mut open } else { &mut binary };
        bucket.0 += ok;
        bucket.1 += 1;
        let e = per_struct.entry(structural.to_string()).or_default();
        e.0 += ok;
        e.1 += 1;
        let e = per_sem.entry(semantic.to_string()).or_default();
        e.0 += ok;
        e.1 += 1;
    }
    if correct_total.1 == 0 {
        bail!("questions file: no balanced questions to score");
    }
    Ok(GqaScores {
        accuracy: avg_pct(correct_total.0, correct_total.1),
        binary: avg_pct(binary.0, binary.1),
        open: avg_pct(open.0, open.1),
        per_structural_type: per_struct.iter().map(|(k, &(c, t))| (k.clone(), avg_pct(c, t))).collect(),
        per_semantic_type: per_sem.iter().map(|(k, &(c, t))| (k.clone(), avg_pct(c, t))).collect(),
        count_structural_type: per_struct.iter().map(|(k, &(_, t))| (k.clone(), t)).collect(),
        count_semantic_type: per_sem.iter().map(|(k, &(_, t))| (k.clone(), t)).collect(),
        num_questions: correct_total.1,
        not_computed: ["validity", "plausibility", "consistency", "grounding", "distribution"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    })
}

/// Convenience: parse the two files from JSON text and score.
pub fn score_gqa_str(questions: &str, preds: &str) -> Result<Value> {
    let q: Value = serde_json::from_str(questions).context("questions file is not valid JSON")?;
    let p: Value = serde_json::from_str(preds).context("predictions file is not valid JSON")?;
    score_gqa(&q, &p)
}
