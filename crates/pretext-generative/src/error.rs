//! What generative pretraining and its evaluations fail with.

/// Everything that can go wrong in this crate, by kind: the message says
/// which (`data: …` for a bad file, `config: key …` for a bad setting).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Training, checkpoints, run folders, tensors.
    #[error(transparent)]
    Core(#[from] pretext_core::Error),
    /// Data that cannot be read or used, the file named.
    #[error("data: {0}")]
    Data(pretext_data::Error),
    /// A config key whose value cannot work.
    #[error("config: {key}: {reason}")]
    Config {
        /// The key (`data.channels`).
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// A config whose keys do not hold together (the message names them).
    #[error("config: {0}")]
    Invalid(String),
    /// An evaluation this data cannot support (no labels, too few of them).
    #[error("evaluation: {0}")]
    Eval(String),
}

impl From<pretext_data::Error> for Error {
    fn from(e: pretext_data::Error) -> Self {
        match e {
            pretext_data::Error::Core(c) => Error::Core(c),
            pretext_data::Error::Candle(c) => Error::Core(c.into()),
            pretext_data::Error::Channels { found, expected } => Error::Config {
                key: "data.channels".into(),
                reason: format!("{expected}, but the data has {found} channel(s): --set data.channels={found}"),
            },
            other => Error::Data(other),
        }
    }
}

impl From<pretext_eval::Error> for Error {
    fn from(e: pretext_eval::Error) -> Self {
        match e {
            pretext_eval::Error::Core(c) => Error::Core(c),
            pretext_eval::Error::Data(d) => d.into(),
            pretext_eval::Error::Invalid(m) => Error::Eval(m),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Core(e.into())
    }
}

impl From<Error> for pretext_eval::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Core(c) => pretext_eval::Error::Core(c),
            Error::Data(d) => pretext_eval::Error::Data(d),
            other => pretext_eval::Error::Invalid(other.to_string()),
        }
    }
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;
