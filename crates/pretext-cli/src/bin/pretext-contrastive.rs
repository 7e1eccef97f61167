//! `pretext-contrastive`: SimCLR, MoCo v2, BYOL, SimSiam, Barlow Twins,
//! VICReg and DINO pretraining of image encoders.

use clap::ValueEnum;
use pretext_cli::runner::{MethodChoice, MethodFlag, NoExtra};
use pretext_contrastive::{Contrastive, MethodKind};
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum MethodArg {
    /// SimCLR: NT-Xent over two augmented views of each image (the default).
    Simclr,
    /// MoCo v2: momentum key encoder and a queue of negatives.
    Moco,
    /// BYOL: a predictor regresses a momentum target network's projection.
    Byol,
    /// SimSiam: a predictor regresses the other view through a stop-gradient.
    Simsiam,
    /// Barlow Twins: cross-correlation of the two views pulled to the identity.
    #[value(name = "barlow_twins", alias = "barlow-twins", alias = "barlow")]
    BarlowTwins,
    /// VICReg: invariance, variance and covariance terms.
    Vicreg,
    /// DINO: a student on global and local crops predicts a momentum teacher.
    Dino,
}

impl MethodArg {
    fn kind(self) -> MethodKind {
        match self {
            Self::Simclr => MethodKind::SimClr,
            Self::Moco => MethodKind::MoCo,
            Self::Byol => MethodKind::Byol,
            Self::Simsiam => MethodKind::SimSiam,
            Self::BarlowTwins => MethodKind::BarlowTwins,
            Self::Vicreg => MethodKind::VicReg,
            Self::Dino => MethodKind::Dino,
        }
    }
}

impl MethodChoice for MethodArg {
    fn config_name(&self) -> &'static str {
        self.kind().name()
    }

    fn preset(&self) -> Option<&'static str> {
        pretext_contrastive::method_preset(self.kind())
    }
}

fn main() -> ExitCode {
    pretext_cli::runner::main::<Contrastive, MethodFlag<MethodArg>, NoExtra>()
}
