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
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Area range of the random resized crop.
    pub crop_scale: (f64, f64),
    /// Horizontal flip probability.
    pub flip_p: f64,
}

impl Default for FineTuneConfig {
    fn default() -> Self {
        Self {
            budget_images: 60_000,
            max_epochs: 200,
            batch_size: 64,
            lr: 1e-3,
            weight_decay: 5e-4,
            crop_scale: (0.5, 1.0),
            flip_p: 0.5,
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
    let train_labels = train
        .labels
        .as_ref()
        .ok_or_else(|| Error::Invalid("fine-tuning needs labelled training images".into()))?;
    let test_labels = test
        .labels
        .as_ref()
        .ok_or_else(|| Error::Invalid("fine-tuning needs labelled test images".into()))?;
    if train.is_empty() || test.is_empty() {
        return Err(Error::Invalid(
            "fine-tuning needs non-empty training and test sets".into(),
        ));
    }
    let classes = train_labels
        .iter()
        .chain(test_labels)
        .max()
        .map_or(0, |m| *m as usize + 1);
    let n = train.len();
    let batch_size = cfg.batch_size.min((n / 4).max(1)).max(1);
    let augment = AugmentConfig {
        crop: true,
        crop_scale: cfg.crop_scale,
        flip_p: cfg.flip_p,
        ..AugmentConfig::none(mean.to_vec(), std.to_vec())
    };
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
        ..ScheduleConfig::default()
    };

    let start = Instant::now();
    observer.on_start(0, total);
    let mut epoch_loss = (0.0, 0u64);
    let mut final_loss = f64::NAN;
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
        observer.on_step(&StepReport {
            step: step + 1,
            total_steps: total,
            epoch,
            loss: loss_v,
            lr,
            grad_norm: f64::NAN,
            stats: vec![],
            elapsed_s: start.elapsed().as_secs_f64(),
        });
    }
    observer.on_finish(total);
    let train_seconds = start.elapsed().as_secs_f64();

    let plain = eval_pipeline(mean, std, size)?;
    let per = test.channels * size * size;
    let idx: Vec<usize> = (0..test.len()).collect();
    let mut correct = 0usize;
    for chunk in idx.chunks(EXTRACT_CHUNK) {
        let x = eval_batch(&plain, test, chunk, per, size, device)?;
        let logits = encoder
            .encode(&x, false)
            .and_then(|h| candle_nn::Module::forward(&head, &h))
            .map_err(core_err)?;
        let pred = logits
            .argmax(D::Minus1)
            .and_then(|p| p.to_vec1::<u32>())
            .map_err(core_err)?;
        correct += pred.iter().zip(chunk).filter(|(p, &i)| **p == test_labels[i]).count();
    }
    Ok(FineTuneResult {
        accuracy: correct as f64 / test.len() as f64,
        n_train: n,
        n_test: test.len(),
        epochs,
        steps: total,
        final_loss,
        train_seconds,
    })
}
