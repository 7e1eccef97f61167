//! 2-D convolution over channels-last (NHWC) activations. On a thread whose
//! kernel family is AVX-512 the passes run the [`direct`] kernels: f32
//! products in f32; bf16 products in bf16 where the CPU has AVX512-BF16,
//! except a first layer's forward pass and weight gradient (fewer than 8
//! input channels), which run the direct f32 kernels. An input gradient into
//! fewer than 8 channels, every pass on other CPUs, and every pass under
//! `PRETEXT_DIRECT_CONV=0` (`=f32`: bf16 products only) run im2col + one
//! large matrix product per chunk of images, chunks in parallel on the rayon
//! pool (`im2col_*`, described below).
//!
//! Weights keep PyTorch's `(out, in, kh, kw)` layout (and names); they are
//! rearranged to a `(kh·kw·in, out)` matrix per call, which is cheap.
//!
//! - forward: `Y (m, out) = col(X) (m, K) · Wk (K, out)`
//! - input gradient: `dcol (m, K) = dY (m, out) · Wkᵀ`, scattered back by col2im
//! - weight gradient: `dWk (K, out) = Σ_chunks col(X)ᵀ · dY`
//!
//! `m` counts output pixels of the chunk, `K = kh·kw·in`. A 1×1, stride-1,
//! unpadded convolution uses `X` itself as `col(X)`.
//!
//! The kernels, the graph nodes of the convolution and the transposed
//! convolution ([`conv2d_nhwc`], [`conv_transpose2d_nhwc`]) and their
//! `reference_*` twins through candle's NCHW ops.

use super::bf16::Precision;
use super::direct;
use super::fast_path;
use super::fused::{apply, apply_no_grad, FusedOp, Operand};
use super::gemm::{product, Mat};
use super::linear::{add_bias_in_place, bias_backward};
use super::vector::multiversion;
use candle_core::{bail, Shape, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    /// Per-thread im2col / col2im scratch, reused across calls (never read before written).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread scratch of im2col rounded to bf16 pairs (mixed precision).
    static PAIR_SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch buffer of at least `len` bf16 pairs (contents unspecified).
#[cfg(target_arch = "x86_64")]
fn with_pair_scratch<R>(len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    PAIR_SCRATCH.with(|s| {
        let mut buf = s.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        f(&mut buf[..len])
    })
}

/// Runs `f` with a scratch buffer of at least `len` floats (contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut buf = s.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    /// Images.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding (both directions).
    pub pad: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl ConvGeom {
    /// Geometry of a convolution; `None` if the kernel does not fit the padded input or stride is 0.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        o: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        pad: usize,
    ) -> Option<Self> {
        if stride == 0 || kh == 0 || kw == 0 || h + 2 * pad < kh || w + 2 * pad < kw {
            return None;
        }
        let oh = (h + 2 * pad - kh) / stride + 1;
        let ow = (w + 2 * pad - kw) / stride + 1;
        Some(Self {
            n,
            h,
            w,
            c,
            o,
            kh,
            kw,
            stride,
            pad,
            oh,
            ow,
        })
    }

    /// Rows of the weight matrix: `kh · kw · c`.
    pub fn k(&self) -> usize {
        self.kh * self.kw * self.c
    }

    /// Output pixels per image.
    pub fn out_pixels(&self) -> usize {
        self.oh * self.ow
    }

    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Images per work chunk: large enough for efficient products, small
    /// enough that the im2col buffer stays within a few MB, and at least two
    /// chunks per thread when the batch allows.
    fn images_per_chunk(&self) -> usize {
        let px = self.out_pixels().max(1);
        let want_rows = 4096usize;
        let max_rows = (4 << 20) / self.k().max(1); // ~16 MB of f32 im2col
        let by_rows = want_rows.div_ceil(px).max(1);
        let by_mem = (max_rows / px).max(1);
        let threads = rayon::current_num_threads().max(1);
        let by_par = self.n.div_ceil(2 * threads).max(1);
        by_rows.min(by_mem).min(by_par).max(1)
    }
}

/// `(o, c, kh, kw)` → `(kh·kw·c, o)` row-major.
pub fn weight_to_matrix(w: &[f32], g: &ConvGeom) -> Vec<f32> {
    let (o, c, kh, kw) = (g.o, g.c, g.kh, g.kw);
    let mut out = vec![0f32; g.k() * o];
    for oc in 0..o {
        for ic in 0..c {
            for ky in 0..kh {
                for kx in 0..kw {
                    out[((ky * kw + kx) * c + ic) * o + oc] = w[((oc * c + ic) * kh + ky) * kw + kx];
                }
            }
        }
    }
    out
}

/// `(kh·kw·c, o)` → `(o, c, kh, kw)`.
pub fn matrix_to_weight(m: &[f32], g: &ConvGeom) -> Vec<f32> {
    let (o, c, kh, kw) = (g.o, g.c, g.kh, g.kw);
    let mut out = vec![0f32; m.len()];
    for oc in 0..o {
        for ic in 0..c {
            for ky in 0..kh {
                for kx in 0..kw {
                    out[((oc * c + ic) * kh + ky) * kw + kx] = m[((ky * kw + kx) * c + ic) * o + oc];
                }
            }
        }
    }
    out
}

/// im2col of `imgs` images (NHWC, `x` starts at the first) into `col` (`imgs·oh·ow × K`).
fn im2col(x: &[f32], g: &ConvGeom, imgs: usize, col: &mut [f32]) {
    for (r, row) in col.chunks_mut(g.k()).take(imgs * g.oh * g.ow).enumerate() {
        im2col_row(x, g, r, row);
    }
}

/// Where row `r` of a chunk's im2col matrix reads: its image's offset in
/// the chunk's input and its output pixel.
#[derive(Clone, Copy)]
struct RowOrigin {
    image: usize,
    oy: usize,
    ox: usize,
}

impl RowOrigin {
    /// Row `r` (image `r / (oh·ow)`, output pixel `r % (oh·ow)`).
    fn of(g: &ConvGeom, r: usize) -> Self {
        let (i, px) = (r / (g.oh * g.ow), r % (g.oh * g.ow));
        Self {
            image: i * g.h * g.w * g.c,
            oy: px / g.ow,
            ox: px % g.ow,
        }
    }

    /// The offset of tap `(ky, kx)`'s `c` input values in the chunk's input,
    /// `None` where the tap falls in the zero padding.
    fn tap(self, g: &ConvGeom, ky: usize, kx: usize) -> Option<usize> {
        let iy = (self.oy * g.stride + ky) as isize - g.pad as isize;
        let ix = (self.ox * g.stride + kx) as isize - g.pad as isize;
        let inside = iy >= 0 && ix >= 0 && iy < g.h as isize && ix < g.w as isize;
        inside.then(|| self.image + ((iy as usize) * g.w + ix as usize) * g.c)
    }
}

/// Calls `f(t, at)` for each tap `t = ky·kw + kx` of row `r` of the im2col
/// matrix of `x` (NHWC, from the chunk's first image), `at` as
/// [`RowOrigin::tap`] gives it.
fn taps(g: &ConvGeom, r: usize, mut f: impl FnMut(usize, Option<usize>)) {
    let origin = RowOrigin::of(g, r);
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            f(ky * g.kw + kx, origin.tap(g, ky, kx));
        }
    }
}

/// Row `r` of the im2col matrix of `x` (see [`taps`]) into `row` (K).
fn im2col_row(x: &[f32], g: &ConvGeom, r: usize, row: &mut [f32]) {
    let c = g.c;
    taps(g, r, |t, at| {
        let dst = &mut row[t * c..(t + 1) * c];
        match at {
            Some(s) => dst.copy_from_slice(&x[s..s + c]),
            None => dst.fill(0.0),
        }
    });
}

/// Row `r` of the im2col matrix of `x` rounded to bf16 pairs in `dst`
/// (`⌈K/2⌉`): with an even channel count straight from `x`, tap by tap;
/// otherwise through `row` (K floats).
#[cfg(target_arch = "x86_64")]
fn im2col_row_pairs(x: &[f32], g: &ConvGeom, r: usize, row: &mut [f32], dst: &mut [u32]) {
    use super::bf16::row_to_pairs;
    let c = g.c;
    if c % 2 == 1 {
        im2col_row(x, g, r, row);
        row_to_pairs(row, dst);
        return;
    }
    let half = c / 2;
    taps(g, r, |t, at| {
        let d = &mut dst[t * half..(t + 1) * half];
        match at {
            Some(s) => row_to_pairs(&x[s..s + c], d),
            None => d.fill(0),
        }
    });
}

/// Rows `2p` and `2p + 1` of the im2col matrix of `x`, rounded to bf16 and
/// interleaved (row `2p` low) into `dst` (K); a row past `rows`, and the
/// zero padding, count as zeros (`zeros`: `c` of them).
#[cfg(target_arch = "x86_64")]
fn im2col_pair_of_rows(x: &[f32], g: &ConvGeom, p: usize, rows: usize, zeros: &[f32], dst: &mut [u32]) {
    use super::bf16::interleave_pairs;
    let c = g.c;
    let even = RowOrigin::of(g, 2 * p);
    let odd = (2 * p + 1 < rows).then(|| RowOrigin::of(g, 2 * p + 1));
    let slice = |at: Option<usize>| at.map_or(zeros, |s| &x[s..s + c]);
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let t = ky * g.kw + kx;
            let odd_values = odd.map(|o| slice(o.tap(g, ky, kx)));
            interleave_pairs(slice(even.tap(g, ky, kx)), odd_values, &mut dst[t * c..(t + 1) * c]);
        }
    }
}

multiversion! {
    /// Adds `dcol` (`imgs·oh·ow × K`) back into `dx` (NHWC, zeroed by the
    /// caller); its channel runs are added with the widest vectors the CPU has.
    fn col2im_add(dcol: &[f32], g: &ConvGeom, imgs: usize, dx: &mut [f32]) {
        col2im_add_body(dcol, g, imgs, dx);
    }
}

#[inline(always)]
fn col2im_add_body(dcol: &[f32], g: &ConvGeom, imgs: usize, dx: &mut [f32]) {
    let (h, w, c) = (g.h, g.w, g.c);
    let k = g.k();
    let img_len = h * w * c;
    for i in 0..imgs {
        let di = &mut dx[i * img_len..(i + 1) * img_len];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let row = &dcol[((i * g.oh + oy) * g.ow + ox) * k..][..k];
                for ky in 0..g.kh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..g.kw {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let s = ((iy as usize) * w + ix as usize) * c;
                        let src = &row[(ky * g.kw + kx) * c..][..c];
                        for (d, v) in di[s..s + c].iter_mut().zip(src) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

/// Which of a convolution's three passes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ConvPass {
    Forward,
    InputGradient,
    WeightGradient,
}

/// The [`direct`] kernels' products for pass `pass` of convolution `g` at
/// product precision `prec`, `None` for the im2col path.
///
/// On an AVX-512 thread f32 products run direct, and so do bf16 products
/// with AVX512-BF16, except a first layer's forward and weight gradient
/// (fewer than 8 input channels): there bf16 pairs of channels would be
/// mostly padding, and the direct f32 kernels are 3-5× faster than either
/// bf16 path. An input gradient into fewer than 8 channels (a VAE
/// decoder's 1-channel output) stays on im2col: most of the direct
/// kernel's 16 lanes would be padding.
///
/// `PRETEXT_DIRECT_CONV=0` keeps every pass on im2col, `=f32` keeps bf16
/// products on im2col (for comparisons).
fn direct_for(prec: Precision, g: &ConvGeom, pass: ConvPass) -> Option<Precision> {
    static SETTING: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let setting = SETTING.get_or_init(|| std::env::var("PRETEXT_DIRECT_CONV").unwrap_or_default());
    if setting == "0" || !direct::available() || (pass == ConvPass::InputGradient && g.c < 8) {
        return None;
    }
    if prec.effective() == Precision::F32 {
        return Some(Precision::F32);
    }
    let first_layer = g.c < 8;
    match pass {
        ConvPass::Forward | ConvPass::WeightGradient if first_layer => Some(Precision::F32),
        _ if setting != "f32" && direct::available_bf16() => Some(Precision::Bf16),
        _ => None,
    }
}

/// The [`direct`] kernels where they apply (see the module doc); else [`im2col_forward`].
pub fn conv2d_forward(x: &[f32], weight: &[f32], g: &ConvGeom) -> Vec<f32> {
    match direct_for(Precision::current(), g, ConvPass::Forward) {
        Some(prec) => direct::forward(x, weight, g, prec),
        None => im2col_forward(x, weight, g),
    }
}

/// [`conv2d_forward`] and the per-channel mean and biased variance of its
/// output (batch norm's statistics, [`super::norm::channel_stats`]). The
/// [`direct`] kernels sum each image's output map as soon as it is written,
/// while it is in cache, instead of reading the whole output again; images'
/// sums are added in image order, so the result does not depend on the
/// threads.
pub fn conv2d_forward_with_stats(x: &[f32], weight: &[f32], g: &ConvGeom) -> (Vec<f32>, (Vec<f32>, Vec<f32>)) {
    use super::norm::{channel_stats, image_sums, stats_from_image_sums};
    match direct_for(Precision::current(), g, ConvPass::Forward) {
        Some(prec) => {
            let o = g.o;
            let mut sums = vec![0f64; g.n * 2 * o];
            let sum = |map: &[f32], out: &mut [f64]| image_sums(map, o, out);
            let hook = direct::ImageHook {
                len: 2 * o,
                out: &mut sums,
                f: &sum,
            };
            let y = direct::forward_with(x, weight, g, prec, Some(hook));
            let stats = stats_from_image_sums(&sums, o, g.n * g.out_pixels());
            (y, stats)
        }
        None => {
            let y = im2col_forward(x, weight, g);
            let stats = channel_stats(&y, g.o);
            (y, stats)
        }
    }
}

/// [`conv2d_forward`] through im2col and a matrix product per chunk of images.
pub fn im2col_forward(x: &[f32], weight: &[f32], g: &ConvGeom) -> Vec<f32> {
    let prec = Precision::current();
    let wk = weight_to_matrix(weight, g);
    let (k, o, px) = (g.k(), g.o, g.out_pixels());
    let in_len = g.h * g.w * g.c;
    let ipc = g.images_per_chunk();
    let mut out = vec![0f32; g.n * px * o];
    out.par_chunks_mut(ipc * px * o).enumerate().for_each(|(ci, yc)| {
        let imgs = yc.len() / (px * o);
        let rows = imgs * px;
        let xc = &x[ci * ipc * in_len..(ci * ipc + imgs) * in_len];
        let (am, bm, cm) = (Mat::row_major(rows, k), Mat::row_major(k, o), Mat::row_major(rows, o));
        if g.pointwise() {
            product(prec, xc, am, &wk, bm, yc, cm, false, 1);
        } else if prec.effective() == Precision::Bf16 {
            // im2col straight into bf16 pairs, row by row: the f32 im2col
            // matrix is never written, nor read again to be packed.
            #[cfg(target_arch = "x86_64")]
            {
                use super::bf16::{gemm_bf16_pairs, ROW_BLOCK};
                let kp = k.div_ceil(2);
                with_pair_scratch(rows.div_ceil(ROW_BLOCK) * ROW_BLOCK * kp, |pairs| {
                    let mut row = vec![0f32; k];
                    for (r, dst) in pairs.chunks_mut(kp).enumerate() {
                        if r < rows {
                            im2col_row_pairs(xc, g, r, &mut row, dst);
                        } else {
                            dst.fill(0); // the last row block's padding
                        }
                    }
                    gemm_bf16_pairs(pairs, kp, (rows, k), &wk, bm, yc, cm, false, 1);
                });
            }
        } else {
            with_scratch(rows * k, |col| {
                im2col(xc, g, imgs, col);
                product(prec, col, am, &wk, bm, yc, cm, false, 1);
            });
        }
    });
    out
}

/// Input gradient: `dy` NHWC `(n, oh, ow, o)`, `weight` `(o, c, kh, kw)` → `dx` `(n, h, w, c)`.
///
/// The [`direct`] kernels where they apply (see the module doc); else [`im2col_backward_input`].
pub fn conv2d_backward_input(dy: &[f32], weight: &[f32], g: &ConvGeom) -> Vec<f32> {
    match direct_for(Precision::current(), g, ConvPass::InputGradient) {
        Some(prec) => direct::backward_input(direct::Map::F32(dy), weight, g, prec),
        None => im2col_backward_input(dy, weight, g),
    }
}

/// [`conv2d_backward_input`] added to `dx` (NHWC `(n, h, w, c)`, e.g. the
/// gradient another branch already sent to the same input): each value
/// becomes `dx + gradient`. The [`direct`] kernels add in the pass that
/// computes the gradient, the other paths in a pass after it.
///
/// # Panics
/// If `dx` does not hold `n·h·w·c` values.
pub fn conv2d_backward_input_add(dy: &[f32], weight: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    assert_eq!(
        dx.len(),
        g.n * g.h * g.w * g.c,
        "conv2d_backward_input_add: dx has the wrong length"
    );
    match direct_for(Precision::current(), g, ConvPass::InputGradient) {
        Some(prec) => direct::backward_input_add(direct::Map::F32(dy), weight, g, prec, dx),
        None => {
            let d = im2col_backward_input(dy, weight, g);
            dx.par_chunks_mut(1 << 16)
                .zip(d.par_chunks(1 << 16))
                .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        }
    }
}

/// Whether the gradient at `g`'s output may be handed to its backward passes
/// already rounded to bf16 ([`direct::Map::Bf16`]): both its input and its
/// weight gradient run on the direct bf16 kernels, which round it to the
/// same bits anyway, and its channel count is even.
pub fn takes_bf16_gradient(g: &ConvGeom) -> bool {
    let prec = Precision::current();
    g.o.is_multiple_of(2)
        && direct_for(prec, g, ConvPass::InputGradient) == Some(Precision::Bf16)
        && direct_for(prec, g, ConvPass::WeightGradient) == Some(Precision::Bf16)
}

/// [`conv2d_backward_weight`] of an output gradient given as bf16 bits.
///
/// # Panics
/// Unless [`takes_bf16_gradient`] holds for `g`.
pub fn conv2d_backward_weight_bf16(x: &[f32], dy: &[u16], g: &ConvGeom) -> Vec<f32> {
    assert!(takes_bf16_gradient(g), "a bf16 gradient needs the direct bf16 kernels");
    direct::backward_weight(x, direct::Map::Bf16(dy), g, Precision::Bf16)
}

/// [`conv2d_backward_input`] of an output gradient given as bf16 bits.
///
/// # Panics
/// Unless [`takes_bf16_gradient`] holds for `g`.
pub fn conv2d_backward_input_bf16(dy: &[u16], weight: &[f32], g: &ConvGeom) -> Vec<f32> {
    assert!(takes_bf16_gradient(g), "a bf16 gradient needs the direct bf16 kernels");
    direct::backward_input(direct::Map::Bf16(dy), weight, g, Precision::Bf16)
}

/// [`conv2d_backward_input_add`] of an output gradient given as bf16 bits.
///
/// # Panics
/// Unless [`takes_bf16_gradient`] holds for `g`; a `dx` of the wrong length.
pub fn conv2d_backward_input_bf16_add(dy: &[u16], weight: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    assert!(takes_bf16_gradient(g), "a bf16 gradient needs the direct bf16 kernels");
    direct::backward_input_add(direct::Map::Bf16(dy), weight, g, Precision::Bf16, dx);
}

/// [`conv2d_backward_input`] through a matrix product and col2im per chunk of images.
pub fn im2col_backward_input(dy: &[f32], weight: &[f32], g: &ConvGeom) -> Vec<f32> {
    let prec = Precision::current();
    let wk = weight_to_matrix(weight, g);
    let (k, o, px) = (g.k(), g.o, g.out_pixels());
    let in_len = g.h * g.w * g.c;
    let ipc = g.images_per_chunk();
    let mut dx = vec![0f32; g.n * in_len];
    dx.par_chunks_mut(ipc * in_len).enumerate().for_each(|(ci, dxc)| {
        let imgs = dxc.len() / in_len;
        let rows = imgs * px;
        let dyc = &dy[ci * ipc * px * o..(ci * ipc + imgs) * px * o];
        let (am, bm, cm) = (
            Mat::row_major(rows, o),
            Mat::row_major(k, o).t(),
            Mat::row_major(rows, k),
        );
        if g.pointwise() {
            product(prec, dyc, am, &wk, bm, dxc, cm, false, 1);
        } else {
            with_scratch(rows * k, |dcol| {
                product(prec, dyc, am, &wk, bm, dcol, cm, false, 1);
                col2im_add(dcol, g, imgs, dxc);
            });
        }
    });
    dx
}

/// Weight gradient: `x` NHWC, `dy` NHWC → `dw` `(o, c, kh, kw)`.
///
/// The [`direct`] kernels where they apply (see the module doc); else [`im2col_backward_weight`].
pub fn conv2d_backward_weight(x: &[f32], dy: &[f32], g: &ConvGeom) -> Vec<f32> {
    match direct_for(Precision::current(), g, ConvPass::WeightGradient) {
        Some(prec) => direct::backward_weight(x, direct::Map::F32(dy), g, prec),
        None => im2col_backward_weight(x, dy, g),
    }
}

/// [`conv2d_backward_weight`] through im2col and a matrix product per chunk
/// of images.
///
/// The chunks' products are accumulated in a fixed number of groups of
/// consecutive chunks, and the groups added in order, so the result is the
/// same from run to run (a work-stealing reduction would group the partial
/// sums differently each time).
pub fn im2col_backward_weight(x: &[f32], dy: &[f32], g: &ConvGeom) -> Vec<f32> {
    let prec = Precision::current();
    let (k, o, px) = (g.k(), g.o, g.out_pixels());
    let in_len = g.h * g.w * g.c;
    let ipc = g.images_per_chunk();
    let chunks = g.n.div_ceil(ipc);
    let groups = chunks.min(2 * rayon::current_num_threads()).max(1);
    let per_group = chunks.div_ceil(groups);
    let parts: Vec<Vec<f32>> = (0..groups)
        .into_par_iter()
        .map(|gi| {
            let mut acc = vec![0f32; k * o];
            for ci in gi * per_group..((gi + 1) * per_group).min(chunks) {
                let first = ci * ipc;
                let imgs = ipc.min(g.n - first);
                let rows = imgs * px;
                let xc = &x[first * in_len..(first + imgs) * in_len];
                let dyc = &dy[first * px * o..(first + imgs) * px * o];
                let (am, bm, cm) = (
                    Mat::row_major(rows, k).t(),
                    Mat::row_major(rows, o),
                    Mat::row_major(k, o),
                );
                if g.pointwise() {
                    product(prec, xc, am, dyc, bm, &mut acc, cm, true, 1);
                } else if prec.effective() == Precision::Bf16 {
                    // im2col straight into bf16 pairs of consecutive
                    // pixels (the product's `k`), K values per pair.
                    #[cfg(target_arch = "x86_64")]
                    {
                        use super::bf16::{gemm_bf16_pairs_by_k, ROW_BLOCK};
                        let lda = k.div_ceil(ROW_BLOCK) * ROW_BLOCK;
                        with_pair_scratch(rows.div_ceil(2) * lda, |pairs| {
                            let zeros = vec![0f32; g.c];
                            for (p, dst) in pairs.chunks_mut(lda).enumerate() {
                                im2col_pair_of_rows(xc, g, p, rows, &zeros, &mut dst[..k]);
                                dst[k..].fill(0); // the last row block's padding
                            }
                            gemm_bf16_pairs_by_k(pairs, lda, (k, rows), dyc, bm, &mut acc, cm, true, 1);
                        });
                    }
                } else {
                    with_scratch(rows * k, |col| {
                        im2col(xc, g, imgs, col);
                        product(prec, col, am, dyc, bm, &mut acc, cm, true, 1);
                    });
                }
            }
            acc
        })
        .collect();
    let mut dwk = vec![0f32; k * o];
    for p in &parts {
        for (a, b) in dwk.iter_mut().zip(p) {
            *a += b;
        }
    }
    matrix_to_weight(&dwk, g)
}

fn geom_of(x: &[usize], w: &[usize], stride: usize, pad: usize) -> candle_core::Result<ConvGeom> {
    let (&[n, h, wd, c], &[o, wc, kh, kw]) = (x, w) else {
        bail!("conv2d: expects x (n, h, w, c) and weight (o, c, kh, kw), got {x:?} and {w:?}")
    };
    if wc != c {
        bail!("conv2d: input has {c} channels, weight expects {wc}")
    }
    match ConvGeom::new(n, h, wd, c, o, kh, kw, stride, pad) {
        Some(g) => Ok(g),
        None => bail!("conv2d: kernel {kh}x{kw} does not fit input {h}x{wd} with padding {pad} (stride {stride})"),
    }
}

struct Conv2dOp {
    stride: usize,
    pad: usize,
}

impl FusedOp<2> for Conv2dOp {
    const NAME: &'static str = "pretext-conv2d-nhwc";

    fn forward(&self, [x, w]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let g = geom_of(x.dims, w.dims, self.stride, self.pad)?;
        Ok((conv2d_forward(x.data, w.data, &g), Shape::from((g.n, g.oh, g.ow, g.o))))
    }

    fn backward(&self, [x, w]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> candle_core::Result<[Option<Tensor>; 2]> {
        let grad = grad.contiguous()?;
        // The input of a first layer (a batch of images) needs no gradient:
        // skip the transposed product and the col2im for it.
        let dx = if x.track_op() {
            Some(apply_no_grad(
                [&grad, &w.contiguous()?],
                ConvBwdInput {
                    stride: self.stride,
                    pad: self.pad,
                    x_dims: x.dims().to_vec(),
                },
            )?)
        } else {
            None
        };
        let dw = apply_no_grad(
            [&x.contiguous()?, &grad],
            ConvBwdWeight {
                stride: self.stride,
                pad: self.pad,
                w_dims: w.dims().to_vec(),
            },
        )?;
        Ok([dx, Some(dw)])
    }
}

struct ConvBwdInput {
    stride: usize,
    pad: usize,
    x_dims: Vec<usize>,
}

impl FusedOp<2> for ConvBwdInput {
    const NAME: &'static str = "pretext-conv2d-nhwc-bwd-input";

    fn forward(&self, [dy, w]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let g = geom_of(&self.x_dims, w.dims, self.stride, self.pad)?;
        Ok((
            conv2d_backward_input(dy.data, w.data, &g),
            Shape::from(self.x_dims.clone()),
        ))
    }
}

struct ConvBwdWeight {
    stride: usize,
    pad: usize,
    w_dims: Vec<usize>,
}

impl FusedOp<2> for ConvBwdWeight {
    const NAME: &'static str = "pretext-conv2d-nhwc-bwd-weight";

    fn forward(&self, [x, dy]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let g = geom_of(x.dims, &self.w_dims, self.stride, self.pad)?;
        Ok((
            conv2d_backward_weight(x.data, dy.data, &g),
            Shape::from(self.w_dims.clone()),
        ))
    }
}

/// 2-D convolution of channels-last `x` `(n, h, w, c)` with PyTorch-layout
/// `weight` `(o, c, kh, kw)`, no bias → `(n, oh, ow, o)`.
///
/// # Errors
/// Shapes that do not fit.
pub fn conv2d_nhwc(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    if fast_path(&[x, weight]) {
        apply([&x.contiguous()?, &weight.contiguous()?], Conv2dOp { stride, pad })
    } else {
        reference_conv2d_nhwc(x, weight, stride, pad)
    }
}

/// [`conv2d_nhwc`] through candle's `conv2d` (NCHW), for other devices and as a test reference.
///
/// # Errors
/// Shapes that do not fit.
pub fn reference_conv2d_nhwc(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    x.permute((0, 3, 1, 2))?
        .contiguous()?
        .conv2d(weight, pad, stride, 1, 1)?
        .permute((0, 2, 3, 1))?
        .contiguous()
}

/// Geometry of a transposed convolution as the convolution it transposes:
/// `x` `(n, h, w, cin)` is that convolution's output, `weight` `(cin, cout, kh, kw)`.
fn transpose_geom(
    x: &[usize],
    w: &[usize],
    stride: usize,
    pad: usize,
    out_pad: usize,
) -> candle_core::Result<ConvGeom> {
    let (&[n, h, wd, c], &[wc, o, kh, kw]) = (x, w) else {
        bail!("conv_transpose2d: expects x (n, h, w, c) and weight (c, o, kh, kw), got {x:?} and {w:?}")
    };
    if wc != c {
        bail!("conv_transpose2d: input has {c} channels, weight expects {wc}")
    }
    if h == 0 || wd == 0 || out_pad >= stride.max(1) || (h - 1) * stride + kh + out_pad < 2 * pad + 1 {
        bail!("conv_transpose2d: invalid geometry (input {h}x{wd}, kernel {kh}x{kw}, stride {stride}, padding {pad}, output padding {out_pad})")
    }
    let oh = (h - 1) * stride + kh + out_pad - 2 * pad;
    let ow = (wd - 1) * stride + kw + out_pad - 2 * pad;
    match ConvGeom::new(n, oh, ow, o, c, kh, kw, stride, pad) {
        Some(g) if g.oh == h && g.ow == wd => Ok(g),
        _ => bail!("conv_transpose2d: no convolution maps {oh}x{ow} back to {h}x{wd}"),
    }
}

struct ConvTranspose2dOp {
    stride: usize,
    pad: usize,
    out_pad: usize,
}

impl FusedOp<2> for ConvTranspose2dOp {
    const NAME: &'static str = "pretext-conv-transpose2d-nhwc";

    fn forward(&self, [x, w]: [Operand<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let g = transpose_geom(x.dims, w.dims, self.stride, self.pad, self.out_pad)?;
        // The forward of a transposed convolution is the input gradient of the convolution.
        Ok((
            conv2d_backward_input(x.data, w.data, &g),
            Shape::from((g.n, g.h, g.w, g.c)),
        ))
    }

    fn backward(&self, [x, w]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> candle_core::Result<[Option<Tensor>; 2]> {
        let grad = grad.contiguous()?;
        // dx: the convolution's forward on the output gradient; dw: its weight gradient.
        let dx = apply_no_grad(
            [&grad, &w.contiguous()?],
            Conv2dOp {
                stride: self.stride,
                pad: self.pad,
            },
        )?;
        let dw = apply_no_grad(
            [&grad, &x.contiguous()?],
            ConvBwdWeight {
                stride: self.stride,
                pad: self.pad,
                w_dims: w.dims().to_vec(),
            },
        )?;
        Ok([Some(dx), Some(dw)])
    }
}

/// Transposed 2-D convolution (`torch.nn.ConvTranspose2d`) of channels-last
/// `x` `(n, h, w, cin)` with `weight` `(cin, cout, kh, kw)` (PyTorch's layout),
/// no bias → `(n, (h-1)·stride - 2·pad + kh + out_pad, …, cout)`.
///
/// # Errors
/// Shapes that do not fit.
pub fn conv_transpose2d_nhwc(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    pad: usize,
    out_pad: usize,
) -> candle_core::Result<Tensor> {
    if fast_path(&[x, weight]) {
        apply(
            [&x.contiguous()?, &weight.contiguous()?],
            ConvTranspose2dOp { stride, pad, out_pad },
        )
    } else {
        reference_conv_transpose2d_nhwc(x, weight, stride, pad, out_pad)
    }
}

/// [`conv_transpose2d_nhwc`] through candle's `conv_transpose2d` (NCHW).
///
/// # Errors
/// Shapes that do not fit.
pub fn reference_conv_transpose2d_nhwc(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    pad: usize,
    out_pad: usize,
) -> candle_core::Result<Tensor> {
    x.permute((0, 3, 1, 2))?
        .contiguous()?
        .conv_transpose2d(weight, pad, out_pad, stride, 1)?
        .permute((0, 2, 3, 1))?
        .contiguous()
}

/// A convolution node (`Conv2dOp`, `ConvTranspose2dOp`) with its bias, and
/// ReLU with `relu`, as one node: the bias is added to the convolution's
/// output in place, and the backward pass hands the bias's gradient to the
/// convolution's directly. As two nodes the bias pass wrote a second map,
/// and candle summed the convolution's output gradient into a zeroed map
/// of its own.
struct WithBias<T> {
    conv: T,
    relu: bool,
}

impl<T: FusedOp<2>> FusedOp<3> for WithBias<T> {
    const NAME: &'static str = "pretext-conv-bias";

    fn name(&self) -> &'static str {
        if self.relu {
            "pretext-conv-bias-relu"
        } else {
            Self::NAME
        }
    }

    fn forward(&self, [x, w, b]: [Operand<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (mut y, shape) = self.conv.forward([x, w])?;
        if b.dims.len() != 1 || shape.dims().last() != Some(&b.data.len()) {
            bail!(
                "{}: the bias {:?} does not fit the output {:?}",
                self.name(),
                b.dims,
                shape.dims()
            );
        }
        add_bias_in_place(&mut y, b.data, self.relu);
        Ok((y, shape))
    }

    fn backward(&self, [x, w, _]: [&Tensor; 3], y: &Tensor, dy: &Tensor) -> candle_core::Result<[Option<Tensor>; 3]> {
        let (g, db) = bias_backward(y, dy, self.relu)?;
        let [dx, dw] = self.conv.backward([x, w], y, &g)?;
        Ok([dx, dw, Some(db)])
    }
}

/// The node of `conv` with its bias (then ReLU with `relu`) over contiguous operands.
fn with_bias<T: FusedOp<2>>(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    conv: T,
    relu: bool,
) -> candle_core::Result<Tensor> {
    apply(
        [&x.contiguous()?, &weight.contiguous()?, &bias.contiguous()?],
        WithBias { conv, relu },
    )
}

/// `y + bias` (`bias` `(c)` over the last dimension), then ReLU with `relu`,
/// through candle's ops: the other devices' path of the fused nodes.
fn reference_bias(y: Tensor, bias: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
    let y = y.broadcast_add(bias)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// [`conv2d_nhwc`] plus a per-channel `bias` `(o)`, then ReLU with `relu`:
/// one graph node on CPU f32, candle's ops elsewhere.
///
/// # Errors
/// Shapes that do not fit.
pub fn conv2d_bias_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: usize,
    relu: bool,
) -> candle_core::Result<Tensor> {
    if fast_path(&[x, weight, bias]) {
        with_bias(x, weight, bias, Conv2dOp { stride, pad }, relu)
    } else {
        reference_bias(reference_conv2d_nhwc(x, weight, stride, pad)?, bias, relu)
    }
}

/// [`conv_transpose2d_nhwc`] plus a per-channel `bias` `(cout)`, then ReLU
/// with `relu`: one graph node on CPU f32, candle's ops elsewhere.
///
/// # Errors
/// Shapes that do not fit.
pub fn conv_transpose2d_bias_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    (stride, pad, out_pad): (usize, usize, usize),
    relu: bool,
) -> candle_core::Result<Tensor> {
    if fast_path(&[x, weight, bias]) {
        with_bias(x, weight, bias, ConvTranspose2dOp { stride, pad, out_pad }, relu)
    } else {
        let y = reference_conv_transpose2d_nhwc(x, weight, stride, pad, out_pad)?;
        reference_bias(y, bias, relu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution with its statistics gives the plain convolution's
    /// bits, and the statistics of that output (summed per image, on the
    /// direct kernels, or over it afterwards) on every path and precision.
    #[test]
    fn forward_with_stats_is_the_forward_and_its_channel_stats() {
        use crate::cpu::KernelSet;
        use crate::ops::norm::channel_stats;
        use crate::ops::testing::{bits, hashed_values};
        use crate::ops::vector::with_kernels;
        // 9 images: chunks of several images and a ragged one; the stem and two trunk layers
        for (c, o, k, s, p) in [(1, 32, 3, 1, 1), (32, 32, 3, 1, 1), (32, 64, 1, 2, 0)] {
            let g = ConvGeom::new(9, 14, 14, c, o, k, k, s, p).expect("geometry");
            let x = hashed_values(g.n * g.h * g.w * c, 1);
            let w: Vec<f32> = hashed_values(o * c * k * k, 2).iter().map(|v| v * 0.05).collect();
            for set in [KernelSet::Avx512, KernelSet::Portable] {
                if !set.is_available() {
                    continue;
                }
                for prec in [Precision::F32, Precision::Bf16] {
                    let (y, (mean, var)) = with_kernels(set, || prec.scope(|| conv2d_forward_with_stats(&x, &w, &g)));
                    let plain = with_kernels(set, || prec.scope(|| conv2d_forward(&x, &w, &g)));
                    assert_eq!(bits(&y), bits(&plain), "{set:?} {prec:?} {g:?}");
                    let (m0, v0) = channel_stats(&plain, o);
                    for j in 0..o {
                        assert!(
                            (mean[j] - m0[j]).abs() <= 1e-5 * (1.0 + m0[j].abs()),
                            "mean {j}: {} vs {}",
                            mean[j],
                            m0[j]
                        );
                        assert!(
                            (var[j] - v0[j]).abs() <= 1e-5 * v0[j],
                            "var {j}: {} vs {}",
                            var[j],
                            v0[j]
                        );
                    }
                    assert!(var.iter().all(|v| *v > 0.0));
                }
            }
        }
    }

    #[test]
    fn col2im_agrees_across_kernel_families() {
        use crate::ops::testing::{bits, hashed_values, same_on_every_family};
        // channel runs shorter and longer than a vector, strides, padding
        for (c, stride, pad) in [(3, 1, 1), (32, 2, 1), (19, 1, 0)] {
            let g = ConvGeom::new(2, 7, 6, c, 4, 3, 3, stride, pad).expect("geometry");
            let dcol = hashed_values(g.n * g.oh * g.ow * g.k(), c as u32);
            same_on_every_family(|| {
                let mut dx = vec![0f32; g.n * g.h * g.w * c];
                col2im_add(&dcol, &g, g.n, &mut dx);
                bits(&dx)
            });
        }
    }

    /// In bf16 the forward pass and the weight gradient build their
    /// operand from `x` directly (rows of pairs; pairs of pixels); the result
    /// must be that of the f32 im2col matrix given to the bf16 product, bit
    /// for bit, for odd and even channel counts, padding, strides and an odd
    /// number of pixels per chunk.
    #[test]
    fn bf16_convolutions_equal_the_bf16_product_of_the_im2col_matrix() {
        if Precision::Bf16.effective() != Precision::Bf16 {
            eprintln!("skipped: {}", Precision::Bf16.describe());
            return;
        }
        for &(n, h, c, o, k, stride, pad) in &[(3, 7, 1, 8, 3, 1, 1), (2, 9, 6, 5, 3, 2, 1), (2, 5, 3, 4, 3, 1, 0)] {
            let g = ConvGeom::new(n, h, h, c, o, k, k, stride, pad).expect("geometry");
            let x: Vec<f32> = (0..n * h * h * c)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.031)
                .collect();
            let wt: Vec<f32> = (0..o * c * k * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.07)
                .collect();
            let px = g.out_pixels();
            let dy: Vec<f32> = (0..n * px * o).map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.05).collect();
            // the im2col path's (the direct kernels' bf16 results are checked
            // against it in `direct`'s tests)
            let (y, dw) = Precision::Bf16.scope(|| (im2col_forward(&x, &wt, &g), im2col_backward_weight(&x, &dy, &g)));
            // the same products from the whole f32 im2col matrix
            let (rows, kk) = (n * px, g.k());
            let mut col = vec![0f32; rows * kk];
            im2col(&x, &g, n, &mut col);
            let wk = weight_to_matrix(&wt, &g);
            let mut y_ref = vec![0f32; rows * o];
            let chunk = g.images_per_chunk() * px;
            for (ci, yc) in y_ref.chunks_mut(chunk * o).enumerate() {
                let r = yc.len() / o;
                let cc = &col[ci * chunk * kk..(ci * chunk + r) * kk];
                product(
                    Precision::Bf16,
                    cc,
                    Mat::row_major(r, kk),
                    &wk,
                    Mat::row_major(kk, o),
                    yc,
                    Mat::row_major(r, o),
                    false,
                    1,
                );
            }
            assert_eq!(y, y_ref, "forward {n}x{h}x{h}x{c} -> {o}, {k}x{k} s{stride} p{pad}");
            // the weight gradient's chunks, grouped and added as it does
            let ipc = g.images_per_chunk();
            let chunks = n.div_ceil(ipc);
            let groups = chunks.min(2 * rayon::current_num_threads()).max(1);
            let per_group = chunks.div_ceil(groups);
            let mut dwk = vec![0f32; kk * o];
            for gi in 0..groups {
                let mut acc = vec![0f32; kk * o];
                for ci in gi * per_group..((gi + 1) * per_group).min(chunks) {
                    let (first, imgs) = (ci * ipc, ipc.min(n - ci * ipc));
                    let r = imgs * px;
                    let cc = &col[first * px * kk..(first * px + r) * kk];
                    let dc = &dy[first * px * o..(first * px + r) * o];
                    let (am, bm, cm) = (Mat::row_major(r, kk).t(), Mat::row_major(r, o), Mat::row_major(kk, o));
                    product(Precision::Bf16, cc, am, dc, bm, &mut acc, cm, true, 1);
                }
                dwk.iter_mut().zip(&acc).for_each(|(d, a)| *d += a);
            }
            assert_eq!(
                dw,
                matrix_to_weight(&dwk, &g),
                "weight gradient {n}x{h}x{h}x{c} -> {o}, {k}x{k} s{stride} p{pad}"
            );
        }
    }

    /// Direct 7-loop convolution, NHWC in/out, OIHW weights.
    fn naive(x: &[f32], wt: &[f32], g: &ConvGeom) -> Vec<f32> {
        let mut y = vec![0f32; g.n * g.oh * g.ow * g.o];
        for n in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for oc in 0..g.o {
                        let mut s = 0f32;
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                for ic in 0..g.c {
                                    s += x[((n * g.h + iy as usize) * g.w + ix as usize) * g.c + ic]
                                        * wt[((oc * g.c + ic) * g.kh + ky) * g.kw + kx];
                                }
                            }
                        }
                        y[((n * g.oh + oy) * g.ow + ox) * g.o + oc] = s;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn weight_gradient_is_reproducible_on_a_busy_pool() {
        // many chunks over four threads: a work-stealing reduction would group them differently run to run
        let g = ConvGeom::new(64, 14, 14, 8, 16, 3, 3, 1, 1).expect("geom");
        let x: Vec<f32> = (0..g.n * g.h * g.w * g.c)
            .map(|i| ((i * 7919) % 997) as f32 / 97.0 - 5.0)
            .collect();
        let dy: Vec<f32> = (0..g.n * g.out_pixels() * g.o)
            .map(|i| ((i * 104_729) % 991) as f32 / 89.0 - 5.5)
            .collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().expect("pool");
        let first = pool.install(|| conv2d_backward_weight(&x, &dy, &g));
        for _ in 0..20 {
            let again = pool.install(|| conv2d_backward_weight(&x, &dy, &g));
            assert!(first.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        // and it is the gradient: one weight against the direct sum
        let (oc, ic, ky, kx) = (3, 5, 0, 2);
        let mut want = 0f64;
        for n in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let (iy, ix) = (oy as isize + ky as isize - 1, ox as isize + kx as isize - 1);
                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                        continue;
                    }
                    let xv = x[((n * g.h + iy as usize) * g.w + ix as usize) * g.c + ic];
                    want += f64::from(xv) * f64::from(dy[((n * g.oh + oy) * g.ow + ox) * g.o + oc]);
                }
            }
        }
        let got = first[((oc * g.c + ic) * g.kh + ky) * g.kw + kx];
        assert!(
            (f64::from(got) - want).abs() < 1e-3 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }

    #[test]
    fn forward_matches_naive_loops() {
        for &(n, h, w, c, o, k, s, p) in &[
            (3, 5, 6, 2, 4, 3, 1, 1),
            (2, 7, 7, 3, 5, 3, 2, 1),
            (4, 4, 4, 3, 2, 1, 1, 0),
            (1, 5, 5, 2, 3, 1, 2, 0),
        ] {
            let g = ConvGeom::new(n, h, w, c, o, k, k, s, p).expect("geom");
            let x: Vec<f32> = (0..n * h * w * c)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let wt: Vec<f32> = (0..o * c * k * k)
                .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
                .collect();
            let y = conv2d_forward(&x, &wt, &g);
            let r = naive(&x, &wt, &g);
            for (a, b) in y.iter().zip(&r) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
            assert_eq!(matrix_to_weight(&weight_to_matrix(&wt, &g), &g), wt);
        }
    }
}
