//! The VAE's terms, per image, in nats: closed-form KL to the standard normal
//! prior, Bernoulli and Gaussian log-likelihoods, and the log importance
//! weights behind the ELBO and the importance-weighted bound (IWAE).

use candle_core::{Result, Tensor, D};

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

pub use pretext_core::ops::{bernoulli_log_lik, reference_bernoulli_log_lik, softplus};

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
