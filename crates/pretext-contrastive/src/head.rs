//! The SimCLR projection head: Linear – BatchNorm1d – ReLU – Linear.
//! Names: `net.0.{weight,bias}`, `net.1.*` (batch norm), `net.3.{weight,bias}`.

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
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            input: 128,
            hidden: 128,
            output: 64,
        }
    }
}

/// Linear – BN – ReLU – Linear.
#[derive(Debug, Clone)]
pub struct ProjectionHead {
    fc1: pretext_core::nn::Linear,
    bn: BatchNorm,
    fc2: pretext_core::nn::Linear,
}

impl ProjectionHead {
    /// Builds the head.
    ///
    /// # Errors
    /// The builders failed.
    pub fn new(cfg: &HeadConfig, b: &Builders) -> Result<Self> {
        let net = b.pp("net");
        Ok(Self {
            fc1: linear(cfg.input, cfg.hidden, true, net.params.pp("0"))?,
            bn: BatchNorm::new(cfg.hidden, &net.pp("1"))?,
            fc2: linear(cfg.hidden, cfg.output, true, net.params.pp("3"))?,
        })
    }

    /// `(n, input)` → `(n, output)`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward_t(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.bn.forward_t(&self.fc1.forward(h)?, train, true)?;
        self.fc2.forward(&x)
    }
}
