//! The run directory: the one on-disk contract of a training run.
//!
//! ```text
//! runs/<name>/
//!   config.toml     fully resolved config
//!   metrics.jsonl   one JSON object per logged step / epoch / eval, flushed per record
//!   checkpoints/    see [`crate::checkpoint`]
//!   export/         what goes to the Hub
//!   report/         evaluation results and plots
//! ```

use crate::checkpoint::CheckpointManager;
use crate::{Error, Result};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// File name of the resolved config.
pub const CONFIG_FILE: &str = "config.toml";
/// File name of the metrics log.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// A run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Creates a new run at `root` and writes `config_toml` (atomically).
    ///
    /// # Errors
    /// [`Error::Config`] if `root` already holds a run (resume it instead);
    /// [`Error::Io`] if the folder cannot be created.
    pub fn create(root: impl Into<PathBuf>, config_toml: &str) -> Result<Self> {
        let root = root.into();
        if root.join(CONFIG_FILE).exists() {
            return Err(Error::Config(format!(
                "{} already holds a run; resume it or choose another --out",
                root.display()
            )));
        }
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        let run = Self { root };
        write_atomic(&run.root.join(CONFIG_FILE), config_toml.as_bytes())?;
        Ok(run)
    }

    /// Opens an existing run.
    ///
    /// # Errors
    /// [`Error::Config`] if `root` holds no `config.toml`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        if !root.join(CONFIG_FILE).is_file() {
            return Err(Error::Config(format!(
                "{} is not a pretext run folder (no {CONFIG_FILE})",
                root.display()
            )));
        }
        Ok(Self { root })
    }

    /// A handle on the run folder `root` that neither reads nor writes it:
    /// what the ranks other than 0 of a data-parallel run hold (rank 0
    /// writes the folder).
    pub fn unopened(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The run folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The text of `config.toml`.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn config_text(&self) -> Result<String> {
        let p = self.root.join(CONFIG_FILE);
        std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))
    }

    /// `<run>/metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// `<run>/checkpoints`.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// The checkpoint manager of this run.
    pub fn checkpoints(&self, keep_last: usize) -> CheckpointManager {
        CheckpointManager::new(self.checkpoints_dir(), keep_last)
    }

    /// `<run>/report` (created).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn report_dir(&self) -> Result<PathBuf> {
        let p = self.root.join("report");
        std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        Ok(p)
    }

    /// `<run>/export`, not created: it is written whole with
    /// [`write_dir_atomic`].
    pub fn export_path(&self) -> PathBuf {
        self.root.join("export")
    }
}

/// Writes `bytes` to a temporary sibling of `path`, fsyncs it and renames it over `path`.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Replaces the folder `dir` with one holding exactly `files` (name, bytes):
/// they are written into a temporary sibling folder first, which then takes
/// `dir`'s place, so `dir` is never left half-written (e.g. `export/`).
///
/// # Errors
/// [`Error::Io`] naming the path; a file name with a path separator.
pub fn write_dir_atomic(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for (file, bytes) in files {
        if file.contains(['/', '\\']) || file.is_empty() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::Config(format!("{file:?} is not a plain file name")));
        }
        if let Err(e) = write_atomic(&tmp.join(file), bytes) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

/// Appends JSON records to `metrics.jsonl`, one per line, flushed per record.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` for appending (created if missing).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn append(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, file })
    }

    /// Opens `path` for a run resumed after `step` completed steps: records
    /// with `"step" > step` (written after that checkpoint by the interrupted
    /// process) are dropped first, so the log reads as one uninterrupted run.
    ///
    /// # Errors
    /// [`Error::Io`], or [`Error::Corrupt`] naming the line that is not JSON.
    pub fn resume(path: impl Into<PathBuf>, step: u64) -> Result<Self> {
        let path = path.into();
        if path.exists() {
            let kept: Vec<serde_json::Value> = read_metrics(&path)?
                .into_iter()
                .filter(|r| r.get("step").and_then(|s| s.as_u64()).is_none_or(|s| s <= step))
                .collect();
            let mut text = String::new();
            for r in kept {
                text.push_str(&r.to_string());
                text.push('\n');
            }
            write_atomic(&path, text.as_bytes())?;
        }
        Self::append(path)
    }

    /// Appends one record and flushes it.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn log(&mut self, record: &serde_json::Value) -> Result<()> {
        let mut line = record.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every record of a `metrics.jsonl`. A final line without a newline
/// that does not parse (a write cut short by a crash) is ignored.
///
/// # Errors
/// [`Error::Io`], or [`Error::Corrupt`] naming the line that is not JSON.
pub fn read_metrics(path: &Path) -> Result<Vec<serde_json::Value>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(path, e))?;
    let n = lines.len();
    let mut out = Vec::with_capacity(n);
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(_) if i + 1 == n => break,
            Err(e) => return Err(Error::corrupt(path, format!("line {}: not JSON ({e})", i + 1))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn folders_are_replaced_whole_or_not_at_all() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let dir = tmp.path().join("export");
        write_dir_atomic(&dir, &[("a.txt", b"one"), ("b.txt", b"two")])?;
        write_dir_atomic(&dir, &[("a.txt", b"new")])?;
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().to_string()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(&dir, e))?;
        names.sort();
        assert_eq!(names, ["a.txt"], "the old folder is replaced, not merged");
        assert_eq!(
            std::fs::read(dir.join("a.txt")).map_err(|e| Error::io(&dir, e))?,
            b"new"
        );
        // a bad name fails before anything replaces the folder, and leaves no temporary behind
        assert!(write_dir_atomic(&dir, &[("x.txt", b"x"), ("../escape", b"y")]).is_err());
        assert_eq!(
            std::fs::read(dir.join("a.txt")).map_err(|e| Error::io(&dir, e))?,
            b"new"
        );
        let leftovers = std::fs::read_dir(tmp.path())
            .map_err(|e| Error::io(tmp.path(), e))?
            .count();
        assert_eq!(leftovers, 1);
        Ok(())
    }

    #[test]
    fn create_open_and_refuse_overwrite() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let root = tmp.path().join("run");
        let run = RunDir::create(&root, "[train]\nseed = 1\n")?;
        assert_eq!(run.config_text()?, "[train]\nseed = 1\n");
        assert!(RunDir::create(&root, "").is_err());
        assert!(RunDir::open(&root).is_ok());
        assert!(RunDir::open(tmp.path())
            .unwrap_err()
            .to_string()
            .contains("not a pretext run"));
        Ok(())
    }

    #[test]
    fn metrics_append_read_and_resume_truncation() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = tmp.path().join(METRICS_FILE);
        {
            let mut log = MetricsLog::append(&p)?;
            for s in 1..=5 {
                log.log(&json!({"step": s, "loss": s as f64 * 0.5}))?;
            }
            log.log(&json!({"event": "eval", "knn": 0.5}))?;
        }
        // each record is on disk right after log() returns
        assert_eq!(read_metrics(&p)?.len(), 6);
        let mut log = MetricsLog::resume(&p, 3)?;
        log.log(&json!({"step": 4, "loss": 9.0}))?;
        let recs = read_metrics(&p)?;
        let steps: Vec<Option<u64>> = recs.iter().map(|r| r["step"].as_u64()).collect();
        assert_eq!(steps, vec![Some(1), Some(2), Some(3), None, Some(4)]);
        Ok(())
    }

    #[test]
    fn torn_last_line_is_ignored_but_bad_middle_line_is_an_error() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = tmp.path().join(METRICS_FILE);
        std::fs::write(&p, "{\"step\":1}\n{\"ste").map_err(|e| Error::io(&p, e))?;
        assert_eq!(read_metrics(&p)?.len(), 1);
        std::fs::write(&p, "{\"step\":1}\nnot json\n{\"step\":2}\n").map_err(|e| Error::io(&p, e))?;
        let err = read_metrics(&p).expect_err("bad line");
        assert!(err.to_string().contains("line 2"), "{err}");
        Ok(())
    }
}
