//! The config of a contrastive run (`config.toml` of its run folder).

use crate::model::{MethodKind, ModelConfig};
use pretext_core::{InvalidSetting, OptimConfig, ScheduleConfig, SettingResult, TrainConfig};
use pretext_data::source::ImageFormat;
use pretext_data::AugmentConfig;
use serde::{Deserialize, Serialize};

/// The built-in default: SimCLR on the shipped Fashion-MNIST.
pub const DEFAULT_CONFIG: &str = include_str!("../configs/simclr-fmnist.toml");

/// The built-in recipe of `method` (`pretext-contrastive pretrain --method
/// NAME`): its heads and settings, merged over [`DEFAULT_CONFIG`]; `None`
/// for SimCLR, whose recipe is the default.
pub fn method_preset(method: MethodKind) -> Option<&'static str> {
    match method {
        MethodKind::SimClr => None,
        MethodKind::MoCo => Some(include_str!("../configs/moco-fmnist.toml")),
        MethodKind::Byol => Some(include_str!("../configs/byol-fmnist.toml")),
        MethodKind::SimSiam => Some(include_str!("../configs/simsiam-fmnist.toml")),
        MethodKind::BarlowTwins => Some(include_str!("../configs/barlow_twins-fmnist.toml")),
        MethodKind::VicReg => Some(include_str!("../configs/vicreg-fmnist.toml")),
        MethodKind::Dino => Some(include_str!("../configs/dino-fmnist.toml")),
    }
}

/// Where the images come from and how they are augmented (`data`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Images (IDX, CIFAR, image folder); empty = the shipped Fashion-MNIST.
    pub path: String,
    /// Reader; `auto` detects it.
    pub format: ImageFormat,
    /// Side of the (square) images: every image is read at this size, and
    /// evaluation, probes, fine-tuning and export see it.
    pub image_size: usize,
    /// Side of the augmented views pretraining trains on, as a fraction of
    /// `image_size` (0 < f ≤ 1; see [`ContrastiveConfig::view_side`]). Below
    /// 1 each step is cheaper, about as the views' area; the encoder still
    /// takes `image_size` images afterwards (a ResNet pools globally, a ViT
    /// resamples its position embeddings). Runs written before this key
    /// existed read 1, as they trained.
    pub view_scale: f64,
    /// 1 = grayscale, 3 = RGB.
    pub channels: usize,
    /// Augmentations of each view.
    pub augment: AugmentConfig,
    /// Batches prepared ahead in the background.
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            format: ImageFormat::Auto,
            image_size: 28,
            view_scale: 1.0,
            channels: 1,
            augment: AugmentConfig::fashion_mnist(),
            prefetch: 2,
        }
    }
}

/// Online monitoring (`eval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// kNN accuracy every N epochs (and at the end); 0 = only at the end.
    pub knn_every: u64,
    /// Labelled training images used as the kNN memory bank.
    pub knn_train: usize,
    /// Held-out labelled images scored.
    pub knn_test: usize,
    /// Neighbours.
    pub knn_k: usize,
    /// Vote temperature.
    pub knn_temperature: f32,
    /// `probe` fine-tunes (pretrained and from scratch) at the requested
    /// label fractions up to this one (fine-tuning on all labels is a
    /// supervised run of its own); 0 = no fine-tuning.
    pub finetune_max_labels: f64,
    /// The fine-tuning recipe (same budget for pretrained and from scratch).
    pub finetune: pretext_eval::FineTuneConfig,
    /// `probe` uses a class-balanced, seeded subset of this many training
    /// images (label fractions apply to it); 0 = all.
    pub probe_train: usize,
    /// `probe` scores a class-balanced, seeded subset of this many test images; 0 = all.
    pub probe_test: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            knn_every: 1,
            knn_train: 10_000,
            knn_test: 2_000,
            knn_k: 20,
            knn_temperature: 0.07,
            finetune_max_labels: 0.1,
            finetune: pretext_eval::FineTuneConfig::default(),
            probe_train: 0,
            probe_test: 0,
        }
    }
}

/// A whole contrastive run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContrastiveConfig {
    /// `simclr`, `moco` (MoCo v2), `byol`, `simsiam`, `barlow_twins`, `vicreg` or `dino`.
    pub method: String,
    /// The model.
    pub model: ModelConfig,
    /// The optimizer.
    pub optim: OptimConfig,
    /// The learning-rate schedule.
    pub schedule: ScheduleConfig,
    /// The data.
    pub data: DataConfig,
    /// The loop.
    pub train: TrainConfig,
    /// Online monitoring.
    pub eval: EvalConfig,
}

impl Default for ContrastiveConfig {
    fn default() -> Self {
        Self {
            method: "simclr".into(),
            model: ModelConfig::default(),
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl ContrastiveConfig {
    /// Side of the views pretraining trains on: `data.view_scale` of
    /// `data.image_size`, rounded, and never under 8 pixels (or the image's
    /// side, if smaller); for a ViT, to the nearest whole number of patches
    /// (at least one).
    pub fn view_side(&self) -> usize {
        let side = self.data.image_size as f64 * self.data.view_scale;
        if self.model.encoder.arch.is_vit() {
            let p = self.model.encoder.patch_size.max(1);
            ((side / p as f64).round() as usize).max(1) * p
        } else {
            (side.round() as usize).max(self.data.image_size.min(8))
        }
    }

    /// The `model` section with the encoder sized for `data.image_size`
    /// (a ViT's position embeddings are for that grid): what a run builds.
    pub fn model_for_data(&self) -> ModelConfig {
        let mut model = self.model.clone();
        model.encoder.image_size = self.data.image_size;
        model
    }

    /// Checks every section.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> SettingResult {
        let method = MethodKind::parse(&self.method)?;
        match method {
            MethodKind::SimClr => {}
            MethodKind::MoCo => self.model.moco.validate(self.train.batch_size)?,
            MethodKind::Byol => self.model.byol.validate()?,
            MethodKind::SimSiam => self.model.simsiam.validate()?,
            MethodKind::BarlowTwins => self.model.barlow_twins.validate()?,
            MethodKind::VicReg => self.model.vicreg.validate()?,
            MethodKind::Dino => self.model.dino.validate()?,
        }
        self.model.head.validate("model.head")?;
        let encoder = self.model_for_data().encoder;
        encoder.validate()?;
        let dino = &self.model.dino;
        if encoder.arch.is_vit() && method == MethodKind::Dino && dino.local_crops > 0 {
            let p = encoder.patch_size;
            if !dino.local_size.is_multiple_of(p) {
                return Err(InvalidSetting::value(
                    "model.dino.local_size",
                    dino.local_size,
                    &format!("must be a multiple of the ViT's model.encoder.patch_size = {p}"),
                ));
            }
        }
        self.optim.validate()?;
        self.schedule.validate()?;
        self.train.validate()?;
        self.data.augment.validate()?;
        self.eval.finetune.validate()?;
        if self.data.channels != 1 && self.data.channels != 3 {
            return Err(InvalidSetting::value(
                "data.channels",
                self.data.channels,
                "must be 1 or 3",
            ));
        }
        if self.data.image_size < 8 {
            return Err(InvalidSetting::value(
                "data.image_size",
                self.data.image_size,
                "must be at least 8",
            ));
        }
        let scale = self.data.view_scale;
        if !(scale > 0.0 && scale <= 1.0) {
            return Err(InvalidSetting::value("data.view_scale", scale, "must be in (0, 1]"));
        }
        if self.model.encoder.in_channels != self.data.channels {
            return Err(InvalidSetting::value(
                "model.encoder.in_channels",
                self.model.encoder.in_channels,
                &format!("must equal data.channels = {}", self.data.channels),
            ));
        }
        if self.train.batch_size < 2 {
            return Err(InvalidSetting::value(
                "train.batch_size",
                self.train.batch_size,
                "must be at least 2 for a contrastive loss",
            ));
        }
        if self.model.temperature.is_nan() || self.model.temperature <= 0.0 {
            return Err(InvalidSetting::value(
                "model.temperature",
                self.model.temperature,
                "must be > 0",
            ));
        }
        Ok(())
    }
}
