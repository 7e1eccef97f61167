//! `cargo xtask push PATH --repo namespace/name`: uploads a run's `export/`
//! folder, or a classifier folder written by `finetune` (or an export folder
//! given directly), to the Hugging Face Hub (or any Hub-compatible endpoint)
//! in one commit, with the `hf-hub` crate.
//!
//! Token: `HF_TOKEN`, else the file named by `HF_TOKEN_PATH`, else
//! `$HF_HOME/token` (default `~/.cache/huggingface/token`), as the Python
//! tools store it. Endpoint: `HF_ENDPOINT` (default `https://huggingface.co`).
//! The token is never printed or logged. Nothing local is written.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Files of a folder that go to the Hub, in upload order; the first three
/// are required.
const FILES: [&str; 8] = [
    "model.safetensors",
    "config.json",
    "README.md",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "pretext.toml",
];

/// Checks a Hub repository id: `namespace/name`, each part letters, digits,
/// `-`, `_`, `.`, starting with a letter or digit, no `--` or `..`, at most 96 characters.
///
/// # Errors
/// What is wrong with it.
pub fn validate_repo_id(id: &str) -> Result<()> {
    let parts: Vec<&str> = id.split('/').collect();
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && !p.contains("--")
            && !p.contains("..")
            && !p.ends_with('.')
    };
    if parts.len() != 2 || !parts.iter().all(|p| ok_part(p)) {
        bail!(
            "invalid repository name {id:?}: expected namespace/name, each part of letters, digits, '-', '_' or '.', \
             starting with a letter or digit, without '--' or '..', at most 96 characters"
        );
    }
    Ok(())
}

/// Where the token came from (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The `HF_TOKEN` variable.
    Env,
    /// A token file.
    File(PathBuf),
}

/// Finds the token: `HF_TOKEN`, `HF_TOKEN_PATH`, `$HF_HOME/token`, `~/.cache/huggingface/token`.
pub fn find_token() -> Option<(String, TokenSource)> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.trim().is_empty() {
            return Some((t.trim().to_string(), TokenSource::Env));
        }
    }
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("HF_TOKEN_PATH") {
        candidates.push(PathBuf::from(p));
    }
    match std::env::var_os("HF_HOME") {
        Some(h) => candidates.push(PathBuf::from(h).join("token")),
        None => {
            if let Some(home) = std::env::var_os("HOME") {
                candidates.push(PathBuf::from(home).join(".cache/huggingface/token"));
            }
        }
    }
    candidates.into_iter().find_map(|p| {
        let t = std::fs::read_to_string(&p).ok()?;
        let t = t.trim().to_string();
        (!t.is_empty()).then_some((t, TokenSource::File(p)))
    })
}

/// The folder `path` stands for: a run's `export/`, or `path` itself when
/// it holds weights, `config.json` and a card (a classifier or export folder).
///
/// # Errors
/// Neither.
pub fn upload_folder(path: &Path) -> Result<std::path::PathBuf> {
    let export = path.join("export");
    if export.is_dir() {
        return Ok(export);
    }
    if FILES[..3].iter().all(|f| path.join(f).is_file()) {
        return Ok(path.to_path_buf());
    }
    bail!(
        "{} has no export/ folder and is not a classifier or export folder (model.safetensors, config.json, README.md): \
         run `pretext-<paradigm> export {}` or `finetune` first",
        path.display(),
        path.display()
    )
}

/// The files of the folder `run` stands for (see [`upload_folder`]), with their bytes.
///
/// # Errors
/// No such folder, or a required file missing from it.
pub fn export_files(run: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let dir = upload_folder(run)?;
    let mut out = Vec::new();
    for (i, name) in FILES.iter().enumerate() {
        let p = dir.join(name);
        match std::fs::read(&p) {
            Ok(b) => out.push((name.to_string(), b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && i >= 3 => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
    let card = String::from_utf8_lossy(&out[2].1);
    if !card.starts_with("---\n") {
        bail!(
            "{}: the model card has no YAML front matter; re-run export",
            dir.join("README.md").display()
        );
    }
    Ok(out)
}

/// The YAML front matter of a model card (between the first two `---` lines).
pub fn front_matter(card: &str) -> &str {
    card.strip_prefix("---\n")
        .and_then(|rest| rest.find("\n---").map(|end| &rest[..end]))
        .unwrap_or("")
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `push`.
///
/// # Errors
/// An invalid repository name, no export, no token, a rejected token, an
/// unreachable or failing endpoint: each with a message saying which.
pub fn push(run: &Path, repo: &str, private: bool, dry_run: bool) -> Result<()> {
    validate_repo_id(repo)?;
    let files = export_files(run)?;
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let token = find_token();
    let message = format!(
        "Upload pretext run {}",
        run.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    );
    if dry_run {
        println!("dry run: nothing is sent");
        println!("endpoint: {endpoint}");
        println!(
            "repository: {repo} (model, {})",
            if private { "private" } else { "public" }
        );
        println!(
            "token: {}",
            match &token {
                Some((_, TokenSource::Env)) => "found in HF_TOKEN".to_string(),
                Some((_, TokenSource::File(p))) => format!("found in {}", p.display()),
                None => "none found (set HF_TOKEN or log in with `huggingface-cli login`)".to_string(),
            }
        );
        println!("commit: {message:?}, {} files:", files.len());
        for (name, bytes) in &files {
            println!("  {name:<20} {:>12} bytes  sha256 {}", bytes.len(), sha256_hex(bytes));
        }
        println!(
            "model card metadata:\n{}",
            front_matter(&String::from_utf8_lossy(&files[2].1))
        );
        return Ok(());
    }
    let Some((token, _)) = token else {
        bail!("no Hugging Face token: set HF_TOKEN, or log in with `huggingface-cli login` (which writes ~/.cache/huggingface/token)");
    };
    let client = hf_hub::HFClientBuilder::new()
        .endpoint(endpoint.clone())
        .token(token)
        .retry_max_attempts(3)
        .retry_base_delay(std::time::Duration::from_millis(200))
        .build_sync()
        .map_err(|e| anyhow::anyhow!("setting up the Hub client: {e}"))?;
    let explain = |what: &str, e: hf_hub::HFError| -> anyhow::Error {
        match &e {
            hf_hub::HFError::AuthRequired { .. } => {
                anyhow::anyhow!("{what}: the Hub rejected the token (401 Unauthorized); check HF_TOKEN")
            }
            hf_hub::HFError::Forbidden { .. } => anyhow::anyhow!(
                "{what}: the token may not write to {repo} (403 Forbidden); it needs write access to that namespace"
            ),
            _ => anyhow::anyhow!("{what} at {endpoint}: {e}"),
        }
    };
    client
        .create_repository()
        .repo_id(repo)
        .repo_type(hf_hub::RepoTypeModel)
        .private(private)
        .exist_ok(true)
        .send()
        .map_err(|e| explain("creating the repository", e))?;
    let (owner, name) = repo.split_once('/').context("repository id")?;
    let ops: Vec<hf_hub::repository::CommitOperation> = files
        .iter()
        .map(|(n, b)| hf_hub::repository::CommitOperation::add_bytes(n.clone(), b.clone()))
        .collect();
    let info = client
        .model(owner, name)
        .create_commit()
        .operations(ops)
        .commit_message(message)
        .send()
        .map_err(|e| explain("uploading the commit", e))?;
    println!(
        "pushed {} files to {repo}{}",
        files.len(),
        info.commit_url.map(|u| format!(": {u}")).unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in ["user/model", "org-1/pretext_simclr.v2", "A/b"] {
            assert!(validate_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "model", "a/b/c", "/b", "a/", "a/b--c", "a/b..c", "-a/b", "a/b c", "a/é", "a/b.",
        ] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
        assert!(validate_repo_id(&format!("a/{}", "x".repeat(97))).is_err());
    }

    #[test]
    fn sha256_known_answers() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let long = vec![b'a'; 1000];
        assert_eq!(
            sha256_hex(&long),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
    }

    #[test]
    fn front_matter_is_the_yaml_block() {
        assert_eq!(
            front_matter("---\nlibrary_name: x\ntags:\n- a\n---\n\n# T\n"),
            "library_name: x\ntags:\n- a"
        );
        assert_eq!(front_matter("# no metadata\n"), "");
    }
}
