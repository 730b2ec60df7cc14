//! Runs that cannot be lost, mixed up or corrupted, and no input that gets a panic or a silent
//! wrong answer: one test per defect of the reliability issue (the failing command, then the
//! expected message and exit code), a signal test, a concurrent-writer test and a property-style
//! test of random flag values and random bytes. Tiny models throughout.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn lm_dir() -> PathBuf {
    fixtures().join("llama_gqa_tied")
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().to_string()
}

/// A rendered shapes VQA set with `n` training images (two questions each) and one test image.
fn shapes(dir: &Path, n: usize) -> PathBuf {
    memvp::data::synthetic::write_shapes(&dir.join("data"), n, 1, 32, 7).unwrap()
}

fn memvp<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .expect("cannot run memvp")
}

/// `train` with the tiny setup (4 steps unless `extra` says otherwise), `extra` appended.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--vision",
        "random:tiny",
        "--lm",
        &s(lm_dir()),
        "--data",
        &format!("jsonl:{}", data.display()),
        "--out",
        &s(out),
        "--max-len",
        "64",
        "--slots",
        "16",
        "--hidden-proj",
        "8",
        "--vision-adapter-dim",
        "4",
        "--batch-size",
        "2",
        "--seed",
        "5",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    if !extra.iter().any(|x| *x == "--max-steps" || *x == "--epochs") {
        v.extend(["--max-steps", "4"].map(String::from));
    }
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    memvp(&train_args(data, out, extra))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> &Output {
    assert!(
        o.status.success(),
        "failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
    o
}

/// A failure with exit code 1 (never a panic's 101), every needle in stderr.
fn fails(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1; stderr:\n{err}");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr does not mention `{n}`:\n{err}");
    }
    err
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

// 1. Resume checks what it resumes.
#[test]
fn resume_refuses_other_models_data_and_settings_listing_each() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let other_data = memvp::data::synthetic::write_shapes(&tmp.path().join("other"), 3, 1, 32, 8).unwrap();
    let run = tmp.path().join("run");
    ok(&train(&data, &run, &["--max-steps", "2", "--epochs", "9"]));
    let before = read(&run.join("adapter_config.json"));
    let o = train(
        &data,
        &run,
        &["--max-steps", "4", "--epochs", "9", "--resume", "--visual-scale", "0.5", "--image-blind"],
    );
    fails(&o, &["refusing to resume", "memvp.visual_scale", "method.image_blind"]);
    let mut a = train_args(&other_data, &run, &["--max-steps", "4", "--epochs", "9", "--resume"]);
    a.extend(["--split", "test"].map(String::from));
    fails(&memvp(&a), &["refusing to resume", "data.source", "data.split"]);
    let mut a = train_args(&data, &run, &["--max-steps", "4", "--epochs", "9", "--resume"]);
    let i = a.iter().position(|x| x == "--lm").unwrap();
    a[i + 1] = s(fixtures().join("llama_rope_parameters"));
    fails(&memvp(&a), &["refusing to resume", "base.lm_sha256"]);
    // Nothing was rewritten by the refused resumes; a resume with what may change goes on.
    assert_eq!(read(&run.join("adapter_config.json")), before);
    ok(&train(
        &data,
        &run,
        &["--max-steps", "4", "--epochs", "9", "--resume", "--log-every", "1", "--keep-checkpoints", "5"],
    ));
}

// 1b. A resume of a finished run changes nothing.
#[test]
fn resume_of_a_finished_run_is_a_no_op() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let run = tmp.path().join("run");
    ok(&train(&data, &run, &[]));
    let files =
        ["train_summary.json", "adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "config.toml"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| read(&run.join(f))).collect();
    let o = ok(&train(&data, &run, &["--resume"])).clone();
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to do"), "{}", String::from_utf8_lossy(&o.stdout));
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(&read(&run.join(f)), b, "{f} changed");
    }
}

// 1c. An unreadable newest checkpoint: fall back to the previous one, and say so.
#[test]
fn resume_falls_back_from_an_unreadable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let run = tmp.path().join("run");
    ok(&train(&data, &run, &["--max-steps", "3", "--epochs", "9", "--save-every", "1"]));
    std::fs::write(run.join("checkpoints/step-00000003/optimizer.safetensors"), b"garbage").unwrap();
    let o = ok(&train(&data, &run, &["--max-steps", "4", "--epochs", "9", "--save-every", "1", "--resume"])).clone();
    let err = stderr(&o);
    assert!(err.contains("step-00000003") && err.contains("unreadable") && err.contains("step 2"), "{err}");
}

// 2. Two writers: the second is refused, naming the holder's PID.
#[test]
fn a_second_writer_is_refused_with_the_holders_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(run.join(".lock")).unwrap();
    lock.lock().unwrap();
    std::fs::write(run.join(".lock"), b"424242").unwrap();
    fails(&train(&data, &run, &[]), &["another memvp process (PID 424242)"]);
    assert!(!run.join("metrics.jsonl").exists() && !run.join("config.toml").exists());
    drop(lock);
    // Released (as when the holder dies): the run goes on.
    ok(&train(&data, &run, &[]));
}

// 2b. The same with two real processes.
#[test]
fn two_concurrent_trains_into_one_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let run = tmp.path().join("run");
    let mut first = Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(train_args(&data, &run, &["--max-steps", "400", "--epochs", "400"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !run.join("metrics.jsonl").is_file() {
        assert!(first.try_wait().unwrap().is_none(), "the first run ended early");
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = train(&data, &run, &["--overwrite"]);
    fails(&o, &[&format!("PID {}", first.id())]);
    first.kill().unwrap();
    first.wait().unwrap();
}

// 3. Trained state is not overwritten without --overwrite.
#[test]
fn a_trained_run_is_not_overwritten_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let run = tmp.path().join("run");
    ok(&train(&data, &run, &[]));
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let adapter = read(&run.join("adapter_model.safetensors"));
    fails(
        &train(&data, &run, &["--seed", "9"]),
        &["already holds a trained run", "adapter_config.json", "--overwrite"],
    );
    assert_eq!(read(&run.join("adapter_model.safetensors")), adapter);
    ok(&train(&data, &run, &["--seed", "9", "--overwrite"]));
    assert_ne!(read(&run.join("adapter_model.safetensors")), adapter);
    let o = train(&data, &run, &["--resume", "--overwrite"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
}

// 4. Temporaries of a killed writer never block a restart and are cleaned.
#[test]
fn stale_temporaries_are_removed_and_never_block_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let run = tmp.path().join("run");
    let half = run.join("checkpoints/.step-00000001.tmp-999999");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("state.json"), b"{").unwrap();
    std::fs::write(run.join(".adapter_config.json.999999.tmp"), vec![0u8; 1 << 16]).unwrap();
    fails(&train(&data, &run, &["--resume"]), &["no checkpoint found"]);
    ok(&train(&data, &run, &[]));
    assert!(!half.exists() && !run.join(".adapter_config.json.999999.tmp").exists());
}

// 5. SIGINT finishes the step, checkpoints, exits 130; --resume gives the uninterrupted result.
#[test]
fn sigint_checkpoints_and_resume_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let flags = ["--max-steps", "150", "--epochs", "60", "--blr", "0.5"];
    ok(&train(&data, &a, &flags));
    let mut child = Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(train_args(&data, &b, &flags))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let n = std::fs::read_to_string(b.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(2));
    }
    let k = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(k.success());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "exit code after SIGINT; stderr:\n{err}");
    assert!(err.contains("SIGINT") && err.contains("--resume"), "{err}");
    let steps = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap().lines().count();
    assert!(steps < 150, "finished before the signal arrived");
    assert!(b.join(format!("checkpoints/step-{steps:08}/state.json")).is_file(), "no checkpoint of step {steps}");
    ok(&train(&data, &b, &[&flags[..], &["--resume"]].concat()));
    assert_eq!(read(&a.join("adapter_model.safetensors")), read(&b.join("adapter_model.safetensors")));
}

/// A PNG whose header is valid and whose pixel data is not (the deflate stream is garbled).
fn corrupt_pixels(from: &Path, to: &Path) {
    let mut b = read(from);
    let i = b.windows(4).position(|w| w == b"IDAT").unwrap();
    for x in &mut b[i + 6..i + 30] {
        *x ^= 0x5a;
    }
    std::fs::write(to, b).unwrap();
}

// 6. Corrupt pixel data is found up front; --skip-bad-images skips it in training and eval.
#[test]
fn images_with_corrupt_pixel_data_are_found_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let dir = data.parent().unwrap();
    let first: Value = serde_json::from_str(std::fs::read_to_string(&data).unwrap().lines().next().unwrap()).unwrap();
    let img = dir.join(first["image"].as_str().unwrap());
    corrupt_pixels(&img.clone(), &img);
    let run = tmp.path().join("run");
    fails(&train(&data, &run, &[]), &[&s(img.file_name().unwrap()), "--skip-bad-images"]);
    assert!(!run.join("metrics.jsonl").exists(), "training started before the image was checked");
    let o = ok(&train(&data, &run, &["--skip-bad-images"])).clone();
    assert!(stderr(&o).contains("skipping a sample"), "{}", stderr(&o));
    let sum: Value = serde_json::from_slice(&read(&run.join("train_summary.json"))).unwrap();
    assert_eq!(sum["skipped_images"], 2, "two questions per image");
    // Evaluation on the training split (it holds the bad image) with a run trained without the
    // flag (on the test split): up front without the flag, skipped and counted with it.
    let run = tmp.path().join("clean");
    ok(&train(&data, &run, &["--split", "test"]));
    let ev = |extra: &[&str]| {
        let mut a: Vec<String> =
            ["eval", "--run", &s(&run), "--data", &format!("jsonl:{}", data.display()), "--split", "train"]
                .iter()
                .map(|x| x.to_string())
                .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        memvp(&a)
    };
    fails(&ev(&[]), &[&s(img.file_name().unwrap())]);
    ok(&ev(&["--skip-bad-images"]));
    let e: Value = serde_json::from_slice(&read(&run.join("eval.json"))).unwrap();
    assert_eq!(e["skipped_images"], 2, "{e}");
}

// 7 + 10. Every setting validated before any work, naming the flag or key.
#[test]
fn out_of_range_settings_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let run = tmp.path().join("run");
    let cases: &[(&[&str], &[&str])] = &[
        (&["--lr", "-0.5"], &["optim.lr", "--lr", "above 0"]),
        (&["--clip-grad", "-1"], &["--clip-grad"]),
        (&["--clip-grad", "nan"], &["--clip-grad", "finite"]),
        (&["--lr", "nan"], &["--lr", "finite"]),
        (&["--lr", "inf"], &["--lr", "finite"]),
        (&["--blr", "nan"], &["--blr"]),
        (&["--warmup-epochs", "nan"], &["--warmup-epochs"]),
        (&["--warmup-epochs", "-1"], &["--warmup-epochs"]),
        (&["--memory-dropout", "1.5"], &["--memory-dropout", "[0, 1)"]),
        (&["--beta2", "1"], &["--beta2"]),
        (&["--max-train-samples", "0"], &["--max-train-samples"]),
        (&["--lr", "0.1", "--blr", "0.1"], &["--lr and --blr"]),
        (&["--hidden-proj", "0"], &["--hidden-proj"]),
        (&["--method", "lora", "--lora-rank", "0"], &["--lora-rank"]),
        (&["--method", "input-space", "--hidden-proj", "0"], &["hidden_proj"]),
        (&["--batch-size", "0"], &["--batch-size"]),
        (&["--memory-sites", "encoder"], &["memory sites", "decoder-only"]),
        (&["--method", "nope"], &["unknown method `nope`"]),
        (&["--norm", "pink"], &["unknown variant `pink`"]),
    ];
    for (flags, needles) in cases {
        let o = train(&data, &run, flags);
        fails(&o, needles);
        assert!(!run.join("metrics.jsonl").exists() && !run.join("checkpoints").exists(), "{flags:?} trained");
    }
    let toml = tmp.path().join("c.toml");
    std::fs::write(&toml, "[optim]\nlr = -0.5\n").unwrap();
    fails(&train(&data, &run, &["--config", &s(&toml)]), &["optim.lr"]);
    std::fs::write(&toml, "[optim]\nlr = nan\n").unwrap();
    fails(&train(&data, &run, &["--config", &s(&toml)]), &["c.toml", "optim.lr", "finite"]);
    std::fs::write(&toml, "[optim]\nlearning_rate = 0.1\n").unwrap();
    fails(&train(&data, &run, &["--config", &s(&toml)]), &["c.toml", "learning_rate"]);
    // Generation flags.
    let g = |extra: &[&str]| {
        let mut a = vec!["generate".to_string(), "--lm".into(), s(lm_dir()), "--prompt".into(), "hello".into()];
        a.extend(extra.iter().map(|x| x.to_string()));
        memvp(&a)
    };
    fails(&g(&["--temperature", "-1"]), &["--temperature"]);
    fails(&g(&["--temperature", "nan"]), &["--temperature"]);
    fails(&g(&["--top-p", "0"]), &["--top-p"]);
    fails(&g(&["--top-p", "1.5"]), &["--top-p"]);
    fails(&g(&["--num-beams", "0"]), &["--num-beams"]);
    fails(&g(&["--num-beams", "2", "--temperature", "0.7"]), &["beam search does not sample"]);
}

// 8. An answer that does not fit is an error naming the sample, unless truncation is asked for.
#[test]
fn answers_longer_than_the_lm_allows_are_named_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let long = data.parent().unwrap().join("long.jsonl");
    let mut text = std::fs::read_to_string(&data).unwrap();
    let answer = "red ".repeat(300);
    text.push_str(&format!(
        "{{\"id\": \"long-one\", \"question\": \"what?\", \"answer\": \"{answer}\", \"split\": \"train\"}}\n"
    ));
    std::fs::write(&long, text).unwrap();
    let run = tmp.path().join("run");
    fails(&train(&long, &run, &[]), &["long-one", "--truncate-answers", "64 tokens"]);
    assert!(!run.join("metrics.jsonl").exists());
    ok(&train(&long, &run, &["--truncate-answers"]));
}

// 9. Zero sizes and degenerate shapes are errors, not panics.
#[test]
fn degenerate_sizes_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = s(tmp.path().join("q"));
    for flags in [["--batch-size", "0"], ["--lm-hidden", "0"], ["--lm-hidden", "6"], ["--steps", "0"]] {
        let mut a = vec!["quickstart", "--out", &out];
        a.extend(flags);
        fails(&memvp(&a), &[flags[0]]);
    }
    for flags in [
        vec!["--lm-heads", "0"],
        vec!["--lm-kv-heads", "0"],
        vec!["--text-tokens", "0"],
        vec!["--answer-tokens", "70", "--text-tokens", "64"],
    ] {
        let mut a = vec!["bench", "--skip-fwd-bwd"];
        a.extend(flags.iter().copied());
        fails(&memvp(&a), &[flags[0]]);
    }
}

// 11. Generation at the position limit returns what it generated, saying why it stopped.
#[test]
fn generation_at_the_position_limit_returns_its_text() {
    let g = |prompt: &str| {
        memvp(&["generate", "--lm", &s(lm_dir()), "--prompt", prompt, "--max-new-tokens", "5000", "--json"])
    };
    // A prompt that fills every position is refused with the reason.
    fails(&g(&"hello world ".repeat(100)), &["leaves no position"]);
    let o = g(&"hello world ".repeat(20));
    ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let (p, g) = (v["prompt_ids"].as_array().unwrap().len(), v["generated_ids"].as_array().unwrap().len());
    assert!(v["finish_reason"] == "length" || v["finish_reason"] == "stop", "{v}");
    if v["finish_reason"] == "length" {
        assert_eq!(v["stopped_at_position_limit"], true, "{v}");
        assert_eq!(p + g, 257, "positions 0..255 hold the prompt and every fed token");
    }
    assert!(g > 0 && p < 256, "{v}");
}

/// A trained tiny run, for the adapter tests.
fn trained(tmp: &Path) -> (PathBuf, PathBuf) {
    let data = shapes(tmp, 3);
    let run = tmp.join("run");
    ok(&train(&data, &run, &[]));
    (data, run)
}

fn eval(run: &Path, data: &Path, extra: &[&str]) -> Output {
    let mut a: Vec<String> = ["eval", "--run", &s(run), "--data", &format!("jsonl:{}", data.display())]
        .iter()
        .map(|x| x.to_string())
        .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    memvp(&a)
}

// 12. Adapters, evaluation output, files.
#[test]
fn adapters_and_files_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, run) = trained(tmp.path());
    // An output folder that cannot be made: refused before generating anything.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    fails(&eval(&run, &data, &["--out", &s(file.join("sub"))]), &["a-file"]);
    // The adapter's settings section deleted; an unknown top-level key.
    let cfg_path = run.join("adapter_config.json");
    let good = read(&cfg_path);
    let mut v: Value = serde_json::from_slice(&good).unwrap();
    v.as_object_mut().unwrap().remove("memvp");
    std::fs::write(&cfg_path, serde_json::to_vec(&v).unwrap()).unwrap();
    fails(&eval(&run, &data, &[]), &["adapter_config.json", "`memvp` section", "missing"]);
    let mut v: Value = serde_json::from_slice(&good).unwrap();
    v["surprise"] = Value::from(1);
    std::fs::write(&cfg_path, serde_json::to_vec(&v).unwrap()).unwrap();
    fails(&eval(&run, &data, &[]), &["adapter_config.json", "unknown key `surprise`"]);
    // A UTF-8 byte-order mark is not an error.
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend(&good);
    std::fs::write(&cfg_path, bom).unwrap();
    ok(&eval(&run, &data, &[]));
    std::fs::write(&cfg_path, &good).unwrap();
    // NaN in a trained tensor; an unknown tensor.
    let wpath = run.join("adapter_model.safetensors");
    let weights = read(&wpath);
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    let write = |list: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]| {
        let views: Vec<(String, safetensors::tensor::TensorView)> = list
            .iter()
            .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(&wpath, safetensors::serialize(views, None).unwrap()).unwrap();
    };
    let k = owned.iter().position(|t| t.0 == "memory.value_embed").unwrap();
    owned[k].3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    write(&owned);
    fails(&eval(&run, &data, &[]), &["memory.value_embed", "NaN"]);
    owned[k].3[..4].copy_from_slice(&0f32.to_le_bytes());
    owned.push(("lora.layers.0.q_proj.a".into(), safetensors::Dtype::F32, vec![1], vec![0; 4]));
    write(&owned);
    fails(&eval(&run, &data, &[]), &["lora.layers.0.q_proj.a"]);
    std::fs::write(&wpath, &weights).unwrap();
    // The base-model hash covers the tokenizer: a changed tokenizer is refused.
    let lm_copy = tmp.path().join("lm");
    std::fs::create_dir_all(&lm_copy).unwrap();
    for e in std::fs::read_dir(lm_dir()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), lm_copy.join(e.file_name())).unwrap();
    }
    let tj = lm_copy.join("tokenizer.json");
    let mut t: Value = serde_json::from_slice(&read(&tj)).unwrap();
    t["normalizer"] = serde_json::json!({"type": "Lowercase"});
    std::fs::write(&tj, serde_json::to_vec(&t).unwrap()).unwrap();
    fails(&eval(&run, &data, &["--lm", &s(&lm_copy)]), &["tokenizer", "refusing"]);
    // A directory where a file is expected.
    fails(&memvp(&["score", "--task", "gqa", "--gt", &s(tmp.path()), "--preds", &s(&file)]), &["is a directory"]);
}

// 12b. Identical runs write byte-identical adapter files.
#[test]
fn identical_runs_write_identical_adapter_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok(&train(&data, &a, &[]));
    ok(&train(&data, &b, &[]));
    for f in ["adapter_model.safetensors", "adapter_config.json", "checkpoints/step-00000004/optimizer.safetensors"] {
        assert_eq!(read(&a.join(f)), read(&b.join(f)), "{f} differs between identical runs");
    }
}

/// A small deterministic generator for the property test.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.next() as usize % v.len()]
    }
}

// Property: random flag values and random bytes as images, adapters and JSON give exit 0 or a
// clear error (exit 1), never a panic (101).
#[test]
fn random_flags_and_random_bytes_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, run) = trained(tmp.path());
    let mut rng = Lcg(20261201);
    let values =
        ["0", "-1", "1", "2", "0.5", "1e9", "-1e-9", "nan", "inf", "-inf", "", "abc", "3.5", "18446744073709551616"];
    let flags = [
        "--lr",
        "--blr",
        "--min-lr",
        "--warmup-epochs",
        "--weight-decay",
        "--clip-grad",
        "--batch-size",
        "--accum-steps",
        "--epochs",
        "--max-steps",
        "--slots",
        "--hidden-proj",
        "--visual-scale",
        "--adapter-scale",
        "--memory-dropout",
        "--vision-adapter-dim",
        "--vision-layer",
        "--memory-layers",
        "--max-len",
        "--lora-rank",
        "--lora-dropout",
        "--keep-checkpoints",
        "--save-every",
        "--max-train-samples",
        "--beta1",
        "--beta2",
    ];
    let start = Instant::now();
    for i in 0..24 {
        let out = tmp.path().join(format!("p{i}"));
        let (f1, v1, f2, v2) = (rng.pick(&flags), rng.pick(&values), rng.pick(&flags), rng.pick(&values));
        let o = train(&data, &out, &["--max-steps", "1", "--epochs", "2", f1, v1, f2, v2]);
        let err = stderr(&o);
        assert!(matches!(o.status.code(), Some(0) | Some(1) | Some(2)), "{f1} {v1} {f2} {v2}: {:?}\n{err}", o.status);
        assert!(!err.contains("panicked"), "{f1} {v1} {f2} {v2}:\n{err}");
    }
    for i in 0..8 {
        let n = 1 + rng.next() as usize % 300;
        let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        // As an image of the data set.
        let first: Value =
            serde_json::from_str(std::fs::read_to_string(&data).unwrap().lines().next().unwrap()).unwrap();
        let img = data.parent().unwrap().join(first["image"].as_str().unwrap());
        let keep = read(&img);
        let mut png = keep.clone();
        if i % 2 == 0 {
            png = bytes.clone();
        } else {
            let at = 8 + rng.next() as usize % (png.len() - 8);
            png[at..(at + bytes.len()).min(keep.len())].copy_from_slice(&bytes[..(keep.len() - at).min(bytes.len())]);
        }
        std::fs::write(&img, &png).unwrap();
        let o = eval(&run, &data, &["--split", "train"]);
        assert!(matches!(o.status.code(), Some(0) | Some(1)) && !stderr(&o).contains("panicked"), "{}", stderr(&o));
        std::fs::write(&img, &keep).unwrap();
        // As the adapter's files and as the JSON of a run.
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            let p = run.join(f);
            let keep = read(&p);
            std::fs::write(&p, &bytes).unwrap();
            let o = eval(&run, &data, &[]);
            assert_eq!(o.status.code(), Some(1), "{f} of random bytes: {}", stderr(&o));
            assert!(!stderr(&o).contains("panicked"));
            std::fs::write(&p, keep).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(300), "the property test ran too long");
    }
}
