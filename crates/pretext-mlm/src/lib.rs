//! Masked language modeling: a WordPiece tokenizer trained on the corpus, a
//! trainable BERT encoder with the tied MLM head (Hugging Face
//! `BertForMaskedLM` names), the masking collator, training through the core
//! loop, held-out masked-token accuracy, transfer through `pretext-eval`,
//! fill-mask and export in the Hugging Face layout.
//!
//! This crate must not depend on another paradigm crate.

pub mod app;
pub mod classifier;
pub mod collator;
pub mod config;
pub mod corpus;
pub mod downstream;
pub mod error;
pub mod export;
pub mod init;
pub mod model;
pub mod tokenizer;

pub use app::Mlm;
pub use collator::{MaskingConfig, MlmBatch, MlmBatcher, Packing, SpecialIds};
pub use config::MlmConfig;
pub use error::{Error, Result};
pub use model::{BertDims, BertMlm};
pub use tokenizer::WordPieceTokenizer;
