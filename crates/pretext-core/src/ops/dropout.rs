//! Inverted dropout with masks that are a pure function of a seed, so a
//! resumed run drops the same units as the uninterrupted one.

use candle_core::Tensor;
use rayon::prelude::*;

/// An inverted-dropout mask of `shape`: each entry `0` with probability `p`,
/// else `1 / (1 - p)`, drawn from a SplitMix64 stream of `seed` (so masks are
/// a pure function of the seed: resumed runs drop the same units).
///
/// # Errors
/// Tensor errors.
pub fn dropout_mask(shape: &[usize], p: f64, seed: u64, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let keep = 1.0 / (1.0 - p) as f32;
    let threshold = (p * (1u64 << 53) as f64) as u64;
    let mut m = vec![0f32; n];
    m.par_chunks_mut(65536).enumerate().for_each(|(ci, c)| {
        let mut s = crate::seed::splitmix64(seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for o in c.iter_mut() {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let r = crate::seed::splitmix64(s) >> 11;
            *o = if r < threshold { 0.0 } else { keep };
        }
    });
    Tensor::from_vec(m, shape, device)
}

/// `x` with dropout `p` applied using a mask from `seed`; `x` itself when `p == 0`.
///
/// # Errors
/// Tensor errors.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    x.mul(&dropout_mask(x.dims(), p, seed, x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dropout_mask_rate_and_scale() -> candle_core::Result<()> {
        let m = dropout_mask(&[100_000], 0.1, 42, &Device::Cpu)?.to_vec1::<f32>()?;
        let zeros = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
        assert!((zeros - 0.1).abs() < 0.005, "dropped {zeros}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        let again = dropout_mask(&[100_000], 0.1, 42, &Device::Cpu)?.to_vec1::<f32>()?;
        assert_eq!(m, again, "same seed, same mask");
        let other = dropout_mask(&[100_000], 0.1, 43, &Device::Cpu)?.to_vec1::<f32>()?;
        assert_ne!(m, other);
        Ok(())
    }
}
