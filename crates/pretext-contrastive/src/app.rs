//! Running contrastive pretraining end to end: data, model, trainer, run
//! folder, online kNN monitoring, resume. The CLI is a thin layer over this.

use crate::config::ContrastiveConfig;
use crate::simclr::SimClr;
use candle_core::{Device, Tensor};
use pretext_core::trainer::{Observer, Trainer};
use pretext_core::{Error, Result, RunDir};
use pretext_data::source::load_images;
use pretext_data::{AugmentConfig, BatcherConfig, ImageBatcher, ImageDataset, Pipeline};
use pretext_eval::{knn_accuracy, Embedded, KnnConfig};
use std::path::Path;
use std::sync::Arc;

fn data_err(e: pretext_data::Error) -> Error {
    Error::Config(e.to_string())
}

/// Training images and a labelled held-out set for monitoring.
pub struct RunData {
    /// What the encoder learns from.
    pub train: Arc<ImageDataset>,
    /// Labelled held-out images (the test split, or 10% of train when there is none).
    pub held_out: Option<ImageDataset>,
}

/// Loads the data a config names (the shipped Fashion-MNIST by default).
///
/// # Errors
/// Reader errors, naming the file.
pub fn load_data(cfg: &ContrastiveConfig) -> Result<RunData> {
    let splits = if cfg.data.path.is_empty() {
        pretext_data::shipped::fashion_mnist(&pretext_data::shipped::datasets_dir().map_err(data_err)?)
            .map_err(data_err)?
    } else {
        let size = (cfg.data.image_size, cfg.data.image_size);
        load_images(Path::new(&cfg.data.path), cfg.data.format, size, cfg.data.channels).map_err(data_err)?
    };
    if splits.train.channels != cfg.data.channels {
        return Err(Error::Config(format!(
            "the data has {} channel(s) but data.channels = {} (set --set data.channels={} --set model.encoder.in_channels={})",
            splits.train.channels, cfg.data.channels, splits.train.channels, splits.train.channels
        )));
    }
    let held_out = match splits.test {
        Some(t) if t.labels.is_some() => Some(t),
        _ if splits.train.labels.is_some() => {
            let (_, va) = pretext_data::subset::split(splits.train.len(), 0.1, cfg.train.seed).map_err(data_err)?;
            Some(splits.train.select(&va))
        }
        _ => None,
    };
    Ok(RunData {
        train: Arc::new(splits.train),
        held_out,
    })
}

/// Encoder features of `indices` of `ds` (eval mode, no augmentation).
///
/// # Errors
/// Tensor errors; [`Error::Config`] for unlabelled data.
pub fn embed(
    model: &SimClr,
    ds: &ImageDataset,
    indices: &[usize],
    augment: &AugmentConfig,
    size: usize,
    device: &Device,
) -> Result<Embedded> {
    let plain = Pipeline::new(
        AugmentConfig::none(augment.mean.clone(), augment.std.clone()),
        size,
        size,
    )
    .map_err(Error::Config)?;
    let labels = ds
        .labels
        .as_ref()
        .ok_or_else(|| Error::Config("kNN monitoring needs labelled data".into()))?;
    let per = ds.channels * size * size;
    let mut feats = Vec::new();
    let mut dim = 0;
    for chunk in indices.chunks(500) {
        let mut buf = vec![0f32; chunk.len() * per];
        let mut rng = pretext_core::seed::stream_rng(0, pretext_core::seed::EVAL, &[]);
        for (out, &i) in buf.chunks_mut(per).zip(chunk) {
            plain.view_into(ds.image(i), ds.height, ds.width, ds.channels, &mut rng, out);
        }
        let x = Tensor::from_vec(buf, (chunk.len(), ds.channels, size, size), device)?;
        let h = model.encoder.forward_t(&x, false)?;
        dim = h.dim(1)?;
        feats.extend(h.flatten_all()?.to_vec1::<f32>()?);
    }
    Embedded::new(feats, dim, indices.iter().map(|&i| labels[i]).collect()).map_err(|e| Error::Config(e.to_string()))
}

/// kNN accuracy of the current encoder: a memory bank of labelled training
/// images against held-out images (fixed, seeded subsets).
///
/// # Errors
/// As [`embed`].
pub fn monitor_knn(model: &SimClr, data: &RunData, cfg: &ContrastiveConfig, device: &Device) -> Result<Option<f64>> {
    let (Some(held), Some(train_labels)) = (&data.held_out, &data.train.labels) else {
        return Ok(None);
    };
    let bank =
        pretext_data::subset::balanced_count(train_labels, cfg.eval.knn_train.min(data.train.len()), cfg.train.seed)
            .map_err(data_err)?;
    let held_labels = held.labels.as_deref().unwrap_or_default();
    let test = pretext_data::subset::balanced_count(held_labels, cfg.eval.knn_test.min(held.len()), cfg.train.seed)
        .map_err(data_err)?;
    let a = embed(
        model,
        &data.train,
        &bank,
        &cfg.data.augment,
        cfg.data.image_size,
        device,
    )?;
    let b = embed(model, held, &test, &cfg.data.augment, cfg.data.image_size, device)?;
    let knn = KnnConfig {
        k: cfg.eval.knn_k,
        temperature: cfg.eval.knn_temperature,
        ..Default::default()
    };
    Ok(Some(
        knn_accuracy(&a, &b, &knn).map_err(|e| Error::Config(e.to_string()))?,
    ))
}

fn build(cfg: &ContrastiveConfig, data: &RunData, device: &Device) -> Result<(Trainer<SimClr>, ImageBatcher)> {
    cfg.validate().map_err(Error::Config)?;
    let model = SimClr::new(&cfg.model, cfg.train.seed, device)?;
    let trainer = Trainer::new(model, &cfg.optim, &cfg.schedule, &cfg.train)?;
    let pipeline = Arc::new(
        Pipeline::new(cfg.data.augment.clone(), cfg.data.image_size, cfg.data.image_size).map_err(Error::Config)?,
    );
    let bc = BatcherConfig {
        batch_size: cfg.train.batch_size,
        views: 2,
        seed: cfg.train.seed,
        shuffle: true,
        drop_last: true,
        prefetch: cfg.data.prefetch,
    };
    let batcher = ImageBatcher::new(data.train.clone(), pipeline, bc, device).map_err(data_err)?;
    Ok((trainer, batcher))
}

/// Trains from the trainer's current step to the end, with kNN monitoring at
/// epoch ends (every `eval.knn_every` epochs) and at the end.
fn train(
    trainer: &mut Trainer<SimClr>,
    batcher: &mut ImageBatcher,
    data: &RunData,
    cfg: &ContrastiveConfig,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<()> {
    use pretext_core::BatchSource;
    let spe = batcher.steps_per_epoch().max(1);
    let total = cfg.train.total_steps(spe);
    while trainer.step() < total {
        let next_epoch_end = ((trainer.step() / spe) + 1) * spe;
        let stop = next_epoch_end.min(total);
        trainer.fit_until(batcher, observer, stop)?;
        let epoch = trainer.step().div_ceil(spe);
        let at_end = trainer.step() >= total;
        let due = cfg.eval.knn_every > 0 && trainer.step() % spe == 0 && epoch % cfg.eval.knn_every == 0;
        if due || at_end {
            if let Some(acc) = monitor_knn(&trainer.method, data, cfg, device)? {
                trainer.log_record(
                    &serde_json::json!({ "event": "knn", "step": trainer.step(), "epoch": epoch, "knn_accuracy": acc }),
                )?;
                observer.on_message(&format!("epoch {epoch}: kNN accuracy {:.2}%", acc * 100.0));
            }
        }
    }
    Ok(())
}

/// Starts a run in `out` with `cfg` (whose resolved TOML is `config_toml`).
///
/// # Errors
/// Invalid config, unreadable data, a run already in `out`, training divergence.
pub fn pretrain(
    cfg: &ContrastiveConfig,
    config_toml: &str,
    out: &Path,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<RunDir> {
    cfg.validate().map_err(Error::Config)?;
    let data = load_data(cfg)?;
    let (mut trainer, mut batcher) = build(cfg, &data, device)?;
    let run = RunDir::create(out, config_toml)?;
    trainer.attach_run(&run)?;
    train(&mut trainer, &mut batcher, &data, cfg, device, observer)?;
    Ok(run)
}

/// Continues the run in `dir` (whose `config.toml` the caller parsed into
/// `cfg`) from its latest checkpoint, on the exact trajectory of an
/// uninterrupted run.
///
/// # Errors
/// No run or checkpoint there, a config or checkpoint that does not fit.
pub fn resume(dir: &Path, cfg: &ContrastiveConfig, device: &Device, observer: &mut dyn Observer) -> Result<RunDir> {
    let run = RunDir::open(dir)?;
    let cfg = cfg.clone();
    let data = load_data(&cfg)?;
    let (mut trainer, mut batcher) = build(&cfg, &data, device)?;
    let mgr = run.checkpoints(cfg.train.keep_checkpoints);
    let latest = mgr
        .latest()?
        .ok_or_else(|| Error::NoCheckpoint(mgr.dir().to_path_buf()))?;
    let ckpt = pretext_core::checkpoint::load_checkpoint(&latest, device)?;
    trainer.resume(&ckpt, &latest)?;
    trainer.attach_run(&run)?;
    observer.on_message(&format!("resuming from {} (step {})", latest.display(), trainer.step()));
    train(&mut trainer, &mut batcher, &data, &cfg, device, observer)?;
    Ok(run)
}

/// Linear probe and kNN at each label fraction for the run's pretrained
/// encoder, the same encoder randomly initialised, and raw pixels; writes
/// `report/eval.json` and `report/eval.md` and returns the report.
///
/// # Errors
/// No run or checkpoint, unlabelled data, invalid fractions.
pub fn probe(
    dir: &Path,
    cfg: &ContrastiveConfig,
    fractions: &[f64],
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<pretext_eval::EvalReport> {
    let run = RunDir::open(dir)?;
    let data = load_data(cfg)?;
    let held = data
        .held_out
        .as_ref()
        .ok_or_else(|| Error::Config("probing needs labelled data".into()))?;
    let (mut trainer, _) = build(cfg, &data, device)?;
    let mgr = run.checkpoints(cfg.train.keep_checkpoints);
    let latest = mgr
        .latest()?
        .ok_or_else(|| Error::NoCheckpoint(mgr.dir().to_path_buf()))?;
    let ckpt = pretext_core::checkpoint::load_checkpoint(&latest, device)?;
    trainer.resume(&ckpt, &latest)?;
    let random = SimClr::new(&cfg.model, cfg.train.seed, device)?;
    let all_train: Vec<usize> = (0..data.train.len()).collect();
    let all_test: Vec<usize> = (0..held.len()).collect();
    let eval_err = |e: pretext_eval::Error| Error::Config(e.to_string());
    let probe_cfg = pretext_eval::LinearProbeConfig {
        seed: cfg.train.seed,
        ..Default::default()
    };
    let knn = KnnConfig {
        k: cfg.eval.knn_k,
        temperature: cfg.eval.knn_temperature,
        ..Default::default()
    };
    let mut records = Vec::new();
    for (name, model) in [
        ("pretrained", Some(&trainer.method)),
        ("random-init", Some(&random)),
        ("raw", None),
    ] {
        observer.on_message(&format!(
            "probing {name} features ({} train, {} test images)",
            all_train.len(),
            all_test.len()
        ));
        let (tr, te) = match model {
            Some(m) => (
                embed(
                    m,
                    &data.train,
                    &all_train,
                    &cfg.data.augment,
                    cfg.data.image_size,
                    device,
                )?,
                embed(m, held, &all_test, &cfg.data.augment, cfg.data.image_size, device)?,
            ),
            None => (
                Embedded::from_pixels(&data.train).map_err(eval_err)?,
                Embedded::from_pixels(held).map_err(eval_err)?,
            ),
        };
        records.extend(
            pretext_eval::evaluate_features(name, &tr, &te, fractions, cfg.train.seed, &probe_cfg, &knn)
                .map_err(eval_err)?,
        );
    }
    let dataset = if cfg.data.path.is_empty() {
        "fashion-mnist".to_string()
    } else {
        cfg.data.path.clone()
    };
    let report = pretext_eval::EvalReport {
        paradigm: "contrastive".into(),
        method: cfg.method.clone(),
        dataset,
        records,
    };
    report.write(&run.report_dir()?).map_err(eval_err)?;
    Ok(report)
}
