//! Masked language modeling as a [`Paradigm`]: corpus, tokenizer (the run's
//! asset), model, batches, periodic held-out masked-token accuracy; the
//! probe, fill-mask and tokenizer training. Pretrain, resume and export
//! come from [`pretext_core::paradigm`], the CLI from `pretext_cli::runner`.

use crate::collator::{mask_batch, sequences, MlmBatcher, SpecialIds};
use crate::config::{MlmConfig, Pooling};
use crate::corpus::{Corpus, ProbeTask};
use crate::error::{Error, Result};
use crate::model::BertMlm;
use crate::tokenizer::WordPieceTokenizer;
use candle_core::{Device, Tensor};
use pretext_core::paradigm::{EvalPoint, EvalSchedule, InitSpec, Paradigm, ProbeOptions, Sections, Trained};
use pretext_core::prefetch::Prefetched;
use pretext_core::trainer::Observer;
use pretext_core::warm_start::InitialWeights;
use pretext_core::RunDir;
use pretext_data::TextDataset;
use pretext_eval::{Embedded, KnnConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Text batches built ahead of the step on a worker thread.
const TEXT_PREFETCH: usize = 2;

/// BERT-style masked language modeling on text.
pub struct Mlm;

/// The folder of a run's tokenizer.
pub fn tokenizer_dir(run: &Path) -> PathBuf {
    run.join("tokenizer")
}

/// Reads every document the config names (the shipped fortunes by default).
///
/// # Errors
/// Reader errors, naming the file.
pub fn load_text(cfg: &MlmConfig) -> Result<TextDataset> {
    if cfg.data.path.is_empty() {
        let root = pretext_data::shipped::datasets_dir()?;
        return pretext_data::shipped::fortunes(&root, None).map_err(Error::from);
    }
    pretext_data::source::load_text(Path::new(&cfg.data.path), cfg.data.format, &cfg.data.fields()).map_err(Error::from)
}

/// The pretraining corpus and, for labelled text, the probe task of a config.
///
/// # Errors
/// Reader errors; categories that are not in the data.
pub fn load_corpus(cfg: &MlmConfig) -> Result<Corpus> {
    let all = load_text(cfg)?;
    let shipped: Vec<String> = crate::corpus::FORTUNE_CATEGORIES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let cats = match (cfg.data.probe_categories.is_empty(), cfg.data.path.is_empty()) {
        (false, _) => Some(cfg.data.probe_categories.as_slice()),
        (true, true) => Some(shipped.as_slice()),
        (true, false) => None,
    };
    Ok(crate::corpus::build(&all, cats, cfg.data.held_out, cfg.train.seed)?)
}

/// Trains a tokenizer on `docs` (`tokenizer.vocab_size`, `tokenizer.min_frequency`)
/// or loads `tokenizer.path`.
///
/// # Errors
/// An empty corpus or an unreadable tokenizer file.
pub fn make_tokenizer(cfg: &MlmConfig, docs: &[String]) -> Result<WordPieceTokenizer> {
    Ok(if cfg.tokenizer.path.is_empty() {
        WordPieceTokenizer::train(docs, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)?
    } else {
        WordPieceTokenizer::from_file(Path::new(&cfg.tokenizer.path))?
    })
}

/// The tokenized corpus: everything training needs beside the tokenizer.
pub struct Prepared {
    /// The corpus and probe task.
    pub corpus: Corpus,
    /// Training sequences.
    pub train: Arc<Vec<Vec<u32>>>,
    /// Held-out sequences.
    pub held_out: Vec<Vec<u32>>,
}

/// Tokenizes and packs the corpus with `tokenizer`.
///
/// # Errors
/// No tokens.
pub fn prepare(cfg: &MlmConfig, corpus: Corpus, tokenizer: &WordPieceTokenizer) -> Result<Prepared> {
    let ids = tokenizer.special_ids()?;
    let pack = |docs: &[String]| -> Result<Vec<Vec<u32>>> {
        Ok(sequences(
            &tokenizer.encode_all(docs)?,
            cfg.data.seq_len,
            cfg.data.packing,
            &ids,
        )?)
    };
    let (train, held_out) = (pack(&corpus.train)?, pack(&corpus.held_out)?);
    Ok(Prepared {
        corpus,
        train: Arc::new(train),
        held_out,
    })
}

/// A freshly initialised model for `tokenizer`'s vocabulary (seeded by `train.seed`).
///
/// # Errors
/// An invalid config.
pub fn new_model(cfg: &MlmConfig, tokenizer: &WordPieceTokenizer, device: &Device) -> Result<BertMlm> {
    let dims = cfg.model.dims(tokenizer.vocab_size())?;
    Ok(BertMlm::new(&dims, cfg.train.seed, device)?)
}

/// Held-out masked-LM figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MaskedLmEval {
    /// Argmax accuracy at the chosen positions.
    pub accuracy: f64,
    /// Mean cross-entropy there (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Positions predicted.
    pub tokens: usize,
}

/// Masked-token accuracy and perplexity of `model` on `seqs`, with masks
/// fixed by `seed` (the same positions at every evaluation of a run).
///
/// # Errors
/// Tensor errors.
pub fn masked_lm_eval(
    model: &BertMlm,
    seqs: &[Vec<u32>],
    cfg: &MlmConfig,
    ids: &SpecialIds,
    seed: u64,
    observer: &mut dyn Observer,
) -> Result<MaskedLmEval> {
    let (mut correct, mut total, mut loss_sum) = (0usize, 0usize, 0f64);
    let chunk = 32;
    let n = seqs.len() as u64;
    observer.on_progress("held-out masked LM", 0, n);
    for (ci, c) in seqs.chunks(chunk).enumerate() {
        let refs: Vec<&[u32]> = c.iter().map(Vec::as_slice).collect();
        let mut rng = pretext_core::seed::stream_rng(seed, "mlm-eval-mask", &[ci as u64]);
        let b = mask_batch(&refs, &cfg.masking, ids, &mut rng).to_batch(model.device())?;
        let (loss, k, m) = model.mlm_loss(&b, None)?;
        loss_sum += f64::from(loss.to_scalar::<f32>()?) * m as f64;
        correct += k;
        total += m;
        observer.on_progress("held-out masked LM", ((ci + 1) * chunk).min(seqs.len()) as u64, n);
    }
    let loss = loss_sum / total.max(1) as f64;
    Ok(MaskedLmEval {
        accuracy: correct as f64 / total.max(1) as f64,
        loss,
        perplexity: loss.exp(),
        tokens: total,
    })
}

fn held_out_slice<'a>(p: &'a Prepared, cfg: &MlmConfig) -> &'a [Vec<u32>] {
    let n = if cfg.eval.held_out_sequences == 0 {
        p.held_out.len()
    } else {
        cfg.eval.held_out_sequences.min(p.held_out.len())
    };
    &p.held_out[..n]
}

/// Frozen sentence features of `ds` (truncated to `eval.max_len` tokens,
/// pooled as `eval.pooling`), with its labels.
///
/// # Errors
/// Unlabelled documents; tensor errors.
pub fn text_features(
    model: &BertMlm,
    tok: &WordPieceTokenizer,
    ds: &TextDataset,
    cfg: &MlmConfig,
    observer: &mut dyn Observer,
    task: &str,
) -> Result<Embedded> {
    let out = text_embeddings(model, tok, &ds.docs, cfg, observer, task)?;
    let labels = ds
        .labels
        .clone()
        .ok_or_else(|| Error::Eval("probe documents need labels".into()))?;
    Ok(Embedded::new(out, model.dims().hidden_size, labels)?)
}

/// As [`text_features`] for documents with or without labels: `n × hidden`
/// values, row-major.
///
/// # Errors
/// Tensor errors.
pub fn text_embeddings(
    model: &BertMlm,
    tok: &WordPieceTokenizer,
    docs: &[String],
    cfg: &MlmConfig,
    observer: &mut dyn Observer,
    task: &str,
) -> Result<Vec<f32>> {
    let ids = tok.special_ids()?;
    // one `[CLS] doc [SEP]` sequence per document, cut at `eval.max_len`
    // (an empty document still yields `[CLS] [SEP]`)
    let seqs = crate::classifier::classifier_sequences(tok, docs, cfg.eval.max_len)?;
    let h = model.dims().hidden_size;
    let mut out = Vec::with_capacity(seqs.len() * h);
    let n = seqs.len() as u64;
    observer.on_progress(task, 0, n);
    let chunk = 64;
    for (ci, c) in seqs.chunks(chunk).enumerate() {
        let refs: Vec<&Vec<u32>> = c.iter().collect();
        let (flat, mask) = crate::classifier::padded(&refs, ids.pad, model.device())?;
        let f = model.sentence_features(&flat, &mask, cfg.eval.pooling == Pooling::Cls)?;
        out.extend(f.flatten_all()?.to_vec1::<f32>()?);
        observer.on_progress(task, ((ci + 1) * chunk).min(seqs.len()) as u64, n);
    }
    Ok(out)
}

/// The probe of a trained run: frozen features of the pretrained model,
/// of the same architecture randomly initialised and TF-IDF (the `raw`
/// baseline), each through the linear probe and kNN at `fractions` of the
/// probe task's training labels; also the held-out masked-token accuracy of
/// both models. Writes `report/`.
///
/// # Errors
/// Unlabelled data, invalid fractions, tensor and I/O errors.
pub fn probe(
    trained: &Trained<Mlm>,
    cfg: &MlmConfig,
    opts: &ProbeOptions<'_>,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<(pretext_eval::EvalReport, MaskedLmEval, MaskedLmEval)> {
    let fractions = opts.fractions;
    let (run, tok) = (&trained.run, &trained.assets);
    let trained = &trained.model;
    let random = new_model(cfg, tok, device)?;
    let ids = tok.special_ids()?;
    // the probe task, and the text whose masked tokens are predicted: the
    // run's held-out corpus, or the test documents of `--data`
    let (task, held_out, source) = match opts.data {
        Some(path) => {
            let l =
                pretext_data::labelled::load_labelled_text(path, cfg.data.format, &cfg.data.fields(), cfg.train.seed)?;
            let held = sequences(&tok.encode_all(&l.test.docs)?, cfg.data.seq_len, cfg.data.packing, &ids)?;
            observer.on_message(&format!(
                "probe data {}: {} training and {} test documents, {} classes ({} split)",
                path.display(),
                l.train.len(),
                l.test.len(),
                l.source.classes.len(),
                l.source.split
            ));
            (
                ProbeTask {
                    train: l.train,
                    test: l.test,
                },
                held,
                Some(l.source),
            )
        }
        None => {
            let p = prepare(cfg, load_corpus(cfg)?, tok)?;
            let task = p
                .corpus
                .probe
                .ok_or_else(|| Error::Eval(pretext_eval::transfer::UNLABELLED_RUN.into()))?;
            (task, p.held_out, None)
        }
    };
    let mlm = masked_lm_eval(trained, &held_out, cfg, &ids, cfg.train.seed, observer)?;
    let mlm_random = masked_lm_eval(&random, &held_out, cfg, &ids, cfg.train.seed, observer)?;
    observer.on_message(&format!(
        "held-out masked-token accuracy {:.2}% (perplexity {:.1}); random init {:.2}%",
        mlm.accuracy * 100.0,
        mlm.perplexity,
        mlm_random.accuracy * 100.0
    ));
    let (tr, te) = (&task.train, &task.test);
    let probe_cfg = pretext_eval::LinearProbeConfig {
        seed: cfg.train.seed,
        ..Default::default()
    };
    let knn = KnnConfig {
        k: cfg.eval.knn_k,
        temperature: cfg.eval.knn_temperature,
        ..Default::default()
    };
    let mut features = |name: &str, observer: &mut dyn Observer| -> pretext_eval::Result<_> {
        let model = match name {
            "pretrained" => trained,
            "random-init" => &random,
            _ => {
                let tfidf = pretext_eval::TfIdf::fit(&tr.docs, 2)?;
                observer.on_message(&format!("TF-IDF baseline: {} terms", tfidf.dim()));
                let lab = |d: &TextDataset| d.labels.clone().unwrap_or_default();
                return Ok((
                    tfidf.transform(&tr.docs, &lab(tr))?,
                    tfidf.transform(&te.docs, &lab(te))?,
                ));
            }
        };
        let feats = |ds: &TextDataset, part: &str, observer: &mut dyn Observer| {
            text_features(model, tok, ds, cfg, observer, &format!("{name}: {part} features"))
                .map_err(pretext_eval::Error::from)
        };
        Ok((feats(tr, "train", observer)?, feats(te, "test", observer)?))
    };
    let (records, pretrained_test) =
        pretext_eval::frozen_feature_records(&mut features, fractions, cfg.train.seed, &probe_cfg, &knn, observer)?;
    let report = pretext_eval::EvalReport {
        paradigm: Mlm::NAME.into(),
        method: "bert-mlm".into(),
        dataset: source
            .as_ref()
            .map_or_else(|| Mlm::dataset_name(cfg), |s| s.path.clone()),
        records,
        data: source,
    };
    let report_dir = run.report_dir()?;
    report.write(&report_dir)?;
    let mlm_json = serde_json::to_vec_pretty(&serde_json::json!({
        "pretrained": mlm, "random_init": mlm_random,
        "held_out_sequences": held_out.len(), "mask_seed": cfg.train.seed,
        "text": if opts.data.is_some() { "the probe data's test documents" } else { "the run's held-out corpus" },
    }))
    .map_err(|e| pretext_core::Error::Config(format!("masked_lm.json: {e}")))?;
    pretext_core::run::write_atomic(&report_dir.join("masked_lm.json"), &mlm_json)?;
    let metrics_path = run.metrics_path();
    let records = pretext_core::run::read_metrics(&metrics_path).unwrap_or_default();
    let curve: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.get("event").and_then(|e| e.as_str()) == Some("masked_lm"))
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get("masked_accuracy")?.as_f64()? * 100.0)))
        .collect();
    let mut extra = Vec::new();
    if !curve.is_empty() {
        extra.push((
            "masked_lm.png".to_string(),
            "Held-out masked-token accuracy during pretraining".to_string(),
            pretext_eval::plots::line_chart(
                "Held-out masked-token accuracy",
                "step",
                "accuracy (%)",
                &[("masked tokens".to_string(), curve)],
                false,
            )?,
        ));
    }
    let figures = pretext_eval::plots::RunFigures {
        metrics: Some(&metrics_path),
        test_features: Some(&pretrained_test),
        class_names: &te.classes,
        extra_images: extra,
        intro_html: format!(
            "<h2>Held-out masked-token prediction</h2>\n<table><tr><th>model</th><th>accuracy</th><th>perplexity</th><th>masked tokens</th></tr>\
<tr><td>pretrained</td><td>{:.2}%</td><td>{:.1}</td><td>{}</td></tr><tr><td>random-init</td><td>{:.2}%</td><td>{:.1}</td><td>{}</td></tr></table>\n\
<p>Probe task: {} classes ({}), {} training and {} test documents; <code>raw</code> is TF-IDF.</p>\n",
            mlm.accuracy * 100.0,
            mlm.perplexity,
            mlm.tokens,
            mlm_random.accuracy * 100.0,
            mlm_random.perplexity,
            mlm_random.tokens,
            te.classes.len(),
            te.classes.join(", "),
            tr.len(),
            te.len()
        ),
    };
    pretext_eval::plots::write_report_page(&report_dir, &report, &figures)?;
    Ok((report, mlm, mlm_random))
}

/// One `[MASK]` of a fill-mask query and its top candidates `(token, probability)`.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskPrediction {
    /// Position of the mask in the tokenized input (after `[CLS]`).
    pub position: usize,
    /// The candidates, most likely first.
    pub candidates: Vec<(String, f32)>,
}

/// The `top_k` most likely tokens at each `[MASK]` of `text`, from the model of the run in `dir`.
///
/// # Errors
/// No `[MASK]` in the text, a text longer than the model takes, no run.
pub fn fill_mask(
    dir: &Path,
    cfg: &MlmConfig,
    text: &str,
    top_k: usize,
    device: &Device,
) -> Result<Vec<MaskPrediction>> {
    let trained = pretext_core::paradigm::load_trained::<Mlm>(dir, cfg, device)?;
    fill_mask_with(&trained.model, &trained.assets, text, top_k)
}

/// As [`fill_mask`] with a loaded model.
///
/// # Errors
/// As [`fill_mask`].
pub fn fill_mask_with(
    model: &BertMlm,
    tok: &WordPieceTokenizer,
    text: &str,
    top_k: usize,
) -> Result<Vec<MaskPrediction>> {
    let mut ids = vec![tok.cls];
    ids.extend(tok.encode(text)?);
    ids.push(tok.sep);
    let positions: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == tok.mask).collect();
    if positions.is_empty() {
        return Err(Error::Eval(format!(
            "no [MASK] in {text:?}: write [MASK] where a word should be predicted"
        )));
    }
    if ids.len() > model.dims().max_position_embeddings {
        return Err(Error::Eval(format!(
            "the text has {} tokens; the model takes at most {}",
            ids.len(),
            model.dims().max_position_embeddings
        )));
    }
    let n = ids.len();
    let dev = model.device();
    let logits = model.logits(
        &Tensor::from_vec(ids, (1, n), dev)?,
        &Tensor::ones((1, n), candle_core::DType::F32, dev)?,
    )?;
    let mut out = Vec::new();
    for &p in &positions {
        let probs = pretext_core::ops::softmax_last_dim(&logits.get(0)?.get(p)?)?.to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..probs.len()).filter(|&i| !tok.is_special(i as u32)).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        out.push(MaskPrediction {
            position: p,
            candidates: order
                .into_iter()
                .take(top_k.max(1))
                .map(|i| (tok.token(i as u32), probs[i]))
                .collect(),
        });
    }
    Ok(out)
}

/// Trains a tokenizer on the corpus of `cfg` (every document, since it is
/// not tied to a run) and writes `tokenizer.json` and `vocab.txt` into `out`.
///
/// # Errors
/// Unreadable data, an empty corpus, I/O errors.
pub fn train_tokenizer(cfg: &MlmConfig, out: &Path) -> Result<WordPieceTokenizer> {
    let all = load_text(cfg)?;
    let tok = WordPieceTokenizer::train(&all.docs, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
        .map_err(|e| corpus_error(cfg, e))?;
    tok.save(out)?;
    Ok(tok)
}

/// Names the corpus in a data problem found after reading it (an empty
/// corpus, no tokens, no labelled documents).
fn corpus_error(cfg: &MlmConfig, e: impl Into<Error>) -> Error {
    match e.into() {
        Error::Core(pretext_core::Error::Data(reason)) => {
            let path = if cfg.data.path.is_empty() {
                "the shipped fortunes"
            } else {
                cfg.data.path.as_str()
            };
            Error::Data(pretext_data::Error::format(path, reason))
        }
        other => other,
    }
}

impl Paradigm for Mlm {
    const NAME: &'static str = "mlm";
    const SHIPPED_DATA: &'static str = "fortunes";
    const FINETUNES: bool = false;
    type Config = MlmConfig;
    type Model = BertMlm;
    type Assets = WordPieceTokenizer;
    type Data = Prepared;
    type Batches = Prefetched<MlmBatcher>;
    type Error = Error;

    fn sections(cfg: &MlmConfig) -> Sections<'_> {
        Sections::new(&cfg.train, &cfg.optim, &cfg.schedule, &cfg.data.path)
    }

    fn validate(cfg: &MlmConfig) -> Result<()> {
        Ok(cfg.validate()?)
    }

    /// Reads the corpus, trains the tokenizer (or loads `tokenizer.path`)
    /// unless the run has one, and tokenizes and packs the corpus.
    fn load_data(
        cfg: &MlmConfig,
        tokenizer: Option<WordPieceTokenizer>,
        observer: &mut dyn Observer,
    ) -> Result<(Prepared, WordPieceTokenizer)> {
        let corpus = load_corpus(cfg).map_err(|e| corpus_error(cfg, e))?;
        let task = match &corpus.probe {
            Some(p) => format!(
                "probe task {} train / {} test documents, {} classes",
                p.train.len(),
                p.test.len(),
                p.train.classes.len()
            ),
            None => "no labels, so no probe task (probe --data LABELLED gives one)".into(),
        };
        observer.on_message(&format!(
            "corpus: {} documents for pretraining, {} held out; {task}",
            corpus.train.len(),
            corpus.held_out.len(),
        ));
        let tok = match tokenizer {
            Some(t) => t,
            None => {
                let started = std::time::Instant::now();
                let tok = make_tokenizer(cfg, &corpus.train).map_err(|e| corpus_error(cfg, e))?;
                observer.on_message(&format!(
                    "tokenizer: {} tokens ({:.1} s)",
                    tok.vocab_size(),
                    started.elapsed().as_secs_f64()
                ));
                tok
            }
        };
        let p = prepare(cfg, corpus, &tok).map_err(|e| corpus_error(cfg, e))?;
        let tokens: usize = p.train.iter().map(Vec::len).sum();
        let ids = tok.special_ids()?;
        let regular = p.train.iter().flatten().filter(|&&t| t >= ids.first_regular).count();
        let unknown = p.train.iter().flatten().filter(|&&t| t == tok.unk).count();
        if regular == 0 {
            return Err(corpus_error(
                cfg,
                pretext_core::Error::Data(format!(
                    "no token of the corpus is in the tokenizer's vocabulary ({unknown} of {tokens} tokens are [UNK]): \
                     nothing to mask and predict; is the tokenizer made for this text?"
                )),
            ));
        }
        if unknown * 2 > regular + unknown {
            observer.on_message(&format!(
                "warning: {:.0}% of the corpus's words are [UNK] under this tokenizer; is it made for this text?",
                100.0 * unknown as f64 / (regular + unknown) as f64
            ));
        }
        observer.on_message(&format!(
            "{} training sequences ({} tokens), {} held out",
            p.train.len(),
            tokens,
            p.held_out.len()
        ));
        Ok((p, tok))
    }

    fn save_assets(tok: &WordPieceTokenizer, run: &RunDir) -> Result<()> {
        Ok(tok.save(&tokenizer_dir(run.root()))?)
    }

    fn load_assets(_: &MlmConfig, run: &RunDir) -> Result<WordPieceTokenizer> {
        Ok(WordPieceTokenizer::from_file(
            &tokenizer_dir(run.root()).join("tokenizer.json"),
        )?)
    }

    fn new_model(cfg: &MlmConfig, tok: &WordPieceTokenizer, device: &Device) -> Result<BertMlm> {
        new_model(cfg, tok, device)
    }

    fn batches(cfg: &MlmConfig, p: &Prepared, tok: &WordPieceTokenizer, device: &Device) -> Result<Self::Batches> {
        let batcher = MlmBatcher::new(
            p.train.clone(),
            cfg.train.batch_size,
            cfg.train.seed,
            cfg.masking.clone(),
            tok.special_ids()?,
            device,
        );
        // Masking and padding the next batches overlaps the step, as the images' pipeline does.
        Ok(Prefetched::new(batcher, TEXT_PREFETCH))
    }

    fn eval_schedule(cfg: &MlmConfig) -> EvalSchedule {
        EvalSchedule::Steps(cfg.eval.every_steps)
    }

    fn evaluate(
        cfg: &MlmConfig,
        p: &Prepared,
        tok: &WordPieceTokenizer,
        model: &BertMlm,
        at: EvalPoint,
        _: &Device,
        observer: &mut dyn Observer,
    ) -> Result<Vec<serde_json::Value>> {
        let ids = tok.special_ids()?;
        let e = masked_lm_eval(model, held_out_slice(p, cfg), cfg, &ids, cfg.train.seed, observer)?;
        observer.on_message(&format!(
            "step {}: held-out masked-token accuracy {:.2}%, perplexity {:.1}",
            at.step,
            e.accuracy * 100.0,
            e.perplexity
        ));
        Ok(vec![serde_json::json!({
            "event": "masked_lm", "step": at.step, "epoch": at.step as f64 / at.steps_per_epoch.max(1) as f64,
            "masked_accuracy": e.accuracy, "loss": e.loss, "perplexity": e.perplexity, "tokens": e.tokens,
        })])
    }

    fn probe(
        cfg: &MlmConfig,
        trained: &Trained<Self>,
        opts: &ProbeOptions<'_>,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> Result<String> {
        let (report, mlm, random) = probe(trained, cfg, opts, device, observer)?;
        Ok(format!(
            "held-out masked-token accuracy {:.2}% (perplexity {:.1}); random init {:.2}%\n\n{}\nreport: {}",
            mlm.accuracy * 100.0,
            mlm.perplexity,
            random.accuracy * 100.0,
            report.markdown(),
            trained.run.root().join("report").join("index.html").display()
        ))
    }

    fn export_files(cfg: &MlmConfig, trained: &Trained<Self>) -> Result<Vec<(String, Vec<u8>)>> {
        crate::export::export_files(cfg, trained)
    }

    /// A Hugging Face BERT folder (pretext's export is one): its weights
    /// and tokenizer.
    fn initial_weights(
        _: &MlmConfig,
        spec: &InitSpec,
        device: &Device,
    ) -> Result<(InitialWeights, Option<WordPieceTokenizer>)> {
        let (w, tok) = crate::init::initial_weights(spec, device)?;
        Ok((w, Some(tok)))
    }

    /// The encoder comes from the source; a missing MLM head starts fresh.
    fn init_required(name: &str) -> bool {
        name.starts_with("bert.")
    }

    fn init_settings(spec: &InitSpec) -> Result<Vec<String>> {
        crate::init::init_settings(spec)
    }
}
