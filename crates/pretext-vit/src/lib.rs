//! A Vision Transformer encoder (ViT, Dosovitskiy et al., 2021): patch
//! embedding, a class token, learned position embeddings and pre-norm
//! transformer blocks, on pretext's fused linear, LayerNorm, GELU and
//! attention nodes.
//!
//! Tensor names are timm's `VisionTransformer` (`vit_tiny_patch16_224` and
//! its siblings), so an encoder's state loads with
//! `timm.create_model(name, img_size=…, patch_size=…, in_chans=…, depth=…,
//! num_classes=0)` and `load_state_dict`:
//! `cls_token` `(1, 1, D)`, `pos_embed` `(1, 1 + N, D)`,
//! `patch_embed.proj.{weight,bias}` (a `p × p` stride-`p` convolution),
//! `blocks.{i}.norm1.*`, `blocks.{i}.attn.qkv.*` `(3D, D)`,
//! `blocks.{i}.attn.proj.*`, `blocks.{i}.norm2.*`, `blocks.{i}.mlp.fc1.*`,
//! `blocks.{i}.mlp.fc2.*`, `norm.*`. LayerNorms use timm's ε = 1e-6 and the
//! GELU is the exact (erf) one, as in timm.
//!
//! The features of an image are the class token after the final norm
//! (timm's `global_pool = "token"`). Images whose grid of patches differs
//! from the configured one (DINO's local crops) get the position embeddings
//! resampled bilinearly, as timm's `dynamic_img_size` does.

use candle_core::{IndexOp, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use pretext_core::nn::{linear_init, LayerNorm, Linear};
use pretext_core::ops::{self, Attention};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A ViT width by its timm name (`vit-tiny` in configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VitSize {
    /// ViT-Tiny: 192 wide, 3 heads.
    VitTiny,
    /// ViT-Small: 384 wide, 6 heads.
    VitSmall,
}

impl VitSize {
    /// The config name (`vit-tiny`).
    pub fn name(self) -> &'static str {
        match self {
            Self::VitTiny => "vit-tiny",
            Self::VitSmall => "vit-small",
        }
    }

    /// timm's model of this width (`vit_tiny_patch16_224`), whose patch
    /// size, image size, channels and depth `create_model` overrides.
    pub fn timm_name(self) -> &'static str {
        match self {
            Self::VitTiny => "vit_tiny_patch16_224",
            Self::VitSmall => "vit_small_patch16_224",
        }
    }

    /// The shape of this width with this input and depth.
    pub fn dims(self, image_size: usize, patch_size: usize, in_channels: usize, depth: usize) -> VitDims {
        let (width, heads) = match self {
            Self::VitTiny => (192, 3),
            Self::VitSmall => (384, 6),
        };
        VitDims::with_width(image_size, patch_size, in_channels, depth, width, heads)
    }
}

/// Python that defines `model` as timm's Vision Transformer of this width
/// and shape with `classes` outputs in its `head` (0: the backbone alone,
/// whose output is the class token after the final norm); its
/// `state_dict` has exactly this crate's names.
pub fn timm_py(size: VitSize, dims: &VitDims, classes: usize) -> String {
    format!(
        "import timm\n\nmodel = timm.create_model(\n    \"{name}\", pretrained=False, img_size={s}, patch_size={p}, in_chans={c}, depth={d}, num_classes={classes}\n)\n",
        name = size.timm_name(),
        s = dims.image_size,
        p = dims.patch_size,
        c = dims.in_channels,
        d = dims.depth,
    )
}

/// The shape of timm ViT weights, read off their tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimmShape {
    /// The width (192: ViT-Tiny, 384: ViT-Small).
    pub size: VitSize,
    /// Patch side.
    pub patch_size: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Blocks.
    pub depth: usize,
    /// Side of the images the position table is for.
    pub image_size: usize,
}

/// The shape of timm ViT weights from `patch_embed.proj.weight` (width,
/// channels, patch), the blocks (`blocks.{i}.norm1.weight`) and
/// `pos_embed`'s grid; `Ok(None)` when the tensors are not a ViT's.
///
/// # Errors
/// A ViT of a width this crate does not build, or a position table that is
/// not a class token and a square grid, as a sentence.
pub fn timm_shape(
    tensors: &std::collections::HashMap<String, Tensor>,
) -> std::result::Result<Option<TimmShape>, String> {
    let Some(proj) = tensors.get("patch_embed.proj.weight") else {
        return Ok(None);
    };
    let &[d, in_channels, patch_size, _] = proj.dims() else {
        return Err(format!(
            "patch_embed.proj.weight has shape {:?}, not (width, channels, p, p)",
            proj.dims()
        ));
    };
    let size = match d {
        192 => VitSize::VitTiny,
        384 => VitSize::VitSmall,
        other => {
            return Err(format!(
                "a ViT {other} wide: pretext builds vit-tiny (192) and vit-small (384)"
            ))
        }
    };
    let depth = (0..)
        .take_while(|i| tensors.contains_key(&format!("blocks.{i}.norm1.weight")))
        .count();
    let tokens = tensors
        .get("pos_embed")
        .and_then(|t| t.dims().get(1).copied())
        .ok_or("no pos_embed (1, 1 + patches, width)")?;
    let grid = (tokens.saturating_sub(1) as f64).sqrt().round() as usize;
    if grid * grid + 1 != tokens {
        return Err(format!(
            "pos_embed holds {tokens} positions: not a class token and a square grid of patches"
        ));
    }
    Ok(Some(TimmShape {
        size,
        patch_size,
        in_channels,
        depth,
        image_size: grid * patch_size,
    }))
}

/// Fixed 2-D sine-cosine position embeddings of a `grid × grid` patch grid
/// (MAE's `get_2d_sincos_pos_embed`), `(grid², dim)` row-major: the first
/// half of each row encodes the column, the second the row, each as
/// `[sin(p·ω), cos(p·ω)]` with `ω_i = 10000^(−i / (dim/4))`.
///
/// # Panics
/// `dim` not a multiple of 4.
pub fn sincos_2d(grid: usize, dim: usize) -> Vec<f32> {
    assert!(
        dim.is_multiple_of(4),
        "sine-cosine position embeddings need a width divisible by 4, not {dim}"
    );
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(grid * grid * dim);
    for r in 0..grid {
        for c in 0..grid {
            for pos in [c as f64, r as f64] {
                out.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                out.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    out
}

/// timm's LayerNorm epsilon.
pub const LAYER_NORM_EPS: f64 = 1e-6;

/// Standard deviation of the normal initialisation of linear weights and
/// position embeddings (timm's `trunc_normal_(std=0.02)`, untruncated here).
pub const INIT_STD: f64 = 0.02;

/// The shape of a [`Vit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VitDims {
    /// Side of the square training images.
    pub image_size: usize,
    /// Side of a square patch (the image side must be a multiple of it).
    pub patch_size: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Token width `D`.
    pub embed_dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads (must divide `embed_dim`).
    pub heads: usize,
    /// Hidden width of each block's MLP.
    pub mlp_dim: usize,
}

impl VitDims {
    /// Any width with an MLP four times as wide.
    pub fn with_width(
        image_size: usize,
        patch_size: usize,
        in_channels: usize,
        depth: usize,
        embed_dim: usize,
        heads: usize,
    ) -> Self {
        Self {
            image_size,
            patch_size,
            in_channels,
            embed_dim,
            depth,
            heads,
            mlp_dim: 4 * embed_dim,
        }
    }

    /// Patches along each side of a training image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Patches per training image.
    pub fn patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Checks the shape; the message says which setting is wrong.
    ///
    /// # Errors
    /// `(setting, reason)` of the first problem.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let nonzero = [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("heads", self.heads),
            ("mlp_dim", self.mlp_dim),
            ("image_size", self.image_size),
        ];
        for (key, v) in nonzero {
            if v == 0 {
                return Err((key, "must be > 0".into()));
            }
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err((
                "patch_size",
                format!(
                    "{} does not divide the image size {} (the image must be a whole grid of patches)",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if !self.embed_dim.is_multiple_of(self.heads) {
            return Err((
                "heads",
                format!("{} heads do not divide the width {}", self.heads, self.embed_dim),
            ));
        }
        Ok(())
    }

    /// Number of trainable values.
    pub fn parameter_count(&self) -> usize {
        let d = self.embed_dim;
        let c = self.in_channels;
        let p = self.patch_size;
        let embed = d * c * p * p + d + d + (1 + self.patches()) * d;
        let block = 2 * (2 * d)
            + (3 * d * d + 3 * d)
            + (d * d + d)
            + (self.mlp_dim * d + self.mlp_dim)
            + (d * self.mlp_dim + d);
        embed + self.depth * block + 2 * d
    }
}

/// The shape of a ViT as `config.json` files record it (`vit`): what
/// `timm.create_model` needs beside the image size and channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VitShape {
    /// Side of a square patch.
    pub patch_size: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Token width.
    pub embed_dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Hidden width of the blocks' MLPs.
    pub mlp_dim: usize,
}

impl From<&VitDims> for VitShape {
    fn from(d: &VitDims) -> Self {
        Self {
            patch_size: d.patch_size,
            depth: d.depth,
            embed_dim: d.embed_dim,
            heads: d.heads,
            mlp_dim: d.mlp_dim,
        }
    }
}

/// A pre-norm transformer block: `x + proj(attn(norm1(x)))`, then
/// `x + fc2(gelu(fc1(norm2(x))))` (timm's `Block` names).
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    dim: usize,
}

/// A linear layer with timm's initialisation (weight `N(0, 0.02²)`, bias 0)
/// and PyTorch's names (`weight`, `bias`).
///
/// # Errors
/// The builder failed.
pub fn dense(din: usize, dout: usize, vb: &VarBuilder) -> Result<Linear> {
    linear_init(
        din,
        dout,
        Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        },
        Init::Const(0.0),
        vb,
    )
}

impl Block {
    /// A block of width `dim` with `heads` heads and an MLP of `mlp_dim`.
    ///
    /// # Errors
    /// The builder failed.
    pub fn new(dim: usize, heads: usize, mlp_dim: usize, vb: &VarBuilder) -> Result<Self> {
        let attn = vb.pp("attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            norm1: LayerNorm::new(dim, LAYER_NORM_EPS, &vb.pp("norm1"))?,
            qkv: dense(dim, 3 * dim, &attn.pp("qkv"))?,
            proj: dense(dim, dim, &attn.pp("proj"))?,
            norm2: LayerNorm::new(dim, LAYER_NORM_EPS, &vb.pp("norm2"))?,
            fc1: dense(dim, mlp_dim, &mlp.pp("fc1"))?,
            fc2: dense(mlp_dim, dim, &mlp.pp("fc2"))?,
            heads,
            dim,
        })
    }

    /// `(batch · seq, dim)` rows of `batch` sequences of `seq` tokens → the
    /// same shape; `key_bias` is the attention's (`batch · seq` zeros: every
    /// token attends to every token).
    fn forward(&self, x: &Tensor, batch: usize, seq: usize, key_bias: &Arc<Vec<f32>>) -> Result<Tensor> {
        let d = self.dim;
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?;
        let op = Attention {
            batch,
            seq,
            heads: self.heads,
            key_bias: key_bias.clone(),
            dropout: 0.0,
            seed: 0,
            precision: pretext_core::ops::bf16::Precision::current(),
        };
        let ctx = ops::attention(
            &qkv.narrow(1, 0, d)?,
            &qkv.narrow(1, d, d)?,
            &qkv.narrow(1, 2 * d, d)?,
            op,
        )?;
        let x = (x + self.proj.forward(&ctx)?)?;
        let h = ops::gelu(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// `blocks` one after the other over `(batch · seq, dim)` rows of `batch`
/// sequences of `seq` tokens (no padding: every token attends to every
/// token).
///
/// # Errors
/// Shapes that do not fit.
pub fn run_blocks(blocks: &[Block], x: &Tensor, batch: usize, seq: usize) -> Result<Tensor> {
    let key_bias = Arc::new(vec![0.0; batch * seq]);
    let mut x = x.clone();
    for b in blocks {
        x = b.forward(&x, batch, seq, &key_bias)?;
    }
    Ok(x)
}

/// Images `(n, c, h, w)` → patches `(n, (h/p)·(w/p), c·p·p)`, each patch
/// flattened channel-major like a `p × p` convolution's weight, patches in
/// row-major grid order.
///
/// # Errors
/// A side that is not a multiple of `p`.
pub fn patchify(images: &Tensor, p: usize) -> Result<Tensor> {
    let (n, c, h, w) = images.dims4()?;
    if p == 0 || h % p != 0 || w % p != 0 {
        candle_core::bail!("a {h}×{w} image is not a whole grid of {p}×{p} patches");
    }
    let (gh, gw) = (h / p, w / p);
    images
        .reshape((n, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((n, gh * gw, c * p * p))
}

/// The inverse of [`patchify`]: patches `(n, gh·gw, c·p·p)` → images
/// `(n, c, gh·p, gw·p)`.
///
/// # Errors
/// Shapes that do not fit.
pub fn unpatchify(patches: &Tensor, p: usize, c: usize, gh: usize, gw: usize) -> Result<Tensor> {
    let n = patches.dim(0)?;
    patches
        .reshape((n, gh, gw, c, p, p))?
        .permute((0, 3, 1, 4, 2, 5))?
        .contiguous()?
        .reshape((n, c, gh * p, gw * p))
}

/// Bilinear resampling weights from a `from`-long axis to a `to`-long one
/// (PyTorch's `interpolate(mode="bilinear", align_corners=False)` along one
/// axis): `(to, from)`, rows summing to 1.
pub fn resample_weights(from: usize, to: usize) -> Vec<f32> {
    let mut m = vec![0f32; to * from];
    let scale = from as f64 / to as f64;
    for i in 0..to {
        let x = ((i as f64 + 0.5) * scale - 0.5).clamp(0.0, (from - 1) as f64);
        let lo = x.floor() as usize;
        let hi = (lo + 1).min(from - 1);
        let t = (x - lo as f64) as f32;
        m[i * from + lo] += 1.0 - t;
        m[i * from + hi] += t;
    }
    m
}

/// A Vision Transformer encoder (see the crate docs for names and layout).
#[derive(Debug, Clone)]
pub struct Vit {
    dims: VitDims,
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl Vit {
    /// A freshly initialised encoder (timm's initialisation: linear weights
    /// and position embeddings `N(0, 0.02²)`, biases 0, the class token
    /// `N(0, 10⁻¹²)`, the patch projection as PyTorch's `Conv2d`).
    ///
    /// # Errors
    /// An invalid shape or a builder failure.
    pub fn new(dims: &VitDims, vb: &VarBuilder) -> Result<Self> {
        dims.check()
            .map_err(|(key, reason)| candle_core::Error::msg(format!("vit {key}: {reason}")))?;
        let (d, c, p) = (dims.embed_dim, dims.in_channels, dims.patch_size);
        let fan_in = (c * p * p) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let uniform = Init::Uniform { lo: -bound, up: bound };
        let pe = vb.pp("patch_embed").pp("proj");
        let patch_weight = pe.get_with_hints((d, c, p, p), "weight", uniform)?;
        let patch_bias = pe.get_with_hints(d, "bias", uniform)?;
        let cls_token = vb.get_with_hints((1, 1, d), "cls_token", Init::Randn { mean: 0.0, stdev: 1e-6 })?;
        let pos_embed = vb.get_with_hints(
            (1, 1 + dims.patches(), d),
            "pos_embed",
            Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
        )?;
        let blocks = (0..dims.depth)
            .map(|i| Block::new(d, dims.heads, dims.mlp_dim, &vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(d, LAYER_NORM_EPS, &vb.pp("norm"))?;
        Ok(Self {
            dims: *dims,
            patch_weight,
            patch_bias,
            cls_token,
            pos_embed,
            blocks,
            norm,
        })
    }

    /// The shape.
    pub fn dims(&self) -> &VitDims {
        &self.dims
    }

    /// Feature size (the token width).
    pub fn out_dim(&self) -> usize {
        self.dims.embed_dim
    }

    /// The position embeddings of a `gh × gw` grid of patches, `(gh·gw, D)`:
    /// the learned ones, resampled bilinearly when the grid is not the
    /// training grid.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn patch_positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let g = self.dims.grid();
        let d = self.dims.embed_dim;
        let learned = self.pos_embed.i((0, 1.., ..))?;
        if gh == g && gw == g {
            return Ok(learned);
        }
        let (mh, mw) = (resample_weights(g, gh), resample_weights(g, gw));
        // kron(mh, mw): output cell (i, j) from input cell (a, b) with mh[i, a] · mw[j, b]
        let mut m = vec![0f32; gh * gw * g * g];
        for i in 0..gh {
            for j in 0..gw {
                let row = &mut m[(i * gw + j) * g * g..(i * gw + j + 1) * g * g];
                for a in 0..g {
                    for b in 0..g {
                        row[a * g + b] = mh[i * g + a] * mw[j * g + b];
                    }
                }
            }
        }
        let m = Tensor::from_vec(m, (gh * gw, g * g), learned.device())?;
        m.matmul(&learned.contiguous()?)?.reshape((gh * gw, d))
    }

    /// Patch tokens with their position embeddings, `(n, N, D)`, for images
    /// `(n, c, h, w)` whose sides are multiples of the patch size.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn patch_tokens(&self, images: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = images.dims4()?;
        let (p, d) = (self.dims.patch_size, self.dims.embed_dim);
        if c != self.dims.in_channels {
            candle_core::bail!(
                "the ViT takes {} channel(s), the images have {c}",
                self.dims.in_channels
            );
        }
        let patches = patchify(images, p)?;
        let np = patches.dim(1)?;
        let w2 = self.patch_weight.reshape((d, c * p * p))?;
        let tokens = ops::linear(&patches.reshape((n * np, c * p * p))?, &w2, &self.patch_bias)?.reshape((n, np, d))?;
        tokens.broadcast_add(&self.patch_positions(h / p, w / p)?.unsqueeze(0)?)
    }

    /// The class token with its position embedding, `(n, 1, D)`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn class_tokens(&self, n: usize) -> Result<Tensor> {
        let d = self.dims.embed_dim;
        (&self.cls_token + self.pos_embed.i((.., 0..1, ..))?)?.broadcast_as((n, 1, d))
    }

    /// The blocks and the final norm over token sequences `(n, t, D)`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn encode_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        let (n, t, d) = tokens.dims3()?;
        let x = run_blocks(&self.blocks, &tokens.reshape((n * t, d))?, n, t)?;
        self.norm.forward(&x)?.reshape((n, t, d))
    }

    /// Images `(n, c, h, w)` → features `(n, D)`: the class token after the
    /// final norm.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let n = images.dim(0)?;
        let patches = self.patch_tokens(images)?;
        let tokens = Tensor::cat(&[&self.class_tokens(n)?, &patches], 1)?;
        self.encode_tokens(&tokens)?.i((.., 0, ..))?.contiguous()
    }
}

#[cfg(test)]
mod tests;
