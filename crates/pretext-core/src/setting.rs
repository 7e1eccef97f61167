//! A configuration key whose value cannot work, as a value: which key, and
//! why. Every config's `validate` returns it, so the message a user reads is
//! `config: <key>: <reason>` and code can tell which key without reading text.

/// A config key whose value cannot work (or that does not fit another key,
/// which the reason names).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct InvalidSetting {
    /// The dotted key (`train.batch_size`, `data.augment.flip_p`).
    pub key: String,
    /// What is wrong with its value, and what would work.
    pub reason: String,
}

impl InvalidSetting {
    /// `key` is wrong because of `reason`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// `key` has `value`, which breaks `rule` (`must be > 0`): the reason
    /// reads `must be > 0, not 0`.
    pub fn value(key: impl Into<String>, value: impl std::fmt::Display, rule: &str) -> Self {
        Self::new(key, format!("{rule}, not {value}"))
    }
}

/// The result of a config's validation.
pub type SettingResult = std::result::Result<(), InvalidSetting>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_key_then_the_reason() {
        let e = InvalidSetting::value("train.batch_size", 0, "must be > 0");
        assert_eq!(e.key, "train.batch_size");
        assert_eq!(e.to_string(), "train.batch_size: must be > 0, not 0");
        let e = crate::Error::from(InvalidSetting::new("optim.lr", "must be finite"));
        assert_eq!(e.to_string(), "config: optim.lr: must be finite");
    }
}
