//! MoCo v2: a query encoder trained by InfoNCE against keys from a momentum
//! (EMA) key encoder and a queue of past keys as negatives.
//!
//! **Shuffle-BN on one device.** With batch norm, a query and its own key
//! computed in the same normalisation batch can "communicate" through the
//! batch statistics, and the pretext task is solved without learning good
//! features (the BN leak of the MoCo paper). MoCo shuffles the keys across
//! GPUs; here the batch is split into `bn_groups` groups that are normalised
//! separately: the queries in contiguous groups, the keys in groups of a
//! random permutation of the batch (drawn from the `method` stream of the
//! step, so resume is exact), un-permuted afterwards. A query and its key
//! therefore (almost never) share statistics. Running statistics are
//! updated once per group.
//!
//! **On several processes** each rank normalises `bn_groups / N` whole
//! groups: its own rows' queries, and its share of the permuted batch's keys
//! (every rank gets the batch's images, the keys are gathered back), so the
//! groups are those of one process; the running statistics are joined as if
//! the groups had run one after another, and the queue takes every rank's
//! keys in batch order.

use crate::branch::{state_tensor, MomentumTwin};
use crate::encoder::Encoder;
use crate::head::ProjectionHead;
use crate::loss::{info_nce, l2_normalize};
use crate::model::{build_encoder_and_head, ModelConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use pretext_core::init::named_vars;
use pretext_core::trainer::{Method, StepCx, StepOut};
use pretext_core::{Error, SeededVarMap};
use pretext_data::ImageBatch;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// MoCo settings (`model.moco`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoCoConfig {
    /// InfoNCE temperature.
    pub temperature: f64,
    /// Keys kept as negatives (K).
    pub queue_size: usize,
    /// EMA momentum of the key encoder.
    pub momentum: f64,
    /// Raise the momentum from `momentum` to 1 along a cosine over the run.
    pub momentum_cosine: bool,
    /// Symmetric loss: both views serve as query and as key (twice the compute).
    pub symmetric: bool,
    /// Batch-norm groups of the shuffle-BN substitute (1 = no split).
    pub bn_groups: usize,
}

impl Default for MoCoConfig {
    fn default() -> Self {
        Self {
            temperature: 0.2,
            queue_size: 4096,
            momentum: 0.99,
            momentum_cosine: false,
            symmetric: false,
            bn_groups: 8,
        }
    }
}

impl MoCoConfig {
    /// Checks the ranges against the batch size.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self, batch_size: usize) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(InvalidSetting::value(
                "model.moco.temperature",
                self.temperature,
                "must be > 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(InvalidSetting::value(
                "model.moco.momentum",
                self.momentum,
                "must lie in [0, 1]",
            ));
        }
        let per_step = if self.symmetric { 2 * batch_size } else { batch_size };
        if self.queue_size < per_step {
            return Err(InvalidSetting::value(
                "model.moco.queue_size",
                self.queue_size,
                &format!("must hold at least the {per_step} keys of one step"),
            ));
        }
        if self.bn_groups == 0 || batch_size / self.bn_groups < 2 {
            return Err(InvalidSetting::value(
                "model.moco.bn_groups",
                self.bn_groups,
                &format!("needs at least 2 images per group (train.batch_size = {batch_size})"),
            ));
        }
        Ok(())
    }
}

/// A ring buffer of `capacity` unit-norm keys `(capacity, dim)` and the
/// position the next key is written to.
#[derive(Debug, Clone)]
pub struct MomentumQueue {
    keys: Tensor,
    ptr: usize,
}

impl MomentumQueue {
    /// A queue of random unit vectors (as MoCo starts), drawn from `seed`'s `method` stream.
    ///
    /// # Errors
    /// A zero size.
    pub fn new(capacity: usize, dim: usize, seed: u64, device: &Device) -> candle_core::Result<Self> {
        if capacity == 0 || dim == 0 {
            candle_core::bail!("a key queue needs a positive size and dimension")
        }
        let mut rng = pretext_core::seed::stream_rng(seed, pretext_core::seed::METHOD, &[u64::MAX]);
        let v: Vec<f32> = (0..capacity * dim)
            .map(|_| pretext_core::init::standard_normal(&mut rng) as f32)
            .collect();
        let keys = l2_normalize(&Tensor::from_vec(v, (capacity, dim), device)?)?;
        Ok(Self { keys, ptr: 0 })
    }

    /// Restores a saved queue.
    ///
    /// # Errors
    /// A pointer outside the queue.
    pub fn from_parts(keys: Tensor, ptr: usize) -> candle_core::Result<Self> {
        let (capacity, _) = keys.dims2()?;
        if ptr >= capacity {
            candle_core::bail!("queue pointer {ptr} is outside a queue of {capacity} keys")
        }
        Ok(Self { keys, ptr })
    }

    /// The keys `(capacity, dim)`.
    pub fn keys(&self) -> &Tensor {
        &self.keys
    }

    /// Where the next key goes.
    pub fn ptr(&self) -> usize {
        self.ptr
    }

    /// Number of keys held.
    pub fn capacity(&self) -> usize {
        self.keys.dim(0).unwrap_or(0)
    }

    /// Writes `new` `(b, dim)` at the pointer, wrapping around at the end,
    /// replacing the oldest keys; advances the pointer by `b` (mod capacity).
    ///
    /// # Errors
    /// More keys than the queue holds, or a different dimension.
    pub fn push(&mut self, new: &Tensor) -> candle_core::Result<()> {
        let (b, d) = new.dims2()?;
        let (cap, dim) = self.keys.dims2()?;
        if d != dim || b > cap {
            candle_core::bail!("cannot push {b}×{d} keys into a queue of {cap}×{dim}")
        }
        let new = new.detach().to_dtype(self.keys.dtype())?;
        let first = b.min(cap - self.ptr);
        self.keys = self
            .keys
            .slice_assign(&[self.ptr..self.ptr + first, 0..dim], &new.narrow(0, 0, first)?)?;
        if first < b {
            self.keys = self
                .keys
                .slice_assign(&[0..b - first, 0..dim], &new.narrow(0, first, b - first)?)?;
        }
        self.ptr = (self.ptr + b) % cap;
        Ok(())
    }
}

/// The MoCo v2 method: query encoder and head (trained, `encoder.*`,
/// `head.*` in `model.safetensors`), their EMA twins (`key.encoder.*`,
/// `key.head.*` in `state.safetensors`) and the key queue (`queue`, `queue_ptr`).
pub struct MoCo {
    params: SeededVarMap,
    buffers: VarMap,
    /// The query encoder (what transfers).
    pub encoder: Encoder,
    head: ProjectionHead,
    key: MomentumTwin<ProjectionHead>,
    queue: MomentumQueue,
    pending: Option<Tensor>,
    cfg: ModelConfig,
}

impl MoCo {
    /// Builds query and key networks (identical at the start) and a random queue.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> candle_core::Result<Self> {
        let (params, buffers, encoder, head) = build_encoder_and_head(cfg, seed, device)?;
        // same seed and stream: the key networks start as exact copies
        let key = MomentumTwin::new(cfg, seed, device, "key.")?;
        let queue = MomentumQueue::new(cfg.moco.queue_size, cfg.head.output, seed, device)?;
        Ok(Self {
            params,
            buffers,
            encoder,
            head,
            key,
            queue,
            pending: None,
            cfg: cfg.clone(),
        })
    }

    /// The key queue.
    pub fn queue(&self) -> &MomentumQueue {
        &self.queue
    }

    /// The key encoder's parameters (EMA of the query's).
    pub fn key_params(&self) -> &VarMap {
        self.key.params()
    }

    /// Normalised projections of `x` through encoder + head, batch norm
    /// computed separately in `groups` groups of the batch order `perm`
    /// (identity when `None`); rows come back in the input order.
    fn project_grouped(
        encoder: &Encoder,
        head: &ProjectionHead,
        x: &Tensor,
        groups: usize,
        perm: Option<&[u32]>,
    ) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let device = x.device();
        let x = match perm {
            Some(p) => x.index_select(&Tensor::new(p, device)?, 0)?,
            None => x.clone(),
        };
        let groups = groups.clamp(1, n);
        let mut outs = Vec::with_capacity(groups);
        let mut start = 0;
        for g in 0..groups {
            let len = n / groups + usize::from(g < n % groups);
            let xg = x.narrow(0, start, len)?;
            outs.push(head.forward_t(&encoder.forward_t(&xg, true)?, true)?);
            start += len;
        }
        let z = l2_normalize(&Tensor::cat(&outs, 0)?)?;
        match perm {
            Some(p) => {
                let mut inv = vec![0u32; p.len()];
                for (i, &j) in p.iter().enumerate() {
                    inv[j as usize] = i as u32;
                }
                z.index_select(&Tensor::new(inv, device)?, 0)
            }
            None => Ok(z),
        }
    }

    /// The key permutation of a batch of `n`: from the `method` stream of the step.
    fn key_order(n: usize, cx: &StepCx, salt: u64) -> Vec<u32> {
        let mut perm: Vec<u32> = (0..n as u32).collect();
        perm.shuffle(&mut pretext_core::seed::stream_rng(
            cx.seed,
            pretext_core::seed::METHOD,
            &[cx.step, salt],
        ));
        perm
    }

    /// The keys of this process's rows `x`: `(local, global)`, the global
    /// keys of every rank's rows in batch order (what the queue takes).
    fn keys(&self, x: &Tensor, cx: &StepCx, salt: u64) -> candle_core::Result<(Tensor, Tensor)> {
        let Some(world) = pretext_core::dist::step_collective() else {
            let perm = Self::key_order(x.dim(0)?, cx, salt);
            let k = Self::project_grouped(
                self.key.encoder(),
                self.key.head(),
                x,
                self.cfg.moco.bn_groups,
                Some(&perm),
            )?
            .detach();
            return Ok((k.clone(), k));
        };
        // Shuffle-BN across processes, as MoCo shuffles across GPUs: every
        // rank gets the whole batch's images, normalises its share of the
        // permuted batch's groups on its own, and the keys are gathered and
        // put back in batch order.
        let b = x.dim(0)?;
        let all = pretext_core::dist::gather_rows_detached(x)?;
        let n = all.dim(0)?;
        let perm = Self::key_order(n, cx, salt);
        let (r, size) = (world.rank(), world.size());
        let mine = Tensor::new(&perm[r * b..(r + 1) * b], x.device())?;
        let k = Self::project_on_rank(
            &world,
            (self.key.encoder(), self.key.head(), self.key.buffers()),
            &all.index_select(&mine, 0)?,
            self.cfg.moco.bn_groups / size,
        )?;
        let permuted = pretext_core::dist::gather_rows_detached(&k)?;
        let mut inv = vec![0u32; n];
        for (i, &j) in perm.iter().enumerate() {
            inv[j as usize] = i as u32;
        }
        let global = permuted.index_select(&Tensor::new(inv, x.device())?, 0)?;
        Ok((global.narrow(0, r * b, b)?, global))
    }

    fn queries(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(world) = pretext_core::dist::step_collective() else {
            return Self::project_grouped(&self.encoder, &self.head, x, self.cfg.moco.bn_groups, None);
        };
        // This rank's rows are whole groups of the batch (bn_groups is a
        // multiple of the processes): normalised on their own, as in one process.
        let groups = self.cfg.moco.bn_groups / world.size();
        if !x.dim(0)?.is_multiple_of(groups) {
            candle_core::bail!(
                "MoCo on {} processes: train.batch_size must be a multiple of model.moco.bn_groups = {} \
                 (equal groups on every process)",
                world.size(),
                self.cfg.moco.bn_groups
            )
        }
        Self::project_on_rank(&world, (&self.encoder, &self.head, &self.buffers), x, groups)
    }

    /// [`Self::project_grouped`] of this rank's rows `x` in `groups` groups
    /// normalised on this rank alone (no synchronisation), then the running
    /// statistics in `buffers` joined across `world`'s ranks as if every
    /// rank's groups had run one after another, as in one process.
    fn project_on_rank(
        world: &pretext_core::dist::World,
        (encoder, head, buffers): (&Encoder, &ProjectionHead, &VarMap),
        x: &Tensor,
        groups: usize,
    ) -> candle_core::Result<Tensor> {
        let before: HashMap<String, Tensor> = named_vars(buffers)
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
            .collect::<candle_core::Result<_>>()?;
        let z = pretext_core::dist::step_scope(&pretext_core::dist::World::single(), || {
            Self::project_grouped(encoder, head, x, groups, None)
        })?;
        pretext_core::dist::join_running_stats(world, buffers, &before, groups, BN_MOMENTUM)?;
        Ok(z)
    }
}

/// The momentum of every batch norm's running statistics ([`pretext_core::nn::BatchNorm`]).
const BN_MOMENTUM: f64 = 0.1;

impl Method for MoCo {
    type Batch = ImageBatch;

    fn vars(&self) -> &VarMap {
        self.params.var_map()
    }

    fn model_buffers(&self) -> Option<&VarMap> {
        Some(&self.buffers)
    }

    fn step(&mut self, batch: &ImageBatch, cx: &StepCx) -> pretext_core::Result<StepOut> {
        let [v1, v2] = batch.views.as_slice() else {
            return Err(Error::Config(format!(
                "MoCo needs 2 views per image, got {}",
                batch.views.len()
            )));
        };
        let tau = self.cfg.moco.temperature;
        let queue = self.queue.keys().clone();
        let q1 = self.queries(v1)?;
        let (k2, k2_all) = self.keys(v2, cx, 0)?;
        let (loss, keys) = if self.cfg.moco.symmetric {
            let q2 = self.queries(v2)?;
            let (k1, k1_all) = self.keys(v1, cx, 1)?;
            let l = ((info_nce(&q1, &k2, Some(&queue), tau)? + info_nce(&q2, &k1, Some(&queue), tau)?)? * 0.5)?;
            (l, Tensor::cat(&[&k2_all, &k1_all], 0)?)
        } else {
            (info_nce(&q1, &k2, Some(&queue), tau)?, k2_all)
        };
        // positive-pair similarity: how well queries find their keys
        let pos = f64::from((&q1 * &k2)?.sum_all()?.to_scalar::<f32>()?) / q1.dim(0)? as f64;
        self.pending = Some(keys);
        Ok(StepOut {
            loss,
            stats: vec![("pos_sim", pos)],
        })
    }

    fn after_update(&mut self, cx: &StepCx) -> pretext_core::Result<()> {
        let m = if self.cfg.moco.momentum_cosine {
            pretext_core::ema::cosine_momentum(cx.step, cx.total_steps, self.cfg.moco.momentum)
        } else {
            self.cfg.moco.momentum
        };
        self.key.follow(named_vars(self.params.var_map()), m)?;
        if let Some(keys) = self.pending.take() {
            self.queue.push(&keys)?;
        }
        Ok(())
    }

    fn data_parallel(&self, processes: usize) -> Result<(), String> {
        let g = self.cfg.moco.bn_groups;
        if !g.is_multiple_of(processes) {
            return Err(format!(
                "model.moco.bn_groups = {g} must be a multiple of the {processes} processes \
                 (each normalises whole groups of the batch)"
            ));
        }
        Ok(())
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        let mut v = self.key.tensors();
        v.push(("queue".into(), self.queue.keys().clone()));
        if let Ok(p) = Tensor::new(&[self.queue.ptr() as u32], self.queue.keys().device()) {
            v.push(("queue_ptr".into(), p));
        }
        v
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> pretext_core::Result<()> {
        self.key.load(buffers, &["queue", "queue_ptr"], "MoCo")?;
        let keys = state_tensor(buffers, "queue", self.queue.keys().dims(), "MoCo")?.to_dtype(DType::F32)?;
        let ptr = state_tensor(buffers, "queue_ptr", &[1], "MoCo")?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?[0] as usize;
        self.queue = MomentumQueue::from_parts(keys.to_device(self.queue.keys().device())?, ptr)
            .map_err(|e| Error::Config(format!("state.safetensors: {e}")))?;
        self.pending = None;
        Ok(())
    }

    /// The key networks start as copies of the initial query networks.
    fn weights_loaded(&mut self) -> pretext_core::Result<()> {
        self.key.copy_from(self.params.var_map(), &self.buffers)
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        crate::branch::method_metadata("moco", &self.encoder)
    }
}
