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
    /// Labelled data to evaluate on instead of the run's own (any format
    /// `pretrain --data` reads). Its own train/test split is used where it
    /// has one (IDX t10k, CIFAR test_batch, train/ + test/ folders, a `split`
    /// field); otherwise a seeded, stratified 20% is the test set.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Label fractions to evaluate, comma separated (`1%,10%,100%` or `0.01,0.1,1`).
    #[arg(long, default_value = "1%,10%,100%", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Skip few-label fine-tuning (pretrained vs. from scratch); linear probe and kNN only.
    #[arg(long)]
    pub no_finetune: bool,
    /// Override an evaluation key of the run's config, e.g.
    /// `--set eval.finetune.budget_images=30000` or `--set eval.finetune_max_labels=0.01`;
    /// with `--data`, also how to read that data: `data.format`,
    /// `data.text_field`, `data.label_field`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Flags of `embed`.
#[derive(Debug, Clone, Args)]
pub struct EmbedArgs {
    /// The run folder whose encoder embeds.
    pub run: PathBuf,
    /// The data to embed, labelled or not (any format `pretrain --data`
    /// reads; every record of every split); default: the run's own data.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Output file; its extension picks the format unless `--format` does
    /// (default: RUN/embeddings/<data name>.parquet).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// `parquet` (columns row, id, label, embedding), `npy` (an n×d float32
    /// array, rows in <name>.rows.jsonl) or `jsonl`.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// How to read the data: `data.format`, `data.text_field`, `data.label_field`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The file formats of `embed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// Apache Parquet.
    Parquet,
    /// NumPy `.npy`.
    Npy,
    /// JSON lines.
    Jsonl,
}

/// Flags of `finetune`.
#[derive(Debug, Clone, Args)]
pub struct FinetuneArgs {
    /// The run folder whose encoder is fine-tuned (or give --init).
    #[arg(conflicts_with = "init")]
    pub run: Option<PathBuf>,
    /// Fine-tune existing weights instead of a run's: a run or export
    /// folder, a Hugging Face BERT folder, torchvision ResNet-18 or timm
    /// ViT weights (.safetensors), or hub:owner/name[@revision].
    #[arg(long, value_name = "SOURCE")]
    pub init: Option<String>,
    /// Labelled data: its own train/test split where it has one (IDX t10k,
    /// CIFAR test_batch, train/ + test/ folders, a `split` field, whose
    /// `validation` records are the validation split), otherwise a seeded,
    /// stratified 20% is the test set.
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// How many training labels: `1%`, `0.1`, `100%`, or `N/class`.
    #[arg(long, default_value = "100%")]
    pub labels: String,
    /// Keep the encoder frozen: train only a linear layer on its features
    /// (text: the pooler and classifier).
    #[arg(long)]
    pub frozen: bool,
    /// Also fine-tune the same architecture from a random initialisation
    /// with the same recipe and labels, as a baseline (twice the time).
    #[arg(long)]
    pub scratch: bool,
    /// Share of the chosen labels held out to pick the epoch kept (the
    /// data's own validation split wins when it has one); `0` trains on
    /// every label and keeps the last epoch (the probe's protocol); `auto`
    /// holds out 10% when that makes at least 500 records, else 0 (a small
    /// validation split picks epochs by noise).
    #[arg(long, default_value = "auto", value_name = "auto|FRACTION")]
    pub validation: String,
    /// Seed of the label subset, the validation split, the head and the
    /// training order (default: the run's seed); repeat with others to see
    /// the spread.
    #[arg(long)]
    pub seed: Option<u64>,
    /// The classifier folder to write (default: RUN/classifiers/<data
    /// name>-<labels>, or classifiers/<data name>-<labels> with --init).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Change the recipe (`eval.finetune.*`) or how the data is read
    /// (`data.format`, `data.text_field`, `data.label_field`). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Flags of `predict`.
#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    /// A classifier folder written by `finetune`.
    pub classifier: PathBuf,
    /// The data to classify, labelled or not (every record of every split).
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// Output file (JSON lines: row, id, label, probability, probabilities,
    /// and true_label for labelled data); default: standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// How to read the data: `data.format`, `data.text_field`, `data.label_field`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// A file-name-safe form of a data path's last component (`photos`, `reviews`).
pub fn data_name(path: &std::path::Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "data".into()
    } else {
        clean
    }
}

/// The `--set` keys that describe data given with `--data` to a command on
/// an existing run (how to read it, not how the run was trained).
pub const DATA_READ_KEYS: [&str; 3] = ["data.format", "data.text_field", "data.label_field"];

/// The overrides of a command on an existing run: `eval.*` keys, and with
/// `--data` the keys of [`DATA_READ_KEYS`] (`data.format` starts at `auto`
/// for that data).
///
/// # Errors
/// Any other key, named.
pub fn existing_run_overrides(
    command: &str,
    data: Option<&std::path::Path>,
    overrides: &[String],
) -> anyhow::Result<Vec<String>> {
    let key = |o: &str| o.split('=').next().unwrap_or_default().trim().to_string();
    for o in overrides {
        let k = key(o);
        let allowed = k.starts_with("eval.") || (data.is_some() && DATA_READ_KEYS.contains(&k.as_str()));
        if !allowed {
            let with_data = if data.is_some() {
                format!(" and {}", DATA_READ_KEYS.join(", "))
            } else {
                format!(" (and, with --data, {})", DATA_READ_KEYS.join(", "))
            };
            anyhow::bail!("{command} --set {o:?}: only eval.* keys{with_data} can change after pretraining");
        }
    }
    let mut out = Vec::new();
    if let Some(d) = data {
        out.push(format!("data.path={:?}", d.display().to_string()));
        out.push("data.format=\"auto\"".to_string());
    }
    out.extend(overrides.iter().cloned());
    Ok(out)
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
