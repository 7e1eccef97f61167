//! Generative pretraining as a [`Paradigm`]: data, model (a VAE or an MAE),
//! batches, per-epoch held-out ELBO (VAE) or masked reconstruction error
//! (MAE) and kNN; the probe (likelihood or reconstruction error, pictures,
//! transfer), sampling and export. Pretrain and resume come from
//! [`pretext_core::paradigm`], the CLI from `pretext_cli::runner`.

use crate::config::{Binarize, GenerativeConfig};
use crate::error::{Error, Result};
use crate::mae::Mae;
use crate::method::{GenerativeMethod, GenerativeModel};
use crate::model::{binarize, Vae, VaeArch};
use crate::pictures::grid_png;
use candle_core::{Device, Tensor};
use pretext_core::paradigm::{EvalPoint, EvalSchedule, InitSpec, Paradigm, ProbeOptions, Sections, Trained};
use pretext_core::trainer::Observer;
use pretext_core::warm_start::InitialWeights;
use pretext_core::RunDir;
use pretext_data::{AugmentConfig, BatcherConfig, ImageBatcher, ImageDataset, Pipeline};
use pretext_eval::{knn_accuracy, Embedded, KnnConfig};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Generative pretraining on images: the variational autoencoder or the masked autoencoder.
pub struct Generative;

/// Training images and a labelled held-out set for monitoring.
pub use pretext_data::source::RunImages as RunData;

/// Loads the data a config names (the shipped Fashion-MNIST by default).
///
/// # Errors
/// Reader errors, naming the file.
pub fn load_data(cfg: &GenerativeConfig) -> Result<RunData> {
    let imgs = pretext_data::source::load_run_images(
        &cfg.data.path,
        cfg.data.format,
        cfg.data.image_size,
        cfg.data.channels,
        cfg.train.seed,
    )?;
    Ok(imgs)
}

/// A freshly initialised model of the config's method (seeded by `train.seed`).
///
/// # Errors
/// An invalid config.
pub fn new_model(cfg: &GenerativeConfig, device: &Device) -> Result<GenerativeModel> {
    cfg.validate()?;
    let (c, s, seed) = (cfg.data.channels, cfg.data.image_size, cfg.train.seed);
    Ok(match GenerativeMethod::parse(&cfg.method)? {
        GenerativeMethod::Vae => GenerativeModel::Vae(Box::new(
            Vae::new(&cfg.model, c, s, seed, device)?.with_dynamic_binarize(cfg.data.binarize == Binarize::Dynamic),
        )),
        GenerativeMethod::Mae => GenerativeModel::Mae(Box::new(Mae::new(&cfg.mae, c, s, seed, device)?)),
    })
}

/// The training views: intensities in [0, 1] as they are for the VAE; for
/// the MAE, random resized crops (20–100% of the image) and horizontal flips,
/// the paper's augmentation.
fn training_pipeline(cfg: &GenerativeConfig) -> Result<Pipeline> {
    if GenerativeMethod::parse(&cfg.method)? == GenerativeMethod::Mae {
        let mut aug = AugmentConfig::none(vec![], vec![]);
        aug.crop = true;
        aug.crop_scale = (0.2, 1.0);
        aug.flip_p = 0.5;
        return Ok(Pipeline::new(aug, cfg.data.image_size, cfg.data.image_size)?);
    }
    plain_pipeline(cfg)
}

/// The seed of the masks of held-out reconstructions (the same images get
/// the same masks at every evaluation).
const HELD_OUT_MASKS: u64 = 0x004d_4145;

/// The MAE's masked reconstruction error (mean squared error over hidden
/// patches, in its target's units) on `indices` of `held`, with seeded masks.
///
/// # Errors
/// Tensor errors.
pub fn masked_error(
    model: &Mae,
    held: &ImageDataset,
    indices: &[usize],
    cfg: &GenerativeConfig,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<f64> {
    let plain = plain_pipeline(cfg)?;
    let size = cfg.data.image_size;
    let chunk = 250;
    let total = indices.len() as u64;
    let (mut sum, mut n) = (0.0, 0usize);
    observer.on_progress("masked reconstruction", 0, total);
    for (ci, c) in indices.chunks(chunk).enumerate() {
        let x = batch_of(held, c, &plain, size, device)?;
        let masking = model.masking(
            c.len(),
            &mut pretext_core::seed::stream_rng(HELD_OUT_MASKS, "mae-held-out", &[ci as u64]),
        );
        let loss = model.loss(&x, &masking)?.to_scalar::<f32>()?;
        sum += f64::from(loss) * c.len() as f64;
        n += c.len();
        observer.on_progress("masked reconstruction", n as u64, total);
    }
    Ok(sum / n.max(1) as f64)
}

/// Images in [0, 1], no augmentation, as the model sees them.
fn plain_pipeline(cfg: &GenerativeConfig) -> Result<Pipeline> {
    Ok(Pipeline::new(
        AugmentConfig::none(vec![], vec![]),
        cfg.data.image_size,
        cfg.data.image_size,
    )?)
}

/// `ds[indices]` as one `(n, c, s, s)` tensor in [0, 1].
fn batch_of(ds: &ImageDataset, indices: &[usize], plain: &Pipeline, size: usize, device: &Device) -> Result<Tensor> {
    let per = ds.channels * size * size;
    let mut buf = vec![0f32; indices.len() * per];
    let mut rng = pretext_core::seed::stream_rng(0, pretext_core::seed::EVAL, &[]);
    for (out, &i) in buf.chunks_mut(per).zip(indices) {
        plain.view_into(ds.image(i), ds.height, ds.width, ds.channels, &mut rng, out);
    }
    Ok(Tensor::from_vec(buf, (indices.len(), ds.channels, size, size), device)?)
}

/// Likelihood figures on a test set, per image, in nats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LikelihoodReport {
    /// Test negative ELBO: `rec_nll + kl` (β = 1).
    pub neg_elbo: f64,
    /// `−E_q log p(x|z)`, Monte Carlo with `elbo_samples` samples.
    pub rec_nll: f64,
    /// `KL(q(z|x) ‖ p(z))`, closed form.
    pub kl: f64,
    /// Importance-weighted estimate of `−log p(x)` with `iwae_samples` samples (an upper bound).
    pub iwae_nll: f64,
    /// Samples of the ELBO.
    pub elbo_samples: usize,
    /// Samples of the IWAE bound.
    pub iwae_samples: usize,
    /// Test images.
    pub n_test: usize,
    /// `continuous` ([0, 1] targets) or `binarized` (one fixed Bernoulli draw, seed 123).
    pub targets: String,
}

/// The held-out targets: intensities, or one fixed binarisation (seed 123) under dynamic binarisation.
fn targets(x: Tensor, cfg: &GenerativeConfig, chunk: usize) -> Result<Tensor> {
    Ok(match cfg.data.binarize {
        Binarize::None => x,
        Binarize::Dynamic => binarize(
            &x,
            &mut pretext_core::seed::stream_rng(123, "binarize-test", &[chunk as u64]),
        )?,
    })
}

/// Test negative ELBO (`samples` posterior samples) and, when `iwae_k > 0`,
/// the IWAE estimate of `−log p(x)`, over `indices` of `held`.
///
/// # Errors
/// Tensor errors.
#[allow(clippy::too_many_arguments)]
pub fn likelihood(
    model: &Vae,
    held: &ImageDataset,
    indices: &[usize],
    samples: usize,
    iwae_k: usize,
    cfg: &GenerativeConfig,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<LikelihoodReport> {
    let plain = plain_pipeline(cfg)?;
    let size = cfg.data.image_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut rec, mut kl, mut iw) = (0.0, 0.0, 0.0);
    let chunk = 250;
    let total = indices.len() as u64;
    observer.on_progress("test likelihood", 0, total);
    for (ci, c) in indices.chunks(chunk).enumerate() {
        let x = targets(batch_of(held, c, &plain, size, device)?, cfg, ci)?;
        let (mu, logvar) = model.encode(&x)?;
        kl += f64::from(crate::loss::gaussian_kl(&mu, &logvar)?.sum_all()?.to_scalar::<f32>()?);
        for _ in 0..samples {
            let eps = Vae::noise(c.len(), mu.dim(1)?, &mut rng, device)?;
            let z = (&mu + (eps * (&logvar * 0.5)?.exp()?)?)?;
            rec -= f64::from(model.log_lik(&model.decode(&z)?, &x)?.sum_all()?.to_scalar::<f32>()?) / samples as f64;
        }
        if iwae_k > 0 {
            let (_, b) = model.elbo_and_iwae(&x, iwae_k, &mut rng)?;
            iw -= f64::from(b.sum_all()?.to_scalar::<f32>()?);
        }
        observer.on_progress("test likelihood", ((ci + 1) * chunk).min(indices.len()) as u64, total);
    }
    let n = indices.len().max(1) as f64;
    Ok(LikelihoodReport {
        neg_elbo: (rec + kl) / n,
        rec_nll: rec / n,
        kl: kl / n,
        iwae_nll: if iwae_k > 0 { iw / n } else { f64::NAN },
        elbo_samples: samples,
        iwae_samples: iwae_k,
        n_test: indices.len(),
        targets: match cfg.data.binarize {
            Binarize::None => "continuous".into(),
            Binarize::Dynamic => "binarized".into(),
        },
    })
}

fn embed(
    model: &dyn pretext_eval::ImageEncoder,
    ds: &ImageDataset,
    idx: &[usize],
    cfg: &GenerativeConfig,
    device: &Device,
    observer: &mut dyn Observer,
    task: &str,
) -> Result<Embedded> {
    Ok(pretext_eval::extract_features(
        model,
        ds,
        idx,
        &[],
        &[],
        cfg.data.image_size,
        device,
        observer,
        task,
    )?)
}

/// What online monitoring measured on the held-out images.
struct Monitor {
    /// The VAE's negative ELBO with one sample, or the MAE's masked reconstruction error.
    score: f64,
    /// kNN accuracy on the features (labelled data only).
    knn: Option<f64>,
    /// Collapse indicators of the held-out features (the VAE's posterior
    /// means, the MAE's class tokens).
    spread: Option<pretext_eval::collapse::Spread>,
}

/// The held-out score (the VAE's negative ELBO with one sample, the MAE's
/// masked reconstruction error), kNN accuracy on the features and their
/// collapse indicators; `None` without held-out images.
fn monitor(
    model: &GenerativeModel,
    data: &RunData,
    cfg: &GenerativeConfig,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<Option<Monitor>> {
    let Some(held) = &data.held_out else {
        return Ok(None);
    };
    let held_labels = held.labels.as_deref().unwrap_or_default();
    let test =
        pretext_data::subset::balanced_count(held_labels, cfg.eval.monitor_images.min(held.len()), cfg.train.seed)?;
    let score = match model {
        GenerativeModel::Vae(v) => likelihood(v, held, &test, 1, 0, cfg, device, observer)?.neg_elbo,
        GenerativeModel::Mae(m) => masked_error(m, held, &test, cfg, device, observer)?,
    };
    let b = embed(model, held, &test, cfg, device, observer, "held-out features")?;
    let spread = pretext_eval::collapse::spread(&b.features, b.dim);
    let knn = match &data.train.labels {
        Some(labels) if held.labels.is_some() => {
            let bank =
                pretext_data::subset::balanced_count(labels, cfg.eval.knn_train.min(data.train.len()), cfg.train.seed)?;
            let a = embed(model, &data.train, &bank, cfg, device, observer, "kNN: memory bank")?;
            let k = KnnConfig {
                k: cfg.eval.knn_k,
                temperature: cfg.eval.knn_temperature,
                ..Default::default()
            };
            Some(knn_accuracy(&a, &b, &k)?)
        }
        _ => None,
    };
    Ok(Some(Monitor { score, knn, spread }))
}

/// Flattened decoder means of latents `z`.
fn decoded(model: &Vae, z: &Tensor) -> Result<Vec<f32>> {
    Ok(model.decode_mean(z)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The test images the pictures show: 16 (two per class where labels allow),
/// their indices and the `(n, c, s, s)` batch in [0, 1].
fn picture_inputs(
    held: &ImageDataset,
    cfg: &GenerativeConfig,
    seed: u64,
    device: &Device,
) -> Result<(Vec<usize>, Tensor)> {
    let pick: Vec<usize> = match &held.labels {
        Some(l) => pretext_data::subset::balanced_count(l, 16.min(held.len()), seed)?,
        None => (0..16.min(held.len())).collect(),
    };
    let x = batch_of(held, &pick, &plain_pipeline(cfg)?, cfg.data.image_size, device)?;
    Ok((pick, x))
}

/// The MAE's picture: 16 test images (two per class where labels allow),
/// each as the input, the input with its hidden patches grey, and the
/// reconstruction (predicted hidden patches among the visible ones).
///
/// # Errors
/// Tensor or encoding errors.
pub fn mae_pictures(
    model: &Mae,
    held: &ImageDataset,
    cfg: &GenerativeConfig,
    seed: u64,
    device: &Device,
) -> Result<Vec<(String, String, Vec<u8>)>> {
    let size = cfg.data.image_size;
    let shape = (cfg.data.channels, size, size);
    let (pick, x) = picture_inputs(held, cfg, seed, device)?;
    let cols = pick.len();
    let masking = model.masking(cols, &mut pretext_core::seed::stream_rng(seed, "mae-pictures", &[]));
    let (recon, masked) = model.reconstruct(&x, &masking, 0.5)?;
    let mut px = x.flatten_all()?.to_vec1::<f32>()?;
    px.extend(masked.flatten_all()?.to_vec1::<f32>()?);
    px.extend(recon.flatten_all()?.to_vec1::<f32>()?);
    let err = |e: String| Error::Core(pretext_core::Error::Config(e));
    let grid = grid_png(&px, 3 * cols, shape, cols, 3).map_err(err)?;
    Ok(vec![(
        "reconstructions.png".to_string(),
        format!(
            "Masked test images: inputs (top), the {:.0}% of patches the encoder does not see in grey (middle), \
reconstructions: predicted patches among the visible ones (bottom)",
            cfg.mae.mask_ratio * 100.0
        ),
        grid,
    )])
}

/// The three pictures: reconstructions (inputs above outputs, 2 per class
/// where labels allow), 64 samples from the prior, interpolation strips.
///
/// # Errors
/// Tensor or encoding errors.
pub fn pictures(
    model: &Vae,
    held: &ImageDataset,
    cfg: &GenerativeConfig,
    seed: u64,
    device: &Device,
) -> Result<Vec<(String, String, Vec<u8>)>> {
    let size = cfg.data.image_size;
    let shape = (cfg.data.channels, size, size);
    let (pick, x) = picture_inputs(held, cfg, seed, device)?;
    let cols = pick.len();
    let (mu, _) = model.encode(&x)?;
    let mut px = x.flatten_all()?.to_vec1::<f32>()?;
    px.extend(decoded(model, &mu)?);
    let err = |e: String| Error::Core(pretext_core::Error::Config(e));
    let recon = grid_png(&px, 2 * cols, shape, cols, 3).map_err(err)?;
    let z = Vae::noise(
        64,
        cfg.model.latent,
        &mut pretext_core::seed::stream_rng(seed, "samples", &[]),
        device,
    )?;
    let samples = grid_png(&decoded(model, &z)?, 64, shape, 8, 3).map_err(err)?;
    // interpolate between the posterior means of up to 4 disjoint pairs of
    // inputs, of different classes where labels allow
    let steps = 10;
    let mut zs = Vec::new();
    let label = |k: usize| held.labels.as_ref().map(|l| l[pick[k]]);
    let mut used = vec![false; cols];
    let mut chosen = Vec::new();
    for a in 0..cols {
        if used[a] || chosen.len() == 4 {
            continue;
        }
        let other = (a + 1..cols).find(|&b| !used[b] && (label(b) != label(a) || label(a).is_none()));
        if let Some(b) = other {
            used[a] = true;
            used[b] = true;
            chosen.push((a, b));
        }
    }
    let pairs = chosen.len();
    for &(i, j) in &chosen {
        let (a, b) = (mu.get(i)?, mu.get(j)?);
        for s in 0..steps {
            let t = s as f64 / (steps - 1) as f64;
            zs.push(((&a * (1.0 - t))? + (&b * t)?)?);
        }
    }
    let mut out = vec![
        (
            "reconstructions.png".to_string(),
            "Reconstructions: inputs (top) and decoder means of their posterior means (bottom)".to_string(),
            recon,
        ),
        (
            "samples.png".to_string(),
            "64 samples from the prior: decoder means of z ~ N(0, I)".to_string(),
            samples,
        ),
    ];
    if pairs > 0 {
        let strip = grid_png(
            &decoded(model, &Tensor::stack(&zs, 0)?)?,
            pairs * steps,
            shape,
            steps,
            3,
        )
        .map_err(err)?;
        out.push((
            "interpolation.png".to_string(),
            "Latent interpolation between the posterior means of two inputs, one pair per row".to_string(),
            strip,
        ));
    }
    Ok(out)
}

/// The MAE's held-out figure: masked reconstruction error on test images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconstructionReport {
    /// Mean squared error over the hidden patches (per-patch normalised
    /// pixels under `norm_pix_loss`, else intensities in [0, 1]).
    pub masked_mse: f64,
    /// Fraction of each image's patches hidden.
    pub mask_ratio: f64,
    /// Whether the targets are per-patch normalised.
    pub norm_pix_loss: bool,
    /// Test images.
    pub n_test: usize,
}

/// The held-out generative figures of a probe, by method.
#[derive(Debug, Clone, PartialEq)]
pub enum HeldOut {
    /// The VAE's test likelihood.
    Likelihood(LikelihoodReport),
    /// The MAE's masked reconstruction error.
    Reconstruction(ReconstructionReport),
}

impl HeldOut {
    /// One line for the terminal.
    pub fn summary(&self) -> String {
        match self {
            Self::Likelihood(l) => format!(
                "test −ELBO {:.2} nats/image (reconstruction {:.2}, KL {:.2}); IWAE −log p(x) ≤ {:.2} (k = {})",
                l.neg_elbo, l.rec_nll, l.kl, l.iwae_nll, l.iwae_samples
            ),
            Self::Reconstruction(r) => format!(
                "test masked reconstruction error {:.4} ({:.0}% of patches hidden, {} images{})",
                r.masked_mse,
                r.mask_ratio * 100.0,
                r.n_test,
                if r.norm_pix_loss {
                    ", per-patch normalised pixels"
                } else {
                    ""
                }
            ),
        }
    }
}

/// The transfer report of a trained run: linear probe and kNN on the
/// features (the VAE's posterior means, the MAE's class token) and the
/// baselines, optional fine-tuning; the VAE's test −ELBO and IWAE NLL or the
/// MAE's masked reconstruction error; pictures; writes `report/`.
///
/// # Errors
/// Unlabelled data, invalid fractions, tensor and I/O errors.
pub fn probe(
    run: &Trained<Generative>,
    cfg: &GenerativeConfig,
    opts: &ProbeOptions<'_>,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<(pretext_eval::EvalReport, HeldOut)> {
    let (fractions, finetune) = (opts.fractions, opts.finetune);
    let dir = run.run.root();
    let trained = &run.model;
    let run = &run.run;
    let d = &cfg.data;
    let (data, source) = RunData::for_probe(
        opts.data,
        || pretext_data::source::load_run_images(&d.path, d.format, d.image_size, d.channels, cfg.train.seed),
        d.format,
        d.image_size,
        d.channels,
        cfg.train.seed,
    )?;
    let held = data
        .held_out
        .as_ref()
        .ok_or_else(|| Error::Eval(pretext_eval::transfer::UNLABELLED_RUN.into()))?;
    let n_lik = if cfg.eval.likelihood_images == 0 {
        held.len()
    } else {
        cfg.eval.likelihood_images.min(held.len())
    };
    let lik_idx: Vec<usize> = (0..n_lik).collect();
    let held_out = match trained {
        GenerativeModel::Vae(vae) => {
            observer.on_message(&format!(
                "test likelihood on {n_lik} images ({} ELBO samples, {} importance samples)",
                cfg.eval.elbo_samples, cfg.eval.iwae_samples
            ));
            let lik = likelihood(
                vae,
                held,
                &lik_idx,
                cfg.eval.elbo_samples,
                cfg.eval.iwae_samples,
                cfg,
                device,
                observer,
            )?;
            HeldOut::Likelihood(lik)
        }
        GenerativeModel::Mae(mae) => HeldOut::Reconstruction(ReconstructionReport {
            masked_mse: masked_error(mae, held, &lik_idx, cfg, device, observer)?,
            mask_ratio: cfg.mae.mask_ratio,
            norm_pix_loss: cfg.mae.norm_pix_loss,
            n_test: n_lik,
        }),
    };
    observer.on_message(&format!("  {}", held_out.summary()));
    let random = new_model(cfg, device)?;
    let train = pretext_eval::probe_subset(&data.train, cfg.eval.probe_train, cfg.train.seed)?;
    let test = pretext_eval::probe_subset(held, cfg.eval.probe_test, cfg.train.seed)?;
    let setup = pretext_eval::TransferSetup {
        train: &train,
        test: &test,
        mean: &[],
        std: &[],
        size: cfg.data.image_size,
        fractions,
        seed: cfg.train.seed,
        probe: pretext_eval::LinearProbeConfig {
            seed: cfg.train.seed,
            ..Default::default()
        },
        knn: KnnConfig {
            k: cfg.eval.knn_k,
            temperature: cfg.eval.knn_temperature,
            ..Default::default()
        },
        finetune: finetune.then(|| (cfg.eval.finetune.clone(), cfg.eval.finetune_max_labels)),
    };
    let mut fresh = |init: pretext_eval::Init| -> pretext_eval::Result<Box<dyn pretext_eval::ImageEncoder>> {
        Ok(Box::new(match init {
            pretext_eval::Init::Pretrained => {
                pretext_core::paradigm::load_trained::<Generative>(dir, cfg, device)?.model
            }
            pretext_eval::Init::Random => new_model(cfg, device)?,
        }))
    };
    let (records, test_features) =
        pretext_eval::transfer_records(&setup, trained, &random, &mut fresh, device, observer)?;
    let report = pretext_eval::EvalReport {
        paradigm: Generative::NAME.into(),
        method: cfg.method.clone(),
        dataset: source
            .as_ref()
            .map_or_else(|| Generative::dataset_name(cfg), |s| s.path.clone()),
        records,
        data: source,
    };
    let report_dir = run.report_dir()?;
    report.write(&report_dir)?;
    let (file, json) = match &held_out {
        HeldOut::Likelihood(l) => ("likelihood.json", serde_json::to_vec_pretty(l)),
        HeldOut::Reconstruction(r) => ("reconstruction.json", serde_json::to_vec_pretty(r)),
    };
    let json = json.map_err(|e| pretext_core::Error::Config(format!("{file}: {e}")))?;
    pretext_core::run::write_atomic(&report_dir.join(file), &json)?;
    let metrics_path = run.metrics_path();
    let figures = pretext_eval::plots::RunFigures {
        metrics: Some(&metrics_path),
        test_features: Some(&test_features),
        class_names: &held.classes,
        extra_images: match trained {
            GenerativeModel::Vae(vae) => pictures(vae, held, cfg, cfg.train.seed, device)?,
            GenerativeModel::Mae(mae) => mae_pictures(mae, held, cfg, cfg.train.seed, device)?,
        },
        intro_html: match &held_out {
            HeldOut::Likelihood(l) => likelihood_html(l),
            HeldOut::Reconstruction(_) => format!(
                "<h2>Masked reconstruction</h2>\n<p>{}</p>\n",
                held_out.summary().replace('&', "&amp;").replace('<', "&lt;")
            ),
        },
    };
    pretext_eval::plots::write_report_page(&report_dir, &report, &figures)?;
    Ok((report, held_out))
}

fn likelihood_html(l: &LikelihoodReport) -> String {
    format!(
        "<h2>Test likelihood (nats per image, {} images, {} targets)</h2>\n<table>\
<tr><th>−ELBO</th><th>reconstruction −log p(x|z)</th><th>KL(q‖p)</th><th>IWAE −log p(x) (k = {})</th></tr>\
<tr><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr></table>\n",
        l.n_test, l.targets, l.iwae_samples, l.neg_elbo, l.rec_nll, l.kl, l.iwae_nll
    )
}

impl Paradigm for Generative {
    const NAME: &'static str = "generative";
    const SHIPPED_DATA: &'static str = "fashion-mnist";
    type Config = GenerativeConfig;
    type Model = GenerativeModel;
    type Assets = ();
    type Data = RunData;
    type Batches = ImageBatcher;
    type Error = Error;

    fn sections(cfg: &GenerativeConfig) -> Sections<'_> {
        Sections::new(&cfg.train, &cfg.optim, &cfg.schedule, &cfg.data.path)
    }

    fn validate(cfg: &GenerativeConfig) -> Result<()> {
        Ok(cfg.validate()?)
    }

    fn load_data(cfg: &GenerativeConfig, _: Option<()>, _: &mut dyn Observer) -> Result<(RunData, ())> {
        Ok((load_data(cfg)?, ()))
    }

    fn load_assets(_: &GenerativeConfig, _: &RunDir) -> Result<()> {
        Ok(())
    }

    fn new_model(cfg: &GenerativeConfig, _: &(), device: &Device) -> Result<GenerativeModel> {
        new_model(cfg, device)
    }

    fn batches(cfg: &GenerativeConfig, data: &RunData, _: &(), device: &Device) -> Result<ImageBatcher> {
        let bc = BatcherConfig::training(cfg.train.batch_size, 1, cfg.train.seed, cfg.data.prefetch);
        Ok(data.training_batches(training_pipeline(cfg)?, bc, device)?)
    }

    fn eval_schedule(cfg: &GenerativeConfig) -> EvalSchedule {
        EvalSchedule::Epochs(cfg.eval.every)
    }

    fn evaluate(
        cfg: &GenerativeConfig,
        data: &RunData,
        _: &(),
        model: &GenerativeModel,
        at: EvalPoint,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> Result<Vec<serde_json::Value>> {
        let Some(Monitor { score, knn, spread }) = monitor(model, data, cfg, device, observer)? else {
            return Ok(vec![]);
        };
        let (step, epoch) = (at.step, at.epoch());
        let (mut records, mut msg) = match model {
            GenerativeModel::Vae(_) => (
                vec![serde_json::json!({ "event": "elbo", "step": step, "epoch": epoch, "test_neg_elbo": score })],
                format!("epoch {epoch}: held-out −ELBO {score:.2} nats"),
            ),
            GenerativeModel::Mae(_) => (
                vec![
                    serde_json::json!({ "event": "reconstruction", "step": step, "epoch": epoch, "test_masked_mse": score }),
                ],
                format!("epoch {epoch}: held-out masked reconstruction error {score:.4}"),
            ),
        };
        if let Some(acc) = knn {
            records.push(serde_json::json!({ "event": "knn", "step": step, "epoch": epoch, "knn_accuracy": acc }));
            let on = if model.vae().is_some() { "μ" } else { "the class token" };
            msg.push_str(&format!(", kNN on {on} {:.2}%", acc * 100.0));
        }
        if let Some(sp) = spread {
            msg.push_str(&format!(", feature {}", sp.summary()));
            records.push(sp.event(step, epoch));
        }
        observer.on_message(&msg);
        Ok(records)
    }

    fn probe(
        cfg: &GenerativeConfig,
        trained: &Trained<Self>,
        opts: &ProbeOptions<'_>,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> Result<String> {
        let (report, held_out) = probe(trained, cfg, opts, device, observer)?;
        Ok(format!(
            "{}\n\n{}\nreport: {}",
            held_out.summary(),
            report.markdown(),
            trained.run.root().join("report").join("index.html").display()
        ))
    }

    fn export_files(cfg: &GenerativeConfig, trained: &Trained<Self>) -> Result<Vec<(String, Vec<u8>)>> {
        export_files(cfg, trained)
    }

    fn initial_weights(_: &GenerativeConfig, spec: &InitSpec, device: &Device) -> Result<(InitialWeights, Option<()>)> {
        Ok((crate::init::initial_weights(spec, device)?, Some(())))
    }

    fn init_required(name: &str) -> bool {
        crate::init::init_required(name)
    }

    fn init_settings(spec: &InitSpec) -> Result<Vec<String>> {
        crate::init::init_settings(spec)
    }
}

/// Draws `n` images from the prior of the run in `dir` into `report/samples.png`
/// (seeded by `seed`); returns the file.
///
/// # Errors
/// No run or checkpoint; `n` = 0.
pub fn sample(dir: &Path, cfg: &GenerativeConfig, n: usize, seed: u64, device: &Device) -> Result<PathBuf> {
    if n == 0 {
        return Err(Error::Config {
            key: "--n".into(),
            reason: "must be at least 1".into(),
        });
    }
    let Trained { run, model, .. } = pretext_core::paradigm::load_trained::<Generative>(dir, cfg, device)?;
    let Some(model) = model.vae() else {
        return Err(Error::Config {
            key: "method".into(),
            reason: format!(
                "`sample` draws from a VAE's prior; the run in {} is an MAE, which has none \
(its probe report shows reconstructions of masked test images)",
                dir.display()
            ),
        });
    };
    let z = Vae::noise(
        n,
        cfg.model.latent,
        &mut pretext_core::seed::stream_rng(seed, "samples", &[]),
        device,
    )?;
    let size = cfg.data.image_size;
    let cols = (n as f64).sqrt().ceil() as usize;
    let png = grid_png(&decoded(model, &z)?, n, (cfg.data.channels, size, size), cols, 3)
        .map_err(pretext_core::Error::Config)?;
    let path = run.report_dir()?.join("samples.png");
    pretext_core::run::write_atomic(&path, &png)?;
    Ok(path)
}

/// The files of `export/`: all weights (`model.safetensors`, the reference's
/// names), `config.json` and a model card.
///
/// # Errors
/// Tensor and encoding errors; an unreadable `config.toml`.
pub fn export_files(cfg: &GenerativeConfig, trained: &Trained<Generative>) -> Result<Vec<(String, Vec<u8>)>> {
    let (run, model, steps) = (&trained.run, &trained.model, trained.step);
    if let Some(mae) = model.mae() {
        return mae_export_files(cfg, trained, mae);
    }
    let mut meta = pretext_core::Method::metadata(model);
    meta.insert("pretext.version".into(), env!("CARGO_PKG_VERSION").into());
    let tensors = pretext_core::trainer::model_tensors(model);
    let bytes = pretext_core::checkpoint::safetensors_bytes(&tensors, &meta)?;
    let arch = match cfg.model.arch {
        VaeArch::Mlp => "vae-mlp",
        VaeArch::Conv => "vae-conv",
    };
    let lik: Option<LikelihoodReport> = std::fs::read(run.root().join("report/likelihood.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let conf = serde_json::json!({
        "architecture": arch,
        "latent": cfg.model.latent,
        "hidden": cfg.model.hidden,
        "channels": cfg.model.channels,
        "dec_channels": cfg.model.decoder_channels(),
        "enc_fc": cfg.model.enc_fc,
        "dec_fc": cfg.model.dec_fc,
        "likelihood": cfg.model.likelihood,
        "in_channels": cfg.data.channels,
        "image_size": cfg.data.image_size,
        "inputs": "intensities in [0, 1], NCHW",
        "paradigm": Generative::NAME,
        "method": "vae",
        "dataset": Generative::dataset_name(cfg),
        "steps": steps,
        "ema_decay": cfg.train.ema_decay,
        "test_likelihood": lik,
        "library": format!("pretext {}", env!("CARGO_PKG_VERSION")),
    });
    let config_json =
        serde_json::to_vec_pretty(&conf).map_err(|e| pretext_core::Error::Config(format!("config.json: {e}")))?;
    let mut card = format!(
        "---\nlibrary_name: pretext\nlicense: mit\ntags:\n- self-supervised\n- generative\n- vae\n- {arch}\ndatasets:\n- {}\n---\n\n\
# VAE ({arch}, latent {}) trained on {}\n\nA variational autoencoder trained with [pretext](https://github.com/pretext-rs/pretext) \
for {steps} optimizer steps: Gaussian posterior, standard normal prior, {:?} likelihood. The encoder's posterior means are \
{}-dimensional features.\n\n",
        if Generative::dataset_name(cfg) == "fashion-mnist" { "fashion_mnist" } else { "custom" },
        cfg.model.latent,
        Generative::dataset_name(cfg),
        cfg.model.likelihood,
        cfg.model.latent,
    );
    if cfg.train.ema_decay > 0.0 {
        card.push_str(&format!(
            "The weights are an exponential moving average of the training iterates (decay {}).\n\n",
            cfg.train.ema_decay
        ));
    }
    if let Some(l) = &lik {
        card.push_str(&format!(
            "## Test likelihood (nats per image, {} targets)\n\n| −ELBO | reconstruction | KL | IWAE −log p(x), k = {} |\n| --- | --- | --- | --- |\n| {:.2} | {:.2} | {:.2} | {:.2} |\n\n",
            l.targets, l.iwae_samples, l.neg_elbo, l.rec_nll, l.kl, l.iwae_nll
        ));
    }
    card.push_str("## Load it in Python\n\n```python\nfrom safetensors.torch import load_file\nstate = load_file(\"model.safetensors\")\n");
    if cfg.model.arch == VaeArch::Mlp && cfg.model.hidden.len() == 2 {
        card.push_str(&format!(
            "import torch.nn as nn\n\nclass VAE(nn.Module):  # the pretext reference's module\n    def __init__(self, d={}, h1={}, h2={}, z={}):\n        super().__init__()\n        self.enc = nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU())\n        self.mu = nn.Linear(h2, z)\n        self.logvar = nn.Linear(h2, z)\n        self.dec = nn.Sequential(nn.Linear(z, h2), nn.ReLU(), nn.Linear(h2, h1), nn.ReLU(), nn.Linear(h1, d))\n\nmodel = VAE()\nmodel.load_state_dict(state)\n",
            cfg.data.channels * cfg.data.image_size * cfg.data.image_size,
            cfg.model.hidden[0],
            cfg.model.hidden[1],
            cfg.model.latent
        ));
    }
    if cfg.model.arch == VaeArch::Conv {
        card.push_str(&conv_module_source(cfg));
    }
    card.push_str("```\n\n## Training configuration\n\n```toml\n");
    card.push_str(without_tables(&run.config_text()?, &["mae"]).trim_end());
    card.push_str("\n```\n");

    Ok(vec![
        ("model.safetensors".into(), bytes),
        ("config.json".into(), config_json),
        ("README.md".into(), card.into_bytes()),
    ])
}

/// PyTorch source of the convolutional VAE with this run's sizes, whose
/// `state_dict` names and layouts match the export (`NCHW`, (c, h, w) flattening).
fn conv_module_source(cfg: &GenerativeConfig) -> String {
    let m = &cfg.model;
    let tuple = |v: &[usize]| match v {
        [one] => format!("({one},)"),
        v => format!("({})", v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
    };
    // without dense decoder layers the single projection is exported as `dec_fc`, not `dec_fc.0`
    let fixup = if m.dec_fc.is_empty() {
        "state = {k.replace(\"dec_fc.\", \"dec_fc.0.\", 1) if k.startswith(\"dec_fc.\") else k: v for k, v in state.items()}\n"
    } else {
        ""
    };
    format!(
        "import torch\nimport torch.nn as nn\n\nclass ConvVAE(nn.Module):\n    def __init__(self, c={c}, s={s}, c1={c1}, c2={c2}, d1={d1}, d2={d2}, enc_fc={enc_fc}, dec_fc={dec_fc}, z={z}):\n        super().__init__()\n        self.d2, self.s = d2, s\n        self.enc = nn.Sequential(nn.Conv2d(c, c1, 4, 2, 1), nn.ReLU(), nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU())\n        flat = c2 * (s // 4) ** 2\n        layers, d = [], flat\n        for h in enc_fc:\n            layers += [nn.Linear(d, h), nn.ReLU()]\n            d = h\n        self.enc_fc = nn.Sequential(*layers)\n        self.mu = nn.Linear(d, z)\n        self.logvar = nn.Linear(d, z)\n        layers, d = [], z\n        for h in list(dec_fc) + [d2 * (s // 4) ** 2]:\n            layers += [nn.Linear(d, h), nn.ReLU()]\n            d = h\n        self.dec_fc = nn.Sequential(*layers)\n        self.dec = nn.Sequential(nn.ConvTranspose2d(d2, d1, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(d1, c, 4, 2, 1))\n\n    def encode(self, x):  # x: (n, c, s, s) in [0, 1] -> (mu, logvar)\n        h = self.enc_fc(self.enc(x).flatten(1))\n        return self.mu(h), self.logvar(h)\n\n    def decode(self, z):  # -> Bernoulli logits (n, c, s, s)\n        h = self.dec_fc(z).view(-1, self.d2, self.s // 4, self.s // 4)\n        return self.dec(h)\n\n{fixup}model = ConvVAE()\nmodel.load_state_dict(state)\n",
        c = cfg.data.channels,
        s = cfg.data.image_size,
        c1 = m.channels[0],
        c2 = m.channels[1],
        d1 = m.decoder_channels().0,
        d2 = m.decoder_channels().1,
        enc_fc = tuple(&m.enc_fc),
        dec_fc = tuple(&m.dec_fc),
        z = m.latent,
    )
}

/// `config.toml` text without the tables (and their sub-tables) named in
/// `drop`: a generative run's config carries both the VAE's `[model]` and
/// the MAE's `[mae]`, and a model card shows only the one that was trained.
/// Works on the text, so keys and values stay as the run wrote them.
fn without_tables(text: &str, drop: &[&str]) -> String {
    let mut skipping = false;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if let Some(header) = line.strip_prefix('[') {
            let name = header
                .trim_start_matches('[')
                .split([']', '.'])
                .next()
                .unwrap_or("")
                .trim();
            skipping = drop.contains(&name);
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    // Dropping a table leaves the blank line that preceded it next to the
    // one that preceded the next table.
    while out.contains("\n\n\n") {
        out = out.replace("\n\n\n", "\n\n");
    }
    out
}

/// The files of an MAE's `export/`: the encoder alone under timm's names
/// (`model.safetensors`, loading with `timm.create_model(...)` as the card
/// says), `config.json` and a model card. The decoder stays in the run's
/// checkpoints.
fn mae_export_files(
    cfg: &GenerativeConfig,
    trained: &Trained<Generative>,
    mae: &Mae,
) -> Result<Vec<(String, Vec<u8>)>> {
    use pretext_eval::ImageEncoder;
    let (run, steps) = (&trained.run, trained.step);
    let mut meta = pretext_core::Method::metadata(mae);
    meta.insert("pretext.version".into(), env!("CARGO_PKG_VERSION").into());
    meta.insert("pretext.content".into(), "encoder".into());
    let tensors: Vec<(String, Tensor)> = mae
        .state()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let bytes = pretext_core::checkpoint::safetensors_bytes(&tensors, &meta)?;
    let d = mae.encoder().dims();
    let arch = cfg.mae.arch;
    let rec: Option<ReconstructionReport> = std::fs::read(run.root().join("report/reconstruction.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let conf = serde_json::json!({
        "architecture": arch.name(),
        "vit": pretext_vit::VitShape::from(d),
        "feature_dim": d.embed_dim,
        "in_channels": cfg.data.channels,
        "image_size": cfg.data.image_size,
        "inputs": "intensities in [0, 1], NCHW",
        "paradigm": Generative::NAME,
        "method": "mae",
        "mask_ratio": cfg.mae.mask_ratio,
        "dataset": Generative::dataset_name(cfg),
        "steps": steps,
        "test_reconstruction": rec,
        "library": format!("pretext {}", env!("CARGO_PKG_VERSION")),
    });
    let config_json =
        serde_json::to_vec_pretty(&conf).map_err(|e| pretext_core::Error::Config(format!("config.json: {e}")))?;
    let dataset = Generative::dataset_name(cfg);
    let mut card = format!(
        "---\nlibrary_name: pretext\nlicense: mit\ntags:\n- self-supervised\n- masked-autoencoder\n- mae\n- {a}\n- image-feature-extraction\ndatasets:\n- {tag}\npipeline_tag: image-feature-extraction\n---\n\n\
# MAE {a} encoder pretrained on {dataset}\n\nThe encoder of a masked autoencoder (He et al., 2022) trained with \
[pretext](https://github.com/pretext-rs/pretext) for {steps} optimizer steps: {r:.0}% of each image's {p}×{p} patches hidden, \
the encoder ({depth} blocks, {w} wide) seeing the rest, a {dd}-wide decoder of {dl} blocks reconstructing the hidden \
patches{norm}. It maps a {s}×{s} image with {c} channel(s) (intensities in [0, 1]) to a {w}-dimensional feature \
vector: the class token after the final LayerNorm.\n\n",
        a = arch.name(),
        tag = if dataset == "fashion-mnist" { "fashion_mnist" } else { "custom" },
        r = cfg.mae.mask_ratio * 100.0,
        p = d.patch_size,
        depth = d.depth,
        w = d.embed_dim,
        dd = cfg.mae.decoder_dim,
        dl = cfg.mae.decoder_depth,
        norm = if cfg.mae.norm_pix_loss { " (per-patch normalised pixels)" } else { "" },
        s = cfg.data.image_size,
        c = cfg.data.channels,
    );
    if let Some(r) = &rec {
        card.push_str(&format!(
            "Test masked reconstruction error: {:.4} (mean squared error over hidden patches, {} images).\n\n",
            r.masked_mse, r.n_test
        ));
    }
    card.push_str("## Load it in Python\n\n```python\nimport torch\nfrom safetensors.torch import load_file\n\nstate = load_file(\"model.safetensors\")\n");
    card.push_str(&pretext_vit::timm_py(arch, d, 0));
    card.push_str(
        "model.load_state_dict(state)  # timm's names: cls_token, pos_embed, patch_embed, blocks, norm\nmodel.eval()\n",
    );
    card.push_str(&format!(
        "features = model(torch.rand(1, {c}, {s}, {s}))  # -> (1, {w})\n```\n\n## Training configuration\n\n```toml\n",
        c = cfg.data.channels,
        s = cfg.data.image_size,
        w = d.embed_dim
    ));
    // The VAE's `[model]` table is in every generative run's config; it
    // does not describe an MAE.
    card.push_str(without_tables(&run.config_text()?, &["model"]).trim_end());
    card.push_str("\n```\n");
    Ok(vec![
        ("model.safetensors".into(), bytes),
        ("config.json".into(), config_json),
        ("README.md".into(), card.into_bytes()),
    ])
}

#[cfg(test)]
mod tests {
    use super::without_tables;

    const CONFIG: &str = "method = \"mae\"\n\n[model]\narch = \"conv\"\nhidden = [\n    512,\n    256,\n]\n\n[mae]\npatch_size = 7\n\n[eval]\nevery = 1\n\n[eval.finetune]\ncrop_scale = [\n    0.5,\n    1.0,\n]\n\n[model.extra]\nx = 1\n";

    #[test]
    fn the_named_tables_and_their_sub_tables_are_dropped_and_the_rest_kept_verbatim() {
        let mae = without_tables(CONFIG, &["model"]);
        assert_eq!(
            mae,
            "method = \"mae\"\n\n[mae]\npatch_size = 7\n\n[eval]\nevery = 1\n\n[eval.finetune]\ncrop_scale = [\n    0.5,\n    1.0,\n]\n\n"
        );
        let vae = without_tables(CONFIG, &["mae"]);
        assert!(
            vae.contains("[model]\narch = \"conv\"\nhidden = [\n    512,\n    256,\n]\n")
                && vae.contains("[model.extra]")
        );
        assert!(!vae.contains("[mae]") && !vae.contains("patch_size"));
        assert_eq!(without_tables(CONFIG, &[]), CONFIG);
    }

    /// A fine-tuning value that cannot work stops the config when it loads,
    /// with its key (MAE fine-tunes; the VAE's config carries the same
    /// section).
    #[test]
    fn a_bad_fine_tuning_value_is_refused_with_the_config() {
        let mut cfg = crate::GenerativeConfig::default();
        cfg.validate().expect("the defaults are valid");
        cfg.eval.finetune.lr = -1e-3;
        assert_eq!(cfg.validate().expect_err("a negative rate").key, "eval.finetune.lr");
    }
}
