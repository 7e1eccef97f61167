//! `exp` and `erf` for f32 loops: branch-free and inlined, so the softmax,
//! GELU and cross-entropy loops run without a libm call per element (and
//! vectorise where their sums allow). Accuracy is stated per function and
//! checked against f64 in the tests.

/// `e^x` within 2.5e-7 relative (about 2 ulp) for `x` in [−87.3, 88.7]
/// (Cephes' `expf`: `x = n·ln 2 + r` with |r| ≤ ln 2 / 2, a degree-7
/// polynomial for `e^r`, `2^n` from the exponent bits); 0 below −87.33
/// (where `e^x` would be subnormal), +∞ above 88.72, NaN for NaN.
#[inline]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LOW: f32 = -87.336_55;
    const HIGH: f32 = 88.722_84;
    let xc = x.clamp(LOW, HIGH);
    // Round to nearest by adding and removing 1.5·2²³ (no `floor`, which
    // is a libm call below SSE4.1 and would keep the loops scalar).
    const ROUND: f32 = 12_582_912.0;
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    // 2ⁿ as two normal powers of two (n runs from −126 to 128).
    let n = n as i32;
    let n1 = n >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = p * pow2(n1) * pow2(n - n1);
    if x < LOW {
        0.0
    } else if x > HIGH {
        f32::INFINITY
    } else {
        y
    }
}

/// `erf(x)` within 6e-7 absolute (Abramowitz & Stegun 7.1.26, whose own
/// error is 1.5e-7, evaluated in f32 with [`exp`]).
#[inline]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_its_stated_error_everywhere_it_is_finite() {
        let mut worst = 0f64;
        let n = 400_000;
        for i in 0..=n {
            let x = -87.3 + (88.7 + 87.3) * i as f32 / n as f32;
            let want = f64::from(x).exp();
            let rel = (f64::from(exp(x)) - want).abs() / want;
            worst = worst.max(rel);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        // the ends, and the values the softmax loops meet
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-90.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(88.7).is_finite() && exp(88.7) > 3.3e38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_is_within_its_stated_error() {
        let mut worst = 0f32;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let e = (erf(x) - candle_core::cpu::erf::erf_f32(x)).abs();
            worst = worst.max(e);
        }
        assert!(worst < 6e-7, "worst absolute error {worst}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }
}
