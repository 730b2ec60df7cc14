//! `memvp quickstart`: the whole method on a laptop, with no downloads. It renders its own
//! image-question set (coloured shapes), builds a word-level tokenizer and a tiny LLaMA,
//! pre-trains that LM briefly on the set's text alone (questions and answers, no images) and
//! freezes it, as real MemVP starts from a pretrained LM, then trains MemVP with a random
//! frozen vision tower and, for comparison, the same model with every image indicator at 0
//! (image-blind control), and evaluates both on held-out images.

use crate::data::batch::{Batch, BatchBuilder, ImageCache, TextLayout, encode};
use crate::data::{self, DataOptions};
use crate::image::{Norm, Preprocess};
use crate::models::NoHooks;
use crate::models::llama::{Llama, LlamaConfig, Positions};
use crate::ops::{self, Activation};
use crate::rng::Rng;
use crate::run::{EpochBatches, RunConfig};
use crate::train::{self, Task, TrainSettings};
use crate::vlm::Method;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The quickstart's own settings (printed with its result). The visual scale and learning
/// rate differ from the released 0.01 / 1.1e-3, which are tuned for 7B-scale LMs.
#[derive(Clone, Debug, Serialize, clap::Args)]
pub struct QuickstartSettings {
    /// Images in the training split (4 questions each).
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

/// A word-level tokenizer over the words of the set.
fn build_tokenizer(dir: &Path, texts: &[String]) -> Result<PathBuf> {
    let mut words = BTreeSet::new();
    for t in texts {
        for w in t
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            words.insert(w.to_lowercase());
        }
        for c in t
            .chars()
            .filter(|c| !c.is_alphanumeric() && !c.is_whitespace())
        {
            words.insert(c.to_string());
        }
    }
    let mut vocab = serde_json::Map::new();
    for (i, s) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for w in words {
        let n = vocab.len();
        vocab.entry(w).or_insert(json!(n));
    }
    let v = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let p = dir.join("tokenizer.json");
    crate::util::write_json_atomic(&p, &v)?;
    Ok(p)
}

fn lm_config(vocab: usize, s: &QuickstartSettings) -> LlamaConfig {
    LlamaConfig {
        vocab_size: vocab,
        hidden_size: s.lm_hidden,
        intermediate_size: s.lm_hidden * 2,
        num_hidden_layers: s.lm_layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: s.lm_hidden / 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        hidden_act: Activation::Silu,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Random LLaMA weights (std 0.02, norms at 1) as trainable variables.
fn random_llama(c: &LlamaConfig, seed: u64) -> Result<Vec<(String, Var)>> {
    let mut rng = Rng::derive(seed, "quickstart-lm");
    let dev = Device::Cpu;
    let mut v = Vec::new();
    let mut normal = |name: String, shape: &[usize], v: &mut Vec<(String, Var)>| -> Result<()> {
        let n: usize = shape.iter().product();
        let x: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.02) as f32).collect();
        v.push((name, Var::from_tensor(&Tensor::from_vec(x, shape, &dev)?)?));
        Ok(())
    };
    let (d, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    normal(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, d],
        &mut v,
    )?;
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        normal(
            format!("{p}.self_attn.q_proj.weight"),
            &[c.num_attention_heads * hd, d],
            &mut v,
        )?;
        normal(
            format!("{p}.self_attn.k_proj.weight"),
            &[c.num_key_value_heads * hd, d],
            &mut v,
        )?;
        normal(
            format!("{p}.self_attn.v_proj.weight"),
            &[c.num_key_value_heads * hd, d],
            &mut v,
        )?;
        normal(
            format!("{p}.self_attn.o_proj.weight"),
            &[d, c.num_attention_heads * hd],
            &mut v,
        )?;
        normal(format!("{p}.mlp.gate_proj.weight"), &[i, d], &mut v)?;
        normal(format!("{p}.mlp.up_proj.weight"), &[i, d], &mut v)?;
        normal(format!("{p}.mlp.down_proj.weight"), &[d, i], &mut v)?;
        for n in ["input_layernorm", "post_attention_layernorm"] {
            v.push((
                format!("{p}.{n}.weight"),
                Var::from_tensor(&Tensor::ones(d, DType::F32, &dev)?)?,
            ));
        }
    }
    v.push((
        "model.norm.weight".into(),
        Var::from_tensor(&Tensor::ones(d, DType::F32, &dev)?)?,
    ));
    Ok(v)
}

/// Plain language-model training of every weight on the answers of the text (no images).
struct LmPretrain {
    vars: Vec<(String, Var)>,
    model: Llama,
    cfg: LlamaConfig,
    dir: PathBuf,
}

impl Task for LmPretrain {
    type Batch = Batch;
    fn params(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }
    fn loss(&mut self, b: &Batch, _rng: &mut Rng) -> Result<Tensor> {
        let (n, t) = b.input_ids.dims2()?;
        let h = self.model.forward_embeds(
            &self.model.embed(&b.input_ids)?,
            &Positions::From(0),
            None,
            None,
            &NoHooks,
        )?;
        let idx = Tensor::from_slice(&b.loss_positions, b.loss_positions.len(), &Device::Cpu)?;
        let hs = h
            .reshape((n * t, self.cfg.hidden_size))?
            .index_select(&idx, 0)?;
        Ok(ops::cross_entropy(
            &self.model.logits(&hs)?,
            &b.loss_targets,
        )?)
    }
    fn batch_size(&self, b: &Batch) -> (usize, usize) {
        (b.n, 0)
    }
    fn save_adapter(&self, _dir: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        crate::checkpoint::save_safetensors_atomic(
            &tensors,
            Some([("format".to_string(), "pt".to_string())].into()),
            &self.dir.join("model.safetensors"),
        )?;
        let mut c = serde_json::to_value(LlamaHf::from(&self.cfg))?;
        c["architectures"] = json!(["LlamaForCausalLM"]);
        crate::util::write_json_atomic(&self.dir.join("config.json"), &c)
    }
}

/// The `config.json` transformers would read for this LM.
#[derive(Serialize)]
struct LlamaHf {
    model_type: &'static str,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    max_position_embeddings: usize,
    tie_word_embeddings: bool,
    hidden_act: &'static str,
    bos_token_id: u32,
    eos_token_id: u32,
}

impl From<&LlamaConfig> for LlamaHf {
    fn from(c: &LlamaConfig) -> Self {
        Self {
            model_type: "llama",
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            hidden_act: "silu",
            bos_token_id: 1,
            eos_token_id: 2,
        }
    }
}

fn quiet_settings(steps: u64, batch: usize, lr: f64, seed: u64) -> TrainSettings {
    TrainSettings {
        epochs: 1000,
        max_steps: Some(steps),
        batch_size: batch,
        lr: Some(lr),
        warmup_epochs: 0.0,
        weight_decay: 0.0,
        seed,
        log_every: 0,
        keep_checkpoints: 1,
        ..TrainSettings::default()
    }
}

pub fn run(out: &Path, s: &QuickstartSettings, verbose: bool) -> Result<QuickstartResult> {
    let start = std::time::Instant::now();
    let data_dir = out.join("data");
    let lm_dir = out.join("lm");
    std::fs::create_dir_all(&lm_dir)
        .with_context(|| format!("{}: cannot create", lm_dir.display()))?;
    let data_file = data::synthetic::write_shapes(
        &data_dir,
        s.train_images,
        s.test_images,
        s.image_size,
        s.seed,
    )?;
    let spec = format!("jsonl:{}", data_file.display());
    let ds = data::open(&spec, &DataOptions::default())?;
    let train = ds.samples("train")?;
    let text_samples: Vec<_> = train
        .iter()
        .cloned()
        .map(|mut x| {
            x.image = None;
            x
        })
        .collect();
    let texts: Vec<String> = text_samples
        .iter()
        .flat_map(|x| [x.prompt.clone(), x.answer.clone()])
        .collect();
    build_tokenizer(&lm_dir, &texts)?;
    let tok = crate::checkpoint::Tok::from_file(&lm_dir.join("tokenizer.json"))?;
    let cfg = lm_config(tok.vocab_size(), s);
    // 1. Pre-train the tiny LM on the text alone, then write it as a Hugging Face directory.
    let vars = random_llama(&cfg, s.seed)?;
    let w = crate::checkpoint::Weights::from_tensors(
        "quickstart-lm",
        vars.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect::<HashMap<_, _>>(),
        DType::F32,
        &Device::Cpu,
    );
    let model = Llama::load(&w, cfg.clone())?;
    let enc: Vec<_> = text_samples
        .iter()
        .map(|x| encode(&tok, x, 2, 128))
        .collect::<Result<_>>()?;
    let builder = Arc::new(BatchBuilder {
        samples: enc,
        cache: ImageCache::new(
            Preprocess {
                size: s.image_size,
                norm: Norm::Imagenet,
            },
            0,
        ),
        layout: TextLayout::DecoderOnly,
        device: Device::Cpu,
        skip_bad_images: false,
        blind: true,
    });
    let mut pre = LmPretrain {
        vars,
        model,
        cfg,
        dir: lm_dir.clone(),
    };
    let pre_run = out.join("lm-pretrain");
    let _ = std::fs::remove_dir_all(&pre_run);
    let batches = EpochBatches {
        builder,
        batch_size: 32,
        seed: s.seed,
    };
    let ps = train::train(
        &mut pre,
        &batches,
        &quiet_settings(s.lm_pretrain_steps, 32, s.lm_pretrain_lr, s.seed),
        &pre_run,
        false,
        "LM pre-training (text only)",
    )?;
    pre.save_adapter(&lm_dir)?;
    if verbose {
        eprintln!(
            "[{:5.1}s] tiny LM pre-trained on text only: loss {:.3}",
            start.elapsed().as_secs_f64(),
            ps.final_loss
        );
    }
    // 2. MemVP and the image-blind control on the frozen LM.
    let mut results = Vec::new();
    for blind in [false, true] {
        let mut rc = RunConfig {
            vision: s.vision.clone(),
            lm: lm_dir.display().to_string(),
            data: spec.clone(),
            method: Method::Memvp,
            image_blind: blind,
            max_len: 128,
            train: quiet_settings(s.steps, s.batch_size, s.lr, s.seed),
            ..RunConfig::default()
        };
        rc.train.warmup_epochs = 0.1;
        rc.train.epochs = ((s.steps as usize * s.batch_size).div_ceil(train.len())).max(1);
        rc.memvp.visual_scale = s.visual_scale;
        rc.memvp.adapter_scale = s.adapter_scale;
        rc.train.clip_grad = s.clip_grad;
        rc.memvp.slots = s.slots;
        let run_dir = out.join(if blind { "control" } else { "memvp" });
        let _ = std::fs::remove_dir_all(&run_dir);
        let rep = crate::run::train_run(&rc, &run_dir, false)?;
        let vlm = crate::vlm::Vlm::from_run(&run_dir, None, None)?;
        let test = ds.samples("test")?;
        let ev = crate::run::evaluate(&vlm, ds.as_ref(), test, 64, false, Some(&run_dir))?;
        if verbose {
            eprintln!(
                "[{:5.1}s] {}: final loss {:.3}, test accuracy {:.1}%",
                start.elapsed().as_secs_f64(),
                if blind {
                    "image-blind control"
                } else {
                    "MemVP"
                },
                rep.summary.final_loss,
                ev.metrics["accuracy"].as_f64().unwrap_or(0.0)
            );
        }
        results.push(ev);
    }
    let acc = |e: &crate::run::EvalReport| e.metrics["accuracy"].as_f64().unwrap_or(0.0) / 100.0;
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
