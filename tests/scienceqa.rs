//! ScienceQA in its official layout (`tests/fixtures/scienceqa/`, 12 hand-made problems, see
//! its README): the prompt texts of every format against literal strings written from
//! METHOD.md and the released LaVIN/MemVP prompt code, the official scorer's breakdown on
//! made-up outputs against a hand computation, error messages (library and `memvp train`), and
//! an end-to-end `memvp train` + `memvp eval` smoke run.

use memvp::data::scienceqa::score_scienceqa;
use memvp::data::{self, DataOptions, Dataset, Sample};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    repo().join("tests/fixtures/scienceqa")
}

fn opts(format: &str) -> DataOptions {
    DataOptions { prompt_format: format.into(), ..DataOptions::default() }
}

fn open(dir: &Path, o: &DataOptions) -> anyhow::Result<Box<dyn Dataset>> {
    data::open(&format!("scienceqa:{}", dir.display()), o)
}

fn samples(o: &DataOptions, split: &str) -> Vec<Sample> {
    open(&fixture(), o)
        .unwrap_or_else(|e| panic!("open: {e:#}"))
        .samples(split)
        .unwrap_or_else(|e| panic!("samples({split}): {e:#}"))
}

fn sample<'a>(s: &'a [Sample], pid: &str) -> &'a Sample {
    s.iter().find(|x| x.id == pid).unwrap_or_else(|| panic!("no sample {pid}"))
}

/// `(prompt, target)` of problem `pid` of `split` in `format`.
fn texts(format: &str, split: &str, pid: &str) -> (String, String) {
    let s = samples(&opts(format), split);
    let x = sample(&s, pid);
    (x.prompt.clone(), x.answer.clone())
}

/// A copy of the fixture in a temporary directory, to break.
fn copy_fixture() -> (tempfile::TempDir, PathBuf) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let t = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &t);
            } else {
                std::fs::copy(e.path(), &t).unwrap();
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("scienceqa");
    copy(&fixture(), &dir);
    (tmp, dir)
}

/// Rewrites `problems.json` of a copy after `f` changed it.
fn edit_problems(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("problems.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "message does not mention `{n}`:\n{msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// Prompt texts.

#[test]
fn qcm_a_prompts_are_the_method_md_texts() {
    // Hint with a line break, an image, 2 choices.
    let (p, t) = texts("QCM-A", "train", "1");
    assert_eq!(
        p,
        "Question: Which animal's feet are also adapted for walking on snow?\n\
         Context: Figure: polar bear.\n\
         Polar bears live in cold places. Their wide feet help them walk on snow without sinking.\n\
         Options: (A) sea turtle (B) snowshoe hare\n\
         Response:"
    );
    assert_eq!(t, "The answer is B.");

    // No hint, no image, a question with a line break: context N/A.
    let (p, t) = texts("QCM-A", "train", "3");
    assert_eq!(
        p,
        "Question: Which word would you find on a dictionary page with the following guide words?\n\
         lamb - lend\n\
         Context: N/A\n\
         Options: (A) label (B) leaf\n\
         Response:"
    );
    assert_eq!(t, "The answer is B.");

    // Five choices, answer E.
    let (p, t) = texts("QCM-A", "val", "6");
    assert_eq!(
        p,
        "Question: What is the capital of Ohio?\n\
         Context: Look at the map. Ohio is highlighted.\n\
         Options: (A) Cleveland (B) Cincinnati (C) Dayton (D) Toledo (E) Columbus\n\
         Response:"
    );
    assert_eq!(t, "The answer is E.");
}

#[test]
fn qcm_a_is_the_default_format_and_samples_carry_image_and_eval_prefix() {
    let s = samples(&DataOptions::default(), "train");
    assert_eq!(
        s.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
        ["1", "2", "3", "4", "5"],
        "samples follow pid_splits.json order"
    );
    let x = sample(&s, "2");
    assert_eq!(
        x.prompt,
        "Question: Which of these states is farthest north?\n\
         Context: N/A\n\
         Options: (A) Arizona (B) Louisiana (C) Oregon (D) Georgia\n\
         Response:"
    );
    assert_eq!(x.answer, "The answer is C.");
    assert_eq!(x.eval_prefix, "The answer is");
    assert_eq!(x.image.as_deref(), Some(fixture().join("images/train/2/image.png").as_path()));
    assert!(x.image.as_ref().unwrap().is_file());
    assert_eq!(sample(&s, "3").image, None);
    assert_eq!(sample(&s, "4").image, None);
    assert_eq!(samples(&DataOptions::default(), "val").len(), 1);
    let test = samples(&DataOptions::default(), "test");
    assert_eq!(test.len(), 6);
    assert_eq!(sample(&test, "11").image.as_deref(), Some(fixture().join("images/test/11/image.png").as_path()));
    assert_eq!(open(&fixture(), &DataOptions::default()).unwrap().max_new_tokens(), 1);
}

#[test]
fn cqm_a_puts_the_context_first() {
    let (p, t) = texts("CQM-A", "train", "5");
    assert_eq!(
        p,
        "Context: Mom will bake a cake for the party.\n\
         Question: Which tense does the sentence use?\n\
         Options: (A) past tense (B) future tense\n\
         Response:"
    );
    assert_eq!(t, "The answer is B.");
    let (p, t) = texts("CQM-A", "train", "2");
    assert_eq!(
        p,
        "Context: N/A\n\
         Question: Which of these states is farthest north?\n\
         Options: (A) Arizona (B) Louisiana (C) Oregon (D) Georgia\n\
         Response:"
    );
    assert_eq!(t, "The answer is C.");
}

#[test]
fn qcm_la_puts_the_lecture_before_the_answer_with_escaped_line_breaks() {
    // The released code replaces "\n" in the lecture by the two characters backslash, n.
    let (p, t) = texts("QCM-LA", "train", "4");
    assert_eq!(
        p,
        "Question: Which is a compound?\n\
         Context: Select the substance that is made of two or more elements chemically bonded together.\n\
         Options: (A) helium (B) water (C) neon\n\
         Response:"
    );
    assert_eq!(
        t,
        "All substances are made of atoms.\\nA compound is made of two or more elements bonded \
         together. The answer is B."
    );
    // An empty lecture leaves only the answer sentence (no leading space).
    let (_, t) = texts("QCM-LA", "val", "6");
    assert_eq!(t, "The answer is E.");
}

#[test]
fn qcm_ea_puts_the_solution_before_the_answer() {
    // The solution has a line break (escaped) and a double space (collapsed to one, as the
    // released code's `replace("  ", " ")` does).
    let (p, t) = texts("QCM-EA", "train", "1");
    assert_eq!(p, texts("QCM-A", "train", "1").0);
    assert_eq!(
        t,
        "Look at the picture of the polar bear.\\nThe snowshoe hare has wide feet. Its feet are \
         adapted for walking on snow. The answer is B."
    );
    let (_, t) = texts("QCM-EA", "test", "12");
    assert_eq!(t, "The answer is A.");
}

#[test]
fn use_caption_appends_the_caption_to_the_hint() {
    let o = DataOptions { use_caption: true, ..opts("QCM-A") };
    let s = samples(&o, "train");
    // hint + " " + caption.
    assert_eq!(
        sample(&s, "1").prompt,
        "Question: Which animal's feet are also adapted for walking on snow?\n\
         Context: Figure: polar bear.\n\
         Polar bears live in cold places. Their wide feet help them walk on snow without sinking. \
         A polar bear walks across the snow.\n\
         Options: (A) sea turtle (B) snowshoe hare\n\
         Response:"
    );
    // No hint: the caption alone.
    assert_eq!(
        sample(&s, "2").prompt,
        "Question: Which of these states is farthest north?\n\
         Context: A map of the United States with a compass rose.\n\
         Options: (A) Arizona (B) Louisiana (C) Oregon (D) Georgia\n\
         Response:"
    );
    // No hint and an empty caption: N/A.
    assert!(sample(&s, "3").prompt.contains("\nContext: N/A\n"), "{}", sample(&s, "3").prompt);
    // A hint and no caption entry: the hint alone, no trailing space.
    assert!(
        sample(&s, "5").prompt.contains("\nContext: Mom will bake a cake for the party.\nOptions"),
        "{}",
        sample(&s, "5").prompt
    );
    // Without --use-caption the caption is not used.
    let plain = samples(&opts("QCM-A"), "train");
    assert!(sample(&plain, "2").prompt.contains("\nContext: N/A\n"));
}

#[test]
fn use_caption_without_captions_json_names_the_file() {
    let (_tmp, dir) = copy_fixture();
    std::fs::remove_file(dir.join("captions.json")).unwrap();
    let o = DataOptions { use_caption: true, ..opts("QCM-A") };
    let msg = err_text(open(&dir, &o));
    assert_mentions(&msg, &[&dir.join("captions.json").display().to_string()]);
    // Without --use-caption the file is optional.
    assert_eq!(open(&dir, &opts("QCM-A")).unwrap().samples("test").unwrap().len(), 6);
}

// ---------------------------------------------------------------------------------------------
// Scoring.

/// Made-up generations for the test split, in its order (7, 8, 9, 10, 11, 12).
const OUTPUTS: [(&str, &str); 6] = [
    ("7", " A"),         // 2 choices, answer A (0): correct
    ("8", " C"),         // 4 choices, answer D (3): wrong
    ("9", "no letter"),  // no capital letter: -1, wrong
    ("10", " C."),       // 5 choices, answer C (2): correct
    ("11", " D"),        // 3 choices: D names no choice: -1, wrong
    ("12", "A because"), // 2 choices, answer A (0): correct
];

#[test]
fn scorer_breakdown_matches_a_hand_computation() {
    let ds = open(&fixture(), &DataOptions::default()).unwrap();
    let test = ds.samples("test").unwrap();
    let outputs: Vec<String> =
        test.iter().map(|s| OUTPUTS.iter().find(|(pid, _)| *pid == s.id).unwrap().1.to_string()).collect();
    let r = ds.score(&test, &outputs).unwrap();

    // Hand computation. Test problems (subject, grade, hint?, image?, correct?):
    //   7  natural  grade4  hint  image  correct
    //   8  social   grade6  -     image  wrong
    //   9  language grade9  hint  -      wrong (no letter)
    //   10 natural  grade1  -     -      correct
    //   11 natural  grade12 -     image  wrong (D with 3 choices)
    //   12 social   grade7  -     -      correct
    // NAT {7,10,11} 2/3 = 66.67; SOC {8,12} 1/2 = 50; LAN {9} 0/1 = 0;
    // TXT (hint) {7,9} 1/2 = 50; IMG {7,8,11} 1/3 = 33.33; NO (neither) {10,12} 2/2 = 100;
    // G1-6 {7,8,10} 2/3 = 66.67; G7-12 {9,11,12} 1/3 = 33.33; average 3/6 = 50.
    let expected = [
        ("acc_natural", 66.67),
        ("acc_social", 50.0),
        ("acc_language", 0.0),
        ("acc_has_text", 50.0),
        ("acc_has_image", 33.33),
        ("acc_no_context", 100.0),
        ("acc_grade_1_6", 66.67),
        ("acc_grade_7_12", 33.33),
        ("acc_average", 50.0),
    ];
    for (k, v) in expected {
        let got = r.metrics[k].as_f64().unwrap_or_else(|| panic!("{k}: {}", r.metrics));
        assert!((got - v).abs() < 1e-9, "{k}: {got} != {v}");
    }
    let rows: Vec<(&str, f64, usize)> = vec![
        ("NAT", 200.0 / 3.0, 3),
        ("SOC", 50.0, 2),
        ("LAN", 0.0, 1),
        ("TXT", 50.0, 2),
        ("IMG", 100.0 / 3.0, 3),
        ("NO", 100.0, 2),
        ("G1-6", 200.0 / 3.0, 3),
        ("G7-12", 100.0 / 3.0, 3),
        ("Avg", 50.0, 6),
    ];
    assert_eq!(r.table.len(), rows.len(), "{:?}", r.table);
    for ((name, v, n), (en, ev, enn)) in r.table.iter().zip(rows) {
        assert_eq!(name, en);
        assert!((v - ev).abs() < 1e-9, "{name}: {v} != {ev}");
        assert_eq!(*n, enn, "{name}");
    }
    // preds.json: {pid: choice index}, -1 when no letter names a choice.
    assert_eq!(r.preds, json!({"7": 0, "8": 2, "9": -1, "10": 2, "11": -1, "12": 0}));
    // The free function gives the same.
    let direct = score_scienceqa(&test, &outputs).unwrap();
    assert_eq!(direct.preds, r.preds);
    assert_eq!(direct.metrics, r.metrics);
}

#[test]
fn scorer_leaves_absent_groups_empty() {
    // The val split is one social-science problem of grade 11 with a hint and an image.
    let ds = open(&fixture(), &DataOptions::default()).unwrap();
    let val = ds.samples("val").unwrap();
    let r = ds.score(&val, &[" E".to_string()]).unwrap();
    assert_eq!(r.preds, json!({"6": 4}));
    for k in ["acc_social", "acc_has_text", "acc_has_image", "acc_grade_7_12", "acc_average"] {
        assert_eq!(r.metrics[k].as_f64(), Some(100.0), "{k}: {}", r.metrics);
    }
    for k in ["acc_natural", "acc_language", "acc_no_context", "acc_grade_1_6"] {
        assert!(r.metrics[k].is_null(), "{k} has no samples, so no accuracy: {}", r.metrics);
    }
    let nat = r.table.iter().find(|row| row.0 == "NAT").unwrap();
    assert!(nat.1.is_nan() && nat.2 == 0, "{nat:?}");
}

// ---------------------------------------------------------------------------------------------
// Errors from the library.

#[test]
fn malformed_problems_json_names_the_file() {
    let (_tmp, dir) = copy_fixture();
    let p = dir.join("problems.json");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let msg = err_text(open(&dir, &DataOptions::default()));
    assert_mentions(&msg, &[&p.display().to_string(), "malformed JSON", "line"]);
}

#[test]
fn malformed_pid_splits_json_names_the_file() {
    let (_tmp, dir) = copy_fixture();
    let p = dir.join("pid_splits.json");
    std::fs::write(&p, "{\"train\": [\"1\", ").unwrap();
    let msg = err_text(open(&dir, &DataOptions::default()));
    assert_mentions(&msg, &[&p.display().to_string(), "malformed JSON"]);
}

#[test]
fn wrong_field_types_name_the_problem_and_field() {
    let (_tmp, dir) = copy_fixture();
    let pf = dir.join("problems.json").display().to_string();
    edit_problems(&dir, |v| v["3"]["answer"] = json!("1"));
    let msg = err_text(open(&dir, &DataOptions::default()).unwrap().samples("train"));
    assert_mentions(&msg, &[&pf, "problem 3", "`answer`"]);

    let (_tmp, dir) = copy_fixture();
    let pf = dir.join("problems.json").display().to_string();
    edit_problems(&dir, |v| v["4"]["choices"] = json!("helium, water, neon"));
    let msg = err_text(open(&dir, &DataOptions::default()).unwrap().samples("train"));
    assert_mentions(&msg, &[&pf, "problem 4", "`choices`"]);

    let (_tmp, dir) = copy_fixture();
    let pf = dir.join("problems.json").display().to_string();
    edit_problems(&dir, |v| v["4"]["choices"] = json!(["helium", 2, "neon"]));
    let msg = err_text(open(&dir, &DataOptions::default()).unwrap().samples("train"));
    assert_mentions(&msg, &[&pf, "problem 4", "`choices`"]);

    let (_tmp, dir) = copy_fixture();
    let pf = dir.join("problems.json").display().to_string();
    edit_problems(&dir, |v| v["5"]["hint"] = json!(7));
    let msg = err_text(open(&dir, &DataOptions::default()).unwrap().samples("train"));
    assert_mentions(&msg, &[&pf, "problem 5", "`hint`"]);

    let (_tmp, dir) = copy_fixture();
    let pf = dir.join("problems.json").display().to_string();
    edit_problems(&dir, |v| {
        v["2"].as_object_mut().unwrap().remove("question");
    });
    let msg = err_text(open(&dir, &DataOptions::default()).unwrap().samples("train"));
    assert_mentions(&msg, &[&pf, "problem 2", "`question`"]);

    let (_tmp, dir) = copy_fixture();
    let pf = dir.join("problems.json").display().to_string();
    edit_problems(&dir, |v| v["5"]["answer"] = json!(2));
    let msg = err_text(open(&dir, &DataOptions::default()).unwrap().samples("train"));
    assert_mentions(&msg, &[&pf, "problem 5", "answer 2"]);
}

#[test]
fn split_errors_name_pid_splits_json() {
    let (_tmp, dir) = copy_fixture();
    let sf = dir.join("pid_splits.json");
    let ds = open(&dir, &DataOptions::default()).unwrap();
    let msg = err_text(ds.samples("nope"));
    assert_mentions(&msg, &[&sf.display().to_string(), "nope", "train", "val", "test"]);

    std::fs::write(&sf, r#"{"train": [], "val": ["6"], "test": ["7", "99"]}"#).unwrap();
    let ds = open(&dir, &DataOptions::default()).unwrap();
    let msg = err_text(ds.samples("train"));
    assert_mentions(&msg, &[&sf.display().to_string(), "`train`", "empty"]);
    // A listed id without a problem.
    let msg = err_text(ds.samples("test"));
    assert_mentions(&msg, &["problems.json", "99"]);
}

#[test]
fn unknown_prompt_formats_fail_when_opening() {
    for (f, needle) in [("XYZ", "XYZ"), ("QCM-X", "`X`"), ("ABC-A", "`ABC`")] {
        let msg = err_text(open(&fixture(), &opts(f)));
        assert_mentions(&msg, &["prompt format", needle]);
    }
}

#[test]
fn missing_directory_and_unknown_kind() {
    let msg = err_text(open(Path::new("/nonexistent/scienceqa"), &DataOptions::default()));
    assert_mentions(&msg, &["/nonexistent/scienceqa"]);
    let msg = err_text(data::open("sciencqa:/x", &DataOptions::default()));
    assert_mentions(&msg, &["sciencqa", "scienceqa"]);
}

// ---------------------------------------------------------------------------------------------
// The command line: training-path errors and an end-to-end run.

fn memvp(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("cannot run memvp")
}

fn train_args(data_dir: &Path, out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--vision",
        "random:tiny",
        "--lm",
        &repo().join("tests/fixtures/llama_gqa_tied").display().to_string(),
        "--data",
        &format!("scienceqa:{}", data_dir.display()),
        "--out",
        &out.display().to_string(),
        "--max-steps",
        &steps.to_string(),
        "--batch-size",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exit status non-zero, every needle in stderr, no panic.
fn assert_cli_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected a failure; stdout:\n{}\nstderr:\n{err}", stdout(o));
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    assert_mentions(&err, needles);
}

fn assert_cli_ok(o: &Output) {
    assert!(o.status.success(), "failed; stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o));
}

#[test]
fn train_with_a_missing_image_names_it_unless_skipping() {
    let (tmp, dir) = copy_fixture();
    let img = dir.join("images/train/2/image.png");
    std::fs::remove_file(&img).unwrap();
    let o = memvp(&train_args(&dir, &tmp.path().join("run"), 2, &[]));
    assert_cli_error(&o, &[&img.display().to_string(), "not found", "--skip-bad-images"]);

    let o = memvp(&train_args(&dir, &tmp.path().join("run2"), 2, &["--skip-bad-images"]));
    assert_cli_ok(&o);
    assert!(stdout(&o).contains("1 skipped images"), "the summary should report the skipped image:\n{}", stdout(&o));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("run2/train_summary.json")).unwrap()).unwrap();
    assert_eq!(summary["skipped_images"], 1, "{summary}");
    assert_eq!(summary["train_samples"], 4, "{summary}");
}

#[test]
fn train_with_a_corrupt_png_names_it_unless_skipping() {
    // Garbage bytes: rejected when the images are checked, before training.
    let (tmp, dir) = copy_fixture();
    let img = dir.join("images/train/1/image.png");
    std::fs::write(&img, b"this is not a PNG file, only some garbage bytes\x00\x01\x02").unwrap();
    let o = memvp(&train_args(&dir, &tmp.path().join("run"), 2, &[]));
    assert_cli_error(&o, &[&img.display().to_string(), "image"]);
    let o = memvp(&train_args(&dir, &tmp.path().join("run2"), 2, &["--skip-bad-images"]));
    assert_cli_ok(&o);
    assert!(stdout(&o).contains("1 skipped images"), "{}", stdout(&o));

    // A PNG whose header is intact but whose data is cut: it passes the header check and fails
    // when decoded for a batch.
    let good = std::fs::read(fixture().join("images/train/2/image.png")).unwrap();
    std::fs::write(&img, &good[..good.len() / 2]).unwrap();
    let o = memvp(&train_args(&dir, &tmp.path().join("run3"), 2, &[]));
    assert_cli_error(&o, &[&img.display().to_string(), "image"]);
    let o = memvp(&train_args(&dir, &tmp.path().join("run4"), 2, &["--skip-bad-images"]));
    assert_cli_ok(&o);
}

#[test]
fn train_with_malformed_json_names_the_file() {
    let (tmp, dir) = copy_fixture();
    let p = dir.join("problems.json");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let o = memvp(&train_args(&dir, &tmp.path().join("run"), 2, &[]));
    assert_cli_error(&o, &[&p.display().to_string(), "malformed JSON"]);
}

#[test]
fn train_with_wrong_field_types_names_file_and_field() {
    let (tmp, dir) = copy_fixture();
    edit_problems(&dir, |v| v["3"]["answer"] = json!("1"));
    let o = memvp(&train_args(&dir, &tmp.path().join("run"), 2, &[]));
    let pf = dir.join("problems.json").display().to_string();
    assert_cli_error(&o, &[&pf, "problem 3", "`answer`"]);

    let (tmp, dir) = copy_fixture();
    edit_problems(&dir, |v| v["4"]["choices"] = json!("helium, water, neon"));
    let o = memvp(&train_args(&dir, &tmp.path().join("run"), 2, &[]));
    let pf = dir.join("problems.json").display().to_string();
    assert_cli_error(&o, &[&pf, "problem 4", "`choices`"]);
}

#[test]
fn train_on_an_empty_split_names_it() {
    let (tmp, dir) = copy_fixture();
    let sf = dir.join("pid_splits.json");
    std::fs::write(&sf, r#"{"train": [], "val": ["6"], "test": ["7"]}"#).unwrap();
    let o = memvp(&train_args(&dir, &tmp.path().join("run"), 2, &[]));
    assert_cli_error(&o, &[&sf.display().to_string(), "`train`", "empty"]);
}

#[test]
fn train_with_an_unknown_prompt_format_or_split() {
    let tmp = tempfile::tempdir().unwrap();
    let o = memvp(&train_args(&fixture(), &tmp.path().join("run"), 2, &["--prompt-format", "QCM-X"]));
    assert_cli_error(&o, &["prompt format", "QCM-X"]);
    let o = memvp(&train_args(&fixture(), &tmp.path().join("run"), 2, &["--prompt-format", "QCMA"]));
    assert_cli_error(&o, &["prompt format", "QCMA"]);
    let o = memvp(&train_args(&fixture(), &tmp.path().join("run"), 2, &["--split", "nope"]));
    assert_cli_error(&o, &["pid_splits.json", "`nope`", "train"]);
}

#[test]
fn train_with_use_caption_and_cqm_a() {
    let tmp = tempfile::tempdir().unwrap();
    let o = memvp(&train_args(&fixture(), &tmp.path().join("run"), 2, &["--use-caption", "--prompt-format", "CQM-A"]));
    assert_cli_ok(&o);
    let cfg = std::fs::read_to_string(tmp.path().join("run/config.toml")).unwrap();
    assert!(cfg.contains("CQM-A") && cfg.contains("use_caption = true"), "{cfg}");
}

/// With the default `--max-len 512`, QCM-LA sequences of this fixture (about 260 tokens with
/// the byte-level tokenizer of `llama_gqa_tied`) exceed the LM's 256 positions
/// (`max_position_embeddings`). Training should cap the length at the LM's positions (keeping
/// the answer, as it does for `--max-len`) or refuse before training with a message naming
/// both; it fails at the first step with `position 259 beyond the rope table of 256
/// positions` instead.
#[test]
fn train_qcm_la_longer_than_the_lm_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let o = memvp(&train_args(&fixture(), &tmp.path().join("run"), 2, &["--prompt-format", "QCM-LA"]));
    assert_cli_ok(&o);
}

#[test]
fn train_qcm_la_within_max_len() {
    let tmp = tempfile::tempdir().unwrap();
    let o =
        memvp(&train_args(&fixture(), &tmp.path().join("run"), 2, &["--prompt-format", "QCM-LA", "--max-len", "200"]));
    assert_cli_ok(&o);
}

/// The official scorer's keys (`tools/evaluate_acc.py` of the ScienceQA repository).
const OFFICIAL_KEYS: [&str; 9] = [
    "acc_natural",
    "acc_social",
    "acc_language",
    "acc_has_text",
    "acc_has_image",
    "acc_no_context",
    "acc_grade_1_6",
    "acc_grade_7_12",
    "acc_average",
];

#[test]
fn train_then_eval_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = memvp(&train_args(&fixture(), &run, 3, &[]));
    assert_cli_ok(&o);
    assert!(stdout(&o).contains("trained 3 steps"), "{}", stdout(&o));
    assert!(run.join("adapter_model.safetensors").is_file());

    let o = memvp(
        &[
            "eval",
            "--run",
            &run.display().to_string(),
            "--data",
            &format!("scienceqa:{}", fixture().display()),
            "--split",
            "test",
        ]
        .map(String::from),
    );
    assert_cli_ok(&o);
    let out = stdout(&o);
    eprintln!("{out}");
    // The table: one row per official group, in the official order.
    let rows: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"].contains(w))
        .collect();
    assert_eq!(rows, ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"], "{out}");

    // preds.json: {pid: int} for every test problem, -1 or a valid choice index.
    let preds: Value = serde_json::from_str(&std::fs::read_to_string(run.join("preds.json")).unwrap()).unwrap();
    let preds = preds.as_object().expect("preds.json is an object");
    let n_choices = [("7", 2), ("8", 4), ("9", 3), ("10", 5), ("11", 3), ("12", 2)];
    assert_eq!(preds.len(), n_choices.len(), "{preds:?}");
    for (pid, n) in n_choices {
        let p = preds[pid].as_i64().unwrap_or_else(|| panic!("preds[{pid}] is not an integer: {preds:?}"));
        assert!((-1..n).contains(&p), "preds[{pid}] = {p}");
    }

    // eval.json: the official key names, as numbers in percent.
    let ev: Value = serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    let ev = ev.as_object().expect("eval.json is an object");
    for k in OFFICIAL_KEYS {
        let v = ev
            .get(k)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("eval.json: `{k}` missing or not a number: {ev:?}"));
        assert!((0.0..=100.0).contains(&v), "{k} = {v}");
    }
    // Besides the official keys, only the sample count.
    let extra: Vec<&String> = ev.keys().filter(|k| !OFFICIAL_KEYS.contains(&k.as_str())).collect();
    assert!(extra.iter().all(|k| *k == "n"), "unexpected keys in eval.json: {extra:?}");
    if let Some(n) = ev.get("n") {
        assert_eq!(n, 6);
    }
}

#[test]
fn eval_with_a_missing_image_names_it_unless_skipping() {
    let (tmp, dir) = copy_fixture();
    let run = tmp.path().join("run");
    assert_cli_ok(&memvp(&train_args(&dir, &run, 2, &[])));
    let img = dir.join("images/test/8/image.png");
    std::fs::remove_file(&img).unwrap();
    let eval = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "eval",
            "--run",
            &run.display().to_string(),
            "--data",
            &format!("scienceqa:{}", dir.display()),
            "--split",
            "test",
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        memvp(&a)
    };
    assert_cli_error(&eval(&[]), &[&img.display().to_string(), "not found", "--skip-bad-images"]);
    let o = eval(&["--skip-bad-images", "--json"]);
    assert_cli_ok(&o);
    let r: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(r["skipped_images"], 1, "{r}");
    assert_eq!(r["n"], 5, "{r}");
    let preds: Value = serde_json::from_str(&std::fs::read_to_string(run.join("preds.json")).unwrap()).unwrap();
    assert!(preds.get("8").is_none() && preds.as_object().unwrap().len() == 5, "{preds}");
}

#[test]
fn more_than_26_choices_are_named_as_such() {
    let (_tmp, dir) = copy_fixture();
    let pf = dir.join("problems.json").display().to_string();
    let many: Vec<String> = (0..30).map(|i| format!("choice {i}")).collect();
    edit_problems(&dir, |v| v["4"]["choices"] = json!(many));
    let msg = err_text(open(&dir, &DataOptions::default()).unwrap().samples("train"));
    assert_mentions(&msg, &[&pf, "problem 4", "30 choices", "at most 26"]);
}
