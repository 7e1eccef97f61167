//! Ranks as threads of one process: the collectives through shared memory.
//! For tests of the data-parallel arithmetic (every rank's step on its own
//! thread, the results compared with one process) on any machine, without
//! an MPI installation.

use super::{Collective, World};
use crate::trainer::{BatchSource, LossLog, Method, Trainer};
use candle_core::DType;
use std::sync::{Arc, Barrier, Mutex};

/// What a data-parallel training on threads ended with ([`LocalGroup::fit`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    /// The loss of every step.
    pub losses: Vec<f64>,
    /// The model's tensors (weights and buffers, by name), then the
    /// method's state ([`Method::buffers`]), as f32 values.
    pub tensors: Vec<(String, Vec<f32>)>,
}

impl Fitted {
    /// The largest difference between this run's tensors and `other`'s,
    /// each relative to `max(1, |value|)` of this run's.
    ///
    /// # Panics
    /// If the runs hold different tensors (not the same model).
    pub fn gap(&self, other: &Fitted) -> f32 {
        assert_eq!(self.tensors.len(), other.tensors.len(), "runs of different models");
        self.tensors
            .iter()
            .zip(&other.tensors)
            .flat_map(|((na, a), (nb, b))| {
                assert!(na == nb && a.len() == b.len(), "{na} against {nb}");
                a.iter().zip(b)
            })
            .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
            .fold(0f32, f32::max)
    }
}

#[derive(Debug)]
struct Shared {
    slots: Mutex<Vec<Vec<f64>>>,
    barrier: Barrier,
    size: usize,
}

/// One rank of a group of threads (see [`LocalGroup::run`]).
#[derive(Debug)]
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// The `size` ranks of a new group (hand one to each thread).
    pub fn ranks(size: usize) -> Vec<World> {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![Vec::new(); size]),
            barrier: Barrier::new(size),
            size,
        });
        (0..size)
            .map(|rank| {
                World::new(Arc::new(LocalGroup {
                    rank,
                    shared: shared.clone(),
                }))
            })
            .collect()
    }

    /// Runs `f` on `size` threads, each with its rank's world, and returns
    /// their results in rank order. A panic on any thread is re-raised.
    pub fn run<R: Send>(size: usize, f: impl Fn(World) -> R + Sync) -> Vec<R> {
        let worlds = Self::ranks(size);
        std::thread::scope(|s| {
            let handles: Vec<_> = worlds.into_iter().map(|w| s.spawn(|| f(w))).collect();
            handles
                .into_iter()
                .map(|h| match h.join() {
                    Ok(r) => r,
                    Err(p) => std::panic::resume_unwind(p),
                })
                .collect()
        })
    }

    /// Trains data-parallel on `size` threads: `make` builds each rank's
    /// trainer and batches (the trainer is given the rank's world here),
    /// which train to the end. Returns rank 0's run, after checking that
    /// every rank ended with the same weights and method state.
    ///
    /// # Errors
    /// What `make` or training failed with (the first rank's, in rank
    /// order); [`crate::Error::Config`] when ranks disagree at the end.
    pub fn fit<M, D>(size: usize, make: impl Fn() -> crate::Result<(Trainer<M>, D)> + Sync) -> crate::Result<Fitted>
    where
        M: Method,
        D: BatchSource<Batch = M::Batch>,
    {
        let runs = Self::run(size, |world| -> crate::Result<Fitted> {
            let (mut trainer, mut data) = make()?;
            trainer.set_world(world);
            let mut losses = LossLog::default();
            trainer.fit(&mut data, &mut losses)?;
            let tensors = trainer
                .model_tensors()
                .into_iter()
                .chain(trainer.method.buffers())
                .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)))
                .collect::<crate::Result<Vec<_>>>()?;
            Ok(Fitted {
                losses: losses.0,
                tensors,
            })
        });
        let mut runs = runs.into_iter().collect::<crate::Result<Vec<_>>>()?;
        let first = runs.remove(0);
        for (r, other) in runs.iter().enumerate() {
            if let Some((name, _)) = first
                .tensors
                .iter()
                .zip(&other.tensors)
                .find(|(a, b)| a != b)
                .map(|(a, _)| a)
            {
                return Err(crate::Error::Config(format!(
                    "rank {} ended with another {name} than rank 0",
                    r + 1
                )));
            }
        }
        Ok(first)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Vec<f64>>> {
        match self.shared.slots.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Publishes `values`, waits for every rank, lets `read` see all slots,
    /// then waits again so no slot is overwritten while another rank reads.
    fn exchange(&self, values: Vec<f64>, read: impl FnOnce(&[Vec<f64>])) {
        self.slots()[self.rank] = values;
        self.shared.barrier.wait();
        read(&self.slots());
        self.shared.barrier.wait();
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn backend(&self) -> String {
        format!("{} threads of one process", self.shared.size)
    }

    fn all_reduce_f32(&self, buf: &mut [f32]) {
        self.exchange(buf.iter().map(|&v| f64::from(v)).collect(), |all| {
            for (i, b) in buf.iter_mut().enumerate() {
                // Summed in f32 in rank order, as a reduction of f32 buffers is.
                *b = all.iter().fold(0f32, |acc, s| acc + s[i] as f32);
            }
        });
    }

    fn all_reduce_f64(&self, buf: &mut [f64]) {
        self.exchange(buf.to_vec(), |all| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = all.iter().fold(0f64, |acc, s| acc + s[i]);
            }
        });
    }

    fn all_gather_f32(&self, local: &[f32], out: &mut [f32]) {
        self.exchange(local.iter().map(|&v| f64::from(v)).collect(), |all| {
            for (chunk, s) in out.chunks_mut(local.len().max(1)).zip(all) {
                for (o, v) in chunk.iter_mut().zip(s) {
                    *o = *v as f32;
                }
            }
        });
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) {
        let mine = if self.rank == root {
            buf.iter().map(|&v| f64::from(v)).collect()
        } else {
            Vec::new()
        };
        self.exchange(mine, |all| {
            for (b, v) in buf.iter_mut().zip(&all[root]) {
                *b = *v as f32;
            }
        });
    }

    fn barrier(&self) {
        self.shared.barrier.wait();
    }

    fn abort(&self, code: i32) -> ! {
        panic!("rank {} of a thread group aborted the group (status {code})", self.rank)
    }
}
