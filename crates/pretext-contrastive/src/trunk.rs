//! A whole BasicBlock ResNet trunk (stem, residual stages, global average
//! pool) as one candle custom op with a hand-written backward pass.
//!
//! candle's autograd gives every intermediate tensor a gradient made as
//! `zeros_like(t) + g`: for a ResNet on 28×28 maps that is an extra allocation,
//! a memset and an add over ~25 activations of up to 51 MB per step — as much
//! time as the convolutions themselves. Running the trunk as one node keeps
//! its activations on a private tape and back-propagates through them with
//! the kernels of [`pretext_core::ops::conv`] and [`pretext_core::ops::norm`],
//! no zero-filled buffers.
//!
//! Parameters travel as one flat tensor (the concatenation of every layer's
//! flattened weight, BN weight and BN bias, in [`TrunkPlan`] order) so the op
//! has two inputs; its gradient is split back by candle's `cat` backward.

use candle_core::{bail, Shape, Tensor};
use pretext_core::ops::activation::relu_mask;
use pretext_core::ops::conv::{
    conv2d_backward_input, conv2d_backward_input_add, conv2d_backward_input_bf16, conv2d_backward_input_bf16_add,
    conv2d_backward_weight, conv2d_backward_weight_bf16, conv2d_forward, conv2d_forward_with_stats,
    takes_bf16_gradient, ConvGeom,
};
use pretext_core::ops::fused::{apply, values, FusedOp, Operand};
use pretext_core::ops::norm::{self, ChannelAffine, ReluMask, Shortcut};
use pretext_core::ops::pool::{global_avg_pool, global_avg_pool_backward};
use std::sync::{Arc, Mutex};

/// One convolution followed by batch norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvBnSpec {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub pad: usize,
}

impl ConvBnSpec {
    /// Parameters: conv weight, BN weight, BN bias.
    pub fn param_len(&self) -> usize {
        self.cout * self.cin * self.k * self.k + 2 * self.cout
    }
}

/// A BasicBlock: conv1–BN–ReLU, conv2–BN, optional conv–BN shortcut, add, ReLU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpec {
    /// First conv.
    pub conv1: ConvBnSpec,
    /// Second conv.
    pub conv2: ConvBnSpec,
    /// Projection shortcut.
    pub short: Option<ConvBnSpec>,
}

/// The trunk: a conv–BN–ReLU stem, then blocks, then global average pooling.
/// Parameter order: stem, then per block conv1, conv2, short; per unit conv
/// weight `(o, c, k, k)`, BN weight `(o)`, BN bias `(o)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrunkPlan {
    /// The stem.
    pub stem: ConvBnSpec,
    /// The residual blocks.
    pub blocks: Vec<BlockSpec>,
    /// BN epsilon.
    pub eps: f64,
}

impl TrunkPlan {
    /// Every conv–BN unit in parameter order.
    pub fn units(&self) -> Vec<ConvBnSpec> {
        let mut v = vec![self.stem];
        for b in &self.blocks {
            v.push(b.conv1);
            v.push(b.conv2);
            if let Some(s) = b.short {
                v.push(s);
            }
        }
        v
    }

    /// Length of the flat parameter vector.
    pub fn param_len(&self) -> usize {
        self.units().iter().map(ConvBnSpec::param_len).sum()
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.blocks.last().map_or(self.stem.cout, |b| b.conv2.cout)
    }
}

/// Batch statistics of every BN unit of one forward pass, in unit order: (mean, biased var).
pub type TrunkStats = Vec<(Vec<f32>, Vec<f32>)>;

/// How the trunk's BN layers get their statistics.
#[derive(Debug, Clone)]
pub enum TrunkMode {
    /// Batch statistics (training).
    Train,
    /// Fixed statistics per unit (evaluation): (running mean, running var).
    Eval(Vec<(Vec<f32>, Vec<f32>)>),
}

/// What the forward pass keeps for the backward pass of one unit.
struct UnitTape {
    geom: ConvGeom,
    /// Pre-BN conv output.
    z: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    /// The batch norm as an affine map (for the ReLU mask after it).
    map: ChannelAffine,
    /// Offset of the unit's parameters in the flat vector.
    offset: usize,
}

/// One residual block's units, its first unit's output (the second's
/// input) and the block's output.
struct BlockTape {
    conv1: UnitTape,
    /// `relu(bn(conv1))`.
    y1: Vec<f32>,
    conv2: UnitTape,
    short: Option<UnitTape>,
    /// `relu(bn(conv2) + shortcut)`.
    out: Vec<f32>,
}

struct Tape {
    stem: UnitTape,
    /// The stem's output `relu(bn(stem))`, the first block's input.
    stem_out: Vec<f32>,
    blocks: Vec<BlockTape>,
    final_hw: (usize, usize, usize),
    n: usize,
}

impl Tape {
    /// The input of block `i`.
    fn block_input(&self, i: usize) -> &[f32] {
        if i == 0 {
            &self.stem_out
        } else {
            &self.blocks[i - 1].out
        }
    }
}

struct TrunkOp {
    plan: Arc<TrunkPlan>,
    mode: TrunkMode,
    tape: Arc<Mutex<Option<Tape>>>,
    stats: Arc<Mutex<TrunkStats>>,
}

impl TrunkOp {
    /// The convolution of one unit and its batch norm's statistics; returns
    /// the tape, which holds the norm as an affine map (applied by the
    /// caller, fused with what follows it).
    #[allow(clippy::too_many_arguments)]
    fn unit_forward(
        &self,
        spec: &ConvBnSpec,
        x: &[f32],
        (n, h, w): (usize, usize, usize),
        params: &[f32],
        offset: usize,
        index: usize,
    ) -> candle_core::Result<UnitTape> {
        let Some(geom) = ConvGeom::new(n, h, w, spec.cin, spec.cout, spec.k, spec.k, spec.stride, spec.pad) else {
            bail!("resnet trunk: a {}x{} kernel does not fit {h}x{w} maps", spec.k, spec.k)
        };
        let wl = spec.cout * spec.cin * spec.k * spec.k;
        let wt = &params[offset..offset + wl];
        let gamma = &params[offset + wl..offset + wl + spec.cout];
        let beta = &params[offset + wl + spec.cout..offset + wl + 2 * spec.cout];
        let (z, (mean, var)) = match &self.mode {
            TrunkMode::Train => conv2d_forward_with_stats(x, wt, &geom),
            TrunkMode::Eval(s) => (conv2d_forward(x, wt, &geom), s[index].clone()),
        };
        let invstd: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (f64::from(*v) + self.plan.eps).sqrt()) as f32)
            .collect();
        let map = ChannelAffine::new(&mean, &invstd, gamma, beta);
        if let Ok(mut s) = self.stats.lock() {
            s.push((mean.clone(), var));
        }
        Ok(UnitTape {
            geom,
            z,
            mean,
            invstd,
            map,
            offset,
        })
    }

    /// Back-propagates `dy` through one unit's batch norm (and the ReLU
    /// after it with `relu`) and its weight gradient; accumulates parameter
    /// grads into `dparams` and returns the gradient at the convolution's
    /// output, for its input gradient: rounded to bf16 where the
    /// convolution's backward passes would round it anyway.
    fn unit_backward(
        &self,
        u: &UnitTape,
        x: &[f32],
        dy: &[f32],
        relu: bool,
        params: &[f32],
        dparams: &mut [f32],
    ) -> ConvGradient {
        let g = &u.geom;
        let wl = g.o * g.c * g.kh * g.kw;
        let gamma = &params[u.offset + wl..u.offset + wl + g.o];
        let batch = matches!(self.mode, TrunkMode::Train);
        let mask = if relu {
            ReluMask::AfterNorm(&u.map)
        } else {
            ReluMask::None
        };
        let (dz, dgamma, dbeta) = if takes_bf16_gradient(g) {
            let (d, a, b) = norm::bn_backward::<u16>(&u.z, dy, mask, g.o, &u.mean, &u.invstd, gamma, batch);
            (ConvGradient::Bf16(d), a, b)
        } else {
            let (d, a, b) = norm::bn_backward::<f32>(&u.z, dy, mask, g.o, &u.mean, &u.invstd, gamma, batch);
            (ConvGradient::F32(d), a, b)
        };
        let dw = match &dz {
            ConvGradient::F32(d) => conv2d_backward_weight(x, d, g),
            ConvGradient::Bf16(d) => conv2d_backward_weight_bf16(x, d, g),
        };
        for (d, v) in dparams[u.offset..u.offset + wl].iter_mut().zip(&dw) {
            *d += v;
        }
        for (d, v) in dparams[u.offset + wl..u.offset + wl + g.o].iter_mut().zip(&dgamma) {
            *d += v;
        }
        for (d, v) in dparams[u.offset + wl + g.o..u.offset + wl + 2 * g.o]
            .iter_mut()
            .zip(&dbeta)
        {
            *d += v;
        }
        dz
    }

    /// The unit's weights.
    fn weights<'p>(u: &UnitTape, params: &'p [f32]) -> &'p [f32] {
        let g = &u.geom;
        &params[u.offset..u.offset + g.o * g.c * g.kh * g.kw]
    }

    /// The unit's input gradient from the gradient at its output.
    fn input_gradient(u: &UnitTape, dz: &ConvGradient, params: &[f32]) -> Vec<f32> {
        let w = Self::weights(u, params);
        match dz {
            ConvGradient::F32(d) => conv2d_backward_input(d, w, &u.geom),
            ConvGradient::Bf16(d) => conv2d_backward_input_bf16(d, w, &u.geom),
        }
    }

    /// [`Self::input_gradient`] added to `dx`.
    fn add_input_gradient(u: &UnitTape, dz: &ConvGradient, params: &[f32], dx: &mut [f32]) {
        let w = Self::weights(u, params);
        match dz {
            ConvGradient::F32(d) => conv2d_backward_input_add(d, w, &u.geom, dx),
            ConvGradient::Bf16(d) => conv2d_backward_input_bf16_add(d, w, &u.geom, dx),
        }
    }
}

/// The gradient at a convolution's output: f32, or rounded to bf16 (bits)
/// where both its backward passes run bf16 products
/// ([`takes_bf16_gradient`]), which round it to the same bits from twice
/// the memory.
enum ConvGradient {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl FusedOp<2> for TrunkOp {
    const NAME: &'static str = "pretext-resnet-trunk";

    fn forward(&self, [x, params]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let &[n, h, w, c] = x.dims else {
            bail!("resnet trunk: expects x (n, h, w, c), got {:?}", x.dims)
        };
        if c != self.plan.stem.cin {
            bail!(
                "resnet trunk: input has {c} channels, the stem expects {}",
                self.plan.stem.cin
            )
        }
        let (x, params) = (x.data, params.data);
        if params.len() != self.plan.param_len() {
            bail!(
                "resnet trunk: {} parameters, the plan needs {}",
                params.len(),
                self.plan.param_len()
            )
        }
        if let Ok(mut s) = self.stats.lock() {
            s.clear();
        }
        let mut offset = 0;
        let mut index = 0;
        let stem = self.unit_forward(&self.plan.stem, x, (n, h, w), params, offset, index)?;
        offset += self.plan.stem.param_len();
        index += 1;
        let (mut hh, mut ww) = (stem.geom.oh, stem.geom.ow);
        let stem_out = stem.map.apply(&stem.z, true);
        let mut blocks: Vec<BlockTape> = Vec::new();
        for b in &self.plan.blocks {
            let xin = blocks.last().map_or(&stem_out, |t| &t.out);
            let conv1 = self.unit_forward(&b.conv1, xin, (n, hh, ww), params, offset, index)?;
            offset += b.conv1.param_len();
            index += 1;
            let y1 = conv1.map.apply(&conv1.z, true);
            let (oh, ow) = (conv1.geom.oh, conv1.geom.ow);
            let conv2 = self.unit_forward(&b.conv2, &y1, (n, oh, ow), params, offset, index)?;
            offset += b.conv2.param_len();
            index += 1;
            let (short, out) = match b.short {
                Some(s) => {
                    let us = self.unit_forward(&s, xin, (n, hh, ww), params, offset, index)?;
                    offset += s.param_len();
                    index += 1;
                    if us.z.len() != conv2.z.len() {
                        bail!("resnet trunk: the projection's output does not match the block's")
                    }
                    let out = norm::bn_add_relu(&conv2.z, &conv2.map, Shortcut::Normalised(&us.z, &us.map));
                    (Some(us), out)
                }
                None => {
                    if xin.len() != conv2.z.len() {
                        bail!("resnet trunk: identity shortcut needs equal shapes")
                    }
                    (None, norm::bn_add_relu(&conv2.z, &conv2.map, Shortcut::Identity(xin)))
                }
            };
            blocks.push(BlockTape {
                conv1,
                y1,
                conv2,
                short,
                out,
            });
            hh = oh;
            ww = ow;
        }
        let cout = self.plan.out_dim();
        let last = blocks.last().map_or(&stem_out, |t| &t.out);
        let feats = global_avg_pool(last, n, hh * ww, cout);
        if let Ok(mut t) = self.tape.lock() {
            *t = Some(Tape {
                stem,
                stem_out,
                blocks,
                final_hw: (hh, ww, cout),
                n,
            });
        }
        Ok((feats, Shape::from((n, cout))))
    }

    fn backward(
        &self,
        [x, params]: [&Tensor; 2],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        let Some(tape) = self.tape.lock().ok().and_then(|mut t| t.take()) else {
            bail!("resnet trunk: backward without forward (or run twice)")
        };
        let (p, xin, dfeat) = (values(params)?, values(x)?, values(grad)?);
        let mut dp = vec![0f32; p.len()];
        let (hh, ww, c) = tape.final_hw;
        // gradient w.r.t. the last block's output
        let mut dout = global_avg_pool_backward(&dfeat, tape.n, hh * ww, c);
        for (bi, t) in tape.blocks.iter().enumerate().rev() {
            let g = relu_mask(&dout, &t.out); // through the final ReLU
            let input = tape.block_input(bi);
            // The main branch's gradient at the block's input, and the
            // shortcut's added to it: a projection's (stride 2, 1×1) reaches
            // a quarter of the input pixels, so adding it into the main
            // branch's needs no zeroed map; an identity's is `g` itself.
            let dz2 = self.unit_backward(&t.conv2, &t.y1, &g, false, &p, &mut dp);
            let da = Self::input_gradient(&t.conv2, &dz2, &p);
            drop(dz2);
            let dzs = t
                .short
                .as_ref()
                .map(|us| (us, self.unit_backward(us, input, &g, false, &p, &mut dp)));
            let dz1 = self.unit_backward(&t.conv1, input, &da, true, &p, &mut dp);
            let dx = match dzs {
                Some((us, dzs)) => {
                    let mut dx = Self::input_gradient(&t.conv1, &dz1, &p);
                    Self::add_input_gradient(us, &dzs, &p, &mut dx);
                    dx
                }
                None => {
                    let mut dx = g;
                    Self::add_input_gradient(&t.conv1, &dz1, &p, &mut dx);
                    dx
                }
            };
            dout = dx;
        }
        let _ = self.unit_backward(&tape.stem, &xin, &dout, true, &p, &mut dp);
        let dparams = Tensor::from_vec(dp, params.shape(), params.device())?;
        Ok([None, Some(dparams)])
    }
}

/// Runs the trunk on NHWC `x` `(n, h, w, c)` with the flat `params`; returns
/// features `(n, out_dim)` and each BN unit's batch statistics (train mode).
/// No gradient flows to `x` (it is the data).
///
/// # Errors
/// Shapes that do not fit the plan; not on the CPU or not f32.
pub fn resnet_trunk(
    x: &Tensor,
    params: &Tensor,
    plan: &Arc<TrunkPlan>,
    mode: TrunkMode,
) -> candle_core::Result<(Tensor, TrunkStats)> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        bail!("resnet trunk: the fused trunk runs on the CPU in f32; use the layer-by-layer path elsewhere")
    }
    let stats = Arc::new(Mutex::new(Vec::new()));
    let op = TrunkOp {
        plan: plan.clone(),
        mode,
        tape: Arc::new(Mutex::new(None)),
        stats: stats.clone(),
    };
    let y = apply([&x.contiguous()?, &params.contiguous()?], op)?;
    let s = stats.lock().map(|s| s.clone()).unwrap_or_default();
    Ok((y, s))
}
