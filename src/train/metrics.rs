//! `metrics.jsonl` (one object per optimizer step) and its `loss.png`.

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// JSON has no NaN: serde_json writes it as `null`; read `null` back as NaN.
fn nan_or_f64<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub step: u64,
    pub epoch: f64,
    /// `null` in the file when the step's loss was not finite (the step was skipped).
    #[serde(deserialize_with = "nan_or_f64")]
    pub loss: f64,
    pub lr: f64,
    #[serde(deserialize_with = "nan_or_f64")]
    pub grad_norm: f64,
    pub samples_per_s: f64,
    /// Steps skipped so far because the loss or gradient was not finite.
    pub skipped_steps: u64,
    /// Samples skipped so far because their image could not be read.
    pub skipped_samples: u64,
    /// Processes (MPI ranks) that computed the step; files of earlier versions lack it.
    #[serde(default = "one")]
    pub world_size: usize,
    /// Seconds the step took.
    #[serde(default)]
    pub step_s: f64,
    /// Samples in the step.
    #[serde(default)]
    pub samples: usize,
    /// Seconds of the step spent combining gradients across ranks (0 for one process).
    #[serde(default)]
    pub sync_s: f64,
}

fn one() -> usize {
    1
}

pub fn append(path: &Path, r: &Record) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(r)?)?;
    Ok(())
}

pub fn read(path: &Path) -> Result<Vec<Record>> {
    if !path.is_file() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path)?;
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// Keeps only the records up to `step` (when resuming from a checkpoint).
pub fn truncate(path: &Path, step: u64) -> Result<()> {
    let kept: Vec<Record> = read(path)?.into_iter().filter(|r| r.step <= step).collect();
    let mut s = String::new();
    for r in &kept {
        s.push_str(&serde_json::to_string(r)?);
        s.push('\n');
    }
    crate::util::write_atomic(path, s.as_bytes())
}

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-ascii.ttf");

pub(crate) fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Moving average over `2 * half + 1` points centred on each point (fewer at the ends): unlike an
/// exponential average it does not lag behind a falling loss.
fn centred_mean(points: &[(f64, f64)], half: usize) -> Vec<(f64, f64)> {
    let mut prefix = Vec::with_capacity(points.len() + 1);
    prefix.push(0.0);
    for p in points {
        prefix.push(prefix.last().unwrap() + p.1);
    }
    (0..points.len())
        .map(|i| {
            let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(points.len()));
            (points[i].0, (prefix[hi] - prefix[lo]) / (hi - lo) as f64)
        })
        .collect()
}

/// Draws loss (raw and smoothed) and learning rate against the step.
pub fn plot(records: &[Record], path: &Path, title: &str) -> Result<()> {
    ensure_font();
    if records.is_empty() {
        return Ok(());
    }
    let (w, h) = (900u32, 600u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (top, bottom) = root.split_vertically(400);
        let xmax = records.last().unwrap().step.max(1) as f64;
        let losses: Vec<(f64, f64)> =
            records.iter().filter(|r| r.loss.is_finite()).map(|r| (r.step as f64, r.loss)).collect();
        let ymax = losses.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-6) * 1.05;
        let ymin = losses.iter().map(|p| p.1).fold(f64::INFINITY, f64::min).min(ymax).max(0.0) * 0.95;
        let mut c = ChartBuilder::on(&top)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, ymin..ymax)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        c.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        c.draw_series(LineSeries::new(losses.iter().cloned(), RGBColor(170, 190, 230)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label("loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(170, 190, 230)));
        let smooth = centred_mean(&losses, (losses.len() / 100).max(1));
        c.draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label("loss (smoothed)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let lrmax = records.iter().map(|r| r.lr).fold(0.0f64, f64::max).max(1e-12) * 1.05;
        let mut c2 = ChartBuilder::on(&bottom)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..lrmax)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        c2.configure_mesh()
            .x_desc("step")
            .y_desc("learning rate")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        c2.draw_series(LineSeries::new(records.iter().map(|r| (r.step as f64, r.lr)), RED.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    write_png(buf, w, h, path)
}

/// An RGB buffer drawn by plotters, written as a PNG (atomically).
pub(crate) fn write_png(buf: Vec<u8>, w: u32, h: u32, path: &Path) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer")?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    crate::util::write_atomic(path, &png)
}

#[cfg(test)]
mod tests {
    use super::centred_mean;

    #[test]
    fn centred_mean_has_no_lag() {
        // A straight line is its own centred mean away from the ends; an EMA would trail it.
        let line: Vec<(f64, f64)> = (0..20).map(|i| (i as f64, 100.0 - 3.0 * i as f64)).collect();
        let m = centred_mean(&line, 2);
        for i in 2..18 {
            assert!((m[i].1 - line[i].1).abs() < 1e-9, "{i}: {} vs {}", m[i].1, line[i].1);
        }
        // The ends average what exists: points 0, 1, 2.
        assert!((m[0].1 - 97.0).abs() < 1e-9);
        assert_eq!(m.len(), line.len());
    }
}
