//! Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two
//! views' standardised projections is pulled towards the identity,
//! `Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²`. No negatives, no predictor, no momentum network.

use crate::branch::{two_views, Online};
use crate::encoder::Encoder;
use crate::loss::barlow_twins;
use crate::model::ModelConfig;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use pretext_core::trainer::{Method, StepCx, StepOut};
use pretext_data::ImageBatch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Barlow Twins settings (`model.barlow_twins`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BarlowTwinsConfig {
    /// λ, the weight of the off-diagonal (redundancy) term.
    pub lambda: f64,
}

impl Default for BarlowTwinsConfig {
    /// The paper's λ = 0.0051.
    fn default() -> Self {
        Self { lambda: 0.0051 }
    }
}

impl BarlowTwinsConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> pretext_core::SettingResult {
        if self.lambda.is_nan() || self.lambda < 0.0 {
            return Err(pretext_core::InvalidSetting::value(
                "model.barlow_twins.lambda",
                self.lambda,
                "must be ≥ 0",
            ));
        }
        Ok(())
    }
}

/// The Barlow Twins method: `encoder.*`, `head.*` (the projector).
pub struct BarlowTwins {
    online: Online,
    cfg: BarlowTwinsConfig,
}

impl BarlowTwins {
    /// Builds the network.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            online: Online::new(cfg, None, seed, device)?,
            cfg: cfg.barlow_twins.clone(),
        })
    }

    /// The encoder (what transfers).
    pub fn encoder(&self) -> &Encoder {
        &self.online.encoder
    }

    /// The loss of two views (each through the network on its own, as in the paper).
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn loss(&self, v1: &Tensor, v2: &Tensor) -> candle_core::Result<Tensor> {
        // The cross-correlation is over the whole batch: every rank's rows.
        let z1 = pretext_core::dist::gather_rows(&self.online.project(v1)?)?;
        let z2 = pretext_core::dist::gather_rows(&self.online.project(v2)?)?;
        barlow_twins(&z1, &z2, self.cfg.lambda)
    }
}

impl Method for BarlowTwins {
    type Batch = ImageBatch;

    fn vars(&self) -> &VarMap {
        self.online.params.var_map()
    }

    fn model_buffers(&self) -> Option<&VarMap> {
        Some(&self.online.buffers)
    }

    fn step(&mut self, batch: &ImageBatch, _cx: &StepCx) -> pretext_core::Result<StepOut> {
        let (v1, v2) = two_views(batch, "Barlow Twins")?;
        Ok(StepOut {
            loss: self.loss(v1, v2)?,
            stats: vec![],
        })
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.online.metadata("barlow_twins")
    }

    fn data_parallel(&self, _processes: usize) -> Result<(), String> {
        Ok(())
    }
}
