//! Row kernels of the element-wise passes (softmax, log-sum-exp, GELU),
//! compiled once per [`KernelSet`] and chosen at run time.
//!
//! Each kernel is written once, over arrays of [`LANES`] values, and compiled
//! three times: for AVX-512F, for AVX2 + FMA and for plain x86-64 (or any
//! other target). Written this way the compiler turns the loops (with the
//! branch-free [`fastmath`](super::fastmath) `exp` and `erf` inlined) into
//! vector code of the widest registers the family has, where the plain loops
//! stayed scalar: the maximum and the sums are carried in `LANES` partial
//! values, which a scalar loop must not reorder.
//!
//! The order of every sum is fixed by the lane arrays, not by the
//! instruction set, and no multiply-add is contracted, so the three
//! compilations give **bit-identical** results (the tests check it with
//! `PRETEXT_KERNELS`-style forcing through [`with_kernels`]). Batch norm's
//! and ReLU's passes are compiled the same way, with the macro defined here,
//! next to their graph nodes.

use super::fastmath::{erf, exp};
use crate::cpu::KernelSet;

/// Partial sums (and maxima) carried per row: one 512-bit register of f32.
pub const LANES: usize = 16;

thread_local! {
    static FORCED: std::cell::Cell<Option<KernelSet>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with this thread's row kernels forced to `set` (the tests
/// compare the families with it; the process-wide choice is
/// [`KernelSet::current`], which `PRETEXT_KERNELS` sets). It holds on the
/// calling thread only: kernels `f` hands to rayon's workers run the
/// process's family. A set this CPU cannot run is replaced by the widest it
/// can.
pub fn with_kernels<R>(set: KernelSet, f: impl FnOnce() -> R) -> R {
    let set = if set.is_available() { set } else { KernelSet::widest() };
    let old = FORCED.with(|c| c.replace(Some(set)));
    let out = f();
    FORCED.with(|c| c.set(old));
    out
}

/// The family this thread's row kernels run.
pub(crate) fn active() -> KernelSet {
    FORCED.with(std::cell::Cell::get).unwrap_or_else(KernelSet::current)
}

/// Defines `fn $name` from one body, compiled for each [`KernelSet`] and
/// dispatched on the thread's family (the other element-wise passes of
/// `ops` — batch norm, ReLU — use it too).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            match $crate::ops::vector::active() {
                // SAFETY: `active` returns a family only where
                // `KernelSet::is_available` detected its instruction sets.
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::KernelSet::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::KernelSet::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

/// The largest value of `x` (−∞ when empty; NaNs are skipped).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

/// The lanes' partial sums added in a fixed order.
#[inline(always)]
fn total(acc: [f32; LANES], tail: f32) -> f32 {
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    s + tail
}

/// `y[i] = e^(x[i] − m)` and their sum.
#[inline(always)]
fn exp_shifted(x: &[f32], y: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let n = x.len().min(y.len());
    let split = n - n % LANES;
    for (yc, xc) in y[..split].chunks_exact_mut(LANES).zip(x[..split].chunks_exact(LANES)) {
        for j in 0..LANES {
            yc[j] = exp(xc[j] - m);
            acc[j] += yc[j];
        }
    }
    let mut tail = 0f32;
    for (o, &v) in y[split..n].iter_mut().zip(&x[split..n]) {
        *o = exp(v - m);
        tail += *o;
    }
    total(acc, tail)
}

/// `y[i] *= s`.
#[inline(always)]
fn scale(y: &mut [f32], s: f32) {
    for v in y {
        *v *= s;
    }
}

/// `Σ a[i]·b[i]` over lanes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len());
    let split = n - n % LANES;
    for (ac, bc) in a[..split].chunks_exact(LANES).zip(b[..split].chunks_exact(LANES)) {
        for j in 0..LANES {
            acc[j] += ac[j] * bc[j];
        }
    }
    let mut tail = 0f32;
    for (x, y) in a[split..n].iter().zip(&b[split..n]) {
        tail += x * y;
    }
    total(acc, tail)
}

multiversion! {
    /// Softmax of each row of `w` values of `x` into `y`.
    pub fn softmax_rows(x: &[f32], y: &mut [f32], w: usize) {
        for (yr, xr) in y.chunks_mut(w.max(1)).zip(x.chunks(w.max(1))) {
            let m = max_of(xr);
            let sum = exp_shifted(xr, yr, m);
            scale(yr, 1.0 / sum);
        }
    }
}

multiversion! {
    /// Softmax in place of each row of `bias.len()` values of `s` after
    /// `s·scale + bias` (attention's scores with their key mask).
    pub fn scaled_softmax_rows(s: &mut [f32], scale_by: f32, bias: &[f32]) {
        let w = bias.len().max(1);
        let mut tmp = vec![0f32; w];
        for row in s.chunks_mut(w) {
            for (t, (&v, &b)) in tmp.iter_mut().zip(row.iter().zip(bias)) {
                *t = v * scale_by + b;
            }
            let n = row.len();
            let m = max_of(&tmp[..n]);
            let sum = exp_shifted(&tmp[..n], row, m);
            scale(row, 1.0 / sum);
        }
    }
}

multiversion! {
    /// Softmax's backward pass in place, row by row: `dp ← p·(dp − Σ p·dp)·scale_by`.
    pub fn softmax_backward_rows(dp: &mut [f32], p: &[f32], w: usize, scale_by: f32) {
        for (dr, pr) in dp.chunks_mut(w.max(1)).zip(p.chunks(w.max(1))) {
            let d = dot(dr, pr);
            for (g, &q) in dr.iter_mut().zip(pr) {
                *g = q * (*g - d) * scale_by;
            }
        }
    }
}

multiversion! {
    /// `(max, Σ e^(x − max))` of one row: its log-sum-exp is `max + ln(sum)`.
    pub fn max_and_exp_sum(x: &[f32]) -> (f32, f32) {
        let m = max_of(x);
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                acc[j] += exp(c[j] - m);
            }
        }
        let mut tail = 0f32;
        for &v in chunks.remainder() {
            tail += exp(v - m);
        }
        (m, total(acc, tail))
    }
}

multiversion! {
    /// Cross-entropy's backward pass for one row of logits `x` and its
    /// `target`: `d = (softmax(x) − onehot(target))·g`.
    pub fn softmax_minus_onehot(x: &[f32], d: &mut [f32], target: usize, g: f32) {
        let m = max_of(x);
        let sum = exp_shifted(x, d, m);
        scale(d, g / sum);
        if let Some(v) = d.get_mut(target) {
            *v -= g;
        }
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

multiversion! {
    /// Exact GELU, `y = x·Φ(x) = ½x(1 + erf(x/√2))`.
    pub fn gelu(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    /// GELU's backward pass: `dx = dy·(Φ(x) + x·φ(x))`.
    pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let c = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            *o = g * (0.5 * (1.0 + erf(v * FRAC_1_SQRT_2)) + v * c * exp(-0.5 * v * v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{bits, hashed_values, same_on_every_family};

    #[test]
    fn softmax_rows_match_f64_and_agree_across_families() {
        // widths below, at and around the lane count, and a long row
        for w in [1, 5, 16, 17, 128, 8000] {
            let x = hashed_values(3 * w, w as u32);
            let mut y = vec![0f32; x.len()];
            softmax_rows(&x, &mut y, w);
            for (yr, xr) in y.chunks(w).zip(x.chunks(w)) {
                let m = xr.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
                let z: f64 = xr.iter().map(|&v| (f64::from(v) - m).exp()).sum();
                for (&p, &v) in yr.iter().zip(xr) {
                    let want = (f64::from(v) - m).exp() / z;
                    assert!(
                        (f64::from(p) - want).abs() <= 1e-6 * want + 1e-12,
                        "w={w}: {p} vs {want}"
                    );
                }
            }
            same_on_every_family(|| {
                let mut y = vec![0f32; x.len()];
                softmax_rows(&x, &mut y, w);
                bits(&y)
            });
        }
    }

    #[test]
    fn scaled_softmax_is_softmax_of_the_scaled_biased_scores() {
        let w = 37;
        let s0 = hashed_values(4 * w, 3);
        let bias: Vec<f32> = (0..w).map(|i| if i % 7 == 3 { -1e9 } else { 0.0 }).collect();
        let mut s = s0.clone();
        scaled_softmax_rows(&mut s, 0.25, &bias);
        let shifted: Vec<f32> = s0.iter().enumerate().map(|(i, v)| v * 0.25 + bias[i % w]).collect();
        let mut want = vec![0f32; s0.len()];
        softmax_rows(&shifted, &mut want, w);
        assert_eq!(bits(&s), bits(&want));
        // masked keys get no weight, every row sums to one
        for row in s.chunks(w) {
            assert_eq!(row[3], 0.0);
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        same_on_every_family(|| {
            let mut s = s0.clone();
            scaled_softmax_rows(&mut s, 0.25, &bias);
            bits(&s)
        });
    }

    #[test]
    fn softmax_backward_matches_its_formula() {
        let w = 21;
        let p = hashed_values(2 * w, 5);
        let g = hashed_values(2 * w, 6);
        let mut d = g.clone();
        softmax_backward_rows(&mut d, &p, w, 0.5);
        for r in 0..2 {
            let (pr, gr) = (&p[r * w..(r + 1) * w], &g[r * w..(r + 1) * w]);
            let dot: f64 = pr.iter().zip(gr).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            for i in 0..w {
                let want = f64::from(pr[i]) * (f64::from(gr[i]) - dot) * 0.5;
                let got = f64::from(d[r * w + i]);
                assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{got} vs {want}");
            }
        }
        same_on_every_family(|| {
            let mut d = g.clone();
            softmax_backward_rows(&mut d, &p, w, 0.5);
            bits(&d)
        });
    }

    #[test]
    fn log_sum_exp_and_its_gradient_match_f64() {
        for w in [3, 16, 100, 8000] {
            let x = hashed_values(w, 9 + w as u32);
            let (m, s) = max_and_exp_sum(&x);
            let lse = f64::from(m) + f64::from(s).ln();
            let mx = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
            let want = mx + x.iter().map(|&v| (f64::from(v) - mx).exp()).sum::<f64>().ln();
            assert!((lse - want).abs() < 1e-5, "w={w}: {lse} vs {want}");
            let t = w / 2;
            let mut d = vec![0f32; w];
            softmax_minus_onehot(&x, &mut d, t, 0.5);
            for (i, &v) in d.iter().enumerate() {
                let p = (f64::from(x[i]) - want).exp();
                let want_d = 0.5 * (p - if i == t { 1.0 } else { 0.0 });
                assert!((f64::from(v) - want_d).abs() < 1e-6, "w={w} i={i}: {v} vs {want_d}");
            }
            same_on_every_family(|| {
                let mut d = vec![0f32; w];
                softmax_minus_onehot(&x, &mut d, t, 0.5);
                (max_and_exp_sum(&x).1.to_bits(), bits(&d))
            });
        }
    }

    #[test]
    fn gelu_gradient_matches_a_finite_difference_and_families_agree() {
        let x = hashed_values(1000, 11);
        let dy = hashed_values(1000, 12);
        let mut y = vec![0f32; x.len()];
        let mut dx = vec![0f32; x.len()];
        gelu(&x, &mut y);
        gelu_backward(&x, &dy, &mut dx);
        // std has no f64 erf: the gradient is checked against a central
        // difference of the forward kernel (h = 1e-3) and the forward against
        // GELU's limits; `activation`'s `gelu_matches_candle` checks the
        // forward against candle's `gelu_erf`.
        for i in 0..x.len() {
            let v = f64::from(x[i]);
            let h = 1e-3;
            let f = |u: f64| {
                let mut o = [0f32];
                gelu(&[u as f32], &mut o);
                f64::from(o[0])
            };
            let fd = (f(v + h) - f(v - h)) / (2.0 * h);
            assert!((f64::from(dx[i]) - f64::from(dy[i]) * fd).abs() < 2e-3 * (1.0 + f64::from(dy[i]).abs()));
            // GELU's limits: ≈ x for large x, ≈ 0 for very negative x
            if v > 6.0 {
                assert!((f64::from(y[i]) - v).abs() < 1e-5);
            }
            if v < -6.0 {
                assert!(y[i].abs() < 1e-5);
            }
        }
        same_on_every_family(|| {
            let mut y = vec![0f32; x.len()];
            let mut dx = vec![0f32; x.len()];
            gelu(&x, &mut y);
            gelu_backward(&x, &dy, &mut dx);
            (bits(&y), bits(&dx))
        });
    }
}
