//! Reproduces the official scoring tools on the committed fixtures in `tests/fixtures/scoring/`.
//!
//! The `*.expected.json` files were produced by the real tools (see
//! `scripts/scoring_reference.py`): the official VQA `vqaEval.py` (Python 3 port), pycocoevalcap
//! 1.2 with its Java PTBTokenizer, and the official GQA `eval.py`.

use std::path::PathBuf;

use memvp::eval::captions::{self, ptb};
use memvp::eval::{gqa, vqa};
use serde_json::{Value, json};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scoring").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Loads an `*.expected.json` file with every number literal kept as a string, so that [`f`]
/// can parse it with Rust's correctly rounded `str::parse::<f64>` (serde_json's default float
/// parser may be off by one ulp for 17-digit literals unless its `float_roundtrip` feature is on).
fn expected(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scoring").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = String::with_capacity(text.len() + 1024);
    let (mut in_str, mut escaped) = (false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
            out.push(c);
        } else if c == '-' || c.is_ascii_digit() {
            out.push('"');
            out.push(c);
            while let Some(&d) = chars.peek() {
                if d.is_ascii_digit() || matches!(d, '.' | 'e' | 'E' | '+' | '-') {
                    out.push(d);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push('"');
        } else {
            out.push(c);
        }
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A number from a computed `Value` or an exact literal from [`expected`].
fn f(v: &Value) -> f64 {
    match v {
        Value::String(s) => s.parse().unwrap_or_else(|e| panic!("not a number: {v}: {e}")),
        _ => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or_else(|e| panic!("not an integer: {v}: {e}")),
        _ => v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}")),
    }
}

/// Every key of `expected` must be in `got` with exactly the same number.
fn assert_same_map(got: &Value, expected: &Value, what: &str) {
    let e = expected.as_object().unwrap();
    let g = got.as_object().unwrap_or_else(|| panic!("{what}: not an object: {got}"));
    assert_eq!(g.len(), e.len(), "{what}: different keys: got {got}, expected {expected}");
    for (k, v) in e {
        let gv = g.get(k).unwrap_or_else(|| panic!("{what}: missing key {k}"));
        assert_eq!(f(gv), f(v), "{what}[{k}]");
    }
}

// ---------------------------------------------------------------------------------------------
// VQA
// ---------------------------------------------------------------------------------------------

#[test]
fn vqa_matches_official_vqaeval_exactly() {
    let ann = fixture("vqa_annotations.json");
    let ques = fixture("vqa_questions.json");
    let preds = fixture("vqa_predictions.json");
    let exp = expected("vqa.expected.json");
    let got = vqa::score_vqa(&ann, Some(&ques), &preds).unwrap();
    assert_eq!(f(&got["overall"]), f(&exp["overall"]), "overall");
    assert_same_map(&got["perAnswerType"], &exp["perAnswerType"], "perAnswerType");
    assert_same_map(&got["perQuestionType"], &exp["perQuestionType"], "perQuestionType");
    assert_same_map(&got["perQuestion"], &exp["perQuestion"], "perQuestion");
    // without the optional questions file the result is the same
    assert_eq!(vqa::score_vqa(&ann, None, &preds).unwrap(), got);
}

#[test]
fn vqa_fixture_is_discriminating() {
    let exp = expected("vqa.expected.json");
    let overall = f(&exp["overall"]);
    let var = &exp["_variants"];
    // A naive implementation that always normalises (ignoring the "all ten GT answers identical
    // -> compare the raw stripped strings" quirk of the current vqaEval.py) gets a different
    // overall number on this fixture, and so does the older vqaEval.py version that many
    // repositories still copy (prediction always normalised, GT only punctuation-stripped).
    assert_ne!(overall, f(&var["always_normalise_overall"]));
    assert_ne!(overall, f(&var["old_vqaEval_c4e6a0e_overall"]));
    // The "what color is the" group is an exact binary tie (21/32 = 65.625): Python 3 rounds
    // half to even (65.62), Python 2 (the original runtime) away from zero (65.63).
    assert_eq!(f(&exp["perQuestionType"]["what color is the"]), 65.62);
    assert_eq!(f(&var["python2_round"]["perQuestionType"]["what color is the"]), 65.63);
    // and a naive `(x * 100).round() / 100` would give 65.63 as well
    assert_eq!((65.625f64 * 100.0).round() / 100.0, 65.63);
}

#[test]
fn vqa_errors_name_the_problem() {
    let ann = fixture("vqa_annotations.json");
    let mut preds = fixture("vqa_predictions.json");
    let first_qid = preds[0]["question_id"].as_i64().unwrap();
    preds.as_array_mut().unwrap().remove(0);
    let err = vqa::score_vqa(&ann, None, &preds).unwrap_err().to_string();
    assert!(err.contains(&first_qid.to_string()), "{err}");
    assert!(err.contains("no prediction"), "{err}");

    let mut preds = fixture("vqa_predictions.json");
    preds.as_array_mut().unwrap().push(json!({"question_id": 1, "answer": "yes"}));
    let err = vqa::score_vqa(&ann, None, &preds).unwrap_err().to_string();
    assert!(err.contains("question_id 1 not in the annotation file"), "{err}");

    let mut preds = fixture("vqa_predictions.json");
    preds[3]["answer"] = json!(7);
    let err = vqa::score_vqa(&ann, None, &preds).unwrap_err().to_string();
    assert!(err.contains("'answer' must be a string"), "{err}");

    let err = vqa::score_vqa(&json!({"annotations": [{"question_id": 5}]}), None, &json!([])).unwrap_err();
    assert!(err.to_string().contains("question_type"), "{err}");
    let err = vqa::score_vqa_str("{", None, "[]").unwrap_err();
    assert!(format!("{err:#}").contains("not valid JSON"), "{err:#}");
    let err = vqa::score_vqa(&ann, None, &json!({"question_id": 1})).unwrap_err();
    assert!(err.to_string().contains("not an array"), "{err}");
}

#[test]
fn vqa_duplicate_predictions_last_wins() {
    let ann = fixture("vqa_annotations.json");
    let mut preds = fixture("vqa_predictions.json");
    let exp = expected("vqa.expected.json");
    // prepend a wrong answer for the first question: the later (original) one wins
    let mut wrong = preds[0].clone();
    wrong["answer"] = json!("definitely wrong");
    preds.as_array_mut().unwrap().insert(0, wrong);
    let got = vqa::score_vqa(&ann, None, &preds).unwrap();
    assert_eq!(f(&got["overall"]), f(&exp["overall"]));
}

// ---------------------------------------------------------------------------------------------
// Captions
// ---------------------------------------------------------------------------------------------

const CAPTION_TOL: f64 = 1e-6;
// (In practice the corpus scores are bit-identical to pycocoevalcap's and the per-image scores
// differ by at most one ulp; the tolerance is the one asked for.)

#[test]
fn captions_match_pycocoevalcap() {
    let gt = fixture("captions_gt.json");
    let preds = fixture("captions_predictions.json");
    let exp = expected("captions.expected.json");
    let got = captions::score_captions(&gt, &preds).unwrap();
    for k in ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"] {
        let (g, e) = (f(&got[k]), f(&exp[k]));
        assert!((g - e).abs() <= CAPTION_TOL, "{k}: got {g}, expected {e}");
    }
    assert_eq!(int(&got["num_images"]), int(&exp["num_images"]));
    assert_eq!(got["not_computed"], json!(["METEOR", "SPICE"]));

    // per-image scores, in pycocoevalcap's evaluation order
    let (_, per_image) = captions::score_captions_typed(&gt, &preds).unwrap();
    let order: Vec<i64> = per_image.iter().map(|p| p.image_id.as_i64().unwrap()).collect();
    let exp_order: Vec<i64> = exp["image_order"].as_array().unwrap().iter().map(int).collect();
    assert_eq!(order, exp_order);
    for p in &per_image {
        let e = &exp["per_image"][p.image_id.to_string()];
        let pairs = [
            ("Bleu_1", p.bleu[0]),
            ("Bleu_2", p.bleu[1]),
            ("Bleu_3", p.bleu[2]),
            ("Bleu_4", p.bleu[3]),
            ("ROUGE_L", p.rouge_l),
            ("CIDEr", p.cider),
        ];
        for (k, g) in pairs {
            assert!((g - f(&e[k])).abs() <= CAPTION_TOL, "image {} {k}: got {g}, expected {}", p.image_id, e[k]);
        }
    }
}

#[test]
fn captions_tokenisation_matches_java_ptbtokenizer_on_fixture() {
    let gt = fixture("captions_gt.json");
    let preds = fixture("captions_predictions.json");
    let exp = expected("captions.expected.json");
    let order: Vec<i64> = exp["image_order"].as_array().unwrap().iter().map(int).collect();
    // references: all captions of the evaluated images, image by image, as one stream
    let mut refs: Vec<(i64, String)> = Vec::new();
    for id in &order {
        for a in gt["annotations"].as_array().unwrap() {
            if a["image_id"].as_i64() == Some(*id) {
                refs.push((*id, a["caption"].as_str().unwrap().to_string()));
            }
        }
    }
    let toks = ptb::tokenize_captions(&refs.iter().map(|(_, c)| c.as_str()).collect::<Vec<_>>());
    for id in &order {
        let mine: Vec<&str> =
            refs.iter().zip(&toks).filter(|((i, _), _)| i == id).map(|(_, t)| t.as_deref().unwrap()).collect();
        let theirs: Vec<&str> =
            exp["tokenized"]["gts"][id.to_string()].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(mine, theirs, "references of image {id}");
    }
    let hyps: Vec<String> = order
        .iter()
        .map(|id| {
            preds.as_array().unwrap().iter().find(|p| p["image_id"].as_i64() == Some(*id)).unwrap()["caption"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let toks = ptb::tokenize_captions(&hyps.iter().map(String::as_str).collect::<Vec<_>>());
    for (id, t) in order.iter().zip(&toks) {
        assert_eq!(
            t.as_deref().unwrap(),
            exp["tokenized"]["res"][id.to_string()][0].as_str().unwrap(),
            "prediction of image {id}"
        );
    }
}

#[test]
fn captions_fixture_depends_on_ptb_tokenisation() {
    // pycocoevalcap's scores computed on lower-cased, whitespace-split captions (no PTB
    // tokenizer) differ clearly from the real ones on this fixture.
    let exp = expected("captions.expected.json");
    let no_ptb = &exp["_variants"]["without_ptb_tokenizer"];
    for k in ["Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"] {
        assert!((f(&exp[k]) - f(&no_ptb[k])).abs() > 1e-3, "{k} does not depend on tokenisation");
    }
}

#[test]
fn captions_errors() {
    let gt = fixture("captions_gt.json");
    let err = captions::score_captions(&gt, &json!([{"image_id": 123456789, "caption": "a"}])).unwrap_err();
    assert!(err.to_string().contains("123456789"), "{err}");
    let err = captions::score_captions(
        &gt,
        &json!([{"image_id": 74, "caption": "a dog"}, {"image_id": 74, "caption": "a cat"}]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("image 74") && err.to_string().contains("exactly one"), "{err}");
    let err = captions::score_captions(&gt, &json!([{"image_id": 74}])).unwrap_err();
    assert!(err.to_string().contains("caption"), "{err}");
    let err = captions::score_captions_str("[", "[]").unwrap_err();
    assert!(format!("{err:#}").contains("not valid JSON"), "{err:#}");
}

// ---------------------------------------------------------------------------------------------
// PTB tokenizer vs the Java PTBTokenizer (stanford-corenlp-3.4.1.jar)
// ---------------------------------------------------------------------------------------------

#[test]
fn ptb_tokenizer_matches_recorded_java_output() {
    let fx = fixture("ptb_java.json");
    let sentences: Vec<&str> = fx["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let joined = sentences.iter().map(|s| s.replace('\n', " ")).collect::<Vec<_>>().join("\n");
    let lines = ptb::ptb_output_lines(&joined);
    let java: Vec<&str> = fx["java_output_lines"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    // the Java output ends with a newline, so its split has one more (empty) element
    let java = if java.last() == Some(&"") && java.len() == lines.len() + 1 { &java[..lines.len()] } else { &java[..] };
    assert_eq!(lines.len(), java.len(), "number of output lines");
    for (k, (mine, theirs)) in lines.iter().zip(java).enumerate() {
        assert_eq!(mine, theirs, "output line {k} (input line {k}: {:?})", sentences.get(k));
    }
    // and pycocoevalcap's final tokens (punctuation removed, lines zipped with captions)
    let toks = ptb::tokenize_captions(&sentences);
    let expected = fx["pycocoevalcap_tokenized"].as_array().unwrap();
    for (k, (mine, theirs)) in toks.iter().zip(expected).enumerate() {
        assert_eq!(mine.as_deref(), theirs.as_str(), "caption {k}: {:?}", sentences[k]);
    }
}

#[test]
fn ptb_tokenizer_examples() {
    let one = |s: &str| ptb::tokenize_captions(&[s])[0].clone().unwrap();
    assert_eq!(one("A man don't like the dog's bone."), "a man do n't like the dog 's bone");
    assert_eq!(one("He said \"hi\" (loudly)."), "he said hi -lrb- loudly -rrb-");
    assert_eq!(one("I cannot, you're gonna"), "i can not you 're gon na");
    assert_eq!(one("1,000 dogs at 10:30... wow!!!"), "1,000 dogs at 10:30 wow !!!");
    assert_eq!(one("Mr. Smith in the U.S."), "mr. smith in the u.s.");
    assert_eq!(one("a well-known 3-year-old -- really"), "a well-known 3-year-old really");
    assert_eq!(one("1 1/2 cups"), "1\u{a0}1/2 cups");
    assert_eq!(one("emoji 😀 gone"), "emoji gone");
}

// ---------------------------------------------------------------------------------------------
// GQA
// ---------------------------------------------------------------------------------------------

#[test]
fn gqa_matches_official_eval_exactly() {
    let q = fixture("gqa_questions.json");
    let p = fixture("gqa_predictions.json");
    let exp = expected("gqa.expected.json");
    let got = gqa::score_gqa(&q, &p).unwrap();
    for k in ["accuracy", "binary", "open"] {
        assert_eq!(f(&got[k]), f(&exp[k]), "{k}");
    }
    for k in [
        "accuracyPerStructuralType",
        "accuracyPerSemanticType",
        "questionsPerStructuralType",
        "questionsPerSemanticType",
    ] {
        assert_same_map(&got[k], &exp[k], k);
    }
}

#[test]
fn gqa_missing_prediction_is_an_error() {
    let q = fixture("gqa_questions.json");
    let mut p = fixture("gqa_predictions.json");
    p.as_array_mut().unwrap().retain(|x| x["questionId"] != json!("20968379"));
    let err = gqa::score_gqa(&q, &p).unwrap_err().to_string();
    assert!(err.contains("no prediction for question 20968379"), "{err}");
    let err = gqa::score_gqa_str("{}", "[").unwrap_err();
    assert!(format!("{err:#}").contains("not valid JSON"), "{err:#}");
}
