//! The error type of `pretext-eval`.

/// What can go wrong in an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A core error.
    #[error(transparent)]
    Core(#[from] pretext_core::Error),
    /// A data error.
    #[error(transparent)]
    Data(#[from] pretext_data::Error),
    /// Inputs that cannot be evaluated (empty, mismatched sizes, no labels).
    #[error("{0}")]
    Invalid(String),
}

/// The result type of `pretext-eval`.
pub type Result<T> = std::result::Result<T, Error>;
