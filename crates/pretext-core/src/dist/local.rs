//! Ranks as threads of one process: the collectives through shared memory.
//! For tests of the data-parallel arithmetic (every rank's step on its own
//! thread, the results compared with one process) on any machine, without
//! an MPI installation.

use super::{Collective, World};
use std::sync::{Arc, Barrier, Mutex};

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
