//! A bounds-checked wrapper over the `gemm` crate's f32 matrix product.

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

    /// The same storage read as the transpose.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
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
    assert_eq!(am.cols, bm.rows, "inner dimensions");
    assert_eq!(cm.rows, am.rows, "rows");
    assert_eq!(cm.cols, bm.cols, "cols");
    assert!(
        a.len() >= am.span() && b.len() >= bm.span() && c.len() >= cm.span(),
        "slice too short"
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
    // SAFETY: every index the kernel touches lies inside the spans checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            cm.cs as isize,
            cm.rs as isize,
            accumulate,
            a.as_ptr(),
            am.cs as isize,
            am.rs as isize,
            b.as_ptr(),
            bm.cs as isize,
            bm.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
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

/// `c (m × n) = a (m × k) · b (k × n)`, or `c += …` with `accumulate`;
/// `threads` > 1 splits the product over the rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
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
    sgemm_threads(
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
}
