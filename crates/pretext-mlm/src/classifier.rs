//! Text classification on the pretrained encoder, as Hugging Face's
//! `BertForSequenceClassification` computes it: the `[CLS]` hidden state
//! through the pooler (`bert.pooler.dense`, tanh), dropout, then
//! `classifier`; fine-tuned end to end (or, frozen, the pooler and
//! classifier alone), with early stopping on a validation split.

use crate::model::BertMlm;
use crate::tokenizer::WordPieceTokenizer;
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::Init;
use pretext_core::optim::{OptimConfig, OptimKind};
use pretext_core::schedule::{ScheduleConfig, ScheduleKind};
use pretext_core::trainer::{Method, Observer, StepReport};
use pretext_core::{nn, Error, Result, SeededVarMap};
use pretext_data::TextDataset;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Fine-tuning of a text classifier (`eval.finetune` of an MLM run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextFineTuneConfig {
    /// Most epochs over the labelled documents.
    pub epochs: u64,
    /// Documents per step.
    pub batch_size: usize,
    /// Peak learning rate (AdamW, linear warm-up then linear decay to 0).
    pub lr: f64,
    /// Decoupled weight decay (not on biases and LayerNorms).
    pub weight_decay: f64,
    /// Share of the steps spent warming up.
    pub warmup_ratio: f64,
    /// With a validation split the best epoch is kept (ties: the later);
    /// stop after this many epochs without as good a validation accuracy;
    /// 0 (the default) = run the whole schedule.
    pub patience: u64,
}

impl Default for TextFineTuneConfig {
    fn default() -> Self {
        Self {
            epochs: 20,
            batch_size: 16,
            lr: 1e-4,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            patience: 0,
        }
    }
}

impl TextFineTuneConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// The key of a value that cannot work.
    pub fn validate(&self) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        if self.epochs == 0 {
            return Err(InvalidSetting::value("eval.finetune.epochs", 0, "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(InvalidSetting::value(
                "eval.finetune.batch_size",
                0,
                "must be at least 1",
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(InvalidSetting::value("eval.finetune.lr", self.lr, "must be positive"));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(InvalidSetting::value(
                "eval.finetune.warmup_ratio",
                self.warmup_ratio,
                "must be in [0, 1)",
            ));
        }
        Ok(())
    }
}

/// The names of `BertForSequenceClassification`'s own tensors.
pub const POOLER: &str = "bert.pooler.dense";
/// See [`POOLER`].
pub const CLASSIFIER: &str = "classifier";

/// `BertForSequenceClassification`: the encoder of a [`BertMlm`] (its MLM
/// head unused), the pooler and a linear classifier.
pub struct BertClassifier {
    bert: BertMlm,
    head_vars: SeededVarMap,
    pooler: nn::Linear,
    classifier: nn::Linear,
    classes: usize,
}

impl BertClassifier {
    /// A classifier of `classes` classes on `bert`, the pooler and
    /// classifier initialised as Hugging Face does (normal(0,
    /// `initializer_range`), zero biases), seeded by `seed`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn new(bert: BertMlm, classes: usize, seed: u64) -> Result<Self> {
        let head_vars = SeededVarMap::from_seed(seed, "classifier-init");
        let vb = head_vars.var_builder(DType::F32, bert.device());
        let (h, std) = (bert.dims().hidden_size, bert.dims().initializer_range);
        let layer = |din: usize, dout: usize, name: &str| -> Result<nn::Linear> {
            let v = vb.pp(name);
            let w = v.get_with_hints((dout, din), "weight", Init::Randn { mean: 0.0, stdev: std })?;
            let b = v.get_with_hints(dout, "bias", Init::Const(0.0))?;
            Ok(nn::Linear::new(w, Some(b)))
        };
        let pooler = layer(h, h, POOLER)?;
        let classifier = layer(h, classes, CLASSIFIER)?;
        Ok(Self {
            bert,
            head_vars,
            pooler,
            classifier,
            classes,
        })
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The encoder.
    pub fn bert(&self) -> &BertMlm {
        &self.bert
    }

    /// Logits `(batch, classes)` of `(batch, seq)` ids under `mask`;
    /// `dropout_seed` = `Some(seed)` trains (dropout on), and `frozen_bert`
    /// runs the encoder in eval mode without a gradient.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn logits(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        dropout_seed: Option<u64>,
        frozen_bert: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.bert.dims().hidden_size;
        let bert_seed = if frozen_bert { None } else { dropout_seed };
        let mut hidden = self.bert.encode(ids, mask, bert_seed)?;
        if frozen_bert {
            hidden = hidden.detach();
        }
        let cls = hidden.reshape((b, t, h))?.i((.., 0, ..))?.contiguous()?;
        let pooled = candle_nn::Module::forward(&self.pooler, &cls)?.tanh()?;
        let pooled = match dropout_seed {
            Some(seed) if self.bert.dims().hidden_dropout_prob > 0.0 => pretext_core::ops::dropout(
                &pooled,
                self.bert.dims().hidden_dropout_prob,
                pretext_core::seed::splitmix64(seed ^ 0xC1A5_51F1),
            )?,
            _ => pooled,
        };
        candle_nn::Module::forward(&self.classifier, &pooled)
    }

    /// The parameters fine-tuning trains: the encoder's (its MLM head left
    /// out) unless `frozen_bert`, the pooler's and the classifier's.
    pub fn trainable(&self, frozen_bert: bool) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = if frozen_bert {
            vec![]
        } else {
            pretext_core::init::named_vars(self.bert.vars())
                .into_iter()
                .filter(|(n, _)| n.starts_with("bert."))
                .collect()
        };
        v.extend(self.head_vars.named_vars());
        v
    }

    /// Every tensor of `BertForSequenceClassification`'s state dict, by
    /// Hugging Face name, sorted.
    pub fn hf_tensors(&self) -> Vec<(String, Tensor)> {
        let mut t: Vec<(String, Tensor)> = self
            .trainable(false)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    }

    /// Loads `BertForSequenceClassification` weights (`path`, read as
    /// `found`) into a classifier on a fresh encoder of `bert`'s shape: every
    /// tensor must be there with its shape, none left over.
    ///
    /// # Errors
    /// Missing, unexpected or mis-shaped tensors, named with the file.
    pub fn load(bert: BertMlm, path: &Path, found: &HashMap<String, Tensor>) -> Result<Self> {
        let classes = found
            .get(&format!("{CLASSIFIER}.weight"))
            .map(|w| w.dims().first().copied().unwrap_or(0))
            .unwrap_or(0);
        let clf = Self::new(bert, classes.max(1), 0)?;
        let vars = clf.trainable(false);
        let expected = clf.hf_tensors();
        let matched = pretext_core::checkpoint::match_tensors(path, &expected, found)?;
        let by_name: HashMap<String, Var> = vars.into_iter().collect();
        for (name, t) in matched {
            if let Some(v) = by_name.get(&name) {
                v.set(&t)?;
            }
        }
        Ok(clf)
    }
}

/// `[CLS] doc [SEP]` ids of each document, cut at `max_len` tokens.
///
/// # Errors
/// Tokenizer errors.
pub fn classifier_sequences(tok: &WordPieceTokenizer, docs: &[String], max_len: usize) -> Result<Vec<Vec<u32>>> {
    let ids = tok.special_ids()?;
    Ok(tok
        .encode_all(docs)
        .map_err(|e| Error::Config(e.to_string()))?
        .into_iter()
        .map(|d| {
            let mut s = vec![ids.cls];
            s.extend(d.into_iter().take(max_len.saturating_sub(2)));
            s.push(ids.sep);
            s
        })
        .collect())
}

/// Padded ids and attention mask `(n, longest)` of `seqs`.
///
/// # Errors
/// Tensor errors.
pub fn padded(seqs: &[&Vec<u32>], pad: u32, device: &Device) -> Result<(Tensor, Tensor)> {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        flat.extend(s.iter().copied().chain(std::iter::repeat_n(pad, t - s.len())));
        mask.extend((0..t).map(|i| if i < s.len() { 1f32 } else { 0.0 }));
    }
    Ok((
        Tensor::from_vec(flat, (seqs.len(), t), device)?,
        Tensor::from_vec(mask, (seqs.len(), t), device)?,
    ))
}

/// Class probabilities `(n × classes)`, row-major, of every sequence (eval mode).
///
/// # Errors
/// Tensor errors.
pub fn probabilities(
    clf: &BertClassifier,
    seqs: &[Vec<u32>],
    pad: u32,
    observer: &mut dyn Observer,
    task: &str,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(seqs.len() * clf.classes());
    let n = seqs.len() as u64;
    observer.on_progress(task, 0, n);
    let chunk = 64;
    for (ci, c) in seqs.chunks(chunk).enumerate() {
        let refs: Vec<&Vec<u32>> = c.iter().collect();
        let (ids, mask) = padded(&refs, pad, clf.bert().device())?;
        let logits = clf.logits(&ids, &mask, None, false)?;
        let p = pretext_core::ops::softmax_last_dim(&logits)?;
        out.extend(p.flatten_all()?.to_vec1::<f32>()?);
        observer.on_progress(task, ((ci + 1) * chunk).min(seqs.len()) as u64, n);
    }
    Ok(out)
}

fn eval_err(e: pretext_eval::Error) -> Error {
    match e {
        pretext_eval::Error::Core(c) => c,
        other => Error::Config(other.to_string()),
    }
}

fn accuracy(probs: &[f32], classes: usize, labels: &[u32]) -> f64 {
    let correct = probs
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(p, &l)| (0..classes).max_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a))) == Some(l as usize))
        .count();
    correct as f64 / labels.len().max(1) as f64
}

/// The labelled documents of a fine-tuning run.
#[derive(Debug, Clone, Copy)]
pub struct TextClassifierData<'a> {
    /// Training documents.
    pub train: &'a TextDataset,
    /// Validation documents (early stopping, the epoch kept).
    pub validation: Option<&'a TextDataset>,
    /// Test documents.
    pub test: &'a TextDataset,
}

/// Fine-tunes `clf` in place on `data.train` (frozen: the encoder stays as
/// it is); with a validation split, keeps the best epoch and stops after
/// `cfg.patience` epochs without improvement. Returns what it measured.
///
/// # Errors
/// Unlabelled documents, tensor errors, divergence.
#[allow(clippy::too_many_arguments)]
pub fn fine_tune_text(
    clf: &BertClassifier,
    tok: &WordPieceTokenizer,
    data: &TextClassifierData<'_>,
    max_len: usize,
    cfg: &TextFineTuneConfig,
    frozen: bool,
    seed: u64,
    observer: &mut dyn Observer,
) -> Result<pretext_eval::FineTuneResult> {
    let labels_of = |d: &TextDataset, what: &str| -> Result<Vec<u32>> {
        d.labels
            .clone()
            .ok_or_else(|| Error::Data(format!("the {what} documents have no labels")))
    };
    let train_labels = labels_of(data.train, "training")?;
    let test_labels = labels_of(data.test, "test")?;
    if data.train.is_empty() || data.test.is_empty() {
        return Err(Error::Data("fine-tuning needs training and test documents".into()));
    }
    let pad = tok.special_ids()?.pad;
    let device = clf.bert().device().clone();
    let train = classifier_sequences(tok, &data.train.docs, max_len)?;
    let val = match data.validation {
        Some(v) => Some((
            classifier_sequences(tok, &v.docs, max_len)?,
            labels_of(v, "validation")?,
        )),
        None => None,
    };
    let n = train.len();
    let batch = cfg.batch_size.min(n).max(1);
    let spe = n.div_ceil(batch) as u64;
    let total = spe * cfg.epochs;
    let params = clf.trainable(frozen);
    let optim_cfg = OptimConfig {
        name: OptimKind::AdamW,
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        exclude_1d: true,
        ..OptimConfig::default()
    };
    let mut optim = optim_cfg.build(params.clone())?;
    let schedule = ScheduleConfig {
        kind: ScheduleKind::Linear,
        warmup_steps: (total as f64 * cfg.warmup_ratio).round() as u64,
        ..ScheduleConfig::default()
    };
    let mut stopping = pretext_eval::finetune::EarlyStopping::new(params.clone(), cfg.patience);
    let start = Instant::now();
    observer.on_start(0, total);
    let (mut final_loss, mut epoch_loss) = (f64::NAN, (0.0, 0u64));
    let mut steps_run = total;
    'epochs: for epoch in 0..cfg.epochs {
        let mut rng = pretext_core::seed::stream_rng(seed, "text-finetune-order", &[epoch]);
        let order = pretext_core::seed::permutation(n, &mut rng);
        for (k, chunk) in order.chunks(batch).enumerate() {
            let step = epoch * spe + k as u64;
            let seqs: Vec<&Vec<u32>> = chunk.iter().map(|&i| &train[i]).collect();
            let (ids, mask) = padded(&seqs, pad, &device)?;
            let y = Tensor::from_vec(
                chunk.iter().map(|&i| train_labels[i]).collect::<Vec<u32>>(),
                chunk.len(),
                &device,
            )?;
            let drop_seed = pretext_core::seed::derive_seed(seed, "text-finetune-dropout", &[step]);
            let logits = clf.logits(&ids, &mask, Some(drop_seed), frozen)?;
            let loss = pretext_core::ops::cross_entropy(&logits, &y)?;
            let loss_v = f64::from(loss.to_scalar::<f32>()?);
            if !loss_v.is_finite() {
                return Err(Error::NonFinite {
                    step,
                    what: "fine-tuning loss".into(),
                    value: loss_v.to_string(),
                });
            }
            let grads = loss.backward()?;
            let lr = schedule.lr(step, total, cfg.lr);
            optim.step(&grads, lr)?;
            epoch_loss.0 += loss_v;
            epoch_loss.1 += 1;
            let mut stats = vec![];
            let last_of_epoch = k as u64 + 1 == spe;
            let mut stop = false;
            if last_of_epoch {
                final_loss = epoch_loss.0 / epoch_loss.1.max(1) as f64;
                epoch_loss = (0.0, 0);
                if let Some((vs, vl)) = &val {
                    let acc = accuracy(
                        &probabilities(clf, vs, pad, &mut pretext_core::trainer::NullObserver, "")?,
                        clf.classes(),
                        vl,
                    );
                    stats.push(("val_accuracy", acc));
                    stop = stopping.epoch_end(epoch + 1, acc).map_err(eval_err)?;
                }
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
                break 'epochs;
            }
        }
    }
    observer.on_finish(steps_run);
    let train_seconds = start.elapsed().as_secs_f64();
    let kept = stopping.restore_best().map_err(eval_err)?;
    let (validation_accuracy, best_epoch) = (kept.map(|k| k.0), kept.map(|k| k.1));
    let test = classifier_sequences(tok, &data.test.docs, max_len)?;
    let probs = probabilities(clf, &test, pad, observer, "test")?;
    Ok(pretext_eval::FineTuneResult {
        accuracy: accuracy(&probs, clf.classes(), &test_labels),
        n_train: n,
        n_test: test.len(),
        epochs: steps_run.div_ceil(spe),
        steps: steps_run,
        final_loss,
        train_seconds,
        n_validation: data.validation.map_or(0, TextDataset::len),
        validation_accuracy,
        best_epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BertDims;

    fn dims() -> BertDims {
        BertDims {
            vocab_size: 30,
            hidden_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 16,
            max_position_embeddings: 12,
            type_vocab_size: 2,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            layer_norm_eps: 1e-12,
            initializer_range: 0.02,
            pad_token_id: 0,
        }
    }

    #[test]
    fn the_head_is_pooler_tanh_then_classifier_on_the_cls_state() -> Result<()> {
        let dev = Device::Cpu;
        let clf = BertClassifier::new(BertMlm::new(&dims(), 1, &dev)?, 3, 2)?;
        let ids = Tensor::new(&[[2u32, 7, 9, 3], [2, 5, 3, 0]], &dev)?;
        let mask = Tensor::new(&[[1f32, 1., 1., 1.], [1., 1., 1., 0.]], &dev)?;
        let got = clf.logits(&ids, &mask, None, false)?.to_vec2::<f32>()?;
        // by hand: [CLS] state -> tanh(W_p h + b_p) -> W_c p + b_c
        let h = clf
            .bert()
            .encode(&ids, &mask, None)?
            .reshape((2, 4, 8))?
            .i((.., 0, ..))?
            .to_vec2::<f32>()?;
        let named: HashMap<String, Tensor> = clf.hf_tensors().into_iter().collect();
        let get = |n: &str| named[n].to_vec2::<f32>();
        let (wp, wc) = (get("bert.pooler.dense.weight")?, get("classifier.weight")?);
        for r in 0..2 {
            let pooled: Vec<f32> = (0..8)
                .map(|i| (0..8).map(|j| wp[i][j] * h[r][j]).sum::<f32>().tanh())
                .collect();
            for k in 0..3 {
                let want: f32 = (0..8).map(|j| wc[k][j] * pooled[j]).sum();
                assert!(
                    (got[r][k] - want).abs() < 1e-5,
                    "row {r} class {k}: {} vs {want}",
                    got[r][k]
                );
            }
        }
        let names: Vec<&String> = named.keys().collect();
        assert!(
            names.iter().all(|n| !n.starts_with("cls.")),
            "no MLM head in a classifier: {names:?}"
        );
        assert!(named.contains_key("classifier.bias") && named.contains_key("bert.pooler.dense.bias"));
        Ok(())
    }

    #[test]
    fn a_classifier_round_trips_through_its_tensors_and_refuses_foreign_ones() -> Result<()> {
        let dev = Device::Cpu;
        let a = BertClassifier::new(BertMlm::new(&dims(), 1, &dev)?, 4, 2)?;
        let found: HashMap<String, Tensor> = a.hf_tensors().into_iter().collect();
        let b = BertClassifier::load(BertMlm::new(&dims(), 9, &dev)?, Path::new("m.safetensors"), &found)?;
        assert_eq!(b.classes(), 4);
        for ((n, x), (_, y)) in a.hf_tensors().iter().zip(b.hf_tensors()) {
            assert_eq!(
                x.flatten_all()?.to_vec1::<f32>()?,
                y.flatten_all()?.to_vec1::<f32>()?,
                "{n}"
            );
        }
        let mut extra = found.clone();
        extra.insert("cls.predictions.bias".into(), Tensor::zeros(30, DType::F32, &dev)?);
        let e = BertClassifier::load(BertMlm::new(&dims(), 9, &dev)?, Path::new("m.safetensors"), &extra)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unexpected") && e.contains("cls.predictions.bias"), "{e}");
        Ok(())
    }

    #[test]
    fn bad_fine_tuning_settings_name_their_key() {
        let bad = TextFineTuneConfig {
            warmup_ratio: 1.5,
            ..Default::default()
        };
        assert_eq!(
            bad.validate().map_err(|e| e.key),
            Err("eval.finetune.warmup_ratio".to_string())
        );
    }
}
