//! Transfer evaluation of frozen features: linear probe, kNN, few-label
//! fine-tuning, and the reports (JSON, Markdown, plots) every paradigm shares.
//!
//! This crate knows features and labels, never how a paradigm trained its encoder.
