//! `pretrain --init` / `finetune --init`: a run starts from the weights of a
//! run folder, an export, torchvision-named weights or the Hub (a loopback
//! server), takes the source's architecture, records what it loaded, and
//! refuses sources that do not fit, by name.

#[path = "../../../tests/support/loopback_hub.rs"]
mod loopback_hub;

mod common;

use common::*;
use pretext_core::paradigm::Paradigm;
use pretext_core::trainer::Method;
use pretext_core::BatchSource;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const CONTRASTIVE: &str = env!("CARGO_BIN_EXE_pretext-contrastive");
const GENERATIVE: &str = env!("CARGO_BIN_EXE_pretext-generative");
const MLM: &str = env!("CARGO_BIN_EXE_pretext-mlm");

/// The loss of the first step of a run.
fn first_loss(run: &Path) -> f64 {
    jsonl(&run.join("metrics.jsonl"))
        .iter()
        .find_map(|r| r["loss"].as_f64())
        .expect("a step record")
}

/// A TOML file, parsed.
fn toml_file(path: &Path) -> toml::Table {
    std::fs::read_to_string(path)
        .expect("toml")
        .parse()
        .expect("valid TOML")
}

/// The `init` record of a run's latest checkpoint.
fn init_record(run: &Path) -> serde_json::Value {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).expect("latest");
    json(&run.join("checkpoints").join(latest.trim()).join("trainer.json"))["init"].clone()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// A trained tiny run `a` of `bin` on `data` (4 steps), exported.
fn trained_and_exported(bin: &str, data: &Path, a: &Path, tiny: &[&str]) {
    ok(
        bin,
        &os(&args![
            "pretrain",
            "--data",
            data,
            "--out",
            a,
            "--set",
            "train.max_steps=4",
            "--set",
            "train.checkpoint_every=2"
        ]
        .into_iter()
        .chain(tiny.iter().map(std::ffi::OsString::from))
        .collect::<Vec<_>>()),
    );
    ok(bin, &os(&args!["export", a]));
}

/// One step of `bin` on `data` from `init` (or from scratch), into `out`.
fn one_step(bin: &str, data: &Path, out: &Path, init: Option<&str>, tiny: &[&str]) -> std::process::Output {
    let mut a = args!["pretrain", "--data", data, "--out", out];
    if let Some(i) = init {
        a.extend(args!["--init", i]);
    }
    a.extend(tiny.iter().map(std::ffi::OsString::from));
    a.extend(args!["--set", "train.max_steps=1"]);
    ok(bin, &os(&a))
}

#[test]
fn starting_from_an_export_or_its_run_gives_the_same_first_loss() {
    let tmp = tempfile::tempdir().expect("tmp");
    let corpus = corpus_txt(&tmp.path().join("corpus.txt"), 150);
    let images = unlabelled_images(&tmp.path().join("photos"), 40);
    for (bin, tiny, data) in [
        (MLM, &MLM_TINY[..], &corpus),
        (GENERATIVE, &GENERATIVE_TINY[..], &images),
    ] {
        let a = tmp.path().join(format!("a-{}", bin.rsplit('-').next().unwrap_or("x")));
        trained_and_exported(bin, data, &a, tiny);
        let from_export = a.with_extension("export");
        let from_run = a.with_extension("run");
        let fresh = a.with_extension("fresh");
        let export = a.join("export");
        one_step(bin, data, &from_export, Some(export.to_str().expect("utf-8")), tiny);
        one_step(bin, data, &from_run, Some(a.to_str().expect("utf-8")), tiny);
        one_step(bin, data, &fresh, None, tiny);
        let (x, r, f) = (first_loss(&from_export), first_loss(&from_run), first_loss(&fresh));
        assert_eq!(x, r, "{bin}: the export holds the checkpoint's weights");
        assert_ne!(x, f, "{bin}: the initial weights change the first step");
        let rec = init_record(&from_export);
        assert_eq!(rec["source"], export.display().to_string());
        assert!(rec["loaded"].as_u64().unwrap_or(0) > 0, "{rec}");
        assert_eq!(
            rec["initialised"],
            serde_json::json!([]),
            "{bin}: the export holds every weight"
        );
        let log = std::fs::read_to_string(from_export.join("metrics.jsonl")).expect("log");
        assert!(
            log.lines().next().is_some_and(|l| l.contains("\"event\":\"init\"")),
            "{log}"
        );
        let config = toml_file(&from_export.join("config.toml"));
        assert_eq!(config["train"]["init"].as_str(), Some(export.to_str().expect("utf-8")));
        if bin == MLM {
            assert!(
                strings(&rec["skipped"])
                    .iter()
                    .any(|s| s.starts_with("cls.predictions.decoder.weight (tied")),
                "{rec}"
            );
            // the source's tokenizer, not a new one
            assert_eq!(
                std::fs::read(from_export.join("tokenizer/vocab.txt")).expect("vocab"),
                std::fs::read(export.join("vocab.txt")).expect("vocab")
            );
        }
    }
}

/// The loss of step 0 of the run in `b` computed by the library: a model of
/// `b`'s config holding the encoder of `a`'s latest checkpoint (loaded the
/// way `resume` loads checkpoints) and a freshly initialised head.
fn contrastive_step_zero_loss(a: &Path, b: &Path) -> f64 {
    let dev = candle_core::Device::Cpu;
    let cfg: pretext_contrastive::ContrastiveConfig = pretext_cli::runner::run_config(b, &[]).expect("config");
    let latest = std::fs::read_to_string(a.join("checkpoints/latest")).expect("latest");
    let ckpt =
        pretext_core::checkpoint::load_checkpoint(&a.join("checkpoints").join(latest.trim()), &dev).expect("ckpt");
    let mut model = pretext_contrastive::app::new_model(&cfg, &dev).expect("model");
    let vars: HashMap<String, candle_core::Var> = pretext_core::trainer::model_vars(&model).into_iter().collect();
    for (name, t) in ckpt.model.iter().filter(|(n, _)| n.starts_with("encoder.")) {
        vars[name].set(t).expect("set");
    }
    model.weights_loaded().expect("twin");
    let (data, ()) =
        pretext_contrastive::Contrastive::load_data(&cfg, None, &mut pretext_core::NullObserver).expect("data");
    let mut batches = pretext_contrastive::Contrastive::batches(&cfg, &data, &(), &dev).expect("batches");
    let batch = batches.batch(0).expect("batch");
    let cx = pretext_core::StepCx {
        step: 0,
        epoch: 0,
        total_steps: cfg.train.total_steps(batches.steps_per_epoch()),
        seed: cfg.train.seed,
        lr: 0.0,
        shard: Default::default(),
    };
    // under the run's precision, as the trainer steps
    let out = cfg.train.precision.scope(|| model.step(&batch, &cx)).expect("step");
    f64::from(out.loss.to_scalar::<f32>().expect("loss"))
}

#[test]
fn a_contrastive_export_starts_the_encoder_and_a_fresh_head() {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = unlabelled_images(&tmp.path().join("photos"), 40);
    for method in ["simclr", "moco"] {
        let a = tmp.path().join(format!("a-{method}"));
        let mut tiny: Vec<&str> = CONTRASTIVE_TINY.to_vec();
        tiny.extend([
            "--method",
            method,
            "--set",
            "model.moco.queue_size=16",
            "--set",
            "model.moco.bn_groups=2",
        ]);
        trained_and_exported(CONTRASTIVE, &images, &a, &tiny);
        let b = tmp.path().join(format!("b-{method}"));
        // only the method's own flags: the architecture comes from the export
        let export = a.join("export");
        let out = one_step(
            CONTRASTIVE,
            &images,
            &b,
            Some(export.to_str().expect("utf-8")),
            &[
                "--method",
                method,
                "--set",
                "train.batch_size=8",
                "--set",
                "model.moco.queue_size=16",
                "--set",
                "model.moco.bn_groups=2",
                "--seed=3",
                "--quiet",
            ],
        );
        assert!(out.status.success());
        let rec = init_record(&b);
        let fresh = strings(&rec["initialised"]);
        assert!(
            !fresh.is_empty() && fresh.iter().all(|n| n.starts_with("head.")),
            "{rec}"
        );
        let want = contrastive_step_zero_loss(&a, &b);
        assert_eq!(first_loss(&b), want, "{method}: the checkpoint's encoder, a fresh head");
    }
}

/// The backbone of a fresh encoder of `encoder`'s shape (3 channels) under
/// its export's names, plus a 1000-class classification layer `layer.*`
/// (torchvision's `fc`, timm's `head`), saved to `path`.
fn backbone_file(path: &Path, encoder: pretext_contrastive::EncoderConfig, layer: &str) -> PathBuf {
    let dev = candle_core::Device::Cpu;
    let cfg = pretext_contrastive::ModelConfig {
        encoder: pretext_contrastive::EncoderConfig {
            in_channels: 3,
            ..encoder
        },
        ..Default::default()
    };
    let model = pretext_contrastive::ContrastiveModel::new(pretext_contrastive::MethodKind::SimClr, &cfg, 11, &dev)
        .expect("model");
    let features = pretext_eval::ImageEncoder::feature_dim(&model);
    let mut t: HashMap<String, candle_core::Tensor> = pretext_contrastive::export::backbone_tensors(&model)
        .into_iter()
        .collect();
    let zeros = |shape: &[usize]| candle_core::Tensor::zeros(shape, candle_core::DType::F32, &dev).expect("zeros");
    t.insert(format!("{layer}.weight"), zeros(&[1000, features]));
    t.insert(format!("{layer}.bias"), zeros(&[1000]));
    candle_core::safetensors::save(&t, path).expect("save");
    path.to_path_buf()
}

/// torchvision ResNet-18 weights: the backbone's names plus `fc.*`.
fn torchvision_file(path: &Path) -> PathBuf {
    let resnet18 = pretext_contrastive::EncoderConfig {
        arch: pretext_contrastive::Arch::Resnet18,
        ..Default::default()
    };
    backbone_file(path, resnet18, "fc")
}

#[test]
fn torchvision_weights_set_the_architecture_and_leave_fc_unused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = unlabelled_images(&tmp.path().join("photos"), 16);
    let weights = torchvision_file(&tmp.path().join("resnet18.safetensors"));
    let run = tmp.path().join("run");
    ok(
        CONTRASTIVE,
        &os(&args![
            "pretrain",
            "--data",
            images,
            "--out",
            run,
            "--init",
            weights,
            "--quiet",
            "--set",
            "train.max_steps=1",
            "--set",
            "train.batch_size=4",
            "--set",
            "data.image_size=16"
        ]),
    );
    let config = toml_file(&run.join("config.toml"));
    assert_eq!(config["model"]["encoder"]["arch"].as_str(), Some("resnet18"));
    assert_eq!(config["model"]["encoder"]["in_channels"].as_integer(), Some(3));
    assert_eq!(config["data"]["channels"].as_integer(), Some(3));
    let mean: Vec<f64> = config["data"]["augment"]["mean"]
        .as_array()
        .map(|a| a.iter().filter_map(toml::Value::as_float).collect())
        .unwrap_or_default();
    assert_eq!(mean, vec![0.485, 0.456, 0.406], "ImageNet statistics");
    let rec = init_record(&run);
    assert_eq!(strings(&rec["unused"]), vec!["fc.bias", "fc.weight"]);
    assert_eq!(rec["loaded"], 120, "torchvision's 122 tensors less fc: {rec}");
}

/// timm ViT-Tiny weights (patch 4, two blocks, 16×16 RGB images): the
/// backbone's names plus a 1000-class `head.*`.
fn timm_vit_file(path: &Path) -> PathBuf {
    let vit = pretext_contrastive::EncoderConfig {
        arch: pretext_contrastive::Arch::VitTiny,
        patch_size: 4,
        depth: 2,
        image_size: 16,
        ..Default::default()
    };
    backbone_file(path, vit, "head")
}

#[test]
fn timm_vit_weights_set_the_architecture_and_leave_the_head_unused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = unlabelled_images(&tmp.path().join("photos"), 16);
    let weights = timm_vit_file(&tmp.path().join("vit.safetensors"));
    let run = tmp.path().join("run");
    ok(
        CONTRASTIVE,
        &os(&args![
            "pretrain",
            "--data",
            images,
            "--out",
            run,
            "--init",
            weights,
            "--quiet",
            "--set",
            "train.max_steps=1",
            "--set",
            "train.batch_size=4"
        ]),
    );
    let config = toml_file(&run.join("config.toml"));
    let enc = &config["model"]["encoder"];
    assert_eq!(enc["arch"].as_str(), Some("vit-tiny"));
    assert_eq!(enc["patch_size"].as_integer(), Some(4));
    assert_eq!(enc["depth"].as_integer(), Some(2));
    assert_eq!(enc["in_channels"].as_integer(), Some(3));
    assert_eq!(config["data"]["channels"].as_integer(), Some(3));
    assert_eq!(
        config["data"]["image_size"].as_integer(),
        Some(16),
        "the position table's grid (4 × 4 patches of 4)"
    );
    let rec = init_record(&run);
    assert_eq!(strings(&rec["unused"]), vec!["head.bias", "head.weight"]);
    assert_eq!(
        rec["loaded"], 30,
        "4 embedding tensors, 12 per block, the final norm's 2: {rec}"
    );
    // a width pretext does not build is refused, naming the file and the width
    let t: HashMap<String, candle_core::Tensor> = [(
        "patch_embed.proj.weight".to_string(),
        candle_core::Tensor::zeros((100, 3, 4, 4), candle_core::DType::F32, &candle_core::Device::Cpu).expect("t"),
    )]
    .into();
    let odd = tmp.path().join("odd.safetensors");
    candle_core::safetensors::save(&t, &odd).expect("save");
    let err = fails(
        CONTRASTIVE,
        &os(&args![
            "pretrain",
            "--data",
            images,
            "--out",
            tmp.path().join("odd"),
            "--init",
            odd,
            "--quiet"
        ]),
    );
    assert!(err.contains("odd.safetensors") && err.contains("100 wide"), "{err}");
    assert!(!tmp.path().join("odd").exists(), "no run folder for a refused source");
}

#[test]
fn sources_that_do_not_fit_are_refused_by_name_and_leave_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = unlabelled_images(&tmp.path().join("photos"), 24);
    let a = tmp.path().join("a");
    trained_and_exported(CONTRASTIVE, &images, &a, &CONTRASTIVE_TINY);
    let out = tmp.path().join("b");
    let try_init = |bin: &str, source: &Path| {
        fails(
            bin,
            &os(&args![
                "pretrain",
                "--data",
                images,
                "--out",
                out,
                "--init",
                source,
                "--quiet",
                "--set",
                "train.max_steps=1",
                "--set",
                "train.batch_size=8"
            ]),
        )
    };
    // a folder without weights
    let no_weights = tmp.path().join("no-weights");
    std::fs::create_dir_all(&no_weights).expect("mkdir");
    std::fs::copy(a.join("export/config.json"), no_weights.join("config.json")).expect("copy");
    let err = try_init(CONTRASTIVE, &no_weights);
    assert!(
        err.contains("no-weights/model.safetensors") && err.contains("no weights"),
        "{err}"
    );
    // a tensor of the wrong type
    let dev = candle_core::Device::Cpu;
    let bad = tmp.path().join("bad-dtype");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::copy(a.join("export/config.json"), bad.join("config.json")).expect("copy");
    let (mut t, _) =
        pretext_core::checkpoint::read_safetensors(&a.join("export/model.safetensors"), &dev).expect("read");
    let w = t["stem.0.weight"].clone();
    t.insert(
        "stem.0.weight".into(),
        w.affine(0.0, 1.0)
            .expect("ones")
            .to_dtype(candle_core::DType::U8)
            .expect("u8"),
    );
    candle_core::safetensors::save(&t, bad.join("model.safetensors")).expect("save");
    let err = try_init(CONTRASTIVE, &bad);
    assert!(
        err.contains("\"encoder.stem.0.weight\"") && err.contains("U8") && err.contains("F32"),
        "{err}"
    );
    // another paradigm's export
    let err = try_init(GENERATIVE, &a.join("export"));
    assert!(
        err.contains("config.json")
            && err.contains("small-resnet")
            && err.contains("not a model of pretext-generative"),
        "{err}"
    );
    let err = try_init(MLM, &a.join("export"));
    assert!(err.contains("model_type"), "{err}");
    // a path that is not there
    let err = try_init(CONTRASTIVE, &tmp.path().join("nowhere"));
    assert!(err.contains("nowhere: no such file or folder"), "{err}");
    assert!(!out.exists(), "a refused source leaves no run folder");
}

#[test]
fn a_hub_source_is_fetched_once_into_the_cache_and_named_in_the_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let corpus = corpus_txt(&tmp.path().join("corpus.txt"), 150);
    let a = tmp.path().join("a");
    trained_and_exported(MLM, &corpus, &a, &MLM_TINY);
    let mut files = HashMap::new();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"] {
        files.insert(
            format!("ns/bert-tiny/{f}"),
            std::fs::read(a.join("export").join(f)).expect("file"),
        );
    }
    let (url, log) = loopback_hub::mock_hub_with(loopback_hub::Mode::Ok, files);
    let cache = tmp.path().join("hf-cache");
    let run_from_hub = |out: &Path, offline: bool, source: &str| {
        let mut c = std::process::Command::new(MLM);
        c.args(["pretrain", "--init", source, "--set", "train.max_steps=1"])
            .arg("--data")
            .arg(&corpus)
            .arg("--out")
            .arg(out)
            .args(MLM_TINY)
            .env("HF_ENDPOINT", &url)
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_TOKEN");
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        }
        c.output().expect("run")
    };
    let b = tmp.path().join("b");
    let out = run_from_hub(&b, false, "hub:ns/bert-tiny");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(init_record(&b)["source"], "hub:ns/bert-tiny");
    let gets = |log: &std::sync::Arc<std::sync::Mutex<Vec<loopback_hub::Request>>>| {
        log.lock()
            .expect("log")
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/model.safetensors"))
            .count()
    };
    assert_eq!(gets(&log), 1);
    // the same weights as the export on disk
    let local = tmp.path().join("local");
    one_step(
        MLM,
        &corpus,
        &local,
        Some(a.join("export").to_str().expect("utf-8")),
        &MLM_TINY,
    );
    assert_eq!(first_loss(&b), first_loss(&local));
    // again, offline: from the cache alone
    let c = tmp.path().join("c");
    let out = run_from_hub(&c, true, "hub:ns/bert-tiny");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(gets(&log), 1, "served from the cache");
    // a repository the Hub does not have
    let d = tmp.path().join("d");
    let out = run_from_hub(&d, false, "hub:ns/missing@v2");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("hub:ns/missing@v2") && err.contains("config.json"),
        "{err}"
    );
    assert!(!d.exists());
}

#[test]
fn finetune_starts_from_a_source_without_a_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = unlabelled_images(&tmp.path().join("photos"), 24);
    let a = tmp.path().join("a");
    trained_and_exported(CONTRASTIVE, &images, &a, &CONTRASTIVE_TINY);
    let labelled = split_images(&tmp.path().join("labelled"), 6, 3);
    let clf = tmp.path().join("clf");
    let stdout = ok(
        CONTRASTIVE,
        &os(&args![
            "finetune",
            "--init",
            a.join("export"),
            "--data",
            labelled,
            "--out",
            clf,
            "--quiet",
            "--set",
            "eval.finetune.budget_images=120"
        ]),
    );
    assert!(String::from_utf8_lossy(&stdout.stdout).contains("test accuracy"));
    let info = json(&clf.join("config.json"))["pretext"].clone();
    assert_eq!(info["init"], a.join("export").display().to_string());
    let config = toml_file(&clf.join("pretext.toml"));
    assert_eq!(
        config["model"]["encoder"]["widths"],
        toml::Value::Array(vec![toml::Value::Integer(4), toml::Value::Integer(8)]),
        "the export's architecture"
    );
    let err = fails(CONTRASTIVE, &os(&args!["finetune", "--data", labelled]));
    assert!(err.contains("--init"), "{err}");
}
