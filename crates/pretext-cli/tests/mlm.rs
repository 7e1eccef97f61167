//! `pretext-mlm` end to end on the shipped fortunes with a tiny BERT: the
//! tokenizer and run folder are written, the loss falls, a killed run resumes
//! onto the same trajectory, and probe / fill-mask / export write what they
//! promise.

use std::path::Path;
use std::process::Command;

const TINY: [&str; 32] = [
    "--set",
    "model.size=\"custom\"",
    "--set",
    "model.hidden=32",
    "--set",
    "model.layers=1",
    "--set",
    "model.heads=2",
    "--set",
    "tokenizer.vocab_size=400",
    "--set",
    "data.seq_len=32",
    "--set",
    "train.batch_size=16",
    "--set",
    "train.max_steps=40",
    "--set",
    "train.checkpoint_every=20",
    "--set",
    "eval.every_steps=20",
    "--set",
    "eval.held_out_sequences=40",
    "--set",
    "optim.lr=0.003",
    "--set",
    "schedule.warmup_steps=5",
    "--set",
    "eval.max_len=32",
    "--set",
    "model.max_position=32",
    "--seed=3",
    "--quiet",
];

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pretext-mlm"))
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

#[test]
fn mlm_trains_resumes_probes_fills_masks_and_exports() {
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
    let vocab = std::fs::read_to_string(a.join("tokenizer/vocab.txt")).expect("vocab.txt");
    assert_eq!(
        vocab.lines().take(5).collect::<Vec<_>>(),
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    );
    let rec = records(&a);
    let losses: Vec<f64> = rec
        .iter()
        .filter_map(|r| r.get("loss").and_then(|l| l.as_f64()))
        .collect();
    let evals: Vec<&serde_json::Value> = rec.iter().filter(|r| r["event"] == "masked_lm").collect();
    assert_eq!(evals.len(), 2, "held-out evaluation at steps 20 and 40");
    assert!(evals
        .iter()
        .all(|e| e["masked_accuracy"].as_f64().is_some() && e["perplexity"].as_f64().is_some()));
    let train: Vec<f64> = rec
        .iter()
        .filter(|r| r.get("event").is_none())
        .filter_map(|r| r["loss"].as_f64())
        .collect();
    assert_eq!(train.len(), 40);
    let (head, tail) = (
        train[..5].iter().sum::<f64>() / 5.0,
        train[35..].iter().sum::<f64>() / 5.0,
    );
    assert!(
        tail < head - 0.3,
        "MLM loss did not fall: {head:.2} → {tail:.2} ({losses:?})"
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
    // 20 steps, the evaluation at 20, then 10 steps
    let lines: Vec<String> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .expect("log")
        .lines()
        .take(31)
        .map(String::from)
        .collect();
    std::fs::write(b.join("metrics.jsonl"), lines.join("\n") + "\n").expect("log");
    let out = bin().arg("resume").arg(&b).arg("--quiet").output().expect("resume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(records(&b), rec, "metrics differ after resume");

    // probe: masked LM, transfer with the random-init and TF-IDF baselines, page
    let out = bin()
        .arg("probe")
        .arg(&a)
        .args(["--labels", "10%,100%", "--quiet"])
        .output()
        .expect("probe");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("report/eval.json")).expect("eval.json")).expect("json");
    assert_eq!(eval["paradigm"], "mlm");
    let recs = eval["records"].as_array().expect("records");
    assert_eq!(recs.len(), 3 * 2 * 2, "3 feature sets × 2 protocols × 2 fractions");
    for r in recs {
        let acc = r["accuracy"].as_f64().expect("accuracy");
        assert!((0.0..=1.0).contains(&acc));
        assert_eq!(r["n_test"], 631, "the 8-category fortune test split");
        // an accuracy over 631 test texts is a whole number of them
        let correct = acc * 631.0;
        assert!((correct - correct.round()).abs() < 1e-6, "{acc} is not k / 631");
    }
    let tfidf_full = recs
        .iter()
        .find(|r| r["features"] == "raw" && r["protocol"] == "linear" && r["labels"] == 1.0)
        .and_then(|r| r["accuracy"].as_f64())
        .expect("tf-idf record");
    assert!(
        tfidf_full > 0.45,
        "TF-IDF baseline far above the 33% majority class: {tfidf_full}"
    );
    let mlm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("report/masked_lm.json")).expect("masked_lm.json")).expect("json");
    assert!(
        mlm["pretrained"]["accuracy"].as_f64().expect("acc") > mlm["random_init"]["accuracy"].as_f64().expect("acc")
    );
    for f in [
        "index.html",
        "eval.md",
        "masked_lm.png",
        "label_efficiency.png",
        "loss.png",
        "pca.png",
    ] {
        assert!(a.join("report").join(f).is_file(), "report/{f} missing");
    }
    image::load_from_memory(&std::fs::read(a.join("report/masked_lm.png")).expect("png")).expect("PNG decodes");

    // fill-mask prints candidates; a text without [MASK] is a clear error
    let out = bin()
        .arg("fill-mask")
        .arg(&a)
        .arg("the [MASK] of the world")
        .output()
        .expect("fill");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().filter(|l| l.contains('%')).count(), 5, "{text}");
    let out = bin()
        .arg("fill-mask")
        .arg(&a)
        .arg("no mask here")
        .output()
        .expect("fill");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [MASK]"));

    // export: the Hugging Face layout
    let out = bin().arg("export").arg(&a).output().expect("export");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = a.join("export");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    ] {
        assert!(e.join(f).is_file(), "export/{f} missing");
    }
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.join("config.json")).expect("config")).expect("json");
    assert_eq!(conf["architectures"][0], "BertForMaskedLM");
    assert_eq!(conf["hidden_size"], 32);
    assert_eq!(conf["vocab_size"], 400);
    let card = std::fs::read_to_string(e.join("README.md")).expect("card");
    assert!(card.starts_with("---\nlibrary_name: transformers"));
    assert!(
        card.contains("- self-supervised") && card.contains("model-index:"),
        "{card}"
    );
}

#[test]
fn bad_mlm_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").expect("write");
    let out = bin()
        .arg("pretrain")
        .arg("--data")
        .arg(&empty)
        .arg("--out")
        .arg(tmp.path().join("r"))
        .args(["--quiet", "--set", "data.probe_categories=[]"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty.txt"), "{err}");
    assert!(!tmp.path().join("r").exists(), "no half-written run folder");
    let out = bin()
        .arg("pretrain")
        .args(["--set", "model.size=\"huge\"", "--quiet"])
        .arg("--out")
        .arg(tmp.path().join("r2"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.size"));
    let out = bin()
        .arg("pretrain")
        .args(["--set", "tokenizer.path=\"/nonexistent/tokenizer.json\"", "--quiet"])
        .arg("--out")
        .arg(tmp.path().join("r3"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tokenizer.json"));
}
