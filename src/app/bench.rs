//! `memvp bench`: MemVP against the input-space baseline on the same backbones, batch and
//! machine, interleaved after a warm-up; plus this CPU's best large matrix-product throughput,
//! and the backward/forward ratio of a frozen LM with one small trained tensor inside.

use super::run::VlmTask;
use crate::adapters::adem::Adem;
use crate::adapters::input_space::InputSpace;
use crate::adapters::lora::Lora;
use crate::adapters::memvp::Memvp;
use crate::checkpoint::{Tok, Weights};
use crate::data::batch::Batch;
use crate::models::llama::{Llama, LlamaConfig, Positions};
use crate::models::{LmHooks, LoadedLm, Site, load_lm, load_vision};
use crate::ops::{self, Activation};
use crate::rng::Rng;
use crate::train::{Batches, OptimSettings, Shard, Trainer};
use crate::vlm::{AdapterSettings, Base, Vlm};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct BenchArgs {
    /// A real LM (GGUF file, Hugging Face directory or Meta's LLaMA directory); default: random
    /// weights shaped like SmolLM2-135M.
    #[arg(long)]
    pub lm: Option<PathBuf>,
    /// Vision tower (default: a small random ViT giving 256 visual tokens).
    #[arg(long, default_value = "random:bench")]
    pub vision: String,
    /// Text tokens per sample (the last `answer_tokens` of them are supervised).
    #[arg(long, default_value_t = 64)]
    pub text_tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub answer_tokens: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Untimed rounds before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed rounds (each round runs MemVP then the baseline: A B A B ...).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Tokens generated after the prefill to time decoding.
    #[arg(long, default_value_t = 16)]
    pub decode_tokens: usize,
    /// Random LM shape (ignored with --lm).
    #[arg(long, default_value_t = 30)]
    pub lm_layers: usize,
    #[arg(long, default_value_t = 576)]
    pub lm_hidden: usize,
    #[arg(long, default_value_t = 1536)]
    pub lm_intermediate: usize,
    #[arg(long, default_value_t = 9)]
    pub lm_heads: usize,
    #[arg(long, default_value_t = 3)]
    pub lm_kv_heads: usize,
    #[arg(long, default_value_t = 49152)]
    pub vocab: usize,
    /// A named LM shape with random weights (overrides --lm-layers etc.; ignored with --lm):
    /// smollm2-135m, llama-7b, llama-13b.
    #[arg(long, value_parser = ["smollm2-135m", "llama-7b", "llama-13b"])]
    pub lm_shape: Option<String>,
    /// Format of the LM's frozen matrices (random weights are made directly in it); auto: f32
    /// on the CPU, bf16 on a GPU.
    #[arg(long, default_value = "auto")]
    pub lm_dtype: crate::ops::WeightFormat,
    /// Format of the vision tower's frozen matrices.
    #[arg(long, default_value = "auto")]
    pub vision_dtype: crate::ops::WeightFormat,
    /// Measure the memory-space method alone (no input-space baseline): for large shapes.
    #[arg(long)]
    pub no_baseline: bool,
    /// Gradient checkpointing in the memory-space method's training step (the baseline's LoRA
    /// hooks cannot be recomputed, so it runs without).
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// The memory-space method measured against the input-space baseline.
    #[arg(long, default_value = "memvp", value_parser = ["memvp", "adem"])]
    pub method: String,
    /// Skip the backward/forward-ratio measurement.
    #[arg(long)]
    pub skip_fwd_bwd: bool,
    /// Also time each matrix product of the memory-space method's step alone, through memvp's
    /// gemm: the efficiency a step doing nothing else would reach, the bound for the step's own.
    #[arg(long)]
    pub products: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

fn stat(v: &[f64]) -> Stat {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    };
    Stat { median, min: *s.first().unwrap_or(&f64::NAN), max: *s.last().unwrap_or(&f64::NAN) }
}

#[derive(Debug, Default, Serialize)]
pub struct MethodResult {
    pub train_step_ms: f64,
    pub train_step_spread_ms: (f64, f64),
    pub prefill_ms: f64,
    pub prefill_spread_ms: (f64, f64),
    pub decode_ms_per_token: f64,
    pub decode_spread_ms: (f64, f64),
    pub peak_rss_mb: f64,
    /// Resident before the measured round (weights, allocator-held memory): the peak minus
    /// this is what the round itself added.
    pub rss_before_round_mb: f64,
    pub train_gflop: f64,
    pub train_gflops: f64,
    pub prefill_gflop: f64,
    pub trainable_parameters: usize,
    pub lm_sequence_length: usize,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
// SAFETY: this is glibc's `int malloc_trim(size_t pad)` (declared in <malloc.h>): `usize` is
// `size_t` and `i32` is `int` on the Linux targets this is compiled for (gnu env only).
unsafe extern "C" {
    fn malloc_trim(pad: usize) -> i32;
}

/// Returns freed heap to the system (so that the resident set is what is live), then resets
/// the peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS).
fn reset_peak_rss() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and has no preconditions: it locks the allocator's
    // arenas itself and only returns free memory to the system, so it may run at any time, on
    // any thread.
    unsafe {
        malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// (vocab, hidden, intermediate, layers, heads, kv heads, tied) of a named LM shape.
fn lm_shape(name: &str) -> Result<(usize, usize, usize, usize, usize, usize, bool)> {
    Ok(match name {
        "smollm2-135m" => (49152, 576, 1536, 30, 9, 3, true),
        "llama-7b" => (32000, 4096, 11008, 32, 32, 32, false),
        "llama-13b" => (32000, 5120, 13824, 40, 40, 40, false),
        other => bail!("--lm-shape {other}: unknown (smollm2-135m, llama-7b, llama-13b)"),
    })
}

/// A random LM (SmolLM2-shaped unless told otherwise), its frozen matrices made directly in
/// `--lm-dtype`, with a byte-level stand-in tokenizer.
pub fn random_lm(a: &BenchArgs) -> Result<LoadedLm> {
    let (vocab, d, inter, layers, heads, kv, tied) = match &a.lm_shape {
        Some(s) => lm_shape(s)?,
        None => (a.vocab, a.lm_hidden, a.lm_intermediate, a.lm_layers, a.lm_heads, a.lm_kv_heads, true),
    };
    let label = format!("random {}-shaped LM", a.lm_shape.as_deref().unwrap_or("SmolLM2"));
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: d,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: d / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: tied,
        hidden_act: Activation::Silu,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    };
    let model = Llama::load(&Weights::random_frozen(&label, 0, 0.02, a.lm_dtype, &crate::util::device()), cfg)?;
    let tok = Tok::from_json(&json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": {}, "merges": []}
    }))?;
    Ok(LoadedLm {
        model: Box::new(model),
        tok,
        eos: vec![2],
        path: "random".into(),
        fingerprint: "random".into(),
        tokenizer_fingerprint: None,
    })
}

/// The best throughput of large f32 matrix products on this machine (GFLOP/s).
pub fn matmul_peak_gflops() -> Result<f64> {
    let mut rng = Rng::new(7);
    let mut best = 0f64;
    for n in [1024usize, 2048] {
        let a = Tensor::from_vec(
            (0..n * n).map(|_| rng.uniform_f32()).collect::<Vec<_>>(),
            (n, n),
            &crate::util::device(),
        )?;
        let b = Tensor::from_vec(
            (0..n * n).map(|_| rng.uniform_f32()).collect::<Vec<_>>(),
            (n, n),
            &crate::util::device(),
        )?;
        let _ = a.matmul(&b)?;
        a.device().synchronize()?;
        for _ in 0..3 {
            let t = Instant::now();
            let c = a.matmul(&b)?;
            // A GPU queues the product: wait for it.
            c.device().synchronize()?;
            let dt = t.elapsed().as_secs_f64();
            drop(c);
            best = best.max(2.0 * (n as f64).powi(3) / dt / 1e9);
        }
    }
    Ok(best)
}

/// FLOPs of one training step and one prefill, counted from the shapes (multiply-add = 2).
/// Backward counts what the implementation computes: input gradients through frozen layers
/// from the first trained tensor on, both operand gradients for trained or activation products.
pub(super) fn count_flops(vlm: &Vlm, b: usize, t: usize, answer: usize) -> (f64, f64) {
    let Some(m) = vlm.lm().llama() else { return (f64::NAN, f64::NAN) };
    let c = &m.cfg;
    let (d, i, h, kv, hd, l, v) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.num_attention_heads as f64,
        c.num_key_value_heads as f64,
        c.head_dim as f64,
        c.num_hidden_layers as f64,
        c.vocab_size as f64,
    );
    let vc = &vlm.vision().model.cfg;
    let (cw, iv, p) = (vc.hidden_size as f64, vc.intermediate_size as f64, vc.patch_size as f64);
    let n = vc.num_patches() as f64;
    let nt = n + 1.0;
    let vl = vlm.vision().model.resolve_layer(-2).unwrap_or(vc.num_hidden_layers) as f64;
    let bf = b as f64;
    let proj = 2.0 * d * h * hd + 2.0 * 2.0 * d * kv * hd + 2.0 * h * hd * d;
    let ffn = 3.0 * 2.0 * d * i;
    let attn = |tt: f64| 2.0 * 2.0 * h * hd * tt * (tt + 1.0) / 2.0;
    let lm_layer = |tt: f64| tt * (proj + ffn) + attn(tt);
    let vis_layer = nt * (4.0 * 2.0 * cw * cw + 2.0 * 2.0 * cw * iv) + 2.0 * 2.0 * nt * nt * cw;
    let patch = n * 2.0 * 3.0 * p * p * cw;
    let head_train = 2.0 * d * v * answer as f64;
    let input_space = vlm.adapter.downcast::<InputSpace>();
    let lora = input_space.map(|x| &x.lora).or_else(|| vlm.adapter.downcast::<Lora>());
    // The memory-space methods: (slots, adapter width, projector width, projected tokens,
    // pooling FLOPs).
    let memory_space = if let Some(mv) = vlm.adapter.downcast::<Memvp>() {
        Some((mv.cfg.slots as f64, mv.cfg.vision_adapter_dim as f64, mv.cfg.hidden_proj as f64, n, 0.0))
    } else {
        vlm.adapter.downcast::<Adem>().map(|a| {
            let mm = a.key_embed.dims()[0] as f64;
            // The pooled entries, plus the CLS token through the second projector.
            let pooled: f64 = a.scales.iter().filter(|(_, p)| p.is_some()).map(|(s, _)| *s as f64).sum();
            let cls = if a.projector_cls.is_some() { 1.0 } else { 0.0 };
            (mm, a.cfg.vision_adapter_dim as f64, a.cfg.hidden_proj as f64, mm + cls, 2.0 * pooled * n * cw)
        })
    };
    if let Some((mm, r, hp, projected, pool)) = memory_space {
        let tt = t as f64;
        let branch = 2.0 * 2.0 * tt * mm * d;
        let adapters = vl * nt * 2.0 * 2.0 * cw * r;
        let projector = projected * 2.0 * (cw * hp + hp * d) + pool;
        let vis_fwd = patch + vl * vis_layer + adapters + projector;
        let lm_fwd = l * (lm_layer(tt) + branch) + head_train;
        // Backward: layers 1.. fully (input grads, attention 2x), every branch 2x,
        // the head's input grad; vision blocks' input grads, adapters and projector 2x.
        let lm_bwd = (l - 1.0) * (tt * (proj + ffn) + 2.0 * attn(tt)) + l * 2.0 * branch + head_train;
        let vis_bwd = (vl - 1.0) * (nt * (4.0 * 2.0 * cw * cw + 2.0 * 2.0 * cw * iv) + 2.0 * 2.0 * 2.0 * nt * nt * cw)
            + 2.0 * adapters
            + 2.0 * projector;
        let train = bf * (lm_fwd + vis_fwd + lm_bwd + vis_bwd);
        let prefill = bf * (l * (lm_layer(tt) + branch) + 2.0 * d * v + vis_fwd);
        (train, prefill)
    } else if let Some(lora) = lora {
        let is_vis = input_space.is_some();
        let tt = t as f64 + if is_vis { n } else { 0.0 };
        let r = lora.cfg.rank as f64;
        let lora_tok: f64 = lora
            .cfg
            .targets
            .iter()
            .map(|pj| match pj {
                crate::models::Proj::Q => 2.0 * r * (d + h * hd),
                crate::models::Proj::K | crate::models::Proj::V => 2.0 * r * (d + kv * hd),
                crate::models::Proj::O => 2.0 * r * (h * hd + d),
            })
            .sum();
        let hp = input_space.map(|x| x.cfg.hidden_proj as f64).unwrap_or(0.0);
        let projector = if is_vis { n * 2.0 * (cw * hp + hp * d) } else { 0.0 };
        let vis_fwd = if is_vis { patch + vl * vis_layer + projector } else { 0.0 };
        let lm_fwd = l * (lm_layer(tt) + tt * lora_tok) + head_train;
        let lm_bwd = l * (tt * (proj + ffn) + 2.0 * attn(tt) + 2.0 * tt * lora_tok) + head_train;
        let train = bf * (lm_fwd + vis_fwd + lm_bwd + 2.0 * projector);
        let prefill = bf * (l * (lm_layer(tt) + tt * lora_tok) + 2.0 * d * v + vis_fwd);
        (train, prefill)
    } else {
        (f64::NAN, f64::NAN)
    }
}

pub fn synthetic_batch(vlm: &Vlm, a: &BenchArgs, rng: &mut Rng) -> Result<Batch> {
    let (b, t) = (a.batch_size, a.text_tokens);
    if vlm.lm().model.decoder_start().is_some() {
        bail!("bench supports decoder-only LMs")
    }
    let vocab = vlm.lm().model.vocab_size();
    let ids: Vec<u32> = (0..b * t).map(|_| 3 + rng.below(vocab - 3) as u32).collect();
    let (mut pos, mut tgt) = (Vec::new(), Vec::new());
    for r in 0..b {
        for j in t - a.answer_tokens - 1..t - 1 {
            pos.push((r * t + j) as u32);
            tgt.push(ids[r * t + j + 1]);
        }
    }
    let s = vlm.vision().model.cfg.image_size;
    let px: Vec<f32> = (0..b * 3 * s * s).map(|_| rng.normal() as f32).collect();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), &crate::util::device())?,
        input_lens: vec![t; b],
        decoder_ids: None,
        loss_positions: pos,
        loss_targets: tgt,
        pixels: Some(Tensor::from_vec(px, (b, 3, s, s), &crate::util::device())?),
        indicator: vec![1.0; b],
        skipped: 0,
        n: b,
    })
}

struct Phase {
    train: Vec<f64>,
    prefill: Vec<f64>,
    decode: Vec<f64>,
    peak: f64,
    base: f64,
}

pub fn settings(method: &str) -> AdapterSettings {
    AdapterSettings {
        method: method.into(),
        sections: Default::default(),
        prompt: Default::default(),
        max_len: 4096,
        image_blind: false,
        seed: 0,
    }
}

/// The bench's batch, again and again.
struct Repeat(Batch);

impl Batches<Batch> for Repeat {
    fn steps_per_epoch(&self) -> usize {
        usize::MAX / 2
    }
    fn stream(&self, _epoch: usize, _start: usize, _shard: Shard) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        Box::new(std::iter::repeat_with(|| Ok(self.0.clone())))
    }
}

/// A trainer at a constant learning rate of 1e-4 with the released AdamW settings.
fn trainer<'a>(vlm: &'a Vlm, data: &'a Repeat) -> Result<Trainer<'a, VlmTask<'a>>> {
    let s = OptimSettings {
        epochs: 1,
        lr: Some(1e-4),
        min_lr: 1e-4,
        warmup_epochs: 0.0,
        max_bad_steps: u64::MAX,
        ..OptimSettings::default()
    };
    Trainer::new(VlmTask { vlm }, data, &s)
}

fn one_round(tr: &mut Trainer<'_, VlmTask<'_>>, batch: &Batch, a: &BenchArgs, ph: &mut Phase) -> Result<()> {
    // Training step: forward, backward, optimizer.
    let t0 = Instant::now();
    tr.step()?;
    // On a GPU the optimizer's updates are still queued when the step returns.
    crate::util::device().synchronize()?;
    ph.train.push(t0.elapsed().as_secs_f64() * 1e3);
    let vlm = tr.task.vlm;
    // Prefill (vision tower, visual memory or visual tokens, LM over the prompt), then each
    // decoding step timed on its own.
    let ids = batch.input_ids.to_vec2::<u32>()?;
    let prompts: Vec<Vec<u32>> = ids.iter().map(|r| r[..a.text_tokens - a.answer_tokens].to_vec()).collect();
    let t1 = Instant::now();
    let (pre, per_token) = vlm.with_stepper(&prompts, batch.pixels.as_ref(), &batch.indicator, &mut |st, first| {
        let pre = t1.elapsed().as_secs_f64() * 1e3;
        let mut next: Vec<u32> = first.argmax(candle_core::D::Minus1)?.to_vec1()?;
        let t2 = Instant::now();
        for _ in 0..a.decode_tokens {
            next = st.step(&next)?.argmax(candle_core::D::Minus1)?.to_vec1()?;
        }
        Ok((pre, t2.elapsed().as_secs_f64() * 1e3 / a.decode_tokens.max(1) as f64))
    })?;
    ph.prefill.push(pre);
    ph.decode.push(per_token);
    Ok(())
}

/// A small trained tensor inside a frozen LM: a bias added to the first block's FFN output, so
/// that the backward pass runs through every block.
struct InnerBias {
    layer: usize,
    bias: Var,
}

impl LmHooks for InnerBias {
    fn ffn_branch(&self, _s: Site, layer: usize, u: &Tensor) -> Result<Option<Tensor>> {
        if layer == self.layer { Ok(Some(u.zeros_like()?.broadcast_add(self.bias.as_tensor())?)) } else { Ok(None) }
    }
    fn modifies_projections(&self) -> bool {
        false
    }
}

/// Forward and backward times (ms) of the LM on `b × t` tokens with one small trained tensor
/// in its first block; `candle_matmul` switches the frozen linears to candle's matmul.
fn fwd_bwd(m: &Llama, b: usize, t: usize, reps: usize, candle_matmul: bool) -> Result<(f64, f64)> {
    ops::use_candle_matmul(candle_matmul);
    let mut rng = Rng::new(3);
    let ids = Tensor::from_vec(
        (0..b * t).map(|_| 3 + rng.below(m.cfg.vocab_size - 3) as u32).collect::<Vec<_>>(),
        (b, t),
        &crate::util::device(),
    )?;
    let hooks = InnerBias { layer: 0, bias: Var::zeros(m.cfg.hidden_size, DType::F32, &crate::util::device())? };
    let (mut f, mut bw) = (Vec::new(), Vec::new());
    for rep in 0..reps + 1 {
        let t0 = Instant::now();
        let h = m.forward_embeds(&m.embed(&ids)?, &Positions::From(0), None, None, &hooks)?;
        let loss = h.sqr()?.mean_all()?;
        loss.device().synchronize()?;
        let tf = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let g = loss.backward()?;
        loss.device().synchronize()?;
        let tb = t1.elapsed().as_secs_f64() * 1e3;
        drop(g);
        if rep > 0 {
            f.push(tf);
            bw.push(tb);
        }
    }
    ops::use_candle_matmul(false);
    Ok((stat(&f).median, stat(&bw).median))
}

impl BenchArgs {
    /// Shapes that cannot make a model or a batch are refused up front.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("lm-layers", self.lm_layers),
            ("lm-hidden", self.lm_hidden),
            ("lm-intermediate", self.lm_intermediate),
            ("lm-heads", self.lm_heads),
            ("lm-kv-heads", self.lm_kv_heads),
            ("vocab", self.vocab),
            ("text-tokens", self.text_tokens),
            ("answer-tokens", self.answer_tokens),
            ("batch-size", self.batch_size),
            ("iters", self.iters),
        ];
        for (name, v) in sizes {
            if v == 0 {
                bail!("--{name} 0: must be at least 1")
            }
        }
        if !self.lm_hidden.is_multiple_of(self.lm_heads) {
            bail!("--lm-hidden {} is not a multiple of --lm-heads {}", self.lm_hidden, self.lm_heads)
        }
        if !self.lm_heads.is_multiple_of(self.lm_kv_heads) {
            bail!("--lm-heads {} is not a multiple of --lm-kv-heads {}", self.lm_heads, self.lm_kv_heads)
        }
        if self.answer_tokens >= self.text_tokens {
            bail!("--answer-tokens {} must be fewer than --text-tokens {}", self.answer_tokens, self.text_tokens)
        }
        if self.vocab < 4 {
            bail!("--vocab {}: must be at least 4", self.vocab)
        }
        Ok(())
    }
}

pub fn run(a: &BenchArgs) -> Result<serde_json::Value> {
    a.validate()?;
    let dev = crate::util::device();
    let lm = match &a.lm {
        Some(p) => load_lm(p, DType::F32, a.lm_dtype, &dev)?,
        None => random_lm(a)?,
    };
    if lm.llama().is_none() {
        bail!("memvp bench measures decoder-only LMs (LLaMA family)")
    }
    let vision = load_vision(&a.vision, DType::F32, a.vision_dtype, &dev)?;
    let n_vis = vision.model.cfg.num_patches();
    let peak = matmul_peak_gflops()?;
    // Both methods' adapters on the same frozen backbones.
    let base = Arc::new(Base { vision, lm });
    let mut vlms = vec![Vlm::new(base.clone(), &settings(&a.method))?];
    vlms[0].grad_checkpoint = a.grad_checkpoint;
    if !a.no_baseline {
        vlms.push(Vlm::new(base.clone(), &settings("input-space"))?);
    }
    let mut rng = Rng::new(11);
    let batch = synthetic_batch(&vlms[0], a, &mut rng)?;
    let data = Repeat(batch.clone());
    let mut phases: Vec<Phase> =
        vlms.iter().map(|_| Phase { train: vec![], prefill: vec![], decode: vec![], peak: 0.0, base: 0.0 }).collect();
    let mut trainers = vlms.iter().map(|v| trainer(v, &data)).collect::<Result<Vec<_>>>()?;
    let flops: Vec<_> = vlms.iter().map(|v| count_flops(v, a.batch_size, a.text_tokens, a.answer_tokens)).collect();
    let params: Vec<_> = vlms.iter().map(|v| v.cfg.trainable_parameters).collect();
    for round in 0..a.warmup + a.iters {
        for (k, tr) in trainers.iter_mut().enumerate() {
            let mut tmp = Phase { train: vec![], prefill: vec![], decode: vec![], peak: 0.0, base: 0.0 };
            let ph = if round < a.warmup { &mut tmp } else { &mut phases[k] };
            one_round(tr, &batch, a, ph)?;
        }
    }
    // Peak memory: one more, untimed round per method after returning freed heap to the
    // system (trimming inside the timed rounds would charge page faults to the timings).
    for (k, tr) in trainers.iter_mut().enumerate() {
        reset_peak_rss();
        phases[k].base = crate::util::rss_mb();
        let mut tmp = Phase { train: vec![], prefill: vec![], decode: vec![], peak: 0.0, base: 0.0 };
        one_round(tr, &batch, a, &mut tmp)?;
        phases[k].peak = crate::util::peak_rss_mb();
    }
    let mut results = Vec::new();
    for (k, ph) in phases.iter().enumerate() {
        let (tr, pf, dc) = (stat(&ph.train), stat(&ph.prefill), stat(&ph.decode));
        results.push(MethodResult {
            train_step_ms: tr.median,
            train_step_spread_ms: (tr.min, tr.max),
            prefill_ms: pf.median,
            prefill_spread_ms: (pf.min, pf.max),
            decode_ms_per_token: dc.median,
            decode_spread_ms: (dc.min, dc.max),
            peak_rss_mb: ph.peak,
            rss_before_round_mb: ph.base,
            train_gflop: flops[k].0 / 1e9,
            train_gflops: flops[k].0 / 1e9 / (tr.median / 1e3),
            prefill_gflop: flops[k].1 / 1e9,
            trainable_parameters: params[k],
            lm_sequence_length: a.text_tokens + if k == 1 { n_vis } else { 0 },
        });
    }
    let fb = if a.skip_fwd_bwd {
        serde_json::Value::Null
    } else {
        let m = base.lm.llama().context("the bench's LM is not a LLaMA-family model")?;
        let (f, b) = fwd_bwd(m, a.batch_size, a.text_tokens, a.iters.max(2), false)?;
        let (fc, bc) = fwd_bwd(m, a.batch_size, a.text_tokens, a.iters.max(2), true)?;
        json!({
            "tokens": a.batch_size * a.text_tokens,
            "trained": "one bias vector added in the first block (the backward pass runs through every block)",
            "memvp_kernels": {"forward_ms": f, "backward_ms": b, "backward_over_forward": b / f},
            "candle_matmul_linears": {"forward_ms": fc, "backward_ms": bc, "backward_over_forward": bc / fc},
        })
    };
    let products = if a.products {
        let ps = super::products::memory_space_products(&vlms[0], a.batch_size, a.text_tokens, a.answer_tokens)
            .context("--products: the step's products are listed for MemVP and ADEM-VL on a LLaMA-family LM")?;
        let timed = super::products::time_products(&ps, 5);
        let flop: f64 = ps.iter().map(|p| p.flop()).sum();
        let ms: f64 = timed.iter().map(|t| t.ms * t.product.count as f64).sum();
        json!({
            "gflop": flop / 1e9,
            "ms": ms,
            "gflops": flop / ms / 1e6,
            "bound_efficiency": flop / ms / 1e6 / peak,
            "step_over_products": results[0].train_step_ms / ms,
            "shapes": timed,
        })
    } else {
        serde_json::Value::Null
    };
    let mv = &results[0];
    let (is, ratios) = match results.get(1) {
        Some(is) => (
            json!(is),
            json!({
                "train_step": is.train_step_ms / mv.train_step_ms,
                "prefill": is.prefill_ms / mv.prefill_ms,
                "decode": is.decode_ms_per_token / mv.decode_ms_per_token,
                "train_flops": is.train_gflop / mv.train_gflop,
            }),
        ),
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };
    let lm_cfg = &base.lm.llama().context("the bench's LM is not a LLaMA-family model")?.cfg;
    Ok(json!({
        "machine": machine(),
        "device": format!("{:?}", crate::util::device()),
        "settings": a,
        "lm": {
            "layers": lm_cfg.num_hidden_layers, "hidden": lm_cfg.hidden_size,
            "intermediate": lm_cfg.intermediate_size, "vocab": lm_cfg.vocab_size,
            "dtype": a.lm_dtype.resolve(&crate::util::device()), "vision_dtype": a.vision_dtype.resolve(&crate::util::device()),
        },
        "visual_tokens": n_vis,
        "matmul_peak_gflops": peak,
        "memory_method": a.method,
        (a.method.as_str()): mv,
        "input_space": is,
        "ratios": ratios,
        "memvp_train_efficiency": mv.train_gflops / peak,
        "backward_forward": fb,
        "products": products,
    }))
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpu}, {} threads", candle_core::utils::get_num_threads())
}

pub fn print_table(v: &serde_json::Value) {
    println!("memvp bench on {}", v["machine"].as_str().unwrap_or(""));
    println!(
        "matrix-product peak: {:.1} GFLOP/s (best of 1024^3 and 2048^3 f32 products)",
        v["matmul_peak_gflops"].as_f64().unwrap_or(0.0)
    );
    let lm = &v["lm"];
    println!(
        "LM: {} layers x {} (FFN {}, vocab {}), frozen matrices in {}; vision tower's in {}",
        lm["layers"],
        lm["hidden"],
        lm["intermediate"],
        lm["vocab"],
        lm["dtype"].as_str().unwrap_or("?"),
        lm["vision_dtype"].as_str().unwrap_or("?")
    );
    let method = v["memory_method"].as_str().unwrap_or("memvp");
    let label = if method == "adem" { "ADEM-VL" } else { "MemVP" };
    println!("{:<26} {:>14} {:>14} {:>10}", "", label, "input-space", "ratio");
    let row = |name: &str, key: &str, rkey: Option<&str>| {
        let a = v[method][key].as_f64().unwrap_or(f64::NAN);
        // `--no-baseline` measures the memory-space method alone.
        let b = v["input_space"][key].as_f64().map(|b| format!("{b:.2}")).unwrap_or_else(|| "-".into());
        let r = rkey.and_then(|k| v["ratios"][k].as_f64()).map(|x| format!("{x:.2}x")).unwrap_or_default();
        println!("{name:<26} {a:>14.2} {b:>14} {r:>10}");
    };
    row("LM sequence length", "lm_sequence_length", None);
    row("trainable parameters", "trainable_parameters", None);
    row("train step (ms)", "train_step_ms", Some("train_step"));
    row("prefill (ms)", "prefill_ms", Some("prefill"));
    row("decode (ms/token)", "decode_ms_per_token", Some("decode"));
    row("peak RSS (MB)", "peak_rss_mb", None);
    row("train GFLOP/step", "train_gflop", Some("train_flops"));
    row("train GFLOP/s", "train_gflops", None);
    println!(
        "{label} training step at {:.0}% of the matrix-product peak",
        100.0 * v["memvp_train_efficiency"].as_f64().unwrap_or(0.0)
    );
    if let Some(p) = v.get("products").filter(|x| !x.is_null()) {
        println!(
            "its matrix products alone, each at memvp's best rate for its shape: {:.0} ms, {:.0}% of the peak \
             (the most the step could reach); the step takes {:.2}x that",
            p["ms"].as_f64().unwrap_or(f64::NAN),
            100.0 * p["bound_efficiency"].as_f64().unwrap_or(f64::NAN),
            p["step_over_products"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(fb) = v.get("backward_forward").filter(|x| !x.is_null()) {
        println!(
            "backward/forward with one small trained tensor ({} tokens): {:.2} with memvp's kernels, {:.2} with candle's matmul linears",
            fb["tokens"],
            fb["memvp_kernels"]["backward_over_forward"].as_f64().unwrap_or(0.0),
            fb["candle_matmul_linears"]["backward_over_forward"].as_f64().unwrap_or(0.0)
        );
    }
}
