//! Shared helpers of the ops' tests.

use candle_core::{Device, Tensor, Var};

/// A tensor of `shape` with values uniform in [-2, 2) from a SplitMix64 stream of `seed`.
pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = crate::seed::splitmix64(s);
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// `max |a - b|` over all elements.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

/// Forward values and the input gradient of `Σ w ⊙ f(x)` of the fused op
/// equal those of candle's composed ops, within `tol`.
pub fn check_against_reference(
    fused: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    reference: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    shape: &[usize],
    tol: f32,
) -> candle_core::Result<()> {
    let x = Var::from_tensor(&rand(shape, 1))?;
    let w = rand(shape, 2);
    let a = fused(x.as_tensor())?;
    let b = reference(x.as_tensor())?;
    assert!(max_diff(&a, &b) < tol, "forward differs by {}", max_diff(&a, &b));
    let ga = (a * &w)?.sum_all()?.backward()?;
    let gb = (b * &w)?.sum_all()?.backward()?;
    let (ga, gb) = (
        ga.get(x.as_tensor()).expect("grad"),
        gb.get(x.as_tensor()).expect("grad"),
    );
    assert!(max_diff(ga, gb) < tol, "gradient differs by {}", max_diff(ga, gb));
    Ok(())
}

/// Asserts that every kernel family this CPU can run gives `f`'s result
/// exactly as the portable one does (`f` runs on the test's thread, where
/// [`crate::ops::vector::with_kernels`] forces the family).
pub fn same_on_every_family<T: PartialEq + std::fmt::Debug>(f: impl Fn() -> T) {
    use crate::cpu::KernelSet;
    use crate::ops::vector::with_kernels;
    let reference = with_kernels(KernelSet::Portable, &f);
    for set in KernelSet::ALL.into_iter().filter(|s| s.is_available()) {
        assert_eq!(
            with_kernels(set, &f),
            reference,
            "the {set} kernels differ from the portable ones"
        );
    }
}

/// The bit patterns of `v` (exact comparisons that tell −0 from 0).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `n` zeros as the output operand of a kernel that writes `MaybeUninit` values.
pub fn out_buffer(n: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    vec![std::mem::MaybeUninit::new(0.0); n]
}

/// The values of an [`out_buffer`].
pub fn out_values(v: &[std::mem::MaybeUninit<f32>]) -> Vec<f32> {
    // SAFETY: an `out_buffer` starts initialised and kernels only write values.
    v.iter().map(|x| unsafe { x.assume_init() }).collect()
}

/// `n` values in [−10, 10) from a hash of their index and `seed`.
pub fn hashed_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (h % 20_001) as f32 / 1000.0 - 10.0
        })
        .collect()
}
