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

/// A bad key is reported as `config: <key>: <reason>` before anything is read
/// or written, by every tool, for core's sections and for its own.
#[test]
fn a_bad_setting_is_a_config_error_naming_the_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cases = [
        (
            env!("CARGO_BIN_EXE_pretext-contrastive"),
            "data.augment.flip_p=2",
            "config: data.augment.flip_p: must lie in [0, 1], not 2",
        ),
        (
            env!("CARGO_BIN_EXE_pretext-contrastive"),
            "model.encoder.strides=[1, 0, 2]",
            "config: model.encoder.strides: must all be > 0",
        ),
        (
            env!("CARGO_BIN_EXE_pretext-generative"),
            "model.latent=0",
            "config: model.latent: must be > 0, not 0",
        ),
        (
            env!("CARGO_BIN_EXE_pretext-mlm"),
            "masking.mask_prob=0",
            "config: masking.mask_prob: must be in (0, 1], not 0",
        ),
        (
            env!("CARGO_BIN_EXE_pretext-mlm"),
            "train.batch_size=0",
            "config: train.batch_size: must be > 0, not 0",
        ),
        (
            env!("CARGO_BIN_EXE_pretext-generative"),
            "optim.beta1=1.5",
            "config: optim.beta1: must lie in [0, 1), not 1.5",
        ),
    ];
    let too_big = "config: train.batch_size: must be at most the 60000 training images, not 70000";
    let cases = cases.into_iter().chain([
        (
            env!("CARGO_BIN_EXE_pretext-contrastive"),
            "train.batch_size=70000",
            too_big,
        ),
        (
            env!("CARGO_BIN_EXE_pretext-generative"),
            "train.batch_size=70000",
            too_big,
        ),
    ]);
    for (bin, set, expected) in cases {
        let out = tmp.path().join("run");
        let res = Command::new(bin)
            .args(["pretrain", "--quiet", "--set", set, "--out"])
            .arg(&out)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{bin} accepted {set}");
        assert!(err.contains(expected), "{bin} --set {set}: {err}");
        assert!(!out.exists(), "a bad setting left {}", out.display());
    }
}

#[test]
fn a_kernel_request_this_cpu_cannot_honour_stops_every_tool_before_it_starts() {
    let tmp = tempfile::tempdir().expect("tmp");
    for bin in VISION.into_iter().chain([env!("CARGO_BIN_EXE_pretext-mlm")]) {
        let out = tmp.path().join("run");
        let res = Command::new(bin)
            .args(["pretrain", "--quiet", "--set", "train.max_steps=1", "--out"])
            .arg(&out)
            .env(pretext_core::cpu::KERNELS_ENV, "sse9")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{bin} accepted PRETEXT_KERNELS=sse9");
        assert!(
            err.contains("environment: PRETEXT_KERNELS: must be one of auto, avx512, avx2, portable, not \"sse9\""),
            "{bin}: {err}"
        );
        assert!(!out.exists(), "a refused start left {}", out.display());
    }
}
