//! Mixed precision for the products pretext computes itself: operands rounded
//! to bf16, products and sums in f32.
//!
//! [`Precision`] is a per-thread setting, the CPU counterpart of PyTorch's
//! autocast: the trainer sets it around a training step (`train.precision`),
//! and every op that does a matrix product (convolutions, linear layers,
//! attention) reads it once on the thread that calls it and passes it down
//! to [`super::gemm::product`]. Everything else — weights, optimizer state,
//! normalisation statistics, softmax, losses, the gradients themselves — stays
//! f32; only the two operands of each product are rounded (to nearest, ties to
//! even), and the products are summed in f32.
//!
//! The kernel here uses AVX512-BF16's `vdpbf16ps`, which multiplies pairs of
//! bf16 values and adds both products to an f32 accumulator: twice the
//! multiply-adds of an f32 FMA per instruction. It is chosen at run time
//! where the CPU has AVX512-BF16 and the process uses the AVX-512 kernels
//! ([`crate::cpu::KernelSet`]); elsewhere a bf16 request runs the f32 kernels
//! ([`Precision::effective`]), so `PRETEXT_KERNELS=avx2` is also the switch
//! that turns the bf16 kernel off.

use std::cell::Cell;

use serde::{Deserialize, Serialize};

/// The precision of the operands of matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 operands: the products are exact up to f32 rounding.
    #[default]
    F32,
    /// Operands rounded to bf16 (8 significant bits), products summed in f32.
    Bf16,
}

thread_local! {
    static PRODUCTS: Cell<Precision> = const { Cell::new(Precision::F32) };
}

impl Precision {
    /// Both, f32 first.
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::Bf16];

    /// Its name in configs and records: `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The precision the products of this thread use (f32 unless inside [`Precision::scope`]).
    pub fn current() -> Self {
        PRODUCTS.with(Cell::get)
    }

    /// Runs `f` with this thread's products in `self`; the previous setting
    /// comes back afterwards, also when `f` panics.
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(Precision);
        impl Drop for Restore {
            fn drop(&mut self) {
                PRODUCTS.with(|p| p.set(self.0));
            }
        }
        let _restore = Restore(PRODUCTS.with(|p| p.replace(self)));
        f()
    }

    /// What a product asked for in `self` runs in on this CPU: bf16 only
    /// where [`bf16_kernels_available`], f32 otherwise.
    pub fn effective(self) -> Self {
        match self {
            Precision::Bf16 if bf16_kernels_available() => Precision::Bf16,
            _ => Precision::F32,
        }
    }

    /// What a run records about its products: `f32`, `bf16 (avx512_bf16)`,
    /// or `bf16 requested, f32 products (…)` where the CPU has no bf16 kernel.
    pub fn describe(self) -> String {
        match (self, self.effective()) {
            (Precision::F32, _) => "f32".into(),
            (Precision::Bf16, Precision::Bf16) => "bf16 (avx512_bf16 kernels)".into(),
            (Precision::Bf16, Precision::F32) => format!(
                "bf16 requested; f32 products (no AVX512-BF16 with the {} kernels here)",
                crate::cpu::KernelSet::current()
            ),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| s.trim().eq_ignore_ascii_case(p.name()))
            .ok_or_else(|| format!("{s:?} is not a precision: expected f32 or bf16"))
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the bf16 kernel runs here: the CPU has AVX512-BF16 (and
/// AVX-512F/BW) and the process uses the AVX-512 f32 kernels.
pub fn bf16_kernels_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && crate::cpu::KernelSet::current() == crate::cpu::KernelSet::Avx512
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as f32.
pub fn round_to_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// `c = a · b` (or `c += a · b` with `accumulate`) with `a` and `b` rounded to
/// bf16 and f32 sums. The caller has checked shapes, spans and
/// [`bf16_kernels_available`]; the result does not depend on `threads`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bf16(
    a: &[f32],
    am: super::gemm::Mat,
    b: &[f32],
    bm: super::gemm::Mat,
    c: &mut [f32],
    cm: super::gemm::Mat,
    accumulate: bool,
    threads: usize,
) {
    assert!(bf16_kernels_available(), "the bf16 kernel needs AVX512-BF16");
    // The kernel stores rows of `c`; a column-major `c` is computed as
    // `cᵀ = bᵀ · aᵀ`, and any other layout through a row-major buffer.
    if cm.cs != 1 && cm.rs == 1 {
        return gemm_bf16(b, bm.t(), a, am.t(), c, cm.t(), accumulate, threads);
    }
    let (m, n, k) = (cm.rows, cm.cols, am.cols);
    if cm.cs != 1 {
        let mut tmp = vec![0f32; m * n];
        if accumulate {
            for i in 0..m {
                for j in 0..n {
                    tmp[i * n + j] = c[i * cm.rs + j * cm.cs];
                }
            }
        }
        let tm = super::gemm::Mat::row_major(m, n);
        gemm_bf16(a, am, b, bm, &mut tmp, tm, accumulate, threads);
        for i in 0..m {
            for j in 0..n {
                c[i * cm.rs + j * cm.cs] = tmp[i * n + j];
            }
        }
        return;
    }
    let a = Lhs::Strided(Operand {
        ptr: a.as_ptr(),
        rs: am.rs,
        cs: am.cs,
    });
    // The caller checked that every index of `a`'s view lies in its slice.
    gemm_lhs(a, (m, k), b, bm, c, cm, accumulate, threads);
}

/// Rows of the left operand per micro-kernel call: rows given as bf16 pairs
/// ([`gemm_bf16_pairs`]) are padded with zero rows to a multiple of this.
pub(crate) const ROW_BLOCK: usize = 12;

/// The bits of `v` rounded to bf16, to nearest even — `half`'s rounding, bit
/// for bit, and the kernels' `vcvtne2ps2bf16` for every finite value and
/// infinity (a NaN stays a quiet NaN); [`pair`] rounds with it. Branch-free, so a loop of it
/// vectorises: passes that hand a bf16 product its operand already
/// rounded write this.
#[inline(always)]
pub fn round_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if v.is_nan() {
        (b >> 16) as u16 | 0x0040
    } else {
        rounded
    }
}

/// Two f32 → one `u32` holding their bf16 roundings (to nearest even; `lo`
/// in the low half): the pair of `k` the bf16 kernels multiply.
pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(round_bits(lo)) | (u32::from(round_bits(hi)) << 16)
}

/// The mask of the first `n` (≤ 16, saturating) of 16 lanes.
pub(crate) fn lanes(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// Rounds `src` to bf16 pairs in `dst` (`k = 2p, 2p+1` in pair `p`, low half
/// first; a zero high half after an odd end), the left-operand rows that
/// [`gemm_bf16_pairs`] takes.
///
/// # Panics
/// If `dst` holds fewer than `⌈len/2⌉` pairs or the CPU has no bf16 kernel.
#[cfg(target_arch = "x86_64")]
pub(crate) fn row_to_pairs(src: &[f32], dst: &mut [u32]) {
    assert!(
        dst.len() >= src.len().div_ceil(2),
        "row_to_pairs: destination too short"
    );
    assert!(bf16_kernels_available(), "the bf16 kernel needs AVX512-BF16");
    // SAFETY: lengths checked above; instruction sets detected.
    unsafe { x86::row_to_pairs(src, dst) }
}

/// `c (m × n, row-major) = a · b` (or `+=`), `a` given as `m` rows of bf16
/// pairs `lda` apart (from [`row_to_pairs`], zero rows padding it to a
/// multiple of [`ROW_BLOCK`]), `b` as any f32 view; f32 sums.
///
/// # Panics
/// If a buffer is too short for its shape, `c` is not row-major, or the CPU
/// has no bf16 kernel.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bf16_pairs(
    a: &[u32],
    lda: usize,
    (m, k): (usize, usize),
    b: &[f32],
    bm: super::gemm::Mat,
    c: &mut [f32],
    cm: super::gemm::Mat,
    accumulate: bool,
    threads: usize,
) {
    assert!(lda >= k.div_ceil(2), "gemm_bf16_pairs: rows shorter than k");
    assert!(
        a.len() >= m.div_ceil(ROW_BLOCK) * ROW_BLOCK * lda,
        "gemm_bf16_pairs: a too short"
    );
    gemm_lhs(
        Lhs::Pairs { ptr: a.as_ptr(), lda },
        (m, k),
        b,
        bm,
        c,
        cm,
        accumulate,
        threads,
    );
}

/// Two rows of `k`, `even` and `odd` (`odd` = `None`: zeros), rounded to
/// bf16 and interleaved into pairs in `dst`: `dst[i]` holds `even[i]` low,
/// `odd[i]` high — one pair of `k` of every row of a left operand whose `k`
/// runs down a matrix's rows ([`gemm_bf16_pairs_by_k`]).
///
/// # Panics
/// If the lengths disagree or the CPU has no bf16 kernel.
#[cfg(target_arch = "x86_64")]
pub(crate) fn interleave_pairs(even: &[f32], odd: Option<&[f32]>, dst: &mut [u32]) {
    assert!(
        dst.len() >= even.len() && odd.is_none_or(|o| o.len() == even.len()),
        "interleave_pairs: lengths"
    );
    assert!(bf16_kernels_available(), "the bf16 kernel needs AVX512-BF16");
    // SAFETY: lengths checked above; instruction sets detected.
    unsafe { x86::interleave_pairs(even, odd, dst) }
}

/// `c (m × n, row-major) = a · b` (or `+=`), `a` given by pairs of `k`:
/// pair `p` of row `i` at `p·lda + i` (from [`interleave_pairs`]; `lda` a
/// multiple of [`ROW_BLOCK`] ≥ `m`, zeros past `m`), `b` as any f32 view.
///
/// # Panics
/// If a buffer is too short for its shape, `c` is not row-major, or the CPU
/// has no bf16 kernel.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bf16_pairs_by_k(
    a: &[u32],
    lda: usize,
    (m, k): (usize, usize),
    b: &[f32],
    bm: super::gemm::Mat,
    c: &mut [f32],
    cm: super::gemm::Mat,
    accumulate: bool,
    threads: usize,
) {
    assert!(
        lda >= m && lda.is_multiple_of(ROW_BLOCK) && a.len() >= k.div_ceil(2) * lda,
        "gemm_bf16_pairs_by_k: a too short"
    );
    gemm_lhs(
        Lhs::PairsByK { ptr: a.as_ptr(), lda },
        (m, k),
        b,
        bm,
        c,
        cm,
        accumulate,
        threads,
    );
}

/// The shared checks and call of every entry, once `a` is described (the
/// callers check it against its shape).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn gemm_lhs(
    lhs: Lhs,
    (m, k): (usize, usize),
    b: &[f32],
    bm: super::gemm::Mat,
    c: &mut [f32],
    cm: super::gemm::Mat,
    accumulate: bool,
    threads: usize,
) {
    assert!(bf16_kernels_available(), "the bf16 kernel needs AVX512-BF16");
    assert!(
        bm.rows == k && cm.rows == m && cm.cols == bm.cols && cm.cs == 1,
        "bf16 product: shapes"
    );
    assert!(
        b.len() >= bm.span() && c.len() >= cm.span(),
        "bf16 product: slice too short"
    );
    if m == 0 || cm.cols == 0 {
        return;
    }
    let b = Operand {
        ptr: b.as_ptr(),
        rs: bm.rs,
        cs: bm.cs,
    };
    let c = Out {
        ptr: c.as_mut_ptr(),
        ld: cm.rs,
    };
    // SAFETY: the callers checked `a` against its shape; `b` and `c` above.
    unsafe { x86::gemm(m, cm.cols, k, lhs, b, c, accumulate, threads) }
}

/// A strided f32 matrix.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

/// The left operand of the x86 kernel: a strided f32 matrix it packs
/// itself, or rows already rounded to bf16 pairs (`lda` pairs apart, padded
/// with zero rows to a whole number of micro-kernel row blocks).
#[derive(Clone, Copy)]
enum Lhs {
    Strided(Operand),
    Pairs {
        ptr: *const u32,
        lda: usize,
    },
    /// Pair `p` of row `i` at `p·lda + i` (`lda` a multiple of the row block).
    PairsByK {
        ptr: *const u32,
        lda: usize,
    },
}

unsafe impl Send for Lhs {}
unsafe impl Sync for Lhs {}

/// A row-major f32 output (`ld` apart).
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ld: usize,
}

// SAFETY: the pointers are read (Operand) or written at disjoint rows (Out,
// one task per block of rows) while the slices they come from are borrowed by
// `gemm_bf16`'s caller for the whole call.
impl Out {
    /// Element `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` lies in the output.
    unsafe fn at(&self, i: usize, j: usize) -> *mut f32 {
        // SAFETY: forwarded from the caller.
        unsafe { self.ptr.add(i * self.ld + j) }
    }

    /// The distance between rows.
    fn ld(&self) -> usize {
        self.ld
    }
}

unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use rayon::prelude::*;

    use super::{lanes, pair, Lhs, Operand, Out};

    /// Rows of `c` per micro-kernel call (24 accumulators of 16 lanes).
    const MR: usize = super::ROW_BLOCK;
    /// Columns of `c` per micro-kernel call (two 16-lane vectors).
    const NR: usize = 32;
    /// Pairs of `k` per block: the packed `b` panel (`KCP × NR` pairs, 16 KB)
    /// stays in L1 while the micro-kernel sweeps the rows.
    const KCP: usize = 128;
    /// Rows of `a` packed at a time (`MC × KCP` pairs, 48 KB, in L2).
    const MC: usize = 8 * MR;

    thread_local! {
        static A_PACK: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    }

    /// 16 f32 at `p` (the first `n` lanes; zeros elsewhere) rounded to bf16,
    /// one per 32-bit lane (low half).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn load_bf16_lanes(p: *const f32, n: usize) -> __m512i {
        // SAFETY: the masked load touches only the first `n` lanes, which
        // the caller guarantees are readable.
        let v = unsafe { _mm512_maskz_loadu_ps(lanes(n), p) };
        let h: __m256i = unsafe { std::mem::transmute(_mm512_cvtneps_pbh(v)) };
        _mm512_cvtepu16_epi32(h)
    }

    /// 16 f32 at `p` with stride `s` (the first `n` lanes) rounded to bf16,
    /// one per 32-bit lane.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn gather_bf16_lanes(p: *const f32, s: usize, n: usize) -> __m512i {
        let mut buf = [0f32; 16];
        for (l, v) in buf.iter_mut().enumerate().take(n) {
            // SAFETY: the caller guarantees the first `n` strided elements are readable.
            *v = unsafe { *p.add(l * s) };
        }
        unsafe { load_bf16_lanes(buf.as_ptr(), 16) }
    }

    /// See [`super::row_to_pairs`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn row_to_pairs(src: &[f32], dst: &mut [u32]) {
        let (kc, kcp) = (src.len(), src.len().div_ceil(2));
        let mut k = 0;
        while k < kc {
            let left = kc - k;
            // SAFETY: the masked loads read `src[k..kc]` only, the masked
            // store writes pairs `k/2..kcp` of `dst` only.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(lanes(left), src.as_ptr().add(k));
                let hi = if left > 16 {
                    _mm512_maskz_loadu_ps(lanes(left - 16), src.as_ptr().add(k + 16))
                } else {
                    _mm512_setzero_ps()
                };
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let p = k / 2;
                _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(p).cast(), lanes((kcp - p).min(16)), v);
            }
            k += 32;
        }
    }

    /// See [`super::interleave_pairs`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave_pairs(even: &[f32], odd: Option<&[f32]>, dst: &mut [u32]) {
        let n = even.len();
        let mut i = 0;
        while i < n {
            let cols = (n - i).min(16);
            // SAFETY: `cols` lanes from `i` lie in both rows and in `dst`.
            unsafe {
                let lo = load_bf16_lanes(even.as_ptr().add(i), cols);
                let v = match odd {
                    Some(o) => _mm512_or_si512(lo, _mm512_slli_epi32::<16>(load_bf16_lanes(o.as_ptr().add(i), cols))),
                    None => lo,
                };
                _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(i).cast(), lanes(cols), v);
            }
            i += 16;
        }
    }

    /// Column `k` of `a`, rows `r..r + n` (`n` ≤ 16), rounded to bf16, one
    /// per 32-bit lane.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn column(a: Operand, r: usize, k: usize, n: usize) -> __m512i {
        // SAFETY: the caller guarantees the `n` elements lie in `a`'s view.
        unsafe {
            let src = a.ptr.add(r * a.rs + k * a.cs);
            if a.rs == 1 {
                load_bf16_lanes(src, n)
            } else {
                gather_bf16_lanes(src, a.rs, n)
            }
        }
    }

    /// Packs rows `r0..r0 + rows` and `k0..k0 + kc` of `a` for the
    /// micro-kernel, pair `p` holding `k = 2p, 2p+1` (low half first); rows
    /// past `rows` and the `k` past `kc` are zeros. Row block `rb` starts at
    /// `rb·MR·kcp`; inside it, where `a`'s rows run along `k` (`cs == 1`),
    /// row `i` is at `i·kcp` and its pair `p` at `+ p` (returns true);
    /// otherwise pair `p` is at `p·MR` and its row `i` at `+ i` (returns false).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_a(a: Operand, r0: usize, rows: usize, k0: usize, kc: usize, out: &mut [u32]) -> bool {
        let kcp = kc.div_ceil(2);
        let blocks = rows.div_ceil(MR);
        debug_assert!(out.len() >= blocks * MR * kcp);
        // SAFETY (all blocks): every element read is `a[r][k]` with
        // `r < r0 + rows` and `k < k0 + kc`, inside the caller's view.
        if a.cs == 1 {
            // Each row's `k` run is contiguous: 32 f32 → 16 pairs at a time.
            for r in 0..blocks * MR {
                let dst = &mut out[r * kcp..(r + 1) * kcp];
                if r >= rows {
                    dst.fill(0);
                    continue;
                }
                // SAFETY: row `r0 + r`, `k0..k0 + kc`, lies in `a`'s view.
                let src = unsafe { std::slice::from_raw_parts(a.ptr.add((r0 + r) * a.rs + k0), kc) };
                unsafe { row_to_pairs(src, dst) };
            }
        } else {
            // Rows are contiguous (`rs == 1`) or strided: two `k` columns
            // of the block's rows at a time, interleaved into pairs; this
            // layout keeps the pairs of one `p` together (`p·MR + i`). The
            // row blocks are the inner loop, so each `k` column is read
            // along its whole run of rows at once.
            for p in 0..kcp {
                let k = k0 + 2 * p;
                for rb in 0..blocks {
                    let base = rb * MR;
                    let n = (rows - base).min(MR);
                    let lo = unsafe { column(a, r0 + base, k, n) };
                    let hi = if 2 * p + 1 < kc {
                        _mm512_slli_epi32::<16>(unsafe { column(a, r0 + base, k + 1, n) })
                    } else {
                        _mm512_setzero_si512()
                    };
                    let v = _mm512_or_si512(lo, hi);
                    // SAFETY: `MR` lanes (zeros past `n`) land at
                    // `(rb·kcp + p)·MR..`, inside the packed rows.
                    unsafe { _mm512_mask_storeu_epi32(out.as_mut_ptr().add((rb * kcp + p) * MR).cast(), lanes(MR), v) };
                }
            }
        }
        a.cs == 1
    }

    /// Packs `k0..k0 + kc` of `b` (all `n` columns): panel `q` (columns
    /// `q·NR..`) at `q·kcp·NR`, pair `p` of it at `+ p·NR`, column `j` at
    /// `+ j`; columns past `n` and the `k` past `kc` are zeros.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_b(b: Operand, n: usize, k0: usize, kc: usize, out: &mut [u32]) {
        let kcp = kc.div_ceil(2);
        let panels = n.div_ceil(NR);
        debug_assert!(out.len() >= panels * kcp * NR);
        // SAFETY (all branches): every element read is `b[k][j]` with
        // `k < k0 + kc` and `j < n`, inside the caller's view.
        if b.cs == 1 {
            // Rows are contiguous: rows `2p` and `2p + 1`, 16 columns at a
            // time, interleaved into the panel's pairs.
            for q in 0..panels {
                for p in 0..kcp {
                    let k = k0 + 2 * p;
                    for h in 0..2 {
                        let j0 = q * NR + h * 16;
                        let dst = &mut out[(q * kcp + p) * NR + h * 16..][..16];
                        let cols = n.saturating_sub(j0).min(16);
                        if cols == 0 {
                            dst.fill(0);
                            continue;
                        }
                        // SAFETY: columns `j0..j0 + cols` of row `k` lie in `b`'s view.
                        let row = |k: usize| unsafe { std::slice::from_raw_parts(b.ptr.add(k * b.rs + j0), cols) };
                        unsafe { interleave_pairs(row(k), (2 * p + 1 < kc).then(|| row(k + 1)), &mut dst[..cols]) };
                        dst[cols..].fill(0);
                    }
                }
            }
        } else if b.rs == 1 {
            // Columns run along `k`: 16 pairs of each of 16 columns at a
            // time, converted along the column into a tile, then the tile
            // written out transposed (pair-major).
            let mut tile = [[0u32; 16]; 16];
            for q in 0..panels {
                for h in 0..2 {
                    let j0 = q * NR + h * 16;
                    let cols = n.saturating_sub(j0).min(16);
                    for p0 in (0..kcp).step_by(16) {
                        let np = (kcp - p0).min(16);
                        let left = kc - 2 * p0;
                        for (j, row) in tile.iter_mut().enumerate() {
                            if j >= cols {
                                *row = [0; 16];
                                continue;
                            }
                            let src = unsafe { b.ptr.add(k0 + 2 * p0 + (j0 + j) * b.cs) };
                            let lo = unsafe { _mm512_maskz_loadu_ps(lanes(left), src) };
                            let hi = if left > 16 {
                                unsafe { _mm512_maskz_loadu_ps(lanes(left - 16), src.add(16)) }
                            } else {
                                _mm512_setzero_ps()
                            };
                            let v: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo)) };
                            unsafe { _mm512_storeu_si512(row.as_mut_ptr().cast(), v) };
                        }
                        for pp in 0..np {
                            let dst = &mut out[(q * kcp + p0 + pp) * NR + h * 16..][..16];
                            for (j, d) in dst.iter_mut().enumerate() {
                                *d = tile[j][pp];
                            }
                        }
                    }
                }
            }
        } else {
            // Strided both ways: element by element.
            for q in 0..panels {
                let panel = &mut out[q * kcp * NR..(q + 1) * kcp * NR];
                for j in 0..NR {
                    let col = q * NR + j;
                    for p in 0..kcp {
                        panel[p * NR + j] = if col >= n {
                            0
                        } else {
                            let at = |k: usize| unsafe { *b.ptr.add(k * b.rs + col * b.cs) };
                            let k = k0 + 2 * p;
                            let hi = if 2 * p + 1 < kc { at(k + 1) } else { 0.0 };
                            pair(at(k), hi)
                        };
                    }
                }
            }
        }
    }

    /// `c[0..rows][0..cols] (+)= a_block · b_panel` over `kcp` pairs; `a`'s
    /// pair `(i, p)` at `i·lda + p` when `ROW_RUNS`, at `p·lda + i` otherwise.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const ROW_RUNS: bool>(
        ap: *const u32,
        lda: usize,
        kcp: usize,
        bp: *const u32,
        c: *mut f32,
        ld: usize,
        rows: usize,
        cols: usize,
        first: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kcp {
            // SAFETY: the packed buffers hold `MR` rows × `kcp` pairs and
            // `kcp` pairs × `NR` columns.
            let (b0, b1): (__m512bh, __m512bh) = unsafe {
                (
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(p * NR).cast())),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(p * NR + 16).cast())),
                )
            };
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = if ROW_RUNS { i * lda + p } else { p * lda + i };
                let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(*ap.add(at) as i32)) };
                acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
            }
        }
        let m0 = lanes(cols);
        let m1 = lanes(cols.saturating_sub(16));
        for (i, acc) in acc.iter().enumerate().take(rows) {
            // SAFETY: row `i < rows` and the masked lanes `< cols` are inside `c`.
            unsafe {
                let row = c.add(i * ld);
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if !first {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                if m1 != 0 {
                    _mm512_mask_storeu_ps(row.add(16), m1, v1);
                }
            }
        }
    }

    /// The blocked product; see [`super::gemm_bf16`].
    ///
    /// # Safety
    /// The views cover `m × k`, `k × n` and `m × n` elements of live buffers,
    /// `c` is not aliased, and the CPU has AVX-512F/BW and AVX512-BF16.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: Lhs,
        b: Operand,
        c: Out,
        accumulate: bool,
        threads: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let kc_full = 2 * KCP;
        let kblocks = k.div_ceil(kc_full).max(1);
        let panels = n.div_ceil(NR);
        // `b` packed once, block by block.
        let block_len = panels * KCP * NR;
        let mut bpack = vec![0u32; kblocks * block_len];
        let pack_one = |(kb, out): (usize, &mut [u32])| {
            let k0 = kb * kc_full;
            let kc = (k - k0.min(k)).min(kc_full);
            // SAFETY: forwarded from the caller.
            unsafe { pack_b(b, n, k0, kc, out) };
        };
        if threads > 1 && kblocks > 1 {
            bpack.par_chunks_mut(block_len).enumerate().for_each(pack_one);
        } else {
            bpack.chunks_mut(block_len).enumerate().for_each(pack_one);
        }
        // Tasks: blocks of `MC` rows × groups of panels, enough for the pool.
        let mblocks = m.div_ceil(MC);
        let groups = if threads > 1 {
            (2 * threads).div_ceil(mblocks).clamp(1, panels)
        } else {
            1
        };
        let per_group = panels.div_ceil(groups);
        let task = |t: usize| {
            let (mb, g) = (t / groups, t % groups);
            let r0 = mb * MC;
            let rows = (m - r0).min(MC);
            let (q0, q1) = (g * per_group, ((g + 1) * per_group).min(panels));
            if q0 >= q1 {
                return;
            }
            A_PACK.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.resize(MC * KCP, 0);
                for kb in 0..kblocks {
                    let k0 = kb * kc_full;
                    let kc = (k - k0.min(k)).min(kc_full);
                    let kcp = kc.div_ceil(2);
                    let first = kb == 0 && !accumulate;
                    // `a`'s block: packed here, or read where the caller packed it.
                    let (row_runs, base, lda, block_stride) = match a {
                        Lhs::Strided(a) => {
                            // SAFETY: forwarded from the caller.
                            let row_runs = unsafe { pack_a(a, r0, rows, k0, kc, &mut buf) };
                            let lda = if row_runs { kcp } else { MR };
                            (row_runs, buf.as_ptr(), lda, MR * kcp)
                        }
                        // SAFETY: the caller's rows hold `lda` pairs each,
                        // padded to whole row blocks.
                        Lhs::Pairs { ptr, lda } => (true, unsafe { ptr.add(r0 * lda + kb * KCP) }, lda, MR * lda),
                        // SAFETY: the caller's pairs of `k` hold `lda` rows
                        // each, padded to whole row blocks.
                        Lhs::PairsByK { ptr, lda } => (false, unsafe { ptr.add(kb * KCP * lda + r0) }, lda, MR),
                    };
                    let bblock = &bpack[kb * block_len..];
                    for q in q0..q1 {
                        let cols = (n - q * NR).min(NR);
                        let bp = bblock[q * kcp * NR..].as_ptr();
                        for rb in 0..rows.div_ceil(MR) {
                            // SAFETY: inside the packed block (see above).
                            let ap = unsafe { base.add(rb * block_stride) };
                            // SAFETY: rows `r0 + rb·MR..` and columns
                            // `q·NR..` of `c` belong to this task alone.
                            unsafe {
                                let cp = c.at(r0 + rb * MR, q * NR);
                                let (r, ld) = ((rows - rb * MR).min(MR), c.ld());
                                if row_runs {
                                    micro::<true>(ap, lda, kcp, bp, cp, ld, r, cols, first);
                                } else {
                                    micro::<false>(ap, lda, kcp, bp, cp, ld, r, cols, first);
                                }
                            }
                        }
                    }
                }
            });
        };
        let tasks = mblocks * groups;
        if threads > 1 && tasks > 1 {
            (0..tasks).into_par_iter().with_max_len(1).for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free rounding gives `half`'s bits (to nearest even) on
    /// ties, halfway cases, the largest finite values, infinities,
    /// subnormals and NaNs (which stay NaNs).
    #[test]
    fn round_bits_rounds_to_nearest_even() {
        let mut values: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            3.0e38,
        ];
        // exact ties (round to even either way), just above and below them
        for base in [0x3F80_8000u32, 0x3F81_8000, 0xBF80_8000, 0x4049_0FDB, 0x7F7F_8000] {
            values.extend([base, base + 1, base - 1].map(f32::from_bits));
        }
        values.extend(crate::ops::testing::hashed_values(4096, 9));
        for v in values {
            assert_eq!(
                round_bits(v),
                half::bf16::from_f32(v).to_bits(),
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
        for nan in [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFFC1_2345),
        ] {
            assert_eq!(
                round_bits(nan),
                half::bf16::from_f32(nan).to_bits(),
                "{:#x}",
                nan.to_bits()
            );
            assert!(half::bf16::from_bits(round_bits(nan)).is_nan());
        }
    }
    use crate::ops::gemm::Mat;

    #[test]
    fn the_setting_is_scoped_to_the_thread_and_restored() {
        assert_eq!(Precision::current(), Precision::F32);
        let inner = Precision::Bf16.scope(|| {
            let other = std::thread::spawn(Precision::current).join().unwrap();
            (Precision::current(), other)
        });
        assert_eq!(inner, (Precision::Bf16, Precision::F32));
        assert_eq!(Precision::current(), Precision::F32);
        let caught = std::panic::catch_unwind(|| Precision::Bf16.scope(|| panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(Precision::current(), Precision::F32, "restored after a panic");
        assert_eq!(serde_json::to_string(&Precision::Bf16).unwrap(), "\"bf16\"");
        assert_eq!(Precision::F32.describe(), "f32");
        assert_eq!(Precision::F32.effective(), Precision::F32);
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(round_to_bf16(1.0), 1.0);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(round_to_bf16(-3.0), -3.0);
    }

    /// `a · b` with the operands rounded to bf16 and the sums in f64: what
    /// the kernel computes, up to the f32 rounding of its sums.
    fn naive(m: usize, n: usize, k: usize, a: &[f32], am: Mat, b: &[f32], bm: Mat) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| {
                        f64::from(round_to_bf16(a[i * am.rs + p * am.cs]))
                            * f64::from(round_to_bf16(b[p * bm.rs + j * bm.cs]))
                    })
                    .sum();
            }
        }
        c
    }

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + seed) * 0.7311).sin() * 1.7).collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_kernel_matches_bf16_operands_summed_exactly_in_every_layout() {
        if !bf16_kernels_available() {
            eprintln!(
                "skipped: no AVX512-BF16 kernel on this CPU ({})",
                Precision::Bf16.describe()
            );
            return;
        }
        // Shapes that cross every block edge: k past one block (256) and odd,
        // rows past MC (96) and not a multiple of MR (12), columns past NR (32).
        for &(m, n, k) in &[(1, 1, 1), (13, 33, 3), (100, 47, 257), (200, 70, 530), (37, 129, 64)] {
            for layout in 0..8 {
                let (ta, tb, tc) = (layout & 1 == 1, layout & 2 == 2, layout & 4 == 4);
                let a = data(m * k, 1.0);
                let b = data(k * n, 2.0);
                let (am, bm, cm) = (Mat::stored(m, k, ta), Mat::stored(k, n, tb), Mat::stored(m, n, tc));
                let want = naive(m, n, k, &a, am, &b, bm);
                for threads in [1, 3] {
                    for accumulate in [false, true] {
                        let mut c = vec![0.5f32; m * n];
                        gemm_bf16(&a, am, &b, bm, &mut c, cm, accumulate, threads);
                        for i in 0..m {
                            for j in 0..n {
                                let got = f64::from(c[i * cm.rs + j * cm.cs]);
                                let w = want[i * n + j] + if accumulate { 0.5 } else { 0.0 };
                                // f32 sums of k terms up to 1.7² each.
                                let tol = 1e-6 * (k as f64) * 3.0 + 1e-6;
                                assert!(
                                    (got - w).abs() <= tol,
                                    "{m}x{n}x{k} layout {layout} threads {threads} acc {accumulate} ({i},{j}): {got} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rows_given_as_pairs_give_the_packed_kernel_result() {
        if !bf16_kernels_available() {
            eprintln!("skipped: no AVX512-BF16 kernel on this CPU");
            return;
        }
        for &(m, n, k) in &[(1, 5, 1), (13, 33, 9), (100, 47, 257), (30, 64, 600)] {
            let a = data(m * k, 5.0);
            let b = data(k * n, 6.0);
            let kp = k.div_ceil(2) + 3; // rows further apart than they need be
            let mut pairs = vec![0u32; m.div_ceil(ROW_BLOCK) * ROW_BLOCK * kp];
            for (r, dst) in pairs.chunks_mut(kp).take(m).enumerate() {
                row_to_pairs(&a[r * k..(r + 1) * k], dst);
            }
            let (am, bm, cm) = (Mat::row_major(m, k), Mat::row_major(k, n), Mat::row_major(m, n));
            for accumulate in [false, true] {
                let mut from_pairs = vec![0.25f32; m * n];
                gemm_bf16_pairs(&pairs, kp, (m, k), &b, bm, &mut from_pairs, cm, accumulate, 2);
                let mut packed = vec![0.25f32; m * n];
                gemm_bf16(&a, am, &b, bm, &mut packed, cm, accumulate, 1);
                assert_eq!(from_pairs, packed, "{m}x{n}x{k} accumulate {accumulate}");
            }
            // The same `a` stored transposed (`k × m`), given by pairs of `k`.
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let lda = m.div_ceil(ROW_BLOCK) * ROW_BLOCK;
            let mut by_k = vec![7u32; k.div_ceil(2) * lda];
            for (p, dst) in by_k.chunks_mut(lda).enumerate() {
                let odd = (2 * p + 1 < k).then(|| &at[(2 * p + 1) * m..(2 * p + 2) * m]);
                interleave_pairs(&at[2 * p * m..(2 * p + 1) * m], odd, &mut dst[..m]);
                dst[m..].fill(0);
            }
            let mut from_by_k = vec![0.25f32; m * n];
            gemm_bf16_pairs_by_k(&by_k, lda, (m, k), &b, bm, &mut from_by_k, cm, true, 2);
            let mut packed = vec![0.25f32; m * n];
            gemm_bf16(&at, Mat::row_major(k, m).t(), &b, bm, &mut packed, cm, true, 1);
            assert_eq!(from_by_k, packed, "{m}x{n}x{k} by k");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        if !bf16_kernels_available() {
            eprintln!("skipped: no AVX512-BF16 kernel on this CPU");
            return;
        }
        let (m, n, k) = (300, 90, 600);
        let a = data(m * k, 3.0);
        let b = data(k * n, 4.0);
        let run = |threads| {
            let mut c = vec![0f32; m * n];
            gemm_bf16(
                &a,
                Mat::row_major(k, m).t(),
                &b,
                Mat::row_major(k, n),
                &mut c,
                Mat::row_major(m, n),
                false,
                threads,
            );
            c
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(5));
    }
}
