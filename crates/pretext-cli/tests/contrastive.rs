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
fn killed_and_resumed_run_matches_the_uninterrupted_one() {
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
    let rec_a = records(&a);
    assert_eq!(rec_a.iter().filter(|r| r.get("loss").is_some()).count(), 4);
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
    let load = |run: &Path| {
        let t = candle_core::safetensors::load(
            run.join("checkpoints/step-00000004/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .expect("weights");
        let mut v: Vec<(String, Vec<u8>)> = t
            .into_iter()
            .map(|(k, t)| {
                (
                    k,
                    format!(
                        "{:?}",
                        t.flatten_all()
                            .and_then(|t| t.to_dtype(candle_core::DType::F64))
                            .and_then(|t| t.to_vec1::<f64>())
                    )
                    .into_bytes(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let (wa, wb) = (load(&a), load(&b));
    assert!(wa.len() > 10);
    assert!(wa == wb, "final weights differ");
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
