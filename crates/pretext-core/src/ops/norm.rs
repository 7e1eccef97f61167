//! Normalisation over the last dimension: batch normalisation of
//! channels-last activations viewed as a `(pixels, channels)` matrix
//! (optionally fused with ReLU; sums accumulated in f64 per chunk of rows,
//! chunks in parallel) and layer normalisation of each row. Kernels, graph
//! nodes and their `reference_*` twins.

use super::fused::{apply, apply_no_grad, values, FusedOp, Operand};
use super::vector::multiversion;
use super::{fast_path, rows_per_task, ROW_TASK};
use candle_core::{bail, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

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
        if self.rows.is_multiple_of(64) {
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

/// Two per-channel sums and a row count, summed over the ranks of a
/// data-parallel step with synchronised batch norm (see
/// [`crate::dist::norm_collective`]); unchanged otherwise.
fn sum_over_ranks(a: Vec<f64>, b: Vec<f64>, rows: usize) -> (Vec<f64>, Vec<f64>, usize) {
    let Some(world) = crate::dist::norm_collective() else {
        return (a, b, rows);
    };
    let c = a.len();
    let mut buf = a;
    buf.extend(b);
    buf.push(rows as f64);
    world.all_reduce_f64(&mut buf);
    let rows = buf[2 * c] as usize;
    let b = buf[c..2 * c].to_vec();
    buf.truncate(c);
    (buf, b, rows)
}

/// Per-channel mean and biased variance of `x` (`rows × c`). Inside a
/// data-parallel step, of the whole batch: the sums are added over ranks.
pub fn channel_stats(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let (s, ss) = x
        .par_chunks(ROWS_PER_CHUNK * c)
        .map(|chunk| {
            let mut acc = PairSums::new(c);
            value_sums(chunk, c, &mut acc);
            acc.finish()
        })
        .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
    // In a data-parallel step, the statistics of the whole batch (synchronised BN).
    let (s, ss, rows) = sum_over_ranks(s, ss, rows);
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
        .for_each(|(yc, xc)| affine_rows(yc, xc, &scale, &shift, relu));
    y
}

multiversion! {
    /// Adds each row of `chunk` (`c` channels) and its square to `acc`.
    fn value_sums(chunk: &[f32], c: usize, acc: &mut PairSums) {
        for row in chunk.chunks_exact(c) {
            for ((p, q), &v) in acc.pa.iter_mut().zip(acc.pb.iter_mut()).zip(row) {
                *p += v;
                *q += v * v;
            }
            acc.row_done();
        }
    }
}

multiversion! {
    /// `y = x·scale + shift` per channel (rows of `scale.len()`), then ReLU if `relu`.
    fn affine_rows(yc: &mut [f32], xc: &[f32], scale: &[f32], shift: &[f32], relu: bool) {
        let c = scale.len();
        for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
            for j in 0..c {
                let v = xr[j] * scale[j] + shift[j];
                yr[j] = if relu { v.max(0.0) } else { v };
            }
        }
    }
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
    let rows = x.len() / c;
    let chunk = ROWS_PER_CHUNK * c;
    // Pass 1: sum(g) and sum(g * (x - mean)) per channel.
    let (sg, sgx) = x
        .par_chunks(chunk)
        .zip(dy.par_chunks(chunk))
        .zip(y.par_chunks(chunk))
        .map(|((xc, dc), yc)| {
            let mut acc = PairSums::new(c);
            gradient_sums(xc, dc, yc, mean, &mut acc, relu);
            acc.finish()
        })
        .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
    let dbeta: Vec<f32> = sg.iter().map(|v| *v as f32).collect();
    let dgamma: Vec<f32> = sgx
        .iter()
        .zip(invstd)
        .map(|(v, s)| (*v * f64::from(*s)) as f32)
        .collect();
    // The weight and bias gradients are this rank's sums (the trainer
    // averages parameter gradients over ranks); the input gradient needs
    // the means over the whole batch the statistics came from.
    let (sg, sgx, rows) = if batch_stats {
        sum_over_ranks(sg, sgx, rows)
    } else {
        (sg, sgx, rows)
    };
    let n = rows.max(1) as f32;
    let mean_g: Vec<f32> = sg.iter().map(|v| *v as f32).collect();
    let mean_gx: Vec<f32> = sgx
        .iter()
        .zip(invstd)
        .map(|(v, s)| (*v * f64::from(*s)) as f32)
        .collect();
    // dx = k * (g - mg - (x - mean) * invstd * mgx) = k * g + a * x + b
    let k: Vec<f32> = (0..c).map(|j| gamma[j] * invstd[j]).collect();
    let mg: Vec<f32> = (0..c).map(|j| if batch_stats { mean_g[j] / n } else { 0.0 }).collect();
    let mgx: Vec<f32> = (0..c).map(|j| if batch_stats { mean_gx[j] / n } else { 0.0 }).collect();
    let ca: Vec<f32> = (0..c).map(|j| -k[j] * invstd[j] * mgx[j]).collect();
    let cb: Vec<f32> = (0..c).map(|j| -k[j] * mg[j] - ca[j] * mean[j]).collect();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(dy.par_chunks(chunk))
        .zip(y.par_chunks(chunk))
        .for_each(|(((oc, xc), dc), yc)| {
            input_gradient_rows(oc, xc, dc, yc, [&k, &ca, &cb], relu);
        });
    (dx, dgamma, dbeta)
}

/// The incoming gradient `d`, masked by the ReLU output `y` when `relu`
/// (branch-free, so it vectorises).
#[inline(always)]
fn masked(d: f32, y: f32, relu: bool) -> f32 {
    if !relu || y > 0.0 {
        d
    } else {
        0.0
    }
}

multiversion! {
    /// Adds, per channel, the incoming gradient `g` (masked by the ReLU
    /// output `y > 0` when `relu`) and `g·(x − mean)` of each row to `acc`.
    fn gradient_sums(xc: &[f32], dc: &[f32], yc: &[f32], mean: &[f32], acc: &mut PairSums, relu: bool) {
        let c = mean.len();
        for ((xr, dr), yr) in xc.chunks_exact(c).zip(dc.chunks_exact(c)).zip(yc.chunks_exact(c)) {
            for ((((p, q), &xv), &dv), (&yv, &m)) in acc
                .pa
                .iter_mut()
                .zip(acc.pb.iter_mut())
                .zip(xr)
                .zip(dr)
                .zip(yr.iter().zip(mean))
            {
                let g = masked(dv, yv, relu);
                *p += g;
                *q += g * (xv - m);
            }
            acc.row_done();
        }
    }
}

multiversion! {
    /// `dx = k·g + a·x + b` per channel (`coef = [k, a, b]`), `g` the incoming gradient masked by
    /// the ReLU output when `relu`.
    fn input_gradient_rows(oc: &mut [f32], xc: &[f32], dc: &[f32], yc: &[f32], coef: [&[f32]; 3], relu: bool) {
        let [k, ca, cb] = coef;
        let c = k.len();
        for (((or, xr), dr), yr) in oc
            .chunks_exact_mut(c)
            .zip(xc.chunks_exact(c))
            .zip(dc.chunks_exact(c))
            .zip(yc.chunks_exact(c))
        {
            for (((((o, &xv), &dv), &yv), &kk), (&a, &b)) in
                or.iter_mut().zip(xr).zip(dr).zip(yr).zip(k).zip(ca.iter().zip(cb))
            {
                let g = masked(dv, yv, relu);
                *o = kk * g + a * xv + b;
            }
        }
    }
}

/// Batch statistics of one forward pass: per-channel mean and biased variance.
pub type BatchStats = (Vec<f32>, Vec<f32>);

/// How batch normalisation gets its statistics.
#[derive(Debug, Clone)]
pub enum NormStats {
    /// From the batch (training); the batch mean and biased variance are returned.
    Batch,
    /// Fixed (evaluation): running mean and variance.
    Fixed(Vec<f32>, Vec<f32>),
}

/// Mean, biased variance and inverse standard deviation saved by a forward pass.
type SavedStats = Arc<Mutex<Option<(Vec<f32>, Vec<f32>, Vec<f32>)>>>;

struct BatchNormOp {
    eps: f64,
    relu: bool,
    stats: NormStats,
    saved: SavedStats,
}

impl FusedOp<3> for BatchNormOp {
    const NAME: &'static str = "pretext-batch-norm";

    fn forward(&self, [x, gamma, beta]: [Operand<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let c = x.last_dim();
        if gamma.data.len() != c || beta.data.len() != c || c == 0 {
            bail!(
                "batch_norm: {c} channels but weight {} and bias {}",
                gamma.data.len(),
                beta.data.len()
            )
        }
        let (mean, var) = match &self.stats {
            NormStats::Batch => channel_stats(x.data, c),
            NormStats::Fixed(m, v) => (m.clone(), v.clone()),
        };
        let invstd: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (f64::from(*v) + self.eps).sqrt()) as f32)
            .collect();
        let y = bn_apply(x.data, c, &mean, &invstd, gamma.data, beta.data, self.relu);
        if let Ok(mut s) = self.saved.lock() {
            *s = Some((mean, var, invstd));
        }
        Ok((y, Shape::from(x.dims.to_vec())))
    }

    fn backward(
        &self,
        [x, gamma, _]: [&Tensor; 3],
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let Some((mean, _, invstd)) = self.saved.lock().ok().and_then(|s| s.clone()) else {
            bail!("batch_norm backward without a forward pass")
        };
        let c = mean.len();
        let op = BatchNormBwd {
            mean,
            invstd,
            gamma: gamma.to_vec1::<f32>()?,
            relu: self.relu,
            batch_stats: matches!(self.stats, NormStats::Batch),
        };
        let packed = apply_no_grad([&x.contiguous()?, &grad.contiguous()?, &res.contiguous()?], op)?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, c)?;
        let dbeta = packed.narrow(0, n + c, c)?;
        Ok([Some(dx), Some(dgamma), Some(dbeta)])
    }
}

/// The input, weight and bias gradients of batch norm, packed into one vector.
struct BatchNormBwd {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    gamma: Vec<f32>,
    relu: bool,
    batch_stats: bool,
}

impl FusedOp<3> for BatchNormBwd {
    const NAME: &'static str = "pretext-batch-norm-bwd";

    fn forward(&self, [x, dy, y]: [Operand<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let c = self.mean.len();
        let (mut dx, dg, db) = bn_backward(
            x.data,
            dy.data,
            y.data,
            c,
            &self.mean,
            &self.invstd,
            &self.gamma,
            self.relu,
            self.batch_stats,
        );
        dx.extend_from_slice(&dg);
        dx.extend_from_slice(&db);
        let n = dx.len();
        Ok((dx, Shape::from(n)))
    }
}

/// Batch normalisation over the last dimension of `x` (channels-last), fused
/// with ReLU when `relu`. Returns the output and, with [`NormStats::Batch`],
/// the batch mean and biased variance (for running statistics).
///
/// # Errors
/// Shapes that do not fit.
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: NormStats,
    eps: f64,
    relu: bool,
) -> candle_core::Result<(Tensor, Option<BatchStats>)> {
    if !fast_path(&[x, gamma, beta]) {
        if matches!(stats, NormStats::Batch) && crate::dist::norm_collective().is_some() {
            bail!("batch_norm: statistics synchronised over ranks need f32 tensors on the CPU")
        }
        return reference_batch_norm(x, gamma, beta, stats, eps, relu);
    }
    let batch = matches!(stats, NormStats::Batch);
    let saved = Arc::new(Mutex::new(None));
    let op = BatchNormOp {
        eps,
        relu,
        stats,
        saved: saved.clone(),
    };
    let y = apply([&x.contiguous()?, &gamma.contiguous()?, &beta.contiguous()?], op)?;
    let out = if batch {
        saved
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|(m, v, _)| (m.clone(), v.clone())))
    } else {
        None
    };
    Ok((y, out))
}

/// [`batch_norm`] with candle's generic ops.
///
/// # Errors
/// Shapes that do not fit.
pub fn reference_batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: NormStats,
    eps: f64,
    relu: bool,
) -> candle_core::Result<(Tensor, Option<BatchStats>)> {
    let c = x.dim(D::Minus1)?;
    let flat = x.reshape(((), c))?;
    let (mean, var, out) = match stats {
        NormStats::Batch => {
            let mean = flat.mean(0)?;
            let var = flat.broadcast_sub(&mean)?.sqr()?.mean(0)?;
            let out = Some((mean.to_vec1::<f32>()?, var.to_vec1::<f32>()?));
            (mean, var, out)
        }
        NormStats::Fixed(m, v) => (Tensor::new(m, x.device())?, Tensor::new(v, x.device())?, None),
    };
    let y = flat
        .broadcast_sub(&mean)?
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(gamma)?
        .broadcast_add(beta)?;
    let y = if relu { y.relu()? } else { y };
    Ok((y.reshape(x.shape())?, out))
}

/// Layer normalisation over the last dimension with affine weight and bias.
struct LayerNormOp {
    eps: f32,
}

/// Mean and inverse standard deviation of one row.
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl FusedOp<3> for LayerNormOp {
    const NAME: &'static str = "pretext-layer-norm";

    fn forward(&self, [x, g, b]: [Operand<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (dims, x, g, b) = (x.dims, x.data, g.data, b.data);
        let h = g.len();
        if h == 0 || x.len() % h != 0 || b.len() != h {
            bail!("layer_norm: x {dims:?} does not end in the weight's size {h}");
        }
        let mut y = vec![0f32; x.len()];
        let rows = rows_per_task(h, ROW_TASK) * h;
        y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(h).zip(xc.chunks(h)) {
                let (mean, rstd) = row_stats(xr, self.eps);
                for i in 0..h {
                    yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
                }
            }
        });
        Ok((y, Shape::from(dims.to_vec())))
    }

    fn backward(
        &self,
        [x, g, _]: [&Tensor; 3],
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let h = g.elem_count();
        let (xs, gs, dys) = (values(x)?, values(g)?, values(dy)?);
        let mut dx = vec![0f32; xs.len()];
        let rows = rows_per_task(h, ROW_TASK) * h;
        let (dg, db) = dx
            .par_chunks_mut(rows)
            .zip(xs.par_chunks(rows).zip(dys.par_chunks(rows)))
            .map(|(dxc, (xc, dyc))| {
                let mut dg = vec![0f32; h];
                let mut db = vec![0f32; h];
                for ((dxr, xr), dyr) in dxc.chunks_mut(h).zip(xc.chunks(h)).zip(dyc.chunks(h)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for i in 0..h {
                        let xh = (xr[i] - mean) * rstd;
                        let gy = dyr[i] * gs[i];
                        s1 += gy;
                        s2 += gy * xh;
                        dg[i] += dyr[i] * xh;
                        db[i] += dyr[i];
                    }
                    let (m1, m2) = (s1 / h as f32, s2 / h as f32);
                    for i in 0..h {
                        let xh = (xr[i] - mean) * rstd;
                        dxr[i] = rstd * (dyr[i] * gs[i] - m1 - xh * m2);
                    }
                }
                (dg, db)
            })
            .reduce(
                || (vec![0f32; h], vec![0f32; h]),
                |(mut a, mut b), (c, d)| {
                    a.iter_mut().zip(&c).for_each(|(p, q)| *p += q);
                    b.iter_mut().zip(&d).for_each(|(p, q)| *p += q);
                    (a, b)
                },
            );
        let dev = x.device();
        Ok([
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dg, g.shape(), dev)?),
            Some(Tensor::from_vec(db, g.shape(), dev)?),
        ])
    }
}

/// Layer normalisation over the last dimension with affine `weight` and
/// `bias` (`torch.nn.LayerNorm`): fused on CPU f32, composed elsewhere.
///
/// # Errors
/// Shape mismatch.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if fast_path(&[x, weight, bias]) {
        apply([&x.contiguous()?, weight, bias], LayerNormOp { eps })
    } else {
        reference_layer_norm(x, weight, bias, eps)
    }
}

/// Layer normalisation from candle's differentiable elementwise ops.
///
/// # Errors
/// Shape mismatch.
pub fn reference_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + f64::from(eps))?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{bits, hashed_values, max_diff, rand, same_on_every_family};
    use candle_core::{DType, Device, Var};

    /// Batch norm's passes (sums, affine + ReLU, gradient sums, input
    /// gradient) give the same bits on every kernel family: vectorising them
    /// runs across channels and leaves each channel's sum in row order.
    #[test]
    fn batch_norm_passes_agree_across_kernel_families() {
        for c in [3, 16, 37] {
            let rows = 150;
            let (x, d, y) = (
                hashed_values(rows * c, 1),
                hashed_values(rows * c, 2),
                hashed_values(rows * c, 3),
            );
            let (mean, scale, shift) = (hashed_values(c, 4), hashed_values(c, 5), hashed_values(c, 6));
            let sums = |f: &dyn Fn(&mut PairSums)| {
                let mut acc = PairSums::new(c);
                f(&mut acc);
                let (a, b) = acc.finish();
                (
                    a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                )
            };
            same_on_every_family(|| sums(&|acc| value_sums(&x, c, acc)));
            for relu in [false, true] {
                same_on_every_family(|| {
                    let mut o = vec![0f32; x.len()];
                    affine_rows(&mut o, &x, &scale, &shift, relu);
                    bits(&o)
                });
                same_on_every_family(|| sums(&|acc| gradient_sums(&x, &d, &y, &mean, acc, relu)));
                same_on_every_family(|| {
                    let mut o = vec![0f32; x.len()];
                    input_gradient_rows(&mut o, &x, &d, &y, [&scale, &shift, &mean], relu);
                    bits(&o)
                });
            }
            // and the pass computes what it says, on one row
            let mut o = vec![0f32; x.len()];
            affine_rows(&mut o, &x, &scale, &shift, true);
            for j in 0..c {
                assert_eq!(o[j], (x[j] * scale[j] + shift[j]).max(0.0));
            }
        }
    }

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
    fn layer_norm_matches_composed_ops_with_parameter_gradients() -> candle_core::Result<()> {
        let x = Var::from_tensor(&rand(&[6, 7, 48], 3))?;
        let g = Var::from_tensor(&(rand(&[48], 4) + 1.0)?)?;
        let b = Var::from_tensor(&rand(&[48], 5))?;
        let w = rand(&[6, 7, 48], 6);
        let a = layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-12)?;
        let r = reference_layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-12)?;
        assert!(max_diff(&a, &r) < 1e-5);
        let ga = (a * &w)?.sum_all()?.backward()?;
        let gr = (r * &w)?.sum_all()?.backward()?;
        for v in [&x, &g, &b] {
            let d = max_diff(
                ga.get(v.as_tensor()).expect("grad"),
                gr.get(v.as_tensor()).expect("grad"),
            );
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() -> candle_core::Result<()> {
        // f64 finite differences of the composed op on the same input: the
        // fused f32 gradient must agree with the true derivative.
        let x = rand(&[2, 9], 7);
        let g = (rand(&[9], 8) + 1.0)?;
        let b = rand(&[9], 9);
        let w = rand(&[2, 9], 10);
        let xv = Var::from_tensor(&x)?;
        let grad = (layer_norm(xv.as_tensor(), &g, &b, 1e-5)? * &w)?
            .sum_all()?
            .backward()?;
        let grad = grad
            .get(xv.as_tensor())
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let f = |x: &Tensor| -> candle_core::Result<f64> {
            let x = x.to_dtype(DType::F64)?;
            (reference_layer_norm(&x, &g.to_dtype(DType::F64)?, &b.to_dtype(DType::F64)?, 1e-5)?
                * w.to_dtype(DType::F64)?)?
            .sum_all()?
            .to_scalar::<f64>()
        };
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..xs.len() {
            let h = 1e-3;
            let mut p = xs.clone();
            p[i] += h;
            let mut m = xs.clone();
            m[i] -= h;
            let fp = f(&Tensor::from_vec(p, x.shape(), &Device::Cpu)?)?;
            let fm = f(&Tensor::from_vec(m, x.shape(), &Device::Cpu)?)?;
            let fd = (fp - fm) / (2.0 * f64::from(h));
            assert!((fd - f64::from(grad[i])).abs() < 2e-3, "x[{i}]: fd {fd} vs {}", grad[i]);
        }
        Ok(())
    }
}
