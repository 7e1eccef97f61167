//! The `model` section and the model of a contrastive (or, for BYOL,
//! SimSiam, Barlow Twins and VICReg, joint-embedding) run, behind one type
//! the trainer, the monitor and the evaluation share.

use crate::barlow::{BarlowTwins, BarlowTwinsConfig};
use crate::byol::{Byol, ByolConfig};
use crate::dino::{Dino, DinoConfig};
use crate::encoder::{Encoder, EncoderConfig};
use crate::head::{HeadConfig, ProjectionHead};
use crate::moco::{MoCo, MoCoConfig};
use crate::simclr::SimClr;
use crate::simsiam::{SimSiam, SimSiamConfig};
use crate::vicreg::{VicReg, VicRegConfig};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use pretext_core::init::named_vars;
use pretext_core::nn::Builders;
use pretext_core::trainer::{Method, StepCx, StepOut};
use pretext_core::SeededVarMap;
use pretext_data::ImageBatch;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The `model` section: encoder, projection head and loss settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The encoder.
    pub encoder: EncoderConfig,
    /// The projection head (`input` is set from the encoder).
    pub head: HeadConfig,
    /// SimCLR's NT-Xent temperature.
    pub temperature: f64,
    /// MoCo v2 settings.
    pub moco: MoCoConfig,
    /// BYOL settings.
    pub byol: ByolConfig,
    /// SimSiam settings.
    pub simsiam: SimSiamConfig,
    /// Barlow Twins settings.
    pub barlow_twins: BarlowTwinsConfig,
    /// VICReg settings.
    pub vicreg: VicRegConfig,
    /// DINO settings.
    pub dino: DinoConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            encoder: EncoderConfig::default(),
            head: HeadConfig::default(),
            temperature: 0.5,
            moco: MoCoConfig::default(),
            byol: ByolConfig::default(),
            simsiam: SimSiamConfig::default(),
            barlow_twins: BarlowTwinsConfig::default(),
            vicreg: VicRegConfig::default(),
            dino: DinoConfig::default(),
        }
    }
}

/// Parameters (from the `init` stream of `seed`), buffers, encoder
/// (`encoder.*`) and projection head (`head.*`).
///
/// # Errors
/// An invalid config.
pub(crate) fn build_encoder_and_head(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
) -> candle_core::Result<(SeededVarMap, VarMap, Encoder, ProjectionHead)> {
    build_encoder_with(cfg, seed, device, |features, b| {
        let mut head_cfg = cfg.head.clone();
        head_cfg.input = features;
        ProjectionHead::new(&head_cfg, b)
    })
}

/// Parameters (from the `init` stream of `seed`), buffers, encoder
/// (`encoder.*`) and the head `head` builds (`head.*`) from the encoder's
/// feature size.
///
/// # Errors
/// An invalid config.
pub(crate) fn build_encoder_with<H>(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
    head: impl FnOnce(usize, &Builders) -> candle_core::Result<H>,
) -> candle_core::Result<(SeededVarMap, VarMap, Encoder, H)> {
    let params = SeededVarMap::from_seed(seed, pretext_core::seed::INIT);
    let buffers = VarMap::new();
    let b = Builders {
        params: params.var_builder(DType::F32, device),
        buffers: VarBuilder::from_varmap(&buffers, DType::F32, device),
    };
    let encoder = Encoder::new(&cfg.encoder, &b.pp("encoder"))?;
    let head = head(encoder.out_dim(), &b.pp("head"))?;
    Ok((params, buffers, encoder, head))
}

/// The encoder's parameters (`encoder.*`), what fine-tuning trains.
pub(crate) fn encoder_vars(params: &VarMap) -> Vec<(String, Var)> {
    named_vars(params)
        .into_iter()
        .filter(|(n, _)| n.starts_with("encoder."))
        .collect()
}

/// Which method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    /// SimCLR.
    SimClr,
    /// MoCo v2.
    MoCo,
    /// BYOL.
    Byol,
    /// SimSiam.
    SimSiam,
    /// Barlow Twins.
    BarlowTwins,
    /// VICReg.
    VicReg,
    /// DINO.
    Dino,
}

impl MethodKind {
    /// Every method, in the order `--help` lists them.
    pub const ALL: [Self; 7] = [
        Self::SimClr,
        Self::MoCo,
        Self::Byol,
        Self::SimSiam,
        Self::BarlowTwins,
        Self::VicReg,
        Self::Dino,
    ];

    /// The config's name (`method = "barlow_twins"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::SimClr => "simclr",
            Self::MoCo => "moco",
            Self::Byol => "byol",
            Self::SimSiam => "simsiam",
            Self::BarlowTwins => "barlow_twins",
            Self::VicReg => "vicreg",
            Self::Dino => "dino",
        }
    }

    /// What the method does, in a phrase (model cards).
    pub fn description(self) -> &'static str {
        match self {
            Self::SimClr => "SimCLR (NT-Xent over two augmented views of each image)",
            Self::MoCo => "MoCo v2 (InfoNCE against a momentum key encoder and a queue of negatives)",
            Self::Byol => "BYOL (an online network with a predictor regresses a momentum target network's projection)",
            Self::SimSiam => "SimSiam (a predictor regresses the other view's projection through a stop-gradient)",
            Self::BarlowTwins => {
                "Barlow Twins (the cross-correlation of the two views' embeddings pulled towards the identity)"
            }
            Self::VicReg => "VICReg (invariance, variance and covariance terms on the two views' embeddings)",
            Self::Dino => {
                "DINO (self-distillation: a student on global and local crops predicts a momentum teacher's centred, \
sharpened outputs on the global crops)"
            }
        }
    }

    /// Parses a method name.
    ///
    /// # Errors
    /// Any other name.
    pub fn parse(name: &str) -> Result<Self, pretext_core::InvalidSetting> {
        Self::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| {
            let names: Vec<String> = Self::ALL.iter().map(|m| format!("{:?}", m.name())).collect();
            pretext_core::InvalidSetting::value(
                "method",
                format!("{name:?}"),
                &format!("must be one of {}", names.join(", ")),
            )
        })
    }
}

/// A model of one of the [`MethodKind`]s.
pub enum ContrastiveModel {
    /// SimCLR.
    SimClr(Box<SimClr>),
    /// MoCo v2.
    MoCo(Box<MoCo>),
    /// BYOL.
    Byol(Box<Byol>),
    /// SimSiam.
    SimSiam(Box<SimSiam>),
    /// Barlow Twins.
    BarlowTwins(Box<BarlowTwins>),
    /// VICReg.
    VicReg(Box<VicReg>),
    /// DINO.
    Dino(Box<Dino>),
}

impl ContrastiveModel {
    /// Builds `method` with parameters from `seed`.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(method: MethodKind, cfg: &ModelConfig, seed: u64, device: &Device) -> candle_core::Result<Self> {
        Ok(match method {
            MethodKind::SimClr => Self::SimClr(Box::new(SimClr::new(cfg, seed, device)?)),
            MethodKind::MoCo => Self::MoCo(Box::new(MoCo::new(cfg, seed, device)?)),
            MethodKind::Byol => Self::Byol(Box::new(Byol::new(cfg, seed, device)?)),
            MethodKind::SimSiam => Self::SimSiam(Box::new(SimSiam::new(cfg, seed, device)?)),
            MethodKind::BarlowTwins => Self::BarlowTwins(Box::new(BarlowTwins::new(cfg, seed, device)?)),
            MethodKind::VicReg => Self::VicReg(Box::new(VicReg::new(cfg, seed, device)?)),
            MethodKind::Dino => Self::Dino(Box::new(Dino::new(cfg, seed, device)?)),
        })
    }

    /// The encoder (what transfers).
    pub fn encoder(&self) -> &Encoder {
        match self {
            Self::SimClr(m) => &m.encoder,
            Self::MoCo(m) => &m.encoder,
            Self::Byol(m) => m.encoder(),
            Self::SimSiam(m) => m.encoder(),
            Self::BarlowTwins(m) => m.encoder(),
            Self::VicReg(m) => m.encoder(),
            Self::Dino(m) => m.encoder(),
        }
    }

    fn method(&self) -> &dyn Method<Batch = ImageBatch> {
        match self {
            Self::SimClr(m) => m.as_ref(),
            Self::MoCo(m) => m.as_ref(),
            Self::Byol(m) => m.as_ref(),
            Self::SimSiam(m) => m.as_ref(),
            Self::BarlowTwins(m) => m.as_ref(),
            Self::VicReg(m) => m.as_ref(),
            Self::Dino(m) => m.as_ref(),
        }
    }

    fn method_mut(&mut self) -> &mut dyn Method<Batch = ImageBatch> {
        match self {
            Self::SimClr(m) => m.as_mut(),
            Self::MoCo(m) => m.as_mut(),
            Self::Byol(m) => m.as_mut(),
            Self::SimSiam(m) => m.as_mut(),
            Self::BarlowTwins(m) => m.as_mut(),
            Self::VicReg(m) => m.as_mut(),
            Self::Dino(m) => m.as_mut(),
        }
    }
}

impl Method for ContrastiveModel {
    type Batch = ImageBatch;

    fn vars(&self) -> &VarMap {
        self.method().vars()
    }

    fn model_buffers(&self) -> Option<&VarMap> {
        self.method().model_buffers()
    }

    fn step(&mut self, batch: &ImageBatch, cx: &StepCx) -> pretext_core::Result<StepOut> {
        self.method_mut().step(batch, cx)
    }

    fn after_update(&mut self, cx: &StepCx) -> pretext_core::Result<()> {
        self.method_mut().after_update(cx)
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        self.method().buffers()
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> pretext_core::Result<()> {
        self.method_mut().load_buffers(buffers)
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.method().metadata()
    }

    fn weights_loaded(&mut self) -> pretext_core::Result<()> {
        self.method_mut().weights_loaded()
    }

    fn data_parallel(&self, processes: usize) -> Result<(), String> {
        self.method().data_parallel(processes)
    }
}

impl pretext_eval::ImageEncoder for ContrastiveModel {
    fn encode(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.encoder().forward_t(images, train)
    }

    fn feature_dim(&self) -> usize {
        self.encoder().out_dim()
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        encoder_vars(self.vars())
    }

    fn classifier_layer(&self) -> &'static str {
        match self.encoder() {
            crate::encoder::Encoder::Vit(..) => "head",
            crate::encoder::Encoder::ResNet(_) => "fc",
        }
    }

    /// The encoder's weights and batch-norm statistics under the export's
    /// (torchvision's or timm's) names: `encoder.` dropped.
    fn state(&self) -> Vec<(String, Var)> {
        let mut all = named_vars(self.vars());
        if let Some(b) = self.model_buffers() {
            all.extend(named_vars(b));
        }
        let mut out: Vec<(String, Var)> = all
            .into_iter()
            .filter_map(|(n, v)| n.strip_prefix("encoder.").map(|s| (s.to_string(), v)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
