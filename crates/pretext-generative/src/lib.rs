//! Generative pretraining: the variational autoencoder (ELBO, reparameterised
//! sampling, importance-weighted bounds), its pictures, and its transfer
//! evaluation through `pretext-eval`.
//!
//! This crate must not depend on another paradigm crate.

pub mod app;
pub mod config;
pub mod downstream;
pub mod error;
pub mod init;
pub mod loss;
pub mod model;
pub mod pictures;

pub use app::Generative;
pub use config::{Binarize, GenerativeConfig, DEFAULT_CONFIG};
pub use error::{Error, Result};
pub use model::{Likelihood, Vae, VaeArch, VaeConfig};
