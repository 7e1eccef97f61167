//! Contrastive losses. Pure functions of their inputs.

use candle_core::{DType, Result, Tensor, D};
use pretext_core::ops::cross_entropy;

/// Rows scaled to unit L2 norm (norms clamped at 1e-12).
///
/// # Errors
/// A tensor operation failed.
pub fn l2_normalize(z: &Tensor) -> Result<Tensor> {
    let norm = z.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    z.broadcast_div(&norm)
}

/// NT-Xent (SimCLR): for the 2N views `z = [z1; z2]`, cosine similarities
/// divided by `tau`, each view's own similarity excluded, the positive of
/// view `i` its other view; the mean cross-entropy over all 2N anchors:
/// `l(i) = -log(exp(s(i,p(i))/t) / Σ_{k≠i} exp(s(i,k)/t))`.
///
/// # Shapes
/// `z1`, `z2`: `(n, d)` (not necessarily normalised). Scalar out.
///
/// # Errors
/// Shapes differ.
pub fn nt_xent(z1: &Tensor, z2: &Tensor, tau: f64) -> Result<Tensor> {
    let n = z1.dim(0)?;
    let z = l2_normalize(&Tensor::cat(&[z1, z2], 0)?)?; // (2n, d)
    let sim = (z.matmul(&z.t()?)? / tau)?; // (2n, 2n)
    let eye = Tensor::eye(2 * n, DType::F32, z.device())?.to_dtype(sim.dtype())?;
    let logits = (sim - (eye * 1e9)?)?;
    let targets: Vec<u32> = (0..2 * n).map(|i| ((i + n) % (2 * n)) as u32).collect();
    let targets = Tensor::new(targets, z.device())?;
    cross_entropy(&logits, &targets)
}

/// InfoNCE (MoCo): each query's positive is its key; negatives are the
/// `queue` (and nothing else). Logits `[q·k, q·queue] / tau`, target 0.
///
/// # Shapes
/// `q`, `k`: `(b, d)`, unit norm; `queue`: `(n, d)` unit norm. Scalar out.
///
/// # Errors
/// Shapes differ.
pub fn info_nce(q: &Tensor, k: &Tensor, queue: Option<&Tensor>, tau: f64) -> Result<Tensor> {
    let pos = (q * k)?.sum_keepdim(D::Minus1)?; // (b, 1)
    let logits = match queue {
        Some(qu) => Tensor::cat(&[&pos, &q.matmul(&qu.t()?)?], 1)?,
        None => {
            // In-batch negatives: the other keys.
            let all = q.matmul(&k.t()?)?; // (b, b), positive on the diagonal
            let b = q.dim(0)?;
            let targets = Tensor::arange(0u32, b as u32, q.device())?;
            return cross_entropy(&(all / tau)?, &targets);
        }
    };
    let targets = Tensor::zeros(q.dim(0)?, DType::U32, q.device())?;
    cross_entropy(&(logits / tau)?, &targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    fn randn(n: usize, d: usize, seed: u64) -> Result<Tensor> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, (n, d), &Device::Cpu)
    }

    fn naive_nt_xent(z1: &[Vec<f64>], z2: &[Vec<f64>], tau: f64) -> f64 {
        let z: Vec<Vec<f64>> = z1
            .iter()
            .chain(z2)
            .map(|v| {
                let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                v.iter().map(|x| x / n).collect()
            })
            .collect();
        let m = z.len();
        let half = m / 2;
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let mut total = 0.0;
        for i in 0..m {
            let p = (i + half) % m;
            let denom: f64 = (0..m)
                .filter(|&k| k != i)
                .map(|k| (dot(&z[i], &z[k]) / tau).exp())
                .sum();
            total += -((dot(&z[i], &z[p]) / tau).exp() / denom).ln();
        }
        total / m as f64
    }

    fn rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
        t.to_dtype(DType::F64)?.to_vec2::<f64>()
    }

    #[test]
    fn nt_xent_matches_a_naive_loop() -> Result<()> {
        for (n, d, tau, seed) in [(4, 8, 0.5, 0), (7, 3, 0.1, 1), (2, 16, 1.0, 2)] {
            let (a, b) = (randn(n, d, seed)?, randn(n, d, seed + 10)?);
            let got = f64::from(nt_xent(&a, &b, tau)?.to_scalar::<f32>()?);
            let want = naive_nt_xent(&rows(&a)?, &rows(&b)?, tau);
            assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{got} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn nt_xent_gradient_on_the_fused_cross_entropy_matches_candle_composition() -> Result<()> {
        use candle_core::Var;
        let (n, d, tau) = (6, 5, 0.2);
        let z1 = Var::from_tensor(&randn(n, d, 3)?)?;
        let z2 = Var::from_tensor(&randn(n, d, 4)?)?;
        let fused = nt_xent(z1.as_tensor(), z2.as_tensor(), tau)?;
        // the same loss through candle's cross-entropy
        let z = l2_normalize(&Tensor::cat(&[z1.as_tensor(), z2.as_tensor()], 0)?)?;
        let sim = (z.matmul(&z.t()?)? / tau)?;
        let logits = (sim - (Tensor::eye(2 * n, DType::F32, &Device::Cpu)? * 1e9)?)?;
        let targets = Tensor::new(
            (0..2 * n).map(|i| ((i + n) % (2 * n)) as u32).collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        let composed = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let (a, b) = (fused.to_scalar::<f32>()?, composed.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let (gf, gc) = (fused.backward()?, composed.backward()?);
        for v in [&z1, &z2] {
            let x = gf.get(v.as_tensor()).expect("fused").flatten_all()?.to_vec1::<f32>()?;
            let y = gc
                .get(v.as_tensor())
                .expect("composed")
                .flatten_all()?
                .to_vec1::<f32>()?;
            let err = x.iter().zip(&y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(err < 1e-5, "gradient differs by {err}");
            assert!(y.iter().any(|g| g.abs() > 1e-3), "a gradient that is not zero");
        }
        Ok(())
    }

    #[test]
    fn nt_xent_closed_form_for_identical_embeddings() -> Result<()> {
        // All 2N embeddings collinear: every similarity is 1, so each anchor's
        // loss is ln(2N - 1).
        let n = 5;
        let z = Tensor::ones((n, 4), DType::F32, &Device::Cpu)?;
        let got = f64::from(nt_xent(&z, &(&z * 3.0)?, 0.5)?.to_scalar::<f32>()?);
        assert!((got - ((2 * n - 1) as f64).ln()).abs() < 1e-5, "{got}");
        Ok(())
    }

    #[test]
    fn info_nce_matches_a_naive_loop() -> Result<()> {
        let norm = |t: Tensor| -> Result<Tensor> { l2_normalize(&t) };
        let (q, k, queue) = (norm(randn(3, 4, 0)?)?, norm(randn(3, 4, 1)?)?, norm(randn(6, 4, 2)?)?);
        let tau = 0.2;
        let got = f64::from(info_nce(&q, &k, Some(&queue), tau)?.to_scalar::<f32>()?);
        let (qv, kv, nv) = (rows(&q)?, rows(&k)?, rows(&queue)?);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let mut want = 0.0;
        for i in 0..3 {
            let pos = (dot(&qv[i], &kv[i]) / tau).exp();
            let neg: f64 = nv.iter().map(|n| (dot(&qv[i], n) / tau).exp()).sum();
            want += -(pos / (pos + neg)).ln();
        }
        want /= 3.0;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        // identical queries, keys and queue entries: ln(1 + K)
        let ones = norm(Tensor::ones((2, 4), DType::F32, &Device::Cpu)?)?;
        let qu = norm(Tensor::ones((6, 4), DType::F32, &Device::Cpu)?)?;
        let got = f64::from(info_nce(&ones, &ones, Some(&qu), tau)?.to_scalar::<f32>()?);
        assert!((got - 7f64.ln()).abs() < 1e-5);
        Ok(())
    }
}
