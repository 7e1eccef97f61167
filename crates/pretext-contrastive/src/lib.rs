//! Contrastive pretraining of image encoders: trainable ResNets, projection
//! heads, SimCLR (NT-Xent) and MoCo v2 (momentum encoder, queue).
//!
//! This crate must not depend on another paradigm crate.
