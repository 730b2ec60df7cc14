//! `memvp compare`: several methods trained on the same data and bases with the same recipe and
//! budget, each evaluated on a fixed held-out subset every `eval_every` steps and on the final
//! split at the end; writes `compare.json`, `compare.md` and `compare.png` (accuracy against
//! training wall time, one curve per run; final accuracy per question type).
//!
//! Each run is a normal run directory under `OUT/runs/NAME`, trained by `memvp train --resume`
//! in segments of `eval_every` steps (a child process each, so every run's peak RSS is its
//! own) and evaluated by `memvp eval` between segments. Stopping the comparison at any point
//! and running the same command again continues where it was. A finished run keeps its result
//! in `runs/NAME/result.json` beside its `compare-config.toml`: those two files alone (no
//! checkpoints) carry a finished run to another machine's `OUT`, so a comparison longer than
//! one machine's lease is finished over several.
//!
//! The spec (TOML):
//! ```toml
//! [base]                 # a config.toml tree shared by every run
//! model = { vision = "random:small", lm = "SmolLM2-135M-Instruct.Q4_1.gguf" }
//! data = { source = "easyvqa:DIR" }
//! optim = { epochs = 1, batch_size = 16, warmup_epochs = 0.05 }
//! [compare]
//! eval_every = 200       # optimizer steps between evaluations of the held-out subset
//! eval_samples = 500     # the first N questions of `eval_split`
//! eval_split = "test"
//! final_split = "test"   # the final evaluation (all of it unless final_max_samples)
//! [[runs]]
//! name = "memvp"
//! settings = { method = { name = "memvp" }, optim = { lr = 1e-3 } }
//! [[runs]]
//! name = "control"
//! settings = { method = { name = "memvp", image_blind = true }, optim = { lr = 1e-3 } }
//! ```

use super::settings::RunSettings;
use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// The comparison (TOML: [base], [compare], [[runs]]; see the README).
    #[arg(long)]
    pub spec: PathBuf,
    /// Where the runs and the report go; running the same command again continues it.
    #[arg(long)]
    pub out: PathBuf,
    /// Print compare.json on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareSettings {
    pub eval_every: u64,
    pub eval_samples: usize,
    #[serde(default = "test")]
    pub eval_split: String,
    #[serde(default = "test")]
    pub final_split: String,
    #[serde(default)]
    pub final_max_samples: Option<usize>,
    #[serde(default = "eval_batch")]
    pub eval_batch_size: usize,
    /// Evaluation data (`KIND:PATH`); the training data's source when absent.
    #[serde(default)]
    pub eval_data: Option<String>,
}

fn test() -> String {
    "test".into()
}

fn eval_batch() -> usize {
    32
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunSpec {
    name: String,
    #[serde(default)]
    settings: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    base: Value,
    compare: CompareSettings,
    #[serde(default)]
    runs: Vec<RunSpec>,
}

/// One evaluation of the held-out subset during training.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Point {
    pub step: u64,
    /// Seconds of training steps up to `step` (evaluations and loading excluded).
    pub train_seconds: f64,
    pub samples: u64,
    pub accuracy: f64,
    pub per_type: Value,
    /// The largest peak RSS of the training processes so far (MB).
    #[serde(default)]
    pub peak_rss_mb: f64,
    /// The machine's matrix-product peak (GFLOP/s) measured just before the training segment
    /// that ended here: a shared VM's speed drifts between sittings, and this says by how much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_gflops: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub name: String,
    pub method: String,
    pub image_blind: bool,
    pub lr: f64,
    pub trainable_parameters: u64,
    pub steps: u64,
    pub samples: u64,
    pub train_seconds: f64,
    pub samples_per_s: f64,
    pub peak_rss_mb: f64,
    /// The lowest and highest matrix-product peak (GFLOP/s) measured before its segments.
    pub machine_gflops: Option<(f64, f64)>,
    pub curve: Vec<Point>,
    /// The final split's `eval.json` (accuracy, per type, n).
    pub final_eval: Value,
}

#[derive(Serialize)]
pub struct CompareReport {
    pub spec: PathBuf,
    pub compare: CompareSettings,
    pub machine: String,
    pub runs: Vec<RunResult>,
}

/// `b` laid over `a`, tables merged key by key.
fn merge(a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut m = x.clone();
            for (k, v) in y {
                let merged = match m.get(k) {
                    Some(old) => merge(old, v),
                    None => v.clone(),
                };
                m.insert(k.clone(), merged);
            }
            Value::Object(m)
        }
        (_, Value::Null) => a.clone(),
        _ => b.clone(),
    }
}

fn read_spec(path: &Path) -> Result<Spec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let t: toml::Value = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let spec: Spec =
        serde_json::from_value(serde_json::to_value(t)?).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if spec.runs.is_empty() {
        bail!("{}: no [[runs]]", path.display())
    }
    if spec.compare.eval_every == 0 || spec.compare.eval_samples == 0 {
        bail!("{}: compare.eval_every and compare.eval_samples must be at least 1", path.display())
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in &spec.runs {
        if r.name.is_empty() || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_+.".contains(c)) {
            bail!(
                "{}: run name `{}`: use letters, digits and - _ + . only (it names a directory)",
                path.display(),
                r.name
            )
        }
        if !seen.insert(&r.name) {
            bail!("{}: run name `{}` is used twice", path.display(), r.name)
        }
    }
    Ok(spec)
}

/// Set by SIGINT/SIGTERM: the child in progress gets the signal too (same process group) and
/// stops cleanly; the comparison then stops instead of starting the next child.
static STOPPED: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();

fn stop_requested() -> bool {
    STOPPED.get().is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
}

/// Runs `memvp ARGS`, its progress going to our stderr; stdout returned.
fn memvp(args: &[String]) -> Result<String> {
    if stop_requested() {
        bail!("stopped by a signal; run the same `memvp compare` command again to continue")
    }
    let exe = std::env::current_exe().context("cannot find the memvp executable")?;
    let out = Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run memvp {}", args.first().map(String::as_str).unwrap_or("")))?;
    if !out.status.success() {
        let code = out.status.code();
        if matches!(code, Some(130) | Some(143)) || code.is_none() || stop_requested() {
            bail!("`memvp {}` was stopped; run the same `memvp compare` command again to continue", args.join(" "))
        }
        bail!("`memvp {}` failed (exit {:?})", args.join(" "), code)
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn newest_step(run: &Path) -> u64 {
    crate::train::checkpoint::list(run).last().map(|(s, _)| *s).unwrap_or(0)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn read_json(p: &Path) -> Result<Value> {
    serde_json::from_slice(&std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))?)
        .with_context(|| format!("{}: malformed", p.display()))
}

/// Evaluates `run` on `split` (first `max` samples), writing into `out`; the `eval.json`.
fn evaluate(c: &CompareSettings, data: &str, run: &Path, split: &str, max: Option<usize>, out: &Path) -> Result<Value> {
    let mut a: Vec<String> = vec![
        "eval".into(),
        "--run".into(),
        s(run),
        "--data".into(),
        data.into(),
        "--split".into(),
        split.into(),
        "--batch-size".into(),
        c.eval_batch_size.to_string(),
        "--out".into(),
        s(out),
        "--json".into(),
    ];
    if let Some(n) = max {
        a.extend(["--max-samples".into(), n.to_string()]);
    }
    memvp(&a)?;
    read_json(&out.join("eval.json"))
}

/// Training seconds and samples of the steps up to `step`, from the run's `metrics.jsonl`
/// (which a resumed run cuts back to its checkpoint, so every kept step is counted once).
fn trained_up_to(run: &Path, step: u64) -> Result<(f64, u64)> {
    let recs = crate::train::metrics::read(&run.join("metrics.jsonl"))?;
    let kept = recs.iter().filter(|r| r.step <= step);
    Ok(kept.fold((0.0, 0), |(t, n), r| (t + r.step_s, n + r.samples as u64)))
}

fn one_run(spec: &Spec, r: &RunSpec, out: &Path) -> Result<RunResult> {
    let c = &spec.compare;
    let dir = out.join("runs").join(&r.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let tree = merge(&spec.base, &r.settings);
    let cfg = RunSettings::from_value(tree, &format!("run `{}`", r.name))?;
    let toml = cfg.to_toml()?;
    let cfg_path = dir.join("compare-config.toml");
    let result_path = dir.join("result.json");
    if result_path.exists() {
        let Ok(before) = std::fs::read_to_string(&cfg_path) else {
            bail!(
                "run `{}`: {} is there but not {} beside it, so the settings it finished with are \
                 unknown; carry the two files together",
                r.name,
                result_path.display(),
                cfg_path.display()
            )
        };
        if before != toml {
            bail!(
                "run `{}` finished with other settings than the spec gives it now ({} holds the \
                 ones it had); give the run a new name or move {} away",
                r.name,
                cfg_path.display(),
                dir.display()
            )
        }
        let done: RunResult = serde_json::from_value(read_json(&result_path)?)
            .with_context(|| format!("{}: not a run result", result_path.display()))?;
        eprintln!("[{}] finished earlier ({})", r.name, result_path.display());
        return Ok(done);
    }
    crate::util::write_atomic(&cfg_path, toml.as_bytes())?;
    let data = c.eval_data.clone().unwrap_or_else(|| cfg.data.source.clone());
    let curve_path = dir.join("curve.jsonl");
    let mut curve: Vec<Point> = match std::fs::read_to_string(&curve_path) {
        Ok(t) => t.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?,
        Err(_) => Vec::new(),
    };
    let done_path = dir.join("trained");
    let mut step = newest_step(&dir);
    // Points beyond the newest checkpoint (a run redone with --overwrite elsewhere) are stale.
    curve.retain(|p| p.step <= step);
    let mut peak: f64 = curve.iter().map(|p| p.peak_rss_mb).fold(0.0, f64::max);
    let mut segment_gflops = None;
    while !done_path.exists() {
        let target = (step / c.eval_every + 1) * c.eval_every;
        eprintln!("[{}] training to step {target}", r.name);
        let mut a: Vec<String> = vec![
            "train".into(),
            "--config".into(),
            s(&cfg_path),
            "--out".into(),
            s(&dir),
            "--max-steps".into(),
            target.to_string(),
            "--save-every".into(),
            c.eval_every.to_string(),
        ];
        if step > 0 {
            a.push("--resume".into());
        } else if !crate::train::rundir::trained_state(&dir).is_empty() {
            // A first segment killed before its first checkpoint (SIGKILL, power loss): nothing
            // it did can be resumed, so it is started again rather than refused.
            eprintln!("[{}] no checkpoint from the earlier attempt: starting it again", r.name);
            a.push("--overwrite".into());
        }
        if !stop_requested() {
            segment_gflops = super::bench::matmul_peak_gflops().ok();
        }
        memvp(&a)?;
        if let Ok(sum) = read_json(&dir.join("train_summary.json")) {
            peak = peak.max(sum["peak_rss_mb"].as_f64().unwrap_or(0.0));
        }
        let now = newest_step(&dir);
        // Evaluate the newest checkpoint unless the curve has it (also after a stop between a
        // segment's end and its evaluation).
        if now > 0 && curve.last().is_none_or(|p| p.step < now) {
            let ev = evaluate(
                c,
                &data,
                &dir,
                &c.eval_split,
                Some(c.eval_samples),
                &dir.join("evals").join(format!("step-{now:08}")),
            )?;
            let (secs, samples) = trained_up_to(&dir, now)?;
            let p = Point {
                step: now,
                train_seconds: secs,
                samples,
                accuracy: ev["accuracy"].as_f64().unwrap_or(f64::NAN),
                per_type: ev["per_type"].clone(),
                peak_rss_mb: peak,
                machine_gflops: segment_gflops.take(),
            };
            eprintln!("[{}] step {now}: held-out accuracy {:.2} after {secs:.0} s of training", r.name, p.accuracy);
            let mut line = serde_json::to_string(&p)?;
            line.push('\n');
            let mut all = std::fs::read_to_string(&curve_path).unwrap_or_default();
            all.push_str(&line);
            crate::util::write_atomic(&curve_path, all.as_bytes())?;
            curve.push(p);
        }
        if now < target {
            // The schedule ended before the target: the run is complete.
            crate::util::write_atomic(&done_path, b"")?;
        }
        step = now;
    }
    let final_dir = dir.join("final");
    let final_eval = match read_json(&final_dir.join("eval.json")) {
        Ok(v) => v,
        Err(_) => {
            eprintln!("[{}] final evaluation on `{}`", r.name, c.final_split);
            evaluate(c, &data, &dir, &c.final_split, c.final_max_samples, &final_dir)?
        }
    };
    let summary = read_json(&dir.join("train_summary.json")).unwrap_or(Value::Null);
    if peak == 0.0 {
        peak = summary["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
    }
    let (secs, samples) = trained_up_to(&dir, step)?;
    let speeds: Vec<f64> = curve.iter().filter_map(|p| p.machine_gflops).collect();
    let machine_gflops = (!speeds.is_empty())
        .then(|| (speeds.iter().copied().fold(f64::INFINITY, f64::min), speeds.iter().copied().fold(0.0, f64::max)));
    let done = RunResult {
        name: r.name.clone(),
        method: cfg.method.name.clone(),
        image_blind: cfg.method.image_blind,
        lr: cfg.optim.effective_lr(),
        trainable_parameters: summary["trainable_parameters"].as_u64().unwrap_or(0),
        steps: step,
        samples,
        train_seconds: secs,
        samples_per_s: samples as f64 / secs.max(1e-9),
        peak_rss_mb: peak,
        machine_gflops,
        curve,
        final_eval,
    };
    crate::util::write_json_atomic(&result_path, &done)?;
    Ok(done)
}

pub fn run(a: &CompareArgs) -> Result<CompareReport> {
    let spec = read_spec(&a.spec)?;
    let flag = STOPPED.get_or_init(Default::default).clone();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone())?;
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}: cannot create", a.out.display()))?;
    let _lock = crate::train::rundir::RunLock::acquire(&a.out)?;
    let mut runs = Vec::new();
    for r in &spec.runs {
        runs.push(one_run(&spec, r, &a.out)?);
    }
    let report =
        CompareReport { spec: a.spec.clone(), compare: spec.compare.clone(), machine: super::bench::machine(), runs };
    crate::util::write_json_atomic(&a.out.join("compare.json"), &report)?;
    crate::util::write_atomic(&a.out.join("compare.md"), markdown(&report).as_bytes())?;
    plot(&report, &a.out.join("compare.png"))?;
    Ok(report)
}

fn types_of(report: &CompareReport) -> Vec<String> {
    let mut t: Vec<String> = report
        .runs
        .iter()
        .flat_map(|r| {
            r.final_eval["per_type"].as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default()
        })
        .collect();
    t.sort();
    t.dedup();
    t
}

pub fn markdown(report: &CompareReport) -> String {
    let types = types_of(report);
    let mut m = String::new();
    m.push_str(&format!(
        "# Comparison\n\nMachine: {}. Held-out curve: the first {} questions of `{}`, every {} steps; final: `{}`{}.\n\n",
        report.machine,
        report.compare.eval_samples,
        report.compare.eval_split,
        report.compare.eval_every,
        report.compare.final_split,
        report.compare.final_max_samples.map(|n| format!(" (first {n})")).unwrap_or_default()
    ));
    m.push_str("| run | method | lr | trained params | steps | samples | train time (s) | samples/s | peak RSS (MB) | final accuracy |");
    for t in &types {
        m.push_str(&format!(" {t} |"));
    }
    m.push_str("\n|---|---|---|---|---|---|---|---|---|---|");
    m.push_str(&"---|".repeat(types.len()));
    m.push('\n');
    for r in &report.runs {
        m.push_str(&format!(
            "| {} | {}{} | {:.2e} | {} | {} | {} | {:.0} | {:.2} | {:.0} | **{}** |",
            r.name,
            r.method,
            if r.image_blind { " (image-blind)" } else { "" },
            r.lr,
            r.trainable_parameters,
            r.steps,
            r.samples,
            r.train_seconds,
            r.samples_per_s,
            r.peak_rss_mb,
            r.final_eval["accuracy"]
        ));
        for t in &types {
            m.push_str(&format!(" {} |", r.final_eval["per_type"][t]));
        }
        m.push('\n');
    }
    m.push_str("\nHeld-out accuracy during training (step: accuracy at training seconds):\n\n");
    for r in &report.runs {
        let pts: Vec<String> =
            r.curve.iter().map(|p| format!("{}: {:.2} at {:.0} s", p.step, p.accuracy, p.train_seconds)).collect();
        m.push_str(&format!("- {}: {}\n", r.name, pts.join("; ")));
    }
    if report.runs.iter().any(|r| r.machine_gflops.is_some()) {
        m.push_str(
            "\nThe machine's matrix-product peak measured before the training segments (GFLOP/s; \
             training times of runs made at different speeds compare only after scaling by it):\n\n",
        );
        for r in &report.runs {
            if let Some((lo, hi)) = r.machine_gflops {
                m.push_str(&format!("- {}: {lo:.0} to {hi:.0}\n", r.name));
            }
        }
    }
    m
}

/// Twelve distinguishable colours (matplotlib's tab10 order, then two more): a sweep has a dozen
/// runs, and a repeated colour would make two of them one curve to the eye.
const COLOURS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(0, 0, 0),
    RGBColor(255, 187, 120),
];

fn plot(report: &CompareReport, path: &Path) -> Result<()> {
    crate::train::metrics::ensure_font();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", path.display());
    let (w, h) = (1000u32, 800u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, bottom) = root.split_vertically(460);
        let xmax =
            report.runs.iter().flat_map(|r| r.curve.iter().map(|p| p.train_seconds)).fold(1.0f64, f64::max) * 1.05;
        let mut c = ChartBuilder::on(&top)
            .caption("held-out accuracy against training time", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..xmax, 0f64..100f64)
            .map_err(|e| err(&e))?;
        c.configure_mesh().x_desc("training wall time (s)").y_desc("accuracy (%)").draw().map_err(|e| err(&e))?;
        for (i, r) in report.runs.iter().enumerate() {
            let col = COLOURS[i % COLOURS.len()];
            let pts: Vec<(f64, f64)> = std::iter::once((0.0, f64::NAN))
                .chain(r.curve.iter().map(|p| (p.train_seconds, p.accuracy)))
                .filter(|p| p.1.is_finite())
                .collect();
            c.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(r.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
            c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, col.filled()))).map_err(|e| err(&e))?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        // Final accuracy per type: groups of bars.
        let mut groups = vec!["overall".to_string()];
        groups.extend(types_of(report));
        let n_runs = report.runs.len().max(1);
        let slots = groups.len() * (n_runs + 1);
        // The y range leaves room above 100% for each group's name, written over its bars (axis
        // tick labels fall wherever the tick positions do, not under the groups).
        let mut c2 = ChartBuilder::on(&bottom)
            .caption("final accuracy by question type", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(10)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..slots as f64, 0f64..112f64)
            .map_err(|e| err(&e))?;
        let per = n_runs + 1;
        c2.configure_mesh().disable_x_mesh().x_labels(0).y_desc("accuracy (%)").draw().map_err(|e| err(&e))?;
        let label = TextStyle::from(("sans-serif", 16).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        c2.draw_series(
            groups.iter().enumerate().map(|(g, name)| {
                Text::new(name.clone(), ((g * per) as f64 + n_runs as f64 / 2.0, 110.0), label.clone())
            }),
        )
        .map_err(|e| err(&e))?;
        for (i, r) in report.runs.iter().enumerate() {
            let col = COLOURS[i % COLOURS.len()];
            let bars = groups.iter().enumerate().filter_map(|(g, t)| {
                let v = if t == "overall" {
                    r.final_eval["accuracy"].as_f64()
                } else {
                    r.final_eval["per_type"][t].as_f64()
                };
                let x0 = (g * per + i) as f64;
                v.map(|v| Rectangle::new([(x0 + 0.05, 0.0), (x0 + 0.95, v)], col.filled()))
            });
            c2.draw_series(bars).map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    crate::train::metrics::write_png(buf, w, h, path)
}

#[cfg(test)]
mod tests {
    use super::merge;
    use serde_json::json;

    #[test]
    fn run_settings_lie_over_the_base_key_by_key() {
        let a = json!({"optim": {"lr": 1.0, "epochs": 2}, "model": {"lm": "x"}});
        let b = json!({"optim": {"lr": 3.0}, "method": {"name": "lora"}});
        assert_eq!(
            merge(&a, &b),
            json!({"optim": {"lr": 3.0, "epochs": 2}, "model": {"lm": "x"}, "method": {"name": "lora"}})
        );
        assert_eq!(merge(&a, &serde_json::Value::Null), a);
    }
}
