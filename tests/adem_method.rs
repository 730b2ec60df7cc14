//! ADEM-VL against the PyTorch reference of `tests/fixtures/adem_llama_clip` (made by
//! `scripts/make_fixtures.py --only adem_llama_clip` from the released formulas): the prompt
//! with "Image: " and the CLS slot, the multiscale entries, K and V, the CLS projection, and the
//! LM's logits with the branch and its adaptive drop, through teacher forcing, the left-padded
//! prefill and the server's batch rows; then gradients against finite differences.
//! Tolerance: 1e-4 relative (f32 on both sides).

use candle_core::{DType, Device, IndexOp, Tensor};
use memvp::adapters::adem::{Adem, AdemConfig};
use memvp::adapters::{Adapter, Build, Visual};
use memvp::models::{TeacherForcing, load_lm, load_vision};
use memvp::rng::Rng;
use memvp::vlm::{AdapterSettings, Base, Vlm};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    d / s.max(1e-12)
}

struct Setup {
    vlm: Vlm,
    r: HashMap<String, Tensor>,
    prompts: Vec<String>,
}

/// The fixture's adapter; `drop_ratio` overrides the settings' when given.
fn setup(drop_ratio: Option<f64>) -> Setup {
    let dir = fixtures().join("adem_llama_clip");
    let mut s: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("settings.json")).unwrap()).unwrap();
    if let Some(r) = drop_ratio {
        s["drop_ratio"] = r.into();
    }
    let dev = Device::Cpu;
    let lm = load_lm(&fixtures().join("llama_gqa_tied"), DType::F32, Default::default(), &dev).unwrap();
    let vision =
        load_vision(fixtures().join("clip_vision_quickgelu").to_str().unwrap(), DType::F32, Default::default(), &dev)
            .unwrap();
    let settings = AdapterSettings {
        method: "adem".into(),
        sections: [("adem".to_string(), s)].into(),
        prompt: Default::default(),
        max_len: 64,
        image_blind: false,
        seed: 0,
    };
    let vlm = Vlm::new(Arc::new(Base { vision, lm }), &settings).unwrap();
    // The adapter file's names are the model's, and its numbers load.
    memvp::adapters::file::load_weights(&dir, &vlm.named()).unwrap();
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &dev).unwrap();
    let p: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("prompts.json")).unwrap()).unwrap();
    let prompts = p["prompts"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    Setup { vlm, r, prompts }
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().to_vec1::<u32>().unwrap()
}

/// Row 0 has the reference image, row 1 none (zeros, indicator 0).
fn pixels(r: &HashMap<String, Tensor>) -> Tensor {
    Tensor::cat(&[&r["pixel_values"], &r["pixel_values"].zeros_like().unwrap()], 0).unwrap()
}

fn right_pad(rows: &[Vec<u32>]) -> Tensor {
    let t = rows.iter().map(Vec::len).max().unwrap();
    let flat: Vec<u32> =
        rows.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0, t - r.len()))).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

#[test]
fn adem_matches_the_pytorch_reference() {
    let Setup { vlm, r, prompts } = setup(None);
    let tok = &vlm.lm().tok;
    // The prompt: BOS, "Image: ", the slot, the text; "Image: N/A" without an image.
    let mut rows = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut v = tok.encode(p, true).unwrap();
        vlm.insert_prompt(&mut v, i == 0);
        rows.push(v);
    }
    assert_eq!(rows[0], ids(&r["ids_0"]));
    assert_eq!(rows[1], ids(&r["ids_1"]));
    let adem = vlm.adapter.downcast::<Adem>().unwrap();
    let rng = RefCell::new(Rng::new(0));
    let px = pixels(&r);
    let ind = [1.0f32, 0.0];
    let f = adem.fusion(&vlm.vision().model, Some(&px), &ind, false, &rng).unwrap();
    let checks = [
        ("keys", max_rel_err(f.keys().unwrap(), &r["keys"])),
        ("values", max_rel_err(&f.v, &r["values"])),
        ("cls", max_rel_err(&f.cls.as_ref().unwrap().i(0).unwrap(), &r["cls_embedding"])),
    ];
    // Teacher forcing (right padding), then the reference's logits row by row.
    let input = right_pad(&rows);
    let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
    let tf = TeacherForcing { input_ids: &input, input_lens: &lens, decoder_ids: None, prefix: None };
    let model = &vlm.lm().model;
    let h = model.teacher_forcing(&tf, &f).unwrap();
    let logits = model.logits(&h.h).unwrap();
    let e0 = max_rel_err(&logits.i((0, ..lens[0])).unwrap(), &r["logits_0"]);
    let e1 = max_rel_err(&logits.i((1, ..lens[1])).unwrap(), &r["logits_1"]);
    // The prefill (left padding shifts row 1's slot-free prompt; row 0's slot moves with it).
    let first = vlm.with_stepper(&rows, Some(&px), &ind, &mut |_, first| Ok(first.clone())).unwrap();
    assert!(!first.track_op(), "generation recorded a graph (it would keep every activation alive)");
    let p0 = max_rel_err(&first.i(0).unwrap(), &r["logits_0"].i(lens[0] - 1).unwrap());
    let p1 = max_rel_err(&first.i(1).unwrap(), &r["logits_1"].i(lens[1] - 1).unwrap());
    // The server's path: per-request rows, stacked, then a batch prefill.
    let v0 = vlm.adapter.request_visual(&vlm.vision().model, Some(&r["pixel_values"])).unwrap();
    let v1 = vlm.adapter.request_visual(&vlm.vision().model, None).unwrap();
    let stacked: Vec<Tensor> = v0.rows.iter().zip(&v1.rows).map(|(a, b)| Tensor::cat(&[a, b], 0).unwrap()).collect();
    let hooks = vlm.adapter.batch_hooks(&stacked, &rng).unwrap();
    let (_, served) = model.start_batch(hooks.as_ref(), &rows, None).unwrap();
    let s0 = max_rel_err(&served.i(0).unwrap(), &r["logits_0"].i(lens[0] - 1).unwrap());
    let s1 = max_rel_err(&served.i(1).unwrap(), &r["logits_1"].i(lens[1] - 1).unwrap());
    eprintln!(
        "ADEM-VL vs PyTorch: {checks:?}, teacher forcing {e0:e} / {e1:e}, prefill {p0:e} / {p1:e}, served {s0:e} / {s1:e}"
    );
    for (what, e) in checks.into_iter().chain([
        ("logits row 0", e0),
        ("logits row 1", e1),
        ("prefill row 0", p0),
        ("prefill row 1", p1),
        ("served row 0", s0),
        ("served row 1", s1),
    ]) {
        assert!(e < 1e-4, "{what}: {e:e}");
    }
    // Without the CLS (the slot left as the placeholder token) row 0 differs: the slot matters.
    let plain = model.teacher_forcing(&tf, &memvp::models::NoHooks).unwrap();
    let d = max_rel_err(&model.logits(&plain.h).unwrap().i((0, ..lens[0])).unwrap(), &r["logits_0"]);
    assert!(d > 1e-2, "the branch and the CLS change the logits by only {d:e}");
}

/// Central differences in f64 on the element with the largest gradient of five trained tensors.
/// The adaptive drop makes the loss jump where an entry crosses its row's threshold (there is no
/// gradient through the threshold, by design), so the check runs without the drop (smooth) and
/// with it at a step far too small to cross a threshold.
#[test]
fn adem_gradients_match_finite_differences() {
    gradient_check(0.0, 1e-5);
    gradient_check(0.1, 1e-7);
}

fn gradient_check(drop_ratio: f64, eps: f64) {
    let dir = fixtures().join("adem_llama_clip");
    let mut s: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("settings.json")).unwrap()).unwrap();
    s["drop_ratio"] = drop_ratio.into();
    let sections = [("adem".to_string(), s)].into();
    let cfg: AdemConfig = memvp::adapters::section(&sections, "adem").unwrap();
    let dev = Device::Cpu;
    let lm = load_lm(&fixtures().join("llama_gqa_tied"), DType::F64, Default::default(), &dev).unwrap();
    let vision =
        load_vision(fixtures().join("clip_vision_quickgelu").to_str().unwrap(), DType::F64, Default::default(), &dev)
            .unwrap();
    let b =
        Build { vision: &vision.model.cfg, vision_model: &vision.model, lm: lm.model.as_ref(), tok: &lm.tok, seed: 0 };
    let adem = Adem::init(cfg, &b, DType::F64).unwrap();
    let file = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &dev).unwrap();
    for (n, v) in adem.named() {
        v.set(&file[&n].to_dtype(DType::F64).unwrap()).unwrap();
    }
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &dev).unwrap();
    let p: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("prompts.json")).unwrap()).unwrap();
    let ins = adem.insert.clone().unwrap();
    let rows: Vec<Vec<u32>> = p["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let mut v = lm.tok.encode(x.as_str().unwrap(), true).unwrap();
            ins.apply(&mut v, i == 0);
            v
        })
        .collect();
    let input = right_pad(&rows);
    let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
    let px = pixels(&r).to_dtype(DType::F64).unwrap();
    let ind = [1.0f32, 0.0];
    let rng = RefCell::new(Rng::new(0));
    let model = &lm.model;
    let mut g = Rng::new(17);
    let n = 2 * input.dims()[1] * 128;
    let w: Vec<f64> = (0..n).map(|_| g.normal()).collect();
    let weights = Tensor::from_vec(w, (2, input.dims()[1], 128), &dev).unwrap();
    let loss = || -> Tensor {
        let inst = adem.install(&vision.model, Visual { pixels: Some(&px), indicator: &ind }, false, &rng).unwrap();
        let tf = TeacherForcing { input_ids: &input, input_lens: &lens, decoder_ids: None, prefix: None };
        let h = model.teacher_forcing(&tf, inst.hooks.as_ref()).unwrap();
        (model.logits(&h.h).unwrap() * &weights).unwrap().sum_all().unwrap()
    };
    let grads = loss().backward().unwrap();
    let named = adem.named();
    for name in [
        "projector_cls.fc2.bias",
        "projector.fc1.weight",
        "memory.key_embed",
        "memory.value_embed",
        "vision.layers.0.adapter.down.weight",
    ] {
        let var = &named.iter().find(|(n, _)| n == name).unwrap().1;
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let j = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        let at = |x: f64| {
            let mut v = base.clone();
            v[j] = x;
            var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap()).unwrap();
            loss().to_scalar::<f64>().unwrap()
        };
        let fd = (at(base[j] + eps) - at(base[j] - eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(base.clone(), var.shape(), &dev).unwrap()).unwrap();
        let rel = (fd - g[j]).abs() / g[j].abs().max(1e-9);
        eprintln!("drop {drop_ratio}: {name}[{j}]: autograd {:.8} finite differences {fd:.8} (rel {rel:.2e})", g[j]);
        assert!(rel < 1e-5, "drop {drop_ratio}: {name}[{j}]: autograd {} vs finite differences {fd}", g[j]);
    }
}
