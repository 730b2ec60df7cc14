//! `memvp compare` on the tiny fixtures: three runs (MemVP, input-space + LoRA, the image-blind
//! control) on a rendered shapes set, evaluated during training; the report files; a stopped
//! comparison continues where it was and a finished one does no work.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn compare(spec: &Path, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(["compare", "--spec", &spec.display().to_string(), "--out", &out.display().to_string(), "--json"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `memvp compare` stopped as the first run's second segment starts, as Ctrl-C does: SIGINT to
/// the whole process group (the comparison and the `memvp train` it runs).
fn stopped_after_first_point(spec: &Path, out: &Path) -> Output {
    use std::os::unix::process::CommandExt;
    let child = Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(["compare", "--spec", &spec.display().to_string(), "--out", &out.display().to_string()])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let curve = out.join("runs/memvp/curve.jsonl");
    let t0 = std::time::Instant::now();
    while !curve.exists() {
        assert!(t0.elapsed().as_secs() < 120, "no first point");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let killed = Command::new("kill").args(["-s", "INT", "--", &format!("-{}", child.id())]).status().unwrap();
    assert!(killed.success());
    child.wait_with_output().unwrap()
}

fn spec(dir: &Path, epochs: usize) -> PathBuf {
    let data = memvp::data::synthetic::write_shapes(&dir.join("data"), 12, 3, 32, 7).unwrap();
    let lm = fixtures().join("llama_gqa_tied");
    let text = format!(
        r#"
[base]
model = {{ vision = "random:tiny", lm = "{lm}" }}
data = {{ source = "jsonl:{data}", max_len = 64 }}
optim = {{ epochs = {epochs}, batch_size = 4, warmup_epochs = 0.5, seed = 3 }}
memvp = {{ slots = 16, hidden_proj = 8, vision_adapter_dim = 4 }}
input_space = {{ hidden_proj = 8 }}

[compare]
eval_every = 4
eval_samples = 6
eval_split = "test"
final_split = "test"
eval_batch_size = 3

[[runs]]
name = "memvp"
settings = {{ method = {{ name = "memvp" }}, optim = {{ lr = 1e-3 }} }}

[[runs]]
name = "input-space+lora"
settings = {{ method = {{ name = "input-space" }}, optim = {{ lr = 2e-3 }} }}

[[runs]]
name = "control"
settings = {{ method = {{ name = "memvp", image_blind = true }}, optim = {{ lr = 1e-3 }} }}
"#,
        lm = lm.display(),
        data = data.display(),
        epochs = epochs
    );
    let p = dir.join("compare.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn three_methods_are_compared_and_a_rerun_does_no_work() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 2);
    let out = dir.path().join("cmp");
    let o = compare(&spec, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    // 24 training questions in batches of 4: 6 steps per epoch, 12 in all; points at 4, 8, 12.
    for run in runs {
        let steps: Vec<u64> = run["curve"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, vec![4, 8, 12], "{}", run["name"]);
        let secs: Vec<f64> =
            run["curve"].as_array().unwrap().iter().map(|p| p["train_seconds"].as_f64().unwrap()).collect();
        assert!(secs.windows(2).all(|w| w[1] > w[0]) && secs[0] > 0.0, "{secs:?}");
        assert_eq!(run["samples"], 48);
        assert!(run["final_eval"]["accuracy"].as_f64().is_some());
        assert_eq!(run["final_eval"]["n"], 6, "3 test images x 2 questions");
        assert!(run["peak_rss_mb"].as_f64().unwrap() > 1.0);
        // Each segment records the machine's speed before it, so sittings can be compared.
        let speeds: Vec<f64> =
            run["curve"].as_array().unwrap().iter().map(|p| p["machine_gflops"].as_f64().unwrap()).collect();
        assert!(speeds.iter().all(|&g| g > 0.1), "{speeds:?}");
        let (lo, hi) = (run["machine_gflops"][0].as_f64().unwrap(), run["machine_gflops"][1].as_f64().unwrap());
        assert!(lo <= hi && speeds.contains(&lo) && speeds.contains(&hi));
    }
    assert_eq!(runs[1]["method"], "input-space");
    assert_eq!(runs[2]["image_blind"], true);
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(md.contains("| input-space+lora | input-space |") && md.contains("(image-blind)"), "{md}");
    assert!(md.contains("matrix-product peak measured before the training segments"), "{md}");
    let png = image::open(out.join("compare.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1000, 800));
    // Nothing left to do: no training, the same report.
    let again = compare(&spec, &out);
    assert!(again.status.success());
    let r2: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(r2["runs"], r["runs"]);
    assert!(!String::from_utf8_lossy(&again.stderr).contains("training to step"));
    // A finished run moves to another machine as its result.json and compare-config.toml alone.
    let moved = dir.path().join("moved");
    for run in runs {
        let name = run["name"].as_str().unwrap();
        let to = moved.join("runs").join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["result.json", "compare-config.toml"] {
            std::fs::copy(out.join("runs").join(name).join(f), to.join(f)).unwrap();
        }
    }
    let there = compare(&spec, &moved);
    let e = String::from_utf8_lossy(&there.stderr);
    assert!(there.status.success(), "{e}");
    assert!(!e.contains("training to step") && !e.contains("final evaluation"), "{e}");
    let r3: serde_json::Value = serde_json::from_slice(&there.stdout).unwrap();
    assert_eq!(r3["runs"], r["runs"]);
    assert!(moved.join("compare.png").exists());
    // Other settings for a finished run are refused, not silently reported as the old ones.
    let changed = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("\"memvp\" }, optim = { lr = 1e-3 }", "\"memvp\" }, optim = { lr = 3e-3 }");
    std::fs::write(&spec, changed).unwrap();
    let refused = compare(&spec, &moved);
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(e.contains("run `memvp` finished with other settings"), "{e}");
    // A result carried without its settings cannot be checked against the spec: refused, saying so.
    std::fs::remove_file(moved.join("runs/memvp/compare-config.toml")).unwrap();
    let refused = compare(&spec, &moved);
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(e.contains("but not") && e.contains("compare-config.toml beside it"), "{e}");
}

#[test]
fn a_stopped_comparison_continues_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    // 60 steps per run: still training when the signal comes.
    let spec = spec(dir.path(), 10);
    let out = dir.path().join("cmp");
    let stopped = stopped_after_first_point(&spec, &out);
    let e = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success());
    assert!(e.contains("run the same `memvp compare` command again"), "{e}");
    let o = compare(&spec, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for run in r["runs"].as_array().unwrap() {
        let steps: Vec<u64> = run["curve"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, (1..=15).map(|k| 4 * k).collect::<Vec<u64>>(), "{}", run["name"]);
        assert_eq!(run["samples"], 240, "every step counted once");
    }
}

#[test]
fn a_run_killed_before_its_first_checkpoint_is_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 1);
    let out = dir.path().join("cmp");
    // What SIGKILL during the first segment leaves: the run's log, no checkpoint.
    let run = out.join("runs/memvp");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\":1,\"loss\":2.0}\n").unwrap();
    let o = compare(&spec, &out);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("[memvp] no checkpoint from the earlier attempt: starting it again"), "{e}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let steps: Vec<u64> =
        r["runs"][0]["curve"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![4, 6]);
    assert_eq!(r["runs"][0]["samples"], 24, "the killed attempt's steps are not counted");
}

#[test]
fn a_bad_spec_is_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[compare]\neval_every = 4\neval_samples = 2\n", "no [[runs]]"),
        ("[compare]\neval_every = 0\neval_samples = 2\n[[runs]]\nname = \"a\"\n", "eval_every"),
        ("[compare]\neval_every = 1\neval_samples = 2\n[[runs]]\nname = \"a/b\"\n", "run name `a/b`"),
        ("[compare]\neval_every = 1\neval_samples = 2\n[[runs]]\nname = \"a\"\n[[runs]]\nname = \"a\"\n", "used twice"),
        ("[compare]\neval_every = 1\neval_samples = 2\nevery = 3\n[[runs]]\nname = \"a\"\n", "every"),
    ];
    for (text, needle) in cases {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let o = compare(&p, &dir.path().join("out"));
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{text}: {e}");
        assert!(e.contains(needle) && e.contains("bad.toml"), "{text}: {e}");
    }
}

/// `scripts/compare/carry.sh`, the way a comparison longer than a machine's lease goes through
/// the repository: a run stopped mid-way is saved, restored into another directory and finished
/// there, with the same held-out points and final figures as a run that never moved.
#[test]
fn an_unfinished_run_carried_by_carry_sh_finishes_as_if_never_moved() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 2);
    // MemVP alone: 12 steps, points at 4, 8 and 12.
    let text = std::fs::read_to_string(&spec).unwrap();
    let one = text.split("\n[[runs]]\nname = \"input-space+lora\"").next().unwrap().to_string();
    std::fs::write(&spec, one).unwrap();
    let reference = compare(&spec, &dir.path().join("ref"));
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let reference: serde_json::Value = serde_json::from_slice(&reference.stdout).unwrap();

    let out = dir.path().join("first");
    assert!(!stopped_after_first_point(&spec, &out).status.success());

    let carry = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/compare/carry.sh");
    let sh = |args: &[&Path]| {
        let o = Command::new("bash").arg(&carry).args(args).stdin(Stdio::null()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let res = dir.path().join("results");
    let said = sh(&[Path::new("save"), &out, &res]);
    assert!(said.contains("memvp: unfinished at step"), "{said}");
    // The newest checkpoint only, and nothing of the machine (locks, the binary, logs of evaluations).
    let carried = res.join("memvp/unfinished");
    assert_eq!(std::fs::read_dir(carried.join("checkpoints")).unwrap().count(), 1);
    assert!(carried.join("metrics.jsonl").exists() && carried.join("curve.jsonl").exists());
    assert!(!carried.join(".lock").exists());

    let there = dir.path().join("second");
    let said = sh(&[Path::new("restore"), &res, &there]);
    assert!(said.contains("memvp: restored at step"), "{said}");
    let o = compare(&spec, &there);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("resuming from") && !e.contains("starting it again"), "{e}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (a, b) = (&r["runs"][0], &reference["runs"][0]);
    let points = |run: &serde_json::Value| -> Vec<(u64, f64)> {
        run["curve"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["step"].as_u64().unwrap(), p["accuracy"].as_f64().unwrap()))
            .collect()
    };
    assert_eq!(points(a), points(b));
    assert_eq!(a["samples"], 48, "every step counted once");
    assert_eq!(a["final_eval"], b["final_eval"]);

    // Finished, it is carried as its result: restored elsewhere, it is reported with no work.
    let said = sh(&[Path::new("save"), &there, &res]);
    assert!(said.contains("memvp: finished") && !res.join("memvp/unfinished").exists(), "{said}");
    let third = dir.path().join("third");
    sh(&[Path::new("restore"), &res, &third]);
    let o = compare(&spec, &third);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !e.contains("training to step"), "{e}");
    let r3: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r3["runs"], r["runs"]);
}
