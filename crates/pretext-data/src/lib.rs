//! Datasets, augmentations and batch pipelines: every paradigm reads its data
//! through this crate.
//!
//! This crate knows file formats and pixels, never models or losses.
