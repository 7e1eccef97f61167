//! Project automation: `cargo xtask bench`, `cargo xtask train-all`, `cargo xtask push`.

mod push;
mod train_all;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// pretext project tasks.
#[derive(Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchWhat {
    /// The SimCLR training step of the reference encoder (fast convolution path).
    #[value(alias = "contrastive")]
    Conv,
    /// The two-view augmentation pipeline.
    Data,
    /// VAE training throughput: the reference's MLP VAE
    /// (`configs/vae-mlp-fmnist.toml`) and the default conv VAE against its
    /// PyTorch twin (`crates/pretext-generative/benches/conv_vae_pytorch.py`).
    Vae,
    /// MLM training throughput (BERT-mini, batch 32 × 128 tokens), against
    /// transformers in fp32 (`reference.py mlm`) and under bf16 autocast
    /// (`crates/pretext-mlm/benches/mlm_pytorch.py`).
    Mlm,
    /// All of them.
    All,
}

#[derive(Subcommand)]
enum Task {
    /// Benchmarks, side by side with the PyTorch reference when it is available.
    ///
    /// The reference is `$PRETEXT_REFERENCE` (default `../shared/reference`), run with
    /// `$PRETEXT_PYTHON` (default `<reference>/.venv/bin/python`). Without it only our
    /// figures are printed. Results are appended to docs/performance.md.
    Bench {
        /// What to measure.
        #[arg(value_enum, default_value = "all")]
        what: BenchWhat,
        /// Timed steps per measurement.
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Print only; do not append to docs/performance.md.
        #[arg(long)]
        no_record: bool,
        /// Rounds of measurement, ours and the reference's interleaved
        /// (ours, the reference, ours again in each). The tables give
        /// medians, each ratio paired within its round, and list the ratios
        /// round by round: the machine's speed drifts by up to 2× within the
        /// hour, more than some of the gaps measured.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        rounds: u32,
    },
    /// Pretrain and probe every paradigm on the shipped data in turn (SimCLR,
    /// MoCo v2, VAE, MLM by default; `--methods` chooses), then write
    /// runs/<date>/summary.md linking each run's report and plots.
    ///
    /// `quick` (about 15 minutes on 2 cores): short runs and probes on subsets
    /// (5,000 training / 2,000 test images, no fine-tuning); `full`: the default
    /// configs and complete probes, the figures of docs/results.md (hours).
    TrainAll {
        /// `quick` or `full`.
        #[arg(long, default_value = "quick")]
        preset: String,
        /// Comma-separated methods to run, in any order: simclr, moco, byol,
        /// simsiam, barlow_twins, vicreg, dino, mae, vae, mlm. With two or more image
        /// methods the summary opens with a table comparing them.
        #[arg(long, value_delimiter = ',', default_value = train_all::DEFAULT_METHODS)]
        methods: Vec<String>,
        /// Folder of the runs and the summary (default runs/<date>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Upload a run's export/ folder (model.safetensors, config.json, the model
    /// card README.md, tokenizer files for text models) to the Hugging Face Hub in
    /// one commit, creating the repository if needed.
    ///
    /// Token from HF_TOKEN, else the file HF_TOKEN_PATH, else $HF_HOME/token
    /// (~/.cache/huggingface/token); it is never printed. Endpoint from
    /// HF_ENDPOINT (default https://huggingface.co). Run `pretext-<paradigm>
    /// export RUN` first.
    Push {
        /// A run folder (its export/ is pushed), or a classifier folder
        /// written by `finetune`.
        run: PathBuf,
        /// Target repository, namespace/name.
        #[arg(long)]
        repo: String,
        /// Create the repository as private.
        #[arg(long)]
        private: bool,
        /// Print what would be sent (files, sizes, checksums, card metadata); send nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command, echoing stderr, returning stdout.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    eprintln!("$ {what}");
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if let Some(line) = stdout.lines().find(|l| l.starts_with("CPU: ")) {
        let _ = CPU_LINE.set(line.to_string());
    }
    Ok(stdout)
}

/// The `CPU: …` line the first benchmark printed (its model, threads and kernel flags).
static CPU_LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `md` under the CPU line of the machine it was measured on.
fn on_this_cpu(md: String) -> String {
    match CPU_LINE.get() {
        Some(cpu) => format!("{cpu}\n\n{md}"),
        None => md,
    }
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")).and_then(|v| v.parse().ok()))
}

/// `train.precision` of a bench run: `f32` or `bf16`.
const PRECISIONS: [&str; 2] = ["f32", "bf16"];

/// Runs `cargo bench -p PACKAGE --bench BENCH` with `train.precision`
/// `precision` and `env`, and returns `KEY=` of its `RESULT BENCH` line.
fn ours_bench(package: &str, bench: &str, key: &str, precision: &str, env: &[(&str, &str)]) -> Result<f64> {
    let out = run(
        Command::new("cargo")
            .args(["bench", "-q", "-p", package, "--bench", bench])
            .env("PRETEXT_BENCH_PRECISION", precision)
            .envs(env.iter().copied())
            .current_dir(root()),
        &format!("cargo bench -p {package} --bench {bench}"),
    )?;
    out.lines()
        .find(|l| l.starts_with(&format!("RESULT {bench}")))
        .and_then(|l| field(l, key))
        .with_context(|| format!("no RESULT line from {bench}"))
}

fn ours_simclr(iters: usize, precision: &str) -> Result<f64> {
    let iters = iters.to_string();
    ours_bench(
        "pretext-contrastive",
        "simclr_step",
        "img_per_s",
        precision,
        &[("PRETEXT_BENCH_ITERS", &iters)],
    )
}

struct Reference {
    dir: PathBuf,
    python: PathBuf,
}

/// "PyTorch <version>" as the reference's own Python reports it (what the
/// tables print beside its figures).
fn torch_name(r: &Reference) -> String {
    let out = Command::new(&r.python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .current_dir(&r.dir)
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
            format!("PyTorch {v}")
        }
        _ => "PyTorch (version not reported)".to_string(),
    }
}

fn reference() -> Option<Reference> {
    let dir = std::env::var_os("PRETEXT_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/reference"));
    let python = std::env::var_os("PRETEXT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join(".venv/bin/python"));
    (dir.join("reference.py").is_file() && python.is_file()).then_some(Reference { dir, python })
}

/// Runs `reference.py ARGS` and returns its `[result]` lines.
fn reference_results(r: &Reference, args: &[&str]) -> Result<Vec<(String, f64)>> {
    let tmp = std::env::temp_dir().join(format!("pretext-ref-{}-{}.jsonl", args[0], std::process::id()));
    let out = run(
        Command::new(&r.python)
            .arg("reference.py")
            .args(args)
            .env("REF_RESULTS", &tmp)
            .current_dir(&r.dir),
        &format!("reference.py {}", args.join(" ")),
    )?;
    let _ = std::fs::remove_file(tmp);
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("[result] "))
        .filter_map(parse_result)
        .collect())
}

/// Runs `reference.py simclr-bench` and returns its `[result]` lines.
fn reference_simclr(r: &Reference, args: &[&str]) -> Result<Vec<(String, f64)>> {
    let mut all = vec!["simclr-bench"];
    all.extend_from_slice(args);
    reference_results(r, &all)
}

/// `what: value unit notes`, where `what` may itself contain `: `.
fn parse_result(line: &str) -> Option<(String, f64)> {
    line.match_indices(": ").find_map(|(i, _)| {
        let v: f64 = line[i + 2..].split_whitespace().next()?.parse().ok()?;
        Some((line[..i].to_string(), v))
    })
}

fn find(results: &[(String, f64)], needle: &str) -> Option<f64> {
    results.iter().find(|(w, _)| w.contains(needle)).map(|(_, v)| *v)
}

/// The figures of interleaved rounds: each round runs ours in f32 and bf16,
/// then the reference's side (`between`, its named figures), then ours
/// again. The machine's speed drifts by up to 2× within the hour, so each of
/// our figures is paired with the reference's of the same round.
struct Rounds {
    /// Per round, per precision ([`PRECISIONS`]): our runs before and after.
    ours: Vec<[(f64, f64); 2]>,
    /// Per round: the reference's figures by name.
    refs: Vec<Vec<(&'static str, f64)>>,
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Rounds {
    fn run(
        rounds: usize,
        mut bench: impl FnMut(&str) -> Result<f64>,
        mut between: impl FnMut() -> Result<Vec<(&'static str, f64)>>,
    ) -> Result<Self> {
        let mut out = Self {
            ours: Vec::new(),
            refs: Vec::new(),
        };
        for round in 0..rounds.max(1) {
            if rounds > 1 {
                eprintln!("round {} of {rounds}", round + 1);
            }
            let before = [bench(PRECISIONS[0])?, bench(PRECISIONS[1])?];
            out.refs.push(between()?);
            let after = [bench(PRECISIONS[0])?, bench(PRECISIONS[1])?];
            out.ours.push([0, 1].map(|p| (before[p], after[p])));
        }
        Ok(out)
    }

    /// Our figure of each round in precision `p`: the mean of its two runs.
    fn ours_by_round(&self, p: usize) -> Vec<f64> {
        self.ours.iter().map(|r| (r[p].0 + r[p].1) / 2.0).collect()
    }

    /// The reference's figure `name` of each round.
    fn reference_by_round(&self, name: &str) -> Result<Vec<f64>> {
        self.refs
            .iter()
            .map(|r| find_named(r, name).with_context(|| format!("no {name} figure from the reference")))
            .collect()
    }

    /// Ours in precision `p` over `name`'s figure, round by round.
    fn ratios(&self, p: usize, name: &str) -> Result<Vec<f64>> {
        let theirs = self.reference_by_round(name)?;
        Ok(self.ours_by_round(p).iter().zip(theirs).map(|(o, t)| o / t).collect())
    }

    /// The table's rows for our two precisions (the median round's
    /// figures, every run listed) and for the reference's `rows` (label,
    /// figure name): medians over the rounds, ratios paired within rounds.
    /// With several rounds, a line of each ratio round by round follows.
    fn table(&self, what: &str, unit_fmt: fn(f64) -> String, rows: &[(String, &str)]) -> Result<String> {
        let what = if what.is_empty() {
            String::new()
        } else {
            format!(" {what}")
        };
        let runs = |p: usize| {
            self.ours
                .iter()
                .flat_map(|r| [unit_fmt(r[p].0), unit_fmt(r[p].1)])
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (f, h) = (median(self.ours_by_round(0)), median(self.ours_by_round(1)));
        // bf16 over f32, round by round: the f32 row's `bf16 / this`, and
        // its inverse the bf16 row's `f32 / this`
        let own: Vec<f64> = self
            .ours
            .iter()
            .map(|r| (r[1].0 + r[1].1) / (r[0].0 + r[0].1))
            .collect();
        let n = self.ours.len();
        let when = if n > 1 {
            format!("medians of {n} rounds; runs before and after the reference's in each")
        } else {
            "runs before and after the reference".to_string()
        };
        let mut md = format!(
            "| pretext{what}, f32 products ({when}: {}) | {} | 1.00 | {:.2} |\n\
             | pretext{what}, bf16 products (`train.precision = \"bf16\"`; {}) | {} | {:.2} | 1.00 |\n",
            runs(0),
            unit_fmt(f),
            median(own.clone()),
            runs(1),
            unit_fmt(h),
            1.0 / median(own),
        );
        let mut by_round = Vec::new();
        for (label, name) in rows {
            let (r32, r16) = (self.ratios(0, name)?, self.ratios(1, name)?);
            let t = median(self.reference_by_round(name)?);
            md.push_str(&format!(
                "| {label} | {} | {:.2} | {:.2} |\n",
                unit_fmt(t),
                median(r32.clone()),
                median(r16.clone())
            ));
            let list = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
            let figures: Vec<String> = self.reference_by_round(name)?.into_iter().map(unit_fmt).collect();
            by_round.push(format!(
                "{name} {} (f32 / {name} {}; bf16 / {name} {})",
                figures.join(", "),
                list(&r32),
                list(&r16)
            ));
        }
        if n > 1 {
            md.push_str(&format!(
                "\nThe reference's figures round by round, and ours over each of the same round: {}.\n",
                by_round.join("; ")
            ));
        }
        Ok(md)
    }
}

/// The figure named `name` (exactly) among a round's reference figures.
fn find_named(figures: &[(&'static str, f64)], name: &str) -> Option<f64> {
    figures.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

fn bench_conv(iters: usize, rounds: usize) -> Result<String> {
    let mut md = String::new();
    let one = |x: f64| format!("{x:.1}");
    match reference() {
        Some(r) => {
            let steps = iters.to_string();
            let res = Rounds::run(
                rounds,
                |p| ours_simclr(iters, p),
                || {
                    let nchw = reference_simclr(&r, &["--skip-aug", "--iters", &steps])?;
                    let cl = reference_simclr(&r, &["--skip-aug", "--channels-last", "--bf16", "--iters", &steps])?;
                    let mut figures = vec![
                        (
                            "NCHW",
                            find(&nchw, "fp32, NCHW, pre-augmented")
                                .or_else(|| find(&nchw, "pre-augmented"))
                                .context("no NCHW step figure from the reference")?,
                        ),
                        (
                            "channels_last",
                            find(&cl, "fp32, channels_last, pre-augmented")
                                .context("no channels_last step figure from the reference")?,
                        ),
                        (
                            "autocast",
                            find(&cl, "bf16 autocast").context("no bf16 autocast step figure from the reference")?,
                        ),
                    ];
                    if let Some(p) = find(&cl, "sgemm probe") {
                        figures.push(("sgemm", p));
                    }
                    Ok(figures)
                },
            )?;
            let torch = torch_name(&r);
            md.push_str("| SimCLR step, batch 256 pairs | images/s | pretext f32 / this | pretext bf16 / this |\n|---|---|---|---|\n");
            md.push_str(&res.table(
                "(fused NHWC trunk)",
                one,
                &[
                    (format!("{torch}, NCHW, fp32"), "NCHW"),
                    (format!("{torch}, channels_last, fp32"), "channels_last"),
                    (format!("{torch}, channels_last, bf16 autocast"), "autocast"),
                ],
            )?);
            if let Ok(p) = res.reference_by_round("sgemm") {
                let p: Vec<String> = p.iter().map(|v| format!("{v:.0}")).collect();
                md.push_str(&format!("\nsgemm probe during the reference runs: {} GFLOP/s (the machine's speed drifts; compare ratios).\n", p.join(", ")));
            }
        }
        None => {
            let a = ours_simclr(iters, "f32")?;
            let b = ours_simclr(iters, "bf16")?;
            md.push_str(&format!("pretext SimCLR step, batch 256 pairs: {a:.1} images/s with f32 products, {b:.1} with bf16 ({:.2}×) (no PyTorch reference found: set PRETEXT_REFERENCE)\n", b / a));
        }
    }
    Ok(md)
}

fn bench_data() -> Result<String> {
    let out = run(
        Command::new("cargo")
            .args([
                "bench",
                "-q",
                "-p",
                "pretext-data",
                "--bench",
                "pipeline",
                "--",
                "--warm-up-time",
                "1",
                "--measurement-time",
                "4",
            ])
            .current_dir(root()),
        "cargo bench -p pretext-data --bench pipeline",
    )?;
    let mut md = String::from("| two-view pipeline | views/s |\n|---|---|\n");
    let mut name = String::new();
    for line in out.lines() {
        if line.starts_with("two-view pipeline/") {
            name = line.trim_start_matches("two-view pipeline/").to_string();
        }
        if let Some(rest) = line.trim().strip_prefix("thrpt:") {
            // [low mid high]: take the middle estimate
            let parts: Vec<&str> = rest.trim().trim_matches(['[', ']']).split_whitespace().collect();
            if parts.len() >= 4 {
                let v: f64 = parts[2].parse().unwrap_or(0.0);
                let scale = match parts[3] {
                    "Kelem/s" => 1e3,
                    "Melem/s" => 1e6,
                    _ => 1.0,
                };
                md.push_str(&format!("| pretext, {name} | {:.0} |\n", v * scale));
            }
        }
    }
    if let Some(r) = reference() {
        let res = reference_simclr(&r, &["--iters", "3", "--warmup", "1"])?;
        for (key, label) in [
            (
                "batched (grid_sample)",
                "PyTorch batched grid_sample (whole batch, in-process), 28x28",
            ),
            ("per-image, in-process", "torchvision v2 per image, in-process, 28x28"),
            (
                "DataLoader 2 workers",
                "torchvision v2 per image, DataLoader 2 workers, 28x28",
            ),
        ] {
            if let Some(v) = find(&res, key) {
                md.push_str(&format!("| {label} | {v:.0} |\n"));
            }
        }
    }
    Ok(md)
}

fn ours_vae(precision: &str) -> Result<f64> {
    ours_bench("pretext-generative", "vae_step", "img_per_s", precision, &[])
}

/// The default conv VAE's step (`configs/vae-fmnist.toml`'s model and
/// weight averaging) at batch 64, 200 steps.
fn ours_conv_vae(precision: &str) -> Result<f64> {
    ours_bench(
        "pretext-generative",
        "vae_step",
        "img_per_s",
        precision,
        &[
            ("PRETEXT_BENCH_MODEL", "default"),
            ("PRETEXT_BENCH_BATCH", "64"),
            ("PRETEXT_BENCH_ITERS", "200"),
        ],
    )
}

/// The conv VAE's PyTorch twin (`benches/conv_vae_pytorch.py`, the default's
/// sizes: decoder 128 → 96 → 1) in `layout` (`nchw` or `cl`): images/s.
fn twin_conv_vae(r: &Reference, layout: &str) -> Result<f64> {
    let script = root().join("crates/pretext-generative/benches/conv_vae_pytorch.py");
    let images = root().join("datasets/fashion-mnist/train-images-idx3-ubyte.gz");
    let out = run(
        Command::new(&r.python)
            .arg(&script)
            .arg(&images)
            .args(["200", layout, "96", "128"])
            .current_dir(root()),
        &format!("conv_vae_pytorch.py … 200 {layout} 96 128"),
    )?;
    out.lines()
        .find_map(|l| l.strip_suffix(" images/s")?.rsplit(' ').next()?.parse().ok())
        .context("no images/s line from conv_vae_pytorch.py")
}

/// The default conv VAE against its PyTorch twin, both precisions of ours.
fn bench_conv_vae(r: &Reference, rounds: usize) -> Result<String> {
    let res = Rounds::run(rounds, ours_conv_vae, || {
        Ok(vec![
            ("NCHW", twin_conv_vae(r, "nchw")?),
            ("channels_last", twin_conv_vae(r, "cl")?),
        ])
    })?;
    let torch = torch_name(r);
    let mut md = String::from("\n| Conv VAE training (the default: 32/128 encoder, 128 → 96 → 1 decoder, latent 64, batch 64, Adam; ours with its weight averaging) | images/s | pretext f32 / this | pretext bf16 / this |\n|---|---|---|---|\n");
    let rows: Vec<(String, &str)> = ["NCHW", "channels_last"]
        .into_iter()
        .map(|name| {
            (
                format!("{torch} fp32 twin (`benches/conv_vae_pytorch.py`), {name}"),
                name,
            )
        })
        .collect();
    md.push_str(&res.table("", |x| format!("{x:.0}"), &rows)?);
    Ok(md)
}

fn bench_vae(rounds: usize) -> Result<String> {
    let mut md = String::new();
    let zero = |x: f64| format!("{x:.0}");
    match reference() {
        Some(r) => {
            let res = Rounds::run(rounds, ours_vae, || {
                let res = reference_results(&r, &["vae", "--epochs", "2"])?;
                let t = find(&res, "training throughput").context("no throughput figure from the reference VAE")?;
                Ok(vec![("reference", t)])
            })?;
            md.push_str("| VAE training (MLP 784-512-256-32, batch 128, Adam) | images/s | pretext f32 / this | pretext bf16 / this |\n|---|---|---|---|\n");
            let label = format!("{} fp32 (`reference.py vae`, 2 epochs)", torch_name(&r));
            md.push_str(&res.table("", zero, &[(label, "reference")])?);
            md.push_str(&bench_conv_vae(&r, rounds)?);
        }
        None => {
            let (a, b) = (ours_vae("f32")?, ours_vae("bf16")?);
            md.push_str(&format!(
                "pretext VAE training, batch 128: {a:.0} images/s with f32 products, {b:.0} with bf16 ({:.2}×) (no PyTorch reference found: set PRETEXT_REFERENCE)\n",
                b / a
            ));
        }
    }
    Ok(md)
}

fn ours_mlm(iters: usize, precision: &str) -> Result<f64> {
    let iters = iters.to_string();
    ours_bench(
        "pretext-mlm",
        "mlm_step",
        "tok_per_s",
        precision,
        &[("PRETEXT_BENCH_ITERS", &iters)],
    )
}

/// transformers' BERT-mini in fp32 and under bf16 autocast, alternating
/// (`benches/mlm_pytorch.py`, the reference's corpus and masking): tokens/s,
/// `(fp32, bf16)`.
fn twin_mlm(r: &Reference) -> Result<(f64, f64)> {
    let script = root().join("crates/pretext-mlm/benches/mlm_pytorch.py");
    let out = run(
        Command::new(&r.python)
            .arg(&script)
            .arg(&r.dir)
            .args(["20", "2"])
            .current_dir(root()),
        "mlm_pytorch.py … 20 2",
    )?;
    let figure = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix(" tokens/s")?.parse().ok())
            .with_context(|| format!("no {name} tokens/s line from mlm_pytorch.py"))
    };
    Ok((figure("fp32")?, figure("bf16")?))
}

fn bench_mlm(iters: usize, rounds: usize) -> Result<String> {
    let mut md = String::new();
    let zero = |x: f64| format!("{x:.0}");
    match reference() {
        Some(r) => {
            let res = Rounds::run(
                rounds,
                |p| ours_mlm(iters, p),
                || {
                    let res = reference_results(&r, &["mlm", "--budget-min", "1"])?;
                    let t = find(&res, "MLM train tokens/s").context("no tokens/s figure from the reference MLM")?;
                    let (fp32, bf16) = twin_mlm(&r)?;
                    Ok(vec![("reference", t), ("fp32", fp32), ("autocast", bf16)])
                },
            )?;
            md.push_str("| BERT-mini MLM training (4 × 256, vocab 8000, batch 32 × 128, AdamW) | tokens/s | pretext f32 / this | pretext bf16 / this |\n|---|---|---|---|\n");
            let torch = torch_name(&r);
            md.push_str(&res.table(
                "",
                zero,
                &[
                    (
                        "transformers `BertForMaskedLM` fp32 (`reference.py mlm --budget-min 1`)".to_string(),
                        "reference",
                    ),
                    (
                        format!("transformers `BertForMaskedLM` fp32, {torch} (`benches/mlm_pytorch.py`)"),
                        "fp32",
                    ),
                    (
                        format!(
                            "transformers `BertForMaskedLM` under bf16 autocast, {torch} (`benches/mlm_pytorch.py`)"
                        ),
                        "autocast",
                    ),
                ],
            )?);
        }
        None => {
            let (a, b) = (ours_mlm(iters, "f32")?, ours_mlm(iters, "bf16")?);
            md.push_str(&format!(
                "pretext BERT-mini MLM training, batch 32 × 128: {a:.0} tokens/s with f32 products, {b:.0} with bf16 ({:.2}×) (no PyTorch reference found: set PRETEXT_REFERENCE)\n",
                b / a
            ));
        }
    }
    Ok(md)
}

fn record(section: &str, body: &str) -> Result<()> {
    let path = root().join("docs/performance.md");
    let date = run(Command::new("date").arg("+%Y-%m-%d %H:%M"), "date")?;
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Performance\n".into());
    text.push_str(&format!(
        "\n### {section} — `cargo xtask bench`, {}\n\n{body}",
        date.trim()
    ));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Task::Bench {
            what,
            iters,
            no_record,
            rounds,
        } => (|| -> Result<()> {
            let rounds = rounds as usize;
            if matches!(what, BenchWhat::Conv | BenchWhat::All) {
                let md = on_this_cpu(bench_conv(iters, rounds)?);
                println!("{md}");
                if !no_record {
                    record("SimCLR training step", &md)?;
                }
            }
            if matches!(what, BenchWhat::Data | BenchWhat::All) {
                let md = bench_data()?;
                println!("{md}");
                if !no_record {
                    record("Augmentation pipeline", &md)?;
                }
            }
            if matches!(what, BenchWhat::Vae | BenchWhat::All) {
                let md = on_this_cpu(bench_vae(rounds)?);
                println!("{md}");
                if !no_record {
                    record("VAE training", &md)?;
                }
            }
            if matches!(what, BenchWhat::Mlm | BenchWhat::All) {
                let md = on_this_cpu(bench_mlm(iters.max(20), rounds)?);
                println!("{md}");
                if !no_record {
                    record("MLM training", &md)?;
                }
            }
            Ok(())
        })(),
        Task::TrainAll { preset, methods, out } => train_all::train_all(&preset, &methods, out).map(|p| {
            println!("summary: {}", p.display());
        }),
        Task::Push {
            run,
            repo,
            private,
            dry_run,
        } => push::push(&run, &repo, private, dry_run),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    /// Ratios pair our figure with the reference's of the same round, the
    /// table gives their medians, and the own-precision columns read as
    /// the header says (`bf16 / f32` in the f32 row).
    #[test]
    fn rounds_pair_ratios_within_rounds() {
        // round 1: ours f32 100 (90, 110), bf16 150; reference 80 → 1.25, 1.875
        // round 2: the machine twice as fast: ours 200, 300; reference 250 → 0.8, 1.2
        // round 3: ours 100, 160; reference 100 → 1.0, 1.6
        let res = Rounds {
            ours: vec![
                [(90.0, 110.0), (150.0, 150.0)],
                [(200.0, 200.0), (300.0, 300.0)],
                [(100.0, 100.0), (160.0, 160.0)],
            ],
            refs: vec![vec![("torch", 80.0)], vec![("torch", 250.0)], vec![("torch", 100.0)]],
        };
        assert_eq!(res.ratios(0, "torch").unwrap(), vec![1.25, 0.8, 1.0]);
        assert!(res.ratios(0, "other").is_err());
        let md = res
            .table("", |x| format!("{x:.0}"), &[("PyTorch".into(), "torch")])
            .unwrap();
        let rows: Vec<&str> = md.lines().collect();
        // medians: ours 100 / 160, reference 100, ratios 1.00 / 1.60; bf16
        // over f32 paired within rounds: 1.5, 1.5, 1.6
        assert!(
            rows[0].contains(
                "runs before and after the reference's in each: 90, 110, 200, 200, 100, 100) | 100 | 1.00 | 1.50 |"
            ),
            "{}",
            rows[0]
        );
        assert!(rows[1].ends_with("| 160 | 0.67 | 1.00 |"), "{}", rows[1]);
        assert_eq!(rows[2], "| PyTorch | 100 | 1.00 | 1.60 |");
        assert!(
            md.contains("f32 / torch 1.25, 0.80, 1.00; bf16 / torch 1.88, 1.20, 1.60"),
            "{md}"
        );
    }

    #[test]
    fn parses_result_fields() {
        let l = "RESULT simclr_step img_per_s=206.21 median_ms=1241.4 gflops=91.89";
        assert_eq!(field(l, "img_per_s"), Some(206.21));
        assert_eq!(field(l, "gflops"), Some(91.89));
        assert_eq!(field(l, "nope"), None);
        let r = parse_result(
            "augmentation views/s: batched (grid_sample) in-process, 2 threads: 1.027e+05 views/s  batch 256",
        );
        assert_eq!(
            r,
            Some((
                "augmentation views/s: batched (grid_sample) in-process, 2 threads".to_string(),
                102700.0
            ))
        );
    }
}
