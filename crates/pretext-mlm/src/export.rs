//! The Hugging Face layout of a trained run: `config.json` and
//! `model.safetensors` as `BertForMaskedLM` saves them, the tokenizer
//! (`tokenizer.json`, `vocab.txt`, `tokenizer_config.json`,
//! `special_tokens_map.json`) and a model card.

use crate::app::Mlm;
use crate::config::MlmConfig;
use crate::error::Result;
use crate::model::BertMlm;
use candle_core::Tensor;
use pretext_core::paradigm::Paradigm;
use pretext_core::paradigm::Trained;
use pretext_core::Error;

/// Every tensor of `BertForMaskedLM`'s state dict, by Hugging Face name. The
/// tied `cls.predictions.decoder.weight` / `.bias` are written too (copies of
/// the word embeddings and of `cls.predictions.bias`), so loaders that do not
/// tie weights (candle-transformers) find them.
pub fn hf_tensors(model: &BertMlm) -> Vec<(String, Tensor)> {
    let mut t = pretext_core::trainer::model_tensors(model);
    let find = |name: &str, t: &[(String, Tensor)]| t.iter().find(|(n, _)| n == name).map(|(_, x)| x.clone());
    if let Some(w) = find("bert.embeddings.word_embeddings.weight", &t) {
        t.push(("cls.predictions.decoder.weight".into(), w));
    }
    if let Some(b) = find("cls.predictions.bias", &t) {
        t.push(("cls.predictions.decoder.bias".into(), b));
    }
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn card(
    cfg: &MlmConfig,
    model: &BertMlm,
    steps: u64,
    report: Option<&pretext_eval::EvalReport>,
    masked: Option<&serde_json::Value>,
    config_toml: &str,
) -> String {
    let d = model.dims();
    let mut y = String::from(
        "---\nlibrary_name: transformers\nlicense: mit\npipeline_tag: fill-mask\ntags:\n- self-supervised\n- masked-language-modeling\n- bert\n- bert-mlm\n- pretext\n",
    );
    y.push_str(&format!("datasets:\n- {}\n", Mlm::dataset_name(cfg)));
    let recs: Vec<&pretext_eval::EvalRecord> = report
        .map(|r| r.records.iter().filter(|x| x.features == "pretrained").collect())
        .unwrap_or_default();
    if !recs.is_empty() {
        y.push_str("metrics:\n- accuracy\nmodel-index:\n- name: pretext-bert-mlm\n  results:\n");
        for r in &recs {
            let proto = if r.protocol == "knn" {
                "kNN (k=20, cosine)"
            } else {
                "linear probe"
            };
            let frac = pretext_eval::report::fraction_label(r.labels);
            y.push_str(&format!(
                "  - task:\n      type: text-classification\n      name: {proto} on frozen mean-pooled features ({frac} labels)\n    dataset:\n      type: {ds}\n      name: {ds} categories\n      split: test\n    metrics:\n    - type: accuracy\n      value: {:.4}\n      name: {proto} accuracy, {frac} labels\n",
                r.accuracy,
                ds = Mlm::dataset_name(cfg),
            ));
        }
    }
    y.push_str("---\n\n");
    y.push_str(&format!(
        "# BERT ({} layers × {}) pretrained by masked language modeling on {}\n\n\
A `BertForMaskedLM` trained from scratch with [pretext](https://github.com/pretext-rs/pretext) for {steps} optimizer \
steps: WordPiece tokenizer ({} tokens) trained on the same corpus, 15% of tokens chosen (80% `[MASK]`, 10% random, 10% \
kept), AdamW. {:.2} M parameters (the decoder is tied to the word embeddings).\n\n",
        d.num_hidden_layers,
        d.hidden_size,
        Mlm::dataset_name(cfg),
        d.vocab_size,
        d.parameter_count() as f64 / 1e6
    ));
    if let Some(m) = masked {
        let acc = m["pretrained"]["accuracy"].as_f64().unwrap_or(f64::NAN);
        let ppl = m["pretrained"]["perplexity"].as_f64().unwrap_or(f64::NAN);
        y.push_str(&format!(
            "## Held-out masked-token prediction\n\nAccuracy {:.2}%, perplexity {:.1} on held-out text.\n\n",
            acc * 100.0,
            ppl
        ));
    }
    if let Some(r) = report {
        y.push_str("## Transfer (test accuracy, %)\n\n");
        let md = r.markdown();
        let table: String = md
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .collect::<Vec<_>>()
            .join("\n");
        y.push_str(&table);
        y.push_str("\n\n`pretrained` is this model's frozen mean-pooled last hidden states; `random-init` the same architecture untrained; `raw` TF-IDF.\n\n");
    }
    y.push_str(
        "## Load it in Python\n\n```python\nfrom transformers import AutoTokenizer, BertForMaskedLM, pipeline\n\n\
tok = AutoTokenizer.from_pretrained(\".\")  # this folder, or the Hub repo id\nmodel = BertForMaskedLM.from_pretrained(\".\")\n\
print(pipeline(\"fill-mask\", model=model, tokenizer=tok)(\"the [MASK] is mightier than the sword.\"))\n\n\
# sentence features as pretext's probe computes them: mean of the last hidden states over real tokens\n\
enc = tok([\"some text\"], return_tensors=\"pt\", truncation=True, max_length=128, padding=True)\n\
h = model.bert(**enc).last_hidden_state\nm = enc[\"attention_mask\"].unsqueeze(-1)\nfeatures = (h * m).sum(1) / m.sum(1)\n```\n\n\
## Load it in pretext\n\n`pretext-mlm fill-mask RUN \"text with [MASK]\"`, `pretext-mlm probe RUN`; candle-transformers' \
`bert::BertForMaskedLM` loads `model.safetensors` with `config.json`.\n\n## Training configuration\n\n```toml\n",
    );
    y.push_str(config_toml.trim_end());
    y.push_str("\n```\n");
    y
}

/// The files of `export/` from a trained run: the Hugging Face layout.
///
/// # Errors
/// Tensor and encoding errors; an unreadable `config.toml`.
pub fn export_files(cfg: &MlmConfig, trained: &Trained<Mlm>) -> Result<Vec<(String, Vec<u8>)>> {
    let (run, tok, model, steps) = (&trained.run, &trained.assets, &trained.model, trained.step);
    let mut meta = pretext_core::Method::metadata(model);
    meta.insert("pretext.version".into(), env!("CARGO_PKG_VERSION").into());
    let bytes = pretext_core::checkpoint::safetensors_bytes(&hf_tensors(model), &meta)?;
    let json = |v: &serde_json::Value, what: &str| {
        serde_json::to_vec_pretty(v).map_err(|e| Error::Config(format!("{what}: {e}")))
    };
    let mut conf = model.dims().hf_config();
    conf["transformers_version"] = serde_json::json!("4.0.0");
    conf["pretext"] = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"), "steps": steps, "dataset": Mlm::dataset_name(cfg),
        "pooling": cfg.eval.pooling, "seq_len": cfg.data.seq_len,
    });
    let report: Option<pretext_eval::EvalReport> =
        std::fs::read(run.root().join("report").join(pretext_eval::report::EVAL_JSON))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    let masked: Option<serde_json::Value> = std::fs::read(run.root().join("report/masked_lm.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let readme = card(cfg, model, steps, report.as_ref(), masked.as_ref(), &run.config_text()?);
    let mut files = vec![
        ("model.safetensors".into(), bytes),
        ("config.json".into(), json(&conf, "config.json")?),
    ];
    files.extend(tokenizer_files(tok, model.dims().max_position_embeddings)?);
    files.push(("README.md".into(), readme.into_bytes()));
    Ok(files)
}

/// The tokenizer as `transformers` loads it: `tokenizer.json`, `vocab.txt`,
/// `tokenizer_config.json` (`BertTokenizer`, lowercase) and
/// `special_tokens_map.json`.
///
/// # Errors
/// Encoding errors.
pub fn tokenizer_files(tok: &crate::WordPieceTokenizer, max_length: usize) -> Result<Vec<(String, Vec<u8>)>> {
    let json = |v: &serde_json::Value, what: &str| {
        serde_json::to_vec_pretty(v).map_err(|e| Error::Config(format!("{what}: {e}")))
    };
    let specials = serde_json::json!({
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
    });
    let mut tok_conf = specials.clone();
    tok_conf["tokenizer_class"] = serde_json::json!("BertTokenizer");
    tok_conf["do_lower_case"] = serde_json::json!(true);
    tok_conf["tokenize_chinese_chars"] = serde_json::json!(true);
    tok_conf["strip_accents"] = serde_json::Value::Null;
    tok_conf["model_max_length"] = serde_json::json!(max_length);
    tok_conf["clean_up_tokenization_spaces"] = serde_json::json!(true);
    Ok(vec![
        ("tokenizer.json".into(), tok.to_json()?.into_bytes()),
        ("vocab.txt".into(), tok.vocab_txt().into_bytes()),
        (
            "tokenizer_config.json".into(),
            json(&tok_conf, "tokenizer_config.json")?,
        ),
        (
            "special_tokens_map.json".into(),
            json(&specials, "special_tokens_map.json")?,
        ),
    ])
}
