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
use std::mem::MaybeUninit;
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
    stats_from_sums(s, ss, rows)
}

/// One image's per-channel sums for [`stats_from_image_sums`]: `out[..c]`
/// gets the sums of `map`'s rows (`c` channels each), `out[c..2c]` the sums
/// of their squares — the pass of [`channel_stats`] over one image, run
/// while the image is in cache.
///
/// # Panics
/// If `out` does not hold `2c` values.
pub fn image_sums(map: &[f32], c: usize, out: &mut [f64]) {
    assert_eq!(out.len(), 2 * c, "image_sums: 2c values per image");
    out.fill(0.0);
    block_sums(map, c, out);
}

multiversion! {
    /// [`value_sums`] of one image into `out` (zeroed), 16 channels at a
    /// time so that the f32 running sums stay in registers: each channel's
    /// values are added in the same order, in runs of the same 64 rows, so
    /// the sums have the same bits.
    fn block_sums(map: &[f32], c: usize, out: &mut [f64]) {
        let rows = map.len() / c;
        for j0 in (0..c).step_by(16) {
            let w = (c - j0).min(16);
            for r0 in (0..rows).step_by(64) {
                let (mut s, mut q) = ([0f32; 16], [0f32; 16]);
                for r in r0..(r0 + 64).min(rows) {
                    let row = &map[r * c + j0..][..w];
                    if w == 16 {
                        for l in 0..16 {
                            s[l] += row[l];
                            q[l] += row[l] * row[l];
                        }
                    } else {
                        for (l, &v) in row.iter().enumerate() {
                            s[l] += v;
                            q[l] += v * v;
                        }
                    }
                }
                for l in 0..w {
                    out[j0 + l] += f64::from(s[l]);
                    out[c + j0 + l] += f64::from(q[l]);
                }
            }
        }
    }
}

/// [`channel_stats`] from every image's [`image_sums`] (`n × 2c` values, in
/// image order, added in that order) over `rows` rows in all.
pub fn stats_from_image_sums(sums: &[f64], c: usize, rows: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut s, mut ss) = (vec![0f64; c], vec![0f64; c]);
    for img in sums.chunks_exact(2 * c) {
        for j in 0..c {
            s[j] += img[j];
            ss[j] += img[c + j];
        }
    }
    stats_from_sums(s, ss, rows)
}

/// Mean and biased variance from per-channel sums and sums of squares over
/// `rows` rows (of the whole batch in a data-parallel step).
fn stats_from_sums(s: Vec<f64>, ss: Vec<f64>, rows: usize) -> (Vec<f32>, Vec<f32>) {
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

/// Batch norm as a per-channel affine map, `y = x·scale + shift`, with
/// `scale = invstd·gamma` and `shift = beta − mean·scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelAffine {
    /// Per-channel factor.
    pub scale: Vec<f32>,
    /// Per-channel offset.
    pub shift: Vec<f32>,
}

impl ChannelAffine {
    /// The map of batch norm with these statistics and parameters.
    pub fn new(mean: &[f32], invstd: &[f32], gamma: &[f32], beta: &[f32]) -> Self {
        let c = mean.len();
        let scale: Vec<f32> = (0..c).map(|j| invstd[j] * gamma[j]).collect();
        let shift: Vec<f32> = (0..c).map(|j| beta[j] - mean[j] * scale[j]).collect();
        Self { scale, shift }
    }

    /// Channels.
    pub fn channels(&self) -> usize {
        self.scale.len()
    }

    /// `x·scale + shift` over rows of [`Self::channels`] values, then ReLU
    /// if `relu`.
    pub fn apply(&self, x: &[f32], relu: bool) -> Vec<f32> {
        let chunk = ROWS_PER_CHUNK * self.channels();
        // SAFETY: the chunks of `y` and `x` pair up and `affine_rows` writes
        // every value of its chunk.
        unsafe {
            super::written_by(x.len(), 0, |y| {
                y.par_chunks_mut(chunk)
                    .zip(x.par_chunks(chunk))
                    .for_each(|(yc, xc)| affine_rows(yc, xc, &self.scale, &self.shift, relu));
            })
        }
    }
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
    debug_assert_eq!(mean.len(), c);
    ChannelAffine::new(mean, invstd, gamma, beta).apply(x, relu)
}

/// What a residual block adds to its last batch norm's output before the
/// final ReLU.
#[derive(Debug, Clone, Copy)]
pub enum Shortcut<'a> {
    /// The block's input as it is.
    Identity(&'a [f32]),
    /// A projection's pre-norm output and its batch norm.
    Normalised(&'a [f32], &'a ChannelAffine),
}

/// The end of a residual block in one pass: `max(z·scale + shift + r, 0)`
/// with `r` the shortcut (itself normalised for a projection). The same
/// arithmetic, in the same order, as [`bn_apply`] of each branch followed
/// by [`super::activation::add_relu_kernel`], without writing or reading the
/// normalised branches.
///
/// # Panics
/// If the shortcut's length differs from `z`'s.
pub fn bn_add_relu(z: &[f32], map: &ChannelAffine, shortcut: Shortcut<'_>) -> Vec<f32> {
    let c = map.channels();
    let chunk = ROWS_PER_CHUNK * c;
    let (r, rmap) = match shortcut {
        Shortcut::Identity(r) => (r, None),
        Shortcut::Normalised(r, m) => (r, Some(m)),
    };
    // SAFETY: both row passes write every value of their chunk.
    unsafe {
        super::zip_map(z, r, chunk, |yc, zc, rc| match rmap {
            None => add_affine_relu_rows(yc, zc, rc, &map.scale, &map.shift),
            Some(m) => affine_add_relu_rows(yc, zc, rc, [&map.scale, &map.shift, &m.scale, &m.shift]),
        })
    }
}

multiversion! {
    /// `y = max((z·scale + shift) + r, 0)` per channel.
    fn add_affine_relu_rows(yc: &mut [MaybeUninit<f32>], zc: &[f32], rc: &[f32], scale: &[f32], shift: &[f32]) {
        let c = scale.len();
        let shift = &shift[..c];
        for ((yr, zr), rr) in yc.chunks_exact_mut(c).zip(zc.chunks_exact(c)).zip(rc.chunks_exact(c)) {
            for j in 0..c {
                let v = normalised(zr[j], scale[j], shift[j]) + rr[j];
                yr[j] = MaybeUninit::new(if v > 0.0 { v } else { 0.0 });
            }
        }
    }
}

multiversion! {
    /// `y = max((z·scale + shift) + (r·rscale + rshift), 0)` per channel
    /// (`coef = [scale, shift, rscale, rshift]`).
    fn affine_add_relu_rows(yc: &mut [MaybeUninit<f32>], zc: &[f32], rc: &[f32], coef: [&[f32]; 4]) {
        let [scale, shift, rscale, rshift] = coef;
        let c = scale.len();
        let (shift, rscale, rshift) = (&shift[..c], &rscale[..c], &rshift[..c]);
        for ((yr, zr), rr) in yc.chunks_exact_mut(c).zip(zc.chunks_exact(c)).zip(rc.chunks_exact(c)) {
            for j in 0..c {
                let v = normalised(zr[j], scale[j], shift[j]) + normalised(rr[j], rscale[j], rshift[j]);
                yr[j] = MaybeUninit::new(if v > 0.0 { v } else { 0.0 });
            }
        }
    }
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
    fn affine_rows(yc: &mut [MaybeUninit<f32>], xc: &[f32], scale: &[f32], shift: &[f32], relu: bool) {
        let c = scale.len();
        for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
            for j in 0..c {
                let v = normalised(xr[j], scale[j], shift[j]);
                yr[j] = MaybeUninit::new(if relu { v.max(0.0) } else { v });
            }
        }
    }
}

/// Where the gradient entering batch norm's backward pass is masked: the
/// ReLU it has yet to pass back through.
#[derive(Debug, Clone, Copy)]
pub enum ReluMask<'a> {
    /// No ReLU: the gradient as it is.
    None,
    /// A ReLU's output: the gradient passes where it is positive.
    Output(&'a [f32]),
    /// The ReLU right after this norm, whose output is `max(x·scale +
    /// shift, 0)`: recomputed from the norm's input with the same
    /// arithmetic, so the mask is the same without reading the output.
    AfterNorm(&'a ChannelAffine),
}

/// Gradients of [`bn_apply`] (with batch statistics when `batch_stats`, else
/// with fixed statistics): returns `(dx, dgamma, dbeta)`, the incoming
/// gradient `dy` masked as `mask` says. `dx` is written as `T`: f32, or the
/// bits of its bf16 rounding (`u16`) for a gradient that only feeds bf16
/// products — the convolution's kernels would round it to the same bits,
/// from twice the memory.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward<T: GradientValue>(
    x: &[f32],
    dy: &[f32],
    mask: ReluMask<'_>,
    c: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    batch_stats: bool,
) -> (Vec<T>, Vec<f32>, Vec<f32>) {
    bn_backward_with_room(x, dy, mask, c, [mean, invstd, gamma], batch_stats, 0)
}

/// [`bn_backward`] with `room` values of spare capacity after `dx`.
fn bn_backward_with_room<T: GradientValue>(
    x: &[f32],
    dy: &[f32],
    mask: ReluMask<'_>,
    c: usize,
    [mean, invstd, gamma]: [&[f32]; 3],
    batch_stats: bool,
    room: usize,
) -> (Vec<T>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let chunk = ROWS_PER_CHUNK * c;
    let (relu, after) = match mask {
        ReluMask::None => (false, None),
        ReluMask::Output(_) => (true, None),
        ReluMask::AfterNorm(m) => (false, Some(m)),
    };
    // Without a stored output the kernels' mask operand is `dy` itself:
    // read from the same lines, so it costs no memory traffic.
    let y = match mask {
        ReluMask::Output(y) => y,
        _ => dy,
    };
    // Pass 1: sum(g) and sum(g * (x - mean)) per channel.
    let (sg, sgx) = x
        .par_chunks(chunk)
        .zip(dy.par_chunks(chunk))
        .zip(y.par_chunks(chunk))
        .map(|((xc, dc), yc)| {
            let mut acc = PairSums::new(c);
            match after {
                Some(m) => gradient_sums_after_norm(xc, dc, mean, [&m.scale, &m.shift], &mut acc),
                None => gradient_sums(xc, dc, yc, mean, &mut acc, relu),
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
    // SAFETY: the chunks pair up and `input_gradient_rows` writes every
    // value of its chunk.
    let dx = unsafe {
        super::written_by(x.len(), room, |dx| {
            dx.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .zip(dy.par_chunks(chunk))
                .zip(y.par_chunks(chunk))
                .for_each(|(((oc, xc), dc), yc)| match after {
                    Some(m) => T::rows_after_norm(oc, xc, dc, [&k, &ca, &cb, &m.scale, &m.shift]),
                    None => T::rows(oc, xc, dc, yc, [&k, &ca, &cb], relu),
                });
        })
    };
    (dx, dgamma, dbeta)
}

/// Batch norm's output for `x` as an affine map: the one expression of
/// every forward pass and of the masks the backward pass recomputes from
/// its input ([`ReluMask::AfterNorm`]), so that both round alike.
#[inline(always)]
fn normalised(x: f32, scale: f32, shift: f32) -> f32 {
    x * scale + shift
}

/// The incoming gradient `d` where the ReLU after the norm passes it, its
/// output's sign recomputed from the norm's input `x` (branch-free).
#[inline(always)]
fn masked_after_norm(d: f32, x: f32, scale: f32, shift: f32) -> f32 {
    if normalised(x, scale, shift) > 0.0 {
        d
    } else {
        0.0
    }
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

/// An element of batch norm's input gradient as written: f32, or the bits
/// of its bf16 rounding ([`super::bf16::round_bits`]) for a gradient that
/// only feeds bf16 products.
pub trait GradientValue: Copy + Send + Sync {
    /// `v` as written.
    fn from_f32(v: f32) -> Self;
    /// [`input_gradient_rows`] for this output type.
    fn rows(oc: &mut [MaybeUninit<Self>], xc: &[f32], dc: &[f32], yc: &[f32], coef: [&[f32]; 3], relu: bool);
    /// [`input_gradient_rows_after_norm`] for this output type.
    fn rows_after_norm(oc: &mut [MaybeUninit<Self>], xc: &[f32], dc: &[f32], coef: [&[f32]; 5]);
}

impl GradientValue for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn rows(oc: &mut [MaybeUninit<Self>], xc: &[f32], dc: &[f32], yc: &[f32], coef: [&[f32]; 3], relu: bool) {
        input_gradient_rows(oc, xc, dc, yc, coef, relu);
    }
    fn rows_after_norm(oc: &mut [MaybeUninit<Self>], xc: &[f32], dc: &[f32], coef: [&[f32]; 5]) {
        input_gradient_rows_after_norm(oc, xc, dc, coef);
    }
}

impl GradientValue for u16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        super::bf16::round_bits(v)
    }
    fn rows(oc: &mut [MaybeUninit<Self>], xc: &[f32], dc: &[f32], yc: &[f32], coef: [&[f32]; 3], relu: bool) {
        input_gradient_rows_bf16(oc, xc, dc, yc, coef, relu);
    }
    fn rows_after_norm(oc: &mut [MaybeUninit<Self>], xc: &[f32], dc: &[f32], coef: [&[f32]; 5]) {
        input_gradient_rows_after_norm_bf16(oc, xc, dc, coef);
    }
}

/// `dx = k·g + a·x + b` per channel (`coef = [k, a, b]`), `g` the incoming
/// gradient masked by the ReLU output when `relu`.
#[inline(always)]
fn gradient_rows<T: GradientValue>(
    oc: &mut [MaybeUninit<T>],
    xc: &[f32],
    dc: &[f32],
    yc: &[f32],
    coef: [&[f32]; 3],
    relu: bool,
) {
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
            *o = MaybeUninit::new(T::from_f32(kk * g + a * xv + b));
        }
    }
}

/// [`gradient_rows`] masked by the ReLU right after the norm (`coef = [k,
/// a, b, scale, shift]`).
#[inline(always)]
fn gradient_rows_after_norm<T: GradientValue>(oc: &mut [MaybeUninit<T>], xc: &[f32], dc: &[f32], coef: [&[f32]; 5]) {
    let [k, ca, cb, scale, shift] = coef;
    let c = k.len();
    let (ca, cb, scale, shift) = (&ca[..c], &cb[..c], &scale[..c], &shift[..c]);
    for ((or, xr), dr) in oc.chunks_exact_mut(c).zip(xc.chunks_exact(c)).zip(dc.chunks_exact(c)) {
        for j in 0..c {
            let (xv, dv) = (xr[j], dr[j]);
            let g = masked_after_norm(dv, xv, scale[j], shift[j]);
            or[j] = MaybeUninit::new(T::from_f32(k[j] * g + ca[j] * xv + cb[j]));
        }
    }
}

multiversion! {
    /// [`gradient_rows`] in f32.
    fn input_gradient_rows(oc: &mut [MaybeUninit<f32>], xc: &[f32], dc: &[f32], yc: &[f32], coef: [&[f32]; 3], relu: bool) {
        gradient_rows(oc, xc, dc, yc, coef, relu);
    }
}

multiversion! {
    /// [`gradient_rows`] rounded to bf16.
    fn input_gradient_rows_bf16(oc: &mut [MaybeUninit<u16>], xc: &[f32], dc: &[f32], yc: &[f32], coef: [&[f32]; 3], relu: bool) {
        gradient_rows(oc, xc, dc, yc, coef, relu);
    }
}

multiversion! {
    /// [`gradient_sums`] masked by the ReLU right after the norm, its
    /// output's sign recomputed from `x` (`map = [scale, shift]`).
    fn gradient_sums_after_norm(xc: &[f32], dc: &[f32], mean: &[f32], map: [&[f32]; 2], acc: &mut PairSums) {
        let [scale, shift] = map;
        let c = mean.len();
        for (xr, dr) in xc.chunks_exact(c).zip(dc.chunks_exact(c)) {
            for (((p, q), (&xv, &dv)), ((&m, &sc), &sh)) in acc
                .pa
                .iter_mut()
                .zip(acc.pb.iter_mut())
                .zip(xr.iter().zip(dr))
                .zip(mean.iter().zip(scale).zip(shift))
            {
                let g = masked_after_norm(dv, xv, sc, sh);
                *p += g;
                *q += g * (xv - m);
            }
            acc.row_done();
        }
    }
}

multiversion! {
    /// [`gradient_rows_after_norm`] in f32.
    fn input_gradient_rows_after_norm(oc: &mut [MaybeUninit<f32>], xc: &[f32], dc: &[f32], coef: [&[f32]; 5]) {
        gradient_rows_after_norm(oc, xc, dc, coef);
    }
}

multiversion! {
    /// [`gradient_rows_after_norm`] rounded to bf16.
    fn input_gradient_rows_after_norm_bf16(oc: &mut [MaybeUninit<u16>], xc: &[f32], dc: &[f32], coef: [&[f32]; 5]) {
        gradient_rows_after_norm(oc, xc, dc, coef);
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
        let (mut dx, dg, db) = bn_backward_with_room(
            x.data,
            dy.data,
            if self.relu {
                ReluMask::Output(y.data)
            } else {
                ReluMask::None
            },
            c,
            [&self.mean, &self.invstd, &self.gamma],
            self.batch_stats,
            2 * c,
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
    use crate::ops::testing::{bits, hashed_values, max_diff, out_buffer, out_values, rand, same_on_every_family};
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
            let (rscale, rshift) = (hashed_values(c, 7), hashed_values(c, 8));
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
                    let mut o = out_buffer(x.len());
                    affine_rows(&mut o, &x, &scale, &shift, relu);
                    bits(&out_values(&o))
                });
                same_on_every_family(|| sums(&|acc| gradient_sums(&x, &d, &y, &mean, acc, relu)));
                same_on_every_family(|| {
                    let mut o = out_buffer(x.len());
                    input_gradient_rows(&mut o, &x, &d, &y, [&scale, &shift, &mean], relu);
                    bits(&out_values(&o))
                });
            }
            same_on_every_family(|| sums(&|acc| gradient_sums_after_norm(&x, &d, &mean, [&scale, &shift], acc)));
            same_on_every_family(|| {
                let mut o = out_buffer(x.len());
                input_gradient_rows_after_norm(&mut o, &x, &d, [&scale, &shift, &mean, &rscale, &rshift]);
                bits(&out_values(&o))
            });
            same_on_every_family(|| {
                let mut o = out_buffer(x.len());
                add_affine_relu_rows(&mut o, &x, &d, &scale, &shift);
                let mut p = out_buffer(x.len());
                affine_add_relu_rows(&mut p, &x, &d, [&scale, &shift, &rscale, &rshift]);
                (bits(&out_values(&o)), bits(&out_values(&p)))
            });
            // and the pass computes what it says, on one row
            let mut o = out_buffer(x.len());
            affine_rows(&mut o, &x, &scale, &shift, true);
            let o = out_values(&o);
            for j in 0..c {
                assert_eq!(o[j], (x[j] * scale[j] + shift[j]).max(0.0));
            }
        }
    }

    /// The fused end of a residual block gives the bits of its unfused
    /// passes: each branch's batch norm, then the add and the ReLU.
    #[test]
    fn bn_add_relu_is_bn_then_add_relu() {
        use crate::ops::activation::add_relu_kernel;
        let c = 37;
        let rows = 2 * ROWS_PER_CHUNK + 5; // more than one chunk, and a ragged one
        let (z, r) = (hashed_values(rows * c, 1), hashed_values(rows * c, 2));
        let stats = |s| {
            let (mean, var) = channel_stats(&hashed_values(rows * c, s), c);
            let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
            (mean, invstd, hashed_values(c, s + 1), hashed_values(c, s + 2))
        };
        let (m, i, g, b) = stats(3);
        let (rm, ri, rg, rb) = stats(7);
        let map = ChannelAffine::new(&m, &i, &g, &b);
        let rmap = ChannelAffine::new(&rm, &ri, &rg, &rb);
        let main = bn_apply(&z, c, &m, &i, &g, &b, false);
        let identity = add_relu_kernel(&main, &r);
        assert_eq!(bits(&bn_add_relu(&z, &map, Shortcut::Identity(&r))), bits(&identity));
        let projected = add_relu_kernel(&main, &bn_apply(&r, c, &rm, &ri, &rg, &rb, false));
        assert_eq!(
            bits(&bn_add_relu(&z, &map, Shortcut::Normalised(&r, &rmap))),
            bits(&projected)
        );
        assert!(identity.contains(&0.0) && identity.iter().any(|v| *v > 0.0));
    }

    /// Inputs of batch norm's backward pass: `rows × c` values `x`, a
    /// gradient and a ReLU output from hashes; `[mean, invstd, gamma, beta]`
    /// (the values' statistics, parameters).
    fn backward_case(c: usize, rows: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, [Vec<f32>; 4]) {
        let x = hashed_values(rows * c, 1);
        let (mean, var) = channel_stats(&x, c);
        let invstd = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        let (dy, y) = (hashed_values(rows * c, 2), hashed_values(rows * c, 3));
        (x, dy, y, [mean, invstd, hashed_values(c, 4), hashed_values(c, 5)])
    }

    /// Without a mask, batch norm's backward is the masked one with every
    /// ReLU output positive; with one it zeroes the gradient where the
    /// output is not; recomputing the mask of the ReLU after the norm gives
    /// the stored output's.
    #[test]
    fn bn_backward_masks_where_the_relu_output_is_not_positive() {
        let c = 5;
        let (x, dy, y, [mean, invstd, gamma, beta]) = backward_case(c, 300);
        let backward = |dy: &[f32], mask| bn_backward::<f32>(&x, dy, mask, c, &mean, &invstd, &gamma, true);
        let plain = backward(&dy, ReluMask::None);
        let ones = vec![1f32; x.len()];
        let all = backward(&dy, ReluMask::Output(&ones));
        assert_eq!((bits(&plain.0), bits(&plain.1)), (bits(&all.0), bits(&all.1)));
        let masked_dy: Vec<f32> = dy
            .iter()
            .zip(&y)
            .map(|(d, y)| if *y > 0.0 { *d } else { 0.0 })
            .collect();
        let masked = backward(&dy, ReluMask::Output(&y));
        let direct = backward(&masked_dy, ReluMask::None);
        assert_eq!(bits(&masked.0), bits(&direct.0));
        assert_eq!(bits(&masked.1), bits(&direct.1));
        assert_ne!(bits(&masked.0), bits(&plain.0));
        // the ReLU right after the norm: its mask recomputed from x, the
        // same bits as with its stored output
        let map = ChannelAffine::new(&mean, &invstd, &gamma, &beta);
        let out = map.apply(&x, true);
        assert!(out.contains(&0.0) && out.iter().any(|v| *v > 0.0));
        let stored = backward(&dy, ReluMask::Output(&out));
        let recomputed = backward(&dy, ReluMask::AfterNorm(&map));
        for (a, b) in [
            (&stored.0, &recomputed.0),
            (&stored.1, &recomputed.1),
            (&stored.2, &recomputed.2),
        ] {
            assert_eq!(bits(a), bits(b));
        }
    }

    /// The input gradient written as bf16 is the f32 one rounded, value by
    /// value, with every mask; the parameter gradients are the same.
    #[test]
    fn bn_backward_in_bf16_is_the_f32_gradient_rounded() {
        let c = 6;
        let (x, dy, y, [mean, invstd, gamma, beta]) = backward_case(c, ROWS_PER_CHUNK + 7);
        let map = ChannelAffine::new(&mean, &invstd, &gamma, &beta);
        for mask in [ReluMask::None, ReluMask::Output(&y), ReluMask::AfterNorm(&map)] {
            let (dx, dg, db) = bn_backward::<f32>(&x, &dy, mask, c, &mean, &invstd, &gamma, true);
            let (dxb, dgb, dbb) = bn_backward::<u16>(&x, &dy, mask, c, &mean, &invstd, &gamma, true);
            let rounded: Vec<u16> = dx.iter().map(|v| super::super::bf16::round_bits(*v)).collect();
            assert_eq!(dxb, rounded, "{mask:?}");
            assert_eq!((bits(&dg), bits(&db)), (bits(&dgb), bits(&dbb)));
        }
    }

    /// One image's sums, 16 channels at a time, have the bits of the
    /// row-by-row pass (the same order per channel) on every family.
    #[test]
    fn image_sums_are_the_row_pass_sums() {
        for c in [3, 16, 32, 37, 128] {
            let map = hashed_values(200 * c, c as u32);
            let mut acc = PairSums::new(c);
            value_sums(&map, c, &mut acc);
            let (s, ss) = acc.finish();
            let want: Vec<u64> = s.iter().chain(&ss).map(|v| v.to_bits()).collect();
            same_on_every_family(|| {
                let mut out = vec![1.0; 2 * c];
                image_sums(&map, c, &mut out);
                let got: Vec<u64> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "c = {c}");
                got
            });
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
