//! One command-line runner for every paradigm: `pretrain`, `resume`,
//! `probe` and `export` are written here once over a [`Tool`] (a
//! [`Paradigm`] with its built-in config and help texts); each binary adds
//! only its own subcommands (`sample`, `fill-mask`, `tokenizer`).

use crate::args::{CommonArgs, ProbeArgs, ResumeArgs, RunArg};
use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use pretext_core::paradigm::{self, Paradigm};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A paradigm as a command-line tool.
pub trait Tool: Paradigm
where
    Self::Config: DeserializeOwned + Serialize,
    Self::Error: std::error::Error + Send + Sync + 'static,
{
    /// The binary's name (`pretext-contrastive`).
    const BIN: &'static str;
    /// The built-in config (TOML) that `--config` and `--set` change.
    const DEFAULT_CONFIG: &'static str;
    /// One line on what the tool does (`--help`'s first line).
    const ABOUT: &'static str;
    /// What `--help` adds below it.
    const LONG_ABOUT: &'static str;
    /// Help of `pretrain`.
    const PRETRAIN_HELP: &'static str;
    /// Help of `probe`.
    const PROBE_HELP: &'static str;
    /// Help of `export`.
    const EXPORT_HELP: &'static str;

    /// The label of progress lines and of default run folders (`simclr`).
    fn label(cfg: &Self::Config) -> String;
}

/// Flags of `pretrain` that belong to one paradigm (`--method`), as config overrides.
pub trait PretrainFlags: Args {
    /// The overrides these flags stand for (`method="moco"`).
    fn overrides(&self) -> Vec<String>;
}

/// A paradigm without flags of its own.
#[derive(Debug, Clone, Args)]
pub struct NoFlags {}

impl PretrainFlags for NoFlags {
    fn overrides(&self) -> Vec<String> {
        vec![]
    }
}

/// A binary's own subcommands, run after the shared ones are parsed.
pub trait Extra: Subcommand {
    /// Runs the subcommand.
    ///
    /// # Errors
    /// Whatever it fails with, with context.
    fn run(self) -> anyhow::Result<()>;
}

/// No subcommands of its own.
#[derive(Debug, Clone, Subcommand)]
pub enum NoExtra {}

impl Extra for NoExtra {
    fn run(self) -> anyhow::Result<()> {
        match self {}
    }
}

/// The shared subcommands, plus the binary's own.
#[allow(missing_docs)] // doc comments here would become `--help` text
#[derive(Debug, Subcommand)]
pub enum Command<F: PretrainFlags, X: Extra> {
    /// Pretrain on unlabeled data; writes a run folder.
    Pretrain {
        /// The data: images (IDX, CIFAR batches, a folder) or text (fortunes,
        /// .txt, .jsonl, .parquet), format detected; default: the shipped data.
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        #[command(flatten)]
        flags: F,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Continue a run from its latest checkpoint (same trajectory as uninterrupted).
    Resume(ResumeArgs),
    /// Evaluate the pretrained model against baselines -> RUN/report/.
    Probe(ProbeArgs),
    /// Write the model for the Python ecosystem and the Hub -> RUN/export/.
    Export(RunArg),
    #[command(flatten)]
    Extra(X),
}

#[derive(Debug, Parser)]
#[command(version)]
struct Cli<F: PretrainFlags, X: Extra> {
    #[command(subcommand)]
    command: Command<F, X>,
}

/// The config of the run in `run`, with `overrides` applied.
///
/// # Errors
/// Not a run folder; an unparsable config or override.
pub fn run_config<T: DeserializeOwned + Serialize>(run: &Path, overrides: &[String]) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(run.join("config.toml"))
        .with_context(|| format!("{} is not a run folder (no config.toml)", run.display()))?;
    Ok(crate::config::resolve(&text, None, overrides)
        .with_context(|| format!("parsing {}/config.toml", run.display()))?
        .config)
}

/// The config (with `overrides`) and the device of a command on the existing
/// run `run`.
fn existing_run<T: DeserializeOwned + Serialize>(
    run: &Path,
    overrides: &[String],
    device: &str,
) -> anyhow::Result<(T, candle_core::Device)> {
    crate::init_tracing(false);
    let cfg = run_config(run, overrides)?;
    Ok((cfg, pretext_core::select_device(device)?))
}

fn default_out(name: &str, label: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{name}-{label}-{secs}"))
}

/// Parses the command line and runs the tool `P` with pretrain flags `F`
/// and extra subcommands `X`; the `main` of every binary.
pub fn main<P, F, X>() -> ExitCode
where
    P: Tool,
    P::Config: DeserializeOwned + Serialize,
    P::Error: std::error::Error + Send + Sync + 'static,
    F: PretrainFlags,
    X: Extra,
{
    pretext_core::alloc::keep_freed_memory();
    let mut cmd = Cli::<F, X>::command()
        .name(P::BIN)
        .about(P::ABOUT)
        .long_about(format!("{}\n\n{}", P::ABOUT, P::LONG_ABOUT))
        .mut_subcommand("pretrain", |c| c.about(P::PRETRAIN_HELP))
        .mut_subcommand("probe", |c| {
            let c = c.about(P::PROBE_HELP);
            if P::FINETUNES {
                c
            } else {
                c.mut_arg("no_finetune", |a| a.hide(true))
            }
        })
        .mut_subcommand("export", |c| c.about(P::EXPORT_HELP));
    let matches = cmd.get_matches_mut();
    let cli = match Cli::<F, X>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.format(&mut cmd).exit(),
    };
    crate::run_main(|| run::<P, F, X>(cli.command))
}

fn run<P, F, X>(command: Command<F, X>) -> anyhow::Result<()>
where
    P: Tool,
    P::Config: DeserializeOwned + Serialize,
    P::Error: std::error::Error + Send + Sync + 'static,
    F: PretrainFlags,
    X: Extra,
{
    // A kernel request this CPU cannot honour stops the tool before any work.
    pretext_core::cpu::KernelSet::from_env().context("environment")?;
    match command {
        Command::Pretrain { data, flags, common } => {
            crate::init_tracing(common.verbose);
            let mut overrides = flags.overrides();
            if let Some(d) = &data {
                overrides.push(format!("data.path={:?}", d.display().to_string()));
            }
            overrides.extend(common.all_overrides());
            let resolved: crate::config::Resolved<P::Config> =
                crate::config::resolve(P::DEFAULT_CONFIG, common.config.as_deref(), &overrides)?;
            P::validate(&resolved.config)?;
            let device = pretext_core::select_device(&common.device)?;
            let label = P::label(&resolved.config);
            let out = common.out.clone().unwrap_or_else(|| default_out(P::NAME, &label));
            let mut observer = observer(&label, common.quiet);
            let run = paradigm::pretrain::<P>(&resolved.config, &resolved.toml, &out, &device, &mut observer)
                .with_context(|| format!("pretraining into {}", out.display()))?;
            println!("run folder: {}", run.root().display());
        }
        Command::Resume(ResumeArgs { run, device, quiet }) => {
            let (cfg, device) = existing_run::<P::Config>(&run, &[], &device)?;
            let mut observer = observer(&P::label(&cfg), quiet);
            paradigm::resume::<P>(&run, &cfg, &device, &mut observer)
                .with_context(|| format!("resuming {}", run.display()))?;
            println!("run folder: {}", run.display());
        }
        Command::Probe(args) => {
            if args.no_finetune && !P::FINETUNES {
                anyhow::bail!("probe --no-finetune: pretext-{} probes without fine-tuning", P::NAME);
            }
            let fractions = args
                .labels
                .iter()
                .map(|l| crate::args::parse_fraction(l))
                .collect::<anyhow::Result<Vec<f64>>>()?;
            if let Some(bad) = args.overrides.iter().find(|o| !o.trim_start().starts_with("eval.")) {
                anyhow::bail!("probe --set {bad:?}: only eval.* keys can change after pretraining");
            }
            let (cfg, device) = existing_run::<P::Config>(&args.run, &args.overrides, &args.device)?;
            let mut observer = crate::progress::ProgressObserver::new("probe", args.quiet);
            let summary = paradigm::probe::<P>(&args.run, &cfg, &fractions, !args.no_finetune, &device, &mut observer)
                .with_context(|| format!("probing {}", args.run.display()))?;
            println!("{summary}");
        }
        Command::Export(RunArg { run, device }) => {
            let (cfg, device) = existing_run::<P::Config>(&run, &[], &device)?;
            let out =
                paradigm::export::<P>(&run, &cfg, &device).with_context(|| format!("exporting {}", run.display()))?;
            println!("exported: {}", out.display());
        }
        Command::Extra(x) => x.run()?,
    }
    Ok(())
}

fn observer(label: &str, quiet: bool) -> crate::progress::ProgressObserver {
    crate::progress::ProgressObserver::new(label, quiet)
}
