//! A Hub-compatible HTTP server on loopback for tests: the endpoints
//! `hf-hub` calls to create a repository, upload a commit (preupload,
//! commit) and download files (`HEAD`/`GET .../resolve/<revision>/<file>`
//! with `ETag` and `X-Repo-Commit`). Shared by the push tests (xtask) and
//! the `--init hub:` tests (pretext-cli): `#[path]`-included by both.

#![allow(dead_code)] // each test crate uses its own part

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// The commit every served file belongs to.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `HEAD`, `POST`.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// The `Authorization` header.
    pub auth: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// How the server behaves.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// Every request succeeds.
    Ok,
    /// Every request is refused with 401.
    Unauthorized,
    /// Commits fail with 500.
    CommitFails,
}

/// Reads one HTTP/1.1 request.
pub fn read_request(stream: &mut TcpStream) -> Option<Request> {
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

/// Writes a JSON response and closes.
pub fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

/// Serves until the process ends, with `files` (`owner/name/file` → bytes)
/// to download; returns the base URL and the request log.
pub fn mock_hub_with(mode: Mode, files: HashMap<String, Vec<u8>>) -> (String, Arc<Mutex<Vec<Request>>>) {
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
            if req.method == "GET" || req.method == "HEAD" {
                serve_file(&mut stream, &req, &files);
            } else if req.method == "POST" && req.path == "/api/repos/create" {
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

/// As [`mock_hub_with`], with nothing to download.
pub fn mock_hub(mode: Mode) -> (String, Arc<Mutex<Vec<Request>>>) {
    mock_hub_with(mode, HashMap::new())
}

/// `HEAD`/`GET /<owner>/<name>/resolve/<revision>/<file>`: the file with the
/// headers hf-hub reads (`ETag`, `X-Repo-Commit`, `Content-Length`), or 404.
fn serve_file(stream: &mut TcpStream, req: &Request, files: &HashMap<String, Vec<u8>>) {
    let path = req.path.split('?').next().unwrap_or_default().trim_start_matches('/');
    let parts: Vec<&str> = path.splitn(5, '/').collect();
    let found = match parts.as_slice() {
        [owner, name, "resolve", _rev, file] => files.get(&format!("{owner}/{name}/{file}")),
        _ => None,
    };
    let Some(bytes) = found else {
        let body = r#"{"error":"Entry not found"}"#;
        let _ = write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            if req.method == "HEAD" { "" } else { body }
        );
        let _ = stream.flush();
        return;
    };
    let etag: String = {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
        }
        format!("{h:016x}{:08x}", bytes.len())
    };
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        bytes.len()
    );
    if req.method == "GET" {
        let _ = stream.write_all(bytes);
    }
    let _ = stream.flush();
}
