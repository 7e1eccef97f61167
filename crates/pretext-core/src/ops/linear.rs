//! Fully connected layers and per-channel biases as single graph nodes.
//!
//! candle composes `x · Wᵀ + b` from a transpose, a matmul and a broadcast
//! add, and differentiates the broadcast add with a sum over the leading
//! dimensions that it evaluates element by element through a strided index on
//! one thread: for a convolution's bias over a `(n, h, w, c)` map that sum
//! alone took about a seventh of a conv VAE training step. Here the linear
//! layer is one node (a parallel GEMM each way, the bias gradient a column
//! sum) and a bias, optionally followed by ReLU, is one node whose backward
//! is a masked copy and a column sum, both parallel and deterministic.

use super::activation::relu_backward;
use super::bf16::Precision;
use super::fused::{apply, apply_no_grad, FusedOp, Operand};
use super::gemm::{product, Mat};
use super::{fast_path, rows_per_task, CONV_TASK};
use candle_core::{bail, Shape, Tensor};
use rayon::prelude::*;

/// Sums of the columns of the row-major `(rows, cols)` matrix `g`. Partial
/// sums over fixed blocks of rows run in parallel and are added in block order,
/// so the result does not depend on the thread count or scheduling.
pub fn column_sum(g: &[f32], cols: usize) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    let parts: Vec<Vec<f32>> = g
        .par_chunks(rows_per_task(cols, CONV_TASK) * cols)
        .map(|block| {
            let mut s = vec![0f32; cols];
            for row in block.chunks(cols) {
                s.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            s
        })
        .collect();
    let mut total = vec![0f32; cols];
    for p in &parts {
        total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    total
}

/// `x · weightᵀ + bias` over the last dimension, its products in the
/// precision the op was built with (the backward products too).
struct LinearOp(Precision);

impl FusedOp<3> for LinearOp {
    const NAME: &'static str = "pretext-linear";

    fn forward(&self, [x, w, b]: [Operand<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (&[dout, din], dims) = (w.dims, x.dims) else {
            bail!("linear: weight must be (out, in), got {:?}", w.dims);
        };
        if dims.last() != Some(&din) || b.data.len() != dout {
            bail!("linear: x {dims:?}, weight ({dout}, {din}), bias {}", b.data.len());
        }
        let rows = x.data.len() / din.max(1);
        let mut y = vec![0f32; rows * dout];
        if dout > 0 {
            for r in y.chunks_mut(dout) {
                r.copy_from_slice(b.data);
            }
        }
        product(
            self.0,
            x.data,
            Mat::row_major(rows, din),
            w.data,
            Mat::row_major(dout, din).t(),
            &mut y,
            Mat::row_major(rows, dout),
            true,
            rayon::current_num_threads(),
        );
        let mut shape = dims.to_vec();
        if let Some(l) = shape.last_mut() {
            *l = dout;
        }
        Ok((y, Shape::from(shape)))
    }

    fn backward(&self, [x, w, _]: [&Tensor; 3], _y: &Tensor, dy: &Tensor) -> candle_core::Result<[Option<Tensor>; 3]> {
        let dy = dy.contiguous()?;
        // As for the convolutions: an input that tracks no gradient (a batch
        // of data into a first layer) gets no input product.
        let dx = if x.track_op() {
            Some(apply_no_grad([&dy, w], LinearBwdInput(self.0))?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = apply_no_grad([&dy, x], LinearBwdWeight(self.0))?;
        let db = apply_no_grad([&dy], ColumnSumOp)?;
        Ok([dx, Some(dw), Some(db)])
    }
}

/// `dx (rows, in) = dy (rows, out) · W (out, in)`.
struct LinearBwdInput(Precision);

impl FusedOp<2> for LinearBwdInput {
    const NAME: &'static str = "pretext-linear-bwd-input";

    fn forward(&self, [dy, w]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let &[dout, din] = w.dims else {
            bail!("linear: weight must be (out, in), got {:?}", w.dims);
        };
        let rows = dy.data.len() / dout.max(1);
        let mut dx = vec![0f32; rows * din];
        product(
            self.0,
            dy.data,
            Mat::row_major(rows, dout),
            w.data,
            Mat::row_major(dout, din),
            &mut dx,
            Mat::row_major(rows, din),
            false,
            rayon::current_num_threads(),
        );
        Ok((dx, Shape::from((rows, din))))
    }
}

/// `dW (out, in) = dyᵀ (out, rows) · x (rows, in)`.
struct LinearBwdWeight(Precision);

impl FusedOp<2> for LinearBwdWeight {
    const NAME: &'static str = "pretext-linear-bwd-weight";

    fn forward(&self, [dy, x]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (dout, din) = (
            dy.dims.last().copied().unwrap_or(0),
            x.dims.last().copied().unwrap_or(0),
        );
        let rows = dy.data.len() / dout.max(1);
        let mut dw = vec![0f32; dout * din];
        product(
            self.0,
            dy.data,
            Mat::row_major(rows, dout).t(),
            x.data,
            Mat::row_major(rows, din),
            &mut dw,
            Mat::row_major(dout, din),
            false,
            rayon::current_num_threads(),
        );
        Ok((dw, Shape::from((dout, din))))
    }
}

/// Column sums over the last dimension: `(…, c)` → `(c)`.
struct ColumnSumOp;

impl FusedOp<1> for ColumnSumOp {
    const NAME: &'static str = "pretext-column-sum";

    fn forward(&self, [input]: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let cols = input.last_dim();
        Ok((column_sum(input.data, cols), Shape::from(cols)))
    }
}

/// `x · weightᵀ + bias` over the last dimension of `x` (`torch.nn.Linear`):
/// one node on CPU f32 (a parallel GEMM each way, the bias gradient a column
/// sum), candle's ops elsewhere.
///
/// # Errors
/// Shape mismatch.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x, weight, bias]) {
        apply(
            [&x.contiguous()?, &weight.contiguous()?, &bias.contiguous()?],
            LinearOp(Precision::current()),
        )
    } else {
        reference_linear(x, weight, bias)
    }
}

/// [`linear`] through candle's ops, for other devices and as a test reference.
///
/// # Errors
/// Shape mismatch.
pub fn reference_linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_matmul(&weight.t()?)?.broadcast_add(bias)
}

/// Adds a per-channel bias over the last dimension, optionally followed by ReLU.
struct BiasOp {
    relu: bool,
}

impl FusedOp<2> for BiasOp {
    const NAME: &'static str = "pretext-bias";

    fn name(&self) -> &'static str {
        if self.relu {
            "pretext-bias-relu"
        } else {
            "pretext-bias"
        }
    }

    fn forward(&self, [x, b]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let c = b.data.len();
        if b.dims.len() != 1 || x.dims.last() != Some(&c) {
            bail!("bias: x {:?} does not end in the bias's {:?}", x.dims, b.dims);
        }
        let relu = self.relu;
        // SAFETY: every chunk of `y` is written in full, row by row.
        let y = unsafe {
            super::written_by(x.data.len(), 0, |y| {
                if c > 0 {
                    y.par_chunks_mut(rows_per_task(c, CONV_TASK) * c)
                        .zip(x.data.par_chunks(rows_per_task(c, CONV_TASK) * c))
                        .for_each(|(y, x)| {
                            for (yr, xr) in y.chunks_mut(c).zip(x.chunks(c)) {
                                for ((y, &x), &b) in yr.iter_mut().zip(xr).zip(b.data) {
                                    *y = std::mem::MaybeUninit::new(biased(x, b, relu));
                                }
                            }
                        });
                }
            })
        };
        Ok((y, Shape::from(x.dims.to_vec())))
    }

    fn backward(&self, _xs: [&Tensor; 2], y: &Tensor, dy: &Tensor) -> candle_core::Result<[Option<Tensor>; 2]> {
        let (g, db) = bias_backward(y, dy, self.relu)?;
        Ok([Some(g), Some(db)])
    }
}

/// `x + b`, through `max(·, 0)` with `relu`: the one formula of the bias
/// passes, out of place ([`BiasOp`]) and in place ([`add_bias_in_place`]).
#[inline(always)]
fn biased(x: f32, b: f32, relu: bool) -> f32 {
    let v = x + b;
    if relu {
        v.max(0.0)
    } else {
        v
    }
}

/// Adds the per-channel bias `b` to the rows of `y` in place (then ReLU
/// with `relu`): the epilogue of a convolution node that owns its output.
///
/// # Panics
/// If `y`'s length is not a multiple of `b`'s.
pub(crate) fn add_bias_in_place(y: &mut [f32], b: &[f32], relu: bool) {
    let c = b.len();
    if c == 0 {
        return;
    }
    assert!(y.len().is_multiple_of(c), "bias of {c} over {} values", y.len());
    y.par_chunks_mut(rows_per_task(c, CONV_TASK) * c).for_each(|y| {
        for yr in y.chunks_mut(c) {
            for (y, &b) in yr.iter_mut().zip(b) {
                *y = biased(*y, b, relu);
            }
        }
    });
}

/// The gradients of `y = bias(x) [then ReLU]` from `dy`: the input's
/// (`dy` masked where `y ≤ 0` with `relu`) and the bias's (its column sum).
pub(crate) fn bias_backward(y: &Tensor, dy: &Tensor, relu: bool) -> candle_core::Result<(Tensor, Tensor)> {
    let dy = dy.contiguous()?;
    let g = if relu { relu_backward(&dy, y)? } else { dy };
    let db = apply_no_grad([&g], ColumnSumOp)?;
    Ok((g, db))
}

/// `x + bias`, the bias `(c)` broadcast over the leading dimensions of `x` `(…, c)`.
///
/// # Errors
/// The last dimension of `x` is not the bias's length.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x, bias]) {
        apply([&x.contiguous()?, &bias.contiguous()?], BiasOp { relu: false })
    } else {
        x.broadcast_add(bias)
    }
}

/// `relu(x + bias)`, the bias `(c)` broadcast over the leading dimensions of `x` `(…, c)`.
///
/// # Errors
/// The last dimension of `x` is not the bias's length.
pub fn add_bias_relu(x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x, bias]) {
        apply([&x.contiguous()?, &bias.contiguous()?], BiasOp { relu: true })
    } else {
        x.broadcast_add(bias)?.relu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::relu;
    use crate::seed::stream_rng;
    use candle_core::{Device, Var};
    use rand::Rng;

    fn rand(dims: &[usize], seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        let mut rng = stream_rng(seed, "linear-test", &[]);
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
        let b = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    /// Values and the gradients of `Σ g ⊙ f(vars)` of the fused op against candle's composition.
    fn check(
        vars: &[&Var],
        fused: impl Fn() -> candle_core::Result<Tensor>,
        reference: impl Fn() -> candle_core::Result<Tensor>,
        seed: u64,
    ) -> candle_core::Result<()> {
        let y = fused()?;
        let r = reference()?;
        assert!(max_diff(&y, &r) < 1e-5, "values differ by {}", max_diff(&y, &r));
        let g = rand(y.dims(), seed);
        let gy = (y * &g)?.sum_all()?.backward()?;
        let gr = (r * &g)?.sum_all()?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let d = max_diff(
                gy.get(v.as_tensor()).expect("fused grad"),
                gr.get(v.as_tensor()).expect("reference grad"),
            );
            assert!(d < 1e-4, "gradient of input {i} differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn linear_and_its_gradients_match_candle() -> candle_core::Result<()> {
        // a 3-D input (rows over two leading dimensions) and a plain batch
        for (xd, dout) in [(vec![3, 5, 12], 7), (vec![64, 40], 33)] {
            let din = *xd.last().expect("din");
            let x = Var::from_tensor(&rand(&xd, 1))?;
            let w = Var::from_tensor(&rand(&[dout, din], 2))?;
            let b = Var::from_tensor(&rand(&[dout], 3))?;
            check(
                &[&x, &w, &b],
                || linear(x.as_tensor(), w.as_tensor(), b.as_tensor()),
                || reference_linear(x.as_tensor(), w.as_tensor(), b.as_tensor()),
                4,
            )?;
        }
        Ok(())
    }

    #[test]
    fn linear_on_an_untracked_input_skips_its_gradient() -> candle_core::Result<()> {
        let x = rand(&[16, 12], 1); // a batch of data
        let w = Var::from_tensor(&rand(&[5, 12], 2))?;
        let b = Var::from_tensor(&rand(&[5], 3))?;
        let g = rand(&[16, 5], 4);
        let plain = (linear(&x, w.as_tensor(), b.as_tensor())? * &g)?
            .sum_all()?
            .backward()?;
        assert!(plain.get(&x).is_none(), "no gradient for the data");
        let tracked = Var::from_tensor(&x)?;
        let full = (linear(tracked.as_tensor(), w.as_tensor(), b.as_tensor())? * &g)?
            .sum_all()?
            .backward()?;
        assert!(
            full.get(tracked.as_tensor()).is_some(),
            "a variable input still gets one"
        );
        for v in [&w, &b] {
            let (a, c) = (
                plain.get(v.as_tensor()).expect("grad"),
                full.get(v.as_tensor()).expect("grad"),
            );
            assert_eq!(max_diff(a, c), 0.0, "the parameter gradients do not depend on it");
        }
        Ok(())
    }

    #[test]
    fn bias_relu_and_their_gradients_match_candle() -> candle_core::Result<()> {
        // a feature map (n, h, w, c) with more rows than one task, and a small batch
        for dims in [vec![6, 14, 14, 32], vec![3, 5]] {
            let c = *dims.last().expect("c");
            let x = Var::from_tensor(&rand(&dims, 5))?;
            let b = Var::from_tensor(&rand(&[c], 6))?;
            check(
                &[&x, &b],
                || add_bias(x.as_tensor(), b.as_tensor()),
                || x.as_tensor().broadcast_add(b.as_tensor()),
                7,
            )?;
            check(
                &[&x, &b],
                || add_bias_relu(x.as_tensor(), b.as_tensor()),
                || x.as_tensor().broadcast_add(b.as_tensor())?.relu(),
                8,
            )?;
            check(&[&x], || relu(x.as_tensor()), || x.as_tensor().relu(), 9)?;
        }
        Ok(())
    }

    #[test]
    fn bias_rejects_a_mismatched_channel_count() {
        let x = rand(&[2, 3, 4], 1);
        let b = rand(&[3], 2);
        let e = add_bias(&x, &b).expect_err("4 channels, bias of 3");
        assert!(e.to_string().contains("bias"), "{e}");
    }

    #[test]
    fn column_sum_is_exact_and_independent_of_the_thread_count() {
        let cols = 3;
        let rows = 3 * rows_per_task(cols, CONV_TASK) + 5; // several blocks, the last one partial
        let g: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
        let want: Vec<f32> = (0..cols)
            .map(|j| (0..rows).map(|i| g[i * cols + j] as f64).sum::<f64>() as f32)
            .collect();
        assert_eq!(column_sum(&g, cols), want, "integer-valued sums are exact");
        let noisy: Vec<f32> = g.iter().map(|v| v * 0.37 + 0.001).collect();
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
                .install(|| column_sum(&noisy, cols))
        };
        assert_eq!(on(1), on(3), "bit-identical on 1 and 3 threads");
    }
}
