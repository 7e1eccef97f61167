//! `pretext-generative`: VAE and MAE pretraining.

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use pretext_cli::runner::{run_config, Extra, MethodChoice, MethodFlag};
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

impl MethodChoice for MethodArg {
    fn config_name(&self) -> &'static str {
        self.method().name()
    }

    fn preset(&self) -> Option<&'static str> {
        pretext_generative::method_preset(self.method())
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
    pretext_cli::runner::main::<Generative, MethodFlag<MethodArg>, Own>()
}
