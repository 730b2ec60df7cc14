//! What each command does, callable from tests and from `main.rs`.

use crate::generate::{self, LlamaStepper, Sampling};
use crate::image::{Norm, Preprocess};
use crate::lm::{LanguageModel, load_lm};
use crate::models::NoHooks;
use anyhow::Result;
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};

use crate::util::device;

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Hugging Face model directory or GGUF file (optional with --run: the adapter's own LM).
    #[arg(long)]
    pub lm: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// A trained run directory: answer with its adapter.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// The image the question is about (with --run).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Vision tower override (with --run; must match the adapter's).
    #[arg(long)]
    pub vision: Option<String>,
    /// With --run, send the prompt as it is instead of through the run's question template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Beam search with this many beams (1 = greedy or sampling).
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    /// Beam search: hypotheses are scored sum(logprobs) / length^length_penalty.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub length_penalty: f64,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let s = Sampling { max_new_tokens: a.max_new_tokens, temperature: a.temperature, top_p: a.top_p, seed: a.seed };
    let start = std::time::Instant::now();
    let (prompt_ids, generated, text, eos) = if let Some(run) = &a.run {
        let vlm = crate::vlm::Vlm::from_run(run, a.vision.as_deref(), a.lm.as_deref())?;
        let prompt = if a.raw {
            a.prompt.clone()
        } else {
            crate::data::prompt::open_ended(vlm.cfg.prompt.vqa_template.as_deref(), &a.prompt)
        };
        let ids = vlm.lm.tok.encode(&prompt, true)?;
        let pixels = match &a.image {
            Some(p) => {
                let pre = vlm.preprocess();
                Some(Tensor::from_vec(pre.load(p)?, (1, 3, pre.size, pre.size), &device())?)
            }
            None => None,
        };
        let ind = [if pixels.is_some() { 1.0 } else { 0.0 }];
        let g = vlm.generate(std::slice::from_ref(&ids), pixels.as_ref(), &ind, &s)?.remove(0);
        let text = vlm.lm.tok.decode(&g, true)?;
        (ids, g, text, vlm.lm.eos.clone())
    } else {
        let Some(lm_path) = &a.lm else { anyhow::bail!("--lm (or --run) is needed") };
        if a.image.is_some() {
            anyhow::bail!("--image needs --run (a trained adapter that connects a vision tower to the LM)")
        }
        let lm = load_lm(lm_path, DType::F32, &device())?;
        let ids = lm.tok.encode(&a.prompt, true)?;
        if ids.is_empty() {
            anyhow::bail!("the prompt encodes to no tokens")
        }
        let g = match &lm.model {
            LanguageModel::Llama(m) => {
                let (mut st, first) = LlamaStepper::prefill(m, &NoHooks, std::slice::from_ref(&ids))?;
                decode(&mut st, &first, &s, &lm.eos, a.num_beams, a.length_penalty)?
            }
            other => {
                let m = other.encdec().unwrap();
                let start = m.special_tokens().decoder_start;
                let (mut st, first) =
                    crate::models::encdec::EncDecStepper::prefill(m, &NoHooks, std::slice::from_ref(&ids), start)?;
                decode(&mut st, &first, &s, &lm.eos, a.num_beams, a.length_penalty)?
            }
        };
        let text = lm.tok.decode(&g, true)?;
        (ids, g, text, lm.eos.clone())
    };
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": generated,
            "text": text,
            "stopped_at_eos": generated.last().is_some_and(|t| eos.contains(t)),
            "seconds": secs,
        });
        println!("{v}");
    } else {
        println!("{text}");
    }
    Ok(())
}

/// Greedy / sampling, or beam search when `beams > 1`.
fn decode(
    st: &mut dyn crate::beam::BeamStepper,
    first: &Tensor,
    s: &Sampling,
    eos: &[u32],
    beams: usize,
    lp: f64,
) -> Result<Vec<u32>> {
    if beams > 1 {
        let o = crate::beam::BeamOptions {
            num_beams: beams,
            length_penalty: lp,
            early_stopping: crate::beam::EarlyStopping::Heuristic,
            max_new_tokens: s.max_new_tokens,
        };
        Ok(crate::beam::beam_search(st, first, &o, eos)?.ids)
    } else {
        Ok(generate::continue_batch(st, first, s, eos)?.remove(0))
    }
}

pub fn encode_image(vision: &str, image: &Path, layer: isize, norm: Norm, out: &Path) -> Result<()> {
    let dev = device();
    let v = crate::vision::load_vision(vision, DType::F32, &dev)?;
    let pre = Preprocess { size: v.model.cfg.image_size, norm };
    let px = pre.load(image)?;
    let s = pre.size;
    let px = Tensor::from_vec(px, (1, 3, s, s), &dev)?;
    let f = v.model.patch_features(&px, layer, &NoHooks)?.squeeze(0)?;
    crate::checkpoint::save_safetensors_atomic(&[("features".to_string(), f.clone())], None, out)?;
    eprintln!("wrote {} features {:?} to {}", vision, f.dims(), out.display());
    Ok(())
}

/// `memvp train`: every hyper-parameter as a flag; a TOML file (`--config`) with the same
/// structure as the `config.toml` a run writes supplies defaults that flags override.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// CLIP checkpoint directory or random:<preset>[@seed] (presets: tiny, small, vit-b16, vit-l14).
    #[arg(long)]
    pub vision: Option<String>,
    /// LM directory (Hugging Face) or .gguf file.
    #[arg(long)]
    pub lm: Option<String>,
    /// KIND:PATH with KIND one of scienceqa, easyvqa, jsonl, vqav2, gqa, coco-captions.
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_enum)]
    pub method: Option<crate::vlm::Method>,
    /// Train with every image indicator at 0 (image-blind control).
    #[arg(long)]
    pub image_blind: bool,
    #[arg(long)]
    pub split: Option<String>,
    #[arg(long)]
    pub max_train_samples: Option<usize>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub accum_steps: Option<usize>,
    /// Absolute learning rate (overrides --blr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Base learning rate, scaled by effective batch / 256.
    #[arg(long)]
    pub blr: Option<f64>,
    #[arg(long)]
    pub min_lr: Option<f64>,
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub clip_grad: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N optimizer steps.
    #[arg(long)]
    pub save_every: Option<u64>,
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Without a terminal, print a progress line every N steps.
    #[arg(long)]
    pub log_every: Option<u64>,
    #[arg(long)]
    pub max_bad_steps: Option<u64>,
    #[arg(long)]
    pub max_len: Option<usize>,
    /// MemVP memory slots M.
    #[arg(long)]
    pub slots: Option<usize>,
    /// Projector width h.
    #[arg(long)]
    pub hidden_proj: Option<usize>,
    /// MemVP's lambda (0.01 in the released code).
    #[arg(long)]
    pub visual_scale: Option<f64>,
    /// MemVP's memory-branch scale s (0.1).
    #[arg(long)]
    pub adapter_scale: Option<f64>,
    #[arg(long)]
    pub memory_dropout: Option<f64>,
    #[arg(long)]
    pub vision_adapter_dim: Option<usize>,
    #[arg(long)]
    pub vision_adapter_scale: Option<f64>,
    #[arg(long)]
    pub vision_adapter_dropout: Option<f64>,
    /// Hidden-state index of the vision tower (-2 = penultimate block).
    #[arg(long, allow_hyphen_values = true)]
    pub vision_layer: Option<isize>,
    #[arg(long, value_enum)]
    pub norm: Option<Norm>,
    /// LM blocks that get memory, e.g. 0,1,2 (default all; for encoder-decoder LMs the
    /// indices count within each stack that --memory-sites selects).
    #[arg(long, value_delimiter = ',')]
    pub memory_layers: Option<Vec<usize>>,
    /// Encoder-decoder LMs: which stacks get memory.
    #[arg(long, value_enum)]
    pub memory_sites: Option<crate::memvp::MemorySites>,
    /// ScienceQA prompt format (QCM-A, CQM-A, QCM-LA, QCM-EA, ...).
    #[arg(long)]
    pub prompt_format: Option<String>,
    #[arg(long)]
    pub use_caption: bool,
    /// Template for open-ended questions, with {question}.
    #[arg(long)]
    pub vqa_template: Option<String>,
    /// Prompt for captioning (coco-captions; default "caption:").
    #[arg(long)]
    pub caption_prompt: Option<String>,
    #[arg(long)]
    pub skip_bad_images: bool,
    #[arg(long)]
    pub lora_rank: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// LoRA targets, e.g. q_proj,v_proj.
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    #[arg(long)]
    pub image_cache_mb: Option<usize>,
}

macro_rules! set {
    ($dst:expr, $src:expr) => {
        if let Some(v) = $src.clone() {
            $dst = v;
        }
    };
}

impl TrainArgs {
    pub fn resolve(&self) -> Result<crate::run::RunConfig> {
        let mut c = match &self.config {
            Some(p) => crate::run::RunConfig::from_toml_file(p)?,
            None => crate::run::RunConfig::default(),
        };
        set!(c.vision, self.vision);
        set!(c.lm, self.lm);
        set!(c.data, self.data);
        set!(c.method, self.method);
        set!(c.split, self.split);
        set!(c.max_len, self.max_len);
        set!(c.image_cache_mb, self.image_cache_mb);
        if self.image_blind {
            c.image_blind = true;
        }
        if self.max_train_samples.is_some() {
            c.max_train_samples = self.max_train_samples;
        }
        let t = &mut c.train;
        set!(t.epochs, self.epochs);
        if self.max_steps.is_some() {
            t.max_steps = self.max_steps;
        }
        set!(t.batch_size, self.batch_size);
        set!(t.accum_steps, self.accum_steps);
        if self.lr.is_some() {
            t.lr = self.lr;
        }
        set!(t.blr, self.blr);
        set!(t.min_lr, self.min_lr);
        set!(t.warmup_epochs, self.warmup_epochs);
        set!(t.weight_decay, self.weight_decay);
        if self.clip_grad.is_some() {
            t.clip_grad = self.clip_grad;
        }
        set!(t.seed, self.seed);
        if self.save_every.is_some() {
            t.save_every = self.save_every;
        }
        set!(t.keep_checkpoints, self.keep_checkpoints);
        set!(t.log_every, self.log_every);
        set!(t.max_bad_steps, self.max_bad_steps);
        let m = &mut c.memvp;
        set!(m.slots, self.slots);
        set!(m.hidden_proj, self.hidden_proj);
        set!(m.visual_scale, self.visual_scale);
        set!(m.adapter_scale, self.adapter_scale);
        set!(m.memory_dropout, self.memory_dropout);
        set!(m.vision_adapter_dim, self.vision_adapter_dim);
        set!(m.vision_adapter_scale, self.vision_adapter_scale);
        set!(m.vision_adapter_dropout, self.vision_adapter_dropout);
        set!(m.vision_layer, self.vision_layer);
        set!(m.norm, self.norm);
        if self.memory_layers.is_some() {
            m.memory_layers = self.memory_layers.clone();
        }
        set!(m.memory_sites, self.memory_sites);
        set!(c.input_space.hidden_proj, self.hidden_proj);
        set!(c.input_space.vision_layer, self.vision_layer);
        set!(c.input_space.norm, self.norm);
        let d = &mut c.data_options;
        set!(d.prompt_format, self.prompt_format);
        if self.use_caption {
            d.use_caption = true;
        }
        if self.vqa_template.is_some() {
            d.vqa_template = self.vqa_template.clone();
        }
        if self.caption_prompt.is_some() {
            d.caption_prompt = self.caption_prompt.clone();
        }
        if self.skip_bad_images {
            d.skip_bad_images = true;
        }
        let l = &mut c.lora;
        set!(l.rank, self.lora_rank);
        set!(l.alpha, self.lora_alpha);
        set!(l.dropout, self.lora_dropout);
        if let Some(ts) = &self.lora_targets {
            l.targets = ts
                .iter()
                .map(|s| {
                    crate::models::Proj::parse(s).ok_or_else(|| {
                        anyhow::anyhow!("--lora-targets: unknown projection `{s}` (q_proj, k_proj, v_proj, o_proj)")
                    })
                })
                .collect::<Result<_>>()?;
        }
        if c.train.batch_size == 0 || c.train.accum_steps == 0 || c.train.epochs == 0 {
            anyhow::bail!("--batch-size, --accum-steps and --epochs must be at least 1")
        }
        Ok(c)
    }
}

pub fn train(a: TrainArgs) -> Result<()> {
    let cfg = a.resolve()?;
    let r = crate::run::train_run(&cfg, &a.out, a.resume)?;
    let s = &r.summary;
    println!(
        "trained {} steps in {:.1}s ({:.1} samples/s), final loss {:.4}, {} skipped steps, {} skipped images; run: {}",
        s.steps,
        s.seconds,
        s.samples_per_s,
        s.final_loss,
        s.skipped_steps,
        r.skipped_images + s.skipped_samples as usize,
        a.out.display()
    );
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Evaluate only the first N samples.
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Use another copy of the base models (their content must match the adapter's).
    #[arg(long)]
    pub vision: Option<String>,
    #[arg(long)]
    pub lm: Option<PathBuf>,
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Where preds.json and eval.json go (default: the run directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let vlm = crate::vlm::Vlm::from_run(&a.run, a.vision.as_deref(), a.lm.as_deref())?;
    let mut opts = vlm.cfg.prompt.clone();
    opts.skip_bad_images |= a.skip_bad_images;
    let ds = crate::data::open(&a.data, &opts)?;
    let mut samples = ds.samples(&a.split)?;
    if let Some(n) = a.max_samples {
        samples.truncate(n);
    }
    let out = a.out.clone().unwrap_or_else(|| a.run.clone());
    std::fs::create_dir_all(&out)?;
    let r = crate::run::evaluate(&vlm, ds.as_ref(), samples, a.batch_size, opts.skip_bad_images, Some(&out))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        crate::run::print_table(
            &format!("{} on {} ({}), {} samples in {:.1}s", a.run.display(), a.data, a.split, r.n, r.seconds),
            &r.table,
        );
        println!("wrote {} and {}", out.join("preds.json").display(), out.join("eval.json").display());
    }
    Ok(())
}

pub fn quickstart(out: &Path, s: &crate::quickstart::QuickstartSettings, json: bool) -> Result<()> {
    let r = crate::quickstart::run(out, s, !json)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("quickstart settings: {}", serde_json::to_string(&r.settings)?);
        println!(
            "test accuracy   MemVP {:5.1}%   image-blind control {:5.1}%   (+{:.1} points)",
            100.0 * r.memvp_accuracy,
            100.0 * r.control_accuracy,
            100.0 * (r.memvp_accuracy - r.control_accuracy)
        );
        println!("per type        MemVP {}   control {}", r.memvp_per_type, r.control_per_type);
        println!("finished in {:.1}s; runs, data and the tiny LM are in {}", r.seconds, out.display());
    }
    Ok(())
}

/// The scorers `memvp score` can run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreTask {
    /// VQA accuracy of the official `vqaEval.py`.
    Vqav2,
    /// Accuracy (overall, binary, open, per type) of the official GQA `eval.py`.
    Gqa,
    /// pycocoevalcap BLEU-1..4, ROUGE-L, CIDEr.
    CocoCaptions,
}

/// `memvp score`: scores a predictions file in the official format against official ground
/// truth and prints the scorer's output as one JSON object.
#[derive(clap::Args, Debug, Clone)]
pub struct ScoreArgs {
    #[arg(long, value_enum)]
    pub task: ScoreTask,
    /// Ground truth: the VQA annotation file (`v2_mscoco_val2014_annotations.json`), the GQA
    /// questions file (`testdev_balanced_questions.json`) or the COCO captions file
    /// (`captions_val2014.json`).
    #[arg(long)]
    pub gt: PathBuf,
    /// Predictions: `[{question_id, answer}]` (VQA), `[{questionId, prediction}]` (GQA),
    /// `[{image_id, caption}]` (COCO).
    #[arg(long)]
    pub preds: PathBuf,
    /// VQA only: the questions file (checks multiple-choice predictions against their choices).
    #[arg(long)]
    pub questions: Option<PathBuf>,
}

/// The scorer output for files in the official formats (see [`ScoreArgs`]).
pub fn score_files(task: ScoreTask, gt: &Path, preds: &Path, questions: Option<&Path>) -> Result<serde_json::Value> {
    if questions.is_some() && task != ScoreTask::Vqav2 {
        anyhow::bail!("--questions is only used with --task vqav2")
    }
    let g = crate::checkpoint::read_json(gt)?;
    let p = crate::checkpoint::read_json(preds)?;
    let q = questions.map(crate::checkpoint::read_json).transpose()?;
    let ctx = || {
        let mut s = format!("scoring {} against {}", preds.display(), gt.display());
        if let Some(q) = questions {
            s.push_str(&format!(" (questions {})", q.display()));
        }
        s
    };
    use anyhow::Context as _;
    match task {
        ScoreTask::Vqav2 => crate::eval::vqa::score_vqa(&g, q.as_ref(), &p).with_context(ctx),
        ScoreTask::Gqa => crate::eval::gqa::score_gqa(&g, &p).with_context(ctx),
        ScoreTask::CocoCaptions => crate::eval::captions::score_captions(&g, &p).with_context(ctx),
    }
}

pub fn score(task: ScoreTask, gt: &Path, preds: &Path, questions: Option<PathBuf>) -> Result<()> {
    let v = score_files(task, gt, preds, questions.as_deref())?;
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}
