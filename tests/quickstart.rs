//! `memvp quickstart --json` for each LM family: MemVP must beat the image-blind control by at
//! least 30 points of test accuracy, within 3 minutes. The numbers are printed (run with
//! `--nocapture` to see them) so that CI logs show them.

use serde_json::Value;
use std::process::Command;
use std::sync::Mutex;

/// The three runs take the whole machine each; run them one at a time so that `seconds`
/// measures one run, not three sharing the cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn quickstart(family: &str) {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qs");
    let o = Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(["quickstart", "--family", family, "--json", "--out"])
        .arg(&out)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("cannot run memvp");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "quickstart --family {family} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in stdout:\n{stdout}"));
    let r: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let num = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("`{k}` missing or not a number: {r}"));
    let (memvp, control, secs) = (num("memvp_accuracy"), num("control_accuracy"), num("seconds"));
    eprintln!(
        "quickstart --family {family}: MemVP {memvp:.3}, image-blind control {control:.3}, \
         margin {:+.3}, LM pre-training loss {:.3}, {secs:.1}s; per type: MemVP {} control {}",
        memvp - control,
        num("lm_pretrain_loss"),
        r["memvp_per_type"],
        r["control_per_type"],
    );
    assert_eq!(r["settings"]["family"], family, "{r}");
    for (k, v) in [("memvp_accuracy", memvp), ("control_accuracy", control)] {
        assert!((0.0..=1.0).contains(&v), "{k} = {v} is not a fraction");
    }
    assert!(memvp - control >= 0.30, "{family}: MemVP {memvp} does not beat the image-blind control {control} by 0.30");
    // The time is reported, not bounded: a loaded machine must not fail the test.
    assert!(secs > 0.0, "{family}: took {secs}s");
    // It wrote both runs' evaluations where it said.
    for run in ["memvp", "control"] {
        assert!(out.join(run).join("eval.json").is_file(), "{run}/eval.json missing");
    }
}

#[test]
fn quickstart_llama() {
    quickstart("llama");
}

#[test]
fn quickstart_t5() {
    quickstart("t5");
}

#[test]
fn quickstart_bart() {
    quickstart("bart");
}
