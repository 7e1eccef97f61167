//! The error type of `pretext-core`.

use std::path::PathBuf;

/// Everything that can go wrong in the core crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its contents are not what they should be
    /// (truncated, corrupted, wrong format).
    #[error("{path}: {reason}")]
    Corrupt {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Loading named tensors found names missing or unexpected.
    #[error("{path}: missing {missing:?}, unexpected {unexpected:?}")]
    Keys {
        /// The file that was loaded.
        path: PathBuf,
        /// Names the model expects but the file lacks.
        missing: Vec<String>,
        /// Names the file has but the model does not expect.
        unexpected: Vec<String>,
    },

    /// Loading named tensors found a tensor whose shape or dtype differs.
    #[error("{path}: tensor {name:?} has shape {found:?} in the file, the model expects {expected:?}")]
    Shape {
        /// The file that was loaded.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// Shape (and dtype) the model expects.
        expected: String,
        /// Shape (and dtype) found in the file.
        found: String,
    },

    /// A loss, gradient or parameter became NaN or infinite.
    #[error("training diverged at step {step}: {what} is not finite ({value}); lower the learning rate or enable gradient clipping")]
    NonFinite {
        /// The step (0-based) at which it happened.
        step: u64,
        /// Which quantity (e.g. `loss`, `gradient norm`, `parameter layer.weight`).
        what: String,
        /// The offending value, as text.
        value: String,
    },

    /// A config key whose value cannot work.
    #[error("config: {0}")]
    Setting(#[from] crate::InvalidSetting),

    /// A value or state that the operation cannot use (a programming or
    /// encoding problem rather than a file's or a key's).
    #[error("config: {0}")]
    Config(String),

    /// Input data that cannot be read or used (a truncated or malformed
    /// file, an undecodable image, an empty corpus), the file named.
    #[error("data: {0}")]
    Data(String),

    /// A device was requested that this build or machine cannot provide.
    #[error("device {requested:?}: {reason}")]
    Device {
        /// What was asked for.
        requested: String,
        /// Why it cannot be provided.
        reason: String,
    },

    /// No checkpoint exists where one was expected.
    #[error("{0}: no complete checkpoint found (the run has not saved one yet)")]
    NoCheckpoint(PathBuf),
}

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Corrupt`] for `path`.
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// The result type of `pretext-core`.
pub type Result<T> = std::result::Result<T, Error>;
