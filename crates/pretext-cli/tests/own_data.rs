//! A user's own data end to end, on fixtures the tests make: pretraining on
//! unlabelled images and text, then transfer to separate labelled data.

mod common;

use common::*;
use pretext_core::trainer::NullObserver;
use std::path::Path;

const CONTRASTIVE: &str = env!("CARGO_BIN_EXE_pretext-contrastive");
const GENERATIVE: &str = env!("CARGO_BIN_EXE_pretext-generative");
const MLM: &str = env!("CARGO_BIN_EXE_pretext-mlm");

fn assert_sha256(v: &serde_json::Value) {
    let s = v.as_str().unwrap_or_default();
    assert!(
        s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()),
        "not a SHA-256: {v}"
    );
}

#[test]
fn mlm_pretrains_on_unlabelled_text_and_is_probed_on_separate_labelled_text() {
    let tmp = tempfile::tempdir().expect("tmp");
    let txt = corpus_txt(&tmp.path().join("corpus.txt"), 150);
    let jsonl = unlabelled_jsonl(&tmp.path().join("docs.jsonl"), 150);
    for (name, data) in [("txt", &txt), ("jsonl", &jsonl)] {
        let run = tmp.path().join(format!("run-{name}"));
        ok(MLM, &os(&args!["pretrain", "--data", data, "--out", run, MLM_TINY]));
        let log = std::fs::read_to_string(run.join("metrics.jsonl")).expect("log");
        let evals = log.lines().filter(|l| l.contains("\"masked_lm\"")).count();
        assert_eq!(
            evals, 2,
            "held-out masked LM at steps 10 and 20 on the unlabelled {name}: {log}"
        );
        assert!(run.join("tokenizer/tokenizer.json").is_file());
    }
    let run = tmp.path().join("run-txt");
    let err = fails(MLM, &os(&args!["probe", run, "--quiet"]));
    assert!(err.contains("no labels") && err.contains("--data PATH"), "{err}");
    assert!(!run.join("report").exists(), "a failed probe writes no report");

    let labelled = labelled_jsonl(&tmp.path().join("topics.jsonl"), 60, 7);
    ok(
        MLM,
        &os(&args!["probe", run, "--data", labelled, "--labels", "100%", "--quiet"]),
    );
    let eval = json(&run.join("report/eval.json"));
    let data = &eval["data"];
    assert_eq!(data["path"], labelled.display().to_string());
    assert_sha256(&data["sha256"]);
    assert_eq!(data["split"], "stratified");
    assert_eq!(
        (data["n_train"].as_u64(), data["n_test"].as_u64()),
        (Some(48), Some(12))
    );
    assert_eq!(data["classes"], serde_json::json!(["food", "sport", "tech"]));
    let recs = eval["records"].as_array().expect("records");
    for features in ["pretrained", "random-init", "raw"] {
        assert!(
            recs.iter()
                .any(|r| r["features"] == features && r["protocol"] == "linear" && r["n_test"] == 12),
            "{features}: {recs:?}"
        );
    }
    let masked = json(&run.join("report/masked_lm.json"));
    assert_eq!(masked["text"], "the probe data's test documents");
}

#[test]
fn image_encoders_pretrained_on_an_unlabelled_folder_are_probed_on_separate_labelled_folders() {
    let tmp = tempfile::tempdir().expect("tmp");
    let unlabelled = unlabelled_images(&tmp.path().join("photos"), 48);
    let own_split = split_images(&tmp.path().join("labelled"), 8, 4);
    let flat = labelled_images(&tmp.path().join("flat"), 10, 5);
    for (bin, tiny) in [(CONTRASTIVE, CONTRASTIVE_TINY), (GENERATIVE, GENERATIVE_TINY)] {
        let run = tmp
            .path()
            .join(format!("run-{}", bin.rsplit('-').next().unwrap_or("x")));
        ok(bin, &os(&args!["pretrain", "--data", unlabelled, "--out", run, tiny]));
        assert!(run.join("checkpoints/latest").is_file());
        if bin == CONTRASTIVE {
            // no kNN without labels, but the collapse indicators of training images
            let log = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
            let events: Vec<serde_json::Value> = log
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|r| r.get("event").is_some())
                .collect();
            assert!(!events.iter().any(|e| e["event"] == "knn"), "{events:?}");
            let spread = events.iter().find(|e| e["event"] == "spread").expect("a spread event");
            let rank = spread["effective_rank"].as_f64().unwrap_or(0.0);
            let dim = spread["dim"].as_f64().unwrap_or(0.0);
            assert!((1.0..=dim).contains(&rank), "{spread}");
        }
        let err = fails(bin, &os(&args!["probe", run, "--quiet"]));
        assert!(err.contains("no labels") && err.contains("--data PATH"), "{bin}: {err}");

        // the data's own train/ and test/ folders
        ok(
            bin,
            &os(&args![
                "probe",
                run,
                "--data",
                own_split,
                "--labels",
                "100%",
                "--no-finetune",
                "--quiet"
            ]),
        );
        let eval = json(&run.join("report/eval.json"));
        let data = &eval["data"];
        assert_eq!(data["split"], "own", "{bin}: {data}");
        assert_eq!(
            (data["n_train"].as_u64(), data["n_test"].as_u64()),
            (Some(24), Some(12))
        );
        assert_eq!(data["classes"], serde_json::json!(IMAGE_CLASSES));
        assert_sha256(&data["sha256"]);
        assert_eq!(eval["dataset"], own_split.display().to_string());
        let recs = eval["records"].as_array().expect("records");
        assert!(
            recs.iter()
                .any(|r| r["features"] == "pretrained" && r["protocol"] == "linear" && r["n_test"] == 12),
            "{bin}: {recs:?}"
        );

        // class folders without a split: a seeded, stratified fifth is the test set
        ok(
            bin,
            &os(&args![
                "probe",
                run,
                "--data",
                flat,
                "--labels",
                "100%",
                "--no-finetune",
                "--quiet"
            ]),
        );
        let data = json(&run.join("report/eval.json"))["data"].clone();
        assert_eq!(data["split"], "stratified");
        assert_eq!((data["n_train"].as_u64(), data["n_test"].as_u64()), (Some(24), Some(6)));
    }
    // keys that describe how the run was trained cannot change at probe time
    let run = tmp.path().join("run-contrastive");
    let err = fails(
        CONTRASTIVE,
        &os(&args![
            "probe",
            run,
            "--data",
            flat,
            "--set",
            "model.encoder.widths=[2, 2]"
        ]),
    );
    assert!(err.contains("only eval.* keys and data.format"), "{err}");
}

/// Features of an `embed` JSON-lines file by id.
fn embedded(path: &Path) -> Vec<(String, Vec<f64>)> {
    jsonl(path)
        .iter()
        .map(|l| {
            let f = l["embedding"]
                .as_array()
                .expect("embedding")
                .iter()
                .filter_map(|x| x.as_f64())
                .collect();
            (l["id"].as_str().unwrap_or_default().to_string(), f)
        })
        .collect()
}

fn assert_close(a: &[f64], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - f64::from(*y)).abs() <= 1e-6 * (1.0 + x.abs()),
            "{what}: {x} vs {y}"
        );
    }
}

#[test]
fn embed_writes_the_probes_features_of_every_image_and_document() {
    let tmp = tempfile::tempdir().expect("tmp");
    // images: a run on an unlabelled folder embeds a labelled one with its own split
    let run = tmp.path().join("run-img");
    let photos = unlabelled_images(&tmp.path().join("photos"), 24);
    ok(
        CONTRASTIVE,
        &os(&args!["pretrain", "--data", photos, "--out", run, CONTRASTIVE_TINY]),
    );
    let labelled = split_images(&tmp.path().join("labelled"), 4, 2);
    let out = tmp.path().join("img.jsonl");
    ok(
        CONTRASTIVE,
        &os(&args!["embed", run, "--data", labelled, "--out", out, "--quiet"]),
    );
    let rows = embedded(&out);
    assert_eq!(rows.len(), 18, "12 train + 6 test images");
    assert!(rows.iter().all(|(_, f)| f.len() == 8), "the encoder's 8 features");
    let lines = jsonl(&out);
    assert_eq!(lines[0]["id"], "train/checks/00.png");
    assert_eq!(lines[17]["id"], "test/vstripes/01.png");
    assert_eq!(lines[17]["label"], "vstripes");
    // the probe's features: the same run, the same images, through the probe's own function
    let cfg: pretext_contrastive::ContrastiveConfig = pretext_cli::runner::run_config(&run, &[]).expect("config");
    let dev = candle_core::Device::Cpu;
    let trained =
        pretext_core::paradigm::load_trained::<pretext_contrastive::Contrastive>(&run, &cfg, &dev).expect("trained");
    let ds = pretext_data::source::load_images(
        &labelled.join("test"),
        pretext_data::source::ImageFormat::Auto,
        (16, 16),
        1,
    )
    .expect("images")
    .train;
    let probe = pretext_contrastive::app::embed(&trained.model, &ds, &[0, 1], &cfg, &dev, &mut NullObserver, "t")
        .expect("probe features");
    assert_close(&rows[12].1, probe.row(0), "test/checks/00.png");
    assert_close(&rows[13].1, probe.row(1), "test/checks/01.png");
    // a folder without labels, to Parquet and NumPy
    for (fmt, file) in [("parquet", "photos.parquet"), ("npy", "photos.npy")] {
        let o = tmp.path().join(file);
        let stdout = ok(
            CONTRASTIVE,
            &os(&args![
                "embed", run, "--data", photos, "--format", fmt, "--out", o, "--quiet"
            ]),
        );
        assert!(String::from_utf8_lossy(&stdout.stdout).contains("24 rows × 8 features"));
        assert!(o.is_file());
    }
    let npy = std::fs::read(tmp.path().join("photos.npy")).expect("npy");
    assert!(String::from_utf8_lossy(&npy[..80]).contains("'shape': (24, 8)"));
    assert_eq!(jsonl(&tmp.path().join("photos.rows.jsonl")).len(), 24);

    // text: an MLM run embeds a JSONL, unlabelled and labelled
    let mrun = tmp.path().join("run-text");
    let corpus = corpus_txt(&tmp.path().join("corpus.txt"), 120);
    ok(MLM, &os(&args!["pretrain", "--data", corpus, "--out", mrun, MLM_TINY]));
    let docs = labelled_jsonl(&tmp.path().join("docs.jsonl"), 30, 4);
    let out = tmp.path().join("text.jsonl");
    ok(MLM, &os(&args!["embed", mrun, "--data", docs, "--out", out, "--quiet"]));
    let rows = embedded(&out);
    assert_eq!(rows.len(), 30);
    assert!(rows.iter().all(|(_, f)| f.len() == 32), "hidden size 32");
    assert_eq!(jsonl(&out)[4]["label"], "sport");
    let cfg: pretext_mlm::MlmConfig = pretext_cli::runner::run_config(&mrun, &[]).expect("config");
    let trained = pretext_core::paradigm::load_trained::<pretext_mlm::Mlm>(&mrun, &cfg, &dev).expect("trained");
    let ds = pretext_data::source::load_text(&docs, pretext_data::source::TextFormat::Auto, &cfg.data.fields())
        .expect("docs");
    let probe = pretext_mlm::app::text_features(&trained.model, &trained.assets, &ds, &cfg, &mut NullObserver, "t")
        .expect("probe features");
    for i in [0, 7, 29] {
        assert_close(&rows[i].1, probe.row(i), &format!("document {i}"));
    }
}

#[test]
fn an_image_classifier_predicts_what_finetune_measured_and_refuses_foreign_classes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = tmp.path().join("run");
    let photos = unlabelled_images(&tmp.path().join("photos"), 24);
    ok(
        CONTRASTIVE,
        &os(&args!["pretrain", "--data", photos, "--out", run, CONTRASTIVE_TINY]),
    );
    let labelled = split_images(&tmp.path().join("labelled"), 10, 5);
    let clf = tmp.path().join("clf");
    let stdout = ok(
        CONTRASTIVE,
        &os(&args![
            "finetune",
            run,
            "--data",
            labelled,
            "--labels",
            "8/class",
            "--out",
            clf,
            "--quiet",
            "--set",
            "eval.finetune.budget_images=480",
            "--set",
            "eval.finetune.lr=0.01"
        ]),
    );
    let said = String::from_utf8_lossy(&stdout.stdout).to_string();
    assert!(
        said.contains("test accuracy") && said.contains("raw inputs (pixels)"),
        "{said}"
    );
    for f in ["model.safetensors", "config.json", "README.md", "pretext.toml"] {
        assert!(clf.join(f).is_file(), "{f}");
    }
    let config = json(&clf.join("config.json"));
    let info = &config["pretext"];
    assert_eq!(config["id2label"]["2"], "vstripes");
    assert_eq!(info["classes"], serde_json::json!(IMAGE_CLASSES));
    assert_eq!(info["n_labels"], 24);
    assert_eq!(info["n_test"], 15);
    assert_eq!(info["data"]["split"], "own");
    assert!(info["baselines"][0]["name"] == "raw-linear" && info["baselines"][0]["accuracy"].is_f64());
    let test_accuracy = info["test_accuracy"].as_f64().expect("accuracy");
    // predicting the test split gives back exactly the accuracy finetune reported
    let preds = tmp.path().join("preds.jsonl");
    ok(
        CONTRASTIVE,
        &os(&args![
            "predict",
            clf,
            "--data",
            labelled.join("test"),
            "--out",
            preds,
            "--quiet"
        ]),
    );
    let lines = jsonl(&preds);
    assert_eq!(lines.len(), 15);
    let correct = lines.iter().filter(|l| l["label"] == l["true_label"]).count();
    assert_eq!(correct as f64 / 15.0, test_accuracy, "{lines:?}");
    for l in &lines {
        let p: f64 = IMAGE_CLASSES
            .iter()
            .filter_map(|c| l["probabilities"][c].as_f64())
            .sum();
        assert!((p - 1.0).abs() < 1e-4, "probabilities sum to 1: {l}");
        assert_eq!(
            l["probability"],
            l["probabilities"][l["label"].as_str().unwrap_or_default()]
        );
    }
    // unlabelled images to standard output
    let out = ok(CONTRASTIVE, &os(&args!["predict", clf, "--data", photos, "--quiet"]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(text.lines().count(), 24);
    assert!(!text.contains("true_label"));
    // images of classes the classifier does not have
    let other = tmp.path().join("other");
    for c in ["cats", "dogs"] {
        unlabelled_images(&other.join(c), 2);
    }
    let err = fails(
        CONTRASTIVE,
        &os(&args![
            "predict",
            clf,
            "--data",
            other,
            "--out",
            tmp.path().join("x.jsonl")
        ]),
    );
    assert!(
        err.contains("data: ") && err.contains("\"cats\"") && err.contains("not the classifier's"),
        "{err}"
    );
    assert!(!tmp.path().join("x.jsonl").exists(), "no half-written output");
    // a run folder is not a classifier
    let err = fails(CONTRASTIVE, &os(&args!["predict", run, "--data", photos]));
    assert!(
        err.contains("a run folder, not a classifier") && err.contains("classifiers/"),
        "{err}"
    );
    // the wrong tool for the folder
    let err = fails(GENERATIVE, &os(&args!["predict", clf, "--data", photos]));
    assert!(err.contains("use pretext-contrastive predict"), "{err}");
    // every label trains, the last epoch is kept
    let all = tmp.path().join("clf-all");
    ok(
        CONTRASTIVE,
        &os(&args![
            "finetune",
            run,
            "--data",
            labelled,
            "--labels",
            "8/class",
            "--validation",
            "0",
            "--out",
            all,
            "--quiet",
            "--set",
            "eval.finetune.budget_images=240"
        ]),
    );
    let info = json(&all.join("config.json"))["pretext"].clone();
    assert_eq!(
        (info["n_validation"].as_u64(), info["training"]["n_train"].as_u64()),
        (Some(0), Some(24))
    );
    assert!(
        info["validation_accuracy"].is_null() && info["training"]["best_epoch"].is_null(),
        "{info}"
    );
    // fewer labels than classes
    let err = fails(
        CONTRASTIVE,
        &os(&args![
            "finetune",
            run,
            "--data",
            labelled,
            "--labels",
            "2%",
            "--out",
            tmp.path().join("c2")
        ]),
    );
    assert!(err.contains("leaves out class(es)") && err.contains("1/class"), "{err}");
    // a labelled folder of one class
    let one = tmp.path().join("one");
    unlabelled_images(&one.join("cats"), 6);
    let err = fails(
        CONTRASTIVE,
        &os(&args!["finetune", run, "--data", one, "--out", tmp.path().join("c1")]),
    );
    assert!(err.contains("only one class (\"cats\")"), "{err}");
    let err = fails(CONTRASTIVE, &os(&args!["probe", run, "--data", one, "--no-finetune"]));
    assert!(err.contains("only one class (\"cats\")"), "{err}");
    assert!(!tmp.path().join("c1").exists());
}

#[test]
fn a_text_classifier_predicts_what_finetune_measured() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = tmp.path().join("run");
    let corpus = unlabelled_jsonl(&tmp.path().join("corpus.jsonl"), 120);
    ok(MLM, &os(&args!["pretrain", "--data", corpus, "--out", run, MLM_TINY]));
    let data = split_jsonl(&tmp.path().join("topics.jsonl"), 90, 3);
    let clf = tmp.path().join("clf");
    ok(
        MLM,
        &os(&args![
            "finetune",
            run,
            "--data",
            data,
            "--out",
            clf,
            "--quiet",
            "--scratch",
            "--set",
            "eval.finetune.lr=0.003",
            "--set",
            "eval.finetune.epochs=6"
        ]),
    );
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "README.md",
    ] {
        assert!(clf.join(f).is_file(), "{f}");
    }
    let config = json(&clf.join("config.json"));
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert_eq!(config["id2label"]["1"], "sport");
    assert_eq!(config["label2id"]["tech"], 2);
    let info = &config["pretext"];
    assert_eq!(
        (info["n_test"].as_u64(), info["n_validation"].as_u64()),
        (Some(9), Some(9))
    );
    assert_eq!(info["data"]["split"], "own");
    assert_eq!(info["baselines"][1]["name"], "scratch-finetune");
    let test_accuracy = info["test_accuracy"].as_f64().expect("accuracy");
    let preds = tmp.path().join("preds.jsonl");
    ok(
        MLM,
        &os(&args!["predict", clf, "--data", data, "--out", preds, "--quiet"]),
    );
    let lines = jsonl(&preds);
    assert_eq!(lines.len(), 90, "every record, whatever its split");
    let test: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["row"].as_u64().is_some_and(|r| r % 10 == 9))
        .collect();
    let correct = test.iter().filter(|l| l["label"] == l["true_label"]).count();
    assert_eq!(correct as f64 / test.len() as f64, test_accuracy);
    let weights = std::fs::read(clf.join("model.safetensors")).expect("weights");
    let header = String::from_utf8_lossy(&weights[8..8 + 4000.min(weights.len() - 8)]).to_string();
    assert!(header.contains("bert.pooler.dense.weight") && header.contains("classifier.weight"));
    assert!(!header.contains("cls.predictions"), "no MLM head in a classifier");
}

#[test]
fn a_corpus_the_tokenizer_cannot_read_is_a_data_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let corpus = corpus_txt(&tmp.path().join("corpus.txt"), 60);
    let tok = tmp.path().join("tok");
    ok(
        MLM,
        &os(&args![
            "tokenizer",
            "train",
            "--data",
            corpus,
            "--vocab-size",
            "200",
            "--out",
            tok
        ]),
    );
    let greek = tmp.path().join("greek.txt");
    std::fs::write(&greek, "αβγ δεζ ηθι\nκλμ νξο πρσ\nτυφ χψω αβγ\n").expect("write");
    let run = tmp.path().join("run");
    let err = fails(
        MLM,
        &os(&args![
            "pretrain",
            "--data",
            greek,
            "--out",
            run,
            MLM_TINY,
            "--set",
            format!("tokenizer.path={:?}", tok.join("tokenizer.json").display().to_string())
        ]),
    );
    assert!(
        err.contains("data: ") && err.contains("greek.txt") && err.contains("[UNK]"),
        "{err}"
    );
    assert!(!run.exists());
}

#[test]
fn colour_images_read_as_grayscale_are_announced() {
    let tmp = tempfile::tempdir().expect("tmp");
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).expect("mkdir");
    for i in 0..8u32 {
        image::RgbImage::from_fn(16, 16, |x, y| {
            image::Rgb([(x * 16) as u8, (y * 16) as u8, (i * 30) as u8])
        })
        .save(photos.join(format!("{i}.png")))
        .expect("png");
    }
    let out = ok(
        GENERATIVE,
        &os(&args![
            "pretrain",
            "--data",
            photos,
            "--out",
            tmp.path().join("run"),
            GENERATIVE_TINY,
            "--set",
            "train.max_steps=1"
        ]),
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("8 of 8 images are in colour") && err.contains("data.channels=3"),
        "{err}"
    );
    // grey images saved as RGB are not colour
    let greys = unlabelled_images(&tmp.path().join("greys"), 8);
    let out = ok(
        GENERATIVE,
        &os(&args![
            "pretrain",
            "--data",
            greys,
            "--out",
            tmp.path().join("run2"),
            GENERATIVE_TINY,
            "--set",
            "train.max_steps=1"
        ]),
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("in colour"));
}
