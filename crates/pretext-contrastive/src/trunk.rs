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
use pretext_core::ops::activation::{add_relu_kernel, relu_mask};
use pretext_core::ops::conv::{conv2d_backward_input, conv2d_backward_weight, conv2d_forward, ConvGeom};
use pretext_core::ops::fused::{apply, values, FusedOp, Operand};
use pretext_core::ops::norm;
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
    /// Post-BN (and ReLU if `relu`) output.
    y: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    relu: bool,
    /// Offset of the unit's parameters in the flat vector.
    offset: usize,
}

struct Tape {
    /// Block inputs (index 0 = trunk input), needed by conv1 and the shortcut.
    acts: Vec<Vec<f32>>,
    units: Vec<UnitTape>,
    final_hw: (usize, usize, usize),
    n: usize,
}

struct TrunkOp {
    plan: Arc<TrunkPlan>,
    mode: TrunkMode,
    tape: Arc<Mutex<Option<Tape>>>,
    stats: Arc<Mutex<TrunkStats>>,
}

impl TrunkOp {
    #[allow(clippy::too_many_arguments)]
    fn unit_forward(
        &self,
        spec: &ConvBnSpec,
        x: &[f32],
        (n, h, w): (usize, usize, usize),
        params: &[f32],
        offset: usize,
        index: usize,
        relu: bool,
    ) -> candle_core::Result<UnitTape> {
        let Some(geom) = ConvGeom::new(n, h, w, spec.cin, spec.cout, spec.k, spec.k, spec.stride, spec.pad) else {
            bail!("resnet trunk: a {}x{} kernel does not fit {h}x{w} maps", spec.k, spec.k)
        };
        let wl = spec.cout * spec.cin * spec.k * spec.k;
        let wt = &params[offset..offset + wl];
        let gamma = &params[offset + wl..offset + wl + spec.cout];
        let beta = &params[offset + wl + spec.cout..offset + wl + 2 * spec.cout];
        let z = conv2d_forward(x, wt, &geom);
        let (mean, var) = match &self.mode {
            TrunkMode::Train => norm::channel_stats(&z, spec.cout),
            TrunkMode::Eval(s) => s[index].clone(),
        };
        let invstd: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (f64::from(*v) + self.plan.eps).sqrt()) as f32)
            .collect();
        let y = norm::bn_apply(&z, spec.cout, &mean, &invstd, gamma, beta, relu);
        if let Ok(mut s) = self.stats.lock() {
            s.push((mean.clone(), var));
        }
        Ok(UnitTape {
            geom,
            z,
            y,
            mean,
            invstd,
            relu,
            offset,
        })
    }

    /// Back-propagates `dy` through one unit; accumulates parameter grads into
    /// `dparams` and returns the input gradient (if `need_dx`).
    fn unit_backward(
        &self,
        u: &UnitTape,
        x: &[f32],
        dy: &[f32],
        params: &[f32],
        dparams: &mut [f32],
        need_dx: bool,
    ) -> Option<Vec<f32>> {
        let g = &u.geom;
        let wl = g.o * g.c * g.kh * g.kw;
        let gamma = &params[u.offset + wl..u.offset + wl + g.o];
        let batch = matches!(self.mode, TrunkMode::Train);
        let (dz, dgamma, dbeta) = norm::bn_backward(&u.z, dy, &u.y, g.o, &u.mean, &u.invstd, gamma, u.relu, batch);
        let dw = conv2d_backward_weight(x, &dz, g);
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
        need_dx.then(|| conv2d_backward_input(&dz, &params[u.offset..u.offset + wl], g))
    }
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
        let mut units = Vec::new();
        let mut offset = 0;
        let mut index = 0;
        let stem = self.unit_forward(&self.plan.stem, x, (n, h, w), params, offset, index, true)?;
        offset += self.plan.stem.param_len();
        index += 1;
        let (mut hh, mut ww) = (stem.geom.oh, stem.geom.ow);
        let mut acts = vec![stem.y.clone()];
        units.push(stem);
        for b in &self.plan.blocks {
            let input = acts.len() - 1;
            let xin = &acts[input];
            let u1 = self.unit_forward(&b.conv1, xin, (n, hh, ww), params, offset, index, true)?;
            offset += b.conv1.param_len();
            index += 1;
            let (oh, ow) = (u1.geom.oh, u1.geom.ow);
            let u2 = self.unit_forward(&b.conv2, &u1.y, (n, oh, ow), params, offset, index, false)?;
            offset += b.conv2.param_len();
            index += 1;
            let out = match b.short {
                Some(s) => {
                    let us = self.unit_forward(&s, xin, (n, hh, ww), params, offset, index, false)?;
                    offset += s.param_len();
                    index += 1;
                    let o = add_relu_kernel(&u2.y, &us.y);
                    units.push(u1);
                    units.push(u2);
                    units.push(us);
                    o
                }
                None => {
                    if xin.len() != u2.y.len() {
                        bail!("resnet trunk: identity shortcut needs equal shapes")
                    }
                    let o = add_relu_kernel(&u2.y, xin);
                    units.push(u1);
                    units.push(u2);
                    o
                }
            };
            acts.push(out);
            hh = oh;
            ww = ow;
        }
        let cout = self.plan.out_dim();
        let last = acts.last().map(Vec::as_slice).unwrap_or(&[]);
        let feats = global_avg_pool(last, n, hh * ww, cout);
        if let Ok(mut t) = self.tape.lock() {
            *t = Some(Tape {
                acts,
                units,
                final_hw: (hh, ww, cout),
                n,
            });
        }
        let _ = x;
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
        let mut ui = tape.units.len();
        for (bi, b) in self.plan.blocks.iter().enumerate().rev() {
            let out = &tape.acts[bi + 1];
            let g = relu_mask(&dout, out); // through the final ReLU
            let input = &tape.acts[bi];
            let mut dx_short = match b.short {
                Some(_) => {
                    ui -= 1;
                    let us = &tape.units[ui];
                    self.unit_backward(us, input, &g, &p, &mut dp, true).unwrap_or_default()
                }
                None => g.clone(),
            };
            ui -= 1;
            let u2 = &tape.units[ui];
            ui -= 1;
            let u1 = &tape.units[ui];
            let da = self.unit_backward(u2, &u1.y, &g, &p, &mut dp, true).unwrap_or_default();
            let dx1 = self
                .unit_backward(u1, input, &da, &p, &mut dp, true)
                .unwrap_or_default();
            for (a, b) in dx_short.iter_mut().zip(&dx1) {
                *a += b;
            }
            dout = dx_short;
        }
        ui -= 1;
        let stem = &tape.units[ui];
        let _ = self.unit_backward(stem, &xin, &dout, &p, &mut dp, false);
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
