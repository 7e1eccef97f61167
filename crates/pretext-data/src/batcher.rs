//! Batches of augmented images: a seeded order per epoch, one or two views
//! per image (plus, for multi-crop, smaller local views from a second
//! pipeline), augmentation on the rayon pool, a background thread that
//! prepares the next batches (bounded prefetch).
//!
//! The batch of a step is a pure function of (seed, step): the order of epoch
//! `e` comes from the `data-order` stream at `[e]`, and view `v` of sample `i`
//! from the `augment` stream at `[e, i, v]`. Restoring a position is therefore
//! just asking for the step; prefetching cannot change what a step sees.

use crate::augment::Pipeline;
use crate::dataset::ImageDataset;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use pretext_core::seed::{permutation, stream_rng, AUGMENT, DATA_ORDER};
use pretext_core::trainer::{BatchSource, Shard};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One batch: each view `(b, c, h, w)` f32, labels `(b,)` u32 if known, and the dataset indices.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// The views, each `(b, c, h, w)`: the `views` of the config, then the
    /// local views of a multi-crop batcher (smaller `h`, `w`).
    pub views: Vec<Tensor>,
    /// Labels `(b,)` (u32), if the dataset has them.
    pub labels: Option<Tensor>,
    /// Dataset index of each sample.
    pub indices: Vec<usize>,
}

/// Batching settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Views per sample (2 for contrastive methods).
    pub views: usize,
    /// Seed of the order and augmentation streams.
    pub seed: u64,
    /// Shuffle each epoch (off: dataset order, e.g. for evaluation).
    pub shuffle: bool,
    /// Drop the last incomplete batch of an epoch.
    pub drop_last: bool,
    /// Batches prepared ahead in a background thread (0 = none).
    pub prefetch: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            views: 2,
            seed: 0,
            shuffle: true,
            drop_last: true,
            prefetch: 2,
        }
    }
}

impl BatcherConfig {
    /// Training batches: `views` augmented views per sample, reshuffled every
    /// epoch by `seed`, the last incomplete batch dropped.
    pub fn training(batch_size: usize, views: usize, seed: u64, prefetch: usize) -> Self {
        Self {
            batch_size,
            views,
            seed,
            shuffle: true,
            drop_last: true,
            prefetch,
        }
    }
}

/// A batch before it becomes tensors (made off the main thread).
#[derive(Debug)]
struct RawBatch {
    views: Vec<Vec<f32>>,
    labels: Option<Vec<u32>>,
    indices: Vec<usize>,
}

struct Inner {
    data: Arc<ImageDataset>,
    pipeline: Arc<Pipeline>,
    /// Multi-crop: this many more views per sample through this pipeline.
    local: Option<(Arc<Pipeline>, usize)>,
    cfg: BatcherConfig,
    order: Mutex<Option<(u64, Arc<Vec<usize>>)>>,
    /// The part of every batch this process takes (data-parallel training).
    shard: Shard,
}

impl Inner {
    fn steps_per_epoch(&self) -> u64 {
        let n = self.data.len();
        let b = self.cfg.batch_size;
        (if self.cfg.drop_last { n / b } else { n.div_ceil(b) }) as u64
    }

    fn order(&self, epoch: u64) -> Arc<Vec<usize>> {
        let mut cache = match self.order.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some((e, o)) = cache.as_ref() {
            if *e == epoch {
                return o.clone();
            }
        }
        let n = self.data.len();
        let o = Arc::new(if self.cfg.shuffle {
            permutation(n, &mut stream_rng(self.cfg.seed, DATA_ORDER, &[epoch]))
        } else {
            (0..n).collect()
        });
        *cache = Some((epoch, o.clone()));
        o
    }

    /// Views per sample, local ones included.
    fn views(&self) -> usize {
        self.cfg.views + self.local.as_ref().map_or(0, |(_, n)| *n)
    }

    /// The pipeline of view `v`: the main one for the first `cfg.views`, the local one after.
    fn pipeline_of(&self, v: usize) -> &Pipeline {
        match &self.local {
            Some((p, _)) if v >= self.cfg.views => p,
            _ => &self.pipeline,
        }
    }

    fn make(&self, step: u64) -> RawBatch {
        let spe = self.steps_per_epoch().max(1);
        let (epoch, i) = (step / spe, (step % spe) as usize);
        let order = self.order(epoch);
        let b = self.cfg.batch_size;
        let start = (i * b).min(order.len());
        let end = ((i + 1) * b).min(order.len());
        // A shard's rows of the batch: their views come from the same
        // streams ([e, i, v]) as in the whole batch.
        let per = (end - start) / self.shard.size;
        let (start, end) = (start + self.shard.rank * per, start + (self.shard.rank + 1) * per);
        let indices: Vec<usize> = order[start..end].to_vec();
        let c = self.data.channels;
        let (h, w) = (self.data.height, self.data.width);
        let views: Vec<Vec<f32>> = (0..self.views())
            .map(|v| {
                let pipeline = self.pipeline_of(v);
                let (oh, ow) = pipeline.out_size();
                let per = c * oh * ow;
                let mut buf = vec![0f32; indices.len() * per];
                buf.par_chunks_mut(per).zip(indices.par_iter()).for_each(|(out, &idx)| {
                    let mut rng = stream_rng(self.cfg.seed, AUGMENT, &[epoch, idx as u64, v as u64]);
                    pipeline.view_into(self.data.image(idx), h, w, c, &mut rng, out);
                });
                buf
            })
            .collect();
        let labels = self
            .data
            .labels
            .as_ref()
            .map(|l| indices.iter().map(|&k| l[k]).collect());
        RawBatch { views, labels, indices }
    }
}

struct Prefetch {
    rx: Receiver<(u64, RawBatch)>,
    next: u64,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock a worker waiting on a full channel.
        while self.rx.try_recv().is_ok() {}
        if let Some(h) = self.handle.take() {
            // Dropping `rx` (after this) makes a blocked send fail; drain once more first.
            let _ = self.rx.try_recv();
            drop(h);
        }
    }
}

/// Augmented image batches as a [`BatchSource`].
pub struct ImageBatcher {
    inner: Arc<Inner>,
    device: Device,
    prefetch: Option<Prefetch>,
}

impl std::fmt::Debug for ImageBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageBatcher")
            .field("cfg", &self.inner.cfg)
            .field("n", &self.inner.data.len())
            .finish()
    }
}

impl ImageBatcher {
    /// A batcher over `data` through `pipeline`, producing tensors on `device`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an empty dataset, a batch larger than the data
    /// with `drop_last`, or 0 views / batch size.
    pub fn new(data: Arc<ImageDataset>, pipeline: Arc<Pipeline>, cfg: BatcherConfig, device: &Device) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::Invalid("cannot batch an empty dataset".into()));
        }
        if cfg.batch_size == 0 || cfg.views == 0 {
            return Err(Error::Invalid("batch size and views must be > 0".into()));
        }
        if cfg.drop_last && cfg.batch_size > data.len() {
            return Err(Error::Invalid(format!(
                "batch size {} is larger than the dataset ({} images)",
                cfg.batch_size,
                data.len()
            )));
        }
        let inner = Arc::new(Inner {
            data,
            pipeline,
            local: None,
            cfg,
            order: Mutex::new(None),
            shard: Shard::default(),
        });
        Ok(Self {
            inner,
            device: device.clone(),
            prefetch: None,
        })
    }

    /// Multi-crop: `n` more views per sample through `local` (DINO's small
    /// local crops), after the config's views. View `v` of sample `i` still
    /// comes from the `augment` stream at `[e, i, v]`, so the first views are
    /// those of the batcher without local views.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `n` is 0.
    pub fn with_local_views(mut self, local: Arc<Pipeline>, n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::Invalid(
                "a multi-crop batcher needs at least one local view".into(),
            ));
        }
        self.prefetch = None;
        let inner = Inner {
            data: self.inner.data.clone(),
            pipeline: self.inner.pipeline.clone(),
            local: Some((local, n)),
            cfg: self.inner.cfg,
            order: Mutex::new(None),
            shard: self.inner.shard,
        };
        self.inner = Arc::new(inner);
        Ok(self)
    }

    /// The dataset order of `epoch` (what the batches of that epoch walk through).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        self.inner.order(epoch).to_vec()
    }

    fn start_prefetch(&mut self, from: u64) {
        self.prefetch = None;
        let depth = self.inner.cfg.prefetch;
        if depth == 0 {
            return;
        }
        let (tx, rx) = sync_channel(depth);
        let stop = Arc::new(AtomicBool::new(false));
        let inner = self.inner.clone();
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("pretext-batcher".into())
            .spawn(move || {
                let mut s = from;
                while !stop2.load(Ordering::SeqCst) {
                    let b = inner.make(s);
                    if tx.send((s, b)).is_err() {
                        break;
                    }
                    s += 1;
                }
            })
            .ok();
        self.prefetch = Some(Prefetch {
            rx,
            next: from,
            stop,
            handle,
        });
    }

    fn to_batch(&self, raw: RawBatch) -> Result<ImageBatch> {
        let c = self.inner.data.channels;
        let n = raw.indices.len();
        let views = raw
            .views
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let (oh, ow) = self.inner.pipeline_of(i).out_size();
                Tensor::from_vec(v, (n, c, oh, ow), &self.device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let labels = match raw.labels {
            Some(l) => Some(Tensor::from_vec(l, n, &self.device)?),
            None => None,
        };
        Ok(ImageBatch {
            views,
            labels,
            indices: raw.indices,
        })
    }

    /// The batch of `step`, built on this thread (no prefetch).
    ///
    /// # Errors
    /// Tensor creation failed.
    pub fn batch_now(&self, step: u64) -> Result<ImageBatch> {
        self.to_batch(self.inner.make(step))
    }
}

impl BatchSource for ImageBatcher {
    type Batch = ImageBatch;

    fn steps_per_epoch(&self) -> u64 {
        self.inner.steps_per_epoch()
    }

    fn batch(&mut self, step: u64) -> pretext_core::Result<ImageBatch> {
        if self.inner.cfg.prefetch == 0 {
            return Ok(self.batch_now(step)?);
        }
        if self.prefetch.as_ref().is_none_or(|p| p.next != step) {
            self.start_prefetch(step);
        }
        let raw = match self.prefetch.as_mut() {
            Some(p) => match p.rx.recv() {
                Ok((s, raw)) if s == step => {
                    p.next += 1;
                    Some(raw)
                }
                _ => None,
            },
            None => None,
        };
        let raw = match raw {
            Some(r) => r,
            None => {
                self.prefetch = None;
                self.inner.make(step)
            }
        };
        Ok(self.to_batch(raw)?)
    }

    fn set_shard(&mut self, shard: Shard) -> pretext_core::Result<()> {
        if shard == self.inner.shard {
            return Ok(());
        }
        let b = self.inner.cfg.batch_size;
        if !self.inner.cfg.drop_last || shard.size == 0 || !b.is_multiple_of(shard.size) || shard.rank >= shard.size {
            return Err(pretext_core::Error::Config(format!(
                "train.batch_size = {b} cannot be split into {} equal parts, one per process: \
                 choose a multiple of {}",
                shard.size, shard.size
            )));
        }
        self.prefetch = None;
        let inner = Inner {
            data: self.inner.data.clone(),
            pipeline: self.inner.pipeline.clone(),
            local: self.inner.local.clone(),
            cfg: self.inner.cfg,
            order: Mutex::new(None),
            shard,
        };
        self.inner = Arc::new(inner);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::AugmentConfig;

    fn dataset(n: usize) -> Arc<ImageDataset> {
        let pixels: Vec<u8> = (0..n * 64).map(|i| ((i * 37) % 256) as u8).collect();
        Arc::new(ImageDataset {
            height: 8,
            width: 8,
            channels: 1,
            pixels,
            labels: Some((0..n as u32).map(|i| i % 4).collect()),
            ..Default::default()
        })
    }

    fn batcher(prefetch: usize) -> Result<ImageBatcher> {
        let p = Arc::new(Pipeline::new(AugmentConfig::fashion_mnist(), 8, 8).map_err(pretext_core::Error::from)?);
        let cfg = BatcherConfig {
            batch_size: 4,
            views: 2,
            seed: 3,
            prefetch,
            ..Default::default()
        };
        ImageBatcher::new(dataset(18), p, cfg, &Device::Cpu)
    }

    fn flat(b: &ImageBatch) -> Result<Vec<Vec<f32>>> {
        Ok(b.views
            .iter()
            .map(|v| v.flatten_all().and_then(|t| t.to_vec1::<f32>()))
            .collect::<candle_core::Result<_>>()?)
    }

    #[test]
    fn shards_of_a_batch_are_its_rows_whatever_the_number_of_processes() -> Result<()> {
        let mut whole = batcher(0)?;
        for size in [2usize, 4] {
            let mut shards: Vec<ImageBatcher> = (0..size)
                .map(|rank| -> Result<ImageBatcher> {
                    let mut b = batcher(2)?;
                    b.set_shard(Shard { rank, size })?;
                    Ok(b)
                })
                .collect::<Result<_>>()?;
            for step in [0u64, 3, 4, 9] {
                let w = whole.batch(step)?;
                let wv = flat(&w)?;
                let per = 4 / size;
                for (rank, s) in shards.iter_mut().enumerate() {
                    let b = s.batch(step)?;
                    assert_eq!(b.indices, w.indices[rank * per..(rank + 1) * per]);
                    for (v, full) in flat(&b)?.iter().zip(&wv) {
                        let n = v.len();
                        assert_eq!(
                            v[..],
                            full[rank * n..(rank + 1) * n],
                            "step {step}, rank {rank} of {size}"
                        );
                    }
                }
            }
        }
        let err = batcher(0)?.set_shard(Shard { rank: 0, size: 3 });
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("train.batch_size = 4") && msg.contains("multiple of 3"),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn local_views_are_smaller_seeded_and_leave_the_global_views_alone() -> Result<()> {
        let local = AugmentConfig {
            crop_scale: (0.05, 0.4),
            ..AugmentConfig::fashion_mnist()
        };
        let lp = Arc::new(Pipeline::new(local, 4, 4).map_err(pretext_core::Error::from)?);
        let mut multi = batcher(2)?.with_local_views(lp.clone(), 3)?;
        let mut plain = batcher(0)?;
        for step in [0, 5] {
            let m = multi.batch(step)?;
            let dims: Vec<&[usize]> = m.views.iter().map(|v| v.dims()).collect();
            assert_eq!(
                dims,
                [
                    &[4, 1, 8, 8][..],
                    &[4, 1, 8, 8],
                    &[4, 1, 4, 4],
                    &[4, 1, 4, 4],
                    &[4, 1, 4, 4]
                ]
            );
            let (mv, pv) = (flat(&m)?, flat(&plain.batch(step)?)?);
            assert_eq!(mv[..2], pv[..], "the global views are the plain batcher's");
            assert_ne!(mv[2], mv[3], "local views differ from each other");
            // a pure function of the step, prefetched or not
            let again = batcher(0)?.with_local_views(lp.clone(), 3)?.batch_now(step)?;
            assert_eq!(flat(&again)?, mv);
        }
        assert!(batcher(0)?.with_local_views(lp, 0).is_err());
        Ok(())
    }

    #[test]
    fn epochs_cover_the_data_and_shuffle_differently() -> Result<()> {
        let mut b = batcher(0)?;
        assert_eq!(b.steps_per_epoch(), 4); // 18 / 4, last 2 dropped
        let mut seen = Vec::new();
        for s in 0..4 {
            let batch = b.batch(s)?;
            assert_eq!(batch.views.len(), 2);
            assert_eq!(batch.views[0].dims(), &[4, 1, 8, 8]);
            seen.extend(batch.indices);
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 16);
        assert_ne!(b.epoch_order(0), b.epoch_order(1));
        // two views of one image differ
        let batch = b.batch(0)?;
        let v = flat(&batch)?;
        assert_ne!(v[0], v[1]);
        // labels follow the indices
        let labels = batch
            .labels
            .map(|l| l.to_vec1::<u32>())
            .transpose()?
            .unwrap_or_default();
        assert_eq!(
            labels,
            batch.indices.iter().map(|&i| (i % 4) as u32).collect::<Vec<_>>()
        );
        Ok(())
    }

    #[test]
    fn restored_position_gives_the_same_next_batches() -> Result<()> {
        // Run A: steps 0..7 in order, with prefetch. Run B: a fresh batcher
        // "resumed" at step 5 (with prefetch). Steps 5, 6 must be identical.
        let mut a = batcher(2)?;
        let mut from_a = Vec::new();
        for s in 0..7 {
            from_a.push(flat(&a.batch(s)?)?);
        }
        let mut b = batcher(2)?;
        assert_eq!(flat(&b.batch(5)?)?, from_a[5]);
        assert_eq!(flat(&b.batch(6)?)?, from_a[6]);
        // and without prefetch, and out of order
        let mut c = batcher(0)?;
        assert_eq!(flat(&c.batch(6)?)?, from_a[6]);
        assert_eq!(flat(&c.batch(1)?)?, from_a[1]);
        Ok(())
    }

    #[test]
    fn errors_for_impossible_setups() {
        let p = Arc::new(Pipeline::new(AugmentConfig::default(), 8, 8).unwrap_or_else(|e| panic!("{e}")));
        let cfg = BatcherConfig {
            batch_size: 100,
            ..Default::default()
        };
        assert!(ImageBatcher::new(dataset(10), p.clone(), cfg, &Device::Cpu).is_err());
        let empty = Arc::new(ImageDataset {
            height: 8,
            width: 8,
            channels: 1,
            pixels: vec![],
            ..Default::default()
        });
        assert!(ImageBatcher::new(empty, p, BatcherConfig::default(), &Device::Cpu).is_err());
    }
}
