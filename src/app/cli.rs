//! The command line: clap's argument structs and what each command does, callable from tests
//! and from `main.rs`. The only place that knows clap (with `quickstart` and `bench`'s own
//! argument structs).

use super::settings::{RunSettings, all_flags};
use crate::data::image::{Norm, Preprocess};
use crate::generate::beam::{BeamOptions, EarlyStopping, beam_search};
use crate::generate::{self, BeamStepper, Sampling};
use crate::models::{NoHooks, load_lm};
use crate::settings::{Flag, Kind};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};

use crate::util::device;

/// A clap value parser for the enums that settings files spell in lower case (`clip`,
/// `both`, ...): the same names on the command line.
pub fn serde_enum<T: serde::de::DeserializeOwned>(s: &str) -> std::result::Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|e| e.to_string())
}

/// `--lm-dtype` / `--vision-dtype` for the commands that load a trained run's base models.
#[derive(clap::Args, Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PrecisionArgs {
    /// Format of the LM's frozen matrices: auto (f32 on the CPU, bf16 on a GPU), f32, bf16, f16,
    /// keep (as stored; GGUF blocks stay quantized), q8_0, q4_0, q4_1, q4_k, q6_k.
    #[arg(long, default_value = "auto")]
    pub lm_dtype: crate::ops::WeightFormat,
    /// Format of the vision tower's frozen matrices (as --lm-dtype).
    #[arg(long, default_value = "auto")]
    pub vision_dtype: crate::ops::WeightFormat,
}

impl PrecisionArgs {
    pub fn precision(&self) -> crate::models::Precision {
        crate::models::Precision { lm: self.lm_dtype, vision: self.vision_dtype }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Hugging Face model directory, GGUF file or Meta's LLaMA directory (optional with --run: the
    /// adapter's own LM).
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
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
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
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

/// Refuses sampling settings that are out of range or that contradict each other.
fn check_sampling(a: &GenerateArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        anyhow::bail!("--temperature {}: must be a finite number of at least 0 (0 = greedy)", a.temperature)
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        anyhow::bail!("--top-p {}: must be in (0, 1]", a.top_p)
    }
    if a.num_beams == 0 {
        anyhow::bail!("--num-beams 0: must be at least 1 (1 = no beam search)")
    }
    if !a.length_penalty.is_finite() {
        anyhow::bail!("--length-penalty {}: must be a finite number", a.length_penalty)
    }
    if a.num_beams > 1 && (a.temperature > 0.0 || a.top_p < 1.0) {
        anyhow::bail!(
            "--num-beams {} with --temperature/--top-p: beam search does not sample; give one or the other",
            a.num_beams
        )
    }
    Ok(())
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    check_sampling(&a)?;
    let mut s = Sampling { max_new_tokens: a.max_new_tokens, temperature: a.temperature, top_p: a.top_p, seed: a.seed };
    let start = std::time::Instant::now();
    // Tokens that fit before the LM's positions run out, when that is fewer than asked.
    let mut cap = |room: Option<usize>, prompt_len: usize| -> Result<bool> {
        match room {
            Some(0) => anyhow::bail!("the prompt ({prompt_len} tokens) leaves no position of the LM to generate into"),
            Some(r) if r < s.max_new_tokens => {
                s.max_new_tokens = r;
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let (prompt_ids, generated, text, eos, capped) = if let Some(run) = &a.run {
        let vlm = crate::vlm::Vlm::from_run(run, a.vision.as_deref(), a.lm.as_deref(), a.precision.precision())?;
        if a.image.is_some() && !vlm.uses_images() {
            anyhow::bail!(
                "--image: the adapter in {} does not use images ({}); leave --image out",
                run.display(),
                if vlm.cfg.image_blind { "it was trained image-blind" } else { "a text-only method" }
            )
        }
        let tok = &vlm.lm().tok;
        let prompt = if a.raw {
            a.prompt.clone()
        } else {
            crate::data::prompt::open_ended(vlm.cfg.prompt.vqa_template.as_deref(), &a.prompt)
        };
        let mut ids = tok.encode(&prompt, true)?;
        if ids.is_empty() {
            anyhow::bail!("the prompt encodes to no tokens")
        }
        vlm.insert_prompt(&mut ids, a.image.is_some());
        let pixels = match &a.image {
            Some(p) => {
                let pre = vlm.preprocess();
                Some(Tensor::from_vec(pre.load(p)?, (1, 3, pre.size, pre.size), &device())?)
            }
            None => None,
        };
        let ind = [if pixels.is_some() { 1.0 } else { 0.0 }];
        let prompt_len = vlm.adapter.prefix_tokens() + ids.len();
        let capped = cap(vlm.lm().model.max_new_tokens(prompt_len), prompt_len)?;
        let eos = vlm.lm().eos.clone();
        let g = vlm.with_stepper(std::slice::from_ref(&ids), pixels.as_ref(), &ind, &mut |st, first| {
            decode(st, first, &s, &eos, a.num_beams, a.length_penalty)
        })?;
        let text = tok.decode(&g, true)?;
        (ids, g, text, eos, capped)
    } else {
        let Some(lm_path) = &a.lm else { anyhow::bail!("--lm (or --run) is needed") };
        if a.image.is_some() {
            anyhow::bail!("--image needs --run (a trained adapter that connects a vision tower to the LM)")
        }
        let lm = load_lm(lm_path, DType::F32, a.precision.lm_dtype, &device())?;
        let ids = lm.tok.encode(&a.prompt, true)?;
        if ids.is_empty() {
            anyhow::bail!("the prompt encodes to no tokens")
        }
        let capped = cap(lm.model.max_new_tokens(ids.len()), ids.len())?;
        let (mut st, first) = lm.model.prefill(&NoHooks, std::slice::from_ref(&ids), None)?;
        let g = decode(st.as_mut(), &first, &s, &lm.eos, a.num_beams, a.length_penalty)?;
        let text = lm.tok.decode(&g, true)?;
        (ids, g, text, lm.eos.clone(), capped)
    };
    let secs = start.elapsed().as_secs_f64();
    let at_eos = generated.last().is_some_and(|t| eos.contains(t));
    let at_limit = capped && !at_eos && generated.len() >= s.max_new_tokens;
    if a.json {
        let v = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": generated,
            "text": text,
            "stopped_at_eos": at_eos,
            "finish_reason": if at_eos { "stop" } else { "length" },
            "stopped_at_position_limit": at_limit,
            "seconds": secs,
        });
        println!("{v}");
    } else {
        println!("{text}");
        if at_limit {
            eprintln!("(stopped after {} tokens: the LM has no more positions)", generated.len());
        }
    }
    Ok(())
}

/// Greedy / sampling, or beam search when `beams > 1`.
fn decode(
    st: &mut dyn BeamStepper,
    first: &Tensor,
    s: &Sampling,
    eos: &[u32],
    beams: usize,
    lp: f64,
) -> Result<Vec<u32>> {
    if beams > 1 {
        let o = BeamOptions {
            num_beams: beams,
            length_penalty: lp,
            early_stopping: EarlyStopping::Heuristic,
            max_new_tokens: s.max_new_tokens,
        };
        Ok(beam_search(st, first, &o, eos)?.ids)
    } else {
        Ok(generate::continue_batch(st, first, s, eos)?.remove(0))
    }
}

pub fn encode_image(vision: &str, image: &Path, layer: isize, norm: Norm, out: &Path) -> Result<()> {
    let dev = device();
    let v = crate::models::load_vision(vision, DType::F32, crate::ops::WeightFormat::F32, &dev)?;
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
    #[arg(long)]
    pub out: PathBuf,
    /// A settings file (the `config.toml` of a run, or part of one).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the newest checkpoint in --out.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace the trained run that --out already holds (adapter, metrics, checkpoints).
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub settings: SettingFlags,
}

/// The settings flags of `train` as given: one per row of the flag table
/// ([`super::settings::all_flags`]), each laid over the settings file by key.
#[derive(Debug, Clone, Default)]
pub struct SettingFlags {
    pub given: Vec<(Flag, String)>,
}

impl SettingFlags {
    /// (key, value) pairs to lay over the settings file.
    pub fn overrides(&self) -> Result<Vec<(String, serde_json::Value)>> {
        let mut out = Vec::new();
        for (f, text) in &self.given {
            let v = f.parse(text)?;
            for k in f.keys {
                out.push((k.to_string(), v.clone()));
            }
        }
        Ok(out)
    }
}

impl clap::FromArgMatches for SettingFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> std::result::Result<Self, clap::Error> {
        let mut given = Vec::new();
        for f in all_flags() {
            match f.kind {
                Kind::Bool => {
                    if m.get_flag(f.name) {
                        given.push((f, "true".to_string()));
                    }
                }
                _ => {
                    if let Some(v) = m.get_one::<String>(f.name) {
                        given.push((f, v.clone()));
                    }
                }
            }
        }
        Ok(Self { given })
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for SettingFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.args(all_flags().into_iter().map(|f| {
            let a = clap::Arg::new(f.name).long(f.name).help(f.help);
            match f.kind {
                Kind::Bool => a.action(clap::ArgAction::SetTrue),
                // Given twice, the last one counts (as for a flag repeated after a --config).
                _ => {
                    a.action(clap::ArgAction::Set).value_name("VALUE").allow_hyphen_values(true).overrides_with(f.name)
                }
            }
        }))
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl TrainArgs {
    /// The run's settings: the file's (or the defaults), with the given flags laid over them.
    pub fn resolve(&self) -> Result<RunSettings> {
        let given = |n: &str| self.settings.given.iter().any(|(f, _)| f.name == n);
        if given("lr") && given("blr") {
            anyhow::bail!(
                "--lr and --blr contradict each other: --lr sets the learning rate, --blr scales it by the batch; give one"
            )
        }
        let c = RunSettings::layered(self.config.as_deref(), &self.settings.overrides()?)?;
        c.validate()?;
        Ok(c)
    }
}

pub fn train(a: TrainArgs) -> Result<()> {
    let cfg = a.resolve()?;
    let start = match (a.resume, a.overwrite) {
        (true, _) => super::run::Start::Resume,
        (false, true) => super::run::Start::Overwrite,
        (false, false) => super::run::Start::New,
    };
    let r = super::run::train_run(&cfg, &a.out, start)?;
    if !crate::dist::world().is_root() {
        return Ok(());
    }
    if r.summary.already_complete {
        println!("nothing to do: {} is already complete ({} steps)", a.out.display(), r.summary.steps);
        return Ok(());
    }
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
    /// Use another copy of the vision tower (its content must match the adapter's).
    #[arg(long)]
    pub vision: Option<String>,
    /// Use another copy of the LM (its content must match the adapter's): Hugging Face directory,
    /// GGUF file or Meta's LLaMA directory.
    #[arg(long)]
    pub lm: Option<PathBuf>,
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Where preds.json and eval.json go (default: the run directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let vlm = crate::vlm::Vlm::from_run(&a.run, a.vision.as_deref(), a.lm.as_deref(), a.precision.precision())?;
    let mut opts = vlm.cfg.prompt.clone();
    opts.skip_bad_images |= a.skip_bad_images;
    let ds = crate::data::open(&a.data, &opts)?;
    let mut samples = crate::data::split_samples(ds.as_ref(), &a.split)?;
    if let Some(n) = a.max_samples {
        samples.truncate(n);
    }
    let out = a.out.clone().unwrap_or_else(|| a.run.clone());
    let comm = crate::dist::world();
    if comm.is_root() {
        std::fs::create_dir_all(&out)
            .with_context(|| format!("{}: cannot create the output directory", out.display()))?;
    }
    let r = super::run::evaluate_on(&vlm, ds.as_ref(), samples, a.batch_size, opts.skip_bad_images, Some(&out), comm)?;
    // Only rank 0 reports.
    let Some(r) = r else { return Ok(()) };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        super::run::print_table(
            &format!("{} on {} ({}), {} samples in {:.1}s", a.run.display(), a.data, a.split, r.n, r.seconds),
            &r.table,
        );
        println!("wrote {} and {}", out.join("preds.json").display(), out.join("eval.json").display());
    }
    Ok(())
}

pub fn quickstart(out: &Path, s: &super::quickstart::QuickstartSettings, json: bool) -> Result<()> {
    let r = super::quickstart::run(out, s, !json)?;
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
