//! Ownership of a run directory: one writer at a time (an advisory lock on `RUN/.lock`, released
//! by the OS when the process dies, holding the writer's PID for the message a second writer
//! gets), temporary files of dead writers removed on the next start, and no trained state
//! overwritten by accident.

use anyhow::{Context, Result, bail};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".lock";

/// Held while a process writes a run directory.
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

impl RunLock {
    /// Creates `run` if needed and takes its lock, or says which process holds it.
    pub fn acquire(run: &Path) -> Result<Self> {
        std::fs::create_dir_all(run).with_context(|| format!("{}: cannot create the run directory", run.display()))?;
        let path = run.join(LOCK_FILE);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open the run's lock file", path.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                let pid = pid.trim();
                bail!(
                    "{}: another memvp process (PID {}) is writing this run directory; wait for it to end, or choose another --out",
                    run.display(),
                    if pid.is_empty() { "unknown" } else { pid }
                )
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("{}: cannot lock the run directory", path.display()));
            }
        }
        f.set_len(0)?;
        f.seek(SeekFrom::Start(0))?;
        write!(f, "{}", std::process::id())?;
        f.flush()?;
        Ok(Self { _file: f, path })
    }
}

/// Whether a directory entry is a temporary of an interrupted atomic write: `.NAME.PID.tmp`
/// files (`util::write_atomic`) and `.step-N.tmp-PID` checkpoint directories.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && (name.ends_with(".tmp") || name.contains(".tmp-"))
}

/// Removes the temporaries that writers killed mid-write left in `run` and `run/checkpoints`
/// (call with the lock held: no live writer owns them). Returns how many were removed.
pub fn remove_stale_temporaries(run: &Path) -> Result<usize> {
    let mut n = 0;
    for dir in [run.to_path_buf(), run.join("checkpoints")] {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !is_temporary(&name) {
                continue;
            }
            let p = e.path();
            let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            r.with_context(|| format!("{}: cannot remove a stale temporary", p.display()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// What a run directory holds that training would replace.
pub const TRAINED_STATE: &[&str] =
    &["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "train_summary.json", "checkpoints"];

/// The trained-state entries present in `run`.
pub fn trained_state(run: &Path) -> Vec<&'static str> {
    TRAINED_STATE
        .iter()
        .copied()
        .filter(|n| {
            let p = run.join(n);
            if *n == "checkpoints" { std::fs::read_dir(&p).is_ok_and(|mut rd| rd.next().is_some()) } else { p.exists() }
        })
        .collect()
}

/// Removes the trained state of `run` (for `--overwrite`), with the plot and settings of the
/// old run.
pub fn clear_trained_state(run: &Path) -> Result<()> {
    for n in TRAINED_STATE.iter().chain(&["loss.png", "config.toml"]) {
        let p = run.join(n);
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else if p.exists() {
            std::fs::remove_file(&p)
        } else {
            Ok(())
        };
        r.with_context(|| format!("{}: cannot remove", p.display()))?;
    }
    Ok(())
}
