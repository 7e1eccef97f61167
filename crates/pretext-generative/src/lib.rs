//! Generative pretraining: the variational autoencoder (ELBO, reparameterised
//! sampling, importance-weighted bounds).
//!
//! This crate must not depend on another paradigm crate.
