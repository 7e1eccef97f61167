//! Fast CPU training ops for convolutional networks, as candle custom ops with
//! explicit backward passes over contiguous channels-last buffers.
//!
//! candle's own `conv2d` backward (a direct transposed-convolution loop for the
//! input gradient, a whole-map convolution for the weight gradient) and its
//! generic reductions over non-last dimensions make a ResNet training step
//! about 13× slower than PyTorch on CPU. Here activations are NHWC, so
//! convolutions become large matrix products (`gemm` crate) over im2col
//! buffers and batch normalisation reduces over the rows of a `(pixels,
//! channels)` matrix. Work is split over chunks of images on the rayon pool.
//!
//! Every function takes and returns ordinary candle tensors. On a non-CPU
//! device or for a non-f32 dtype it falls back to candle's generic ops
//! (`reference_*`), which also serve as the numerical reference in tests.

pub mod conv;
pub mod gemm;
pub mod layout;
pub mod linear;
pub mod norm;
pub mod resnet;

pub use layout::{nchw_to_nhwc, nhwc_to_nchw};
pub use linear::{add_bias, add_bias_relu, linear, relu};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use std::sync::{Arc, Mutex};

/// The contiguous f32 values of a CPU storage under `l` (for custom ops'
/// `cpu_fwd`); `what` names the operand in errors.
///
/// # Errors
/// Not f32, or not contiguous.
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => match l.contiguous_offsets() {
            Some((a, b)) => Ok(&v[a..b]),
            None => bail!("{what}: expects a contiguous tensor"),
        },
        _ => bail!("{what}: expects f32"),
    }
}

/// Whether every tensor is f32 on the CPU, where the fused kernels run.
pub fn fast_path(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

fn geom_of(x: &[usize], w: &[usize], stride: usize, pad: usize) -> candle_core::Result<conv::ConvGeom> {
    let (&[n, h, wd, c], &[o, wc, kh, kw]) = (x, w) else {
        bail!("conv2d: expects x (n, h, w, c) and weight (o, c, kh, kw), got {x:?} and {w:?}")
    };
    if wc != c {
        bail!("conv2d: input has {c} channels, weight expects {wc}")
    }
    match conv::ConvGeom::new(n, h, wd, c, o, kh, kw, stride, pad) {
        Some(g) => Ok(g),
        None => bail!("conv2d: kernel {kh}x{kw} does not fit input {h}x{wd} with padding {pad} (stride {stride})"),
    }
}

struct Conv2dOp {
    stride: usize,
    pad: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "pretext-conv2d-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = geom_of(l1.dims(), l2.dims(), self.stride, self.pad)?;
        let y = conv::conv2d_forward(f32_slice(s1, l1, "conv2d x")?, f32_slice(s2, l2, "conv2d weight")?, &g);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.oh, g.ow, g.o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The input of a first layer (a batch of images) needs no gradient:
        // skip the transposed product and the col2im for it.
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                &w.contiguous()?,
                &ConvBwdInput {
                    stride: self.stride,
                    pad: self.pad,
                    x_dims: x.dims().to_vec(),
                },
            )?)
        } else {
            None
        };
        let dw = x.contiguous()?.apply_op2_no_bwd(
            &grad,
            &ConvBwdWeight {
                stride: self.stride,
                pad: self.pad,
                w_dims: w.dims().to_vec(),
            },
        )?;
        Ok((dx, Some(dw)))
    }
}

struct ConvBwdInput {
    stride: usize,
    pad: usize,
    x_dims: Vec<usize>,
}

impl CustomOp2 for ConvBwdInput {
    fn name(&self) -> &'static str {
        "pretext-conv2d-nhwc-bwd-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = geom_of(&self.x_dims, l2.dims(), self.stride, self.pad)?;
        let dx = conv::conv2d_backward_input(f32_slice(s1, l1, "conv2d dy")?, f32_slice(s2, l2, "conv2d weight")?, &g);
        Ok((CpuStorage::F32(dx), Shape::from(self.x_dims.clone())))
    }
}

struct ConvBwdWeight {
    stride: usize,
    pad: usize,
    w_dims: Vec<usize>,
}

impl CustomOp2 for ConvBwdWeight {
    fn name(&self) -> &'static str {
        "pretext-conv2d-nhwc-bwd-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = geom_of(l1.dims(), &self.w_dims, self.stride, self.pad)?;
        let dw = conv::conv2d_backward_weight(f32_slice(s1, l1, "conv2d x")?, f32_slice(s2, l2, "conv2d dy")?, &g);
        Ok((CpuStorage::F32(dw), Shape::from(self.w_dims.clone())))
    }
}

/// 2-D convolution of channels-last `x` `(n, h, w, c)` with PyTorch-layout
/// `weight` `(o, c, kh, kw)`, no bias → `(n, oh, ow, o)`.
///
/// # Errors
/// Shapes that do not fit.
pub fn conv2d_nhwc(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    if fast_path(&[x, weight]) {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, Conv2dOp { stride, pad })
    } else {
        reference_conv2d_nhwc(x, weight, stride, pad)
    }
}

/// [`conv2d_nhwc`] through candle's `conv2d` (NCHW), for other devices and as a test reference.
///
/// # Errors
/// Shapes that do not fit.
pub fn reference_conv2d_nhwc(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    x.permute((0, 3, 1, 2))?
        .contiguous()?
        .conv2d(weight, pad, stride, 1, 1)?
        .permute((0, 2, 3, 1))?
        .contiguous()
}

/// Geometry of a transposed convolution as the convolution it transposes:
/// `x` `(n, h, w, cin)` is that convolution's output, `weight` `(cin, cout, kh, kw)`.
fn transpose_geom(
    x: &[usize],
    w: &[usize],
    stride: usize,
    pad: usize,
    out_pad: usize,
) -> candle_core::Result<conv::ConvGeom> {
    let (&[n, h, wd, c], &[wc, o, kh, kw]) = (x, w) else {
        bail!("conv_transpose2d: expects x (n, h, w, c) and weight (c, o, kh, kw), got {x:?} and {w:?}")
    };
    if wc != c {
        bail!("conv_transpose2d: input has {c} channels, weight expects {wc}")
    }
    if h == 0 || wd == 0 || out_pad >= stride.max(1) || (h - 1) * stride + kh + out_pad < 2 * pad + 1 {
        bail!("conv_transpose2d: invalid geometry (input {h}x{wd}, kernel {kh}x{kw}, stride {stride}, padding {pad}, output padding {out_pad})")
    }
    let oh = (h - 1) * stride + kh + out_pad - 2 * pad;
    let ow = (wd - 1) * stride + kw + out_pad - 2 * pad;
    match conv::ConvGeom::new(n, oh, ow, o, c, kh, kw, stride, pad) {
        Some(g) if g.oh == h && g.ow == wd => Ok(g),
        _ => bail!("conv_transpose2d: no convolution maps {oh}x{ow} back to {h}x{wd}"),
    }
}

struct ConvTranspose2dOp {
    stride: usize,
    pad: usize,
    out_pad: usize,
}

impl CustomOp2 for ConvTranspose2dOp {
    fn name(&self) -> &'static str {
        "pretext-conv-transpose2d-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = transpose_geom(l1.dims(), l2.dims(), self.stride, self.pad, self.out_pad)?;
        // The forward of a transposed convolution is the input gradient of the convolution.
        let y = conv::conv2d_backward_input(
            f32_slice(s1, l1, "conv_transpose2d x")?,
            f32_slice(s2, l2, "conv_transpose2d weight")?,
            &g,
        );
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.h, g.w, g.c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // dx: the convolution's forward on the output gradient; dw: its weight gradient.
        let dx = grad.apply_op2_no_bwd(
            &w.contiguous()?,
            &Conv2dOp {
                stride: self.stride,
                pad: self.pad,
            },
        )?;
        let dw = grad.apply_op2_no_bwd(
            &x.contiguous()?,
            &ConvBwdWeight {
                stride: self.stride,
                pad: self.pad,
                w_dims: w.dims().to_vec(),
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Transposed 2-D convolution (`torch.nn.ConvTranspose2d`) of channels-last
/// `x` `(n, h, w, cin)` with `weight` `(cin, cout, kh, kw)` (PyTorch's layout),
/// no bias → `(n, (h-1)·stride - 2·pad + kh + out_pad, …, cout)`.
///
/// # Errors
/// Shapes that do not fit.
pub fn conv_transpose2d_nhwc(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    pad: usize,
    out_pad: usize,
) -> candle_core::Result<Tensor> {
    if fast_path(&[x, weight]) {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, ConvTranspose2dOp { stride, pad, out_pad })
    } else {
        reference_conv_transpose2d_nhwc(x, weight, stride, pad, out_pad)
    }
}

/// [`conv_transpose2d_nhwc`] through candle's `conv_transpose2d` (NCHW).
///
/// # Errors
/// Shapes that do not fit.
pub fn reference_conv_transpose2d_nhwc(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    pad: usize,
    out_pad: usize,
) -> candle_core::Result<Tensor> {
    x.permute((0, 3, 1, 2))?
        .contiguous()?
        .conv_transpose2d(weight, pad, out_pad, stride, 1)?
        .permute((0, 2, 3, 1))?
        .contiguous()
}

/// Batch statistics of one forward pass: per-channel mean and biased variance.
pub type BatchStats = (Vec<f32>, Vec<f32>);

/// How batch normalisation gets its statistics.
#[derive(Debug, Clone)]
pub enum NormStats {
    /// From the batch (training); the batch mean and biased variance are returned.
    Batch,
    /// Fixed (evaluation): running mean and variance.
    Fixed(Vec<f32>, Vec<f32>),
}

/// Mean, biased variance and inverse standard deviation saved by a forward pass.
type SavedStats = Arc<Mutex<Option<(Vec<f32>, Vec<f32>, Vec<f32>)>>>;

struct BatchNormOp {
    eps: f64,
    relu: bool,
    stats: NormStats,
    saved: SavedStats,
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "pretext-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "batch_norm x")?;
        let c = *l1.dims().last().unwrap_or(&1);
        let gamma = f32_slice(s2, l2, "batch_norm weight")?;
        let beta = f32_slice(s3, l3, "batch_norm bias")?;
        if gamma.len() != c || beta.len() != c || c == 0 {
            bail!(
                "batch_norm: {c} channels but weight {} and bias {}",
                gamma.len(),
                beta.len()
            )
        }
        let (mean, var) = match &self.stats {
            NormStats::Batch => norm::channel_stats(x, c),
            NormStats::Fixed(m, v) => (m.clone(), v.clone()),
        };
        let invstd: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (f64::from(*v) + self.eps).sqrt()) as f32)
            .collect();
        let y = norm::bn_apply(x, c, &mean, &invstd, gamma, beta, self.relu);
        if let Ok(mut s) = self.saved.lock() {
            *s = Some((mean, var, invstd));
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((mean, _, invstd)) = self.saved.lock().ok().and_then(|s| s.clone()) else {
            bail!("batch_norm backward without a forward pass")
        };
        let c = mean.len();
        let op = BatchNormBwd {
            mean,
            invstd,
            gamma: gamma.to_vec1::<f32>()?,
            relu: self.relu,
            batch_stats: matches!(self.stats, NormStats::Batch),
        };
        let packed = x
            .contiguous()?
            .apply_op3_no_bwd(&grad.contiguous()?, &res.contiguous()?, &op)?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, c)?;
        let dbeta = packed.narrow(0, n + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

struct BatchNormBwd {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    gamma: Vec<f32>,
    relu: bool,
    batch_stats: bool,
}

impl CustomOp3 for BatchNormBwd {
    fn name(&self) -> &'static str {
        "pretext-batch-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = self.mean.len();
        let (mut dx, dg, db) = norm::bn_backward(
            f32_slice(s1, l1, "bn x")?,
            f32_slice(s2, l2, "bn dy")?,
            f32_slice(s3, l3, "bn y")?,
            c,
            &self.mean,
            &self.invstd,
            &self.gamma,
            self.relu,
            self.batch_stats,
        );
        dx.extend_from_slice(&dg);
        dx.extend_from_slice(&db);
        let n = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(n)))
    }
}

/// Batch normalisation over the last dimension of `x` (channels-last), fused
/// with ReLU when `relu`. Returns the output and, with [`NormStats::Batch`],
/// the batch mean and biased variance (for running statistics).
///
/// # Errors
/// Shapes that do not fit.
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: NormStats,
    eps: f64,
    relu: bool,
) -> candle_core::Result<(Tensor, Option<BatchStats>)> {
    if !fast_path(&[x, gamma, beta]) {
        return reference_batch_norm(x, gamma, beta, stats, eps, relu);
    }
    let batch = matches!(stats, NormStats::Batch);
    let saved = Arc::new(Mutex::new(None));
    let op = BatchNormOp {
        eps,
        relu,
        stats,
        saved: saved.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let out = if batch {
        saved
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|(m, v, _)| (m.clone(), v.clone())))
    } else {
        None
    };
    Ok((y, out))
}

/// [`batch_norm`] with candle's generic ops.
///
/// # Errors
/// Shapes that do not fit.
pub fn reference_batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: NormStats,
    eps: f64,
    relu: bool,
) -> candle_core::Result<(Tensor, Option<BatchStats>)> {
    let c = x.dim(D::Minus1)?;
    let flat = x.reshape(((), c))?;
    let (mean, var, out) = match stats {
        NormStats::Batch => {
            let mean = flat.mean(0)?;
            let var = flat.broadcast_sub(&mean)?.sqr()?.mean(0)?;
            let out = Some((mean.to_vec1::<f32>()?, var.to_vec1::<f32>()?));
            (mean, var, out)
        }
        NormStats::Fixed(m, v) => (Tensor::new(m, x.device())?, Tensor::new(v, x.device())?, None),
    };
    let y = flat
        .broadcast_sub(&mean)?
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(gamma)?
        .broadcast_add(beta)?;
    let y = if relu { y.relu()? } else { y };
    Ok((y.reshape(x.shape())?, out))
}

struct AddReluOp;

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "pretext-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!("add_relu: shapes {:?} and {:?} differ", l1.dims(), l2.dims())
        }
        let y = norm::add_relu(f32_slice(s1, l1, "add_relu a")?, f32_slice(s2, l2, "add_relu b")?);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?.apply_op2_no_bwd(&res.contiguous()?, &ReluMaskOp)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

struct ReluMaskOp;

impl CustomOp2 for ReluMaskOp {
    fn name(&self) -> &'static str {
        "pretext-relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = norm::relu_mask(f32_slice(s1, l1, "relu_mask dy")?, f32_slice(s2, l2, "relu_mask y")?);
        Ok((CpuStorage::F32(g), l1.shape().clone()))
    }
}

/// `relu(a + b)` (the end of a residual block).
///
/// # Errors
/// Shapes differ.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[a, b]) {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddReluOp)
    } else {
        (a + b)?.relu()
    }
}

struct GapOp;

impl CustomOp1 for GapOp {
    fn name(&self) -> &'static str {
        "pretext-global-avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[n, h, w, c] = l.dims() else {
            bail!("global_avg_pool: expects (n, h, w, c), got {:?}", l.dims())
        };
        let y = norm::global_avg_pool(f32_slice(s, l, "global_avg_pool")?, n, h * w, c);
        Ok((CpuStorage::F32(y), Shape::from((n, c))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, h, w, c) = x.dims4()?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&GapBwdOp { n, h, w, c })?))
    }
}

struct GapBwdOp {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl CustomOp1 for GapBwdOp {
    fn name(&self) -> &'static str {
        "pretext-global-avg-pool-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dx =
            norm::global_avg_pool_backward(f32_slice(s, l, "global_avg_pool dy")?, self.n, self.h * self.w, self.c);
        Ok((CpuStorage::F32(dx), Shape::from((self.n, self.h, self.w, self.c))))
    }
}

/// Mean over the spatial dimensions: `(n, h, w, c)` → `(n, c)`.
///
/// # Errors
/// Not 4-D.
pub fn global_avg_pool_nhwc(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x]) {
        x.contiguous()?.apply_op1(GapOp)
    } else {
        x.mean((1, 2))
    }
}

#[cfg(test)]
mod tests;

/// Max pooling over `k × k` windows with `stride` and `pad` (padding never
/// wins, as PyTorch's −∞ padding) on `(n, h, w, c)`.
struct MaxPoolOp {
    k: usize,
    stride: usize,
    pad: usize,
}

impl MaxPoolOp {
    fn out_size(&self, h: usize) -> usize {
        (h + 2 * self.pad - self.k) / self.stride + 1
    }

    /// For every output element, the flat input index of its window's maximum (first on ties).
    fn argmax(&self, x: &[f32], (n, h, w, c): (usize, usize, usize, usize)) -> (Vec<f32>, Vec<usize>) {
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let mut y = vec![f32::NEG_INFINITY; n * oh * ow * c];
        let mut at = vec![0usize; y.len()];
        for b in 0..n {
            for i in 0..oh {
                for j in 0..ow {
                    let o = ((b * oh + i) * ow + j) * c;
                    for di in 0..self.k {
                        let Some(yy) = (i * self.stride + di).checked_sub(self.pad).filter(|&v| v < h) else {
                            continue;
                        };
                        for dj in 0..self.k {
                            let Some(xx) = (j * self.stride + dj).checked_sub(self.pad).filter(|&v| v < w) else {
                                continue;
                            };
                            let src = ((b * h + yy) * w + xx) * c;
                            for ch in 0..c {
                                let v = x[src + ch];
                                if v > y[o + ch] || (at[o + ch] == 0 && y[o + ch] == f32::NEG_INFINITY) {
                                    y[o + ch] = v;
                                    at[o + ch] = src + ch;
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, at)
    }
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "pretext-max-pool-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[n, h, w, c] = l.dims() else {
            bail!("max_pool2d_nhwc: expects (n, h, w, c), got {:?}", l.dims())
        };
        if h + 2 * self.pad < self.k || w + 2 * self.pad < self.k {
            bail!(
                "max_pool2d_nhwc: a {h}×{w} input is smaller than the {}×{} window",
                self.k,
                self.k
            )
        }
        let (y, _) = self.argmax(f32_slice(s, l, "max_pool2d x")?, (n, h, w, c));
        Ok((
            CpuStorage::F32(y),
            Shape::from((n, self.out_size(h), self.out_size(w), c)),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, h, w, c) = x.dims4()?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let gv = grad.flatten_all()?.to_vec1::<f32>()?;
        let (_, at) = self.argmax(&xv, (n, h, w, c));
        let mut dx = vec![0f32; xv.len()];
        for (g, &i) in gv.iter().zip(&at) {
            dx[i] += g;
        }
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `k × k` max pooling with `stride` and `pad` on `(n, h, w, c)` f32 CPU
/// activations, with a backward for any window (candle's supports only
/// `k == stride`): the gradient goes to each window's maximum. Padding
/// never wins, as in PyTorch.
///
/// # Errors
/// Not a 4-d f32 CPU tensor, or a window larger than the padded input.
pub fn max_pool2d_nhwc(x: &Tensor, k: usize, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    if !fast_path(&[x]) {
        bail!("max_pool2d_nhwc: runs on f32 CPU tensors only")
    }
    if k == 0 || stride == 0 || pad * 2 > k {
        bail!("max_pool2d_nhwc: k = {k}, stride = {stride}, pad = {pad} is not a valid window")
    }
    x.contiguous()?.apply_op1(MaxPoolOp { k, stride, pad })
}
