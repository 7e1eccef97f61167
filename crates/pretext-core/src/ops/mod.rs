//! Fast CPU training ops, as candle custom ops with explicit backward passes
//! over contiguous buffers — candle-core's place in our split, as
//! [`crate::nn`] is candle-nn's.
//!
//! candle's own `conv2d` backward (a direct transposed-convolution loop for the
//! input gradient, a whole-map convolution for the weight gradient) and its
//! generic reductions over non-last dimensions make a ResNet training step
//! about 13× slower than PyTorch on CPU. Here activations are NHWC, so
//! convolutions run as [`direct`] register-tiled kernels on AVX-512 CPUs
//! (large matrix products over im2col buffers elsewhere) and batch normalisation reduces over the rows of a `(pixels,
//! channels)` matrix. Work is split over chunks of images on the rayon pool.
//!
//! One file per op family, each with its kernels, its graph nodes (written
//! once against [`fused::FusedOp`]) and its `reference_*` twins:
//! [`linear`], [`conv`] (with its [`direct`] kernels), [`norm`] (batch and layer norm), [`activation`]
//! (ReLU, GELU, softmax), [`pool`], [`attention`], [`dropout`], [`loss`]
//! (cross-entropy, Bernoulli log-likelihood) and [`layout`] (NHWC ↔ NCHW);
//! [`vector`] holds the row kernels of their element-wise passes, compiled
//! per instruction-set family.
//!
//! Every function takes and returns ordinary candle tensors. On a non-CPU
//! device or for a non-f32 dtype it falls back to candle's generic ops
//! (`reference_*`), which also serve as the numerical reference in tests.

pub mod activation;
pub mod attention;
pub mod bf16;
pub mod conv;
pub mod direct;
pub mod dropout;
pub mod fastmath;
pub mod fused;
pub mod gemm;
pub mod layout;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod vector;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

pub use activation::{add_relu, gelu, relu, softmax_last_dim};
pub use attention::{attention, reference_attention, Attention};
pub use conv::{conv2d_nhwc, conv_transpose2d_nhwc, reference_conv2d_nhwc, reference_conv_transpose2d_nhwc};
pub use dropout::{dropout, dropout_mask};
pub use layout::{nchw_to_nhwc, nhwc_to_nchw};
pub use linear::{add_bias, add_bias_relu, linear, reference_linear};
pub use loss::{bernoulli_log_lik, cross_entropy, reference_bernoulli_log_lik, softplus};
pub use norm::{batch_norm, layer_norm, reference_batch_norm, reference_layer_norm, BatchStats, NormStats};
pub use pool::{global_avg_pool_nhwc, max_pool2d_nhwc};

use candle_core::{DType, Tensor};

/// Whether every tensor is f32 on the CPU, where the fused kernels run.
pub fn fast_path(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Rows of `cols` values per parallel task of a row-wise pass that gives
/// each task about `elems` values (at least one row).
pub(crate) fn rows_per_task(cols: usize, elems: usize) -> usize {
    elems.div_ceil(cols.max(1)).max(1)
}

/// Values per task of the convolutional network's row-wise passes (bias,
/// column sums).
pub(crate) const CONV_TASK: usize = 1 << 15;

/// Values per task of the transformer's row-wise passes (softmax, layer norm).
pub(crate) const ROW_TASK: usize = 1 << 14;

/// A vector of `len` values that `write` fills, without zero-filling it
/// first: the passes that produce activations and gradients write every
/// value, and zeroing tens of megabytes per layer before that showed as 4%
/// of a training step.
///
/// `room` is spare capacity for values the caller appends afterwards.
///
/// # Safety
/// `write` must initialise every element of the slice it is given.
pub(crate) unsafe fn written_by<T>(
    len: usize,
    room: usize,
    write: impl FnOnce(&mut [std::mem::MaybeUninit<T>]),
) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len + room);
    write(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the first `len` values were written (the caller's contract).
    unsafe { v.set_len(len) };
    v
}

/// A new vector of `a.len()` values from `pass` over matching chunks of `a`
/// and `b` (`chunk` values each, the last one shorter), chunks in parallel
/// on the rayon pool: the shape of every two-operand element-wise pass.
///
/// # Safety
/// `pass` must write every element of the output chunk it is given.
///
/// # Panics
/// If `a` and `b` differ in length.
pub(crate) unsafe fn zip_map(
    a: &[f32],
    b: &[f32],
    chunk: usize,
    pass: impl Fn(&mut [std::mem::MaybeUninit<f32>], &[f32], &[f32]) + Send + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    assert_eq!(a.len(), b.len(), "element-wise pass: the operands' lengths differ");
    // SAFETY: the output chunks pair up with the operands' and `pass`
    // writes each in full (the caller's contract).
    unsafe {
        written_by(a.len(), 0, |y| {
            y.par_chunks_mut(chunk)
                .zip(a.par_chunks(chunk))
                .zip(b.par_chunks(chunk))
                .for_each(|((y, a), b)| pass(y, a, b));
        })
    }
}
