//! Meta's original LLaMA layout (`tests/fixtures/meta_llama`, made by
//! `scripts/make_fixtures.py --only meta_llama`): two model-parallel shards in bf16, q/k in
//! Meta's rotary layout, a SentencePiece `tokenizer.model`. Loaded as `--lm DIR`, it gives the
//! token ids of transformers' LlamaTokenizer built from the same file and the logits of the
//! Hugging Face model those files convert to. Tolerance: 1e-4 relative (f32 arithmetic on the
//! same bf16 weights).

use candle_core::{DType, Device, IndexOp, Tensor};
use memvp::models::load_lm;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/meta_llama")
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    d / (b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64).max(1e-12)
}

#[test]
fn meta_layout_loads_as_its_hugging_face_conversion() {
    let lm = load_lm(&dir(), DType::F32, Default::default(), &Device::Cpu).unwrap();
    assert_eq!(lm.model.family(), "llama");
    let r = candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu).unwrap();
    let texts: serde_json::Value = serde_json::from_slice(&std::fs::read(dir().join("texts.json")).unwrap()).unwrap();
    let llama = lm.llama().unwrap();
    for (j, t) in texts["texts"].as_array().unwrap().iter().enumerate() {
        let t = t.as_str().unwrap();
        let ids = lm.tok.encode(t, true).unwrap();
        let want: Vec<u32> = r[&format!("ids_{j}")].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        assert_eq!(ids, want, "text {j}: token ids differ from transformers'");
        assert_eq!(lm.tok.decode(&ids, true).unwrap(), texts["decoded"][j].as_str().unwrap(), "text {j}: decode");
        let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = llama.forward(&x, 0, None, &memvp::models::NoHooks).unwrap().i(0).unwrap();
        let e = max_rel_err(&logits, &r[&format!("logits_{j}")]);
        eprintln!("text {j}: {} tokens, logits rel err {e:e}", ids.len());
        assert!(e < 1e-4, "text {j}: logits differ ({e:e})");
    }
    // Byte fallback: a character the model never saw goes through <0x..> pieces and back.
    let ids = lm.tok.encode("Ω", false).unwrap();
    assert!(ids.len() >= 2, "{ids:?}");
    assert_eq!(lm.tok.decode(&ids, true).unwrap(), "Ω");
    assert_eq!(lm.eos, vec![2]);
}

#[test]
fn broken_meta_layouts_are_refused_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = |skip: &str| {
        let d = tmp.path().join(format!("without-{skip}"));
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(dir()).unwrap().flatten() {
            if e.file_name() != skip {
                std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
            }
        }
        d
    };
    let err =
        |d: &std::path::Path| format!("{:#}", load_lm(d, DType::F32, Default::default(), &Device::Cpu).err().unwrap());
    let e = err(&copy("consolidated.01.pth"));
    // One shard alone: the halves do not make the model.
    assert!(e.contains("rows") || e.contains("do not match") || e.contains("shape"), "{e}");
    let e = err(&copy("tokenizer.model"));
    assert!(e.contains("tokenizer.model"), "{e}");
    let d = copy("none");
    std::fs::write(d.join("params.json"), r#"{"dim": 64, "n_layers": 2}"#).unwrap();
    let e = err(&d);
    assert!(e.contains("params.json") && e.contains("n_heads"), "{e}");
    let d = copy("none2");
    std::fs::write(d.join("tokenizer.model"), b"\x0a\x05hello").unwrap();
    let e = err(&d);
    assert!(e.contains("tokenizer.model"), "{e}");
}
