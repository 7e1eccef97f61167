//! Weighted k-nearest-neighbour classification on cosine similarity
//! (InstDisc / SimCLR monitor style): each of the `k` nearest training
//! features votes for its class with weight `exp(sim / T)`.

use crate::features::Embedded;
use crate::{Error, Result};
use pretext_core::ops::gemm::{sgemm, Mat};
use rayon::prelude::*;

/// kNN settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnConfig {
    /// Neighbours.
    pub k: usize,
    /// Temperature of the vote weights.
    pub temperature: f32,
    /// Test rows per similarity block (bounds memory: `chunk × n_train` floats).
    pub chunk: usize,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            k: 20,
            temperature: 0.07,
            chunk: 256,
        }
    }
}

fn normalized(e: &Embedded) -> Vec<f32> {
    let mut out = e.features.clone();
    out.par_chunks_mut(e.dim).for_each(|r| {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        for v in r {
            *v /= n;
        }
    });
    out
}

/// Predicted class of each test row.
///
/// # Errors
/// [`Error::Invalid`] when dimensions differ, `k` is 0 or the training set is empty.
pub fn knn_predict(train: &Embedded, test: &Embedded, cfg: &KnnConfig) -> Result<Vec<u32>> {
    if train.dim != test.dim {
        return Err(Error::Invalid(format!(
            "train features have size {}, test {}",
            train.dim, test.dim
        )));
    }
    if cfg.k == 0 || train.is_empty() {
        return Err(Error::Invalid("kNN needs k > 0 and a non-empty training set".into()));
    }
    let (tr, te) = (normalized(train), normalized(test));
    let (n, d) = (train.len(), train.dim);
    let k = cfg.k.min(n);
    let classes = train.num_classes().max(test.num_classes());
    let chunk = cfg.chunk.max(1);
    let preds: Vec<Vec<u32>> = te
        .par_chunks(chunk * d)
        .map(|q| {
            let m = q.len() / d;
            let mut sim = vec![0f32; m * n];
            sgemm(
                q,
                Mat::row_major(m, d),
                &tr,
                Mat::row_major(n, d).t(),
                &mut sim,
                Mat::row_major(m, n),
                false,
            );
            let mut out = Vec::with_capacity(m);
            let mut idx: Vec<usize> = Vec::with_capacity(n);
            for row in sim.chunks_exact(n) {
                idx.clear();
                idx.extend(0..n);
                // top-k by similarity (ties by lower index, deterministic)
                idx.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                let mut votes = vec![0f64; classes];
                for &j in &idx[..k] {
                    votes[train.labels[j] as usize] += f64::from((row[j] / cfg.temperature).exp());
                }
                let best = (0..classes)
                    .max_by(|&a, &b| votes[a].total_cmp(&votes[b]).then(b.cmp(&a)))
                    .unwrap_or(0);
                out.push(best as u32);
            }
            out
        })
        .collect();
    Ok(preds.concat())
}

/// Test accuracy of [`knn_predict`], in [0, 1].
///
/// # Errors
/// As [`knn_predict`].
pub fn knn_accuracy(train: &Embedded, test: &Embedded, cfg: &KnnConfig) -> Result<f64> {
    let p = knn_predict(train, test, cfg)?;
    Ok(p.iter().zip(&test.labels).filter(|(a, b)| a == b).count() as f64 / test.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, d: usize, classes: u32, seed: u64) -> Result<Embedded> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..classes)).collect();
        let f: Vec<f32> = labels
            .iter()
            .flat_map(|&l| {
                (0..d)
                    .map(move |j| if j as u32 == l { 1.0 } else { 0.0 })
                    .collect::<Vec<_>>()
            })
            .map(|v| v + rng.random_range(-0.8f32..0.8))
            .collect();
        Embedded::new(f, d, labels)
    }

    /// Brute force in f64 with the same tie rules.
    fn naive(train: &Embedded, test: &Embedded, k: usize, t: f64) -> Vec<u32> {
        let norm = |r: &[f32]| -> Vec<f64> {
            let n = r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt().max(1e-12);
            r.iter().map(|v| f64::from(*v) / n).collect()
        };
        let tr: Vec<Vec<f64>> = (0..train.len()).map(|i| norm(train.row(i))).collect();
        let classes = train.num_classes().max(test.num_classes());
        (0..test.len())
            .map(|i| {
                let q = norm(test.row(i));
                let mut sims: Vec<(f64, usize)> = tr
                    .iter()
                    .enumerate()
                    .map(|(j, r)| (q.iter().zip(r).map(|(a, b)| a * b).sum::<f64>(), j))
                    .collect();
                sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let mut votes = vec![0f64; classes];
                for &(s, j) in &sims[..k] {
                    votes[train.labels[j] as usize] += (s / t).exp();
                }
                (0..classes)
                    .max_by(|&a, &b| votes[a].total_cmp(&votes[b]).then(b.cmp(&a)))
                    .unwrap_or(0) as u32
            })
            .collect()
    }

    #[test]
    fn matches_brute_force() -> Result<()> {
        let train = random(300, 6, 4, 0)?;
        let test = random(120, 6, 4, 1)?;
        for (k, t) in [(1, 0.07), (20, 0.07), (7, 0.5)] {
            let cfg = KnnConfig {
                k,
                temperature: t as f32,
                chunk: 37,
            };
            let got = knn_predict(&train, &test, &cfg)?;
            let want = naive(&train, &test, k, t);
            let agree = got.iter().zip(&want).filter(|(a, b)| a == b).count();
            // f32 vs f64 similarities may flip an exact near-tie; allow at most one.
            assert!(agree >= want.len() - 1, "k={k}: {agree}/{}", want.len());
        }
        let acc = knn_accuracy(&train, &test, &KnnConfig::default())?;
        assert!(acc > 0.6, "{acc}");
        Ok(())
    }

    #[test]
    fn rejects_mismatched_inputs() -> Result<()> {
        let a = random(10, 3, 2, 0)?;
        let b = random(10, 4, 2, 0)?;
        assert!(knn_accuracy(&a, &b, &KnnConfig::default()).is_err());
        assert!(Embedded::new(vec![1.0; 5], 2, vec![0, 1]).is_err());
        Ok(())
    }
}
