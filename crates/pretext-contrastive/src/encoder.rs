//! Image encoders: ResNets — the PyTorch reference's "small-resnet" (a 3×3
//! stem and BasicBlock stages, global average pooling) and ResNet-18 in its
//! CIFAR (3×3 stem, no max-pool) and ImageNet (7×7/2 stem + 3×3/2 max-pool)
//! forms — and Vision Transformers ([`pretext_vit::Vit`], ViT-Tiny and
//! ViT-Small widths with the configured patch size and depth), behind one
//! [`Encoder`].
//!
//! Parameter names follow the model each architecture comes from, so the
//! exported backbone loads in PyTorch unchanged:
//! - `small-resnet` (the reference's `ResNet`): `stem.0.weight`,
//!   `stem.1.*` (batch norm), `stages.{i}.conv1.weight`, `stages.{i}.bn1.*`,
//!   `stages.{i}.conv2.weight`, `stages.{i}.bn2.*`, `stages.{i}.short.{0,1}.*`
//!   (one block per stage), `stages.{i}.{j}.*` with several blocks per stage;
//! - `resnet18`, `resnet18-cifar` (torchvision's `resnet18` without `fc`):
//!   `conv1.weight`, `bn1.*`, `layer{1-4}.{0,1}.{conv1,bn1,conv2,bn2}.*`,
//!   `layer{2-4}.0.downsample.{0,1}.*`;
//! - `vit-tiny`, `vit-small`: timm's `VisionTransformer` (`cls_token`,
//!   `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.*`, `norm.*`).
//!
//! Batch-norm tensors are `weight`, `bias`, `running_mean`, `running_var`,
//! `num_batches_tracked` as in PyTorch.

use crate::trunk::{resnet_trunk, BlockSpec, ConvBnSpec, TrunkMode, TrunkPlan};
use candle_core::{Result, Tensor};
use pretext_core::nn::{BatchNorm, Builders, Conv2d};
use pretext_core::ops;
use pretext_vit::{Vit, VitDims, VitSize};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The encoder of a run: a ResNet or a Vision Transformer.
#[derive(Debug, Clone)]
pub enum Encoder {
    /// A ResNet (`small-resnet`, `resnet18-cifar`, `resnet18`).
    ResNet(ResNet),
    /// A Vision Transformer (`vit-tiny`, `vit-small`) and its width.
    Vit(Box<Vit>, VitSize),
}

impl Encoder {
    /// Builds the encoder `cfg` describes.
    ///
    /// # Errors
    /// An invalid config or a builder failure.
    pub fn new(cfg: &EncoderConfig, b: &Builders) -> Result<Self> {
        match cfg.vit(cfg.image_size) {
            Some((size, dims)) => {
                cfg.validate()
                    .map_err(|e| candle_core::Error::msg(format!("config: {e}")))?;
                Ok(Self::Vit(Box::new(Vit::new(&dims, &b.params)?), size))
            }
            None => Ok(Self::ResNet(ResNet::new(cfg, b)?)),
        }
    }

    /// Feature size.
    pub fn out_dim(&self) -> usize {
        match self {
            Self::ResNet(r) => r.out_dim(),
            Self::Vit(v, _) => v.out_dim(),
        }
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        match self {
            Self::ResNet(r) => r.arch(),
            Self::Vit(_, VitSize::VitSmall) => Arch::VitSmall,
            Self::Vit(_, VitSize::VitTiny) => Arch::VitTiny,
        }
    }

    /// Images `(n, c, h, w)` (NCHW, as batches come) → features `(n, out_dim)`;
    /// `train` selects batch statistics in a ResNet (a ViT has no batch norm
    /// and no dropout: the same either way).
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::ResNet(r) => r.forward_t(xs, train),
            Self::Vit(v, _) => v.forward(xs),
        }
    }
}

/// Which encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// The reference's small ResNet: `widths`, `strides`, `blocks` as configured, 3×3 stem.
    SmallResnet,
    /// ResNet-18 for 32×32 inputs: 3×3 stem, no max-pool, widths 64–512, two blocks per stage.
    Resnet18Cifar,
    /// ResNet-18 as in torchvision: 7×7/2 stem and 3×3/2 max-pool, widths 64–512.
    Resnet18,
    /// ViT-Tiny's width (192, 3 heads) with `patch_size` and `depth` as configured.
    VitTiny,
    /// ViT-Small's width (384, 6 heads) with `patch_size` and `depth` as configured.
    VitSmall,
}

impl Arch {
    /// The name used in configs and metadata.
    pub fn name(self) -> &'static str {
        match self {
            Arch::SmallResnet => "small-resnet",
            Arch::Resnet18Cifar => "resnet18-cifar",
            Arch::Resnet18 => "resnet18",
            Arch::VitTiny => "vit-tiny",
            Arch::VitSmall => "vit-small",
        }
    }

    /// Every architecture, in the order messages list them.
    pub const ALL: [Self; 5] = [
        Arch::SmallResnet,
        Arch::Resnet18Cifar,
        Arch::Resnet18,
        Arch::VitTiny,
        Arch::VitSmall,
    ];

    /// The architecture called `name` in configs.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// A Vision Transformer.
    pub fn is_vit(self) -> bool {
        self.vit_size().is_some()
    }

    /// The ViT width of a ViT architecture.
    pub fn vit_size(self) -> Option<VitSize> {
        match self {
            Arch::VitTiny => Some(VitSize::VitTiny),
            Arch::VitSmall => Some(VitSize::VitSmall),
            _ => None,
        }
    }

    fn torchvision_names(self) -> bool {
        matches!(self, Arch::Resnet18Cifar | Arch::Resnet18)
    }
}

/// Shape of an [`Encoder`] (the `model.encoder` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    /// `small-resnet` (default), `resnet18-cifar`, `resnet18`, `vit-tiny` or
    /// `vit-small`. The ResNet-18 variants fix widths, strides and blocks and
    /// ignore those keys; the ViTs read `patch_size` and `depth` only.
    pub arch: Arch,
    /// Input channels (1 for Fashion-MNIST, 3 for CIFAR).
    pub in_channels: usize,
    /// Output channels of each stage (the stem has the first width).
    pub widths: Vec<usize>,
    /// Stride of each stage.
    pub strides: Vec<usize>,
    /// BasicBlocks per stage (empty = one each).
    pub blocks: Vec<usize>,
    /// ViT: side of a square patch (it must divide `data.image_size`, and
    /// DINO's `local_size`).
    pub patch_size: usize,
    /// ViT: transformer blocks.
    pub depth: usize,
    /// ViT: side of the training images, which sizes the position
    /// embeddings; set from `data.image_size` when a run builds its model.
    #[serde(skip)]
    pub image_size: usize,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            arch: Arch::SmallResnet,
            in_channels: 1,
            widths: vec![32, 64, 128],
            strides: vec![1, 2, 2],
            blocks: vec![],
            patch_size: 4,
            depth: 12,
            image_size: 28,
        }
    }
}

impl EncoderConfig {
    /// The ViT's width and shape for `image_size` images (`None` for a ResNet).
    pub fn vit(&self, image_size: usize) -> Option<(VitSize, VitDims)> {
        self.arch
            .vit_size()
            .map(|v| (v, v.dims(image_size, self.patch_size, self.in_channels, self.depth)))
    }

    /// Stage widths, strides and block counts after the architecture's presets.
    pub fn stages(&self) -> Vec<(usize, usize, usize)> {
        match self.arch {
            Arch::SmallResnet => self
                .widths
                .iter()
                .zip(&self.strides)
                .enumerate()
                .map(|(i, (&w, &s))| (w, s, self.blocks.get(i).copied().unwrap_or(1)))
                .collect(),
            Arch::Resnet18Cifar | Arch::Resnet18 => vec![(64, 1, 2), (128, 2, 2), (256, 2, 2), (512, 2, 2)],
            Arch::VitTiny | Arch::VitSmall => vec![],
        }
    }

    /// Checks the shape.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        if self.in_channels == 0 {
            return Err(InvalidSetting::value("model.encoder.in_channels", 0, "must be > 0"));
        }
        if let Some((_, dims)) = self.vit(self.image_size) {
            if let Err((key, reason)) = dims.check() {
                let key = match key {
                    "patch_size" => "model.encoder.patch_size",
                    "depth" => "model.encoder.depth",
                    "image_size" => "data.image_size",
                    _ => "model.encoder.arch",
                };
                return Err(InvalidSetting::new(key, reason));
            }
        }
        if self.arch == Arch::SmallResnet {
            if self.widths.is_empty() || self.widths.len() != self.strides.len() {
                return Err(InvalidSetting::new(
                    "model.encoder.widths",
                    format!(
                        "{:?} and model.encoder.strides {:?} must be non-empty and of equal length",
                        self.widths, self.strides
                    ),
                ));
            }
            if !self.blocks.is_empty() && self.blocks.len() != self.widths.len() {
                return Err(InvalidSetting::value(
                    "model.encoder.blocks",
                    format!("{:?}", self.blocks),
                    "must be empty or have one count per stage",
                ));
            }
            for (key, values) in [
                ("model.encoder.widths", &self.widths),
                ("model.encoder.strides", &self.strides),
                ("model.encoder.blocks", &self.blocks),
            ] {
                if values.contains(&0) {
                    return Err(InvalidSetting::value(key, format!("{values:?}"), "must all be > 0"));
                }
            }
        }
        Ok(())
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
    /// A block from `cin` to `cout` channels with `stride`;
    /// `torchvision` names the shortcut `downsample` (else `short`).
    ///
    /// # Errors
    /// The builders failed.
    pub fn new(cin: usize, cout: usize, stride: usize, b: &Builders, torchvision: bool) -> Result<Self> {
        let conv1 = Conv2d::new(cin, cout, 3, stride, 1, false, b.params.pp("conv1"))?;
        let bn1 = BatchNorm::new(cout, &b.pp("bn1"))?;
        let conv2 = Conv2d::new(cout, cout, 3, 1, 1, false, b.params.pp("conv2"))?;
        let bn2 = BatchNorm::new(cout, &b.pp("bn2"))?;
        let short = if stride != 1 || cin != cout {
            let s = b.pp(if torchvision { "downsample" } else { "short" });
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

/// A ResNet encoder: stem conv + BN + ReLU (+ max-pool for `resnet18`),
/// BasicBlock stages, global average pooling → `out_dim` features.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem_conv: Conv2d,
    stem_bn: BatchNorm,
    max_pool: bool,
    stages: Vec<BasicBlock>,
    out_dim: usize,
    plan: Arc<TrunkPlan>,
    arch: Arch,
    /// Run the whole trunk as one fused op on the CPU (default; not with the
    /// max-pool stem); off = layer by layer.
    pub fused: bool,
}

impl ResNet {
    /// Builds the encoder.
    ///
    /// # Errors
    /// An invalid config or a builder failure.
    pub fn new(cfg: &EncoderConfig, b: &Builders) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::msg(format!("config: {e}")))?;
        if cfg.arch.is_vit() {
            candle_core::bail!("{} is not a ResNet (build it with Encoder::new)", cfg.arch.name());
        }
        let stages_cfg = cfg.stages();
        let tv = cfg.arch.torchvision_names();
        let w0 = stages_cfg[0].0;
        let (stem_k, stem_stride) = if cfg.arch == Arch::Resnet18 { (7, 2) } else { (3, 1) };
        let (stem_conv, stem_bn) = if tv {
            (
                Conv2d::new(
                    cfg.in_channels,
                    w0,
                    stem_k,
                    stem_stride,
                    stem_k / 2,
                    false,
                    b.params.pp("conv1"),
                )?,
                BatchNorm::new(w0, &b.pp("bn1"))?,
            )
        } else {
            let stem = b.pp("stem");
            (
                Conv2d::new(cfg.in_channels, w0, 3, 1, 1, false, stem.params.pp("0"))?,
                BatchNorm::new(w0, &stem.pp("1"))?,
            )
        };
        let unit = |cin: usize, cout: usize, k: usize, stride: usize| ConvBnSpec {
            cin,
            cout,
            k,
            stride,
            pad: k / 2,
        };
        let mut stages = Vec::new();
        let mut blocks = Vec::new();
        let mut cin = w0;
        for (i, &(w, s, n)) in stages_cfg.iter().enumerate() {
            for j in 0..n {
                let stride = if j == 0 { s } else { 1 };
                let bb = if tv {
                    b.pp(format!("layer{}", i + 1)).pp(j)
                } else if n == 1 {
                    b.pp("stages").pp(i)
                } else {
                    b.pp("stages").pp(i).pp(j)
                };
                stages.push(BasicBlock::new(cin, w, stride, &bb, tv)?);
                blocks.push(BlockSpec {
                    conv1: unit(cin, w, 3, stride),
                    conv2: unit(w, w, 3, 1),
                    short: (stride != 1 || cin != w).then(|| unit(cin, w, 1, stride)),
                });
                cin = w;
            }
        }
        let plan = Arc::new(TrunkPlan {
            stem: unit(cfg.in_channels, w0, 3, 1),
            blocks,
            eps: 1e-5,
        });
        Ok(Self {
            stem_conv,
            stem_bn,
            max_pool: cfg.arch == Arch::Resnet18,
            stages,
            out_dim: cin,
            plan,
            arch: cfg.arch,
            fused: true,
        })
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.arch
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
                bn.update_running(mean, var, pretext_core::dist::norm_rows(count))?;
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
        if self.fused && !self.max_pool && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            return self.forward_fused(&x, train);
        }
        let mut x = self.stem_bn.forward_t(&self.stem_conv.forward(&x)?, train, true)?;
        if self.max_pool {
            x = max_pool_3x3_s2_nhwc(&x)?;
        }
        for s in &self.stages {
            x = s.forward_t(&x, train)?;
        }
        ops::global_avg_pool_nhwc(&x)
    }
}

/// 3×3 max-pool, stride 2, padding 1 on `(n, h, w, c)` (as torchvision's
/// ResNet stem): pretext's op on the CPU (candle's max-pool has no backward
/// for overlapping windows); elsewhere candle's, forward only. Inputs are
/// post-ReLU (≥ 0), so zero padding equals PyTorch's −∞ padding there.
fn max_pool_3x3_s2_nhwc(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return ops::max_pool2d_nhwc(x, 3, 2, 1);
    }
    let nchw = x
        .permute((0, 3, 1, 2))?
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?;
    nchw.max_pool2d_with_stride(3, 2)?.permute((0, 2, 3, 1))?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};
    use pretext_core::init::{named_tensors, named_vars};
    use pretext_core::SeededVarMap;

    fn build(cfg: &EncoderConfig) -> Result<(ResNet, SeededVarMap, VarMap)> {
        let params = SeededVarMap::from_seed(1, pretext_core::seed::INIT);
        let buffers = VarMap::new();
        let b = Builders {
            params: params.var_builder(DType::F32, &Device::Cpu),
            buffers: VarBuilder::from_varmap(&buffers, DType::F32, &Device::Cpu),
        };
        Ok((ResNet::new(cfg, &b)?, params, buffers))
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
            EncoderConfig {
                in_channels: 1,
                widths: vec![4, 8, 8],
                strides: vec![1, 2, 1],
                blocks: vec![1, 2, 1],
                ..EncoderConfig::default()
            },
            EncoderConfig {
                in_channels: 3,
                widths: vec![6, 6],
                strides: vec![1, 2],
                ..EncoderConfig::default()
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

    /// torchvision's `resnet18().state_dict()` keys without `fc.*`, and
    /// the shapes of a few of them.
    #[test]
    fn resnet18_has_torchvision_names_and_shapes() -> Result<()> {
        let cfg = EncoderConfig {
            arch: Arch::Resnet18,
            in_channels: 3,
            ..EncoderConfig::default()
        };
        let (net, params, buffers) = build(&cfg)?;
        let mut names: Vec<String> = named_tensors(params.var_map())
            .into_iter()
            .chain(named_tensors(&buffers))
            .map(|(n, _)| n)
            .collect();
        names.sort();
        let bn = |p: &str| {
            ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
                .map(|k| format!("{p}.{k}"))
                .to_vec()
        };
        let mut want = vec!["conv1.weight".to_string()];
        want.extend(bn("bn1"));
        for l in 1..=4 {
            for j in 0..2 {
                let p = format!("layer{l}.{j}");
                want.push(format!("{p}.conv1.weight"));
                want.extend(bn(&format!("{p}.bn1")));
                want.push(format!("{p}.conv2.weight"));
                want.extend(bn(&format!("{p}.bn2")));
                if l > 1 && j == 0 {
                    want.push(format!("{p}.downsample.0.weight"));
                    want.extend(bn(&format!("{p}.downsample.1")));
                }
            }
        }
        want.sort();
        assert_eq!(names, want);
        assert_eq!(want.len(), 122 - 2); // torchvision resnet18: 122 entries with fc.weight/fc.bias
        let shapes: std::collections::HashMap<String, Vec<usize>> = named_tensors(params.var_map())
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        assert_eq!(shapes["conv1.weight"], [64, 3, 7, 7]);
        assert_eq!(shapes["layer3.0.downsample.0.weight"], [256, 128, 1, 1]);
        assert_eq!(shapes["layer4.1.conv2.weight"], [512, 512, 3, 3]);
        // 64×64 → stem /2 → pool /2 → 3 strided stages /8 → 2×2 → 512 features
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu)?;
        assert_eq!(net.forward_t(&x, true)?.dims(), [2, 512]);
        assert_eq!(net.out_dim(), 512);
        Ok(())
    }

    #[test]
    fn resnet18_cifar_keeps_the_resolution_in_the_stem_and_runs_fused() -> Result<()> {
        let cfg = EncoderConfig {
            arch: Arch::Resnet18Cifar,
            in_channels: 3,
            ..EncoderConfig::default()
        };
        let (fused, pf, _) = build(&cfg)?;
        let shapes: std::collections::HashMap<String, Vec<usize>> = named_tensors(pf.var_map())
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        assert_eq!(shapes["conv1.weight"], [64, 3, 3, 3]);
        let (mut slow, _, _) = build(&cfg)?;
        slow.fused = false;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu)?;
        let yf = fused.forward_t(&x, false)?;
        assert_eq!(yf.dims(), [2, 512]);
        assert!(max_rel(&yf, &slow.forward_t(&x, false)?)? < 1e-4);
        Ok(())
    }

    #[test]
    fn max_pool_matches_pytorch_padding() -> Result<()> {
        // 1×4×4×1 post-ReLU input 0..15: PyTorch MaxPool2d(3, 2, 1) gives [[5, 7], [13, 15]]
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 4, 4, 1))?;
        let y = max_pool_3x3_s2_nhwc(&x)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [5.0, 7.0, 13.0, 15.0]);
        Ok(())
    }

    #[test]
    fn invalid_shapes_are_rejected_by_key() {
        let cfg = EncoderConfig {
            blocks: vec![1, 2],
            ..EncoderConfig::default()
        };
        assert_eq!(cfg.validate().unwrap_err().key, "model.encoder.blocks");
        let mut cfg = EncoderConfig::default();
        cfg.strides[1] = 0;
        assert_eq!(cfg.validate().unwrap_err().key, "model.encoder.strides");
        let vit = EncoderConfig {
            arch: Arch::VitTiny,
            patch_size: 5,
            ..EncoderConfig::default()
        };
        let e = vit.validate().unwrap_err();
        assert_eq!(e.key, "model.encoder.patch_size");
        assert!(e.to_string().contains("28"), "{e}");
        let vit = EncoderConfig {
            arch: Arch::VitSmall,
            depth: 0,
            ..EncoderConfig::default()
        };
        assert_eq!(vit.validate().unwrap_err().key, "model.encoder.depth");
    }

    #[test]
    fn a_vit_encoder_has_timm_names_and_its_width() -> Result<()> {
        for (arch, width) in [(Arch::VitTiny, 192), (Arch::VitSmall, 384)] {
            let cfg = EncoderConfig {
                arch,
                depth: 1,
                patch_size: 7,
                ..EncoderConfig::default()
            };
            let params = SeededVarMap::from_seed(0, "init");
            let buffers = VarMap::new();
            let b = Builders {
                params: params.var_builder(DType::F32, &Device::Cpu),
                buffers: VarBuilder::from_varmap(&buffers, DType::F32, &Device::Cpu),
            };
            let enc = Encoder::new(&cfg, &b.pp("encoder"))?;
            assert_eq!((enc.arch(), enc.out_dim()), (arch, width));
            let names: Vec<String> = pretext_core::init::named_vars(params.var_map())
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            assert!(names.contains(&"encoder.pos_embed".to_string()), "{names:?}");
            assert!(names.contains(&"encoder.blocks.0.attn.qkv.weight".to_string()));
            assert!(buffers.all_vars().is_empty(), "a ViT has no buffers");
            let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu)?;
            assert_eq!(enc.forward_t(&x, true)?.dims(), [2, width]);
            assert!(ResNet::new(&cfg, &b).is_err(), "a ViT config is not a ResNet");
        }
        Ok(())
    }
}
