//! Transfer evaluation of frozen features: linear probe and kNN (the
//! protocols of DESIGN.md), computed the same way for every paradigm.
//!
//! This crate knows features and labels, never how a paradigm trained its encoder.

mod error;
pub mod features;
pub mod knn;
pub mod linear;
pub mod report;

pub use error::{Error, Result};
pub use features::Embedded;
pub use knn::{knn_accuracy, KnnConfig};
pub use linear::{LinearProbe, LinearProbeConfig};
pub use report::{evaluate_features, EvalRecord, EvalReport};
