//! The VQA v2, GQA and COCO Captions data sets (`memvp::data::{vqav2, gqa, coco}`) on tiny
//! hand-made fixtures in the official layouts (`tests/fixtures/{vqav2,gqa,coco}/`, written by
//! `scripts/make_data_fixtures.py`), and the `memvp score` command on the scoring fixtures.

use memvp::data::{self, DataOptions, Dataset, Sample};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn open(kind: &str, dir: &Path, opts: &DataOptions) -> Box<dyn Dataset> {
    data::open(&format!("{kind}:{}", dir.display()), opts).unwrap()
}

fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{what}: got {got}, expected {want}");
}

fn outs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn err_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

// ---------------------------------------------------------------------------------------------
// VQA v2
// ---------------------------------------------------------------------------------------------

fn vqa_dir() -> PathBuf {
    fixtures().join("vqav2")
}

#[test]
fn vqav2_samples_prompts_targets_references() {
    let ds = open("vqav2", &vqa_dir(), &DataOptions::default());
    assert_eq!(ds.kind(), "vqav2");
    assert_eq!(ds.max_new_tokens(), 10);
    let s = ds.samples("val").unwrap();
    let ids: Vec<&str> = s.iter().map(|x| x.id.as_str()).collect();
    assert_eq!(ids, ["42000", "42001", "73000", "73001", "74000"]);
    // the VL-T5 prefix is the default template
    assert_eq!(s[0].prompt, "vqa: Is the man happy?");
    assert_eq!(s[0].eval_prefix, "");
    // targets: the most frequent of the ten answers
    let targets: Vec<&str> = s.iter().map(|x| x.answer.as_str()).collect();
    // 42001: blue x7 vs red x2, dark red x1; 73000: 3 x7 (the raw "2" x2 and "two" x1 are not
    // merged); 74000: dog 4, cat 4, kitten 2 -> tie, first occurrence (dog) wins although the
    // file's multiple_choice_answer is "cat"
    assert_eq!(targets, ["yes", "blue", "3", "cake", "dog"]);
    for x in &s {
        assert_eq!(x.references.len(), 10, "{}", x.id);
    }
    assert_eq!(s[1].references, ["red", "blue", "blue", "blue", "blue", "red", "dark red", "blue", "blue", "blue"]);
    let types: Vec<&str> = s.iter().map(|x| x.qtype.as_deref().unwrap()).collect();
    assert_eq!(types, ["yes/no", "other", "number", "other", "other"]);
    assert_eq!(s[2].image.as_deref().unwrap(), vqa_dir().join("val2014/COCO_val2014_000000000073.jpg"));
    assert_eq!(s[2].extra["question_id"], json!(73000));
    // every image exists and decodes
    let (kept, skipped) = data::filter_images(s.clone(), false).unwrap();
    assert_eq!((kept.len(), skipped), (5, 0));
    // the long split name gives the same samples
    let long = ds.samples("val2014").unwrap();
    assert_eq!(serde_json::to_value(&long).unwrap(), serde_json::to_value(&s).unwrap());
}

#[test]
fn vqav2_most_frequent_rule() {
    use memvp::data::vqav2::most_frequent;
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(most_frequent(&v(&["a", "b", "b", "a", "c"])).unwrap(), "a");
    assert_eq!(most_frequent(&v(&["b", "a", "a", "b", "a"])).unwrap(), "a");
    assert_eq!(most_frequent(&v(&["x"])).unwrap(), "x");
    assert!(most_frequent(&[]).is_none());
    assert_eq!(memvp::data::vqav2::clean_answer("  two\tdogs\n"), "two dogs");
}

#[test]
fn vqav2_template_and_split_names() {
    let opts = DataOptions { vqa_template: Some("Question: {question} Short answer:".into()), ..Default::default() };
    let ds = open("vqav2", &vqa_dir(), &opts);
    let s = ds.samples("train").unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].prompt, "Question: What is the cat doing? Short answer:");
    assert_eq!(s[0].answer, "sleeping");
    assert_eq!(s[0].image.as_deref().unwrap(), vqa_dir().join("train2014/COCO_train2014_000000000009.jpg"));
    assert_eq!(memvp::data::vqav2::split_name("val"), "val2014");
    assert_eq!(memvp::data::vqav2::split_name("test-dev"), "test-dev2015");
    assert_eq!(memvp::data::vqav2::split_name("minival"), "minival");
}

#[test]
fn vqav2_test_splits_have_no_answers_and_are_written_for_the_server() {
    let ds = open("vqav2", &vqa_dir(), &DataOptions::default());
    let s = ds.samples("test").unwrap();
    assert_eq!(s.len(), 2);
    assert!(s.iter().all(|x| x.answer.is_empty() && x.references.is_empty()));
    // test-dev2015 images live in test2015/
    let dev = ds.samples("test-dev").unwrap();
    assert_eq!(dev.len(), 1);
    assert_eq!(dev[0].image.as_deref().unwrap(), vqa_dir().join("test2015/COCO_test2015_000000000001.jpg"));
    assert!(dev[0].image.as_deref().unwrap().is_file());
    // No score, but the predictions in the official results format, ready to submit.
    let sc = ds.score(&s, &outs(&["yes", "tennis"])).unwrap();
    assert_eq!(sc.metrics["scored"], false);
    let why = sc.metrics["reason"].as_str().unwrap();
    assert!(why.contains("no annotations") && why.contains("v2_mscoco_test2015_annotations.json"), "{why}");
    let preds = sc.preds.as_array().unwrap();
    assert_eq!(preds.len(), 2);
    assert_eq!(preds[1]["answer"], "tennis");
    assert!(preds[0]["question_id"].is_i64());
    assert!(sc.table.is_empty());
}

/// Hand-computed VQA accuracies (`acc = mean over the ten GT answers g of min(1, #{other nine
/// answers equal to the prediction} / 3)`; GT answers and prediction are normalised only when
/// the ten answers are not all identical):
/// * 42000 (10 x "yes"), prediction " yes " -> trimmed "yes": every g sees 9 matches -> 100.
/// * 42001 ("red" x2, "dark red", "blue" x7), prediction "red": the two "red" g see 1 match
///   (1/3), the eight others see 2 (2/3): (2/3 + 16/3) / 10 = 0.6 -> 60.
/// * 73000 ("2" x2, "two", "3" x7), prediction "two": normalised to "2", and "two" in the GT
///   becomes "2" too, so "2" x3: the three "2" g see 2 (2/3), the seven "3" g see 3 (1):
///   (2 + 7) / 10 -> 90.
/// * 73001 ("cake" x6, "pie" x4), prediction "bread" -> 0.
/// * 74000 ("dog" x4, "cat" x4, "kitten" x2), prediction "dog": every g sees >= 3 -> 100.
///
/// Overall (100 + 60 + 90 + 0 + 100) / 5 = 70; yes/no 100; number 90; other
/// (60 + 0 + 100) / 3 = 53.33.
#[test]
fn vqav2_scoring_hand_computed() {
    let ds = open("vqav2", &vqa_dir(), &DataOptions::default());
    let s = ds.samples("val").unwrap();
    let r = ds.score(&s, &outs(&[" yes ", "red", "two", "bread", "dog"])).unwrap();
    assert_eq!(r.metrics["overall"], json!(70.0));
    assert_eq!(r.metrics["perAnswerType"], json!({"yes/no": 100.0, "number": 90.0, "other": 53.33}));
    assert_eq!(r.metrics["perQuestionType"]["what color is the"], json!(60.0));
    assert_eq!(r.metrics["numQuestions"], json!(5));
    assert!(r.metrics.get("perQuestion").is_none());
    // the official results format, generated text trimmed
    assert_eq!(
        r.preds,
        json!([
            {"question_id": 42000, "answer": "yes"},
            {"question_id": 42001, "answer": "red"},
            {"question_id": 73000, "answer": "two"},
            {"question_id": 73001, "answer": "bread"},
            {"question_id": 74000, "answer": "dog"},
        ])
    );
    let table: Vec<(&str, f64, usize)> = r.table.iter().map(|(k, v, n)| (k.as_str(), *v, *n)).collect();
    assert_eq!(table, [("overall", 70.0, 5), ("number", 90.0, 1), ("other", 53.33, 3), ("yes/no", 100.0, 1)]);
    // the official quirk: ten identical answers are compared verbatim, so "Yes" scores 0
    let r = ds.score(&s, &outs(&["Yes", "red", "two", "bread", "dog"])).unwrap();
    assert_eq!(r.metrics["overall"], json!(50.0));
    // a subset (evaluation with --max-samples) is scored against its own annotations
    let r = ds.score(&s[..2], &outs(&["yes", "red"])).unwrap();
    assert_eq!(r.metrics["overall"], json!(80.0));
    assert_eq!(r.metrics["numQuestions"], json!(2));
}

// ---------------------------------------------------------------------------------------------
// GQA
// ---------------------------------------------------------------------------------------------

fn gqa_dir() -> PathBuf {
    fixtures().join("gqa")
}

#[test]
fn gqa_samples() {
    let ds = open("gqa", &gqa_dir(), &DataOptions::default());
    assert_eq!(ds.kind(), "gqa");
    assert_eq!(ds.max_new_tokens(), 10);
    let s = ds.samples("testdev").unwrap();
    // file order, not sorted
    let ids: Vec<&str> = s.iter().map(|x| x.id.as_str()).collect();
    assert_eq!(ids, ["20201", "20105", "20302", "20003", "20404"]);
    assert_eq!(s[0].prompt, "gqa: Is the sky blue?");
    let answers: Vec<&str> = s.iter().map(|x| x.answer.as_str()).collect();
    assert_eq!(answers, ["yes", "red", "left", "no", "dog"]);
    assert_eq!(s[2].qtype.as_deref(), Some("choose"));
    assert_eq!(s[2].image.as_deref().unwrap(), gqa_dir().join("images/2354786.jpg"));
    let (kept, _) = data::filter_images(s.clone(), false).unwrap();
    assert_eq!(kept.len(), 5);
    assert_eq!(ds.samples("test-dev").unwrap().len(), 5);
    assert_eq!(ds.samples("train").unwrap().len(), 2);
    let opts = DataOptions { vqa_template: Some("Q: {question}".into()), ..Default::default() };
    let ds = open("gqa", &gqa_dir(), &opts);
    assert_eq!(ds.samples("train").unwrap()[0].prompt, "Q: Which color is the car?");
}

/// Hand-computed: predictions "yes" (20201 verify/attr, correct), " red " -> "red" (20105
/// query/attr, correct), "Left" (20302 choose/rel: the official comparison is exact, wrong),
/// "yes" (20003 logical/obj, wrong), "cat" (20404, unbalanced: not scored).
/// accuracy 2/4 = 50; binary (non-query) 1/3; open (query) 1/1; verify 100, query 100,
/// choose 0, logical 0; attr 100, rel 0, obj 0.
#[test]
fn gqa_scoring_hand_computed() {
    let ds = open("gqa", &gqa_dir(), &DataOptions::default());
    let s = ds.samples("testdev").unwrap();
    let r = ds.score(&s, &outs(&["yes", " red ", "Left", "yes", "cat"])).unwrap();
    let m = &r.metrics;
    close(m["accuracy"].as_f64().unwrap(), 50.0, "accuracy");
    close(m["binary"].as_f64().unwrap(), 100.0 / 3.0, "binary");
    close(m["open"].as_f64().unwrap(), 100.0, "open");
    assert_eq!(m["accuracyPerStructuralType"], json!({"verify": 100.0, "query": 100.0, "choose": 0.0, "logical": 0.0}));
    assert_eq!(m["accuracyPerSemanticType"], json!({"attr": 100.0, "rel": 0.0, "obj": 0.0}));
    assert_eq!(m["numQuestions"], json!(4));
    assert_eq!(
        r.preds,
        json!([
            {"questionId": "20201", "prediction": "yes"},
            {"questionId": "20105", "prediction": "red"},
            {"questionId": "20302", "prediction": "Left"},
            {"questionId": "20003", "prediction": "yes"},
            {"questionId": "20404", "prediction": "cat"},
        ])
    );
    let names: Vec<&str> = r.table.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(names, ["overall", "binary", "open", "choose", "logical", "query", "verify", "attr", "obj", "rel"]);
    assert_eq!(r.table[1].2, 3);
    assert_eq!(r.table[2].2, 1);
}

#[test]
fn gqa_test_split_cannot_be_scored() {
    let ds = open("gqa", &gqa_dir(), &DataOptions::default());
    let s = ds.samples("test").unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].answer, "");
    let e = err_text(ds.score(&s, &outs(&["yes"])).err().unwrap());
    assert!(e.contains("test_balanced_questions.json"), "{e}");
    assert!(e.contains("no `answer`"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// COCO Captions
// ---------------------------------------------------------------------------------------------

fn coco_dir() -> PathBuf {
    fixtures().join("coco")
}

#[test]
fn coco_samples_units_and_splits() {
    let ds = open("coco-captions", &coco_dir(), &DataOptions::default());
    assert_eq!(ds.kind(), "coco-captions");
    assert_eq!(ds.max_new_tokens(), 20);
    // train = Karpathy train + restval, one sample per caption
    let s = ds.samples("train").unwrap();
    let ids: Vec<&str> = s.iter().map(|x| x.id.as_str()).collect();
    assert_eq!(ids, ["9#0", "9#1", "25#0", "25#1", "42#0", "42#1"]);
    assert_eq!(s[0].prompt, "caption:");
    assert_eq!(s[1].answer, "A grey cat asleep"); // raw, trimmed
    assert_eq!(s[1].references, ["A cat sleeping on a sofa.", "A grey cat asleep"]);
    assert_eq!(s[4].image.as_deref().unwrap(), coco_dir().join("val2014/COCO_val2014_000000000042.jpg"));
    let (kept, _) = data::filter_images(s.clone(), false).unwrap();
    assert_eq!(kept.len(), 6);
    // val / test: one sample per image with every reference
    let v = ds.samples("val").unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].id, "73");
    assert_eq!(v[0].answer, "Two dogs playing.");
    assert_eq!(v[0].references.len(), 3);
    assert_eq!(ds.samples("test").unwrap().len(), 2);
    assert_eq!(ds.samples("restval").unwrap().len(), 2);
    // unit overrides
    assert_eq!(ds.samples("val.captions").unwrap().len(), 3);
    let ti = ds.samples("train.images").unwrap();
    assert_eq!(ti.len(), 3);
    assert_eq!(ti[0].id, "9");
    let e = err_text(ds.samples("karpathy").err().unwrap());
    assert!(e.contains("unknown split `karpathy`"), "{e}");
    // the prompt is configurable
    let opts = DataOptions { caption_prompt: Some("A picture of".into()), ..Default::default() };
    let ds = open("coco-captions", &coco_dir(), &opts);
    assert_eq!(ds.samples("val").unwrap()[0].prompt, "A picture of");
}

/// Test images 74 and 133, predictions "a dog on the grass" and "a man on a bike".
///
/// Against the Karpathy references (74: "a dog runs on the grass", "a brown dog running
/// outside"; 133: "a man riding a horse", "a person on a horse", after PTB tokenisation):
/// * BLEU-1: 74 matches 5/5 words, 133 matches a, a, man, on = 4/5; corpus 9/10; both
///   hypotheses have the length of a closest reference (5), so no brevity penalty: 0.9.
/// * BLEU-2: 74 "a dog", "on the", "the grass" of 4 bigrams; 133 "a man", "on a" of 4;
///   precision 5/8, BLEU-2 = sqrt(0.9 * 5/8) = 0.75.
/// * ROUGE-L (beta 1.2, best precision and best recall over the references): 74 LCS 5 with the
///   first reference: P = 1, R = 5/6, F = 2.44 * 5/6 / (5/6 + 1.44) = 305/341; 133 LCS 3
///   with either: P = R = 3/5, F = 0.6; mean (305/341 + 0.6) / 2.
///
/// The official file adds "a dog on the grass" (74) and "A man on a horse." (133): BLEU-1
/// stays 0.9, bigrams 4/4 + 3/4 -> BLEU-2 = sqrt(0.9 * 7/8); ROUGE-L 74 = 1, 133 = 0.8
/// (LCS "a man on a"), mean 0.9.
#[test]
fn coco_scoring_official_and_karpathy_references() {
    let preds_text = outs(&["a dog on the grass", "a man on a bike"]);
    // official annotations present in the fixture
    let ds = open("coco-captions", &coco_dir(), &DataOptions::default());
    let s = ds.samples("test").unwrap();
    let r = ds.score(&s, &preds_text).unwrap();
    let m = &r.metrics;
    close(m["Bleu_1"].as_f64().unwrap(), 0.9, "Bleu_1");
    close(m["Bleu_2"].as_f64().unwrap(), (0.9f64 * 0.875).sqrt(), "Bleu_2");
    close(m["ROUGE_L"].as_f64().unwrap(), 0.9, "ROUGE_L");
    assert!(m["gt_source"].as_str().unwrap().starts_with("official"), "{m}");
    assert_eq!(
        r.preds,
        json!([
            {"image_id": 74, "caption": "a dog on the grass"},
            {"image_id": 133, "caption": "a man on a bike"},
        ])
    );
    // the same as the scorer on the official file itself
    let official: Value =
        serde_json::from_str(&std::fs::read_to_string(coco_dir().join("annotations/captions_val2014.json")).unwrap())
            .unwrap();
    let direct = memvp::eval::captions::score_captions(&official, &r.preds).unwrap();
    for k in ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"] {
        assert_eq!(m[k], direct[k], "{k}");
    }
    // the table shows x100
    assert_eq!(r.table[0].0, "Bleu_1");
    close(r.table[0].1, 90.0, "table Bleu_1");
    assert_eq!(r.table[5].0, "CIDEr");
    close(r.table[5].1, 100.0 * m["CIDEr"].as_f64().unwrap(), "table CIDEr");
    assert_eq!(r.table[5].2, 2);

    // without annotations/: the Karpathy references
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(coco_dir().join("dataset_coco.json"), tmp.path().join("dataset_coco.json")).unwrap();
    let ds = open("coco-captions", tmp.path(), &DataOptions::default());
    let s = ds.samples("test").unwrap();
    let r = ds.score(&s, &preds_text).unwrap();
    let m = &r.metrics;
    close(m["Bleu_1"].as_f64().unwrap(), 0.9, "Bleu_1");
    close(m["Bleu_2"].as_f64().unwrap(), 0.75, "Bleu_2");
    close(m["ROUGE_L"].as_f64().unwrap(), (305.0 / 341.0 + 0.6) / 2.0, "ROUGE_L");
    assert!(m["gt_source"].as_str().unwrap().starts_with("karpathy"), "{m}");
    let built = json!({
        "images": [{"id": 74}, {"id": 133}],
        "annotations": [
            {"image_id": 74, "id": 0, "caption": "A dog runs on the grass."},
            {"image_id": 74, "id": 1, "caption": "A brown dog running outside"},
            {"image_id": 133, "id": 2, "caption": "A man riding a horse."},
            {"image_id": 133, "id": 3, "caption": "A person on a horse"},
        ]
    });
    let direct = memvp::eval::captions::score_captions(&built, &r.preds).unwrap();
    for k in ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"] {
        assert_eq!(m[k], direct[k], "{k}");
    }
}

#[test]
fn coco_per_caption_samples_score_one_caption_per_image() {
    let ds = open("coco-captions", &coco_dir(), &DataOptions::default());
    let s = ds.samples("val.captions").unwrap();
    let r = ds.score(&s, &outs(&["two dogs playing", "ignored", "ignored too"])).unwrap();
    assert_eq!(r.preds, json!([{"image_id": 73, "caption": "two dogs playing"}]));
    assert_eq!(r.metrics["num_images"], json!(1));
}

// ---------------------------------------------------------------------------------------------
// Options and malformed inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn old_data_options_load_without_caption_prompt() {
    let o: DataOptions =
        toml::from_str("prompt_format = \"QCM-A\"\nuse_caption = false\nskip_bad_images = false\n").unwrap();
    assert_eq!(o.caption_prompt, None);
    let o: DataOptions = serde_json::from_value(json!({
        "prompt_format": "QCM-A", "use_caption": false, "vqa_template": null,
        "skip_bad_images": false
    }))
    .unwrap();
    assert_eq!(o, DataOptions::default());
    let e = err_text(data::open("nope:x", &DataOptions::default()).err().unwrap());
    assert!(e.contains("vqav2, gqa, coco-captions"), "{e}");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn samples_err(kind: &str, dir: &Path, split: &str) -> String {
    let ds = open(kind, dir, &DataOptions::default());
    match ds.samples(split) {
        Ok(s) => panic!("expected an error, got {} samples", s.len()),
        Err(e) => err_text(e),
    }
}

fn assert_mentions(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "`{p}` not in: {e}");
    }
}

const VQ: &str = "v2_OpenEnded_mscoco_val2014_questions.json";
const VA: &str = "v2_mscoco_val2014_annotations.json";

fn ann(qid: i64) -> Value {
    json!({"question_id": qid, "image_id": 1, "question_type": "what", "answer_type": "other",
           "multiple_choice_answer": "x",
           "answers": (1..=10).map(|i| json!({"answer": "x", "answer_confidence": "yes", "answer_id": i})).collect::<Vec<_>>()})
}

#[test]
fn vqav2_malformed_inputs() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // missing directory
    let e =
        err_text(data::open(&format!("vqav2:{}", d.join("nope").display()), &DataOptions::default()).err().unwrap());
    assert_mentions(&e, &["nope", "not found"]);
    // missing questions file
    assert_mentions(&samples_err("vqav2", d, "val"), &[VQ, "not found", "val2014"]);
    // malformed JSON
    let qf = write(d, VQ, "{\"questions\": [");
    assert_mentions(&samples_err("vqav2", d, "val"), &[&qf.display().to_string(), "malformed JSON"]);
    // wrong field type
    write(
        d,
        VQ,
        r#"{"questions": [{"question_id": 1, "image_id": 1, "question": "a?"},
                                   {"question_id": 2, "image_id": "x", "question": "b?"}]}"#,
    );
    assert_mentions(&samples_err("vqav2", d, "val"), &[VQ, "questions[1]", "question_id 2", "`image_id`", "integer"]);
    write(d, VQ, r#"{"questions": {"a": 1}}"#);
    assert_mentions(&samples_err("vqav2", d, "val"), &[VQ, "`questions`", "list"]);
    // missing annotation file for a non-test split
    write(
        d,
        VQ,
        r#"{"questions": [{"question_id": 1, "image_id": 1, "question": "a?"},
                                   {"question_id": 2, "image_id": 1, "question": "b?"}]}"#,
    );
    assert_mentions(&samples_err("vqav2", d, "val"), &[VA, "not found"]);
    // a question without annotation
    write(d, VA, &json!({"annotations": [ann(1)]}).to_string());
    assert_mentions(&samples_err("vqav2", d, "val"), &[VA, "no annotation for question_id 2"]);
    // wrong type inside the answers
    let mut bad = ann(2);
    bad["answers"][3]["answer"] = json!(7);
    write(d, VA, &json!({"annotations": [ann(1), bad]}).to_string());
    assert_mentions(&samples_err("vqav2", d, "val"), &[VA, "annotations[1]", "answers[3]", "`answer`", "string"]);
    let mut bad = ann(2);
    bad.as_object_mut().unwrap().remove("answer_type");
    write(d, VA, &json!({"annotations": [ann(1), bad]}).to_string());
    assert_mentions(&samples_err("vqav2", d, "val"), &[VA, "missing field `answer_type`"]);
    // empty answers list
    let mut bad = ann(2);
    bad["answers"] = json!([]);
    write(d, VA, &json!({"annotations": [ann(1), bad]}).to_string());
    assert_mentions(&samples_err("vqav2", d, "val"), &[VA, "question_id 2", "`answers` is empty"]);
    // empty split
    write(d, VQ, r#"{"questions": []}"#);
    assert_mentions(&samples_err("vqav2", d, "val"), &[VQ, "no questions"]);
}

#[test]
fn gqa_malformed_inputs() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let f = "val_balanced_questions.json";
    assert_mentions(&samples_err("gqa", d, "val"), &[f, "not found"]);
    write(d, f, "{\"1\": {");
    assert_mentions(&samples_err("gqa", d, "val"), &[f, "malformed JSON"]);
    write(d, f, "[1, 2]");
    assert_mentions(&samples_err("gqa", d, "val"), &[f, "expected an object of questions"]);
    write(d, f, r#"{"1": {"imageId": "a", "question": "q?", "answer": 3}}"#);
    assert_mentions(&samples_err("gqa", d, "val"), &[f, "question 1", "`answer`", "string"]);
    write(d, f, r#"{"1": {"imageId": "a", "answer": "x"}}"#);
    assert_mentions(&samples_err("gqa", d, "val"), &[f, "question 1", "missing field `question`"]);
    write(d, f, r#"{"1": {"imageId": "a", "question": "q", "types": {"structural": 1}}}"#);
    assert_mentions(&samples_err("gqa", d, "val"), &[f, "question 1", "`structural`"]);
    write(d, f, r#"{"1": {"imageId": "a", "question": "q", "isBalanced": "yes"}}"#);
    assert_mentions(&samples_err("gqa", d, "val"), &[f, "`isBalanced`", "boolean"]);
    write(d, f, "{}");
    assert_mentions(&samples_err("gqa", d, "val"), &[f, "no questions"]);
}

#[test]
fn coco_malformed_inputs() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let f = "dataset_coco.json";
    assert_mentions(&samples_err("coco-captions", d, "test"), &[f, "not found"]);
    write(d, f, "{\"images\": [}");
    assert_mentions(&samples_err("coco-captions", d, "test"), &[f, "malformed JSON"]);
    let img = |cocoid: Value, split: &str, sents: Value| {
        json!({"filepath": "val2014", "filename": "a.jpg", "cocoid": cocoid, "split": split,
               "sentences": sents})
    };
    write(
        d,
        f,
        &json!({"images": [img(json!(1), "test", json!([{"raw": "a"}])),
                           img(json!("2"), "test", json!([{"raw": "b"}]))]})
        .to_string(),
    );
    assert_mentions(&samples_err("coco-captions", d, "test"), &[f, "images[1]", "`cocoid`", "integer"]);
    write(d, f, &json!({"images": [img(json!(1), "test", json!([{"raw": 5}]))]}).to_string());
    assert_mentions(&samples_err("coco-captions", d, "test"), &[f, "images[0]", "sentences[0]", "`raw`"]);
    write(d, f, &json!({"images": [img(json!(1), "test", json!([]))]}).to_string());
    assert_mentions(&samples_err("coco-captions", d, "test"), &[f, "cocoid 1", "`sentences` is empty"]);
    write(d, f, &json!({"images": [img(json!(1), "train", json!([{"raw": "a"}]))]}).to_string());
    assert_mentions(&samples_err("coco-captions", d, "test"), &[f, "split `test` is empty"]);
}

#[test]
fn scoring_needs_matching_outputs() {
    let ds = open("vqav2", &vqa_dir(), &DataOptions::default());
    let s = ds.samples("val").unwrap();
    assert!(ds.score(&s, &outs(&["yes"])).is_err());
    // samples of another data set are rejected clearly
    let other = Sample {
        id: "x".into(),
        image: None,
        prompt: String::new(),
        answer: String::new(),
        eval_prefix: String::new(),
        qtype: None,
        references: vec![],
        extra: Value::Null,
    };
    let e = err_text(ds.score(&[other], &outs(&["a"])).err().unwrap());
    assert!(e.contains("not a VQA v2 sample"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// `memvp score`
// ---------------------------------------------------------------------------------------------

fn scoring(name: &str) -> PathBuf {
    fixtures().join("scoring").join(name)
}

fn memvp_score(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_memvp")).arg("score").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn score_ok(args: &[&str]) -> Value {
    let (code, out, err) = memvp_score(args);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out.lines().count(), 1, "one JSON object on one line: {out}");
    serde_json::from_str(&out).unwrap()
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn same_numbers(got: &Value, want: &Value, what: &str) {
    match want {
        Value::Object(w) => {
            let g = got.as_object().unwrap_or_else(|| panic!("{what}: {got}"));
            assert_eq!(g.len(), w.len(), "{what}: keys of {got} vs {want}");
            for (k, v) in w {
                same_numbers(&g[k], v, &format!("{what}.{k}"));
            }
        }
        Value::Number(n) => close(got.as_f64().unwrap(), n.as_f64().unwrap(), what),
        other => assert_eq!(got, other, "{what}"),
    }
}

#[test]
fn cli_score_matches_expected_outputs() {
    let p = |n: &str| scoring(n).display().to_string();
    // VQA, with and without the questions file
    let exp = read(&scoring("vqa.expected.json"));
    for with_q in [false, true] {
        let mut args = vec![
            "--task".to_string(),
            "vqav2".into(),
            "--gt".into(),
            p("vqa_annotations.json"),
            "--preds".into(),
            p("vqa_predictions.json"),
        ];
        if with_q {
            args.extend(["--questions".into(), p("vqa_questions.json")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let got = score_ok(&args);
        for k in ["overall", "perAnswerType", "perQuestionType", "perQuestion"] {
            same_numbers(&got[k], &exp[k], k);
        }
    }
    // GQA
    let exp = read(&scoring("gqa.expected.json"));
    let got = score_ok(&["--task", "gqa", "--gt", &p("gqa_questions.json"), "--preds", &p("gqa_predictions.json")]);
    for k in [
        "accuracy",
        "binary",
        "open",
        "accuracyPerStructuralType",
        "accuracyPerSemanticType",
        "questionsPerStructuralType",
        "questionsPerSemanticType",
    ] {
        same_numbers(&got[k], &exp[k], k);
    }
    // COCO captions
    let exp = read(&scoring("captions.expected.json"));
    let got = score_ok(&[
        "--task",
        "coco-captions",
        "--gt",
        &p("captions_gt.json"),
        "--preds",
        &p("captions_predictions.json"),
    ]);
    for k in ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "num_images"] {
        same_numbers(&got[k], &exp[k], k);
    }
    assert_eq!(got["not_computed"], json!(["METEOR", "SPICE"]));
}

#[test]
fn cli_score_errors_name_the_file() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let gt = scoring("vqa_annotations.json").display().to_string();
    let check = |args: &[&str], parts: &[&str]| {
        let (code, out, err) = memvp_score(args);
        assert_ne!(code, 0, "{args:?} succeeded: {out}");
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.starts_with("error: "), "{err}");
        for p in parts {
            assert!(err.contains(p), "`{p}` not in: {err}");
        }
    };
    // missing file
    let missing = d.join("missing.json").display().to_string();
    check(&["--task", "vqav2", "--gt", &gt, "--preds", &missing], &[&missing, "cannot read"]);
    check(&["--task", "gqa", "--gt", &missing, "--preds", &missing], &[&missing]);
    // malformed JSON
    let bad = write(d, "bad.json", "[{\"question_id\": 1,").display().to_string();
    check(&["--task", "vqav2", "--gt", &gt, "--preds", &bad], &[&bad, "malformed JSON"]);
    // wrong types
    let wrong = write(d, "wrong.json", r#"[{"question_id": 458752000, "answer": 3}]"#).display().to_string();
    check(&["--task", "vqav2", "--gt", &gt, "--preds", &wrong], &[&wrong, "'answer' must be a string"]);
    let wrong_gt = write(d, "wrong_gt.json", r#"{"annotations": 5}"#).display().to_string();
    check(&["--task", "vqav2", "--gt", &wrong_gt, "--preds", &wrong], &[&wrong_gt, "'annotations' must be an array"]);
    let cap_preds = write(d, "cap.json", r#"[{"image_id": 1, "caption": ["a"]}]"#).display().to_string();
    let cap_gt = scoring("captions_gt.json").display().to_string();
    check(
        &["--task", "coco-captions", "--gt", &cap_gt, "--preds", &cap_preds],
        &[&cap_preds, "'caption' must be a string"],
    );
    let gqa_preds = write(d, "g.json", r#"{"questionId": "1"}"#).display().to_string();
    let gqa_gt = scoring("gqa_questions.json").display().to_string();
    check(&["--task", "gqa", "--gt", &gqa_gt, "--preds", &gqa_preds], &[&gqa_preds, "expected an array"]);
    // --questions with a task that does not use it
    check(
        &["--task", "gqa", "--gt", &gqa_gt, "--preds", &gqa_preds, "--questions", &gqa_gt],
        &["--questions is only used with --task vqav2"],
    );
}
