//! A trainable BERT encoder with the masked-language-modeling head, with
//! Hugging Face `BertForMaskedLM` parameter names.
//!
//! The MLM decoder is tied to the word embeddings: it *is* the embedding
//! tensor (one variable, one storage), as in Hugging Face, and its bias is
//! `cls.predictions.bias`. Dropout really drops in training (on the hidden
//! states after the embeddings, after each attention and feed-forward block,
//! and on the attention probabilities), with masks drawn from the step's
//! seeded stream so a resumed run drops the same units. The head is applied
//! only at the masked positions: the loss is the same as over all positions
//! with ignored labels, for a fraction of the decoder's cost.

use crate::collator::MlmBatch;
use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_nn::{Init, VarBuilder, VarMap};
use pretext_core::init::SeededVarMap;
use pretext_core::nn;
use pretext_core::ops::{attention, cross_entropy, dropout, gelu, linear, Attention};
use pretext_core::trainer::{Method, StepCx, StepOut};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The shape of a BERT model (the fields of Hugging Face's `BertConfig` that matter here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertDims {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (divides `hidden_size`).
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Longest sequence (position embeddings).
    pub max_position_embeddings: usize,
    /// Segment types (2, as in BERT; only type 0 is used).
    pub type_vocab_size: usize,
    /// Dropout on hidden states.
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    pub attention_probs_dropout_prob: f64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Standard deviation of the initial weights.
    pub initializer_range: f64,
    /// The `[PAD]` token id.
    pub pad_token_id: u32,
}

impl BertDims {
    /// Checks the shape.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> pretext_core::SettingResult {
        use pretext_core::InvalidSetting;
        // the config keys that set each dimension
        for (key, v) in [
            ("tokenizer.vocab_size", self.vocab_size),
            ("model.hidden", self.hidden_size),
            ("model.layers", self.num_hidden_layers),
            ("model.heads", self.num_attention_heads),
            ("model.intermediate", self.intermediate_size),
            ("model.max_position", self.max_position_embeddings),
            ("model.type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
                return Err(InvalidSetting::value(key, v, "must be > 0"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(InvalidSetting::value(
                "model.hidden",
                self.hidden_size,
                &format!("must be a multiple of model.heads = {}", self.num_attention_heads),
            ));
        }
        for (key, p) in [
            ("model.hidden_dropout", self.hidden_dropout_prob),
            ("model.attention_dropout", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(InvalidSetting::value(key, p, "must be in [0, 1)"));
            }
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1.0) {
            return Err(InvalidSetting::value(
                "model.layer_norm_eps",
                self.layer_norm_eps,
                "must be in (0, 1)",
            ));
        }
        Ok(())
    }

    /// Hugging Face's `config.json` for `BertForMaskedLM` with these dimensions.
    pub fn hf_config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["BertForMaskedLM"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "classifier_dropout": null,
            "use_cache": true,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
        })
    }

    /// Parameters of the model (embeddings counted once: the decoder is tied).
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let emb = (v + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h;
        let layer = 4 * (h * h + h) + 2 * (h * i) + i + h + 4 * h;
        let head = h * h + h + 2 * h + v;
        emb + self.num_hidden_layers * layer + head
    }
}

/// A BERT dense layer: weight `N(0, std²)`, bias 0, Hugging Face's names.
fn dense(din: usize, dout: usize, std: f64, vb: &VarBuilder) -> candle_core::Result<nn::Linear> {
    nn::linear_init(din, dout, Init::Randn { mean: 0.0, stdev: std }, Init::Const(0.0), vb)
}

#[derive(Debug, Clone)]
struct Layer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attn_out: nn::Linear,
    attn_norm: nn::LayerNorm,
    intermediate: nn::Linear,
    output: nn::Linear,
    out_norm: nn::LayerNorm,
}

/// Dropout seeds of one forward pass: a distinct stream per dropout site.
struct Drops {
    train: bool,
    hidden: f64,
    attention: f64,
    base: u64,
    next: u64,
}

impl Drops {
    fn seed(&mut self) -> u64 {
        self.next += 1;
        pretext_core::seed::splitmix64(self.base ^ self.next.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }

    fn apply(&mut self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        if !self.train || p <= 0.0 {
            return Ok(x.clone());
        }
        let seed = self.seed();
        dropout(x, p, seed)
    }

    /// The attention dropout rate and seed of the next layer (rate 0 in eval mode).
    fn attention(&mut self) -> (f64, u64) {
        if !self.train || self.attention <= 0.0 {
            return (0.0, 0);
        }
        (self.attention, self.seed())
    }
}

/// `BertForMaskedLM`: the encoder and the tied MLM head.
pub struct BertMlm {
    dims: BertDims,
    vars: SeededVarMap,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: nn::LayerNorm,
    layers: Vec<Layer>,
    head_dense: nn::Linear,
    head_norm: nn::LayerNorm,
    head_bias: Tensor,
    device: Device,
}

impl BertMlm {
    /// A model initialised like Hugging Face's (normal(0, `initializer_range`)
    /// weights and embeddings, zero biases, unit LayerNorms, a zero `[PAD]`
    /// embedding), seeded by `seed`.
    ///
    /// # Errors
    /// An invalid shape or a tensor error.
    pub fn new(dims: &BertDims, seed: u64, device: &Device) -> pretext_core::Result<Self> {
        dims.validate()?;
        let vars = SeededVarMap::from_seed(seed, "init");
        let vb = vars.var_builder(DType::F32, device);
        let std = dims.initializer_range;
        let normal = Init::Randn { mean: 0.0, stdev: std };
        let (h, eps) = (dims.hidden_size, dims.layer_norm_eps);
        let e = vb.pp("bert").pp("embeddings");
        let word = e
            .pp("word_embeddings")
            .get_with_hints((dims.vocab_size, h), "weight", normal)?;
        let position =
            e.pp("position_embeddings")
                .get_with_hints((dims.max_position_embeddings, h), "weight", normal)?;
        let token_type = e
            .pp("token_type_embeddings")
            .get_with_hints((dims.type_vocab_size, h), "weight", normal)?;
        let emb_norm = nn::LayerNorm::new(h, eps, &e.pp("LayerNorm"))?;
        let mut layers = Vec::new();
        for i in 0..dims.num_hidden_layers {
            let l = vb.pp("bert").pp("encoder").pp("layer").pp(i);
            let a = l.pp("attention");
            layers.push(Layer {
                query: dense(h, h, std, &a.pp("self").pp("query"))?,
                key: dense(h, h, std, &a.pp("self").pp("key"))?,
                value: dense(h, h, std, &a.pp("self").pp("value"))?,
                attn_out: dense(h, h, std, &a.pp("output").pp("dense"))?,
                attn_norm: nn::LayerNorm::new(h, eps, &a.pp("output").pp("LayerNorm"))?,
                intermediate: dense(h, dims.intermediate_size, std, &l.pp("intermediate").pp("dense"))?,
                output: dense(dims.intermediate_size, h, std, &l.pp("output").pp("dense"))?,
                out_norm: nn::LayerNorm::new(h, eps, &l.pp("output").pp("LayerNorm"))?,
            });
        }
        let p = vb.pp("cls").pp("predictions");
        let head_dense = dense(h, h, std, &p.pp("transform").pp("dense"))?;
        let head_norm = nn::LayerNorm::new(h, eps, &p.pp("transform").pp("LayerNorm"))?;
        let head_bias = p.get_with_hints(dims.vocab_size, "bias", Init::Const(0.0))?;
        let model = Self {
            dims: dims.clone(),
            vars,
            word,
            position,
            token_type,
            emb_norm,
            layers,
            head_dense,
            head_norm,
            head_bias,
            device: device.clone(),
        };
        model.zero_pad_embedding()?;
        Ok(model)
    }

    /// A copy with its own variables holding this model's weights (to
    /// fine-tune without touching the original).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn duplicate(&self) -> pretext_core::Result<Self> {
        let copy = Self::new(&self.dims, 0, &self.device)?;
        let mine: std::collections::HashMap<String, Var> = pretext_core::init::named_vars(self.vars.var_map())
            .into_iter()
            .collect();
        for (name, v) in pretext_core::init::named_vars(copy.vars.var_map()) {
            if let Some(src) = mine.get(&name) {
                v.set(&src.as_tensor().copy()?)?;
            }
        }
        Ok(copy)
    }

    fn zero_pad_embedding(&self) -> pretext_core::Result<()> {
        let pad = self.dims.pad_token_id as usize;
        if pad < self.dims.vocab_size {
            let map = self
                .vars
                .var_map()
                .data()
                .lock()
                .map_err(|_| pretext_core::Error::Config("variable store poisoned".into()))?;
            if let Some(v) = map.get("bert.embeddings.word_embeddings.weight") {
                let mut w = v.as_tensor().to_vec2::<f32>()?;
                w[pad].iter_mut().for_each(|x| *x = 0.0);
                v.set(&Tensor::new(w, &self.device)?)?;
            }
        }
        Ok(())
    }

    /// The model's dimensions.
    pub fn dims(&self) -> &BertDims {
        &self.dims
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The word embeddings, `(vocab, hidden)`.
    pub fn word_embeddings(&self) -> &Tensor {
        &self.word
    }

    /// The MLM decoder weight, `(vocab, hidden)`: the word embeddings themselves (tied).
    pub fn decoder_weight(&self) -> &Tensor {
        &self.word
    }

    /// Last hidden states, `(batch · seq, hidden)`, for `(batch, seq)` ids and
    /// a `(batch, seq)` attention mask (1 = token, 0 = padding). `dropout_seed`
    /// = `Some(seed)` runs in training mode (dropout on).
    ///
    /// # Errors
    /// Shapes that do not fit (a sequence longer than the position table).
    pub fn encode(&self, ids: &Tensor, mask: &Tensor, dropout_seed: Option<u64>) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.dims.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} tokens is longer than the model's {} positions",
                self.dims.max_position_embeddings
            );
        }
        let nh = self.dims.num_attention_heads;
        let mut drops = Drops {
            train: dropout_seed.is_some(),
            hidden: self.dims.hidden_dropout_prob,
            attention: self.dims.attention_probs_dropout_prob,
            base: dropout_seed.unwrap_or(0),
            next: 0,
        };
        let h = self.dims.hidden_size;
        let words = self.word.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, h))?;
        let pos = self.position.narrow(0, 0, t)?.unsqueeze(0)?;
        let typ = self.token_type.i(0)?.reshape((1, 1, h))?;
        let x = words.broadcast_add(&pos)?.broadcast_add(&typ)?.reshape((b * t, h))?;
        let hidden_p = drops.hidden;
        let mut x = drops.apply(&self.emb_norm.forward(&x)?, hidden_p)?;
        // additive key mask: 0 for tokens, a large negative number for padding
        let key_bias: Vec<f32> = mask
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|m| (m - 1.0) * 1e9)
            .collect();
        let key_bias = std::sync::Arc::new(key_bias);
        for l in &self.layers {
            let (p_attn, seed) = drops.attention();
            let op = Attention {
                batch: b,
                seq: t,
                heads: nh,
                key_bias: key_bias.clone(),
                dropout: p_attn,
                seed,
                precision: pretext_core::ops::bf16::Precision::current(),
            };
            let ctx = attention(&l.query.forward(&x)?, &l.key.forward(&x)?, &l.value.forward(&x)?, op)?;
            let a = drops.apply(&l.attn_out.forward(&ctx)?, hidden_p)?;
            x = l.attn_norm.forward(&(a + &x)?)?;
            let f = gelu(&l.intermediate.forward(&x)?)?;
            let f = drops.apply(&l.output.forward(&f)?, hidden_p)?;
            x = l.out_norm.forward(&(f + &x)?)?;
        }
        Ok(x)
    }

    /// MLM logits `(rows, vocab)` of hidden states `(rows, hidden)`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn mlm_logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let t = self.head_norm.forward(&gelu(&self.head_dense.forward(hidden)?)?)?;
        linear(&t, &self.word, &self.head_bias)
    }

    /// Logits at every position, `(batch, seq, vocab)`, in eval mode (what
    /// `BertForMaskedLM` returns).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.mlm_logits(&self.encode(ids, mask, None)?)?
            .reshape((b, t, self.dims.vocab_size))
    }

    /// Masked-LM loss (mean cross-entropy over the masked positions) and the
    /// number of correct argmax predictions there.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn mlm_loss(&self, batch: &MlmBatch, dropout_seed: Option<u64>) -> candle_core::Result<(Tensor, usize, usize)> {
        if batch.targets.dim(0)? == 0 {
            candle_core::bail!(
                "a batch without a token to predict: every token is special or [UNK] (is the tokenizer made for this text?)"
            );
        }
        let hidden = self.encode(&batch.input_ids, &batch.attention_mask, dropout_seed)?;
        let picked = hidden.index_select(&batch.positions, 0)?;
        let logits = self.mlm_logits(&picked)?;
        let loss = cross_entropy(&logits, &batch.targets)?;
        let pred = logits.argmax(D::Minus1)?;
        let correct = pred
            .eq(&batch.targets)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as usize;
        Ok((loss, correct, batch.targets.dim(0)?))
    }

    /// Mean of the last hidden states over the real tokens of each sequence
    /// (`[CLS]`/`[SEP]` included), `(batch, hidden)`; or the `[CLS]` state when `cls`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn sentence_features(&self, ids: &Tensor, mask: &Tensor, cls: bool) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.encode(ids, mask, None)?.reshape((b, t, self.dims.hidden_size))?;
        if cls {
            return h.i((.., 0, ..))?.contiguous();
        }
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let sum = h.broadcast_mul(&m)?.sum(1)?;
        sum.broadcast_div(&m.sum(1)?.clamp(1.0, f64::MAX)?)
    }
}

impl Method for BertMlm {
    type Batch = MlmBatch;

    fn vars(&self) -> &VarMap {
        self.vars.var_map()
    }

    fn step(&mut self, batch: &MlmBatch, cx: &StepCx) -> pretext_core::Result<StepOut> {
        let seed = pretext_core::seed::derive_seed(cx.seed, "dropout", &[cx.step]);
        // The loss is the mean over the whole batch's masked positions. In
        // one process that is this batch's mean (the scale below is 1);
        // data-parallel, this process's share is scaled so that the mean over
        // processes (what the trainer averages) is that mean: N · Σ_local / M.
        // A process whose rows hold none still runs the encoder (a zero loss
        // with a graph), so every process has the same gradients to average;
        // a whole batch without one is `mlm_loss`'s error.
        let total = batch.total_masked.max(1) as f64;
        let size = cx.shard.size as f64;
        let (loss, correct, n) = if batch.targets.dim(0)? == 0 && batch.total_masked > 0 {
            let hidden = self.encode(&batch.input_ids, &batch.attention_mask, Some(seed))?;
            ((hidden.sum_all()? * 0.0)?, 0, 0)
        } else {
            let (mean, correct, n) = self.mlm_loss(batch, Some(seed))?;
            ((mean * (size * n as f64 / total))?, correct, n)
        };
        Ok(StepOut {
            loss,
            stats: vec![
                ("masked_accuracy", size * correct as f64 / total),
                ("masked_tokens", size * n as f64),
            ],
        })
    }

    fn data_parallel(&self, _processes: usize) -> std::result::Result<(), String> {
        Ok(())
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("pretext.paradigm".into(), "mlm".into());
        m.insert("pretext.architecture".into(), "bert".into());
        m.insert(
            "pretext.bert".into(),
            serde_json::to_string(&self.dims).unwrap_or_default(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny_dims() -> BertDims {
        BertDims {
            vocab_size: 50,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            max_position_embeddings: 24,
            type_vocab_size: 2,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            layer_norm_eps: 1e-12,
            initializer_range: 0.02,
            pad_token_id: 0,
        }
    }

    /// Trains the tiny BERT (dropout on) for 4 steps of batch 8 on `ranks`
    /// threads as data-parallel ranks; what rank 0 ended with (every rank
    /// ends the same, or this fails).
    fn data_parallel(ranks: usize) -> pretext_core::dist::Fitted {
        use crate::collator::{MaskingConfig, MlmBatcher};
        use pretext_core::{OptimConfig, ScheduleConfig, TrainConfig, Trainer};
        let ids = crate::tokenizer::SpecialIds {
            pad: 0,
            cls: 2,
            sep: 3,
            mask: 4,
            first_regular: 5,
            vocab_size: 50,
        };
        // Sequences of different lengths, so batches are padded.
        let seqs: Vec<Vec<u32>> = (0..24u32)
            .map(|i| {
                let len = 6 + (i as usize * 7) % 12;
                std::iter::once(2)
                    .chain((0..len as u32).map(|j| 5 + (i * 13 + j * 7) % 45))
                    .chain(std::iter::once(3))
                    .collect()
            })
            .collect();
        let seqs = std::sync::Arc::new(seqs);
        pretext_core::dist::LocalGroup::fit(ranks, || {
            let model = BertMlm::new(&tiny_dims(), 1, &Device::Cpu)?;
            let train = TrainConfig {
                max_steps: 4,
                batch_size: 8,
                seed: 5,
                ..TrainConfig::default()
            };
            let optim = OptimConfig {
                name: pretext_core::OptimKind::Sgd,
                lr: 0.5,
                momentum: 0.9,
                ..OptimConfig::default()
            };
            let trainer = Trainer::new(model, &optim, &ScheduleConfig::default(), &train)?;
            let data = MlmBatcher::new(seqs.clone(), 8, 5, MaskingConfig::default(), ids, &Device::Cpu);
            Ok((trainer, data))
        })
        .expect("data-parallel training")
    }

    #[test]
    fn data_parallel_ranks_train_bert_as_one_process_does() {
        let one = data_parallel(1);
        let l1 = &one.losses;
        for ranks in [2, 4] {
            let wn = data_parallel(ranks);
            let ln = &wn.losses;
            for (a, b) in l1.iter().zip(ln) {
                assert!((a - b).abs() <= 1e-5 * a.abs(), "{ranks} ranks: {ln:?} vs {l1:?}");
            }
            let worst = one.gap(&wn);
            assert!(worst < 1e-5, "{ranks} ranks: weights differ by {worst}");
        }
    }

    #[test]
    fn parameter_count_matches_the_variables() -> pretext_core::Result<()> {
        let d = tiny_dims();
        let m = BertMlm::new(&d, 0, &Device::Cpu)?;
        let n: usize = m.vars().all_vars().iter().map(|v| v.elem_count()).sum();
        assert_eq!(n, d.parameter_count());
        // HF's BERT-mini of the reference: 5.32 M parameters
        let mini = BertDims {
            vocab_size: 8000,
            hidden_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            intermediate_size: 1024,
            max_position_embeddings: 128,
            ..d
        };
        assert!(
            (mini.parameter_count() as f64 / 1e6 - 5.32).abs() < 0.01,
            "{}",
            mini.parameter_count()
        );
        Ok(())
    }

    #[test]
    fn decoder_is_the_embedding_storage() -> pretext_core::Result<()> {
        let m = BertMlm::new(&tiny_dims(), 0, &Device::Cpu)?;
        assert_eq!(m.decoder_weight().id(), m.word_embeddings().id());
        let names: Vec<String> = pretext_core::init::named_vars(m.vars())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(names.iter().all(|n| !n.contains("decoder")), "{names:?}");
        // a change to the embedding variable is seen by the decoder
        let map = m.vars().data().lock().expect("lock");
        let v = map
            .get("bert.embeddings.word_embeddings.weight")
            .expect("word embeddings");
        v.set(&v.as_tensor().ones_like()?)?;
        drop(map);
        let s = m.decoder_weight().sum_all()?.to_scalar::<f32>()?;
        assert_eq!(s, (50 * 16) as f32);
        Ok(())
    }

    #[test]
    fn padding_does_not_change_the_outputs_of_real_tokens() -> pretext_core::Result<()> {
        let m = BertMlm::new(&tiny_dims(), 3, &Device::Cpu)?;
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[2u32, 7, 9, 11, 3]], &dev)?;
        let mask = Tensor::ones((1, 5), DType::F32, &dev)?;
        let short = m.encode(&ids, &mask, None)?;
        let padded_ids = Tensor::new(&[[2u32, 7, 9, 11, 3, 0, 0, 0]], &dev)?;
        let padded_mask = Tensor::new(&[[1f32, 1., 1., 1., 1., 0., 0., 0.]], &dev)?;
        let long = m.encode(&padded_ids, &padded_mask, None)?.narrow(0, 0, 5)?;
        let d = (short - long)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "padding changed real outputs by {d}");
        // and the mean-pooled features ignore padding too
        let a = m.sentence_features(&ids, &mask, false)?;
        let b = m.sentence_features(&padded_ids, &padded_mask, false)?;
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn dropout_is_active_in_training_only_and_seeded() -> pretext_core::Result<()> {
        let m = BertMlm::new(&tiny_dims(), 1, &Device::Cpu)?;
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[2u32, 7, 9, 11, 3]], &dev)?;
        let mask = Tensor::ones((1, 5), DType::F32, &dev)?;
        let diff = |a: &Tensor, b: &Tensor| -> pretext_core::Result<f32> {
            Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
        };
        let e1 = m.encode(&ids, &mask, None)?;
        let e2 = m.encode(&ids, &mask, None)?;
        assert_eq!(diff(&e1, &e2)?, 0.0);
        let t1 = m.encode(&ids, &mask, Some(5))?;
        let t2 = m.encode(&ids, &mask, Some(5))?;
        let t3 = m.encode(&ids, &mask, Some(6))?;
        assert_eq!(diff(&t1, &t2)?, 0.0, "same seed, same masks");
        assert!(diff(&t1, &t3)? > 1e-3, "another seed drops other units");
        assert!(diff(&t1, &e1)? > 1e-3, "training mode drops units");
        Ok(())
    }

    #[test]
    fn loss_gradient_matches_finite_differences() -> pretext_core::Result<()> {
        let mut d = tiny_dims();
        d.hidden_dropout_prob = 0.0;
        d.attention_probs_dropout_prob = 0.0;
        d.initializer_range = 0.5;
        let m = BertMlm::new(&d, 2, &Device::Cpu)?;
        let dev = Device::Cpu;
        let batch = MlmBatch {
            input_ids: Tensor::new(&[[2u32, 4, 9, 11, 3, 0], [2, 8, 4, 4, 6, 3]], &dev)?,
            attention_mask: Tensor::new(&[[1f32, 1., 1., 1., 1., 0.], [1., 1., 1., 1., 1., 1.]], &dev)?,
            positions: Tensor::new(&[1u32, 8, 9], &dev)?,
            targets: Tensor::new(&[13u32, 21, 40], &dev)?,
            total_masked: 3,
        };
        let (loss, _, _) = m.mlm_loss(&batch, None)?;
        let grads = loss.backward()?;
        let vars = pretext_core::init::named_vars(m.vars());
        let mut checked = 0;
        for (name, v) in &vars {
            let g = grads.get(v.as_tensor()).expect("every parameter gets a gradient");
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            if name.ends_with("attention.self.key.bias") {
                // Adding b to every key adds q·b to a whole row of scores,
                // which softmax ignores: the gradient is zero in exact
                // arithmetic, and a finite difference of it measures only the
                // f32 rounding of the loss (~1e-4 at this step size).
                let largest = g.iter().fold(0f32, |a, x| a.max(x.abs()));
                assert!(largest < 1e-4, "{name}: gradient {largest}, not ~0");
                checked += 1;
                continue;
            }
            let w0 = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            // probe the entry with the largest gradient of each parameter
            let (i, _) = g
                .iter()
                .enumerate()
                .fold((0, 0f32), |a, (i, &x)| if x.abs() > a.1 { (i, x.abs()) } else { a });
            let h = 1e-2f32;
            let eval = |delta: f32| -> pretext_core::Result<f64> {
                let mut w = w0.clone();
                w[i] += delta;
                v.set(&Tensor::from_vec(w, v.shape(), &dev)?)?;
                let (l, _, _) = m.mlm_loss(&batch, None)?;
                Ok(f64::from(l.to_scalar::<f32>()?))
            };
            let fd = (eval(h)? - eval(-h)?) / (2.0 * f64::from(h));
            v.set(&Tensor::from_vec(w0.clone(), v.shape(), &dev)?)?;
            let an = f64::from(g[i]);
            assert!(
                (fd - an).abs() <= 2e-2 * an.abs().max(1e-2),
                "{name}[{i}]: finite difference {fd} vs backward {an}"
            );
            checked += 1;
        }
        assert_eq!(checked, d.parameter_count().min(vars.len()));
        Ok(())
    }
}
