//! The linear probe: multinomial logistic regression on standardised
//! features, trained to convergence with full-batch L-BFGS, its L2 strength
//! picked on a validation split carved from the training labels, or by
//! repeated k-fold cross-validation when that split would be small (few
//! labels).
//!
//! Objective: `mean_i CE(softmax(x_i W + b), y_i) + λ/2 ‖W‖²` (sklearn's
//! `C` corresponds to `λ = 1 / (C · n)`). Deterministic under the seed.

use crate::features::Embedded;
use crate::{Error, Result};
use pretext_core::ops::gemm::{sgemm, Mat};
use rayon::prelude::*;

/// Probe settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearProbeConfig {
    /// Candidate L2 strengths; the best on the validation split is used.
    pub l2_grid: Vec<f64>,
    /// Fraction of the training rows held out to choose the L2 strength.
    pub val_fraction: f64,
    /// When `val_fraction` of the rows would be fewer than this many, the L2
    /// strength is chosen by `folds`-fold cross-validation instead (a
    /// 60-image validation split picks it by chance).
    pub min_val_rows: usize,
    /// Folds of that cross-validation.
    pub folds: usize,
    /// Times the cross-validation is repeated, each with its own seeded
    /// deal of the folds; the correct predictions are summed over all of
    /// them (one deal of 600 rows ties or near-ties grid values by chance).
    pub repeats: usize,
    /// L-BFGS iterations at most.
    pub max_iter: usize,
    /// Stop when the largest gradient entry falls below this.
    pub tol: f64,
    /// Seed of the validation split.
    pub seed: u64,
}

impl Default for LinearProbeConfig {
    fn default() -> Self {
        Self {
            l2_grid: vec![1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
            val_fraction: 0.1,
            min_val_rows: 500,
            folds: 5,
            repeats: 3,
            max_iter: 1000,
            tol: 1e-5,
            seed: 0,
        }
    }
}

/// A trained probe: standardisation plus weights.
#[derive(Debug, Clone)]
pub struct LinearProbe {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// `d × c` weights, row-major.
    w: Vec<f32>,
    b: Vec<f32>,
    classes: usize,
    /// The L2 strength used.
    pub l2: f64,
    /// Iterations of the final fit.
    pub iterations: usize,
}

struct Problem<'a> {
    x: &'a [f32],
    y: &'a [u32],
    n: usize,
    d: usize,
    c: usize,
    l2: f64,
}

impl Problem<'_> {
    /// Loss and gradient at `theta` (`d·c` weights then `c` biases).
    fn eval(&self, theta: &[f32], grad: &mut [f32]) -> f64 {
        let (n, d, c) = (self.n, self.d, self.c);
        let (w, b) = theta.split_at(d * c);
        let mut logits = vec![0f32; n * c];
        sgemm(
            self.x,
            Mat::row_major(n, d),
            w,
            Mat::row_major(d, c),
            &mut logits,
            Mat::row_major(n, c),
            false,
        );
        let loss: f64 = logits
            .par_chunks_mut(c)
            .zip(self.y.par_iter())
            .map(|(row, &y)| {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
                let m = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let mut s = 0f64;
                for v in row.iter_mut() {
                    *v = (*v - m).exp();
                    s += f64::from(*v);
                }
                let l = -(f64::from(row[y as usize]) / s).ln();
                let inv = (1.0 / s) as f32;
                for v in row.iter_mut() {
                    *v *= inv;
                }
                row[y as usize] -= 1.0; // row is now softmax - onehot
                l
            })
            .sum();
        let (gw, gb) = grad.split_at_mut(d * c);
        sgemm(
            self.x,
            Mat::row_major(n, d).t(),
            &logits,
            Mat::row_major(n, c),
            gw,
            Mat::row_major(d, c),
            false,
        );
        let inv_n = 1.0 / n as f32;
        for (g, wv) in gw.iter_mut().zip(w) {
            *g = *g * inv_n + (self.l2 as f32) * wv;
        }
        gb.fill(0.0);
        for row in logits.chunks_exact(c) {
            for (g, v) in gb.iter_mut().zip(row) {
                *g += v;
            }
        }
        for g in gb.iter_mut() {
            *g *= inv_n;
        }
        let reg: f64 = w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() * self.l2 / 2.0;
        loss / n as f64 + reg
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
}

/// Minimises the problem with L-BFGS (memory 10, Armijo backtracking);
/// returns the parameters and the iterations used.
fn lbfgs(p: &Problem, init: Option<&[f32]>, max_iter: usize, tol: f64) -> (Vec<f32>, usize) {
    let dim = p.d * p.c + p.c;
    let mut theta = match init {
        Some(t) if t.len() == dim => t.to_vec(),
        _ => vec![0f32; dim],
    };
    let mut g = vec![0f32; dim];
    let mut f = p.eval(&theta, &mut g);
    let mut hist: Vec<(Vec<f32>, Vec<f32>, f64)> = Vec::new(); // (s, y, 1/(y·s))
    let mut g_new = vec![0f32; dim];
    let mut it = 0;
    while it < max_iter {
        let gmax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        if f64::from(gmax) < tol {
            break;
        }
        // two-loop recursion: direction = -H g
        let mut q: Vec<f64> = g.iter().map(|v| f64::from(*v)).collect();
        let mut alphas = Vec::with_capacity(hist.len());
        for (s, y, rho) in hist.iter().rev() {
            let a = rho * s.iter().zip(&q).map(|(x, z)| f64::from(*x) * z).sum::<f64>();
            for (qv, yv) in q.iter_mut().zip(y) {
                *qv -= a * f64::from(*yv);
            }
            alphas.push(a);
        }
        if let Some((s, y, _)) = hist.last() {
            let gamma = dot(s, y) / dot(y, y).max(1e-30);
            for v in q.iter_mut() {
                *v *= gamma;
            }
        } else {
            let gn = q.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-30);
            for v in q.iter_mut() {
                *v /= gn; // first step: unit length
            }
        }
        for ((s, y, rho), a) in hist.iter().zip(alphas.iter().rev()) {
            let beta = rho * y.iter().zip(&q).map(|(x, z)| f64::from(*x) * z).sum::<f64>();
            for (qv, sv) in q.iter_mut().zip(s) {
                *qv += (a - beta) * f64::from(*sv);
            }
        }
        let dir: Vec<f32> = q.iter().map(|v| -(*v) as f32).collect();
        let slope = dot(&g, &dir);
        let (dir, slope) = if slope >= 0.0 {
            // not a descent direction: restart from steepest descent
            hist.clear();
            let d: Vec<f32> = g.iter().map(|v| -v).collect();
            let s = dot(&g, &d);
            (d, s)
        } else {
            (dir, slope)
        };
        let mut step = 1.0f64;
        let mut accepted = None;
        for _ in 0..30 {
            let cand: Vec<f32> = theta.iter().zip(&dir).map(|(t, d)| t + (step as f32) * d).collect();
            let fc = p.eval(&cand, &mut g_new);
            if fc <= f + 1e-4 * step * slope {
                accepted = Some((cand, fc));
                break;
            }
            step *= 0.5;
        }
        let Some((cand, fc)) = accepted else { break };
        let s: Vec<f32> = cand.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let y: Vec<f32> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let ys = dot(&y, &s);
        if ys > 1e-12 {
            if hist.len() == 10 {
                hist.remove(0);
            }
            hist.push((s, y, 1.0 / ys));
        }
        let done = (f - fc).abs() <= 1e-10 * f.abs().max(1.0);
        theta = cand;
        std::mem::swap(&mut g, &mut g_new);
        f = fc;
        it += 1;
        if done {
            break;
        }
    }
    (theta, it)
}

fn standardize(x: &Embedded) -> (Vec<f32>, Vec<f32>) {
    let (n, d) = (x.len(), x.dim);
    let mut mean = vec![0f64; d];
    let mut sq = vec![0f64; d];
    for r in x.features.chunks_exact(d) {
        for j in 0..d {
            mean[j] += f64::from(r[j]);
            sq[j] += f64::from(r[j]).powi(2);
        }
    }
    let m: Vec<f32> = mean.iter().map(|s| (s / n as f64) as f32).collect();
    let inv: Vec<f32> = sq
        .iter()
        .zip(&mean)
        .map(|(q, s)| {
            let var = q / n as f64 - (s / n as f64).powi(2);
            if var > 1e-12 {
                (1.0 / var.sqrt()) as f32
            } else {
                1.0
            }
        })
        .collect();
    (m, inv)
}

fn apply_standardize(x: &Embedded, mean: &[f32], inv: &[f32]) -> Vec<f32> {
    let mut out = x.features.clone();
    out.par_chunks_mut(x.dim).for_each(|r| {
        for ((v, m), s) in r.iter_mut().zip(mean).zip(inv) {
            *v = (*v - m) * s;
        }
    });
    out
}

/// `(train, validation)` index sets for choosing the L2 strength: one seeded
/// split, or `repeats` seeded deals of `folds` folds when the split would be
/// small; empty when there are too few rows to hold any out.
fn validation_folds(n: usize, cfg: &LinearProbeConfig) -> Result<Vec<(Vec<usize>, Vec<usize>)>> {
    let held = ((n as f64) * cfg.val_fraction).round() as usize;
    if held >= cfg.min_val_rows || cfg.folds < 2 {
        let (tr, va) = pretext_data::subset::split(n, cfg.val_fraction, cfg.seed)?;
        return Ok(if tr.is_empty() || va.is_empty() {
            Vec::new()
        } else {
            vec![(tr, va)]
        });
    }
    if n < cfg.folds {
        return Ok(Vec::new());
    }
    let mut all = Vec::new();
    for r in 0..cfg.repeats.max(1) {
        all.extend(pretext_data::subset::folds(n, cfg.folds, repeat_seed(cfg.seed, r))?);
    }
    Ok(all)
}

/// The seed of the `r`-th deal of the cross-validation folds (the first is the probe's seed).
fn repeat_seed(seed: u64, r: usize) -> u64 {
    seed.wrapping_add(1000 * r as u64)
}

impl LinearProbe {
    /// Fits with a fixed L2 strength.
    ///
    /// # Errors
    /// [`Error::Invalid`] for empty inputs.
    pub fn fit_with(train: &Embedded, l2: f64, cfg: &LinearProbeConfig) -> Result<Self> {
        Self::fit_from(train, l2, None, cfg.max_iter, cfg)
    }

    /// Fits starting from `init` (a probe on the same feature size), at most `max_iter` iterations.
    fn fit_from(
        train: &Embedded,
        l2: f64,
        init: Option<&LinearProbe>,
        max_iter: usize,
        cfg: &LinearProbeConfig,
    ) -> Result<Self> {
        if train.is_empty() {
            return Err(Error::Invalid("linear probe: no training rows".into()));
        }
        let (mean, inv_std) = standardize(train);
        let x = apply_standardize(train, &mean, &inv_std);
        let c = train.num_classes().max(2);
        let p = Problem {
            x: &x,
            y: &train.labels,
            n: train.len(),
            d: train.dim,
            c,
            l2,
        };
        let start: Option<Vec<f32>> = init.filter(|i| i.classes == c && i.w.len() == train.dim * c).map(|i| {
            let mut t = i.w.clone();
            t.extend_from_slice(&i.b);
            t
        });
        let (theta, iterations) = lbfgs(&p, start.as_deref(), max_iter, cfg.tol);
        let (w, b) = theta.split_at(train.dim * c);
        Ok(Self {
            mean,
            inv_std,
            w: w.to_vec(),
            b: b.to_vec(),
            classes: c,
            l2,
            iterations,
        })
    }

    /// Picks the L2 strength on a validation split of `train` (or by
    /// repeated k-fold cross-validation when the split would hold fewer than
    /// `min_val_rows` rows), then refits on all of `train`. The grid is
    /// walked from the strongest regularisation down, each fit warm-started
    /// from the previous one (a quarter of the iteration budget each); the
    /// final fit starts from the chosen one. Ties go to the stronger
    /// regularisation.
    ///
    /// # Errors
    /// [`Error::Invalid`] for empty inputs or an empty grid.
    pub fn fit(train: &Embedded, cfg: &LinearProbeConfig) -> Result<Self> {
        let mut grid = cfg.l2_grid.clone();
        grid.sort_by(|a, b| b.total_cmp(a));
        if grid.is_empty() {
            return Err(Error::Invalid("linear probe: empty L2 grid".into()));
        }
        if grid.len() == 1 {
            return Self::fit_from(train, grid[0], None, cfg.max_iter, cfg);
        }
        let folds = validation_folds(train.len(), cfg)?;
        if folds.is_empty() {
            return Self::fit_from(train, grid[grid.len() / 2], None, cfg.max_iter, cfg);
        }
        // correct validation predictions per grid value, summed over folds
        let mut correct = vec![0usize; grid.len()];
        let mut first_fold_probes: Vec<LinearProbe> = Vec::new();
        for (f, (tr, va)) in folds.iter().enumerate() {
            let (tr, va) = (train.select(tr), train.select(va));
            let mut prev: Option<LinearProbe> = None;
            for (g, &l2) in grid.iter().enumerate() {
                let probe = Self::fit_from(&tr, l2, prev.as_ref(), (cfg.max_iter / 4).max(1), cfg)?;
                let pred = probe.predict(&va)?;
                correct[g] += pred.iter().zip(&va.labels).filter(|(p, y)| p == y).count();
                if f == 0 {
                    first_fold_probes.push(probe.clone());
                }
                prev = Some(probe);
            }
        }
        let best = (0..grid.len()).fold(0, |b, g| if correct[g] > correct[b] { g } else { b });
        Self::fit_from(train, grid[best], first_fold_probes.get(best), cfg.max_iter, cfg)
    }

    /// Class predictions.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the feature size differs.
    pub fn predict(&self, x: &Embedded) -> Result<Vec<u32>> {
        let d = self.mean.len();
        if x.dim != d {
            return Err(Error::Invalid(format!(
                "probe expects features of size {d}, got {}",
                x.dim
            )));
        }
        let xs = apply_standardize(x, &self.mean, &self.inv_std);
        let (n, c) = (x.len(), self.classes);
        let mut logits = vec![0f32; n * c];
        sgemm(
            &xs,
            Mat::row_major(n, d),
            &self.w,
            Mat::row_major(d, c),
            &mut logits,
            Mat::row_major(n, c),
            false,
        );
        Ok(logits
            .chunks_exact(c)
            .map(|r| {
                (0..c)
                    .max_by(|&a, &b| (r[a] + self.b[a]).total_cmp(&(r[b] + self.b[b])).then(b.cmp(&a)))
                    .unwrap_or(0) as u32
            })
            .collect())
    }

    /// The probe as one linear layer on the raw features (the
    /// standardisation folded into the weights) with `classes` outputs:
    /// `weight[k][j] = w[j][k] / σ_j`, `bias[k] = b[k] − Σ_j μ_j w[j][k] / σ_j`.
    /// Classes the probe never saw get a bias of −30 (probability ≈ 0).
    ///
    /// # Errors
    /// [`Error::Invalid`] when `classes` is fewer than the probe's.
    pub fn as_linear(&self, classes: usize) -> Result<crate::finetune::LinearHead> {
        let (d, c) = (self.mean.len(), self.classes);
        if classes < c {
            return Err(Error::Invalid(format!(
                "the probe has {c} classes, more than the {classes} asked for"
            )));
        }
        let mut weight = vec![0f32; classes * d];
        let mut bias = vec![-30f32; classes];
        for k in 0..c {
            let mut shift = 0f64;
            for j in 0..d {
                let w = f64::from(self.w[j * c + k]) * f64::from(self.inv_std[j]);
                weight[k * d + j] = w as f32;
                shift += w * f64::from(self.mean[j]);
            }
            bias[k] = (f64::from(self.b[k]) - shift) as f32;
        }
        Ok(crate::finetune::LinearHead { weight, bias, dim: d })
    }

    /// Accuracy on `x`, in [0, 1].
    ///
    /// # Errors
    /// As [`LinearProbe::predict`].
    pub fn accuracy(&self, x: &Embedded) -> Result<f64> {
        let p = self.predict(x)?;
        Ok(p.iter().zip(&x.labels).filter(|(a, b)| a == b).count() as f64 / x.len().max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn blobs(n: usize, d: usize, c: u32, noise: f32, seed: u64) -> Result<Embedded> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let labels: Vec<u32> = (0..n).map(|i| (i as u32) % c).collect();
        let mut f = Vec::with_capacity(n * d);
        for &l in &labels {
            for j in 0..d {
                let centre = if j as u32 == l { 2.0 } else { 0.0 };
                f.push(centre + noise * rng.random_range(-1.0f32..1.0) * 1.7);
            }
        }
        Embedded::new(f, d, labels)
    }

    #[test]
    fn the_folded_linear_layer_predicts_what_the_probe_predicts() -> Result<()> {
        // features with offsets and scales far from standard, so folding matters
        let mut tr = blobs(90, 4, 3, 1.2, 1)?;
        let mut te = blobs(60, 4, 3, 1.2, 2)?;
        for e in [&mut tr, &mut te] {
            for (i, v) in e.features.iter_mut().enumerate() {
                *v = *v * (1.0 + (i % 4) as f32 * 3.0) + 10.0 * (i % 4) as f32;
            }
        }
        let probe = LinearProbe::fit_with(&tr, 1e-3, &LinearProbeConfig::default())?;
        let head = probe.as_linear(4)?;
        assert_eq!((head.classes(), head.dim), (4, 4));
        assert_eq!(head.bias[3], -30.0, "a class the probe never saw");
        let want = probe.predict(&te)?;
        for (i, &w) in want.iter().enumerate() {
            let x = te.row(i);
            let logits: Vec<f64> = (0..4)
                .map(|k| {
                    f64::from(head.bias[k])
                        + (0..4)
                            .map(|j| f64::from(head.weight[k * 4 + j]) * f64::from(x[j]))
                            .sum::<f64>()
                })
                .collect();
            let got = (0..4).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap_or(0) as u32;
            assert_eq!(got, w, "row {i}: {logits:?}");
        }
        assert!(probe.as_linear(2).is_err());
        Ok(())
    }

    #[test]
    fn separable_data_is_fit_perfectly() -> Result<()> {
        let train = blobs(300, 5, 3, 0.3, 0)?;
        let test = blobs(150, 5, 3, 0.3, 1)?;
        let p = LinearProbe::fit(&train, &LinearProbeConfig::default())?;
        assert_eq!(p.accuracy(&train)?, 1.0);
        assert_eq!(p.accuracy(&test)?, 1.0);
        Ok(())
    }

    #[test]
    fn converges_to_the_optimum_of_the_regularised_objective() -> Result<()> {
        // Noisy, overlapping classes: compare with plain gradient descent run to convergence.
        let train = blobs(200, 4, 3, 1.5, 2)?;
        let l2 = 1e-2;
        let cfg = LinearProbeConfig {
            tol: 1e-7,
            ..Default::default()
        };
        let probe = LinearProbe::fit_with(&train, l2, &cfg)?;
        let (mean, inv) = standardize(&train);
        let x = apply_standardize(&train, &mean, &inv);
        let p = Problem {
            x: &x,
            y: &train.labels,
            n: 200,
            d: 4,
            c: 3,
            l2,
        };
        let mut theta = vec![0f32; 15];
        let mut g = vec![0f32; 15];
        for _ in 0..20000 {
            p.eval(&theta, &mut g);
            for (t, gv) in theta.iter_mut().zip(&g) {
                *t -= 0.5 * gv;
            }
        }
        let mut g2 = vec![0f32; 15];
        let f_gd = p.eval(&theta, &mut g2);
        let mut theta_l = probe.w.clone();
        theta_l.extend_from_slice(&probe.b);
        let f_lbfgs = p.eval(&theta_l, &mut g2);
        assert!((f_gd - f_lbfgs).abs() < 1e-5, "gd {f_gd} vs lbfgs {f_lbfgs}");
        for (a, b) in theta.iter().zip(&theta_l) {
            assert!((a - b).abs() < 1e-2, "{a} vs {b}");
        }
        let acc = probe.accuracy(&blobs(300, 4, 3, 1.5, 3)?)?;
        assert!(acc > 0.5 && acc < 1.0, "{acc}");
        Ok(())
    }

    /// Few labels, many noise dimensions: the cross-validated choice must be
    /// the grid value with the most correct validation predictions over the
    /// folds of every repeat (checked here with independent fits), which
    /// here is strong regularisation.
    #[test]
    fn few_labels_choose_the_l2_strength_by_cross_validation() -> Result<()> {
        // 3 informative dimensions, 200 noise ones, 60 labelled rows
        let noisy = |n: usize, seed: u64| -> Result<Embedded> {
            let b = blobs(n, 3, 3, 1.0, seed)?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
            let mut f = Vec::with_capacity(n * 203);
            for r in b.features.chunks_exact(3) {
                f.extend_from_slice(r);
                f.extend((0..200).map(|_| rng.random_range(-1.0f32..1.0)));
            }
            Embedded::new(f, 203, b.labels)
        };
        let train = noisy(60, 7)?;
        let cfg = LinearProbeConfig::default();
        assert!(((60.0 * cfg.val_fraction) as usize) < cfg.min_val_rows);
        let probe = LinearProbe::fit(&train, &cfg)?;

        let folds = validation_folds(60, &cfg)?;
        assert_eq!(folds.len(), cfg.folds * cfg.repeats);
        let cv = |l2: f64| -> Result<usize> {
            let mut correct = 0;
            for (tr, va) in &folds {
                let p = LinearProbe::fit_with(&train.select(tr), l2, &cfg)?;
                let va = train.select(va);
                correct += p.predict(&va)?.iter().zip(&va.labels).filter(|(a, b)| a == b).count();
            }
            Ok(correct)
        };
        let scores: Vec<(f64, usize)> = cfg.l2_grid.iter().map(|&l| Ok((l, cv(l)?))).collect::<Result<_>>()?;
        let best = scores.iter().map(|s| s.1).max().unwrap_or(0);
        let chosen = scores.iter().find(|s| s.0 == probe.l2).map_or(0, |s| s.1);
        assert!(
            chosen + 1 >= best,
            "chose {} ({chosen} correct), best {best}: {scores:?}",
            probe.l2
        );
        assert!(probe.l2 >= 1e-2, "chose {}: {scores:?}", probe.l2);
        Ok(())
    }

    #[test]
    fn cross_validation_repeats_are_distinct_deals() -> Result<()> {
        let cfg = LinearProbeConfig::default();
        let folds = validation_folds(600, &cfg)?;
        assert_eq!(folds.len(), cfg.folds * cfg.repeats);
        for deal in folds.chunks(cfg.folds) {
            // within a deal every row is validated exactly once
            let mut seen: Vec<usize> = deal.iter().flat_map(|(_, va)| va.iter().copied()).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..600).collect::<Vec<_>>());
        }
        assert_ne!(folds[0].1, folds[cfg.folds].1, "the repeats deal the same folds");
        // a large training set keeps the single validation split
        assert_eq!(validation_folds(6000, &cfg)?.len(), 1);
        Ok(())
    }

    #[test]
    fn deterministic_and_checked() -> Result<()> {
        let train = blobs(120, 3, 3, 1.0, 4)?;
        let a = LinearProbe::fit(&train, &LinearProbeConfig::default())?;
        let b = LinearProbe::fit(&train, &LinearProbeConfig::default())?;
        assert_eq!(a.w, b.w);
        assert!(a.predict(&blobs(5, 4, 3, 1.0, 0)?).is_err());
        Ok(())
    }
}
