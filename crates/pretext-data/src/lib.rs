//! Datasets, augmentations and batch pipelines: every paradigm reads its data
//! through this crate.
//!
//! `source` (IDX / CIFAR / image folder / text) → [`ImageDataset`] or
//! [`TextDataset`] (random access, `u8` images, optional labels) →
//! [`augment::Pipeline`] (per-sample, seeded) → [`batcher::ImageBatcher`]
//! (rayon-parallel augmentation, background prefetch) → tensors.
//!
//! This crate knows file formats and pixels, never models or losses.

pub mod augment;
pub mod batcher;
pub mod cifar;
pub mod dataset;
pub mod embeddings;
mod error;
#[cfg(feature = "vision")]
pub mod folder;
pub mod idx;
pub mod inputs;
pub mod labelled;
pub mod shipped;
pub mod source;
pub mod subset;
pub mod text;

pub use augment::{AugmentConfig, Pipeline};
pub use batcher::{BatcherConfig, ImageBatch, ImageBatcher};
pub use dataset::{ImageDataset, ImageSplits, Split, TextDataset};
pub use error::{Error, Result};
pub use inputs::Inputs;
pub use labelled::{DataSource, Labelled};
