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
    let m = mask_values(n, 0, p, seed);
    Tensor::from_vec(m, shape, device)
}

/// Elements `[first, first + n)` of the mask of `seed`: element `j` is a
/// function of `(seed, j)` alone (chunk `j / 65536`, position `j % 65536`).
fn mask_values(n: usize, first: usize, p: f64, seed: u64) -> Vec<f32> {
    const STEP: u64 = 0x9E37_79B9_7F4A_7C15;
    let keep = 1.0 / (1.0 - p) as f32;
    let threshold = (p * (1u64 << 53) as f64) as u64;
    let mut m = vec![0f32; n];
    m.par_chunks_mut(65536).enumerate().for_each(|(ci, c)| {
        let start = first + ci * 65536;
        let base_of = |chunk: usize| crate::seed::splitmix64(seed ^ (chunk as u64).wrapping_mul(STEP));
        let (mut chunk, mut base) = (start / 65536, base_of(start / 65536));
        for (j, o) in (start..).zip(c.iter_mut()) {
            if j / 65536 != chunk {
                chunk = j / 65536;
                base = base_of(chunk);
            }
            let s = base.wrapping_add(((j % 65536) as u64 + 1).wrapping_mul(STEP));
            let r = crate::seed::splitmix64(s) >> 11;
            *o = if r < threshold { 0.0 } else { keep };
        }
    });
    m
}

/// `x` with dropout `p` applied using a mask from `seed`; `x` itself when `p == 0`.
///
/// # Errors
/// Tensor errors.
///
/// In a data-parallel step the mask is this process's part of the mask of
/// the whole batch (`x`'s outermost dimension is the batch, shards are
/// equal), so dropout does not depend on the number of processes.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let first = crate::dist::step_collective().map_or(0, |w| w.rank() * n);
    let m = Tensor::from_vec(mask_values(n, first, p, seed), x.dims(), x.device())?;
    x.mul(&m)
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
        // Any stretch of the mask, from any first element, is that stretch of the whole.
        for (first, n) in [(0, 10), (70_000, 20_000), (65_530, 12), (99_999, 1)] {
            assert_eq!(mask_values(n, first, 0.1, 42), m[first..first + n], "{first}+{n}");
        }
        Ok(())
    }

    #[test]
    fn the_mask_was_drawn_by_chunk_and_position_before_too() {
        // The former loop (a running state per chunk) gave these; resumed runs rely on it.
        const STEP: u64 = 0x9E37_79B9_7F4A_7C15;
        let (p, seed, n) = (0.3, 7u64, 140_000usize);
        let threshold = (p * (1u64 << 53) as f64) as u64;
        let keep = 1.0 / (1.0 - p) as f32;
        let mut want = Vec::with_capacity(n);
        for ci in 0..n.div_ceil(65536) {
            let mut s = crate::seed::splitmix64(seed ^ (ci as u64).wrapping_mul(STEP));
            for _ in 0..65536.min(n - ci * 65536) {
                s = s.wrapping_add(STEP);
                want.push(if crate::seed::splitmix64(s) >> 11 < threshold {
                    0.0
                } else {
                    keep
                });
            }
        }
        assert_eq!(mask_values(n, 0, p, seed), want);
    }
}
