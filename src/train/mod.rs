//! The training engine. It knows a model only through [`Task`] (named trained tensors, a loss
//! per batch, a way to write the adapter) and data only through [`Batches`].
//!
//! [`Trainer::step`] runs one optimizer step (accumulation, non-finite skipping, clipping,
//! AdamW) and returns its [`StepRecord`]; [`train`] drives it with the logger (progress bar,
//! `metrics.jsonl`, `loss.png`, [`logger`]) and checkpoints ([`checkpoint`]: written into a
//! temporary directory and renamed into place, resumed to the same result, bit for bit, as a run
//! that was never stopped).

pub mod checkpoint;
pub mod logger;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod rundir;
pub mod schedule;

use crate::dist::Comm;
use crate::rng::Rng;
use anyhow::{Result, bail};
use candle_core::{DType, Tensor, Var};
use checkpoint::State;
use optim::{AdamW, AdamWConfig};
pub use parallel::Shard;
use schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub trait Task {
    type Batch;
    /// The trained tensors, by the names they have in the adapter file.
    fn params(&self) -> Vec<(String, Var)>;
    /// Mean loss of a batch (training mode: dropout on, drawing from `rng`).
    fn loss(&mut self, batch: &Self::Batch, rng: &mut Rng) -> Result<Tensor>;
    /// (samples in the batch, samples dropped while building it).
    fn batch_size(&self, batch: &Self::Batch) -> (usize, usize);
    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
    fn save_adapter(&self, dir: &Path) -> Result<()>;
}

pub trait Batches<B> {
    /// Micro-batches per epoch.
    fn steps_per_epoch(&self) -> usize;
    /// The batches of `epoch` from micro-batch `start` on that `shard` owns, in a fixed order
    /// given the seed.
    fn stream(&self, epoch: usize, start: usize, shard: Shard) -> Box<dyn Iterator<Item = Result<B>> + '_>;
}

/// What the optimisation computes: a resumed run must not change these (except `max_steps`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSettings {
    pub epochs: usize,
    /// Stop after this many optimizer steps (the schedule still spans `epochs`).
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub accum_steps: usize,
    /// Base learning rate; the actual one is `blr * batch_size * accum_steps / 256`.
    pub blr: f64,
    /// Absolute learning rate; overrides `blr` when set.
    pub lr: Option<f64>,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub clip_grad: Option<f64>,
    pub seed: u64,
    /// Stop with an error after this many steps with a non-finite loss or gradient.
    pub max_bad_steps: u64,
}

impl Default for OptimSettings {
    fn default() -> Self {
        Self {
            epochs: 20,
            max_steps: None,
            batch_size: 4,
            accum_steps: 1,
            blr: 9e-3,
            lr: None,
            min_lr: 0.0,
            warmup_epochs: 2.0,
            weight_decay: 0.02,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip_grad: None,
            seed: 0,
            max_bad_steps: 20,
        }
    }
}

impl OptimSettings {
    pub fn effective_lr(&self) -> f64 {
        self.lr.unwrap_or(self.blr * (self.batch_size * self.accum_steps) as f64 / 256.0)
    }

    /// The settings that change what a run computes (a resumed run must not change them).
    pub(crate) fn identity(&self) -> OptimSettings {
        OptimSettings { max_steps: None, ..self.clone() }
    }
}

/// What only changes what a run reports and keeps: free to change on resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// Checkpoint every N optimizer steps (and always at the end).
    pub save_every: Option<u64>,
    /// How many step checkpoints to keep (the newest).
    pub keep_checkpoints: usize,
    /// Print a log line every N steps when stderr is not a terminal.
    pub log_every: u64,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { save_every: None, keep_checkpoints: 3, log_every: 50 }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainSettings {
    pub optim: OptimSettings,
    pub log: LogSettings,
}

/// SIGINT and SIGTERM flags once [`install_stop_handlers`] ran.
static STOP: OnceLock<(Arc<AtomicBool>, Arc<AtomicBool>)> = OnceLock::new();

/// Makes SIGINT and SIGTERM ask a running [`train`] to stop after the current step (with a
/// checkpoint); a second signal ends the process at once (exit 130 / 143). Idempotent.
pub fn install_stop_handlers() -> Result<()> {
    if STOP.get().is_some() {
        return Ok(());
    }
    use signal_hook::consts::{SIGINT, SIGTERM};
    let any = Arc::new(AtomicBool::new(false));
    let (int, term) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    // A signal that finds `any` already set exits; registered first so it runs first.
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, any.clone())?;
    signal_hook::flag::register_conditional_shutdown(SIGTERM, 143, any.clone())?;
    signal_hook::flag::register(SIGINT, any.clone())?;
    signal_hook::flag::register(SIGTERM, any)?;
    signal_hook::flag::register(SIGINT, int.clone())?;
    signal_hook::flag::register(SIGTERM, term.clone())?;
    let _ = STOP.set((int, term));
    Ok(())
}

/// The signal that asked training to stop, if any.
pub fn stop_signal() -> Option<i32> {
    let (int, term) = STOP.get()?;
    if int.load(Ordering::SeqCst) {
        Some(signal_hook::consts::SIGINT)
    } else if term.load(Ordering::SeqCst) {
        Some(signal_hook::consts::SIGTERM)
    } else {
        None
    }
}

/// Training stopped on a signal after writing a checkpoint; the process should exit with
/// [`Interrupted::exit_code`].
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub step: u64,
    pub run: PathBuf,
}

impl Interrupted {
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = if self.signal == signal_hook::consts::SIGINT { "SIGINT" } else { "SIGTERM" };
        write!(
            f,
            "stopped by {name} after step {}; a checkpoint of that step is in {}; continue with the same command and --resume",
            self.step,
            self.run.join("checkpoints").display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// How [`train_with`] runs.
pub struct RunOptions<'a> {
    pub resume: bool,
    /// The title of `loss.png`.
    pub title: &'a str,
    /// What the run is (base models, data, settings that change the model or the data order):
    /// kept in every checkpoint, and a resume must give the same.
    pub identity: serde_json::Value,
    /// Called once before the first step, only when there is a step to run.
    pub on_start: Option<Box<dyn FnOnce() -> Result<()> + 'a>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub seconds: f64,
    pub samples: u64,
    pub samples_per_s: f64,
    pub final_loss: f64,
    pub skipped_steps: u64,
    pub skipped_samples: u64,
    pub resumed_from: Option<u64>,
    /// A resumed run that was already complete: nothing was run or written.
    #[serde(skip)]
    pub already_complete: bool,
}

/// One optimizer step as it happened.
#[derive(Clone, Debug)]
pub struct StepRecord {
    /// Optimizer steps done, this one included.
    pub step: u64,
    /// Fractional epoch at the end of the step.
    pub epoch: f64,
    /// Mean loss over the step's micro-batches (not finite: the update was skipped).
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Samples in the step.
    pub samples: usize,
    pub seconds: f64,
    /// The step ended an epoch.
    pub epoch_end: bool,
    /// A stop signal that a rank of the job received (all ranks see the same).
    pub stop: Option<i32>,
    /// Of `seconds`, the time spent combining gradients across ranks (waiting for the slowest
    /// rank included); 0 for one process.
    pub sync_seconds: f64,
}

fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut s = 0f64;
    for g in grads {
        s += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(s.sqrt())
}

/// The batches of one epoch as they arrive.
type Stream<'a, B> = Box<dyn Iterator<Item = Result<B>> + 'a>;

/// A task, its data, the optimizer and where the run stands.
pub struct Trainer<'a, T: Task> {
    pub task: T,
    data: &'a dyn Batches<T::Batch>,
    s: OptimSettings,
    sched: Schedule,
    vars: Vec<Var>,
    pub opt: AdamW,
    pub(crate) st: State,
    spe: usize,
    total: u64,
    /// The open stream of the current epoch and the epoch it belongs to.
    stream: Option<(usize, Stream<'a, T::Batch>)>,
    /// The job's processes and which micro-batches are this one's.
    comm: &'a dyn Comm,
    shard: Shard,
}

impl<'a, T: Task> Trainer<'a, T> {
    pub fn new(task: T, data: &'a dyn Batches<T::Batch>, s: &OptimSettings) -> Result<Self> {
        let spe = data.steps_per_epoch();
        if spe == 0 {
            bail!("the training split has fewer samples than one batch")
        }
        let accum = s.accum_steps.max(1);
        let steps_per_epoch = spe.div_ceil(accum) as u64;
        let mut total = steps_per_epoch * s.epochs as u64;
        if let Some(m) = s.max_steps {
            total = total.min(m);
        }
        let sched = Schedule {
            lr: s.effective_lr(),
            min_lr: s.min_lr,
            warmup_epochs: s.warmup_epochs,
            epochs: s.epochs as f64,
        };
        let named = task.params();
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let opt = AdamW::new(
            named,
            AdamWConfig { beta1: s.beta1, beta2: s.beta2, eps: s.eps, weight_decay: s.weight_decay },
        )?;
        let st = State::fresh(s);
        let comm: &'a dyn Comm = &crate::dist::Single;
        Ok(Self { task, data, s: s.clone(), sched, vars, opt, st, spe, total, stream: None, comm, shard: Shard::ALL })
    }

    /// Spreads each step's micro-batches over the ranks of `comm` (`accum_steps` counts them
    /// over all ranks and must be a multiple of the rank count).
    pub fn distributed(mut self, comm: &'a dyn Comm) -> Result<Self> {
        let (ranks, accum) = (comm.size(), self.s.accum_steps.max(1));
        if !accum.is_multiple_of(ranks) {
            bail!("{accum} micro-batches per step cannot be split evenly over {ranks} ranks")
        }
        self.comm = comm;
        self.shard = Shard { rank: comm.rank(), ranks, accum };
        Ok(self)
    }

    pub fn world_size(&self) -> usize {
        self.comm.size()
    }

    /// Optimizer steps of the whole run.
    pub fn total_steps(&self) -> u64 {
        self.total
    }

    /// Optimizer steps done.
    pub fn steps_done(&self) -> u64 {
        self.st.opt_step
    }

    pub fn skipped(&self) -> (u64, u64) {
        (self.st.skipped_steps, self.st.skipped_samples)
    }

    pub fn is_done(&self) -> bool {
        self.st.opt_step >= self.total || self.st.epoch >= self.s.epochs
    }

    /// One optimizer step over `accum_steps` micro-batches (fewer at the end of an epoch),
    /// spread over the job's ranks; `None` when the run is complete.
    pub fn step(&mut self) -> Result<Option<StepRecord>> {
        crate::ops::keep_warm(|| self.step_cold())
    }

    fn step_cold(&mut self) -> Result<Option<StepRecord>> {
        let accum = self.s.accum_steps.max(1);
        loop {
            if self.is_done() {
                return Ok(None);
            }
            let epoch = self.st.epoch;
            if self.stream.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let data: &'a dyn Batches<T::Batch> = self.data;
                self.stream = Some((epoch, data.stream(epoch, self.st.next_batch, self.shard)));
            }
            let start = Instant::now();
            let first = self.st.next_batch;
            let end = (first + accum).min(self.spe);
            let mut parts = Vec::new();
            let mut ended = false;
            let shard = self.shard;
            for i in (first..end).filter(|&i| shard.owns(i)) {
                let stream = &mut self.stream.as_mut().expect("opened above").1;
                let Some(batch) = stream.next() else {
                    ended = true;
                    break;
                };
                let batch = batch?;
                let (n, skipped) = self.task.batch_size(&batch);
                // Dropout draws from a stream of its own per micro-batch, so the numbers do not
                // depend on which rank computes it or on where a run was resumed.
                let mut rng = Rng::derive(self.s.seed, &format!("dropout-{epoch}-{i}"));
                let loss = self.task.loss(&batch, &mut rng)?;
                let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let grads = (loss / accum as f64)?.backward()?;
                let grads = self.vars.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect();
                parts.push(parallel::Part { index: i, loss: lv, samples: n, skipped, grads });
            }
            let t_sync = Instant::now();
            let c = parallel::combine(self.comm, &self.vars, parts, ended, stop_signal())?;
            let sync_seconds = if self.comm.size() > 1 { t_sync.elapsed().as_secs_f64() } else { 0.0 };
            self.st.skipped_samples += c.skipped as u64;
            if c.ended || c.count == 0 {
                // The stream ended early (fewer batches than planned): the epoch is over, and
                // a partial accumulation is dropped.
                self.st.epoch += 1;
                self.st.next_batch = 0;
                self.stream = None;
                continue;
            }
            // One optimizer step.
            let frac_epoch = epoch as f64 + first as f64 / self.spe as f64;
            let lr = self.sched.at(frac_epoch);
            let mut g: Vec<Tensor> = c
                .grads
                .into_iter()
                .zip(&self.vars)
                .map(|(a, v)| a.map(Ok).unwrap_or_else(|| v.zeros_like()))
                .collect::<candle_core::Result<_>>()?;
            let loss_mean = c.loss_sum / c.count as f64;
            let norm = grad_norm(&g)?;
            if !loss_mean.is_finite() || !norm.is_finite() {
                self.st.skipped_steps += 1;
                if self.st.skipped_steps >= self.s.max_bad_steps {
                    bail!(
                        "stopping: {} steps had a non-finite loss or gradient (last loss {loss_mean})",
                        self.st.skipped_steps
                    )
                }
            } else {
                if let Some(cl) = self.s.clip_grad {
                    let coef = cl / (norm + 1e-6);
                    if coef < 1.0 {
                        g = g.into_iter().map(|t| t * coef).collect::<candle_core::Result<_>>()?;
                    }
                }
                self.opt.step(&g, lr)?;
            }
            self.st.opt_step += 1;
            self.st.next_batch = end;
            self.st.optimizer_t = self.opt.t;
            let rec = StepRecord {
                step: self.st.opt_step,
                epoch: epoch as f64 + end as f64 / self.spe as f64,
                loss: loss_mean,
                lr,
                grad_norm: norm,
                samples: c.samples,
                seconds: start.elapsed().as_secs_f64(),
                epoch_end: end >= self.spe,
                stop: c.stop,
                sync_seconds,
            };
            if rec.epoch_end {
                self.st.epoch += 1;
                self.st.next_batch = 0;
                self.stream = None;
            }
            return Ok(Some(rec));
        }
    }
}

/// Trains `task` on `data`, writing into `run` (see [`train_with`]).
pub fn train<T: Task>(
    task: T,
    data: &dyn Batches<T::Batch>,
    s: &TrainSettings,
    run: &Path,
    resume: bool,
    title: &str,
) -> Result<Summary> {
    let opts = RunOptions { resume, title, identity: serde_json::Value::Null, on_start: None };
    train_with(task, data, s, run, opts)
}

/// Trains `task` on `data`, writing into `run`: metrics and the progress bar every step,
/// checkpoints every `save_every` steps and at the end, the loss plot every epoch. A stop
/// signal ([`install_stop_handlers`]) ends it after the current step with a checkpoint and an
/// [`Interrupted`] error.
///
/// With a `comm` of several ranks every rank calls this; rank 0 alone reads and writes the run
/// directory and sends its starting state to the others.
pub fn train_with<T: Task>(
    task: T,
    data: &dyn Batches<T::Batch>,
    s: &TrainSettings,
    run: &Path,
    opts: RunOptions,
) -> Result<Summary> {
    train_on(task, data, s, run, opts, &crate::dist::Single)
}

/// [`train_with`] on the ranks of `comm`.
pub fn train_on<T: Task>(
    task: T,
    data: &dyn Batches<T::Batch>,
    s: &TrainSettings,
    run: &Path,
    opts: RunOptions,
    comm: &dyn Comm,
) -> Result<Summary> {
    let root = comm.is_root();
    if root {
        std::fs::create_dir_all(run)
            .map_err(|e| anyhow::anyhow!("{}: cannot create run directory: {e}", run.display()))?;
    }
    let mut tr = Trainer::new(task, data, &s.optim)?.distributed(comm)?;
    tr.st.identity = opts.identity.clone();
    let metrics_path = run.join("metrics.jsonl");
    let mut resumed_from = None;
    if opts.resume && root {
        resumed_from = Some(checkpoint::resume(&mut tr, run, &opts.identity)?);
    }
    if comm.size() > 1 {
        let params = tr.task.params();
        let st = parallel::broadcast_state(comm, &params, &mut tr.opt, &serde_json::to_value(&tr.st)?)?;
        if !root {
            tr.st = serde_json::from_value(st)?;
            tr.stream = None;
            if opts.resume {
                resumed_from = Some(tr.st.opt_step);
            }
        }
    }
    if let Some(step) = resumed_from {
        if tr.is_done() {
            if root {
                eprintln!("the run in {} is already complete (step {step}); nothing to do", run.display());
            }
            let (skipped_steps, skipped_samples) = tr.skipped();
            return Ok(Summary {
                steps: step,
                seconds: 0.0,
                samples: 0,
                samples_per_s: 0.0,
                final_loss: f64::NAN,
                skipped_steps,
                skipped_samples,
                resumed_from,
                already_complete: true,
            });
        }
        if root {
            metrics::truncate(&metrics_path, step)?;
        }
    } else if root && metrics_path.exists() {
        std::fs::remove_file(&metrics_path)?;
    }
    if root && let Some(f) = opts.on_start {
        f()?;
    }
    let mut log = root
        .then(|| logger::Logger::new(run, opts.title, tr.total_steps(), tr.steps_done(), s.log.log_every, comm.size()));
    let (mut samples_total, mut last_loss) = (0u64, f64::NAN);
    let mut saved_at = None;
    let started = Instant::now();
    while let Some(rec) = tr.step()? {
        samples_total += rec.samples as u64;
        last_loss = rec.loss;
        let (skipped_steps, skipped_samples) = tr.skipped();
        if let Some(log) = &mut log {
            log.step(&rec, skipped_steps, skipped_samples)?;
        }
        let end = tr.steps_done() >= tr.total_steps();
        if s.log.save_every.is_some_and(|k| k > 0 && rec.step.is_multiple_of(k)) || end {
            if root {
                checkpoint::write(&tr, run, s.log.keep_checkpoints)?;
            }
            saved_at = Some(rec.step);
        }
        if let Some(log) = &log
            && (rec.epoch_end || end)
        {
            log.plot()?;
        }
        // One process also notices a signal that came during the checkpoint; ranks of a job
        // act on the signal they agreed on in the step.
        let signal = if comm.size() == 1 { rec.stop.or_else(stop_signal) } else { rec.stop };
        if let Some(signal) = signal
            && !end
        {
            if root && saved_at != Some(rec.step) {
                checkpoint::write(&tr, run, s.log.keep_checkpoints)?;
            }
            if let Some(log) = log {
                log.plot()?;
                log.finish();
            }
            return Err(Interrupted { signal, step: rec.step, run: run.to_path_buf() }.into());
        }
    }
    if root && saved_at != Some(tr.steps_done()) {
        checkpoint::write(&tr, run, s.log.keep_checkpoints)?;
    }
    let secs = match log {
        Some(log) => {
            log.plot()?;
            log.finish()
        }
        None => started.elapsed().as_secs_f64(),
    };
    let (skipped_steps, skipped_samples) = tr.skipped();
    Ok(Summary {
        steps: tr.steps_done(),
        seconds: secs,
        samples: samples_total,
        samples_per_s: samples_total as f64 / secs.max(1e-9),
        final_loss: last_loss,
        skipped_steps,
        skipped_samples,
        resumed_from,
        already_complete: false,
    })
}
