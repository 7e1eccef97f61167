//! The VAE: an encoder to a diagonal Gaussian posterior `q(z|x)`, a decoder to
//! the likelihood `p(x|z)` (Bernoulli logits or Gaussian means), a standard
//! normal prior, and the reparameterised ELBO.
//!
//! Names follow the PyTorch reference's `VAE` for the MLP (`enc.0`, `enc.2`,
//! `mu`, `logvar`, `dec.0`, `dec.2`, `dec.4`), so its export loads there; the
//! convolutional variant uses `enc.0`, `enc.2` (convs), optional fully
//! connected layers `enc_fc.0`, `enc_fc.2`, … , `mu`, `logvar`, then
//! `dec_fc.0`, `dec_fc.2`, … (the last one to the feature map), `dec.0`,
//! `dec.2` (transposed convs), flattening in PyTorch's NCHW order. Without
//! fully connected layers the decoder's single projection is `dec_fc`.

use crate::loss::{bernoulli_log_lik, gaussian_kl, gaussian_log_lik, log_mean_exp, log_posterior, log_standard_normal};
use candle_core::{DType, Device, Result, Tensor, Var};
use pretext_core::init::named_vars;
use pretext_core::nn::{linear, Conv2d, ConvTranspose2d, Linear};
use pretext_core::SeededVarMap;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// Encoder/decoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VaeArch {
    /// Fully connected (the reference's 784-512-256-z).
    Mlp,
    /// Two strided 4×4 convolutions down, two transposed convolutions up.
    Conv,
}

/// The observation model `p(x|z)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Likelihood {
    /// Bernoulli on intensities in [0, 1] (continuous BCE); the decoder gives logits.
    Bernoulli,
    /// Gaussian with a shared standard deviation (fixed, or learned as `log_sigma`).
    Gaussian,
}

/// The `model` section of a VAE run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeConfig {
    /// `mlp` or `conv`.
    pub arch: VaeArch,
    /// Latent size.
    pub latent: usize,
    /// MLP hidden sizes, encoder order (the decoder mirrors them).
    pub hidden: Vec<usize>,
    /// Conv channels of the two down/up stages.
    pub channels: Vec<usize>,
    /// Conv: the decoder's own channels (the input side of the two transposed
    /// convolutions, in the encoder's order: `[c1, c2]` decodes
    /// `c2 → c1 → image`); empty = the same as `channels`.
    pub dec_channels: Vec<usize>,
    /// Conv: fully connected hidden sizes (each + ReLU) between the
    /// flattened feature map and the posterior; empty = `μ` and `log σ²` are
    /// linear functions of the feature map.
    pub enc_fc: Vec<usize>,
    /// Conv: fully connected hidden sizes (each + ReLU) between the latent and
    /// the decoder's projection to the feature map, latent side first.
    pub dec_fc: Vec<usize>,
    /// `bernoulli` or `gaussian`.
    pub likelihood: Likelihood,
    /// Gaussian likelihood: initial (or fixed) standard deviation.
    pub sigma: f64,
    /// Gaussian likelihood: learn σ (a parameter `log_sigma`).
    pub learn_sigma: bool,
    /// Weight of the KL term (β-VAE; 1 = the ELBO).
    pub beta: f64,
    /// Raise β linearly from 0 over this many steps (0 = no warm-up).
    pub beta_warmup_steps: u64,
    /// Free bits (Kingma et al., 2016): during training each latent
    /// dimension's KL, averaged over the batch, counts as at least this many
    /// nats, so the optimiser gains nothing by collapsing it below (0 = off).
    /// Only the training loss changes; every reported −ELBO is the true one.
    pub free_bits: f64,
    /// Lower the free bits linearly to 0 over this many steps (0 = keep
    /// them): latent dimensions are switched on early, then the loss becomes
    /// the plain (β-weighted) negative ELBO.
    pub free_bits_decay_steps: u64,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            arch: VaeArch::Mlp,
            latent: 32,
            hidden: vec![512, 256],
            channels: vec![32, 64],
            dec_channels: Vec::new(),
            enc_fc: Vec::new(),
            dec_fc: Vec::new(),
            likelihood: Likelihood::Bernoulli,
            sigma: 0.1,
            learn_sigma: true,
            beta: 1.0,
            beta_warmup_steps: 0,
            free_bits: 0.0,
            free_bits_decay_steps: 0,
        }
    }
}

impl VaeConfig {
    /// The conv decoder's `(c1, c2)`: `dec_channels`, or the encoder's `channels` when empty.
    pub fn decoder_channels(&self) -> (usize, usize) {
        let c = if self.dec_channels.len() == 2 {
            &self.dec_channels
        } else {
            &self.channels
        };
        (c.first().copied().unwrap_or(0), c.get(1).copied().unwrap_or(0))
    }

    /// Checks the shape against the input.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self, channels: usize, size: usize) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting as Bad;
        let list = |v: &[usize]| format!("{v:?}");
        if self.latent == 0 {
            return Err(Bad::value("model.latent", 0, "must be > 0"));
        }
        match self.arch {
            VaeArch::Mlp if self.hidden.is_empty() || self.hidden.contains(&0) => Err(Bad::value(
                "model.hidden",
                list(&self.hidden),
                "must list at least one positive size",
            )),
            VaeArch::Conv if self.channels.len() != 2 || self.channels.contains(&0) => Err(Bad::value(
                "model.channels",
                list(&self.channels),
                "must be two positive channel counts",
            )),
            VaeArch::Conv
                if !self.dec_channels.is_empty()
                    && (self.dec_channels.len() != 2 || self.dec_channels.contains(&0)) =>
            {
                Err(Bad::value(
                    "model.dec_channels",
                    list(&self.dec_channels),
                    "must be empty (the encoder's) or two positive channel counts",
                ))
            }
            VaeArch::Conv if self.enc_fc.contains(&0) => {
                Err(Bad::value("model.enc_fc", list(&self.enc_fc), "sizes must be positive"))
            }
            VaeArch::Conv if self.dec_fc.contains(&0) => {
                Err(Bad::value("model.dec_fc", list(&self.dec_fc), "sizes must be positive"))
            }
            VaeArch::Conv if !size.is_multiple_of(4) => Err(Bad::value(
                "data.image_size",
                size,
                "must be a multiple of 4 for the conv VAE",
            )),
            _ if channels == 0 => Err(Bad::value("data.channels", 0, "must be > 0")),
            _ if !(self.beta >= 0.0 && self.beta.is_finite()) => {
                Err(Bad::value("model.beta", self.beta, "must be >= 0"))
            }
            _ if !(self.free_bits >= 0.0 && self.free_bits.is_finite()) => {
                Err(Bad::value("model.free_bits", self.free_bits, "must be >= 0"))
            }
            _ if self.likelihood == Likelihood::Gaussian
                && self.sigma.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) =>
            {
                Err(Bad::value("model.sigma", self.sigma, "must be > 0"))
            }
            _ => Ok(()),
        }
    }
}

enum Nets {
    Mlp {
        enc: Vec<Linear>,
        dec: Vec<Linear>,
    },
    Conv {
        enc: [Conv2d; 2],
        /// Fully connected encoder layers after the convolutions (each + ReLU).
        enc_fc: Vec<Linear>,
        /// Fully connected decoder layers, the last one to the feature map (each + ReLU).
        dec_fc: Vec<Linear>,
        dec: [ConvTranspose2d; 2],
    },
}

/// Linear layers `din → sizes[0] → sizes[1] → …` named `0`, `2`, `4`, … under
/// `vb` (the indices of a PyTorch `nn.Sequential` with a ReLU after each);
/// returns them and the last size.
fn dense_layers(din: usize, sizes: &[usize], vb: &candle_nn::VarBuilder) -> Result<(Vec<Linear>, usize)> {
    let mut layers = Vec::with_capacity(sizes.len());
    let mut d = din;
    for (i, &h) in sizes.iter().enumerate() {
        layers.push(linear(d, h, true, vb.pp(2 * i))?);
        d = h;
    }
    Ok((layers, d))
}

/// `h` through each layer, each followed by a ReLU.
fn relu_layers(layers: &[Linear], mut h: Tensor) -> Result<Tensor> {
    for l in layers {
        h = pretext_core::ops::relu(&l.forward(&h)?)?;
    }
    Ok(h)
}

/// What one batch of the training objective measured (per-image means, nats).
#[derive(Debug, Clone)]
pub struct ElboTerms {
    /// `−(rec − β·KL)`, the minimised loss (scalar tensor, with gradients).
    pub loss: Tensor,
    /// Mean reconstruction negative log-likelihood `−E_q log p(x|z)`.
    pub rec_nll: f64,
    /// Mean `KL(q(z|x) ‖ p(z))`.
    pub kl: f64,
}

/// A variational autoencoder.
pub struct Vae {
    params: SeededVarMap,
    nets: Nets,
    mu: Linear,
    logvar: Linear,
    log_sigma: Option<Tensor>,
    cfg: VaeConfig,
    channels: usize,
    size: usize,
    dynamic_binarize: bool,
    /// The free bits the objective applies now (set per training step).
    free_bits_now: f64,
}

impl Vae {
    /// Builds the model for `channels`×`size`×`size` inputs, parameters from
    /// the `init` stream of `seed`.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(cfg: &VaeConfig, channels: usize, size: usize, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate(channels, size).map_err(candle_core::Error::msg)?;
        let params = SeededVarMap::from_seed(seed, pretext_core::seed::INIT);
        let vb = params.var_builder(DType::F32, device);
        let d = channels * size * size;
        let (nets, feat) = match cfg.arch {
            VaeArch::Mlp => {
                let (enc, din) = dense_layers(d, &cfg.hidden, &vb.pp("enc"))?;
                let mut sizes: Vec<usize> = cfg.hidden.iter().rev().copied().collect();
                sizes.push(d);
                let (dec, _) = dense_layers(cfg.latent, &sizes, &vb.pp("dec"))?;
                // built after the decoder in PyTorch's registration order? The
                // reference registers enc, mu, logvar, dec; initial values come
                // from our own stream either way.
                (Nets::Mlp { enc, dec }, din)
            }
            VaeArch::Conv => {
                let (c1, c2) = (cfg.channels[0], cfg.channels[1]);
                let enc = [
                    Conv2d::new(channels, c1, 4, 2, 1, true, vb.pp("enc").pp(0))?,
                    Conv2d::new(c1, c2, 4, 2, 1, true, vb.pp("enc").pp(2))?,
                ];
                let flat = c2 * (size / 4) * (size / 4);
                let (enc_fc, din) = dense_layers(flat, &cfg.enc_fc, &vb.pp("enc_fc"))?;
                let (d1, d2) = cfg.decoder_channels();
                let dec_flat = d2 * (size / 4) * (size / 4);
                let dec_fc = if cfg.dec_fc.is_empty() {
                    vec![linear(cfg.latent, dec_flat, true, vb.pp("dec_fc"))?]
                } else {
                    let mut sizes = cfg.dec_fc.clone();
                    sizes.push(dec_flat);
                    dense_layers(cfg.latent, &sizes, &vb.pp("dec_fc"))?.0
                };
                let dec = [
                    ConvTranspose2d::new(d2, d1, 4, 2, 1, 0, true, vb.pp("dec").pp(0))?,
                    ConvTranspose2d::new(d1, channels, 4, 2, 1, 0, true, vb.pp("dec").pp(2))?,
                ];
                (
                    Nets::Conv {
                        enc,
                        enc_fc,
                        dec_fc,
                        dec,
                    },
                    din,
                )
            }
        };
        let mu = linear(feat, cfg.latent, true, vb.pp("mu"))?;
        let logvar = linear(feat, cfg.latent, true, vb.pp("logvar"))?;
        let log_sigma = match cfg.likelihood {
            Likelihood::Gaussian if cfg.learn_sigma => {
                Some(vb.get_with_hints(1, "log_sigma", candle_nn::Init::Const(cfg.sigma.ln()))?)
            }
            Likelihood::Gaussian => Some(Tensor::new(&[cfg.sigma.ln() as f32], device)?),
            Likelihood::Bernoulli => None,
        };
        Ok(Self {
            params,
            nets,
            mu,
            logvar,
            log_sigma,
            cfg: cfg.clone(),
            channels,
            size,
            dynamic_binarize: false,
            free_bits_now: cfg.free_bits,
        })
    }

    /// Train on a fresh Bernoulli draw of every pixel at each step.
    pub fn with_dynamic_binarize(mut self, on: bool) -> Self {
        self.dynamic_binarize = on;
        self
    }

    /// β at 0-based `step` (linear warm-up from 0 when configured).
    pub fn beta_at(&self, step: u64) -> f64 {
        if self.cfg.beta_warmup_steps == 0 {
            self.cfg.beta
        } else {
            self.cfg.beta * ((step + 1) as f64 / self.cfg.beta_warmup_steps as f64).min(1.0)
        }
    }

    /// Free bits at 0-based `step` (linear decay to 0 when configured).
    pub fn free_bits_at(&self, step: u64) -> f64 {
        match self.cfg.free_bits_decay_steps {
            0 => self.cfg.free_bits,
            d => self.cfg.free_bits * (1.0 - step as f64 / d as f64).max(0.0),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SeededVarMap {
        &self.params
    }

    /// The config.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The encoder's parameters (what fine-tuning trains): everything but the decoder.
    pub fn encoder_vars(&self) -> Vec<(String, Var)> {
        named_vars(self.params.var_map())
            .into_iter()
            .filter(|(n, _)| {
                n.starts_with("enc.") || n.starts_with("enc_fc.") || n.starts_with("mu.") || n.starts_with("logvar.")
            })
            .collect()
    }

    /// Posterior parameters `(μ, log σ²)`, each `(n, latent)`, of images `(n, c, h, w)` in [0, 1].
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = x.dim(0)?;
        let h = match &self.nets {
            Nets::Mlp { enc, .. } => relu_layers(enc, x.reshape((n, ()))?)?,
            Nets::Conv { enc, enc_fc, .. } => {
                let (c, hh, ww) = (x.dim(1)?, x.dim(2)?, x.dim(3)?);
                let mut h = if c == 1 {
                    x.reshape((n, hh, ww, 1))?
                } else {
                    pretext_core::ops::nchw_to_nhwc(x)?
                };
                for conv in enc {
                    h = conv.forward_relu(&h)?;
                }
                // flatten in PyTorch's (c, h, w) order
                relu_layers(enc_fc, pretext_core::ops::nhwc_to_nchw(&h)?.reshape((n, ()))?)?
            }
        };
        Ok((self.mu.forward(&h)?, self.logvar.forward(&h)?))
    }

    /// Decoder output for latents `(n, latent)`: Bernoulli logits or Gaussian
    /// means, `(n, c, h, w)`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let n = z.dim(0)?;
        let (c, s) = (self.channels, self.size);
        match &self.nets {
            Nets::Mlp { dec, .. } => {
                let mut h = z.clone();
                for (i, l) in dec.iter().enumerate() {
                    h = l.forward(&h)?;
                    if i + 1 < dec.len() {
                        h = pretext_core::ops::relu(&h)?;
                    }
                }
                h.reshape((n, c, s, s))
            }
            Nets::Conv { dec_fc, dec, .. } => {
                let (_, c2) = self.cfg.decoder_channels();
                let h = relu_layers(dec_fc, z.clone())?.reshape((n, c2, s / 4, s / 4))?;
                let h = pretext_core::ops::nchw_to_nhwc(&h)?;
                let h = dec[0].forward_relu(&h)?;
                let h = dec[1].forward(&h)?; // (n, s, s, c)
                if c == 1 {
                    h.reshape((n, 1, s, s)) // one channel: the same buffer in either layout
                } else {
                    pretext_core::ops::nhwc_to_nchw(&h)
                }
            }
        }
    }

    /// The decoder's mean image for latents (σ(logits) for Bernoulli), in [0, 1] for display.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn decode_mean(&self, z: &Tensor) -> Result<Tensor> {
        let out = self.decode(z)?;
        match self.cfg.likelihood {
            Likelihood::Bernoulli => candle_nn::ops::sigmoid(&out),
            Likelihood::Gaussian => out.clamp(0.0, 1.0),
        }
    }

    /// `log p(x|z)` per image from the decoder output.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn log_lik(&self, out: &Tensor, x: &Tensor) -> Result<Tensor> {
        match (&self.cfg.likelihood, &self.log_sigma) {
            (Likelihood::Gaussian, Some(ls)) => gaussian_log_lik(out, ls, x),
            _ => bernoulli_log_lik(out, x),
        }
    }

    /// Standard normal draws `(n, d)` from `rng`.
    ///
    /// # Errors
    /// A tensor operation failed.
    pub fn noise(n: usize, d: usize, rng: &mut StdRng, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..n * d)
            .map(|_| pretext_core::init::standard_normal(rng) as f32)
            .collect();
        Tensor::from_vec(v, (n, d), device)
    }

    /// The training objective on `x` with noise `eps` `(n, latent)` and KL
    /// weight `beta`, with the free bits of the current training step (the
    /// configured value before any step).
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn objective(&self, x: &Tensor, eps: &Tensor, beta: f64) -> Result<ElboTerms> {
        let (mu, logvar) = self.encode(x)?;
        let z = (&mu + (eps * (&logvar * 0.5)?.exp()?)?)?;
        let rec = self.log_lik(&self.decode(&z)?, x)?; // (n,)
        let kl = gaussian_kl(&mu, &logvar)?;
        let kl_term = if self.free_bits_now > 0.0 {
            // per-dimension KL averaged over the batch, floored at the free bits
            free_bits_kl(&mu, &logvar, self.free_bits_now)?
        } else {
            kl.mean_all()?
        };
        let loss = ((kl_term * beta)? - rec.mean_all()?)?;
        Ok(ElboTerms {
            loss,
            rec_nll: -f64::from(rec.mean_all()?.to_scalar::<f32>()?),
            kl: f64::from(kl.mean_all()?.to_scalar::<f32>()?),
        })
    }

    /// Log importance weights `log p(x|z) + log p(z) − log q(z|x)` of `k`
    /// posterior samples per image, `(k, n)`; their mean over `k` is the
    /// Monte-Carlo ELBO, their log-mean-exp the importance-weighted bound.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn log_weights(&self, x: &Tensor, k: usize, rng: &mut StdRng) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (mu, logvar) = self.encode(x)?;
        let d = mu.dim(1)?;
        let mut rows = Vec::with_capacity(k);
        for _ in 0..k {
            let eps = Self::noise(n, d, rng, x.device())?;
            let z = (&mu + (&eps * (&logvar * 0.5)?.exp()?)?)?;
            let w =
                ((self.log_lik(&self.decode(&z)?, x)? + log_standard_normal(&z)?)? - log_posterior(&eps, &logvar)?)?;
            rows.push(w);
        }
        Tensor::stack(&rows, 0)
    }

    /// Per-image ELBO and importance-weighted bound from the same `k` samples
    /// (so the bound is never below the ELBO), each `(n,)`.
    ///
    /// # Errors
    /// Shapes that do not fit.
    pub fn elbo_and_iwae(&self, x: &Tensor, k: usize, rng: &mut StdRng) -> Result<(Tensor, Tensor)> {
        let w = self.log_weights(x, k, rng)?;
        Ok((w.mean(0)?, log_mean_exp(&w)?))
    }
}

/// `Σ_j max(λ, mean_i KL_ij)`: the batch's KL per latent dimension, each
/// floored at `free_bits` = λ nats (a scalar; no gradient through a floored
/// dimension). In a data-parallel step the mean is over the whole batch
/// (every rank's rows, [`pretext_core::dist::gather_rows`]), so every rank
/// computes the single-process term.
///
/// # Errors
/// Shapes differ.
pub fn free_bits_kl(mu: &Tensor, logvar: &Tensor, free_bits: f64) -> Result<Tensor> {
    let kl = ((((mu.sqr()? + logvar.exp()?)? - 1.0)? - logvar)? * 0.5)?; // (n, d)
    let per_dim = pretext_core::dist::gather_rows(&kl)?.mean(0)?; // (d,)
    per_dim.maximum(free_bits)?.sum_all()
}

/// A Bernoulli draw of every intensity in `x` (in [0, 1]) from `rng`.
///
/// # Errors
/// A tensor operation failed.
pub fn binarize(x: &Tensor, rng: &mut StdRng) -> Result<Tensor> {
    binarize_rows(x, rng, 0)
}

/// [`binarize`] of values that come after `skip` others in the stream's
/// order (a data-parallel shard's rows of a batch): the first `skip` draws
/// are those of the rows before.
fn binarize_rows(x: &Tensor, rng: &mut StdRng, skip: usize) -> Result<Tensor> {
    use rand::Rng;
    for _ in 0..skip {
        let _: f32 = rng.random();
    }
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    let b: Vec<f32> = v
        .iter()
        .map(|&p| f32::from(u8::from(rng.random::<f32>() < p)))
        .collect();
    Tensor::from_vec(b, x.shape(), x.device())
}

impl pretext_core::Method for Vae {
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
            .ok_or_else(|| pretext_core::Error::Config("the VAE needs one view per image".into()))?;
        // Random draws are made for the whole batch and this process takes
        // its rows, so they do not depend on the number of processes.
        let n = x.dim(0)?;
        let x = if self.dynamic_binarize {
            let per_row = x.elem_count() / n.max(1);
            binarize_rows(x, &mut cx.rng("binarize"), cx.shard.first_row(n) * per_row)?
        } else {
            x.clone()
        };
        let eps = Self::noise(
            cx.shard.global_rows(n),
            self.cfg.latent,
            &mut cx.rng(pretext_core::seed::METHOD),
            x.device(),
        )?;
        let eps = cx.shard.rows_of(&eps, n)?;
        let beta = self.beta_at(cx.step);
        self.free_bits_now = self.free_bits_at(cx.step);
        let t = self.objective(&x, &eps, beta)?;
        Ok(pretext_core::StepOut {
            loss: t.loss,
            stats: if self.cfg.free_bits > 0.0 {
                vec![
                    ("rec_nll", t.rec_nll),
                    ("kl", t.kl),
                    ("beta", beta),
                    ("free_bits", self.free_bits_now),
                ]
            } else {
                vec![("rec_nll", t.rec_nll), ("kl", t.kl), ("beta", beta)]
            },
        })
    }

    fn data_parallel(&self, _processes: usize) -> std::result::Result<(), String> {
        Ok(())
    }

    fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("pretext.paradigm", "generative".to_string()),
            ("pretext.method", "vae".to_string()),
            (
                "pretext.architecture",
                match self.cfg.arch {
                    VaeArch::Mlp => "vae-mlp".to_string(),
                    VaeArch::Conv => "vae-conv".to_string(),
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl pretext_eval::ImageEncoder for Vae {
    fn encode(&self, images: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(Vae::encode(self, images)?.0)
    }

    fn feature_dim(&self) -> usize {
        self.cfg.latent
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.encoder_vars()
    }

    /// The encoder's weights (`enc.*`, `enc_fc.*`, `mu.*`, `logvar.*`), by the export's names.
    fn state(&self) -> Vec<(String, Var)> {
        self.encoder_vars()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn tiny(arch: VaeArch, likelihood: Likelihood) -> Result<Vae> {
        tiny_fc(arch, likelihood, &[])
    }

    /// A tiny model; `fc` = the conv variant's fully connected hidden sizes
    /// (encoder order; the decoder mirrors them).
    fn tiny_fc(arch: VaeArch, likelihood: Likelihood, fc: &[usize]) -> Result<Vae> {
        let cfg = VaeConfig {
            arch,
            latent: 3,
            hidden: vec![6],
            channels: vec![2, 3],
            enc_fc: fc.to_vec(),
            dec_fc: fc.iter().rev().copied().collect(),
            likelihood,
            ..VaeConfig::default()
        };
        Vae::new(&cfg, 1, SIDE, 5, &Device::Cpu)
    }

    /// Small images keep the loss small, so f32 finite differences are precise.
    const SIDE: usize = 4;

    fn images(n: usize) -> Result<Tensor> {
        let v: Vec<f32> = (0..n * SIDE * SIDE).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
        Tensor::from_vec(v, (n, 1, SIDE, SIDE), &Device::Cpu)
    }

    /// d loss / d θ by central differences on a few coordinates of every
    /// parameter, against autograd, with the noise held fixed.
    #[test]
    fn loss_gradient_matches_finite_differences() -> Result<()> {
        let (mut checked, mut skipped) = (0usize, 0usize);
        for (arch, lik, fc) in [
            (VaeArch::Mlp, Likelihood::Bernoulli, &[][..]),
            (VaeArch::Conv, Likelihood::Bernoulli, &[][..]),
            (VaeArch::Conv, Likelihood::Bernoulli, &[5][..]),
            (VaeArch::Mlp, Likelihood::Gaussian, &[][..]),
        ] {
            let vae = tiny_fc(arch, lik, fc)?;
            let x = images(3)?;
            let eps = Vae::noise(3, 3, &mut StdRng::seed_from_u64(1), &Device::Cpu)?;
            let loss = |v: &Vae| -> Result<f64> {
                v.objective(&x, &eps, 0.7)?
                    .loss
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()
            };
            let grads = vae.objective(&x, &eps, 0.7)?.loss.backward()?;
            for (name, var) in named_vars(vae.params().var_map()) {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{arch:?}: no gradient for {name}"))
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let orig = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                let fd_at = |i: usize, h: f32| -> Result<f64> {
                    let mut p = orig.clone();
                    p[i] += h;
                    var.set(&Tensor::from_vec(p.clone(), var.shape(), &Device::Cpu)?)?;
                    let up = loss(&vae)?;
                    p[i] -= 2.0 * h;
                    var.set(&Tensor::from_vec(p, var.shape(), &Device::Cpu)?)?;
                    let down = loss(&vae)?;
                    var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu)?)?;
                    Ok((up - down) / (2.0 * f64::from(h)))
                };
                for i in (0..orig.len()).step_by((orig.len() / 5).max(1)) {
                    let (fd, fd_small) = (fd_at(i, 1e-2)?, fd_at(i, 1e-3)?);
                    // a ReLU kink inside the step makes the two differences disagree: no smooth derivative to compare
                    if (fd - fd_small).abs() > 0.02 * fd.abs() + 1e-3 {
                        skipped += 1;
                        continue;
                    }
                    checked += 1;
                    // relative 2%, plus the f32 rounding of a ~40-nat loss over a 0.02 step
                    let tol = 2e-2 * fd.abs().max(f64::from(g[i].abs())) + 1e-3;
                    assert!(
                        (fd - f64::from(g[i])).abs() < tol,
                        "{arch:?} {lik:?} {name}[{i}]: finite difference {fd} vs autograd {}",
                        g[i]
                    );
                }
            }
        }
        assert!(
            checked > 4 * skipped,
            "too many coordinates at a kink: {checked} checked, {skipped} skipped"
        );
        Ok(())
    }

    #[test]
    fn importance_weighted_bound_is_at_least_the_elbo() -> Result<()> {
        let vae = tiny(VaeArch::Mlp, Likelihood::Bernoulli)?;
        let x = images(5)?;
        let (elbo, iwae) = vae.elbo_and_iwae(&x, 50, &mut StdRng::seed_from_u64(3))?;
        let (elbo, iwae) = (elbo.to_vec1::<f32>()?, iwae.to_vec1::<f32>()?);
        for (e, w) in elbo.iter().zip(&iwae) {
            assert!(w >= e, "IWAE {w} < ELBO {e}");
        }
        // the bound tightens: strictly above for an untrained model
        let gap: f32 = iwae.iter().zip(&elbo).map(|(w, e)| w - e).sum();
        assert!(gap > 0.0);
        // the Monte-Carlo ELBO agrees with the training objective's (β = 1) in expectation
        let eps = Vae::noise(5, 3, &mut StdRng::seed_from_u64(4), &Device::Cpu)?;
        let obj = -f64::from(vae.objective(&x, &eps, 1.0)?.loss.to_scalar::<f32>()?);
        let mc = elbo.iter().map(|v| f64::from(*v)).sum::<f64>() / 5.0;
        assert!(
            (obj - mc).abs() < 0.05 * mc.abs(),
            "objective {obj} vs sampled ELBO {mc}"
        );
        Ok(())
    }

    /// Free bits by hand: per-dimension batch-mean KL floored at λ, and no
    /// gradient through a floored dimension.
    #[test]
    fn free_bits_floor_each_dimension() -> Result<()> {
        let dev = Device::Cpu;
        let mu = Var::from_vec(vec![1f32, 0.0, 0.0, 0.0], (2, 2), &dev)?;
        let logvar = Tensor::zeros((2, 2), DType::F32, &dev)?;
        // KL_ij = ½ μ² → batch means per dimension: 0.25 and 0
        for (lambda, value, grad00) in [(0.1, 0.35, 0.5), (0.3, 0.6, 0.0), (0.0, 0.25, 0.5)] {
            let kl = free_bits_kl(mu.as_tensor(), &logvar, lambda)?;
            assert!((kl.to_scalar::<f32>()? - value).abs() < 1e-6, "λ = {lambda}");
            let g = kl.backward()?;
            let gm = g
                .get(mu.as_tensor())
                .map(|t| t.flatten_all()?.to_vec1::<f32>())
                .transpose()?;
            let g00 = gm.map_or(0.0, |v| v[0]);
            assert!((g00 - grad00).abs() < 1e-6, "λ = {lambda}: {g00}");
        }
        // on a model: free bits change the loss, never the reported KL
        let mut cfg = tiny(VaeArch::Mlp, Likelihood::Bernoulli)?.config().clone();
        let x = images(3)?;
        let eps = Vae::noise(3, 3, &mut StdRng::seed_from_u64(1), &dev)?;
        let plain = Vae::new(&cfg, 1, SIDE, 5, &dev)?.objective(&x, &eps, 1.0)?;
        cfg.free_bits = 5.0;
        let floored = Vae::new(&cfg, 1, SIDE, 5, &dev)?.objective(&x, &eps, 1.0)?;
        assert_eq!(plain.kl, floored.kl);
        assert_eq!(plain.rec_nll, floored.rec_nll);
        let (lp, lf) = (plain.loss.to_scalar::<f32>()?, floored.loss.to_scalar::<f32>()?);
        assert!(
            (lf - (plain.rec_nll as f32 + 15.0)).abs() < 1e-3 && lf > lp,
            "{lp} {lf}"
        );
        cfg.free_bits_decay_steps = 100;
        let decaying = Vae::new(&cfg, 1, SIDE, 5, &dev)?;
        let at: Vec<f64> = [0, 50, 100, 200].iter().map(|&s| decaying.free_bits_at(s)).collect();
        assert_eq!(at, [5.0, 2.5, 0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn decoder_channels_default_to_the_encoders_and_are_checked() {
        let conv = VaeConfig {
            arch: VaeArch::Conv,
            channels: vec![8, 16],
            ..VaeConfig::default()
        };
        assert_eq!(conv.decoder_channels(), (8, 16));
        let own = VaeConfig {
            dec_channels: vec![12, 20],
            ..conv.clone()
        };
        assert_eq!(own.decoder_channels(), (12, 20));
        assert!(own.validate(1, 28).is_ok());
        for bad in [vec![12], vec![0, 20], vec![4, 8, 16]] {
            let cfg = VaeConfig {
                dec_channels: bad.clone(),
                ..conv.clone()
            };
            let e = cfg.validate(1, 28).expect_err("invalid dec_channels");
            assert_eq!(e.key, "model.dec_channels", "{bad:?}: {e}");
        }
    }

    #[test]
    fn shapes_and_names() -> Result<()> {
        let mlp = tiny(VaeArch::Mlp, Likelihood::Bernoulli)?;
        let mut names: Vec<String> = named_vars(mlp.params().var_map()).into_iter().map(|(n, _)| n).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "dec.0.bias",
                "dec.0.weight",
                "dec.2.bias",
                "dec.2.weight",
                "enc.0.bias",
                "enc.0.weight",
                "logvar.bias",
                "logvar.weight",
                "mu.bias",
                "mu.weight"
            ]
        );
        let conv = tiny(VaeArch::Conv, Likelihood::Gaussian)?;
        let x = images(2)?;
        let (mu, lv) = conv.encode(&x)?;
        assert_eq!((mu.dims(), lv.dims()), (&[2usize, 3][..], &[2usize, 3][..]));
        assert_eq!(conv.decode(&mu)?.dims(), [2, 1, SIDE, SIDE]);
        assert!(named_vars(conv.params().var_map())
            .iter()
            .any(|(n, _)| n == "log_sigma"));
        assert_eq!(conv.encoder_vars().len(), 8);

        let conv_fc = tiny_fc(VaeArch::Conv, Likelihood::Bernoulli, &[5, 4])?;
        let mut names: Vec<String> = named_vars(conv_fc.params().var_map())
            .into_iter()
            .map(|(n, v)| format!("{n}{:?}", v.dims()))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "dec.0.bias[2]",
                "dec.0.weight[3, 2, 4, 4]",
                "dec.2.bias[1]",
                "dec.2.weight[2, 1, 4, 4]",
                "dec_fc.0.bias[4]",
                "dec_fc.0.weight[4, 3]",
                "dec_fc.2.bias[5]",
                "dec_fc.2.weight[5, 4]",
                "dec_fc.4.bias[3]",
                "dec_fc.4.weight[3, 5]",
                "enc.0.bias[2]",
                "enc.0.weight[2, 1, 4, 4]",
                "enc.2.bias[3]",
                "enc.2.weight[3, 2, 4, 4]",
                "enc_fc.0.bias[5]",
                "enc_fc.0.weight[5, 3]",
                "enc_fc.2.bias[4]",
                "enc_fc.2.weight[4, 5]",
                "logvar.bias[3]",
                "logvar.weight[3, 4]",
                "mu.bias[3]",
                "mu.weight[3, 4]",
            ]
        );
        let (mu, _) = conv_fc.encode(&images(2)?)?;
        assert_eq!(conv_fc.decode(&mu)?.dims(), [2, 1, SIDE, SIDE]);
        assert_eq!(conv_fc.encoder_vars().len(), 12);
        Ok(())
    }
}
