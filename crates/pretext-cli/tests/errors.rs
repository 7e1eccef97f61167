//! A bad data file is reported as a data problem naming the file, never as
//! a config problem, and leaves no run folder behind.

use std::path::Path;
use std::process::Command;

fn pretrain(bin: &str, data: &Path, out: &Path, extra: &[&str]) -> String {
    let res = Command::new(bin)
        .args(["pretrain", "--quiet", "--set", "train.max_steps=1", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&res.stderr).to_string();
    assert!(!res.status.success(), "{bin} accepted {}: {err}", data.display());
    assert!(!out.exists(), "a failed start left {}", out.display());
    err
}

fn assert_data_error(err: &str, file: &str) {
    assert!(err.contains("data: "), "not reported as a data problem: {err}");
    assert!(!err.contains("config:"), "reported as a config problem: {err}");
    assert!(err.contains(file), "the message does not name {file}: {err}");
}

const VISION: [&str; 2] = [
    env!("CARGO_BIN_EXE_pretext-contrastive"),
    env!("CARGO_BIN_EXE_pretext-generative"),
];

#[test]
fn a_truncated_idx_file_is_a_data_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("train-images-idx3-ubyte");
    let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28];
    bytes.extend([0u8; 100]); // 10 images need 7840 bytes
    std::fs::write(&file, bytes).expect("write");
    for bin in VISION {
        let err = pretrain(bin, &file, &tmp.path().join("run"), &[]);
        assert_data_error(&err, "train-images-idx3-ubyte");
        assert!(err.contains("truncated"), "{err}");
    }
}

#[test]
fn an_idx_file_with_a_wrong_magic_is_a_data_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("train-images-idx3-ubyte");
    std::fs::write(&file, [0x12u8, 0x34, 0x56, 0x78, 0, 0, 0, 1, 0, 0, 0, 1]).expect("write");
    for bin in VISION {
        let err = pretrain(bin, &file, &tmp.path().join("run"), &[]);
        assert_data_error(&err, "train-images-idx3-ubyte");
    }
}

#[test]
fn an_undecodable_image_is_a_data_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("images");
    for class in ["cat", "dog"] {
        std::fs::create_dir_all(root.join(class)).expect("mkdir");
        for i in 0..4 {
            std::fs::write(root.join(class).join(format!("{i}.png")), b"not a png at all").expect("write");
        }
    }
    for bin in VISION {
        let err = pretrain(
            bin,
            &root,
            &tmp.path().join("run"),
            &["--set", "train.batch_size=2", "--set", "data.prefetch=0"],
        );
        assert_data_error(&err, "0.png");
    }
}

#[test]
fn an_empty_corpus_is_a_data_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("empty.txt");
    std::fs::write(&file, "\n\n").expect("write");
    let err = pretrain(
        env!("CARGO_BIN_EXE_pretext-mlm"),
        &file,
        &tmp.path().join("run"),
        &["--set", "data.probe_categories=[]"],
    );
    assert_data_error(&err, "empty.txt");
}
