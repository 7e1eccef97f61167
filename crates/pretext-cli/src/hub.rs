//! Where `--init SOURCE` points: a local file or folder, or
//! `hub:owner/name[@revision]`, fetched from the Hugging Face Hub (or the
//! endpoint `HF_ENDPOINT` names) into its cache (`HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) with the `hf-hub` crate;
//! `HF_TOKEN` is sent for private repositories, `HF_HUB_OFFLINE=1` uses the
//! cache alone. The library crates never reach the network: this module is
//! the command line's edge.

use anyhow::{bail, Context, Result};
use pretext_core::paradigm::InitSpec;
use std::path::PathBuf;

/// Files of a model repository `--init` reads; the first two are required.
const FILES: [&str; 6] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// A Hub reference: `owner/name` and an optional revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `owner`.
    pub owner: String,
    /// `name`.
    pub name: String,
    /// A branch, tag or commit (default: `main`).
    pub revision: Option<String>,
}

/// Parses `hub:owner/name[@revision]`; `None` for anything without `hub:`.
///
/// # Errors
/// A `hub:` reference that is not `owner/name`.
pub fn parse_hub(source: &str) -> Result<Option<HubRef>> {
    let Some(rest) = source.strip_prefix("hub:") else {
        return Ok(None);
    };
    let (repo, revision) = match rest.split_once('@') {
        Some((r, v)) if !v.is_empty() => (r, Some(v.to_string())),
        Some(_) => bail!("--init {source:?}: a revision after @ is empty"),
        None => (rest, None),
    };
    let ok = |p: &str| {
        !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.')
    };
    match repo.split_once('/') {
        Some((owner, name)) if ok(owner) && ok(name) => Ok(Some(HubRef {
            owner: owner.into(),
            name: name.into(),
            revision,
        })),
        _ => bail!("--init {source:?}: expected hub:owner/name or hub:owner/name@revision"),
    }
}

/// The local file or folder `source` names, fetched from the Hub first for
/// `hub:` references.
///
/// # Errors
/// A path that does not exist; a Hub reference that cannot be fetched (the
/// reason: not found, unauthorized, unreachable), or without weights.
pub fn resolve(source: &str) -> Result<InitSpec> {
    let path = match parse_hub(source)? {
        Some(r) => fetch(&r).with_context(|| format!("--init {source}"))?,
        None => {
            let p = PathBuf::from(source);
            if !p.exists() {
                bail!(
                    "--init {source}: no such file or folder (a run or export folder, a Hugging Face folder, a .safetensors file, or hub:owner/name)"
                );
            }
            p
        }
    };
    Ok(InitSpec {
        source: source.to_string(),
        path,
    })
}

/// Downloads the files `--init` reads from a model repository into the
/// Hub cache; returns the snapshot folder that holds them.
fn fetch(r: &HubRef) -> Result<PathBuf> {
    let client = hf_hub::HFClientBuilder::new()
        .retry_max_attempts(3)
        .retry_base_delay(std::time::Duration::from_millis(200))
        .build_sync()
        .map_err(|e| anyhow::anyhow!("setting up the Hub client: {e}"))?;
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let repo = client.model(r.owner.clone(), r.name.clone());
    let mut dir = None;
    for (i, file) in FILES.iter().enumerate() {
        let got = repo
            .download_file()
            .filename(*file)
            .maybe_revision(r.revision.clone())
            .local_files_only(offline)
            .send();
        match got {
            Ok(p) => {
                if dir.is_none() {
                    dir = p.parent().map(std::path::Path::to_path_buf);
                }
            }
            Err(hf_hub::HFError::EntryNotFound { .. } | hf_hub::HFError::LocalEntryNotFound { .. }) if i >= 2 => {}
            Err(e) => {
                let why = match &e {
                    hf_hub::HFError::AuthRequired { .. } => {
                        "the Hub asks for a token (401): a private repository needs HF_TOKEN".to_string()
                    }
                    hf_hub::HFError::RepoNotFound { .. } => {
                        format!("no repository {}/{} at {}", r.owner, r.name, endpoint)
                    }
                    hf_hub::HFError::EntryNotFound { .. } => format!(
                        "{}/{} has no {file}: --init reads a folder with config.json and model.safetensors",
                        r.owner, r.name
                    ),
                    hf_hub::HFError::LocalEntryNotFound { .. } => {
                        format!("{file} is not in the Hub cache and HF_HUB_OFFLINE is set")
                    }
                    other => format!("fetching {file} from {}: {other}", endpoint),
                };
                bail!("{why}");
            }
        }
    }
    dir.context("the Hub returned no files")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_references_parse_and_bad_ones_are_refused() -> Result<()> {
        assert_eq!(parse_hub("runs/x")?, None);
        assert_eq!(
            parse_hub("hub:google/bert_uncased_L-2_H-128_A-2")?,
            Some(HubRef {
                owner: "google".into(),
                name: "bert_uncased_L-2_H-128_A-2".into(),
                revision: None
            })
        );
        assert_eq!(
            parse_hub("hub:a/b@v1.0")?.and_then(|r| r.revision),
            Some("v1.0".to_string())
        );
        for bad in ["hub:a", "hub:a/b/c", "hub:a/b@", "hub:/b", "hub:a/b c"] {
            assert!(parse_hub(bad).is_err(), "{bad}");
        }
        let e = resolve("/no/such/weights").expect_err("missing").to_string();
        assert!(e.contains("/no/such/weights") && e.contains("no such file"), "{e}");
        Ok(())
    }
}
