//! The error of a paradigm's run (pretraining, resume, probe, export): one
//! type for every paradigm crate, which re-exports it as its `Error`.

/// Everything that can go wrong in a paradigm's run, by kind: the message says
/// which (`data: …` for a bad file, `config: key …` for a bad setting).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Training, checkpoints, run folders, tensors.
    #[error(transparent)]
    Core(pretext_core::Error),
    /// Data that cannot be read or used, the file named.
    #[error("data: {0}")]
    Data(pretext_data::Error),
    /// A config key whose value cannot work, or that does not fit another
    /// key (which the reason names).
    #[error("config: {key}: {reason}")]
    Config {
        /// The key (`data.channels`).
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// An evaluation this data cannot support (no labels, too few of them).
    #[error("evaluation: {0}")]
    Eval(String),
}

impl From<pretext_core::InvalidSetting> for RunError {
    fn from(e: pretext_core::InvalidSetting) -> Self {
        RunError::Config {
            key: e.key,
            reason: e.reason,
        }
    }
}

impl From<pretext_core::Error> for RunError {
    fn from(e: pretext_core::Error) -> Self {
        match e {
            pretext_core::Error::Setting(s) => s.into(),
            other => RunError::Core(other),
        }
    }
}

impl From<pretext_data::Error> for RunError {
    fn from(e: pretext_data::Error) -> Self {
        match e {
            pretext_data::Error::Core(c) => c.into(),
            pretext_data::Error::Candle(c) => RunError::Core(c.into()),
            pretext_data::Error::Channels { found, expected } => RunError::Config {
                key: "data.channels".into(),
                reason: format!("{expected}, but the data has {found} channel(s): --set data.channels={found}"),
            },
            other => RunError::Data(other),
        }
    }
}

impl From<crate::Error> for RunError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Core(c) => c.into(),
            crate::Error::Data(d) => d.into(),
            crate::Error::Invalid(m) => RunError::Eval(m),
        }
    }
}

impl From<candle_core::Error> for RunError {
    fn from(e: candle_core::Error) -> Self {
        RunError::Core(e.into())
    }
}

impl From<RunError> for crate::Error {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Core(c) => crate::Error::Core(c),
            RunError::Config { key, reason } => crate::Error::Core(pretext_core::InvalidSetting { key, reason }.into()),
            RunError::Data(d) => crate::Error::Data(d),
            other => crate::Error::Invalid(other.to_string()),
        }
    }
}

/// A run's result.
pub type RunResult<T> = std::result::Result<T, RunError>;
