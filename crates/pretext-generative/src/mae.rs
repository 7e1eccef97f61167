//! The masked autoencoder (MAE, He et al., 2022): a random subset of an
//! image's patches (a fraction `mask_ratio`, exactly, per image) is hidden;
//! a ViT encoder sees only the visible patches (and the class token); a
//! light transformer decoder gets the encoded visible tokens back in their
//! places, a shared learned mask token everywhere else and fixed sine-cosine
//! positions, and predicts the pixels of every patch. The loss is the mean
//! squared error over the **masked** patches only, against per-patch
//! normalised pixels by default (`norm_pix_loss`).
//!
//! Names: the encoder is `encoder.*` with timm's names below it (what
//! transfers and what `export` writes); the decoder keeps the MAE
//! reference's names: `decoder_embed.*`, `mask_token`, `decoder_blocks.{i}.*`,
//! `decoder_norm.*`, `decoder_pred.*`.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::Init;
use pretext_core::init::named_vars;
use pretext_core::nn::{LayerNorm, Linear};
use pretext_core::SeededVarMap;
use pretext_vit::{dense, patchify, run_blocks, sincos_2d, unpatchify, Block, Vit, VitDims, VitSize};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// The `mae` section of a generative run with `method = "mae"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaeConfig {
    /// The encoder's width: `vit-tiny` (192) or `vit-small` (384).
    pub arch: VitSize,
    /// Side of a square patch; it must divide `data.image_size`.
    pub patch_size: usize,
    /// Encoder blocks.
    pub depth: usize,
    /// Fraction of each image's patches hidden from the encoder (rounded
    /// to whole patches; at least one patch stays visible and one hidden).
    pub mask_ratio: f64,
    /// Decoder width.
    pub decoder_dim: usize,
    /// Decoder blocks.
    pub decoder_depth: usize,
    /// Decoder attention heads.
    pub decoder_heads: usize,
    /// Predict each patch's pixels normalised by the patch's own mean and
    /// standard deviation (the paper's better-transferring target).
    pub norm_pix_loss: bool,
}

impl Default for MaeConfig {
    fn default() -> Self {
        Self {
            arch: VitSize::VitTiny,
            patch_size: 4,
            depth: 6,
            mask_ratio: 0.75,
            decoder_dim: 128,
            decoder_depth: 2,
            decoder_heads: 4,
            norm_pix_loss: true,
        }
    }
}

impl MaeConfig {
    /// The encoder's shape on `channels` × `size` × `size` images.
    pub fn encoder_dims(&self, channels: usize, size: usize) -> VitDims {
        self.arch.dims(size, self.patch_size, channels, self.depth)
    }

    /// Patches hidden in each image of `patches`.
    pub fn masked_count(&self, patches: usize) -> usize {
        (patches as f64 * self.mask_ratio).round() as usize
    }

    /// Checks the section for `channels` × `size` × `size` images.
    ///
    /// # Errors
    /// The bad key and why.
    pub fn validate(&self, channels: usize, size: usize) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        if let Err((key, reason)) = self.encoder_dims(channels, size).check() {
            let key = match key {
                "patch_size" => "mae.patch_size",
                "depth" => "mae.depth",
                "image_size" => "data.image_size",
                "in_channels" => "data.channels",
                _ => "mae.arch",
            };
            return Err(InvalidSetting::new(key, reason));
        }
        let patches = self.encoder_dims(channels, size).patches();
        let masked = self.masked_count(patches);
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) || masked == 0 || masked == patches {
            return Err(InvalidSetting::value(
                "mae.mask_ratio",
                self.mask_ratio,
                &format!("must hide at least one of the {patches} patches and leave one visible"),
            ));
        }
        for (key, v) in [
            ("mae.decoder_depth", self.decoder_depth),
            ("mae.decoder_heads", self.decoder_heads),
        ] {
            if v == 0 {
                return Err(InvalidSetting::value(key, v, "must be > 0"));
            }
        }
        if self.decoder_dim == 0
            || !self.decoder_dim.is_multiple_of(4)
            || !self.decoder_dim.is_multiple_of(self.decoder_heads)
        {
            return Err(InvalidSetting::value(
                "mae.decoder_dim",
                self.decoder_dim,
                &format!(
                    "must be a positive multiple of 4 (sine-cosine positions) and of mae.decoder_heads = {}",
                    self.decoder_heads
                ),
            ));
        }
        Ok(())
    }
}

/// Which patches of each image stay visible.
#[derive(Debug, Clone, PartialEq)]
pub struct Masking {
    /// Images.
    pub images: usize,
    /// Patches per image.
    pub patches: usize,
    /// Visible patches per image.
    pub visible: usize,
    /// The visible patches of each image, ascending, image after image (`images · visible`).
    pub keep: Vec<usize>,
    /// 1 for a hidden patch, 0 for a visible one, `(images, patches)` row-major.
    pub hidden: Vec<f32>,
}

impl Masking {
    /// Hides `masked` of `patches` patches of each of `images` images,
    /// drawn uniformly without replacement from `rng`.
    pub fn random(images: usize, patches: usize, masked: usize, rng: &mut StdRng) -> Self {
        let visible = patches - masked.min(patches);
        let mut keep = Vec::with_capacity(images * visible);
        let mut hidden = vec![1f32; images * patches];
        let mut order: Vec<usize> = (0..patches).collect();
        for i in 0..images {
            order.shuffle(rng);
            let mut k = order[..visible].to_vec();
            k.sort_unstable();
            for &j in &k {
                hidden[i * patches + j] = 0.0;
            }
            keep.extend(k);
        }
        Self {
            images,
            patches,
            visible,
            keep,
            hidden,
        }
    }

    /// Images `[first, first + n)` of this masking (a data-parallel
    /// process's rows of a masking drawn for the whole batch).
    pub fn images_from(&self, first: usize, n: usize) -> Self {
        let p = self.patches;
        Self {
            images: n,
            patches: p,
            visible: self.visible,
            keep: self.keep[first * self.visible..(first + n) * self.visible].to_vec(),
            hidden: self.hidden[first * p..(first + n) * p].to_vec(),
        }
    }

    /// Rows of the visible patches in the `(images · patches)` rows.
    fn keep_rows(&self) -> Vec<u32> {
        self.keep
            .chunks(self.visible.max(1))
            .enumerate()
            .flat_map(|(i, k)| k.iter().map(move |&j| (i * self.patches + j) as u32))
            .collect()
    }

    /// For every `(image, patch)`, its row in `[visible tokens (images ·
    /// visible); one mask token]`.
    fn restore_rows(&self) -> Vec<u32> {
        let mask_row = (self.images * self.visible) as u32;
        let mut rows = vec![mask_row; self.images * self.patches];
        for (i, k) in self.keep.chunks(self.visible.max(1)).enumerate() {
            for (r, &j) in k.iter().enumerate() {
                rows[i * self.patches + j] = (i * self.visible + r) as u32;
            }
        }
        rows
    }
}

/// Per-patch normalised pixels (MAE's `norm_pix_loss` target): each row of
/// `patches` `(…, P)` minus its mean, over `sqrt(var + 1e-6)` with the
/// unbiased variance, as the reference's `target.var(dim=-1)`.
///
/// # Errors
/// Tensor errors.
pub fn normalise_patches(patches: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let p = patches.dim(D::Minus1)?;
    let mean = patches.mean_keepdim(D::Minus1)?;
    let centred = patches.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / (p.max(2) - 1) as f64)?;
    let std = (var + 1e-6)?.sqrt()?;
    Ok((centred.broadcast_div(&std)?, mean, std))
}

/// The MAE loss: the mean over hidden patches of the mean squared error
/// over a patch's values; `pred` and `target` `(n, N, P)`, `hidden` `(n, N)`
/// (1 = hidden). Visible patches contribute nothing, not even gradient.
///
/// # Errors
/// Shapes that do not fit; no hidden patch.
pub fn masked_patch_loss(pred: &Tensor, target: &Tensor, hidden: &Tensor) -> Result<Tensor> {
    let per_patch = (pred - target)?.sqr()?.mean(D::Minus1)?;
    let count = hidden.sum_all()?.to_scalar::<f32>()?;
    if count <= 0.0 {
        candle_core::bail!("no hidden patch to reconstruct");
    }
    (per_patch * hidden)?.sum_all()? / f64::from(count)
}

/// A masked autoencoder: ViT encoder, transformer decoder.
pub struct Mae {
    cfg: MaeConfig,
    params: SeededVarMap,
    encoder: Vit,
    decoder_embed: Linear,
    mask_token: Tensor,
    decoder_pos: Tensor,
    decoder_blocks: Vec<Block>,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
}

impl Mae {
    /// A fresh model for `channels` × `size` × `size` images, seeded by `seed`.
    ///
    /// # Errors
    /// An invalid config (the key named) or a builder failure.
    pub fn new(cfg: &MaeConfig, channels: usize, size: usize, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate(channels, size)
            .map_err(|e| candle_core::Error::msg(format!("config: {e}")))?;
        let params = SeededVarMap::from_seed(seed, pretext_core::seed::INIT);
        let vb = params.var_builder(DType::F32, device);
        let dims = cfg.encoder_dims(channels, size);
        let encoder = Vit::new(&dims, &vb.pp("encoder"))?;
        let dd = cfg.decoder_dim;
        let decoder_embed = dense(dims.embed_dim, dd, &vb.pp("decoder_embed"))?;
        let mask_token = vb.get_with_hints(
            (1, 1, dd),
            "mask_token",
            Init::Randn {
                mean: 0.0,
                stdev: pretext_vit::INIT_STD,
            },
        )?;
        let decoder_blocks = (0..cfg.decoder_depth)
            .map(|i| Block::new(dd, cfg.decoder_heads, 4 * dd, &vb.pp("decoder_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let decoder_norm = LayerNorm::new(dd, pretext_vit::LAYER_NORM_EPS, &vb.pp("decoder_norm"))?;
        let p = cfg.patch_size;
        let decoder_pred = dense(dd, p * p * channels, &vb.pp("decoder_pred"))?;
        let mut pos = vec![0f32; dd]; // the class token's position is zero, as in the reference
        pos.extend(sincos_2d(dims.grid(), dd));
        let decoder_pos = Tensor::from_vec(pos, (1, 1 + dims.patches(), dd), device)?;
        Ok(Self {
            cfg: cfg.clone(),
            params,
            encoder,
            decoder_embed,
            mask_token,
            decoder_pos,
            decoder_blocks,
            decoder_norm,
            decoder_pred,
        })
    }

    /// The config.
    pub fn config(&self) -> &MaeConfig {
        &self.cfg
    }

    /// The encoder.
    pub fn encoder(&self) -> &Vit {
        &self.encoder
    }

    /// A random masking of `n` images from `rng`, at the configured ratio.
    pub fn masking(&self, n: usize, rng: &mut StdRng) -> Masking {
        let patches = self.encoder.dims().patches();
        Masking::random(n, patches, self.cfg.masked_count(patches), rng)
    }

    /// The targets of images `(n, c, s, s)`: their patches `(n, N, P)`,
    /// per-patch normalised under `norm_pix_loss`, with the per-patch mean
    /// and standard deviation that undo it (0 and 1 otherwise).
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn targets(&self, images: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let patches = patchify(images, self.cfg.patch_size)?;
        if self.cfg.norm_pix_loss {
            normalise_patches(&patches)
        } else {
            let shape = (patches.dim(0)?, patches.dim(1)?, 1);
            let zeros = Tensor::zeros(shape, DType::F32, images.device())?;
            let ones = Tensor::ones(shape, DType::F32, images.device())?;
            Ok((patches, zeros, ones))
        }
    }

    /// Predictions `(n, N, P)` for every patch of images `(n, c, s, s)`,
    /// the encoder seeing only the patches `masking` keeps.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn predict(&self, images: &Tensor, masking: &Masking) -> Result<Tensor> {
        let n = images.dim(0)?;
        let dims = self.encoder.dims();
        let (big_n, d, dd, k) = (dims.patches(), dims.embed_dim, self.cfg.decoder_dim, masking.visible);
        if masking.images != n || masking.patches != big_n {
            candle_core::bail!(
                "a masking of {} images × {} patches for {n} images × {big_n} patches",
                masking.images,
                masking.patches
            );
        }
        let dev = images.device();
        let tokens = self.encoder.patch_tokens(images)?.reshape((n * big_n, d))?;
        let keep = Tensor::from_vec(masking.keep_rows(), n * k, dev)?;
        let visible = tokens.index_select(&keep, 0)?.reshape((n, k, d))?;
        let seq = Tensor::cat(&[&self.encoder.class_tokens(n)?, &visible], 1)?;
        let encoded = self.encoder.encode_tokens(&seq)?.reshape((n * (1 + k), d))?;
        let dec = self.decoder_embed.forward(&encoded)?.reshape((n, 1 + k, dd))?;
        let cls = dec.narrow(1, 0, 1)?;
        let pool = Tensor::cat(
            &[
                &dec.narrow(1, 1, k)?.reshape((n * k, dd))?,
                &self.mask_token.reshape((1, dd))?,
            ],
            0,
        )?;
        let restore = Tensor::from_vec(masking.restore_rows(), n * big_n, dev)?;
        let full = pool.index_select(&restore, 0)?.reshape((n, big_n, dd))?;
        let x = Tensor::cat(&[&cls, &full], 1)?.broadcast_add(&self.decoder_pos)?;
        let t = 1 + big_n;
        let x = run_blocks(&self.decoder_blocks, &x.reshape((n * t, dd))?, n, t)?;
        let pred = self.decoder_pred.forward(&self.decoder_norm.forward(&x)?)?;
        let pdim = pred.dim(1)?;
        pred.reshape((n, t, pdim))?.narrow(1, 1, big_n)
    }

    /// The loss of images `(n, c, s, s)` under `masking`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn loss(&self, images: &Tensor, masking: &Masking) -> Result<Tensor> {
        let (target, _, _) = self.targets(images)?;
        let hidden = Tensor::from_vec(
            masking.hidden.clone(),
            (masking.images, masking.patches),
            images.device(),
        )?;
        masked_patch_loss(&self.predict(images, masking)?, &target, &hidden)
    }

    /// Reconstructions of images `(n, c, s, s)` in their pixel range: the
    /// predictions of the hidden patches (un-normalised with each patch's own
    /// statistics) pasted among the visible patches, and the masked inputs
    /// (hidden patches at `fill`).
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn reconstruct(&self, images: &Tensor, masking: &Masking, fill: f32) -> Result<(Tensor, Tensor)> {
        let (n, c, h, w) = images.dims4()?;
        let p = self.cfg.patch_size;
        let (_, mean, std) = self.targets(images)?;
        let pred = self
            .predict(images, masking)?
            .broadcast_mul(&std)?
            .broadcast_add(&mean)?;
        let orig = patchify(images, p)?;
        let hidden = Tensor::from_vec(masking.hidden.clone(), (n, masking.patches, 1), images.device())?;
        let shown = (1.0 - &hidden)?;
        let recon = (pred.broadcast_mul(&hidden)? + orig.broadcast_mul(&shown)?)?;
        let masked = (orig.broadcast_mul(&shown)? + (hidden * f64::from(fill))?.broadcast_as(orig.shape())?)?;
        let (gh, gw) = (h / p, w / p);
        Ok((
            unpatchify(&recon, p, c, gh, gw)?.clamp(0f32, 1f32)?,
            unpatchify(&masked, p, c, gh, gw)?,
        ))
    }

    /// The encoder's variables (`encoder.*`), what transfers.
    fn encoder_vars(&self) -> Vec<(String, Var)> {
        named_vars(self.params.var_map())
            .into_iter()
            .filter(|(n, _)| n.starts_with("encoder."))
            .collect()
    }
}

impl pretext_core::Method for Mae {
    type Batch = pretext_data::ImageBatch;

    fn vars(&self) -> &candle_nn::VarMap {
        self.params.var_map()
    }

    fn step(
        &mut self,
        batch: &pretext_data::ImageBatch,
        cx: &pretext_core::StepCx,
    ) -> pretext_core::Result<pretext_core::StepOut> {
        let x = batch
            .views
            .first()
            .ok_or_else(|| pretext_core::Error::Config("the MAE needs one view per image".into()))?;
        // Drawn for the whole batch; a data-parallel process takes its rows.
        let n = x.dim(0)?;
        let masking = self.masking(cx.shard.global_rows(n), &mut cx.rng(pretext_core::seed::METHOD));
        let masking = if cx.shard.size == 1 {
            masking
        } else {
            masking.images_from(cx.shard.first_row(n), n)
        };
        Ok(pretext_core::StepOut {
            loss: self.loss(x, &masking)?,
            stats: vec![],
        })
    }

    fn data_parallel(&self, _processes: usize) -> std::result::Result<(), String> {
        Ok(())
    }

    fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("pretext.paradigm", "generative".to_string()),
            ("pretext.method", "mae".to_string()),
            ("pretext.architecture", self.cfg.arch.name().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl pretext_eval::ImageEncoder for Mae {
    /// The class token after the encoder's final norm, every patch visible.
    fn encode(&self, images: &Tensor, _train: bool) -> Result<Tensor> {
        self.encoder.forward(images)
    }

    fn feature_dim(&self) -> usize {
        self.encoder.out_dim()
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.encoder_vars()
    }

    /// The encoder's weights under timm's names (`encoder.` dropped).
    fn state(&self) -> Vec<(String, Var)> {
        self.encoder_vars()
            .into_iter()
            .map(|(n, v)| (n["encoder.".len()..].to_string(), v))
            .collect()
    }

    fn classifier_layer(&self) -> &'static str {
        "head"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn tiny() -> MaeConfig {
        MaeConfig {
            patch_size: 4,
            depth: 1,
            decoder_dim: 16,
            decoder_depth: 1,
            decoder_heads: 2,
            ..MaeConfig::default()
        }
    }

    #[test]
    fn masking_hides_exactly_the_ratio_in_every_image() {
        let mut rng = StdRng::seed_from_u64(1);
        for (patches, ratio) in [(49usize, 0.75f64), (16, 0.5), (64, 0.9)] {
            let cfg = MaeConfig {
                mask_ratio: ratio,
                ..tiny()
            };
            let masked = cfg.masked_count(patches);
            let m = Masking::random(5, patches, masked, &mut rng);
            assert_eq!(m.visible, patches - masked);
            for (i, row) in m.hidden.chunks(patches).enumerate() {
                let hidden: f32 = row.iter().sum();
                assert_eq!(hidden as usize, masked, "image {i}");
                let keep = &m.keep[i * m.visible..(i + 1) * m.visible];
                assert!(keep.windows(2).all(|w| w[0] < w[1]), "ascending, distinct");
                assert!(keep.iter().all(|&j| row[j] == 0.0), "kept patches are visible");
            }
        }
        assert_eq!(tiny().masked_count(49), 37, "0.75 × 49 = 36.75 → 37");
        // different images get different patches
        let m = Masking::random(2, 49, 37, &mut rng);
        assert_ne!(m.keep[..12], m.keep[12..]);
    }

    #[test]
    fn the_loss_is_the_mean_over_hidden_patches_only() -> Result<()> {
        let dev = Device::Cpu;
        let pred = Tensor::new(&[[[1f32, 2.], [0., 0.], [3., 3.]]], &dev)?; // 1 image, 3 patches of 2
        let target = Tensor::new(&[[[0f32, 0.], [5., 5.], [1., 1.]]], &dev)?;
        let hidden = Tensor::new(&[[1f32, 0., 1.]], &dev)?;
        // hidden patches 0 and 2: (1 + 4) / 2 = 2.5 and (4 + 4) / 2 = 4 → mean 3.25; patch 1 (25) ignored
        let loss = masked_patch_loss(&pred, &target, &hidden)?.to_scalar::<f32>()?;
        assert!((loss - 3.25).abs() < 1e-6, "{loss}");
        // no gradient reaches the visible patch's prediction
        let v = Var::from_tensor(&pred)?;
        let g = masked_patch_loss(v.as_tensor(), &target, &hidden)?.backward()?;
        let g = g.get(v.as_tensor()).expect("grad").to_vec3::<f32>()?;
        assert_eq!(g[0][1], [0.0, 0.0]);
        // d/dpred of mean_j (pred - t)² / 2 hidden patches = (pred - t) / 2
        assert_eq!(g[0][0], [0.5, 1.0]);
        assert!(masked_patch_loss(&pred, &target, &hidden.zeros_like()?).is_err());
        Ok(())
    }

    #[test]
    fn normalised_targets_have_zero_mean_and_unit_unbiased_variance() -> Result<()> {
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]]], &Device::Cpu)?;
        let (t, mean, std) = normalise_patches(&x)?;
        let t = t.flatten_all()?.to_vec1::<f32>()?;
        // mean 2.5, unbiased variance 5/3
        let s = (5f32 / 3.0 + 1e-6).sqrt();
        for (a, v) in t.iter().zip([1f32, 2., 3., 4.]) {
            assert!((a - (v - 2.5) / s).abs() < 1e-6);
        }
        assert!((mean.flatten_all()?.to_vec1::<f32>()?[0] - 2.5).abs() < 1e-6);
        assert!((std.flatten_all()?.to_vec1::<f32>()?[0] - s).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn visible_patches_do_not_change_the_loss_through_the_target_and_hidden_ones_do() -> Result<()> {
        // The encoder sees only the kept patches: changing a hidden patch of
        // the input changes the loss only through its target; the predictions
        // of every patch stay the same.
        let dev = Device::Cpu;
        let mae = Mae::new(&tiny(), 1, 8, 3, &dev)?; // 2 × 2 patches
        let x = Tensor::randn(0f32, 1.0, (1, 1, 8, 8), &dev)?;
        let m = Masking::random(1, 4, 3, &mut StdRng::seed_from_u64(2));
        let kept = m.keep[0];
        let hidden_patch = (0..4).find(|&j| j != kept).expect("a hidden patch");
        let bump = |patch: usize| -> Result<Tensor> {
            let mut v = x.flatten_all()?.to_vec1::<f32>()?;
            let (r, c) = (patch / 2 * 4, patch % 2 * 4);
            v[r * 8 + c] += 3.0;
            Tensor::from_vec(v, (1, 1, 8, 8), &dev)
        };
        let base = mae.predict(&x, &m)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert_eq!(diff(&mae.predict(&bump(hidden_patch)?, &m)?, &base)?, 0.0);
        assert!(diff(&mae.predict(&bump(kept)?, &m)?, &base)? > 0.0);
        Ok(())
    }

    #[test]
    fn gradients_reach_the_encoder_the_mask_token_and_the_decoder() -> Result<()> {
        let dev = Device::Cpu;
        let mae = Mae::new(&tiny(), 1, 8, 3, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 1, 8, 8), &dev)?;
        let m = mae.masking(2, &mut StdRng::seed_from_u64(5));
        let loss = mae.loss(&x, &m)?;
        let g = loss.backward()?;
        for (name, v) in named_vars(mae.params.var_map()) {
            let norm = g
                .get(v.as_tensor())
                .map(|t| t.sqr().and_then(|s| s.sum_all()).and_then(|s| s.to_scalar::<f32>()))
                .transpose()?
                .unwrap_or(0.0);
            assert!(norm > 0.0, "{name} gets no gradient");
        }
        // the loss matches finite differences along one direction of the mask token
        let mt = named_vars(mae.params.var_map())
            .into_iter()
            .find(|(n, _)| n == "mask_token")
            .expect("mask token")
            .1;
        let dir = Tensor::randn(0f32, 1.0, mt.shape(), &dev)?;
        let analytic = (g.get(mt.as_tensor()).expect("grad") * &dir)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let h = 1e-2;
        let orig = mt.as_tensor().copy()?;
        mt.set(&(&orig + (&dir * h)?)?)?;
        let up = mae.loss(&x, &m)?.to_scalar::<f32>()?;
        mt.set(&(&orig - (&dir * h)?)?)?;
        let down = mae.loss(&x, &m)?.to_scalar::<f32>()?;
        mt.set(&orig)?;
        let numeric = (up - down) / (2.0 * h as f32);
        assert!(
            (numeric - analytic).abs() < 2e-3 * analytic.abs().max(1.0),
            "finite differences {numeric} vs backward {analytic}"
        );
        Ok(())
    }

    #[test]
    fn names_are_timms_under_encoder_and_the_references_in_the_decoder() -> Result<()> {
        let mae = Mae::new(&tiny(), 1, 8, 3, &Device::Cpu)?;
        let names: Vec<String> = named_vars(mae.params.var_map()).into_iter().map(|(n, _)| n).collect();
        for want in [
            "encoder.cls_token",
            "encoder.pos_embed",
            "encoder.patch_embed.proj.weight",
            "encoder.blocks.0.attn.qkv.weight",
            "encoder.norm.bias",
            "decoder_embed.weight",
            "mask_token",
            "decoder_blocks.0.mlp.fc2.weight",
            "decoder_norm.weight",
            "decoder_pred.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        let state: Vec<String> = pretext_eval::ImageEncoder::state(&mae)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(state.contains(&"pos_embed".to_string()) && state.iter().all(|n| !n.starts_with("decoder")));
        Ok(())
    }

    #[test]
    fn bad_settings_name_their_key() {
        let e = MaeConfig {
            patch_size: 5,
            ..tiny()
        }
        .validate(1, 28)
        .expect_err("5 does not divide 28");
        assert_eq!(e.key, "mae.patch_size");
        let e = MaeConfig {
            mask_ratio: 1.0,
            ..tiny()
        }
        .validate(1, 28)
        .expect_err("nothing visible");
        assert_eq!(e.key, "mae.mask_ratio");
        let e = MaeConfig {
            decoder_dim: 18,
            ..tiny()
        }
        .validate(1, 28)
        .expect_err("18 is not a multiple of 4");
        assert_eq!(e.key, "mae.decoder_dim");
    }

    #[test]
    fn reconstructions_keep_the_visible_patches() -> Result<()> {
        let dev = Device::Cpu;
        let mae = Mae::new(&tiny(), 1, 8, 3, &dev)?;
        let x = Tensor::rand(0f32, 1.0, (1, 1, 8, 8), &dev)?;
        let m = Masking::random(1, 4, 3, &mut StdRng::seed_from_u64(2));
        let (recon, masked) = mae.reconstruct(&x, &m, 0.5)?;
        let kept = m.keep[0];
        let (r0, c0) = (kept / 2 * 4, kept % 2 * 4);
        let patch = |t: &Tensor| t.narrow(2, r0, 4).and_then(|t| t.narrow(3, c0, 4));
        assert_eq!(
            (patch(&recon)? - patch(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0
        );
        assert_eq!(
            (patch(&masked)? - patch(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0
        );
        let hidden = (0..4).find(|&j| j != kept).expect("hidden");
        let (r1, c1) = (hidden / 2 * 4, hidden % 2 * 4);
        let filled = masked
            .narrow(2, r1, 4)?
            .narrow(3, c1, 4)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(filled.iter().all(|&v| v == 0.5));
        Ok(())
    }
}
