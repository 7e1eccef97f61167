//! Augmentations: the SimCLR set, seeded per sample, on 1- and 3-channel images.
//!
//! Images enter as `u8` HWC (as datasets store them) and leave as `f32` CHW,
//! ready to be stacked into a batch tensor. The random resized crop and the
//! horizontal flip are fused into one bilinear resampling pass from the `u8`
//! source; the colour operations then work in place on the `f32` image in
//! [0, 1]; normalisation comes last. Nothing allocates per operation, which is
//! what makes the two-view pipeline fast (see `benches/pipeline.rs`).
//!
//! Unlike STYLE.md's `apply(&RgbImage) -> RgbImage` sketch, operations mutate a
//! float image in place: a fresh image per operation would dominate the cost.

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A float image, channel-planar (CHW).
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Channels (1 or 3).
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// `c * h * w` values, CHW.
    pub data: Vec<f32>,
}

impl Image {
    /// Converts `u8` HWC pixels to [0, 1] floats, CHW.
    pub fn from_u8_hwc(src: &[u8], h: usize, w: usize, c: usize) -> Self {
        let mut data = vec![0f32; c * h * w];
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    data[ch * h * w + y * w + x] = f32::from(src[(y * w + x) * c + ch]) / 255.0;
                }
            }
        }
        Self { c, h, w, data }
    }
}

/// One in-place augmentation.
pub trait Augment: Send + Sync {
    /// Applies the augmentation to `img`, drawing from `rng`.
    fn apply(&self, img: &mut Image, rng: &mut StdRng);
}

/// A crop box in source pixels: top, left, height, width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of a random
/// area fraction in `scale` and log-uniform aspect ratio in `ratio`, then a
/// centre crop with the ratio clamped.
pub fn random_resized_crop_box(h: usize, w: usize, scale: (f64, f64), ratio: (f64, f64), rng: &mut StdRng) -> CropBox {
    let area = (h * w) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let ar = rng.random_range(lr0..=lr1).exp();
        let cw = (target * ar).sqrt().round() as usize;
        let ch = (target / ar).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let top = rng.random_range(0..=h - ch);
            let left = rng.random_range(0..=w - cw);
            return CropBox {
                top,
                left,
                height: ch,
                width: cw,
            };
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, ((w as f64 / ratio.0).round() as usize).clamp(1, h))
    } else if in_ratio > ratio.1 {
        (((h as f64 * ratio.1).round() as usize).clamp(1, w), h)
    } else {
        (w, h)
    };
    CropBox {
        top: (h - ch) / 2,
        left: (w - cw) / 2,
        height: ch,
        width: cw,
    }
}

/// Bilinear resampling of `crop` of a `u8` HWC image to `out_h × out_w`
/// (half-pixel centres, edges clamped, as `align_corners=False`), optionally
/// mirrored horizontally; writes CHW floats in [0, 1] into `out`.
#[allow(clippy::too_many_arguments)]
pub fn resample_u8(
    src: &[u8],
    h: usize,
    w: usize,
    c: usize,
    crop: CropBox,
    out_h: usize,
    out_w: usize,
    flip: bool,
    out: &mut [f32],
) {
    debug_assert_eq!(src.len(), h * w * c);
    debug_assert_eq!(out.len(), c * out_h * out_w);
    let sy = crop.height as f32 / out_h as f32;
    let sx = crop.width as f32 / out_w as f32;
    // Precompute column taps.
    let mut x0s = [0usize; 512];
    let mut x1s = [0usize; 512];
    let mut fxs = [0f32; 512];
    let big = out_w > 512;
    let mut xv: Vec<(usize, usize, f32)> = Vec::new();
    for ox in 0..out_w {
        let fx = ((ox as f32 + 0.5) * sx - 0.5).max(0.0);
        let x0 = (fx.floor() as usize).min(crop.width - 1);
        let x1 = (x0 + 1).min(crop.width - 1);
        let t = (fx - x0 as f32).min(1.0);
        let (a, b) = (crop.left + x0, crop.left + x1);
        if big {
            xv.push((a, b, t));
        } else {
            x0s[ox] = a;
            x1s[ox] = b;
            fxs[ox] = t;
        }
    }
    let tap = |ox: usize| -> (usize, usize, f32) {
        if big {
            xv[ox]
        } else {
            (x0s[ox], x1s[ox], fxs[ox])
        }
    };
    let plane = out_h * out_w;
    const INV: f32 = 1.0 / 255.0;
    for oy in 0..out_h {
        let fy = ((oy as f32 + 0.5) * sy - 0.5).max(0.0);
        let y0 = (fy.floor() as usize).min(crop.height - 1);
        let y1 = (y0 + 1).min(crop.height - 1);
        let ty = (fy - y0 as f32).min(1.0);
        let r0 = (crop.top + y0) * w * c;
        let r1 = (crop.top + y1) * w * c;
        for ox in 0..out_w {
            let (a, b, tx) = tap(ox);
            let dx = if flip { out_w - 1 - ox } else { ox };
            for ch in 0..c {
                let p00 = f32::from(src[r0 + a * c + ch]);
                let p01 = f32::from(src[r0 + b * c + ch]);
                let p10 = f32::from(src[r1 + a * c + ch]);
                let p11 = f32::from(src[r1 + b * c + ch]);
                let top = p00 + (p01 - p00) * tx;
                let bot = p10 + (p11 - p10) * tx;
                out[ch * plane + oy * out_w + dx] = (top + (bot - top) * ty) * INV;
            }
        }
    }
}

fn gray_weights(c: usize) -> [f32; 3] {
    if c == 3 {
        [0.299, 0.587, 0.114]
    } else {
        [1.0, 0.0, 0.0]
    }
}

fn adjust_brightness(data: &mut [f32], f: f32) {
    for v in data.iter_mut() {
        *v = (*v * f).clamp(0.0, 1.0);
    }
}

fn adjust_contrast(data: &mut [f32], c: usize, f: f32) {
    // torchvision: blend with the mean of the grayscale image.
    let plane = data.len() / c;
    let wts = gray_weights(c);
    let mut mean = 0f32;
    for ch in 0..c {
        let s: f32 = data[ch * plane..(ch + 1) * plane].iter().sum();
        mean += wts[ch] * s;
    }
    mean /= plane as f32;
    let add = mean * (1.0 - f);
    for v in data.iter_mut() {
        *v = (*v * f + add).clamp(0.0, 1.0);
    }
}

fn adjust_saturation(data: &mut [f32], c: usize, f: f32) {
    if c != 3 {
        return;
    }
    let plane = data.len() / 3;
    let (r, rest) = data.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for i in 0..plane {
        let gray = 0.299 * r[i] + 0.587 * g[i] + 0.114 * b[i];
        let k = gray * (1.0 - f);
        r[i] = (r[i] * f + k).clamp(0.0, 1.0);
        g[i] = (g[i] * f + k).clamp(0.0, 1.0);
        b[i] = (b[i] * f + k).clamp(0.0, 1.0);
    }
}

fn adjust_hue(data: &mut [f32], c: usize, shift: f32) {
    if c != 3 {
        return;
    }
    let plane = data.len() / 3;
    let (r, rest) = data.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for i in 0..plane {
        let (mx, mn) = (r[i].max(g[i]).max(b[i]), r[i].min(g[i]).min(b[i]));
        let v = mx;
        let d = mx - mn;
        if d <= 0.0 {
            continue;
        }
        let s = d / mx;
        let mut hh = if mx == r[i] {
            (g[i] - b[i]) / d
        } else if mx == g[i] {
            2.0 + (b[i] - r[i]) / d
        } else {
            4.0 + (r[i] - g[i]) / d
        } / 6.0;
        hh = (hh + shift).rem_euclid(1.0);
        let h6 = hh * 6.0;
        let k = h6.floor();
        let f = h6 - k;
        let p = v * (1.0 - s);
        let q = v * (1.0 - s * f);
        let t = v * (1.0 - s * (1.0 - f));
        let (nr, ng, nb) = match k as i32 % 6 {
            0 => (v, t, p),
            1 => (q, v, p),
            2 => (p, v, t),
            3 => (p, q, v),
            4 => (t, p, v),
            _ => (v, p, q),
        };
        r[i] = nr;
        g[i] = ng;
        b[i] = nb;
    }
}

/// Horizontal flip with probability `p` (as a stand-alone op; the pipeline fuses it into the crop).
#[derive(Debug, Clone, Copy)]
pub struct HorizontalFlip {
    /// Probability.
    pub p: f64,
}

impl Augment for HorizontalFlip {
    fn apply(&self, img: &mut Image, rng: &mut StdRng) {
        if rng.random::<f64>() < self.p {
            let w = img.w;
            for row in img.data.chunks_mut(w) {
                row.reverse();
            }
        }
    }
}

/// torchvision's `ColorJitter` inside `RandomApply(p)`: factors drawn
/// uniformly from `[1 - x, 1 + x]` (hue shift from `[-hue, hue]`), applied in
/// a random order. Saturation and hue do nothing on 1-channel images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColorJitter {
    /// Probability of applying the jitter at all.
    pub p: f64,
    /// Brightness strength.
    pub brightness: f64,
    /// Contrast strength.
    pub contrast: f64,
    /// Saturation strength.
    pub saturation: f64,
    /// Hue strength (at most 0.5).
    pub hue: f64,
}

impl Default for ColorJitter {
    fn default() -> Self {
        Self {
            p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
        }
    }
}

impl ColorJitter {
    /// Applies the four adjustments (each with strength > 0) to CHW `data`
    /// of `c` channels, in a random order when `random_order`, else
    /// brightness, contrast, saturation, hue. The probability `p` is the caller's.
    fn adjust(&self, data: &mut [f32], c: usize, random_order: bool, rng: &mut StdRng) {
        let mut order = [0usize, 1, 2, 3];
        if random_order {
            for i in (1..4).rev() {
                let k = rng.random_range(0..=i);
                order.swap(i, k);
            }
        }
        let factor = |s: f64, rng: &mut StdRng| rng.random_range((1.0 - s).max(0.0)..=1.0 + s) as f32;
        for op in order {
            match op {
                0 if self.brightness > 0.0 => adjust_brightness(data, factor(self.brightness, rng)),
                1 if self.contrast > 0.0 => adjust_contrast(data, c, factor(self.contrast, rng)),
                2 if self.saturation > 0.0 => adjust_saturation(data, c, factor(self.saturation, rng)),
                3 if self.hue > 0.0 => adjust_hue(data, c, rng.random_range(-self.hue..=self.hue) as f32),
                _ => {}
            }
        }
    }
}

impl Augment for ColorJitter {
    fn apply(&self, img: &mut Image, rng: &mut StdRng) {
        if rng.random::<f64>() >= self.p {
            return;
        }
        self.adjust(&mut img.data, img.c, true, rng);
    }
}

/// Replace an RGB image by its luma (in every channel) with probability `p`.
#[derive(Debug, Clone, Copy)]
pub struct RandomGrayscale {
    /// Probability.
    pub p: f64,
}

fn to_grayscale(data: &mut [f32], c: usize) {
    if c != 3 {
        return;
    }
    let plane = data.len() / 3;
    for i in 0..plane {
        let g = 0.299 * data[i] + 0.587 * data[plane + i] + 0.114 * data[2 * plane + i];
        data[i] = g;
        data[plane + i] = g;
        data[2 * plane + i] = g;
    }
}

impl Augment for RandomGrayscale {
    fn apply(&self, img: &mut Image, rng: &mut StdRng) {
        if rng.random::<f64>() < self.p {
            to_grayscale(&mut img.data, img.c);
        }
    }
}

/// Separable Gaussian blur with probability `p`, `sigma` drawn from a range,
/// kernel size `2 * round(3 sigma) + 1` capped at `max_kernel`, edges reflected.
#[derive(Debug, Clone, Copy)]
pub struct GaussianBlur {
    /// Probability.
    pub p: f64,
    /// Range of sigma, in pixels.
    pub sigma: (f64, f64),
    /// Largest kernel size (odd).
    pub max_kernel: usize,
}

fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let mut i = i;
    while i < 0 || i >= n {
        i = if i < 0 { -i } else { 2 * (n - 1) - i };
    }
    i as usize
}

/// Blurs `img` with a Gaussian of `sigma` (exposed for tests).
pub fn gaussian_blur(img: &mut Image, sigma: f32, max_kernel: usize) {
    gaussian_blur_planes(&mut img.data, img.c, img.h, img.w, sigma, max_kernel);
}

fn gaussian_blur_planes(data: &mut [f32], c: usize, h: usize, w: usize, sigma: f32, max_kernel: usize) {
    let radius = ((3.0 * sigma).round() as usize).min(max_kernel / 2).max(1);
    let kernel: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f32 - radius as f32;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let s: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / s).collect();
    let mut tmp = vec![0f32; h * w];
    for ch in 0..c {
        let p = &mut data[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0.0;
                for (k, kv) in kernel.iter().enumerate() {
                    acc += kv * p[y * w + reflect(x as isize + k as isize - radius as isize, w)];
                }
                tmp[y * w + x] = acc;
            }
        }
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0.0;
                for (k, kv) in kernel.iter().enumerate() {
                    acc += kv * tmp[reflect(y as isize + k as isize - radius as isize, h) * w + x];
                }
                p[y * w + x] = acc;
            }
        }
    }
}

impl Augment for GaussianBlur {
    fn apply(&self, img: &mut Image, rng: &mut StdRng) {
        if rng.random::<f64>() >= self.p {
            return;
        }
        let sigma = rng.random_range(self.sigma.0..=self.sigma.1) as f32;
        gaussian_blur(img, sigma, self.max_kernel);
    }
}

/// Inverts values at or above `threshold` with probability `p`.
#[derive(Debug, Clone, Copy)]
pub struct Solarize {
    /// Probability.
    pub p: f64,
    /// Threshold in [0, 1].
    pub threshold: f32,
}

impl Augment for Solarize {
    fn apply(&self, img: &mut Image, rng: &mut StdRng) {
        if rng.random::<f64>() >= self.p {
            return;
        }
        solarize(&mut img.data, self.threshold);
    }
}

fn solarize(data: &mut [f32], threshold: f32) {
    for v in data.iter_mut() {
        if *v >= threshold {
            *v = 1.0 - *v;
        }
    }
}

/// Augmentation settings (the `data.augment` section of a config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Random resized crop on (off = resize the whole image).
    pub crop: bool,
    /// Area fraction range of the crop.
    pub crop_scale: (f64, f64),
    /// Aspect-ratio range of the crop.
    pub crop_ratio: (f64, f64),
    /// Horizontal flip probability.
    pub flip_p: f64,
    /// Colour jitter.
    pub jitter: ColorJitter,
    /// Fixed order brightness → contrast (the reference's batched jitter) instead of torchvision's random order.
    pub jitter_fixed_order: bool,
    /// Random grayscale probability (RGB only).
    pub grayscale_p: f64,
    /// Gaussian blur probability.
    pub blur_p: f64,
    /// Gaussian blur sigma range.
    pub blur_sigma: (f64, f64),
    /// Solarisation probability.
    pub solarize_p: f64,
    /// Per-channel mean for normalisation (one value = all channels; empty = none).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation for normalisation.
    pub std: Vec<f32>,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop: true,
            crop_scale: (0.2, 1.0),
            crop_ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            jitter: ColorJitter::default(),
            jitter_fixed_order: false,
            grayscale_p: 0.2,
            blur_p: 0.0,
            blur_sigma: (0.1, 2.0),
            solarize_p: 0.0,
            mean: vec![],
            std: vec![],
        }
    }
}

impl AugmentConfig {
    /// The reference's Fashion-MNIST training augmentation: crop (0.2–1), flip,
    /// p = 0.8 brightness then contrast (±0.4), normalise 0.2860 / 0.3530.
    pub fn fashion_mnist() -> Self {
        Self {
            jitter: ColorJitter {
                p: 0.8,
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.0,
                hue: 0.0,
            },
            jitter_fixed_order: true,
            grayscale_p: 0.0,
            mean: vec![0.2860],
            std: vec![0.3530],
            ..Self::default()
        }
    }

    /// No augmentation: resize only, then normalise (for evaluation).
    pub fn none(mean: Vec<f32>, std: Vec<f32>) -> Self {
        Self {
            crop: false,
            flip_p: 0.0,
            jitter: ColorJitter {
                p: 0.0,
                ..ColorJitter::default()
            },
            grayscale_p: 0.0,
            blur_p: 0.0,
            solarize_p: 0.0,
            mean,
            std,
            ..Self::default()
        }
    }

    /// Checks ranges.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        let (s0, s1) = self.crop_scale;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return Err(InvalidSetting::value(
                "data.augment.crop_scale",
                format!("{:?}", self.crop_scale),
                "must satisfy 0 < lo <= hi <= 1",
            ));
        }
        let (r0, r1) = self.crop_ratio;
        if !(r0 > 0.0 && r0 <= r1) {
            return Err(InvalidSetting::value(
                "data.augment.crop_ratio",
                format!("{:?}", self.crop_ratio),
                "must satisfy 0 < lo <= hi",
            ));
        }
        for (n, p) in [
            ("flip_p", self.flip_p),
            ("jitter.p", self.jitter.p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p", self.blur_p),
            ("solarize_p", self.solarize_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(InvalidSetting::value(
                    format!("data.augment.{n}"),
                    p,
                    "must lie in [0, 1]",
                ));
            }
        }
        if !(0.0..=0.5).contains(&self.jitter.hue) {
            return Err(InvalidSetting::value(
                "data.augment.jitter.hue",
                self.jitter.hue,
                "must lie in [0, 0.5]",
            ));
        }
        if self.mean.len() != self.std.len() {
            return Err(InvalidSetting::new(
                "data.augment.std",
                format!(
                    "{} values, but data.augment.mean has {}: one each per channel",
                    self.std.len(),
                    self.mean.len()
                ),
            ));
        }
        if self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(InvalidSetting::value(
                "data.augment.std",
                format!("{:?}", self.std),
                "must all be > 0",
            ));
        }
        Ok(())
    }
}

/// A composed pipeline producing one view of `out_h × out_w` from a `u8` image.
pub struct Pipeline {
    cfg: AugmentConfig,
    out_h: usize,
    out_w: usize,
    extra: Vec<Box<dyn Augment>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("cfg", &self.cfg)
            .field("out", &(self.out_h, self.out_w))
            .finish()
    }
}

impl Pipeline {
    /// A pipeline from a config and an output size.
    ///
    /// # Errors
    /// As [`AugmentConfig::validate`].
    pub fn new(
        cfg: AugmentConfig,
        out_h: usize,
        out_w: usize,
    ) -> std::result::Result<Self, pretext_core::InvalidSetting> {
        cfg.validate()?;
        if out_h == 0 || out_w == 0 {
            return Err(pretext_core::InvalidSetting::value(
                "data.image_size",
                format!("{out_h}x{out_w}"),
                "must be positive",
            ));
        }
        Ok(Self {
            cfg,
            out_h,
            out_w,
            extra: Vec::new(),
        })
    }

    /// Adds a custom augmentation, applied after the built-in ones and before normalisation.
    pub fn with(mut self, op: Box<dyn Augment>) -> Self {
        self.extra.push(op);
        self
    }

    /// Output (height, width).
    pub fn out_size(&self) -> (usize, usize) {
        (self.out_h, self.out_w)
    }

    /// The config.
    pub fn config(&self) -> &AugmentConfig {
        &self.cfg
    }

    /// Makes one view of `src` (`u8` HWC, `h × w × c`) into `out` (CHW, `c × out_h × out_w`).
    pub fn view_into(&self, src: &[u8], h: usize, w: usize, c: usize, rng: &mut StdRng, out: &mut [f32]) {
        let cfg = &self.cfg;
        let crop = if cfg.crop {
            random_resized_crop_box(h, w, cfg.crop_scale, cfg.crop_ratio, rng)
        } else {
            CropBox {
                top: 0,
                left: 0,
                height: h,
                width: w,
            }
        };
        let flip = cfg.flip_p > 0.0 && rng.random::<f64>() < cfg.flip_p;
        resample_u8(src, h, w, c, crop, self.out_h, self.out_w, flip, out);
        let data = &mut out[..];
        let j = &cfg.jitter;
        if j.p > 0.0 && rng.random::<f64>() < j.p {
            j.adjust(data, c, !cfg.jitter_fixed_order, rng);
        }
        if cfg.grayscale_p > 0.0 && rng.random::<f64>() < cfg.grayscale_p {
            to_grayscale(data, c);
        }
        if cfg.blur_p > 0.0 && rng.random::<f64>() < cfg.blur_p {
            let sigma = rng.random_range(cfg.blur_sigma.0..=cfg.blur_sigma.1) as f32;
            let k = (2 * (self.out_h.min(self.out_w) / 20).max(1) + 1).max(3);
            gaussian_blur_planes(data, c, self.out_h, self.out_w, sigma, k);
        }
        if cfg.solarize_p > 0.0 && rng.random::<f64>() < cfg.solarize_p {
            solarize(data, 0.5);
        }
        if !self.extra.is_empty() {
            let mut img = Image {
                c,
                h: self.out_h,
                w: self.out_w,
                data: data.to_vec(),
            };
            for op in &self.extra {
                op.apply(&mut img, rng);
            }
            data.copy_from_slice(&img.data);
        }
        if !cfg.mean.is_empty() {
            let plane = self.out_h * self.out_w;
            for ch in 0..c {
                let m = cfg.mean[ch.min(cfg.mean.len() - 1)];
                let inv = 1.0 / cfg.std[ch.min(cfg.std.len() - 1)];
                for v in &mut out[ch * plane..(ch + 1) * plane] {
                    *v = (*v - m) * inv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretext_core::seed::stream_rng;

    fn img_u8() -> (Vec<u8>, usize, usize) {
        // 2 x 3 grayscale: rows [0 10 20] [30 40 50]
        (vec![0, 10, 20, 30, 40, 50], 2, 3)
    }

    fn approx(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn identity_resample_and_flip() {
        let (src, h, w) = img_u8();
        let full = CropBox {
            top: 0,
            left: 0,
            height: h,
            width: w,
        };
        let mut out = vec![0f32; 6];
        resample_u8(&src, h, w, 1, full, h, w, false, &mut out);
        approx(&out, &[0.0, 10.0, 20.0, 30.0, 40.0, 50.0].map(|v| v / 255.0));
        resample_u8(&src, h, w, 1, full, h, w, true, &mut out);
        approx(&out, &[20.0, 10.0, 0.0, 50.0, 40.0, 30.0].map(|v| v / 255.0));
        let mut img = Image::from_u8_hwc(&src, h, w, 1);
        HorizontalFlip { p: 1.0 }.apply(&mut img, &mut stream_rng(0, "t", &[]));
        approx(&img.data, &[20.0, 10.0, 0.0, 50.0, 40.0, 30.0].map(|v| v / 255.0));
    }

    #[test]
    fn crop_and_upscale_by_hand() {
        // Crop the 1x2 box at row 1, cols 1..3 ([40, 50]) and upscale to 1x4.
        let (src, h, w) = img_u8();
        let crop = CropBox {
            top: 1,
            left: 1,
            height: 1,
            width: 2,
        };
        let mut out = vec![0f32; 4];
        resample_u8(&src, h, w, 1, crop, 1, 4, false, &mut out);
        // src x = (ox + .5) * .5 - .5 -> -.25 (clamped 0), .25, .75, 1.25 (clamped to last)
        approx(&out, &[40.0, 42.5, 47.5, 50.0].map(|v| v / 255.0));
    }

    #[test]
    fn rgb_hwc_to_chw() {
        let src = [1u8, 2, 3, 4, 5, 6]; // 1 x 2 RGB
        let img = Image::from_u8_hwc(&src, 1, 2, 3);
        approx(&img.data, &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0].map(|v| v / 255.0));
        let mut out = vec![0f32; 6];
        resample_u8(
            &src,
            1,
            2,
            3,
            CropBox {
                top: 0,
                left: 0,
                height: 1,
                width: 2,
            },
            1,
            2,
            false,
            &mut out,
        );
        approx(&out, &img.data);
    }

    #[test]
    fn crop_boxes_fit_and_follow_the_seed() {
        for s in 0..200 {
            let b = random_resized_crop_box(28, 28, (0.2, 1.0), (0.75, 4.0 / 3.0), &mut stream_rng(s, "t", &[]));
            assert!(b.top + b.height <= 28 && b.left + b.width <= 28 && b.height > 0 && b.width > 0);
            let area = (b.height * b.width) as f64 / 784.0;
            assert!((0.15..=1.0).contains(&area), "{b:?}");
            let again = random_resized_crop_box(28, 28, (0.2, 1.0), (0.75, 4.0 / 3.0), &mut stream_rng(s, "t", &[]));
            assert_eq!(b, again);
        }
        // impossible ratio: falls back to a centre crop with the ratio clamped
        let b = random_resized_crop_box(10, 40, (1.0, 1.0), (1.0, 1.0), &mut stream_rng(0, "t", &[]));
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: 15,
                height: 10,
                width: 10
            }
        );
    }

    #[test]
    fn brightness_and_contrast_by_hand() {
        let mut d = vec![0.1, 0.2, 0.3, 0.8];
        adjust_brightness(&mut d, 1.5);
        approx(&d, &[0.15, 0.3, 0.45, 1.0]);
        let mut d = vec![0.1, 0.2, 0.3, 0.8];
        adjust_contrast(&mut d, 1, 0.5); // mean .35: x * .5 + .175
        approx(&d, &[0.225, 0.275, 0.325, 0.575]);
    }

    #[test]
    fn saturation_zero_is_gray_and_hue_full_turn_is_identity() {
        let mut d = vec![0.9, 0.2, 0.1];
        adjust_saturation(&mut d, 3, 0.0);
        let g = 0.299 * 0.9 + 0.587 * 0.2 + 0.114 * 0.1;
        approx(&d, &[g, g, g]);
        let mut d = vec![0.9, 0.3, 0.2, 0.5, 0.1, 0.7];
        let orig = d.clone();
        adjust_hue(&mut d, 3, 0.5);
        assert!(d.iter().zip(&orig).any(|(a, b)| (a - b).abs() > 0.1));
        adjust_hue(&mut d, 3, 0.5);
        approx(&d, &orig);
    }

    #[test]
    fn blur_preserves_constant_images_and_mass() {
        let mut img = Image {
            c: 1,
            h: 5,
            w: 5,
            data: vec![0.5; 25],
        };
        gaussian_blur(&mut img, 1.0, 7);
        approx(&img.data, &[0.5; 25]);
        let mut img = Image {
            c: 1,
            h: 1,
            w: 9,
            data: vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        };
        gaussian_blur(&mut img, 1.0, 7);
        assert!((img.data.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(img.data[4] < 1.0 && img.data[3] > 0.0 && (img.data[3] - img.data[5]).abs() < 1e-6);
    }

    #[test]
    fn solarize_and_grayscale() {
        let mut img = Image {
            c: 1,
            h: 1,
            w: 3,
            data: vec![0.2, 0.5, 0.9],
        };
        Solarize { p: 1.0, threshold: 0.5 }.apply(&mut img, &mut stream_rng(0, "t", &[]));
        approx(&img.data, &[0.2, 0.5, 0.1]);
        let mut img = Image {
            c: 3,
            h: 1,
            w: 1,
            data: vec![1.0, 0.0, 0.0],
        };
        RandomGrayscale { p: 1.0 }.apply(&mut img, &mut stream_rng(0, "t", &[]));
        approx(&img.data, &[0.299, 0.299, 0.299]);
    }

    #[test]
    fn pipeline_is_deterministic_per_seed_and_normalises() -> std::result::Result<(), pretext_core::InvalidSetting> {
        let src: Vec<u8> = (0..28 * 28).map(|i| (i % 251) as u8).collect();
        let p = Pipeline::new(AugmentConfig::fashion_mnist(), 28, 28)?;
        let mut a = vec![0f32; 784];
        let mut b = vec![0f32; 784];
        let mut c = vec![0f32; 784];
        p.view_into(&src, 28, 28, 1, &mut stream_rng(1, "augment", &[0, 5]), &mut a);
        p.view_into(&src, 28, 28, 1, &mut stream_rng(1, "augment", &[0, 5]), &mut b);
        p.view_into(&src, 28, 28, 1, &mut stream_rng(1, "augment", &[0, 6]), &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // normalisation: an unaugmented view of a constant image
        let flat = vec![255u8; 784];
        let p = Pipeline::new(AugmentConfig::none(vec![0.5], vec![0.25]), 28, 28)?;
        p.view_into(&flat, 28, 28, 1, &mut stream_rng(0, "t", &[]), &mut a);
        approx(&a, &[2.0; 784]);
        Ok(())
    }

    #[test]
    fn bad_configs_are_rejected() {
        let bad = AugmentConfig {
            crop_scale: (0.0, 1.0),
            ..AugmentConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "data.augment.crop_scale");
        let bad = AugmentConfig {
            flip_p: 2.0,
            ..AugmentConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "data.augment.flip_p");
        let bad = AugmentConfig {
            mean: vec![0.5],
            std: vec![],
            ..AugmentConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
