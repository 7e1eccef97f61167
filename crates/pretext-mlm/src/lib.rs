//! Masked language modeling: a trainable BERT encoder, the tied MLM head and
//! the masking collator.
//!
//! This crate must not depend on another paradigm crate.
