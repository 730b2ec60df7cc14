//! Several processes working as one job: the transport that data-parallel training
//! ([`crate::train`]) and sharded evaluation use. It moves bytes only; what they mean (gradients
//! folded in a fixed order, predictions put back in order) belongs to the caller.
//!
//! With the `mpi` feature and started by `mpirun`/`srun`, [`init`] joins the MPI job; otherwise
//! the world is this one process.

#[cfg(feature = "mpi")]
mod mpi_world;

use anyhow::{Result, bail};
use std::sync::OnceLock;

/// The processes of the job, rank 0 first.
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Every rank's bytes, in rank order, on rank 0 (`None` on the others). Every rank calls it.
    fn gather(&self, mine: &[u8]) -> Result<Option<Vec<Vec<u8>>>>;
    /// Rank 0's `data` on every rank (what the others pass is ignored). Every rank calls it.
    fn broadcast(&self, data: Vec<u8>) -> Result<Vec<u8>>;
    /// Ends every process of the job now, with `code`.
    fn abort(&self, code: i32) -> !;
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// A job of one process.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn gather(&self, mine: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        Ok(Some(vec![mine.to_vec()]))
    }
    fn broadcast(&self, data: Vec<u8>) -> Result<Vec<u8>> {
        Ok(data)
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

static WORLD: OnceLock<Box<dyn Comm>> = OnceLock::new();

/// The number of processes the launcher started, read from the variables `mpirun` (Open MPI,
/// MPICH/PMI) and Slurm's `srun` set; `None` outside a launcher.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.trim().parse().ok()))
}

/// This process's rank among those of the job on the same machine (what a GPU rank uses to
/// pick its device), from the launcher's variables; 0 outside a launcher.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// Joins the job the launcher started (once; later calls do nothing). Outside a launcher the
/// world is this process alone. Refuses a multi-process launch of a build without `mpi`, which
/// would otherwise run N independent copies writing the same run.
pub fn init() -> Result<()> {
    if WORLD.get().is_some() {
        return Ok(());
    }
    let n = launched_size().unwrap_or(1);
    #[cfg(feature = "mpi")]
    if std::env::vars().any(|(k, _)| k.starts_with("OMPI_COMM_WORLD") || k.starts_with("PMI") || k == "SLURM_PROCID") {
        let w = mpi_world::MpiWorld::init()?;
        let _ = WORLD.set(Box::new(w));
        return Ok(());
    }
    if n > 1 {
        bail!(
            "started as one of {n} processes, but this memvp was built without the `mpi` feature: \
             each process would train alone. Build with `cargo build --release --features mpi`"
        )
    }
    let _ = WORLD.set(Box::new(Single));
    Ok(())
}

/// The job's processes ([`Single`] until [`init`] joined an MPI job).
pub fn world() -> &'static dyn Comm {
    static SINGLE: Single = Single;
    match WORLD.get() {
        Some(w) => w.as_ref(),
        None => &SINGLE,
    }
}

/// Leaves the job cleanly (MPI_Finalize); call once at the end of `main` on success.
pub fn finish() {
    #[cfg(feature = "mpi")]
    mpi_world::finalize();
}

/// `rank r of n: ` for messages of a job of several processes, else nothing.
pub fn who() -> String {
    let w = world();
    if w.size() > 1 { format!("rank {} of {}: ", w.rank(), w.size()) } else { String::new() }
}

/// Little-endian writer (and [`Reader`]) of the byte messages ranks exchange.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub fn f64(&mut self, x: f64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub fn f32s(&mut self, xs: &[f32]) -> &mut Self {
        self.0.reserve(xs.len() * 4);
        for x in xs {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.at + n > self.buf.len() {
            bail!(
                "a message between ranks is shorter than its contents ({} bytes, wanted {})",
                self.buf.len(),
                self.at + n
            )
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        Ok(self.take(n * 4)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let mut w = Writer::default();
        w.u64(7).f64(-0.0).f32s(&[1.5, f32::NAN, -0.0]).bytes(b"abc");
        let mut r = Reader::new(&w.0);
        assert_eq!(r.u64().unwrap(), 7);
        assert_eq!(r.f64().unwrap().to_bits(), (-0.0f64).to_bits());
        let v = r.f32s(3).unwrap();
        assert_eq!(v[0], 1.5);
        assert!(v[1].is_nan());
        assert_eq!(v[2].to_bits(), (-0.0f32).to_bits());
        assert_eq!(r.bytes().unwrap(), b"abc");
        assert!(r.u64().is_err());
    }
}
