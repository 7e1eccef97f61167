//! The binaries answer `--help` with their subcommands and fail cleanly.

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_binary_lists_its_subcommands() {
    let cases: [(&str, &[&str]); 3] = [
        (
            env!("CARGO_BIN_EXE_pretext-contrastive"),
            &["pretrain", "resume", "probe", "export"],
        ),
        (
            env!("CARGO_BIN_EXE_pretext-generative"),
            &["pretrain", "resume", "probe", "sample", "export"],
        ),
        (
            env!("CARGO_BIN_EXE_pretext-mlm"),
            &["tokenizer", "pretrain", "resume", "probe", "fill-mask", "export"],
        ),
    ];
    for (bin, subs) in cases {
        let (ok, text) = run(bin, &["--help"]);
        assert!(ok, "{bin} --help failed: {text}");
        for s in subs {
            assert!(text.contains(s), "{bin} --help lacks {s}: {text}");
        }
    }
}

#[test]
fn pretrain_help_explains_the_shared_flags() {
    let (ok, text) = run(env!("CARGO_BIN_EXE_pretext-contrastive"), &["pretrain", "--help"]);
    assert!(ok, "{text}");
    for flag in [
        "--config", "--set", "--device", "--seed", "--out", "--quiet", "--method", "--data",
    ] {
        assert!(text.contains(flag), "pretrain --help lacks {flag}: {text}");
    }
}

#[test]
fn bad_usage_exits_non_zero_with_a_message() {
    let (ok, text) = run(
        env!("CARGO_BIN_EXE_pretext-contrastive"),
        &["pretrain", "--method", "byol"],
    );
    assert!(!ok);
    assert!(text.contains("byol"), "{text}");
}
