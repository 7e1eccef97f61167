//! The fast ops against candle's generic ops: values and gradients.

use super::*;
use crate::seed::stream_rng;
use candle_core::{Device, Var};
use rand::Rng;

fn rand_tensor(dims: &[usize], seed: u64) -> candle_core::Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut rng = stream_rng(seed, "test", &[]);
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// max |a - b| / max(|b|, 1e-3), over all elements.
fn rel_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    Ok(a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale)
}

type Case = (usize, usize, usize, usize, usize, usize, usize, usize); // n, h, w, c, o, k, stride, pad

const CONV_CASES: [Case; 9] = [
    (2, 8, 8, 3, 4, 3, 1, 1),
    (2, 8, 8, 3, 4, 3, 2, 1),
    (1, 7, 5, 2, 3, 3, 1, 0),
    (3, 9, 9, 4, 5, 3, 2, 0),
    (2, 6, 6, 5, 3, 1, 1, 0),
    (2, 7, 7, 4, 6, 1, 2, 0),
    (1, 1, 1, 3, 2, 1, 1, 0),
    (1, 5, 5, 1, 8, 3, 1, 1),
    (4, 11, 13, 6, 7, 3, 2, 1),
];

#[test]
fn conv_forward_and_gradients_match_candle() -> candle_core::Result<()> {
    for (i, &(n, h, w, c, o, k, s, p)) in CONV_CASES.iter().enumerate() {
        let x = Var::from_tensor(&rand_tensor(&[n, h, w, c], i as u64)?)?;
        let wt = Var::from_tensor(&rand_tensor(&[o, c, k, k], 100 + i as u64)?)?;
        let fast = conv2d_nhwc(x.as_tensor(), wt.as_tensor(), s, p)?;
        let slow = reference_conv2d_nhwc(x.as_tensor(), wt.as_tensor(), s, p)?;
        assert!(rel_err(&fast, &slow)? < 1e-4, "case {i}: forward");
        let r = rand_tensor(fast.dims(), 200 + i as u64)?;
        let gf = (fast * &r)?.sum_all()?.backward()?;
        let gs = (slow * &r)?.sum_all()?.backward()?;
        for (name, v) in [("input", &x), ("weight", &wt)] {
            let (a, b) = (gf.get(v.as_tensor()), gs.get(v.as_tensor()));
            let (Some(a), Some(b)) = (a, b) else {
                panic!("case {i}: no {name} gradient")
            };
            let e = rel_err(a, b)?;
            assert!(e < 1e-4, "case {i}: {name} gradient rel err {e}");
        }
    }
    Ok(())
}

#[test]
fn conv_on_an_untracked_input_skips_its_gradient() -> candle_core::Result<()> {
    let (n, h, w, c, o, k, s, p) = CONV_CASES[1];
    let x = rand_tensor(&[n, h, w, c], 1)?; // a batch of data: no gradient wanted
    let wt = Var::from_tensor(&rand_tensor(&[o, c, k, k], 2)?)?;
    let r = rand_tensor(&[n, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1, o], 3)?;
    let g = (conv2d_nhwc(&x, wt.as_tensor(), s, p)? * &r)?.sum_all()?.backward()?;
    assert!(g.get(&x).is_none(), "no gradient for the data");
    let tracked = Var::from_tensor(&x)?;
    let gt = (conv2d_nhwc(tracked.as_tensor(), wt.as_tensor(), s, p)? * &r)?
        .sum_all()?
        .backward()?;
    assert!(gt.get(tracked.as_tensor()).is_some(), "a variable input still gets one");
    let (a, b) = (
        g.get(wt.as_tensor()).expect("weight"),
        gt.get(wt.as_tensor()).expect("weight"),
    );
    assert_eq!(rel_err(a, b)?, 0.0, "the weight gradient does not depend on it");
    Ok(())
}

#[test]
fn batch_norm_train_and_eval_match_candle() -> candle_core::Result<()> {
    for (i, relu) in [(0u64, false), (1, true)] {
        let x = Var::from_tensor(&rand_tensor(&[3, 5, 4, 6], i)?.affine(2.0, 0.5)?)?;
        let g = Var::from_tensor(&(rand_tensor(&[6], 10 + i)? + 1.0)?)?;
        let b = Var::from_tensor(&rand_tensor(&[6], 20 + i)?)?;
        let r = rand_tensor(&[3, 5, 4, 6], 30 + i)?;
        let fixed = NormStats::Fixed(vec![0.1, -0.2, 0.0, 0.3, 0.5, -0.5], vec![1.0, 0.5, 2.0, 1.5, 0.8, 1.2]);
        for stats in [NormStats::Batch, fixed] {
            let (yf, sf) = batch_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), stats.clone(), 1e-5, relu)?;
            let (ys, ss) =
                reference_batch_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), stats.clone(), 1e-5, relu)?;
            assert!(rel_err(&yf, &ys)? < 1e-4, "forward relu={relu}");
            if let (Some((mf, vf)), Some((ms, vs))) = (sf, ss) {
                for (a, b) in mf.iter().zip(&ms).chain(vf.iter().zip(&vs)) {
                    assert!((a - b).abs() < 1e-4);
                }
            }
            let gf = (yf * &r)?.sum_all()?.backward()?;
            let gs = (ys * &r)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("gamma", &g), ("beta", &b)] {
                let (Some(a), Some(bb)) = (gf.get(v.as_tensor()), gs.get(v.as_tensor())) else {
                    panic!("no {name} gradient")
                };
                let e = rel_err(a, bb)?;
                assert!(e < 1e-4, "{name} gradient (relu={relu}, {stats:?}) rel err {e}");
            }
        }
    }
    Ok(())
}

#[test]
fn add_relu_and_pool_match_candle() -> candle_core::Result<()> {
    let a = Var::from_tensor(&rand_tensor(&[2, 3, 3, 4], 1)?)?;
    let b = Var::from_tensor(&rand_tensor(&[2, 3, 3, 4], 2)?)?;
    let fast = global_avg_pool_nhwc(&add_relu(a.as_tensor(), b.as_tensor())?)?;
    let slow = (a.as_tensor() + b.as_tensor())?.relu()?.mean((1, 2))?;
    assert!(rel_err(&fast, &slow)? < 1e-5);
    let r = rand_tensor(&[2, 4], 3)?;
    let gf = (fast * &r)?.sum_all()?.backward()?;
    let gs = (slow * &r)?.sum_all()?.backward()?;
    for v in [&a, &b] {
        let (Some(x), Some(y)) = (gf.get(v.as_tensor()), gs.get(v.as_tensor())) else {
            panic!("no gradient")
        };
        assert!(rel_err(x, y)? < 1e-5);
    }
    Ok(())
}

#[test]
fn conv_gradient_matches_finite_differences() -> candle_core::Result<()> {
    // An independent check of the analytic weight gradient (f64 finite differences on f32 ops).
    let x = rand_tensor(&[1, 4, 4, 2], 5)?;
    let w0 = rand_tensor(&[3, 2, 3, 3], 6)?;
    let r = rand_tensor(&[1, 2, 2, 3], 7)?;
    let f = |w: &Tensor| -> candle_core::Result<f64> {
        Ok(f64::from(
            (conv2d_nhwc(&x, w, 2, 1)? * &r)?.sum_all()?.to_scalar::<f32>()?,
        ))
    };
    let wv = Var::from_tensor(&w0)?;
    let grads = (conv2d_nhwc(&x, wv.as_tensor(), 2, 1)? * &r)?.sum_all()?.backward()?;
    let g = grads
        .get(wv.as_tensor())
        .map(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>()))
        .transpose()?
        .unwrap_or_default();
    let base = w0.flatten_all()?.to_vec1::<f32>()?;
    for idx in [0, 7, 20, 53] {
        let eps = 1e-2f32;
        let mut p = base.clone();
        p[idx] += eps;
        let up = f(&Tensor::from_vec(p.clone(), w0.shape(), &Device::Cpu)?)?;
        p[idx] -= 2.0 * eps;
        let down = f(&Tensor::from_vec(p, w0.shape(), &Device::Cpu)?)?;
        let fd = (up - down) / (2.0 * f64::from(eps));
        assert!((fd - f64::from(g[idx])).abs() < 1e-3, "w[{idx}]: fd {fd} vs {}", g[idx]);
    }
    Ok(())
}

#[test]
fn conv_transpose_forward_and_gradients_match_candle() -> candle_core::Result<()> {
    // (n, h, w, cin, cout, k, stride, pad, out_pad)
    let cases = [
        (2, 4, 4, 3, 2, 3, 2, 1, 1),
        (1, 5, 3, 2, 4, 3, 1, 1, 0),
        (2, 3, 3, 4, 3, 4, 2, 1, 0),
        (3, 2, 2, 2, 2, 1, 2, 0, 1),
        (1, 7, 7, 3, 1, 3, 2, 0, 0),
    ];
    for (i, &(n, h, w, c, o, k, s, p, op)) in cases.iter().enumerate() {
        let x = Var::from_tensor(&rand_tensor(&[n, h, w, c], 300 + i as u64)?)?;
        let wt = Var::from_tensor(&rand_tensor(&[c, o, k, k], 400 + i as u64)?)?;
        let fast = conv_transpose2d_nhwc(x.as_tensor(), wt.as_tensor(), s, p, op)?;
        let slow = reference_conv_transpose2d_nhwc(x.as_tensor(), wt.as_tensor(), s, p, op)?;
        assert_eq!(fast.dims(), slow.dims(), "case {i}: shape");
        assert!(rel_err(&fast, &slow)? < 1e-4, "case {i}: forward");
        let r = rand_tensor(fast.dims(), 500 + i as u64)?;
        let gf = (fast * &r)?.sum_all()?.backward()?;
        let gs = (slow * &r)?.sum_all()?.backward()?;
        for (name, v) in [("input", &x), ("weight", &wt)] {
            let (Some(a), Some(b)) = (gf.get(v.as_tensor()), gs.get(v.as_tensor())) else {
                panic!("case {i}: no {name} gradient")
            };
            let e = rel_err(a, b)?;
            assert!(e < 1e-4, "case {i}: {name} gradient rel err {e}");
        }
    }
    Ok(())
}

/// A convolution with its bias (and ReLU) as one node gives the bits of the
/// convolution and the bias as two nodes, forward and every gradient, for
/// the plain and the transposed convolution; candle's ops agree.
#[test]
fn conv_with_bias_is_conv_then_bias() -> candle_core::Result<()> {
    use super::conv::{conv2d_bias_nhwc, conv_transpose2d_bias_nhwc};
    let bits = |t: &Tensor| -> candle_core::Result<Vec<u32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    };
    for relu in [false, true] {
        for transposed in [false, true] {
            // (n, h, w, cin, cout, k, stride, pad)
            let (n, h, w, c, o, k, s, p) = (3, 8, 6, 5, 4, 4, 2, 1);
            let x = Var::from_tensor(&rand_tensor(&[n, h, w, c], 1)?)?;
            let wdims = if transposed { [c, o, k, k] } else { [o, c, k, k] };
            let wt = Var::from_tensor(&rand_tensor(&wdims, 2)?)?;
            let b = Var::from_tensor(&rand_tensor(&[o], 3)?)?;
            let (xv, wv, bv) = (x.as_tensor(), wt.as_tensor(), b.as_tensor());
            let (fused, two, slow) = if transposed {
                let y = conv_transpose2d_nhwc(xv, wv, s, p, 1)?;
                let slow = reference_conv_transpose2d_nhwc(xv, wv, s, p, 1)?.broadcast_add(bv)?;
                let two = if relu {
                    add_bias_relu(&y, bv)?
                } else {
                    add_bias(&y, bv)?
                };
                (conv_transpose2d_bias_nhwc(xv, wv, bv, (s, p, 1), relu)?, two, slow)
            } else {
                let y = conv2d_nhwc(xv, wv, s, p)?;
                let slow = reference_conv2d_nhwc(xv, wv, s, p)?.broadcast_add(bv)?;
                let two = if relu {
                    add_bias_relu(&y, bv)?
                } else {
                    add_bias(&y, bv)?
                };
                (conv2d_bias_nhwc(xv, wv, bv, s, p, relu)?, two, slow)
            };
            let slow = if relu { slow.relu()? } else { slow };
            let case = format!("relu {relu}, transposed {transposed}");
            assert_eq!(bits(&fused)?, bits(&two)?, "{case}: forward");
            assert!(rel_err(&fused, &slow)? < 1e-4, "{case}: forward against candle");
            if relu {
                let zeros = fused
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .filter(|v| **v == 0.0)
                    .count();
                assert!(zeros > 0, "{case}: the ReLU clamps some outputs");
            }
            let r = rand_tensor(fused.dims(), 4)?;
            let gf = (&fused * &r)?.sum_all()?.backward()?;
            let gt = (&two * &r)?.sum_all()?.backward()?;
            let gs = (&slow * &r)?.sum_all()?.backward()?;
            for (name, v) in [("input", &x), ("weight", &wt), ("bias", &b)] {
                let grad = |g: &candle_core::backprop::GradStore| g.get(v.as_tensor()).cloned().expect("a gradient");
                assert_eq!(bits(&grad(&gf))?, bits(&grad(&gt))?, "{case}: {name} gradient");
                let e = rel_err(&grad(&gf), &grad(&gs))?;
                assert!(e < 1e-4, "{case}: {name} gradient against candle, rel err {e}");
            }
        }
    }
    // a bias that does not fit the output channels is refused
    let x = rand_tensor(&[1, 5, 5, 2], 5)?;
    let err = conv2d_bias_nhwc(&x, &rand_tensor(&[3, 2, 3, 3], 6)?, &rand_tensor(&[4], 7)?, 1, 1, false)
        .expect_err("a bias of 4 for 3 channels");
    assert!(err.to_string().contains("bias"), "{err}");
    Ok(())
}

#[test]
fn max_pool_forward_and_backward() -> candle_core::Result<()> {
    // distinct values so every window has one maximum
    let (n, h, w, c): (usize, usize, usize, usize) = (2, 7, 6, 3);
    let vals: Vec<f32> = (0..n * h * w * c)
        .map(|i| ((i * 7919) % 1009) as f32 / 100.0 - 5.0)
        .collect();
    let x = Tensor::from_vec(vals.clone(), (n, h, w, c), &Device::Cpu)?;
    let y = max_pool2d_nhwc(&x, 3, 2, 1)?;
    assert_eq!(y.dims(), [n, 4, 3, c]);
    // naive forward
    let yv = y.flatten_all()?.to_vec1::<f32>()?;
    for b in 0..n {
        for i in 0..4usize {
            for j in 0..3usize {
                for ch in 0..c {
                    let mut m = f32::NEG_INFINITY;
                    for yy in (2 * i).saturating_sub(1)..(2 * i + 2).min(h) {
                        for xx in (2 * j).saturating_sub(1)..(2 * j + 2).min(w) {
                            m = m.max(vals[((b * h + yy) * w + xx) * c + ch]);
                        }
                    }
                    assert_eq!(yv[((b * 4 + i) * 3 + j) * c + ch], m);
                }
            }
        }
    }
    // backward against finite differences of sum(y · r)
    let r = Tensor::from_vec(
        (0..y.elem_count()).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<f32>>(),
        y.shape(),
        &Device::Cpu,
    )?;
    let xv = candle_core::Var::from_tensor(&x)?;
    let g = (max_pool2d_nhwc(xv.as_tensor(), 3, 2, 1)? * &r)?
        .sum_all()?
        .backward()?;
    let gx = g
        .get(xv.as_tensor())
        .expect("gradient")
        .flatten_all()?
        .to_vec1::<f32>()?;
    let f = |v: &[f32]| -> candle_core::Result<f32> {
        let t = Tensor::from_vec(v.to_vec(), (n, h, w, c), &Device::Cpu)?;
        (max_pool2d_nhwc(&t, 3, 2, 1)? * &r)?.sum_all()?.to_scalar::<f32>()
    };
    for i in (0..vals.len()).step_by(7) {
        let mut p = vals.clone();
        p[i] += 1e-3;
        let up = f(&p)?;
        p[i] -= 2e-3;
        let fd = (up - f(&p)?) / 2e-3;
        assert!(
            (fd - gx[i]).abs() < 1e-2,
            "input {i}: finite difference {fd} vs {}",
            gx[i]
        );
    }
    // PyTorch's MaxPool2d(3, 2, 1) on 0..15 (one 4×4 channel)
    let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 4, 4, 1))?;
    assert_eq!(
        max_pool2d_nhwc(&x, 3, 2, 1)?.flatten_all()?.to_vec1::<f32>()?,
        [5.0, 7.0, 13.0, 15.0]
    );
    Ok(())
}

/// Output and gradients (of `Σ g ⊙ f(vars)`) of `f` in f32 and in bf16.
#[allow(clippy::type_complexity)]
fn in_both_precisions(
    vars: &[Var],
    f: impl Fn(&[Var]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<[(Tensor, Vec<Tensor>); 2]> {
    let run = |p: bf16::Precision| {
        p.scope(|| -> candle_core::Result<(Tensor, Vec<Tensor>)> {
            let y = f(vars)?;
            let g = rand_tensor(y.dims(), 99)?;
            let grads = (&y * &g)?.sum_all()?.backward()?;
            let gs = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).cloned().expect("every input gets a gradient"))
                .collect();
            Ok((y, gs))
        })
    };
    Ok([run(bf16::Precision::F32)?, run(bf16::Precision::Bf16)?])
}

/// bf16 operands carry 8 significant bits (relative rounding ≤ 2⁻⁹ each),
/// so a product's terms are off by ≤ ~2⁻⁸ relative and sums of terms of
/// both signs by about as much of the largest value: the bound stated here
/// is 1e-2 of the largest f32 value, per output and per gradient. The two
/// must also differ (the bf16 kernel ran).
#[test]
fn every_product_op_in_bf16_tracks_its_f32_twin() -> candle_core::Result<()> {
    if bf16::Precision::Bf16.effective() != bf16::Precision::Bf16 {
        eprintln!("skipped: {}", bf16::Precision::Bf16.describe());
        return Ok(());
    }
    const TOL: f32 = 1e-2;
    // `f32_only`: tensors no product touches (a bias gradient is a column
    // sum of the output gradient), which must come out exactly as in f32.
    let check = |what: &str, vars: Vec<Var>, f32_only: &[usize], f: &dyn Fn(&[Var]) -> candle_core::Result<Tensor>| {
        let [(y32, g32), (y16, g16)] = in_both_precisions(&vars, f)?;
        let mut pairs = vec![(y16, y32)];
        pairs.extend(g16.into_iter().zip(g32));
        for (i, (a, b)) in pairs.iter().enumerate() {
            let e = rel_err(a, b)?;
            assert!(e <= TOL, "{what}, tensor {i}: bf16 off by {e} of the f32 scale");
            if f32_only.contains(&i) {
                assert_eq!(e, 0.0, "{what}, tensor {i} has no product but differs");
            } else {
                assert!(
                    e > 0.0,
                    "{what}, tensor {i}: bf16 equals f32 exactly: the bf16 kernel did not run"
                );
            }
        }
        Ok::<_, candle_core::Error>(())
    };
    let v = |dims: &[usize], seed| -> candle_core::Result<Var> { Var::from_tensor(&rand_tensor(dims, seed)?) };
    check(
        "conv2d 3x3",
        vec![v(&[3, 9, 9, 16], 1)?, v(&[24, 16, 3, 3], 2)?],
        &[],
        &|x| conv::conv2d_nhwc(x[0].as_tensor(), x[1].as_tensor(), 1, 1),
    )?;
    check(
        "conv2d 1x1 stride 2",
        vec![v(&[3, 9, 9, 16], 3)?, v(&[24, 16, 1, 1], 4)?],
        &[],
        &|x| conv::conv2d_nhwc(x[0].as_tensor(), x[1].as_tensor(), 2, 0),
    )?;
    check(
        "transposed conv",
        vec![v(&[2, 7, 7, 16], 5)?, v(&[16, 8, 4, 4], 6)?],
        &[],
        &|x| conv::conv_transpose2d_nhwc(x[0].as_tensor(), x[1].as_tensor(), 2, 1, 0),
    )?;
    check(
        "linear",
        vec![v(&[70, 48], 7)?, v(&[40, 48], 8)?, v(&[40], 9)?],
        &[3],
        &|x| linear::linear(x[0].as_tensor(), x[1].as_tensor(), x[2].as_tensor()),
    )?;
    check(
        "attention",
        vec![v(&[2 * 9, 32], 10)?, v(&[2 * 9, 32], 11)?, v(&[2 * 9, 32], 12)?],
        &[],
        &|x| {
            let op = attention::Attention {
                batch: 2,
                seq: 9,
                heads: 2,
                key_bias: std::sync::Arc::new(vec![0.0; 18]),
                dropout: 0.0,
                seed: 0,
                precision: bf16::Precision::current(),
            };
            attention::attention(x[0].as_tensor(), x[1].as_tensor(), x[2].as_tensor(), op)
        },
    )?;
    Ok(())
}

/// The fallback switch: with bf16 asked for but not runnable (narrower
/// kernels forced, or no AVX512-BF16), products are f32, bit for bit.
#[test]
fn a_bf16_request_without_the_kernel_is_f32() {
    use super::gemm::{product, Mat};
    let a: Vec<f32> = (0..40 * 30).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..30 * 20).map(|i| (i as f32 * 0.11).cos()).collect();
    let run = |p| {
        let mut c = vec![0f32; 40 * 20];
        product(
            p,
            &a,
            Mat::row_major(40, 30),
            &b,
            Mat::row_major(30, 20),
            &mut c,
            Mat::row_major(40, 20),
            false,
            1,
        );
        c
    };
    let (f32_run, bf16_run) = (run(bf16::Precision::F32), run(bf16::Precision::Bf16));
    if bf16::bf16_kernels_available() {
        assert_ne!(f32_run, bf16_run);
        assert!(bf16::Precision::Bf16.describe().contains("avx512_bf16"));
    } else {
        assert_eq!(f32_run, bf16_run);
        assert!(bf16::Precision::Bf16.describe().contains("f32 products"));
    }
}
