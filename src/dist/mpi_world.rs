//! The MPI job (the `mpi` crate over Open MPI or MPICH): gather and broadcast of byte messages.

use super::Comm;
use anyhow::{Result, bail};
use mpi::Threading;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::sync::Mutex;

/// The universe lives until [`finalize`]; dropping it calls MPI_Finalize.
static UNIVERSE: Mutex<Option<UniverseCell>> = Mutex::new(None);

struct UniverseCell(#[allow(dead_code)] Universe);
// SAFETY: MPI is initialised with `Threading::Serialized`: any thread may call MPI as long as
// no two calls overlap. The universe is only touched under the `UNIVERSE` mutex (to drop it).
unsafe impl Send for UniverseCell {}

pub struct MpiWorld {
    /// Held for every call: that is what `Threading::Serialized` asks of us.
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
}

// SAFETY: every MPI call on the communicator happens under the `comm` mutex, so calls never
// overlap, which is all `Threading::Serialized` requires; `rank`/`size` are plain integers.
unsafe impl Send for MpiWorld {}
// SAFETY: as above: shared references only reach MPI through the mutex.
unsafe impl Sync for MpiWorld {}

impl MpiWorld {
    pub fn init() -> Result<Self> {
        let Some((universe, level)) = mpi::initialize_with_threading(Threading::Serialized) else {
            bail!("MPI was already initialised in this process")
        };
        if !matches!(level, Threading::Serialized | Threading::Multiple) {
            bail!("the MPI library offers only {level:?} threading; memvp needs Serialized")
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(UniverseCell(universe));
        Ok(Self { comm: Mutex::new(world), rank, size })
    }
}

pub fn finalize() {
    // Dropping the universe finalises MPI.
    let cell = UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(cell);
}

fn count(n: usize) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| anyhow::anyhow!("a message between ranks of {n} bytes is over MPI's 2 GiB count limit"))
}

impl Comm for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn gather(&self, mine: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let root = comm.process_at_rank(0);
        let n = mine.len() as u64;
        count(mine.len())?;
        // Empty slices point nowhere; Open MPI rejects such buffers even with a count of 0.
        static NOTHING: [u8; 1] = [0];
        let mine = if mine.is_empty() { &NOTHING[..0] } else { mine };
        if self.rank != 0 {
            root.gather_into(&n);
            root.gather_varcount_into(mine);
            return Ok(None);
        }
        let mut lens = vec![0u64; self.size];
        root.gather_into_root(&n, &mut lens[..]);
        let counts: Vec<i32> = lens.iter().map(|&l| count(l as usize)).collect::<Result<_>>()?;
        let mut displs = Vec::with_capacity(self.size);
        let mut at = 0usize;
        for &c in &counts {
            displs.push(count(at)?);
            at += c as usize;
        }
        let mut buf = vec![0u8; at.max(1)];
        {
            let mut part = PartitionMut::new(&mut buf[..at.max(1)], &counts[..], &displs[..]);
            root.gather_varcount_into_root(mine, &mut part);
        }
        let mut out = Vec::with_capacity(self.size);
        let mut at = 0usize;
        for &c in &counts {
            out.push(buf[at..at + c as usize].to_vec());
            at += c as usize;
        }
        Ok(Some(out))
    }
    fn broadcast(&self, mut data: Vec<u8>) -> Result<Vec<u8>> {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let root = comm.process_at_rank(0);
        let mut n = data.len() as u64;
        count(data.len())?;
        root.broadcast_into(&mut n);
        if self.rank != 0 {
            data = vec![0u8; n as usize];
        }
        if n > 0 {
            root.broadcast_into(&mut data[..]);
        }
        Ok(data)
    }
    fn abort(&self, code: i32) -> ! {
        match self.comm.try_lock() {
            Ok(c) => c.abort(code),
            // Another thread is inside a call: leaving without MPI_Finalize also makes the
            // launcher end every rank.
            Err(_) => std::process::exit(code),
        }
    }
}
