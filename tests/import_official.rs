//! `memvp import-official` on a tiny checkpoint in the authors' released layout
//! (`tests/fixtures/official_memvp/`, made by `scripts/make_fixtures.py --only official_memvp`
//! from the MemVP reference adapter): every released name lands on its memvp name with the same
//! numbers, the released settings are written, the run evaluates, and checkpoints that do not fit
//! the given bases are refused naming the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().to_string()
}

fn memvp(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memvp")).args(args).output().unwrap()
}

fn import(checkpoint: &str, vision: &str, out: &Path, extra: &[&str]) -> Output {
    let mut a: Vec<String> = [
        "import-official",
        "--checkpoint",
        &s(fixtures().join("official_memvp").join(checkpoint)),
        "--vision",
        &s(fixtures().join(vision)),
        "--lm",
        &s(fixtures().join("llama_gqa_tied")),
        "--out",
        &s(out),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    memvp(&a)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn load(p: &Path) -> HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap()
}

#[test]
fn the_released_checkpoint_becomes_a_run_that_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = import("checkpoint-19.pth", "clip_vision_quickgelu", &run, &[]);
    assert!(o.status.success(), "{}", text(&o));
    // The numbers of the reference adapter, under memvp's names.
    let want = load(&fixtures().join("memvp_llama_clip/adapter_model.safetensors"));
    let got = load(&run.join("adapter_model.safetensors"));
    assert_eq!(got.len(), want.len());
    for (k, w) in &want {
        let g = got.get(k).unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(g.dims(), w.dims(), "{k}");
        assert_eq!(
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }
    // The released settings; the sizes from the tensors.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("adapter_config.json")).unwrap()).unwrap();
    let m = &cfg["memvp"];
    assert_eq!(
        (m["slots"].as_u64(), m["hidden_proj"].as_u64(), m["vision_adapter_dim"].as_u64()),
        (Some(24), Some(12), Some(6))
    );
    assert_eq!(
        (m["visual_scale"].as_f64(), m["adapter_scale"].as_f64(), m["vision_layer"].as_i64()),
        (Some(0.01), Some(0.1), Some(-2))
    );
    assert_eq!(cfg["prompt"]["prompt_format"], "QCM-A");
    assert_eq!(cfg["max_len"], 512);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("import.json")).unwrap()).unwrap();
    assert_eq!(report["imported"]["memory.key_embed"], "adapter_emb1");
    assert_eq!(
        report["imported"]["vision.layers.1.adapter.up.weight"],
        "backbone.visual.transformer.resblocks.1.adapter_mlp.fc2.weight"
    );
    assert_eq!(report["skipped"].as_array().unwrap().len(), 3, "{report}");
    // The ScienceQA protocol runs on it (from another directory: the bases' paths are absolute).
    let o = Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args([
            "eval",
            "--run",
            &s(&run),
            "--data",
            &format!("scienceqa:{}", s(fixtures().join("scienceqa"))),
            "--json",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(run.join("eval.json").is_file() && run.join("preds.json").is_file());
    // A second import into the same directory is refused without --overwrite.
    let o = import("checkpoint-19.pth", "clip_vision_quickgelu", &run, &[]);
    assert!(!o.status.success() && text(&o).contains("--overwrite"), "{}", text(&o));
    let o = import("checkpoint-19.pth", "clip_vision_quickgelu", &run, &["--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn checkpoints_that_do_not_fit_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cases: [(&str, &str, &[&str], &[&str]); 4] = [
        // Another vision tower (width 32, not 48).
        ("checkpoint-19.pth", "clip_full_gelu", &[], &["adapter_proj.fc1.weight", "[12, 48]", "[12, 32]"]),
        // Slots that disagree with the tables.
        (
            "checkpoint-19.pth",
            "clip_vision_quickgelu",
            &["--slots", "320"],
            &["adapter_emb1", "24 slots", "--slots 320"],
        ),
        // A trained tensor that MemVP does not have.
        (
            "checkpoint-other.pth",
            "clip_vision_quickgelu",
            &[],
            &["adapter_proj_cls.fc1.weight", "not a MemVP checkpoint"],
        ),
        ("missing.pth", "clip_vision_quickgelu", &[], &["missing.pth", "no such file"]),
    ];
    for (ckpt, vision, extra, needles) in cases {
        let o = import(ckpt, vision, &out, extra);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{ckpt} {vision} {extra:?}: {t}");
        for n in needles {
            assert!(t.contains(n), "{ckpt} {vision} {extra:?}: `{n}` not in: {t}");
        }
        assert!(!t.contains("panicked"), "{t}");
        assert!(!out.join("adapter_model.safetensors").exists(), "nothing may be written");
    }
    // Not a PyTorch file at all.
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"not a zip").unwrap();
    let o = memvp(&[
        "import-official".into(),
        "--checkpoint".into(),
        s(&junk),
        "--vision".into(),
        s(fixtures().join("clip_vision_quickgelu")),
        "--lm".into(),
        s(fixtures().join("llama_gqa_tied")),
        "--out".into(),
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("junk.pth") && text(&o).contains("not a PyTorch checkpoint"), "{}", text(&o));
}
