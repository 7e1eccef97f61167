//! SimCLR: two augmented views per image, encoder + projection head, NT-Xent.

use crate::encoder::Encoder;
use crate::head::ProjectionHead;
use crate::loss::nt_xent;
use crate::model::{build_encoder_and_head, ModelConfig};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use pretext_core::trainer::{Method, StepCx, StepOut};
use pretext_core::SeededVarMap;
use pretext_data::ImageBatch;
use std::collections::BTreeMap;

/// The SimCLR method: weights under `encoder.*` and `head.*`.
pub struct SimClr {
    params: SeededVarMap,
    buffers: VarMap,
    /// The encoder (what transfers).
    pub encoder: Encoder,
    head: ProjectionHead,
    cfg: ModelConfig,
}

impl SimClr {
    /// Builds the model with parameters drawn from the `init` stream of `seed`.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> candle_core::Result<Self> {
        let (params, buffers, encoder, head) = build_encoder_and_head(cfg, seed, device)?;
        Ok(Self {
            params,
            buffers,
            encoder,
            head,
            cfg: cfg.clone(),
        })
    }

    /// The loss of one batch of two views (both views through the encoder together).
    ///
    /// # Errors
    /// Fewer than two views, or shapes that do not fit.
    pub fn loss(&self, v1: &Tensor, v2: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let n = v1.dim(0)?;
        let h = self.encoder.forward_t(&Tensor::cat(&[v1, v2], 0)?, train)?;
        let z = self.head.forward_t(&h, train)?;
        // Data-parallel: every rank's views, in the single-process order
        // (all first views, then all second views), so each anchor has the
        // negatives of the whole batch.
        let z1 = pretext_core::dist::gather_rows(&z.narrow(0, 0, n)?)?;
        let z2 = pretext_core::dist::gather_rows(&z.narrow(0, n, n)?)?;
        nt_xent(&z1, &z2, self.cfg.temperature)
    }
}

impl Method for SimClr {
    type Batch = ImageBatch;

    fn vars(&self) -> &VarMap {
        self.params.var_map()
    }

    fn model_buffers(&self) -> Option<&VarMap> {
        Some(&self.buffers)
    }

    fn step(&mut self, batch: &ImageBatch, _cx: &StepCx) -> pretext_core::Result<StepOut> {
        let [v1, v2] = batch.views.as_slice() else {
            return Err(pretext_core::Error::Config(format!(
                "SimCLR needs 2 views per image, got {}",
                batch.views.len()
            )));
        };
        Ok(StepOut {
            loss: self.loss(v1, v2, true)?,
            stats: vec![],
        })
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        crate::branch::method_metadata("simclr", &self.encoder)
    }

    fn data_parallel(&self, _processes: usize) -> Result<(), String> {
        Ok(())
    }
}
