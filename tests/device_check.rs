//! The device path of issue 15 dry-run on the CPU: `memvp device-check --device cpu` runs the
//! device-generic ops (what a GPU runs) against memvp's CPU kernels on the committed fixtures,
//! in f32 (tight tolerances) and with bf16 frozen weights (the GPU default), and a device the
//! binary cannot open is a clear error.

mod common;
use std::process::Command;

fn device_check(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(["device-check", "--json", "--fixtures"])
        .arg(common::fixtures())
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "device-check {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn generic_path_matches_the_cpu_kernels() {
    let r = device_check(&["--device", "cpu"]);
    assert_eq!(r["pass"], true);
    let checks = r["checks"].as_array().unwrap();
    // logits, 10 reached gradients, losses, generations
    assert!(checks.len() >= 13, "{checks:?}");
    for c in checks {
        assert!(c["error"].as_f64().unwrap() <= c["tolerance"].as_f64().unwrap(), "{c}");
    }
    // The two paths are different computations (not one path run twice): not bit-identical.
    assert!(checks[0]["error"].as_f64().unwrap() > 0.0, "logits identical: was the generic path taken?");
    let losses = r["losses_device"].as_array().unwrap();
    assert_eq!(losses.len(), 20);
    let (first, last) = (losses[0].as_f64().unwrap(), losses[19].as_f64().unwrap());
    assert!(last < first, "20 MemVP steps did not lower the loss ({first} -> {last})");
    assert_eq!(r["generations_device"], r["generations_reference"]);
}

#[test]
fn generic_path_with_bf16_weights_tracks_f32() {
    let r = device_check(&["--device", "cpu", "--lm-dtype", "bf16"]);
    assert_eq!(r["pass"], true);
    assert_eq!(r["lm_dtype"], "bf16");
}

#[test]
fn unavailable_device_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_memvp")).args(["device-check", "--device", "cuda:0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "cuda") {
        return; // a CUDA build on a CUDA machine may open it
    }
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--device cuda:0") && err.contains("built without the `cuda` feature"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_memvp")).args(["bench", "--device", "tpu"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected cpu, cuda, cuda:N or metal"));
}
