//! VQA accuracy, reproducing the official VQA evaluation tool bit for bit.
//!
//! Reference implementation: GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py`
//! and `PythonHelperTools/vqaTools/vqa.py` at master (commit
//! `a013f0043c1e2cdc995922dfe257f7149aa9af06`, the version referred to by the maintainers in
//! GT-Vision-Lab/VQA issue #14). That code is Python 2; the semantics reproduced here are the
//! Python 2 ones where they differ (see "Unicode" below).
//!
//! # What the official tool does (and this module does identically)
//!
//! * The result file must be a JSON array, and the *set* of its `question_id`s must equal the
//!   set of question ids in the annotation file (`vqa.py` asserts this). We return an error that
//!   names the first missing / unexpected ids instead of an `AssertionError`. If a question id
//!   occurs several times in the predictions, the **last** one wins (the tool builds a dict).
//! * Questions are evaluated in annotation-file order.
//! * GT answers are stripped of `\n`/`\t` (replaced by spaces) and surrounding whitespace, and so
//!   is the predicted answer.
//! * **Quirk:** only if the ten GT answers are *not all identical* (after that stripping) are the
//!   GT answers *and* the prediction normalised with `processPunctuation` + `processDigitArticle`.
//!   When all ten human answers agree (e.g. ten times `"yes"`), the raw stripped prediction is
//!   compared verbatim, so `"Yes"`, `"yes."` or `"two"` score 0 against ten `"yes"`/`"2"` answers.
//!   (Older versions of `vqaEval.py`, still copied in many repositories, always normalised the
//!   prediction and only punctuation-normalised the GT answers; they give different numbers.)
//! * `processPunctuation`: for each character of `; / [ ] " { } ( ) = + \ _ - > < @ ` , ? !`,
//!   it is deleted if it occurs next to a space in the *input* or if the input contains
//!   `digit,digit` anywhere; otherwise it is replaced by a space. Then every `.` not followed by
//!   an ASCII digit is deleted, but at most 32 of them (the code passes `re.UNICODE` == 32 as the
//!   positional `count` argument of `re.sub`). The regex `(?!<=\d)(\.)(?!\d)` contains a
//!   mistyped look-behind that is really a look-ahead for the literal `<=`; it never matches at
//!   a `.`, so it has no effect.
//! * `processDigitArticle`: lower-case, split on whitespace, map `none, zero, one, ..., ten` to
//!   digits (`none` -> `0`), drop the articles `a`, `an`, `the`, then map the contraction table
//!   (`dont` -> `don't`, ...). Keys of the table with capitals (`Im`, `Ive`, `I'dve`) can never
//!   match because the text was lower-cased first.
//! * Accuracy of one question = mean over the GT answers `g` of `min(1, #{other answers equal to
//!   the prediction} / 3)` where "other answers" excludes every answer *dict* equal to `g`
//!   (whole dict compared: answer, answer_id, answer_confidence - with the usual distinct
//!   `answer_id`s this is leave-one-out over the ten answers).
//! * Reported numbers are `round(100 * acc, 2)` with Python's `round` (exact decimal value of
//!   the double, ties to even) — per question, and for overall / per answer type / per question
//!   type `round(100 * sum(accs) / len(accs), 2)` with a left-to-right sum.
//!
//! # Unicode
//! The official tool runs under Python 2 with `unicode` strings from `json.load`; its regexes
//! are compiled without `re.UNICODE`, so `\d` means `[0-9]` only. We follow that (Python 3
//! ports such as LAVIS treat other Unicode decimal digits as digits too). Lower-casing and
//! whitespace splitting use full Unicode rules (as Python 3 `str.lower` / `str.split`); Python 2
//! used simple case mappings, which only differs for characters such as U+0130.
//!
//! Multiple-choice: when a questions file is given and its `task_type` is
//! `"Multiple Choice"`, every prediction must be one of that question's `multiple_choices`
//! (as the tool asserts). The questions file is otherwise not needed.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::{Map, Value};

/// Contraction table of `vqaEval.py` (verbatim, including its oddities such as
/// `"somebody'd" -> "somebodyd"` and the unreachable capitalised keys).
const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// `manualMap` of `vqaEval.py`.
const MANUAL_MAP: &[(&str, &str)] = &[
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const ARTICLES: &[&str] = &["a", "an", "the"];

/// `punct` of `vqaEval.py`, in its order (the order matters: each replacement sees the output
/// of the previous ones, while the "next to a space" test looks at the original input).
const PUNCT: &[char] =
    &[';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!'];

/// Python `str.isspace()` for one character: Unicode White_Space plus U+001C..U+001F.
fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python 3 `round(x, ndigits)` for a float: the double nearest to the exact decimal value of
/// `x` rounded to `ndigits` decimal places, exact ties to even (CPython rounds through
/// `_Py_dg_dtoa` mode 3). Not the same as `(x * 100.0).round() / 100.0`:
/// `round(2.675, 2) == 2.67`, `round(0.125, 2) == 0.12`, `round(0.375, 2) == 0.38`.
pub fn py_round(x: f64, ndigits: usize) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let neg = x.is_sign_negative();
    let a = x.abs();
    // Rust prints the exact decimal expansion when asked for enough digits. A double has at
    // most 1074 fractional decimal digits (at most 62 when |a| >= 2^-10).
    let prec = if a >= 1e-3 { 80 } else { 1100 };
    let s = format!("{a:.prec$}");
    let (int_part, frac_part) = s.split_once('.').expect("fixed-point format has a point");
    let ndigits = ndigits.min(prec - 1);
    let keep = &frac_part[..ndigits];
    let rest = &frac_part[ndigits..];
    let first = rest.as_bytes()[0];
    let round_up = match first.cmp(&b'5') {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => {
            if rest[1..].bytes().any(|b| b != b'0') {
                true
            } else {
                // exact tie: round half to even
                let last = if ndigits == 0 {
                    *int_part.as_bytes().last().expect("non-empty integer part")
                } else {
                    *keep.as_bytes().last().expect("non-empty kept digits")
                };
                (last - b'0') % 2 == 1
            }
        }
    };
    let mut digits: Vec<u8> = int_part.bytes().chain(keep.bytes()).collect();
    if round_up {
        let mut i = digits.len();
        loop {
            if i == 0 {
                digits.insert(0, b'1');
                break;
            }
            i -= 1;
            if digits[i] == b'9' {
                digits[i] = b'0';
            } else {
                digits[i] += 1;
                break;
            }
        }
    }
    let split = digits.len() - ndigits;
    let text = format!(
        "{}{}.{}0",
        if neg { "-" } else { "" },
        std::str::from_utf8(&digits[..split]).expect("ascii digits"),
        std::str::from_utf8(&digits[split..]).expect("ascii digits"),
    );
    text.parse::<f64>().expect("valid decimal literal")
}

/// `re.search(r"(\d)(\,)(\d)", text)` with Python 2 (ASCII) `\d`.
fn has_digit_comma_digit(text: &str) -> bool {
    let b = text.as_bytes();
    b.windows(3).any(|w| w[0].is_ascii_digit() && w[1] == b',' && w[2].is_ascii_digit())
}

/// `VQAEval.processPunctuation`.
pub fn process_punctuation(in_text: &str) -> String {
    let mut out = in_text.to_string();
    let comma_digits = has_digit_comma_digit(in_text);
    for &p in PUNCT {
        let mut with_space_after = String::with_capacity(2);
        with_space_after.push(p);
        with_space_after.push(' ');
        let mut with_space_before = String::with_capacity(2);
        with_space_before.push(' ');
        with_space_before.push(p);
        if in_text.contains(&with_space_after) || in_text.contains(&with_space_before) || comma_digits {
            out = out.replace(p, "");
        } else {
            out = out.replace(p, " ");
        }
    }
    // periodStrip.sub("", out, re.UNICODE): `re.UNICODE` (== 32) lands in the `count`
    // parameter, so at most 32 periods are removed; the look-ahead sees the unmodified string.
    let chars: Vec<char> = out.chars().collect();
    let mut result = String::with_capacity(out.len());
    let mut removed = 0usize;
    for (i, &c) in chars.iter().enumerate() {
        if c == '.' && removed < 32 {
            let next_is_digit = chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
            if !next_is_digit {
                removed += 1;
                continue;
            }
        }
        result.push(c);
    }
    result
}

/// `VQAEval.processDigitArticle`.
pub fn process_digit_article(in_text: &str) -> String {
    let lowered = in_text.to_lowercase();
    let mut out: Vec<&str> = Vec::new();
    for word in lowered.split(py_is_space).filter(|w| !w.is_empty()) {
        let word = MANUAL_MAP.iter().find(|(k, _)| *k == word).map(|(_, v)| *v).unwrap_or(word);
        if !ARTICLES.contains(&word) {
            out.push(word);
        }
    }
    let mapped: Vec<&str> =
        out.into_iter().map(|w| CONTRACTIONS.iter().find(|(k, _)| *k == w).map(|(_, v)| *v).unwrap_or(w)).collect();
    mapped.join(" ")
}

/// `x.replace('\n', ' ').replace('\t', ' ').strip()`.
fn clean(s: &str) -> String {
    s.replace(['\n', '\t'], " ").trim_matches(py_is_space).to_string()
}

/// Python `==` on JSON-decoded values (numbers compare by value, `1 == 1.0`).
fn py_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(i), Some(j)) = (x.as_i64(), y.as_i64()) {
                i == j
            } else if let (Some(i), Some(j)) = (x.as_u64(), y.as_u64()) {
                i == j
            } else if x.is_f64() || y.is_f64() {
                x.as_f64() == y.as_f64()
            } else {
                false // one i64 < 0 and one u64 > i64::MAX
            }
        }
        (Value::Bool(x), Value::Number(y)) | (Value::Number(y), Value::Bool(x)) => {
            y.as_f64() == Some(if *x { 1.0 } else { 0.0 })
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| py_eq(v, w)))
        }
        _ => a == b,
    }
}

/// A question id: the official files use JSON integers.
fn question_id(v: &Value, what: &str) -> Result<i128> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i as i128)
            } else if let Some(u) = n.as_u64() {
                Ok(u as i128)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    Ok(f as i128)
                } else {
                    bail!("{what}: question_id {n} is not an integer")
                }
            }
        }
        other => bail!("{what}: question_id must be an integer, got {other}"),
    }
}

/// Scores in percent, as `VQAEval.accuracy` (+ `evalQA` as `per_question`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VqaScores {
    /// `accuracy['overall']`
    pub overall: f64,
    /// `accuracy['perAnswerType']`
    #[serde(rename = "perAnswerType")]
    pub per_answer_type: BTreeMap<String, f64>,
    /// `accuracy['perQuestionType']`
    #[serde(rename = "perQuestionType")]
    pub per_question_type: BTreeMap<String, f64>,
    /// `evalQA`: question id -> rounded per-question accuracy.
    #[serde(rename = "perQuestion")]
    pub per_question: BTreeMap<String, f64>,
    /// Number of evaluated questions.
    #[serde(rename = "numQuestions")]
    pub num_questions: usize,
}

impl VqaScores {
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("scores serialise")
    }
}

struct Annotation {
    qid: i128,
    question_type: String,
    answer_type: String,
    answers: Vec<Value>,
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str, ctx: &dyn Fn() -> String) -> Result<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("{}: field '{key}' must be a string, got {other}", ctx()),
        None => bail!("{}: missing field '{key}'", ctx()),
    }
}

/// Scores VQA predictions exactly like the official `vqaEval.py` (see the module docs).
///
/// * `gt_annotations_json`: official annotation file (`{"annotations": [...]}`).
/// * `questions_json`: optional official questions file; only used for the multiple-choice
///   check.
/// * `preds_json`: `[{"question_id": int, "answer": str}, ...]`.
pub fn score_vqa(gt_annotations_json: &Value, questions_json: Option<&Value>, preds_json: &Value) -> Result<Value> {
    Ok(score_vqa_typed(gt_annotations_json, questions_json, preds_json)?.to_json())
}

/// Typed variant of [`score_vqa`].
pub fn score_vqa_typed(
    gt_annotations_json: &Value,
    questions_json: Option<&Value>,
    preds_json: &Value,
) -> Result<VqaScores> {
    // ---- annotations (VQA.createIndex) ----
    let anns = gt_annotations_json
        .get("annotations")
        .ok_or_else(|| anyhow!("annotation file: missing top-level field 'annotations'"))?
        .as_array()
        .ok_or_else(|| anyhow!("annotation file: 'annotations' must be an array"))?;
    let mut order: Vec<i128> = Vec::with_capacity(anns.len());
    let mut qa: HashMap<i128, usize> = HashMap::new(); // qid -> index of the last annotation
    let mut parsed: Vec<Annotation> = Vec::with_capacity(anns.len());
    for (i, ann) in anns.iter().enumerate() {
        let obj = ann.as_object().ok_or_else(|| anyhow!("annotation file: annotations[{i}] is not an object"))?;
        let qid = question_id(
            obj.get("question_id").ok_or_else(|| anyhow!("annotation file: annotations[{i}] has no 'question_id'"))?,
            &format!("annotation file: annotations[{i}]"),
        )?;
        let ctx = || format!("annotation file: question_id {qid}");
        let question_type = str_field(obj, "question_type", &ctx)?.to_string();
        let answer_type = str_field(obj, "answer_type", &ctx)?.to_string();
        let answers = obj
            .get("answers")
            .ok_or_else(|| anyhow!("{}: missing field 'answers'", ctx()))?
            .as_array()
            .ok_or_else(|| anyhow!("{}: 'answers' must be an array", ctx()))?;
        if answers.is_empty() {
            bail!("{}: 'answers' is empty (the official tool divides by zero)", ctx());
        }
        for (j, a) in answers.iter().enumerate() {
            let ao = a.as_object().ok_or_else(|| anyhow!("{}: answers[{j}] is not an object", ctx()))?;
            match ao.get("answer") {
                Some(Value::String(_)) => {}
                Some(other) => bail!("{}: answers[{j}].answer must be a string, got {other}", ctx()),
                None => bail!("{}: answers[{j}] has no 'answer'", ctx()),
            }
        }
        order.push(qid);
        qa.insert(qid, parsed.len());
        parsed.push(Annotation { qid, question_type, answer_type, answers: answers.clone() });
    }
    if order.is_empty() {
        bail!("annotation file: no annotations (the official tool divides by zero)");
    }

    // ---- optional questions file (multiple-choice check) ----
    let mut choices: Option<HashMap<i128, Vec<String>>> = None;
    if let Some(q) = questions_json {
        let is_mc = q.get("task_type").and_then(Value::as_str) == Some("Multiple Choice");
        if is_mc {
            let qs = q
                .get("questions")
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("questions file: missing array 'questions'"))?;
            let mut m = HashMap::new();
            for (i, item) in qs.iter().enumerate() {
                let qid = question_id(
                    item.get("question_id")
                        .ok_or_else(|| anyhow!("questions file: questions[{i}] has no 'question_id'"))?,
                    &format!("questions file: questions[{i}]"),
                )?;
                let mc = item
                    .get("multiple_choices")
                    .and_then(Value::as_array)
                    .ok_or_else(|| anyhow!("questions file: question_id {qid} has no 'multiple_choices'"))?;
                m.insert(qid, mc.iter().filter_map(|c| c.as_str().map(str::to_string)).collect());
            }
            choices = Some(m);
        }
    }

    // ---- predictions (VQA.loadRes) ----
    let preds = preds_json.as_array().ok_or_else(|| anyhow!("predictions: results is not an array of objects"))?;
    let mut res: HashMap<i128, String> = HashMap::new();
    for (i, p) in preds.iter().enumerate() {
        let obj = p.as_object().ok_or_else(|| anyhow!("predictions[{i}] is not an object"))?;
        let qid = question_id(
            obj.get("question_id").ok_or_else(|| anyhow!("predictions[{i}] has no 'question_id'"))?,
            &format!("predictions[{i}]"),
        )?;
        let answer = match obj.get("answer") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => bail!("predictions[{i}] (question_id {qid}): 'answer' must be a string, got {other}"),
            None => bail!("predictions[{i}] (question_id {qid}): missing field 'answer'"),
        };
        res.insert(qid, answer);
    }
    let gt_ids: HashSet<i128> = order.iter().copied().collect();
    let mut missing: Vec<i128> = gt_ids.iter().filter(|q| !res.contains_key(q)).copied().collect();
    let mut extra: Vec<i128> = res.keys().filter(|q| !gt_ids.contains(q)).copied().collect();
    if !missing.is_empty() || !extra.is_empty() {
        missing.sort_unstable();
        extra.sort_unstable();
        let show = |v: &[i128]| {
            let mut s: Vec<String> = v.iter().take(10).map(|q| q.to_string()).collect();
            if v.len() > 10 {
                s.push(format!("... ({} in total)", v.len()));
            }
            s.join(", ")
        };
        let mut msg = String::from(
            "Results do not correspond to current VQA set (the official tool requires predictions for \
             exactly the question ids of the annotation file)",
        );
        if !missing.is_empty() {
            msg.push_str(&format!("; no prediction for question_id {}", show(&missing)));
        }
        if !extra.is_empty() {
            msg.push_str(&format!("; predictions for question_id {} not in the annotation file", show(&extra)));
        }
        bail!(msg);
    }
    if let Some(ch) = &choices {
        for (&qid, ans) in &res {
            let ok = ch.get(&qid).is_some_and(|c| c.iter().any(|x| x == ans));
            if !ok {
                bail!("question_id {qid}: predicted answer {ans:?} is not one of the multiple choices");
            }
        }
    }

    // ---- VQAEval.evaluate ----
    let mut acc_qa: Vec<f64> = Vec::with_capacity(order.len());
    let mut acc_ques_type: Vec<(String, Vec<f64>)> = Vec::new();
    let mut acc_ans_type: Vec<(String, Vec<f64>)> = Vec::new();
    let mut per_question: BTreeMap<String, f64> = BTreeMap::new();
    for &qid in &order {
        let idx = qa[&qid];
        let ann = &mut parsed[idx];
        // the tool mutates the answer dicts in place (matters only for duplicated ids)
        for a in ann.answers.iter_mut() {
            let s = a["answer"].as_str().expect("checked above");
            let c = clean(s);
            a["answer"] = Value::String(c);
        }
        let mut res_ans = clean(&res[&qid]);
        let gt_answers: HashSet<&str> = ann.answers.iter().map(|a| a["answer"].as_str().expect("string")).collect();
        if gt_answers.len() > 1 {
            for a in ann.answers.iter_mut() {
                let s = a["answer"].as_str().expect("string");
                let p = process_digit_article(&process_punctuation(s));
                a["answer"] = Value::String(p);
            }
            res_ans = process_digit_article(&process_punctuation(&res_ans));
        }
        let mut gt_acc: Vec<f64> = Vec::with_capacity(ann.answers.len());
        for gt_datum in &ann.answers {
            let matching = ann
                .answers
                .iter()
                .filter(|item| !py_eq(item, gt_datum))
                .filter(|item| item["answer"].as_str() == Some(res_ans.as_str()))
                .count();
            let acc = (matching as f64 / 3.0).min(1.0);
            gt_acc.push(acc);
        }
        let mut sum = 0.0;
        for (k, &a) in gt_acc.iter().enumerate() {
            sum = if k == 0 { a } else { sum + a };
        }
        let avg = sum / gt_acc.len() as f64;
        acc_qa.push(avg);
        push_group(&mut acc_ques_type, &ann.question_type, avg);
        push_group(&mut acc_ans_type, &ann.answer_type, avg);
        per_question.insert(ann.qid.to_string(), py_round(100.0 * avg, 2));
    }
    let mean_pct = |v: &[f64]| {
        let mut s = 0.0;
        for (k, &a) in v.iter().enumerate() {
            s = if k == 0 { a } else { s + a };
        }
        py_round(100.0 * s / v.len() as f64, 2)
    };
    Ok(VqaScores {
        overall: mean_pct(&acc_qa),
        per_answer_type: acc_ans_type.iter().map(|(k, v)| (k.clone(), mean_pct(v))).collect(),
        per_question_type: acc_ques_type.iter().map(|(k, v)| (k.clone(), mean_pct(v))).collect(),
        per_question,
        num_questions: order.len(),
    })
}

fn push_group(groups: &mut Vec<(String, Vec<f64>)>, key: &str, v: f64) {
    if let Some((_, list)) = groups.iter_mut().find(|(k, _)| k == key) {
        list.push(v);
    } else {
        groups.push((key.to_string(), vec![v]));
    }
}

/// Convenience: parse the three files from JSON text and score.
pub fn score_vqa_str(gt: &str, questions: Option<&str>, preds: &str) -> Result<Value> {
    let gt: Value = serde_json::from_str(gt).context("annotation file is not valid JSON")?;
    let q: Option<Value> =
        questions.map(|q| serde_json::from_str(q).context("questions file is not valid JSON")).transpose()?;
    let p: Value = serde_json::from_str(preds).context("predictions file is not valid JSON")?;
    score_vqa(&gt, q.as_ref(), &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_round_semantics() {
        // expected values are CPython 3.11 `round(x, 2)`
        assert_eq!(py_round(2.675, 2), 2.67);
        assert_eq!(py_round(0.125, 2), 0.12);
        assert_eq!(py_round(0.375, 2), 0.38);
        assert_eq!(py_round(1.005, 2), 1.0);
        assert_eq!(py_round(66.66666666666667, 2), 66.67);
        assert_eq!(py_round(33.33333333333333, 2), 33.33);
        assert_eq!(py_round(99.995, 2), 100.0); // 99.995 is slightly above 99.995 in binary
        assert_eq!(py_round(100.0, 2), 100.0);
        assert_eq!(py_round(0.0, 2), 0.0);
        assert_eq!(py_round(12.5, 0), 12.0);
        assert_eq!(py_round(13.5, 0), 14.0);
        assert_eq!(py_round(0.004999, 2), 0.0);
        assert_eq!(py_round(0.005, 2), 0.01);
        assert_eq!(py_round(0.0001, 2), 0.0);
        assert_eq!(py_round(-0.125, 2), -0.12);
        // a naive (x * 100).round() / 100 gets these wrong
        assert_ne!((2.675f64 * 100.0).round() / 100.0, py_round(2.675, 2));
        assert_ne!((0.125f64 * 100.0).round() / 100.0, py_round(0.125, 2));
    }

    #[test]
    fn punctuation_and_articles() {
        assert_eq!(process_punctuation("yes."), "yes");
        assert_eq!(process_punctuation("3.5"), "3.5");
        assert_eq!(process_punctuation("1,000"), "1000");
        assert_eq!(process_punctuation("ok!"), "ok ");
        assert_eq!(process_punctuation("hi , there"), "hi  there");
        assert_eq!(process_punctuation("t-shirt"), "t shirt");
        assert_eq!(process_punctuation("don't"), "don't");
        assert_eq!(process_digit_article("The Two dogs"), "2 dogs");
        assert_eq!(process_digit_article("dont  isnt"), "don't isn't");
        assert_eq!(process_digit_article("none"), "0");
        assert_eq!(process_digit_article("Im"), "im");
        // at most 32 periods are removed
        let many = ".".repeat(40);
        assert_eq!(process_punctuation(&many), ".".repeat(8));
    }
}
