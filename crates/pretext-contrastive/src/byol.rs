//! BYOL (Grill et al. 2020): an online network (encoder, projector,
//! predictor) regresses the projection of the other view computed by a
//! target network, an EMA of the online encoder and projector whose momentum
//! rises from `momentum` to 1 along a cosine; the loss is symmetric
//! (`‖p̂₁ − t̂₂‖² + ‖p̂₂ − t̂₁‖²`, each `2 − 2·cos`). No negatives.

use crate::branch::{two_views, MomentumTwin, Online};
use crate::encoder::Encoder;
use crate::loss::normalized_mse;
use crate::model::ModelConfig;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use pretext_core::trainer::{Method, StepCx, StepOut};
use pretext_data::ImageBatch;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// BYOL settings (`model.byol`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ByolConfig {
    /// Base EMA momentum τ of the target network.
    pub momentum: f64,
    /// Raise τ from `momentum` to 1 along a cosine over the run (the paper's schedule).
    pub momentum_cosine: bool,
    /// Hidden units of the predictor (`head.output → hidden → head.output`).
    pub predictor_hidden: usize,
}

impl Default for ByolConfig {
    fn default() -> Self {
        Self {
            momentum: 0.99,
            momentum_cosine: true,
            predictor_hidden: 256,
        }
    }
}

impl ByolConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(InvalidSetting::value(
                "model.byol.momentum",
                self.momentum,
                "must lie in [0, 1]",
            ));
        }
        if self.predictor_hidden == 0 {
            return Err(InvalidSetting::value(
                "model.byol.predictor_hidden",
                self.predictor_hidden,
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// τ at `step` of `total`.
    pub fn momentum_at(&self, step: u64, total: u64) -> f64 {
        if self.momentum_cosine {
            pretext_core::ema::cosine_momentum(step, total, self.momentum)
        } else {
            self.momentum
        }
    }
}

/// The BYOL method: online `encoder.*`, `head.*`, `predictor.*` (trained,
/// `model.safetensors`) and the target `target.encoder.*`, `target.head.*`
/// (`state.safetensors`).
pub struct Byol {
    online: Online,
    target: MomentumTwin<crate::head::ProjectionHead>,
    cfg: ByolConfig,
}

impl Byol {
    /// Online and target networks, identical at the start.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            online: Online::new(cfg, Some(cfg.byol.predictor_hidden), seed, device)?,
            target: MomentumTwin::new(cfg, seed, device, "target.")?,
            cfg: cfg.byol.clone(),
        })
    }

    /// The online encoder (what transfers).
    pub fn encoder(&self) -> &Encoder {
        &self.online.encoder
    }

    /// The target network's parameters (an EMA of the online encoder and projector).
    pub fn target_params(&self) -> &VarMap {
        self.target.params()
    }

    /// The symmetric loss of two views.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn loss(&self, v1: &Tensor, v2: &Tensor) -> candle_core::Result<Tensor> {
        let p1 = self.online.predict(&self.online.project(v1)?)?;
        let p2 = self.online.predict(&self.online.project(v2)?)?;
        let (t1, t2) = (self.target.project(v1)?, self.target.project(v2)?);
        normalized_mse(&p1, &t2)? + normalized_mse(&p2, &t1)?
    }
}

impl Method for Byol {
    type Batch = ImageBatch;

    fn vars(&self) -> &VarMap {
        self.online.params.var_map()
    }

    fn model_buffers(&self) -> Option<&VarMap> {
        Some(&self.online.buffers)
    }

    fn step(&mut self, batch: &ImageBatch, cx: &StepCx) -> pretext_core::Result<StepOut> {
        let (v1, v2) = two_views(batch, "BYOL")?;
        Ok(StepOut {
            loss: self.loss(v1, v2)?,
            stats: vec![("momentum", self.cfg.momentum_at(cx.step, cx.total_steps))],
        })
    }

    fn after_update(&mut self, cx: &StepCx) -> pretext_core::Result<()> {
        self.target
            .follow(self.online.twin_source(), self.cfg.momentum_at(cx.step, cx.total_steps))
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        self.target.tensors()
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> pretext_core::Result<()> {
        self.target.load(buffers, &[], "BYOL")
    }

    /// The target starts as a copy of the initial online network.
    fn weights_loaded(&mut self) -> pretext_core::Result<()> {
        self.target
            .copy_from(self.online.params.var_map(), &self.online.buffers)
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.online.metadata("byol")
    }

    fn data_parallel(&self, _processes: usize) -> Result<(), String> {
        Ok(())
    }
}
