//! The training loop shared by every paradigm.
//!
//! A paradigm supplies a [`Method`] (its model and loss) and a
//! [`BatchSource`] (its data); [`Trainer`] runs the steps: schedule,
//! forward, NaN/Inf guard, backward, gradient clipping, optimizer update,
//! the method's post-update hook (EMA, queue), metrics, checkpoints and
//! exact resume. Progress goes to an [`Observer`]; the trainer draws nothing.

use crate::checkpoint::{check_finite, match_tensors, Checkpoint, CheckpointManager, TrainerState};
use crate::init::{named_tensors, named_vars};
use crate::ops::bf16::Precision;
use crate::optim::{Optim, OptimConfig};
use crate::run::{MetricsLog, RunDir};
use crate::schedule::ScheduleConfig;
use crate::InvalidSetting;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// What a method returns from one step.
#[derive(Debug)]
pub struct StepOut {
    /// The scalar loss to minimise.
    pub loss: Tensor,
    /// Extra statistics to log (name, value).
    pub stats: Vec<(&'static str, f64)>,
}

/// Context of one training step.
#[derive(Debug, Clone)]
pub struct StepCx {
    /// 0-based index of this step.
    pub step: u64,
    /// Epoch of this step.
    pub epoch: u64,
    /// Total steps of the run.
    pub total_steps: u64,
    /// The run's seed.
    pub seed: u64,
    /// Learning rate of this step.
    pub lr: f64,
    /// This process's part of the step's batch in data-parallel training.
    pub shard: Shard,
}

/// Which part of every batch a process trains on: rank `rank` of `size`
/// holds rows `[rank·b, (rank+1)·b)` of the global batch, where `b` is its
/// own batch's size (shards are equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank.
    pub rank: usize,
    /// The number of processes.
    pub size: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { rank: 0, size: 1 }
    }
}

impl Shard {
    /// The shard of this process in `world`.
    pub fn of(world: &crate::dist::World) -> Self {
        Self {
            rank: world.rank(),
            size: world.size(),
        }
    }

    /// The first row of this shard in the global batch, when it holds `local` rows.
    pub fn first_row(&self, local: usize) -> usize {
        self.rank * local
    }

    /// The rows of the global batch, when each shard holds `local`.
    pub fn global_rows(&self, local: usize) -> usize {
        self.size * local
    }

    /// Rows `[first_row, first_row + local)` of `t`, a tensor drawn for the
    /// whole batch (noise, masks): what this shard's rows get, so the draws
    /// do not depend on the number of processes.
    ///
    /// # Errors
    /// `t` has fewer rows than the global batch.
    pub fn rows_of(&self, t: &Tensor, local: usize) -> candle_core::Result<Tensor> {
        if self.size == 1 {
            return Ok(t.clone());
        }
        t.narrow(0, self.first_row(local), local)
    }
}

impl StepCx {
    /// A generator for `stream` that is a pure function of (seed, stream, step):
    /// use it for noise, dropout masks and permutations inside a step.
    pub fn rng(&self, stream: &str) -> StdRng {
        crate::seed::stream_rng(self.seed, stream, &[self.step])
    }
}

/// A trainable pretext task: model, loss and any state of its own.
///
/// `Send`, and its batches `Sync`, because the trainer runs each step of a
/// one-process run on a worker of rayon's pool ([`crate::cpu::on_pool`]).
pub trait Method: Send {
    /// What one step consumes (read by the thread that runs the step).
    type Batch: Sync;

    /// The trainable parameters (the optimizer sees exactly these).
    fn vars(&self) -> &VarMap;

    /// Non-trainable tensors that belong with the weights in
    /// `model.safetensors` (BatchNorm running statistics).
    fn model_buffers(&self) -> Option<&VarMap> {
        None
    }

    /// Forward pass and loss of one step (in training mode).
    ///
    /// # Errors
    /// A tensor operation failed.
    fn step(&mut self, batch: &Self::Batch, cx: &StepCx) -> Result<StepOut>;

    /// Called after each optimizer update (EMA of a key encoder, queue update).
    ///
    /// # Errors
    /// A tensor operation failed.
    fn after_update(&mut self, _cx: &StepCx) -> Result<()> {
        Ok(())
    }

    /// Method state for `state.safetensors` (queue, EMA twin, ...).
    fn buffers(&self) -> Vec<(String, Tensor)> {
        vec![]
    }

    /// Restores what [`Method::buffers`] returned.
    ///
    /// # Errors
    /// A buffer is missing or has the wrong shape.
    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        if buffers.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "this method keeps no state, but the checkpoint has {:?}",
                buffers.keys().collect::<Vec<_>>()
            )))
        }
    }

    /// Metadata for `model.safetensors` (`pretext.paradigm`, `pretext.architecture`, ...).
    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// Whether this method, as configured, trains data-parallel over several
    /// processes exactly as in one ([`crate::dist`]): losses over the whole
    /// batch gather their rows, random draws are made for the whole batch,
    /// state such as a queue takes every rank's rows. Asked before a run on
    /// `processes` > 1; `Err` says why not, and the trainer refuses to start.
    ///
    /// # Errors
    /// What the method lacks for data-parallel training (the default: a
    /// method has to say it is ready).
    fn data_parallel(&self, _processes: usize) -> std::result::Result<(), String> {
        Err("this method is not written for data-parallel training yet".into())
    }

    /// Called after initial weights were copied into [`Method::vars`] and
    /// [`Method::model_buffers`] (`--init`): state derived from the weights
    /// (a momentum twin) is rebuilt from them.
    ///
    /// # Errors
    /// A tensor operation failed.
    fn weights_loaded(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Every variable of a method's `model.safetensors`, by name: trainable
/// weights and model buffers (what initial weights are copied into).
pub fn model_vars<M: Method + ?Sized>(method: &M) -> Vec<(String, candle_core::Var)> {
    let mut v = named_vars(method.vars());
    if let Some(b) = method.model_buffers() {
        v.extend(named_vars(b));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A deterministic, random-access stream of batches: the batch of a step is a
/// pure function of the step (and the seed), so a resumed run sees exactly the
/// batches it would have seen.
pub trait BatchSource {
    /// The batch type.
    type Batch;

    /// Batches in one epoch.
    fn steps_per_epoch(&self) -> u64;

    /// The batch of 0-based global step `step` (epoch = step / steps_per_epoch).
    ///
    /// # Errors
    /// Reading or augmenting the data failed.
    fn batch(&mut self, step: u64) -> Result<Self::Batch>;

    /// From now on, [`BatchSource::batch`] returns only `shard`'s rows of
    /// every batch (data-parallel training): the same rows, drawn from the
    /// same streams, that the whole batch has there, so the run's batches do
    /// not depend on the number of processes. The trainer calls it before a
    /// data-parallel run; steps per epoch count whole batches.
    ///
    /// # Errors
    /// The batches cannot be split into `shard.size` equal parts (the
    /// default: a source has to say it can).
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        if shard.size == 1 {
            return Ok(());
        }
        Err(Error::Config(format!(
            "these batches cannot be split across {} processes",
            shard.size
        )))
    }
}

/// One completed step, as reported to observers and the metrics log.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Completed steps so far (1 after the first step).
    pub step: u64,
    /// Total steps of the run.
    pub total_steps: u64,
    /// Epoch of the step.
    pub epoch: u64,
    /// The loss.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Extra statistics from the method.
    pub stats: Vec<(&'static str, f64)>,
    /// Seconds since training (re)started.
    pub elapsed_s: f64,
}

/// Every tensor of a method's `model.safetensors`: trainable weights and
/// model buffers, sorted by name.
pub fn model_tensors<M: Method>(method: &M) -> Vec<(String, Tensor)> {
    let mut all: BTreeMap<String, Tensor> = named_tensors(method.vars()).into_iter().collect();
    if let Some(b) = method.model_buffers() {
        all.extend(named_tensors(b));
    }
    all.into_iter().collect()
}

/// Loads the weights and model buffers of checkpoint `ckpt` (read from
/// `path`) into `method`, e.g. to evaluate or export a trained model.
///
/// # Errors
/// Missing, unexpected or mis-shaped tensors, named with the file.
pub fn load_model_weights<M: Method>(method: &M, ckpt: &Checkpoint, path: &Path) -> Result<()> {
    let found: HashMap<String, Tensor> = ckpt.model.iter().cloned().collect();
    let mut vars = named_vars(method.vars());
    if let Some(b) = method.model_buffers() {
        vars.extend(named_vars(b));
    }
    set_from_file(
        &path.join(crate::checkpoint::MODEL_FILE),
        &model_tensors(method),
        &found,
        vars,
    )
}

/// Checks the tensors `found` in `file` against `expected` (names and
/// shapes, see [`match_tensors`]) and writes them into `vars` by name.
fn set_from_file(
    file: &Path,
    expected: &[(String, Tensor)],
    found: &HashMap<String, Tensor>,
    vars: Vec<(String, candle_core::Var)>,
) -> Result<()> {
    let vars: HashMap<String, candle_core::Var> = vars.into_iter().collect();
    for (name, t) in match_tensors(file, expected, found)? {
        if let Some(v) = vars.get(&name) {
            v.set(&t)?;
        }
    }
    Ok(())
}

/// Receives progress; the CLI draws progress bars from it.
pub trait Observer {
    /// Training starts (or resumes) at `start_step` of `total_steps`.
    fn on_start(&mut self, _start_step: u64, _total_steps: u64) {}
    /// A step completed.
    fn on_step(&mut self, _report: &StepReport) {}
    /// Something noteworthy happened (checkpoint saved, evaluation done).
    fn on_message(&mut self, _message: &str) {}
    /// Training stopped after `steps` completed steps.
    fn on_finish(&mut self, _steps: u64) {}
    /// Progress of a task that is not a training loop (feature extraction,
    /// evaluation): `done` of `total` units of `task`; `done == total` ends it.
    fn on_progress(&mut self, _task: &str, _done: u64, _total: u64) {}
}

/// The trainer's epoch-end hook (see [`Trainer::train`]): when to evaluate
/// the model during training, and what to record when it does.
pub trait Monitor<M> {
    /// What an evaluation can fail with.
    type Error: From<Error>;

    /// Whether to evaluate after `step` completed steps in epochs of
    /// `steps_per_epoch` (the trainer also evaluates after the last step
    /// whatever this says).
    fn due(&self, step: u64, steps_per_epoch: u64) -> bool;

    /// Evaluates `model`, which holds the published weights, after `step`
    /// steps; the records returned are appended to `metrics.jsonl`.
    ///
    /// # Errors
    /// Whatever the evaluation fails with.
    fn evaluate(
        &mut self,
        model: &M,
        step: u64,
        steps_per_epoch: u64,
        observer: &mut dyn Observer,
    ) -> std::result::Result<Vec<serde_json::Value>, Self::Error>;
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullObserver;

impl Observer for NullObserver {}

/// An observer that keeps the loss of every step, in order.
#[derive(Debug, Default, Clone)]
pub struct LossLog(pub Vec<f64>);

impl Observer for LossLog {
    fn on_step(&mut self, report: &StepReport) {
        self.0.push(report.loss);
    }
}

/// The `train` section of every config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Passes over the data (ignored when `max_steps` > 0).
    pub epochs: u64,
    /// Stop after this many steps; 0 = run `epochs` epochs.
    pub max_steps: u64,
    /// Samples per step.
    pub batch_size: usize,
    /// Seed of every random stream (init, data order, augmentation, masking).
    pub seed: u64,
    /// Save a checkpoint every N steps (and always at the end); 0 = only at the end.
    pub checkpoint_every: u64,
    /// Keep the newest K checkpoints; 0 keeps all.
    pub keep_checkpoints: usize,
    /// Clip the global gradient norm to this value; 0 = no clipping.
    pub clip_grad_norm: f64,
    /// Write a metrics record every N steps.
    pub log_every: u64,
    /// The weights the run started from, as given to `--init` (a run or
    /// export folder, a Hugging Face or torchvision checkpoint,
    /// `hub:owner/name[@revision]`); empty = a random initialisation from
    /// `seed`. Recorded for provenance; resuming reads checkpoints, not this.
    pub init: String,
    /// Decay of an exponential moving average of the weights (Polyak
    /// averaging), updated after every optimizer step; 0 = off. When on, the
    /// average is the published model: checkpoints write it to
    /// `model.safetensors` (what evaluation, probing, sampling and export
    /// load) and keep the training iterate in `state.safetensors` for resume.
    /// The decay in effect at update `t` is `min(ema_decay, (1 + t) / (10 + t))`,
    /// so short runs are not dominated by the initial weights.
    pub ema_decay: f64,
    /// The precision of the operands of the training step's matrix products
    /// (convolutions, linear layers, attention; forward and backward):
    /// `"f32"`, or `"bf16"` for mixed precision — operands rounded to bf16,
    /// products summed in f32, everything else (weights, optimizer state,
    /// normalisation, softmax, losses, checkpoints) f32. bf16 runs on
    /// AVX512-BF16 kernels where the CPU has them and in f32 elsewhere;
    /// `trainer.json` records which (`products`). Evaluation stays f32.
    pub precision: Precision,
    /// Data-parallel runs (`mpirun -np N`): batch normalisation takes its
    /// statistics over the whole batch, every process's rows, as one process
    /// would (`true`, SyncBatchNorm), or over each process's own rows
    /// (`false`, PyTorch DDP's default): no exchange for them, but the run
    /// then depends on the number of processes. No effect in one process.
    pub sync_bn: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: 0,
            batch_size: 256,
            seed: 0,
            checkpoint_every: 500,
            keep_checkpoints: 3,
            clip_grad_norm: 0.0,
            log_every: 1,
            init: String::new(),
            ema_decay: 0.0,
            precision: Precision::F32,
            sync_bn: true,
        }
    }
}

impl TrainConfig {
    /// Checks the fields.
    ///
    /// # Errors
    /// The bad key and why.
    pub fn validate(&self) -> crate::SettingResult {
        if self.epochs == 0 && self.max_steps == 0 {
            return Err(InvalidSetting::new(
                "train.epochs",
                "0, and train.max_steps is 0 too: nothing to train",
            ));
        }
        if self.batch_size == 0 {
            return Err(InvalidSetting::value("train.batch_size", 0, "must be > 0"));
        }
        if !(self.clip_grad_norm.is_finite() && self.clip_grad_norm >= 0.0) {
            return Err(InvalidSetting::value(
                "train.clip_grad_norm",
                self.clip_grad_norm,
                "must be >= 0 (0 = no clipping)",
            ));
        }
        if self.log_every == 0 {
            return Err(InvalidSetting::value("train.log_every", 0, "must be > 0"));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(InvalidSetting::value(
                "train.ema_decay",
                self.ema_decay,
                "must lie in [0, 1) (0 = no weight averaging)",
            ));
        }
        Ok(())
    }

    /// The EMA decay applied at the update that completes step `step` (1-based count of updates).
    pub fn ema_decay_at(&self, step: u64) -> f64 {
        let t = step.saturating_sub(1) as f64;
        self.ema_decay.min((1.0 + t) / (10.0 + t))
    }

    /// Total steps for a stream of `steps_per_epoch` batches per epoch.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        if self.max_steps > 0 {
            self.max_steps
        } else {
            self.epochs * steps_per_epoch
        }
    }
}

/// The mean over ranks of a step's loss and statistics (one collective);
/// `local` itself in one process. Returns the loss; `stats` are replaced.
fn mean_over_ranks(world: &crate::dist::World, local: f64, stats: &mut [(&'static str, f64)]) -> f64 {
    if world.size() == 1 {
        return local;
    }
    let mut buf: Vec<f64> = std::iter::once(local).chain(stats.iter().map(|s| s.1)).collect();
    world.all_reduce_f64(&mut buf);
    let n = world.size() as f64;
    for (s, v) in stats.iter_mut().zip(&buf[1..]) {
        s.1 = v / n;
    }
    buf[0] / n
}

/// Where training stopped.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Completed steps.
    pub steps: u64,
    /// Loss of each step run by this call, in order.
    pub losses: Vec<f64>,
}

/// Runs a [`Method`] on a [`BatchSource`].
pub struct Trainer<M: Method> {
    /// The method being trained.
    pub method: M,
    optim: Box<dyn Optim>,
    optim_cfg: OptimConfig,
    schedule: ScheduleConfig,
    cfg: TrainConfig,
    step: u64,
    last_lr: f64,
    last_loss: Option<f64>,
    /// When this process first trained (`elapsed_s` counts from here, across `fit_until` calls).
    started: Option<Instant>,
    checkpoints: Option<CheckpointManager>,
    metrics: Option<MetricsLog>,
    /// The moving average of the weights when `train.ema_decay` > 0.
    average: Option<VarMap>,
    /// What the run's initial weights were (`--init`).
    init: Option<crate::warm_start::InitRecord>,
    /// The processes training together ([`crate::dist::world`] unless set).
    world: crate::dist::World,
    /// Whether rank 0's weights have been broadcast (data-parallel runs).
    synced: bool,
}

/// Prefix of the training iterate's tensors in `state.safetensors` when the
/// published weights are an average (see [`TrainConfig::ema_decay`]).
pub const ITERATE_PREFIX: &str = "trainer.iterate.";

/// A new map holding copies of every variable of `vars`, by name.
fn copy_var_map(vars: &VarMap) -> Result<VarMap> {
    let out = VarMap::new();
    {
        let mut data = out
            .data()
            .lock()
            .map_err(|_| Error::Config("variable map lock poisoned".into()))?;
        for (name, v) in named_vars(vars) {
            data.insert(name, candle_core::Var::from_tensor(&v.as_tensor().copy()?)?);
        }
    }
    Ok(out)
}

impl<M: Method> Trainer<M> {
    /// A trainer starting at step 0, without a run folder.
    ///
    /// # Errors
    /// [`Error::Config`] when a config is invalid.
    pub fn new(method: M, optim: &OptimConfig, schedule: &ScheduleConfig, train: &TrainConfig) -> Result<Self> {
        train.validate()?;
        schedule.validate()?;
        let opt = optim.build(named_vars(method.vars()))?;
        let average = if train.ema_decay > 0.0 {
            Some(copy_var_map(method.vars())?)
        } else {
            None
        };
        Ok(Self {
            method,
            optim: opt,
            optim_cfg: optim.clone(),
            schedule: schedule.clone(),
            cfg: train.clone(),
            step: 0,
            last_lr: 0.0,
            last_loss: None,
            started: None,
            checkpoints: None,
            metrics: None,
            average,
            init: None,
            world: crate::dist::world().clone(),
            synced: false,
        })
    }

    /// Trains data-parallel with the ranks of `world` instead of the
    /// process's world (tests run ranks as threads: [`crate::dist::LocalGroup`]).
    pub fn set_world(&mut self, world: crate::dist::World) {
        self.world = world;
        self.synced = false;
    }

    /// The processes training together.
    pub fn world(&self) -> &crate::dist::World {
        &self.world
    }

    /// Records where the run's initial weights came from (kept in every
    /// checkpoint's `trainer.json`).
    pub fn set_init(&mut self, record: Option<crate::warm_start::InitRecord>) {
        self.init = record;
    }

    /// Logs metrics to `run/metrics.jsonl` and saves checkpoints in
    /// `run/checkpoints`. Call after [`Trainer::resume`] when resuming.
    ///
    /// # Errors
    /// [`Error::Io`] when the metrics log cannot be opened.
    pub fn attach_run(&mut self, run: &RunDir) -> Result<()> {
        self.checkpoints = Some(run.checkpoints(self.cfg.keep_checkpoints));
        self.metrics = Some(if self.step > 0 {
            MetricsLog::resume(run.metrics_path(), self.step)?
        } else {
            MetricsLog::append(run.metrics_path())?
        });
        Ok(())
    }

    /// Appends a record (an evaluation, an event) to the run's `metrics.jsonl`;
    /// a no-op without an attached run.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn log_record(&mut self, record: &serde_json::Value) -> Result<()> {
        match self.metrics.as_mut() {
            Some(m) => m.log(record),
            None => Ok(()),
        }
    }

    /// Completed steps.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The optimizer (for inspection).
    pub fn optimizer(&self) -> &dyn Optim {
        self.optim.as_ref()
    }

    /// Every tensor of `model.safetensors`: the published weights (the
    /// moving average when `train.ema_decay` > 0, else the training iterate)
    /// and model buffers, sorted by name.
    pub fn model_tensors(&self) -> Vec<(String, Tensor)> {
        let mut all: BTreeMap<String, Tensor> = model_tensors(&self.method).into_iter().collect();
        if let Some(avg) = &self.average {
            all.extend(named_tensors(avg));
        }
        all.into_iter().collect()
    }

    /// Runs `f` on the method with the published weights in place (the
    /// moving average when `train.ema_decay` > 0), then puts the training
    /// iterate back bit for bit: evaluation during training sees what a
    /// checkpoint publishes. Without averaging, `f` sees the method as is.
    ///
    /// # Errors
    /// What `f` returns; a tensor copy failed.
    pub fn with_published_weights<R, E: From<Error>>(
        &self,
        f: impl FnOnce(&M) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let Some(avg) = &self.average else {
            return f(&self.method);
        };
        let vars = named_vars(self.method.vars());
        let avg: HashMap<String, candle_core::Var> = named_vars(avg).into_iter().collect();
        let mut saved = Vec::with_capacity(vars.len());
        for (name, v) in &vars {
            saved.push(v.as_tensor().copy().map_err(Error::from)?);
            v.set(avg[name].as_tensor()).map_err(Error::from)?;
        }
        let out = f(&self.method);
        for ((_, v), t) in vars.iter().zip(saved) {
            v.set(&t).map_err(Error::from)?;
        }
        out
    }

    /// A snapshot of everything needed to resume, for a stream of
    /// `steps_per_epoch` batches per epoch. Tensors are copies.
    ///
    /// # Errors
    /// A tensor could not be copied.
    pub fn checkpoint(&self, steps_per_epoch: u64) -> Result<Checkpoint> {
        let copy = |v: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
            v.into_iter().map(|(n, t)| Ok((n, t.copy()?))).collect()
        };
        let spe = steps_per_epoch.max(1);
        let mut state = self.method.buffers();
        let mut metadata = self.method.metadata();
        if self.average.is_some() {
            state.extend(
                named_tensors(self.method.vars())
                    .into_iter()
                    .map(|(n, t)| (format!("{ITERATE_PREFIX}{n}"), t)),
            );
            metadata.insert(
                "pretext.weights".into(),
                format!("exponential moving average, decay {}", self.cfg.ema_decay),
            );
        }
        Ok(Checkpoint {
            model: copy(self.model_tensors())?,
            optimizer: copy(self.optim.state())?,
            state: copy(state)?,
            trainer: TrainerState {
                step: self.step,
                epoch: self.step / spe,
                batch_in_epoch: self.step % spe,
                steps_per_epoch: spe,
                total_steps: self.cfg.total_steps(spe),
                seed: self.cfg.seed,
                rng_scheme: "counter-v1".into(),
                lr: self.last_lr,
                last_loss: self.last_loss,
                pretext_version: env!("CARGO_PKG_VERSION").into(),
                cpu: Some(crate::cpu::CpuInfo::current().clone()),
                products: Some(self.cfg.precision.describe()),
                processes: (self.world.size() > 1)
                    .then(|| format!("{} processes, {}", self.world.size(), self.world.backend())),
                init: self.init.clone(),
            },
            metadata,
        })
    }

    /// Restores weights, buffers, optimizer state and the step from `ckpt`
    /// (which was read from `path`, named in errors).
    ///
    /// # Errors
    /// [`Error::Keys`] / [`Error::Shape`] when the checkpoint does not fit the
    /// model; [`Error::Config`] when it was written with another seed.
    pub fn resume(&mut self, ckpt: &Checkpoint, path: &Path) -> Result<()> {
        if ckpt.trainer.seed != self.cfg.seed {
            return Err(Error::Config(format!(
                "{}: written with seed {}, this run has seed {}",
                path.display(),
                ckpt.trainer.seed,
                self.cfg.seed
            )));
        }
        load_model_weights(&self.method, ckpt, path)?;
        // With averaging, model.safetensors holds the average and the
        // iterate travels in state.safetensors under ITERATE_PREFIX.
        let (iterate, method_state): (Vec<_>, Vec<_>) = ckpt
            .state
            .iter()
            .cloned()
            .partition(|(n, _)| n.starts_with(ITERATE_PREFIX));
        if let Some(avg) = &self.average {
            let avg: HashMap<String, candle_core::Var> = named_vars(avg).into_iter().collect();
            for (name, v) in named_vars(self.method.vars()) {
                avg[&name].set(v.as_tensor())?;
            }
        }
        if !iterate.is_empty() {
            let found: HashMap<String, Tensor> = iterate
                .into_iter()
                .map(|(n, t)| (n[ITERATE_PREFIX.len()..].to_string(), t))
                .collect();
            set_from_file(
                &path.join(crate::checkpoint::STATE_FILE),
                &named_tensors(self.method.vars()),
                &found,
                named_vars(self.method.vars()),
            )?;
        }
        let opt: HashMap<String, Tensor> = ckpt.optimizer.iter().cloned().collect();
        self.optim.load_state(&opt).map_err(|e| match e {
            Error::Config(m) => Error::corrupt(path.join(crate::checkpoint::OPTIMIZER_FILE), m),
            other => other,
        })?;
        let st: HashMap<String, Tensor> = method_state.into_iter().collect();
        self.method.load_buffers(&st).map_err(|e| match e {
            Error::Config(m) => Error::corrupt(path.join(crate::checkpoint::STATE_FILE), m),
            other => other,
        })?;
        self.step = ckpt.trainer.step;
        self.last_lr = ckpt.trainer.lr;
        self.last_loss = ckpt.trainer.last_loss;
        self.init = ckpt.trainer.init.clone();
        Ok(())
    }

    /// Trains to the end of the run.
    ///
    /// # Errors
    /// [`Error::NonFinite`] naming the step when the loss or gradients diverge
    /// (no checkpoint is written for it); data, tensor or I/O errors.
    pub fn fit<D: BatchSource<Batch = M::Batch>>(
        &mut self,
        data: &mut D,
        observer: &mut dyn Observer,
    ) -> Result<TrainSummary> {
        let total = self.cfg.total_steps(data.steps_per_epoch());
        self.fit_until(data, observer, total)
    }

    /// Trains until `stop` completed steps (at most the run's total), then
    /// saves a checkpoint if a run is attached.
    ///
    /// # Errors
    /// As [`Trainer::fit`].
    pub fn fit_until<D: BatchSource<Batch = M::Batch>>(
        &mut self,
        data: &mut D,
        observer: &mut dyn Observer,
        stop: u64,
    ) -> Result<TrainSummary> {
        let summary = self.run_steps(data, observer, stop)?;
        if !summary.losses.is_empty() {
            self.save_checkpoint(data.steps_per_epoch().max(1), observer)?;
        }
        Ok(summary)
    }

    /// Trains to the end of the run with `monitor` as the epoch-end hook:
    /// the run stops at every epoch end and at every step where the monitor
    /// is due; there it evaluates (when due, and always after the last
    /// step) with the published weights, appends the records to
    /// `metrics.jsonl`, and only then saves the checkpoint of that step.
    ///
    /// That order is what makes kill-and-resume exact at any moment: a run
    /// killed during an evaluation has no checkpoint of the evaluated step,
    /// so `resume` goes back to the previous one (dropping any record
    /// written after it) and runs the evaluation again.
    ///
    /// # Errors
    /// As [`Trainer::fit`], and the monitor's errors.
    pub fn train<D, Mo>(
        &mut self,
        data: &mut D,
        monitor: &mut Mo,
        observer: &mut dyn Observer,
    ) -> std::result::Result<(), Mo::Error>
    where
        D: BatchSource<Batch = M::Batch>,
        Mo: Monitor<M>,
    {
        let spe = data.steps_per_epoch().max(1);
        let total = self.cfg.total_steps(spe);
        while self.step < total {
            let boundary = ((self.step / spe + 1) * spe).min(total);
            let stop = (self.step + 1..boundary)
                .find(|&s| monitor.due(s, spe))
                .unwrap_or(boundary);
            self.run_steps(data, observer, stop)?;
            let step = self.step;
            // In data-parallel training rank 0 evaluates and writes; the
            // others wait for it (yielding the CPU) before the next step.
            if (step >= total || monitor.due(step, spe)) && self.world.is_root() {
                let records = self.with_published_weights(|m| monitor.evaluate(m, step, spe, observer))?;
                for r in &records {
                    self.log_record(r)?;
                }
            }
            self.save_checkpoint(spe, observer)?;
            self.world.barrier();
        }
        Ok(())
    }

    /// Runs steps until `stop` completed steps, with the periodic
    /// checkpoints of `train.checkpoint_every` before `stop` but not at it.
    fn run_steps<D: BatchSource<Batch = M::Batch>>(
        &mut self,
        data: &mut D,
        observer: &mut dyn Observer,
        stop: u64,
    ) -> Result<TrainSummary> {
        let spe = data.steps_per_epoch().max(1);
        let total = self.cfg.total_steps(spe);
        let stop = stop.min(total);
        let started = *self.started.get_or_insert_with(Instant::now);
        let mut losses = Vec::new();
        self.start_data_parallel()?;
        if self.world.size() > 1 {
            data.set_shard(Shard::of(&self.world))?;
        }
        observer.on_start(self.step, total);
        while self.step < stop {
            let step = self.step;
            let cx = StepCx {
                step,
                epoch: step / spe,
                total_steps: total,
                seed: self.cfg.seed,
                lr: self.schedule.lr(step, total, self.optim_cfg.lr),
                shard: Shard::of(&self.world),
            };
            let batch = data.batch(step)?;
            let sent_before = self.world.bytes_sent();
            // In one process the step runs on a worker of rayon's pool, so
            // that the kernels' parallel loops start from inside the pool
            // (each of them otherwise hands its work from this thread to the
            // pool and sleeps until it is done: two thread wake-ups per loop,
            // hundreds of loops per step). Data-parallel steps stay on this
            // thread, the one that talks to the other processes.
            let (out, loss, grad_norm) = if self.world.size() == 1 {
                crate::cpu::on_pool(|| self.train_step(&batch, &cx))?
            } else {
                self.train_step(&batch, &cx)?
            };
            self.last_lr = cx.lr;
            self.last_loss = Some(loss);
            losses.push(loss);
            let report = StepReport {
                step: self.step,
                total_steps: total,
                epoch: cx.epoch,
                loss,
                lr: cx.lr,
                grad_norm,
                stats: out.stats,
                elapsed_s: started.elapsed().as_secs_f64(),
            };
            if let Some(m) = self.metrics.as_mut() {
                if self.step.is_multiple_of(self.cfg.log_every) || self.step == total {
                    let mut rec = serde_json::json!({
                        "step": report.step, "epoch": report.epoch, "loss": report.loss,
                        "lr": report.lr, "grad_norm": report.grad_norm, "elapsed_s": report.elapsed_s,
                    });
                    for (k, v) in &report.stats {
                        rec[*k] = serde_json::json!(v);
                    }
                    if self.world.size() > 1 {
                        // What this rank handed to the collectives in the step.
                        rec["sent_bytes"] = serde_json::json!(self.world.bytes_sent() - sent_before);
                    }
                    m.log(&rec)?;
                }
            }
            observer.on_step(&report);
            let due = self.cfg.checkpoint_every > 0 && self.step.is_multiple_of(self.cfg.checkpoint_every);
            if due && self.step < stop {
                self.save_checkpoint(spe, observer)?;
            }
        }
        observer.on_finish(self.step);
        Ok(TrainSummary {
            steps: self.step,
            losses,
        })
    }

    /// One step on `batch`: forward and backward passes (in the configured
    /// precision and, data-parallel, with the step's collective), gradient
    /// averaging and clipping, the update and the weights' average. Returns
    /// the method's output, the loss (mean over ranks) and the gradient norm.
    fn train_step(&mut self, batch: &M::Batch, cx: &StepCx) -> Result<(StepOut, f64, f64)> {
        let step = cx.step;
        // The forward and backward passes run in the configured
        // precision (and, data-parallel, with the step's collective);
        // clipping, the update and averaging in f32.
        let method = &mut self.method;
        let world = &self.world;
        let precision = self.cfg.precision;
        let (out, loss, mut grads) = crate::dist::step_scope_with(world, self.cfg.sync_bn, || {
            precision.scope(|| -> Result<_> {
                let mut out = method.step(batch, cx)?;
                let local = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                // The run's loss and statistics: their mean over ranks
                // (every rank sees the same, so all stop together on a
                // non-finite loss).
                let loss = mean_over_ranks(world, local, &mut out.stats);
                if !loss.is_finite() {
                    return Err(Error::NonFinite {
                        step,
                        what: "loss".into(),
                        value: loss.to_string(),
                    });
                }
                let grads = out.loss.backward()?;
                Ok((out, loss, grads))
            })
        })?;
        self.average_gradients(&mut grads)?;
        let grad_norm = self.clip_gradients(&mut grads, step)?;
        self.optim.step(&grads, cx.lr)?;
        self.method.after_update(cx)?;
        self.step += 1;
        if let Some(avg) = &self.average {
            crate::ema::ema_update(avg, self.method.vars(), self.cfg.ema_decay_at(self.step))?;
        }
        Ok((out, loss, grad_norm))
    }

    /// Before the first step of a data-parallel run: checks that the method
    /// can train so, and gives every rank rank 0's weights (and average).
    fn start_data_parallel(&mut self) -> Result<()> {
        if self.synced || self.world.size() == 1 {
            return Ok(());
        }
        if let Err(why) = self.method.data_parallel(self.world.size()) {
            return Err(Error::Config(format!(
                "data-parallel training on {} processes: {why}; run it on one process",
                self.world.size()
            )));
        }
        let vars: Vec<candle_core::Var> = model_vars(&self.method).into_iter().map(|(_, v)| v).collect();
        self.world.broadcast_vars(&vars, 0)?;
        if let Some(avg) = &self.average {
            let avg: Vec<candle_core::Var> = named_vars(avg).into_iter().map(|(_, v)| v).collect();
            self.world.broadcast_vars(&avg, 0)?;
        }
        self.synced = true;
        Ok(())
    }

    /// Replaces every parameter's gradient by its mean over ranks (one
    /// bucket, in parameter-name order); a no-op in one process. A rank
    /// whose part of the batch did not reach a parameter (an MLM shard
    /// without a masked token) sends zeros for it; a parameter no rank
    /// reached keeps no gradient, as in one process.
    fn average_gradients(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        if self.world.size() == 1 {
            return Ok(());
        }
        let vars = named_vars(self.method.vars());
        let mut gs = Vec::with_capacity(vars.len() + 1);
        let mut reached = Vec::with_capacity(vars.len());
        for (_, v) in &vars {
            let t = v.as_tensor();
            match grads.get(t) {
                Some(g) => {
                    gs.push(g.clone());
                    reached.push(1f32);
                }
                None => {
                    gs.push(t.zeros_like()?);
                    reached.push(0.0);
                }
            }
        }
        let n = reached.len();
        gs.push(Tensor::from_vec(reached, n, &candle_core::Device::Cpu)?);
        let mut avg = self.world.average_tensors(&gs)?;
        let reached = avg.pop().map(|t| t.to_vec1::<f32>()).transpose()?.unwrap_or_default();
        for (((_, v), g), r) in vars.iter().zip(avg).zip(reached) {
            if r > 0.0 {
                grads.insert(v.as_tensor(), g);
            }
        }
        Ok(())
    }

    fn save_checkpoint(&self, spe: u64, observer: &mut dyn Observer) -> Result<()> {
        if let Some(mgr) = &self.checkpoints {
            let ck = self.checkpoint(spe)?;
            let dir = mgr.save(&ck)?;
            observer.on_message(&format!("checkpoint {}", dir.display()));
        }
        Ok(())
    }

    /// Computes the global gradient norm, fails on NaN/Inf, clips if configured.
    fn clip_gradients(&self, grads: &mut candle_core::backprop::GradStore, step: u64) -> Result<f64> {
        let vars = named_vars(self.method.vars());
        let mut sq = 0.0f64;
        for (_, v) in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += crate::optim::sum_of_squares(g)?;
            }
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            // Find the culprit for the message.
            let mut bad = Vec::new();
            for (n, v) in &vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    if check_finite(step, "gradient", &[(n.clone(), g.clone())]).is_err() {
                        bad.push(n.clone());
                    }
                }
            }
            return Err(Error::NonFinite {
                step,
                what: format!("gradient norm (non-finite in {bad:?})"),
                value: norm.to_string(),
            });
        }
        let max = self.cfg.clip_grad_norm;
        if max > 0.0 && norm > max {
            let scale = max / (norm + 1e-6);
            for (_, v) in &vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    grads.insert(v.as_tensor(), (g * scale)?);
                }
            }
        }
        Ok(norm)
    }
}
