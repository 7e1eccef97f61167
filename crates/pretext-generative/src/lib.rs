//! Generative pretraining: the variational autoencoder (ELBO, reparameterised
//! sampling, importance-weighted bounds) and the masked autoencoder on a
//! Vision Transformer, their pictures, and their transfer evaluation through
//! `pretext-eval`.
//!
//! This crate must not depend on another paradigm crate.

pub mod app;
pub mod config;
pub mod downstream;
pub mod error;
pub mod init;
pub mod loss;
pub mod mae;
pub mod method;
pub mod model;
pub mod pictures;

pub use app::Generative;
pub use config::{method_preset, Binarize, GenerativeConfig, DEFAULT_CONFIG};
pub use error::{Error, Result};
pub use mae::{Mae, MaeConfig, Masking};
pub use method::{GenerativeMethod, GenerativeModel};
pub use model::{Likelihood, Vae, VaeArch, VaeConfig};
