//! A bounds-checked f32 matrix product on the `gemm` crate's blocked
//! driver, with the micro-kernels of the [`KernelSet`] this process chose:
//! AVX-512F, AVX2 + FMA or portable Rust. (`gemm::gemm` picks its kernels
//! itself and cannot be told to use narrower ones; driving
//! `gemm_common::gemm::gemm_basic_generic` with `gemm_f32`'s kernels directly is
//! what `gemm::gemm` does inside, with the choice made here.)

use gemm_common::simd::MixedSimd;

use super::bf16::Precision;
use crate::cpu::KernelSet;

/// A strided matrix view: `rows × cols`, element `(i, j)` at `i * rs + j * cs`.
#[derive(Debug, Clone, Copy)]
pub struct Mat {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl Mat {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// A `rows × cols` matrix stored row-major, or column-major (the
    /// transpose of a row-major `cols × rows`) when `column_major`.
    pub fn stored(rows: usize, cols: usize, column_major: bool) -> Self {
        if column_major {
            Self::row_major(cols, rows).t()
        } else {
            Self::row_major(rows, cols)
        }
    }

    /// The same storage read as the transpose.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Elements a slice needs to hold this view (0 when it is empty).
    pub(crate) fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// Whether this CPU can run the kernels of `k`.
pub(crate) fn kernels_available(k: KernelSet) -> bool {
    match k {
        KernelSet::Portable => true,
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        KernelSet::Avx2 => <gemm_common::simd::V3 as MixedSimd<f32, f32, f32, f32>>::try_new().is_some(),
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        KernelSet::Avx512 => <gemm_common::simd::V4 as MixedSimd<f32, f32, f32, f32>>::try_new().is_some(),
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        KernelSet::Avx2 | KernelSet::Avx512 => false,
    }
}

/// One call of the blocked driver with one ISA's micro-kernels (`$n` lanes).
macro_rules! blocked {
    ($simd:ty, $lanes:expr, $ukr:ident, $m:expr, $n:expr, $k:expr, $dst:expr, $a:expr, $b:expr, $read:expr, $par:expr) => {{
        use gemm_f32::microkernel::$ukr::f32 as u;
        let simd = <$simd as MixedSimd<f32, f32, f32, f32>>::try_new()
            .expect("the kernel set was checked against this CPU when it was chosen");
        let (dst, (dcs, drs)) = $dst;
        let (a, (acs, ars)) = $a;
        let (b, (bcs, brs)) = $b;
        gemm_common::gemm::gemm_basic_generic::<
            _,
            f32,
            { $lanes },
            { u::MR_DIV_N * $lanes },
            { u::NR },
            { u::MR_DIV_N },
            { u::H_M },
            { u::H_N },
        >(
            simd,
            $m,
            $n,
            $k,
            dst,
            dcs,
            drs,
            $read,
            a,
            acs,
            ars,
            b,
            bcs,
            brs,
            1.0,
            1.0,
            false,
            false,
            false,
            |x, y, z| x * y + z,
            &u::UKR,
            &u::H_UKR,
            false,
            $par,
        )
    }};
}

/// `c = a · b` (or `c += a · b` with `accumulate`) with the kernels of
/// `kernels`, on `threads` workers of the current rayon pool.
///
/// # Panics
/// If the shapes disagree, a slice is too short for its view (a bug in the
/// caller), or `kernels` is not [available](KernelSet::is_available) here.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with(
    kernels: KernelSet,
    a: &[f32],
    am: Mat,
    b: &[f32],
    bm: Mat,
    c: &mut [f32],
    cm: Mat,
    accumulate: bool,
    threads: usize,
) {
    check_views(a, am, b, bm, c, cm);
    assert!(
        kernels.is_available(),
        "the {kernels} kernels need a CPU this one is not"
    );
    let (m, n, k) = (cm.rows, cm.cols, am.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * cm.rs + j * cm.cs] = 0.0;
                }
            }
        }
        return;
    }
    // The kernels write columns of `c`; a row-major `c` is computed as
    // `cᵀ = bᵀ · aᵀ`, as `gemm::gemm` does.
    let (m, n, a, am, b, bm, cm) = if cm.cs < cm.rs {
        (n, m, b, bm.t(), a, am.t(), cm.t())
    } else {
        (m, n, a, am, b, bm, cm)
    };
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let dst = (c.as_mut_ptr(), (cm.cs as isize, cm.rs as isize));
    let lhs = (a.as_ptr(), (am.cs as isize, am.rs as isize));
    let rhs = (b.as_ptr(), (bm.cs as isize, bm.rs as isize));
    // SAFETY: every index the kernels touch lies inside the spans checked
    // above, and the kernels' instruction sets were detected on this CPU.
    unsafe {
        match kernels {
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            KernelSet::Avx512 => blocked!(
                gemm_common::simd::V4,
                16,
                avx512f,
                m,
                n,
                k,
                dst,
                lhs,
                rhs,
                accumulate,
                par
            ),
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            KernelSet::Avx2 => blocked!(gemm_common::simd::V3, 8, fma, m, n, k, dst, lhs, rhs, accumulate, par),
            _ => blocked!(
                gemm_common::simd::Scalar,
                1,
                scalar,
                m,
                n,
                k,
                dst,
                lhs,
                rhs,
                accumulate,
                par
            ),
        }
    }
}

/// `c = a · b` (or `c += a · b` with `accumulate`), single-threaded.
///
/// # Panics
/// If the shapes disagree or a slice is too short for its view (a bug in the caller).
pub fn sgemm(a: &[f32], am: Mat, b: &[f32], bm: Mat, c: &mut [f32], cm: Mat, accumulate: bool) {
    sgemm_threads(a, am, b, bm, c, cm, accumulate, 1);
}

/// [`sgemm`] split over `threads` workers of the current rayon pool (1 = this thread only).
///
/// # Panics
/// If the shapes disagree or a slice is too short for its view (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_threads(a: &[f32], am: Mat, b: &[f32], bm: Mat, c: &mut [f32], cm: Mat, accumulate: bool, threads: usize) {
    sgemm_with(KernelSet::current(), a, am, b, bm, c, cm, accumulate, threads);
}

/// `c = a · b` (or `c += a · b` with `accumulate`) with operands in
/// `precision` where this CPU has a kernel for it ([`Precision::effective`]),
/// in f32 with the [`KernelSet::current`] kernels otherwise, on `threads`
/// workers of the current rayon pool. The result does not depend on `threads`.
///
/// # Panics
/// If the shapes disagree or a slice is too short for its view (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn product(
    precision: Precision,
    a: &[f32],
    am: Mat,
    b: &[f32],
    bm: Mat,
    c: &mut [f32],
    cm: Mat,
    accumulate: bool,
    threads: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if precision.effective() == Precision::Bf16 && am.cols > 0 {
        check_views(a, am, b, bm, c, cm);
        return super::bf16::gemm_bf16(a, am, b, bm, c, cm, accumulate, threads);
    }
    let _ = precision;
    sgemm_with(KernelSet::current(), a, am, b, bm, c, cm, accumulate, threads);
}

fn check_views(a: &[f32], am: Mat, b: &[f32], bm: Mat, c: &[f32], cm: Mat) {
    assert_eq!(am.cols, bm.rows, "inner dimensions");
    assert_eq!(cm.rows, am.rows, "rows");
    assert_eq!(cm.cols, bm.cols, "cols");
    assert!(
        a.len() >= am.span() && b.len() >= bm.span() && c.len() >= cm.span(),
        "slice too short"
    );
}

/// A strided view into a slice: element `(i, j)` at `off + i * rs + j * cs`.
#[derive(Debug, Clone, Copy)]
pub struct View {
    /// Offset of element (0, 0).
    pub off: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

fn span(v: View, rows: usize, cols: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        v.off + (rows - 1) * v.rs + (cols - 1) * v.cs + 1
    }
}

/// `c (m × n) = a (m × k) · b (k × n)`, or `c += …` with `accumulate`, with
/// operands in `precision` (see [`product`]); `threads` > 1 splits the
/// product over the rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    precision: Precision,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    c: &mut [f32],
    cv: View,
    accumulate: bool,
    threads: usize,
) {
    assert!(
        a.len() >= span(av, m, k) && b.len() >= span(bv, k, n) && c.len() >= span(cv, m, n),
        "matmul: a view runs past its buffer"
    );
    if m == 0 || n == 0 {
        return;
    }
    let mat = |v: View, rows: usize, cols: usize| Mat {
        rows,
        cols,
        rs: v.rs,
        cs: v.cs,
    };
    let a = if k == 0 { &a[..0] } else { &a[av.off..] };
    let b = if k == 0 { &b[..0] } else { &b[bv.off..] };
    product(
        precision,
        a,
        mat(av, m, k),
        b,
        mat(bv, k, n),
        &mut c[cv.off..],
        mat(cv, m, n),
        accumulate,
        threads,
    );
}

/// A row-major `(…, cols)` matrix from offset 0.
pub fn row_major(cols: usize) -> View {
    View {
        off: 0,
        rs: cols,
        cs: 1,
    }
}

/// The transpose of a row-major `(…, cols)` matrix from offset 0.
pub fn transposed(cols: usize) -> View {
    View {
        off: 0,
        rs: 1,
        cs: cols,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_with_transposes_and_accumulation() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut c = vec![1.0f32; m * n];
        sgemm(
            &a,
            Mat::row_major(m, k),
            &b,
            Mat::row_major(k, n),
            &mut c,
            Mat::row_major(m, n),
            true,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
        // a stored as (k, m) and read transposed
        let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
        let mut c2 = vec![0.0f32; m * n];
        sgemm(
            &at,
            Mat::row_major(k, m).t(),
            &b,
            Mat::row_major(k, n),
            &mut c2,
            Mat::row_major(m, n),
            false,
        );
        for (x, y) in c.iter().zip(&c2) {
            assert!((x - 1.0 - y).abs() < 1e-5);
        }
    }

    /// `c` of `a (m × k) · b (k × n)` in f64, all row-major, and each entry's
    /// `Σ |a_ip · b_pj|`, the size its rounding error is relative to.
    fn naive(a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
        let mut c = vec![0.0f64; m * n];
        let mut size = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64);
                c[i * n + j] = terms.clone().sum();
                size[i * n + j] = terms.map(f64::abs).sum::<f64>() + 0.5;
            }
        }
        (c, size)
    }

    #[test]
    fn every_kernel_set_this_cpu_has_agrees_with_the_others_and_with_f64() {
        let sets: Vec<KernelSet> = KernelSet::ALL.into_iter().filter(|k| k.is_available()).collect();
        assert!(sets.contains(&KernelSet::Portable));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert!(
                sets.contains(&KernelSet::Avx512),
                "AVX-512F detected but its kernels are not chosen"
            );
        }
        // Shapes off every kernel's register tile (16·k and 8·k lanes), a
        // matrix-vector product, a long inner dimension, and an im2col-like one.
        for &(m, n, k) in &[
            (1, 1, 1),
            (17, 9, 33),
            (64, 1, 300),
            (1, 50, 7),
            (100, 37, 513),
            (49, 64, 288),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 + 3) as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 + 1) as f32 * 0.11).cos()).collect();
            let (want, size) = naive(&a, &b, (m, n, k));
            let mut results = Vec::new();
            for &set in &sets {
                for threads in [1, 2] {
                    // c row-major and column-major, so both operand orders run
                    for col_major in [false, true] {
                        let cm = Mat::stored(m, n, col_major);
                        let mut c = vec![0.5f32; m * n];
                        sgemm_with(
                            set,
                            &a,
                            Mat::row_major(m, k),
                            &b,
                            Mat::row_major(k, n),
                            &mut c,
                            cm,
                            true,
                            threads,
                        );
                        let c: Vec<f32> = (0..m * n).map(|idx| c[(idx / n) * cm.rs + (idx % n) * cm.cs]).collect();
                        for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                            let err = (got as f64 - 0.5 - w).abs() / size[idx];
                            assert!(
                                err < 1e-5,
                                "{set} ({m},{n},{k}) threads={threads} col_major={col_major} at {idx}: {got} vs {}",
                                w + 0.5
                            );
                        }
                        results.push((set, c));
                    }
                }
            }
            // the families against each other: within 1e-5 relative to each
            // entry's Σ|a·b| (the sums run in different orders)
            let (_, first) = &results[0];
            for (set, c) in &results {
                for ((x, y), s) in c.iter().zip(first).zip(&size) {
                    assert!(((x - y).abs() as f64) < 1e-5 * s, "{set} ({m},{n},{k}): {x} vs {y}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "slice too short")]
    fn a_view_past_its_slice_is_refused_before_any_kernel_runs() {
        let mut c = vec![0.0f32; 4];
        sgemm_with(
            KernelSet::Portable,
            &[1.0; 3],
            Mat::row_major(2, 2),
            &[1.0; 4],
            Mat::row_major(2, 2),
            &mut c,
            Mat::row_major(2, 2),
            false,
            1,
        );
    }
}
