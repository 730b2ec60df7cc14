//! What a run shows and keeps while it trains: the progress bar (or a log line every
//! `log_every` steps without a terminal), `metrics.jsonl` and `loss.png`.

use super::StepRecord;
use super::metrics::{self, Record};
use anyhow::Result;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct Logger {
    run: PathBuf,
    title: String,
    total: u64,
    first: u64,
    log_every: u64,
    world_size: usize,
    pb: indicatif::ProgressBar,
    tty: bool,
    start: Instant,
    /// (samples, seconds) of the last 20 steps, for samples/s.
    window: VecDeque<(usize, f64)>,
}

pub fn progress_bar(total: u64, template: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

impl Logger {
    /// `first`: the step the run starts from (a resumed run's checkpoint).
    /// `world_size`: the ranks that compute each step (kept in every record).
    pub fn new(run: &Path, title: &str, total: u64, first: u64, log_every: u64, world_size: usize) -> Self {
        let pb = progress_bar(total, "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}");
        pb.set_position(first);
        Logger {
            run: run.to_path_buf(),
            title: title.to_string(),
            total,
            first,
            log_every,
            world_size,
            pb,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            start: Instant::now(),
            window: VecDeque::new(),
        }
    }

    pub fn step(&mut self, rec: &StepRecord, skipped_steps: u64, skipped_samples: u64) -> Result<()> {
        self.window.push_back((rec.samples, rec.seconds));
        if self.window.len() > 20 {
            self.window.pop_front();
        }
        let (ws, wt) = self.window.iter().fold((0usize, 0f64), |a, b| (a.0 + b.0, a.1 + b.1));
        let sps = ws as f64 / wt.max(1e-9);
        let r = Record {
            step: rec.step,
            epoch: rec.epoch,
            loss: rec.loss,
            lr: rec.lr,
            grad_norm: rec.grad_norm,
            samples_per_s: sps,
            skipped_steps,
            skipped_samples,
            world_size: self.world_size,
            step_s: rec.seconds,
            samples: rec.samples,
            sync_s: rec.sync_seconds,
        };
        metrics::append(&self.run.join("metrics.jsonl"), &r)?;
        let (loss, lr, norm) = (rec.loss, rec.lr, rec.grad_norm);
        self.pb.set_position(rec.step);
        self.pb.set_message(format!("loss {loss:.4} lr {lr:.2e} {sps:.1} samples/s"));
        if !self.tty && self.log_every > 0 && (rec.step.is_multiple_of(self.log_every) || rec.step == self.total) {
            let el = self.start.elapsed().as_secs_f64();
            let left = self.total.saturating_sub(rec.step);
            let eta = if rec.step > self.first { el / (rec.step - self.first) as f64 * left as f64 } else { 0.0 };
            eprintln!(
                "step {}/{} epoch {:.2} loss {loss:.4} lr {lr:.3e} grad-norm {norm:.3} {sps:.1} samples/s eta {eta:.0}s",
                rec.step, self.total, rec.epoch
            );
        }
        Ok(())
    }

    /// Redraws `loss.png` from `metrics.jsonl`.
    pub fn plot(&self) -> Result<()> {
        metrics::plot(&metrics::read(&self.run.join("metrics.jsonl"))?, &self.run.join("loss.png"), &self.title)
    }

    /// Clears the bar; the seconds since the start.
    pub fn finish(self) -> f64 {
        self.pb.finish_and_clear();
        self.start.elapsed().as_secs_f64()
    }
}
