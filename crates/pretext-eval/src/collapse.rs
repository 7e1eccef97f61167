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
    /// `d`, the embedding's dimension.
    pub dim: usize,
}

impl Spread {
    /// The metrics-log record of an online evaluation at `step` (epoch
    /// `epoch`): `{"event": "spread", …}`, what the report's `spread.png`
    /// ([`crate::plots::spread_curve`]) draws.
    pub fn event(&self, step: u64, epoch: u64) -> serde_json::Value {
        serde_json::json!({
            "event": "spread", "step": step, "epoch": epoch, "embedding_std": self.std,
            "uniform_std": self.uniform_std, "effective_rank": self.effective_rank, "dim": self.dim,
        })
    }

    /// `std … (uniform …), effective rank … of d`, for progress messages.
    pub fn summary(&self) -> String {
        format!(
            "std {:.4} (uniform {:.4}), effective rank {:.1} of {}",
            self.std, self.uniform_std, self.effective_rank, self.dim
        )
    }
}

/// The indicators of `n` rows of `d` features (row-major); `None` for no rows.
pub fn spread(features: &[f32], d: usize) -> Option<Spread> {
    if d == 0 || features.len() < d || !features.len().is_multiple_of(d) {
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
        dim: d,
    })
}

/// The eigenvalues of a symmetric `d × d` matrix (row-major), unsorted:
/// Householder reduction to tridiagonal form, then the implicit QL
/// iteration with Wilkinson shifts (eigenvalues only; O(d³) once).
pub fn symmetric_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    if n == 0 {
        return vec![];
    }
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    // Householder: row i (from the last) is reduced to its sub-diagonal element e[i].
    for i in (1..n).rev() {
        let l = i - 1;
        if l == 0 {
            e[i] = a[i * n + l];
            continue;
        }
        let scale: f64 = (0..=l).map(|k| a[i * n + k].abs()).sum();
        if scale == 0.0 {
            e[i] = a[i * n + l];
            continue;
        }
        let mut h = 0.0;
        for k in 0..=l {
            a[i * n + k] /= scale;
            h += a[i * n + k] * a[i * n + k];
        }
        let f = a[i * n + l];
        let g = if f >= 0.0 { -h.sqrt() } else { h.sqrt() };
        e[i] = scale * g;
        h -= f * g;
        a[i * n + l] = f - g;
        let mut f = 0.0;
        for j in 0..=l {
            let mut g = 0.0;
            for k in 0..=j {
                g += a[j * n + k] * a[i * n + k];
            }
            for k in j + 1..=l {
                g += a[k * n + j] * a[i * n + k];
            }
            e[j] = g / h;
            f += e[j] * a[i * n + j];
        }
        let hh = f / (h + h);
        for j in 0..=l {
            let f = a[i * n + j];
            let g = e[j] - hh * f;
            e[j] = g;
            for k in 0..=j {
                a[j * n + k] -= f * e[k] + g * a[i * n + k];
            }
        }
    }
    for (i, di) in d.iter_mut().enumerate() {
        *di = a[i * n + i];
    }
    // QL on the tridiagonal matrix (diagonal d, sub-diagonal e shifted down).
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    for l in 0..n {
        let mut iterations = 0;
        loop {
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd {
                    break;
                }
                m += 1;
            }
            if m == l || iterations == 64 {
                break;
            }
            iterations += 1;
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + if g >= 0.0 { r } else { -r });
            let (mut s, mut c, mut p) = (1.0, 1.0, 0.0);
            let mut underflow = false;
            let mut i = m;
            while i > l {
                i -= 1;
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
            }
            if underflow {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    d
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
        assert_eq!(s.dim, 8);
        // the log record the report's spread.png reads
        let e = s.event(12, 3);
        assert_eq!(
            (&e["event"], &e["step"], &e["epoch"], &e["dim"]),
            (&"spread".into(), &12.into(), &3.into(), &8.into())
        );
        assert_eq!(e["effective_rank"].as_f64(), Some(s.effective_rank));
        assert_eq!(e["embedding_std"].as_f64(), Some(s.std));
        assert_eq!(e["uniform_std"].as_f64(), Some(s.uniform_std));
        assert!(spread(&[], 4).is_none());
    }

    #[test]
    fn eigenvalues_of_random_symmetric_matrices_keep_trace_and_frobenius_norm() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for n in [1usize, 2, 5, 33] {
            let mut m = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..=i {
                    let v = next();
                    m[i * n + j] = v;
                    m[j * n + i] = v;
                }
            }
            let trace: f64 = (0..n).map(|i| m[i * n + i]).sum();
            let frob: f64 = m.iter().map(|v| v * v).sum();
            let e = symmetric_eigenvalues(m.clone(), n);
            assert!((e.iter().sum::<f64>() - trace).abs() < 1e-10, "n={n}");
            assert!((e.iter().map(|v| v * v).sum::<f64>() - frob).abs() < 1e-10, "n={n}");
            // the largest |λ| is the Rayleigh quotient of power iteration's vector
            let top = e
                .iter()
                .cloned()
                .fold(0f64, |a, b| if b.abs() > a.abs() { b } else { a });
            let mut v = vec![1.0; n];
            for _ in 0..2000 {
                let w: Vec<f64> = (0..n).map(|i| (0..n).map(|j| m[i * n + j] * v[j]).sum()).collect();
                let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
                v = w.iter().map(|x| x / norm).collect();
            }
            let mv: Vec<f64> = (0..n).map(|i| (0..n).map(|j| m[i * n + j] * v[j]).sum()).collect();
            let rayleigh: f64 = mv.iter().zip(&v).map(|(a, b)| a * b).sum();
            assert!((rayleigh.abs() - top.abs()).abs() < 1e-6, "n={n}: {rayleigh} vs {top}");
        }
    }
}
