//! Evaluation reports: one stable schema for every paradigm
//! (`report/eval.json`) and a Markdown table (`report/eval.md`).

use crate::features::Embedded;
use crate::knn::{knn_accuracy, KnnConfig};
use crate::linear::{LinearProbe, LinearProbeConfig};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The report's file in a run's `report/` folder.
pub const EVAL_JSON: &str = "eval.json";

/// One measured accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// `pretrained`, `random-init` or `raw`.
    pub features: String,
    /// `linear`, `knn` or `finetune`.
    pub protocol: String,
    /// Fraction of the training labels used (0.01, 0.1, 1.0).
    pub labels: f64,
    /// Test accuracy in [0, 1].
    pub accuracy: f64,
    /// Labelled training rows used.
    pub n_train: usize,
    /// Test rows.
    pub n_test: usize,
    /// The L2 strength λ the linear probe chose (`linear` records only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2: Option<f64>,
}

/// A whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// `contrastive`, `generative` or `mlm`.
    pub paradigm: String,
    /// e.g. `simclr`.
    pub method: String,
    /// e.g. `fashion-mnist`.
    pub dataset: String,
    /// The accuracies.
    pub records: Vec<EvalRecord>,
    /// The labelled data of `probe --data`: path, checksum and split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<pretext_data::DataSource>,
}

/// Linear probe and kNN of one feature set at each label fraction (class-balanced, seeded subsets).
///
/// # Errors
/// Invalid fractions or features.
pub fn evaluate_features(
    name: &str,
    train: &Embedded,
    test: &Embedded,
    fractions: &[f64],
    seed: u64,
    probe: &LinearProbeConfig,
    knn: &KnnConfig,
) -> Result<Vec<EvalRecord>> {
    let mut out = Vec::new();
    for &f in fractions {
        let idx = pretext_data::subset::balanced_subset(&train.labels, f, seed)?;
        let sub = train.select(&idx);
        let fitted = LinearProbe::fit(&sub, probe)?;
        let lin = fitted.accuracy(test)?;
        let nn = knn_accuracy(&sub, test, knn)?;
        for (protocol, accuracy, l2) in [("linear", lin, Some(fitted.l2)), ("knn", nn, None)] {
            out.push(EvalRecord {
                features: name.to_string(),
                protocol: protocol.to_string(),
                labels: f,
                accuracy,
                n_train: sub.len(),
                n_test: test.len(),
                l2,
            });
        }
    }
    Ok(out)
}

/// A Markdown table header: the named columns, then one per label fraction.
fn push_header(s: &mut String, columns: &[&str], fracs: &[f64]) {
    s.push('|');
    for c in columns {
        s.push_str(&format!(" {c} |"));
    }
    for f in fracs {
        s.push_str(&format!(" {} |", fraction_label(*f)));
    }
    s.push_str("\n|");
    s.push_str(&"---|".repeat(columns.len() + fracs.len()));
    s.push('\n');
}

/// A label fraction as people write it: `1%`, `10%`, `100%`, `0.5%`.
pub fn fraction_label(f: f64) -> String {
    format!("{}%", (f * 1000.0).round() / 10.0)
}

impl EvalReport {
    /// The Markdown table: one row per feature set and protocol, one column per
    /// label fraction; below it, when recorded, the L2 strength each linear probe chose.
    pub fn markdown(&self) -> String {
        let mut fracs: Vec<f64> = self.records.iter().map(|r| r.labels).collect();
        fracs.sort_by(f64::total_cmp);
        fracs.dedup();
        let mut rows: Vec<(String, String)> = Vec::new();
        for r in &self.records {
            let key = (r.features.clone(), r.protocol.clone());
            if !rows.contains(&key) {
                rows.push(key);
            }
        }
        let mut s = format!(
            "# {} ({}) on {}\n\nTest accuracy (%) by fraction of training labels.\n\n",
            self.method, self.paradigm, self.dataset
        );
        push_header(&mut s, &["features", "protocol"], &fracs);
        for (feat, proto) in rows {
            s.push_str(&format!("| {feat} | {proto} |"));
            for f in &fracs {
                match self
                    .records
                    .iter()
                    .find(|r| r.features == feat && r.protocol == proto && r.labels == *f)
                {
                    Some(r) => s.push_str(&format!(" {:.2} |", r.accuracy * 100.0)),
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        let mut probed: Vec<&String> = Vec::new();
        for r in self.records.iter().filter(|r| r.l2.is_some()) {
            if !probed.contains(&&r.features) {
                probed.push(&r.features);
            }
        }
        if !probed.is_empty() {
            s.push_str(
                "\nL2 strength λ the linear probe chose on the training labels (cross-validation or a validation split).\n\n",
            );
            push_header(&mut s, &["features"], &fracs);
            for feat in probed {
                s.push_str(&format!("| {feat} |"));
                for f in &fracs {
                    match self
                        .records
                        .iter()
                        .find(|r| &r.features == feat && r.protocol == "linear" && r.labels == *f)
                        .and_then(|r| r.l2)
                    {
                        Some(l2) => s.push_str(&format!(" {l2:.0e} |")),
                        None => s.push_str(" – |"),
                    }
                }
                s.push('\n');
            }
        }
        s
    }

    /// Writes `eval.json` and `eval.md` into `dir` (each atomically).
    ///
    /// # Errors
    /// I/O errors naming the file.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Core(pretext_core::Error::io(dir, e)))?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Invalid(format!("report: {e}")))?;
        pretext_core::run::write_atomic(&dir.join(EVAL_JSON), &json)?;
        pretext_core::run::write_atomic(&dir.join("eval.md"), self.markdown().as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_files_and_table() -> Result<()> {
        let train = Embedded::new(
            (0..40).map(|i| if i % 2 == (i / 2) % 2 { 1.0 } else { 0.0 }).collect(),
            2,
            (0..20).map(|i| (i % 2) as u32).collect(),
        )?;
        let recs = evaluate_features(
            "raw",
            &train,
            &train,
            &[0.5, 1.0],
            0,
            &LinearProbeConfig::default(),
            &KnnConfig {
                k: 3,
                ..Default::default()
            },
        )?;
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[0].n_train, 10);
        assert!(recs.iter().all(|r| r.accuracy == 1.0), "{recs:?}");
        let report = EvalReport {
            paradigm: "contrastive".into(),
            method: "simclr".into(),
            dataset: "toy".into(),
            records: recs,
            data: None,
        };
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        report.write(dir.path())?;
        let back: EvalReport = serde_json::from_slice(
            &std::fs::read(dir.path().join("eval.json")).map_err(|e| Error::Invalid(e.to_string()))?,
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        assert_eq!(back, report);
        let md = std::fs::read_to_string(dir.path().join("eval.md")).map_err(|e| Error::Invalid(e.to_string()))?;
        assert!(md.contains("| raw | linear | 100.00 | 100.00 |"), "{md}");
        assert!(md.contains("50% |") && md.contains("100% |"), "{md}");
        // the chosen L2 is recorded for linear records only, from the grid, and tabulated
        for r in &report.records {
            match r.protocol.as_str() {
                "linear" => assert!(
                    r.l2.is_some_and(|l| LinearProbeConfig::default().l2_grid.contains(&l)),
                    "{r:?}"
                ),
                _ => assert_eq!(r.l2, None, "{r:?}"),
            }
        }
        let l2_row = format!("| raw | {:.0e} |", report.records[0].l2.unwrap_or(f64::NAN));
        assert!(md.contains("L2 strength") && md.contains(&l2_row), "{md}");
        // reports written before the field existed still load
        let old = r#"{"paradigm":"generative","method":"vae","dataset":"d","records":[{"features":"raw","protocol":"linear","labels":0.01,"accuracy":0.5,"n_train":6,"n_test":4}]}"#;
        let parsed: EvalReport = serde_json::from_str(old).map_err(|e| Error::Invalid(e.to_string()))?;
        assert_eq!(parsed.records[0].l2, None);
        assert!(!parsed.markdown().contains("L2 strength"));
        Ok(())
    }
}
