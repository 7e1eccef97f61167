//! Collapse indicators of an embedding: the per-dimension standard deviation
//! of the L2-normalised embeddings (SimSiam's indicator: 0 when every input
//! maps to one point, about `1/√d` when they spread over the sphere) and the
//! effective rank (RankMe, Garrido et al. 2023: `exp` of the entropy of the
//! normalised singular values; 1 for a collapsed embedding, `d` when every
//! direction is used equally).

/// The two indicators of one set of embeddings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Mean over dimensions of the standard deviation (over rows, biased) of
    /// the L2-normalised rows.
    pub std: f64,
    /// `exp(−Σ p_k ln p_k)`, `p_k = σ_k / Σσ` over the singular values of the
    /// `n × d` matrix of L2-normalised rows (not centred).
    pub effective_rank: f64,
    /// `1/√d`: the `std` of embeddings spread evenly over the sphere.
    pub uniform_std: f64,
}

/// The indicators of `n` rows of `d` features (row-major); `None` for no rows.
pub fn spread(features: &[f32], d: usize) -> Option<Spread> {
    if d == 0 || features.len() < d || features.len() % d != 0 {
        return None;
    }
    let n = features.len() / d;
    let rows: Vec<Vec<f64>> = features
        .chunks(d)
        .map(|r| {
            let norm = r
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            r.iter().map(|&x| f64::from(x) / norm).collect()
        })
        .collect();
    let mut std = 0.0;
    for j in 0..d {
        let m = rows.iter().map(|r| r[j]).sum::<f64>() / n as f64;
        std += (rows.iter().map(|r| (r[j] - m).powi(2)).sum::<f64>() / n as f64).sqrt();
    }
    // singular values of the rows = square roots of the eigenvalues of their d × d Gram matrix
    let mut gram = vec![0.0; d * d];
    for r in &rows {
        for a in 0..d {
            let ra = r[a];
            if ra == 0.0 {
                continue;
            }
            for b in a..d {
                gram[a * d + b] += ra * r[b];
            }
        }
    }
    for a in 0..d {
        for b in 0..a {
            gram[a * d + b] = gram[b * d + a];
        }
    }
    let sigma: Vec<f64> = symmetric_eigenvalues(gram, d)
        .into_iter()
        .map(|l| l.max(0.0).sqrt())
        .collect();
    let total: f64 = sigma.iter().sum();
    let entropy: f64 = sigma
        .iter()
        .map(|s| s / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    Some(Spread {
        std: std / d as f64,
        effective_rank: entropy.exp(),
        uniform_std: 1.0 / (d as f64).sqrt(),
    })
}

/// The eigenvalues of a symmetric `d × d` matrix (row-major), by cyclic
/// Jacobi rotations until the off-diagonal mass is negligible.
pub fn symmetric_eigenvalues(mut a: Vec<f64>, d: usize) -> Vec<f64> {
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..64 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] * a[i * d + j])
            .sum();
        if off <= 1e-24 * scale {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let (app, aqq) = (a[p * d + p], a[q * d + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..d).map(|i| a[i * d + i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigenvalues_of_a_known_matrix() {
        // [[2, 1], [1, 2]] has eigenvalues 1 and 3; a rotated diag(1, 4, 9) keeps them
        let mut e = symmetric_eigenvalues(vec![2.0, 1.0, 1.0, 2.0], 2);
        e.sort_by(f64::total_cmp);
        assert!((e[0] - 1.0).abs() < 1e-12 && (e[1] - 3.0).abs() < 1e-12, "{e:?}");
        let (c, s) = (0.6f64, 0.8f64); // a rotation in the (0, 2) plane
        let r = [[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]];
        let diag = [1.0, 4.0, 9.0];
        let mut m = vec![0.0; 9];
        for i in 0..3 {
            for j in 0..3 {
                m[i * 3 + j] = (0..3).map(|k| r[i][k] * diag[k] * r[j][k]).sum();
            }
        }
        let mut e = symmetric_eigenvalues(m, 3);
        e.sort_by(f64::total_cmp);
        for (got, want) in e.iter().zip(diag) {
            assert!((got - want).abs() < 1e-10, "{e:?}");
        }
    }

    #[test]
    fn collapsed_embeddings_have_rank_one_and_no_spread() {
        let rows: Vec<f32> = (0..50)
            .flat_map(|i| [1.0 + i as f32, 2.0 + 2.0 * i as f32, 0.0])
            .collect();
        // every row points the same way: normalised, they are one point
        let s = spread(&rows, 3).expect("rows");
        assert!(s.std < 1e-7, "{s:?}");
        assert!((s.effective_rank - 1.0).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn embeddings_spread_evenly_over_k_axes_have_rank_k() {
        // rows ±e_j for j < 4 in 8 dimensions, equally often: 4 equal singular values
        let d = 8;
        let mut rows = Vec::new();
        for i in 0..40 {
            let mut r = vec![0f32; d];
            r[i % 4] = if i % 8 < 4 { 3.0 } else { -3.0 };
            rows.extend(r);
        }
        let s = spread(&rows, d).expect("rows");
        assert!((s.effective_rank - 4.0).abs() < 1e-9, "{s:?}");
        // each used coordinate is ±1 on a quarter of the rows, 0 elsewhere: std = 1/2
        assert!((s.std - 4.0 * 0.5 / 8.0).abs() < 1e-9, "{s:?}");
        assert!((s.uniform_std - 1.0 / 8f64.sqrt()).abs() < 1e-12);
        assert!(spread(&[], 4).is_none());
    }
}
