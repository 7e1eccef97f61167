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

use super::gemm::{sgemm_threads, Mat};
use super::{f32_slice, fast_path, ReluMaskOp};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows per parallel task of the element-wise passes and column sums.
fn rows_per_task(cols: usize) -> usize {
    (1usize << 15).div_ceil(cols.max(1)).max(1)
}

/// Sums of the columns of the row-major `(rows, cols)` matrix `g`. Partial
/// sums over fixed blocks of rows run in parallel and are added in block order,
/// so the result does not depend on the thread count or scheduling.
pub fn column_sum(g: &[f32], cols: usize) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    let parts: Vec<Vec<f32>> = g
        .par_chunks(rows_per_task(cols) * cols)
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

struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "pretext-linear"
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
        let x = f32_slice(s1, l1, "linear x")?;
        let w = f32_slice(s2, l2, "linear weight")?;
        let b = f32_slice(s3, l3, "linear bias")?;
        let (&[dout, din], dims) = (l2.dims(), l1.dims()) else {
            bail!("linear: weight must be (out, in), got {:?}", l2.dims());
        };
        if dims.last() != Some(&din) || b.len() != dout {
            bail!("linear: x {dims:?}, weight ({dout}, {din}), bias {}", b.len());
        }
        let rows = x.len() / din.max(1);
        let mut y = vec![0f32; rows * dout];
        if dout > 0 {
            for r in y.chunks_mut(dout) {
                r.copy_from_slice(b);
            }
        }
        sgemm_threads(
            x,
            Mat::row_major(rows, din),
            w,
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
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // As for the convolutions: an input that tracks no gradient (a batch
        // of data into a first layer) gets no input product.
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(w, &LinearBwdInput)?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = dy.apply_op2_no_bwd(x, &LinearBwdWeight)?;
        let db = dy.apply_op1_no_bwd(&ColumnSumOp)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// `dx (rows, in) = dy (rows, out) · W (out, in)`.
struct LinearBwdInput;

impl CustomOp2 for LinearBwdInput {
    fn name(&self) -> &'static str {
        "pretext-linear-bwd-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = f32_slice(s1, l1, "linear dy")?;
        let w = f32_slice(s2, l2, "linear weight")?;
        let &[dout, din] = l2.dims() else {
            bail!("linear: weight must be (out, in), got {:?}", l2.dims());
        };
        let rows = dy.len() / dout.max(1);
        let mut dx = vec![0f32; rows * din];
        sgemm_threads(
            dy,
            Mat::row_major(rows, dout),
            w,
            Mat::row_major(dout, din),
            &mut dx,
            Mat::row_major(rows, din),
            false,
            rayon::current_num_threads(),
        );
        Ok((CpuStorage::F32(dx), Shape::from((rows, din))))
    }
}

/// `dW (out, in) = dyᵀ (out, rows) · x (rows, in)`.
struct LinearBwdWeight;

impl CustomOp2 for LinearBwdWeight {
    fn name(&self) -> &'static str {
        "pretext-linear-bwd-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = f32_slice(s1, l1, "linear dy")?;
        let x = f32_slice(s2, l2, "linear x")?;
        let (dout, din) = (
            l1.dims().last().copied().unwrap_or(0),
            l2.dims().last().copied().unwrap_or(0),
        );
        let rows = dy.len() / dout.max(1);
        let mut dw = vec![0f32; dout * din];
        sgemm_threads(
            dy,
            Mat::row_major(rows, dout).t(),
            x,
            Mat::row_major(rows, din),
            &mut dw,
            Mat::row_major(dout, din),
            false,
            rayon::current_num_threads(),
        );
        Ok((CpuStorage::F32(dw), Shape::from((dout, din))))
    }
}

/// Column sums over the last dimension: `(…, c)` → `(c)`.
struct ColumnSumOp;

impl CustomOp1 for ColumnSumOp {
    fn name(&self) -> &'static str {
        "pretext-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = l.dims().last().copied().unwrap_or(1);
        let sums = column_sum(f32_slice(s, l, "column_sum")?, cols);
        Ok((CpuStorage::F32(sums), Shape::from(cols)))
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
        x.contiguous()?.apply_op3_arc(
            &weight.contiguous()?,
            &bias.contiguous()?,
            std::sync::Arc::new(Box::new(LinearOp)),
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

impl CustomOp2 for BiasOp {
    fn name(&self) -> &'static str {
        if self.relu {
            "pretext-bias-relu"
        } else {
            "pretext-bias"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "bias x")?;
        let b = f32_slice(s2, l2, "bias")?;
        let c = b.len();
        if l2.dims().len() != 1 || l1.dims().last() != Some(&c) {
            bail!("bias: x {:?} does not end in the bias's {:?}", l1.dims(), l2.dims());
        }
        let mut y = vec![0f32; x.len()];
        if c > 0 {
            let relu = self.relu;
            y.par_chunks_mut(rows_per_task(c) * c)
                .zip(x.par_chunks(rows_per_task(c) * c))
                .for_each(|(y, x)| {
                    for (yr, xr) in y.chunks_mut(c).zip(x.chunks(c)) {
                        for ((y, x), b) in yr.iter_mut().zip(xr).zip(b) {
                            let v = x + b;
                            *y = if relu { v.max(0.0) } else { v };
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let g = if self.relu {
            dy.apply_op2_no_bwd(&y.contiguous()?, &ReluMaskOp)?
        } else {
            dy
        };
        let db = g.apply_op1_no_bwd(&ColumnSumOp)?;
        Ok((Some(g), Some(db)))
    }
}

/// `x + bias`, the bias `(c)` broadcast over the leading dimensions of `x` `(…, c)`.
///
/// # Errors
/// The last dimension of `x` is not the bias's length.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x, bias]) {
        x.contiguous()?.apply_op2(&bias.contiguous()?, BiasOp { relu: false })
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
        x.contiguous()?.apply_op2(&bias.contiguous()?, BiasOp { relu: true })
    } else {
        x.broadcast_add(bias)?.relu()
    }
}

struct ReluOp;

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "pretext-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "relu")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(1 << 15)
            .zip(x.par_chunks(1 << 15))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, x)| *y = x.max(0.0)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op2_no_bwd(&y.contiguous()?, &ReluMaskOp)?))
    }
}

/// `max(x, 0)` as one node whose backward is a single masked copy (candle's
/// takes four passes).
///
/// # Errors
/// A tensor operation failed.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x]) {
        x.contiguous()?.apply_op1(ReluOp)
    } else {
        x.relu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let rows = 3 * rows_per_task(cols) + 5; // several blocks, the last one partial
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
