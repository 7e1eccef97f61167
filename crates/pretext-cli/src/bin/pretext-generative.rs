//! `pretext-generative`: VAE and MAE pretraining.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use pretext_cli::runner::{run_config, Extra, PretrainFlags};
use pretext_generative::{Generative, GenerativeConfig, GenerativeMethod};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum MethodArg {
    /// The variational autoencoder (the default).
    Vae,
    /// The masked autoencoder: a ViT encoder on the visible 25% of patches, a light decoder.
    Mae,
}

impl MethodArg {
    fn method(self) -> GenerativeMethod {
        match self {
            Self::Vae => GenerativeMethod::Vae,
            Self::Mae => GenerativeMethod::Mae,
        }
    }
}

/// Flags of `pretrain` for this tool.
#[derive(Debug, Clone, Args)]
struct Flags {
    /// The method, with its built-in recipe (under --config and --set).
    /// Default: the config's `method` (vae).
    #[arg(long, value_enum)]
    method: Option<MethodArg>,
}

impl PretrainFlags for Flags {
    fn overrides(&self) -> Vec<String> {
        self.method
            .map(|m| vec![format!("method={:?}", m.method().name())])
            .unwrap_or_default()
    }

    fn preset(&self) -> Option<&'static str> {
        self.method.and_then(|m| pretext_generative::method_preset(m.method()))
    }
}

/// This tool's own subcommands.
#[derive(Debug, Subcommand)]
enum Own {
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
        /// Device: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

impl Extra for Own {
    fn run(self) -> anyhow::Result<()> {
        let Own::Sample { run, n, seed, device } = self;
        let cfg: GenerativeConfig = run_config(&run, &[])?;
        let device = pretext_core::select_device(&device)?;
        let path = pretext_generative::app::sample(&run, &cfg, n, seed, &device)
            .with_context(|| format!("sampling from {}", run.display()))?;
        println!("samples: {}", path.display());
        Ok(())
    }
}

fn main() -> ExitCode {
    pretext_cli::runner::main::<Generative, Flags, Own>()
}
