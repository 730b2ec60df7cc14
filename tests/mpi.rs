//! Data-parallel training and sharded evaluation under a real `mpirun` (Open MPI): N ranks give
//! the adapter of one process bit for bit, a run resumes on another number of ranks, a rank that
//! dies or fails ends the job with its rank named, ranks given different runs are refused, and
//! `eval` over N ranks writes the files one process writes. Built only with `--features mpi`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().to_string()
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_memvp")
}

/// A shapes VQA set with `n` training images (two questions each) and one test image.
fn shapes(dir: &Path, n: usize) -> PathBuf {
    memvp::data::synthetic::write_shapes(&dir.join("data"), n, 1, 32, 7).unwrap()
}

/// `train` arguments for the tiny models; `accum` micro-batches of 2 per rank and step.
fn train_args(data: &Path, out: &Path, accum: usize, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--vision",
        "random:tiny",
        "--lm",
        &s(fixtures().join("llama_gqa_tied")),
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
        "--epochs",
        "2",
        "--warmup-epochs",
        "0.5",
        "--accum-steps",
        &accum.to_string(),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn mpirun_cmd(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &ranks.to_string()])
        // CI runs as root; Open MPI refuses that unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Containers often forbid the cross-memory attach that the shared-memory transport
        // tries first.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null());
    c
}

/// `memvp ARGS` on `ranks` ranks (or as a plain process when `ranks` is 0).
fn run(ranks: usize, args: &[String]) -> Output {
    let out = if ranks == 0 {
        Command::new(bin()).args(args).env("RAYON_NUM_THREADS", "1").stdin(Stdio::null()).output()
    } else {
        mpirun_cmd(ranks).arg(bin()).args(args).output()
    };
    out.expect("cannot start mpirun (is Open MPI installed?)")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "failed ({:?}):\n{}", o.status, text(&o));
    o
}

fn adapter(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("adapter_model.safetensors")).unwrap()
}

fn losses(run: &Path) -> Vec<(u64, String, u64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].to_string(), v["world_size"].as_u64().unwrap())
        })
        .collect()
}

#[test]
fn ranks_train_the_adapter_of_one_process_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    // 20 images x 2 questions = 20 micro-batches of 2 per epoch; 6 per step: the last step of
    // each epoch has 2, which 3 ranks split as 2 / 0 / 0.
    let data = shapes(dir.path(), 20);
    let one = dir.path().join("one");
    ok(run(0, &train_args(&data, &one, 6, &[])));
    let reference = adapter(&one);
    let ref_losses: Vec<String> = losses(&one).into_iter().map(|x| x.1).collect();
    assert_eq!(ref_losses.len(), 8);
    for (ranks, accum) in [(1, 6), (2, 3), (3, 2)] {
        let out = dir.path().join(format!("np{ranks}"));
        let o = ok(run(ranks, &train_args(&data, &out, accum, &[])));
        assert_eq!(adapter(&out), reference, "{ranks} ranks gave another adapter:\n{}", text(&o));
        let l = losses(&out);
        assert_eq!(l.iter().map(|x| x.1.clone()).collect::<Vec<_>>(), ref_losses, "{ranks} ranks: other losses");
        assert!(l.iter().all(|x| x.2 == ranks as u64), "world_size in metrics.jsonl");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap()).unwrap();
        assert_eq!(summary["world_size"], ranks);
        // Rank 0 alone wrote: one set of checkpoints, no stray temporaries.
        let names: Vec<String> =
            std::fs::read_dir(out.join("checkpoints")).unwrap().map(|e| s(e.unwrap().file_name())).collect();
        assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
    }
}

#[test]
fn a_run_resumes_on_another_number_of_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(dir.path(), 20);
    let one = dir.path().join("one");
    ok(run(0, &train_args(&data, &one, 6, &[])));
    let run_dir = dir.path().join("moved");
    // 3 steps on 2 ranks, then the rest on 3 ranks, then nothing left for 1 process.
    ok(run(2, &train_args(&data, &run_dir, 3, &["--max-steps", "3"])));
    let o = ok(run(3, &train_args(&data, &run_dir, 2, &["--resume"])));
    assert!(text(&o).contains("resuming from"), "{}", text(&o));
    assert_eq!(adapter(&run_dir), adapter(&one), "resumed on 3 ranks: another adapter");
    let ws: Vec<u64> = losses(&run_dir).into_iter().map(|x| x.2).collect();
    assert_eq!(ws, vec![2, 2, 2, 3, 3, 3, 3, 3]);
    // Another global batch is refused, naming the setting.
    let o = run(2, &train_args(&data, &run_dir, 2, &["--resume", "--epochs", "3"]));
    assert!(!o.status.success());
    assert!(text(&o).contains("optim.accum_steps"), "{}", text(&o));
}

/// The pid of `rank` of the memvp processes writing `out`.
fn rank_pid(out: &Path, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = s(e.file_name()).parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.starts_with(bin()) || !cmd.contains(&s(out)) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        if env.split('\0').any(|kv| kv == format!("OMPI_COMM_WORLD_RANK={rank}")) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(dir.path(), 20);
    let out = dir.path().join("killed");
    let mut args = train_args(&data, &out, 1, &["--save-every", "1"]);
    // Long enough to still be running when the kill comes.
    *args.iter_mut().skip_while(|a| *a != "--epochs").nth(1).unwrap() = "5000".into();
    let mut child = mpirun_cmd(2).arg(bin()).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    let steps_saved = || {
        std::fs::read_dir(out.join("checkpoints"))
            .map(|d| d.flatten().filter(|e| s(e.file_name()).starts_with("step-")).count())
            .unwrap_or(0)
    };
    while steps_saved() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no third checkpoint");
        if child.try_wait().unwrap().is_some() {
            panic!("the job ended early:\n{}", text(&child.wait_with_output().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = rank_pid(&out, 1).expect("rank 1's process");
    let killed = Instant::now();
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let o = child.wait_with_output().unwrap();
    let took = killed.elapsed();
    assert!(!o.status.success());
    assert!(took < Duration::from_secs(30), "the job took {took:?} to end after the kill");
    let t = text(&o);
    assert!(t.contains("rank 1") && (t.contains("signal 9") || t.contains("Killed")), "{t}");
    // The newest checkpoint is complete; the run continues from it (on one process, with the
    // same global batch of 2 micro-batches).
    let mut a = args.clone();
    *a.iter_mut().skip_while(|x| *x != "--accum-steps").nth(1).unwrap() = "2".into();
    let done = memvp_steps(&out);
    a.extend(["--resume", "--max-steps", &(done + 3).to_string()].map(String::from));
    let o = ok(run(0, &a));
    assert!(text(&o).contains("resuming from"), "{}", text(&o));
    assert_eq!(memvp_steps(&out), done + 3);
}

/// The newest checkpoint's step.
fn memvp_steps(run: &Path) -> u64 {
    std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter_map(|e| s(e.file_name()).strip_prefix("step-").and_then(|x| x.parse().ok()))
        .max()
        .unwrap()
}

#[test]
fn a_rank_that_fails_ends_the_job_naming_the_rank() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(dir.path(), 6);
    // Rank 1 reads a copy of the data whose second image is not an image (the image check is
    // shared: rank r decodes every other distinct image from the r-th, so rank 1 meets it).
    let bad = dir.path().join("bad");
    copy_dir(data.parent().unwrap(), &bad);
    let bad_data = bad.join(data.file_name().unwrap());
    let first_image = nth_png(&bad, 1);
    std::fs::write(&first_image, b"not a png").unwrap();
    let out = dir.path().join("run");
    let t0 = Instant::now();
    let o = mpmd(&train_args(&data, &out, 1, &[]), &train_args(&bad_data, &out, 1, &[]));
    assert!(!o.status.success());
    assert!(t0.elapsed() < Duration::from_secs(60));
    let t = text(&o);
    assert!(t.contains("rank 1 of 2: ") && t.contains(&s(first_image.file_name().unwrap())), "{t}");
    assert!(t.contains("cannot decode"), "{t}");
}

#[test]
fn ranks_given_different_runs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(dir.path(), 6);
    let out = dir.path().join("run");
    let o = mpmd(&train_args(&data, &out, 1, &[]), &train_args(&data, &out, 1, &["--lr", "0.5"]));
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("rank 1 differs from rank 0") && t.contains("optim.lr"), "{t}");
    assert!(!out.join("checkpoints").exists(), "nothing may be trained");
}

/// Rank 0 runs `a`, rank 1 runs `b` (Open MPI's MPMD syntax).
fn mpmd(a: &[String], b: &[String]) -> Output {
    let mut c = mpirun_cmd(1);
    c.arg(bin()).args(a).args([":", "-np", "1", bin()]).args(b);
    c.output().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// The `n`-th training image under `dir` (by name).
fn nth_png(dir: &Path, n: usize) -> PathBuf {
    let mut all = Vec::new();
    fn walk(d: &Path, all: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), all);
            } else if s(e.file_name()).starts_with("train_") {
                all.push(e.path());
            }
        }
    }
    walk(dir, &mut all);
    all.sort();
    all.into_iter().nth(n).expect("a png")
}

#[test]
fn eval_over_ranks_writes_what_one_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(dir.path(), 10);
    let run_dir = dir.path().join("run");
    ok(run(0, &train_args(&data, &run_dir, 1, &["--max-steps", "3"])));
    let eval = |ranks: usize, out: &Path| {
        let a: Vec<String> = [
            "eval",
            "--run",
            &s(&run_dir),
            "--data",
            &format!("jsonl:{}", data.display()),
            "--split",
            "train",
            "--batch-size",
            "3",
            "--out",
            &s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        ok(run(ranks, &a))
    };
    let one = dir.path().join("eval1");
    eval(0, &one);
    for ranks in [2, 3] {
        let out = dir.path().join(format!("eval{ranks}"));
        let o = eval(ranks, &out);
        for f in ["preds.json", "eval.json"] {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(one.join(f)).unwrap(),
                "{f} from {ranks} ranks differs:\n{}",
                text(&o)
            );
        }
        // One report, from rank 0.
        assert_eq!(String::from_utf8_lossy(&o.stdout).matches("wrote ").count(), 1, "{}", text(&o));
    }
}

#[test]
fn a_signal_to_mpirun_stops_every_rank_at_one_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(dir.path(), 20);
    let out = dir.path().join("stopped");
    let mut args = train_args(&data, &out, 1, &[]);
    *args.iter_mut().skip_while(|a| *a != "--epochs").nth(1).unwrap() = "5000".into();
    let mut child = mpirun_cmd(2).arg(bin()).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    let lines = || std::fs::read_to_string(out.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
    while lines() < 5 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        assert!(child.try_wait().unwrap().is_none(), "the job ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    let last = losses(&out).last().unwrap().0;
    assert_eq!(memvp_steps(&out), last, "the checkpoint is of the last logged step:\n{t}");
    assert!(t.contains("stopped by SIG"), "{t}");
    // It continues.
    let mut a = args.clone();
    a.extend(["--resume", "--max-steps", &(last + 2).to_string()].map(String::from));
    ok(run(2, &a));
    assert_eq!(memvp_steps(&out), last + 2);
}
