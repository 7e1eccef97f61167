//! The whole transfer protocol for an image encoder, as every paradigm's
//! `probe` runs it: frozen features of the pretrained encoder, of the same
//! architecture randomly initialised and of raw pixels through the linear
//! probe and kNN at each label fraction; then fine-tuning of fresh copies of
//! the pretrained and the random-init encoder (the latter is supervised
//! training from scratch) on the same subsets with the same budget.

use crate::features::{extract_features, Embedded, ImageEncoder};
use crate::finetune::{fine_tune, FineTuneConfig};
use crate::knn::KnnConfig;
use crate::linear::LinearProbeConfig;
use crate::report::{evaluate_features, fraction_label, EvalRecord};
use crate::{Error, Result};
use candle_core::Device;
use pretext_core::trainer::Observer;
use pretext_data::ImageDataset;

/// What `probe` says of a run pretrained on unlabelled data.
pub const UNLABELLED_RUN: &str =
    "the run's data has no labels, so there is nothing to probe it on: give labelled data with --data PATH";

/// What the protocol runs on and how.
#[derive(Debug, Clone)]
pub struct TransferSetup<'a> {
    /// Labelled training images (subsets are drawn from them).
    pub train: &'a ImageDataset,
    /// Labelled test images.
    pub test: &'a ImageDataset,
    /// Input normalisation (empty = none), as in pretraining.
    pub mean: &'a [f32],
    /// Input standard deviations.
    pub std: &'a [f32],
    /// Side of the square inputs.
    pub size: usize,
    /// Label fractions.
    pub fractions: &'a [f64],
    /// Seed of subsets, probes and fine-tuning.
    pub seed: u64,
    /// The linear probe.
    pub probe: LinearProbeConfig,
    /// kNN.
    pub knn: KnnConfig,
    /// Fine-tuning recipe and the largest fraction to fine-tune at (`None` = no fine-tuning).
    pub finetune: Option<(FineTuneConfig, f64)>,
}

/// Which encoder a fresh copy is wanted of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// The pretrained weights.
    Pretrained,
    /// A random initialisation (same seed as the `random-init` features).
    Random,
}

/// Runs the protocol; returns the records and the pretrained test features
/// (for the PCA plot). `fresh` builds a new encoder to fine-tune (fine-tuning
/// changes its weights).
///
/// # Errors
/// Unlabelled data, invalid fractions, tensor errors, or an error of `fresh`.
pub fn transfer_records(
    setup: &TransferSetup<'_>,
    pretrained: &dyn ImageEncoder,
    random: &dyn ImageEncoder,
    fresh: &mut dyn FnMut(Init) -> Result<Box<dyn ImageEncoder>>,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<(Vec<EvalRecord>, Embedded)> {
    let all_train: Vec<usize> = (0..setup.train.len()).collect();
    let all_test: Vec<usize> = (0..setup.test.len()).collect();
    let mut features = |name: &str, observer: &mut dyn Observer| -> Result<(Embedded, Embedded)> {
        observer.on_message(&format!(
            "probing {name} features ({} train, {} test images)",
            all_train.len(),
            all_test.len()
        ));
        let model = match name {
            "pretrained" => pretrained,
            "random-init" => random,
            _ => return Ok((Embedded::from_pixels(setup.train)?, Embedded::from_pixels(setup.test)?)),
        };
        let feats = |ds: &ImageDataset, idx: &[usize], part: &str, observer: &mut dyn Observer| {
            extract_features(
                model,
                ds,
                idx,
                setup.mean,
                setup.std,
                setup.size,
                device,
                observer,
                &format!("{name}: {part} features"),
            )
        };
        Ok((
            feats(setup.train, &all_train, "train", observer)?,
            feats(setup.test, &all_test, "test", observer)?,
        ))
    };
    let (mut records, pretrained_test) = frozen_feature_records(
        &mut features,
        setup.fractions,
        setup.seed,
        &setup.probe,
        &setup.knn,
        observer,
    )?;
    if let Some((ft, max_labels)) = &setup.finetune {
        let labels = setup
            .train
            .labels
            .as_ref()
            .ok_or_else(|| Error::Invalid("fine-tuning needs labelled training images".into()))?;
        for &f in setup.fractions.iter().filter(|&&f| f <= *max_labels) {
            let idx = pretext_data::subset::balanced_subset(labels, f, setup.seed)?;
            let subset = setup.train.select(&idx);
            for (name, init) in [("pretrained", Init::Pretrained), ("random-init", Init::Random)] {
                let model = fresh(init)?;
                observer.on_message(&format!(
                    "fine-tuning the {name} encoder on {} labelled images ({})",
                    subset.len(),
                    fraction_label(f)
                ));
                let r = fine_tune(
                    model.as_ref(),
                    &subset,
                    setup.test,
                    setup.mean,
                    setup.std,
                    setup.size,
                    ft,
                    setup.seed,
                    device,
                    observer,
                )?;
                observer.on_message(&format!(
                    "  {name} finetune @ {}: {:.2}% ({} epochs, {:.0} s)",
                    fraction_label(f),
                    r.accuracy * 100.0,
                    r.epochs,
                    r.train_seconds
                ));
                records.push(EvalRecord {
                    features: name.into(),
                    protocol: "finetune".into(),
                    labels: f,
                    accuracy: r.accuracy,
                    n_train: r.n_train,
                    n_test: r.n_test,
                    l2: None,
                });
            }
        }
    }
    Ok((records, pretrained_test))
}

/// The frozen-feature half of the protocol for any modality: for each of the
/// feature sets `pretrained`, `random-init` and `raw` (the paradigm's
/// baseline: pixels, TF-IDF), `features(name)` gives the train and test
/// features; each goes through the linear probe and kNN at every label
/// fraction. Returns the records and the pretrained test features.
///
/// # Errors
/// An error of `features`, invalid fractions, or unlabelled features.
pub fn frozen_feature_records(
    features: &mut FeatureSource<'_>,
    fractions: &[f64],
    seed: u64,
    probe: &LinearProbeConfig,
    knn: &KnnConfig,
    observer: &mut dyn Observer,
) -> Result<(Vec<EvalRecord>, Embedded)> {
    let mut records = Vec::new();
    let mut pretrained_test = None;
    for name in FEATURE_SETS {
        let (tr, te) = features(name, observer)?;
        let recs = evaluate_features(name, &tr, &te, fractions, seed, probe, knn)?;
        for r in &recs {
            observer.on_message(&format!(
                "  {name} {} @ {}: {:.2}%",
                r.protocol,
                fraction_label(r.labels),
                r.accuracy * 100.0
            ));
        }
        records.extend(recs);
        if name == "pretrained" {
            pretrained_test = Some(te);
        }
    }
    let pretrained_test = pretrained_test.ok_or_else(|| Error::Invalid("no pretrained features".into()))?;
    Ok((records, pretrained_test))
}

/// What [`frozen_feature_records`] asks for each feature set: its train and
/// test features.
pub type FeatureSource<'a> = dyn FnMut(&str, &mut dyn Observer) -> Result<(Embedded, Embedded)> + 'a;

/// The feature sets of the frozen-feature protocol, in report order.
pub const FEATURE_SETS: [&str; 3] = ["pretrained", "random-init", "raw"];

/// A class-balanced, seeded subset of `n` labelled images of `ds` (all of
/// them when `n` is 0 or at least `ds.len()`), for quicker probes.
///
/// # Errors
/// Unlabelled images.
pub fn probe_subset(ds: &ImageDataset, n: usize, seed: u64) -> Result<std::borrow::Cow<'_, ImageDataset>> {
    if n == 0 || n >= ds.len() {
        return Ok(std::borrow::Cow::Borrowed(ds));
    }
    let labels = ds
        .labels
        .as_ref()
        .ok_or_else(|| Error::Invalid("a probe subset needs labelled images".into()))?;
    let idx = pretext_data::subset::balanced_count(labels, n, seed)?;
    Ok(std::borrow::Cow::Owned(ds.select(&idx)))
}
