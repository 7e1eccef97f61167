//! Data-parallel training across processes: the collectives a step needs
//! (all-reduce, all-gather with a backward pass, broadcast, barrier) behind
//! one interface, [`Collective`], with three implementations:
//!
//! - [`SingleProcess`], the default: every collective is the identity;
//! - [`LocalGroup`]: ranks as threads of one process (tests, and a check of
//!   the data-parallel arithmetic on any machine);
//! - `Mpi` (cargo feature `mpi`): the `mpi` crate over the system's Open MPI
//!   or MPICH, for `mpirun -np N pretext-… pretrain`;
//! - `Nccl` (cargo feature `nccl`, CUDA builds): NCCL through cudarc on each
//!   process's GPU, bootstrapped by MPI (`PRETEXT_COLLECTIVE=mpi|nccl`
//!   chooses; NCCL by default where there is a GPU).
//!
//! How a run uses them (see [`crate::Trainer`]): `train.batch_size` is the
//! global batch; rank `r` of `N` takes rows `[r·B/N, (r+1)·B/N)` of every
//! batch, drawn from the same counter-based streams as a single process, so
//! the batches are the same whatever `N` is. The trainer broadcasts rank 0's
//! initial weights, averages gradients over ranks after the backward pass
//! (one bucket), and runs the update on every rank (so the weights stay
//! identical without being sent). Inside the step, ops that need the whole
//! batch find the step's collective with [`step_collective`]: batch
//! normalisation sums its statistics over ranks (synchronised BN), and
//! [`gather_rows`] gives a loss every rank's embeddings with a backward pass
//! that returns each rank the gradient of its own rows.
//!
//! The gradient rule that makes this exact: each rank computes a loss `L_r`
//! whose average over ranks is the single-process loss; the backward pass of
//! every gather sums the gradient over ranks, so rank `r` holds
//! `∂(Σ L)/∂θ` through its own rows, and the average over ranks of those is
//! `∂(mean L)/∂θ`, the single-process gradient.
//!
//! Transport failures end the process (MPI's default error handler); a rank
//! that fails with an error calls [`World::abort`], which stops every rank
//! with the error's message, so a run never hangs on a lost rank.

mod local;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

pub use local::{Fitted, LocalGroup};

use crate::ops::fused::{apply, FusedOp, Operand};
use candle_core::{Shape, Tensor};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The collectives of data-parallel training. Every rank calls the same
/// collectives in the same order with buffers of the same length; a call
/// returns on a rank when that rank's part is complete.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// The transport (`single process`, `threads`, `MPI (Open MPI 4.1.4)`).
    fn backend(&self) -> String;
    /// Replaces `buf` on every rank by the element-wise sum over ranks.
    fn all_reduce_f32(&self, buf: &mut [f32]);
    /// [`Collective::all_reduce_f32`] in f64.
    fn all_reduce_f64(&self, buf: &mut [f64]);
    /// Every rank's `local` (all of one length), concatenated in rank order
    /// into `out` (`size · local.len()`).
    fn all_gather_f32(&self, local: &[f32], out: &mut [f32]);
    /// Replaces `buf` on every rank by rank `root`'s.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize);
    /// Returns when every rank has called it. Ranks that wait here (while
    /// rank 0 evaluates or writes a checkpoint) yield the CPU.
    fn barrier(&self);
    /// Stops every rank of the run (exit status `code`); used when one rank
    /// fails, so the others do not wait for it forever.
    fn abort(&self, code: i32) -> !;
}

/// One process, no communication: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn backend(&self) -> String {
        "single process".into()
    }
    fn all_reduce_f32(&self, _buf: &mut [f32]) {}
    fn all_reduce_f64(&self, _buf: &mut [f64]) {}
    fn all_gather_f32(&self, local: &[f32], out: &mut [f32]) {
        out.copy_from_slice(local);
    }
    fn broadcast_f32(&self, _buf: &mut [f32], _root: usize) {}
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A rank's handle on its group: the collective and the bytes it has sent.
#[derive(Debug, Clone)]
pub struct World {
    inner: Arc<dyn Collective>,
    sent: Arc<AtomicU64>,
}

impl World {
    /// A world over `collective`.
    pub fn new(collective: Arc<dyn Collective>) -> Self {
        Self {
            inner: collective,
            sent: Arc::new(AtomicU64::new(0)),
        }
    }

    /// One process.
    pub fn single() -> Self {
        Self::new(Arc::new(SingleProcess))
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.inner.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.inner.size()
    }

    /// Whether this is rank 0 (the rank that writes the run folder).
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// The transport, for logs and `trainer.json`.
    pub fn backend(&self) -> String {
        self.inner.backend()
    }

    /// Bytes this rank has handed to collectives so far (payload only).
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn count(&self, bytes: usize) {
        if self.size() > 1 {
            self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    /// Sums `buf` over ranks, in place.
    pub fn all_reduce_f32(&self, buf: &mut [f32]) {
        if self.size() > 1 {
            self.count(std::mem::size_of_val(buf));
            self.inner.all_reduce_f32(buf);
        }
    }

    /// Sums `buf` over ranks, in place (f64).
    pub fn all_reduce_f64(&self, buf: &mut [f64]) {
        if self.size() > 1 {
            self.count(std::mem::size_of_val(buf));
            self.inner.all_reduce_f64(buf);
        }
    }

    /// Every rank's `local`, concatenated in rank order.
    pub fn all_gather_f32(&self, local: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; local.len() * self.size()];
        if self.size() > 1 {
            self.count(std::mem::size_of_val(local));
            self.inner.all_gather_f32(local, &mut out);
        } else {
            out.copy_from_slice(local);
        }
        out
    }

    /// Replaces `buf` by rank `root`'s.
    pub fn broadcast_f32(&self, buf: &mut [f32], root: usize) {
        if self.size() > 1 {
            if self.rank() == root {
                self.count(std::mem::size_of_val(buf));
            }
            self.inner.broadcast_f32(buf, root);
        }
    }

    /// Waits for every rank.
    pub fn barrier(&self) {
        if self.size() > 1 {
            self.inner.barrier();
        }
    }

    /// Stops every rank with exit status `code` (after printing `message`
    /// on this rank's standard error, prefixed with the rank).
    pub fn abort(&self, message: &str, code: i32) -> ! {
        eprintln!("rank {} of {}: {message}", self.rank(), self.size());
        self.inner.abort(code)
    }

    /// Sums a set of f32 tensors over ranks and divides by the number of
    /// ranks (the gradient average), as one bucket: one collective for all.
    ///
    /// # Errors
    /// A tensor could not be read or rebuilt.
    pub fn average_tensors(&self, ts: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        if self.size() == 1 {
            return Ok(ts.to_vec());
        }
        let mut flat = bucket(ts.iter())?;
        self.all_reduce_f32(&mut flat);
        let inv = 1.0 / self.size() as f32;
        flat.iter_mut().for_each(|x| *x *= inv);
        unbucket(&flat, ts.iter())
    }

    /// Replaces every tensor of `ts` (variables) by rank `root`'s values, as one bucket.
    ///
    /// # Errors
    /// A tensor could not be read or written.
    pub fn broadcast_vars(&self, vars: &[candle_core::Var], root: usize) -> candle_core::Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let mut flat = bucket(vars.iter().map(|v| v.as_tensor()))?;
        self.broadcast_f32(&mut flat, root);
        for (v, t) in vars.iter().zip(unbucket(&flat, vars.iter().map(|v| v.as_tensor()))?) {
            v.set(&t)?;
        }
        Ok(())
    }
}

/// The values of `ts`, one after another, as f32: one buffer for one collective.
fn bucket<'a>(ts: impl Iterator<Item = &'a Tensor>) -> candle_core::Result<Vec<f32>> {
    let mut flat = Vec::new();
    for t in ts {
        flat.extend(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(flat)
}

/// [`bucket`] undone: tensors of the shapes, dtypes and devices of `like`,
/// from the values of `flat` in order.
fn unbucket<'a>(flat: &[f32], like: impl Iterator<Item = &'a Tensor>) -> candle_core::Result<Vec<Tensor>> {
    let mut at = 0;
    like.map(|t| {
        let n = t.elem_count();
        let v = flat[at..at + n].to_vec();
        at += n;
        Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())
    })
    .collect()
}

static WORLD: OnceLock<World> = OnceLock::new();

/// The process's world: what [`init`] set up, else a single process.
pub fn world() -> &'static World {
    WORLD.get_or_init(World::single)
}

/// What [`init`] found: keeps MPI initialised while it lives and finalises
/// it when dropped (hold it for the life of `main`).
#[derive(Debug)]
pub struct Launch {
    #[cfg(feature = "mpi")]
    _mpi: Option<mpi::Guard>,
    /// The world set up.
    pub world: &'static World,
}

/// How many processes a parallel launcher (mpirun, mpiexec, srun) started
/// this one among, read from the variables it sets; `None` when it was not
/// started by one.
pub fn launcher_size() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok()))
}

/// Sets up the process's world: MPI when this build has it (feature `mpi`)
/// and a launcher started the process among several; a single process
/// otherwise. Call once, first thing in `main`.
///
/// # Errors
/// A launcher started several processes but this build has no MPI (each
/// would train alone and write the same run folder); MPI failed to start.
pub fn init() -> crate::Result<Launch> {
    let launched = launcher_size().filter(|&n| n > 1);
    #[cfg(feature = "mpi")]
    {
        if launched.is_some() {
            let (guard, w) = mpi::Guard::start()?;
            #[cfg(feature = "nccl")]
            let w = if use_nccl()? { nccl::Nccl::start(&w)? } else { w };
            let world = WORLD.get_or_init(|| w);
            return Ok(Launch {
                _mpi: Some(guard),
                world,
            });
        }
        Ok(Launch {
            _mpi: None,
            world: world(),
        })
    }
    #[cfg(not(feature = "mpi"))]
    {
        if let Some(n) = launched {
            return Err(crate::Error::Config(format!(
                "started by a parallel launcher among {n} processes, but this build of pretext has no MPI: \
                 build it with `cargo build --release --features mpi` (needs an MPI library such as \
                 Debian's libopenmpi-dev), or run one process"
            )));
        }
        Ok(Launch { world: world() })
    }
}

/// Whether a build with NCCL reduces on the GPU: `PRETEXT_COLLECTIVE=nccl`
/// or `mpi` says; unset, NCCL where the machine has a GPU.
#[cfg(feature = "nccl")]
fn use_nccl() -> crate::Result<bool> {
    match std::env::var("PRETEXT_COLLECTIVE").as_deref() {
        Ok("nccl") => Ok(true),
        Ok("mpi") => Ok(false),
        Ok(other) => Err(crate::Error::Config(format!(
            "PRETEXT_COLLECTIVE={other}: expected nccl or mpi"
        ))),
        Err(_) => Ok(cudarc::driver::CudaContext::device_count().is_ok_and(|n| n > 0)),
    }
}

/// The data-parallel step running on a thread: its ranks, and whether batch
/// normalisation sums its statistics over them (`train.sync_bn`).
#[derive(Debug, Clone)]
pub(crate) struct StepContext {
    world: World,
    sync_bn: bool,
}

thread_local! {
    static STEP: RefCell<Option<StepContext>> = const { RefCell::new(None) };
}

/// Runs `f` with `world` as the collective of the training step on this
/// thread (what [`step_collective`] returns inside), batch normalisation
/// synchronised over its ranks, restoring the previous state after (also
/// when `f` panics). A single-process world sets nothing.
pub fn step_scope<R>(world: &World, f: impl FnOnce() -> R) -> R {
    step_scope_with(world, true, f)
}

/// [`step_scope`], with batch normalisation synchronised over the ranks
/// (`sync_bn`) or each rank normalising its own rows.
pub fn step_scope_with<R>(world: &World, sync_bn: bool, f: impl FnOnce() -> R) -> R {
    let ctx = (world.size() > 1).then(|| StepContext {
        world: world.clone(),
        sync_bn,
    });
    with_step(ctx, f)
}

/// The step state of this thread (what graph nodes keep for their backward pass).
pub(crate) fn current_step() -> Option<StepContext> {
    STEP.with(|s| s.borrow().clone())
}

/// Runs `f` with exactly `ctx` as this thread's step state, restoring the
/// previous one after, also on a panic. The graph nodes of
/// [`crate::ops::fused`] run their backward pass under the state their
/// forward pass saw, so a part of a step normalised on one rank alone
/// (MoCo's batch-norm groups) is also differentiated so.
pub(crate) fn with_step<R>(ctx: Option<StepContext>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<StepContext>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            STEP.with(|s| *s.borrow_mut() = prev);
        }
    }
    let prev = STEP.with(|s| std::mem::replace(&mut *s.borrow_mut(), ctx));
    let _restore = Restore(prev);
    f()
}

/// The collective of the training step running on this thread, when it
/// spans several ranks: losses over the whole batch and random draws for it
/// use it. `None` outside a step (evaluation runs on one rank) and in one process.
pub fn step_collective() -> Option<World> {
    STEP.with(|s| s.borrow().as_ref().map(|c| c.world.clone()))
}

/// The collective batch normalisation sums its statistics over: the step's,
/// unless the run normalises each rank's rows on their own (`train.sync_bn = false`).
pub fn norm_collective() -> Option<World> {
    STEP.with(|s| s.borrow().as_ref().filter(|c| c.sync_bn).map(|c| c.world.clone()))
}

/// The mean over the ranks of the running step of `t` (f32, any shape): a
/// statistic of the whole batch from each rank's equal share (DINO's centre);
/// `t` itself outside a multi-rank step.
///
/// # Errors
/// `t` could not be read.
pub fn step_mean(t: &Tensor) -> candle_core::Result<Tensor> {
    let Some(world) = step_collective() else {
        return Ok(t.clone());
    };
    Ok(world.average_tensors(std::slice::from_ref(t))?.remove(0))
}

/// The rows batch normalisation took its statistics over when this rank
/// holds `local`: the whole step's batch when they are synchronised (ranks
/// hold equal shards; the batchers make sure of it), else `local`.
pub fn norm_rows(local: usize) -> usize {
    norm_collective().map_or(local, |w| local * w.size())
}

/// Every rank's rows of `x` (`(n, …)` f32), concatenated in rank order
/// (`(N·n, …)`), as a graph node whose backward pass sums the incoming
/// gradient over ranks and returns this rank's rows of it. Outside a
/// multi-rank step, `x` itself.
///
/// Losses over the whole batch (NT-Xent's negatives, Barlow Twins'
/// cross-correlation, VICReg's variance and covariance) gather their
/// embeddings with this and compute the single-process loss on every rank.
///
/// # Errors
/// `x` is not f32 on the CPU.
pub fn gather_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let Some(world) = step_collective() else {
        return Ok(x.clone());
    };
    apply([&x.contiguous()?], GatherRows { world })
}

/// Gathers without a graph node (keys for a queue, statistics): every rank's
/// rows of `x` in rank order; `x` itself outside a multi-rank step.
///
/// # Errors
/// `x` could not be read.
pub fn gather_rows_detached(x: &Tensor) -> candle_core::Result<Tensor> {
    let Some(world) = step_collective() else {
        return Ok(x.detach());
    };
    let mut dims = x.dims().to_vec();
    let local = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let all = world.all_gather_f32(&local);
    if let Some(d) = dims.first_mut() {
        *d *= world.size();
    }
    Tensor::from_vec(all, dims, x.device())?.to_dtype(x.dtype())
}

/// Running statistics of batch normalisation (`*.running_mean`,
/// `*.running_var`, `*.num_batches_tracked` in `buffers`) as if the ranks'
/// groups had been normalised one after another in rank order, when each of
/// the `world`'s ranks normalised `per_rank` groups of its own starting from
/// `before` (MoCo's batch-norm groups split across ranks). With momentum `m`
/// and `a = (1 − m)^per_rank`, rank k's contribution `r_k − a·r₀` is
/// discounted by the updates of the ranks after it:
/// `r = a^N·r₀ + Σ_k (1 − m)^{per_rank·(N−1−k)}·(r_k − a·r₀)`.
/// Every rank ends with the same statistics. One collective.
///
/// # Errors
/// A buffer missing from `before`, or a tensor operation failed.
pub fn join_running_stats(
    world: &World,
    buffers: &candle_nn::VarMap,
    before: &std::collections::HashMap<String, Tensor>,
    per_rank: usize,
    momentum: f64,
) -> candle_core::Result<()> {
    let (n, k) = (world.size(), world.rank());
    if n == 1 {
        return Ok(());
    }
    let keep = 1.0 - momentum;
    let a = keep.powi(per_rank as i32);
    let discount = keep.powi((per_rank * (n - 1 - k)) as i32);
    let vars: Vec<(String, candle_core::Var)> = crate::init::named_vars(buffers)
        .into_iter()
        .filter(|(name, _)| name.ends_with("running_mean") || name.ends_with("running_var"))
        .collect();
    let mut r0s = Vec::with_capacity(vars.len());
    let mut deltas = Vec::with_capacity(vars.len());
    for (name, v) in &vars {
        let Some(r0) = before.get(name) else {
            candle_core::bail!("join_running_stats: no value of {name} before the step")
        };
        deltas.push(((v.as_tensor() - (r0 * a)?)? * discount)?);
        r0s.push(r0);
    }
    let mut flat = bucket(deltas.iter())?;
    world.all_reduce_f32(&mut flat);
    for (((_, v), r0), sum) in vars.iter().zip(&r0s).zip(unbucket(&flat, r0s.iter().copied())?) {
        v.set(&((*r0 * a.powi(n as i32))? + sum)?)?;
    }
    for (name, v) in crate::init::named_vars(buffers) {
        if name.ends_with("num_batches_tracked") {
            if let Some(r0) = before.get(&name) {
                v.set(&(r0 + (per_rank * n) as f64)?)?;
            }
        }
    }
    Ok(())
}

struct GatherRows {
    world: World,
}

impl FusedOp<1> for GatherRows {
    const NAME: &'static str = "pretext-gather-rows";

    fn forward(&self, [x]: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let mut dims = x.dims.to_vec();
        let Some(rows) = dims.first_mut() else {
            candle_core::bail!("gather_rows: a scalar has no rows")
        };
        *rows *= self.world.size();
        Ok((self.world.all_gather_f32(x.data), Shape::from(dims)))
    }

    fn backward(&self, [x]: [&Tensor; 1], _out: &Tensor, grad: &Tensor) -> candle_core::Result<[Option<Tensor>; 1]> {
        let mut g = grad
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.world.all_reduce_f32(&mut g);
        let n = x.elem_count();
        let r = self.world.rank();
        let mine = g[r * n..(r + 1) * n].to_vec();
        Ok([Some(Tensor::from_vec(mine, x.shape(), x.device())?)])
    }
}

#[cfg(test)]
mod tests;
