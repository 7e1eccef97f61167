//! Running contrastive pretraining end to end: data, model, trainer, run
//! folder, online kNN monitoring, resume. The CLI is a thin layer over this.

use crate::config::ContrastiveConfig;
use crate::model::{ContrastiveModel, MethodKind};
use candle_core::Device;
use pretext_core::trainer::{Observer, Trainer};
use pretext_core::{Error, Result, RunDir};
use pretext_data::{BatcherConfig, ImageBatcher, ImageDataset, Pipeline};
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
    let imgs = pretext_data::source::load_run_images(
        &cfg.data.path,
        cfg.data.format,
        cfg.data.image_size,
        cfg.data.channels,
        cfg.train.seed,
    )
    .map_err(|e| match e {
        pretext_data::Error::Invalid(m) if m.contains("data.channels") => {
            Error::Config(format!("{m} --set model.encoder.in_channels=<same>"))
        }
        other => data_err(other),
    })?;
    Ok(RunData {
        train: Arc::new(imgs.train),
        held_out: imgs.held_out,
    })
}

/// Encoder features of `indices` of `ds` (eval mode, no augmentation).
///
/// # Errors
/// Tensor errors; [`Error::Config`] for unlabelled data.
pub fn embed(
    model: &ContrastiveModel,
    ds: &ImageDataset,
    indices: &[usize],
    cfg: &ContrastiveConfig,
    device: &Device,
    observer: &mut dyn Observer,
    task: &str,
) -> Result<Embedded> {
    pretext_eval::extract_features(
        model,
        ds,
        indices,
        &cfg.data.augment.mean,
        &cfg.data.augment.std,
        cfg.data.image_size,
        device,
        observer,
        task,
    )
    .map_err(eval_err)
}

fn eval_err(e: pretext_eval::Error) -> Error {
    match e {
        pretext_eval::Error::Core(c) => c,
        other => Error::Config(other.to_string()),
    }
}

/// kNN accuracy of the current encoder: a memory bank of labelled training
/// images against held-out images (fixed, seeded subsets).
///
/// # Errors
/// As [`embed`].
pub fn monitor_knn(
    model: &ContrastiveModel,
    data: &RunData,
    cfg: &ContrastiveConfig,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<Option<f64>> {
    let (Some(held), Some(train_labels)) = (&data.held_out, &data.train.labels) else {
        return Ok(None);
    };
    let bank =
        pretext_data::subset::balanced_count(train_labels, cfg.eval.knn_train.min(data.train.len()), cfg.train.seed)
            .map_err(data_err)?;
    let held_labels = held.labels.as_deref().unwrap_or_default();
    let test = pretext_data::subset::balanced_count(held_labels, cfg.eval.knn_test.min(held.len()), cfg.train.seed)
        .map_err(data_err)?;
    let a = embed(model, &data.train, &bank, cfg, device, observer, "kNN: memory bank")?;
    let b = embed(model, held, &test, cfg, device, observer, "kNN: held-out")?;
    let knn = KnnConfig {
        k: cfg.eval.knn_k,
        temperature: cfg.eval.knn_temperature,
        ..Default::default()
    };
    Ok(Some(knn_accuracy(&a, &b, &knn).map_err(eval_err)?))
}

/// A freshly initialised model of the config's method (seeded by `train.seed`).
///
/// # Errors
/// An invalid config.
pub fn new_model(cfg: &ContrastiveConfig, device: &Device) -> Result<ContrastiveModel> {
    cfg.validate().map_err(Error::Config)?;
    let method = MethodKind::parse(&cfg.method).map_err(Error::Config)?;
    Ok(ContrastiveModel::new(method, &cfg.model, cfg.train.seed, device)?)
}

/// The model of the run in `dir` with the weights of its latest checkpoint.
///
/// # Errors
/// No run or checkpoint there; a checkpoint that does not fit the config.
pub fn load_trained(dir: &Path, cfg: &ContrastiveConfig, device: &Device) -> Result<(RunDir, ContrastiveModel)> {
    let run = RunDir::open(dir)?;
    let mgr = run.checkpoints(cfg.train.keep_checkpoints);
    let latest = mgr
        .latest()?
        .ok_or_else(|| Error::NoCheckpoint(mgr.dir().to_path_buf()))?;
    let ckpt = pretext_core::checkpoint::load_checkpoint(&latest, device)?;
    let model = new_model(cfg, device)?;
    pretext_core::trainer::load_model_weights(&model, &ckpt, &latest)?;
    Ok((run, model))
}

fn build(
    cfg: &ContrastiveConfig,
    data: &RunData,
    device: &Device,
) -> Result<(Trainer<ContrastiveModel>, ImageBatcher)> {
    let model = new_model(cfg, device)?;
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
    trainer: &mut Trainer<ContrastiveModel>,
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
            if let Some(acc) = trainer.with_published_weights(|m| monitor_knn(m, data, cfg, device, observer))? {
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

/// The dataset name for reports: `fashion-mnist` for the shipped default, else the path.
pub fn dataset_name(cfg: &ContrastiveConfig) -> String {
    if cfg.data.path.is_empty() {
        "fashion-mnist".to_string()
    } else {
        cfg.data.path.clone()
    }
}

/// The transfer report of the run in `dir`: linear probe and kNN at each
/// label fraction for the pretrained encoder, the same encoder randomly
/// initialised, and raw pixels; then, at the fractions up to
/// `eval.finetune_max_labels`, fine-tuning of the pretrained encoder and of
/// the random-init one (the supervised-from-scratch baseline) with the same
/// budget. Writes `report/` (eval.json, eval.md, plots, index.html).
///
/// # Errors
/// No run or checkpoint, unlabelled data, invalid fractions.
pub fn probe(
    dir: &Path,
    cfg: &ContrastiveConfig,
    fractions: &[f64],
    finetune: bool,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<pretext_eval::EvalReport> {
    let (run, pretrained) = load_trained(dir, cfg, device)?;
    let data = load_data(cfg)?;
    let held = data
        .held_out
        .as_ref()
        .ok_or_else(|| Error::Config("probing needs labelled data".into()))?;
    let random = new_model(cfg, device)?;
    let train = pretext_eval::probe_subset(&data.train, cfg.eval.probe_train, cfg.train.seed).map_err(eval_err)?;
    let test = pretext_eval::probe_subset(held, cfg.eval.probe_test, cfg.train.seed).map_err(eval_err)?;
    let setup = pretext_eval::TransferSetup {
        train: &train,
        test: &test,
        mean: &cfg.data.augment.mean,
        std: &cfg.data.augment.std,
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
            pretext_eval::Init::Pretrained => load_trained(dir, cfg, device)?.1,
            pretext_eval::Init::Random => new_model(cfg, device)?,
        }))
    };
    let (records, test_features) =
        pretext_eval::transfer_records(&setup, &pretrained, &random, &mut fresh, device, observer).map_err(eval_err)?;
    let report = pretext_eval::EvalReport {
        paradigm: "contrastive".into(),
        method: cfg.method.clone(),
        dataset: dataset_name(cfg),
        records,
    };
    let report_dir = run.report_dir()?;
    report.write(&report_dir).map_err(eval_err)?;
    let metrics_path = run.metrics_path();
    let figures = pretext_eval::plots::RunFigures {
        metrics: Some(&metrics_path),
        test_features: Some(&test_features),
        class_names: &held.classes,
        ..Default::default()
    };
    pretext_eval::plots::write_report_page(&report_dir, &report, &figures).map_err(eval_err)?;
    Ok(report)
}
