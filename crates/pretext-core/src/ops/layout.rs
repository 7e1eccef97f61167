//! Channels-last ↔ channels-first as single graph nodes.
//!
//! candle's `permute(..).contiguous()` copies element by element through a
//! strided index, and its backward adds the permuted gradient (a strided view)
//! into a freshly zeroed buffer: for a `(64, 7, 7, 128)` map the round trip
//! took several milliseconds of a conv VAE step. Here each direction is one
//! parallel pass of per-image `(pixels, channels)` transposes, and the
//! backward is the other direction.

use super::fast_path;
use super::fused::{apply, FusedOp, Operand};
use candle_core::{bail, Shape, Tensor};
use rayon::prelude::*;

/// Per image, the row-major `(rows, cols)` block of `x` transposed into `(cols, rows)`.
fn transpose_images(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let per = rows * cols;
    let mut y = vec![0f32; x.len()];
    if per == 0 {
        return y;
    }
    const B: usize = 16;
    y.par_chunks_mut(per).zip(x.par_chunks(per)).for_each(|(y, x)| {
        for r0 in (0..rows).step_by(B) {
            for c0 in (0..cols).step_by(B) {
                for r in r0..(r0 + B).min(rows) {
                    for c in c0..(c0 + B).min(cols) {
                        y[c * rows + r] = x[r * cols + c];
                    }
                }
            }
        }
    });
    y
}

/// `(n, h, w, c)` → `(n, c, h, w)` when `to_nchw`, else `(n, c, h, w)` → `(n, h, w, c)`.
struct Relayout {
    to_nchw: bool,
}

impl FusedOp<1> for Relayout {
    const NAME: &'static str = "pretext-relayout";

    fn name(&self) -> &'static str {
        if self.to_nchw {
            "pretext-nhwc-to-nchw"
        } else {
            "pretext-nchw-to-nhwc"
        }
    }

    fn forward(&self, [input]: [Operand<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let &[n, a, b, c] = input.dims else {
            bail!("{}: expects a 4-d tensor, got {:?}", self.name(), input.dims)
        };
        let x = input.data;
        Ok(if self.to_nchw {
            // (n, h=a, w=b, c) → (n, c, h, w): per image (h·w, c) → (c, h·w)
            (transpose_images(x, a * b, c), Shape::from((n, c, a, b)))
        } else {
            // (n, c=a, h=b, w=c) → (n, h, w, c): per image (c, h·w) → (h·w, c)
            (transpose_images(x, a, b * c), Shape::from((n, b, c, a)))
        })
    }

    fn backward(&self, _x: [&Tensor; 1], _y: &Tensor, dy: &Tensor) -> candle_core::Result<[Option<Tensor>; 1]> {
        Ok([Some(apply([&dy.contiguous()?], Relayout { to_nchw: !self.to_nchw })?)])
    }
}

/// Channels-last `(n, h, w, c)` → channels-first `(n, c, h, w)`, contiguous.
///
/// # Errors
/// Not a 4-d tensor.
pub fn nhwc_to_nchw(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x]) {
        apply([&x.contiguous()?], Relayout { to_nchw: true })
    } else {
        x.permute((0, 3, 1, 2))?.contiguous()
    }
}

/// Channels-first `(n, c, h, w)` → channels-last `(n, h, w, c)`, contiguous.
///
/// # Errors
/// Not a 4-d tensor.
pub fn nchw_to_nhwc(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x]) {
        apply([&x.contiguous()?], Relayout { to_nchw: false })
    } else {
        x.permute((0, 2, 3, 1))?.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn both_directions_and_their_gradients_match_permute() -> candle_core::Result<()> {
        // odd sizes that do not fill the 16 × 16 transpose blocks
        let dims = [3usize, 5, 7, 19];
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 - 500.0).collect();
        let x = Var::from_tensor(&Tensor::from_vec(vals, &dims[..], &Device::Cpu)?)?;
        let g = Tensor::from_vec(
            (0..n)
                .map(|i| ((i * 104_729) % 997) as f32 / 97.0)
                .collect::<Vec<f32>>(),
            (3, 19, 5, 7),
            &Device::Cpu,
        )?;
        let y = nhwc_to_nchw(x.as_tensor())?;
        let r = x.as_tensor().permute((0, 3, 1, 2))?.contiguous()?;
        assert_eq!(y.dims(), r.dims());
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, r.flatten_all()?.to_vec1::<f32>()?);
        let back = nchw_to_nhwc(&y)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            x.as_tensor().flatten_all()?.to_vec1::<f32>()?
        );
        let gy = (y * &g)?.sum_all()?.backward()?;
        let gr = (r * &g)?.sum_all()?.backward()?;
        let (a, b) = (
            gy.get(x.as_tensor()).expect("grad"),
            gr.get(x.as_tensor()).expect("grad"),
        );
        assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        let e = nhwc_to_nchw(&Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?).expect_err("2-d");
        assert!(e.to_string().contains("4-d"), "{e}");
        Ok(())
    }
}
