//! The collectives over NCCL (cudarc), for CUDA builds: MPI starts the
//! processes and carries NCCL's unique id from rank 0 to the others (so one
//! `mpirun` launch works on many nodes), then every reduction, gather and
//! broadcast of the step goes through NCCL on the process's GPU. Barriers
//! and aborts stay on MPI.
//!
//! The trainer hands the collectives host buffers (the gradient bucket, the
//! gathered rows); they are copied to the GPU, reduced there by NCCL and
//! copied back.

use super::{Collective, World};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::sync::{Arc, Mutex, MutexGuard};

/// The GPU of this process: `local_rank` modulo the GPUs the machine has.
/// The local rank comes from the launcher (Open MPI, MPICH, Slurm).
fn device_ordinal(rank: usize) -> crate::Result<usize> {
    let local = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok()))
        .unwrap_or(rank);
    let count =
        CudaContext::device_count().map_err(|e| crate::Error::Config(format!("NCCL: cannot count the GPUs: {e:?}")))?;
    if count <= 0 {
        return Err(crate::Error::Config("NCCL: this machine has no GPU".into()));
    }
    Ok(local % count as usize)
}

/// NCCL's communicator and the stream it runs on. NCCL calls go through
/// [`Nccl::comm`]'s lock, one at a time.
struct Link {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: the communicator is only used while holding the mutex in `Nccl`,
// so no two threads call NCCL on it at once; NCCL allows a communicator to
// be used from any thread as long as calls on it are not concurrent.
unsafe impl Send for Link {}

/// The NCCL collective of one rank.
pub struct Nccl {
    rank: usize,
    size: usize,
    device: usize,
    /// The MPI world: bootstrap, barriers, aborts.
    mpi: World,
    link: Mutex<Link>,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.device)
            .finish()
    }
}

impl Nccl {
    /// Joins the NCCL communicator of `mpi`'s ranks, rank 0 making the id
    /// and MPI broadcasting it.
    ///
    /// # Errors
    /// No GPU, or NCCL failed to start.
    pub fn start(mpi: &World) -> crate::Result<World> {
        let (rank, size) = (mpi.rank(), mpi.size());
        let device = device_ordinal(rank)?;
        let ctx = CudaContext::new(device)
            .map_err(|e| crate::Error::Config(format!("NCCL: cannot open GPU {device}: {e:?}")))?;
        let stream = ctx.default_stream();
        // The 128-byte id travels as f32 values (each byte exactly). `c_char`
        // is i8 or u8 by platform: the casts go through its bits.
        let mut bytes = [0f32; 128];
        if rank == 0 {
            let id = Id::new().map_err(|e| crate::Error::Config(format!("NCCL: no unique id: {e:?}")))?;
            for (b, c) in bytes.iter_mut().zip(id.internal()) {
                #[allow(clippy::unnecessary_cast)]
                let byte = *c as u8;
                *b = f32::from(byte);
            }
        }
        mpi.broadcast_f32(&mut bytes, 0);
        let mut internal = [0 as ::core::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(bytes) {
            #[allow(clippy::unnecessary_cast)]
            let byte = b as u8 as ::core::ffi::c_char;
            *c = byte;
        }
        let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(internal))
            .map_err(|e| crate::Error::Config(format!("NCCL: rank {rank} cannot join: {e:?}")))?;
        Ok(World::new(Arc::new(Self {
            rank,
            size,
            device,
            mpi: mpi.clone(),
            link: Mutex::new(Link { comm, stream }),
        })))
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        match self.link.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Stops every rank on a failed NCCL or CUDA call (the trait's
    /// collectives cannot fail: the others would wait for this rank).
    fn check<T, E: std::fmt::Debug>(&self, what: &str, r: Result<T, E>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self
                .mpi
                .abort(&format!("NCCL {what} failed on GPU {}: {e:?}", self.device), 1),
        }
    }

    fn reduce<T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        buf: &mut [T],
    ) {
        let link = self.link();
        let mut d = self.check("copy to the GPU", link.stream.clone_htod(buf));
        self.check("all-reduce", link.comm.all_reduce_in_place(&mut d, &ReduceOp::Sum));
        self.check("copy from the GPU", link.stream.memcpy_dtoh(&d, buf));
        self.check("synchronise", link.stream.synchronize());
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> String {
        format!("NCCL on GPU {} (bootstrapped by {})", self.device, self.mpi.backend())
    }

    fn all_reduce_f32(&self, buf: &mut [f32]) {
        self.reduce(buf);
    }

    fn all_reduce_f64(&self, buf: &mut [f64]) {
        self.reduce(buf);
    }

    fn all_gather_f32(&self, local: &[f32], out: &mut [f32]) {
        let link = self.link();
        let d = self.check("copy to the GPU", link.stream.clone_htod(local));
        let mut all = self.check("allocate", link.stream.alloc_zeros::<f32>(out.len()));
        self.check("all-gather", link.comm.all_gather(&d, &mut all));
        self.check("copy from the GPU", link.stream.memcpy_dtoh(&all, out));
        self.check("synchronise", link.stream.synchronize());
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) {
        let link = self.link();
        let mut d = self.check("copy to the GPU", link.stream.clone_htod(buf));
        self.check("broadcast", link.comm.broadcast_in_place(&mut d, root as i32));
        self.check("copy from the GPU", link.stream.memcpy_dtoh(&d, buf));
        self.check("synchronise", link.stream.synchronize());
    }

    fn barrier(&self) {
        self.mpi.barrier();
    }

    fn abort(&self, code: i32) -> ! {
        self.mpi.abort("aborting", code)
    }
}
