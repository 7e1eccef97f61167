//! `pretext-contrastive`: SimCLR and MoCo v2 pretraining of image encoders.

use clap::{Args, ValueEnum};
use pretext_cli::runner::{NoExtra, PretrainFlags};
use pretext_contrastive::Contrastive;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum MethodArg {
    /// SimCLR: NT-Xent over two augmented views of each image.
    Simclr,
    /// MoCo v2: momentum key encoder and a queue of negatives.
    Moco,
}

/// Flags of `pretrain` for this tool.
#[derive(Debug, Clone, Args)]
struct Flags {
    /// The contrastive method.
    #[arg(long, value_enum, default_value = "simclr")]
    method: MethodArg,
}

impl PretrainFlags for Flags {
    fn overrides(&self) -> Vec<String> {
        let m = match self.method {
            MethodArg::Simclr => "simclr",
            MethodArg::Moco => "moco",
        };
        vec![format!("method={m:?}")]
    }
}

fn main() -> ExitCode {
    pretext_cli::runner::main::<Contrastive, Flags, NoExtra>()
}
