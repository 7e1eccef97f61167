//! The parts the methods without negatives share: an online network
//! (encoder, projection head, optional predictor) and a momentum twin of its
//! encoder and head (BYOL's target), saved in `state.safetensors`.

use crate::encoder::Encoder;
use crate::head::{HeadConfig, ProjectionHead};
use crate::model::{build_encoder_and_head, ModelConfig};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use pretext_core::init::{named_tensors, named_vars};
use pretext_core::nn::Builders;
use pretext_core::{Error, SeededVarMap};
use pretext_data::ImageBatch;
use std::collections::{BTreeMap, HashMap};

/// The trained network: `encoder.*`, `head.*` and, for BYOL and SimSiam,
/// `predictor.*` (an MLP `output → hidden → output` on the projection).
pub(crate) struct Online {
    pub params: SeededVarMap,
    pub buffers: VarMap,
    pub encoder: Encoder,
    pub head: ProjectionHead,
    pub predictor: Option<ProjectionHead>,
}

impl Online {
    /// Encoder and head as SimCLR draws them from `seed`, then the
    /// predictor (with `predictor_hidden` units) from the same stream.
    pub fn new(
        cfg: &ModelConfig,
        predictor_hidden: Option<usize>,
        seed: u64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (params, buffers, encoder, head) = build_encoder_and_head(cfg, seed, device)?;
        let predictor = match predictor_hidden {
            Some(hidden) => {
                let b = Builders {
                    params: params.var_builder(DType::F32, device),
                    buffers: VarBuilder::from_varmap(&buffers, DType::F32, device),
                };
                let out = cfg.head.output;
                Some(ProjectionHead::new(
                    &HeadConfig::mlp(out, hidden, out),
                    &b.pp("predictor"),
                )?)
            }
            None => None,
        };
        Ok(Self {
            params,
            buffers,
            encoder,
            head,
            predictor,
        })
    }

    /// `head(encoder(x))` in training mode.
    pub fn project(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward_t(&self.encoder.forward_t(x, true)?, true)
    }

    /// The predictor on a projection (the projection itself without one).
    pub fn predict(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        match &self.predictor {
            Some(p) => p.forward_t(z, true),
            None => Ok(z.clone()),
        }
    }

    /// The parameters a momentum twin follows: everything but the predictor.
    pub fn twin_source(&self) -> Vec<(String, Var)> {
        named_vars(self.params.var_map())
            .into_iter()
            .filter(|(n, _)| !n.starts_with("predictor."))
            .collect()
    }

    /// `pretext.*` metadata of `model.safetensors`.
    pub fn metadata(&self, method: &str) -> BTreeMap<String, String> {
        method_metadata(method, &self.encoder)
    }
}

/// `pretext.*` metadata of a contrastive run's `model.safetensors`.
pub(crate) fn method_metadata(method: &str, encoder: &Encoder) -> BTreeMap<String, String> {
    [
        ("pretext.paradigm", "contrastive"),
        ("pretext.method", method),
        ("pretext.architecture", encoder.arch().name()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The two views of a batch.
pub(crate) fn two_views<'a>(batch: &'a ImageBatch, method: &str) -> pretext_core::Result<(&'a Tensor, &'a Tensor)> {
    match batch.views.as_slice() {
        [v1, v2] => Ok((v1, v2)),
        other => Err(Error::Config(format!(
            "{method} needs 2 views per image, got {}",
            other.len()
        ))),
    }
}

/// A head on the encoder's features (projector, DINO head).
pub(crate) trait FeatureHead {
    /// `(n, features)` → `(n, out)`.
    fn forward_t(&self, h: &Tensor, train: bool) -> candle_core::Result<Tensor>;
}

impl FeatureHead for ProjectionHead {
    fn forward_t(&self, h: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        ProjectionHead::forward_t(self, h, train)
    }
}

/// A momentum twin of an encoder and head (BYOL's target, DINO's teacher),
/// never seen by the optimizer: its parameters are an EMA of the trained
/// ones, its batch-norm statistics its own. Saved under `{prefix}encoder.*`,
/// `{prefix}head.*`.
pub(crate) struct MomentumTwin<H> {
    params: SeededVarMap,
    buffers: VarMap,
    encoder: Encoder,
    head: H,
    prefix: &'static str,
}

impl MomentumTwin<ProjectionHead> {
    /// Built from the same seed as the online network: an exact copy of its encoder and head.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device, prefix: &'static str) -> candle_core::Result<Self> {
        Ok(Self::from_parts(build_encoder_and_head(cfg, seed, device)?, prefix))
    }
}

impl<H: FeatureHead> MomentumTwin<H> {
    /// A twin of already built parts (parameters, buffers, encoder, head).
    pub fn from_parts(parts: (SeededVarMap, VarMap, Encoder, H), prefix: &'static str) -> Self {
        let (params, buffers, encoder, head) = parts;
        Self {
            params,
            buffers,
            encoder,
            head,
            prefix,
        }
    }

    /// The twin's parameters.
    pub fn params(&self) -> &VarMap {
        self.params.var_map()
    }

    /// The twin's batch-norm statistics.
    pub fn buffers(&self) -> &VarMap {
        &self.buffers
    }

    /// The twin's encoder.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The twin's head.
    pub fn head(&self) -> &H {
        &self.head
    }

    /// `head(encoder(x))` in training mode (batch statistics), detached.
    pub fn project(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.head.forward_t(&self.encoder.forward_t(x, true)?, true)?.detach())
    }

    /// `twin = m·twin + (1 − m)·source`, by name; `source` holds exactly the twin's parameter names.
    pub fn follow(&self, source: Vec<(String, Var)>, momentum: f64) -> pretext_core::Result<()> {
        pretext_core::ema::ema_update_from(self.params.var_map(), source, momentum)
    }

    /// Copies the same-named parameters and batch-norm statistics of a
    /// trained network (names the twin lacks, a predictor's, are passed over).
    pub fn copy_from(&self, params: &VarMap, buffers: &VarMap) -> pretext_core::Result<()> {
        let src: HashMap<String, Var> = named_vars(params).into_iter().chain(named_vars(buffers)).collect();
        for (name, var) in named_vars(self.params.var_map())
            .into_iter()
            .chain(named_vars(&self.buffers))
        {
            if let Some(v) = src.get(&name) {
                var.set(&v.as_tensor().copy()?)?;
            }
        }
        Ok(())
    }

    /// Parameters and statistics under the prefix, for `state.safetensors`.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        named_tensors(self.params.var_map())
            .into_iter()
            .chain(named_tensors(&self.buffers))
            .map(|(n, t)| (format!("{}{n}", self.prefix), t))
            .collect()
    }

    /// Restores [`MomentumTwin::tensors`] from `state`, which must hold
    /// these names and, besides them, only `others` (`method` names the
    /// checkpoint's kind in errors).
    pub fn load(&self, state: &HashMap<String, Tensor>, others: &[&str], method: &str) -> pretext_core::Result<()> {
        let mine: Vec<(String, Var)> = named_vars(self.params.var_map())
            .into_iter()
            .chain(named_vars(&self.buffers))
            .map(|(n, v)| (format!("{}{n}", self.prefix), v))
            .collect();
        let known: std::collections::HashSet<&str> = mine
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(others.iter().copied())
            .collect();
        let extra: Vec<&String> = state.keys().filter(|k| !known.contains(k.as_str())).collect();
        if !extra.is_empty() {
            return Err(Error::Config(format!(
                "state.safetensors has tensors a {method} run does not have: {extra:?}"
            )));
        }
        for (name, var) in &mine {
            let t = state_tensor(state, name, var.dims(), method)?;
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// `name` from a checkpoint's state, with the shape `dims`.
pub(crate) fn state_tensor<'a>(
    state: &'a HashMap<String, Tensor>,
    name: &str,
    dims: &[usize],
    method: &str,
) -> pretext_core::Result<&'a Tensor> {
    let t = state.get(name).ok_or_else(|| {
        Error::Config(format!(
            "state.safetensors has no `{name}` (is this a {method} checkpoint?)"
        ))
    })?;
    if t.dims() != dims {
        return Err(Error::Config(format!(
            "state.safetensors: `{name}` has shape {:?}, the model needs {dims:?}",
            t.dims()
        )));
    }
    Ok(t)
}
