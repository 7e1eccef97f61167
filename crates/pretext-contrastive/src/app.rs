//! Contrastive pretraining as a [`Paradigm`]: its data, model, batches and
//! online kNN monitoring; pretrain, resume, probe and export come from
//! [`pretext_core::paradigm`], the CLI from `pretext_cli::runner`.

use crate::config::ContrastiveConfig;
use crate::error::{Error, Result};
use crate::model::{ContrastiveModel, MethodKind};
use candle_core::Device;
use pretext_core::paradigm::{EvalPoint, EvalSchedule, InitSpec, Paradigm, ProbeOptions, Sections, Trained};
use pretext_core::trainer::Observer;
use pretext_core::warm_start::InitialWeights;
use pretext_core::RunDir;
use pretext_data::{BatcherConfig, ImageBatcher, ImageDataset, Pipeline};
use pretext_eval::{knn_accuracy, Embedded, KnnConfig};
use std::path::Path;

/// SimCLR and MoCo v2 on images.
pub struct Contrastive;

/// Training images and a labelled held-out set for monitoring.
pub use pretext_data::source::RunImages as RunData;

/// Loads the data a config names (the shipped Fashion-MNIST by default).
///
/// # Errors
/// Reader errors, naming the file; images with another channel count than the config's.
pub fn load_data(cfg: &ContrastiveConfig) -> Result<RunData> {
    let imgs = pretext_data::source::load_run_images(
        &cfg.data.path,
        cfg.data.format,
        cfg.data.image_size,
        cfg.data.channels,
        cfg.train.seed,
    )
    .map_err(channels_hint)?;
    Ok(imgs)
}

/// The encoder's input follows the data: a channel mismatch names both keys.
fn channels_hint(e: pretext_data::Error) -> Error {
    match e {
        pretext_data::Error::Channels { found, expected } => Error::Config {
            key: "data.channels".into(),
            reason: format!(
                "{expected}, but the data has {found} channel(s): --set data.channels={found} --set model.encoder.in_channels={found}"
            ),
        },
        other => other.into(),
    }
}

/// The images a probe evaluates on (`--data` or the run's own) and, for
/// `--data`, where they came from.
///
/// # Errors
/// As [`load_data`]; unlabelled `--data`.
pub fn probe_data(cfg: &ContrastiveConfig, data: Option<&Path>) -> Result<(RunData, Option<pretext_data::DataSource>)> {
    let d = &cfg.data;
    RunData::for_probe(
        data,
        || pretext_data::source::load_run_images(&d.path, d.format, d.image_size, d.channels, cfg.train.seed),
        d.format,
        d.image_size,
        d.channels,
        cfg.train.seed,
    )
    .map_err(|e| match e {
        pretext_data::Error::Channels { found, expected } if data.is_some() => Error::Config {
            key: "data.channels".into(),
            reason: format!(
                "the encoder takes {expected} channel(s), but the probe data has {found}: give it images with {expected}"
            ),
        },
        other => channels_hint(other),
    })
}

/// Encoder features of `indices` of `ds` (eval mode, no augmentation).
///
/// # Errors
/// Tensor errors; unlabelled data.
pub fn embed(
    model: &ContrastiveModel,
    ds: &ImageDataset,
    indices: &[usize],
    cfg: &ContrastiveConfig,
    device: &Device,
    observer: &mut dyn Observer,
    task: &str,
) -> Result<Embedded> {
    Ok(pretext_eval::extract_features(
        model,
        ds,
        indices,
        &cfg.data.augment.mean,
        &cfg.data.augment.std,
        cfg.data.image_size,
        device,
        observer,
        task,
    )?)
}

fn knn_config(cfg: &ContrastiveConfig) -> KnnConfig {
    KnnConfig {
        k: cfg.eval.knn_k,
        temperature: cfg.eval.knn_temperature,
        ..Default::default()
    }
}

/// What online monitoring measured: kNN accuracy (labelled data only) and
/// the collapse indicators of the embeddings it computed.
#[derive(Debug, Clone, Copy)]
pub struct Monitor {
    /// kNN accuracy of held-out images against a labelled memory bank; `None` without labels.
    pub knn: Option<f64>,
    /// Spread of the held-out embeddings (of training images without labels).
    pub spread: Option<pretext_eval::collapse::Spread>,
}

/// kNN accuracy of the current encoder: a memory bank of labelled training
/// images against held-out images (fixed, seeded subsets), and the collapse
/// indicators of the held-out embeddings. Without labels, the indicators of
/// `eval.knn_test` seeded training images only.
///
/// # Errors
/// As [`embed`].
pub fn monitor(
    model: &ContrastiveModel,
    data: &RunData,
    cfg: &ContrastiveConfig,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<Monitor> {
    let (Some(held), Some(train_labels)) = (&data.held_out, &data.train.labels) else {
        let n = cfg.eval.knn_test.min(data.train.len());
        let sample = pretext_data::subset::seeded_sample(data.train.len(), n, cfg.train.seed);
        let feats = pretext_eval::encode_images(
            model,
            &data.train,
            &sample,
            &cfg.data.augment.mean,
            &cfg.data.augment.std,
            cfg.data.image_size,
            device,
            observer,
            "embedding spread",
        )?;
        return Ok(Monitor {
            knn: None,
            spread: pretext_eval::collapse::spread(&feats, model.encoder().out_dim()),
        });
    };
    let bank =
        pretext_data::subset::balanced_count(train_labels, cfg.eval.knn_train.min(data.train.len()), cfg.train.seed)?;
    let held_labels = held.labels.as_deref().unwrap_or_default();
    let test = pretext_data::subset::balanced_count(held_labels, cfg.eval.knn_test.min(held.len()), cfg.train.seed)?;
    let a = embed(model, &data.train, &bank, cfg, device, observer, "kNN: memory bank")?;
    let b = embed(model, held, &test, cfg, device, observer, "kNN: held-out")?;
    Ok(Monitor {
        knn: Some(knn_accuracy(&a, &b, &knn_config(cfg))?),
        spread: pretext_eval::collapse::spread(&b.features, b.dim),
    })
}

/// A freshly initialised model of the config's method (seeded by `train.seed`).
///
/// # Errors
/// An invalid config.
pub fn new_model(cfg: &ContrastiveConfig, device: &Device) -> Result<ContrastiveModel> {
    cfg.validate()?;
    let method = MethodKind::parse(&cfg.method)?;
    Ok(ContrastiveModel::new(
        method,
        &cfg.model_for_data(),
        cfg.train.seed,
        device,
    )?)
}

impl Paradigm for Contrastive {
    const NAME: &'static str = "contrastive";
    const SHIPPED_DATA: &'static str = "fashion-mnist";
    type Config = ContrastiveConfig;
    type Model = ContrastiveModel;
    type Assets = ();
    type Data = RunData;
    type Batches = ImageBatcher;
    type Error = Error;

    fn sections(cfg: &ContrastiveConfig) -> Sections<'_> {
        Sections::new(&cfg.train, &cfg.optim, &cfg.schedule, &cfg.data.path)
    }

    fn validate(cfg: &ContrastiveConfig) -> Result<()> {
        Ok(cfg.validate()?)
    }

    fn load_data(cfg: &ContrastiveConfig, _: Option<()>, _: &mut dyn Observer) -> Result<(RunData, ())> {
        Ok((load_data(cfg)?, ()))
    }

    fn load_assets(_: &ContrastiveConfig, _: &RunDir) -> Result<()> {
        Ok(())
    }

    fn new_model(cfg: &ContrastiveConfig, _: &(), device: &Device) -> Result<ContrastiveModel> {
        new_model(cfg, device)
    }

    fn batches(cfg: &ContrastiveConfig, data: &RunData, _: &(), device: &Device) -> Result<ImageBatcher> {
        let view = cfg.view_side();
        let pipeline = Pipeline::new(cfg.data.augment.clone(), view, view)?;
        let bc = BatcherConfig::training(cfg.train.batch_size, 2, cfg.train.seed, cfg.data.prefetch);
        let batches = data.training_batches(pipeline, bc, device)?;
        let dino = &cfg.model.dino;
        if MethodKind::parse(&cfg.method)? == MethodKind::Dino && dino.local_crops > 0 {
            // multi-crop: the local views, smaller and from a smaller area
            let local = pretext_data::AugmentConfig {
                crop: true,
                crop_scale: dino.local_scale,
                ..cfg.data.augment.clone()
            };
            let pipeline = Pipeline::new(local, dino.local_size, dino.local_size)?;
            return Ok(batches.with_local_views(std::sync::Arc::new(pipeline), dino.local_crops)?);
        }
        Ok(batches)
    }

    fn eval_schedule(cfg: &ContrastiveConfig) -> EvalSchedule {
        EvalSchedule::Epochs(cfg.eval.knn_every)
    }

    fn evaluate(
        cfg: &ContrastiveConfig,
        data: &RunData,
        _: &(),
        model: &ContrastiveModel,
        at: EvalPoint,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> Result<Vec<serde_json::Value>> {
        let m = monitor(model, data, cfg, device, observer)?;
        let epoch = at.epoch();
        let mut events = Vec::new();
        if let Some(acc) = m.knn {
            observer.on_message(&format!("epoch {epoch}: kNN accuracy {:.2}%", acc * 100.0));
            events.push(serde_json::json!({ "event": "knn", "step": at.step, "epoch": epoch, "knn_accuracy": acc }));
        }
        if let Some(s) = m.spread {
            observer.on_message(&format!("epoch {epoch}: embedding {}", s.summary()));
            events.push(s.event(at.step, epoch));
        }
        Ok(events)
    }

    fn probe(
        cfg: &ContrastiveConfig,
        trained: &Trained<Self>,
        opts: &ProbeOptions<'_>,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> Result<String> {
        let report = probe(trained, cfg, opts, device, observer)?;
        Ok(format!(
            "{}\nreport: {}",
            report.markdown(),
            trained.run.root().join("report").display()
        ))
    }

    fn export_files(cfg: &ContrastiveConfig, trained: &Trained<Self>) -> Result<Vec<(String, Vec<u8>)>> {
        crate::export::export_files(cfg, trained)
    }

    fn initial_weights(
        _: &ContrastiveConfig,
        spec: &InitSpec,
        device: &Device,
    ) -> Result<(InitialWeights, Option<()>)> {
        Ok((crate::init::initial_weights(spec, device)?, Some(())))
    }

    /// The encoder comes from the source; the projection head may start fresh.
    fn init_required(name: &str) -> bool {
        name.starts_with("encoder.")
    }

    fn init_settings(spec: &InitSpec) -> Result<Vec<String>> {
        crate::init::init_settings(spec)
    }
}

/// The transfer report of a trained run: linear probe and kNN at each
/// label fraction for the pretrained encoder, the same encoder randomly
/// initialised, and raw pixels; then, at the fractions up to
/// `eval.finetune_max_labels`, fine-tuning of the pretrained encoder and of
/// the random-init one (the supervised-from-scratch baseline) with the same
/// budget. Writes `report/` (eval.json, eval.md, plots, index.html).
///
/// # Errors
/// Unlabelled data, invalid fractions, tensor and I/O errors.
pub fn probe(
    trained: &Trained<Contrastive>,
    cfg: &ContrastiveConfig,
    opts: &ProbeOptions<'_>,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<pretext_eval::EvalReport> {
    let (fractions, finetune) = (opts.fractions, opts.finetune);
    let dir: &Path = trained.run.root();
    let (data, source) = probe_data(cfg, opts.data)?;
    let held = data
        .held_out
        .as_ref()
        .ok_or_else(|| Error::Eval(pretext_eval::transfer::UNLABELLED_RUN.into()))?;
    let random = new_model(cfg, device)?;
    let train = pretext_eval::probe_subset(&data.train, cfg.eval.probe_train, cfg.train.seed)?;
    let test = pretext_eval::probe_subset(held, cfg.eval.probe_test, cfg.train.seed)?;
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
        knn: knn_config(cfg),
        finetune: finetune.then(|| (cfg.eval.finetune.clone(), cfg.eval.finetune_max_labels)),
    };
    let mut fresh = |init: pretext_eval::Init| -> pretext_eval::Result<Box<dyn pretext_eval::ImageEncoder>> {
        let model = match init {
            pretext_eval::Init::Pretrained => {
                pretext_core::paradigm::load_trained::<Contrastive>(dir, cfg, device)?.model
            }
            pretext_eval::Init::Random => new_model(cfg, device)?,
        };
        Ok(Box::new(model))
    };
    let (records, test_features) =
        pretext_eval::transfer_records(&setup, &trained.model, &random, &mut fresh, device, observer)?;
    let report = pretext_eval::EvalReport {
        paradigm: Contrastive::NAME.into(),
        method: cfg.method.clone(),
        dataset: source
            .as_ref()
            .map_or_else(|| Contrastive::dataset_name(cfg), |s| s.path.clone()),
        records,
        data: source,
    };
    let report_dir = trained.run.report_dir()?;
    report.write(&report_dir)?;
    let metrics_path = trained.run.metrics_path();
    let figures = pretext_eval::plots::RunFigures {
        metrics: Some(&metrics_path),
        test_features: Some(&test_features),
        class_names: &held.classes,
        ..Default::default()
    };
    pretext_eval::plots::write_report_page(&report_dir, &report, &figures)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretext_core::trainer::BatchSource;
    use std::sync::Arc;

    fn images(n: usize, side: usize) -> RunData {
        let train = ImageDataset {
            height: side,
            width: side,
            channels: 1,
            pixels: (0..n * side * side).map(|i| (i * 37 % 251) as u8).collect(),
            labels: Some((0..n as u32).map(|i| i % 2).collect()),
            classes: Vec::new(),
            ids: None,
        };
        RunData {
            train: Arc::new(train),
            held_out: None,
        }
    }

    #[test]
    fn views_have_the_view_side_and_the_encoder_takes_either_side() {
        let data = images(16, 16);
        let mut cfg = ContrastiveConfig::default();
        cfg.data.image_size = 16;
        cfg.train.batch_size = 4;
        for (scale, side) in [(1.0, 16), (0.6, 10), (0.7, 11)] {
            cfg.data.view_scale = scale;
            cfg.validate().expect("valid");
            assert_eq!(cfg.view_side(), side, "view_scale {scale}");
            let mut batches = Contrastive::batches(&cfg, &data, &(), &Device::Cpu).expect("batches");
            let batch = batches.batch(0).expect("batch");
            assert_eq!(batch.views.len(), 2);
            for v in &batch.views {
                assert_eq!(v.dims(), &[4, 1, side, side], "view_scale {scale}");
            }
        }
        // the encoder pools globally: images of either side give features of one width
        let model = Contrastive::new_model(&cfg, &(), &Device::Cpu).expect("model");
        for side in [11, 16] {
            let x = candle_core::Tensor::zeros((2, 1, side, side), candle_core::DType::F32, &Device::Cpu).expect("x");
            let f = model.encoder().forward_t(&x, false).expect("features");
            assert_eq!(f.dims(), &[2, model.encoder().out_dim()], "side {side}");
        }
    }

    /// A fine-tuning value that cannot work stops the config when it
    /// loads, before pretraining or probing, with its key.
    #[test]
    fn a_bad_fine_tuning_value_is_refused_with_the_config() {
        let mut cfg = ContrastiveConfig::default();
        cfg.eval.finetune.warmup_fraction = 1.0;
        let err = cfg.validate().expect_err("warm-up over the whole run");
        assert_eq!(err.key, "eval.finetune.warmup_fraction", "{err}");
        let mut cfg = ContrastiveConfig::default();
        cfg.eval.finetune.crop_scale = (0.9, 0.2);
        assert_eq!(
            cfg.validate().expect_err("an empty crop range").key,
            "eval.finetune.crop_scale"
        );
    }

    #[test]
    fn view_scale_is_checked_and_a_vit_gets_whole_patches() {
        let mut cfg = ContrastiveConfig::default();
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            cfg.data.view_scale = bad;
            let err = cfg.validate().expect_err("out of range").to_string();
            assert!(err.contains("data.view_scale"), "{err}");
        }
        cfg.data.view_scale = 0.25; // 7 pixels of 28: never under 8
        cfg.validate().expect("valid");
        assert_eq!(cfg.view_side(), 8);
        cfg.data.image_size = 8; // the default's scale on 8-pixel images: whole images
        cfg.data.view_scale = 0.7;
        assert_eq!(cfg.view_side(), 8);
        cfg.data.image_size = 28;
        cfg.data.view_scale = 0.7;
        assert_eq!(cfg.view_side(), 20);
        cfg.model.encoder.arch = crate::encoder::Arch::VitTiny;
        for (patch, side) in [(4, 20), (7, 21), (14, 14), (28, 28)] {
            cfg.model.encoder.patch_size = patch;
            assert_eq!(cfg.view_side(), side, "patch {patch}");
        }
        cfg.model.encoder.patch_size = 4;
        cfg.data.view_scale = 0.05; // under one patch: one patch
        assert_eq!(cfg.view_side(), 4);
    }
}
