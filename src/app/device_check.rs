//! `memvp device-check`: the device path (`--device`) against memvp's CPU kernels on the
//! committed tiny fixtures — logits, the gradients that flow back through the frozen bases into
//! the trained tensors, a short MemVP training's losses and greedy generations — each within a
//! stated tolerance. With `--device cpu` the CPU runs the device-generic path (`ops/generic.rs`)
//! against its own kernels: the dry run of the GPU check, and a test of that path.

use crate::generate::Sampling;
use crate::models::{load_lm, load_vision};
use crate::ops::{self, WeightFormat};
use crate::rng::Rng;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::util::max_rel_err;
use crate::vlm::{Base, Vlm};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug, Clone)]
pub struct DeviceCheckArgs {
    /// The committed test fixtures (`tests/fixtures` of the repository).
    #[arg(long, default_value = "tests/fixtures")]
    pub fixtures: PathBuf,
    /// Format of the frozen matrices on the device (the CPU reference keeps f32); auto: f32 on
    /// the CPU, bf16 on a GPU.
    #[arg(long, default_value = "f32")]
    pub lm_dtype: WeightFormat,
    /// Training steps whose losses are compared.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Tokens generated greedily per prompt.
    #[arg(long, default_value_t = 8)]
    pub new_tokens: usize,
    #[arg(long)]
    pub json: bool,
}

/// One side's measurements.
struct Side {
    logits: Tensor,
    /// None where no gradient reaches a tensor (the last vision block's adapter: MemVP reads
    /// the penultimate block).
    grads: Vec<(String, Option<Tensor>)>,
    losses: Vec<f64>,
    generations: Vec<Vec<u32>>,
}

#[derive(Serialize)]
pub struct Check {
    pub name: String,
    /// max |device - reference| / max |reference| (losses: max absolute difference).
    pub error: f64,
    pub tolerance: f64,
    pub pass: bool,
}

#[derive(Serialize)]
pub struct Report {
    pub device: String,
    pub reference: String,
    pub lm_dtype: String,
    pub checks: Vec<Check>,
    pub losses_reference: Vec<f64>,
    pub losses_device: Vec<f64>,
    pub generations_reference: Vec<Vec<u32>>,
    pub generations_device: Vec<Vec<u32>>,
    pub pass: bool,
}

/// The fixed inputs: two prompts of 12 tokens (the second row without an image), answers on
/// the last 4 positions, seeded pixels.
struct Inputs {
    ids: Vec<Vec<u32>>,
    pixels: Vec<f32>,
    size: usize,
    indicator: Vec<f32>,
}

fn inputs(vocab: usize, size: usize) -> Inputs {
    let mut rng = Rng::new(7);
    let ids = (0..2).map(|_| (0..12).map(|_| 3 + rng.below(vocab - 3) as u32).collect()).collect();
    let pixels = (0..2 * 3 * size * size).map(|_| rng.normal() as f32).collect();
    Inputs { ids, pixels, size, indicator: vec![1.0, 0.0] }
}

fn batch(x: &Inputs) -> Result<crate::data::batch::Batch> {
    let t = x.ids[0].len();
    let (mut pos, mut tgt) = (Vec::new(), Vec::new());
    for (r, row) in x.ids.iter().enumerate() {
        for j in t - 5..t - 1 {
            pos.push((r * t + j) as u32);
            tgt.push(row[j + 1]);
        }
    }
    Ok(crate::data::batch::Batch {
        input_ids: Tensor::from_vec(x.ids.concat(), (2, t), &Device::Cpu)?,
        input_lens: vec![t; 2],
        decoder_ids: None,
        loss_positions: pos,
        loss_targets: tgt,
        pixels: Some(Tensor::from_vec(x.pixels.clone(), (2, 3, x.size, x.size), &Device::Cpu)?),
        indicator: x.indicator.clone(),
        skipped: 0,
        n: 2,
    })
}

fn load(a: &DeviceCheckArgs, dev: &Device, fmt: WeightFormat) -> Result<Vlm> {
    let lm_dir = a.fixtures.join("llama_gqa_tied");
    let vis_dir = a.fixtures.join("clip_vision_quickgelu");
    if !lm_dir.is_dir() || !vis_dir.is_dir() {
        bail!(
            "--fixtures {}: expected llama_gqa_tied/ and clip_vision_quickgelu/ in it (tests/fixtures of the repository)",
            a.fixtures.display()
        )
    }
    let lm = load_lm(&lm_dir, DType::F32, fmt, dev)?;
    let vision = load_vision(vis_dir.to_str().context("fixture path is not UTF-8")?, DType::F32, fmt, dev)?;
    Vlm::new(Arc::new(Base { vision, lm }), &super::bench::settings("memvp"))
}

fn measure(vlm: &Vlm, init: &[(String, Tensor)], a: &DeviceCheckArgs, x: &Inputs) -> Result<Side> {
    for ((n, v), (m, t)) in vlm.named().iter().zip(init) {
        if n != m {
            bail!("device-check: parameter {n} where the reference has {m}")
        }
        v.set(&t.to_device(v.device())?)?;
    }
    let b = batch(x)?;
    let logits = vlm.with_stepper(&x.ids, b.pixels.as_ref(), &x.indicator, &mut |_, first| Ok(first.clone()))?;
    let mut rng = Rng::new(0);
    let named = vlm.named();
    let grads = {
        let loss = vlm.loss(&b, &mut rng, true)?;
        let g = loss.backward()?;
        named.iter().map(|(n, v)| (n.clone(), g.get(v).cloned())).collect::<Vec<_>>()
    };
    let mut opt = AdamW::new(named.clone(), AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 })?;
    let mut losses = Vec::new();
    for _ in 0..a.steps {
        let loss = vlm.loss(&b, &mut rng, true)?;
        losses.push(loss.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        let g = loss.backward()?;
        let gs = named
            .iter()
            .map(|(_, v)| match g.get(v) {
                Some(t) => Ok(t.clone()),
                None => v.zeros_like(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        opt.step(&gs, 3e-3)?;
    }
    let s = Sampling { max_new_tokens: a.new_tokens, ..Default::default() };
    let generations = vlm.generate(&x.ids, b.pixels.as_ref(), &x.indicator, &s)?;
    Ok(Side { logits, grads, losses, generations })
}

pub fn run(a: &DeviceCheckArgs) -> Result<Report> {
    let dev = crate::util::device();
    let fmt = a.lm_dtype.resolve(&dev);
    let low = !matches!(fmt, WeightFormat::F32 | WeightFormat::Keep);
    // Reference: memvp's CPU kernels, f32.
    ops::force_generic(false);
    let reference = load(a, &Device::Cpu, WeightFormat::F32)?;
    let init: Vec<(String, Tensor)> =
        reference.named().into_iter().map(|(n, v)| (n, v.as_tensor().copy().unwrap())).collect();
    let vocab = reference.lm().model.vocab_size();
    let x = inputs(vocab, reference.vision().model.cfg.image_size);
    let r = measure(&reference, &init, a, &x)?;
    drop(reference);
    // The device path: on the CPU, the generic path forced.
    ops::force_generic(dev.is_cpu());
    let target = load(a, &dev, fmt)?;
    let d = measure(&target, &init, a, &x);
    ops::force_generic(false);
    let d = d?;
    // bf16/f16 frozen weights: products rounded to 8 (11) significant bits, errors compound
    // over the layers and the 20 steps.
    let (tl, tg, tloss) = if low { (3e-2, 1e-1, 5e-2) } else { (1e-4, 1e-3, 1e-4) };
    let mut checks = vec![Check {
        name: "logits (prefill, both rows)".into(),
        error: max_rel_err(&d.logits, &r.logits)?,
        tolerance: tl,
        pass: false,
    }];
    for ((n, gd), (_, gr)) in d.grads.iter().zip(&r.grads) {
        let error = match (gd, gr) {
            (Some(gd), Some(gr)) => max_rel_err(gd, gr)?,
            (None, None) => continue,
            _ => f64::INFINITY,
        };
        checks.push(Check { name: format!("gradient {n}"), error, tolerance: tg, pass: false });
    }
    let dl = d.losses.iter().zip(&r.losses).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    checks.push(Check {
        name: format!("losses of {} training steps (abs)", a.steps),
        error: dl,
        tolerance: tloss,
        pass: false,
    });
    let same = d
        .generations
        .iter()
        .zip(&r.generations)
        .map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count())
        .min()
        .unwrap_or(0);
    let want = if low { 1 } else { a.new_tokens };
    checks.push(Check {
        name: format!("greedy generations: tokens equal before the first difference (of {})", a.new_tokens),
        error: (a.new_tokens - same.min(a.new_tokens)) as f64,
        tolerance: (a.new_tokens - want) as f64,
        pass: false,
    });
    for c in &mut checks {
        c.pass = c.error <= c.tolerance;
    }
    let pass = checks.iter().all(|c| c.pass);
    Ok(Report {
        device: format!("{dev:?}"),
        reference: "cpu, memvp's kernels, f32".into(),
        lm_dtype: fmt.to_string(),
        checks,
        losses_reference: r.losses,
        losses_device: d.losses,
        generations_reference: r.generations,
        generations_device: d.generations,
        pass,
    })
}

pub fn print(r: &Report) {
    println!("device-check: {} ({} frozen weights) against {}", r.device, r.lm_dtype, r.reference);
    for c in &r.checks {
        println!(
            "  {:<4} {:<70} {:>10.3e} (tolerance {:.0e})",
            if c.pass { "ok" } else { "FAIL" },
            c.name,
            c.error,
            c.tolerance
        );
    }
    println!("{}", if r.pass { "all checks passed" } else { "SOME CHECKS FAILED" });
}
