//! Flags shared by every paradigm's binary.

use clap::Args;
use std::path::PathBuf;

/// Flags every training command takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Config file (TOML) merged over the built-in defaults.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,

    /// Override one config key, e.g. `--set optim.lr=0.3 --set train.epochs=5`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,

    /// Device: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Seed of every random stream (same as `--set train.seed=N`).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Run folder to create (default: runs/<paradigm>-<method>-<timestamp>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// No progress bar and no progress lines.
    #[arg(long, short)]
    pub quiet: bool,

    /// More logging (same as RUST_LOG=info).
    #[arg(long, short)]
    pub verbose: bool,
}

impl CommonArgs {
    /// The `--set` overrides with `--seed` appended as `train.seed`.
    pub fn all_overrides(&self) -> Vec<String> {
        let mut v = self.overrides.clone();
        if let Some(s) = self.seed {
            v.push(format!("train.seed={s}"));
        }
        v
    }
}

/// Flags of `resume`.
#[derive(Debug, Clone, Args)]
pub struct ResumeArgs {
    /// The run folder.
    pub run: PathBuf,
    /// Device: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Flags of commands that take only a run folder (`export`).
#[derive(Debug, Clone, Args)]
pub struct RunArg {
    /// The run folder.
    pub run: PathBuf,
    /// Device: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Flags of `probe`.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// The run folder to evaluate.
    pub run: PathBuf,
    /// Label fractions to evaluate, comma separated (`1%,10%,100%` or `0.01,0.1,1`).
    #[arg(long, default_value = "1%,10%,100%", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Skip few-label fine-tuning (pretrained vs. from scratch); linear probe and kNN only.
    #[arg(long)]
    pub no_finetune: bool,
    /// Override an evaluation key of the run's config, e.g.
    /// `--set eval.finetune.budget_images=30000` or `--set eval.finetune_max_labels=0.01`. Repeatable
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Parses a label fraction: `1%` → 0.01, `0.1` → 0.1.
///
/// # Errors
/// Not a number, or outside (0, 1].
pub fn parse_fraction(s: &str) -> anyhow::Result<f64> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|x| x / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| anyhow::anyhow!("label fraction {s:?}: expected a percentage like 10% or a fraction like 0.1"))?;
    if !(v > 0.0 && v <= 1.0) {
        anyhow::bail!("label fraction {s:?}: must lie in (0, 100%]");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions() -> anyhow::Result<()> {
        assert_eq!(parse_fraction("1%")?, 0.01);
        assert_eq!(parse_fraction("100%")?, 1.0);
        assert_eq!(parse_fraction("0.1")?, 0.1);
        assert!(parse_fraction("0").is_err());
        assert!(parse_fraction("150%").is_err());
        assert!(parse_fraction("ten").is_err());
        Ok(())
    }
}
