//! Small helpers shared by the commands.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::io::Write;
use std::path::Path;

/// Writes a file through a temporary sibling and a rename: readers see the old or the new
/// content, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("{}: write failed", tmp.display()))?;
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all().ok();
    }
    Ok(())
}

pub fn write_json_atomic(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Chooses the device models run on, from `--device` (`cpu`, `cuda`, `cuda:N`, `metal`): once
/// per process, before anything is loaded. GPU devices need the matching cargo feature.
pub fn set_device(spec: &str) -> Result<()> {
    let dev = parse_device(spec)?;
    if DEVICE.set(dev.clone()).is_err() && !DEVICE.get().is_some_and(|d| d.same_device(&dev)) {
        anyhow::bail!("--device {spec}: the device was already chosen ({:?})", DEVICE.get());
    }
    Ok(())
}

/// `cpu`, `cuda`, `cuda:N` or `metal` as a candle device.
pub fn parse_device(spec: &str) -> Result<Device> {
    let bad = || anyhow::anyhow!("--device {spec}: expected cpu, cuda, cuda:N or metal");
    let (kind, ord) = match spec.split_once(':') {
        Some((k, n)) => (k, n.parse::<usize>().map_err(|_| bad())?),
        None => (spec, 0),
    };
    let dev = match kind {
        "cpu" if ord == 0 => Device::Cpu,
        "cuda" => {
            // cudarc loads the CUDA libraries on first use and panics where they are missing:
            // turn that into the error below.
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let opened = std::panic::catch_unwind(|| Device::new_cuda(ord));
            std::panic::set_hook(hook);
            let why = match opened {
                Ok(Ok(dev)) => return Ok(dev),
                Ok(Err(e)) => e.to_string(),
                Err(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the CUDA libraries could not be loaded".into()),
            };
            anyhow::bail!(
                "--device {spec}: cannot open CUDA device {ord}: {why} (this binary {}; it needs the NVIDIA driver's libcuda.so and CUDA 13's libcublas, libcublasLt, libcurand and libnvrtc on the loader's path)",
                if cfg!(feature = "cuda") { "has the `cuda` feature" } else { "was built without the `cuda` feature" }
            )
        }
        "metal" => Device::new_metal(ord).with_context(|| format!("--device {spec}: cannot open the Metal device"))?,
        _ => return Err(bad()),
    };
    Ok(dev)
}

/// The device models run on: `--device`, the CPU by default. On the CPU memvp's own kernels
/// run; on a GPU the device-generic path (`ops/generic.rs`).
pub fn device() -> Device {
    DEVICE.get().cloned().unwrap_or(Device::Cpu)
}

/// The peak resident set (VmHWM) of this process in MB (since start, or since the bench reset
/// it); NaN where /proc is not there.
pub fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// The resident set now (MiB; Linux).
pub fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

fn status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// `max |a - b| / max |b|` over all elements, on any device; a NaN on either side counts as
/// an infinite error rather than vanishing in the max.
pub fn max_rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if a.len() != b.len() {
        anyhow::bail!("{} values against {}", a.len(), b.len());
    }
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    let d = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max(if x.is_nan() || y.is_nan() { f64::INFINITY } else { (x - y).abs() }));
    Ok(d / scale)
}
