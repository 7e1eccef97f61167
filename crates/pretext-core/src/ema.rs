//! Exponential moving average of one set of parameters into another
//! (MoCo's key encoder, mean-teacher style twins).

use crate::{Error, Result};
use candle_nn::VarMap;
use std::collections::HashMap;

/// `target = momentum * target + (1 - momentum) * source`, parameter by parameter, by name.
///
/// Both maps must hold the same names with the same shapes; `target` is
/// never seen by an optimizer.
///
/// # Errors
/// [`Error::Config`] listing names present in one map and not the other, or a shape mismatch.
pub fn ema_update(target: &VarMap, source: &VarMap, momentum: f64) -> Result<()> {
    ema_update_from(target, crate::init::named_vars(source), momentum)
}

/// [`ema_update`] from named variables: `source` holds exactly the target's
/// names (BYOL's online network without its predictor, say).
///
/// # Errors
/// As [`ema_update`].
pub fn ema_update_from(target: &VarMap, source: Vec<(String, candle_core::Var)>, momentum: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::Config(format!("EMA momentum {momentum} must lie in [0, 1]")));
    }
    let src: HashMap<String, candle_core::Var> = source.into_iter().collect();
    let dst = crate::init::named_vars(target);
    let missing: Vec<&String> = dst.iter().map(|(n, _)| n).filter(|n| !src.contains_key(*n)).collect();
    if !missing.is_empty() || src.len() != dst.len() {
        let extra: Vec<&String> = src.keys().filter(|k| !dst.iter().any(|(n, _)| n == *k)).collect();
        return Err(Error::Config(format!(
            "EMA: parameter sets differ (only in target: {missing:?}, only in source: {extra:?})"
        )));
    }
    for (name, t) in dst {
        let s = &src[&name];
        if s.dims() != t.dims() {
            return Err(Error::Config(format!(
                "EMA: {name} has shape {:?} in the target and {:?} in the source",
                t.dims(),
                s.dims()
            )));
        }
        if !blend_in_place(t.as_tensor(), s.as_tensor(), momentum)? {
            let new = ((t.as_tensor().detach() * momentum)? + (s.as_tensor().detach() * (1.0 - momentum))?)?;
            t.set(&new)?;
        }
    }
    Ok(())
}

/// `t = t·m + s·(1 − m)` in `t`'s own storage where both are contiguous f32
/// on the CPU, with the tensor path's exact arithmetic (`(t·m + 0) +
/// (s·(1−m) + 0)` in f32) — the weight average of a training step with no
/// new tensor and no copy back into the variable; `false` elsewhere, for
/// the caller's composed ops.
fn blend_in_place(t: &candle_core::Tensor, s: &candle_core::Tensor, momentum: f64) -> Result<bool> {
    use crate::ops::fused::borrowed;
    // The base of each tensor's f32 storage: one shared by both (a
    // variable averaged with itself) takes the caller's path, which
    // refuses it, instead of writing a storage this function reads.
    let base = |x: &candle_core::Tensor| match &*x.storage_and_layout().0 {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => Some(v.as_ptr()),
        _ => None,
    };
    if t.elem_count() != s.elem_count() || borrowed(t).is_none() || base(t) == base(s) {
        return Ok(false);
    }
    let Some(sv) = borrowed(s) else {
        return Ok(false);
    };
    let op = BlendInPlace {
        s: &sv,
        keep: momentum as f32,
        take: (1.0 - momentum) as f32,
    };
    t.inplace_op1(&op)?;
    Ok(true)
}

/// [`blend_in_place`]'s op on the target.
struct BlendInPlace<'a> {
    s: &'a [f32],
    keep: f32,
    take: f32,
}

impl candle_core::InplaceOp1 for BlendInPlace<'_> {
    fn name(&self) -> &'static str {
        "pretext-ema"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let target = crate::ops::fused::in_place_values(storage, layout, "EMA: the target")?;
        let (m, r) = (self.keep, self.take);
        target
            .par_chunks_mut(1 << 15)
            .zip(self.s.par_chunks(1 << 15))
            .for_each(|(t, s)| {
                for (t, s) in t.iter_mut().zip(s) {
                    *t = (*t * m + 0.0) + (s * r + 0.0);
                }
            });
        Ok(())
    }
}

/// Copies every parameter of `source` into `target` (by name), e.g. to start
/// a key encoder equal to the query encoder. Values are copied, not shared.
///
/// # Errors
/// As [`ema_update`].
pub fn copy_params(target: &VarMap, source: &VarMap) -> Result<()> {
    ema_update(target, source, 0.0)
}

/// MoCo's / BYOL's momentum schedule: from `base` at step 0 up to 1 at
/// `total`, following `1 - (1 - base) * (cos(pi * step / total) + 1) / 2`.
pub fn cosine_momentum(step: u64, total: u64, base: f64) -> f64 {
    if total == 0 || step >= total {
        return 1.0;
    }
    let p = step as f64 / total as f64;
    1.0 - (1.0 - base) * ((std::f64::consts::PI * p).cos() + 1.0) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::Init;

    fn map_with(name: &str, vals: &[f32]) -> Result<VarMap> {
        let m = VarMap::new();
        let v = m.get(vals.len(), name, Init::Const(0.0), DType::F32, &Device::Cpu)?;
        let _ = v;
        let mut m2 = m.clone();
        m2.set_one(name, Tensor::new(vals, &Device::Cpu)?)?;
        Ok(m)
    }

    #[test]
    fn blend_in_place_is_bit_identical_to_the_tensor_formula() -> Result<()> {
        let n: usize = 100_003; // several parallel blocks, the last one partial
        let tv: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1009) as f32 / 37.0 - 13.0).collect();
        let mut sv: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 997) as f32 / 41.0 - 12.0).collect();
        sv[5] = -0.0;
        let (t, s) = (
            Tensor::new(tv.as_slice(), &Device::Cpu)?,
            Tensor::new(sv.as_slice(), &Device::Cpu)?,
        );
        for m in [0.0, 0.5, 0.999, 1.0] {
            let formula = ((&t * m)? + (&s * (1.0 - m))?)?;
            // a fresh copy of `t` blended in place; `t` itself untouched
            let fused = t.copy()?;
            assert!(blend_in_place(&fused, &s, m)?, "contiguous f32 on the CPU");
            let (a, b) = (fused.to_vec1::<f32>()?, formula.to_vec1::<f32>()?);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "momentum {m}"
            );
            assert_eq!(s.to_vec1::<f32>()?, sv, "the source is untouched");
        }
        assert!(!blend_in_place(&t.to_dtype(DType::F64)?, &s, 0.5)?);
        assert_eq!(t.to_vec1::<f32>()?, tv);
        Ok(())
    }

    #[test]
    fn ema_update_matches_formula() -> Result<()> {
        let target = map_with("w", &[1.0, 2.0, 3.0])?;
        let source = map_with("w", &[3.0, 2.0, -1.0])?;
        ema_update(&target, &source, 0.9)?;
        let t = crate::init::named_tensors(&target);
        let v = t[0].1.to_vec1::<f32>()?;
        let want = [0.9 * 1.0 + 0.1 * 3.0, 2.0, 0.9 * 3.0 - 0.1];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
        // the source is untouched
        assert_eq!(
            crate::init::named_tensors(&source)[0].1.to_vec1::<f32>()?,
            vec![3.0, 2.0, -1.0]
        );
        Ok(())
    }

    #[test]
    fn copy_params_copies_not_shares() -> Result<()> {
        let target = map_with("w", &[0.0, 0.0])?;
        let mut source = map_with("w", &[5.0, 6.0])?;
        copy_params(&target, &source)?;
        source.set_one("w", Tensor::new(&[7.0f32, 7.0], &Device::Cpu)?)?;
        assert_eq!(
            crate::init::named_tensors(&target)[0].1.to_vec1::<f32>()?,
            vec![5.0, 6.0]
        );
        Ok(())
    }

    /// A tensor averaged with itself (one storage) is not blended in place,
    /// where the op would write the storage it reads.
    #[test]
    fn a_tensor_is_not_blended_with_itself_in_place() -> Result<()> {
        let t = Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?;
        assert!(!blend_in_place(&t, &t.clone(), 0.5)?);
        assert_eq!(t.to_vec1::<f32>()?, vec![1.0, 2.0]);
        Ok(())
    }

    #[test]
    fn ema_rejects_mismatched_maps() -> Result<()> {
        let target = map_with("a", &[0.0])?;
        let source = map_with("b", &[0.0])?;
        let err = ema_update(&target, &source, 0.5).expect_err("names differ");
        assert!(err.to_string().contains("\"a\""), "{err}");
        Ok(())
    }

    #[test]
    fn cosine_momentum_goes_to_one() {
        assert!((cosine_momentum(0, 100, 0.99) - 0.99).abs() < 1e-12);
        assert!((cosine_momentum(50, 100, 0.99) - 0.995).abs() < 1e-12);
        assert_eq!(cosine_momentum(100, 100, 0.99), 1.0);
    }
}
