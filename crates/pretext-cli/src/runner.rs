//! One command-line runner for every paradigm: `pretrain`, `resume`,
//! `probe`, `export`, `embed`, `finetune` and `predict` are written here
//! once over a [`Tool`] (a [`Paradigm`](pretext_core::paradigm::Paradigm) and its [`Downstream`] with its
//! built-in config and help texts); each binary adds only its own
//! subcommands (`sample`, `fill-mask`, `tokenizer`).

use crate::args::{CommonArgs, EmbedArgs, FinetuneArgs, PredictArgs, ProbeArgs, ResumeArgs, RunArg};
use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use pretext_core::paradigm;
use pretext_eval::downstream::{self, Downstream};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A paradigm as a command-line tool.
pub trait Tool: Downstream
where
    Self::Config: DeserializeOwned + Serialize,
    Self::Error: std::error::Error + Send + Sync + 'static,
{
    /// The binary's name (`pretext-contrastive`).
    const BIN: &'static str;
    /// The built-in config (TOML) that `--config` and `--set` change.
    const DEFAULT_CONFIG: &'static str;
    /// One line on what the tool does (`--help`'s first line).
    const ABOUT: &'static str;
    /// What `--help` adds below it.
    const LONG_ABOUT: &'static str;
    /// Help of `pretrain`.
    const PRETRAIN_HELP: &'static str;
    /// Help of `probe`.
    const PROBE_HELP: &'static str;
    /// Help of `export`.
    const EXPORT_HELP: &'static str;

    /// The label of progress lines and of default run folders (`simclr`).
    fn label(cfg: &Self::Config) -> String;
}

/// Flags of `pretrain` that belong to one paradigm (`--method`), as config overrides.
pub trait PretrainFlags: Args {
    /// The overrides these flags stand for (`method="moco"`).
    fn overrides(&self) -> Vec<String>;

    /// A built-in config (TOML) these flags choose, merged over the tool's
    /// default before `--config` and `--set` (a method's own recipe).
    fn preset(&self) -> Option<&'static str> {
        None
    }
}

/// A paradigm's methods as the values of `pretrain --method`.
pub trait MethodChoice: clap::ValueEnum + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The method's name in the config (`method = "barlow_twins"`).
    fn config_name(&self) -> &'static str;

    /// The method's built-in recipe (TOML), merged over the tool's default
    /// under `--config` and `--set`; `None` when the default is its recipe.
    fn preset(&self) -> Option<&'static str>;
}

/// `pretrain --method NAME`: the method and its built-in recipe.
#[derive(Debug, Clone, Args)]
pub struct MethodFlag<M: MethodChoice> {
    /// The method, with its built-in recipe (under --config and --set).
    /// Default: the config's `method`.
    #[arg(long, value_enum)]
    pub method: Option<M>,
}

impl<M: MethodChoice> PretrainFlags for MethodFlag<M> {
    fn overrides(&self) -> Vec<String> {
        self.method
            .as_ref()
            .map(|m| vec![format!("method={:?}", m.config_name())])
            .unwrap_or_default()
    }

    fn preset(&self) -> Option<&'static str> {
        self.method.as_ref().and_then(MethodChoice::preset)
    }
}

/// A paradigm without flags of its own.
#[derive(Debug, Clone, Args)]
pub struct NoFlags {}

impl PretrainFlags for NoFlags {
    fn overrides(&self) -> Vec<String> {
        vec![]
    }
}

/// A binary's own subcommands, run after the shared ones are parsed.
pub trait Extra: Subcommand {
    /// Runs the subcommand.
    ///
    /// # Errors
    /// Whatever it fails with, with context.
    fn run(self) -> anyhow::Result<()>;
}

/// No subcommands of its own.
#[derive(Debug, Clone, Subcommand)]
pub enum NoExtra {}

impl Extra for NoExtra {
    fn run(self) -> anyhow::Result<()> {
        match self {}
    }
}

/// The shared subcommands, plus the binary's own.
#[allow(missing_docs)] // doc comments here would become `--help` text
#[derive(Debug, Subcommand)]
pub enum Command<F: PretrainFlags, X: Extra> {
    /// Pretrain on unlabeled data; writes a run folder.
    Pretrain {
        /// The data: images (IDX, CIFAR batches, a folder) or text (fortunes,
        /// .txt, .jsonl, .parquet), format detected; default: the shipped data.
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        /// Start from existing weights instead of a random initialisation: a
        /// run folder, an export folder, a Hugging Face BERT folder
        /// (pretext-mlm), torchvision ResNet-18 or timm ViT-Tiny/Small weights
        /// in a .safetensors file (pretext-contrastive), or
        /// hub:owner/name[@revision]. The model's
        /// architecture is taken from the source.
        #[arg(long, value_name = "SOURCE")]
        init: Option<String>,
        #[command(flatten)]
        flags: F,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Continue a run from its latest checkpoint (same trajectory as uninterrupted).
    Resume(ResumeArgs),
    /// Evaluate the pretrained model against baselines -> RUN/report/.
    Probe(ProbeArgs),
    /// Write the model for the Python ecosystem and the Hub -> RUN/export/.
    Export(RunArg),
    /// Write the frozen features of every input (the probe's) to a file:
    /// Parquet, NumPy or JSON lines, with each input's path or row and label.
    Embed(EmbedArgs),
    /// Train a classifier on labelled data from the pretrained encoder (with
    /// early stopping on a validation split) -> a folder PyTorch / Hugging
    /// Face load, with its test accuracy and the baselines it beat.
    Finetune(FinetuneArgs),
    /// Classify data with a `finetune` folder: one JSON line per input.
    Predict(PredictArgs),
    #[command(flatten)]
    Extra(X),
}

#[derive(Debug, Parser)]
#[command(version)]
struct Cli<F: PretrainFlags, X: Extra> {
    #[command(subcommand)]
    command: Command<F, X>,
}

/// The config of the run in `run`, with `overrides` applied.
///
/// # Errors
/// Not a run folder; an unparsable config or override.
pub fn run_config<T: DeserializeOwned + Serialize>(run: &Path, overrides: &[String]) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(run.join("config.toml"))
        .with_context(|| format!("{} is not a run folder (no config.toml)", run.display()))?;
    Ok(crate::config::resolve(&text, None, overrides)
        .with_context(|| format!("parsing {}/config.toml", run.display()))?
        .config)
}

/// The config (with `overrides`) and the device of a command on the existing
/// run `run`.
fn existing_run<T: DeserializeOwned + Serialize>(
    run: &Path,
    overrides: &[String],
    device: &str,
) -> anyhow::Result<(T, candle_core::Device)> {
    crate::init_tracing(false);
    let cfg = run_config(run, overrides)?;
    Ok((cfg, pretext_core::select_device(device)?))
}

/// The settings `--init SOURCE` brings: its architecture (a run folder's
/// `model` section and image shape, or what the paradigm reads off another
/// source), and `train.init` recording the source.
fn init_settings<P>(spec: &paradigm::InitSpec) -> anyhow::Result<Vec<String>>
where
    P: Tool,
    P::Config: DeserializeOwned + Serialize,
    P::Error: std::error::Error + Send + Sync + 'static,
{
    let mut out = if pretext_core::warm_start::is_run_folder(&spec.path) {
        let file = spec.path.join("config.toml");
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let table: toml::Table = text.parse().with_context(|| format!("parsing {}", file.display()))?;
        let mut v = Vec::new();
        if let Some(toml::Value::Table(m)) = table.get("model") {
            crate::config::flatten("model", m, &mut v);
        }
        if let Some(toml::Value::Table(d)) = table.get("data") {
            for key in ["channels", "image_size"] {
                if let Some(x) = d.get(key) {
                    v.push(format!("data.{key}={x}"));
                }
            }
        }
        v
    } else {
        P::init_settings(spec).with_context(|| format!("--init {}", spec.source))?
    };
    out.push(format!("train.init={:?}", spec.source));
    Ok(out)
}

/// A config file (`file`, e.g. a run's `config.toml`) with `overrides`
/// applied, and its resolved TOML.
fn config_file<T: DeserializeOwned + Serialize>(
    file: &Path,
    overrides: &[String],
) -> anyhow::Result<crate::config::Resolved<T>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{} is missing: not a folder pretext wrote", file.display()))?;
    crate::config::resolve(&text, None, overrides).with_context(|| format!("parsing {}", file.display()))
}

/// The data a command on the run with config `cfg` reads by default: the
/// run's own, or the shipped dataset.
fn own_data<P: Tool>(cfg: &P::Config) -> anyhow::Result<PathBuf>
where
    P::Config: DeserializeOwned + Serialize,
    P::Error: std::error::Error + Send + Sync + 'static,
{
    Ok(match P::sections(cfg).data_path {
        "" => pretext_data::shipped::datasets_dir()?.join(P::SHIPPED_DATA),
        p => PathBuf::from(p),
    })
}

fn default_out(name: &str, label: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{name}-{label}-{secs}"))
}

/// Parses the command line and runs the tool `P` with pretrain flags `F`
/// and extra subcommands `X`; the `main` of every binary.
pub fn main<P, F, X>() -> ExitCode
where
    P: Tool,
    P::Config: DeserializeOwned + Serialize,
    P::Error: std::error::Error + Send + Sync + 'static,
    F: PretrainFlags,
    X: Extra,
{
    pretext_core::cpu::prepare_process();
    let mut cmd = Cli::<F, X>::command()
        .name(P::BIN)
        .about(P::ABOUT)
        .long_about(format!("{}\n\n{}", P::ABOUT, P::LONG_ABOUT))
        .mut_subcommand("pretrain", |c| c.about(P::PRETRAIN_HELP))
        .mut_subcommand("probe", |c| {
            let c = c.about(P::PROBE_HELP);
            if P::FINETUNES {
                c
            } else {
                c.mut_arg("no_finetune", |a| a.hide(true))
            }
        })
        .mut_subcommand("export", |c| c.about(P::EXPORT_HELP));
    let matches = cmd.get_matches_mut();
    let cli = match Cli::<F, X>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.format(&mut cmd).exit(),
    };
    crate::run_main(|| run::<P, F, X>(cli.command))
}

fn run<P, F, X>(command: Command<F, X>) -> anyhow::Result<()>
where
    P: Tool,
    P::Config: DeserializeOwned + Serialize,
    P::Error: std::error::Error + Send + Sync + 'static,
    F: PretrainFlags,
    X: Extra,
{
    // A kernel request this CPU cannot honour stops the tool before any work.
    pretext_core::cpu::KernelSet::from_env().context("environment")?;
    let world = pretext_core::dist::world();
    if world.size() > 1 && !matches!(command, Command::Pretrain { .. } | Command::Resume(_)) {
        anyhow::bail!(
            "started among {} processes: only `pretrain` and `resume` train data-parallel; \
             run the other commands as one process (without mpirun)",
            world.size()
        );
    }
    let started = std::time::Instant::now();
    match command {
        Command::Pretrain {
            data,
            init,
            flags,
            common,
        } => {
            crate::init_tracing(common.verbose);
            let mut overrides = flags.overrides();
            if let Some(d) = &data {
                overrides.push(format!("data.path={:?}", d.display().to_string()));
            }
            let init = init.as_deref().map(crate::hub::resolve).transpose()?;
            if let Some(spec) = &init {
                overrides.extend(init_settings::<P>(spec)?);
            }
            overrides.extend(common.all_overrides());
            let defaults = match flags.preset() {
                Some(preset) => crate::config::layered(P::DEFAULT_CONFIG, preset)?,
                None => P::DEFAULT_CONFIG.to_string(),
            };
            let resolved: crate::config::Resolved<P::Config> =
                crate::config::resolve(&defaults, common.config.as_deref(), &overrides)?;
            P::validate(&resolved.config)?;
            let device = pretext_core::select_device(&common.device)?;
            let label = P::label(&resolved.config);
            let out = common.out.clone().unwrap_or_else(|| default_out(P::NAME, &label));
            let mut observer = observer(&label, common.quiet);
            let run = paradigm::pretrain::<P>(
                &resolved.config,
                &resolved.toml,
                &out,
                init.as_ref(),
                &device,
                &mut observer,
            )
            .with_context(|| format!("pretraining into {}", out.display()))?;
            if world.is_root() {
                println!("pretrained in {} (wall)", wall_time(started.elapsed()));
                println!("run folder: {}", run.root().display());
            }
        }
        Command::Resume(ResumeArgs { run, device, quiet }) => {
            let (cfg, device) = existing_run::<P::Config>(&run, &[], &device)?;
            let mut observer = observer(&P::label(&cfg), quiet);
            paradigm::resume::<P>(&run, &cfg, &device, &mut observer)
                .with_context(|| format!("resuming {}", run.display()))?;
            if world.is_root() {
                println!("resumed and finished in {} (wall)", wall_time(started.elapsed()));
                println!("run folder: {}", run.display());
            }
        }
        Command::Probe(args) => {
            if args.no_finetune && !P::FINETUNES {
                anyhow::bail!("probe --no-finetune: pretext-{} probes without fine-tuning", P::NAME);
            }
            let fractions = args
                .labels
                .iter()
                .map(|l| crate::args::parse_fraction(l))
                .collect::<anyhow::Result<Vec<f64>>>()?;
            let overrides = crate::args::existing_run_overrides("probe", args.data.as_deref(), &args.overrides)?;
            let (cfg, device) = existing_run::<P::Config>(&args.run, &overrides, &args.device)?;
            let mut observer = crate::progress::ProgressObserver::new("probe", args.quiet);
            let opts = paradigm::ProbeOptions {
                fractions: &fractions,
                finetune: !args.no_finetune,
                data: args.data.as_deref(),
            };
            let summary = paradigm::probe::<P>(&args.run, &cfg, &opts, &device, &mut observer)
                .with_context(|| format!("probing {}", args.run.display()))?;
            println!("{summary}");
        }
        Command::Export(RunArg { run, device }) => {
            let (cfg, device) = existing_run::<P::Config>(&run, &[], &device)?;
            let out =
                paradigm::export::<P>(&run, &cfg, &device).with_context(|| format!("exporting {}", run.display()))?;
            println!("exported: {}", out.display());
        }
        Command::Embed(args) => embed::<P>(args)?,
        Command::Finetune(args) => finetune::<P>(args)?,
        Command::Predict(args) => predict::<P>(args)?,
        Command::Extra(x) => x.run()?,
    }
    Ok(())
}

fn embed<P>(args: EmbedArgs) -> anyhow::Result<()>
where
    P: Tool,
    P::Config: DeserializeOwned + Serialize,
    P::Error: std::error::Error + Send + Sync + 'static,
{
    let (plain, device) = existing_run::<P::Config>(&args.run, &[], &args.device)?;
    let data = match &args.data {
        Some(d) => d.clone(),
        None => own_data::<P>(&plain)?,
    };
    let overrides = crate::args::existing_run_overrides("embed", Some(&data), &args.overrides)?;
    let cfg: P::Config = run_config(&args.run, &overrides)?;
    let format = match (
        args.format,
        args.out
            .as_deref()
            .and_then(pretext_data::embeddings::EmbeddingFormat::from_path),
    ) {
        (Some(crate::args::FormatArg::Parquet), _) => pretext_data::embeddings::EmbeddingFormat::Parquet,
        (Some(crate::args::FormatArg::Npy), _) => pretext_data::embeddings::EmbeddingFormat::Npy,
        (Some(crate::args::FormatArg::Jsonl), _) => pretext_data::embeddings::EmbeddingFormat::Jsonl,
        (None, Some(f)) => f,
        (None, None) => pretext_data::embeddings::EmbeddingFormat::Parquet,
    };
    let out = args.out.clone().unwrap_or_else(|| {
        args.run
            .join("embeddings")
            .join(format!("{}.{}", crate::args::data_name(&data), format.extension()))
    });
    let mut observer = crate::progress::ProgressObserver::new("embed", args.quiet);
    let trained = paradigm::load_trained::<P>(&args.run, &cfg, &device)
        .with_context(|| format!("loading {}", args.run.display()))?;
    let opts = downstream::EmbedOptions {
        data: data.clone(),
        out,
        format,
    };
    let s = downstream::embed::<P>(&cfg, &trained, &opts, &device, &mut observer)
        .with_context(|| format!("embedding {} with {}", data.display(), args.run.display()))?;
    println!(
        "{} rows × {} features{} -> {}",
        s.rows,
        s.dim,
        if s.labelled { ", with labels" } else { "" },
        s.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn finetune<P>(args: FinetuneArgs) -> anyhow::Result<()>
where
    P: Tool,
    P::Config: DeserializeOwned + Serialize,
    P::Error: std::error::Error + Send + Sync + 'static,
{
    let labels = downstream::LabelBudget::parse(&args.labels).map_err(anyhow::Error::msg)?;
    let validation = match args.validation.trim() {
        "auto" => downstream::ValidationSplit::Auto,
        "0" | "0%" | "none" => downstream::ValidationSplit::Fraction(0.0),
        v => {
            let f = crate::args::parse_fraction(v).with_context(|| format!("--validation {v}"))?;
            anyhow::ensure!(f < 1.0, "--validation {v}: must leave labels to train on (below 100%)");
            downstream::ValidationSplit::Fraction(f)
        }
    };
    crate::init_tracing(false);
    let device = pretext_core::select_device(&args.device)?;
    let mut observer = crate::progress::ProgressObserver::new("finetune", args.quiet);
    // the encoder: a run's, or existing weights with the built-in config
    let (resolved, model, assets, from, home): (crate::config::Resolved<P::Config>, _, _, String, PathBuf) =
        match (&args.run, &args.init) {
            (Some(run), _) => {
                let mut overrides = crate::args::existing_run_overrides("finetune", Some(&args.data), &args.overrides)?;
                overrides.extend(args.seed.map(|s| format!("train.seed={s}")));
                let resolved: crate::config::Resolved<P::Config> = config_file(&run.join("config.toml"), &overrides)?;
                P::validate(&resolved.config)?;
                let trained = paradigm::load_trained::<P>(run, &resolved.config, &device)
                    .with_context(|| format!("loading {}", run.display()))?;
                (
                    resolved,
                    trained.model,
                    trained.assets,
                    run.display().to_string(),
                    run.clone(),
                )
            }
            (None, Some(source)) => {
                let spec = crate::hub::resolve(source)?;
                let mut overrides = init_settings::<P>(&spec)?;
                overrides.push(format!("data.path={:?}", args.data.display().to_string()));
                overrides.extend(args.overrides.iter().cloned());
                overrides.extend(args.seed.map(|s| format!("train.seed={s}")));
                let resolved: crate::config::Resolved<P::Config> =
                    crate::config::resolve(P::DEFAULT_CONFIG, None, &overrides)?;
                P::validate(&resolved.config)?;
                let (model, assets, record) = paradigm::initialised_model::<P>(&resolved.config, &spec, &device)
                    .with_context(|| format!("--init {source}"))?;
                pretext_core::Observer::on_message(&mut observer, &record.summary());
                (resolved, model, assets, source.clone(), PathBuf::from("."))
            }
            (None, None) => anyhow::bail!("finetune: give a run folder or --init SOURCE"),
        };
    let cfg = resolved.config;
    let suffix = labels.label().replace('%', "pct").replace('/', "-per-");
    let out = args.out.clone().unwrap_or_else(|| {
        home.join("classifiers").join(format!(
            "{}-{suffix}{}",
            crate::args::data_name(&args.data),
            if args.frozen { "-frozen" } else { "" }
        ))
    });
    let opts = downstream::FineTuneOptions {
        data: args.data.clone(),
        labels,
        frozen: args.frozen,
        scratch: args.scratch,
        validation,
        out: out.clone(),
        seed: P::sections(&cfg).train.seed,
        from: from.clone(),
    };
    let mut fresh = || -> pretext_eval::RunResult<P::Model> { P::new_model(&cfg, &assets, &device) };
    let info = downstream::finetune::<P>(
        &cfg,
        &resolved.toml,
        &model,
        &mut fresh,
        &assets,
        &opts,
        &device,
        &mut observer,
    )
    .with_context(|| format!("fine-tuning {from} on {}", args.data.display()))?;
    println!(
        "test accuracy {:.2}% on {} test records ({} classes, {} labels)",
        info.test_accuracy * 100.0,
        info.n_test,
        info.classes.len(),
        info.labels
    );
    for b in &info.baselines {
        println!(
            "  {} {:.2}%: {}",
            if b.beaten { "beats" } else { "does not beat" },
            b.accuracy * 100.0,
            b.description
        );
    }
    println!("classifier: {}", out.display());
    Ok(())
}

fn predict<P>(args: PredictArgs) -> anyhow::Result<()>
where
    P: Tool,
    P::Config: DeserializeOwned + Serialize,
    P::Error: std::error::Error + Send + Sync + 'static,
{
    crate::init_tracing(false);
    let folder = downstream::ClassifierFolder::open(&args.classifier)?;
    if folder.info.paradigm != P::NAME {
        anyhow::bail!(
            "{} holds a {} classifier: use pretext-{} predict",
            args.classifier.display(),
            folder.info.paradigm,
            folder.info.paradigm
        );
    }
    let overrides = crate::args::existing_run_overrides("predict", Some(&args.data), &args.overrides)?;
    let cfg: P::Config = config_file(&args.classifier.join(downstream::CLASSIFIER_CONFIG_TOML), &overrides)?.config;
    let device = pretext_core::select_device(&args.device)?;
    let mut observer = crate::progress::ProgressObserver::new("predict", args.quiet);
    let (out, to_stdout) = match &args.out {
        Some(o) => (o.clone(), false),
        None => (
            std::env::temp_dir().join(format!("pretext-predict-{}.jsonl", std::process::id())),
            true,
        ),
    };
    let s = downstream::predict::<P>(&cfg, &folder, &args.data, &out, &device, &mut observer)
        .with_context(|| format!("predicting {} with {}", args.data.display(), args.classifier.display()))?;
    if to_stdout {
        let bytes = std::fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
        let _ = std::fs::remove_file(&out);
        std::io::Write::write_all(&mut std::io::stdout().lock(), &bytes).context("writing to standard output")?;
    }
    let acc = s
        .accuracy
        .map(|a| format!("; accuracy {:.2}% against the data's labels", a * 100.0))
        .unwrap_or_default();
    let dest = if to_stdout {
        "standard output".to_string()
    } else {
        out.display().to_string()
    };
    eprintln!("{} predictions -> {dest}{acc}", s.rows);
    Ok(())
}

/// The progress display of a training run: rank 0's alone in a
/// data-parallel run, which it opens with a line saying how the batch is split.
fn observer(label: &str, quiet: bool) -> crate::progress::ProgressObserver {
    let world = pretext_core::dist::world();
    let mut o = crate::progress::ProgressObserver::new(label, quiet || !world.is_root());
    if world.size() > 1 {
        use pretext_core::Observer;
        o.on_message(&format!(
            "data-parallel over {} processes ({}): each takes 1/{} of every batch",
            world.size(),
            world.backend(),
            world.size()
        ));
    }
    o
}

/// A wall-clock duration as people read it: `4 min 52.3 s`, or `8.1 s`.
fn wall_time(d: std::time::Duration) -> String {
    let tenths = (d.as_secs_f64() * 10.0).round() as u64;
    if tenths < 600 {
        format!("{}.{} s", tenths / 10, tenths % 10)
    } else {
        let (min, rest) = (tenths / 600, tenths % 600);
        format!(
            "{min} min {}.{} s = {:.2} min",
            rest / 10,
            rest % 10,
            d.as_secs_f64() / 60.0
        )
    }
}

#[cfg(test)]
mod wall_time_tests {
    #[test]
    fn wall_time_reads_as_minutes_and_seconds() {
        use std::time::Duration;
        assert_eq!(super::wall_time(Duration::from_millis(8_140)), "8.1 s");
        assert_eq!(
            super::wall_time(Duration::from_millis(292_300)),
            "4 min 52.3 s = 4.87 min"
        );
        assert_eq!(super::wall_time(Duration::from_secs(600)), "10 min 0.0 s = 10.00 min");
        // rounding to tenths carries into the minutes, never "1 min 60.0 s"
        assert_eq!(
            super::wall_time(Duration::from_millis(119_960)),
            "2 min 0.0 s = 2.00 min"
        );
        assert_eq!(
            super::wall_time(Duration::from_millis(59_960)),
            "1 min 0.0 s = 1.00 min"
        );
    }
}
