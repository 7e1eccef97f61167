//! Contrastive and joint-embedding pretraining of image encoders: trainable
//! ResNets, projection heads and predictors, their losses, and the methods
//! SimCLR, MoCo v2, BYOL, SimSiam, Barlow Twins, VICReg and DINO.
//!
//! Encoders run on pretext-core's fast channels-last ops; parameter names
//! follow the PyTorch modules they mirror, so exported weights load there.
//! This crate must not depend on another paradigm crate.

pub mod app;
pub mod barlow;
mod branch;
pub mod byol;
pub mod config;
pub mod dino;
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
pub mod simsiam;
pub mod trunk;
pub mod vicreg;

pub use app::Contrastive;
pub use barlow::{BarlowTwins, BarlowTwinsConfig};
pub use byol::{Byol, ByolConfig};
pub use config::{method_preset, ContrastiveConfig, DataConfig, EvalConfig, DEFAULT_CONFIG};
pub use dino::{Dino, DinoConfig};
pub use encoder::{Arch, Encoder, EncoderConfig, ResNet};
pub use error::{Error, Result};
pub use head::{DinoHead, DinoHeadConfig, HeadConfig, ProjectionHead};
pub use loss::{barlow_twins, dino_loss, info_nce, negative_cosine, normalized_mse, nt_xent, vicreg, VicRegWeights};
pub use moco::{MoCo, MoCoConfig, MomentumQueue};
pub use model::{ContrastiveModel, MethodKind, ModelConfig};
pub use simclr::SimClr;
pub use simsiam::{SimSiam, SimSiamConfig};
pub use vicreg::{VicReg, VicRegConfig};
