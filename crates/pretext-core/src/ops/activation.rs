//! Element-wise activations as single graph nodes: ReLU (alone and at the end
//! of a residual block), exact GELU, and softmax over the last dimension.
//!
//! candle's ReLU backward takes four passes (a comparison, a cast, a product
//! and an add into a zeroed buffer); here it is one masked copy. GELU uses an
//! `erf` that is several times faster than libm's and as accurate in f32.

use super::fused::{apply, apply_no_grad, values, FusedOp, Operand};
use super::vector::multiversion;
use super::{fast_path, rows_per_task, ROW_TASK};
use candle_core::{bail, Shape, Tensor, D};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Elements per parallel task of the row-free passes.
const CHUNK: usize = 1 << 16;

/// `max(a + b, 0)`.
///
/// # Panics
/// If the lengths differ.
pub fn add_relu_kernel(a: &[f32], b: &[f32]) -> Vec<f32> {
    // SAFETY: `add_relu_chunk` writes all of its chunk.
    unsafe { super::zip_map(a, b, CHUNK, add_relu_chunk) }
}

multiversion! {
    /// `y = max(a + b, 0)`.
    fn add_relu_chunk(y: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]) {
        for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
            let v = a + b;
            *y = MaybeUninit::new(if v > 0.0 { v } else { 0.0 });
        }
    }
}

multiversion! {
    /// `g = dy` where `y > 0`, else 0.
    fn relu_mask_chunk(g: &mut [MaybeUninit<f32>], dy: &[f32], y: &[f32]) {
        for ((g, d), y) in g.iter_mut().zip(dy).zip(y) {
            *g = MaybeUninit::new(if *y > 0.0 { *d } else { 0.0 });
        }
    }
}

/// `dy` where `y > 0`, else 0: the gradient through a ReLU whose output is `y`.
///
/// # Panics
/// If the lengths differ.
pub fn relu_mask(dy: &[f32], y: &[f32]) -> Vec<f32> {
    // SAFETY: `relu_mask_chunk` writes all of its chunk.
    unsafe { super::zip_map(dy, y, CHUNK, relu_mask_chunk) }
}

/// The gradient through a ReLU: `dy` masked by its output `y > 0`.
struct ReluMaskOp;

impl FusedOp<2> for ReluMaskOp {
    const NAME: &'static str = "pretext-relu-mask";

    fn forward(&self, [dy, y]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        if dy.dims != y.dims {
            bail!("relu_mask: shapes {:?} and {:?} differ", dy.dims, y.dims)
        }
        Ok((relu_mask(dy.data, y.data), Shape::from(dy.dims.to_vec())))
    }
}

/// The gradient through any ReLU-ended node whose output is `y`, as a node
/// without a gradient of its own.
///
/// # Errors
/// Shapes differ.
pub fn relu_backward(dy: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    apply_no_grad([&dy.contiguous()?, &y.contiguous()?], ReluMaskOp)
}

struct ReluOp;

impl FusedOp<1> for ReluOp {
    const NAME: &'static str = "pretext-relu";

    fn forward(&self, [input]: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let x = input.data;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(1 << 15)
            .zip(x.par_chunks(1 << 15))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, x)| *y = x.max(0.0)));
        Ok((y, Shape::from(input.dims.to_vec())))
    }

    fn backward(&self, _x: [&Tensor; 1], y: &Tensor, dy: &Tensor) -> candle_core::Result<[Option<Tensor>; 1]> {
        Ok([Some(relu_backward(dy, y)?)])
    }
}

/// `max(x, 0)` as one node whose backward is a single masked copy (candle's
/// takes four passes).
///
/// # Errors
/// A tensor operation failed.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x]) {
        apply([&x.contiguous()?], ReluOp)
    } else {
        x.relu()
    }
}

struct AddReluOp;

impl FusedOp<2> for AddReluOp {
    const NAME: &'static str = "pretext-add-relu";

    fn forward(&self, [a, b]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        if a.dims != b.dims {
            bail!("add_relu: shapes {:?} and {:?} differ", a.dims, b.dims)
        }
        Ok((add_relu_kernel(a.data, b.data), Shape::from(a.dims.to_vec())))
    }

    fn backward(&self, _x: [&Tensor; 2], y: &Tensor, dy: &Tensor) -> candle_core::Result<[Option<Tensor>; 2]> {
        let g = relu_backward(dy, y)?;
        Ok([Some(g.clone()), Some(g)])
    }
}

/// `relu(a + b)` (the end of a residual block).
///
/// # Errors
/// Shapes differ.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[a, b]) {
        apply([&a.contiguous()?, &b.contiguous()?], AddReluOp)
    } else {
        (a + b)?.relu()
    }
}

/// Elements per parallel task of GELU.
const GELU_CHUNK: usize = 16384;

struct GeluOp;

impl FusedOp<1> for GeluOp {
    const NAME: &'static str = "pretext-gelu";

    fn forward(&self, [input]: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let x = input.data;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(GELU_CHUNK)
            .zip(x.par_chunks(GELU_CHUNK))
            .for_each(|(yc, xc)| super::vector::gelu(xc, yc));
        Ok((y, Shape::from(input.dims.to_vec())))
    }

    fn backward(&self, [x]: [&Tensor; 1], _y: &Tensor, dy: &Tensor) -> candle_core::Result<[Option<Tensor>; 1]> {
        let (xs, dys) = (values(x)?, values(dy)?);
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(GELU_CHUNK)
            .zip(xs.par_chunks(GELU_CHUNK).zip(dys.par_chunks(GELU_CHUNK)))
            .for_each(|(o, (xc, dc))| super::vector::gelu_backward(xc, dc, o));
        Ok([Some(Tensor::from_vec(dx, x.shape(), x.device())?)])
    }
}

/// Exact GELU, `x · Φ(x)` (`torch.nn.functional.gelu`, HF's `"gelu"`): fused on CPU f32.
///
/// # Errors
/// Tensor errors.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x]) {
        apply([&x.contiguous()?], GeluOp)
    } else {
        x.gelu_erf()
    }
}

/// Softmax of each row of `x` into `y` (rows of `w`).
pub(crate) fn softmax_rows(x: &[f32], y: &mut [f32], w: usize) {
    let rows = rows_per_task(w, ROW_TASK) * w;
    y.par_chunks_mut(rows)
        .zip(x.par_chunks(rows))
        .for_each(|(yc, xc)| super::vector::softmax_rows(xc, yc, w));
}

struct SoftmaxOp;

impl FusedOp<1> for SoftmaxOp {
    const NAME: &'static str = "pretext-softmax";

    fn forward(&self, [x]: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let mut y = vec![0f32; x.data.len()];
        softmax_rows(x.data, &mut y, x.last_dim().max(1));
        Ok((y, Shape::from(x.dims.to_vec())))
    }

    fn backward(&self, _x: [&Tensor; 1], y: &Tensor, dy: &Tensor) -> candle_core::Result<[Option<Tensor>; 1]> {
        let w = y.dim(D::Minus1)?.max(1);
        let (ys, dys) = (values(y)?, values(dy)?);
        let mut dx = vec![0f32; ys.len()];
        let rows = rows_per_task(w, ROW_TASK) * w;
        dx.par_chunks_mut(rows)
            .zip(ys.par_chunks(rows).zip(dys.par_chunks(rows)))
            .for_each(|(dxc, (yc, dyc))| {
                dxc.copy_from_slice(dyc);
                super::vector::softmax_backward_rows(dxc, yc, w, 1.0);
            });
        Ok([Some(Tensor::from_vec(dx, y.shape(), y.device())?)])
    }
}

/// Softmax over the last dimension: fused on CPU f32 (with its backward), composed elsewhere.
///
/// # Errors
/// Tensor errors.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x]) {
        apply([&x.contiguous()?], SoftmaxOp)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{
        bits, check_against_reference, hashed_values, out_buffer, out_values, same_on_every_family,
    };

    #[test]
    fn relu_passes_agree_across_kernel_families() {
        let (a, b) = (hashed_values(1001, 1), hashed_values(1001, 2));
        same_on_every_family(|| {
            let mut y = out_buffer(a.len());
            add_relu_chunk(&mut y, &a, &b);
            let y = out_values(&y);
            let mut g = out_buffer(a.len());
            relu_mask_chunk(&mut g, &a, &y);
            (bits(&y), bits(&out_values(&g)))
        });
        let y = add_relu_kernel(&a, &b);
        let g = relu_mask(&a, &y);
        for i in 0..a.len() {
            assert_eq!(y[i], (a[i] + b[i]).max(0.0));
            assert_eq!(g[i], if y[i] > 0.0 { a[i] } else { 0.0 });
        }
    }

    #[test]
    fn softmax_matches_candle() -> candle_core::Result<()> {
        check_against_reference(
            softmax_last_dim,
            |x| candle_nn::ops::softmax(x, D::Minus1),
            &[3, 5, 37],
            1e-5,
        )
    }

    #[test]
    fn gelu_matches_candle() -> candle_core::Result<()> {
        check_against_reference(gelu, |x| x.gelu_erf(), &[4, 300], 1e-5)
    }

    #[test]
    fn relu_and_add_relu_match_candle() -> candle_core::Result<()> {
        check_against_reference(relu, |x| x.relu(), &[3, 70_000], 1e-6)?;
        let b = crate::ops::testing::rand(&[3, 70_000], 9);
        check_against_reference(|x| add_relu(x, &b), |x| (x + &b)?.relu(), &[3, 70_000], 1e-6)?;
        let e = add_relu(&b, &b.t()?.contiguous()?).expect_err("shapes differ");
        assert!(e.to_string().contains("differ"), "{e}");
        Ok(())
    }
}
