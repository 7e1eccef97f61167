//! Pooling over channels-last `(n, h, w, c)` maps: the global average pool
//! that ends a ResNet trunk and `k × k` max pooling with a backward for any
//! window (candle's supports only `k == stride`).

use super::fast_path;
use super::fused::{apply, apply_no_grad, values, FusedOp, Operand};
use candle_core::{bail, Shape, Tensor};
use rayon::prelude::*;

/// Mean over the pixels of each image: `(n, px, c)` → `(n, c)`.
pub fn global_avg_pool(x: &[f32], n: usize, px: usize, c: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * c];
    y.par_chunks_mut(c).enumerate().for_each(|(i, yr)| {
        for row in x[i * px * c..(i + 1) * px * c].chunks_exact(c) {
            for (a, v) in yr.iter_mut().zip(row) {
                *a += v;
            }
        }
        let inv = 1.0 / px as f32;
        for a in yr.iter_mut() {
            *a *= inv;
        }
    });
    y
}

/// Gradient of [`global_avg_pool`]: `(n, c)` → `(n, px, c)`.
pub fn global_avg_pool_backward(dy: &[f32], n: usize, px: usize, c: usize) -> Vec<f32> {
    let mut dx = vec![0f32; n * px * c];
    let inv = 1.0 / px as f32;
    dx.par_chunks_mut(px * c).enumerate().for_each(|(i, d)| {
        let g = &dy[i * c..(i + 1) * c];
        for row in d.chunks_exact_mut(c) {
            for (a, v) in row.iter_mut().zip(g) {
                *a = v * inv;
            }
        }
    });
    dx
}

struct GapOp;

impl FusedOp<1> for GapOp {
    const NAME: &'static str = "pretext-global-avg-pool";

    fn forward(&self, [input]: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let &[n, h, w, c] = input.dims else {
            bail!("global_avg_pool: expects (n, h, w, c), got {:?}", input.dims)
        };
        Ok((global_avg_pool(input.data, n, h * w, c), Shape::from((n, c))))
    }

    fn backward(&self, [x]: [&Tensor; 1], _res: &Tensor, grad: &Tensor) -> candle_core::Result<[Option<Tensor>; 1]> {
        let (n, h, w, c) = x.dims4()?;
        Ok([Some(apply_no_grad([&grad.contiguous()?], GapBwdOp { n, h, w, c })?)])
    }
}

struct GapBwdOp {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl FusedOp<1> for GapBwdOp {
    const NAME: &'static str = "pretext-global-avg-pool-bwd";

    fn forward(&self, [input]: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let dx = global_avg_pool_backward(input.data, self.n, self.h * self.w, self.c);
        Ok((dx, Shape::from((self.n, self.h, self.w, self.c))))
    }
}

/// Mean over the spatial dimensions: `(n, h, w, c)` → `(n, c)`.
///
/// # Errors
/// Not 4-D.
pub fn global_avg_pool_nhwc(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x]) {
        apply([&x.contiguous()?], GapOp)
    } else {
        x.mean((1, 2))
    }
}

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

impl FusedOp<1> for MaxPoolOp {
    const NAME: &'static str = "pretext-max-pool-nhwc";

    fn forward(&self, [input]: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let &[n, h, w, c] = input.dims else {
            bail!("max_pool2d_nhwc: expects (n, h, w, c), got {:?}", input.dims)
        };
        if h + 2 * self.pad < self.k || w + 2 * self.pad < self.k {
            bail!(
                "max_pool2d_nhwc: a {h}×{w} input is smaller than the {}×{} window",
                self.k,
                self.k
            )
        }
        let (y, _) = self.argmax(input.data, (n, h, w, c));
        Ok((y, Shape::from((n, self.out_size(h), self.out_size(w), c))))
    }

    fn backward(&self, [x]: [&Tensor; 1], _res: &Tensor, grad: &Tensor) -> candle_core::Result<[Option<Tensor>; 1]> {
        let (n, h, w, c) = x.dims4()?;
        let (xv, gv) = (values(x)?, values(grad)?);
        let (_, at) = self.argmax(&xv, (n, h, w, c));
        let mut dx = vec![0f32; xv.len()];
        for (g, &i) in gv.iter().zip(&at) {
            dx[i] += g;
        }
        Ok([Some(Tensor::from_vec(dx, x.shape(), x.device())?)])
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
    apply([&x.contiguous()?], MaxPoolOp { k, stride, pad })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_its_gradient() {
        let x: Vec<f32> = (0..2 * 4 * 3).map(|i| i as f32).collect();
        let y = global_avg_pool(&x, 2, 4, 3);
        assert_eq!(y, vec![4.5, 5.5, 6.5, 16.5, 17.5, 18.5]);
        let dx = global_avg_pool_backward(&[4.0, 8.0, 0.0, 1.0, 1.0, 1.0], 2, 4, 3);
        assert_eq!(&dx[..3], &[1.0, 2.0, 0.0]);
        assert_eq!(&dx[21..], &[0.25, 0.25, 0.25]);
    }
}
