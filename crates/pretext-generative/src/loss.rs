//! The VAE's terms, per image, in nats: closed-form KL to the standard normal
//! prior, Bernoulli and Gaussian log-likelihoods, and the log importance
//! weights behind the ELBO and the importance-weighted bound (IWAE).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use pretext_core::ops::{f32_slice, fast_path};
use rayon::prelude::*;

const LN_2PI: f64 = 1.837_877_066_409_345_5;

/// `KL(N(μ, σ²) ‖ N(0, I))` per row: `½ Σ (μ² + σ² − 1 − log σ²)`.
///
/// # Shapes
/// `mu`, `logvar`: `(n, d)` → `(n,)`.
///
/// # Errors
/// Shapes differ.
pub fn gaussian_kl(mu: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    ((mu.sqr()? + logvar.exp()?)? - 1.0)?.sub(logvar)?.sum(D::Minus1)? * 0.5
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
        logits.contiguous()?.apply_op2(&x.contiguous()?, BernoulliLogLik)
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

/// The per-row Bernoulli log-likelihood as one node: one pass forward, and
/// `∂/∂l = (x − σ(l)) · g_row` (`∂/∂x = l · g_row`) backward, instead of a
/// dozen element-wise nodes each way.
struct BernoulliLogLik;

impl BernoulliLogLik {
    fn rows(l: &Layout) -> (usize, usize) {
        let n = l.dims()[0];
        (n, l.shape().elem_count() / n.max(1))
    }
}

impl CustomOp2 for BernoulliLogLik {
    fn name(&self) -> &'static str {
        "pretext-bernoulli-log-lik"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, x) = (f32_slice(s1, l1, "logits")?, f32_slice(s2, l2, "targets")?);
        let (n, d) = Self::rows(l1);
        let out: Vec<f32> = if d == 0 {
            vec![0.0; n]
        } else {
            logits
                .par_chunks(d)
                .zip(x.par_chunks(d))
                .map(|(l, x)| l.iter().zip(x).map(|(&l, &x)| bernoulli_term(l, x)).sum())
                .collect()
        };
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (shape, n) = (logits.shape(), logits.dims()[0]);
        let g = grad.contiguous()?;
        let dl = logits.apply_op3_no_bwd(&x.contiguous()?, &g, &BernoulliGrad)?;
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
        Ok((Some(dl), dx))
    }
}

/// `(x − σ(l)) · g_row`, element by element.
struct BernoulliGrad;

impl CustomOp3 for BernoulliGrad {
    fn name(&self) -> &'static str {
        "pretext-bernoulli-log-lik-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, x) = (f32_slice(s1, l1, "logits")?, f32_slice(s2, l2, "targets")?);
        let g = f32_slice(s3, l3, "row gradients")?;
        let (_, d) = BernoulliLogLik::rows(l1);
        let mut out = vec![0f32; logits.len()];
        if d > 0 {
            out.par_chunks_mut(d)
                .zip(logits.par_chunks(d).zip(x.par_chunks(d)))
                .zip(g.par_iter())
                .for_each(|((o, (l, x)), &g)| {
                    for ((o, &l), &x) in o.iter_mut().zip(l).zip(x) {
                        *o = (x - 1.0 / (1.0 + (-l).exp())) * g;
                    }
                });
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Gaussian log-likelihood per row with means `mean` and a shared log standard
/// deviation `log_sigma` (a tensor of one element):
/// `−½ Σ ((x − m)² / σ² + log 2π) − D log σ`.
///
/// # Errors
/// Shapes differ.
pub fn gaussian_log_lik(mean: &Tensor, log_sigma: &Tensor, x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    let d = x.elem_count() / n.max(1);
    let sq = (x - mean)?.sqr()?.reshape((n, ()))?.sum(D::Minus1)?; // (n,)
    let inv_var = (log_sigma.flatten_all()? * -2.0)?.exp()?; // (1,)
    let quad = sq.broadcast_mul(&inv_var)?;
    let norm = ((log_sigma.flatten_all()? * d as f64)? + 0.5 * d as f64 * LN_2PI)?; // (1,)
    (quad * -0.5)?.broadcast_sub(&norm)
}

/// Log-density of `z` under `N(0, I)` per row.
///
/// # Errors
/// A tensor operation failed.
pub fn log_standard_normal(z: &Tensor) -> Result<Tensor> {
    let d = z.dim(D::Minus1)? as f64;
    (z.sqr()?.sum(D::Minus1)? * -0.5)? - 0.5 * d * LN_2PI
}

/// Log-density under `N(μ, σ²)` of `z = μ + σ·ε`, from `ε` and `log σ²`, per row.
///
/// # Errors
/// A tensor operation failed.
pub fn log_posterior(eps: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    let d = eps.dim(D::Minus1)? as f64;
    ((eps.sqr()? + logvar)?.sum(D::Minus1)? * -0.5)? - 0.5 * d * LN_2PI
}

/// `log mean exp` over dimension 0 of `(k, n)` log-weights → `(n,)`: the
/// importance-weighted bound with `k` samples.
///
/// # Errors
/// A tensor operation failed.
pub fn log_mean_exp(w: &Tensor) -> Result<Tensor> {
    let k = w.dim(0)? as f64;
    let m = w.max_keepdim(0)?;
    (w.broadcast_sub(&m)?.exp()?.sum_keepdim(0)?.log()? + m)?.squeeze(0)? - k.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;

    fn t(v: &[f32], shape: (usize, usize)) -> Result<Tensor> {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
    }

    #[test]
    fn fused_bernoulli_log_likelihood_and_gradients_match_the_composition() -> Result<()> {
        use candle_core::Var;
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
    fn kl_matches_a_monte_carlo_estimate() -> Result<()> {
        let mu = [0.5f32, -1.0, 0.2];
        let logvar = [-0.7f32, 0.3, 0.0];
        let kl = gaussian_kl(&t(&mu, (1, 3))?, &t(&logvar, (1, 3))?)?.to_vec1::<f32>()?[0] as f64;
        // E_q[log q(z) − log p(z)] with 200k samples
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let n = 200_000;
        let mut acc = 0.0;
        for _ in 0..n {
            let mut lq = 0.0;
            let mut lp = 0.0;
            for i in 0..3 {
                let e = pretext_core::init::standard_normal(&mut rng);
                let s = (0.5 * logvar[i] as f64).exp();
                let z = mu[i] as f64 + s * e;
                lq += -0.5 * (e * e + LN_2PI) - s.ln();
                lp += -0.5 * (z * z + LN_2PI);
            }
            acc += lq - lp;
        }
        let mc = acc / n as f64;
        assert!((kl - mc).abs() < 0.01, "closed form {kl} vs Monte Carlo {mc}");
        // and zero for the prior itself
        let zero = gaussian_kl(&t(&[0.0; 3], (1, 3))?, &t(&[0.0; 3], (1, 3))?)?.to_vec1::<f32>()?[0];
        assert_eq!(zero, 0.0);
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

    #[test]
    fn gaussian_log_likelihood_by_hand() -> Result<()> {
        let mean = t(&[0.0, 1.0], (1, 2))?;
        let x = t(&[0.5, 0.0], (1, 2))?;
        let log_sigma = Tensor::new(&[(0.5f32).ln()], &Device::Cpu)?;
        let got = gaussian_log_lik(&mean, &log_sigma, &x)?.to_vec1::<f32>()?[0] as f64;
        let s2 = 0.25f64;
        let want = -0.5 * (0.25 / s2 + 1.0 / s2) - (2.0 * std::f64::consts::PI * s2).ln();
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn log_mean_exp_is_stable_and_exact() -> Result<()> {
        let w = t(&[-1000.0, 0.0, -1001.0, 1.0], (2, 2))?;
        let got = log_mean_exp(&w)?.to_vec1::<f32>()?;
        let want0 = -1000.0 + ((1.0 + (-1.0f64).exp()) / 2.0).ln();
        let want1 = ((1.0f64 + 1f64.exp()) / 2.0).ln();
        assert!(
            (got[0] as f64 - want0).abs() < 1e-3 && (got[1] as f64 - want1).abs() < 1e-5,
            "{got:?}"
        );
        Ok(())
    }
}
