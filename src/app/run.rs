//! Training and evaluation runs: settings (TOML file and flags), data preparation, the
//! training task, and batched evaluation.

use super::settings::RunSettings;
use crate::data::batch::{BatchBuilder, ImageCache, Prefetcher, encode, eval_input, keep_first_and_tail, stack_pixels};
use crate::data::{self, Sample};
use crate::generate::Sampling;
use crate::models::{load_lm, load_vision};
use crate::rng::Rng;
use crate::train::rundir::{self, RunLock};
use crate::train::{self, Batches, Shard, Summary, Task};
use crate::vlm::{Base, Vlm};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The data of one split, tokenized, with a batch builder.
pub struct Prepared {
    pub builder: Arc<BatchBuilder>,
    pub skipped_images: usize,
}

pub fn prepare(
    vlm: &Vlm,
    samples: Vec<Sample>,
    skip_bad: bool,
    max_len: usize,
    cache_mb: usize,
    blind: bool,
) -> Result<Prepared> {
    prepare_checked(
        vlm,
        samples,
        &Preflight { skip_bad, max_len, truncate_answers: false, source: "", comm: &crate::dist::Single },
        cache_mb,
        blind,
    )
}

/// What the pre-flight check of a split needs.
pub struct Preflight<'a> {
    /// Skip samples whose image does not decode (else fail naming it).
    pub skip_bad: bool,
    /// The longest prompt + answer in tokens.
    pub max_len: usize,
    /// Cut answers that do not fit (else fail naming the sample).
    pub truncate_answers: bool,
    /// The data source, for messages.
    pub source: &'a str,
    /// The ranks that share the image check.
    pub comm: &'a dyn crate::dist::Comm,
}

/// Every image decoded (each distinct file once, in parallel) and every sample's length
/// measured before any training: problems are found up front, named, not mid-run.
pub fn prepare_checked(
    vlm: &Vlm,
    samples: Vec<Sample>,
    pf: &Preflight,
    cache_mb: usize,
    blind: bool,
) -> Result<Prepared> {
    if samples.is_empty() {
        bail!("{}: the split has no samples (check the split name and --max-train-samples)", pf.source)
    }
    let (samples, skipped) = if blind { (samples, 0) } else { data::filter_images_on(samples, pf.skip_bad, pf.comm)? };
    if samples.is_empty() {
        bail!("no samples left after skipping unreadable images")
    }
    let eos = vlm.eos();
    let tok = &vlm.lm().tok;
    let max_len = pf.max_len;
    let ins = vlm.prompt_insert();
    let mut enc: Vec<_> = samples
        .par_iter()
        .map(|s| encode(tok, s, eos, max_len, ins.map(|i| (i, !blind && s.image.is_some()))))
        .collect::<Result<_>>()?;
    // An answer (with EOS) must leave room for at least one prompt token.
    let too_long: Vec<usize> = (0..enc.len()).filter(|&i| enc[i].target.len() + 1 > max_len).collect();
    if let Some(&first) = too_long.first() {
        if !pf.truncate_answers {
            let e = &enc[first];
            bail!(
                "{}: sample {}: its answer is {} tokens with EOS, which does not fit in {max_len} tokens \
                 (the limit of --max-len and of the LM's positions); {} of {} samples are too long. \
                 Pass --truncate-answers to cut such answers, or raise --max-len where the LM allows it",
                pf.source,
                samples[first].id,
                e.target.len(),
                too_long.len(),
                enc.len()
            )
        }
        for &i in &too_long {
            let t = &mut enc[i].target;
            t.truncate(max_len.saturating_sub(2).max(1));
            t.push(eos);
        }
        eprintln!("cut {} answers to fit in {max_len} tokens (--truncate-answers)", too_long.len());
    }
    let builder = BatchBuilder {
        samples: enc,
        cache: ImageCache::new(vlm.preprocess(), cache_mb << 20),
        layout: vlm.layout(),
        device: crate::util::device(),
        skip_bad_images: pf.skip_bad,
        blind,
    };
    Ok(Prepared { builder: Arc::new(builder), skipped_images: skipped })
}

/// Fixed-size batches in a seeded order per epoch (the last partial batch is dropped when
/// there is more than one batch, as the released training loader does).
pub struct EpochBatches {
    pub builder: Arc<BatchBuilder>,
    pub batch_size: usize,
    pub seed: u64,
}

impl EpochBatches {
    fn n(&self) -> usize {
        self.builder.samples.len()
    }
    pub fn plan(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.n()).collect();
        Rng::derive(self.seed, &format!("order-{epoch}")).shuffle(&mut order);
        let mut plan: Vec<Vec<usize>> = order.chunks(self.batch_size).map(|c| c.to_vec()).collect();
        if plan.len() > 1 && plan.last().is_some_and(|c| c.len() < self.batch_size) {
            plan.pop();
        }
        plan
    }
}

impl Batches<crate::data::batch::Batch> for EpochBatches {
    fn steps_per_epoch(&self) -> usize {
        self.plan(0).len()
    }
    fn stream(
        &self,
        epoch: usize,
        start: usize,
        shard: Shard,
    ) -> Box<dyn Iterator<Item = Result<crate::data::batch::Batch>> + '_> {
        let plan: Vec<Vec<usize>> = self
            .plan(epoch)
            .into_iter()
            .enumerate()
            .skip(start)
            .filter(|(i, _)| shard.owns(*i))
            .map(|(_, b)| b)
            .collect();
        let mut pf = Prefetcher::new(self.builder.clone(), plan);
        Box::new(std::iter::from_fn(move || pf.next_batch()))
    }
}

/// The training task of a VLM.
pub struct VlmTask<'a> {
    pub vlm: &'a Vlm,
}

impl Task for VlmTask<'_> {
    type Batch = crate::data::batch::Batch;
    fn params(&self) -> Vec<(String, Var)> {
        self.vlm.named()
    }
    fn loss(&mut self, batch: &Self::Batch, rng: &mut Rng) -> Result<Tensor> {
        self.vlm.loss(batch, rng, true)
    }
    fn batch_size(&self, batch: &Self::Batch) -> (usize, usize) {
        (batch.n, batch.skipped)
    }
    fn save_adapter(&self, dir: &Path) -> Result<()> {
        self.vlm.save(dir)
    }
}

pub fn load_vlm(cfg: &RunSettings) -> Result<Vlm> {
    if cfg.model.vision.is_empty() || cfg.model.lm.is_empty() {
        bail!("both --vision and --lm are needed (a CLIP directory or random:<preset>, and an LM directory or .gguf)")
    }
    let dev = crate::util::device();
    let vision = load_vision(&cfg.model.vision, DType::F32, cfg.model.vision_dtype, &dev)?;
    let lm = load_lm(Path::new(&cfg.model.lm), DType::F32, cfg.model.lm_dtype, &dev)?;
    let mut vlm = Vlm::new(Arc::new(Base { vision, lm }), &cfg.adapter_settings())?;
    vlm.grad_checkpoint = cfg.model.grad_checkpoint;
    Ok(vlm)
}

#[derive(Serialize)]
pub struct TrainReport {
    pub run: PathBuf,
    pub method: String,
    pub image_blind: bool,
    pub train_samples: usize,
    pub skipped_images: usize,
    pub trainable_parameters: usize,
    /// Processes (MPI ranks) that trained.
    pub world_size: usize,
    /// This process's peak resident set (rank 0's in a job of several).
    pub peak_rss_mb: f64,
    pub summary: Summary,
}

/// How `train` treats the run directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run: refused when the directory holds trained state.
    New,
    /// Continue the newest checkpoint.
    Resume,
    /// A new run that replaces the trained state in the directory.
    Overwrite,
}

/// What a resumed run must share with its checkpoint: the base models' content, the data, and
/// every setting but those free to change on resume (logging, checkpoint frequency, the
/// image cache, `max_steps`, where the base models are stored).
pub fn run_identity(cfg: &RunSettings, vlm: &Vlm) -> Result<serde_json::Value> {
    let mut v = cfg.to_value()?;
    let m = v.as_object_mut().context("settings are a table")?;
    m.remove("log");
    if let Some(o) = m.get_mut("optim").and_then(|x| x.as_object_mut()) {
        o.remove("max_steps");
    }
    if let Some(d) = m.get_mut("data").and_then(|x| x.as_object_mut()) {
        d.remove("image_cache_mb");
    }
    m.remove("model");
    let own = crate::adapters::spec(&cfg.method.name)?.sections;
    m.retain(|k, _| ["data", "method", "optim"].contains(&k.as_str()) || own.contains(&k.as_str()));
    m.insert(
        "base".into(),
        serde_json::json!({
            "vision_sha256": vlm.cfg.vision.sha256,
            "lm_sha256": vlm.cfg.lm.sha256,
            "lm_tokenizer_sha256": vlm.cfg.lm.tokenizer_sha256,
        }),
    );
    Ok(v)
}

/// `memvp train`.
pub fn train_run(cfg: &RunSettings, out: &Path, start: Start) -> Result<TrainReport> {
    if cfg.data.source.is_empty() {
        bail!("--data KIND:PATH is needed")
    }
    // Data-parallel: every rank runs this; rank 0 alone owns the run directory.
    let comm = crate::dist::world();
    let root = comm.is_root();
    let _lock = if root { Some(RunLock::acquire(out)?) } else { None };
    if root {
        check_run_dir(out, start)?;
    }
    let ds = data::open(&cfg.data.source, &cfg.data.prompt)?;
    let mut cfg = cfg.clone();
    if cfg.data.prompt.vqa_template.is_none() {
        cfg.data.prompt.vqa_template = ds.default_template().map(str::to_string);
    }
    // What the run computes is fixed by the global batch: `accum_steps` micro-batches per rank
    // times the ranks (so a run can resume on another number of ranks with the same product).
    let user_cfg = cfg.clone();
    cfg.optim.accum_steps = cfg.optim.accum_steps.max(1) * comm.size();
    let cfg = &cfg;
    let vlm = load_vlm(cfg)?;
    let mut samples = data::split_samples(ds.as_ref(), &cfg.data.split)?;
    if let Some(n) = cfg.data.max_train_samples {
        samples.truncate(n);
    }
    let blind = !vlm.uses_images();
    let pf = Preflight {
        skip_bad: cfg.data.prompt.skip_bad_images,
        max_len: vlm.max_text_len(),
        truncate_answers: cfg.data.truncate_answers,
        source: &cfg.data.source,
        comm,
    };
    let prep = prepare_checked(&vlm, samples, &pf, cfg.data.image_cache_mb, blind)?;
    let n = prep.builder.samples.len();
    let batches =
        EpochBatches { builder: prep.builder.clone(), batch_size: cfg.optim.batch_size, seed: cfg.optim.seed };
    let identity = run_identity(cfg, &vlm)?;
    if comm.size() > 1 {
        let me = serde_json::json!({ "run": identity, "data_sha256": data_digest(&prep.builder) });
        train::parallel::agree(comm, &me)?;
    }
    let title = format!("{} on {}", cfg.method.name, cfg.data.source);
    let toml = user_cfg.to_toml()?;
    let ranks = comm.size();
    let opts = train::RunOptions {
        resume: start == Start::Resume,
        title: &title,
        identity,
        on_start: Some(Box::new(|| {
            crate::util::write_atomic(&out.join("config.toml"), toml.as_bytes())?;
            eprintln!(
                "training {}{} on {} samples of {} ({} trainable parameters, lr {:.3e}{})",
                cfg.method.name,
                if cfg.method.image_blind { " (image-blind control)" } else { "" },
                n,
                cfg.data.source,
                vlm.cfg.trainable_parameters,
                cfg.optim.effective_lr(),
                if ranks > 1 { format!(", {ranks} ranks") } else { String::new() }
            );
            Ok(())
        })),
    };
    train::install_stop_handlers()?;
    let summary = train::train_on(VlmTask { vlm: &vlm }, &batches, &cfg.train_settings(), out, opts, comm)?;
    let report = TrainReport {
        run: out.to_path_buf(),
        method: cfg.method.name.clone(),
        image_blind: cfg.method.image_blind,
        train_samples: n,
        skipped_images: prep.skipped_images,
        trainable_parameters: vlm.cfg.trainable_parameters,
        world_size: ranks,
        peak_rss_mb: crate::util::peak_rss_mb(),
        summary,
    };
    if root && !report.summary.already_complete {
        crate::util::write_json_atomic(&out.join("train_summary.json"), &report)?;
    }
    Ok(report)
}

/// A digest of the prepared samples (token ids and image paths, in order): ranks of one job
/// must train on the same data.
fn data_digest(b: &BatchBuilder) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for s in &b.samples {
        for ids in [&s.prompt, &s.target] {
            h.update((ids.len() as u64).to_le_bytes());
            for id in ids.iter() {
                h.update(id.to_le_bytes());
            }
        }
        let img = s.image.as_ref().map(|p| p.to_string_lossy().to_string()).unwrap_or_default();
        h.update((img.len() as u64).to_le_bytes());
        h.update(img.as_bytes());
    }
    crate::checkpoint::hex(&h.finalize())
}

/// The run directory's state against how the run starts (new, resumed, overwritten).
fn check_run_dir(out: &Path, start: Start) -> Result<()> {
    let stale = rundir::remove_stale_temporaries(out)?;
    if stale > 0 {
        eprintln!("removed {stale} temporary files of an interrupted writer from {}", out.display());
    }
    match start {
        Start::New => {
            let held = rundir::trained_state(out);
            if !held.is_empty() {
                bail!(
                    "{}: this run directory already holds a trained run ({}); pass --resume to continue it, --overwrite to replace it, or choose another --out",
                    out.display(),
                    held.join(", ")
                )
            }
        }
        Start::Overwrite => rundir::clear_trained_state(out)?,
        Start::Resume => {
            if train::checkpoint::list(out).is_empty() {
                bail!("{}: --resume given but no checkpoint found in checkpoints/", out.display())
            }
        }
    }
    Ok(())
}

#[derive(Serialize)]
pub struct EvalReport {
    pub metrics: serde_json::Value,
    pub n: usize,
    pub skipped_images: usize,
    pub seconds: f64,
    pub samples_per_s: f64,
    /// Processes (MPI ranks) that generated.
    pub world_size: usize,
    #[serde(skip)]
    pub table: Vec<(String, f64, usize)>,
}

/// Generates answers for every sample and scores them with the data set's scorer.
pub fn evaluate(
    vlm: &Vlm,
    ds: &dyn data::Dataset,
    samples: Vec<Sample>,
    batch_size: usize,
    skip_bad: bool,
    out: Option<&Path>,
) -> Result<EvalReport> {
    let r = evaluate_on(vlm, ds, samples, batch_size, skip_bad, out, &crate::dist::Single)?;
    Ok(r.expect("one process is rank 0"))
}

/// [`evaluate`] sharded over the ranks of `comm`: rank r generates the batches k with
/// k mod N = r (the same batches one process forms, so the same outputs), rank 0 gathers them
/// in the original order, scores and writes; it alone returns the report.
pub fn evaluate_on(
    vlm: &Vlm,
    ds: &dyn data::Dataset,
    samples: Vec<Sample>,
    batch_size: usize,
    skip_bad: bool,
    out: Option<&Path>,
    comm: &dyn crate::dist::Comm,
) -> Result<Option<EvalReport>> {
    let start = std::time::Instant::now();
    let (rank, ranks) = (comm.rank(), comm.size());
    if let Some(dir) = out
        && comm.is_root()
    {
        // Fail before generating anything when the results cannot be written.
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the output directory", dir.display()))?;
        let probe = dir.join(format!(".write-test.{}.tmp", std::process::id()));
        std::fs::write(&probe, b"").with_context(|| format!("{}: cannot write into this directory", dir.display()))?;
        let _ = std::fs::remove_file(&probe);
    }
    let (samples, skipped) =
        if vlm.uses_images() { data::filter_images_on(samples, skip_bad, comm)? } else { (samples, 0) };
    if samples.is_empty() {
        bail!("nothing to evaluate")
    }
    if ranks > 1 {
        let mut ids = String::new();
        for s in &samples {
            ids.push_str(&format!("{}\u{1f}{}\u{1f}{:?}\u{1e}", s.id, s.prompt, s.image));
        }
        let me = serde_json::json!({
            "adapter": serde_json::to_value(&vlm.cfg)?,
            "batch_size": batch_size,
            "samples": samples.len(),
            "samples_sha256": crate::checkpoint::sha256_str(&ids),
        });
        crate::train::parallel::agree(comm, &me)?;
    }
    let cache = ImageCache::new(vlm.preprocess(), 256 << 20);
    let tok = &vlm.lm().tok;
    let s = Sampling { max_new_tokens: ds.max_new_tokens(), ..Default::default() };
    let chunks: Vec<&[Sample]> = samples.chunks(batch_size.max(1)).collect();
    let mine: Vec<usize> = (0..chunks.len()).filter(|k| k % ranks == rank).collect();
    let pb = crate::train::logger::progress_bar(
        mine.iter().map(|&k| chunks[k].len() as u64).sum(),
        "eval {bar:30.green/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec}",
    );
    if !comm.is_root() {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut outputs: Vec<String> = Vec::with_capacity(samples.len());
    let size = vlm.preprocess().size;
    // Leave room for the generated tokens within the LM's positions.
    let room = vlm.max_text_len().saturating_sub(s.max_new_tokens).max(2);
    let use_img = vlm.uses_images();
    let dev = crate::util::device();
    for chunk in mine.iter().map(|&k| chunks[k]) {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .map(|smp| {
                let mut ids = eval_input(tok, smp)?;
                let has_image = use_img && smp.image.is_some();
                let extra = vlm.prompt_insert().map_or(0, |i| i.len(has_image));
                keep_first_and_tail(&mut ids, room.saturating_sub(extra).max(1));
                vlm.insert_prompt(&mut ids, has_image);
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        let px: Vec<Option<Arc<Vec<f32>>>> = chunk
            .par_iter()
            .map(|smp| if use_img { smp.image.as_ref().map(|p| cache.get(p)).transpose() } else { Ok(None) })
            .collect::<Result<_>>()?;
        let (pixels, indicator) = stack_pixels(&px, size, &dev)?;
        let generated = vlm.generate(&prompts, pixels.as_ref(), &indicator, &s)?;
        for g in generated {
            outputs.push(tok.decode(&g, true)?);
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    if ranks > 1 {
        // Rank 0 puts every rank's batches back in their places.
        let Some(all) = comm.gather(&serde_json::to_vec(&outputs)?)? else {
            return Ok(None);
        };
        let mut by_chunk: Vec<Option<&[String]>> = vec![None; chunks.len()];
        let parts: Vec<Vec<String>> = all.iter().map(|m| serde_json::from_slice(m)).collect::<Result<_, _>>()?;
        for (r, outs) in parts.iter().enumerate() {
            let mut at = 0;
            for k in (0..chunks.len()).filter(|k| k % ranks == r) {
                let n = chunks[k].len();
                let got = outs.get(at..at + n).context("a rank sent fewer answers than it had questions")?;
                by_chunk[k] = Some(got);
                at += n;
            }
        }
        outputs = by_chunk.into_iter().flat_map(|c| c.expect("every batch has a rank").iter().cloned()).collect();
    }
    let mut scored = ds.score(&samples, &outputs)?;
    if skip_bad && let Some(m) = scored.metrics.as_object_mut() {
        m.insert("skipped_images".into(), serde_json::json!(skipped));
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(dir) = out {
        crate::util::write_json_atomic(&dir.join("preds.json"), &scored.preds)?;
        crate::util::write_json_atomic(&dir.join("eval.json"), &scored.metrics)?;
    }
    Ok(Some(EvalReport {
        metrics: scored.metrics,
        n: samples.len(),
        skipped_images: skipped,
        seconds: secs,
        samples_per_s: samples.len() as f64 / secs.max(1e-9),
        world_size: ranks,
        table: scored.table,
    }))
}

pub fn print_table(title: &str, table: &[(String, f64, usize)]) {
    println!("{title}");
    println!("{:<14} {:>8} {:>7}", "", "score", "n");
    for (k, v, n) in table {
        if v.is_nan() {
            println!("{k:<14} {:>8} {n:>7}", "-");
        } else {
            println!("{k:<14} {v:>8.2} {n:>7}");
        }
    }
}
