//! VICReg (Bardes et al. 2022): invariance (mean squared error between the
//! views' embeddings), variance (a hinge keeping each dimension's standard
//! deviation at 1) and covariance (off-diagonal covariance pushed to 0),
//! weighted 25 / 25 / 1 by default. No negatives, no predictor, no momentum network.

use crate::branch::{two_views, Online};
use crate::encoder::Encoder;
use crate::loss::{vicreg, VicRegTerms, VicRegWeights};
use crate::model::ModelConfig;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use pretext_core::trainer::{Method, StepCx, StepOut};
use pretext_data::ImageBatch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// VICReg settings (`model.vicreg`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VicRegConfig {
    /// λ, weight of the invariance term.
    pub invariance: f64,
    /// μ, weight of the variance term.
    pub variance: f64,
    /// ν, weight of the covariance term.
    pub covariance: f64,
    /// Added to each variance before its square root.
    pub eps: f64,
}

impl Default for VicRegConfig {
    fn default() -> Self {
        let w = VicRegWeights::default();
        Self {
            invariance: w.invariance,
            variance: w.variance,
            covariance: w.covariance,
            eps: w.eps,
        }
    }
}

impl VicRegConfig {
    /// The loss weights.
    pub fn weights(&self) -> VicRegWeights {
        VicRegWeights {
            invariance: self.invariance,
            variance: self.variance,
            covariance: self.covariance,
            eps: self.eps,
        }
    }

    /// Checks the ranges.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> pretext_core::SettingResult {
        for (k, v) in [
            ("invariance", self.invariance),
            ("variance", self.variance),
            ("covariance", self.covariance),
        ] {
            if v.is_nan() || v < 0.0 {
                return Err(pretext_core::InvalidSetting::value(
                    format!("model.vicreg.{k}"),
                    v,
                    "must be ≥ 0",
                ));
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return Err(pretext_core::InvalidSetting::value(
                "model.vicreg.eps",
                self.eps,
                "must be > 0",
            ));
        }
        Ok(())
    }
}

/// The VICReg method: `encoder.*`, `head.*` (the expander).
pub struct VicReg {
    online: Online,
    weights: VicRegWeights,
}

impl VicReg {
    /// Builds the network.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            online: Online::new(cfg, None, seed, device)?,
            weights: cfg.vicreg.weights(),
        })
    }

    /// The encoder (what transfers).
    pub fn encoder(&self) -> &Encoder {
        &self.online.encoder
    }

    /// The loss of two views and its terms.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn loss(&self, v1: &Tensor, v2: &Tensor) -> candle_core::Result<VicRegTerms> {
        // Variance and covariance are over the whole batch: every rank's rows.
        let z1 = pretext_core::dist::gather_rows(&self.online.project(v1)?)?;
        let z2 = pretext_core::dist::gather_rows(&self.online.project(v2)?)?;
        vicreg(&z1, &z2, &self.weights)
    }
}

impl Method for VicReg {
    type Batch = ImageBatch;

    fn vars(&self) -> &VarMap {
        self.online.params.var_map()
    }

    fn model_buffers(&self) -> Option<&VarMap> {
        Some(&self.online.buffers)
    }

    fn step(&mut self, batch: &ImageBatch, _cx: &StepCx) -> pretext_core::Result<StepOut> {
        let (v1, v2) = two_views(batch, "VICReg")?;
        let t = self.loss(v1, v2)?;
        let s = |x: &Tensor| -> pretext_core::Result<f64> { Ok(f64::from(x.to_scalar::<f32>()?)) };
        Ok(StepOut {
            stats: vec![
                ("invariance", s(&t.invariance)?),
                ("variance", s(&t.variance)?),
                ("covariance", s(&t.covariance)?),
            ],
            loss: t.loss,
        })
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.online.metadata("vicreg")
    }

    fn data_parallel(&self, _processes: usize) -> Result<(), String> {
        Ok(())
    }
}
