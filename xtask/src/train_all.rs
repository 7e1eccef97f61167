//! `cargo xtask train-all`: every paradigm on the shipped data in turn —
//! pretrain, then probe — with one progress display, then
//! `runs/<date>/summary.md` linking each run's report and plots.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// One paradigm's pretraining and probe.
struct Stage {
    name: &'static str,
    bin: &'static str,
    pretrain: Vec<String>,
    probe: Vec<String>,
    /// An image method whose row goes into the comparison table.
    image_method: bool,
}

fn sets(pairs: &[&str]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|p| ["--set".to_string(), p.to_string()])
        .collect()
}

/// What `--methods` takes: (name, display name), image methods first.
pub const METHODS: [(&str, &str); 10] = [
    ("simclr", "SimCLR"),
    ("moco", "MoCo v2"),
    ("byol", "BYOL"),
    ("simsiam", "SimSiam"),
    ("barlow_twins", "Barlow Twins"),
    ("vicreg", "VICReg"),
    ("dino", "DINO"),
    ("mae", "MAE"),
    ("vae", "VAE"),
    ("mlm", "MLM (BERT)"),
];

/// The default `--methods`: one run of each paradigm, and MoCo.
pub const DEFAULT_METHODS: &str = "simclr,moco,vae,mlm";

fn stages(preset: &str, methods: &[String]) -> Result<Vec<Stage>> {
    let quick = match preset {
        "quick" => true,
        "full" => false,
        other => bail!("--preset {other:?}: expected quick or full"),
    };
    if methods.is_empty() {
        bail!("--methods is empty: name at least one of {}", method_names());
    }
    for m in methods {
        if !METHODS.iter().any(|(n, _)| n == m) {
            bail!("--methods: unknown method {m:?}; expected some of {}", method_names());
        }
    }
    let mut v = Vec::new();
    let image_probe_quick = sets(&["eval.probe_train=5000", "eval.probe_test=2000"]);
    // in the order of METHODS, each once
    for &(method, name) in METHODS.iter().filter(|(n, _)| methods.iter().any(|m| m == n)) {
        match method {
            "vae" => {
                let (mut pretrain, mut probe) = (Vec::new(), Vec::new());
                if quick {
                    pretrain.extend(sets(&[
                        "train.epochs=3",
                        "eval.monitor_images=500",
                        "eval.knn_train=2000",
                    ]));
                    probe.extend(image_probe_quick.clone());
                    probe.extend(sets(&["eval.likelihood_images=1000", "eval.iwae_samples=20"]));
                }
                v.push(Stage {
                    name,
                    bin: "pretext-generative",
                    pretrain,
                    probe,
                    image_method: false,
                });
            }
            "mae" => {
                let mut pretrain = vec!["--method".to_string(), "mae".to_string()];
                let mut probe = Vec::new();
                if quick {
                    pretrain.extend(sets(&[
                        "train.max_steps=120",
                        "schedule.warmup_steps=20",
                        "eval.monitor_images=500",
                        "eval.knn_train=2000",
                    ]));
                    probe.push("--no-finetune".to_string());
                    probe.extend(image_probe_quick.clone());
                    probe.extend(sets(&["eval.likelihood_images=1000"]));
                }
                v.push(Stage {
                    name,
                    bin: "pretext-generative",
                    pretrain,
                    probe,
                    image_method: true,
                });
            }
            "mlm" => {
                let mut pretrain = Vec::new();
                if quick {
                    pretrain.extend(sets(&[
                        "train.max_steps=1500",
                        "schedule.warmup_steps=150",
                        "eval.every_steps=750",
                    ]));
                }
                v.push(Stage {
                    name,
                    bin: "pretext-mlm",
                    pretrain,
                    probe: Vec::new(),
                    image_method: false,
                });
            }
            _ => {
                let mut pretrain = vec!["--method".to_string(), method.to_string()];
                let mut probe = Vec::new();
                if quick {
                    pretrain.extend(sets(&[
                        "train.max_steps=120",
                        "schedule.warmup_steps=20",
                        "eval.knn_train=2000",
                        "eval.knn_test=1000",
                    ]));
                    probe.push("--no-finetune".to_string());
                    probe.extend(image_probe_quick.clone());
                }
                v.push(Stage {
                    name,
                    bin: "pretext-contrastive",
                    pretrain,
                    probe,
                    image_method: true,
                });
            }
        }
    }
    Ok(v)
}

fn method_names() -> String {
    METHODS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// The label fractions of a report's records, ascending, each once.
fn fractions(report: &serde_json::Value) -> Vec<f64> {
    let mut fracs: Vec<f64> = report["records"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["labels"].as_f64()).collect())
        .unwrap_or_default();
    fracs.sort_by(f64::total_cmp);
    fracs.dedup();
    fracs
}

/// `0.01` → `1%`.
fn pct(f: f64) -> String {
    format!("{}%", (f * 1000.0).round() / 10.0)
}

/// The table that compares image methods: linear probe and kNN of each at
/// every label fraction, then the baselines from the first report.
fn comparison(runs: &[(&str, serde_json::Value)]) -> String {
    let Some((_, first)) = runs.first() else {
        return String::new();
    };
    let fracs = fractions(first);
    let mut md = String::from(
        "## Image methods compared

| features |",
    );
    for protocol in ["linear", "kNN"] {
        for f in &fracs {
            md.push_str(&format!(" {protocol} {} |", pct(*f)));
        }
    }
    md.push_str(
        "
|---|",
    );
    md.push_str(&"---|".repeat(2 * fracs.len()));
    md.push('\n');
    let row = |label: &str, report: &serde_json::Value, features: &str| {
        let mut r = format!("| {label} |");
        for protocol in ["linear", "knn"] {
            for &f in &fracs {
                r.push_str(&acc(report, features, protocol, f).map_or(" – |".to_string(), |a| format!(" {a:.2} |")));
            }
        }
        r.push('\n');
        r
    };
    for (name, report) in runs {
        md.push_str(&row(name, report, "pretrained"));
    }
    md.push_str(&row("random-init (first run's encoder)", first, "random-init"));
    md.push_str(&row("raw pixels", first, "raw"));
    md.push('\n');
    md
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target"))
}

fn slug(name: &str) -> String {
    name.to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

fn run_stage(bin: &Path, args: &[String], log: &Path, what: &str) -> Result<()> {
    let out = Command::new(bin)
        .args(args)
        .current_dir(crate::root())
        .output()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    std::fs::write(log, &text).with_context(|| format!("writing {}", log.display()))?;
    if !out.status.success() {
        bail!(
            "{what} failed (log: {}):\n{}",
            log.display(),
            text.lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// Accuracy (%) of `features` × `protocol` at `labels`, from an `eval.json`.
fn acc(report: &serde_json::Value, features: &str, protocol: &str, labels: f64) -> Option<f64> {
    report["records"].as_array()?.iter().find_map(|r| {
        (r["features"] == features && r["protocol"] == protocol && (r["labels"].as_f64()? - labels).abs() < 1e-9)
            .then(|| r["accuracy"].as_f64().map(|a| a * 100.0))?
    })
}

/// The summary section of one run: a table and the verdict.
fn section(name: &str, rel: &str, report: &serde_json::Value, minutes: f64) -> (String, bool) {
    let fracs = fractions(report);
    let mut md = format!(
        "## {name}\n\n[report]({rel}/report/index.html) · [loss]({rel}/report/loss.png) · \
[label efficiency]({rel}/report/label_efficiency.png) · run folder `{rel}` · {minutes:.1} min\n\n| features | protocol |"
    );
    for f in &fracs {
        md.push_str(&format!(" {} |", pct(*f)));
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---|".repeat(fracs.len()));
    md.push('\n');
    for features in ["pretrained", "random-init", "raw"] {
        for protocol in ["linear", "knn", "finetune"] {
            let row: Vec<Option<f64>> = fracs.iter().map(|&f| acc(report, features, protocol, f)).collect();
            if row.iter().all(Option::is_none) {
                continue;
            }
            md.push_str(&format!("| {features} | {protocol} |"));
            for a in row {
                md.push_str(&a.map_or(" – |".to_string(), |a| format!(" {a:.2} |")));
            }
            md.push('\n');
        }
    }
    let ahead = fracs.iter().all(|&f| {
        matches!(
            (acc(report, "pretrained", "linear", f), acc(report, "random-init", "linear", f)),
            (Some(p), Some(r)) if p > r
        )
    });
    md.push_str(&format!(
        "\nPretrained ahead of random-init under the linear probe at every label fraction: **{}**\n\n",
        if ahead { "yes" } else { "no" }
    ));
    (md, ahead)
}

/// Runs the preset; returns the summary's path.
///
/// # Errors
/// A build or a stage failed (its log is named).
pub fn train_all(preset: &str, methods: &[String], out: Option<PathBuf>) -> Result<PathBuf> {
    let plan = stages(preset, methods)?;
    let date = crate::run(Command::new("date").arg("+%Y-%m-%d-%H%M%S"), "date")?;
    let dir = out.unwrap_or_else(|| crate::root().join("runs").join(date.trim()));
    if dir.exists() {
        bail!("{} already exists: pick another --out", dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("building the binaries (release)…");
    crate::run(
        Command::new("cargo")
            .args(["build", "--release", "-q", "-p", "pretext-cli"])
            .current_dir(crate::root()),
        "cargo build --release -p pretext-cli",
    )?;
    let bins = target_dir().join("release");
    let total = plan.len() * 2;
    let started = Instant::now();
    let mut body = String::new();
    let mut verdicts = Vec::new();
    let mut image_reports = Vec::new();
    for (i, stage) in plan.iter().enumerate() {
        let run_dir = dir.join(slug(stage.name));
        let bin = bins.join(stage.bin);
        let t0 = Instant::now();
        let tick = |k: usize, what: &str| {
            eprintln!(
                "[{k}/{total}] {what} … ({:.1} min so far)",
                started.elapsed().as_secs_f64() / 60.0
            );
        };
        tick(2 * i + 1, &format!("{}: pretraining", stage.name));
        let mut args = vec![
            "pretrain".to_string(),
            "--out".to_string(),
            run_dir.display().to_string(),
            "--quiet".to_string(),
        ];
        args.extend(stage.pretrain.iter().cloned());
        run_stage(
            &bin,
            &args,
            &dir.join(format!("{}-pretrain.log", slug(stage.name))),
            &format!("{} pretraining", stage.name),
        )?;
        tick(2 * i + 2, &format!("{}: probing", stage.name));
        let mut args = vec![
            "probe".to_string(),
            run_dir.display().to_string(),
            "--quiet".to_string(),
        ];
        args.extend(stage.probe.iter().cloned());
        run_stage(
            &bin,
            &args,
            &dir.join(format!("{}-probe.log", slug(stage.name))),
            &format!("{} probe", stage.name),
        )?;
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(run_dir.join("report/eval.json"))
                .with_context(|| format!("{}/report/eval.json", run_dir.display()))?,
        )
        .context("parsing eval.json")?;
        let (md, ahead) = section(
            stage.name,
            &slug(stage.name),
            &report,
            t0.elapsed().as_secs_f64() / 60.0,
        );
        eprintln!(
            "    {}: pretrained ahead of random-init (linear, every fraction): {}",
            stage.name,
            if ahead { "yes" } else { "no" }
        );
        body.push_str(&md);
        verdicts.push((stage.name, ahead));
        if stage.image_method {
            image_reports.push((stage.name, report));
        }
    }
    let mut summary = format!(
        "# train-all ({preset}), {}\n\n{:.1} minutes in all. Each paradigm pretrained on the shipped data, then probed \
(linear probe and kNN on frozen features at each label fraction, against the same architecture randomly \
initialised and raw inputs — pixels, or TF-IDF for text).\n\n| paradigm | pretrained ahead of random-init (linear probe) |\n|---|---|\n",
        date.trim(),
        started.elapsed().as_secs_f64() / 60.0
    );
    for (n, a) in &verdicts {
        summary.push_str(&format!("| {n} | {} |\n", if *a { "yes" } else { "no" }));
    }
    summary.push('\n');
    if image_reports.len() > 1 {
        summary.push_str(&comparison(&image_reports));
    }
    summary.push_str(&body);
    let path = dir.join("summary.md");
    std::fs::write(&path, summary).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_section_and_verdict() {
        let r = serde_json::json!({"records": [
            {"features": "pretrained", "protocol": "linear", "labels": 0.01, "accuracy": 0.8},
            {"features": "random-init", "protocol": "linear", "labels": 0.01, "accuracy": 0.7},
            {"features": "pretrained", "protocol": "linear", "labels": 1.0, "accuracy": 0.9},
            {"features": "random-init", "protocol": "linear", "labels": 1.0, "accuracy": 0.91},
            {"features": "raw", "protocol": "knn", "labels": 1.0, "accuracy": 0.5},
        ]});
        let (md, ahead) = section("X", "x", &r, 1.0);
        assert!(!ahead, "behind at 100%");
        assert!(md.contains("| pretrained | linear | 80.00 | 90.00 |"), "{md}");
        assert!(md.contains("| raw | knn | – | 50.00 |"), "{md}");
        assert_eq!(slug("MLM (BERT)"), "mlm-bert");
        let methods = |list: &str| -> Vec<String> { list.split(',').map(String::from).collect() };
        assert!(stages("slow", &methods(DEFAULT_METHODS)).is_err());
        let default = stages("quick", &methods(DEFAULT_METHODS)).expect("default");
        let names: Vec<&str> = default.iter().map(|s| s.name).collect();
        assert_eq!(names, ["SimCLR", "MoCo v2", "VAE", "MLM (BERT)"]);
        // listed in any order, run in the table's order; the method reaches the tool
        let some = stages("full", &methods("vicreg,byol")).expect("two");
        assert_eq!(some.iter().map(|s| s.name).collect::<Vec<_>>(), ["BYOL", "VICReg"]);
        assert_eq!(some[1].pretrain, ["--method", "vicreg"]);
        // the MAE is an image method of the generative tool
        let mae = stages("full", &methods("mae,simclr")).expect("mae");
        assert_eq!(mae.iter().map(|s| s.name).collect::<Vec<_>>(), ["SimCLR", "MAE"]);
        assert_eq!((mae[1].bin, mae[1].image_method), ("pretext-generative", true));
        assert_eq!(mae[1].pretrain, ["--method", "mae"]);
        let err = stages("quick", &methods("simclr,swav"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("\"swav\"") && err.contains("barlow_twins"), "{err}");
        assert!(stages("quick", &[]).is_err());
    }

    #[test]
    fn comparison_table_has_a_row_per_method_and_the_baselines() {
        let rep = |p: f64| {
            serde_json::json!({"records": [
                {"features": "pretrained", "protocol": "linear", "labels": 0.01, "accuracy": p},
                {"features": "pretrained", "protocol": "knn", "labels": 0.01, "accuracy": p - 0.1},
                {"features": "random-init", "protocol": "linear", "labels": 0.01, "accuracy": 0.5},
                {"features": "raw", "protocol": "linear", "labels": 0.01, "accuracy": 0.6},
            ]})
        };
        let md = comparison(&[("A", rep(0.8)), ("B", rep(0.7))]);
        assert!(md.contains("| features | linear 1% | kNN 1% |"), "{md}");
        assert!(md.contains("| A | 80.00 | 70.00 |"), "{md}");
        assert!(md.contains("| B | 70.00 | 60.00 |"), "{md}");
        assert!(md.contains("| raw pixels | 60.00 | – |"), "{md}");
    }
}
