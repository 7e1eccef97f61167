//! Batch normalisation over the last dimension of a `(rows, c)` matrix
//! (channels-last activations viewed as pixels × channels), optionally fused
//! with ReLU. Sums are accumulated in f64 per chunk of rows, chunks in parallel.

use rayon::prelude::*;

const ROWS_PER_CHUNK: usize = 2048;

/// Two per-channel running sums: accumulated in f32 over runs of 64 rows (so
/// the per-row loop vectorises), promoted to f64 between runs.
struct PairSums {
    a: Vec<f64>,
    b: Vec<f64>,
    pa: Vec<f32>,
    pb: Vec<f32>,
    rows: usize,
}

impl PairSums {
    fn new(c: usize) -> Self {
        Self {
            a: vec![0.0; c],
            b: vec![0.0; c],
            pa: vec![0.0; c],
            pb: vec![0.0; c],
            rows: 0,
        }
    }

    #[inline]
    fn row_done(&mut self) {
        self.rows += 1;
        if self.rows % 64 == 0 {
            self.flush();
        }
    }

    fn flush(&mut self) {
        for j in 0..self.a.len() {
            self.a[j] += f64::from(self.pa[j]);
            self.b[j] += f64::from(self.pb[j]);
            self.pa[j] = 0.0;
            self.pb[j] = 0.0;
        }
    }

    fn finish(mut self) -> (Vec<f64>, Vec<f64>) {
        self.flush();
        (self.a, self.b)
    }
}

/// Adds two pairs of per-channel sums (the reduction of [`PairSums`] over chunks).
fn add_pairs((mut a, mut b): (Vec<f64>, Vec<f64>), (x, y): (Vec<f64>, Vec<f64>)) -> (Vec<f64>, Vec<f64>) {
    for j in 0..a.len() {
        a[j] += x[j];
        b[j] += y[j];
    }
    (a, b)
}

/// Per-channel mean and biased variance of `x` (`rows × c`).
pub fn channel_stats(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let (s, ss) = x
        .par_chunks(ROWS_PER_CHUNK * c)
        .map(|chunk| {
            let mut acc = PairSums::new(c);
            for row in chunk.chunks_exact(c) {
                for ((p, q), &v) in acc.pa.iter_mut().zip(acc.pb.iter_mut()).zip(row) {
                    *p += v;
                    *q += v * v;
                }
                acc.row_done();
            }
            acc.finish()
        })
        .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
    let n = rows.max(1) as f64;
    let mean: Vec<f64> = s.iter().map(|v| v / n).collect();
    let var: Vec<f32> = ss
        .iter()
        .zip(&mean)
        .map(|(q, m)| (q / n - m * m).max(0.0) as f32)
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), var)
}

/// `y = (x - mean) · invstd · gamma + beta`, then ReLU if `relu`.
pub fn bn_apply(
    x: &[f32],
    c: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    beta: &[f32],
    relu: bool,
) -> Vec<f32> {
    let scale: Vec<f32> = (0..c).map(|j| invstd[j] * gamma[j]).collect();
    let shift: Vec<f32> = (0..c).map(|j| beta[j] - mean[j] * scale[j]).collect();
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(ROWS_PER_CHUNK * c)
        .zip(x.par_chunks(ROWS_PER_CHUNK * c))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                for j in 0..c {
                    let v = xr[j] * scale[j] + shift[j];
                    yr[j] = if relu { v.max(0.0) } else { v };
                }
            }
        });
    y
}

/// Gradients of [`bn_apply`] (with batch statistics when `batch_stats`, else
/// with fixed statistics): returns `(dx, dgamma, dbeta)`. With `relu`, the
/// incoming gradient is masked where the output `y` is not positive.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward(
    x: &[f32],
    dy: &[f32],
    y: &[f32],
    c: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    relu: bool,
    batch_stats: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if relu {
        bn_backward_impl::<true>(x, dy, y, c, mean, invstd, gamma, batch_stats)
    } else {
        bn_backward_impl::<false>(x, dy, y, c, mean, invstd, gamma, batch_stats)
    }
}

/// The incoming gradient, masked by the ReLU when `RELU` (branch-free, so it vectorises).
#[inline(always)]
fn masked<const RELU: bool>(d: f32, y: f32) -> f32 {
    if RELU {
        if y > 0.0 {
            d
        } else {
            0.0
        }
    } else {
        d
    }
}

#[allow(clippy::too_many_arguments)]
fn bn_backward_impl<const RELU: bool>(
    x: &[f32],
    dy: &[f32],
    y: &[f32],
    c: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    batch_stats: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let chunk = ROWS_PER_CHUNK * c;
    // Pass 1: sum(g) and sum(g * (x - mean)) per channel.
    let (sg, sgx) = x
        .par_chunks(chunk)
        .zip(dy.par_chunks(chunk))
        .zip(y.par_chunks(chunk))
        .map(|((xc, dc), yc)| {
            let mut acc = PairSums::new(c);
            for ((xr, dr), yr) in xc.chunks_exact(c).zip(dc.chunks_exact(c)).zip(yc.chunks_exact(c)) {
                for ((((p, q), &xv), &dv), (&yv, &m)) in acc
                    .pa
                    .iter_mut()
                    .zip(acc.pb.iter_mut())
                    .zip(xr)
                    .zip(dr)
                    .zip(yr.iter().zip(mean))
                {
                    let g = masked::<RELU>(dv, yv);
                    *p += g;
                    *q += g * (xv - m);
                }
                acc.row_done();
            }
            acc.finish()
        })
        .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
    let dbeta: Vec<f32> = sg.iter().map(|v| *v as f32).collect();
    let dgamma: Vec<f32> = sgx
        .iter()
        .zip(invstd)
        .map(|(v, s)| (*v * f64::from(*s)) as f32)
        .collect();
    let n = rows.max(1) as f32;
    // dx = k * (g - mg - (x - mean) * invstd * mgx) = k * g + a * x + b
    let k: Vec<f32> = (0..c).map(|j| gamma[j] * invstd[j]).collect();
    let mg: Vec<f32> = (0..c).map(|j| if batch_stats { dbeta[j] / n } else { 0.0 }).collect();
    let mgx: Vec<f32> = (0..c).map(|j| if batch_stats { dgamma[j] / n } else { 0.0 }).collect();
    let ca: Vec<f32> = (0..c).map(|j| -k[j] * invstd[j] * mgx[j]).collect();
    let cb: Vec<f32> = (0..c).map(|j| -k[j] * mg[j] - ca[j] * mean[j]).collect();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(dy.par_chunks(chunk))
        .zip(y.par_chunks(chunk))
        .for_each(|(((oc, xc), dc), yc)| {
            for (((or, xr), dr), yr) in oc
                .chunks_exact_mut(c)
                .zip(xc.chunks_exact(c))
                .zip(dc.chunks_exact(c))
                .zip(yc.chunks_exact(c))
            {
                for (((((o, &xv), &dv), &yv), &kk), (&a, &b)) in
                    or.iter_mut().zip(xr).zip(dr).zip(yr).zip(&k).zip(ca.iter().zip(&cb))
                {
                    *o = kk * masked::<RELU>(dv, yv) + a * xv + b;
                }
            }
        });
    (dx, dgamma, dbeta)
}

/// `max(a + b, 0)`.
pub fn add_relu(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    y.par_chunks_mut(1 << 16)
        .zip(a.par_chunks(1 << 16))
        .zip(b.par_chunks(1 << 16))
        .for_each(|((y, a), b)| {
            for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                *y = (a + b).max(0.0);
            }
        });
    y
}

/// `dy` where `y > 0`, else 0.
pub fn relu_mask(dy: &[f32], y: &[f32]) -> Vec<f32> {
    let mut g = vec![0f32; dy.len()];
    g.par_chunks_mut(1 << 16)
        .zip(dy.par_chunks(1 << 16))
        .zip(y.par_chunks(1 << 16))
        .for_each(|((g, d), y)| {
            for ((g, d), y) in g.iter_mut().zip(d).zip(y) {
                *g = if *y > 0.0 { *d } else { 0.0 };
            }
        });
    g
}

/// Mean over the pixels of each image: `(n, px, c)` → `(n, c)`.
pub fn global_avg_pool(x: &[f32], n: usize, px: usize, c: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * c];
    y.par_chunks_mut(c).enumerate().for_each(|(i, yr)| {
        for row in x[i * px * c..(i + 1) * px * c].chunks_exact(c) {
            for (a, v) in yr.iter_mut().zip(row) {
                *a += v;
            }
        }
        let inv = 1.0 / px as f32;
        for a in yr.iter_mut() {
            *a *= inv;
        }
    });
    y
}

/// Gradient of [`global_avg_pool`]: `(n, c)` → `(n, px, c)`.
pub fn global_avg_pool_backward(dy: &[f32], n: usize, px: usize, c: usize) -> Vec<f32> {
    let mut dx = vec![0f32; n * px * c];
    let inv = 1.0 / px as f32;
    dx.par_chunks_mut(px * c).enumerate().for_each(|(i, d)| {
        let g = &dy[i * c..(i + 1) * c];
        for row in d.chunks_exact_mut(c) {
            for (a, v) in row.iter_mut().zip(g) {
                *a = v * inv;
            }
        }
    });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_match_two_pass() {
        let c = 3;
        let x: Vec<f32> = (0..3000 * c).map(|i| ((i * 31) % 17) as f32 * 0.1 + 5.0).collect();
        let (m, v) = channel_stats(&x, c);
        for j in 0..c {
            let col: Vec<f64> = x.iter().skip(j).step_by(c).map(|&v| f64::from(v)).collect();
            let mean = col.iter().sum::<f64>() / col.len() as f64;
            let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / col.len() as f64;
            assert!((f64::from(m[j]) - mean).abs() < 1e-5);
            assert!((f64::from(v[j]) - var).abs() < 1e-4, "{} vs {var}", v[j]);
        }
    }

    #[test]
    fn pool_and_its_gradient() {
        let x: Vec<f32> = (0..2 * 4 * 3).map(|i| i as f32).collect();
        let y = global_avg_pool(&x, 2, 4, 3);
        assert_eq!(y, vec![4.5, 5.5, 6.5, 16.5, 17.5, 18.5]);
        let dx = global_avg_pool_backward(&[4.0, 8.0, 0.0, 1.0, 1.0, 1.0], 2, 4, 3);
        assert_eq!(&dx[..3], &[1.0, 2.0, 0.0]);
        assert_eq!(&dx[21..], &[0.25, 0.25, 0.25]);
    }
}
