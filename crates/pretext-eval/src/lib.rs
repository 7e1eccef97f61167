//! Transfer evaluation: linear probe and kNN on frozen features, few-label
//! fine-tuning of the whole encoder, and the report (the protocols of
//! DESIGN.md), computed the same way for every paradigm.
//!
//! This crate knows features and labels, never how a paradigm trained its encoder.

pub mod collapse;
pub mod downstream;
mod error;
pub mod features;
pub mod finetune;
pub mod image_downstream;
pub mod knn;
pub mod linear;
pub mod plots;
pub mod report;
mod run_error;
pub mod tfidf;
pub mod transfer;

pub use error::{Error, Result};
pub use features::{encode_images, extract_features, Embedded, ImageEncoder};
pub use finetune::{
    classify_images, fine_tune, linear_classifier, train_classifier, ClassifierData, FineTuneConfig, FineTuneResult,
    FineTuned, ImageView, LinearHead,
};
pub use knn::{knn_accuracy, KnnConfig};
pub use linear::{LinearProbe, LinearProbeConfig};
pub use report::{evaluate_features, EvalRecord, EvalReport};
pub use run_error::{RunError, RunResult};
pub use tfidf::TfIdf;
pub use transfer::{frozen_feature_records, probe_subset, transfer_records, Init, TransferSetup};
