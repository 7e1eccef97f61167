//! Learning-rate schedules as pure functions of the step.

use serde::{Deserialize, Serialize};

/// Linear warmup from 0 over `warmup` steps to `base`, then cosine decay to 0 at `total`.
///
/// `step` is 0-based: the first update uses `cosine_warmup(0, ..)` =
/// `base / warmup` (PyTorch's `LinearLR`-then-cosine convention of never
/// training with a zero rate); the last update, `step = total - 1`, uses a
/// small positive rate; `step >= total` gives 0.
pub fn cosine_warmup(step: u64, total: u64, warmup: u64, base: f64) -> f64 {
    cosine_warmup_to(step, total, warmup, base, 0.0)
}

/// [`cosine_warmup`] decaying to `min_lr` instead of 0.
pub fn cosine_warmup_to(step: u64, total: u64, warmup: u64, base: f64, min_lr: f64) -> f64 {
    if step >= total {
        return min_lr;
    }
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Linear warmup to `base` over `warmup` steps, then linear decay to 0 at `total`
/// (BERT's schedule, `transformers.get_linear_schedule_with_warmup`, with the
/// warmup shifted so the first update is not zero).
pub fn linear_warmup_decay(step: u64, total: u64, warmup: u64, base: f64) -> f64 {
    if step >= total {
        return 0.0;
    }
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    base * (total - step) as f64 / span
}

/// The constant schedule, with an optional linear warmup.
pub fn constant_warmup(step: u64, warmup: u64, base: f64) -> f64 {
    if step < warmup {
        base * (step + 1) as f64 / warmup as f64
    } else {
        base
    }
}

/// The shape of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Linear warmup then cosine decay.
    Cosine,
    /// Linear warmup then linear decay.
    Linear,
    /// Linear warmup then constant.
    Constant,
}

/// Schedule settings (the `schedule` section of a config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// `cosine`, `linear` or `constant`.
    pub kind: ScheduleKind,
    /// Warmup length in steps.
    pub warmup_steps: u64,
    /// Floor of the cosine decay, as a fraction of the base rate.
    pub min_lr_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Cosine,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
        }
    }
}

impl ScheduleConfig {
    /// Checks the fields.
    ///
    /// # Errors
    /// The bad key and why.
    pub fn validate(&self) -> crate::SettingResult {
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(crate::InvalidSetting::value(
                "schedule.min_lr_ratio",
                self.min_lr_ratio,
                "must lie in [0, 1]",
            ));
        }
        Ok(())
    }

    /// The learning rate at 0-based `step` of `total`, for base rate `base`.
    pub fn lr(&self, step: u64, total: u64, base: f64) -> f64 {
        match self.kind {
            ScheduleKind::Cosine => cosine_warmup_to(step, total, self.warmup_steps, base, base * self.min_lr_ratio),
            ScheduleKind::Linear => linear_warmup_decay(step, total, self.warmup_steps, base),
            ScheduleKind::Constant => constant_warmup(step, self.warmup_steps, base),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warmup_key_points() {
        let (total, warmup, base) = (100, 10, 0.5);
        assert!((cosine_warmup(0, total, warmup, base) - 0.05).abs() < 1e-12);
        assert!((cosine_warmup(9, total, warmup, base) - 0.5).abs() < 1e-12);
        // first step after warmup: progress 0, full rate
        assert!((cosine_warmup(10, total, warmup, base) - 0.5).abs() < 1e-12);
        // halfway through the decay: half the rate
        assert!((cosine_warmup(55, total, warmup, base) - 0.25).abs() < 1e-12);
        // last step: 0.5 * 0.5 * (1 + cos(pi * 89/90))
        let last = 0.25 * (1.0 + (std::f64::consts::PI * 89.0 / 90.0).cos());
        assert!((cosine_warmup(99, total, warmup, base) - last).abs() < 1e-12);
        assert!(cosine_warmup(99, total, warmup, base) > 0.0);
        assert_eq!(cosine_warmup(100, total, warmup, base), 0.0);
    }

    #[test]
    fn cosine_without_warmup_starts_at_base() {
        assert_eq!(cosine_warmup(0, 10, 0, 1.0), 1.0);
        let c = ScheduleConfig {
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((c.lr(10, 10, 1.0) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn linear_warmup_decay_key_points() {
        assert!((linear_warmup_decay(0, 20, 4, 1.0) - 0.25).abs() < 1e-12);
        assert!((linear_warmup_decay(3, 20, 4, 1.0) - 1.0).abs() < 1e-12);
        assert!((linear_warmup_decay(4, 20, 4, 1.0) - 1.0).abs() < 1e-12);
        assert!((linear_warmup_decay(12, 20, 4, 1.0) - 0.5).abs() < 1e-12);
        assert!((linear_warmup_decay(19, 20, 4, 1.0) - 1.0 / 16.0).abs() < 1e-12);
        assert_eq!(linear_warmup_decay(20, 20, 4, 1.0), 0.0);
    }

    #[test]
    fn constant_schedule() {
        let c = ScheduleConfig {
            kind: ScheduleKind::Constant,
            warmup_steps: 2,
            min_lr_ratio: 0.0,
        };
        assert_eq!(c.lr(0, 10, 1.0), 0.5);
        assert_eq!(c.lr(1, 10, 1.0), 1.0);
        assert_eq!(c.lr(9, 10, 1.0), 1.0);
    }

    #[test]
    fn schedules_are_monotone_after_warmup() {
        for kind in [ScheduleKind::Cosine, ScheduleKind::Linear] {
            let c = ScheduleConfig {
                kind,
                warmup_steps: 5,
                min_lr_ratio: 0.0,
            };
            let lrs: Vec<f64> = (5..50).map(|s| c.lr(s, 50, 1.0)).collect();
            assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "{kind:?}");
        }
    }
}
