//! `pretext-contrastive`: SimCLR and MoCo v2 pretraining of image encoders.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pretext_cli::args::{CommonArgs, ProbeArgs, ResumeArgs, RunArg};
use pretext_contrastive::{app, ContrastiveConfig, DEFAULT_CONFIG};
use std::path::PathBuf;
use std::process::ExitCode;

/// Contrastive self-supervised pretraining of image encoders (SimCLR, MoCo v2).
///
/// Without --data, the Fashion-MNIST copy shipped in datasets/ is used.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    /// SimCLR: NT-Xent over two augmented views of each image.
    Simclr,
    /// MoCo v2: momentum key encoder and a queue of negatives.
    Moco,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain an encoder on unlabeled images; writes a run folder.
    Pretrain {
        /// The contrastive method.
        #[arg(long, value_enum, default_value = "simclr")]
        method: MethodArg,
        /// Images: IDX files, CIFAR batches, or a folder of images (format detected).
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Continue a run from its latest checkpoint (same trajectory as uninterrupted).
    Resume(ResumeArgs),
    /// Evaluate the encoder against a random-init encoder and raw pixels: linear
    /// probe and kNN at each label fraction, fine-tuning vs. supervised from
    /// scratch at 1% and 10% -> RUN/report/ (eval.json, eval.md, PNG plots, index.html).
    Probe(ProbeArgs),
    /// Write the backbone (model.safetensors, PyTorch names), config.json and a
    /// model card (README.md) for the Hub -> RUN/export/.
    Export(RunArg),
}

fn default_out(method: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("contrastive-{method}-{secs}"))
}

fn main() -> ExitCode {
    pretext_core::alloc::keep_freed_memory();
    let cli = Cli::parse();
    pretext_cli::run_main(|| match cli.command {
        Command::Pretrain { method, data, common } => {
            pretext_cli::init_tracing(common.verbose);
            let method = match method {
                MethodArg::Simclr => "simclr",
                MethodArg::Moco => "moco",
            };
            let mut overrides = vec![format!("method={method:?}")];
            if let Some(d) = &data {
                overrides.push(format!("data.path={:?}", d.display().to_string()));
            }
            overrides.extend(common.all_overrides());
            let resolved: pretext_cli::config::Resolved<ContrastiveConfig> =
                pretext_cli::config::resolve(DEFAULT_CONFIG, common.config.as_deref(), &overrides)?;
            resolved
                .config
                .validate()
                .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
            let device = pretext_core::select_device(&common.device)?;
            let out = common.out.clone().unwrap_or_else(|| default_out(method));
            let mut observer = pretext_cli::progress::ProgressObserver::new(method, common.quiet);
            let run = app::pretrain(&resolved.config, &resolved.toml, &out, &device, &mut observer)
                .with_context(|| format!("pretraining into {}", out.display()))?;
            println!("run folder: {}", run.root().display());
            Ok(())
        }
        Command::Resume(ResumeArgs { run, quiet }) => {
            pretext_cli::init_tracing(false);
            let text = std::fs::read_to_string(run.join("config.toml"))
                .with_context(|| format!("{} is not a run folder (no config.toml)", run.display()))?;
            let cfg: ContrastiveConfig =
                toml::from_str(&text).with_context(|| format!("parsing {}/config.toml", run.display()))?;
            let device = pretext_core::select_device("cpu")?;
            let mut observer = pretext_cli::progress::ProgressObserver::new(&cfg.method, quiet);
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
            let text = std::fs::read_to_string(args.run.join("config.toml"))
                .with_context(|| format!("{} is not a run folder (no config.toml)", args.run.display()))?;
            let cfg: ContrastiveConfig = pretext_cli::config::resolve(&text, None, &args.overrides)
                .with_context(|| format!("parsing {}/config.toml", args.run.display()))?
                .config;
            let device = pretext_core::select_device(&args.device)?;
            let mut observer = pretext_cli::progress::ProgressObserver::new("probe", args.quiet);
            let report = app::probe(&args.run, &cfg, &fractions, !args.no_finetune, &device, &mut observer)
                .with_context(|| format!("probing {}", args.run.display()))?;
            println!("{}", report.markdown());
            println!("report: {}", args.run.join("report").display());
            Ok(())
        }
        Command::Export(RunArg { run }) => {
            pretext_cli::init_tracing(false);
            let text = std::fs::read_to_string(run.join("config.toml"))
                .with_context(|| format!("{} is not a run folder (no config.toml)", run.display()))?;
            let cfg: ContrastiveConfig =
                toml::from_str(&text).with_context(|| format!("parsing {}/config.toml", run.display()))?;
            let device = pretext_core::select_device("cpu")?;
            let out = pretext_contrastive::export::export(&run, &cfg, &device)
                .with_context(|| format!("exporting {}", run.display()))?;
            println!("exported: {}", out.display());
            Ok(())
        }
    })
}
