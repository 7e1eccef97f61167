//! Few-label fine-tuning: an encoder plus a linear head trained end to end
//! on a labelled subset, then scored on the test set.
//!
//! The same routine with the same budget trains the pretrained encoder and a
//! randomly initialised copy of it; the latter is the supervised-from-scratch
//! baseline.

use crate::features::{core_err, eval_batch, eval_pipeline, ImageEncoder, EXTRACT_CHUNK};
use crate::{Error, Result};
use candle_core::{DType, Device, D};
use pretext_core::optim::{OptimConfig, OptimKind};
use pretext_core::schedule::{ScheduleConfig, ScheduleKind};
use pretext_core::trainer::{Observer, StepReport};
use pretext_core::{BatchSource, SeededVarMap};
use pretext_data::{AugmentConfig, BatcherConfig, ImageBatcher, ImageDataset, Pipeline};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

/// Fine-tuning settings. The defaults follow the reference's supervised
/// recipe (Adam, lr 1e-3, weight decay 5e-4, cosine, crop 0.5–1 + flip) with
/// a budget of images seen rather than of epochs, so 1% and 10% subsets get
/// the same compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FineTuneConfig {
    /// Training images seen in total (epochs = budget / subset size, rounded up).
    pub budget_images: usize,
    /// Upper bound on epochs (tiny subsets).
    pub max_epochs: u64,
    /// Images per step (capped at a quarter of the subset).
    pub batch_size: usize,
    /// Base learning rate (AdamW, cosine decay to 0).
    pub lr: f64,
    /// Share of the steps over which the rate rises linearly from
    /// `lr / warm-up steps` to `lr` before the cosine decay (0 = none, the
    /// default). A new head on a pretrained transformer sends large
    /// gradients into it at first; the MAE paper fine-tunes with 5 of 100
    /// epochs of warm-up.
    pub warmup_fraction: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Area range of the random resized crop.
    pub crop_scale: (f64, f64),
    /// Horizontal flip probability.
    pub flip_p: f64,
    /// With a validation split (`finetune`), the weights of the epoch with
    /// the best validation accuracy are kept (ties go to the later epoch);
    /// with `patience` > 0, training also stops after that many epochs
    /// without a better one. 0 (the default) runs the whole schedule: cutting
    /// a cosine schedule short leaves the learning rate high, and a small
    /// validation split is noisy.
    pub patience: u64,
}

impl FineTuneConfig {
    /// Checks every value, naming the key (`eval.finetune.…`) that cannot
    /// work: the configs call it when they load, so a bad value stops the
    /// command before any pretraining or probing, not when fine-tuning
    /// starts.
    ///
    /// # Errors
    /// The first key whose value cannot work.
    pub fn validate(&self) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        let key = |k: &str| format!("eval.finetune.{k}");
        for (k, v) in [
            ("budget_images", self.budget_images),
            ("batch_size", self.batch_size),
            ("max_epochs", self.max_epochs as usize),
        ] {
            if v == 0 {
                return Err(InvalidSetting::value(key(k), v, "must be at least 1"));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(InvalidSetting::value(key("lr"), self.lr, "must be > 0"));
        }
        if !(0.0..1.0).contains(&self.warmup_fraction) {
            return Err(InvalidSetting::value(
                key("warmup_fraction"),
                self.warmup_fraction,
                "must be in [0, 1): the share of the fine-tuning steps spent warming up",
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(InvalidSetting::value(
                key("weight_decay"),
                self.weight_decay,
                "must be ≥ 0",
            ));
        }
        // the crop and flip by the pipeline's own rules, under this section's keys
        self.augment(Vec::new(), Vec::new())
            .validate()
            .map_err(|e| InvalidSetting::new(e.key.replacen("data.augment.", "eval.finetune.", 1), e.reason))
    }

    /// The fine-tuning batches' augmentation (random resized crop and
    /// flip) of images normalised by `mean` and `std`.
    fn augment(&self, mean: Vec<f32>, std: Vec<f32>) -> AugmentConfig {
        AugmentConfig {
            crop: true,
            crop_scale: self.crop_scale,
            flip_p: self.flip_p,
            ..AugmentConfig::none(mean, std)
        }
    }
}

impl Default for FineTuneConfig {
    fn default() -> Self {
        Self {
            budget_images: 60_000,
            max_epochs: 200,
            batch_size: 64,
            lr: 1e-3,
            warmup_fraction: 0.0,
            weight_decay: 5e-4,
            crop_scale: (0.5, 1.0),
            flip_p: 0.5,
            patience: 0,
        }
    }
}

/// What one fine-tuning run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FineTuneResult {
    /// Test accuracy in [0, 1].
    pub accuracy: f64,
    /// Labelled training images.
    pub n_train: usize,
    /// Test images.
    pub n_test: usize,
    /// Epochs over the subset.
    pub epochs: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Mean training loss of the last epoch.
    pub final_loss: f64,
    /// Wall-clock seconds of training (without the test pass).
    pub train_seconds: f64,
    /// Validation images (0 without a validation split).
    #[serde(default)]
    pub n_validation: usize,
    /// Accuracy on the validation split at the epoch kept.
    #[serde(default)]
    pub validation_accuracy: Option<f64>,
    /// The epoch (1-based) whose weights were kept, with a validation split.
    #[serde(default)]
    pub best_epoch: Option<u64>,
}

/// A linear classification layer as PyTorch's `nn.Linear` holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearHead {
    /// `classes × dim` weights, row-major (`fc.weight`).
    pub weight: Vec<f32>,
    /// `classes` biases (`fc.bias`).
    pub bias: Vec<f32>,
    /// Input size.
    pub dim: usize,
}

impl LinearHead {
    /// Output classes.
    pub fn classes(&self) -> usize {
        self.bias.len()
    }

    /// The head as tensors `(weight (classes, dim), bias (classes,))`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn tensors(&self, device: &Device) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        let w =
            candle_core::Tensor::from_vec(self.weight.clone(), (self.classes(), self.dim), device).map_err(core_err)?;
        let b = candle_core::Tensor::from_vec(self.bias.clone(), self.classes(), device).map_err(core_err)?;
        Ok((w, b))
    }

    /// Reads a head from its tensors.
    ///
    /// # Errors
    /// Shapes that are not `(c, d)` and `(c,)`.
    pub fn from_tensors(weight: &candle_core::Tensor, bias: &candle_core::Tensor) -> Result<Self> {
        let (c, d) = weight.dims2().map_err(core_err)?;
        if bias.dims() != [c] {
            return Err(Error::Invalid(format!(
                "a linear head of weight {:?} needs a bias of shape [{c}], not {:?}",
                weight.dims(),
                bias.dims()
            )));
        }
        Ok(Self {
            weight: weight
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(core_err)?,
            bias: bias.to_vec1::<f32>().map_err(core_err)?,
            dim: d,
        })
    }

    /// Class probabilities of features `(n, dim)` (softmax of the logits), `(n, classes)`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn probabilities(&self, features: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        let (w, b) = self.tensors(features.device())?;
        let logits = features
            .matmul(&w.t().map_err(core_err)?)
            .and_then(|l| l.broadcast_add(&b))
            .map_err(core_err)?;
        pretext_core::ops::softmax_last_dim(&logits).map_err(core_err)
    }
}

/// A classifier trained by [`train_classifier`] or [`linear_classifier`]:
/// what it measured and its head (the encoder was trained in place).
#[derive(Debug, Clone)]
pub struct FineTuned {
    /// What it measured.
    pub result: FineTuneResult,
    /// The linear head on the encoder's features.
    pub head: LinearHead,
}

/// Trains `encoder` (in place) plus a new linear head on `train` (every
/// image labelled) and returns the test accuracy. `mean`/`std` normalise the
/// inputs as in pretraining; views are `size`×`size`. `seed` fixes the
/// head's initialisation, the data order and the augmentations.
///
/// # Errors
/// Unlabelled data, an empty subset, tensor errors, a loss that is not finite.
#[allow(clippy::too_many_arguments)]
pub fn fine_tune(
    encoder: &dyn ImageEncoder,
    train: &ImageDataset,
    test: &ImageDataset,
    mean: &[f32],
    std: &[f32],
    size: usize,
    cfg: &FineTuneConfig,
    seed: u64,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<FineTuneResult> {
    let labels = |d: &ImageDataset| d.labels.iter().flatten().copied().max();
    let classes = labels(train).max(labels(test)).map_or(0, |m| m as usize + 1);
    let data = ClassifierData {
        train,
        validation: None,
        test,
        classes,
    };
    let view = ImageView { mean, std, size };
    Ok(train_classifier(encoder, &data, &view, cfg, seed, device, observer)?.result)
}

/// The labelled images a classifier is trained, selected and tested on.
#[derive(Debug, Clone, Copy)]
pub struct ClassifierData<'a> {
    /// Training images (every one labelled).
    pub train: &'a ImageDataset,
    /// Validation images for early stopping and choosing the epoch kept.
    pub validation: Option<&'a ImageDataset>,
    /// Test images.
    pub test: &'a ImageDataset,
    /// Output classes of the head (at least every label + 1).
    pub classes: usize,
}

/// How images are shown to an encoder: resized to `size`×`size`, then
/// normalised with `mean`/`std` (empty: not normalised).
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    /// Per-channel means.
    pub mean: &'a [f32],
    /// Per-channel standard deviations.
    pub std: &'a [f32],
    /// Side of the square inputs.
    pub size: usize,
}

/// Early stopping on a validation score: after every epoch, keeps a copy of
/// `vars` when the score is at least the best so far (a tie goes to the
/// later epoch, further down the schedule), says to stop once `patience`
/// epochs (0: never) have passed without one, and puts the kept epoch's
/// values back at the end.
pub struct EarlyStopping {
    vars: Vec<(String, candle_core::Var)>,
    patience: u64,
    best: Option<(f64, u64, Vec<candle_core::Tensor>)>,
}

impl EarlyStopping {
    /// Watches `vars` (everything the kept model is made of).
    pub fn new(vars: Vec<(String, candle_core::Var)>, patience: u64) -> Self {
        Self {
            vars,
            patience,
            best: None,
        }
    }

    /// Records `score` after `epoch` (1-based) completed epochs; true when
    /// training should stop.
    ///
    /// # Errors
    /// A tensor copy failed.
    pub fn epoch_end(&mut self, epoch: u64, score: f64) -> Result<bool> {
        if self.best.as_ref().is_none_or(|(b, _, _)| score >= *b) {
            let values = self
                .vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()
                .map_err(core_err)?;
            self.best = Some((score, epoch, values));
        }
        let since = epoch - self.best.as_ref().map_or(epoch, |b| b.1);
        Ok(self.patience > 0 && since >= self.patience)
    }

    /// What the log says when training stops after `epoch`.
    pub fn message(&self, epoch: u64) -> String {
        format!(
            "early stop after epoch {epoch}: no better validation accuracy for {} epochs",
            self.patience
        )
    }

    /// Puts the best epoch's values back; its score and epoch (`None`
    /// when no epoch was scored).
    ///
    /// # Errors
    /// A tensor could not be set.
    pub fn restore_best(self) -> Result<Option<(f64, u64)>> {
        let Some((score, epoch, values)) = self.best else {
            return Ok(None);
        };
        for ((_, v), t) in self.vars.iter().zip(&values) {
            v.set(t).map_err(core_err)?;
        }
        Ok(Some((score, epoch)))
    }
}

/// Accuracy of `encoder` + `head` on the labelled `ds` (eval mode).
fn accuracy_of(
    encoder: &dyn ImageEncoder,
    head: &pretext_core::nn::Linear,
    ds: &ImageDataset,
    view: &ImageView<'_>,
    device: &Device,
) -> Result<f64> {
    let labels = ds
        .labels
        .as_ref()
        .ok_or_else(|| Error::Invalid("accuracy needs labelled images".into()))?;
    let plain = eval_pipeline(view.mean, view.std, view.size)?;
    let per = ds.channels * view.size * view.size;
    let idx: Vec<usize> = (0..ds.len()).collect();
    let mut correct = 0usize;
    for chunk in idx.chunks(EXTRACT_CHUNK) {
        let x = eval_batch(&plain, ds, chunk, per, view.size, device)?;
        let logits = encoder
            .encode(&x, false)
            .and_then(|h| candle_nn::Module::forward(head, &h))
            .map_err(core_err)?;
        let pred = logits
            .argmax(D::Minus1)
            .and_then(|p| p.to_vec1::<u32>())
            .map_err(core_err)?;
        correct += pred.iter().zip(chunk).filter(|(p, &i)| **p == labels[i]).count();
    }
    Ok(correct as f64 / ds.len().max(1) as f64)
}

/// Trains `encoder` (in place) plus a new linear head on `data.train`, then
/// scores the test set. With `data.validation`, the validation accuracy is
/// measured after every epoch, training stops after `cfg.patience` epochs
/// without improvement, and the weights of the best epoch are kept (encoder
/// and head). `seed` fixes the head's initialisation, the data order and the
/// augmentations.
///
/// # Errors
/// Unlabelled data, an empty subset, tensor errors, a loss that is not finite.
pub fn train_classifier(
    encoder: &dyn ImageEncoder,
    data: &ClassifierData<'_>,
    view: &ImageView<'_>,
    cfg: &FineTuneConfig,
    seed: u64,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<FineTuned> {
    let (train, test) = (data.train, data.test);
    let (mean, std, size) = (view.mean, view.std, view.size);
    if train.labels.is_none() {
        return Err(Error::Invalid("fine-tuning needs labelled training images".into()));
    }
    if test.labels.is_none() {
        return Err(Error::Invalid("fine-tuning needs labelled test images".into()));
    }
    if train.is_empty() || test.is_empty() {
        return Err(Error::Invalid(
            "fine-tuning needs non-empty training and test sets".into(),
        ));
    }
    cfg.validate().map_err(|e| Error::Invalid(e.to_string()))?;
    let classes = data.classes;
    let n = train.len();
    let batch_size = cfg.batch_size.min((n / 4).max(1)).max(1);
    let augment = cfg.augment(mean.to_vec(), std.to_vec());
    let pipeline = Arc::new(Pipeline::new(augment, size, size).map_err(pretext_core::Error::from)?);
    let mut batcher = ImageBatcher::new(
        Arc::new(train.clone()),
        pipeline,
        BatcherConfig {
            batch_size,
            views: 1,
            seed,
            shuffle: true,
            drop_last: true,
            prefetch: 2,
        },
        device,
    )?;
    let spe = batcher.steps_per_epoch().max(1);
    let epochs = (cfg.budget_images.div_ceil(n) as u64).clamp(1, cfg.max_epochs.max(1));
    let total = epochs * spe;

    let head_vars = SeededVarMap::from_seed(seed, pretext_core::seed::EVAL);
    let head = pretext_core::nn::linear(
        encoder.feature_dim(),
        classes,
        true,
        head_vars.var_builder(DType::F32, device).pp("head"),
    )
    .map_err(core_err)?;
    let mut params = encoder.trainable();
    params.extend(head_vars.named_vars());
    let optim_cfg = OptimConfig {
        name: OptimKind::AdamW,
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        ..OptimConfig::default()
    };
    let mut optim = optim_cfg.build(params)?;
    let schedule = ScheduleConfig {
        kind: ScheduleKind::Cosine,
        warmup_steps: (cfg.warmup_fraction * total as f64).round() as u64,
        ..ScheduleConfig::default()
    };
    // what early stopping keeps: the encoder's state and the head
    let mut kept = encoder.state();
    kept.extend(head_vars.named_vars());
    let mut stopping = EarlyStopping::new(kept, cfg.patience);

    let start = Instant::now();
    observer.on_start(0, total);
    let mut epoch_loss = (0.0, 0u64);
    let mut final_loss = f64::NAN;
    let mut steps_run = total;
    for step in 0..total {
        let batch = batcher.batch(step)?;
        let labels = batch
            .labels
            .as_ref()
            .ok_or_else(|| Error::Invalid("the training batch carries no labels".into()))?;
        let feats = encoder.encode(&batch.views[0], true).map_err(core_err)?;
        let logits = candle_nn::Module::forward(&head, &feats).map_err(core_err)?;
        let loss = pretext_core::ops::cross_entropy(&logits, labels).map_err(core_err)?;
        let loss_v = f64::from(loss.to_scalar::<f32>().map_err(core_err)?);
        if !loss_v.is_finite() {
            return Err(Error::Invalid(format!(
                "fine-tuning diverged: loss {loss_v} at step {step}"
            )));
        }
        let grads = loss.backward().map_err(core_err)?;
        let lr = schedule.lr(step, total, cfg.lr);
        optim.step(&grads, lr)?;
        epoch_loss.0 += loss_v;
        epoch_loss.1 += 1;
        let epoch = step / spe;
        if (step + 1) % spe == 0 {
            final_loss = epoch_loss.0 / epoch_loss.1 as f64;
            epoch_loss = (0.0, 0);
        }
        let mut stats = vec![];
        let mut stop = false;
        if let (Some(val), true) = (data.validation, (step + 1) % spe == 0) {
            let acc = accuracy_of(encoder, &head, val, view, device)?;
            stats.push(("val_accuracy", acc));
            stop = stopping.epoch_end(epoch + 1, acc)?;
        }
        observer.on_step(&StepReport {
            step: step + 1,
            total_steps: total,
            epoch,
            loss: loss_v,
            lr,
            grad_norm: f64::NAN,
            stats,
            elapsed_s: start.elapsed().as_secs_f64(),
        });
        if stop {
            steps_run = step + 1;
            observer.on_message(&stopping.message(epoch + 1));
            break;
        }
    }
    observer.on_finish(steps_run);
    let train_seconds = start.elapsed().as_secs_f64();
    let kept = stopping.restore_best()?;
    let (validation_accuracy, best_epoch) = (kept.map(|k| k.0), kept.map(|k| k.1));
    let accuracy = accuracy_of(encoder, &head, test, view, device)?;
    let head = LinearHead::from_tensors(
        head.weight(),
        head.bias()
            .ok_or_else(|| Error::Invalid("the head has no bias".into()))?,
    )?;
    Ok(FineTuned {
        result: FineTuneResult {
            accuracy,
            n_train: n,
            n_test: test.len(),
            epochs: steps_run.div_ceil(spe),
            steps: steps_run,
            final_loss,
            train_seconds,
            n_validation: data.validation.map_or(0, ImageDataset::len),
            validation_accuracy,
            best_epoch,
        },
        head,
    })
}

/// A classifier on the frozen encoder: the linear probe (standardised
/// features, L2 chosen by cross-validation) fitted on `data.train`'s
/// features, folded into one linear layer on the raw features.
///
/// # Errors
/// Unlabelled data, tensor errors.
pub fn linear_classifier(
    encoder: &dyn ImageEncoder,
    data: &ClassifierData<'_>,
    view: &ImageView<'_>,
    probe: &crate::LinearProbeConfig,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<FineTuned> {
    let start = Instant::now();
    let feats = |ds: &ImageDataset, task: &str, observer: &mut dyn Observer| {
        let idx: Vec<usize> = (0..ds.len()).collect();
        crate::extract_features(
            encoder, ds, &idx, view.mean, view.std, view.size, device, observer, task,
        )
    };
    let tr = feats(data.train, "features: train", observer)?;
    let te = feats(data.test, "features: test", observer)?;
    let probe = crate::LinearProbe::fit(&tr, probe)?;
    let head = probe.as_linear(data.classes)?;
    let validation_accuracy = match data.validation {
        Some(v) => Some(probe.accuracy(&feats(v, "features: validation", observer)?)?),
        None => None,
    };
    Ok(FineTuned {
        result: FineTuneResult {
            accuracy: probe.accuracy(&te)?,
            n_train: data.train.len(),
            n_test: data.test.len(),
            epochs: 0,
            steps: probe.iterations as u64,
            final_loss: f64::NAN,
            train_seconds: start.elapsed().as_secs_f64(),
            n_validation: data.validation.map_or(0, ImageDataset::len),
            validation_accuracy,
            best_epoch: None,
        },
        head,
    })
}

/// Class probabilities `(n × classes)`, row-major, of every image of `ds`
/// under `encoder` + `head` (eval mode, no augmentation), with progress.
///
/// # Errors
/// Tensor errors.
pub fn classify_images(
    encoder: &dyn ImageEncoder,
    head: &LinearHead,
    ds: &ImageDataset,
    view: &ImageView<'_>,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<Vec<f32>> {
    let plain = eval_pipeline(view.mean, view.std, view.size)?;
    let per = ds.channels * view.size * view.size;
    let idx: Vec<usize> = (0..ds.len()).collect();
    let mut out = Vec::with_capacity(ds.len() * head.classes());
    let total = ds.len() as u64;
    observer.on_progress("predict", 0, total);
    for chunk in idx.chunks(EXTRACT_CHUNK) {
        let x = eval_batch(&plain, ds, chunk, per, view.size, device)?;
        let h = encoder.encode(&x, false).map_err(core_err)?;
        let p = head.probabilities(&h)?;
        out.extend(p.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(core_err)?);
        observer.on_progress("predict", (chunk[chunk.len() - 1] + 1) as u64, total);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each value that cannot work is refused with its key; the defaults
    /// and the edges of each range pass.
    #[test]
    fn validate_names_the_bad_key() {
        FineTuneConfig::default().validate().expect("the defaults are valid");
        let edges = FineTuneConfig {
            warmup_fraction: 0.99,
            weight_decay: 0.0,
            crop_scale: (1.0, 1.0),
            flip_p: 1.0,
            ..FineTuneConfig::default()
        };
        edges.validate().expect("the ranges' edges are valid");
        type Change = fn(&mut FineTuneConfig);
        let bad: [(&str, Change); 11] = [
            ("budget_images", |c| c.budget_images = 0),
            ("batch_size", |c| c.batch_size = 0),
            ("max_epochs", |c| c.max_epochs = 0),
            ("lr", |c| c.lr = 0.0),
            ("lr", |c| c.lr = f64::NAN),
            ("warmup_fraction", |c| c.warmup_fraction = 1.0),
            ("warmup_fraction", |c| c.warmup_fraction = -0.1),
            ("weight_decay", |c| c.weight_decay = -1e-4),
            ("crop_scale", |c| c.crop_scale = (0.8, 0.5)),
            ("crop_scale", |c| c.crop_scale = (0.0, 1.0)),
            ("flip_p", |c| c.flip_p = 1.5),
        ];
        for (key, set) in bad {
            let mut c = FineTuneConfig::default();
            set(&mut c);
            let err = c.validate().expect_err(key);
            assert_eq!(err.key, format!("eval.finetune.{key}"), "{err}");
        }
    }

    #[test]
    fn early_stopping_keeps_the_best_epoch_and_stops_after_patience() -> Result<()> {
        let v = candle_core::Var::new(&[0f32], &Device::Cpu).map_err(core_err)?;
        let mut s = EarlyStopping::new(vec![("w".into(), v.clone())], 2);
        let set = |x: f32| v.set(&candle_core::Tensor::new(&[x], &Device::Cpu)?);
        let mut stops = vec![];
        for (epoch, score) in [(1, 0.5), (2, 0.7), (3, 0.7), (4, 0.6), (5, 0.65)] {
            set(epoch as f32).map_err(core_err)?;
            stops.push(s.epoch_end(epoch, score)?);
        }
        assert_eq!(
            stops,
            vec![false, false, false, false, true],
            "the tie at epoch 3 counts, then two epochs without as good a score"
        );
        assert!(s.message(5).contains("for 2 epochs"));
        assert_eq!(s.restore_best()?, Some((0.7, 3)), "the later of the tied epochs");
        assert_eq!(
            v.as_tensor().to_vec1::<f32>().map_err(core_err)?,
            vec![3.0],
            "epoch 3's values are back"
        );
        let never = EarlyStopping::new(vec![], 0);
        assert_eq!(never.restore_best()?, None);
        Ok(())
    }
}
