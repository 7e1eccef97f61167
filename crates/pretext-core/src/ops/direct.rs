//! Direct convolution over channels-last maps with AVX-512F: no im2col
//! matrix, no packed operands.
//!
//! [`conv`](super::conv) lowers a convolution to im2col and a `gemm` call
//! per chunk of images; for the small channel counts of the ResNet trunk and
//! the VAE (16–128) the product's packing and the im2col / col2im passes cost
//! a quarter of the step on top of the multiply-adds. Here the kernels read
//! the (zero-padded) input map and the weights where they lie:
//!
//! - **forward** ([`forward`]): a register tile of `P` output pixels of one
//!   output row × `NV` vectors of 16 output channels. For each tap and input
//!   channel, `NV` weight vectors are loaded and each pixel's input value is
//!   broadcast against them: `P·NV` multiply-adds per `NV + P` loads, all
//!   in registers (`P·NV ≤ 28`).
//! - **input gradient** ([`backward_input`], also the forward of a
//!   transposed convolution): the forward kernel run on the padded output
//!   gradient with the weights flipped and their channel axes swapped. For
//!   stride `s` the input pixels fall into `s²` classes by `(y mod s, x mod
//!   s)`; each class is a stride-1 convolution of the output gradient with
//!   the taps that reach it, written to every `s`-th pixel.
//! - **weight gradient** ([`backward_weight`]): for one kernel row `ky`, the
//!   window of `kw` taps × `c` channels is `kw·c` consecutive floats of the
//!   padded input at every output pixel, so a tile of `OT` output channels
//!   × `NV` vectors of that window accumulates `Σ_pixels dy[o] · window`:
//!   `OT·NV` multiply-adds per `NV + OT` loads. A window narrower than one
//!   vector (the 1-channel first layers) is tiled the other way round:
//!   `RT` window values × `NV` vectors of output channels.
//!
//! With bf16 products (`prec` = [`Precision::Bf16`], AVX512-BF16) the same
//! tiles run `vdpbf16ps`, which adds two products per lane: the forward pass
//! and the input gradient pair consecutive input channels (the padded map is
//! rounded to pairs once per chunk), the weight gradient pairs pixels `2q`
//! and `2q + 1` of an output row (windows and output gradient rounded and
//! interleaved once per chunk). Operands are rounded to nearest even, sums
//! stay f32, as in [`bf16`](super::bf16)'s product.
//!
//! Sums run over taps and channels in a fixed order, and the weight
//! gradient's chunks are added in a fixed order, so results do not depend on
//! the thread count. They differ from the im2col path's only by rounding
//! (another summation order).
//!
//! These kernels run where the thread's [`KernelSet`] is AVX-512; elsewhere
//! [`conv`](super::conv) keeps its im2col path.

use super::bf16::{bf16_kernels_available, Precision};
use super::conv::ConvGeom;
use super::vector::active;
use crate::cpu::KernelSet;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

thread_local! {
    /// Per-thread padded-map scratch, reused across calls.
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread scratch of the bf16 weight gradient's paired windows.
    static WINDOW_PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread scratch of the bf16 weight gradient's paired output gradient.
    static DY_PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `len` words of the thread's `scratch` (contents unspecified).
fn with_words<R>(
    scratch: &'static std::thread::LocalKey<RefCell<Vec<u32>>>,
    len: usize,
    f: impl FnOnce(&mut [u32]) -> R,
) -> R {
    scratch.with(|s| {
        let mut buf = s.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        f(&mut buf[..len])
    })
}

/// Whether the direct kernels run on this thread (its kernel family is AVX-512).
pub fn available() -> bool {
    cfg!(target_arch = "x86_64") && active() == KernelSet::Avx512
}

/// Whether the bf16 direct kernels run on this thread: [`available`] and AVX512-BF16.
pub fn available_bf16() -> bool {
    available() && bf16_kernels_available()
}

/// Accumulator registers a tile may use (of 32; the rest hold weights and broadcasts).
const TILE_REGS: usize = 28;

/// Partial sums of the weight gradient (groups of images), whatever the thread count.
const WEIGHT_GROUPS: usize = 8;

/// Output pixels per task of the forward and input-gradient passes.
const TASK_PIXELS: usize = 1024;

/// A convolution operand of NHWC values: f32, or already rounded to bf16
/// (the bits of [`super::bf16::round_bits`]), as the bf16 kernels would
/// round it — the same products from half the memory.
#[derive(Debug, Clone, Copy)]
pub enum Map<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values (bits).
    Bf16(&'a [u16]),
}

impl<'a> Map<'a> {
    /// Values `range`.
    fn slice(&self, range: std::ops::Range<usize>) -> Map<'a> {
        match *self {
            Map::F32(v) => Map::F32(&v[range]),
            Map::Bf16(v) => Map::Bf16(&v[range]),
        }
    }
}

/// A padded copy of part of a NHWC map: images of `hp × wp` pixels of `c`
/// words (floats, or bf16 pairs of channels). The scratch holding it has
/// slack after the last image, so that a tile's unused pixels may read
/// past the end (what they read is not stored).
struct Padded {
    hp: usize,
    wp: usize,
    c: usize,
}

impl Padded {
    /// The input of convolution `g` padded by `g.pad` (and on the bottom and
    /// right as far as the last window reaches), `c` words per pixel.
    fn around_input(g: &ConvGeom, c: usize) -> Self {
        Self {
            hp: (g.h + 2 * g.pad).max((g.oh - 1) * g.stride + g.kh),
            wp: (g.w + 2 * g.pad).max((g.ow - 1) * g.stride + g.kw),
            c,
        }
    }

    fn image_len(&self) -> usize {
        self.hp * self.wp * self.c
    }

    /// Copies images `x` (`h × w` pixels of `c` channels each, `imgs` of
    /// them) into `dst` with `top`/`left` zero rows/columns before and the
    /// rest of `hp × wp` after. Only the border is zeroed; each image row's
    /// `w·c` values go through `row` into its `w·self.c` words.
    #[allow(clippy::too_many_arguments)]
    fn fill_with<S>(
        &self,
        x: &[S],
        (h, w, c): (usize, usize, usize),
        (top, left): (usize, usize),
        imgs: usize,
        dst: &mut [f32],
        row: impl Fn(&[S], &mut [f32]),
    ) {
        let words = self.c;
        let (il, pl, stride) = (h * w * c, self.image_len(), self.wp * words);
        for i in 0..imgs {
            let img = &mut dst[i * pl..(i + 1) * pl];
            img[..top * stride].fill(0.0);
            img[(top + h) * stride..].fill(0.0);
            for y in 0..h {
                let r = &mut img[(top + y) * stride..][..stride];
                r[..left * words].fill(0.0);
                row(
                    &x[i * il + y * w * c..][..w * c],
                    &mut r[left * words..(left + w) * words],
                );
                r[(left + w) * words..].fill(0.0);
            }
        }
    }

    /// [`Padded::fill_with`] copying f32 values (`self.c = c`).
    fn fill(&self, x: &[f32], hw: (usize, usize), corner: (usize, usize), imgs: usize, dst: &mut [f32]) {
        let dims = (hw.0, hw.1, self.c);
        self.fill_with(x, dims, corner, imgs, dst, |src, body| body.copy_from_slice(src));
    }

    /// [`Padded::fill_with`] of a map as bf16 pairs: [`Padded::fill_pairs`]
    /// of f32 values; a copy of bf16 ones (an even `c`, so each pixel's
    /// values are its `c/2` pairs, low half first).
    fn fill_pairs_of(
        &self,
        x: Map<'_>,
        dims: (usize, usize, usize),
        corner: (usize, usize),
        imgs: usize,
        dst: &mut [f32],
    ) {
        match x {
            Map::F32(x) => self.fill_pairs(x, dims, corner, imgs, dst),
            Map::Bf16(x) => {
                assert!(dims.2.is_multiple_of(2), "a bf16 map needs an even channel count");
                self.fill_with(x, dims, corner, imgs, dst, |src, body| {
                    // SAFETY: u16 pairs and f32 words have the same size; any bits are valid.
                    let halves =
                        unsafe { std::slice::from_raw_parts_mut(body.as_mut_ptr().cast::<u16>(), 2 * body.len()) };
                    halves.copy_from_slice(src);
                });
            }
        }
    }

    /// [`Padded::fill_with`] rounding each pixel's `c` channels to `self.c =
    /// ⌈c/2⌉` bf16 pairs.
    fn fill_pairs(&self, x: &[f32], dims: (usize, usize, usize), corner: (usize, usize), imgs: usize, dst: &mut [f32]) {
        let (c, cp) = (dims.2, self.c);
        self.fill_with(x, dims, corner, imgs, dst, |src, body| {
            if c % 2 == 0 {
                pairs_into(src, body);
            } else {
                for (s, d) in src.chunks(c).zip(body.chunks_mut(cp)) {
                    pairs_into(s, d);
                }
            }
        });
    }
}

/// `src` rounded to bf16 pairs in `dst` (`⌈len/2⌉` words). Only the x86
/// kernels read them; elsewhere the direct kernels never run.
fn pairs_into(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: u32 and f32 have the same size and alignment, and every
        // bit pattern is valid for both.
        let words = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u32>(), dst.len()) };
        super::bf16::row_to_pairs(src, words);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (src, dst);
}

/// Where in `buf` (16 floats longer than needed) a 64-byte boundary
/// starts: with a multiple of 16 channels, every pixel's vectors are then
/// whole cache lines (a load that straddles two lines costs two).
fn aligned_start(buf: &[f32]) -> usize {
    buf.as_ptr().align_offset(64).min(16)
}

/// Runs `f` with a scratch buffer of `len` floats (contents unspecified)
/// that starts on a 64-byte boundary.
fn with_padded<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    PADDED.with(|s| {
        let mut buf = s.borrow_mut();
        if buf.len() < len + 16 {
            buf.resize(len + 16, 0.0);
        }
        let start = aligned_start(&buf);
        f(&mut buf[start..start + len])
    })
}

/// Zero-initialised values starting on a 64-byte boundary (a weight matrix
/// whose rows are whole cache lines).
struct Aligned {
    buf: Vec<f32>,
    start: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Self {
        let buf = vec![0f32; len + 16];
        let start = aligned_start(&buf);
        Self { buf, start }
    }

    fn values(&self) -> &[f32] {
        &self.buf[self.start..]
    }

    fn values_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..]
    }
}

/// Words per pixel of `c` channels: floats, or bf16 pairs with `bf16`.
fn words(c: usize, bf16: bool) -> usize {
    if bf16 {
        c.div_ceil(2)
    } else {
        c
    }
}

/// A weight matrix of `taps × rows` rows of `ld` floats, unchanged, or
/// with `bf16` as `taps × ⌈rows/2⌉` rows of pairs of consecutive rows
/// (a zero row after an odd count), each pair word held as the f32 with
/// its bits (the padded maps and weight matrices hold either kind of word).
fn in_words(m: Aligned, taps: usize, rows: usize, ld: usize, bf16: bool) -> Aligned {
    if !bf16 {
        return m;
    }
    let rp = rows.div_ceil(2);
    let (m, mut out) = (m.values(), Aligned::zeroed(taps * rp * ld));
    let word = |lo: f32, hi: f32| f32::from_bits(super::bf16::pair(lo, hi));
    for t in 0..taps {
        for k in 0..rp {
            let lo = &m[(t * rows + 2 * k) * ld..][..ld];
            let dst = &mut out.values_mut()[(t * rp + k) * ld..][..ld];
            if 2 * k + 1 < rows {
                let hi = &m[(t * rows + 2 * k + 1) * ld..][..ld];
                for ((d, &a), &b) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = word(a, b);
                }
            } else {
                for (d, &a) in dst.iter_mut().zip(lo) {
                    *d = word(a, 0.0);
                }
            }
        }
    }
    out
}

/// `rows` rows of `ow` pixels of `o` values as bf16 pairs of pixels
/// `(2q, 2q + 1)` (a zero pixel after an odd `ow`) in `out`: `rows × ⌈ow/2⌉
/// × o` words, every one written. f32 values are rounded; bf16 ones only
/// interleaved.
fn dy_row_pairs(dy: Map<'_>, rows: usize, ow: usize, o: usize, out: &mut [u32]) {
    let qw = ow.div_ceil(2);
    match dy {
        Map::F32(dy) =>
        {
            #[cfg(target_arch = "x86_64")]
            for r in 0..rows {
                let row = &dy[r * ow * o..][..ow * o];
                for q in 0..qw {
                    let even = &row[2 * q * o..][..o];
                    let odd = (2 * q + 1 < ow).then(|| &row[(2 * q + 1) * o..][..o]);
                    super::bf16::interleave_pairs(even, odd, &mut out[(r * qw + q) * o..][..o]);
                }
            }
        }
        Map::Bf16(dy) => {
            for r in 0..rows {
                let row = &dy[r * ow * o..][..ow * o];
                for q in 0..qw {
                    let dst = &mut out[(r * qw + q) * o..][..o];
                    let even = &row[2 * q * o..][..o];
                    match (2 * q + 1 < ow).then(|| &row[(2 * q + 1) * o..][..o]) {
                        Some(odd) => interleave_halves(dst, even, odd),
                        None => dst.iter_mut().zip(even).for_each(|(d, &e)| *d = u32::from(e)),
                    }
                }
            }
        }
    }
}

super::vector::multiversion! {
    /// `dst[j] = even[j] | odd[j] << 16`: two rows of bf16 bits as pairs.
    fn interleave_halves(dst: &mut [u32], even: &[u16], odd: &[u16]) {
        for ((d, &e), &h) in dst.iter_mut().zip(even).zip(odd) {
            *d = u32::from(e) | (u32::from(h) << 16);
        }
    }
}

/// The bf16 weight gradient's left operand: for every padded row `y` of
/// `imgs` padded images `xp` and every pair of output columns `(2q, 2q + 1)`,
/// the two pixels' windows (`kw·c` values from column `2q·s`, and from
/// `(2q + 1)·s`; zeros after an odd `ow`) rounded to bf16 and interleaved,
/// `ldw` words (zeros past `kw·c`): `imgs × hp × ⌈ow/2⌉ × ldw` words of
/// `out`, each row rounded once instead of once per block of output channels.
fn window_pairs(g: &ConvGeom, pad: &Padded, xp: &[f32], imgs: usize, ldw: usize, out: &mut [u32]) {
    let (win, qw, c) = (g.kw * g.c, g.ow.div_ceil(2), g.c);
    let row = pad.wp * c;
    #[cfg(target_arch = "x86_64")]
    for (r, dst) in out.chunks_mut(qw * ldw).take(imgs * pad.hp).enumerate() {
        let src = &xp[r * row..][..row];
        for q in 0..qw {
            let even = &src[2 * q * g.stride * c..][..win];
            let odd = (2 * q + 1 < g.ow).then(|| &src[(2 * q + 1) * g.stride * c..][..win]);
            let d = &mut dst[q * ldw..][..ldw];
            super::bf16::interleave_pairs(even, odd, &mut d[..win]);
            d[win..].fill(0);
        }
    }
}

/// Rows of 16-float vectors: `n` rounded up to a multiple of 16.
fn padded_to_lanes(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// `(o, c, kh, kw)` → `(kh, kw, c, opad)` with `opad = o` rounded up to 16
/// (zero columns).
fn forward_weights(w: &[f32], g: &ConvGeom) -> Aligned {
    let (o, c, kh, kw) = (g.o, g.c, g.kh, g.kw);
    let ld = padded_to_lanes(o);
    let mut out = Aligned::zeroed(kh * kw * c * ld);
    let m = out.values_mut();
    for oc in 0..o {
        for ic in 0..c {
            for t in 0..kh * kw {
                m[(t * c + ic) * ld + oc] = w[(oc * c + ic) * kh * kw + t];
            }
        }
    }
    out
}

/// The input gradient's weights for the class of input pixels whose taps
/// start at `(ky0, kx0)`: `(nj, ni, o, cpad)`, tap `(j, i)` holding kernel
/// tap `(ky0 + s·(nj−1−j), kx0 + s·(ni−1−i))` (flipped), `o` and `c` swapped.
fn class_weights(w: &[f32], g: &ConvGeom, (ky0, kx0): (usize, usize), (nj, ni): (usize, usize)) -> Aligned {
    let (o, c, s) = (g.o, g.c, g.stride);
    let ld = padded_to_lanes(c);
    let mut out = Aligned::zeroed(nj * ni * o * ld);
    let m = out.values_mut();
    for j in 0..nj {
        for i in 0..ni {
            let (ky, kx) = (ky0 + s * (nj - 1 - j), kx0 + s * (ni - 1 - i));
            for oc in 0..o {
                let row = &mut m[((j * ni + i) * o + oc) * ld..][..c];
                for (ic, v) in row.iter_mut().enumerate() {
                    *v = w[((oc * c + ic) * g.kh + ky) * g.kw + kx];
                }
            }
        }
    }
    out
}

/// One stride-`stride` direct convolution over a chunk of padded images:
/// `wm` holds the weights (`kh·kw·c` rows of `ldw`), the windows of output
/// pixel `(oy, ox)` start at padded pixel `(y0 + oy·stride, x0 + ox·stride)`,
/// and its `o` values go to pixel `(ry + oy·step, rx + ox·step)` of the
/// output map.
struct Pass {
    kh: usize,
    kw: usize,
    stride: usize,
    /// The grid of output pixels this pass computes.
    oh: usize,
    ow: usize,
    wm: Aligned,
    ldw: usize,
    /// Window origin of output pixel (0, 0) in the padded image.
    y0: usize,
    x0: usize,
    /// Output map pixel of grid pixel (0, 0), and the grid's step there.
    ry: usize,
    rx: usize,
    step: usize,
}

/// The output map of a set of passes: `h × w` pixels of `o` channels,
/// written, or added to the values there with `accumulate`.
struct OutMap {
    h: usize,
    w: usize,
    o: usize,
    accumulate: bool,
}

/// Forward: `x` NHWC `(n, h, w, c)`, `weight` `(o, c, kh, kw)` → NHWC
/// `(n, oh, ow, o)`, products in `prec` (bf16: operands rounded to bf16,
/// f32 sums). Call only where [`available`] (and [`available_bf16`] for bf16).
pub fn forward(x: &[f32], weight: &[f32], g: &ConvGeom, prec: Precision) -> Vec<f32> {
    forward_with(x, weight, g, prec, None)
}

/// [`forward`], and `hook` run on each image's output map as soon as it is
/// written (see [`ImageHook`]).
///
/// # Panics
/// If the hook's `out` does not hold `n × len` values.
pub fn forward_with(x: &[f32], weight: &[f32], g: &ConvGeom, prec: Precision, hook: Option<ImageHook<'_>>) -> Vec<f32> {
    if let Some(h) = &hook {
        assert_eq!(
            h.out.len(),
            g.n * h.len,
            "forward_with: the hook's values do not match the batch"
        );
    }
    let hook = hook.filter(|h| h.len > 0);
    let bf16 = prec == Precision::Bf16;
    let pad = Padded::around_input(g, words(g.c, bf16));
    let pass = Pass {
        kh: g.kh,
        kw: g.kw,
        stride: g.stride,
        oh: g.oh,
        ow: g.ow,
        wm: in_words(forward_weights(weight, g), g.kh * g.kw, g.c, padded_to_lanes(g.o), bf16),
        ldw: padded_to_lanes(g.o),
        y0: 0,
        x0: 0,
        ry: 0,
        rx: 0,
        step: 1,
    };
    let out = OutMap {
        h: g.oh,
        w: g.ow,
        o: g.o,
        accumulate: false,
    };
    run_passes(
        &[pass],
        &pad,
        &out,
        Map::F32(x),
        (g.n, g.h, g.w, g.c),
        (g.pad, g.pad),
        bf16,
        hook,
    )
}

/// What [`forward_with`] computes from each image's output right after
/// its tiles are written, while the image is still in cache: `f(output,
/// values)` fills the image's `len` values of `out` (`n × len` in all).
pub struct ImageHook<'a> {
    /// Values per image.
    pub len: usize,
    /// Every image's values, in image order.
    pub out: &'a mut [f64],
    /// Computes one image's values from its output map.
    pub f: &'a (dyn Fn(&[f32], &mut [f64]) + Sync),
}

/// Input gradient: `dy` NHWC `(n, oh, ow, o)`, `weight` `(o, c, kh, kw)` →
/// `(n, h, w, c)`, products in `prec` as in [`forward`].
///
/// Input pixel `(y, x)` with `y = s·qy + ry` receives `dy[(y + pad − ky)/s]`
/// through the taps `ky ≡ ry + pad (mod s)`: `ky = ky0 + s·j`, reading
/// `dy[qy + dy0 − j]` with `dy0 = ⌊(ry + pad)/s⌋`. Per class that is a
/// stride-1 correlation of `dy` with `nj = ⌈(kh − ky0)/s⌉` flipped taps.
///
/// `dy` is f32, or bf16 with bf16 products only (and an even channel count
/// `o`). Call only where [`available`] (and [`available_bf16`] for bf16).
///
/// # Panics
/// A bf16 `dy` with f32 products or an odd `o`.
pub fn backward_input(dy: Map<'_>, weight: &[f32], g: &ConvGeom, prec: Precision) -> Vec<f32> {
    input_gradient(dy, weight, g, prec, None)
}

/// [`backward_input`] added to `dx` (NHWC `(n, h, w, c)`): each value
/// becomes `dx + gradient`, the sum rounded once, in the pass that computes
/// it. Call only where [`available`] (and [`available_bf16`] for bf16).
///
/// # Panics
/// As [`backward_input`]; if `dx` does not hold `n·h·w·c` values.
pub fn backward_input_add(dy: Map<'_>, weight: &[f32], g: &ConvGeom, prec: Precision, dx: &mut [f32]) {
    input_gradient(dy, weight, g, prec, Some(dx));
}

/// The input gradient, written to a new vector (returned) or added to `dx`
/// (an empty vector returned).
fn input_gradient(dy: Map<'_>, weight: &[f32], g: &ConvGeom, prec: Precision, dx: Option<&mut [f32]>) -> Vec<f32> {
    assert!(
        matches!(dy, Map::F32(_)) || (prec == Precision::Bf16 && g.o.is_multiple_of(2)),
        "backward_input: a bf16 dy needs bf16 products and an even channel count"
    );
    let bf16 = prec == Precision::Bf16;
    let s = g.stride;
    // zero rows/columns around dy: enough for every class's first tap
    let (ty, tx) = (g.kh.div_ceil(s), g.kw.div_ceil(s));
    let mut passes = Vec::new();
    let (mut hp, mut wp) = (ty + g.oh, tx + g.ow);
    for ry in 0..s.min(g.h) {
        for rx in 0..s.min(g.w) {
            let (ky0, kx0) = ((ry + g.pad) % s, (rx + g.pad) % s);
            if ky0 >= g.kh || kx0 >= g.kw {
                continue; // no tap reaches this class: its gradient stays 0
            }
            let (nj, ni) = ((g.kh - ky0).div_ceil(s), (g.kw - kx0).div_ceil(s));
            let (dy0, dx0) = ((ry + g.pad) / s, (rx + g.pad) / s);
            let (oh, ow) = ((g.h - ry).div_ceil(s), (g.w - rx).div_ceil(s));
            let (y0, x0) = (ty + dy0 + 1 - nj, tx + dx0 + 1 - ni);
            hp = hp.max(y0 + oh - 1 + nj);
            wp = wp.max(x0 + ow - 1 + ni);
            passes.push(Pass {
                kh: nj,
                kw: ni,
                stride: 1,
                oh,
                ow,
                wm: in_words(
                    class_weights(weight, g, (ky0, kx0), (nj, ni)),
                    nj * ni,
                    g.o,
                    padded_to_lanes(g.c),
                    bf16,
                ),
                ldw: padded_to_lanes(g.c),
                y0,
                x0,
                ry,
                rx,
                step: s,
            });
        }
    }
    let pad = Padded {
        hp,
        wp,
        c: words(g.o, bf16),
    };
    let out = OutMap {
        h: g.h,
        w: g.w,
        o: g.c,
        accumulate: dx.is_some(),
    };
    let dims = (g.n, g.oh, g.ow, g.o);
    match dx {
        Some(dx) => {
            assert_eq!(
                dx.len(),
                g.n * g.h * g.w * g.c,
                "backward_input: dx has the wrong length"
            );
            // SAFETY: the passes only write initialised values (read-add-write with `accumulate`).
            let dx = unsafe { &mut *(std::ptr::from_mut::<[f32]>(dx) as *mut [MaybeUninit<f32>]) };
            run_passes_into(&passes, &pad, &out, dy, dims, (ty, tx), bf16, dx, None);
            Vec::new()
        }
        None => run_passes(&passes, &pad, &out, dy, dims, (ty, tx), bf16, None),
    }
}

/// Runs `passes` over the `n` images of `x` (`h × w` maps of `c`
/// channels), each copied into `pad`'s map at `(top, left)` (as bf16
/// pairs with `bf16`), images in chunks on the rayon pool; returns the
/// output map. `hook` runs on each image's map once its passes are done.
#[allow(clippy::too_many_arguments)]
fn run_passes(
    passes: &[Pass],
    pad: &Padded,
    out: &OutMap,
    x: Map<'_>,
    dims: (usize, usize, usize, usize),
    at: (usize, usize),
    bf16: bool,
    hook: Option<ImageHook<'_>>,
) -> Vec<f32> {
    let len = dims.0 * out.h * out.w * out.o;
    if len == 0 {
        return Vec::new();
    }
    // Written in full by the passes where they cover every output pixel
    // (zeroing 50 MB per layer was 4% of a step); zeroed where they do not.
    let covered: usize = passes.iter().map(|p| p.oh * p.ow).sum();
    let mut y: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { y.set_len(len) };
    if covered < out.h * out.w {
        y.fill(MaybeUninit::new(0.0));
    }
    run_passes_into(passes, pad, out, x, dims, at, bf16, &mut y, hook);
    let mut y = std::mem::ManuallyDrop::new(y);
    // SAFETY: every value is written (the passes cover each output pixel's
    // channels once; the classes no tap reaches were zeroed above), and
    // `MaybeUninit<f32>` has `f32`'s size and alignment.
    unsafe { Vec::from_raw_parts(y.as_mut_ptr().cast::<f32>(), y.len(), y.capacity()) }
}

/// [`run_passes`] into `y`, the `n` images' output maps: written, or added
/// to with `out.accumulate` (then `y` must be initialised).
#[allow(clippy::too_many_arguments)]
fn run_passes_into(
    passes: &[Pass],
    pad: &Padded,
    out: &OutMap,
    x: Map<'_>,
    (n, h, w, c): (usize, usize, usize, usize),
    (top, left): (usize, usize),
    bf16: bool,
    y: &mut [MaybeUninit<f32>],
    hook: Option<ImageHook<'_>>,
) {
    let words = pad.c;
    let px = out.h * out.w;
    if n * px * out.o == 0 {
        return;
    }
    let ipc = TASK_PIXELS
        .div_ceil(px)
        .clamp(1, n.div_ceil(4 * rayon::current_num_threads()).max(1));
    let (pl, il, ol) = (pad.image_len(), h * w * c, px * out.o);
    let slack = passes
        .iter()
        .map(|p| TILE_REGS * p.stride * words + p.kw * words)
        .max()
        .unwrap_or(0)
        + 16;
    let (hook_len, hook_f, hook_out) = match hook {
        Some(k) => (k.len, Some(k.f), k.out),
        None => (0, None, &mut [][..]),
    };
    // each chunk of images with its images' hook values (none without a
    // hook; a hook has `len > 0`, see `forward_with`)
    let values: Vec<&mut [f64]> = if hook_f.is_some() {
        hook_out.chunks_mut(ipc * hook_len).collect()
    } else {
        (0..y.len().div_ceil(ipc * ol))
            .map(|_| <&mut [f64]>::default())
            .collect()
    };
    y.par_chunks_mut(ipc * ol)
        .zip(values)
        .enumerate()
        .for_each(|(ci, (yc, vc))| {
            let imgs = yc.len() / ol;
            let xc = x.slice(ci * ipc * il..(ci * ipc + imgs) * il);
            with_padded(imgs * pl + slack, |xp| {
                match xc {
                    _ if bf16 => pad.fill_pairs_of(xc, (h, w, c), (top, left), imgs, xp),
                    Map::F32(xc) => pad.fill(xc, (h, w), (top, left), imgs, xp),
                    Map::Bf16(_) => unreachable!("bf16 maps feed bf16 products only"),
                }
                // image by image where a hook reads each image's map (then
                // still in cache), else the chunk at once
                let step = if hook_f.is_some() { 1 } else { imgs };
                for i0 in (0..imgs).step_by(step) {
                    let k = step.min(imgs - i0);
                    for pass in passes {
                        // SAFETY: `available` (and `available_bf16` for
                        // bf16) checked the instruction sets (the callers'
                        // contract); the padded buffer has `slack` words
                        // past the last image for the tiles' unused pixels.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            x86::pass(
                                pass,
                                pad,
                                out,
                                &xp[i0 * pl..],
                                k,
                                yc[i0 * ol..].as_mut_ptr().cast(),
                                bf16,
                            )
                        };
                    }
                    if let Some(f) = hook_f {
                        let map = &yc[i0 * ol..(i0 + 1) * ol];
                        // SAFETY: the passes wrote the image's map (a hook
                        // runs with passes that cover every pixel).
                        let map = unsafe { std::slice::from_raw_parts(map.as_ptr().cast::<f32>(), ol) };
                        f(map, &mut vc[i0 * hook_len..(i0 + 1) * hook_len]);
                    }
                }
            });
        });
}

/// Weight gradient: `x` NHWC `(n, h, w, c)`, `dy` NHWC `(n, oh, ow, o)` →
/// `(o, c, kh, kw)`, products in `prec` as in [`forward`] (bf16: pairs of
/// consecutive pixels of an output row). Call only where [`available`] (and
/// [`available_bf16`] for bf16).
///
/// `dy` is f32, or bf16 with bf16 products only.
///
/// # Panics
/// A bf16 `dy` with f32 products.
pub fn backward_weight(x: &[f32], dy: Map<'_>, g: &ConvGeom, prec: Precision) -> Vec<f32> {
    let bf16 = prec == Precision::Bf16;
    assert!(
        bf16 || matches!(dy, Map::F32(_)),
        "backward_weight: a bf16 dy needs bf16 products"
    );
    // f32 words: the bf16 kernel pairs pixels, not channels (`window_pairs`)
    let pad = Padded::around_input(g, g.c);
    let px = g.out_pixels();
    let (pl, il) = (pad.image_len(), g.h * g.w * g.c);
    let win = g.kw * g.c;
    let ldw = padded_to_lanes(win);
    let part_len = g.o * g.kh * ldw;
    let ipc = TASK_PIXELS.div_ceil(px).max(1);
    // a fixed number of groups of consecutive images (as even as they
    // come), added in order: the same result whatever the thread count or
    // the work stealing
    let groups = g.n.clamp(1, WEIGHT_GROUPS);
    let parts: Vec<Vec<f32>> = (0..groups)
        .into_par_iter()
        .map(|gi| {
            let mut acc = vec![0f32; part_len];
            let (start, end) = (gi * g.n / groups, (gi + 1) * g.n / groups);
            for first in (start..end).step_by(ipc) {
                let imgs = ipc.min(end - first);
                let xc = &x[first * il..(first + imgs) * il];
                let dyc = dy.slice(first * px * g.o..(first + imgs) * px * g.o);
                with_padded(imgs * pl, |xp| {
                    pad.fill(xc, (g.h, g.w), (g.pad, g.pad), imgs, xp);
                    // SAFETY: as in `run_passes`; a window's last vector is
                    // a masked load, which reads nothing past the window.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        match dyc {
                            _ if bf16 => {
                                // dy's pixels 2q and 2q + 1 of each row, and their windows, as pairs
                                let qw = g.ow.div_ceil(2);
                                with_words(&DY_PAIRS, imgs * g.oh * qw * g.o, |dy2| {
                                    dy_row_pairs(dyc, imgs * g.oh, g.ow, g.o, dy2);
                                    with_words(&WINDOW_PAIRS, imgs * pad.hp * qw * ldw, |win2| {
                                        window_pairs(g, &pad, xp, imgs, ldw, win2);
                                        x86::weight_gradient_bf16(g, &pad, win2, dy2, imgs, &mut acc, ldw)
                                    })
                                })
                            }
                            Map::F32(dyc) if win < 16 => {
                                x86::weight_gradient_narrow(g, &pad, xp, dyc, imgs, &mut acc, ldw)
                            }
                            Map::F32(dyc) => x86::weight_gradient(g, &pad, xp, dyc, imgs, &mut acc, ldw),
                            Map::Bf16(_) => unreachable!("checked above: bf16 dy, bf16 products"),
                        }
                    };
                });
            }
            acc
        })
        .collect();
    let mut sum = vec![0f32; part_len];
    for p in &parts {
        for (a, b) in sum.iter_mut().zip(p) {
            *a += b;
        }
    }
    // (o, ky, kx·c + ic) → (o, c, ky, kx)
    let mut dw = vec![0f32; g.o * g.c * g.kh * g.kw];
    for oc in 0..g.o {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                for ic in 0..g.c {
                    dw[((oc * g.c + ic) * g.kh + ky) * g.kw + kx] = sum[(oc * g.kh + ky) * ldw + kx * g.c + ic];
                }
            }
        }
    }
    dw
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{OutMap, Padded, Pass, TILE_REGS};
    use crate::ops::bf16::lanes;
    use crate::ops::conv::ConvGeom;
    use std::arch::x86_64::*;

    /// Where a tile reads and writes.
    struct Tile {
        /// Padded input at the first pixel's window origin.
        x: *const f32,
        /// Floats between consecutive pixels' windows (`stride · c`).
        px_step: usize,
        /// Floats between padded rows.
        row_step: usize,
        c: usize,
        kh: usize,
        kw: usize,
        /// Weights at the block's first output channel.
        w: *const f32,
        ldw: usize,
        /// Output at the first pixel's first channel of the block.
        y: *mut f32,
        /// Floats between output pixels.
        ldy: usize,
        /// Pixels to store.
        valid: usize,
        /// Output channels to store (from the block's first).
        channels: usize,
        /// Add to the output's values instead of overwriting them.
        accumulate: bool,
    }

    /// The same 512 bits read as 32 bf16.
    #[inline(always)]
    fn as_bf16(v: __m512i) -> __m512bh {
        // SAFETY: both are 512-bit vectors; every bit pattern is valid for each.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// Stores a tile's `t.valid` pixels, `t.channels` channels of each.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store_tile<const P: usize, const NV: usize>(t: &Tile, acc: &[[__m512; NV]; P]) {
        for (p, a) in acc.iter().enumerate().take(t.valid) {
            for (v, r) in a.iter().enumerate() {
                let left = t.channels.saturating_sub(16 * v);
                if left > 0 {
                    let (at, m) = (unsafe { t.y.add(p * t.ldy + 16 * v) }, lanes(left));
                    // SAFETY: within the output (the caller's tile), which
                    // is initialised where `accumulate` reads it.
                    let r = if t.accumulate {
                        unsafe { _mm512_add_ps(_mm512_maskz_loadu_ps(m, at), *r) }
                    } else {
                        *r
                    };
                    unsafe { _mm512_mask_storeu_ps(at, m, r) };
                }
            }
        }
    }

    /// Adds `R × NV` accumulators to `R` rows of `out`, `ld` apart.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn add_rows<const R: usize, const NV: usize>(out: *mut f32, ld: usize, acc: &[[__m512; NV]; R]) {
        for (r, a) in acc.iter().enumerate() {
            for (v, val) in a.iter().enumerate() {
                // SAFETY: within the accumulator (the caller's rows).
                let p = unsafe { out.add(r * ld + 16 * v) };
                unsafe { _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *val)) };
            }
        }
    }

    /// Defines an output tile kernel of `P` pixels × `NV` vectors of output
    /// channels over the words of a [`Tile`]: for each tap and input word,
    /// `NV` weight vectors are loaded (`load`, at `p`) and each pixel's
    /// input word broadcast (`broadcast`, at `p`) against them (`madd`:
    /// `a + b·w`). One body for the f32 and the bf16 kernel, each compiled
    /// with its own target features.
    macro_rules! output_tile {
        (
            $(#[$doc:meta])* $name:ident, $features:literal, $vec:ty, $zero:expr,
            load: |$lp:ident| $load:expr,
            broadcast: |$bp:ident| $bcast:expr,
            madd: |$a:ident, $b:ident, $w:ident| $madd:expr $(,)?
        ) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            #[inline(never)]
            unsafe fn $name<const P: usize, const NV: usize>(t: &Tile) {
                let mut acc = [[_mm512_setzero_ps(); NV]; P];
                for ky in 0..t.kh {
                    for kx in 0..t.kw {
                        // SAFETY (whole body): the caller's tile lies in the
                        // padded map plus its slack, and in the weight and
                        // output buffers; words are 4 bytes either way.
                        let xa = unsafe { t.x.add(ky * t.row_step + kx * t.c) };
                        let wa = unsafe { t.w.add((ky * t.kw + kx) * t.c * t.ldw) };
                        for ci in 0..t.c {
                            let mut wv: [$vec; NV] = [$zero; NV];
                            for (v, r) in wv.iter_mut().enumerate() {
                                let $lp = unsafe { wa.add(ci * t.ldw + 16 * v) };
                                *r = unsafe { $load };
                            }
                            for (p, acc_p) in acc.iter_mut().enumerate() {
                                let $bp = unsafe { xa.add(p * t.px_step + ci) };
                                let $b = unsafe { $bcast };
                                for v in 0..NV {
                                    let ($a, $w) = (acc_p[v], wv[v]);
                                    acc_p[v] = $madd;
                                }
                            }
                        }
                    }
                }
                unsafe { store_tile(t, &acc) };
            }
        };
    }

    output_tile!(
        /// `P` pixels × `NV` vectors of output channels, f32 words.
        tile,
        "avx512f",
        __m512,
        _mm512_setzero_ps(),
        load: |p| _mm512_loadu_ps(p),
        broadcast: |p| _mm512_set1_ps(*p),
        madd: |a, b, w| _mm512_fmadd_ps(b, w, a),
    );

    output_tile!(
        /// [`tile`] with bf16 pairs for words: `vdpbf16ps` adds two products
        /// per lane where `vfmadd231ps` adds one.
        tile_bf16,
        "avx512f,avx512bf16",
        __m512i,
        _mm512_setzero_si512(),
        load: |p| _mm512_loadu_si512(p.cast()),
        broadcast: |p| _mm512_set1_epi32(*p.cast::<i32>()),
        madd: |a, b, w| _mm512_dpbf16_ps(a, as_bf16(b), as_bf16(w)),
    );

    /// Calls `$tile::<P, NV>` with `P` the run-time `p` (1 ≤ p ≤ 28 / NV).
    macro_rules! dispatch {
        ($tile:ident, $t:expr, $p:expr, $nv:literal, [$($n:literal)*]) => {
            match $p {
                $($n => unsafe { $tile::<$n, $nv>($t) },)*
                _ => unreachable!("tile of {} pixels", $p),
            }
        };
    }

    /// Runs the `p × nv` tile of f32 or (`bf16`) pair words.
    macro_rules! tiles {
        ($tile:ident, $t:expr, $p:expr, $nv:expr) => {
            match $nv {
                1 => dispatch!($tile, $t, $p, 1, [1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28]),
                2 => dispatch!($tile, $t, $p, 2, [1 2 3 4 5 6 7 8 9 10 11 12 13 14]),
                3 => dispatch!($tile, $t, $p, 3, [1 2 3 4 5 6 7 8 9]),
                4 => dispatch!($tile, $t, $p, 4, [1 2 3 4 5 6 7]),
                nv => unreachable!("{nv} vectors per tile"),
            }
        };
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn run_tile(t: &Tile, p: usize, nv: usize, bf16: bool) {
        if bf16 {
            tiles!(tile_bf16, t, p, nv)
        } else {
            tiles!(tile, t, p, nv)
        }
    }

    /// One pass over `imgs` padded images `xp` into `y`, the chunk's output
    /// (`imgs × out.h × out.w × out.o` values, written, never read).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pass(
        pass: &Pass,
        pad: &Padded,
        out: &OutMap,
        xp: &[f32],
        imgs: usize,
        y: *mut f32,
        bf16: bool,
    ) {
        let c = pad.c;
        let vectors = pass.ldw / 16;
        let nv_max = vectors.min(4);
        let p_max = (TILE_REGS / nv_max).min(pass.ow);
        let tiles = pass.ow.div_ceil(p_max);
        let p = pass.ow.div_ceil(tiles);
        let pl = pad.image_len();
        let opx = out.h * out.w;
        for i in 0..imgs {
            for oy in 0..pass.oh {
                for ti in 0..tiles {
                    let ox = ti * p;
                    let valid = p.min(pass.ow - ox);
                    let (yy, xx) = (pass.y0 + oy * pass.stride, pass.x0 + ox * pass.stride);
                    let x = xp[i * pl + (yy * pad.wp + xx) * c..].as_ptr();
                    let yrow = (i * opx + (pass.ry + oy * pass.step) * out.w + pass.rx + ox * pass.step) * out.o;
                    let mut v0 = 0;
                    while v0 < vectors {
                        let nv = (vectors - v0).min(nv_max);
                        let t = Tile {
                            x,
                            px_step: pass.stride * c,
                            row_step: pad.wp * c,
                            c,
                            kh: pass.kh,
                            kw: pass.kw,
                            w: pass.wm.values()[16 * v0..].as_ptr(),
                            ldw: pass.ldw,
                            // SAFETY: within the chunk's output (the caller's contract).
                            y: unsafe { y.add(yrow + 16 * v0) },
                            ldy: pass.step * out.o,
                            valid,
                            channels: out.o - 16 * v0,
                            accumulate: out.accumulate,
                        };
                        unsafe { run_tile(&t, p, nv, bf16) };
                        v0 += nv;
                    }
                }
            }
        }
    }

    /// `OT` output channels × `NV` vectors of one kernel row's window.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weight_tile<const OT: usize, const NV: usize>(
        g: &ConvGeom,
        pad: &Padded,
        xp: *const f32,
        dy: *const f32,
        imgs: usize,
        acc_out: *mut f32,
        ldw: usize,
        win_left: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; OT];
        let mut masks = [0 as __mmask16; NV];
        for (v, m) in masks.iter_mut().enumerate() {
            *m = lanes(win_left.saturating_sub(16 * v));
        }
        let c = g.c;
        let pl = pad.image_len();
        for i in 0..imgs {
            for oy in 0..g.oh {
                // SAFETY (whole body): rows and pixels within the padded
                // images (plus slack) and the chunk's output gradient.
                let xrow = unsafe { xp.add(i * pl + oy * g.stride * pad.wp * c) };
                let drow = unsafe { dy.add((i * g.oh + oy) * g.ow * g.o) };
                for ox in 0..g.ow {
                    let xa = unsafe { xrow.add(ox * g.stride * c) };
                    let mut xv = [_mm512_setzero_ps(); NV];
                    for v in 0..NV {
                        xv[v] = unsafe { _mm512_maskz_loadu_ps(masks[v], xa.add(16 * v)) };
                    }
                    let d = unsafe { drow.add(ox * g.o) };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(unsafe { *d.add(r) });
                        for v in 0..NV {
                            a[v] = _mm512_fmadd_ps(b, xv[v], a[v]);
                        }
                    }
                }
            }
        }
        unsafe { add_rows(acc_out, ldw, &acc) };
    }

    /// Calls `$kernel::<A, B>($args)` for the run-time pair `$ab`, one of
    /// the listed `(A, B)`.
    macro_rules! const_pair {
        ($kernel:ident, $ab:expr, $args:tt, [$(($a:literal, $b:literal))*]) => {
            match $ab {
                $(($a, $b) => unsafe { call_with!($kernel::<$a, $b>, $args) },)*
                other => unreachable!("{} {other:?}", stringify!($kernel)),
            }
        };
    }

    /// `$f(args…)` from a parenthesised argument list (a single token tree,
    /// so that [`const_pair`] can repeat it per pair).
    macro_rules! call_with {
        ($f:expr, ($($arg:expr),* $(,)?)) => {
            $f($($arg),*)
        };
    }

    /// Adds the weight gradient of `imgs` padded images `xp` and their
    /// output gradient `dy` into `acc` (`o × kh` rows of `ldw`: `kw·c`
    /// window values, then zeros).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_gradient(
        g: &ConvGeom,
        pad: &Padded,
        xp: &[f32],
        dy: &[f32],
        imgs: usize,
        acc: &mut [f32],
        ldw: usize,
    ) {
        let win = g.kw * g.c;
        let vectors = ldw / 16;
        const NV_MAX: usize = 6;
        const OT: usize = 4;
        for ky in 0..g.kh {
            let x0 = xp[ky * pad.wp * g.c..].as_ptr();
            let mut v0 = 0;
            while v0 < vectors {
                let nv = (vectors - v0).min(NV_MAX);
                let mut o0 = 0;
                while o0 < g.o {
                    let ot = (g.o - o0).min(OT);
                    let out = acc[(o0 * g.kh + ky) * ldw + 16 * v0..].as_mut_ptr();
                    let (xs, ds) = unsafe { (x0.add(16 * v0), dy.as_ptr().add(o0)) };
                    const_pair!(
                        weight_tile,
                        (ot, nv),
                        (g, pad, xs, ds, imgs, out, g.kh * ldw, win - 16 * v0),
                        [
                            (1, 1)(1, 2)(1, 3)(1, 4)(1, 5)(1, 6)(2, 1)(2, 2)(2, 3)(2, 4)(2, 5)(2, 6)(3, 1)(3, 2)(3, 3)(
                                3, 4
                            )(3, 5)(3, 6)(4, 1)(4, 2)(4, 3)(4, 4)(4, 5)(4, 6)
                        ]
                    );
                    o0 += ot;
                }
                v0 += nv;
            }
        }
    }

    /// [`weight_tile`] in bf16: pixels `2q` and `2q + 1` of an output row
    /// make one pair (their windows paired beforehand in `win2`, their
    /// output gradients in `dy2`), `OT·NV` `vdpbf16ps` per pair.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weight_tile_bf16<const OT: usize, const NV: usize>(
        g: &ConvGeom,
        pad: &Padded,
        win2: *const u32,
        dy2: *const u32,
        imgs: usize,
        acc_out: *mut f32,
        ldw: usize,
        ldx: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; OT];
        let qw = g.ow.div_ceil(2);
        for i in 0..imgs {
            for oy in 0..g.oh {
                // SAFETY (whole body): rows and pairs within the chunk's
                // paired windows and output gradient.
                let xrow = unsafe { win2.add((i * pad.hp + oy * g.stride) * qw * ldx) };
                let drow = unsafe { dy2.add((i * g.oh + oy) * qw * g.o) };
                for q in 0..qw {
                    let xa = unsafe { xrow.add(q * ldx) };
                    let mut xv = [_mm512_setzero_si512(); NV];
                    for (v, r) in xv.iter_mut().enumerate() {
                        *r = unsafe { _mm512_loadu_si512(xa.add(16 * v).cast()) };
                    }
                    let d = unsafe { drow.add(q * g.o) };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let b = as_bf16(_mm512_set1_epi32(unsafe { *d.add(r) } as i32));
                        for v in 0..NV {
                            a[v] = _mm512_dpbf16_ps(a[v], b, as_bf16(xv[v]));
                        }
                    }
                }
            }
        }
        unsafe { add_rows(acc_out, ldw, &acc) };
    }

    /// [`weight_gradient`] in bf16: `win2` the chunk's windows and `dy2` its
    /// output gradient as pixel pairs ([`super::window_pairs`],
    /// [`super::dy_row_pairs`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn weight_gradient_bf16(
        g: &ConvGeom,
        pad: &Padded,
        win2: &[u32],
        dy2: &[u32],
        imgs: usize,
        acc: &mut [f32],
        ldw: usize,
    ) {
        const NV_MAX: usize = 3;
        const OT_MAX: usize = 8;
        let vectors = ldw / 16;
        let qw = g.ow.div_ceil(2);
        for ky in 0..g.kh {
            let x0 = win2[ky * qw * ldw..].as_ptr();
            for v0 in (0..vectors).step_by(NV_MAX) {
                let nv = (vectors - v0).min(NV_MAX);
                for o0 in (0..g.o).step_by(OT_MAX) {
                    let ot = (g.o - o0).min(OT_MAX);
                    let out = acc[(o0 * g.kh + ky) * ldw + 16 * v0..].as_mut_ptr();
                    let (xs, ds) = unsafe { (x0.add(16 * v0), dy2.as_ptr().add(o0)) };
                    const_pair!(
                        weight_tile_bf16,
                        (ot, nv),
                        (g, pad, xs, ds, imgs, out, g.kh * ldw, ldw),
                        [
                            (1, 1)(1, 2)(1, 3)(2, 1)(2, 2)(2, 3)(3, 1)(3, 2)(3, 3)(4, 1)(4, 2)(4, 3)(5, 1)(5, 2)(5, 3)(
                                6, 1
                            )(6, 2)(6, 3)(7, 1)(7, 2)(7, 3)(8, 1)(8, 2)(8, 3)
                        ]
                    );
                }
            }
        }
    }

    /// `RT` values of one kernel row's window × `NV` vectors of output
    /// channels, for windows narrower than a vector.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn narrow_tile<const RT: usize, const NV: usize>(
        g: &ConvGeom,
        pad: &Padded,
        xp: *const f32,
        dy: *const f32,
        imgs: usize,
        out: *mut f32,
        o_stride: usize,
        channels: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; RT];
        let mut masks = [0 as __mmask16; NV];
        for (v, m) in masks.iter_mut().enumerate() {
            *m = lanes(channels.saturating_sub(16 * v));
        }
        let c = g.c;
        let pl = pad.image_len();
        for i in 0..imgs {
            for oy in 0..g.oh {
                // SAFETY (whole body): as in `weight_tile`.
                let xrow = unsafe { xp.add(i * pl + oy * g.stride * pad.wp * c) };
                let drow = unsafe { dy.add((i * g.oh + oy) * g.ow * g.o) };
                for ox in 0..g.ow {
                    let xa = unsafe { xrow.add(ox * g.stride * c) };
                    let d = unsafe { drow.add(ox * g.o) };
                    let mut dv = [_mm512_setzero_ps(); NV];
                    for v in 0..NV {
                        dv[v] = unsafe { _mm512_maskz_loadu_ps(masks[v], d.add(16 * v)) };
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(unsafe { *xa.add(r) });
                        for v in 0..NV {
                            a[v] = _mm512_fmadd_ps(b, dv[v], a[v]);
                        }
                    }
                }
            }
        }
        let mut lane_values = [0f32; 16];
        for (r, a) in acc.iter().enumerate() {
            for (v, val) in a.iter().enumerate() {
                unsafe { _mm512_storeu_ps(lane_values.as_mut_ptr(), *val) };
                for (l, x) in lane_values.iter().enumerate().take(channels.saturating_sub(16 * v)) {
                    unsafe { *out.add((16 * v + l) * o_stride + r) += x };
                }
            }
        }
    }

    /// [`weight_gradient`] for windows (`kw·c`) narrower than 16 values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_gradient_narrow(
        g: &ConvGeom,
        pad: &Padded,
        xp: &[f32],
        dy: &[f32],
        imgs: usize,
        acc: &mut [f32],
        ldw: usize,
    ) {
        const RT_MAX: usize = 7;
        const NV_MAX: usize = 4;
        let win = g.kw * g.c;
        let vectors = g.o.div_ceil(16);
        for ky in 0..g.kh {
            for j0 in (0..win).step_by(RT_MAX) {
                let rt = (win - j0).min(RT_MAX);
                for v0 in (0..vectors).step_by(NV_MAX) {
                    let nv = (vectors - v0).min(NV_MAX);
                    let o0 = 16 * v0;
                    let xs = xp[ky * pad.wp * g.c + j0..].as_ptr();
                    let ds = dy[o0..].as_ptr();
                    let out = acc[o0 * g.kh * ldw + ky * ldw + j0..].as_mut_ptr();
                    const_pair!(
                        narrow_tile,
                        (rt, nv),
                        (g, pad, xs, ds, imgs, out, g.kh * ldw, g.o - o0),
                        [
                            (1, 1)(1, 2)(1, 3)(1, 4)(2, 1)(2, 2)(2, 3)(2, 4)(3, 1)(3, 2)(3, 3)(3, 4)(4, 1)(4, 2)(4, 3)(
                                4, 4
                            )(5, 1)(5, 2)(5, 3)(5, 4)(6, 1)(6, 2)(6, 3)(6, 4)(7, 1)(7, 2)(
                                7, 3
                            )(7, 4)
                        ]
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::{im2col_backward_input, im2col_backward_weight, im2col_forward};
    use crate::ops::testing::{bits, hashed_values};
    use crate::ops::vector::with_kernels;

    /// Largest |a − b| relative to the largest |b|.
    fn relative_gap(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn direct_kernels_match_the_im2col_path() {
        if !KernelSet::Avx512.is_available() {
            eprintln!("no AVX-512F here: the direct kernels do not run");
            return;
        }
        // (n, h, w, c, o, k, stride, pad): the trunk's and the VAE's shapes
        // and odd ones (channels not a multiple of 16, rows not a multiple
        // of the tile, no padding, 1×1)
        let cases = [
            (3, 28, 28, 1, 32, 3, 1, 1),
            (2, 28, 28, 32, 32, 3, 1, 1),
            (2, 28, 28, 32, 64, 3, 2, 1),
            (3, 14, 14, 64, 64, 3, 1, 1),
            (2, 14, 14, 64, 128, 1, 2, 0),
            (2, 7, 7, 128, 128, 3, 1, 1),
            (2, 9, 11, 5, 19, 3, 1, 1),
            (2, 9, 11, 17, 3, 3, 2, 0),
            (1, 30, 31, 3, 40, 5, 1, 2),
            (4, 6, 6, 48, 20, 4, 2, 1),
            (3, 14, 14, 32, 16, 4, 2, 1),
            (3, 7, 7, 64, 32, 4, 2, 1),
            (2, 13, 12, 6, 5, 3, 3, 1),
            (2, 9, 9, 4, 6, 1, 3, 0),
            (2, 10, 10, 7, 9, 2, 2, 0),
            (3, 28, 28, 1, 96, 4, 2, 1),
            (2, 9, 8, 2, 70, 3, 1, 1),
            (2, 5, 5, 3, 8, 3, 1, 1),
        ];
        for (n, h, w, c, o, k, s, p) in cases {
            let g = ConvGeom::new(n, h, w, c, o, k, k, s, p).unwrap();
            let x = hashed_values(n * h * w * c, 1);
            let wt = hashed_values(o * c * k * k, 2);
            let dy = hashed_values(n * g.out_pixels() * o, 3);
            let (y0, dw0, dx0) = with_kernels(KernelSet::Portable, || {
                (
                    im2col_forward(&x, &wt, &g),
                    im2col_backward_weight(&x, &dy, &g),
                    im2col_backward_input(&dy, &wt, &g),
                )
            });
            let gap = relative_gap(&forward(&x, &wt, &g, Precision::F32), &y0);
            assert!(gap < 1e-5, "forward {g:?}: {gap}");
            let gap = relative_gap(&backward_weight(&x, Map::F32(&dy), &g, Precision::F32), &dw0);
            assert!(gap < 1e-5, "weight gradient {g:?}: {gap}");
            let gap = relative_gap(&backward_input(Map::F32(&dy), &wt, &g, Precision::F32), &dx0);
            assert!(gap < 1e-5, "input gradient {g:?}: {gap}");
            if available_bf16() {
                // bf16 products: both operands rounded (relative error
                // 2⁻⁹ each), f32 sums; the gap to the f32 result is a few
                // 2⁻⁸ of the largest value. The bf16 im2col path, which
                // rounds the same operands, agrees to f32 rounding.
                let bf = Precision::Bf16;
                let yb = forward(&x, &wt, &g, bf);
                let dxb = backward_input(Map::F32(&dy), &wt, &g, bf);
                let gap = relative_gap(&yb, &y0);
                assert!(gap < 2e-2, "bf16 forward {g:?}: {gap}");
                let gap = relative_gap(&dxb, &dx0);
                assert!(gap < 2e-2, "bf16 input gradient {g:?}: {gap}");
                let (yi, dxi) = bf.scope(|| (im2col_forward(&x, &wt, &g), im2col_backward_input(&dy, &wt, &g)));
                let gap = relative_gap(&yb, &yi);
                assert!(gap < 1e-5, "bf16 forward vs bf16 im2col {g:?}: {gap}");
                let gap = relative_gap(&dxb, &dxi);
                assert!(gap < 1e-5, "bf16 input gradient vs bf16 im2col {g:?}: {gap}");
                let dwb = backward_weight(&x, Map::F32(&dy), &g, bf);
                let gap = relative_gap(&dwb, &dw0);
                assert!(gap < 2e-2, "bf16 weight gradient {g:?}: {gap}");
                let dwi = bf.scope(|| im2col_backward_weight(&x, &dy, &g));
                let gap = relative_gap(&dwb, &dwi);
                assert!(gap < 1e-5, "bf16 weight gradient vs bf16 im2col {g:?}: {gap}");
            }
            // dy handed over already rounded to bf16: the bits of rounding it in the kernels
            if available_bf16() && o % 2 == 0 {
                let bf = Precision::Bf16;
                let dyb: Vec<u16> = dy.iter().map(|v| crate::ops::bf16::round_bits(*v)).collect();
                let dx = backward_input(Map::Bf16(&dyb), &wt, &g, bf);
                assert_eq!(
                    bits(&dx),
                    bits(&backward_input(Map::F32(&dy), &wt, &g, bf)),
                    "bf16 dy, input gradient {g:?}"
                );
                let dw = backward_weight(&x, Map::Bf16(&dyb), &g, bf);
                assert_eq!(
                    bits(&dw),
                    bits(&backward_weight(&x, Map::F32(&dy), &g, bf)),
                    "bf16 dy, weight gradient {g:?}"
                );
                let base = hashed_values(n * h * w * c, 5);
                let mut sum = base.clone();
                backward_input_add(Map::Bf16(&dyb), &wt, &g, bf, &mut sum);
                let want: Vec<f32> = base.iter().zip(&dx).map(|(a, b)| a + b).collect();
                assert_eq!(bits(&sum), bits(&want), "bf16 dy, input gradient added {g:?}");
            }
            // the input gradient added to values already there: each value
            // is the sum of the old one and the gradient, rounded once
            for prec in [Precision::F32, Precision::Bf16] {
                if prec == Precision::Bf16 && !available_bf16() {
                    continue;
                }
                let base = hashed_values(n * h * w * c, 4);
                let dx = backward_input(Map::F32(&dy), &wt, &g, prec);
                let mut sum = base.clone();
                backward_input_add(Map::F32(&dy), &wt, &g, prec, &mut sum);
                let want: Vec<f32> = base.iter().zip(&dx).map(|(a, b)| a + b).collect();
                assert_eq!(bits(&sum), bits(&want), "input gradient added {g:?} {prec:?}");
            }
        }
    }
}
