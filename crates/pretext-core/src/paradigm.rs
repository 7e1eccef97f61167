//! One orchestration for every paradigm: a [`Paradigm`] says how to build
//! its data, model and batches from its config and how it monitors itself
//! at epoch ends; [`pretrain`], [`resume`], [`load_trained`], [`probe`] and
//! [`export`] are written once over it, and so is the command-line runner
//! built on them (`pretext_cli::runner`).
//!
//! Adding a paradigm is implementing this trait; adding a command for every
//! paradigm is writing one generic function here (and its subcommand in the
//! runner).

use crate::checkpoint::load_checkpoint;
use crate::run::{write_dir_atomic, RunDir};
use crate::trainer::{load_model_weights, model_vars, Method, Monitor, Observer, TrainConfig, Trainer};
use crate::warm_start::{load_initial_weights, InitRecord, InitialWeights};
use crate::{BatchSource, Error, OptimConfig, ScheduleConfig};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// A self-supervised paradigm (contrastive, generative, masked language
/// modeling): its config, model, data and epoch-end monitoring.
pub trait Paradigm: Sized {
    /// Short name for run folders and reports (`contrastive`).
    const NAME: &'static str;
    /// Whether `probe` can fine-tune (else `--no-finetune` is meaningless).
    const FINETUNES: bool = true;

    /// The run's configuration (`config.toml`).
    type Config: Clone;
    /// The trained model.
    type Model: Method;
    /// What a run keeps beside its weights, made at the start of a run from
    /// its data (MLM: the tokenizer); `()` where there is nothing.
    type Assets;
    /// The loaded data (training set, held-out monitoring set).
    type Data;
    /// The training batches.
    type Batches: BatchSource<Batch = <Self::Model as Method>::Batch>;
    /// What the paradigm's operations fail with.
    type Error: From<Error>;

    /// The name reports give the shipped dataset (an empty `data.path`).
    const SHIPPED_DATA: &'static str;

    /// The sections of the config that every paradigm has.
    fn sections(cfg: &Self::Config) -> Sections<'_>;

    /// The dataset name for reports: [`Self::SHIPPED_DATA`] for the shipped
    /// data, else the path.
    fn dataset_name(cfg: &Self::Config) -> String {
        match Self::sections(cfg).data_path {
            "" => Self::SHIPPED_DATA.to_string(),
            path => path.to_string(),
        }
    }

    /// Checks the config as a whole before anything is read or written.
    ///
    /// # Errors
    /// A key with a value that cannot work, named.
    fn validate(cfg: &Self::Config) -> Result<(), Self::Error>;

    /// Loads the data the config names. With `assets` (a resumed or
    /// evaluated run's), uses them; without, makes them from the data.
    ///
    /// # Errors
    /// Unreadable or malformed data, naming the file.
    fn load_data(
        cfg: &Self::Config,
        assets: Option<Self::Assets>,
        observer: &mut dyn Observer,
    ) -> Result<(Self::Data, Self::Assets), Self::Error>;

    /// Writes the assets into a new run.
    ///
    /// # Errors
    /// I/O errors naming the file.
    fn save_assets(_assets: &Self::Assets, _run: &RunDir) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Reads the assets of an existing run.
    ///
    /// # Errors
    /// Missing or unreadable assets.
    fn load_assets(cfg: &Self::Config, run: &RunDir) -> Result<Self::Assets, Self::Error>;

    /// A freshly initialised model (seeded by `train.seed`).
    ///
    /// # Errors
    /// A config that does not describe a model.
    fn new_model(cfg: &Self::Config, assets: &Self::Assets, device: &Device) -> Result<Self::Model, Self::Error>;

    /// The training batches of `data`.
    ///
    /// # Errors
    /// A config the batcher cannot work with.
    fn batches(
        cfg: &Self::Config,
        data: &Self::Data,
        assets: &Self::Assets,
        device: &Device,
    ) -> Result<Self::Batches, Self::Error>;

    /// When to evaluate during a run; the run evaluates after its last step
    /// whatever this says.
    fn eval_schedule(cfg: &Self::Config) -> EvalSchedule;

    /// The online evaluation after `step` steps: the records to append to
    /// `metrics.jsonl` (none where the data allows none).
    ///
    /// # Errors
    /// Tensor errors; data the evaluation cannot use.
    fn evaluate(
        cfg: &Self::Config,
        data: &Self::Data,
        assets: &Self::Assets,
        model: &Self::Model,
        at: EvalPoint,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> Result<Vec<serde_json::Value>, Self::Error>;

    /// The transfer evaluation of a trained run (writes `report/`) on the
    /// run's own data or on `opts.data`; returns the summary to print.
    ///
    /// # Errors
    /// Unlabelled data, invalid fractions, tensor and I/O errors.
    fn probe(
        cfg: &Self::Config,
        trained: &Trained<Self>,
        opts: &ProbeOptions<'_>,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> Result<String, Self::Error>;

    /// The files of `export/` (name, bytes): weights under the names the
    /// Python ecosystem loads, `config.json`, a model card.
    ///
    /// # Errors
    /// Tensor and encoding errors.
    fn export_files(cfg: &Self::Config, trained: &Trained<Self>) -> Result<Vec<(String, Vec<u8>)>, Self::Error>;

    /// Reads the initial weights of a source other than a run folder (run
    /// folders are read the same way for every paradigm): the paradigm's
    /// export, a Hugging Face or torchvision checkpoint; the tensors under
    /// the model's names, and the assets the source brings (a tokenizer).
    ///
    /// # Errors
    /// A source without weights, or not of this paradigm, named.
    fn initial_weights(
        cfg: &Self::Config,
        spec: &InitSpec,
        device: &Device,
    ) -> Result<(InitialWeights, Option<Self::Assets>), Self::Error>;

    /// Whether the model tensor `name` must come from initial weights (the
    /// encoder) rather than start freshly initialised when the source lacks
    /// it (a projection or MLM head).
    fn init_required(_name: &str) -> bool {
        true
    }

    /// The config settings (`key=value`, TOML values) a source other than a
    /// run folder asks for: its architecture, read off its `config.json` or
    /// its weights, so the model built fits them. Run folders give their own
    /// `model` section (the command line reads it).
    ///
    /// # Errors
    /// An unreadable source, or one of another paradigm, named.
    fn init_settings(_spec: &InitSpec) -> Result<Vec<String>, Self::Error> {
        Ok(vec![])
    }
}

/// Where a run's initial weights come from (`--init`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSpec {
    /// The source as the user gave it (recorded in the run).
    pub source: String,
    /// The local file or folder it names (the Hub's cached copy for `hub:`).
    pub path: PathBuf,
}

/// The weights and assets of `spec`: a run folder's latest checkpoint and
/// assets, or what the paradigm reads of another source.
fn source_weights<P: Paradigm>(
    cfg: &P::Config,
    spec: &InitSpec,
    device: &Device,
) -> Result<(InitialWeights, Option<P::Assets>), P::Error> {
    if crate::warm_start::is_run_folder(&spec.path) {
        let run = RunDir::open(&spec.path)?;
        let w = crate::warm_start::run_weights(&spec.path, &spec.source, device)?;
        let assets = P::load_assets(cfg, &run)?;
        return Ok((w, Some(assets)));
    }
    P::initial_weights(cfg, spec, device)
}

/// Copies `w` into `model` and lets it rebuild what derives from its weights.
fn warm_start<P: Paradigm>(model: &mut P::Model, w: &InitialWeights) -> Result<InitRecord, P::Error> {
    let record = load_initial_weights(&model_vars(model), w, &P::init_required)?;
    model.weights_loaded()?;
    Ok(record)
}

/// A model of `cfg` holding the weights of `spec`, its assets and what was
/// loaded (`finetune --init`).
///
/// # Errors
/// As [`Paradigm::initial_weights`]; a source without the assets the model
/// needs (a tokenizer); weights that do not fit the model.
pub fn initialised_model<P: Paradigm>(
    cfg: &P::Config,
    spec: &InitSpec,
    device: &Device,
) -> Result<(P::Model, P::Assets, InitRecord), P::Error> {
    let (w, assets) = source_weights::<P>(cfg, spec, device)?;
    let assets = assets.ok_or_else(|| {
        Error::corrupt(
            &spec.path,
            "the source brings no tokenizer (tokenizer.json or vocab.txt) for its weights",
        )
    })?;
    let mut model = P::new_model(cfg, &assets, device)?;
    let record = warm_start::<P>(&mut model, &w)?;
    Ok((model, assets, record))
}

/// The sections of a paradigm's config that the orchestration reads.
#[derive(Debug, Clone, Copy)]
pub struct Sections<'a> {
    /// `train.*`.
    pub train: &'a TrainConfig,
    /// `optim.*`.
    pub optim: &'a OptimConfig,
    /// `schedule.*`.
    pub schedule: &'a ScheduleConfig,
    /// `data.path` (empty: the shipped data).
    pub data_path: &'a str,
}

impl<'a> Sections<'a> {
    /// The sections, from a config's `train`, `optim`, `schedule` and `data.path`.
    pub fn new(
        train: &'a TrainConfig,
        optim: &'a OptimConfig,
        schedule: &'a ScheduleConfig,
        data_path: &'a str,
    ) -> Self {
        Self {
            train,
            optim,
            schedule,
            data_path,
        }
    }
}

/// What `probe` measures, and on which data.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions<'a> {
    /// Label fractions of the linear probe and kNN (and of fine-tuning up to
    /// the config's limit).
    pub fractions: &'a [f64],
    /// Whether to fine-tune (pretrained against from scratch).
    pub finetune: bool,
    /// Labelled data other than the run's own (`probe --data PATH`): its own
    /// train/test split where it has one, a seeded stratified one otherwise.
    pub data: Option<&'a Path>,
}

/// When a run evaluates itself (besides after its last step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSchedule {
    /// At the end of every n-th epoch (0: only after the last step).
    Epochs(u64),
    /// After every n-th step (0: only after the last step).
    Steps(u64),
}

impl EvalSchedule {
    /// Whether an evaluation is due after `step` completed steps in epochs of
    /// `steps_per_epoch`.
    pub fn due(self, step: u64, steps_per_epoch: u64) -> bool {
        match self {
            Self::Epochs(n) => {
                let spe = steps_per_epoch.max(1);
                n > 0 && step.is_multiple_of(spe) && (step / spe).is_multiple_of(n)
            }
            Self::Steps(n) => n > 0 && step.is_multiple_of(n),
        }
    }
}

/// Where in a run an online evaluation happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalPoint {
    /// Completed steps.
    pub step: u64,
    /// Steps per epoch.
    pub steps_per_epoch: u64,
}

impl EvalPoint {
    /// The epoch the step ends or lies in (1-based: step 6 of 6 per epoch is epoch 1).
    pub fn epoch(&self) -> u64 {
        self.step.div_ceil(self.steps_per_epoch.max(1))
    }
}

/// A run's model with the weights of its latest checkpoint.
pub struct Trained<P: Paradigm> {
    /// The run folder.
    pub run: RunDir,
    /// The run's assets.
    pub assets: P::Assets,
    /// The model.
    pub model: P::Model,
    /// The checkpoint folder the weights came from.
    pub checkpoint: PathBuf,
    /// Its step.
    pub step: u64,
}

/// The epoch-end hook of a paradigm's run, for [`Trainer::train`].
struct EpochEnd<'a, P: Paradigm> {
    cfg: &'a P::Config,
    data: &'a P::Data,
    assets: &'a P::Assets,
    device: &'a Device,
}

impl<P: Paradigm> Monitor<P::Model> for EpochEnd<'_, P> {
    type Error = P::Error;

    fn due(&self, step: u64, steps_per_epoch: u64) -> bool {
        P::eval_schedule(self.cfg).due(step, steps_per_epoch)
    }

    fn evaluate(
        &mut self,
        model: &P::Model,
        step: u64,
        steps_per_epoch: u64,
        observer: &mut dyn Observer,
    ) -> Result<Vec<serde_json::Value>, P::Error> {
        let at = EvalPoint { step, steps_per_epoch };
        P::evaluate(self.cfg, self.data, self.assets, model, at, self.device, observer)
    }
}

fn new_trainer<P: Paradigm>(
    cfg: &P::Config,
    assets: &P::Assets,
    device: &Device,
) -> Result<Trainer<P::Model>, P::Error> {
    let model = P::new_model(cfg, assets, device)?;
    let s = P::sections(cfg);
    Ok(Trainer::new(model, s.optim, s.schedule, s.train)?)
}

/// Trains `trainer` (attached to its run) on `batches` to the end with the
/// paradigm's epoch-end evaluations.
fn train_to_end<P: Paradigm>(
    cfg: &P::Config,
    data: &P::Data,
    assets: &P::Assets,
    mut trainer: Trainer<P::Model>,
    mut batches: P::Batches,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<(), P::Error> {
    let mut monitor = EpochEnd::<P> {
        cfg,
        data,
        assets,
        device,
    };
    trainer.train(&mut batches, &mut monitor, observer)?;
    Ok(())
}

/// Starts a run in `out` with `cfg` (whose resolved TOML is `config_toml`)
/// and trains it to the end, evaluating at epoch ends.
///
/// Nothing is written before the config is valid and the data has loaded.
///
/// # Errors
/// Invalid config, unreadable data, a run already in `out`, divergence.
pub fn pretrain<P: Paradigm>(
    cfg: &P::Config,
    config_toml: &str,
    out: &Path,
    init: Option<&InitSpec>,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<RunDir, P::Error> {
    P::validate(cfg)?;
    let (weights, init_assets) = match init {
        Some(spec) => {
            let (w, a) = source_weights::<P>(cfg, spec, device)?;
            (Some(w), a)
        }
        None => (None, None),
    };
    // Data-parallel: rank 0 makes the assets (MLM's tokenizer: its trainer
    // numbers tied pieces in hash order, so ranks making their own could
    // disagree) and writes them with the run folder below; the others wait
    // for that, then read them there (a file system every rank sees, as
    // `resume` needs). An error on rank 0 aborts every rank, so the wait ends.
    let world = crate::dist::world();
    let init_assets = if world.is_root() {
        init_assets
    } else {
        world.barrier();
        let run = RunDir::open(out).map_err(|e| {
            Error::Config(format!(
                "rank {} cannot read the run folder rank 0 wrote ({e}): a data-parallel run's folder \
                 must be on a file system every process sees",
                world.rank()
            ))
        })?;
        Some(P::load_assets(cfg, &run)?)
    };
    let (data, assets) = P::load_data(cfg, init_assets, observer)?;
    let mut model = P::new_model(cfg, &assets, device)?;
    let record = match &weights {
        Some(w) => {
            let r = warm_start::<P>(&mut model, w)?;
            observer.on_message(&r.summary());
            tracing::info!(source = %r.source, loaded = r.loaded, initialised = ?r.initialised, unused = ?r.unused, "initial weights");
            Some(r)
        }
        None => None,
    };
    let s = P::sections(cfg);
    let mut trainer = Trainer::new(model, s.optim, s.schedule, s.train)?;
    trainer.set_init(record.clone());
    let batches = P::batches(cfg, &data, &assets, device)?;
    // Rank 0 writes the run folder; the others train beside it.
    let run = if world.is_root() {
        let run = RunDir::create(out, config_toml)?;
        P::save_assets(&assets, &run)?;
        world.barrier();
        trainer.attach_run(&run)?;
        if let Some(r) = &record {
            trainer.log_record(&r.to_json())?;
        }
        run
    } else {
        RunDir::unopened(out)
    };
    train_to_end::<P>(cfg, &data, &assets, trainer, batches, device, observer)?;
    Ok(run)
}

/// Continues the run in `dir` (whose `config.toml` the caller parsed into
/// `cfg`) from its latest checkpoint, on the exact trajectory of an
/// uninterrupted run: same batches, same evaluations, same records.
///
/// # Errors
/// No run or checkpoint there; a config or checkpoint that does not fit.
pub fn resume<P: Paradigm>(
    dir: &Path,
    cfg: &P::Config,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<RunDir, P::Error> {
    P::validate(cfg)?;
    let run = RunDir::open(dir)?;
    let assets = P::load_assets(cfg, &run)?;
    let (data, assets) = P::load_data(cfg, Some(assets), observer)?;
    let mut trainer = new_trainer::<P>(cfg, &assets, device)?;
    let batches = P::batches(cfg, &data, &assets, device)?;
    let (latest, ckpt) = run
        .checkpoints(P::sections(cfg).train.keep_checkpoints)
        .load_latest_with_path(device)?;
    trainer.resume(&ckpt, &latest)?;
    // Data-parallel: every rank reads the checkpoint (the run folder is on
    // a shared file system); rank 0 writes.
    if crate::dist::world().is_root() {
        trainer.attach_run(&run)?;
    }
    observer.on_message(&format!("resuming from {} (step {})", latest.display(), trainer.step()));
    train_to_end::<P>(cfg, &data, &assets, trainer, batches, device, observer)?;
    Ok(run)
}

/// The model of the run in `dir` with the weights of its latest checkpoint.
///
/// # Errors
/// No run, assets or checkpoint there; a checkpoint that does not fit the config.
pub fn load_trained<P: Paradigm>(dir: &Path, cfg: &P::Config, device: &Device) -> Result<Trained<P>, P::Error> {
    let run = RunDir::open(dir)?;
    let assets = P::load_assets(cfg, &run)?;
    let mgr = run.checkpoints(P::sections(cfg).train.keep_checkpoints);
    let checkpoint = mgr
        .latest()?
        .ok_or_else(|| Error::NoCheckpoint(mgr.dir().to_path_buf()))?;
    let ckpt = load_checkpoint(&checkpoint, device)?;
    let model = P::new_model(cfg, &assets, device)?;
    load_model_weights(&model, &ckpt, &checkpoint)?;
    Ok(Trained {
        run,
        assets,
        model,
        checkpoint,
        step: ckpt.trainer.step,
    })
}

/// Evaluates the run in `dir` (see [`Paradigm::probe`]); returns the summary to print.
///
/// # Errors
/// As [`load_trained`] and [`Paradigm::probe`].
pub fn probe<P: Paradigm>(
    dir: &Path,
    cfg: &P::Config,
    opts: &ProbeOptions<'_>,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<String, P::Error> {
    P::validate(cfg)?;
    let trained = load_trained::<P>(dir, cfg, device)?;
    P::probe(cfg, &trained, opts, device, observer)
}

/// Writes the run's `export/` folder (see [`Paradigm::export_files`])
/// through a temporary folder, so it is never half-written; returns it.
///
/// # Errors
/// As [`load_trained`]; I/O errors naming the path.
pub fn export<P: Paradigm>(dir: &Path, cfg: &P::Config, device: &Device) -> Result<PathBuf, P::Error> {
    let trained = load_trained::<P>(dir, cfg, device)?;
    let files = P::export_files(cfg, &trained)?;
    let out = trained.run.export_path();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    write_dir_atomic(&out, &refs)?;
    Ok(out)
}
