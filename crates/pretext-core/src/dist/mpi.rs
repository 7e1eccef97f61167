//! The collectives over MPI (the `mpi` crate on the system's Open MPI or
//! MPICH), for processes started by `mpirun` / `mpiexec` / `srun`.

use super::{Collective, World};
use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Keeps MPI initialised; finalises it when dropped.
pub struct Guard {
    _universe: mpi::environment::Universe,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mpi::Guard")
    }
}

impl Guard {
    /// Initialises MPI (serialised threading: any thread may call, one at a
    /// time) and returns the guard and the world of `MPI_COMM_WORLD`.
    pub fn start() -> crate::Result<(Self, World)> {
        let Some((universe, threading)) = mpi::initialize_with_threading(mpi::Threading::Serialized) else {
            return Err(crate::Error::Config(
                "MPI was already initialised in this process".into(),
            ));
        };
        if threading < mpi::Threading::Serialized {
            return Err(crate::Error::Config(format!(
                "the MPI library offers thread support {threading:?}; pretext needs at least Serialized"
            )));
        }
        let comm = universe.world();
        let version = mpi::environment::library_version()
            .ok()
            .and_then(|v| v.split([',', '\0']).next().map(|s| s.trim().to_string()))
            .unwrap_or_else(|| "unknown library".into());
        let mpi = Mpi {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            version,
            comm: Mutex::new(Comm(comm)),
        };
        Ok((Self { _universe: universe }, World::new(Arc::new(mpi))))
    }
}

/// `MPI_COMM_WORLD`. MPI runs with serialised threading and every call
/// goes through [`Mpi::comm`]'s lock, so the handle may move between threads.
struct Comm(SimpleCommunicator);

// SAFETY: MPI was initialised with MPI_THREAD_SERIALIZED (checked in
// `Guard::start`), which allows calls from any thread as long as no two are
// concurrent; every use of the communicator holds the mutex around it.
unsafe impl Send for Comm {}

struct Mpi {
    rank: usize,
    size: usize,
    version: String,
    comm: Mutex<Comm>,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("library", &self.version)
            .finish()
    }
}

impl Mpi {
    fn comm(&self) -> MutexGuard<'_, Comm> {
        match self.comm.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> String {
        format!("MPI ({})", self.version)
    }

    fn all_reduce_f32(&self, buf: &mut [f32]) {
        let send = buf.to_vec();
        self.comm().0.all_reduce_into(&send[..], buf, SystemOperation::sum());
    }

    fn all_reduce_f64(&self, buf: &mut [f64]) {
        let send = buf.to_vec();
        self.comm().0.all_reduce_into(&send[..], buf, SystemOperation::sum());
    }

    fn all_gather_f32(&self, local: &[f32], out: &mut [f32]) {
        self.comm().0.all_gather_into(local, out);
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) {
        let comm = self.comm();
        comm.0.process_at_rank(root as i32).broadcast_into(buf);
    }

    fn barrier(&self) {
        // A non-blocking barrier polled with sleeps: ranks that wait here
        // (while rank 0 evaluates) leave the CPU to it instead of spinning.
        let mut request = self.comm().0.immediate_barrier();
        loop {
            match request.test() {
                Ok(_) => return,
                Err(r) => request = r,
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn abort(&self, code: i32) -> ! {
        self.comm().0.abort(code)
    }
}
