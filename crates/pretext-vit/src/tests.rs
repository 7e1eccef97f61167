use super::*;
use candle_core::{DType, Device, D};
use candle_nn::VarMap;
use pretext_core::ops::{reference_attention, reference_layer_norm, reference_linear};

fn tiny() -> VitDims {
    VitDims {
        image_size: 8,
        patch_size: 4,
        in_channels: 2,
        embed_dim: 12,
        depth: 2,
        heads: 3,
        mlp_dim: 20,
    }
}

fn build(dims: &VitDims) -> Result<(Vit, VarMap)> {
    let map = pretext_core::SeededVarMap::from_seed(3, "init");
    let vit = Vit::new(dims, &map.var_builder(DType::F32, &Device::Cpu))?;
    // biases and norms away from their 0 / 1 start, so the test sees them
    for (i, (name, var)) in pretext_core::init::named_vars(map.var_map()).into_iter().enumerate() {
        if name.ends_with("bias") || name.contains("norm") || name == "cls_token" {
            let noise = (Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu)? * (1.0 + i as f64 * 0.01))?;
            var.set(&(var.as_tensor() + noise)?)?;
        }
    }
    Ok((vit, map.var_map().clone()))
}

fn var(map: &VarMap, name: &str) -> Tensor {
    map.data().lock().expect("vars")[name].as_tensor().clone()
}

/// The ViT from candle's own ops: a stride-`p` convolution for the patch
/// embedding, candle attention, LayerNorm and linear layers.
fn reference(map: &VarMap, dims: &VitDims, images: &Tensor) -> Result<Tensor> {
    let v = |n: &str| var(map, n);
    let (n, _, h, w) = images.dims4()?;
    let p = dims.patch_size;
    let d = dims.embed_dim;
    assert_eq!((h, w), (dims.image_size, dims.image_size));
    let conv = images
        .conv2d(&v("patch_embed.proj.weight"), 0, p, 1, 1)?
        .broadcast_add(&v("patch_embed.proj.bias").reshape((1, d, 1, 1))?)?;
    let patches = conv.flatten_from(2)?.transpose(1, 2)?; // (n, N, d)
    let cls = v("cls_token").broadcast_as((n, 1, d))?;
    let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&v("pos_embed"))?;
    let t = x.dim(1)?;
    let ln = |x: &Tensor, name: &str| {
        reference_layer_norm(
            x,
            &v(&format!("{name}.weight")),
            &v(&format!("{name}.bias")),
            LAYER_NORM_EPS as f32,
        )
    };
    let lin = |x: &Tensor, name: &str| reference_linear(x, &v(&format!("{name}.weight")), &v(&format!("{name}.bias")));
    let mut x = x.reshape((n * t, d))?;
    for i in 0..dims.depth {
        let b = format!("blocks.{i}");
        let qkv = lin(&ln(&x, &format!("{b}.norm1"))?, &format!("{b}.attn.qkv"))?;
        let op = Attention {
            batch: n,
            seq: t,
            heads: dims.heads,
            key_bias: Arc::new(vec![0.0; n * t]),
            dropout: 0.0,
            seed: 0,
            precision: pretext_core::ops::bf16::Precision::current(),
        };
        let ctx = reference_attention(
            &qkv.narrow(1, 0, d)?.contiguous()?,
            &qkv.narrow(1, d, d)?.contiguous()?,
            &qkv.narrow(1, 2 * d, d)?.contiguous()?,
            &op,
        )?;
        x = (x + lin(&ctx, &format!("{b}.attn.proj"))?)?;
        let hdn = lin(&ln(&x, &format!("{b}.norm2"))?, &format!("{b}.mlp.fc1"))?.gelu_erf()?;
        x = (&x + lin(&hdn, &format!("{b}.mlp.fc2"))?)?;
    }
    ln(&x, "norm")?.reshape((n, t, d))?.i((.., 0, ..))
}

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1e-6);
    Ok(diff / scale)
}

#[test]
fn names_and_shapes_are_timms_and_the_count_is_right() -> Result<()> {
    let dims = tiny();
    let (_, map) = build(&dims)?;
    let vars = pretext_core::init::named_vars(&map);
    let shape = |n: &str| -> Vec<usize> {
        vars.iter()
            .find(|(m, _)| m == n)
            .unwrap_or_else(|| panic!("{n} missing"))
            .1
            .dims()
            .to_vec()
    };
    assert_eq!(shape("cls_token"), [1, 1, 12]);
    assert_eq!(shape("pos_embed"), [1, 5, 12]);
    assert_eq!(shape("patch_embed.proj.weight"), [12, 2, 4, 4]);
    assert_eq!(shape("patch_embed.proj.bias"), [12]);
    assert_eq!(shape("blocks.1.attn.qkv.weight"), [36, 12]);
    assert_eq!(shape("blocks.1.attn.qkv.bias"), [36]);
    assert_eq!(shape("blocks.0.attn.proj.weight"), [12, 12]);
    assert_eq!(shape("blocks.0.mlp.fc1.weight"), [20, 12]);
    assert_eq!(shape("blocks.0.mlp.fc2.weight"), [12, 20]);
    assert_eq!(shape("blocks.0.norm2.bias"), [12]);
    assert_eq!(shape("norm.weight"), [12]);
    // 4 + 2 blocks × 12 tensors + 2
    assert_eq!(vars.len(), 4 + 2 * 12 + 2);
    let total: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(total, dims.parameter_count());
    Ok(())
}

#[test]
fn features_and_gradients_match_candles_ops() -> Result<()> {
    let dims = tiny();
    let (vit, map) = build(&dims)?;
    let images = Tensor::randn(0f32, 1.0, (3, 2, 8, 8), &Device::Cpu)?;
    let probe = Tensor::randn(0f32, 1.0, (3, 12), &Device::Cpu)?;
    let ours = vit.forward(&images)?;
    let theirs = reference(&map, &dims, &images)?;
    assert_eq!(ours.dims(), [3, 12]);
    let rel = max_rel(&ours, &theirs)?;
    assert!(rel < 1e-5, "features differ by {rel}");
    let g_ours = (ours * &probe)?.sum_all()?.backward()?;
    let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
    for (name, v) in pretext_core::init::named_vars(&map) {
        let a = g_ours
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let b = g_theirs.get(v.as_tensor()).expect("reference gradient");
        let rel = max_rel(a, b)?;
        assert!(rel < 1e-4, "gradient of {name} differs by {rel}");
    }
    Ok(())
}

#[test]
fn patches_are_flattened_like_the_convolution_weight() -> Result<()> {
    // one 2-channel 4×4 image, patch 2: patch (0, 1) holds rows 0..2, columns 2..4
    let x: Vec<f32> = (0..32).map(|v| v as f32).collect();
    let img = Tensor::from_vec(x, (1, 2, 4, 4), &Device::Cpu)?;
    let p = patchify(&img, 2)?;
    assert_eq!(p.dims(), [1, 4, 8]);
    let second = p.i((0, 1))?.to_vec1::<f32>()?;
    assert_eq!(second, [2., 3., 6., 7., 18., 19., 22., 23.]);
    assert!(patchify(&img, 3).is_err());
    let back = unpatchify(&p, 2, 2, 2, 2)?;
    assert_eq!(max_rel(&back, &img)?, 0.0, "unpatchify inverts patchify");
    Ok(())
}

#[test]
fn resampling_weights_are_pytorchs_bilinear() {
    assert_eq!(resample_weights(3, 3), [1., 0., 0., 0., 1., 0., 0., 0., 1.]);
    assert_eq!(resample_weights(4, 2), [0.5, 0.5, 0., 0., 0., 0., 0.5, 0.5]);
    assert_eq!(resample_weights(2, 4), [1., 0., 0.75, 0.25, 0.25, 0.75, 0., 1.]);
}

#[test]
fn smaller_images_get_resampled_positions() -> Result<()> {
    let dims = VitDims {
        image_size: 16,
        ..tiny()
    }; // a 4×4 grid
    let (vit, map) = build(&dims)?;
    let pos = var(&map, "pos_embed").i((0, 1.., ..))?; // (16, 12)
    assert_eq!(max_rel(&vit.patch_positions(4, 4)?, &pos)?, 0.0);
    // a 2×2 grid: each cell is the mean of a 2×2 block of the learned grid
    let small = vit.patch_positions(2, 2)?;
    let cell = |r: usize, c: usize| pos.i(r * 4 + c);
    let want = ((cell(2, 0)? + cell(2, 1)? + cell(3, 0)? + cell(3, 1)?)? * 0.25)?;
    assert!(max_rel(&small.i(2)?, &want)? < 1e-6);
    // and the encoder runs on 8×8 images
    let feats = vit.forward(&Tensor::randn(0f32, 1.0, (2, 2, 8, 8), &Device::Cpu)?)?;
    assert_eq!(feats.dims(), [2, 12]);
    Ok(())
}

#[test]
fn bad_shapes_name_the_setting() {
    let e = VitDims {
        patch_size: 3,
        ..tiny()
    }
    .check()
    .expect_err("8 is not a multiple of 3");
    assert_eq!(e.0, "patch_size");
    let e = VitDims { heads: 5, ..tiny() }
        .check()
        .expect_err("5 does not divide 12");
    assert_eq!(e.0, "heads");
    let e = VitDims { depth: 0, ..tiny() }.check().expect_err("no blocks");
    assert_eq!(e.0, "depth");
    let (vit, _) = build(&tiny()).expect("builds");
    let wrong = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).expect("zeros");
    assert!(vit.forward(&wrong).is_err(), "3 channels into a 2-channel ViT");
}

#[test]
fn class_token_attends_to_every_patch() -> Result<()> {
    // changing one patch changes the class token's features
    let (vit, _) = build(&tiny())?;
    let a = Tensor::randn(0f32, 1.0, (1, 2, 8, 8), &Device::Cpu)?;
    let mut v = a.flatten_all()?.to_vec1::<f32>()?;
    v[8 * 8 + 7 * 8 + 7] += 1.0; // channel 1, bottom-right pixel (the last patch)
    let b = Tensor::from_vec(v, (1, 2, 8, 8), &Device::Cpu)?;
    let diff = (vit.forward(&a)? - vit.forward(&b)?)?
        .abs()?
        .max(D::Minus1)?
        .sum_all()?
        .to_scalar::<f32>()?;
    assert!(diff > 1e-4, "features unchanged ({diff})");
    Ok(())
}

#[test]
fn sine_cosine_positions_are_maes() {
    // grid 2, width 8: ω = [1, 1/100]; row 3 is (r = 1, c = 1)
    let e = sincos_2d(2, 8);
    assert_eq!(e.len(), 4 * 8);
    let row = &e[3 * 8..4 * 8];
    let want = [
        1f64.sin(),
        0.01f64.sin(),
        1f64.cos(),
        0.01f64.cos(),
        1f64.sin(),
        0.01f64.sin(),
        1f64.cos(),
        0.01f64.cos(),
    ];
    for (a, b) in row.iter().zip(want) {
        assert!((f64::from(*a) - b).abs() < 1e-6, "{row:?}");
    }
    // cell (r = 0, c = 1): the column half moves, the row half is at 0
    let cell = &e[8..16];
    assert!((f64::from(cell[0]) - 1f64.sin()).abs() < 1e-6);
    assert_eq!(&cell[4..], &[0.0, 0.0, 1.0, 1.0]);
}
