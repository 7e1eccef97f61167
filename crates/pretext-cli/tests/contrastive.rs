//! `pretext-contrastive pretrain` / `resume` end to end on the shipped data,
//! with a tiny model: a run killed after a checkpoint and resumed logs exactly
//! what the uninterrupted run logged and ends with the same weights.

use std::path::Path;
use std::process::Command;

const TINY: [&str; 22] = [
    "--set",
    "train.max_steps=4",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "model.encoder.widths=[4, 8]",
    "--set",
    "model.encoder.strides=[1, 2]",
    "--set",
    "model.head.hidden=8",
    "--set",
    "model.head.output=4",
    "--set",
    "eval.knn_train=64",
    "--set",
    "eval.knn_test=32",
    "--set",
    "schedule.warmup_steps=1",
    "--quiet",
    "--seed=3",
];

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pretext-contrastive"))
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("elapsed_s"); // wall-clock time differs between runs
            }
            v
        })
        .collect()
}

#[test]
fn killed_and_resumed_simclr_run_matches_the_uninterrupted_one() {
    killed_and_resumed_run_matches_the_uninterrupted_one("simclr");
}

/// Mixed precision (`train.precision = "bf16"`): products in bf16 where the
/// CPU has the kernel, and still the same trajectory after a kill.
#[test]
fn killed_and_resumed_bf16_simclr_run_matches_the_uninterrupted_one() {
    killed_and_resumed_run_with("simclr", &["--set", "train.precision=\"bf16\""]);
}

#[test]
fn killed_and_resumed_moco_run_matches_the_uninterrupted_one() {
    killed_and_resumed_run_matches_the_uninterrupted_one("moco");
}

#[test]
fn killed_and_resumed_byol_run_matches_the_uninterrupted_one() {
    killed_and_resumed_run_matches_the_uninterrupted_one("byol");
}

#[test]
fn killed_and_resumed_simsiam_run_matches_the_uninterrupted_one() {
    killed_and_resumed_run_matches_the_uninterrupted_one("simsiam");
}

#[test]
fn killed_and_resumed_barlow_twins_run_matches_the_uninterrupted_one() {
    killed_and_resumed_run_matches_the_uninterrupted_one("barlow_twins");
}

#[test]
fn killed_and_resumed_vicreg_run_matches_the_uninterrupted_one() {
    killed_and_resumed_run_matches_the_uninterrupted_one("vicreg");
}

#[test]
fn killed_and_resumed_dino_run_matches_the_uninterrupted_one() {
    killed_and_resumed_run_matches_the_uninterrupted_one("dino");
}

/// A one-block ViT-Tiny on 7×7 patches (the default's views, 0.57 of 28
/// pixels, round to a 2×2 grid, as DINO's 14×14 local crops are, both with
/// resampled position embeddings; evaluation sees the 4×4 grid of whole
/// images).
const TINY_VIT: [&str; 8] = [
    "--set",
    "model.encoder.arch=\"vit-tiny\"",
    "--set",
    "model.encoder.depth=1",
    "--set",
    "model.encoder.patch_size=7",
    "--set",
    "model.dino.local_size=14",
];

#[test]
fn killed_and_resumed_vit_byol_run_matches_the_uninterrupted_one() {
    killed_and_resumed_run_with("byol", &TINY_VIT);
}

#[test]
fn killed_and_resumed_vit_dino_run_matches_the_uninterrupted_one() {
    killed_and_resumed_run_with("dino", &TINY_VIT);
}

fn killed_and_resumed_run_matches_the_uninterrupted_one(method: &str) {
    killed_and_resumed_run_with(method, &[]);
}

fn killed_and_resumed_run_with(method: &str, extra: &[&str]) {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = tmp.path().join("a");
    let out = bin()
        .arg("pretrain")
        .args(["--method", method])
        .args(["--set", "model.moco.queue_size=20", "--set", "model.moco.bn_groups=2"])
        .args([
            "--set",
            "model.dino.prototypes=16",
            "--set",
            "model.dino.hidden=8",
            "--set",
            "model.dino.local_crops=2",
        ])
        .arg("--out")
        .arg(&a)
        .args(TINY)
        .args(extra)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec_a = records(&a);
    assert_eq!(rec_a.iter().filter(|r| r.get("loss").is_some()).count(), 4);
    let vit = extra.contains(&"model.encoder.arch=\"vit-tiny\"");
    let first_encoder_tensor = if vit {
        "encoder.pos_embed"
    } else {
        "encoder.stem.0.weight"
    };
    assert!(
        final_weights(&a, "step-00000004")
            .iter()
            .any(|(k, _)| k == first_encoder_tensor),
        "no {first_encoder_tensor}"
    );
    assert!(rec_a.iter().any(|r| r["event"] == "knn"), "{rec_a:?}");

    // B: the same run, killed after step 3 — its step-2 checkpoint is the latest,
    // and the log has records past it.
    let b = tmp.path().join("b");
    let cp = Command::new("cp").arg("-r").arg(&a).arg(&b).status().expect("cp");
    assert!(cp.success());
    std::fs::remove_dir_all(b.join("checkpoints/step-00000004")).expect("rm");
    std::fs::write(b.join("checkpoints/latest"), "step-00000002\n").expect("latest");
    let lines: Vec<String> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .expect("log")
        .lines()
        .take(3)
        .map(String::from)
        .collect();
    std::fs::write(b.join("metrics.jsonl"), lines.join("\n") + "\n{\"step\": 4, \"lo").expect("torn log");

    let out = bin().arg("resume").arg(&b).arg("--quiet").output().expect("resume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(records(&b), rec_a, "metrics differ after resume");
    // Same tensors, bit for bit (the files' metadata headers may list keys in another order).
    let (wa, wb) = (final_weights(&a, "step-00000004"), final_weights(&b, "step-00000004"));
    assert!(wa.len() > 10);
    assert!(wa == wb, "final weights differ");
    let config = std::fs::read_to_string(a.join("config.toml")).expect("config.toml");
    assert!(config.contains(&format!("method = \"{method}\"")), "{config}");
    if ["moco", "byol", "dino"].contains(&method) {
        // the queue, its pointer and the key encoder (MoCo), the target network (BYOL) resumed too
        let state = |run: &Path| {
            candle_core::safetensors::load(
                run.join("checkpoints/step-00000004/state.safetensors"),
                &candle_core::Device::Cpu,
            )
            .expect("state")
        };
        let (sa, sb) = (state(&a), state(&b));
        if method == "moco" {
            // 4 steps × 8 keys into a queue of 20: the pointer wrapped to 12
            assert_eq!(sa["queue_ptr"].to_vec1::<u32>().expect("ptr"), [12]);
        } else if method == "dino" {
            // the teacher and the centre (moved away from 0 by four updates)
            assert!(sa.contains_key("teacher.head.last_layer.weight_v"), "{:?}", sa.keys());
            let teacher = format!("teacher.{first_encoder_tensor}");
            assert!(sa.contains_key(&teacher), "{teacher} missing: {:?}", sa.keys());
            assert_eq!(sa["center"].dims(), [1, 16]);
            let c = sa["center"]
                .abs()
                .and_then(|c| c.sum_all()?.to_scalar::<f32>())
                .expect("centre");
            assert!(c > 0.0);
        } else {
            let target = format!("target.{first_encoder_tensor}");
            assert!(sa.contains_key(&target), "{target} missing: {:?}", sa.keys());
            assert!(
                !sa.keys().any(|k| k.contains("predictor")),
                "the target has no predictor"
            );
            let w = final_weights(&a, "step-00000004");
            assert!(
                w.iter().any(|(k, _)| k == "predictor.net.0.weight"),
                "the online predictor is saved"
            );
        }
        assert_eq!(sa.len(), sb.len());
        for (k, t) in &sa {
            let d = (t.to_dtype(candle_core::DType::F64).expect("f64")
                - sb[k].to_dtype(candle_core::DType::F64).expect("f64"))
            .and_then(|d| d.abs()?.sum_all()?.to_scalar::<f64>())
            .expect("diff");
            assert_eq!(d, 0.0, "{k} differs after resume");
        }
    }
}

#[test]
fn the_kernel_switch_forces_narrower_kernels_that_train_alike() {
    use pretext_core::cpu::{KernelSet, KERNELS_ENV};
    let tmp = tempfile::tempdir().expect("tmp");
    let run = |name: &str, kernels: Option<KernelSet>| {
        let out = tmp.path().join(name);
        let mut cmd = bin();
        cmd.arg("pretrain").arg("--out").arg(&out).args(TINY);
        cmd.args(["--set", "train.max_steps=2", "--set", "train.checkpoint_every=2"]);
        // f32 products: each kernel set has them (bf16 ones need AVX512-BF16)
        cmd.args(["--set", "train.precision=\"f32\""]);
        match kernels {
            Some(k) => cmd.env(KERNELS_ENV, k.name()),
            None => cmd.env_remove(KERNELS_ENV),
        };
        let res = cmd.output().expect("run");
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
        let trainer: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("checkpoints/step-00000002/trainer.json")).expect("trainer.json"),
        )
        .expect("json");
        let losses: Vec<f64> = records(&out)
            .iter()
            .filter_map(|r| r.get("loss").and_then(|l| l.as_f64()))
            .collect();
        assert_eq!(losses.len(), 2);
        (trainer["cpu"]["kernels"].as_str().expect("kernels").to_string(), losses)
    };
    let widest = KernelSet::widest();
    let (recorded, want) = run("auto", None);
    assert_eq!(
        recorded,
        widest.name(),
        "the default is the widest kernels this CPU has"
    );
    for k in KernelSet::ALL.into_iter().filter(|&k| k < widest) {
        let (recorded, got) = run(k.name(), Some(k));
        assert_eq!(recorded, k.name(), "{KERNELS_ENV}={k} was not what the run used");
        // The first loss is one forward pass of the same weights: the products
        // differ only in the order of their sums. The second has one update in it.
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        assert!(rel(got[0], want[0]) < 1e-5, "{k}: first loss {} vs {}", got[0], want[0]);
        assert!(
            rel(got[1], want[1]) < 1e-4,
            "{k}: second loss {} vs {}",
            got[1],
            want[1]
        );
    }
}

/// The weights of a run's checkpoint `step`, tensor by tensor, sorted by name
/// (as f64: every f32 and integer value exactly).
fn final_weights(run: &Path, step: &str) -> Vec<(String, Vec<f64>)> {
    let t = candle_core::safetensors::load(
        run.join("checkpoints").join(step).join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("weights");
    let mut v: Vec<(String, Vec<f64>)> = t
        .into_iter()
        .map(|(k, t)| {
            let values = t
                .flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F64))
                .and_then(|t| t.to_vec1::<f64>())
                .expect("values");
            (k, values)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A run killed with SIGKILL after its last training step, inside the final
/// online kNN evaluation (before the checkpoint that follows it), resumes to
/// the uninterrupted run's log, the kNN record included, and its weights.
#[test]
fn a_run_killed_during_its_final_evaluation_resumes_to_the_same_log() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().expect("tmp");
    // A large kNN bank makes the final evaluation last long enough to be hit.
    let eval = ["--set", "eval.knn_train=20000", "--set", "eval.knn_test=5000"];
    let a = tmp.path().join("a");
    let out = bin()
        .arg("pretrain")
        .arg("--out")
        .arg(&a)
        .args(TINY)
        .args(eval)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec_a = records(&a);
    assert!(
        rec_a.iter().rev().nth(1).is_some_and(|r| r["event"] == "knn"),
        "{rec_a:?}"
    );
    assert!(rec_a.last().is_some_and(|r| r["event"] == "spread"), "{rec_a:?}");

    let b = tmp.path().join("b");
    let tiny: Vec<&str> = TINY.iter().copied().filter(|a| *a != "--quiet").collect();
    let mut child = bin()
        .arg("pretrain")
        .arg("--out")
        .arg(&b)
        .args(&tiny)
        .args(eval)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.expect("stderr line");
        let last_step = line.contains(" step 4/4 ");
        seen.push(line);
        if last_step {
            // the 4th step is logged; its evaluation and checkpoint follow
            child.kill().expect("kill");
            break;
        }
    }
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the run was not killed: {seen:?}");
    // Killed inside the window: the step-4 checkpoint and kNN record are not written.
    let latest = std::fs::read_to_string(b.join("checkpoints/latest")).expect("latest");
    assert_eq!(latest.trim(), "step-00000002", "{seen:?}");
    assert!(!records(&b).iter().any(|r| r["event"] == "knn"));

    let out = bin().arg("resume").arg(&b).arg("--quiet").output().expect("resume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(records(&b), rec_a, "metrics differ after resume");
    let wa = final_weights(&a, "step-00000004");
    assert!(wa.len() > 10);
    assert!(wa == final_weights(&b, "step-00000004"), "final weights differ");
}

#[test]
fn bad_config_and_data_are_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = bin()
        .args(["pretrain", "--set", "optim.lrr=1", "--out"])
        .arg(tmp.path().join("x"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lrr"));
    let out = bin()
        .args(["pretrain", "--data"])
        .arg(tmp.path())
        .arg("--out")
        .arg(tmp.path().join("y"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no image data recognised"), "{err}");
    let out = bin().args(["resume"]).arg(tmp.path()).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.toml"));
}

/// Writes an IDX file of `n` 8×8 images in two classes (bright left or right half, with noise).
fn write_idx_pair(dir: &Path, prefix: &str, n: usize, seed: u64) {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u8
    };
    let mut img = vec![0u8, 0, 8, 3];
    for d in [n as u32, 8, 8] {
        img.extend_from_slice(&d.to_be_bytes());
    }
    let mut lab = vec![0u8, 0, 8, 1];
    lab.extend_from_slice(&(n as u32).to_be_bytes());
    for i in 0..n {
        let class = (i % 2) as u8;
        for _y in 0..8 {
            for x in 0..8 {
                let bright = (x < 4) == (class == 0);
                img.push(if bright { 160 + next() % 90 } else { next() % 90 });
            }
        }
        lab.push(class);
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).expect("write images");
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).expect("write labels");
}

#[test]
fn probe_writes_a_report_with_baselines() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    write_idx_pair(&data, "train", 48, 1);
    write_idx_pair(&data, "t10k", 20, 2);
    let run = tmp.path().join("run");
    let out = bin()
        .arg("pretrain")
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .args([
            "--set",
            "data.image_size=8",
            "--set",
            "data.augment.mean=[0.5]",
            "--set",
            "data.augment.std=[0.3]",
        ])
        .args([
            "--set",
            "eval.knn_train=16",
            "--set",
            "eval.knn_test=10",
            "--set",
            "eval.knn_k=3",
            "--set",
            "eval.finetune_max_labels=0.5",
            "--set",
            "eval.finetune.budget_images=96",
            "--set",
            "eval.finetune.batch_size=8",
        ])
        .args(&TINY[..20])
        .arg("--quiet")
        .output()
        .expect("pretrain");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bin()
        .arg("probe")
        .arg(&run)
        .args(["--labels", "50%,100%", "--quiet"])
        .output()
        .expect("probe");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report/eval.json")).expect("eval.json")).expect("json");
    let recs = report["records"].as_array().expect("records");
    // linear + kNN for 3 feature sets at 2 fractions, fine-tuning for 2 at 50%
    assert_eq!(recs.len(), 3 * 2 * 2 + 2, "{report}");
    for feat in ["pretrained", "random-init"] {
        let ft = recs
            .iter()
            .find(|r| r["features"] == feat && r["protocol"] == "finetune")
            .expect("finetune record");
        assert_eq!(
            (ft["labels"].as_f64(), ft["n_train"].as_u64()),
            (Some(0.5), Some(24)),
            "{ft}"
        );
    }
    for feat in ["pretrained", "random-init", "raw"] {
        for proto in ["linear", "knn"] {
            assert!(
                recs.iter()
                    .any(|r| r["features"] == feat && r["protocol"] == proto && r["labels"] == 1.0),
                "{feat} {proto}"
            );
        }
    }
    let raw_linear = recs
        .iter()
        .find(|r| r["features"] == "raw" && r["protocol"] == "linear" && r["labels"] == 1.0)
        .expect("raw");
    assert!(raw_linear["accuracy"].as_f64().unwrap_or(0.0) >= 0.9, "{raw_linear}");
    assert_eq!(raw_linear["n_test"], 20);
    assert!(std::fs::read_to_string(run.join("report/eval.md"))
        .expect("eval.md")
        .contains("| raw | linear |"));
    // the plots decode as PNG images and the page carries them inline
    for png in ["label_efficiency.png", "loss.png", "knn.png", "spread.png", "pca.png"] {
        let img = image::open(run.join("report").join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(img.width() >= 600 && img.height() >= 400, "{png}");
    }
    let html = std::fs::read_to_string(run.join("report/index.html")).expect("index.html");
    assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 5);
    assert!(html.contains("<td>finetune</td>"), "{html}");

    // export: the backbone alone, PyTorch names, config and card
    let out = bin().arg("export").arg(&run).output().expect("export");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let exp = run.join("export");
    let weights =
        candle_core::safetensors::load(exp.join("model.safetensors"), &candle_core::Device::Cpu).expect("weights");
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    assert!(
        names.iter().all(|n| n.starts_with("stem.") || n.starts_with("stages.")),
        "{names:?}"
    );
    assert_eq!(weights["stem.0.weight"].dims(), [4, 1, 3, 3]);
    assert!(weights.contains_key("stages.1.short.1.running_var"));
    let ckpt = candle_core::safetensors::load(
        run.join("checkpoints/step-00000004/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("ckpt");
    let same = (&weights["stages.1.conv2.weight"] - &ckpt["encoder.stages.1.conv2.weight"])
        .and_then(|d| d.abs()?.sum_all()?.to_scalar::<f32>())
        .expect("diff");
    assert_eq!(same, 0.0);
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exp.join("config.json")).expect("config.json")).expect("json");
    assert_eq!(
        (conf["architecture"].as_str(), conf["feature_dim"].as_u64()),
        (Some("small-resnet"), Some(8))
    );
    let card = std::fs::read_to_string(exp.join("README.md")).expect("card");
    assert!(card.starts_with("---\nlibrary_name: pretext\n"), "{card}");
    assert!(
        card.contains("- self-supervised\n") && card.contains("- simclr\n"),
        "{card}"
    );
    assert!(card.contains("type: accuracy"), "{card}");
    assert!(card.contains("model.load_state_dict(state)"), "{card}");
}

/// The resolved config of a 0-step run: `pretrain` with `args` writes it.
fn resolved_config(args: &[&str]) -> toml::Table {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("run");
    let res = bin()
        .arg("pretrain")
        .arg("--out")
        .arg(&out)
        .args(TINY)
        .args(["--set", "train.max_steps=1", "--set", "eval.knn_every=0"])
        .args(args)
        .output()
        .expect("run");
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    std::fs::read_to_string(out.join("config.toml"))
        .expect("config.toml")
        .parse()
        .expect("toml")
}

#[test]
fn method_flag_brings_its_recipe_and_config_files_keep_their_method() {
    // --method barlow_twins: the preset's three-layer projector and λ (the TINY
    // --set of hidden/output still wins over the preset)
    let c = resolved_config(&["--method", "barlow_twins"]);
    assert_eq!(c["method"].as_str(), Some("barlow_twins"));
    assert_eq!(c["model"]["head"]["layers"].as_integer(), Some(3));
    assert_eq!(c["model"]["head"]["hidden"].as_integer(), Some(8));
    assert_eq!(c["model"]["barlow_twins"]["lambda"].as_float(), Some(0.0051));
    // a --config file is applied over the preset
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("mine.toml");
    std::fs::write(&file, "[model.head]\nlayers = 2\n[model.byol]\npredictor_hidden = 12\n").expect("write");
    let c = resolved_config(&["--method", "byol", "--config", file.to_str().expect("utf-8")]);
    assert_eq!(c["method"].as_str(), Some("byol"));
    assert_eq!(c["model"]["byol"]["predictor_hidden"].as_integer(), Some(12));
    assert_eq!(c["model"]["byol"]["momentum_cosine"].as_bool(), Some(true));
    // without --method, a config file's method is the run's method
    let moco = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pretext-contrastive/configs/moco-fmnist.toml");
    let c = resolved_config(&[
        "--config",
        moco.to_str().expect("utf-8"),
        "--set",
        "model.moco.queue_size=16",
        "--set",
        "model.moco.bn_groups=2",
    ]);
    assert_eq!(c["method"].as_str(), Some("moco"));
    assert_eq!(resolved_config(&[])["method"].as_str(), Some("simclr"));
}
