//! Projection heads and predictors: an MLP of `layers` linear layers with
//! batch norm and ReLU between them, optionally batch norm (without affine
//! parameters) after the last (SimSiam's projector).
//!
//! Names follow the `torch.nn.Sequential` the head mirrors: layer `i < L-1`
//! is `net.{3i}` (Linear), `net.{3i+1}` (BatchNorm1d), ReLU at `3i+2`; the
//! last is `net.{3(L-1)}` and its batch norm `net.{3(L-1)+1}`. The default
//! two-layer head is `net.0`, `net.1`, `net.3`: Linear – BN – ReLU – Linear.

use candle_core::{Result, Tensor};
use pretext_core::nn::{linear, BatchNorm, Builders};
use serde::{Deserialize, Serialize};

/// Sizes of a [`ProjectionHead`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadConfig {
    /// Input features (the encoder's output).
    pub input: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Output (projection) size.
    pub output: usize,
    /// Linear layers (at least 2).
    pub layers: usize,
    /// Batch norm without affine parameters after the last layer (whose bias is then dropped).
    pub last_bn: bool,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            input: 128,
            hidden: 128,
            output: 64,
            layers: 2,
            last_bn: false,
        }
    }
}

impl HeadConfig {
    /// A two-layer MLP `input → hidden → output`.
    pub fn mlp(input: usize, hidden: usize, output: usize) -> Self {
        Self {
            input,
            hidden,
            output,
            layers: 2,
            last_bn: false,
        }
    }

    /// Checks the sizes; `key` names the section in messages.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self, key: &str) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        if self.layers < 2 {
            return Err(InvalidSetting::value(
                format!("{key}.layers"),
                self.layers,
                "must be at least 2",
            ));
        }
        for (name, v) in [("hidden", self.hidden), ("output", self.output)] {
            if v == 0 {
                return Err(InvalidSetting::value(format!("{key}.{name}"), v, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// `layers` × Linear with BN – ReLU between them (and BN after the last with `last_bn`).
#[derive(Debug, Clone)]
pub struct ProjectionHead {
    hidden: Vec<(pretext_core::nn::Linear, BatchNorm)>,
    last: pretext_core::nn::Linear,
    last_bn: Option<BatchNorm>,
}

impl ProjectionHead {
    /// Builds the head.
    ///
    /// # Errors
    /// The builders failed.
    pub fn new(cfg: &HeadConfig, b: &Builders) -> Result<Self> {
        let net = b.pp("net");
        let layers = cfg.layers.max(2);
        let mut hidden = Vec::with_capacity(layers - 1);
        let mut din = cfg.input;
        for i in 0..layers - 1 {
            let fc = linear(din, cfg.hidden, true, net.params.pp(3 * i))?;
            let bn = BatchNorm::new(cfg.hidden, &net.pp(3 * i + 1))?;
            hidden.push((fc, bn));
            din = cfg.hidden;
        }
        let at = 3 * (layers - 1);
        let last = linear(din, cfg.output, !cfg.last_bn, net.params.pp(at))?;
        let last_bn = if cfg.last_bn {
            Some(BatchNorm::with_affine(cfg.output, false, &net.pp(at + 1))?)
        } else {
            None
        };
        Ok(Self { hidden, last, last_bn })
    }

    /// `(n, input)` → `(n, output)`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward_t(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = h.clone();
        for (fc, bn) in &self.hidden {
            x = bn.forward_t(&fc.forward(&x)?, train, true)?;
        }
        let y = self.last.forward(&x)?;
        match &self.last_bn {
            Some(bn) => bn.forward_t(&y, train, false),
            None => Ok(y),
        }
    }
}

/// Sizes of a [`DinoHead`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DinoHeadConfig {
    /// Input features (the encoder's output).
    pub input: usize,
    /// Hidden units of the MLP.
    pub hidden: usize,
    /// The bottleneck the MLP ends in (L2-normalised).
    pub bottleneck: usize,
    /// Prototypes: the output dimension K.
    pub prototypes: usize,
}

/// DINO's head: a three-layer MLP with GELU (`mlp.0`, `mlp.2`, `mlp.4`, no
/// batch norm) into an L2-normalised bottleneck, then a weight-normalised
/// linear layer without bias whose norm is fixed to 1 (`norm_last_layer`):
/// only its direction `last_layer.weight_v` `(K, bottleneck)` is trained,
/// each row normalised in the forward pass. The outputs are cosine
/// similarities to K prototypes.
#[derive(Debug, Clone)]
pub struct DinoHead {
    mlp: [pretext_core::nn::Linear; 3],
    weight_v: Tensor,
}

impl DinoHead {
    /// Builds the head.
    ///
    /// # Errors
    /// The builders failed.
    pub fn new(cfg: &DinoHeadConfig, b: &Builders) -> Result<Self> {
        let mlp = b.params.pp("mlp");
        let mlp = [
            linear(cfg.input, cfg.hidden, true, mlp.pp("0"))?,
            linear(cfg.hidden, cfg.hidden, true, mlp.pp("2"))?,
            linear(cfg.hidden, cfg.bottleneck, true, mlp.pp("4"))?,
        ];
        let bound = 1.0 / (cfg.bottleneck as f64).sqrt();
        let weight_v = b.params.pp("last_layer").get_with_hints(
            (cfg.prototypes, cfg.bottleneck),
            "weight_v",
            candle_nn::Init::Uniform { lo: -bound, up: bound },
        )?;
        Ok(Self { mlp, weight_v })
    }

    /// `(n, input)` → `(n, K)` logits in `[−1, 1]`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let x = pretext_core::ops::gelu(&self.mlp[0].forward(h)?)?;
        let x = pretext_core::ops::gelu(&self.mlp[1].forward(&x)?)?;
        let x = crate::loss::l2_normalize(&self.mlp[2].forward(&x)?)?;
        let w = crate::loss::l2_normalize(&self.weight_v)?;
        x.matmul(&w.t()?)
    }
}

impl crate::branch::FeatureHead for DinoHead {
    fn forward_t(&self, h: &Tensor, _train: bool) -> Result<Tensor> {
        self.forward(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use pretext_core::init::named_tensors;
    use pretext_core::SeededVarMap;

    fn names(cfg: &HeadConfig) -> Result<(Vec<String>, Vec<String>, Tensor)> {
        let params = SeededVarMap::from_seed(0, pretext_core::seed::INIT);
        let buffers = VarMap::new();
        let b = Builders {
            params: params.var_builder(DType::F32, &Device::Cpu),
            buffers: VarBuilder::from_varmap(&buffers, DType::F32, &Device::Cpu),
        };
        let head = ProjectionHead::new(cfg, &b)?;
        let x = Tensor::arange(0f32, (4 * cfg.input) as f32, &Device::Cpu)?.reshape((4, cfg.input))?;
        let y = head.forward_t(&(x / 10.0)?, true)?;
        let n = |m: &VarMap| named_tensors(m).into_iter().map(|(n, _)| n).collect();
        Ok((n(params.var_map()), n(&buffers), y))
    }

    #[test]
    fn torch_sequential_names_for_two_and_three_layers() -> Result<()> {
        let (p, _, y) = names(&HeadConfig::mlp(3, 5, 2))?;
        assert_eq!(
            p,
            [
                "net.0.bias",
                "net.0.weight",
                "net.1.bias",
                "net.1.weight",
                "net.3.bias",
                "net.3.weight"
            ]
        );
        assert_eq!(y.dims(), [4, 2]);
        let cfg = HeadConfig {
            layers: 3,
            last_bn: true,
            ..HeadConfig::mlp(3, 5, 2)
        };
        let (p, b, y) = names(&cfg)?;
        assert_eq!(
            p,
            [
                "net.0.bias",
                "net.0.weight",
                "net.1.bias",
                "net.1.weight",
                "net.3.bias",
                "net.3.weight",
                "net.4.bias",
                "net.4.weight",
                "net.6.weight"
            ]
        );
        assert!(b.contains(&"net.7.running_mean".to_string()), "{b:?}");
        // the last BN has no affine part: each output column has mean 0, variance 1
        let cols = y.t()?.to_vec2::<f32>()?;
        for c in cols {
            let m = c.iter().sum::<f32>() / 4.0;
            let v = c.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / 4.0;
            assert!(m.abs() < 1e-4 && (v - 1.0).abs() < 1e-2, "{m} {v}");
        }
        Ok(())
    }

    #[test]
    fn dino_head_names_and_cosine_outputs() -> Result<()> {
        let params = SeededVarMap::from_seed(0, pretext_core::seed::INIT);
        let buffers = VarMap::new();
        let b = Builders {
            params: params.var_builder(DType::F32, &Device::Cpu),
            buffers: VarBuilder::from_varmap(&buffers, DType::F32, &Device::Cpu),
        };
        let cfg = DinoHeadConfig {
            input: 3,
            hidden: 6,
            bottleneck: 4,
            prototypes: 5,
        };
        let head = DinoHead::new(&cfg, &b)?;
        let names: Vec<String> = named_tensors(params.var_map()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "last_layer.weight_v",
                "mlp.0.bias",
                "mlp.0.weight",
                "mlp.2.bias",
                "mlp.2.weight",
                "mlp.4.bias",
                "mlp.4.weight"
            ]
        );
        let x = Tensor::new(&[[1f32, -2.0, 0.5], [0.0, 3.0, 1.0]], &Device::Cpu)?;
        let y = head.forward(&x)?;
        assert_eq!(y.dims(), [2, 5]);
        // cosine similarities: within [−1, 1], and scaling weight_v changes nothing
        assert!(y.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.abs() <= 1.0 + 1e-6));
        let v = named_tensors(params.var_map()).remove(0).1;
        let scaled = DinoHead {
            weight_v: (v * 7.0)?,
            ..head.clone()
        };
        let d = (scaled.forward(&x)? - &y)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }
}
