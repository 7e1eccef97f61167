//! SimSiam (Chen & He 2021): one network (encoder, projector, predictor)
//! on both views; the prediction of each view is pulled towards the other
//! view's projection through a stop-gradient,
//! `L = ½ D(p₁, sg(z₂)) + ½ D(p₂, sg(z₁))` with `D` the negative cosine.
//! No negatives, no momentum network.

use crate::branch::{two_views, Online};
use crate::encoder::Encoder;
use crate::loss::negative_cosine;
use crate::model::ModelConfig;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use pretext_core::trainer::{Method, StepCx, StepOut};
use pretext_data::ImageBatch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// SimSiam settings (`model.simsiam`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimSiamConfig {
    /// Hidden units of the predictor: the paper's bottleneck, a quarter of the projection.
    pub predictor_hidden: usize,
}

impl Default for SimSiamConfig {
    fn default() -> Self {
        Self { predictor_hidden: 32 }
    }
}

impl SimSiamConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> pretext_core::SettingResult {
        if self.predictor_hidden == 0 {
            return Err(pretext_core::InvalidSetting::value(
                "model.simsiam.predictor_hidden",
                self.predictor_hidden,
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The SimSiam method: `encoder.*`, `head.*`, `predictor.*`.
pub struct SimSiam {
    online: Online,
}

impl SimSiam {
    /// Builds the network.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            online: Online::new(cfg, Some(cfg.simsiam.predictor_hidden), seed, device)?,
        })
    }

    /// The encoder (what transfers).
    pub fn encoder(&self) -> &Encoder {
        &self.online.encoder
    }

    /// The symmetric loss of two views and the per-dimension std of the
    /// normalised projections (the paper's collapse indicator).
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn loss(&self, v1: &Tensor, v2: &Tensor) -> candle_core::Result<(Tensor, f64)> {
        let (z1, z2) = (self.online.project(v1)?, self.online.project(v2)?);
        let (p1, p2) = (self.online.predict(&z1)?, self.online.predict(&z2)?);
        let loss = ((negative_cosine(&p1, &z2)? + negative_cosine(&p2, &z1)?)? * 0.5)?;
        // The collapse statistic over the whole batch (every rank's rows).
        let zn = crate::loss::l2_normalize(&pretext_core::dist::gather_rows_detached(&z1)?)?;
        let std = zn
            .broadcast_sub(&zn.mean_keepdim(0)?)?
            .sqr()?
            .mean(0)?
            .sqrt()?
            .mean_all()?
            .to_scalar::<f32>()?;
        Ok((loss, f64::from(std)))
    }
}

impl Method for SimSiam {
    type Batch = ImageBatch;

    fn vars(&self) -> &VarMap {
        self.online.params.var_map()
    }

    fn model_buffers(&self) -> Option<&VarMap> {
        Some(&self.online.buffers)
    }

    fn step(&mut self, batch: &ImageBatch, _cx: &StepCx) -> pretext_core::Result<StepOut> {
        let (v1, v2) = two_views(batch, "SimSiam")?;
        let (loss, std) = self.loss(v1, v2)?;
        Ok(StepOut {
            loss,
            stats: vec![("z_std", std)],
        })
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.online.metadata("simsiam")
    }

    fn data_parallel(&self, _processes: usize) -> Result<(), String> {
        Ok(())
    }
}
