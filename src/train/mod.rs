//! The training engine. It knows a model only through [`Task`] (named trained tensors, a loss
//! per batch, a way to write the adapter) and data only through [`Batches`].
//!
//! Every optimizer step appends to `metrics.jsonl`; checkpoints (adapter, optimizer moments,
//! schedule and data position, RNG state) are written into a temporary directory and renamed
//! into place, so a killed run leaves only complete checkpoints, and `resume` continues from
//! the newest one to the same result, bit for bit, as a run that was never stopped.

pub mod metrics;
pub mod optim;
pub mod schedule;

use crate::rng::Rng;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use optim::{AdamW, AdamWConfig};
use schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
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
    /// The batches of `epoch` from micro-batch `start` on, in a fixed order given the seed.
    fn stream(&self, epoch: usize, start: usize) -> Box<dyn Iterator<Item = Result<B>> + '_>;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
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
    /// Checkpoint every N optimizer steps (and always at the end).
    pub save_every: Option<u64>,
    /// How many step checkpoints to keep (the newest).
    pub keep_checkpoints: usize,
    /// Stop with an error after this many steps with a non-finite loss or gradient.
    pub max_bad_steps: u64,
    /// Print a log line every N steps when stderr is not a terminal.
    pub log_every: u64,
}

impl Default for TrainSettings {
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
            save_every: None,
            keep_checkpoints: 3,
            max_bad_steps: 20,
            log_every: 50,
        }
    }
}

impl TrainSettings {
    pub fn effective_lr(&self) -> f64 {
        self.lr.unwrap_or(self.blr * (self.batch_size * self.accum_steps) as f64 / 256.0)
    }

    /// The settings that change what a run computes (a resumed run must not change them).
    fn identity(&self) -> TrainSettings {
        TrainSettings { max_steps: None, save_every: None, keep_checkpoints: 0, log_every: 0, ..self.clone() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    opt_step: u64,
    epoch: usize,
    next_batch: usize,
    rng: Rng,
    skipped_steps: u64,
    skipped_samples: u64,
    optimizer_t: u64,
    settings: TrainSettings,
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
}

fn checkpoint_dirs(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(run.join("checkpoints")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok())
                && e.path().join("state.json").is_file()
            {
                v.push((n, e.path()));
            }
        }
    }
    v.sort();
    v
}

fn write_checkpoint<T: Task>(task: &T, opt: &AdamW, state: &State, run: &Path, keep: usize) -> Result<PathBuf> {
    let dir = run.join("checkpoints");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let final_dir = dir.join(format!("step-{:08}", state.opt_step));
    let tmp = dir.join(format!(".step-{:08}.tmp-{}", state.opt_step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    task.save_adapter(&tmp)?;
    crate::checkpoint::save_safetensors_atomic(&opt.state_tensors(), None, &tmp.join("optimizer.safetensors"))?;
    crate::util::write_json_atomic(&tmp.join("state.json"), state)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("{}: cannot rename into place", final_dir.display()))?;
    // The run directory's top level always holds the newest adapter.
    task.save_adapter(run)?;
    let all = checkpoint_dirs(run);
    if all.len() > keep.max(1) {
        for (_, p) in &all[..all.len() - keep.max(1)] {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(final_dir)
}

fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut s = 0f64;
    for g in grads {
        s += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(s.sqrt())
}

fn progress(total: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    pb
}

/// Trains `task` on `data`, writing into `run`.
pub fn train<T: Task>(
    task: &mut T,
    data: &dyn Batches<T::Batch>,
    s: &TrainSettings,
    run: &Path,
    resume: bool,
    title: &str,
) -> Result<Summary> {
    std::fs::create_dir_all(run).with_context(|| format!("{}: cannot create run directory", run.display()))?;
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
    let sched =
        Schedule { lr: s.effective_lr(), min_lr: s.min_lr, warmup_epochs: s.warmup_epochs, epochs: s.epochs as f64 };
    let named = task.params();
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt =
        AdamW::new(named, AdamWConfig { beta1: s.beta1, beta2: s.beta2, eps: s.eps, weight_decay: s.weight_decay })?;
    let metrics_path = run.join("metrics.jsonl");
    let mut st = State {
        opt_step: 0,
        epoch: 0,
        next_batch: 0,
        rng: Rng::derive(s.seed, "dropout"),
        skipped_steps: 0,
        skipped_samples: 0,
        optimizer_t: 0,
        settings: s.identity(),
    };
    let mut resumed_from = None;
    if resume {
        let Some((step, dir)) = checkpoint_dirs(run).pop() else {
            bail!("{}: --resume given but no checkpoint found in checkpoints/", run.display())
        };
        let saved: State = serde_json::from_value(crate::checkpoint::read_json(&dir.join("state.json"))?)
            .with_context(|| format!("{}: malformed state", dir.join("state.json").display()))?;
        if saved.settings != s.identity() {
            bail!(
                "{}: the checkpoint was made with other settings; resume with the same ones.\n saved: {:?}\n given: {:?}",
                dir.display(),
                saved.settings,
                s.identity()
            )
        }
        let ad = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .with_context(|| format!("{}: cannot read the adapter", dir.display()))?;
        for (name, v) in task.params() {
            let t = ad
                .get(&name)
                .with_context(|| format!("{}: tensor `{name}` missing from the checkpoint", dir.display()))?;
            v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
        }
        let os = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)
            .with_context(|| format!("{}: cannot read the optimizer state", dir.display()))?;
        opt.load_state(saved.optimizer_t, &os)?;
        metrics::truncate(&metrics_path, step)?;
        st = saved;
        resumed_from = Some(step);
        eprintln!("resuming from {} (step {step}, epoch {}, batch {})", dir.display(), st.epoch, st.next_batch);
    } else if metrics_path.exists() {
        std::fs::remove_file(&metrics_path)?;
    }
    let pb = progress(total);
    pb.set_position(st.opt_step);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let start = Instant::now();
    let mut samples_total = 0u64;
    let mut last_loss = f64::NAN;
    let mut window = std::collections::VecDeque::new();
    let mut done = st.opt_step >= total;
    'epochs: while st.epoch < s.epochs && !done {
        let epoch = st.epoch;
        let mut stream = data.stream(epoch, st.next_batch);
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut acc_loss, mut acc_n, mut acc_samples) = (0f64, 0usize, 0usize);
        let mut step_start = Instant::now();
        let mut i = st.next_batch;
        while i < spe {
            let Some(batch) = stream.next() else { break };
            let batch = batch?;
            let (n, skipped) = task.batch_size(&batch);
            st.skipped_samples += skipped as u64;
            let loss = task.loss(&batch, &mut st.rng)?;
            let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let grads = (loss / accum as f64)?.backward()?;
            for (a, v) in acc.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(v.as_tensor()) {
                    *a = Some(match a.take() {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    });
                }
            }
            acc_loss += lv;
            acc_n += 1;
            acc_samples += n;
            i += 1;
            if acc_n < accum && i < spe {
                continue;
            }
            // One optimizer step.
            let frac_epoch = epoch as f64 + (i - acc_n) as f64 / spe as f64;
            let lr = sched.at(frac_epoch);
            let mut g: Vec<Tensor> = acc
                .iter_mut()
                .zip(&vars)
                .map(|(a, v)| a.take().map(Ok).unwrap_or_else(|| v.zeros_like()))
                .collect::<candle_core::Result<_>>()?;
            let loss_mean = acc_loss / acc_n as f64;
            let norm = grad_norm(&g)?;
            if !loss_mean.is_finite() || !norm.is_finite() {
                st.skipped_steps += 1;
                if st.skipped_steps >= s.max_bad_steps {
                    bail!(
                        "stopping: {} steps had a non-finite loss or gradient (last loss {loss_mean})",
                        st.skipped_steps
                    )
                }
            } else {
                if let Some(c) = s.clip_grad {
                    let coef = c / (norm + 1e-6);
                    if coef < 1.0 {
                        g = g.into_iter().map(|t| t * coef).collect::<candle_core::Result<_>>()?;
                    }
                }
                opt.step(&g, lr)?;
            }
            st.opt_step += 1;
            st.next_batch = i;
            st.optimizer_t = opt.t;
            let dt = step_start.elapsed().as_secs_f64();
            step_start = Instant::now();
            window.push_back((acc_samples, dt));
            if window.len() > 20 {
                window.pop_front();
            }
            let (ws, wt) = window.iter().fold((0usize, 0f64), |a, b| (a.0 + b.0, a.1 + b.1));
            let sps = ws as f64 / wt.max(1e-9);
            samples_total += acc_samples as u64;
            last_loss = loss_mean;
            let rec = metrics::Record {
                step: st.opt_step,
                epoch: epoch as f64 + i as f64 / spe as f64,
                loss: loss_mean,
                lr,
                grad_norm: norm,
                samples_per_s: sps,
                skipped_steps: st.skipped_steps,
                skipped_samples: st.skipped_samples,
            };
            metrics::append(&metrics_path, &rec)?;
            pb.set_position(st.opt_step);
            pb.set_message(format!("loss {loss_mean:.4} lr {lr:.2e} {sps:.1} samples/s"));
            if !tty && s.log_every > 0 && (st.opt_step.is_multiple_of(s.log_every) || st.opt_step == total) {
                let el = start.elapsed().as_secs_f64();
                let left = total - st.opt_step;
                let eta = if st.opt_step > resumed_from.unwrap_or(0) {
                    el / (st.opt_step - resumed_from.unwrap_or(0)) as f64 * left as f64
                } else {
                    0.0
                };
                eprintln!(
                    "step {}/{total} epoch {:.2} loss {loss_mean:.4} lr {lr:.3e} grad-norm {norm:.3} {sps:.1} samples/s eta {eta:.0}s",
                    st.opt_step, rec.epoch
                );
            }
            acc_loss = 0.0;
            acc_n = 0;
            acc_samples = 0;
            if i >= spe {
                st.epoch += 1;
                st.next_batch = 0;
            }
            let end = st.opt_step >= total;
            if s.save_every.is_some_and(|k| k > 0 && st.opt_step.is_multiple_of(k)) || end {
                write_checkpoint(task, &opt, &st, run, s.keep_checkpoints)?;
            }
            if end {
                done = true;
                break;
            }
        }
        if st.epoch == epoch {
            // The stream ended early (fewer batches than planned): the epoch is over.
            st.epoch += 1;
            st.next_batch = 0;
        }
        metrics::plot(&metrics::read(&metrics_path)?, &run.join("loss.png"), title)?;
        if done {
            break 'epochs;
        }
    }
    if !done {
        write_checkpoint(task, &opt, &st, run, s.keep_checkpoints)?;
    }
    metrics::plot(&metrics::read(&metrics_path)?, &run.join("loss.png"), title)?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    Ok(Summary {
        steps: st.opt_step,
        seconds: secs,
        samples: samples_total,
        samples_per_s: samples_total as f64 / secs.max(1e-9),
        final_loss: last_loss,
        skipped_steps: st.skipped_steps,
        skipped_samples: st.skipped_samples,
        resumed_from,
    })
}
