//! `pretext-contrastive`: SimCLR and MoCo v2 pretraining of image encoders.

use clap::{Parser, Subcommand, ValueEnum};
use pretext_cli::args::{CommonArgs, ProbeArgs};
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
    Resume {
        /// The run folder.
        run: PathBuf,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Evaluate the frozen encoder: linear probe, kNN, few-label fine-tuning -> RUN/report/.
    Probe(ProbeArgs),
    /// Write the backbone, config.json and a model card for the Hub -> RUN/export/.
    Export {
        /// The run folder.
        run: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pretext_cli::run_main(|| {
        let name = match cli.command {
            Command::Pretrain { common, .. } => {
                pretext_cli::init_tracing(common.verbose);
                "pretrain"
            }
            Command::Resume { .. } => "resume",
            Command::Probe(_) => "probe",
            Command::Export { .. } => "export",
        };
        anyhow::bail!("`pretext-contrastive {name}` is not available in this build yet: contrastive training lands with the SimCLR/MoCo work (see docs/architecture.md)")
    })
}
