//! `memvp quickstart`: the whole method on a laptop, with no downloads. It renders its own
//! image-question set (coloured shapes), builds a word-level tokenizer and a tiny LLaMA,
//! pre-trains that LM briefly on the set's text alone (questions and answers, no images) and
//! freezes it, as real MemVP starts from a pretrained LM, then trains MemVP with a random
//! frozen vision tower and, for comparison, the same model with every image indicator at 0
//! (image-blind control), and evaluates both on held-out images.

use super::run::EpochBatches;
use super::settings::RunSettings;
use crate::adapters::memvp::MemorySites;
use crate::checkpoint::{Cfg, Weights};
use crate::data::batch::{Batch, BatchBuilder, ImageCache, TextLayout, encode};
use crate::data::image::{Norm, Preprocess};
use crate::data::{self, DataOptions};
use crate::models::load::model_from_config;
use crate::models::{LanguageModel, NoHooks, TeacherForcing};
use crate::ops;
use crate::rng::Rng;
use crate::train::{self, LogSettings, OptimSettings, Task, TrainSettings};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    T5,
    Bart,
}

impl Family {
    /// Special tokens (in id order), EOS, and the post-processor's template.
    fn specials(self) -> (&'static [&'static str], u32, serde_json::Value) {
        let tok = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
        let seq = json!({"Sequence": {"id": "A", "type_id": 0}});
        match self {
            Family::Llama => (&["<unk>", "<s>", "</s>"], 2, json!([tok("<s>"), seq])),
            Family::T5 => (&["<pad>", "</s>", "<unk>"], 1, json!([seq, tok("</s>")])),
            Family::Bart => (&["<s>", "<pad>", "</s>", "<unk>"], 2, json!([tok("<s>"), seq, tok("</s>")])),
        }
    }

    fn config(self, vocab: usize, d: usize, layers: usize) -> serde_json::Value {
        match self {
            Family::Llama => json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
                "intermediate_size": 2 * d, "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": d / 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
                "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2
            }),
            Family::T5 => json!({
                "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": vocab, "d_model": d,
                "d_kv": d / 4, "d_ff": 2 * d, "num_layers": layers, "num_decoder_layers": layers, "num_heads": 4,
                "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
                "feed_forward_proj": "relu", "tie_word_embeddings": true, "decoder_start_token_id": 0,
                "pad_token_id": 0, "eos_token_id": 1
            }),
            Family::Bart => json!({
                "architectures": ["BartForConditionalGeneration"], "model_type": "bart", "vocab_size": vocab, "d_model": d,
                "encoder_layers": layers, "decoder_layers": layers, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                "encoder_ffn_dim": 2 * d, "decoder_ffn_dim": 2 * d, "activation_function": "gelu",
                "max_position_embeddings": 128, "scale_embedding": false, "tie_word_embeddings": true,
                "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2, "forced_eos_token_id": 2
            }),
        }
    }
}

/// The quickstart's own settings (printed with its result). The visual scale and learning
/// rate differ from the released 0.01 / 1.1e-3, which are tuned for 7B-scale LMs.
#[derive(Clone, Debug, Serialize, clap::Args)]
pub struct QuickstartSettings {
    /// Language-model family of the tiny LM.
    #[arg(long, value_enum, default_value = "llama")]
    pub family: Family,
    /// Images in the training split (2 questions each).
    #[arg(long, default_value_t = 800)]
    pub train_images: usize,
    #[arg(long, default_value_t = 100)]
    pub test_images: usize,
    /// Side of the rendered images (the vision tower resizes them to its own size).
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// Vision tower: random:<preset> or a CLIP directory.
    #[arg(long, default_value = "random:tiny")]
    pub vision: String,
    #[arg(long, default_value_t = 64)]
    pub lm_hidden: usize,
    #[arg(long, default_value_t = 2)]
    pub lm_layers: usize,
    #[arg(long, default_value_t = 300)]
    pub lm_pretrain_steps: u64,
    #[arg(long, default_value_t = 3e-3)]
    pub lm_pretrain_lr: f64,
    /// MemVP (and control) training steps.
    #[arg(long, default_value_t = 4000)]
    pub steps: u64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1.0)]
    pub visual_scale: f64,
    /// MemVP's memory-branch scale s.
    #[arg(long, default_value_t = 0.1)]
    pub adapter_scale: f64,
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Memory slots (at least the vision tower's patch count).
    #[arg(long, default_value_t = 16)]
    pub slots: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Encoder-decoder LMs: which stacks get the memory.
    #[arg(long, default_value = "both", value_parser = super::cli::serde_enum::<MemorySites>)]
    pub memory_sites: MemorySites,
}

impl Default for QuickstartSettings {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            s: QuickstartSettings,
        }
        P::parse_from(["quickstart"]).s
    }
}

#[derive(Serialize)]
pub struct QuickstartResult {
    pub memvp_accuracy: f64,
    pub control_accuracy: f64,
    pub memvp_per_type: serde_json::Value,
    pub control_per_type: serde_json::Value,
    pub lm_pretrain_loss: f64,
    pub seconds: f64,
    pub out: PathBuf,
    pub settings: QuickstartSettings,
}

/// A word-level tokenizer over the words of the set, with the family's special tokens.
fn build_tokenizer(dir: &Path, texts: &[String], family: Family) -> Result<PathBuf> {
    let mut words = BTreeSet::new();
    for t in texts {
        for w in t.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
            words.insert(w.to_lowercase());
        }
        for c in t.chars().filter(|c| !c.is_alphanumeric() && !c.is_whitespace()) {
            words.insert(c.to_string());
        }
    }
    let (specials, _, template) = family.specials();
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, sp) in specials.iter().enumerate() {
        vocab.insert(sp.to_string(), json!(i));
        added.push(json!({"id": i, "content": sp, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    for w in words {
        let n = vocab.len();
        vocab.entry(w).or_insert(json!(n));
    }
    let mut special_map = serde_json::Map::new();
    for sp in specials.iter().filter(|sp| template.to_string().contains(&format!("\"{sp}\""))) {
        let id = vocab[*sp].clone();
        special_map.insert(sp.to_string(), json!({"id": sp, "ids": [id], "tokens": [sp]}));
    }
    let unk = specials.iter().find(|s| s.contains("unk")).unwrap();
    let v = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing", "single": template, "pair": template, "special_tokens": special_map},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk}
    });
    let p = dir.join("tokenizer.json");
    crate::util::write_json_atomic(&p, &v)?;
    Ok(p)
}

/// Plain language-model training of every weight on the answers of the text (no images).
struct LmPretrain {
    vars: Vec<(String, Var)>,
    model: Box<dyn LanguageModel>,
    dir: PathBuf,
}

impl Task for LmPretrain {
    type Batch = Batch;
    fn params(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }
    fn loss(&mut self, b: &Batch, _rng: &mut Rng) -> Result<Tensor> {
        let idx = Tensor::from_slice(&b.loss_positions, b.loss_positions.len(), b.input_ids.device())?;
        let tf = TeacherForcing {
            input_ids: &b.input_ids,
            input_lens: &b.input_lens,
            decoder_ids: b.decoder_ids.as_ref(),
            prefix: None,
        };
        let h = self.model.teacher_forcing(&tf, &NoHooks)?.h;
        let (n, t, d) = h.dims3()?;
        let logits = self.model.logits(&h.reshape((n * t, d))?.index_select(&idx, 0)?)?;
        Ok(ops::cross_entropy(&logits, &b.loss_targets)?)
    }
    fn batch_size(&self, b: &Batch) -> (usize, usize) {
        (b.n, 0)
    }
    /// The whole model, always into the LM's own directory.
    fn save_adapter(&self, _dir: &Path) -> Result<()> {
        save_lm(&self.vars, &self.dir)
    }
}

fn save_lm(vars: &[(String, Var)], dir: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    crate::checkpoint::save_safetensors_atomic(
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into()),
        &dir.join("model.safetensors"),
    )
}

/// Tensors by name.
type Named = Vec<(String, Var)>;

/// A random model whose weights are trainable, from its config.json.
fn random_lm(cfg_path: &Path, seed: u64) -> Result<(Box<dyn LanguageModel>, Named)> {
    let cfg = Cfg::load(cfg_path)?;
    let w = Weights::random("quickstart-lm", seed, 0.02, DType::F32, &crate::util::device());
    let (model, _) = model_from_config(&cfg, &w)?;
    Ok((model, w.made()))
}

fn quiet_settings(steps: u64, batch: usize, lr: f64, seed: u64) -> TrainSettings {
    TrainSettings {
        optim: OptimSettings {
            epochs: 1000,
            max_steps: Some(steps),
            batch_size: batch,
            lr: Some(lr),
            warmup_epochs: 0.0,
            weight_decay: 0.0,
            seed,
            ..OptimSettings::default()
        },
        log: LogSettings { log_every: 0, keep_checkpoints: 1, ..LogSettings::default() },
    }
}

impl QuickstartSettings {
    /// Sizes that would make an empty model or data set are refused up front.
    pub fn validate(&self) -> Result<()> {
        let at_least_1 = [
            ("train-images", self.train_images),
            ("test-images", self.test_images),
            ("image-size", self.image_size),
            ("lm-layers", self.lm_layers),
            ("batch-size", self.batch_size),
            ("slots", self.slots),
            ("steps", self.steps as usize),
            ("lm-pretrain-steps", self.lm_pretrain_steps as usize),
        ];
        for (name, v) in at_least_1 {
            if v == 0 {
                anyhow::bail!("--{name} 0: must be at least 1")
            }
        }
        if self.lm_hidden == 0 || !self.lm_hidden.is_multiple_of(4) {
            anyhow::bail!("--lm-hidden {}: must be a positive multiple of 4 (the tiny LM has 4 heads)", self.lm_hidden)
        }
        for (name, v) in [("lr", self.lr), ("lm-pretrain-lr", self.lm_pretrain_lr)] {
            if !(v.is_finite() && v > 0.0) {
                anyhow::bail!("--{name} {v}: must be a finite number above 0")
            }
        }
        for (name, v) in [("visual-scale", self.visual_scale), ("adapter-scale", self.adapter_scale)] {
            if !v.is_finite() {
                anyhow::bail!("--{name} {v}: must be a finite number")
            }
        }
        if let Some(c) = self.clip_grad
            && !(c.is_finite() && c > 0.0)
        {
            anyhow::bail!("--clip-grad {c}: must be a finite number above 0")
        }
        Ok(())
    }
}

pub fn run(out: &Path, s: &QuickstartSettings, verbose: bool) -> Result<QuickstartResult> {
    s.validate()?;
    let start = std::time::Instant::now();
    let data_dir = out.join("data");
    let lm_dir = out.join("lm");
    std::fs::create_dir_all(&lm_dir).with_context(|| format!("{}: cannot create", lm_dir.display()))?;
    let data_file = data::synthetic::write_shapes(&data_dir, s.train_images, s.test_images, s.image_size, s.seed)?;
    let spec = format!("jsonl:{}", data_file.display());
    let ds = data::open(&spec, &DataOptions::default())?;
    let train = ds.samples("train")?;
    let texts: Vec<String> = train.iter().flat_map(|x| [x.prompt.clone(), x.answer.clone()]).collect();
    build_tokenizer(&lm_dir, &texts, s.family)?;
    let tok = crate::checkpoint::Tok::from_file(&lm_dir.join("tokenizer.json"))?;
    let (_, eos, _) = s.family.specials();
    crate::util::write_json_atomic(
        &lm_dir.join("config.json"),
        &s.family.config(tok.vocab_size(), s.lm_hidden, s.lm_layers),
    )?;
    // 1. Pre-train the tiny LM on the text alone, then keep it as a Hugging Face directory.
    let (model, vars) = random_lm(&lm_dir.join("config.json"), s.seed)?;
    let layout = match model.decoder_start() {
        None => TextLayout::DecoderOnly,
        Some(decoder_start) => TextLayout::EncoderDecoder { decoder_start },
    };
    // The builder is image-blind: the LM sees the text alone.
    let enc: Vec<_> = train.iter().map(|x| encode(&tok, x, eos, 128, None)).collect::<Result<_>>()?;
    let builder = Arc::new(BatchBuilder {
        samples: enc,
        cache: ImageCache::new(Preprocess { size: s.image_size, norm: Norm::Imagenet }, 0),
        layout,
        device: crate::util::device(),
        skip_bad_images: false,
        blind: true,
    });
    let pre = LmPretrain { vars, model, dir: lm_dir.clone() };
    let pre_run = out.join("lm-pretrain");
    let _ = std::fs::remove_dir_all(&pre_run);
    let batches = EpochBatches { builder, batch_size: 32, seed: s.seed };
    let pre_vars = pre.vars.clone();
    let ps = train::train(
        pre,
        &batches,
        &quiet_settings(s.lm_pretrain_steps, 32, s.lm_pretrain_lr, s.seed),
        &pre_run,
        false,
        "LM pre-training (text only)",
    )?;
    save_lm(&pre_vars, &lm_dir)?;
    if verbose {
        eprintln!(
            "[{:5.1}s] tiny LM pre-trained on text only: loss {:.3}",
            start.elapsed().as_secs_f64(),
            ps.final_loss
        );
    }
    // 2. MemVP and the image-blind control on the frozen LM.
    let test = ds.samples("test")?;
    let mut results = Vec::new();
    for blind in [false, true] {
        let mut rc = RunSettings::default();
        rc.model.vision = s.vision.clone();
        rc.model.lm = lm_dir.display().to_string();
        rc.data.source = spec.clone();
        rc.data.max_len = 128;
        rc.method.name = "memvp".into();
        rc.method.image_blind = blind;
        let q = quiet_settings(s.steps, s.batch_size, s.lr, s.seed);
        (rc.optim, rc.log) = (q.optim, q.log);
        rc.optim.warmup_epochs = 0.1;
        rc.optim.epochs = ((s.steps as usize * s.batch_size).div_ceil(train.len())).max(1);
        rc.optim.clip_grad = s.clip_grad;
        rc.set("memvp.visual_scale", json!(s.visual_scale));
        rc.set("memvp.adapter_scale", json!(s.adapter_scale));
        rc.set("memvp.memory_sites", serde_json::to_value(s.memory_sites)?);
        rc.set("memvp.slots", json!(s.slots));
        let run_dir = out.join(if blind { "control" } else { "memvp" });
        let _ = std::fs::remove_dir_all(&run_dir);
        let rep = super::run::train_run(&rc, &run_dir, super::run::Start::New)?;
        let vlm = crate::vlm::Vlm::from_run(&run_dir, None, None, Default::default())?;
        let ev = super::run::evaluate(&vlm, ds.as_ref(), test.clone(), 64, false, Some(&run_dir))?;
        if verbose {
            eprintln!(
                "[{:5.1}s] {}: final loss {:.3}, test accuracy {:.1}%",
                start.elapsed().as_secs_f64(),
                if blind { "image-blind control" } else { "MemVP" },
                rep.summary.final_loss,
                ev.metrics["accuracy"].as_f64().unwrap_or(0.0)
            );
        }
        results.push(ev);
    }
    let acc = |e: &super::run::EvalReport| e.metrics["accuracy"].as_f64().unwrap_or(0.0) / 100.0;
    Ok(QuickstartResult {
        memvp_accuracy: acc(&results[0]),
        control_accuracy: acc(&results[1]),
        memvp_per_type: results[0].metrics["per_type"].clone(),
        control_per_type: results[1].metrics["per_type"].clone(),
        lm_pretrain_loss: ps.final_loss,
        seconds: start.elapsed().as_secs_f64(),
        out: out.to_path_buf(),
        settings: s.clone(),
    })
}
