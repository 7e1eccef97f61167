//! The error type of `pretext-data`.

use std::path::PathBuf;

/// Everything that can go wrong reading or preparing data. Every variant
/// about a file names it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A core error (tensor creation, seeding).
    #[error(transparent)]
    Core(#[from] pretext_core::Error),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// The file was read but its contents are wrong (truncated, wrong magic,
    /// undecodable image, not JSON, missing field, not UTF-8...).
    #[error("{path}{}: {reason}", location.as_ref().map(|l| format!(" ({l})")).unwrap_or_default())]
    Format {
        /// The file.
        path: PathBuf,
        /// Line, record or entry inside the file, if it applies.
        location: Option<String>,
        /// What is wrong.
        reason: String,
    },

    /// A shipped dataset file is missing or differs from its recorded checksum.
    #[error("{path}: {reason}")]
    Shipped {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The images have another channel count than the config says.
    #[error("the data has {found} channel(s) but data.channels = {expected} (set --set data.channels={found})")]
    Channels {
        /// Channels of the images.
        found: usize,
        /// `data.channels`.
        expected: usize,
    },

    /// A data source or setting is invalid (empty corpus, unknown format, ...).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error on `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            location: None,
            reason: reason.into(),
        }
    }

    /// A format error at `location` (e.g. `line 12`) of `path`.
    pub fn format_at(path: impl Into<PathBuf>, location: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            location: Some(location.into()),
            reason: reason.into(),
        }
    }
}

impl From<Error> for pretext_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Core(c) => c,
            Error::Candle(c) => pretext_core::Error::Candle(c),
            other => pretext_core::Error::Data(other.to_string()),
        }
    }
}

/// The result type of `pretext-data`.
pub type Result<T> = std::result::Result<T, Error>;
