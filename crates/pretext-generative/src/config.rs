//! The config of a generative run — a VAE or an MAE — (`config.toml` of
//! its run folder).

use crate::mae::MaeConfig;
use crate::method::GenerativeMethod;
use crate::model::VaeConfig;
use pretext_core::{OptimConfig, ScheduleConfig, TrainConfig};
use pretext_data::source::ImageFormat;
use serde::{Deserialize, Serialize};

/// The built-in default: the convolutional VAE on the shipped Fashion-MNIST
/// (`configs/vae-fmnist.toml`; the reference's MLP is `configs/vae-mlp-fmnist.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../configs/vae-fmnist.toml");

/// The built-in recipe of `method` (`pretext-generative pretrain --method
/// NAME`), merged over [`DEFAULT_CONFIG`]; `None` for the VAE, whose recipe
/// is the default.
pub fn method_preset(method: GenerativeMethod) -> Option<&'static str> {
    match method {
        GenerativeMethod::Vae => None,
        GenerativeMethod::Mae => Some(include_str!("../configs/mae-fmnist.toml")),
    }
}

/// How intensities become training targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Binarize {
    /// Intensities in [0, 1] as they are (continuous BCE for Bernoulli).
    None,
    /// A fresh Bernoulli draw per pixel at every step (seeded); evaluation
    /// uses one fixed draw of the test set.
    Dynamic,
}

/// Where the images come from (`data`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Images (IDX, CIFAR, image folder); empty = the shipped Fashion-MNIST.
    pub path: String,
    /// Reader; `auto` detects it.
    pub format: ImageFormat,
    /// Side of the (square) images the model sees.
    pub image_size: usize,
    /// 1 = grayscale, 3 = RGB.
    pub channels: usize,
    /// `none` or `dynamic`.
    pub binarize: Binarize,
    /// Batches prepared ahead in the background.
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            format: ImageFormat::Auto,
            image_size: 28,
            channels: 1,
            binarize: Binarize::None,
            prefetch: 2,
        }
    }
}

/// Monitoring and evaluation (`eval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Held-out ELBO and kNN on the posterior means every N epochs (and at the end); 0 = only at the end.
    pub every: u64,
    /// Held-out images for the per-epoch ELBO and kNN.
    pub monitor_images: usize,
    /// kNN memory bank (labelled training images) for monitoring.
    pub knn_train: usize,
    /// Neighbours.
    pub knn_k: usize,
    /// Vote temperature.
    pub knn_temperature: f32,
    /// Posterior samples per image of the test ELBO in `probe`.
    pub elbo_samples: usize,
    /// Importance samples per image of the IWAE bound on −log p(x) in `probe`.
    pub iwae_samples: usize,
    /// Test images the likelihood figures use (0 = all).
    pub likelihood_images: usize,
    /// `probe` fine-tunes the encoder at label fractions up to this one; 0 = never.
    pub finetune_max_labels: f64,
    /// The fine-tuning recipe.
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
            every: 1,
            monitor_images: 2000,
            knn_train: 10_000,
            knn_k: 20,
            knn_temperature: 0.07,
            elbo_samples: 10,
            iwae_samples: 100,
            likelihood_images: 0,
            finetune_max_labels: 0.0,
            finetune: pretext_eval::FineTuneConfig::default(),
            probe_train: 0,
            probe_test: 0,
        }
    }
}

/// A whole generative run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerativeConfig {
    /// `vae` or `mae`.
    pub method: String,
    /// The VAE.
    pub model: VaeConfig,
    /// The MAE (`method = "mae"`).
    pub mae: MaeConfig,
    /// The optimizer.
    pub optim: OptimConfig,
    /// The learning-rate schedule.
    pub schedule: ScheduleConfig,
    /// The data.
    pub data: DataConfig,
    /// The loop.
    pub train: TrainConfig,
    /// Monitoring and evaluation.
    pub eval: EvalConfig,
}

impl Default for GenerativeConfig {
    fn default() -> Self {
        Self {
            method: "vae".into(),
            model: VaeConfig::default(),
            mae: MaeConfig::default(),
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl GenerativeConfig {
    /// Checks every section.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        let method = GenerativeMethod::parse(&self.method)?;
        self.optim.validate()?;
        self.eval.finetune.validate()?;
        self.schedule.validate()?;
        self.train.validate()?;
        if self.data.channels != 1 && self.data.channels != 3 {
            return Err(InvalidSetting::value(
                "data.channels",
                self.data.channels,
                "must be 1 or 3",
            ));
        }
        if self.data.image_size < 4 {
            return Err(InvalidSetting::value(
                "data.image_size",
                self.data.image_size,
                "must be at least 4",
            ));
        }
        match method {
            GenerativeMethod::Vae => self.model.validate(self.data.channels, self.data.image_size)?,
            GenerativeMethod::Mae => self.mae.validate(self.data.channels, self.data.image_size)?,
        }
        for (key, n) in [
            ("eval.iwae_samples", self.eval.iwae_samples),
            ("eval.elbo_samples", self.eval.elbo_samples),
        ] {
            if n == 0 {
                return Err(InvalidSetting::value(key, n, "must be > 0"));
            }
        }
        Ok(())
    }
}
