//! Checkpoints: one folder per saved step, never half-written.
//!
//! ```text
//! checkpoints/
//!   step-00001200/
//!     model.safetensors      weights and buffers, PyTorch names, metadata `format: pt`
//!     optimizer.safetensors  optimizer moments keyed by parameter name, and `step`
//!     state.safetensors      method buffers (MoCo queue, EMA twin, ...)
//!     trainer.json           step, epoch, seed, data position, schedule position
//!   latest                   names the newest complete checkpoint
//! ```
//!
//! A checkpoint is written into a hidden temporary folder, each file fsynced,
//! the folder fsynced, then renamed into place; only then is `latest`
//! replaced (write `latest.tmp`, fsync, rename). A crash or error at any point
//! leaves `latest` naming the previous complete checkpoint.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the weights.
pub const MODEL_FILE: &str = "model.safetensors";
/// File name of the optimizer state.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File name of the method state.
pub const STATE_FILE: &str = "state.safetensors";
/// File name of the trainer state.
pub const TRAINER_FILE: &str = "trainer.json";
/// File naming the newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";

/// Where the trainer stands: everything needed to continue the exact trajectory.
///
/// Random numbers are counter based (see [`crate::seed`]), so the seed and
/// the step determine every future draw: no generator state is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Completed optimizer steps; training resumes at this step.
    pub step: u64,
    /// The epoch the next step belongs to.
    pub epoch: u64,
    /// Position of the next batch inside its epoch.
    pub batch_in_epoch: u64,
    /// Batches per epoch of the data stream that was used.
    pub steps_per_epoch: u64,
    /// Total steps of the run (the schedule's horizon).
    pub total_steps: u64,
    /// The run's seed (drives every random stream).
    pub seed: u64,
    /// How random streams are derived from the seed.
    pub rng_scheme: String,
    /// Learning rate used by the last completed step.
    pub lr: f64,
    /// Loss of the last completed step.
    pub last_loss: Option<f64>,
    /// pretext version that wrote it.
    pub pretext_version: String,
    /// The CPU that trained to this step (absent in checkpoints written
    /// before it was recorded).
    #[serde(default)]
    pub cpu: Option<crate::cpu::CpuInfo>,
    /// The precision of the training step's products and what ran them
    /// (`f32`, `bf16 (avx512_bf16 kernels)`, or a bf16 request that ran in
    /// f32 on this CPU); absent in checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub products: Option<String>,
    /// The processes that trained the last step when there were several
    /// (`2 processes, MPI (Open MPI v4.1.4)`); absent for one process. A run
    /// may resume on another number: its batches do not depend on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<String>,
    /// The weights the run started from (`--init`): what was loaded, left
    /// freshly initialised or unused. Absent for runs from scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<crate::warm_start::InitRecord>,
}

/// The contents of one checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Weights and buffers (BatchNorm statistics), PyTorch names.
    pub model: Vec<(String, Tensor)>,
    /// Optimizer state by name.
    pub optimizer: Vec<(String, Tensor)>,
    /// Method buffers by name.
    pub state: Vec<(String, Tensor)>,
    /// Trainer position.
    pub trainer: TrainerState,
    /// Metadata written into `model.safetensors` besides `format: pt`
    /// (e.g. `pretext.paradigm`, `pretext.architecture`).
    pub metadata: BTreeMap<String, String>,
}

/// Something that writes a whole file durably. The default, [`FsyncSink`],
/// creates the file, writes it and fsyncs it; tests inject failures.
pub trait FileSink: Send + Sync {
    /// Writes `bytes` to `path` and makes them durable.
    ///
    /// # Errors
    /// Any I/O error.
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
}

/// Writes with `File::create`, `write_all`, `sync_all`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsyncSink;

impl FileSink for FsyncSink {
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directories can be opened read-only and fsynced on Unix; elsewhere this is a no-op.
    #[cfg(unix)]
    {
        let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
        f.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Serialises named tensors to safetensors bytes with `metadata` (plus `format: pt`).
///
/// # Errors
/// A tensor could not be copied to the host or serialised.
pub fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        host.push((name.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    let mut meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    meta.insert("format".into(), "pt".into());
    safetensors::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| Error::Candle(candle_core::Error::Msg(format!("safetensors serialisation: {e}"))))
}

/// Reads a safetensors file: tensors by name and the metadata.
///
/// # Errors
/// [`Error::Io`] if unreadable; [`Error::Corrupt`] naming the file if truncated or malformed.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&bytes, path, device)
}

/// Parses safetensors bytes that came from `path` (used in error messages).
///
/// # Errors
/// [`Error::Corrupt`] naming `path`.
pub fn parse_safetensors(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        Error::corrupt(
            path,
            format!("not a valid safetensors file ({e}); it may be truncated or corrupted"),
        )
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::corrupt(path, format!("unreadable safetensors header ({e})")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| Error::corrupt(path, format!("tensor {name:?}: {e}")))?;
        out.insert(name, t);
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Checks that `tensors` hold exactly the names and shapes of `expected`;
/// returns them in `expected`'s order, converted to each expected dtype/device.
///
/// # Errors
/// [`Error::Keys`] listing missing and unexpected names; [`Error::Shape`] for the first shape mismatch.
pub fn match_tensors(
    path: &Path,
    expected: &[(String, Tensor)],
    tensors: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let missing: Vec<String> = expected
        .iter()
        .filter(|(n, _)| !tensors.contains_key(n))
        .map(|(n, _)| n.clone())
        .collect();
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !expected.iter().any(|(n, _)| n == *k))
        .cloned()
        .collect();
    unexpected.sort();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(Error::Keys {
            path: path.to_path_buf(),
            missing,
            unexpected,
        });
    }
    let mut out = Vec::with_capacity(expected.len());
    for (name, want) in expected {
        let got = &tensors[name];
        if got.dims() != want.dims() {
            return Err(Error::Shape {
                path: path.to_path_buf(),
                name: name.clone(),
                expected: format!("{:?}", want.dims()),
                found: format!("{:?}", got.dims()),
            });
        }
        out.push((name.clone(), got.to_device(want.device())?.to_dtype(want.dtype())?));
    }
    Ok(out)
}

/// Fails with [`Error::NonFinite`] if any floating-point tensor holds NaN or ±inf.
///
/// # Errors
/// See above.
pub fn check_finite(step: u64, kind: &str, tensors: &[(String, Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if !t.dtype().is_float() {
            continue;
        }
        let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                step,
                what: format!("{kind} {name}"),
                value: x.to_string(),
            });
        }
    }
    Ok(())
}

/// Saves, lists and loads the checkpoints of one run.
pub struct CheckpointManager {
    dir: PathBuf,
    keep_last: usize,
    sink: Box<dyn FileSink>,
}

impl std::fmt::Debug for CheckpointManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointManager")
            .field("dir", &self.dir)
            .field("keep_last", &self.keep_last)
            .finish()
    }
}

/// The folder name of the checkpoint after `step` steps.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

impl CheckpointManager {
    /// Manages `dir` (usually `<run>/checkpoints`), keeping the newest `keep_last`
    /// complete checkpoints (0 keeps all).
    pub fn new(dir: impl Into<PathBuf>, keep_last: usize) -> Self {
        Self::with_sink(dir, keep_last, Box::new(FsyncSink))
    }

    /// As [`CheckpointManager::new`], writing files through `sink`.
    pub fn with_sink(dir: impl Into<PathBuf>, keep_last: usize, sink: Box<dyn FileSink>) -> Self {
        Self {
            dir: dir.into(),
            keep_last,
            sink,
        }
    }

    /// The managed folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `ckpt` atomically and points `latest` at it; returns its folder.
    ///
    /// # Errors
    /// [`Error::NonFinite`] if a weight or moment is NaN/inf (nothing is written);
    /// [`Error::Io`] if writing fails, in which case the temporary folder is
    /// removed and `latest` still names the previous checkpoint.
    pub fn save(&self, ckpt: &Checkpoint) -> Result<PathBuf> {
        let step = ckpt.trainer.step;
        check_finite(step, "parameter", &ckpt.model)?;
        check_finite(step, "optimizer state", &ckpt.optimizer)?;
        check_finite(step, "method state", &ckpt.state)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let name = checkpoint_name(step);
        let tmp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        match self.write_files(&tmp, ckpt) {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
        let fin = self.dir.join(&name);
        if fin.exists() {
            // Re-saving the same step (e.g. after a resume): replace it.
            std::fs::remove_dir_all(&fin).map_err(|e| Error::io(&fin, e))?;
        }
        std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))?;
        sync_dir(&self.dir)?;
        self.write_latest(&name)?;
        self.prune(&name)?;
        tracing::info!(step, path = %fin.display(), "checkpoint saved");
        Ok(fin)
    }

    fn write_files(&self, tmp: &Path, ckpt: &Checkpoint) -> Result<()> {
        let mut meta = ckpt.metadata.clone();
        meta.insert("pretext.version".into(), env!("CARGO_PKG_VERSION").into());
        meta.insert("pretext.step".into(), ckpt.trainer.step.to_string());
        let files: [(&str, Vec<u8>); 4] = [
            (MODEL_FILE, safetensors_bytes(&ckpt.model, &meta)?),
            (OPTIMIZER_FILE, safetensors_bytes(&ckpt.optimizer, &BTreeMap::new())?),
            (STATE_FILE, safetensors_bytes(&ckpt.state, &BTreeMap::new())?),
            (
                TRAINER_FILE,
                serde_json::to_vec_pretty(&ckpt.trainer).map_err(|e| Error::Config(format!("trainer state: {e}")))?,
            ),
        ];
        for (file, bytes) in files {
            let p = tmp.join(file);
            self.sink.write(&p, &bytes).map_err(|e| Error::io(&p, e))?;
        }
        sync_dir(tmp)
    }

    fn write_latest(&self, name: &str) -> Result<()> {
        let tmp = self.dir.join(format!("{LATEST_FILE}.tmp"));
        let fin = self.dir.join(LATEST_FILE);
        self.sink
            .write(&tmp, format!("{name}\n").as_bytes())
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))?;
        sync_dir(&self.dir)
    }

    /// Complete checkpoints, oldest first.
    ///
    /// # Errors
    /// [`Error::Io`] if the folder cannot be listed.
    pub fn list(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&self.dir, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("step-") && entry.path().is_dir() {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }

    fn prune(&self, keep: &str) -> Result<()> {
        // Leftovers of interrupted saves.
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for entry in rd.flatten() {
                let n = entry.file_name().to_string_lossy().to_string();
                if n.starts_with(".tmp-") {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        if self.keep_last == 0 {
            return Ok(());
        }
        let all = self.list()?;
        let excess = all.len().saturating_sub(self.keep_last);
        for p in all.into_iter().take(excess) {
            if p.file_name().is_some_and(|n| n == keep) {
                continue;
            }
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    }

    /// The folder `latest` names, if any.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if `latest` names a folder that does not exist.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let p = self.dir.join(LATEST_FILE);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&p, e)),
        };
        let name = text.trim();
        if name.is_empty() || name.contains('/') || name.contains("..") {
            return Err(Error::corrupt(
                &p,
                format!("does not name a checkpoint folder: {name:?}"),
            ));
        }
        let dir = self.dir.join(name);
        if !dir.is_dir() {
            return Err(Error::corrupt(&p, format!("names {name:?}, which does not exist")));
        }
        Ok(Some(dir))
    }

    /// Loads the checkpoint `latest` names.
    ///
    /// # Errors
    /// [`Error::NoCheckpoint`] if there is none; else as [`load_checkpoint`].
    pub fn load_latest(&self, device: &Device) -> Result<Checkpoint> {
        Ok(self.load_latest_with_path(device)?.1)
    }

    /// As [`CheckpointManager::load_latest`], with the checkpoint's folder
    /// (to name in errors and messages).
    ///
    /// # Errors
    /// As [`CheckpointManager::load_latest`].
    pub fn load_latest_with_path(&self, device: &Device) -> Result<(PathBuf, Checkpoint)> {
        match self.latest()? {
            Some(dir) => {
                let ckpt = load_checkpoint(&dir, device)?;
                Ok((dir, ckpt))
            }
            None => Err(Error::NoCheckpoint(self.dir.clone())),
        }
    }
}

/// Loads every file of the checkpoint folder `dir`.
///
/// # Errors
/// [`Error::Io`] or [`Error::Corrupt`] naming the file that is missing, truncated or malformed.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let sorted = |m: HashMap<String, Tensor>| -> Vec<(String, Tensor)> {
        let b: BTreeMap<String, Tensor> = m.into_iter().collect();
        b.into_iter().collect()
    };
    let (model, meta) = read_safetensors(&dir.join(MODEL_FILE), device)?;
    let (optimizer, _) = read_safetensors(&dir.join(OPTIMIZER_FILE), device)?;
    let (state, _) = read_safetensors(&dir.join(STATE_FILE), device)?;
    let tp = dir.join(TRAINER_FILE);
    let bytes = std::fs::read(&tp).map_err(|e| Error::io(&tp, e))?;
    let trainer: TrainerState =
        serde_json::from_slice(&bytes).map_err(|e| Error::corrupt(&tp, format!("not a valid trainer state ({e})")))?;
    let metadata = meta
        .into_iter()
        .filter(|(k, _)| k != "format")
        .collect::<BTreeMap<_, _>>();
    Ok(Checkpoint {
        model: sorted(model),
        optimizer: sorted(optimizer),
        state: sorted(state),
        trainer,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn sample(step: u64) -> Result<Checkpoint> {
        let dev = Device::Cpu;
        Ok(Checkpoint {
            model: vec![
                ("fc.weight".into(), Tensor::new(&[[1.5f32, -2.0], [0.25, 1e-7]], &dev)?),
                (
                    "bn.num_batches_tracked".into(),
                    Tensor::new(&[7i64], &dev)?.reshape(())?,
                ),
            ],
            optimizer: vec![(
                "fc.weight.exp_avg".into(),
                Tensor::new(&[[0.1f32, 0.2], [0.3, 0.4]], &dev)?,
            )],
            state: vec![("queue".into(), Tensor::new(&[[1f32, 0.0, 0.0]], &dev)?)],
            trainer: TrainerState {
                step,
                epoch: 1,
                batch_in_epoch: 3,
                steps_per_epoch: 10,
                total_steps: 100,
                seed: 42,
                rng_scheme: "counter-v1".into(),
                lr: 0.001,
                last_loss: Some(1.25),
                pretext_version: "test".into(),
                cpu: Some(crate::cpu::CpuInfo::from_cpuinfo(
                    "model name: Test CPU\nflags: avx2 fma\n",
                )),
                products: Some("bf16 (avx512_bf16 kernels)".into()),
                processes: Some("2 processes, MPI (Open MPI v4.1.4)".into()),
                init: Some(crate::warm_start::InitRecord {
                    source: "hub:someone/model@main".into(),
                    file: "model.safetensors".into(),
                    loaded: 3,
                    initialised: vec!["head.w".into()],
                    unused: vec!["fc.weight".into()],
                    skipped: vec![],
                    converted: vec![],
                }),
            },
            metadata: [("pretext.paradigm".to_string(), "test".to_string())]
                .into_iter()
                .collect(),
        })
    }

    #[test]
    fn round_trip_is_exact() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let mgr = CheckpointManager::new(tmp.path().join("checkpoints"), 0);
        let ck = sample(12)?;
        let dir = mgr.save(&ck)?;
        assert!(dir.ends_with("step-00000012"));
        let back = mgr.load_latest(&Device::Cpu)?;
        assert_eq!(back.trainer, ck.trainer);
        assert_eq!(back.metadata["pretext.paradigm"], "test");
        let w = back
            .model
            .iter()
            .find(|(n, _)| n == "fc.weight")
            .map(|(_, t)| t.clone());
        assert_eq!(
            w.map(|t| t.to_vec2::<f32>()).transpose()?,
            Some(vec![vec![1.5, -2.0], vec![0.25, 1e-7]])
        );
        let nb = back
            .model
            .iter()
            .find(|(n, _)| n == "bn.num_batches_tracked")
            .map(|(_, t)| t.clone());
        assert_eq!(nb.map(|t| t.to_scalar::<i64>()).transpose()?, Some(7));
        assert_eq!(
            back.optimizer[0].1.to_vec2::<f32>()?,
            vec![vec![0.1, 0.2], vec![0.3, 0.4]]
        );
        assert_eq!(back.state[0].1.to_vec2::<f32>()?, vec![vec![1.0, 0.0, 0.0]]);
        // Python loaders need `format: pt`.
        let (_, meta) = read_safetensors(&dir.join(MODEL_FILE), &Device::Cpu)?;
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
        Ok(())
    }

    #[test]
    fn retention_keeps_last_k_and_latest_moves() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let mgr = CheckpointManager::new(tmp.path(), 2);
        for s in [1, 2, 3, 4] {
            mgr.save(&sample(s)?)?;
        }
        let names: Vec<String> = mgr
            .list()?
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .collect();
        assert_eq!(names, vec!["step-00000003", "step-00000004"]);
        assert_eq!(mgr.load_latest(&Device::Cpu)?.trainer.step, 4);
        Ok(())
    }

    /// Fails on the `n`-th file write (0-based), counting across saves.
    struct FailingSink {
        n: usize,
        count: AtomicUsize,
    }

    impl FileSink for FailingSink {
        fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
            let i = self.count.fetch_add(1, Ordering::SeqCst);
            if i == self.n {
                // write half of the file, then fail like a full disk would
                std::fs::write(path, &bytes[..bytes.len() / 2])?;
                return Err(std::io::Error::other("simulated failure: disk full"));
            }
            FsyncSink.write(path, bytes)
        }
    }

    #[test]
    fn interrupted_write_keeps_previous_latest() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        // A save writes 4 files + `latest` = 5 writes. Fail inside the second save's optimizer file.
        for fail_at in [5, 6, 7, 8, 9] {
            let dir = tmp.path().join(format!("ck{fail_at}"));
            let mgr = CheckpointManager::with_sink(
                &dir,
                0,
                Box::new(FailingSink {
                    n: fail_at,
                    count: AtomicUsize::new(0),
                }),
            );
            mgr.save(&sample(10)?)?;
            let err = mgr.save(&sample(20)?).expect_err("second save must fail");
            assert!(err.to_string().contains("simulated failure"), "{err}");
            let latest = mgr.load_latest(&Device::Cpu)?;
            assert_eq!(latest.trainer.step, 10, "fail_at {fail_at}");
            // No half-written step folder is visible: failing inside a data file
            // leaves only step 10; failing on `latest` (the 5th write) leaves a
            // complete step 20 that `latest` does not name yet.
            let visible: Vec<PathBuf> = mgr.list()?;
            let want = if fail_at == 9 { 2 } else { 1 };
            assert_eq!(visible.len(), want, "fail_at {fail_at}: {visible:?}");
            for dir in visible {
                load_checkpoint(&dir, &Device::Cpu)?;
            }
            assert!(!std::fs::read_dir(&dir)
                .map_err(|e| Error::io(&dir, e))?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-")));
        }
        Ok(())
    }

    #[test]
    fn nan_weights_are_never_written() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let mgr = CheckpointManager::new(tmp.path(), 0);
        let mut ck = sample(5)?;
        ck.model[0].1 = Tensor::new(&[f32::NAN, 1.0], &Device::Cpu)?;
        let err = mgr.save(&ck).expect_err("NaN must be refused");
        assert!(matches!(err, Error::NonFinite { step: 5, .. }), "{err}");
        assert!(mgr.latest()?.is_none());
        assert!(mgr.list()?.is_empty());
        Ok(())
    }

    #[test]
    fn truncated_and_corrupted_files_name_the_file() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let mgr = CheckpointManager::new(tmp.path(), 0);
        let dir = mgr.save(&sample(3)?)?;
        let model = dir.join(MODEL_FILE);
        let bytes = std::fs::read(&model).map_err(|e| Error::io(&model, e))?;
        for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&model, &bytes[..cut]).map_err(|e| Error::io(&model, e))?;
            let err = load_checkpoint(&dir, &Device::Cpu).expect_err("truncated");
            assert!(err.to_string().contains("model.safetensors"), "cut {cut}: {err}");
        }
        std::fs::write(&model, &bytes).map_err(|e| Error::io(&model, e))?;
        let tj = dir.join(TRAINER_FILE);
        std::fs::write(&tj, b"{\"step\": 3,").map_err(|e| Error::io(&tj, e))?;
        let err = load_checkpoint(&dir, &Device::Cpu).expect_err("bad json");
        assert!(err.to_string().contains("trainer.json"), "{err}");
        std::fs::remove_file(dir.join(STATE_FILE)).map_err(|e| Error::io("rm", e))?;
        let err = load_checkpoint(&dir, &Device::Cpu).expect_err("missing");
        assert!(err.to_string().contains("state.safetensors"), "{err}");
        Ok(())
    }

    #[test]
    fn key_and_shape_mismatches_are_reported_by_name() -> Result<()> {
        let dev = Device::Cpu;
        let expected = vec![
            ("a".to_string(), Tensor::zeros((2, 2), DType::F32, &dev)?),
            ("b".to_string(), Tensor::zeros(3, DType::F32, &dev)?),
        ];
        let mut found = HashMap::new();
        found.insert("a".to_string(), Tensor::zeros((2, 2), DType::F32, &dev)?);
        found.insert("c".to_string(), Tensor::zeros(3, DType::F32, &dev)?);
        let err = match_tensors(Path::new("m.safetensors"), &expected, &found).expect_err("keys");
        let msg = err.to_string();
        assert!(
            msg.contains("missing [\"b\"]") && msg.contains("unexpected [\"c\"]"),
            "{msg}"
        );
        found.remove("c");
        found.insert("b".to_string(), Tensor::zeros(4, DType::F32, &dev)?);
        let err = match_tensors(Path::new("m.safetensors"), &expected, &found).expect_err("shape");
        assert!(
            err.to_string().contains("\"b\"") && err.to_string().contains("[4]"),
            "{err}"
        );
        Ok(())
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = parse_safetensors(&bytes, Path::new("x.safetensors"), &Device::Cpu);
            }

            #[test]
            fn flipped_bytes_never_panic(pos in 0usize..400, val in any::<u8>()) {
                let ck = sample(1).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut bytes = safetensors_bytes(&ck.model, &BTreeMap::new())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let p = pos % bytes.len();
                bytes[p] = val;
                let _ = parse_safetensors(&bytes, Path::new("x.safetensors"), &Device::Cpu);
            }
        }
    }
}
