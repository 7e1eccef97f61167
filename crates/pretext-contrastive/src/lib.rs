//! Contrastive pretraining of image encoders: trainable ResNets, projection
//! heads, the NT-Xent and InfoNCE losses, SimCLR and MoCo v2.
//!
//! Encoders run on pretext-core's fast channels-last ops; parameter names
//! follow the PyTorch modules they mirror, so exported weights load there.
//! This crate must not depend on another paradigm crate.

pub mod app;
pub mod config;
pub mod downstream;
pub mod encoder;
pub mod error;
pub mod export;
pub mod head;
pub mod init;
pub mod loss;
pub mod moco;
pub mod model;
pub mod simclr;
pub mod trunk;

pub use app::Contrastive;
pub use config::{ContrastiveConfig, DataConfig, EvalConfig, DEFAULT_CONFIG};
pub use encoder::{Arch, ResNet, ResNetConfig};
pub use error::{Error, Result};
pub use head::{HeadConfig, ProjectionHead};
pub use loss::{info_nce, nt_xent};
pub use moco::{MoCo, MoCoConfig, MomentumQueue};
pub use model::{ContrastiveModel, MethodKind, ModelConfig};
pub use simclr::SimClr;
