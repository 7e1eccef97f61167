//! Fused CPU ops of the transformer with explicit backward passes: layer
//! normalisation, softmax over the last dimension and exact (erf) GELU.
//!
//! candle-nn's fused `layer_norm` and `softmax_last_dim` have no backward
//! (gradients would silently stop there), and the composed versions take a
//! dozen passes over memory. These ops work row by row on contiguous f32 CPU
//! buffers, split over the rayon pool. On another device or dtype they fall
//! back to candle's composed ops, which also serve as the reference in tests.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use pretext_core::ops::gemm::{sgemm_threads, Mat};
use pretext_core::ops::{f32_slice as f32_of, fast_path as fast};

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(width: usize) -> usize {
    (16384 / width.max(1)).max(1)
}

struct LayerNormOp {
    eps: f32,
}

fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "pretext-layer-norm"
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
        let x = f32_of(s1, l1, "layer_norm x")?;
        let g = f32_of(s2, l2, "layer_norm weight")?;
        let b = f32_of(s3, l3, "layer_norm bias")?;
        let h = g.len();
        if h == 0 || x.len() % h != 0 || b.len() != h {
            bail!("layer_norm: x {:?} does not end in the weight's size {h}", l1.dims());
        }
        let mut y = vec![0f32; x.len()];
        let rows = rows_per_task(h) * h;
        y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(h).zip(xc.chunks(h)) {
                let (mean, rstd) = row_stats(xr, self.eps);
                for i in 0..h {
                    yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = g.elem_count();
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let gs = g.to_vec1::<f32>()?;
        let dys = dy.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.len()];
        let rows = rows_per_task(h) * h;
        let (dg, db) = dx
            .par_chunks_mut(rows)
            .zip(xs.par_chunks(rows).zip(dys.par_chunks(rows)))
            .map(|(dxc, (xc, dyc))| {
                let mut dg = vec![0f32; h];
                let mut db = vec![0f32; h];
                for ((dxr, xr), dyr) in dxc.chunks_mut(h).zip(xc.chunks(h)).zip(dyc.chunks(h)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for i in 0..h {
                        let xh = (xr[i] - mean) * rstd;
                        let gy = dyr[i] * gs[i];
                        s1 += gy;
                        s2 += gy * xh;
                        dg[i] += dyr[i] * xh;
                        db[i] += dyr[i];
                    }
                    let (m1, m2) = (s1 / h as f32, s2 / h as f32);
                    for i in 0..h {
                        let xh = (xr[i] - mean) * rstd;
                        dxr[i] = rstd * (dyr[i] * gs[i] - m1 - xh * m2);
                    }
                }
                (dg, db)
            })
            .reduce(
                || (vec![0f32; h], vec![0f32; h]),
                |(mut a, mut b), (c, d)| {
                    a.iter_mut().zip(&c).for_each(|(p, q)| *p += q);
                    b.iter_mut().zip(&d).for_each(|(p, q)| *p += q);
                    (a, b)
                },
            );
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dg, g.shape(), dev)?),
            Some(Tensor::from_vec(db, g.shape(), dev)?),
        ))
    }
}

/// Layer normalisation over the last dimension with affine `weight` and
/// `bias` (`torch.nn.LayerNorm`): fused on CPU f32, composed elsewhere.
///
/// # Errors
/// Shape mismatch.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if fast(&[x, weight, bias]) {
        x.contiguous()?
            .apply_op3_arc(weight, bias, std::sync::Arc::new(Box::new(LayerNormOp { eps })))
    } else {
        reference_layer_norm(x, weight, bias, eps)
    }
}

/// Layer normalisation from candle's differentiable elementwise ops.
///
/// # Errors
/// Shape mismatch.
pub fn reference_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + f64::from(eps))?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "pretext-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_of(s, l, "softmax")?;
        let w = l.dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        let rows = rows_per_task(w) * w;
        y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(w).zip(xc.chunks(w)) {
                let m = xr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0f32;
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = (v - m).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                yr.iter_mut().for_each(|o| *o *= inv);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = y.dim(D::Minus1)?.max(1);
        let ys = y.flatten_all()?.to_vec1::<f32>()?;
        let dys = dy.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; ys.len()];
        let rows = rows_per_task(w) * w;
        dx.par_chunks_mut(rows)
            .zip(ys.par_chunks(rows).zip(dys.par_chunks(rows)))
            .for_each(|(dxc, (yc, dyc))| {
                for ((dxr, yr), dyr) in dxc.chunks_mut(w).zip(yc.chunks(w)).zip(dyc.chunks(w)) {
                    let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
                    for i in 0..w {
                        dxr[i] = yr[i] * (dyr[i] - dot);
                    }
                }
            });
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

/// Softmax over the last dimension: fused on CPU f32 (with its backward), composed elsewhere.
///
/// # Errors
/// Tensor errors.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast(&[x]) {
        x.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(SoftmaxOp)))
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

struct GeluOp;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// `erf(x)` to within 1.5e-7 (Abramowitz & Stegun 7.1.26, evaluated in f64):
/// branch-free apart from the sign, several times faster than libm's `erff`.
fn erf(x: f32) -> f32 {
    let a = f64::from(x.abs());
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = (1.0 - poly * (-a * a).exp()) as f32;
    y.copysign(x)
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "pretext-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_of(s, l, "gelu")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(yc, xc)| {
            for (o, &v) in yc.iter_mut().zip(xc) {
                *o = 0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2));
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let dys = dy.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.len()];
        let c = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        dx.par_chunks_mut(16384)
            .zip(xs.par_chunks(16384).zip(dys.par_chunks(16384)))
            .for_each(|(o, (xc, dc))| {
                for i in 0..o.len() {
                    let v = xc[i];
                    o[i] = dc[i] * (0.5 * (1.0 + erf(v * FRAC_1_SQRT_2)) + v * c * (-0.5 * v * v).exp());
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Exact GELU, `x · Φ(x)` (`torch.nn.functional.gelu`, HF's `"gelu"`): fused on CPU f32.
///
/// # Errors
/// Tensor errors.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast(&[x]) {
        x.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(GeluOp)))
    } else {
        x.gelu_erf()
    }
}

/// An inverted-dropout mask of `shape`: each entry `0` with probability `p`,
/// else `1 / (1 - p)`, drawn from a SplitMix64 stream of `seed` (so masks are
/// a pure function of the seed: resumed runs drop the same units).
///
/// # Errors
/// Tensor errors.
pub fn dropout_mask(shape: &[usize], p: f64, seed: u64, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let keep = 1.0 / (1.0 - p) as f32;
    let threshold = (p * (1u64 << 53) as f64) as u64;
    let mut m = vec![0f32; n];
    m.par_chunks_mut(65536).enumerate().for_each(|(ci, c)| {
        let mut s = pretext_core::seed::splitmix64(seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for o in c.iter_mut() {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let r = pretext_core::seed::splitmix64(s) >> 11;
            *o = if r < threshold { 0.0 } else { keep };
        }
    });
    Tensor::from_vec(m, shape, device)
}

/// `x` with dropout `p` applied using a mask from `seed`; `x` itself when `p == 0`.
///
/// # Errors
/// Tensor errors.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    x.mul(&dropout_mask(x.dims(), p, seed, x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(super) fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = pretext_core::seed::splitmix64(s);
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flat")
            .max(0)
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar")
    }

    /// Forward values and gradients of the fused op equal candle's composed ops.
    fn check_against_reference(
        fused: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        reference: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        shape: &[usize],
        tol: f32,
    ) -> candle_core::Result<()> {
        let x = Var::from_tensor(&rand(shape, 1))?;
        let w = rand(shape, 2);
        let a = fused(x.as_tensor())?;
        let b = reference(x.as_tensor())?;
        assert!(max_diff(&a, &b) < tol, "forward differs by {}", max_diff(&a, &b));
        let ga = (a * &w)?.sum_all()?.backward()?;
        let gb = (b * &w)?.sum_all()?.backward()?;
        let (ga, gb) = (
            ga.get(x.as_tensor()).expect("grad"),
            gb.get(x.as_tensor()).expect("grad"),
        );
        assert!(max_diff(ga, gb) < tol, "gradient differs by {}", max_diff(ga, gb));
        Ok(())
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
    fn erf_is_accurate() {
        for i in -400..=400 {
            let x = i as f32 * 0.01;
            let e = (erf(x) - candle_core::cpu::erf::erf_f32(x)).abs();
            assert!(e < 3e-7, "erf({x}) off by {e}");
        }
    }

    #[test]
    fn gelu_matches_candle() -> candle_core::Result<()> {
        check_against_reference(gelu, |x| x.gelu_erf(), &[4, 300], 1e-5)
    }

    #[test]
    fn layer_norm_matches_composed_ops_with_parameter_gradients() -> candle_core::Result<()> {
        let x = Var::from_tensor(&rand(&[6, 7, 48], 3))?;
        let g = Var::from_tensor(&(rand(&[48], 4) + 1.0)?)?;
        let b = Var::from_tensor(&rand(&[48], 5))?;
        let w = rand(&[6, 7, 48], 6);
        let a = layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-12)?;
        let r = reference_layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-12)?;
        assert!(max_diff(&a, &r) < 1e-5);
        let ga = (a * &w)?.sum_all()?.backward()?;
        let gr = (r * &w)?.sum_all()?.backward()?;
        for v in [&x, &g, &b] {
            let d = max_diff(
                ga.get(v.as_tensor()).expect("grad"),
                gr.get(v.as_tensor()).expect("grad"),
            );
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() -> candle_core::Result<()> {
        // f64 finite differences of the composed op on the same input: the
        // fused f32 gradient must agree with the true derivative.
        let x = rand(&[2, 9], 7);
        let g = (rand(&[9], 8) + 1.0)?;
        let b = rand(&[9], 9);
        let w = rand(&[2, 9], 10);
        let xv = Var::from_tensor(&x)?;
        let grad = (layer_norm(xv.as_tensor(), &g, &b, 1e-5)? * &w)?
            .sum_all()?
            .backward()?;
        let grad = grad
            .get(xv.as_tensor())
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let f = |x: &Tensor| -> candle_core::Result<f64> {
            let x = x.to_dtype(DType::F64)?;
            (reference_layer_norm(&x, &g.to_dtype(DType::F64)?, &b.to_dtype(DType::F64)?, 1e-5)?
                * w.to_dtype(DType::F64)?)?
            .sum_all()?
            .to_scalar::<f64>()
        };
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..xs.len() {
            let h = 1e-3;
            let mut p = xs.clone();
            p[i] += h;
            let mut m = xs.clone();
            m[i] -= h;
            let fp = f(&Tensor::from_vec(p, x.shape(), &Device::Cpu)?)?;
            let fm = f(&Tensor::from_vec(m, x.shape(), &Device::Cpu)?)?;
            let fd = (fp - fm) / (2.0 * f64::from(h));
            assert!((fd - f64::from(grad[i])).abs() < 2e-3, "x[{i}]: fd {fd} vs {}", grad[i]);
        }
        Ok(())
    }

    #[test]
    fn dropout_mask_rate_and_scale() -> candle_core::Result<()> {
        let m = dropout_mask(&[100_000], 0.1, 42, &Device::Cpu)?.to_vec1::<f32>()?;
        let zeros = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
        assert!((zeros - 0.1).abs() < 0.005, "dropped {zeros}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        let again = dropout_mask(&[100_000], 0.1, 42, &Device::Cpu)?.to_vec1::<f32>()?;
        assert_eq!(m, again, "same seed, same mask");
        let other = dropout_mask(&[100_000], 0.1, 43, &Device::Cpu)?.to_vec1::<f32>()?;
        assert_ne!(m, other);
        Ok(())
    }
}

/// A strided view into a slice: element `(i, j)` at `off + i * rs + j * cs`.
#[derive(Debug, Clone, Copy)]
struct View {
    off: usize,
    rs: usize,
    cs: usize,
}

fn span(v: View, rows: usize, cols: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        v.off + (rows - 1) * v.rs + (cols - 1) * v.cs + 1
    }
}

/// `c (m × n) = a (m × k) · b (k × n)`, or `c += …` with `accumulate`;
/// `threads` > 1 splits the product over the rayon pool.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    c: &mut [f32],
    cv: View,
    accumulate: bool,
    threads: usize,
) {
    assert!(
        a.len() >= span(av, m, k) && b.len() >= span(bv, k, n) && c.len() >= span(cv, m, n),
        "matmul: a view runs past its buffer"
    );
    if m == 0 || n == 0 {
        return;
    }
    let mat = |v: View, rows: usize, cols: usize| Mat {
        rows,
        cols,
        rs: v.rs,
        cs: v.cs,
    };
    let a = if k == 0 { &a[..0] } else { &a[av.off..] };
    let b = if k == 0 { &b[..0] } else { &b[bv.off..] };
    sgemm_threads(
        a,
        mat(av, m, k),
        b,
        mat(bv, k, n),
        &mut c[cv.off..],
        mat(cv, m, n),
        accumulate,
        threads,
    );
}

fn row_major(cols: usize) -> View {
    View {
        off: 0,
        rs: cols,
        cs: 1,
    }
}

fn transposed(cols: usize) -> View {
    View {
        off: 0,
        rs: 1,
        cs: cols,
    }
}

/// The fused fully connected layer lives in the core crate (the VAE uses it too).
pub use pretext_core::ops::linear;

/// Multi-head scaled dot-product attention over `(batch · seq, hidden)` rows
/// (heads side by side in the hidden dimension, as Hugging Face lays them
/// out), with an additive key mask and dropout on the probabilities.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// `(batch · seq)` additive bias per key: 0 for tokens, a large negative number for padding.
    pub key_bias: std::sync::Arc<Vec<f32>>,
    /// Dropout on the attention probabilities (0 = none).
    pub dropout: f64,
    /// Seed of the dropout masks.
    pub seed: u64,
}

impl Attention {
    fn dims(&self, len: usize) -> candle_core::Result<(usize, usize)> {
        let rows = self.batch * self.seq;
        if rows == 0 || len % rows != 0 || (len / rows) % self.heads != 0 {
            bail!(
                "attention: {len} values do not fit {} sequences × {} tokens × {} heads",
                self.batch,
                self.seq,
                self.heads
            );
        }
        Ok((len / rows, len / rows / self.heads))
    }

    /// Probabilities (after dropout when `drop`) of head `task = b · heads + h`, `seq × seq`,
    /// and the dropout mask used.
    fn probs(
        &self,
        q: &[f32],
        k: &[f32],
        task: usize,
        hid: usize,
        dh: usize,
    ) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
        let t = self.seq;
        let (b, h) = (task / self.heads, task % self.heads);
        let base = View {
            off: b * t * hid + h * dh,
            rs: hid,
            cs: 1,
        };
        let kt = View {
            off: base.off,
            rs: 1,
            cs: hid,
        };
        let mut s = vec![0f32; t * t];
        matmul((t, t, dh), q, base, k, kt, &mut s, row_major(t), false, 1);
        let scale = 1.0 / (dh as f32).sqrt();
        let kb = &self.key_bias[b * t..(b + 1) * t];
        for row in s.chunks_mut(t) {
            let mut m = f32::NEG_INFINITY;
            for (v, &bias) in row.iter_mut().zip(kb) {
                *v = *v * scale + bias;
                m = m.max(*v);
            }
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = (*v - m).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        }
        if self.dropout > 0.0 {
            let seed = pretext_core::seed::splitmix64(self.seed ^ (task as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            let keep = 1.0 / (1.0 - self.dropout) as f32;
            let threshold = (self.dropout * (1u64 << 53) as f64) as u64;
            let mut st = seed;
            let mask: Vec<f32> = (0..t * t)
                .map(|_| {
                    st = st.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    if pretext_core::seed::splitmix64(st) >> 11 < threshold {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect();
            let dropped = s.iter().zip(&mask).map(|(p, m)| p * m).collect();
            (s, dropped, Some(mask))
        } else {
            (s.clone(), s, None)
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "pretext-attention"
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
        let q = f32_of(s1, l1, "attention q")?;
        let k = f32_of(s2, l2, "attention k")?;
        let v = f32_of(s3, l3, "attention v")?;
        if q.len() != k.len() || q.len() != v.len() {
            bail!("attention: q, k and v differ in size");
        }
        let (hid, dh) = self.dims(q.len())?;
        let t = self.seq;
        let parts: Vec<Vec<f32>> = (0..self.batch * self.heads)
            .into_par_iter()
            .map(|task| {
                let (_, p, _) = self.probs(q, k, task, hid, dh);
                let (b, h) = (task / self.heads, task % self.heads);
                let vv = View {
                    off: b * t * hid + h * dh,
                    rs: hid,
                    cs: 1,
                };
                let mut out = vec![0f32; t * dh];
                matmul((t, dh, t), &p, row_major(t), v, vv, &mut out, row_major(dh), false, 1);
                out
            })
            .collect();
        let mut ctx = vec![0f32; q.len()];
        scatter(&mut ctx, &parts, self.heads, t, hid, dh);
        Ok((CpuStorage::F32(ctx), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _ctx: &Tensor,
        dctx: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let qs = q.flatten_all()?.to_vec1::<f32>()?;
        let ks = k.flatten_all()?.to_vec1::<f32>()?;
        let vs = v.flatten_all()?.to_vec1::<f32>()?;
        let ds = dctx.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (hid, dh) = self.dims(qs.len())?;
        let t = self.seq;
        let scale = 1.0 / (dh as f32).sqrt();
        let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..self.batch * self.heads)
            .into_par_iter()
            .map(|task| {
                let (p, pd, mask) = self.probs(&qs, &ks, task, hid, dh);
                let (b, h) = (task / self.heads, task % self.heads);
                let blk = View {
                    off: b * t * hid + h * dh,
                    rs: hid,
                    cs: 1,
                };
                let blk_t = View {
                    off: blk.off,
                    rs: 1,
                    cs: hid,
                };
                // dV = P'ᵀ · dctx
                let mut dv = vec![0f32; t * dh];
                matmul(
                    (t, dh, t),
                    &pd,
                    transposed(t),
                    &ds,
                    blk,
                    &mut dv,
                    row_major(dh),
                    false,
                    1,
                );
                // dP' = dctx · Vᵀ, then through dropout and softmax
                let mut dp = vec![0f32; t * t];
                matmul((t, t, dh), &ds, blk, &vs, blk_t, &mut dp, row_major(t), false, 1);
                if let Some(m) = &mask {
                    dp.iter_mut().zip(m).for_each(|(d, m)| *d *= m);
                }
                for (dr, pr) in dp.chunks_mut(t).zip(p.chunks(t)) {
                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    dr.iter_mut().zip(pr).for_each(|(d, p)| *d = p * (*d - dot) * scale);
                }
                // dQ = dS · K, dK = dSᵀ · Q
                let mut dq = vec![0f32; t * dh];
                matmul(
                    (t, dh, t),
                    &dp,
                    row_major(t),
                    &ks,
                    blk,
                    &mut dq,
                    row_major(dh),
                    false,
                    1,
                );
                let mut dk = vec![0f32; t * dh];
                matmul(
                    (t, dh, t),
                    &dp,
                    transposed(t),
                    &qs,
                    blk,
                    &mut dk,
                    row_major(dh),
                    false,
                    1,
                );
                (dq, dk, dv)
            })
            .collect();
        let n = qs.len();
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let mut pq = Vec::with_capacity(parts.len());
        let mut pk = Vec::with_capacity(parts.len());
        let mut pv = Vec::with_capacity(parts.len());
        for (a, b, c) in parts {
            pq.push(a);
            pk.push(b);
            pv.push(c);
        }
        scatter(&mut dq, &pq, self.heads, t, hid, dh);
        scatter(&mut dk, &pk, self.heads, t, hid, dh);
        scatter(&mut dv, &pv, self.heads, t, hid, dh);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Writes per-head `seq × dh` blocks back into `(batch · seq, hidden)` rows.
fn scatter(out: &mut [f32], parts: &[Vec<f32>], heads: usize, t: usize, hid: usize, dh: usize) {
    for (task, p) in parts.iter().enumerate() {
        let (b, h) = (task / heads, task % heads);
        for (i, row) in p.chunks(dh).enumerate() {
            let o = (b * t + i) * hid + h * dh;
            out[o..o + dh].copy_from_slice(row);
        }
    }
}

/// Multi-head attention of `(batch · seq, hidden)` queries, keys and values
/// (see [`Attention`]): one fused node on CPU f32 that never materialises
/// transposed copies; candle's ops elsewhere (the reference in tests).
///
/// # Errors
/// Shapes that do not fit.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, op: Attention) -> candle_core::Result<Tensor> {
    if fast(&[q, k, v]) {
        q.contiguous()?
            .apply_op3_arc(&k.contiguous()?, &v.contiguous()?, std::sync::Arc::new(Box::new(op)))
    } else {
        reference_attention(q, k, v, &op)
    }
}

/// [`attention`] from candle's differentiable ops (dropout masks differ from the fused op's).
///
/// # Errors
/// Shapes that do not fit.
pub fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, op: &Attention) -> candle_core::Result<Tensor> {
    let (b, t, nh) = (op.batch, op.seq, op.heads);
    let hid = q.dim(D::Minus1)?;
    let dh = hid / nh;
    let split =
        |y: &Tensor| -> candle_core::Result<Tensor> { y.reshape((b, t, nh, dh))?.transpose(1, 2)?.contiguous() };
    let (qh, kh, vh) = (split(q)?, split(k)?, split(v)?);
    let bias = Tensor::from_slice(op.key_bias.as_slice(), (b, 1, 1, t), q.device())?;
    let scores = (qh.matmul(&kh.t()?)? * (1.0 / (dh as f64).sqrt()))?.broadcast_add(&bias)?;
    let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
    let p = dropout(&p, op.dropout, op.seed)?;
    p.matmul(&vh)?.transpose(1, 2)?.reshape((b * t, hid))
}

#[cfg(test)]
mod fused_tests {
    use super::*;
    use candle_core::{Device, Var};

    use super::tests::max_diff;

    /// Values in [-1, 1]: the shared generator's, halved.
    fn rand(shape: &[usize], seed: u64) -> Tensor {
        (super::tests::rand(shape, seed) * 0.5).expect("scale")
    }

    #[test]
    fn attention_and_its_gradients_match_candle() -> candle_core::Result<()> {
        let (b, t, nh, hid) = (2, 5, 3, 12);
        let mut key_bias = vec![0f32; b * t];
        key_bias[8] = -1e9;
        key_bias[9] = -1e9; // the second sequence has two padding tokens
        let op = Attention {
            batch: b,
            seq: t,
            heads: nh,
            key_bias: std::sync::Arc::new(key_bias),
            dropout: 0.0,
            seed: 0,
        };
        let q = Var::from_tensor(&rand(&[b * t, hid], 1))?;
        let k = Var::from_tensor(&rand(&[b * t, hid], 2))?;
        let v = Var::from_tensor(&rand(&[b * t, hid], 3))?;
        let g = rand(&[b * t, hid], 4);
        let y = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), op.clone())?;
        let r = reference_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &op)?;
        assert!(max_diff(&y, &r) < 1e-5, "{}", max_diff(&y, &r));
        let gy = (y * &g)?.sum_all()?.backward()?;
        let gr = (r * &g)?.sum_all()?.backward()?;
        for var in [&q, &k, &v] {
            let d = max_diff(gy.get(var.as_tensor()).expect("g"), gr.get(var.as_tensor()).expect("g"));
            assert!(d < 1e-5, "{d}");
        }
        Ok(())
    }

    #[test]
    fn attention_dropout_gradient_matches_finite_differences() -> candle_core::Result<()> {
        let (b, t, nh, hid) = (1, 4, 2, 4);
        let op = Attention {
            batch: b,
            seq: t,
            heads: nh,
            key_bias: std::sync::Arc::new(vec![0f32; b * t]),
            dropout: 0.3,
            seed: 11,
        };
        let q = rand(&[b * t, hid], 5);
        let k = rand(&[b * t, hid], 6);
        let v = rand(&[b * t, hid], 7);
        let g = rand(&[b * t, hid], 8);
        let qv = Var::from_tensor(&q)?;
        let grads = (attention(qv.as_tensor(), &k, &v, op.clone())? * &g)?
            .sum_all()?
            .backward()?;
        let an = grads.get(qv.as_tensor()).expect("g").flatten_all()?.to_vec1::<f32>()?;
        let qs = q.flatten_all()?.to_vec1::<f32>()?;
        let f = |x: Vec<f32>| -> candle_core::Result<f64> {
            let x = Tensor::from_vec(x, (b * t, hid), &Device::Cpu)?;
            Ok(f64::from(
                (attention(&x, &k, &v, op.clone())? * &g)?
                    .sum_all()?
                    .to_scalar::<f32>()?,
            ))
        };
        let mut some_dropped = false;
        for i in 0..qs.len() {
            let h = 1e-2;
            let (mut p, mut m) = (qs.clone(), qs.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (f(p)? - f(m)?) / (2.0 * f64::from(h));
            assert!((fd - f64::from(an[i])).abs() < 2e-3, "q[{i}]: {fd} vs {}", an[i]);
            some_dropped |= an[i] != 0.0;
        }
        assert!(some_dropped);
        Ok(())
    }
}

/// Mean cross-entropy of `(rows, classes)` logits against `targets`
/// (`log_softmax` and the gather in one pass), as a fused CPU op whose
/// backward is `(softmax − onehot) / rows`.
struct CrossEntropyOp {
    targets: std::sync::Arc<Vec<u32>>,
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "pretext-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_of(s, l, "cross_entropy logits")?;
        let (&[rows, c], true) = (l.dims(), true) else {
            bail!("cross_entropy: logits must be (rows, classes), got {:?}", l.dims());
        };
        if self.targets.len() != rows || self.targets.iter().any(|&t| t as usize >= c) {
            bail!(
                "cross_entropy: {rows} rows of {c} classes, targets {:?}",
                self.targets.len()
            );
        }
        let total: f64 = x
            .par_chunks(c)
            .zip(self.targets.par_iter())
            .map(|(r, &t)| {
                let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let lse = r.iter().map(|&v| f64::from((v - m).exp())).sum::<f64>().ln() + f64::from(m);
                lse - f64::from(r[t as usize])
            })
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / rows.max(1) as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(&self, x: &Tensor, _loss: &Tensor, dl: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (rows, c) = x.dims2()?;
        let g = dl.to_dtype(DType::F32)?.to_scalar::<f32>()? / rows.max(1) as f32;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(c)
            .zip(xs.par_chunks(c).zip(self.targets.par_iter()))
            .for_each(|(d, (r, &t))| {
                let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0f32;
                for (o, &v) in d.iter_mut().zip(r) {
                    *o = (v - m).exp();
                    sum += *o;
                }
                let inv = g / sum;
                d.iter_mut().for_each(|o| *o *= inv);
                d[t as usize] -= g;
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Mean cross-entropy of `(rows, classes)` logits against u32 `targets`:
/// fused on CPU f32, `candle_nn::loss::cross_entropy` elsewhere.
///
/// # Errors
/// Shapes or targets out of range.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if fast(&[logits]) && targets.device().is_cpu() {
        let t = std::sync::Arc::new(targets.to_dtype(DType::U32)?.to_vec1::<u32>()?);
        logits
            .contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(CrossEntropyOp { targets: t })))
    } else {
        candle_nn::loss::cross_entropy(logits, targets)
    }
}

#[cfg(test)]
mod ce_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn cross_entropy_and_its_gradient_match_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..5 * 11).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.3).collect();
        let x = Var::from_tensor(&Tensor::from_vec(v, (5, 11), &dev)?)?;
        let t = Tensor::new(&[3u32, 0, 10, 7, 3], &dev)?;
        let a = cross_entropy(x.as_tensor(), &t)?;
        let b = candle_nn::loss::cross_entropy(x.as_tensor(), &t)?;
        let (fa, fb) = (a.to_scalar::<f32>()?, b.to_scalar::<f32>()?);
        assert!((fa - fb).abs() < 1e-5, "{fa} vs {fb}");
        let ga = (a * 2.0)?.backward()?;
        let gb = (b * 2.0)?.backward()?;
        let d = (ga.get(x.as_tensor()).expect("g") - gb.get(x.as_tensor()).expect("g"))?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        assert!(cross_entropy(x.as_tensor(), &Tensor::new(&[3u32, 0, 11, 7, 3], &dev)?).is_err());
        Ok(())
    }
}
