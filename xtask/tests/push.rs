//! `cargo xtask push` against a small Hub-compatible HTTP server on loopback
//! (the endpoints hf-hub calls: repository creation, preupload, commit): the
//! commit carries every file with the right bytes and the card's metadata;
//! a rejected token, a failing server, no token, a bad name and an
//! unreachable endpoint are clear errors; the token never appears in output.

use base64::Engine;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

const TOKEN: &str = "hf_secret_test_token_0123456789";

#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    auth: Option<String>,
    body: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    Unauthorized,
    CommitFails,
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let (mut len, mut chunked, mut auth) = (0usize, false, None);
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().ok()?,
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            "authorization" => auth = Some(v.trim().to_string()),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            reader.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len, 0);
        reader.read_exact(&mut body).ok()?;
    }
    Some(Request {
        method,
        path,
        auth,
        body,
    })
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

/// Serves until the process ends; returns the base URL and the request log.
fn mock_hub(mode: Mode) -> (String, Arc<Mutex<Vec<Request>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    let base = url.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some(req) = read_request(&mut stream) else { continue };
            seen.lock().expect("log").push(req.clone());
            if mode == Mode::Unauthorized {
                respond(
                    &mut stream,
                    "401 Unauthorized",
                    r#"{"error":"Invalid credentials in Authorization header"}"#,
                );
                continue;
            }
            if req.method == "POST" && req.path == "/api/repos/create" {
                respond(&mut stream, "200 OK", &format!(r#"{{"url":"{base}/ns/model"}}"#));
            } else if req.method == "POST" && req.path.contains("/preupload/") {
                let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
                let files: Vec<serde_json::Value> = v["files"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|f| serde_json::json!({"path": f["path"], "uploadMode": "regular", "shouldIgnore": false}))
                    .collect();
                respond(
                    &mut stream,
                    "200 OK",
                    &serde_json::json!({ "files": files }).to_string(),
                );
            } else if req.method == "POST" && req.path.contains("/commit/") {
                if mode == Mode::CommitFails {
                    respond(
                        &mut stream,
                        "500 Internal Server Error",
                        r#"{"error":"storage unavailable"}"#,
                    );
                } else {
                    respond(
                        &mut stream,
                        "200 OK",
                        &format!(r#"{{"commitUrl":"{base}/ns/model/commit/abc123","commitOid":"abc123"}}"#),
                    );
                }
            } else {
                respond(&mut stream, "404 Not Found", r#"{"error":"not found"}"#);
            }
        }
    });
    (url, log)
}

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
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
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
