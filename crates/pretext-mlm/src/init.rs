//! Starting from existing weights (`--init`): a Hugging Face BERT folder
//! (`config.json` + `model.safetensors`, the tensors of `BertModel` or
//! `BertForMaskedLM`, with or without the `bert.` prefix), pretext's own MLM
//! export being one. Its tokenizer (`tokenizer.json`, else `vocab.txt`) is
//! used instead of training one; its dimensions become the config's; a
//! missing MLM head starts freshly initialised, and the run says so.

use crate::error::{Error, Result};
use crate::tokenizer::WordPieceTokenizer;
use candle_core::Device;
use pretext_core::paradigm::InitSpec;
use pretext_core::warm_start::{safetensors_weights, InitialWeights};
use std::path::Path;

fn data_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Data(pretext_data::Error::format(path, reason))
}

/// The source folder's `config.json`, which must describe a BERT.
fn bert_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    if !dir.is_dir() {
        return Err(data_err(
            dir,
            "not a folder: a BERT source is a folder with config.json and model.safetensors (or hub:owner/name)",
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| {
        data_err(
            &path,
            format!("cannot read it ({e}): a Hugging Face BERT folder has a config.json"),
        )
    })?;
    let c: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| data_err(&path, format!("not JSON ({e})")))?;
    let model_type = c["model_type"].as_str().unwrap_or_default();
    if model_type != "bert" {
        return Err(data_err(
            &path,
            format!("model_type {model_type:?}: pretext-mlm starts from BERT models (model_type \"bert\")"),
        ));
    }
    for (key, want) in [("hidden_act", "gelu"), ("position_embedding_type", "absolute")] {
        match c[key].as_str() {
            None => {}
            Some(v) if v == want => {}
            Some(v) => return Err(data_err(&path, format!("{key} {v:?}: pretext's BERT has {want:?}"))),
        }
    }
    Ok(c)
}

/// The settings of a BERT `config.json`: the model's dimensions (and
/// shorter sequences where the model's positions are fewer than 128).
///
/// # Errors
/// Not a BERT folder, named.
pub fn init_settings(spec: &InitSpec) -> Result<Vec<String>> {
    let c = bert_config(&spec.path)?;
    let mut s = vec!["model.size=\"custom\"".to_string()];
    for (key, hf) in [
        ("hidden", "hidden_size"),
        ("layers", "num_hidden_layers"),
        ("heads", "num_attention_heads"),
        ("intermediate", "intermediate_size"),
        ("max_position", "max_position_embeddings"),
        ("type_vocab_size", "type_vocab_size"),
    ] {
        if let Some(v) = c[hf].as_u64() {
            s.push(format!("model.{key}={v}"));
        }
    }
    for (key, hf) in [
        ("hidden_dropout", "hidden_dropout_prob"),
        ("attention_dropout", "attention_probs_dropout_prob"),
        ("layer_norm_eps", "layer_norm_eps"),
    ] {
        if let Some(v) = c[hf].as_f64() {
            s.push(format!("model.{key}={v:?}"));
        }
    }
    if let Some(p) = c["max_position_embeddings"].as_u64().filter(|&p| p < 128) {
        s.push(format!("data.seq_len={p}"));
        s.push(format!("eval.max_len={p}"));
    }
    Ok(s)
}

/// The tokenizer of a BERT folder: `tokenizer.json`, else `vocab.txt`
/// (lowercased unless `tokenizer_config.json` says `do_lower_case: false`).
///
/// # Errors
/// Neither file, or an unreadable one, named.
pub fn source_tokenizer(dir: &Path) -> Result<WordPieceTokenizer> {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        return Ok(WordPieceTokenizer::from_file(&json)?);
    }
    let vocab = dir.join("vocab.txt");
    if vocab.is_file() {
        let lower = std::fs::read(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|c| c["do_lower_case"].as_bool())
            .unwrap_or(true);
        return Ok(WordPieceTokenizer::from_vocab(&vocab, lower)?);
    }
    Err(data_err(
        dir,
        "no tokenizer.json or vocab.txt: the model's vocabulary is needed to read text with its embeddings",
    ))
}

/// The weights of a BERT folder under `BertForMaskedLM`'s names: a
/// `BertModel`'s gain the `bert.` prefix; the decoder's tied copies are set
/// aside (the model ties them to the word embeddings and `cls.predictions.bias`).
///
/// # Errors
/// Not a BERT folder; no weights; no tokenizer.
pub fn initial_weights(spec: &InitSpec, device: &Device) -> Result<(InitialWeights, WordPieceTokenizer)> {
    bert_config(&spec.path)?;
    let mut w = safetensors_weights(&spec.path.join("model.safetensors"), &spec.source, device)?;
    let tok = source_tokenizer(&spec.path)?;
    let mut tensors = std::collections::HashMap::new();
    let mut skipped = Vec::new();
    let has_bias = w.tensors.contains_key("cls.predictions.bias");
    for (name, t) in std::mem::take(&mut w.tensors) {
        let name = if name.starts_with("bert.") || name.starts_with("cls.") {
            name
        } else {
            format!("bert.{name}")
        };
        match name.as_str() {
            "cls.predictions.decoder.weight" => {
                skipped.push((name, "tied to bert.embeddings.word_embeddings.weight".to_string()))
            }
            "cls.predictions.decoder.bias" if has_bias => {
                skipped.push((name, "tied to cls.predictions.bias".to_string()))
            }
            "cls.predictions.decoder.bias" => {
                tensors.insert("cls.predictions.bias".to_string(), t);
            }
            "bert.embeddings.position_ids" => skipped.push((name, "a buffer the model recomputes".to_string())),
            n if n.starts_with("bert.pooler.") => skipped.push((
                name,
                "BertModel's pooler: masked-LM pretraining has none, a classifier gets a fresh one".to_string(),
            )),
            _ => {
                tensors.insert(name, t);
            }
        }
    }
    w.tensors = tensors;
    w.skipped = skipped;
    Ok((w, tok))
}
