//! Training runs end to end on a tiny rendered data set: the adapter files and their round
//! trip, kill-and-resume equal to an uninterrupted run bit for bit, `metrics.jsonl` and the
//! learning-rate schedule, and the non-finite guard.

mod common;
use candle_core::Device;
use common::*;
use memvp::app::run::{EpochBatches, VlmTask, load_vlm, prepare};
use memvp::app::settings::RunSettings;
use memvp::generate::Sampling;
use memvp::rng::Rng;
use memvp::train::OptimSettings;
use memvp::vlm::Vlm;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LM: &str = "llama_gqa_tied";

fn lm_dir() -> PathBuf {
    fixtures().join(LM)
}

/// A rendered shapes VQA set: `n_images` training images, two questions each.
fn shapes(dir: &Path, n_images: usize) -> PathBuf {
    memvp::data::synthetic::write_shapes(&dir.join("data"), n_images, 1, 32, 7).unwrap()
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().to_string()
}

/// `memvp train` with the tiny setup and small MemVP settings; `extra` flags appended.
fn train_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_memvp"));
    c.args([
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
    ]);
    c.args(extra);
    c
}

fn run_ok(mut c: Command) -> Output {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "memvp failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The tensors of a safetensors file, read with the `safetensors` crate: name → (dtype, shape,
/// raw little-endian bytes).
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A metrics record without the wall-clock field.
/// A metrics record without its timings.
fn deterministic(mut v: Value) -> Value {
    for k in ["samples_per_s", "step_s", "sync_s"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn ckpt(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:08}"))
}

// ---------------------------------------------------------------------------------------------
// a. The adapter files and their round trip.
// ---------------------------------------------------------------------------------------------

#[test]
fn adapter_files_and_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let out = tmp.path().join("run");
    let mut cfg = RunSettings::default();
    cfg.model.vision = "random:tiny".into();
    cfg.model.lm = s(lm_dir());
    cfg.data.source = format!("jsonl:{}", data.display());
    cfg.data.max_len = 64;
    cfg.optim = OptimSettings {
        epochs: 2,
        batch_size: 2,
        max_steps: Some(4),
        seed: 3,
        lr: Some(1e-2),
        warmup_epochs: 0.0,
        ..OptimSettings::default()
    };
    cfg.set("memvp.slots", serde_json::json!(16));
    cfg.set("memvp.hidden_proj", serde_json::json!(8));
    cfg.set("memvp.vision_adapter_dim", serde_json::json!(4));
    // `memvp::app::run::train_run`, with the model kept in this process.
    let vlm = load_vlm(&cfg).unwrap();
    let ds = memvp::data::open(&cfg.data.source, &cfg.data.prompt).unwrap();
    let samples = ds.samples("train").unwrap();
    assert_eq!(samples.len(), 6);
    let test_samples = ds.samples("test").unwrap();
    let prep = prepare(&vlm, samples, false, cfg.data.max_len, 16, false).unwrap();
    let batches = EpochBatches { builder: prep.builder.clone(), batch_size: 2, seed: 3 };
    let task = VlmTask { vlm: &vlm };
    let sum = memvp::train::train(task, &batches, &cfg.train_settings(), &out, false, "t").unwrap();
    assert_eq!(sum.steps, 4);

    // adapter_model.safetensors: exactly the trained tensors, f32, documented names and shapes.
    let (c, r, h, d, m) = (64usize, 4usize, 8usize, 64usize, 16usize);
    let mut want: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    want.insert("projector.fc1.weight".into(), vec![h, c]);
    want.insert("projector.fc1.bias".into(), vec![h]);
    want.insert("projector.fc2.weight".into(), vec![d, h]);
    want.insert("projector.fc2.bias".into(), vec![d]);
    want.insert("memory.key_embed".into(), vec![m, d]);
    want.insert("memory.value_embed".into(), vec![m, d]);
    for i in 0..3 {
        want.insert(format!("vision.layers.{i}.adapter.down.weight"), vec![r, c]);
        want.insert(format!("vision.layers.{i}.adapter.up.weight"), vec![c, r]);
    }
    let file = tensors(&out.join("adapter_model.safetensors"));
    let got: BTreeMap<String, Vec<usize>> = file.iter().map(|(n, (_, sh, _))| (n.clone(), sh.clone())).collect();
    assert_eq!(got, want, "adapter tensor names or shapes");
    for (n, (dt, _, _)) in &file {
        assert_eq!(dt, "F32", "{n} is not f32");
    }
    // The file holds the trained values of the model in memory, bit for bit.
    for (n, v) in vlm.named() {
        let mem: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(f32s(&file[&n].2), mem, "{n}: file differs from the model");
    }
    // Trained: tensors that start at zero have moved (the last vision block's adapter never
    // runs with vision_layer -2, so its Up stays zero).
    let nonzero = |n: &str| f32s(&file[n].2).iter().any(|&x| x != 0.0);
    for n in [
        "projector.fc2.bias",
        "memory.value_embed",
        "vision.layers.0.adapter.up.weight",
        "vision.layers.1.adapter.up.weight",
    ] {
        assert!(nonzero(n), "{n} was not trained");
    }
    assert!(!nonzero("vision.layers.2.adapter.up.weight"));

    // adapter_config.json: the settings and the base models' content hashes.
    let ac: Value = serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(ac["format"], "memvp-adapter/1");
    assert_eq!(ac["method"], "memvp");
    let mc = &ac["memvp"];
    assert_eq!(mc["slots"], 16);
    assert_eq!(mc["hidden_proj"], 8);
    assert_eq!(mc["vision_adapter_dim"], 4);
    assert_eq!(mc["visual_scale"], 0.01);
    assert_eq!(mc["adapter_scale"], 0.1);
    assert_eq!(mc["vision_layer"], -2);
    // The LM's hash: SHA-256 over config.json then the weight file, computed here directly.
    use sha2::Digest;
    let mut hsh = sha2::Sha256::new();
    hsh.update(std::fs::read(lm_dir().join("config.json")).unwrap());
    hsh.update(std::fs::read(lm_dir().join("model.safetensors")).unwrap());
    let lm_sha: String = hsh.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(ac["lm"]["sha256"], lm_sha);
    assert_eq!(ac["lm"]["source"], s(std::fs::canonicalize(lm_dir()).unwrap()));
    assert_eq!(ac["lm"]["family"], "llama");
    assert_eq!(ac["vision"]["source"], "random:tiny");
    let vsha = ac["vision"]["sha256"].as_str().unwrap();
    assert_eq!(vsha.len(), 64);
    assert_eq!(vsha, vlm.vision().fingerprint);
    let n_params: usize = want.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(ac["trainable_parameters"], n_params);
    assert_eq!(ac["dims"]["visual_tokens"], 16);
    assert_eq!(ac["dims"]["lm_width"], 64);

    // Reloading gives the same tensors, the same loss and the same generations.
    let re = Vlm::from_run(&out, None, None, Default::default()).unwrap();
    let a: Vec<(String, Vec<f32>)> =
        vlm.named().into_iter().map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect();
    let b: Vec<(String, Vec<f32>)> =
        re.named().into_iter().map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect();
    assert!(a == b, "reloaded tensors differ");
    let batch = prep.builder.build(&[0, 1, 2, 3, 4, 5]).unwrap();
    let la = vlm.loss(&batch, &mut Rng::new(0), false).unwrap().to_scalar::<f32>().unwrap();
    let lb = re.loss(&batch, &mut Rng::new(0), false).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(la.to_bits(), lb.to_bits(), "loss {la} vs reloaded {lb}");
    let tok = &vlm.lm().tok;
    let prompts: Vec<Vec<u32>> = test_samples.iter().map(|s| memvp::data::batch::eval_input(tok, s).unwrap()).collect();
    let pre = vlm.preprocess();
    let mut px = Vec::new();
    for smp in &test_samples {
        px.extend(pre.load(smp.image.as_ref().unwrap()).unwrap());
    }
    let px = candle_core::Tensor::from_vec(px, (test_samples.len(), 3, pre.size, pre.size), &Device::Cpu).unwrap();
    let ind = vec![1f32; test_samples.len()];
    let smp = Sampling { max_new_tokens: 6, ..Default::default() };
    let ga = vlm.generate(&prompts, Some(&px), &ind, &smp).unwrap();
    let gb = re.generate(&prompts, Some(&px), &ind, &smp).unwrap();
    assert_eq!(ga, gb, "generations differ after reloading");
    assert!(ga.iter().all(|g| !g.is_empty()));

    // Onto another LM: a clear error naming both models, no panic.
    let other = fixtures().join("llama_rope_parameters");
    let e = match Vlm::from_run(&out, None, Some(&other), Default::default()) {
        Ok(_) => panic!("an adapter loaded onto another LM"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains(LM) && e.contains("llama_rope_parameters"), "the message must name both models: {e}");
    // The same through the binary.
    let o = Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(["eval", "--run", &s(&out), "--lm", &s(&other), "--data", &format!("jsonl:{}", data.display())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(LM) && err.contains("llama_rope_parameters"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// b. Kill and resume = uninterrupted, bit for bit.
// ---------------------------------------------------------------------------------------------

/// 6 samples, batch 2: 3 steps per epoch, so 8 steps cross two epoch boundaries.
const RESUME_FLAGS: &[&str] =
    &["--batch-size", "2", "--epochs", "4", "--max-steps", "8", "--save-every", "2", "--seed", "3", "--blr", "0.5"];

fn assert_same_run(a: &Path, b: &Path, steps: u64) {
    let (ta, tb) = (tensors(&a.join("adapter_model.safetensors")), tensors(&b.join("adapter_model.safetensors")));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (n, (da, sa, xa)) in &ta {
        let (db, sb, xb) = &tb[n];
        assert_eq!((da, sa), (db, sb), "{n}");
        assert!(xa == xb, "{n}: the resumed run's tensor differs");
    }
    // Optimizer moments and state of the final checkpoint too.
    let (ca, cb) = (ckpt(a, steps), ckpt(b, steps));
    let (oa, ob) = (tensors(&ca.join("optimizer.safetensors")), tensors(&cb.join("optimizer.safetensors")));
    assert!(oa == ob, "optimizer state differs");
    let sa: Value = serde_json::from_slice(&std::fs::read(ca.join("state.json")).unwrap()).unwrap();
    let sb: Value = serde_json::from_slice(&std::fs::read(cb.join("state.json")).unwrap()).unwrap();
    assert_eq!(sa, sb, "state.json differs");
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len() as u64, steps);
    assert_eq!(mb.len() as u64, steps);
    for (x, y) in ma.into_iter().zip(mb) {
        assert_eq!(deterministic(x), deterministic(y), "metrics differ");
    }
}

#[test]
fn resume_from_checkpoint_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run_ok(train_cmd(&data, &a, RESUME_FLAGS));
    run_ok(train_cmd(&data, &b, RESUME_FLAGS));
    // Simulate a kill after step 4: newer checkpoints and the top-level adapter are gone, and
    // the debris of an interrupted save lies around (a temporary directory with a newer step
    // and a corrupt state, and a step directory without its state file).
    let ck = b.join("checkpoints");
    for step in [6, 8] {
        std::fs::remove_dir_all(ckpt(&b, step)).unwrap();
    }
    std::fs::remove_file(b.join("adapter_model.safetensors")).unwrap();
    std::fs::remove_file(b.join("adapter_config.json")).unwrap();
    assert!(ckpt(&b, 4).join("state.json").is_file());
    let tmpdir = ck.join(".step-00000007.tmp-4242");
    std::fs::create_dir_all(&tmpdir).unwrap();
    std::fs::write(tmpdir.join("state.json"), "{ truncated").unwrap();
    std::fs::create_dir_all(ckpt(&b, 9)).unwrap();
    // Without --resume the run refuses to overwrite its checkpoints.
    let o = train_cmd(&data, &b, RESUME_FLAGS).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let mut c = train_cmd(&data, &b, RESUME_FLAGS);
    c.arg("--resume");
    let o = run_ok(c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("resuming from") && err.contains("step-00000004"), "{err}");
    assert!(!err.contains(".step-"), "{err}");
    assert_same_run(&a, &b, 8);
    // Changing a setting that changes what is computed is refused on resume.
    let mut flags: Vec<&str> = RESUME_FLAGS.to_vec();
    let last = flags.len() - 1;
    flags[last] = "0.25";
    let mut c = train_cmd(&data, &b, &flags);
    c.arg("--resume");
    let o = c.output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && err.contains("other settings"), "{err}");
}

#[test]
fn killed_run_resumes_to_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let steps = 60u64;
    let flags = [
        "--batch-size",
        "2",
        "--epochs",
        "25",
        "--max-steps",
        &steps.to_string(),
        "--save-every",
        "1",
        "--keep-checkpoints",
        "2",
        "--seed",
        "5",
        "--blr",
        "0.5",
    ]
    .map(str::to_string);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    run_ok(train_cmd(&data, &a, &flags));
    // Kill (SIGKILL) the same run once step 3 is on disk.
    let mut child = train_cmd(&data, &b, &flags).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while !ckpt(&b, 3).join("state.json").is_file() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step 3 was saved");
        assert!(start.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let last = metrics(&b).last().map(|r| r["step"].as_u64().unwrap());
    assert!(
        !status.success() && last.unwrap_or(0) < steps,
        "the run finished before it could be killed ({status}); make it longer"
    );
    eprintln!("killed after step {last:?}");
    let mut c = train_cmd(&data, &b, &flags);
    c.arg("--resume");
    let o = run_ok(c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("resuming from"), "{err}");
    assert!(!err.contains(".step-"), "{err}");
    assert_same_run(&a, &b, steps);
    // No temporary checkpoint directory is left once the run has finished cleanly, except
    // possibly the killed process's own (its pid differs).
    let leftovers: Vec<String> = std::fs::read_dir(b.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with("step-"))
        .collect();
    eprintln!("non-checkpoint entries after resume: {leftovers:?}");
}

// ---------------------------------------------------------------------------------------------
// c. metrics.jsonl, loss.png and the learning-rate schedule.
// ---------------------------------------------------------------------------------------------

#[test]
fn metrics_plot_and_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 4); // 8 samples
    let out = tmp.path().join("run");
    // batch 2, accum 2: 4 micro-batches and 2 optimizer steps per epoch; 4 epochs, 1.5 warm-up.
    let (blr, min_lr) = (0.4, 1e-4);
    run_ok(train_cmd(
        &data,
        &out,
        &[
            "--batch-size",
            "2",
            "--accum-steps",
            "2",
            "--epochs",
            "4",
            "--warmup-epochs",
            "1.5",
            "--blr",
            &blr.to_string(),
            "--min-lr",
            &min_lr.to_string(),
            "--seed",
            "1",
        ],
    ));
    let recs = metrics(&out);
    assert_eq!(recs.len(), 8, "one record per optimizer step");
    let lr_max = blr * (2.0 * 2.0) / 256.0;
    let (warm, epochs) = (1.5, 4.0);
    for (k, r) in recs.iter().enumerate() {
        for key in ["step", "epoch", "loss", "lr", "grad_norm", "samples_per_s"] {
            assert!(r.get(key).is_some_and(Value::is_number), "{key} in {r}");
        }
        assert_eq!(r["step"].as_u64().unwrap(), k as u64 + 1);
        // The schedule is evaluated at the fractional epoch where the step's accumulation starts.
        let frac = (k / 2) as f64 + (k % 2) as f64 * 2.0 / 4.0;
        let want = if frac < warm {
            lr_max * frac / warm
        } else {
            min_lr + (lr_max - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * (frac - warm) / (epochs - warm)).cos())
        };
        let lr = r["lr"].as_f64().unwrap();
        assert!((lr - want).abs() <= 1e-12 * lr_max, "step {}: lr {lr}, expected {want}", k + 1);
        let ep = r["epoch"].as_f64().unwrap();
        let want_ep = (k / 2) as f64 + ((k % 2) + 1) as f64 * 0.5;
        assert!((ep - want_ep).abs() < 1e-12, "step {}: epoch {ep}", k + 1);
        assert!(r["loss"].as_f64().unwrap() > 0.0);
        assert!(r["grad_norm"].as_f64().unwrap() > 0.0);
        assert!(r["samples_per_s"].as_f64().unwrap() > 0.0);
    }
    // Warm-up starts at 0 and rises; the peak is reached, then the cosine decays.
    let lrs: Vec<f64> = recs.iter().map(|r| r["lr"].as_f64().unwrap()).collect();
    assert_eq!(lrs[0], 0.0);
    assert!(lrs[1] > 0.0 && lrs[2] > lrs[1]);
    assert!(lrs[7] < lrs[4]);
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert!(png.len() > 1000);
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let img = image::load_from_memory(&png).unwrap();
    assert!(img.width() >= 400 && img.height() >= 300);
    // Written with the run: the resolved settings and a summary.
    assert!(out.join("config.toml").is_file());
    let sum: Value = serde_json::from_slice(&std::fs::read(out.join("train_summary.json")).unwrap()).unwrap();
    assert_eq!(sum["summary"]["steps"], 8);
}

// ---------------------------------------------------------------------------------------------
// d. The non-finite guard.
// ---------------------------------------------------------------------------------------------

#[test]
fn non_finite_steps_stop_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // 8 samples, batch 2: the third bad step (step 4) comes before the first epoch boundary.
    let data = shapes(tmp.path(), 4);
    let out = tmp.path().join("run");
    let o = train_cmd(
        &data,
        &out,
        &["--batch-size", "2", "--epochs", "5", "--warmup-epochs", "0", "--lr", "1e30", "--max-bad-steps", "3"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a run at lr 1e30 succeeded: {err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("non-finite"), "{err}");
    // The steps before the stop are recorded, with the skip count.
    let recs = metrics(&out);
    assert!(!recs.is_empty());
    let skipped: Vec<u64> = recs.iter().map(|r| r["skipped_steps"].as_u64().unwrap()).collect();
    assert_eq!(*skipped.last().unwrap(), 2, "{recs:?}");
}

#[test]
fn non_finite_steps_below_the_limit_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 3);
    let out = tmp.path().join("run");
    // 3 steps per epoch: the epoch boundary (plot, metrics re-read) comes after skipped steps.
    let o = run_ok(train_cmd(
        &data,
        &out,
        &[
            "--batch-size",
            "2",
            "--epochs",
            "5",
            "--max-steps",
            "5",
            "--warmup-epochs",
            "0",
            "--lr",
            "1e30",
            "--max-bad-steps",
            "100",
        ],
    ));
    let recs = metrics(&out);
    assert_eq!(recs.len(), 5);
    let last = &recs[4];
    assert!(last["skipped_steps"].as_u64().unwrap() >= 1, "{recs:?}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("skipped steps"), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// A one-thread compute pool (a one-CPU machine, or RAYON_NUM_THREADS=1) must not hang.
// ---------------------------------------------------------------------------------------------

#[test]
fn training_with_one_thread_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shapes(tmp.path(), 2);
    let out = tmp.path().join("run");
    let mut c = train_cmd(&data, &out, &["--batch-size", "2", "--max-steps", "2"]);
    c.env("RAYON_NUM_THREADS", "1").stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("a 2-step run with RAYON_NUM_THREADS=1 did not finish in 60 s (deadlock)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metrics(&out).len(), 2);
}
