//! The model of a generative run, whichever method: the VAE or the MAE,
//! behind one type the trainer, the monitor and the evaluation share.

use crate::mae::Mae;
use crate::model::Vae;
use candle_core::{Result, Tensor, Var};
use pretext_core::trainer::{Method, StepCx, StepOut};
use pretext_data::ImageBatch;
use std::collections::{BTreeMap, HashMap};

/// Which generative method (`method` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerativeMethod {
    /// The variational autoencoder.
    Vae,
    /// The masked autoencoder on a ViT.
    Mae,
}

impl GenerativeMethod {
    /// Every method, in the order `--help` lists them.
    pub const ALL: [Self; 2] = [Self::Vae, Self::Mae];

    /// The config's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vae => "vae",
            Self::Mae => "mae",
        }
    }

    /// Parses a method name.
    ///
    /// # Errors
    /// Any other name.
    pub fn parse(name: &str) -> std::result::Result<Self, pretext_core::InvalidSetting> {
        Self::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| {
            pretext_core::InvalidSetting::value("method", format!("{name:?}"), "must be \"vae\" or \"mae\"")
        })
    }
}

/// A VAE or an MAE.
pub enum GenerativeModel {
    /// The variational autoencoder.
    Vae(Box<Vae>),
    /// The masked autoencoder.
    Mae(Box<Mae>),
}

impl GenerativeModel {
    /// The VAE, if this is one.
    pub fn vae(&self) -> Option<&Vae> {
        match self {
            Self::Vae(v) => Some(v),
            Self::Mae(_) => None,
        }
    }

    /// The MAE, if this is one.
    pub fn mae(&self) -> Option<&Mae> {
        match self {
            Self::Mae(m) => Some(m),
            Self::Vae(_) => None,
        }
    }

    /// Which method.
    pub fn method(&self) -> GenerativeMethod {
        match self {
            Self::Vae(_) => GenerativeMethod::Vae,
            Self::Mae(_) => GenerativeMethod::Mae,
        }
    }

    fn inner(&self) -> &dyn Method<Batch = ImageBatch> {
        match self {
            Self::Vae(v) => v.as_ref(),
            Self::Mae(m) => m.as_ref(),
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Method<Batch = ImageBatch> {
        match self {
            Self::Vae(v) => v.as_mut(),
            Self::Mae(m) => m.as_mut(),
        }
    }

    fn encoder(&self) -> &dyn pretext_eval::ImageEncoder {
        match self {
            Self::Vae(v) => v.as_ref(),
            Self::Mae(m) => m.as_ref(),
        }
    }
}

impl Method for GenerativeModel {
    type Batch = ImageBatch;

    fn vars(&self) -> &candle_nn::VarMap {
        self.inner().vars()
    }

    fn model_buffers(&self) -> Option<&candle_nn::VarMap> {
        self.inner().model_buffers()
    }

    fn step(&mut self, batch: &ImageBatch, cx: &StepCx) -> pretext_core::Result<StepOut> {
        self.inner_mut().step(batch, cx)
    }

    fn after_update(&mut self, cx: &StepCx) -> pretext_core::Result<()> {
        self.inner_mut().after_update(cx)
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        self.inner().buffers()
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> pretext_core::Result<()> {
        self.inner_mut().load_buffers(buffers)
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.inner().metadata()
    }

    fn weights_loaded(&mut self) -> pretext_core::Result<()> {
        self.inner_mut().weights_loaded()
    }

    fn data_parallel(&self, processes: usize) -> std::result::Result<(), String> {
        self.inner().data_parallel(processes)
    }
}

impl pretext_eval::ImageEncoder for GenerativeModel {
    fn encode(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        self.encoder().encode(images, train)
    }

    fn feature_dim(&self) -> usize {
        self.encoder().feature_dim()
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.encoder().trainable()
    }

    fn state(&self) -> Vec<(String, Var)> {
        self.encoder().state()
    }

    fn classifier_layer(&self) -> &'static str {
        self.encoder().classifier_layer()
    }
}
