//! Starting a run from existing weights (`pretrain --init`, `finetune
//! --init`): a paradigm reads its sources into [`InitialWeights`] under its
//! model's names; [`load_initial_weights`] checks and copies them into the
//! model and returns what happened ([`InitRecord`]: loaded, left freshly
//! initialised, unused), which the run keeps in `trainer.json` and its log.

use crate::checkpoint::load_checkpoint;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Weights a run starts from, under the model's tensor names.
#[derive(Debug, Clone)]
pub struct InitialWeights {
    /// The source as the user gave it (a path, `hub:owner/name@revision`).
    pub source: String,
    /// The file the tensors came from (errors name it).
    pub file: PathBuf,
    /// The tensors, by the model's names.
    pub tensors: HashMap<String, Tensor>,
    /// Source tensors set aside on purpose, with why (a tied copy, a buffer
    /// the model recomputes).
    pub skipped: Vec<(String, String)>,
}

/// What a run took from its initial weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitRecord {
    /// The source as the user gave it.
    pub source: String,
    /// The file the weights came from.
    pub file: String,
    /// Model tensors loaded from it.
    pub loaded: usize,
    /// Model tensors the source lacks, freshly initialised (e.g. a projection
    /// or MLM head).
    pub initialised: Vec<String>,
    /// Source tensors the model has no place for (e.g. a classifier's `fc.*`).
    #[serde(default)]
    pub unused: Vec<String>,
    /// Source tensors set aside on purpose, with why.
    #[serde(default)]
    pub skipped: Vec<String>,
    /// Tensors converted from another floating-point type (`name: F16`).
    #[serde(default)]
    pub converted: Vec<String>,
}

impl InitRecord {
    /// One line for the log: counts and the names of what was not loaded.
    pub fn summary(&self) -> String {
        let mut s = format!("initial weights from {}: {} tensors loaded", self.source, self.loaded);
        if !self.initialised.is_empty() {
            s.push_str(&format!("; freshly initialised: {}", self.initialised.join(", ")));
        }
        if !self.unused.is_empty() {
            s.push_str(&format!("; unused: {}", self.unused.join(", ")));
        }
        if !self.skipped.is_empty() {
            s.push_str(&format!("; set aside: {}", self.skipped.join(", ")));
        }
        if !self.converted.is_empty() {
            s.push_str(&format!("; converted to f32: {}", self.converted.join(", ")));
        }
        s
    }

    /// The record as a `metrics.jsonl` line (`event: init`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["event"] = serde_json::json!("init");
        v["step"] = serde_json::json!(0);
        v
    }
}

/// Copies `w` into `vars` (the model's weights and buffers, by name) and
/// reports what happened. Every model tensor that `required` names must be
/// in the source; the others start as initialised when absent. Shapes must
/// match; floating-point tensors of another precision are converted, a
/// tensor of an integer type where the model holds floats (or the reverse)
/// is refused.
///
/// # Errors
/// [`Error::Keys`] listing the required tensors the source lacks and the
/// source's unused ones; [`Error::Shape`] naming a tensor whose shape or type
/// differs.
pub fn load_initial_weights(
    vars: &[(String, Var)],
    w: &InitialWeights,
    required: &dyn Fn(&str) -> bool,
) -> Result<InitRecord> {
    let mut names: Vec<&String> = w.tensors.keys().collect();
    names.sort();
    let model: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let unused: Vec<String> = names
        .iter()
        .filter(|n| !model.contains_key(n.as_str()))
        .map(|n| n.to_string())
        .collect();
    let mut missing: Vec<String> = vars
        .iter()
        .filter(|(n, _)| !w.tensors.contains_key(n) && required(n))
        .map(|(n, _)| n.clone())
        .collect();
    missing.sort();
    let loaded_any = vars.iter().any(|(n, _)| w.tensors.contains_key(n));
    if !missing.is_empty() || !loaded_any {
        if !loaded_any && missing.is_empty() {
            missing = vars.iter().map(|(n, _)| n.clone()).collect();
            missing.sort();
        }
        return Err(Error::Keys {
            path: w.file.clone(),
            missing,
            unexpected: unused,
        });
    }
    let (mut loaded, mut initialised, mut converted) = (0usize, Vec::new(), Vec::new());
    for (name, var) in vars {
        let Some(t) = w.tensors.get(name) else {
            initialised.push(name.clone());
            continue;
        };
        let describe = |t: &Tensor| format!("{:?} {:?}", t.dtype(), t.dims());
        let (want_float, got_float) = (is_float(var.dtype()), is_float(t.dtype()));
        if t.dims() != var.dims() || want_float != got_float {
            return Err(Error::Shape {
                path: w.file.clone(),
                name: name.clone(),
                expected: describe(var.as_tensor()),
                found: describe(t),
            });
        }
        if t.dtype() != var.dtype() && want_float {
            converted.push(format!("{name}: {:?}", t.dtype()));
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        loaded += 1;
    }
    initialised.sort();
    Ok(InitRecord {
        source: w.source.clone(),
        file: w.file.display().to_string(),
        loaded,
        initialised,
        unused,
        skipped: w.skipped.iter().map(|(n, why)| format!("{n} ({why})")).collect(),
        converted,
    })
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// Whether `dir` is a run folder pretext wrote (`config.toml` and `checkpoints/`).
pub fn is_run_folder(dir: &Path) -> bool {
    dir.join("config.toml").is_file() && dir.join("checkpoints").is_dir()
}

/// The weights of the latest checkpoint of the run in `dir`, by the model's
/// own names.
///
/// # Errors
/// No complete checkpoint; an unreadable one.
pub fn run_weights(dir: &Path, source: &str, device: &Device) -> Result<InitialWeights> {
    let mgr = crate::checkpoint::CheckpointManager::new(dir.join("checkpoints"), 0);
    let latest = mgr
        .latest()?
        .ok_or_else(|| Error::NoCheckpoint(dir.join("checkpoints")))?;
    let ckpt = load_checkpoint(&latest, device)?;
    Ok(InitialWeights {
        source: source.to_string(),
        file: latest.join(crate::checkpoint::MODEL_FILE),
        tensors: ckpt.model.into_iter().collect(),
        skipped: vec![],
    })
}

/// The tensors of a safetensors file `path`, for a source named `source`.
///
/// # Errors
/// A missing file ("a folder without weights") or a malformed one, named.
pub fn safetensors_weights(path: &Path, source: &str, device: &Device) -> Result<InitialWeights> {
    if !path.is_file() {
        return Err(Error::corrupt(
            path,
            "missing: the source has no weights (model.safetensors); pytorch_model.bin is not read, convert it with \
             `safetensors.torch.save_file`",
        ));
    }
    let (tensors, _) = crate::checkpoint::read_safetensors(path, device)?;
    Ok(InitialWeights {
        source: source.to_string(),
        file: path.to_path_buf(),
        tensors,
        skipped: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Result<Vec<(String, Var)>> {
        let d = Device::Cpu;
        Ok(vec![
            ("encoder.w".to_string(), Var::zeros((2, 3), DType::F32, &d)?),
            ("encoder.count".to_string(), Var::zeros((), DType::I64, &d)?),
            ("head.w".to_string(), Var::ones(2, DType::F32, &d)?),
        ])
    }

    fn weights(t: Vec<(&str, Tensor)>) -> InitialWeights {
        InitialWeights {
            source: "src".into(),
            file: PathBuf::from("src/model.safetensors"),
            tensors: t.into_iter().map(|(n, t)| (n.to_string(), t)).collect(),
            skipped: vec![("tied.w".into(), "tied to encoder.w".into())],
        }
    }

    fn encoder_only(n: &str) -> bool {
        n.starts_with("encoder.")
    }

    #[test]
    fn loads_by_name_converts_floats_and_lists_the_rest() -> Result<()> {
        let d = Device::Cpu;
        let v = vars()?;
        let w = weights(vec![
            (
                "encoder.w",
                Tensor::arange(0f32, 6., &d)?.reshape((2, 3))?.to_dtype(DType::F16)?,
            ),
            ("encoder.count", Tensor::new(7i64, &d)?),
            ("fc.weight", Tensor::zeros((4, 2), DType::F32, &d)?),
        ]);
        let r = load_initial_weights(&v, &w, &encoder_only)?;
        assert_eq!(r.loaded, 2);
        assert_eq!(r.initialised, vec!["head.w"]);
        assert_eq!(r.unused, vec!["fc.weight"]);
        assert_eq!(r.converted, vec!["encoder.w: F16"]);
        assert_eq!(r.skipped, vec!["tied.w (tied to encoder.w)"]);
        assert_eq!(
            v[0].1.as_tensor().to_vec2::<f32>()?,
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        assert_eq!(v[1].1.as_tensor().to_scalar::<i64>()?, 7);
        assert_eq!(v[2].1.as_tensor().to_vec1::<f32>()?, vec![1., 1.], "head untouched");
        assert_eq!(r.to_json()["event"], "init");
        assert!(r.summary().contains("freshly initialised: head.w"));
        Ok(())
    }

    #[test]
    fn missing_required_tensors_wrong_shapes_and_types_are_named() -> Result<()> {
        let d = Device::Cpu;
        let v = vars()?;
        let e = load_initial_weights(
            &v,
            &weights(vec![("fc.weight", Tensor::zeros(1, DType::F32, &d)?)]),
            &encoder_only,
        )
        .expect_err("required missing");
        let msg = e.to_string();
        assert!(
            msg.contains("src/model.safetensors") && msg.contains("encoder.w") && msg.contains("fc.weight"),
            "{msg}"
        );
        let e = load_initial_weights(
            &v,
            &weights(vec![
                ("encoder.w", Tensor::zeros((3, 2), DType::F32, &d)?),
                ("encoder.count", Tensor::new(1i64, &d)?),
            ]),
            &encoder_only,
        )
        .expect_err("shape");
        assert!(
            e.to_string().contains("\"encoder.w\"") && e.to_string().contains("[3, 2]"),
            "{e}"
        );
        let e = load_initial_weights(
            &v,
            &weights(vec![
                ("encoder.w", Tensor::zeros((2, 3), DType::U8, &d)?),
                ("encoder.count", Tensor::new(1i64, &d)?),
            ]),
            &encoder_only,
        )
        .expect_err("dtype");
        assert!(e.to_string().contains("U8") && e.to_string().contains("F32"), "{e}");
        // a source that shares no name with the model
        let e = load_initial_weights(
            &v,
            &weights(vec![("x", Tensor::zeros(1, DType::F32, &d)?)]),
            &|_: &str| false,
        )
        .expect_err("nothing in common");
        assert!(
            e.to_string().contains("missing") && e.to_string().contains("\"x\""),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn a_source_without_weights_is_named() {
        let e = safetensors_weights(Path::new("/nonexistent/export/model.safetensors"), "x", &Device::Cpu)
            .expect_err("no file");
        assert!(
            e.to_string().contains("/nonexistent/export/model.safetensors") && e.to_string().contains("no weights")
        );
    }
}
