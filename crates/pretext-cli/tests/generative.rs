//! `pretext-generative` end to end on the shipped Fashion-MNIST with a tiny
//! VAE and a tiny MAE: the loss falls, a killed run resumes onto the same
//! trajectory, and probe / sample / export write what they promise.

use std::path::Path;
use std::process::Command;

const TINY: [&str; 24] = [
    "--set",
    "model.arch=\"mlp\"",
    "--set",
    "model.hidden=[32]",
    "--set",
    "model.latent=4",
    "--set",
    "train.batch_size=64",
    "--set",
    "train.max_steps=40",
    "--set",
    "train.checkpoint_every=20",
    "--set",
    "eval.monitor_images=50",
    "--set",
    "eval.knn_train=100",
    "--set",
    "eval.every=0",
    "--set",
    "optim.lr=0.003",
    "--set",
    "eval.knn_k=5",
    "--seed=2",
    "--quiet",
];

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pretext-generative"))
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("elapsed_s");
            }
            v
        })
        .collect()
}

/// 40 logged training losses whose last five average at least 50 nats below the first five.
fn assert_loss_falls(rec: &[serde_json::Value]) {
    let losses: Vec<f64> = rec
        .iter()
        .filter_map(|r| r.get("loss").and_then(|l| l.as_f64()))
        .collect();
    assert_eq!(losses.len(), 40);
    let (head, tail) = (
        losses[..5].iter().sum::<f64>() / 5.0,
        losses[35..].iter().sum::<f64>() / 5.0,
    );
    assert!(tail < head - 50.0, "loss did not fall: {head:.1} → {tail:.1}");
}

#[test]
fn vae_trains_resumes_probes_samples_and_exports() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = tmp.path().join("a");
    let out = bin()
        .arg("pretrain")
        .arg("--out")
        .arg(&a)
        .args(TINY)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec = records(&a);
    assert_loss_falls(&rec);
    assert!(
        rec.iter().all(|r| r.get("loss").is_none() || r.get("kl").is_some()),
        "KL logged per step"
    );
    assert!(rec.iter().any(|r| r["event"] == "elbo"), "held-out ELBO at the end");
    // the collapse indicators of the posterior means (TINY's 4 latents)
    let spread: Vec<&serde_json::Value> = rec.iter().filter(|r| r["event"] == "spread").collect();
    assert!(
        !spread.is_empty()
            && spread.iter().all(|r| r["dim"] == 4
                && r["effective_rank"].as_f64().is_some_and(|v| (1.0..=4.0).contains(&v))
                && r["embedding_std"].as_f64().is_some_and(|v| v > 0.0)),
        "{rec:?}"
    );

    // killed after step 30 (checkpoint 20 is the latest), then resumed
    let b = tmp.path().join("b");
    assert!(Command::new("cp")
        .arg("-r")
        .arg(&a)
        .arg(&b)
        .status()
        .expect("cp")
        .success());
    std::fs::remove_dir_all(b.join("checkpoints/step-00000040")).expect("rm");
    std::fs::write(b.join("checkpoints/latest"), "step-00000020\n").expect("latest");
    let lines: Vec<String> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .expect("log")
        .lines()
        .take(30)
        .map(String::from)
        .collect();
    std::fs::write(b.join("metrics.jsonl"), lines.join("\n") + "\n").expect("log");
    let out = bin().arg("resume").arg(&b).arg("--quiet").output().expect("resume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(records(&b), rec, "metrics differ after resume");

    // probe: likelihood, transfer with baselines, pictures, page
    let out = bin()
        .arg("probe")
        .arg(&a)
        .args([
            "--labels",
            "1%",
            "--quiet",
            "--set",
            "eval.iwae_samples=8",
            "--set",
            "eval.likelihood_images=200",
        ])
        .output()
        .expect("probe");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lik: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("report/likelihood.json")).expect("likelihood.json"))
            .expect("json");
    let (nelbo, iwae) = (
        lik["neg_elbo"].as_f64().expect("elbo"),
        lik["iwae_nll"].as_f64().expect("iwae"),
    );
    assert!(
        iwae <= nelbo && nelbo > 0.0,
        "IWAE {iwae} must not exceed −ELBO {nelbo}"
    );
    assert_eq!(lik["n_test"], 200);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("report/eval.json")).expect("eval.json")).expect("json");
    assert_eq!(
        (report["paradigm"].as_str(), report["method"].as_str()),
        (Some("generative"), Some("vae"))
    );
    assert_eq!(report["records"].as_array().expect("records").len(), 6);
    for png in [
        "reconstructions.png",
        "samples.png",
        "interpolation.png",
        "pca.png",
        "loss.png",
    ] {
        image::open(a.join("report").join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
    }
    let html = std::fs::read_to_string(a.join("report/index.html")).expect("html");
    assert!(
        html.contains("Test likelihood") && html.contains("Reconstructions"),
        "page"
    );

    let out = bin().arg("sample").arg(&a).args(["--n", "9"]).output().expect("sample");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(a.join("report/samples.png")).expect("samples.png");
    assert_eq!(img.width(), 3 * (28 * 3 + 2) + 2, "3 columns of 9 samples");

    let out = bin().arg("export").arg(&a).output().expect("export");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let w =
        candle_core::safetensors::load(a.join("export/model.safetensors"), &candle_core::Device::Cpu).expect("weights");
    assert_eq!(w["enc.0.weight"].dims(), [32, 784]);
    assert_eq!(w["dec.2.weight"].dims(), [784, 32]);
    assert_eq!(w["mu.weight"].dims(), [4, 32]);
    let card = std::fs::read_to_string(a.join("export/README.md")).expect("card");
    assert!(
        card.contains("- self-supervised") && card.contains("Test likelihood"),
        "{card}"
    );
    // its configuration is the VAE's: no `[mae]` table
    assert!(card.contains("[model]") && !card.contains("[mae]"), "{card}");
}

/// A one-block ViT-Tiny MAE on 7×7 patches (a 4×4 grid, 12 of 16 patches hidden).
const TINY_MAE: [&str; 30] = [
    "--method",
    "mae",
    "--set",
    "optim.lr=0.003",
    "--set",
    "mae.depth=1",
    "--set",
    "mae.patch_size=7",
    "--set",
    "mae.decoder_dim=16",
    "--set",
    "mae.decoder_depth=1",
    "--set",
    "mae.decoder_heads=2",
    "--set",
    "train.batch_size=16",
    "--set",
    "train.max_steps=20",
    "--set",
    "train.checkpoint_every=10",
    "--set",
    "schedule.warmup_steps=2",
    "--set",
    "eval.monitor_images=40",
    "--set",
    "eval.knn_train=100",
    "--set",
    "eval.knn_k=5",
    "--seed=4",
    "--quiet",
];

#[test]
fn mae_trains_resumes_probes_and_exports_its_encoder() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = tmp.path().join("a");
    let out = bin()
        .arg("pretrain")
        .arg("--out")
        .arg(&a)
        .args(TINY_MAE)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec = records(&a);
    let losses: Vec<f64> = rec.iter().filter_map(|r| r["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 20);
    let (head, tail) = (losses[..4].iter().sum::<f64>(), losses[16..].iter().sum::<f64>());
    assert!(tail < head, "the masked reconstruction error falls: {losses:?}");
    let held: Vec<&serde_json::Value> = rec.iter().filter(|r| r["event"] == "reconstruction").collect();
    assert!(
        !held.is_empty()
            && held
                .iter()
                .all(|r| r["test_masked_mse"].as_f64().is_some_and(|v| v > 0.0)),
        "{rec:?}"
    );
    // the collapse indicators of the held-out class tokens, at every online evaluation
    let spread: Vec<&serde_json::Value> = rec.iter().filter(|r| r["event"] == "spread").collect();
    assert!(
        spread.len() == held.len()
            && spread.iter().all(|r| r["dim"] == 192
                && r["effective_rank"].as_f64().is_some_and(|v| v > 1.0 && v <= 192.0)
                && r["uniform_std"]
                    .as_f64()
                    .is_some_and(|v| (v - 192f64.sqrt().recip()).abs() < 1e-9)),
        "{rec:?}"
    );
    let config = std::fs::read_to_string(a.join("config.toml")).expect("config");
    assert!(
        config.contains("method = \"mae\"") && config.contains("mask_ratio = 0.75"),
        "{config}"
    );

    // killed after step 15 (checkpoint 10 is the latest), then resumed
    let b = tmp.path().join("b");
    assert!(Command::new("cp")
        .arg("-r")
        .arg(&a)
        .arg(&b)
        .status()
        .expect("cp")
        .success());
    std::fs::remove_dir_all(b.join("checkpoints/step-00000020")).expect("rm");
    std::fs::write(b.join("checkpoints/latest"), "step-00000010\n").expect("latest");
    let lines: Vec<String> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .expect("log")
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .take(15)
        .map(String::from)
        .collect();
    std::fs::write(b.join("metrics.jsonl"), lines.join("\n") + "\n").expect("log");
    let out = bin().arg("resume").arg(&b).arg("--quiet").output().expect("resume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after: Vec<serde_json::Value> = records(&b).into_iter().filter(|r| r.get("loss").is_some()).collect();
    let before: Vec<serde_json::Value> = rec.iter().filter(|r| r.get("loss").is_some()).cloned().collect();
    assert_eq!(after, before, "losses differ after resume");
    let weights = |run: &Path| {
        candle_core::safetensors::load(
            run.join("checkpoints/step-00000020/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .expect("weights")
    };
    let (wa, wb) = (weights(&a), weights(&b));
    assert!(
        wa.contains_key("encoder.pos_embed") && wa.contains_key("mask_token") && wa.contains_key("decoder_pred.weight")
    );
    for (k, t) in &wa {
        let d = (t - &wb[k])
            .and_then(|d| d.abs()?.sum_all()?.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(d, 0.0, "{k} differs after resume");
    }

    // probe: reconstruction error, transfer with baselines, the masked reconstructions
    let out = bin()
        .arg("probe")
        .arg(&a)
        .args([
            "--labels",
            "1%",
            "--no-finetune",
            "--quiet",
            "--set",
            "eval.likelihood_images=100",
            "--set",
            "eval.probe_train=2000",
            "--set",
            "eval.probe_test=500",
        ])
        .output()
        .expect("probe");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("report/reconstruction.json")).expect("reconstruction.json"))
            .expect("json");
    assert_eq!(r["n_test"], 100);
    assert_eq!(r["mask_ratio"], 0.75);
    assert!(r["masked_mse"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("report/eval.json")).expect("eval.json")).expect("json");
    assert_eq!(report["method"], "mae");
    assert_eq!(report["records"].as_array().expect("records").len(), 6);
    let img = image::open(a.join("report/reconstructions.png")).expect("reconstructions.png");
    assert_eq!(
        img.height(),
        3 * (28 * 3 + 2) + 2,
        "inputs, masked inputs, reconstructions"
    );
    assert!(!a.join("report/likelihood.json").exists());
    assert!(
        a.join("report/spread.png").exists(),
        "the collapse curves in the report"
    );

    // an MAE has no prior to sample from: a clear error
    let out = bin().arg("sample").arg(&a).output().expect("sample");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MAE") && err.contains("prior"), "{err}");

    // export: the encoder alone, under timm's names
    let out = bin().arg("export").arg(&a).output().expect("export");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let w =
        candle_core::safetensors::load(a.join("export/model.safetensors"), &candle_core::Device::Cpu).expect("weights");
    assert_eq!(w["pos_embed"].dims(), [1, 17, 192]);
    assert_eq!(w["patch_embed.proj.weight"].dims(), [192, 1, 7, 7]);
    assert!(
        !w.keys().any(|k| k.starts_with("decoder") || k == "mask_token"),
        "{:?}",
        w.keys()
    );
    let card = std::fs::read_to_string(a.join("export/README.md")).expect("card");
    assert!(
        card.contains("timm.create_model") && card.contains("patch_size=7"),
        "{card}"
    );
    // its configuration is the MAE's: the VAE's `[model]` table is left out
    assert!(
        card.contains("[mae]\n") && !card.contains("[model]") && !card.contains("latent ="),
        "{card}"
    );

    // and the export starts a new MAE: the encoder loaded, the decoder fresh
    let c = tmp.path().join("c");
    let out = bin()
        .arg("pretrain")
        .arg("--init")
        .arg(a.join("export"))
        .arg("--out")
        .arg(&c)
        .args([
            "--set",
            "train.max_steps=1",
            "--set",
            "train.batch_size=4",
            "--set",
            "eval.every=0",
            "--quiet",
        ])
        .output()
        .expect("init");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let latest = std::fs::read_to_string(c.join("checkpoints/latest")).expect("latest");
    let trainer: serde_json::Value = serde_json::from_slice(
        &std::fs::read(c.join("checkpoints").join(latest.trim()).join("trainer.json")).expect("trainer.json"),
    )
    .expect("json");
    let init = &trainer["init"];
    assert_eq!(init["loaded"], 4 + 12 + 2, "{init}");
    let fresh: Vec<&str> = init["initialised"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        fresh.contains(&"mask_token") && fresh.iter().all(|n| n.starts_with("decoder_") || *n == "mask_token"),
        "{fresh:?}"
    );
}

/// The convolutional VAE (the default architecture) with fully connected
/// layers and free bits: trains, and exports PyTorch-named weights whose model
/// card carries a module of the same sizes.
#[test]
fn conv_vae_trains_and_exports() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = tmp.path().join("conv");
    let out = bin()
        .arg("pretrain")
        .arg("--out")
        .arg(&a)
        .args(&TINY[2..])
        .args([
            "--set",
            "model.arch=\"conv\"",
            "--set",
            "model.channels=[4, 8]",
            "--set",
            "model.enc_fc=[12]",
            "--set",
            "model.dec_fc=[16]",
            "--set",
            "model.dec_channels=[6, 10]",
            "--set",
            "model.free_bits=0.1",
        ])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_loss_falls(&records(&a));

    let out = bin().arg("export").arg(&a).output().expect("export");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let w =
        candle_core::safetensors::load(a.join("export/model.safetensors"), &candle_core::Device::Cpu).expect("weights");
    let dims = |k: &str| w.get(k).unwrap_or_else(|| panic!("{k} missing")).dims().to_vec();
    assert_eq!(dims("enc.0.weight"), [4, 1, 4, 4]);
    assert_eq!(dims("enc.2.weight"), [8, 4, 4, 4]);
    assert_eq!(dims("enc_fc.0.weight"), [12, 8 * 7 * 7]);
    assert_eq!(dims("mu.weight"), [4, 12]);
    assert_eq!(dims("dec_fc.0.weight"), [16, 4]);
    // the decoder's own widths: 16 → 10×7×7 → 6 → 1 channel
    assert_eq!(dims("dec_fc.2.weight"), [10 * 7 * 7, 16]);
    assert_eq!(dims("dec.0.weight"), [10, 6, 4, 4]);
    assert_eq!(dims("dec.2.weight"), [6, 1, 4, 4]);
    let card = std::fs::read_to_string(a.join("export/README.md")).expect("card");
    assert!(
        card.contains("class ConvVAE") && card.contains("c1=4, c2=8, d1=6, d2=10, enc_fc=(12,), dec_fc=(16,), z=4"),
        "{card}"
    );
    // the default averages the weights: the export is the average, the
    // checkpoint keeps the iterate for resume, and the card says so
    assert!(
        card.contains("exponential moving average of the training iterates (decay 0.999)"),
        "{card}"
    );
    let state = candle_core::safetensors::load(
        a.join("checkpoints/step-00000040/state.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("state");
    let iterate = state["trainer.iterate.enc.0.weight"].flatten_all().expect("flat");
    let published = w["enc.0.weight"].flatten_all().expect("flat");
    let apart = (iterate - published)
        .expect("diff")
        .abs()
        .expect("abs")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar");
    assert!(apart > 0.0, "the exported weights are the iterate, not the average");
}

#[test]
fn bad_vae_config_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = bin()
        .args([
            "pretrain",
            "--set",
            "model.arch=\"conv\"",
            "--set",
            "data.image_size=30",
            "--out",
        ])
        .arg(tmp.path().join("x"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("multiple of 4"), "{err}");
}
