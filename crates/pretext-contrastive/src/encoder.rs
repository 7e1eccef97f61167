//! The "small-resnet" encoder of the PyTorch reference: a 3×3 stem and one
//! ResNet BasicBlock per stage, global average pooling.
//!
//! Names match the reference's `SmallResNet` state dict: `stem.0.weight`,
//! `stem.1.{weight,bias,running_mean,running_var,num_batches_tracked}`,
//! `stages.{i}.conv1.weight`, `stages.{i}.bn1.*`, `stages.{i}.conv2.weight`,
//! `stages.{i}.bn2.*`, `stages.{i}.short.0.weight`, `stages.{i}.short.1.*`.

use candle_core::{Result, Tensor};
use pretext_core::nn::{BatchNorm, Builders, Conv2d};
use pretext_core::ops;
use pretext_core::ops::resnet::{resnet_trunk, BlockSpec, ConvBnSpec, TrunkMode, TrunkPlan};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Shape of a [`SmallResNet`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmallResNetConfig {
    /// Input channels (1 for Fashion-MNIST, 3 for CIFAR).
    pub in_channels: usize,
    /// Output channels of each stage (the stem has the first width).
    pub widths: Vec<usize>,
    /// Stride of each stage.
    pub strides: Vec<usize>,
}

impl Default for SmallResNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 1,
            widths: vec![32, 64, 128],
            strides: vec![1, 2, 2],
        }
    }
}

/// A ResNet BasicBlock: conv3×3–BN–ReLU–conv3×3–BN, plus a shortcut
/// (1×1 conv + BN when the shape changes), ReLU.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    short: Option<(Conv2d, BatchNorm)>,
}

impl BasicBlock {
    /// A block from `cin` to `cout` channels with `stride`.
    ///
    /// # Errors
    /// The builders failed.
    pub fn new(cin: usize, cout: usize, stride: usize, b: &Builders) -> Result<Self> {
        let conv1 = Conv2d::new(cin, cout, 3, stride, 1, false, b.params.pp("conv1"))?;
        let bn1 = BatchNorm::new(cout, &b.pp("bn1"))?;
        let conv2 = Conv2d::new(cout, cout, 3, 1, 1, false, b.params.pp("conv2"))?;
        let bn2 = BatchNorm::new(cout, &b.pp("bn2"))?;
        let short = if stride != 1 || cin != cout {
            let s = b.pp("short");
            Some((
                Conv2d::new(cin, cout, 1, stride, 0, false, s.params.pp("0"))?,
                BatchNorm::new(cout, &s.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            short,
        })
    }

    /// `(n, h, w, cin)` → `(n, h/stride, w/stride, cout)`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = self.bn1.forward_t(&self.conv1.forward(x)?, train, true)?;
        let out = self.bn2.forward_t(&self.conv2.forward(&out)?, train, false)?;
        let short = match &self.short {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train, false)?,
            None => x.clone(),
        };
        ops::add_relu(&out, &short)
    }
}

/// The reference encoder: stem conv3×3 + BN + ReLU, one [`BasicBlock`] per
/// stage, global average pooling → `widths.last()` features.
#[derive(Debug, Clone)]
pub struct SmallResNet {
    stem_conv: Conv2d,
    stem_bn: BatchNorm,
    stages: Vec<BasicBlock>,
    out_dim: usize,
    plan: Arc<TrunkPlan>,
    /// Run the whole trunk as one fused op on the CPU (default); off = layer by layer.
    pub fused: bool,
}

impl SmallResNet {
    /// Builds the encoder.
    ///
    /// # Errors
    /// An invalid config (empty or mismatched widths/strides) or a builder failure.
    pub fn new(cfg: &SmallResNetConfig, b: &Builders) -> Result<Self> {
        if cfg.widths.is_empty() || cfg.widths.len() != cfg.strides.len() {
            candle_core::bail!("model.widths and model.strides must be non-empty and of equal length")
        }
        let stem = b.pp("stem");
        let stem_conv = Conv2d::new(cfg.in_channels, cfg.widths[0], 3, 1, 1, false, stem.params.pp("0"))?;
        let stem_bn = BatchNorm::new(cfg.widths[0], &stem.pp("1"))?;
        let mut stages = Vec::new();
        let mut cin = cfg.widths[0];
        for (i, (&w, &s)) in cfg.widths.iter().zip(&cfg.strides).enumerate() {
            stages.push(BasicBlock::new(cin, w, s, &b.pp("stages").pp(i))?);
            cin = w;
        }
        let unit = |cin: usize, cout: usize, k: usize, stride: usize| ConvBnSpec {
            cin,
            cout,
            k,
            stride,
            pad: k / 2,
        };
        let mut blocks = Vec::new();
        let mut c = cfg.widths[0];
        for (&w, &s) in cfg.widths.iter().zip(&cfg.strides) {
            blocks.push(BlockSpec {
                conv1: unit(c, w, 3, s),
                conv2: unit(w, w, 3, 1),
                short: (s != 1 || c != w).then(|| unit(c, w, 1, s)),
            });
            c = w;
        }
        let plan = Arc::new(TrunkPlan {
            stem: unit(cfg.in_channels, cfg.widths[0], 3, 1),
            blocks,
            eps: 1e-5,
        });
        Ok(Self {
            stem_conv,
            stem_bn,
            stages,
            out_dim: cin,
            plan,
            fused: true,
        })
    }

    /// Every conv–BN unit in the fused trunk's order.
    fn units(&self) -> Vec<(&Conv2d, &BatchNorm)> {
        let mut v = vec![(&self.stem_conv, &self.stem_bn)];
        for s in &self.stages {
            v.push((&s.conv1, &s.bn1));
            v.push((&s.conv2, &s.bn2));
            if let Some((c, b)) = &s.short {
                v.push((c, b));
            }
        }
        v
    }

    fn forward_fused(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let units = self.units();
        let mut flat = Vec::with_capacity(3 * units.len());
        for (conv, bn) in &units {
            flat.push(conv.weight().flatten_all()?);
            flat.push(bn.weight().clone());
            flat.push(bn.bias().clone());
        }
        let params = Tensor::cat(&flat, 0)?;
        let mode = if train {
            TrunkMode::Train
        } else {
            TrunkMode::Eval(units.iter().map(|(_, bn)| bn.running_stats()).collect::<Result<_>>()?)
        };
        let (y, stats) = resnet_trunk(x, &params, &self.plan, mode)?;
        if train {
            let n = x.dim(0)?;
            let mut hw = (x.dim(1)?, x.dim(2)?);
            let mut counts = Vec::new();
            // per-unit output pixels: stem keeps the size; block units follow their stride
            counts.push(n * hw.0 * hw.1);
            for b in &self.plan.blocks {
                let s = b.conv1.stride;
                let out = ((hw.0 + 2 - 3) / s + 1, (hw.1 + 2 - 3) / s + 1);
                counts.push(n * out.0 * out.1);
                counts.push(n * out.0 * out.1);
                if b.short.is_some() {
                    counts.push(n * out.0 * out.1);
                }
                hw = out;
            }
            for (((_, bn), (mean, var)), count) in units.iter().zip(stats).zip(counts) {
                bn.update_running(mean, var, count)?;
            }
        }
        Ok(y)
    }

    /// Feature size.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Images `(n, c, h, w)` (NCHW, as batches come) → features `(n, out_dim)`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        let x = if c == 1 {
            xs.reshape((n, h, w, 1))?
        } else {
            xs.permute((0, 2, 3, 1))?.contiguous()?
        };
        if self.fused && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            return self.forward_fused(&x, train);
        }
        let mut x = self.stem_bn.forward_t(&self.stem_conv.forward(&x)?, train, true)?;
        for s in &self.stages {
            x = s.forward_t(&x, train)?;
        }
        ops::global_avg_pool_nhwc(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};
    use pretext_core::init::{named_tensors, named_vars};
    use pretext_core::SeededVarMap;

    fn build(cfg: &SmallResNetConfig) -> Result<(SmallResNet, SeededVarMap, VarMap)> {
        let params = SeededVarMap::from_seed(1, pretext_core::seed::INIT);
        let buffers = VarMap::new();
        let b = Builders {
            params: params.var_builder(DType::F32, &Device::Cpu),
            buffers: VarBuilder::from_varmap(&buffers, DType::F32, &Device::Cpu),
        };
        Ok((SmallResNet::new(cfg, &b)?, params, buffers))
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let b = b.flatten_all()?.to_vec1::<f32>()?;
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        Ok(a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale)
    }

    #[test]
    fn fused_trunk_matches_layer_by_layer() -> Result<()> {
        for cfg in [
            SmallResNetConfig {
                in_channels: 1,
                widths: vec![4, 8, 8],
                strides: vec![1, 2, 1],
            },
            SmallResNetConfig {
                in_channels: 3,
                widths: vec![6, 6],
                strides: vec![1, 2],
            },
        ] {
            let (fused, pf, bf) = build(&cfg)?;
            let (mut slow, ps, bs) = build(&cfg)?;
            slow.fused = false;
            let x = Tensor::randn(0f32, 1.0, (3, cfg.in_channels, 9, 9), &Device::Cpu)?;
            let r = Tensor::randn(0f32, 1.0, (3, fused.out_dim()), &Device::Cpu)?;
            let yf = fused.forward_t(&x, true)?;
            let ys = slow.forward_t(&x, true)?;
            assert!(max_rel(&yf, &ys)? < 1e-4, "features");
            let gf = (yf * &r)?.sum_all()?.backward()?;
            let gs = (ys * &r)?.sum_all()?.backward()?;
            let vf: Vec<(String, Var)> = named_vars(pf.var_map());
            let vs: Vec<(String, Var)> = named_vars(ps.var_map());
            assert_eq!(vf.len(), vs.len());
            for ((name, a), (_, b)) in vf.iter().zip(&vs) {
                let (Some(ga), Some(gb)) = (gf.get(a.as_tensor()), gs.get(b.as_tensor())) else {
                    panic!("no gradient for {name}")
                };
                let e = max_rel(ga, gb)?;
                assert!(e < 1e-4, "{name}: gradient rel err {e}");
            }
            // running statistics moved identically
            for ((name, a), (_, b)) in named_tensors(&bf).iter().zip(named_tensors(&bs).iter()) {
                let e = max_rel(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)?;
                assert!(e < 1e-5, "{name}: {e}");
            }
            // eval mode
            assert!(max_rel(&fused.forward_t(&x, false)?, &slow.forward_t(&x, false)?)? < 1e-4);
        }
        Ok(())
    }
}
