//! `cargo xtask push` against a small Hub-compatible HTTP server on loopback
//! (the endpoints hf-hub calls: repository creation, preupload, commit): the
//! commit carries every file with the right bytes and the card's metadata;
//! a rejected token, a failing server, no token, a bad name and an
//! unreachable endpoint are clear errors; the token never appears in output.

#[path = "../../tests/support/loopback_hub.rs"]
mod loopback_hub;

use base64::Engine;
use loopback_hub::{mock_hub, Mode};
use std::path::Path;
use std::process::Command;

const TOKEN: &str = "hf_secret_test_token_0123456789";

const CARD: &str = "---\nlibrary_name: pretext\nlicense: mit\ntags:\n- self-supervised\n- simclr\ndatasets:\n- fashion_mnist\nmodel-index:\n- name: pretext-simclr\n---\n\n# A card\n";

fn run_with_export(dir: &Path) -> std::path::PathBuf {
    let run = dir.join("run-1");
    let exp = run.join("export");
    std::fs::create_dir_all(&exp).expect("mkdir");
    let weights: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(exp.join("model.safetensors"), weights).expect("weights");
    std::fs::write(exp.join("config.json"), br#"{"architecture":"small-resnet"}"#).expect("config");
    std::fs::write(exp.join("README.md"), CARD).expect("card");
    run
}

fn xtask(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env("HF_HOME", home.join("hf-home"))
        .env("HOME", home)
        .env("HF_HUB_DISABLE_TELEMETRY", "1");
    c
}

fn output(c: &mut Command) -> (bool, String) {
    let out = c.output().expect("xtask runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(TOKEN), "the token leaked into the output:\n{text}");
    (out.status.success(), text)
}

#[test]
fn push_commits_every_export_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = run_with_export(tmp.path());
    let (url, log) = mock_hub(Mode::Ok);
    let (ok, text) = output(
        xtask(tmp.path())
            .args(["push"])
            .arg(&run)
            .args(["--repo", "ns/model", "--private"])
            .env("HF_ENDPOINT", &url)
            .env("HF_TOKEN", TOKEN),
    );
    assert!(ok, "{text}");
    assert!(text.contains("pushed 3 files to ns/model"), "{text}");
    let reqs = log.lock().expect("log").clone();
    for r in &reqs {
        assert_eq!(
            r.auth.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{} {}",
            r.method,
            r.path
        );
    }
    let create = reqs
        .iter()
        .find(|r| r.path == "/api/repos/create")
        .expect("repository created");
    let body: serde_json::Value = serde_json::from_slice(&create.body).expect("json");
    assert_eq!(
        (
            body["name"].as_str(),
            body["organization"].as_str(),
            body["private"].as_bool(),
            body["type"].as_str()
        ),
        (Some("model"), Some("ns"), Some(true), Some("model"))
    );
    let commit = reqs
        .iter()
        .find(|r| r.path.starts_with("/api/models/ns/model/commit/"))
        .expect("a commit");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&commit.body)
        .lines()
        .map(|l| serde_json::from_str(l).expect("ndjson line"))
        .collect();
    assert_eq!(lines[0]["key"], "header");
    assert!(lines[0]["value"]["summary"]
        .as_str()
        .unwrap_or_default()
        .contains("run-1"));
    let mut files = std::collections::BTreeMap::new();
    for l in &lines[1..] {
        assert_eq!(l["key"], "file", "{l}");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(l["value"]["content"].as_str().expect("content"))
            .expect("base64");
        files.insert(l["value"]["path"].as_str().expect("path").to_string(), bytes);
    }
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["README.md", "config.json", "model.safetensors"]
    );
    for (name, bytes) in &files {
        assert_eq!(
            bytes,
            &std::fs::read(run.join("export").join(name)).expect("local"),
            "{name} bytes differ"
        );
    }
    let card = String::from_utf8_lossy(&files["README.md"]);
    assert!(
        card.starts_with("---\nlibrary_name: pretext\n") && card.contains("- self-supervised\n"),
        "{card}"
    );
}

#[test]
fn rejected_token_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = run_with_export(tmp.path());
    let before = std::fs::read_dir(run.join("export")).expect("dir").count();
    let (url, log) = mock_hub(Mode::Unauthorized);
    let (ok, text) = output(
        xtask(tmp.path())
            .args(["push"])
            .arg(&run)
            .args(["--repo", "ns/model"])
            .env("HF_ENDPOINT", &url)
            .env("HF_TOKEN", TOKEN),
    );
    assert!(!ok);
    assert!(text.contains("rejected the token (401"), "{text}");
    assert!(
        !log.lock().expect("log").iter().any(|r| r.path.contains("/commit/")),
        "nothing committed"
    );
    assert_eq!(
        std::fs::read_dir(run.join("export")).expect("dir").count(),
        before,
        "nothing local changed"
    );
}

#[test]
fn server_error_during_the_commit_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = run_with_export(tmp.path());
    let (url, _log) = mock_hub(Mode::CommitFails);
    let (ok, text) = output(
        xtask(tmp.path())
            .args(["push"])
            .arg(&run)
            .args(["--repo", "ns/model"])
            .env("HF_ENDPOINT", &url)
            .env("HF_TOKEN", TOKEN),
    );
    assert!(!ok);
    assert!(text.contains("uploading the commit") && text.contains("500"), "{text}");
}

#[test]
fn no_token_bad_name_unreachable_and_dry_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = run_with_export(tmp.path());
    let (url, log) = mock_hub(Mode::Ok);
    // no token anywhere
    let (ok, text) = output(
        xtask(tmp.path())
            .args(["push"])
            .arg(&run)
            .args(["--repo", "ns/model"])
            .env("HF_ENDPOINT", &url),
    );
    assert!(!ok && text.contains("no Hugging Face token"), "{text}");
    // the token file of the Python tools is found
    std::fs::create_dir_all(tmp.path().join("hf-home")).expect("mkdir");
    std::fs::write(tmp.path().join("hf-home/token"), format!("{TOKEN}\n")).expect("token file");
    // an invalid name never reaches the network
    let (ok, text) = output(
        xtask(tmp.path())
            .args(["push"])
            .arg(&run)
            .args(["--repo", "not a repo"])
            .env("HF_ENDPOINT", &url),
    );
    assert!(!ok && text.contains("invalid repository name"), "{text}");
    // dry run: the listing, no request
    let (ok, text) = output(
        xtask(tmp.path())
            .args(["push"])
            .arg(&run)
            .args(["--repo", "ns/model", "--dry-run"])
            .env("HF_ENDPOINT", &url),
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("model.safetensors") && text.contains("70000 bytes") && text.contains("- self-supervised"),
        "{text}"
    );
    assert!(text.contains("token: found in"), "{text}");
    assert!(log.lock().expect("log").is_empty(), "nothing was sent");
    // an endpoint where nothing listens
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let (ok, text) = output(
        xtask(tmp.path())
            .args(["push"])
            .arg(&run)
            .args(["--repo", "ns/model"])
            .env("HF_ENDPOINT", &dead_url),
    );
    assert!(!ok && text.contains("creating the repository at"), "{text}");
    // no export folder
    let (ok, text) = output(
        xtask(tmp.path())
            .args(["push"])
            .arg(tmp.path())
            .args(["--repo", "ns/model"])
            .env("HF_ENDPOINT", &url),
    );
    assert!(!ok && text.contains("has no export/ folder"), "{text}");
}

#[test]
fn a_classifier_folder_is_pushed_with_its_tokenizer_and_config() {
    let tmp = tempfile::tempdir().expect("tmp");
    let clf = tmp.path().join("classifier");
    std::fs::create_dir_all(&clf).expect("mkdir");
    for (f, b) in [
        ("model.safetensors", "weights"),
        ("config.json", r#"{"architectures":["BertForSequenceClassification"]}"#),
        ("README.md", CARD),
        ("tokenizer.json", "{}"),
        ("vocab.txt", "[PAD]\n"),
        ("tokenizer_config.json", "{}"),
        ("pretext.toml", "method = \"bert-mlm\"\n"),
    ] {
        std::fs::write(clf.join(f), b).expect("write");
    }
    let (url, log) = mock_hub(Mode::Ok);
    let (ok, text) = output(
        xtask(tmp.path())
            .args(["push"])
            .arg(&clf)
            .args(["--repo", "ns/classifier"])
            .env("HF_ENDPOINT", &url)
            .env("HF_TOKEN", TOKEN),
    );
    assert!(ok, "{text}");
    assert!(text.contains("pushed 7 files to ns/classifier"), "{text}");
    let commit = log
        .lock()
        .expect("log")
        .iter()
        .find(|r| r.path.contains("/commit/"))
        .map(|r| String::from_utf8_lossy(&r.body).to_string())
        .unwrap_or_default();
    for f in ["pretext.toml", "tokenizer_config.json", "vocab.txt"] {
        assert!(commit.contains(f), "{f} is in the commit");
    }
    let (ok, text) = output(
        xtask(tmp.path())
            .args(["push"])
            .arg(tmp.path())
            .args(["--repo", "ns/x", "--dry-run"]),
    );
    assert!(!ok && text.contains("not a classifier or export folder"), "{text}");
}
