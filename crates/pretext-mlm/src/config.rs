//! The config of an MLM run (`config.toml` of its run folder).

use crate::collator::{MaskingConfig, Packing};
use crate::model::BertDims;
use pretext_core::{InvalidSetting, OptimConfig, ScheduleConfig, SettingResult, TrainConfig};
use pretext_data::source::TextFormat;
use serde::{Deserialize, Serialize};

/// The built-in default: BERT on the shipped fortunes.
pub const DEFAULT_CONFIG: &str = include_str!("../configs/mlm-fortunes.toml");

/// The model (`model`): a size preset, any field of which can be set explicitly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `tiny` (2 layers × 128), `mini` (4 × 256), `small` (4 × 512), `medium` (8 × 512) or `custom`.
    pub size: String,
    /// Hidden width (0 = the preset's).
    pub hidden: usize,
    /// Layers (0 = the preset's).
    pub layers: usize,
    /// Attention heads (0 = the preset's: hidden / 64).
    pub heads: usize,
    /// Feed-forward width (0 = 4 × hidden).
    pub intermediate: usize,
    /// Position embeddings: the longest sequence the model takes.
    pub max_position: usize,
    /// Dropout on hidden states.
    pub hidden_dropout: f64,
    /// Dropout on attention probabilities.
    pub attention_dropout: f64,
    /// Token-type (segment) embeddings.
    pub type_vocab_size: usize,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            size: "tiny".into(),
            hidden: 0,
            layers: 0,
            heads: 0,
            intermediate: 0,
            max_position: 128,
            hidden_dropout: 0.1,
            attention_dropout: 0.1,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        }
    }
}

impl ModelConfig {
    /// The model's dimensions for a vocabulary of `vocab_size` tokens.
    ///
    /// # Errors
    /// An unknown preset or inconsistent sizes, naming the key.
    pub fn dims(&self, vocab_size: usize) -> Result<BertDims, InvalidSetting> {
        let (h, l) = match self.size.as_str() {
            "tiny" => (128, 2),
            "mini" => (256, 4),
            "small" => (512, 4),
            "medium" => (512, 8),
            "custom" => (0, 0),
            other => {
                return Err(InvalidSetting::value(
                    "model.size",
                    format!("{other:?}"),
                    "must be tiny, mini, small, medium or custom",
                ))
            }
        };
        let hidden = if self.hidden > 0 { self.hidden } else { h };
        let layers = if self.layers > 0 { self.layers } else { l };
        if hidden == 0 || layers == 0 {
            return Err(InvalidSetting::new(
                "model.size",
                "\"custom\" needs model.hidden and model.layers",
            ));
        }
        let heads = if self.heads > 0 {
            self.heads
        } else {
            (hidden / 64).max(1)
        };
        let d = BertDims {
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: if self.intermediate > 0 {
                self.intermediate
            } else {
                4 * hidden
            },
            max_position_embeddings: self.max_position,
            type_vocab_size: self.type_vocab_size,
            hidden_dropout_prob: self.hidden_dropout,
            attention_probs_dropout_prob: self.attention_dropout,
            layer_norm_eps: self.layer_norm_eps,
            initializer_range: 0.02,
            pad_token_id: 0,
        };
        d.validate()?;
        Ok(d)
    }
}

/// The tokenizer (`tokenizer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// An existing `tokenizer.json` to use; empty = train one on the pretraining corpus.
    pub path: String,
    /// Vocabulary size of a trained tokenizer (special tokens included).
    pub vocab_size: usize,
    /// Pieces seen fewer times are left out of a trained vocabulary.
    pub min_frequency: u64,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            vocab_size: 8000,
            min_frequency: 2,
        }
    }
}

/// The text (`data`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Fortune files (a folder or one file), `.txt`, `.jsonl` or `.parquet`; empty = the shipped fortunes.
    pub path: String,
    /// Reader; `auto` detects it.
    pub format: TextFormat,
    /// JSONL field / Parquet column of the text.
    pub text_field: String,
    /// JSONL field / Parquet column of the label, where the records have one
    /// (it defines the probe task; pretraining ignores it). A table without
    /// it is unlabelled.
    pub label_field: String,
    /// Categories of the probe task (fortune file names or label values);
    /// empty = the 8 default categories for the shipped fortunes, every
    /// label for other labelled data.
    pub probe_categories: Vec<String>,
    /// Tokens per training sequence, `[CLS]` and `[SEP]` included.
    pub seq_len: usize,
    /// `pack` (documents concatenated and cut) or `truncate` (one document per sequence).
    pub packing: Packing,
    /// Fraction of the pretraining documents held out for masked-token accuracy.
    pub held_out: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            format: TextFormat::Auto,
            text_field: "text".into(),
            label_field: "label".into(),
            probe_categories: Vec::new(),
            seq_len: 128,
            packing: Packing::Pack,
            held_out: 0.05,
        }
    }
}

/// How features are pooled for the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean of the last hidden states over the real tokens.
    Mean,
    /// The last hidden state of `[CLS]`.
    Cls,
}

/// Monitoring and evaluation (`eval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Held-out masked-token accuracy and perplexity every N steps (and at the end); 0 = only at the end.
    pub every_steps: u64,
    /// Held-out sequences used by the periodic evaluation (0 = all).
    pub held_out_sequences: usize,
    /// Feature pooling of the probe.
    pub pooling: Pooling,
    /// Tokens per probe document (truncated), `[CLS]`/`[SEP]` included.
    pub max_len: usize,
    /// kNN neighbours.
    pub knn_k: usize,
    /// kNN vote temperature.
    pub knn_temperature: f32,
    /// `finetune`'s recipe for a text classifier.
    pub finetune: crate::classifier::TextFineTuneConfig,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every_steps: 500,
            held_out_sequences: 0,
            pooling: Pooling::Mean,
            max_len: 128,
            knn_k: 20,
            knn_temperature: 0.07,
            finetune: crate::classifier::TextFineTuneConfig::default(),
        }
    }
}

/// A whole MLM run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MlmConfig {
    /// `bert-mlm`.
    pub method: String,
    /// The model.
    pub model: ModelConfig,
    /// The tokenizer.
    pub tokenizer: TokenizerConfig,
    /// The masking recipe.
    pub masking: MaskingConfig,
    /// The optimizer (AdamW; 1-D parameters, i.e. biases and LayerNorms, get no weight decay).
    pub optim: OptimConfig,
    /// The learning-rate schedule.
    pub schedule: ScheduleConfig,
    /// The text.
    pub data: DataConfig,
    /// The loop.
    pub train: TrainConfig,
    /// Monitoring and evaluation.
    pub eval: EvalConfig,
}

impl Default for MlmConfig {
    fn default() -> Self {
        Self {
            method: "bert-mlm".into(),
            model: ModelConfig::default(),
            tokenizer: TokenizerConfig::default(),
            masking: MaskingConfig::default(),
            optim: OptimConfig {
                weight_decay: 0.01,
                ..OptimConfig::default()
            },
            schedule: ScheduleConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl DataConfig {
    /// The fields (JSONL) or columns (Parquet) the text is read from.
    pub fn fields(&self) -> pretext_data::text::TextFields<'_> {
        pretext_data::text::TextFields::new(&self.text_field, &self.label_field)
    }
}

impl MlmConfig {
    /// Checks every section.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> SettingResult {
        if self.method != "bert-mlm" {
            return Err(InvalidSetting::value(
                "method",
                format!("{:?}", self.method),
                "must be \"bert-mlm\"",
            ));
        }
        self.optim.validate()?;
        self.schedule.validate()?;
        self.train.validate()?;
        self.masking.validate()?;
        self.eval.finetune.validate()?;
        self.model.dims(self.tokenizer.vocab_size.max(64))?;
        let positions = format!("must be in [3, model.max_position = {}]", self.model.max_position);
        for (key, len) in [("data.seq_len", self.data.seq_len), ("eval.max_len", self.eval.max_len)] {
            if len < 3 || len > self.model.max_position {
                return Err(InvalidSetting::value(key, len, &positions));
            }
        }
        if !(self.data.held_out > 0.0 && self.data.held_out < 1.0) {
            return Err(InvalidSetting::value(
                "data.held_out",
                self.data.held_out,
                "must be in (0, 1)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_bad_keys() {
        let mut m = ModelConfig {
            size: "mini".into(),
            ..Default::default()
        };
        let d = m.dims(8000).expect("mini");
        assert_eq!(
            (
                d.hidden_size,
                d.num_hidden_layers,
                d.num_attention_heads,
                d.intermediate_size
            ),
            (256, 4, 4, 1024)
        );
        m.size = "huge".into();
        assert_eq!(m.dims(8000).unwrap_err().key, "model.size");
        m.size = "custom".into();
        assert!(m.dims(8000).is_err());
        m.hidden = 96;
        m.layers = 1;
        m.heads = 5;
        let e = m.dims(8000).unwrap_err();
        assert_eq!(e.key, "model.hidden");
        assert!(e.reason.contains("multiple of model.heads = 5"), "{e}");
    }
}
