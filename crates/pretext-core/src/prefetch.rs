//! Batches built ahead of the step that needs them, on a worker thread, for
//! any [`BatchSource`] whose batch is a pure function of the step (every
//! source in pretext is: counter-based streams). Prefetching cannot change
//! what a step sees; a request out of order (a resume, an evaluation that
//! re-reads a step) restarts the worker at that step.

use crate::trainer::{BatchSource, Shard};
use crate::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// The worker of one run of consecutive steps.
struct Worker<B> {
    rx: Receiver<(u64, Result<B>)>,
    next: u64,
    stop: Arc<AtomicBool>,
}

impl<B> Drop for Worker<B> {
    fn drop(&mut self) {
        // The worker sees the flag after its current batch; a send blocked on
        // the full channel fails once the receiver is gone.
        self.stop.store(true, Ordering::SeqCst);
        while self.rx.try_recv().is_ok() {}
    }
}

/// A [`BatchSource`] that builds up to `depth` batches ahead on a thread of
/// its own (`depth` 0: on the caller's thread, as the source itself).
pub struct Prefetched<S: BatchSource> {
    source: S,
    depth: usize,
    worker: Option<Worker<S::Batch>>,
    /// The part of every batch the source gives (data-parallel training).
    shard: Shard,
}

impl<S> Prefetched<S>
where
    S: BatchSource + Clone + Send + 'static,
    S::Batch: Send + 'static,
{
    /// `source` with `depth` batches built ahead.
    pub fn new(source: S, depth: usize) -> Self {
        Self {
            source,
            depth,
            worker: None,
            shard: Shard::default(),
        }
    }

    fn start(&mut self, from: u64) {
        self.worker = None;
        let (tx, rx) = sync_channel(self.depth);
        let stop = Arc::new(AtomicBool::new(false));
        let (mut source, stop2) = (self.source.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("pretext-prefetch".into())
            .spawn(move || {
                let mut step = from;
                while !stop2.load(Ordering::SeqCst) {
                    let batch = source.batch(step);
                    let failed = batch.is_err();
                    if tx.send((step, batch)).is_err() || failed {
                        break;
                    }
                    step += 1;
                }
            });
        if spawned.is_ok() {
            self.worker = Some(Worker { rx, next: from, stop });
        }
    }
}

impl<S> BatchSource for Prefetched<S>
where
    S: BatchSource + Clone + Send + 'static,
    S::Batch: Send + 'static,
{
    type Batch = S::Batch;

    fn steps_per_epoch(&self) -> u64 {
        self.source.steps_per_epoch()
    }

    fn batch(&mut self, step: u64) -> Result<S::Batch> {
        if self.depth == 0 {
            return self.source.batch(step);
        }
        if self.worker.as_ref().is_none_or(|w| w.next != step) {
            self.start(step);
        }
        if let Some(w) = self.worker.as_mut() {
            if let Ok((s, batch)) = w.rx.recv() {
                if s == step {
                    w.next += 1;
                    return batch;
                }
            }
        }
        // No worker (the thread could not start, or it stopped): build it here.
        self.worker = None;
        self.source.batch(step)
    }

    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        if shard == self.shard {
            return Ok(());
        }
        self.source.set_shard(shard)?;
        // Batches already prepared are of the former shard.
        self.worker = None;
        self.shard = shard;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    /// Batch `s` is `[seed, s]`; step `fail_at` is an error.
    #[derive(Clone)]
    struct Counter {
        seed: u64,
        fail_at: Option<u64>,
    }

    impl BatchSource for Counter {
        type Batch = Vec<u64>;

        fn steps_per_epoch(&self) -> u64 {
            5
        }

        fn batch(&mut self, step: u64) -> Result<Vec<u64>> {
            if Some(step) == self.fail_at {
                return Err(Error::Data(format!("step {step} is unreadable")));
            }
            Ok(vec![self.seed, step])
        }
    }

    #[test]
    fn prefetched_batches_are_the_sources_in_any_order() -> Result<()> {
        let src = Counter { seed: 7, fail_at: None };
        for depth in [0, 1, 3] {
            let mut p = Prefetched::new(src.clone(), depth);
            assert_eq!(p.steps_per_epoch(), 5);
            // in order, then a jump back (a resume) and forward again
            for step in [0, 1, 2, 3, 1, 2, 9, 10, 0] {
                assert_eq!(p.batch(step)?, vec![7, step], "depth {depth}, step {step}");
            }
        }
        Ok(())
    }

    #[test]
    fn an_error_reaches_the_step_that_asked_for_it() -> Result<()> {
        let mut p = Prefetched::new(
            Counter {
                seed: 1,
                fail_at: Some(2),
            },
            2,
        );
        assert_eq!(p.batch(0)?, vec![1, 0]);
        assert_eq!(p.batch(1)?, vec![1, 1]);
        let e = p.batch(2).expect_err("step 2 fails");
        assert!(e.to_string().contains("step 2 is unreadable"), "{e}");
        // later steps still work after the failed one
        assert_eq!(p.batch(3)?, vec![1, 3]);
        Ok(())
    }
}
