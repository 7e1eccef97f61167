//! Losses as single graph nodes: the mean cross-entropy of logits against
//! class indices (masked language modelling, NT-Xent, InfoNCE, fine-tuning)
//! and the per-row Bernoulli log-likelihood of logits (the VAE's decoder).

use super::fast_path;
use super::fused::{apply, apply_no_grad, values, FusedOp, Operand};
use candle_core::{bail, DType, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

/// Mean cross-entropy of `(rows, classes)` logits against `targets`
/// (`log_softmax` and the gather in one pass, the rows' sum in f64), whose
/// backward is `(softmax − onehot) / rows`.
struct CrossEntropyOp {
    targets: Arc<Vec<u32>>,
}

impl FusedOp<1> for CrossEntropyOp {
    const NAME: &'static str = "pretext-cross-entropy";

    fn forward(&self, [x]: [Operand<'_>; 1]) -> Result<(Vec<f32>, Shape)> {
        let &[rows, c] = x.dims else {
            bail!("cross_entropy: logits must be (rows, classes), got {:?}", x.dims);
        };
        if self.targets.len() != rows || self.targets.iter().any(|&t| t as usize >= c) {
            bail!(
                "cross_entropy: {rows} rows of {c} classes, targets {:?}",
                self.targets.len()
            );
        }
        let total: f64 = x
            .data
            .par_chunks(c)
            .zip(self.targets.par_iter())
            .map(|(r, &t)| {
                let (m, sum) = super::vector::max_and_exp_sum(r);
                let lse = f64::from(sum).ln() + f64::from(m);
                lse - f64::from(r[t as usize])
            })
            .sum();
        Ok((vec![(total / rows.max(1) as f64) as f32], Shape::from(())))
    }

    fn backward(&self, [x]: [&Tensor; 1], _loss: &Tensor, dl: &Tensor) -> Result<[Option<Tensor>; 1]> {
        let (rows, c) = x.dims2()?;
        let g = dl.to_dtype(DType::F32)?.to_scalar::<f32>()? / rows.max(1) as f32;
        let xs = values(x)?;
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(c)
            .zip(xs.par_chunks(c).zip(self.targets.par_iter()))
            .for_each(|(d, (r, &t))| super::vector::softmax_minus_onehot(r, d, t as usize, g));
        Ok([Some(Tensor::from_vec(dx, x.shape(), x.device())?)])
    }
}

/// Mean cross-entropy of `(rows, classes)` logits against integer `targets`
/// (`torch.nn.functional.cross_entropy`): fused on CPU f32,
/// `candle_nn::loss::cross_entropy` elsewhere.
///
/// # Errors
/// Shapes or targets out of range.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fast_path(&[logits]) && targets.device().is_cpu() {
        let t = Arc::new(targets.to_dtype(DType::U32)?.to_vec1::<u32>()?);
        apply([&logits.contiguous()?], CrossEntropyOp { targets: t })
    } else {
        candle_nn::loss::cross_entropy(logits, targets)
    }
}

/// `log(1 + exp(x))`, stable for large |x|.
///
/// # Errors
/// A tensor operation failed.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Bernoulli log-likelihood per row with logits `l` of targets `x` in [0, 1]
/// (continuous targets give the "continuous BCE" of the literature):
/// `Σ x·l − softplus(l)` = `Σ x log σ(l) + (1 − x) log(1 − σ(l))`.
///
/// # Shapes
/// `logits`, `x`: `(n, ...)` → `(n,)`.
///
/// # Errors
/// Shapes differ.
pub fn bernoulli_log_lik(logits: &Tensor, x: &Tensor) -> Result<Tensor> {
    if logits.dims() != x.dims() {
        bail!(
            "bernoulli_log_lik: logits {:?} and targets {:?} differ",
            logits.dims(),
            x.dims()
        );
    }
    if fast_path(&[logits, x]) && x.rank() > 0 {
        apply([&logits.contiguous()?, &x.contiguous()?], BernoulliLogLik)
    } else {
        reference_bernoulli_log_lik(logits, x)
    }
}

/// [`bernoulli_log_lik`] composed from candle's ops (other devices, and the test reference).
///
/// # Errors
/// Shapes differ.
pub fn reference_bernoulli_log_lik(logits: &Tensor, x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    ((x * logits)? - softplus(logits)?)?.reshape((n, ()))?.sum(D::Minus1)
}

/// `x·l − softplus(l)` for one element, as [`softplus`] computes it.
fn bernoulli_term(l: f32, x: f32) -> f32 {
    x * l - (l.max(0.0) + (-l.abs()).exp().ln_1p())
}

/// Rows and values per row of an `(n, …)` operand.
fn rows_of(dims: &[usize]) -> (usize, usize) {
    let n = dims.first().copied().unwrap_or(1);
    (n, dims.iter().product::<usize>() / n.max(1))
}

/// The per-row Bernoulli log-likelihood as one node: one pass forward, and
/// `∂/∂l = (x − σ(l)) · g_row` (`∂/∂x = l · g_row`) backward, instead of a
/// dozen element-wise nodes each way.
struct BernoulliLogLik;

impl FusedOp<2> for BernoulliLogLik {
    const NAME: &'static str = "pretext-bernoulli-log-lik";

    fn forward(&self, [logits, x]: [Operand<'_>; 2]) -> Result<(Vec<f32>, Shape)> {
        let (n, d) = rows_of(logits.dims);
        let out: Vec<f32> = if d == 0 {
            vec![0.0; n]
        } else {
            logits
                .data
                .par_chunks(d)
                .zip(x.data.par_chunks(d))
                .map(|(l, x)| l.iter().zip(x).map(|(&l, &x)| bernoulli_term(l, x)).sum())
                .collect()
        };
        Ok((out, Shape::from(n)))
    }

    fn backward(&self, [logits, x]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let (shape, n) = (logits.shape(), logits.dims()[0]);
        let g = grad.contiguous()?;
        let dl = apply_no_grad([logits, &x.contiguous()?, &g], BernoulliGrad)?;
        let dx = if x.track_op() {
            Some(
                logits
                    .reshape((n, ()))?
                    .broadcast_mul(&g.reshape((n, 1))?)?
                    .reshape(shape)?,
            )
        } else {
            None
        };
        Ok([Some(dl), dx])
    }
}

/// `(x − σ(l)) · g_row`, element by element.
struct BernoulliGrad;

impl FusedOp<3> for BernoulliGrad {
    const NAME: &'static str = "pretext-bernoulli-log-lik-grad";

    fn forward(&self, [logits, x, g]: [Operand<'_>; 3]) -> Result<(Vec<f32>, Shape)> {
        let (_, d) = rows_of(logits.dims);
        let mut out = vec![0f32; logits.data.len()];
        if d > 0 {
            out.par_chunks_mut(d)
                .zip(logits.data.par_chunks(d).zip(x.data.par_chunks(d)))
                .zip(g.data.par_iter())
                .for_each(|((o, (l, x)), &g)| {
                    for ((o, &l), &x) in o.iter_mut().zip(l).zip(x) {
                        *o = (x - 1.0 / (1.0 + (-l).exp())) * g;
                    }
                });
        }
        Ok((out, Shape::from(logits.dims.to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32], shape: (usize, usize)) -> Result<Tensor> {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
    }

    #[test]
    fn cross_entropy_and_its_gradient_match_candle() -> Result<()> {
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

    #[test]
    fn cross_entropy_by_hand() -> Result<()> {
        // logits (0, ln 3) with target 1: -log(3 / 4); a masked-out logit of
        // -1e9 (NT-Xent's own similarity) contributes nothing.
        let x = t(&[0.0, 3f32.ln(), -1e9], (1, 3))?;
        let got = f64::from(cross_entropy(&x, &Tensor::new(&[1u32], &Device::Cpu)?)?.to_scalar::<f32>()?);
        assert!((got - (4.0f64 / 3.0).ln()).abs() < 1e-6, "{got}");
        Ok(())
    }

    #[test]
    fn fused_bernoulli_log_likelihood_and_gradients_match_the_composition() -> Result<()> {
        // (n, c, h, w) logits including saturated ones, targets in [0, 1]
        let (n, d) = (5usize, 3 * 4 * 4);
        let lv: Vec<f32> = (0..n * d)
            .map(|i| match i % 17 {
                0 => 40.0,
                1 => -40.0,
                _ => ((i * 7919) % 201) as f32 / 20.0 - 5.0,
            })
            .collect();
        let xv: Vec<f32> = (0..n * d).map(|i| ((i * 104_729) % 101) as f32 / 100.0).collect();
        let logits = Var::from_tensor(&Tensor::from_vec(lv, (n, 3, 4, 4), &Device::Cpu)?)?;
        let x = Var::from_tensor(&Tensor::from_vec(xv, (n, 3, 4, 4), &Device::Cpu)?)?;
        let g = Tensor::new(&[0.5f32, -1.0, 2.0, 0.25, 1.5], &Device::Cpu)?;
        let fused = bernoulli_log_lik(logits.as_tensor(), x.as_tensor())?;
        let reference = reference_bernoulli_log_lik(logits.as_tensor(), x.as_tensor())?;
        let (a, b) = (fused.to_vec1::<f32>()?, reference.to_vec1::<f32>()?);
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "{a} vs {b}");
        }
        let gf = (fused * &g)?.sum_all()?.backward()?;
        let gr = (reference * &g)?.sum_all()?.backward()?;
        for v in [&logits, &x] {
            let a = gf.get(v.as_tensor()).expect("fused").flatten_all()?.to_vec1::<f32>()?;
            let b = gr
                .get(v.as_tensor())
                .expect("reference")
                .flatten_all()?
                .to_vec1::<f32>()?;
            let err = a.iter().zip(&b).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-4, "gradient differs by {err}");
        }
        // data targets (not variables) get no gradient
        let plain = x.as_tensor().detach();
        let gp = bernoulli_log_lik(logits.as_tensor(), &plain)?.sum_all()?.backward()?;
        assert!(gp.get(&plain).is_none());
        assert!(bernoulli_log_lik(logits.as_tensor(), &plain.reshape((n, d))?).is_err());
        Ok(())
    }

    #[test]
    fn bernoulli_log_likelihood_by_hand() -> Result<()> {
        let logits = [2.0f32, -1.0, 0.0, 30.0, -30.0, 0.5];
        let x = [1.0f32, 0.0, 0.3, 1.0, 0.0, 0.75];
        let got = bernoulli_log_lik(&t(&logits, (2, 3))?, &t(&x, (2, 3))?)?.to_vec1::<f32>()?;
        let sig = |l: f64| 1.0 / (1.0 + (-l).exp());
        let want: Vec<f64> = logits
            .chunks(3)
            .zip(x.chunks(3))
            .map(|(l, x)| {
                l.iter()
                    .zip(x)
                    .map(|(&l, &x)| {
                        let p = sig(l as f64);
                        let (lp, l1p) = (p.max(1e-300).ln(), (1.0 - p).max(1e-300).ln());
                        // the extremes by their limits: log σ(30) ≈ −e^{−30}
                        let lp = if l > 20.0 { -(-(l as f64)).exp() } else { lp };
                        let l1p = if l < -20.0 { -((l as f64).exp()) } else { l1p };
                        x as f64 * lp + (1.0 - x as f64) * l1p
                    })
                    .sum()
            })
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        // hand value of the first row: log σ(2) + log(1 − σ(−1)) + 0.3 log σ(0) + 0.7 log(1 − σ(0))
        let first = (sig(2.0)).ln() + (1.0 - sig(-1.0)).ln() + 0.5f64.ln();
        assert!((got[0] as f64 - first).abs() < 1e-5);
        Ok(())
    }
}
