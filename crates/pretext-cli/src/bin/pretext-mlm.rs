//! `pretext-mlm`: BERT-style masked language modeling.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pretext_cli::args::{CommonArgs, ResumeArgs, RunArg};
use pretext_mlm::{app, config::DEFAULT_CONFIG, MlmConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Masked language modeling: BERT-style pretraining with a WordPiece tokenizer trained on the corpus.
///
/// Without --data, the fortunes corpus shipped in datasets/ is used: the model
/// pretrains on every fortune except the probe task's test entries, and the
/// probe classifies fortunes of 8 categories (computers, science, politics,
/// love, food, sports, law, medicine) from frozen features.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a WordPiece tokenizer on a corpus -> DIR/tokenizer.json + DIR/vocab.txt.
    Train {
        /// Text: fortune files, .txt, .jsonl or .parquet (format detected); default: the shipped fortunes.
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        /// Vocabulary size (special tokens included).
        #[arg(long, default_value_t = 8000)]
        vocab_size: usize,
        /// Pieces seen fewer times are left out.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// Output folder.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Flags of `probe`.
#[derive(Debug, Clone, clap::Args)]
struct MlmProbeArgs {
    /// The run folder to evaluate.
    run: PathBuf,
    /// Label fractions to evaluate, comma separated (`1%,10%,100%` or `0.01,0.1,1`).
    #[arg(long, default_value = "1%,10%,100%", value_delimiter = ',')]
    labels: Vec<String>,
    /// Override an evaluation key of the run's config, e.g. `--set eval.pooling="cls"`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Pretrain a BERT encoder with the MLM objective; writes a run folder
    /// (tokenizer/, checkpoints, metrics.jsonl with held-out masked-token accuracy).
    Pretrain {
        /// Text: fortune files, .txt, .jsonl or .parquet (format detected).
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Continue a run from its latest checkpoint (same trajectory as uninterrupted).
    Resume(ResumeArgs),
    /// Held-out masked-token accuracy; frozen sentence features (linear probe,
    /// kNN) against a random-init model and TF-IDF -> RUN/report/ (index.html, eval.json, PNGs).
    Probe(MlmProbeArgs),
    /// Predict the [MASK] tokens of a sentence (top-k).
    FillMask {
        /// The run folder.
        run: PathBuf,
        /// Text containing [MASK], e.g. "the [MASK] is mightier than the sword."
        text: String,
        /// How many candidates per mask.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
    },
    /// Write the Hugging Face layout (config.json, model.safetensors, tokenizer files, model card) -> RUN/export/.
    Export(RunArg),
}

fn default_out() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("mlm-bert-{secs}"))
}

fn run_config(run: &Path, overrides: &[String]) -> anyhow::Result<MlmConfig> {
    let text = std::fs::read_to_string(run.join("config.toml"))
        .with_context(|| format!("{} is not a run folder (no config.toml)", run.display()))?;
    Ok(pretext_cli::config::resolve(&text, None, overrides)
        .with_context(|| format!("parsing {}/config.toml", run.display()))?
        .config)
}

fn main() -> ExitCode {
    pretext_core::alloc::keep_freed_memory();
    let cli = Cli::parse();
    pretext_cli::run_main(|| match cli.command {
        Command::Tokenizer(TokenizerCommand::Train {
            data,
            vocab_size,
            min_frequency,
            out,
        }) => {
            let mut overrides = vec![
                format!("tokenizer.vocab_size={vocab_size}"),
                format!("tokenizer.min_frequency={min_frequency}"),
            ];
            if let Some(d) = &data {
                overrides.push(format!("data.path={:?}", d.display().to_string()));
            }
            let resolved: pretext_cli::config::Resolved<MlmConfig> =
                pretext_cli::config::resolve(DEFAULT_CONFIG, None, &overrides)?;
            let tok = app::train_tokenizer(&resolved.config, &out)
                .with_context(|| format!("training a tokenizer into {}", out.display()))?;
            println!(
                "tokenizer: {} tokens -> {}, {}",
                tok.vocab_size(),
                out.join("tokenizer.json").display(),
                out.join("vocab.txt").display()
            );
            Ok(())
        }
        Command::Pretrain { data, common } => {
            pretext_cli::init_tracing(common.verbose);
            let mut overrides = Vec::new();
            if let Some(d) = &data {
                overrides.push(format!("data.path={:?}", d.display().to_string()));
            }
            overrides.extend(common.all_overrides());
            let resolved: pretext_cli::config::Resolved<MlmConfig> =
                pretext_cli::config::resolve(DEFAULT_CONFIG, common.config.as_deref(), &overrides)?;
            resolved
                .config
                .validate()
                .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
            let device = pretext_core::select_device(&common.device)?;
            let out = common.out.clone().unwrap_or_else(default_out);
            let mut observer = pretext_cli::progress::ProgressObserver::new("mlm", common.quiet);
            let run = app::pretrain(&resolved.config, &resolved.toml, &out, &device, &mut observer)
                .with_context(|| format!("pretraining into {}", out.display()))?;
            println!("run folder: {}", run.root().display());
            Ok(())
        }
        Command::Resume(ResumeArgs { run, quiet }) => {
            pretext_cli::init_tracing(false);
            let cfg = run_config(&run, &[])?;
            let device = pretext_core::select_device("cpu")?;
            let mut observer = pretext_cli::progress::ProgressObserver::new("mlm", quiet);
            app::resume(&run, &cfg, &device, &mut observer).with_context(|| format!("resuming {}", run.display()))?;
            println!("run folder: {}", run.display());
            Ok(())
        }
        Command::Probe(args) => {
            pretext_cli::init_tracing(false);
            let fractions = args
                .labels
                .iter()
                .map(|l| pretext_cli::args::parse_fraction(l))
                .collect::<anyhow::Result<Vec<f64>>>()?;
            if let Some(bad) = args.overrides.iter().find(|o| !o.trim_start().starts_with("eval.")) {
                anyhow::bail!("probe --set {bad:?}: only eval.* keys can change after pretraining");
            }
            let cfg = run_config(&args.run, &args.overrides)?;
            cfg.validate().map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
            let device = pretext_core::select_device(&args.device)?;
            let mut observer = pretext_cli::progress::ProgressObserver::new("probe", args.quiet);
            let (report, mlm, random) = app::probe(&args.run, &cfg, &fractions, &device, &mut observer)
                .with_context(|| format!("probing {}", args.run.display()))?;
            println!(
                "held-out masked-token accuracy {:.2}% (perplexity {:.1}); random init {:.2}%\n",
                mlm.accuracy * 100.0,
                mlm.perplexity,
                random.accuracy * 100.0
            );
            println!("{}", report.markdown());
            println!("report: {}", args.run.join("report").join("index.html").display());
            Ok(())
        }
        Command::FillMask { run, text, top_k } => {
            let cfg = run_config(&run, &[])?;
            let device = pretext_core::select_device("cpu")?;
            let preds = app::fill_mask(&run, &cfg, &text, top_k, &device)
                .with_context(|| format!("fill-mask with {}", run.display()))?;
            for (i, p) in preds.iter().enumerate() {
                println!("[MASK] #{} (token {}):", i + 1, p.position);
                for (tok, prob) in &p.candidates {
                    println!("  {tok:<20} {:6.2}%", prob * 100.0);
                }
            }
            Ok(())
        }
        Command::Export(RunArg { run }) => {
            let cfg = run_config(&run, &[])?;
            let device = pretext_core::select_device("cpu")?;
            let out = pretext_mlm::export::export(&run, &cfg, &device)
                .with_context(|| format!("exporting {}", run.display()))?;
            println!("exported: {}", out.display());
            Ok(())
        }
    })
}
