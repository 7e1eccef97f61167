//! The shared core of pretext: what every paradigm needs and nothing
//! paradigm-specific.
//!
//! - [`alloc`]: allocator tuning for training loops;
//! - [`device`]: `cpu` / `cuda:N` selection with clear errors;
//! - [`dist`]: data-parallel training: collectives (one process, threads, MPI), synchronised
//!   statistics and gathers with a backward pass;
//! - [`seed`]: one seed, counter-based random streams (init, data order,
//!   augmentation, masking), so resuming needs no generator state;
//! - [`init`]: seeded parameter initialisation ([`SeededVarMap`]);
//! - [`optim`]: AdamW, SGD (momentum, Nesterov) and LARS with state by parameter name;
//! - [`schedule`]: warmup + cosine / linear / constant learning rates as pure functions;
//! - [`ema`]: exponential moving averages of parameters (MoCo's key encoder);
//! - [`checkpoint`]: atomic safetensors checkpoints, `latest`, retention, strict loading;
//! - [`run`]: the run directory, `config.toml` and `metrics.jsonl`;
//! - [`ops`]: fast CPU kernels (NHWC convolution, batch norm, pooling) as candle custom ops;
//! - [`nn`]: trainable layers on those kernels (`Conv2d`, `BatchNorm`) with PyTorch names;
//! - [`trainer`]: the training loop ([`Trainer`], [`Method`], [`BatchSource`], [`Observer`],
//!   the epoch-end [`trainer::Monitor`]);
//! - [`paradigm`]: pretrain / resume / probe / export written once over a [`paradigm::Paradigm`].
//!
//! This crate must not know about datasets, models or losses of a particular paradigm.

pub mod alloc;
pub mod checkpoint;
pub mod cpu;
pub mod device;
pub mod dist;
pub mod ema;
mod error;
pub mod init;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod paradigm;
pub mod prefetch;
pub mod run;
pub mod schedule;
pub mod seed;
pub mod setting;
pub mod trainer;
pub mod warm_start;

pub use checkpoint::{Checkpoint, CheckpointManager, TrainerState};
pub use device::{select_device, DeviceSpec};
pub use error::{Error, Result};
pub use init::SeededVarMap;
pub use optim::{Optim, OptimConfig, OptimKind};
pub use run::{MetricsLog, RunDir};
pub use schedule::{ScheduleConfig, ScheduleKind};
pub use setting::{InvalidSetting, SettingResult};
pub use trainer::{
    BatchSource, LossLog, Method, NullObserver, Observer, Shard, StepCx, StepOut, StepReport, TrainConfig, Trainer,
};
