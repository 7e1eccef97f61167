//! `embed`, `finetune` and `predict` for BERT (the flows are
//! [`pretext_eval::downstream`]'s): features are the probe's pooled hidden
//! states; a classifier is a `BertForSequenceClassification` folder
//! (weights, `config.json` with `id2label`, the tokenizer) that
//! `transformers` loads as it is.

use crate::app::{text_embeddings, Mlm};
use crate::classifier::{classifier_sequences, fine_tune_text, probabilities, BertClassifier, TextClassifierData};
use crate::config::MlmConfig;
use crate::model::BertMlm;
use crate::tokenizer::WordPieceTokenizer;
use candle_core::Device;
use pretext_core::trainer::Observer;
use pretext_data::{Labelled, TextDataset};
use pretext_eval::downstream::{ClassifierFiles, ClassifierInputs, Downstream};
use pretext_eval::{Embedded, FineTuneResult, RunError, RunResult};
use std::path::Path;

fn python_usage(max_len: usize) -> String {
    format!(
        "## Load it in Python\n\n```python\nfrom transformers import AutoTokenizer, BertForSequenceClassification\n\n\
tok = AutoTokenizer.from_pretrained(\".\")  # this folder, or the Hub repo id\n\
model = BertForSequenceClassification.from_pretrained(\".\").eval()\n\n\
enc = tok([\"some text to classify\"], return_tensors=\"pt\", truncation=True, max_length={max_len}, padding=True)\n\
probabilities = model(**enc).logits.softmax(-1)\nprint(model.config.id2label[int(probabilities.argmax())])\n```\n"
    )
}

impl Downstream for Mlm {
    type Inputs = TextDataset;
    type Classifier = (BertClassifier, WordPieceTokenizer);
    const TASK: &'static str = "text-classification";

    fn read_inputs(cfg: &MlmConfig, path: &Path) -> RunResult<TextDataset> {
        Ok(pretext_data::source::load_text(
            path,
            cfg.data.format,
            &cfg.data.fields(),
        )?)
    }

    fn read_labelled(cfg: &MlmConfig, path: &Path) -> RunResult<Labelled<TextDataset>> {
        Ok(pretext_data::labelled::load_labelled_text(
            path,
            cfg.data.format,
            &cfg.data.fields(),
            cfg.train.seed,
        )?)
    }

    fn features(
        cfg: &MlmConfig,
        model: &BertMlm,
        tok: &WordPieceTokenizer,
        inputs: &TextDataset,
        _: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<(Vec<f32>, usize)> {
        let f = text_embeddings(model, tok, &inputs.docs, cfg, observer, "features")?;
        Ok((f, model.dims().hidden_size))
    }

    fn raw_features(_: &MlmConfig, train: &TextDataset, test: &TextDataset) -> RunResult<(Embedded, Embedded)> {
        let tfidf = pretext_eval::TfIdf::fit(&train.docs, 2)?;
        let lab = |d: &TextDataset| d.labels.clone().unwrap_or_default();
        Ok((
            tfidf.transform(&train.docs, &lab(train))?,
            tfidf.transform(&test.docs, &lab(test))?,
        ))
    }

    fn finetune(
        cfg: &MlmConfig,
        model: &BertMlm,
        tok: &WordPieceTokenizer,
        data: &ClassifierInputs<'_, TextDataset>,
        frozen: bool,
        _: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<(FineTuneResult, ClassifierFiles)> {
        let clf = BertClassifier::new(model.duplicate()?, data.classes.len(), cfg.train.seed)?;
        let d = TextClassifierData {
            train: data.train,
            validation: data.validation,
            test: data.test,
        };
        let result = fine_tune_text(
            &clf,
            tok,
            &d,
            cfg.eval.max_len,
            &cfg.eval.finetune,
            frozen,
            cfg.train.seed,
            observer,
        )?;
        let mut config = model.dims().hf_config();
        config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
        config["id2label"] = pretext_eval::downstream::id2label(data.classes);
        config["label2id"] = pretext_eval::downstream::label2id(data.classes);
        config["problem_type"] = serde_json::json!("single_label_classification");
        config["transformers_version"] = serde_json::json!("4.0.0");
        let files = ClassifierFiles {
            tensors: clf.hf_tensors(),
            config,
            files: crate::export::tokenizer_files(tok, model.dims().max_position_embeddings)?,
            python: python_usage(cfg.eval.max_len),
            architecture: "BertForSequenceClassification".into(),
        };
        Ok((result, files))
    }

    fn load_classifier(cfg: &MlmConfig, dir: &Path, device: &Device) -> RunResult<Self::Classifier> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(RunError::Data(pretext_data::Error::format(
                &tok_path,
                "missing: a text classifier folder carries its tokenizer",
            )));
        }
        let tok = WordPieceTokenizer::from_file(&tok_path)?;
        let dims = cfg.model.dims(tok.vocab_size())?;
        let path = dir.join("model.safetensors");
        let (found, _) = pretext_core::checkpoint::read_safetensors(&path, device)?;
        let clf = BertClassifier::load(BertMlm::new(&dims, 0, device)?, &path, &found)?;
        Ok((clf, tok))
    }

    fn predict(
        cfg: &MlmConfig,
        (clf, tok): &Self::Classifier,
        inputs: &TextDataset,
        _: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<Vec<f32>> {
        let seqs = classifier_sequences(tok, &inputs.docs, cfg.eval.max_len)?;
        Ok(probabilities(clf, &seqs, tok.special_ids()?.pad, observer, "predict")?)
    }
}
