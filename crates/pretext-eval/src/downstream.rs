//! What a trained model does on a user's data, written once for every
//! paradigm: `embed` (frozen features of every input to a file), `finetune`
//! (a classifier folder the Python ecosystem loads) and `predict` (one JSON
//! line per input from such a folder). A paradigm says how to read its
//! inputs, compute features, train and load a classifier ([`Downstream`]);
//! the flows here do the rest.

use crate::finetune::FineTuneResult;
use crate::report::fraction_label;
use crate::{Embedded, LinearProbe, LinearProbeConfig, RunError, RunResult};
use candle_core::{Device, Tensor};
use pretext_core::paradigm::{Paradigm, Trained};
use pretext_core::trainer::Observer;
use pretext_data::embeddings::{EmbeddingFormat, EmbeddingRows};
use pretext_data::{DataSource, Inputs, Labelled};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file of a classifier folder that holds the run's resolved config
/// (what `predict` rebuilds the model from).
pub const CLASSIFIER_CONFIG_TOML: &str = "pretext.toml";

/// What a paradigm tells the downstream flows.
pub trait Downstream: Paradigm<Error = RunError> {
    /// The records its model reads: images or documents.
    type Inputs: Inputs;
    /// A classifier loaded from its folder.
    type Classifier;
    /// The Hub's name of the classification task (`image-classification`).
    const TASK: &'static str;

    /// Reads the records at `path` (labels optional), as the config's
    /// `data.*` reading keys say.
    ///
    /// # Errors
    /// Reader errors naming the file.
    fn read_inputs(cfg: &Self::Config, path: &Path) -> RunResult<Self::Inputs>;

    /// Reads labelled records at `path`, split for transfer (see
    /// [`pretext_data::labelled`]).
    ///
    /// # Errors
    /// Reader errors; unlabelled data; a single class.
    fn read_labelled(cfg: &Self::Config, path: &Path) -> RunResult<Labelled<Self::Inputs>>;

    /// The frozen features the probe uses, of every record of `inputs`:
    /// `(n × dim values, dim)`.
    ///
    /// # Errors
    /// Tensor errors.
    fn features(
        cfg: &Self::Config,
        model: &Self::Model,
        assets: &Self::Assets,
        inputs: &Self::Inputs,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<(Vec<f32>, usize)>;

    /// The raw-input baseline (pixels, TF-IDF fitted on `train`) of `train` and `test`.
    ///
    /// # Errors
    /// Unlabelled records.
    fn raw_features(cfg: &Self::Config, train: &Self::Inputs, test: &Self::Inputs) -> RunResult<(Embedded, Embedded)>;

    /// Trains `model`'s encoder (in place; frozen: only a linear layer on
    /// its features) plus a classification head on `data`; returns what it
    /// measured and the classifier's files.
    ///
    /// # Errors
    /// Tensor errors, divergence.
    fn finetune(
        cfg: &Self::Config,
        model: &Self::Model,
        assets: &Self::Assets,
        data: &ClassifierInputs<'_, Self::Inputs>,
        frozen: bool,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<(FineTuneResult, ClassifierFiles)>;

    /// Loads the classifier in `dir` (config `cfg`, read from its
    /// [`CLASSIFIER_CONFIG_TOML`]).
    ///
    /// # Errors
    /// Missing or mismatched files, named.
    fn load_classifier(cfg: &Self::Config, dir: &Path, device: &Device) -> RunResult<Self::Classifier>;

    /// Class probabilities of every record, `n × classes`, row-major.
    ///
    /// # Errors
    /// Tensor errors.
    fn predict(
        cfg: &Self::Config,
        classifier: &Self::Classifier,
        inputs: &Self::Inputs,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<Vec<f32>>;
}

/// The labelled records a classifier is trained on.
#[derive(Debug, Clone, Copy)]
pub struct ClassifierInputs<'a, T> {
    /// Training records.
    pub train: &'a T,
    /// Validation records (early stopping, the epoch kept), if any.
    pub validation: Option<&'a T>,
    /// Test records.
    pub test: &'a T,
    /// Class names by label: the head's outputs.
    pub classes: &'a [String],
}

/// What a paradigm's `finetune` produces beside its measurements.
#[derive(Debug, Clone)]
pub struct ClassifierFiles {
    /// The weights, under the names of the PyTorch module that loads them.
    pub tensors: Vec<(String, Tensor)>,
    /// `config.json` as that module's ecosystem reads it; the flow adds a
    /// `pretext` section (classes, accuracy, baselines, data).
    pub config: serde_json::Value,
    /// Further files (a tokenizer).
    pub files: Vec<(String, Vec<u8>)>,
    /// The model card's "load it in Python" section (Markdown).
    pub python: String,
    /// The architecture's name for the card (`resnet18`, `BertForSequenceClassification`).
    pub architecture: String,
}

/// `{"0": "cat", "1": "dog"}`: class names by output index, as Hugging
/// Face configs write them.
pub fn id2label(classes: &[String]) -> serde_json::Value {
    serde_json::Value::Object(
        classes
            .iter()
            .enumerate()
            .map(|(i, c)| (i.to_string(), serde_json::Value::String(c.clone())))
            .collect(),
    )
}

/// `{"cat": 0, "dog": 1}`.
pub fn label2id(classes: &[String]) -> serde_json::Value {
    serde_json::Value::Object(
        classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), serde_json::json!(i)))
            .collect(),
    )
}

/// How many labels `finetune` uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LabelBudget {
    /// A class-balanced fraction of the training records.
    Fraction(f64),
    /// At most this many records of each class.
    PerClass(usize),
}

impl LabelBudget {
    /// Parses `1%`, `0.01`, `100%`, `10/class` or `10-per-class`.
    ///
    /// # Errors
    /// Anything else, or a value outside (0, 100%] / below 1 per class.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        for suffix in ["/class", "-per-class", " per class"] {
            if let Some(n) = t.strip_suffix(suffix) {
                return match n.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Ok(Self::PerClass(n)),
                    _ => Err(format!(
                        "--labels {s:?}: the count per class must be a whole number of at least 1"
                    )),
                };
            }
        }
        let v = match t.strip_suffix('%') {
            Some(p) => p.trim().parse::<f64>().map(|x| x / 100.0),
            None => t.parse::<f64>(),
        }
        .map_err(|_| {
            format!("--labels {s:?}: expected a percentage (1%), a fraction (0.01) or a count per class (10/class)")
        })?;
        if !(v > 0.0 && v <= 1.0) {
            return Err(format!("--labels {s:?}: a fraction must lie in (0, 100%]"));
        }
        Ok(Self::Fraction(v))
    }

    /// As people write it: `1%`, `10/class`.
    pub fn label(&self) -> String {
        match self {
            Self::Fraction(f) => fraction_label(*f),
            Self::PerClass(n) => format!("{n}/class"),
        }
    }

    /// The class-balanced, seeded subset of `labels` this budget picks.
    ///
    /// # Errors
    /// Invalid fractions.
    pub fn subset(&self, labels: &[u32], seed: u64) -> RunResult<Vec<usize>> {
        Ok(match *self {
            Self::Fraction(f) => pretext_data::subset::balanced_subset(labels, f, seed)?,
            Self::PerClass(n) => {
                let classes = labels.iter().max().map_or(0, |m| *m as usize + 1);
                let mut per = vec![0usize; classes];
                for &l in labels {
                    per[l as usize] += 1;
                }
                let total: usize = per.iter().map(|&c| c.min(n)).sum();
                pretext_data::subset::balanced_count(labels, total, seed)?
            }
        })
    }
}

/// Options of [`embed`].
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// The records to embed.
    pub data: PathBuf,
    /// The file to write.
    pub out: PathBuf,
    /// Its format.
    pub format: EmbeddingFormat,
}

/// What [`embed`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedSummary {
    /// Rows.
    pub rows: usize,
    /// Feature size.
    pub dim: usize,
    /// Whether the rows carry labels.
    pub labelled: bool,
    /// The files written.
    pub files: Vec<PathBuf>,
}

/// Writes the frozen features of every record of `opts.data` under the
/// trained model (the features `probe` uses) to `opts.out`.
///
/// # Errors
/// Unreadable data; I/O errors naming the file.
pub fn embed<P: Downstream>(
    cfg: &P::Config,
    trained: &Trained<P>,
    opts: &EmbedOptions,
    device: &Device,
    observer: &mut dyn Observer,
) -> RunResult<EmbedSummary> {
    let inputs = P::read_inputs(cfg, &opts.data)?;
    observer.on_message(&format!("{}: {} records", opts.data.display(), inputs.count()));
    let (features, dim) = P::features(cfg, &trained.model, &trained.assets, &inputs, device, observer)?;
    let rows = EmbeddingRows {
        features,
        dim,
        ids: (0..inputs.count()).map(|i| inputs.id(i)).collect(),
        labels: inputs
            .labels()
            .map(|l| l.iter().map(|&c| inputs.class_name(c)).collect()),
    };
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| pretext_core::Error::io(parent, e))?;
    }
    pretext_data::embeddings::write_embeddings(&opts.out, opts.format, &rows)?;
    Ok(EmbedSummary {
        rows: rows.len(),
        dim,
        labelled: rows.labels.is_some(),
        files: pretext_data::embeddings::embedding_files(&opts.out, opts.format),
    })
}

/// How much of the chosen labels `finetune` holds out to pick the epoch
/// kept, when the data has no validation split of its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValidationSplit {
    /// [`ValidationSplit::AUTO_FRACTION`] of the labels when that makes at
    /// least [`ValidationSplit::AUTO_MIN`] records, else none.
    Auto,
    /// This share of the labels (0 = none: every label trains, the last
    /// epoch is kept).
    Fraction(f64),
}

impl ValidationSplit {
    /// The share `Auto` holds out.
    pub const AUTO_FRACTION: f64 = 0.1;
    /// The fewest validation records `Auto` holds out; below, a validation
    /// split chooses epochs by noise (one image of 60 is 1.7 points), as the
    /// linear probe's rule for its λ says too.
    pub const AUTO_MIN: usize = 500;

    /// The share to hold out of `n` chosen labels.
    pub fn fraction(self, n: usize) -> f64 {
        match self {
            Self::Fraction(f) => f,
            Self::Auto if (n as f64 * Self::AUTO_FRACTION).round() as usize >= Self::AUTO_MIN => Self::AUTO_FRACTION,
            Self::Auto => 0.0,
        }
    }
}

/// Options of [`finetune`].
#[derive(Debug, Clone)]
pub struct FineTuneOptions {
    /// Labelled data.
    pub data: PathBuf,
    /// How many of its training labels to use.
    pub labels: LabelBudget,
    /// Train only a linear layer on the frozen encoder.
    pub frozen: bool,
    /// Also fine-tune the same architecture from a random initialisation
    /// with the same recipe, as a baseline.
    pub scratch: bool,
    /// The classifier folder to write (replaced if it exists).
    pub out: PathBuf,
    /// Share of the chosen labels held out as the validation split when the
    /// data has none of its own.
    pub validation: ValidationSplit,
    /// Seed of the label subset, the validation split and training.
    pub seed: u64,
    /// What the encoder started from (the run folder), for the card.
    pub from: String,
}

/// A baseline a classifier is compared with, at the same labels and test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// `raw-linear` (a linear probe on pixels / TF-IDF) or `scratch-finetune`.
    pub name: String,
    /// What it is, in words.
    pub description: String,
    /// Its test accuracy in [0, 1].
    pub accuracy: f64,
    /// Whether the classifier's test accuracy is higher.
    pub beaten: bool,
}

/// The `pretext` section of a classifier's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierInfo {
    /// `contrastive`, `generative` or `mlm`.
    pub paradigm: String,
    /// The Hub's task name.
    pub task: String,
    /// Class names, by the head's output index.
    pub classes: Vec<String>,
    /// Test accuracy in [0, 1].
    pub test_accuracy: f64,
    /// Test records.
    pub n_test: usize,
    /// Labelled training records used (validation included).
    pub n_labels: usize,
    /// Validation records (early stopping, the epoch kept).
    pub n_validation: usize,
    /// Validation accuracy at the epoch kept.
    pub validation_accuracy: Option<f64>,
    /// The label budget asked for (`1%`, `10/class`).
    pub labels: String,
    /// Whether the encoder stayed frozen (a linear layer on its features).
    pub frozen: bool,
    /// What the encoder started from.
    pub init: String,
    /// The labelled data.
    pub data: DataSource,
    /// The baselines measured on the same labels and test set.
    pub baselines: Vec<Baseline>,
    /// What training measured.
    pub training: FineTuneResult,
    /// The library that wrote it.
    pub library: String,
}

/// Fine-tunes `model` (a trained run's; `fresh` makes a randomly initialised
/// one for the from-scratch baseline) on labelled data and writes a
/// classifier folder: weights, `config.json` (with a [`ClassifierInfo`]
/// under `pretext`), the run's config, a model card and the paradigm's
/// further files. Returns what it wrote into `config.json`.
///
/// # Errors
/// Unreadable or unlabelled data; tensor and I/O errors.
#[allow(clippy::too_many_arguments)]
pub fn finetune<P: Downstream>(
    cfg: &P::Config,
    config_toml: &str,
    model: &P::Model,
    fresh: &mut dyn FnMut() -> RunResult<P::Model>,
    assets: &P::Assets,
    opts: &FineTuneOptions,
    device: &Device,
    observer: &mut dyn Observer,
) -> RunResult<ClassifierInfo> {
    let labelled = P::read_labelled(cfg, &opts.data)?;
    let classes = labelled.source.classes.clone();
    let train_labels = labelled.train.labels().unwrap_or_default().to_vec();
    let chosen = opts.labels.subset(&train_labels, opts.seed)?;
    let missing: Vec<String> = (0..classes.len() as u32)
        .filter(|c| train_labels.contains(c) && !chosen.iter().any(|&i| train_labels[i] == *c))
        .map(|c| classes[c as usize].clone())
        .collect();
    if !missing.is_empty() {
        return Err(RunError::Eval(format!(
            "--labels {} of {} training records is {} label(s), which leaves out class(es) {missing:?}: \
             give more, e.g. --labels 1/class",
            opts.labels.label(),
            train_labels.len(),
            chosen.len()
        )));
    }
    let chosen_set = labelled.train.subset(&chosen);
    // the validation split: the data's own, else a seeded, stratified share of the chosen labels
    let (fit, validation) = match &labelled.validation {
        Some(v) => (chosen_set.clone(), Some(v.clone())),
        None if opts.validation.fraction(chosen.len()) <= 0.0 => (chosen_set.clone(), None),
        None => {
            let l: Vec<u32> = chosen.iter().map(|&i| train_labels[i]).collect();
            let share = opts.validation.fraction(chosen.len());
            let (tr, va) = pretext_data::subset::stratified_split(&l, share, opts.seed)?;
            if va.is_empty() {
                (chosen_set.clone(), None)
            } else {
                (chosen_set.subset(&tr), Some(chosen_set.subset(&va)))
            }
        }
    };
    observer.on_message(&format!(
        "{}: {} classes; {} labels ({}): {} to train, {} to validate; {} to test ({} split)",
        opts.data.display(),
        classes.len(),
        chosen.len(),
        opts.labels.label(),
        fit.count(),
        validation.as_ref().map_or(0, Inputs::count),
        labelled.test.count(),
        labelled.source.split
    ));
    let data = ClassifierInputs {
        train: &fit,
        validation: validation.as_ref(),
        test: &labelled.test,
        classes: &classes,
    };
    let (result, files) = P::finetune(cfg, model, assets, &data, opts.frozen, device, observer)?;
    observer.on_message(&format!("test accuracy {:.2}%", result.accuracy * 100.0));

    // baselines at the same labels, on the same test set
    let mut baselines = Vec::new();
    let (raw_train, raw_test) = P::raw_features(cfg, &chosen_set, &labelled.test)?;
    let probe = LinearProbe::fit(
        &raw_train,
        &LinearProbeConfig {
            seed: opts.seed,
            ..Default::default()
        },
    )?;
    baselines.push(Baseline {
        name: "raw-linear".into(),
        description: format!("a linear probe on the raw inputs ({}), same labels", raw_name::<P>()),
        accuracy: probe.accuracy(&raw_test)?,
        beaten: false,
    });
    if opts.scratch {
        observer.on_message("the same recipe from a random initialisation (the from-scratch baseline)");
        let random = fresh()?;
        let (r, _) = P::finetune(cfg, &random, assets, &data, opts.frozen, device, observer)?;
        baselines.push(Baseline {
            name: "scratch-finetune".into(),
            description: "the same architecture and recipe from a random initialisation".into(),
            accuracy: r.accuracy,
            beaten: false,
        });
    }
    for b in &mut baselines {
        b.beaten = result.accuracy > b.accuracy;
    }
    let info = ClassifierInfo {
        paradigm: P::NAME.into(),
        task: P::TASK.into(),
        classes: classes.clone(),
        test_accuracy: result.accuracy,
        n_test: result.n_test,
        n_labels: chosen.len(),
        n_validation: result.n_validation,
        validation_accuracy: result.validation_accuracy,
        labels: opts.labels.label(),
        frozen: opts.frozen,
        init: opts.from.clone(),
        data: labelled.source.clone(),
        baselines,
        training: result,
        library: format!("pretext {}", env!("CARGO_PKG_VERSION")),
    };
    write_classifier(&opts.out, config_toml, &info, files)?;
    Ok(info)
}

fn raw_name<P: Downstream>() -> &'static str {
    if P::TASK == "text-classification" {
        "TF-IDF"
    } else {
        "pixels"
    }
}

fn json_bytes(v: &serde_json::Value, what: &str) -> RunResult<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| RunError::Core(pretext_core::Error::Config(format!("{what}: {e}"))))
}

/// Writes the classifier folder `out` atomically (never half-written).
fn write_classifier(out: &Path, config_toml: &str, info: &ClassifierInfo, files: ClassifierFiles) -> RunResult<()> {
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("pretext.paradigm".to_string(), info.paradigm.clone());
    meta.insert("pretext.task".to_string(), info.task.clone());
    meta.insert("pretext.version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    let weights = pretext_core::checkpoint::safetensors_bytes(&files.tensors, &meta)?;
    let mut config = files.config.clone();
    if !config.is_object() {
        config = serde_json::json!({});
    }
    config["pretext"] = serde_json::to_value(info)
        .map_err(|e| RunError::Core(pretext_core::Error::Config(format!("config.json: {e}"))))?;
    let card = model_card(info, &files);
    let mut all: Vec<(String, Vec<u8>)> = vec![
        ("model.safetensors".into(), weights),
        ("config.json".into(), json_bytes(&config, "config.json")?),
        ("README.md".into(), card.into_bytes()),
        (CLASSIFIER_CONFIG_TOML.into(), config_toml.as_bytes().to_vec()),
    ];
    all.extend(files.files);
    let refs: Vec<(&str, &[u8])> = all.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    pretext_core::run::write_dir_atomic(out, &refs)?;
    Ok(())
}

/// The model card of a classifier: YAML metadata (task, metrics), what it
/// is, its figures against the baselines, how to load it.
fn model_card(info: &ClassifierInfo, files: &ClassifierFiles) -> String {
    let pct = |x: f64| format!("{:.2}%", x * 100.0);
    let library = if info.task == "text-classification" {
        "transformers"
    } else {
        "pytorch"
    };
    let mut s = format!(
        "---\nlibrary_name: {library}\nlicense: mit\npipeline_tag: {task}\ntags:\n- pretext\n- self-supervised\n- {paradigm}\n- few-label\n\
metrics:\n- accuracy\nmodel-index:\n- name: pretext-{paradigm}-classifier\n  results:\n  - task:\n      type: {task}\n    dataset:\n      type: custom\n      name: {data}\n      split: test\n    metrics:\n    - type: accuracy\n      value: {acc:.4}\n      name: test accuracy, {labels} labels\n---\n\n",
        task = info.task,
        paradigm = info.paradigm,
        data = info.data.path,
        acc = info.test_accuracy,
        labels = info.labels,
    );
    s.push_str(&format!(
        "# {} classifier ({}, {} classes)\n\nAn encoder pretrained without labels by [pretext](https://github.com/pretext-rs/pretext) ({} paradigm, from `{}`), {} on {} labelled examples ({} of the training labels of `{}`) with a linear head.\n\n",
        info.task,
        files.architecture,
        info.classes.len(),
        info.paradigm,
        info.init,
        if info.frozen { "kept frozen, with a linear layer trained" } else { "fine-tuned end to end" },
        info.n_labels,
        info.labels,
        info.data.path,
    ));
    s.push_str(&format!(
        "## Test accuracy\n\n{} test examples ({} split; data SHA-256 `{}`).\n\n| model | accuracy |\n| --- | --- |\n| this classifier | {} |\n",
        info.n_test,
        info.data.split,
        info.data.sha256,
        pct(info.test_accuracy)
    ));
    for b in &info.baselines {
        s.push_str(&format!("| {} | {} |\n", b.description, pct(b.accuracy)));
    }
    if let Some(v) = info.validation_accuracy {
        s.push_str(&format!(
            "\nThe weights kept are those of the epoch with the best accuracy on {} validation examples ({}).\n",
            info.n_validation,
            pct(v)
        ));
    }
    s.push_str(&format!("\nClasses (output index: name): {}.\n\n", {
        info.classes
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i}: {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }));
    s.push_str("## Use it\n\n`pretext-");
    s.push_str(&info.paradigm);
    s.push_str(" predict THIS_FOLDER --data PATH` writes one JSON line per input.\n\n");
    s.push_str(&files.python);
    s
}

/// A loaded classifier folder: its class names and what `config.json` says.
#[derive(Debug, Clone)]
pub struct ClassifierFolder {
    /// The folder.
    pub dir: PathBuf,
    /// Its `pretext` section.
    pub info: ClassifierInfo,
}

impl ClassifierFolder {
    /// Reads `dir/config.json`.
    ///
    /// # Errors
    /// Not a classifier folder (no `config.json` with a `pretext` section), named.
    pub fn open(dir: &Path) -> RunResult<Self> {
        let path = dir.join("config.json");
        if pretext_core::warm_start::is_run_folder(dir) {
            return Err(RunError::Data(pretext_data::Error::format(
                dir,
                format!(
                    "a run folder, not a classifier: `finetune {} --data LABELLED` writes one (into {}/classifiers/)",
                    dir.display(),
                    dir.display()
                ),
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| {
            RunError::Data(pretext_data::Error::format(
                &path,
                format!(
                    "cannot read it ({e}): is {} a classifier folder written by `finetune`?",
                    dir.display()
                ),
            ))
        })?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| RunError::Data(pretext_data::Error::format(&path, format!("not JSON ({e})"))))?;
        let info: ClassifierInfo =
            serde_json::from_value(v.get("pretext").cloned().unwrap_or_default()).map_err(|e| {
                RunError::Data(pretext_data::Error::format(
                    &path,
                    format!("no valid `pretext` section ({e}): not a classifier written by `finetune`"),
                ))
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            info,
        })
    }
}

/// One line of `predict`'s output.
#[derive(Serialize)]
struct Prediction<'a> {
    row: usize,
    id: String,
    label: &'a str,
    probability: f32,
    probabilities: std::collections::BTreeMap<&'a str, f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    true_label: Option<&'a str>,
}

/// What [`predict`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictSummary {
    /// Records predicted.
    pub rows: usize,
    /// Accuracy against the data's labels, where it has labels whose
    /// classes are the classifier's.
    pub accuracy: Option<f64>,
}

/// Predicts every record of `data` with the classifier in `folder` and
/// writes one JSON line per record to `out`: `row`, `id` (path or row),
/// `label` (top class), `probability` (its probability), `probabilities`
/// (every class), and `true_label` where the data is labelled.
///
/// # Errors
/// Unreadable data; labelled data whose classes the classifier does not
/// have; I/O errors naming the file.
pub fn predict<P: Downstream>(
    cfg: &P::Config,
    folder: &ClassifierFolder,
    data: &Path,
    out: &Path,
    device: &Device,
    observer: &mut dyn Observer,
) -> RunResult<PredictSummary> {
    let classes = &folder.info.classes;
    let inputs = P::read_inputs(cfg, data)?;
    // labelled data must have the classifier's classes (by name)
    let truth: Option<Vec<usize>> = match inputs.labels() {
        Some(labels) => {
            let map: Vec<Option<usize>> = (0..=labels.iter().copied().max().unwrap_or(0))
                .map(|c| classes.iter().position(|k| *k == inputs.class_name(c)))
                .collect();
            let unknown: Vec<String> = (0..map.len())
                .filter(|&c| map[c].is_none() && labels.contains(&(c as u32)))
                .map(|c| inputs.class_name(c as u32))
                .collect();
            if !unknown.is_empty() {
                return Err(RunError::Data(pretext_data::Error::format(
                    data,
                    format!(
                        "classes {unknown:?} are not the classifier's ({classes:?}); predict takes unlabelled data or data of the same classes"
                    ),
                )));
            }
            Some(labels.iter().map(|&l| map[l as usize].unwrap_or(0)).collect())
        }
        None => None,
    };
    let clf = P::load_classifier(cfg, &folder.dir, device)?;
    let probs = P::predict(cfg, &clf, &inputs, device, observer)?;
    let k = classes.len();
    if probs.len() != inputs.count() * k {
        return Err(RunError::Eval(format!(
            "the classifier gave {} probabilities for {} records of {k} classes",
            probs.len(),
            inputs.count()
        )));
    }
    let mut lines = Vec::with_capacity(inputs.count() * (40 + 12 * k));
    let mut correct = 0usize;
    for i in 0..inputs.count() {
        let p = &probs[i * k..(i + 1) * k];
        let top = (0..k)
            .max_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)))
            .unwrap_or(0);
        let line = Prediction {
            row: i,
            id: inputs.id(i),
            label: &classes[top],
            probability: p[top],
            probabilities: classes.iter().map(String::as_str).zip(p.iter().copied()).collect(),
            true_label: truth.as_ref().map(|t| classes[t[i]].as_str()),
        };
        if let Some(t) = &truth {
            correct += usize::from(t[i] == top);
        }
        serde_json::to_writer(&mut lines, &line)
            .map_err(|e| RunError::Core(pretext_core::Error::Config(format!("a prediction as JSON: {e}"))))?;
        lines.push(b'\n');
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| pretext_core::Error::io(parent, e))?;
    }
    pretext_core::run::write_atomic(out, &lines)?;
    Ok(PredictSummary {
        rows: inputs.count(),
        accuracy: truth.map(|_| correct as f64 / inputs.count().max(1) as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_automatic_validation_split_needs_500_records() {
        assert_eq!(
            ValidationSplit::Auto.fraction(600),
            0.0,
            "60 records choose epochs by noise"
        );
        assert_eq!(ValidationSplit::Auto.fraction(4_999), 0.1);
        assert_eq!(ValidationSplit::Auto.fraction(4_900), 0.0);
        assert_eq!(ValidationSplit::Fraction(0.2).fraction(10), 0.2);
    }

    #[test]
    fn label_budgets_parse_and_pick_balanced_subsets() -> RunResult<()> {
        assert_eq!(LabelBudget::parse("1%"), Ok(LabelBudget::Fraction(0.01)));
        assert_eq!(LabelBudget::parse("0.5"), Ok(LabelBudget::Fraction(0.5)));
        assert_eq!(LabelBudget::parse("10/class"), Ok(LabelBudget::PerClass(10)));
        assert_eq!(LabelBudget::parse("3-per-class"), Ok(LabelBudget::PerClass(3)));
        assert!(LabelBudget::parse("0/class").is_err());
        assert!(LabelBudget::parse("150%").is_err());
        assert!(LabelBudget::parse("some").is_err());
        // 3 classes of 10, 10, 2 items
        let labels: Vec<u32> = (0..22)
            .map(|i| {
                if i < 10 {
                    0
                } else if i < 20 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let pick = LabelBudget::PerClass(4).subset(&labels, 0)?;
        let count = |c: u32| pick.iter().filter(|&&i| labels[i] == c).count();
        assert_eq!((count(0), count(1), count(2)), (4, 4, 2));
        assert_eq!(LabelBudget::Fraction(1.0).subset(&labels, 0)?.len(), 22);
        assert_eq!(LabelBudget::PerClass(4).label(), "4/class");
        Ok(())
    }
}
