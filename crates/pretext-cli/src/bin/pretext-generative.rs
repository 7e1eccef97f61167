//! `pretext-generative`: VAE pretraining.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pretext_cli::args::{CommonArgs, ProbeArgs, ResumeArgs, RunArg};
use pretext_generative::{app, GenerativeConfig, DEFAULT_CONFIG};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Generative self-supervised pretraining: a variational autoencoder (VAE).
///
/// Without --data, the Fashion-MNIST copy shipped in datasets/ is used.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a VAE on unlabeled images; writes a run folder (held-out −ELBO and
    /// kNN accuracy on the posterior means after every epoch).
    Pretrain {
        /// Images: IDX files, CIFAR batches, or a folder of images (format detected).
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Continue a run from its latest checkpoint (same trajectory as uninterrupted).
    Resume(ResumeArgs),
    /// Test −ELBO and IWAE −log p(x); posterior means as features (linear probe,
    /// kNN) against a random-init encoder and raw pixels; reconstructions,
    /// samples and interpolations -> RUN/report/ (index.html, eval.json, likelihood.json, PNGs).
    Probe(ProbeArgs),
    /// Draw images from the prior -> RUN/report/samples.png.
    Sample {
        /// The run folder.
        run: PathBuf,
        /// How many images.
        #[arg(long, default_value_t = 64)]
        n: usize,
        /// Seed of the draws.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write the weights (reference names), config.json and a model card for the Hub -> RUN/export/.
    Export(RunArg),
}

fn default_out() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("generative-vae-{secs}"))
}

fn run_config(run: &Path, overrides: &[String]) -> anyhow::Result<GenerativeConfig> {
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
        Command::Pretrain { data, common } => {
            pretext_cli::init_tracing(common.verbose);
            let mut overrides = Vec::new();
            if let Some(d) = &data {
                overrides.push(format!("data.path={:?}", d.display().to_string()));
            }
            overrides.extend(common.all_overrides());
            let resolved: pretext_cli::config::Resolved<GenerativeConfig> =
                pretext_cli::config::resolve(DEFAULT_CONFIG, common.config.as_deref(), &overrides)?;
            resolved
                .config
                .validate()
                .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
            let device = pretext_core::select_device(&common.device)?;
            let out = common.out.clone().unwrap_or_else(default_out);
            let mut observer = pretext_cli::progress::ProgressObserver::new("vae", common.quiet);
            let run = app::pretrain(&resolved.config, &resolved.toml, &out, &device, &mut observer)
                .with_context(|| format!("pretraining into {}", out.display()))?;
            println!("run folder: {}", run.root().display());
            Ok(())
        }
        Command::Resume(ResumeArgs { run, quiet }) => {
            pretext_cli::init_tracing(false);
            let cfg = run_config(&run, &[])?;
            let device = pretext_core::select_device("cpu")?;
            let mut observer = pretext_cli::progress::ProgressObserver::new("vae", quiet);
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
            let device = pretext_core::select_device(&args.device)?;
            let mut observer = pretext_cli::progress::ProgressObserver::new("probe", args.quiet);
            let (report, lik) = app::probe(&args.run, &cfg, &fractions, !args.no_finetune, &device, &mut observer)
                .with_context(|| format!("probing {}", args.run.display()))?;
            println!(
                "test −ELBO {:.2} nats/image (reconstruction {:.2}, KL {:.2}); IWAE −log p(x) ≤ {:.2} (k = {})\n",
                lik.neg_elbo, lik.rec_nll, lik.kl, lik.iwae_nll, lik.iwae_samples
            );
            println!("{}", report.markdown());
            println!("report: {}", args.run.join("report").join("index.html").display());
            Ok(())
        }
        Command::Sample { run, n, seed } => {
            let cfg = run_config(&run, &[])?;
            let device = pretext_core::select_device("cpu")?;
            let path = app::sample(&run, &cfg, n, seed, &device)
                .with_context(|| format!("sampling from {}", run.display()))?;
            println!("samples: {}", path.display());
            Ok(())
        }
        Command::Export(RunArg { run }) => {
            let cfg = run_config(&run, &[])?;
            let device = pretext_core::select_device("cpu")?;
            let out = app::export(&run, &cfg, &device).with_context(|| format!("exporting {}", run.display()))?;
            println!("exported: {}", out.display());
            Ok(())
        }
    })
}
