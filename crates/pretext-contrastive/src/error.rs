//! What contrastive pretraining and its evaluations fail with: the run error shared by
//! every paradigm ([`pretext_eval::RunError`]).

pub use pretext_eval::RunError as Error;

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;
