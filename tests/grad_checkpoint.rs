//! Gradient checkpointing (`--grad-checkpoint`): a training step that keeps only each LM
//! block's input and recomputes the blocks in the backward gives the same loss and the same
//! gradient for every trained tensor as the plain step (memory dropout on, so the recomputed
//! blocks must see the masks of the first pass), for MemVP, ADEM-VL and the image-blind control.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use memvp::data::batch::Batch;
use memvp::models::{load_lm, load_vision};
use memvp::rng::Rng;
use memvp::vlm::{AdapterSettings, Base, Vlm};
use std::sync::Arc;

fn batch(vlm: &Vlm, b: usize, t: usize) -> Batch {
    let mut rng = Rng::new(4);
    let ids: Vec<u32> = (0..b * t).map(|_| 2 + rng.below(120) as u32).collect();
    let (mut pos, mut tgt) = (Vec::new(), Vec::new());
    for r in 0..b {
        for j in t - 5..t - 1 {
            pos.push((r * t + j) as u32);
            tgt.push(ids[r * t + j + 1]);
        }
    }
    let s = vlm.vision().model.cfg.image_size;
    let px: Vec<f32> = (0..b * 3 * s * s).map(|_| rng.normal() as f32).collect();
    Batch {
        input_ids: Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
        input_lens: vec![t; b],
        decoder_ids: None,
        loss_positions: pos,
        loss_targets: tgt,
        pixels: Some(Tensor::from_vec(px, (b, 3, s, s), &Device::Cpu).unwrap()),
        // One row without an image: its memory is the learned embeddings alone.
        indicator: (0..b).map(|i| if i == 1 { 0.0 } else { 1.0 }).collect(),
        skipped: 0,
        n: b,
    }
}

fn check(method: &str, image_blind: bool) {
    let dev = Device::Cpu;
    let lm = load_lm(&fixtures().join("llama_gqa_tied"), DType::F32, Default::default(), &dev).unwrap();
    let vision = load_vision("random:tiny", DType::F32, Default::default(), &dev).unwrap();
    let settings = AdapterSettings {
        method: method.into(),
        sections: Default::default(),
        prompt: Default::default(),
        max_len: 64,
        image_blind,
        seed: 0,
    };
    let mut vlm = Vlm::new(Arc::new(Base { vision, lm }), &settings).unwrap();
    let mut b = batch(&vlm, 3, 12);
    if image_blind {
        // What the data side gives the image-blind control: no images, every indicator 0.
        b.pixels = None;
        b.indicator = vec![0.0; 3];
    }
    let run = |vlm: &Vlm| {
        let loss = vlm.loss(&b, &mut Rng::new(17), true).unwrap();
        let g = loss.backward().unwrap();
        let grads: Vec<(String, Option<Tensor>)> =
            vlm.adapter.named().into_iter().map(|(n, v)| (n, g.get(v.as_tensor()).cloned())).collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    let (l0, g0) = run(&vlm);
    vlm.grad_checkpoint = true;
    let (l1, g1) = run(&vlm);
    assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "{method}: loss {l0} vs {l1} with checkpointing");
    let mut compared = 0;
    for ((n, a), (_, c)) in g0.iter().zip(&g1) {
        match (a, c) {
            (Some(a), Some(c)) => {
                let e = max_rel_err(c, a);
                assert!(e < 1e-5, "{method}: gradient of {n} differs by {e:e} with checkpointing");
                compared += 1;
            }
            (None, None) => {}
            _ => panic!("{method}: {n} has a gradient in one step and not the other"),
        }
    }
    eprintln!("{method} (image-blind {image_blind}): loss {l0}, {compared} gradients equal");
    assert!(compared >= 2, "{method}: only {compared} gradients compared");
}

#[test]
fn memvp_step_with_checkpointing_equals_the_plain_step() {
    check("memvp", false);
}

#[test]
fn adem_step_with_checkpointing_equals_the_plain_step() {
    check("adem", false);
}

#[test]
fn image_blind_step_with_checkpointing_equals_the_plain_step() {
    check("memvp", true);
}

#[test]
fn input_space_lora_is_refused_with_the_reason() {
    let dev = Device::Cpu;
    let lm = load_lm(&fixtures().join("llama_gqa_tied"), DType::F32, Default::default(), &dev).unwrap();
    let vision = load_vision("random:tiny", DType::F32, Default::default(), &dev).unwrap();
    let settings = AdapterSettings {
        method: "input-space".into(),
        sections: Default::default(),
        prompt: Default::default(),
        max_len: 64,
        image_blind: false,
        seed: 0,
    };
    let mut vlm = Vlm::new(Arc::new(Base { vision, lm }), &settings).unwrap();
    vlm.grad_checkpoint = true;
    let b = batch(&vlm, 2, 10);
    let e = vlm.loss(&b, &mut Rng::new(1), true).err().unwrap().to_string();
    assert!(e.contains("checkpointing"), "{e}");
}
