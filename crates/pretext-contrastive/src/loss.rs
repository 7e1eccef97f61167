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

/// BYOL's regression loss: the mean over rows of the squared distance
/// between the L2-normalised prediction and target, `‖p̂ − ẑ‖² = 2 − 2·cos(p, z)`.
/// The caller detaches `z` (the target network's projection).
///
/// # Shapes
/// `p`, `z`: `(n, d)`. Scalar out, in `[0, 4]`.
///
/// # Errors
/// Shapes differ.
pub fn normalized_mse(p: &Tensor, z: &Tensor) -> Result<Tensor> {
    let cos = (l2_normalize(p)? * l2_normalize(z)?)?.sum(D::Minus1)?;
    ((cos * -2.0)? + 2.0)?.mean_all()
}

/// SimSiam's negative cosine similarity `D(p, z) = −mean_i cos(p_i, z_i)`,
/// with the stop-gradient on `z` applied here (the paper's `z.detach()`).
///
/// # Shapes
/// `p`, `z`: `(n, d)`. Scalar out, in `[−1, 1]`.
///
/// # Errors
/// Shapes differ.
pub fn negative_cosine(p: &Tensor, z: &Tensor) -> Result<Tensor> {
    let cos = (l2_normalize(p)? * l2_normalize(&z.detach())?)?.sum(D::Minus1)?;
    cos.mean_all()?.neg()
}

/// Each column standardised over the batch: `(x − mean) / sqrt(var + eps)`,
/// the biased variance (what batch norm without affine parameters computes).
fn standardize_columns(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(0)?;
    let c = x.broadcast_sub(&mean)?;
    let var = c.sqr()?.mean_keepdim(0)?;
    c.broadcast_div(&(var + eps)?.sqrt()?)
}

/// Batch-norm epsilon of Barlow Twins' standardisation.
pub const BARLOW_EPS: f64 = 1e-5;

/// Barlow Twins: each embedding dimension standardised over the batch
/// ([`BARLOW_EPS`], biased variance, as the paper's `BatchNorm1d(affine=False)`),
/// the cross-correlation `C = z1ᵀ z2 / n` (`d × d`), and
/// `Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²`.
///
/// # Shapes
/// `z1`, `z2`: `(n, d)`. Scalar out.
///
/// # Errors
/// Shapes differ.
pub fn barlow_twins(z1: &Tensor, z2: &Tensor, lambda: f64) -> Result<Tensor> {
    let n = z1.dim(0)?;
    let d = z1.dim(1)?;
    let a = standardize_columns(z1, BARLOW_EPS)?;
    let b = standardize_columns(z2, BARLOW_EPS)?;
    let c = (a.t()?.matmul(&b)? / n as f64)?;
    let eye = Tensor::eye(d, c.dtype(), c.device())?;
    let on = ((&c * &eye)?.sum(1)? - 1.0)?.sqr()?.sum_all()?;
    let off = (c * (1.0 - eye)?)?.sqr()?.sum_all()?;
    on + (off * lambda)?
}

/// Weights of VICReg's three terms and the epsilon of its standard deviation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VicRegWeights {
    /// λ, on the invariance (mean squared error between the views).
    pub invariance: f64,
    /// μ, on the variance hinge.
    pub variance: f64,
    /// ν, on the covariance penalty.
    pub covariance: f64,
    /// Added to the variance before its square root.
    pub eps: f64,
}

impl Default for VicRegWeights {
    /// The paper's 25 / 25 / 1, eps 1e-4.
    fn default() -> Self {
        Self {
            invariance: 25.0,
            variance: 25.0,
            covariance: 1.0,
            eps: 1e-4,
        }
    }
}

/// VICReg's loss and its three unweighted terms.
#[derive(Debug, Clone)]
pub struct VicRegTerms {
    /// `λ·invariance + μ·variance + ν·covariance`.
    pub loss: Tensor,
    /// `mean((z1 − z2)²)` over all `n·d` entries.
    pub invariance: Tensor,
    /// `½ Σ_{z ∈ {z1, z2}} mean_j max(0, 1 − sqrt(Var(z_j) + eps))`, unbiased variance.
    pub variance: Tensor,
    /// `Σ_{z ∈ {z1, z2}} Σ_{i≠j} Cov(z)_ij² / d`, covariance with `n − 1`.
    pub covariance: Tensor,
}

/// VICReg (Bardes et al. 2022) on the two views' embeddings `(n, d)`; see [`VicRegTerms`].
///
/// # Errors
/// Shapes differ, or fewer than 2 rows.
pub fn vicreg(z1: &Tensor, z2: &Tensor, w: &VicRegWeights) -> Result<VicRegTerms> {
    let (n, d) = z1.dims2()?;
    if n < 2 {
        candle_core::bail!("VICReg needs at least 2 embeddings per batch, got {n}")
    }
    let invariance = (z1 - z2)?.sqr()?.mean_all()?;
    let eye = Tensor::eye(d, z1.dtype(), z1.device())?;
    let mut variance = Tensor::zeros((), z1.dtype(), z1.device())?;
    let mut covariance = Tensor::zeros((), z1.dtype(), z1.device())?;
    for z in [z1, z2] {
        let c = z.broadcast_sub(&z.mean_keepdim(0)?)?;
        let cov = (c.t()?.matmul(&c)? / (n - 1) as f64)?; // (d, d)
        let var = (&cov * &eye)?.sum(1)?;
        let std = (var + w.eps)?.sqrt()?;
        variance = (variance + (std.neg()? + 1.0)?.relu()?.mean_all()?)?;
        covariance = (covariance + ((cov * (1.0 - &eye)?)?.sqr()?.sum_all()? / d as f64)?)?;
    }
    let variance = (variance * 0.5)?;
    let loss = (((&invariance * w.invariance)? + (&variance * w.variance)?)? + (&covariance * w.covariance)?)?;
    Ok(VicRegTerms {
        loss,
        invariance,
        variance,
        covariance,
    })
}

/// DINO's loss: the teacher's outputs of the global views, centred and
/// sharpened, `q_i = softmax((t_i − c) / τ_t)` (no gradient), against the
/// student's `log softmax(s_j / τ_s)` of every view `j` but the same one:
/// `Σ_i Σ_{j≠i} mean_batch(−Σ_k q_ik log p_jk) / #pairs`. Student view `j`
/// and teacher view `i` are the same crop when `i == j` (the global views
/// come first in both lists).
///
/// # Shapes
/// `student`: views of `(n, K)` logits; `teacher`: the global views' `(n, K)`;
/// `center`: `(1, K)` or `(K,)`. Scalar out.
///
/// # Errors
/// Fewer than two pairs, or shapes that differ.
pub fn dino_loss(
    student: &[Tensor],
    teacher: &[Tensor],
    center: &Tensor,
    student_temperature: f64,
    teacher_temperature: f64,
) -> Result<Tensor> {
    let pairs = teacher.len() * student.len() - teacher.len().min(student.len());
    if pairs == 0 {
        candle_core::bail!("DINO needs a teacher view and another student view")
    }
    let center = center.reshape((1, ()))?;
    let q: Vec<Tensor> = teacher
        .iter()
        .map(|t| candle_nn::ops::softmax_last_dim(&(t.detach().broadcast_sub(&center)? / teacher_temperature)?))
        .collect::<Result<_>>()?;
    let log_p: Vec<Tensor> = student
        .iter()
        .map(|s| candle_nn::ops::log_softmax(&(s / student_temperature)?, D::Minus1))
        .collect::<Result<_>>()?;
    let mut total: Option<Tensor> = None;
    for (i, qi) in q.iter().enumerate() {
        for (j, lp) in log_p.iter().enumerate() {
            if i == j {
                continue;
            }
            let ce = (qi * lp)?.sum(D::Minus1)?.mean_all()?.neg()?;
            total = Some(match total {
                Some(t) => (t + ce)?,
                None => ce,
            });
        }
    }
    match total {
        Some(t) => t / pairs as f64,
        None => candle_core::bail!("DINO needs a teacher view and another student view"),
    }
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

    // ---- the negative-free losses against the papers' formulas, in f64 loops ----

    fn unit(v: &[f64]) -> Vec<f64> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn naive_normalized_mse(p: &[Vec<f64>], z: &[Vec<f64>]) -> f64 {
        let rows: f64 = p
            .iter()
            .zip(z)
            .map(|(a, b)| unit(a).iter().zip(unit(b)).map(|(x, y)| (x - y).powi(2)).sum::<f64>())
            .sum();
        rows / p.len() as f64
    }

    fn naive_negative_cosine(p: &[Vec<f64>], z: &[Vec<f64>]) -> f64 {
        let rows: f64 = p
            .iter()
            .zip(z)
            .map(|(a, b)| unit(a).iter().zip(unit(b)).map(|(x, y)| x * y).sum::<f64>())
            .sum();
        -rows / p.len() as f64
    }

    /// Columns standardised with the biased variance and `eps`.
    #[allow(clippy::needless_range_loop)] // the paper's formula, index by index
    fn naive_standardize(z: &[Vec<f64>], eps: f64) -> Vec<Vec<f64>> {
        let (n, d) = (z.len(), z[0].len());
        let mut out = z.to_vec();
        for j in 0..d {
            let m = (0..n).map(|i| z[i][j]).sum::<f64>() / n as f64;
            let v = (0..n).map(|i| (z[i][j] - m).powi(2)).sum::<f64>() / n as f64;
            for i in 0..n {
                out[i][j] = (z[i][j] - m) / (v + eps).sqrt();
            }
        }
        out
    }

    #[allow(clippy::needless_range_loop)] // the paper's formula, index by index
    fn naive_barlow(z1: &[Vec<f64>], z2: &[Vec<f64>], lambda: f64) -> f64 {
        let (a, b) = (naive_standardize(z1, BARLOW_EPS), naive_standardize(z2, BARLOW_EPS));
        let (n, d) = (z1.len(), z1[0].len());
        let mut loss = 0.0;
        for i in 0..d {
            for j in 0..d {
                let c = (0..n).map(|k| a[k][i] * b[k][j]).sum::<f64>() / n as f64;
                loss += if i == j { (1.0 - c).powi(2) } else { lambda * c * c };
            }
        }
        loss
    }

    #[allow(clippy::needless_range_loop)] // the paper's formula, index by index
    fn naive_vicreg(z1: &[Vec<f64>], z2: &[Vec<f64>], w: &VicRegWeights) -> (f64, f64, f64, f64) {
        let (n, d) = (z1.len(), z1[0].len());
        let mut inv = 0.0;
        for i in 0..n {
            for j in 0..d {
                inv += (z1[i][j] - z2[i][j]).powi(2);
            }
        }
        inv /= (n * d) as f64;
        let (mut var, mut cov) = (0.0, 0.0);
        for z in [z1, z2] {
            let mean: Vec<f64> = (0..d)
                .map(|j| (0..n).map(|i| z[i][j]).sum::<f64>() / n as f64)
                .collect();
            let c = |a: usize, b: usize| {
                (0..n).map(|i| (z[i][a] - mean[a]) * (z[i][b] - mean[b])).sum::<f64>() / (n - 1) as f64
            };
            let mut hinge = 0.0;
            for a in 0..d {
                hinge += (1.0 - (c(a, a) + w.eps).sqrt()).max(0.0);
                for b in 0..d {
                    if a != b {
                        cov += c(a, b).powi(2) / d as f64;
                    }
                }
            }
            var += 0.5 * hinge / d as f64;
        }
        let loss = w.invariance * inv + w.variance * var + w.covariance * cov;
        (loss, inv, var, cov)
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64)
            .and_then(|t| t.to_scalar::<f64>())
            .expect("scalar")
    }

    fn close(got: f64, want: f64, tol: f64, what: &str) {
        assert!(
            (got - want).abs() <= tol * want.abs().max(1.0),
            "{what}: {got} vs {want}"
        );
    }

    #[test]
    fn negative_free_losses_match_naive_loops() -> Result<()> {
        let w = VicRegWeights::default();
        for (n, d, seed) in [(4, 3, 0), (8, 5, 1), (16, 2, 2)] {
            let (a, b) = (randn(n, d, seed)?, randn(n, d, seed + 20)?);
            let (ra, rb) = (rows(&a)?, rows(&b)?);
            close(
                scalar(&normalized_mse(&a, &b)?),
                naive_normalized_mse(&ra, &rb),
                1e-5,
                "BYOL",
            );
            close(
                scalar(&negative_cosine(&a, &b)?),
                naive_negative_cosine(&ra, &rb),
                1e-5,
                "SimSiam",
            );
            for lambda in [5e-3, 0.5] {
                close(
                    scalar(&barlow_twins(&a, &b, lambda)?),
                    naive_barlow(&ra, &rb, lambda),
                    1e-4,
                    "Barlow",
                );
            }
            let t = vicreg(&a, &b, &w)?;
            let (loss, inv, var, cov) = naive_vicreg(&ra, &rb, &w);
            close(scalar(&t.loss), loss, 1e-4, "VICReg loss");
            close(scalar(&t.invariance), inv, 1e-5, "VICReg invariance");
            close(scalar(&t.variance), var, 1e-5, "VICReg variance");
            close(scalar(&t.covariance), cov, 1e-4, "VICReg covariance");
            assert!(var > 0.0 && cov > 0.0, "the uniform(-1,1) fixtures exercise every term");
        }
        Ok(())
    }

    #[test]
    fn negative_free_losses_at_hand_computable_points() -> Result<()> {
        let dev = Device::Cpu;
        // Four rows whose columns have mean 0, biased variance 1 and are orthogonal.
        let z = Tensor::new(&[[1f64, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], &dev)?;
        let zf = z.to_dtype(DType::F32)?;
        // identical views
        close(
            scalar(&normalized_mse(&zf, &(&zf * 2.0)?)?),
            0.0,
            1e-6,
            "BYOL, identical",
        );
        close(scalar(&negative_cosine(&zf, &zf)?), -1.0, 1e-6, "SimSiam, identical");
        // C = I/(1+eps): the on-diagonal term is d·(eps/(1+eps))², no off-diagonal term
        let want = 2.0 * (BARLOW_EPS / (1.0 + BARLOW_EPS)).powi(2);
        close(
            scalar(&barlow_twins(&z, &z, 0.005)?),
            want,
            1e-9,
            "Barlow, identical whitened",
        );
        // VICReg: unbiased variance 4/3 > 1, no covariance, no difference → 0
        let t = vicreg(&z, &z, &VicRegWeights::default())?;
        close(scalar(&t.loss), 0.0, 1e-12, "VICReg, identical whitened");
        // orthogonal predictions and targets: cos = 0
        let p = Tensor::new(&[[1f32, 0.0], [0.0, 3.0]], &dev)?;
        let q = Tensor::new(&[[0f32, 2.0], [-1.0, 0.0]], &dev)?;
        close(scalar(&normalized_mse(&p, &q)?), 2.0, 1e-6, "BYOL, orthogonal");
        close(scalar(&negative_cosine(&p, &q)?), 0.0, 1e-6, "SimSiam, orthogonal");
        // opposite: cos = −1
        close(scalar(&normalized_mse(&p, &p.neg()?)?), 4.0, 1e-6, "BYOL, opposite");
        // Collapsed: every row the same vector. Standardised columns are 0, so
        // Barlow's C = 0 and the loss is d; VICReg pays its variance hinge
        // 1 − sqrt(eps) on both views (weighted 25), nothing else.
        let c = Tensor::ones((6, 3), DType::F64, &dev)?;
        close(scalar(&barlow_twins(&c, &c, 0.005)?), 3.0, 1e-9, "Barlow, collapsed");
        let t = vicreg(&c, &c, &VicRegWeights::default())?;
        close(
            scalar(&t.variance),
            1.0 - 1e-4f64.sqrt(),
            1e-12,
            "VICReg variance, collapsed",
        );
        close(scalar(&t.loss), 25.0 * (1.0 - 0.01), 1e-12, "VICReg, collapsed");
        close(scalar(&t.covariance), 0.0, 1e-12, "VICReg covariance, collapsed");
        Ok(())
    }

    /// Central differences in f64 of `f` at `x`, against its backward pass.
    /// (Only against `z1` unless `both`.)
    fn check_gradient(
        name: &str,
        f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
        n: usize,
        d: usize,
        both: bool,
    ) -> Result<()> {
        let a = candle_core::Var::from_tensor(&randn(n, d, 7)?.to_dtype(DType::F64)?)?;
        let b = candle_core::Var::from_tensor(&randn(n, d, 8)?.to_dtype(DType::F64)?)?;
        let loss = f(a.as_tensor(), b.as_tensor())?;
        let grads = loss.backward()?;
        let h = 1e-6;
        let mut max_g = 0f64;
        for (which, v) in [("z1", &a), ("z2", &b)].into_iter().take(if both { 2 } else { 1 }) {
            let g = match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
                None => vec![0.0; n * d],
            };
            let base = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            for k in 0..n * d {
                let at = |delta: f64| -> Result<f64> {
                    let mut x = base.clone();
                    x[k] += delta;
                    let t = Tensor::from_vec(x, (n, d), &Device::Cpu)?;
                    let l = if which == "z1" {
                        f(&t, b.as_tensor())?
                    } else {
                        f(a.as_tensor(), &t)?
                    };
                    Ok(scalar(&l))
                };
                let fd = (at(h)? - at(-h)?) / (2.0 * h);
                assert!(
                    (fd - g[k]).abs() <= 1e-5 * fd.abs().max(1.0),
                    "{name}: d/d{which}[{k}] backward {} vs finite difference {fd}",
                    g[k]
                );
                max_g = max_g.max(g[k].abs());
            }
        }
        assert!(max_g > 1e-3, "{name}: the gradient is not zero");
        Ok(())
    }

    #[test]
    fn negative_free_loss_gradients_match_finite_differences() -> Result<()> {
        check_gradient("BYOL", &|p, z| normalized_mse(p, z), 5, 4, true)?;
        check_gradient("Barlow Twins", &|a, b| barlow_twins(a, b, 0.05), 6, 3, true)?;
        let w = VicRegWeights {
            eps: 1e-4,
            ..VicRegWeights::default()
        };
        // uniform(-1, 1) columns have std ≈ 0.6 < 1: the variance hinge is active
        check_gradient("VICReg", &|a, b| Ok(vicreg(a, b, &w)?.loss), 6, 3, true)?;
        // SimSiam: the gradient reaches only p; against z it is zero (stop-gradient)
        check_gradient("SimSiam (p)", &|p, z| negative_cosine(p, z), 5, 4, false)?;
        let p = candle_core::Var::from_tensor(&randn(3, 4, 1)?.to_dtype(DType::F64)?)?;
        let z = candle_core::Var::from_tensor(&randn(3, 4, 2)?.to_dtype(DType::F64)?)?;
        let g = negative_cosine(p.as_tensor(), z.as_tensor())?.backward()?;
        assert!(g.get(z.as_tensor()).is_none(), "no gradient flows into the target z");
        assert!(g.get(p.as_tensor()).is_some());
        Ok(())
    }

    fn naive_dino(student: &[Vec<Vec<f64>>], teacher: &[Vec<Vec<f64>>], center: &[f64], ts: f64, tt: f64) -> f64 {
        let softmax = |v: &[f64]| -> Vec<f64> {
            let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        let (mut total, mut pairs) = (0.0, 0);
        for (i, t) in teacher.iter().enumerate() {
            for (j, s) in student.iter().enumerate() {
                if i == j {
                    continue;
                }
                let mut ce = 0.0;
                for (tr, sr) in t.iter().zip(s) {
                    let centred: Vec<f64> = tr.iter().zip(center).map(|(a, c)| (a - c) / tt).collect();
                    let q = softmax(&centred);
                    let p = softmax(&sr.iter().map(|a| a / ts).collect::<Vec<_>>());
                    ce -= q.iter().zip(&p).map(|(q, p)| q * p.ln()).sum::<f64>();
                }
                total += ce / t.len() as f64;
                pairs += 1;
            }
        }
        total / pairs as f64
    }

    #[test]
    fn dino_loss_matches_a_naive_loop_and_hand_computable_points() -> Result<()> {
        let (n, k) = (5, 7);
        let student: Vec<Tensor> = (0..4).map(|v| randn(n, k, 30 + v)).collect::<Result<_>>()?;
        let teacher: Vec<Tensor> = (0..2).map(|v| randn(n, k, 40 + v)).collect::<Result<_>>()?;
        let center = randn(1, k, 50)?;
        let got = scalar(&dino_loss(&student, &teacher, &center, 0.1, 0.04)?);
        let sv: Vec<Vec<Vec<f64>>> = student.iter().map(rows).collect::<Result<_>>()?;
        let tv: Vec<Vec<Vec<f64>>> = teacher.iter().map(rows).collect::<Result<_>>()?;
        let want = naive_dino(&sv, &tv, &rows(&center)?[0], 0.1, 0.04);
        close(got, want, 1e-4, "DINO");
        // a uniform student against any teacher: ln K
        let flat = Tensor::zeros((n, k), DType::F32, &Device::Cpu)?;
        let got = scalar(&dino_loss(
            &[flat.clone(), flat.clone(), flat],
            &teacher,
            &center,
            0.1,
            0.04,
        )?);
        close(got, (k as f64).ln(), 1e-5, "DINO, uniform student");
        // a teacher far sharper than its temperature (one-hot on class 2) against a
        // student whose probability of class 2 is known: −ln p₂
        let mut t = vec![0f32; n * k];
        let mut s = vec![0f32; n * k];
        for r in 0..n {
            t[r * k + 2] = 10.0;
            s[r * k + 2] = 0.1 * 3f32.ln(); // / τ_s = 0.1 → logit ln 3: p₂ = 3 / (3 + k − 1)
        }
        let t = Tensor::from_vec(t, (n, k), &Device::Cpu)?;
        let s = Tensor::from_vec(s, (n, k), &Device::Cpu)?;
        let zero = Tensor::zeros(k, DType::F32, &Device::Cpu)?;
        let got = scalar(&dino_loss(&[s.clone(), s], &[t.clone(), t], &zero, 0.1, 0.04)?);
        close(got, -(3.0 / (3.0 + k as f64 - 1.0)).ln(), 1e-5, "DINO, one-hot teacher");
        assert!(
            dino_loss(&[flat_one(k)?], &[flat_one(k)?], &zero, 0.1, 0.04).is_err(),
            "one view has no pair"
        );
        Ok(())
    }

    fn flat_one(k: usize) -> Result<Tensor> {
        Tensor::zeros((1, k), DType::F32, &Device::Cpu)
    }

    #[test]
    fn dino_loss_gradient_matches_finite_differences() -> Result<()> {
        let teacher: Vec<Tensor> = (0..2)
            .map(|v| randn(4, 5, 60 + v).and_then(|t| t.to_dtype(DType::F64)))
            .collect::<Result<_>>()?;
        let center = randn(1, 5, 70)?.to_dtype(DType::F64)?;
        let local = randn(4, 5, 80)?.to_dtype(DType::F64)?;
        // the gradient of the second global view's student logits (z1 here),
        // with the first global view and one local view fixed
        let g0 = randn(4, 5, 81)?.to_dtype(DType::F64)?;
        check_gradient(
            "DINO",
            &|s1, _| dino_loss(&[g0.clone(), s1.clone(), local.clone()], &teacher, &center, 0.1, 0.07),
            4,
            5,
            false,
        )
    }
}
