//! The text the model learns from and the labelled task it is probed on.
//!
//! By default both come from the shipped fortunes: the probe task is the
//! entries of 8 categories (computers, science, politics, love, food, sports,
//! law, medicine), exact duplicates dropped, split 80/20 per class under the
//! seed; the pretraining corpus is every fortune entry **except the probe's
//! test entries** (so no test text is seen in pretraining), of which a seeded
//! 5% is held out for masked-token accuracy.

use pretext_core::{Error, Result};
use pretext_data::TextDataset;
use std::collections::HashSet;

/// The default fortune categories of the probe task.
pub const FORTUNE_CATEGORIES: [&str; 8] = [
    "computers",
    "science",
    "politics",
    "love",
    "food",
    "sports",
    "law",
    "medicine",
];

/// Pretraining text and the labelled probe task.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Documents to pretrain on.
    pub train: Vec<String>,
    /// Held-out documents for masked-token accuracy and perplexity.
    pub held_out: Vec<String>,
    /// Labelled training documents of the probe task (subsets are drawn from them).
    pub probe_train: TextDataset,
    /// Labelled test documents of the probe task (never in `train` or `held_out`).
    pub probe_test: TextDataset,
}

/// Keeps the first occurrence of each exact text.
fn dedup(ds: &TextDataset) -> TextDataset {
    let mut seen = HashSet::new();
    let keep: Vec<usize> = (0..ds.len()).filter(|&i| seen.insert(ds.docs[i].as_str())).collect();
    ds.select(&keep)
}

/// A stratified split: per class, a seeded `test_fraction` (rounded, at least
/// one when the class has two or more entries) goes to test.
///
/// # Errors
/// Unlabelled data or a fraction outside (0, 1).
pub fn stratified_split(ds: &TextDataset, test_fraction: f64, seed: u64) -> Result<(TextDataset, TextDataset)> {
    let labels = ds
        .labels
        .as_ref()
        .ok_or_else(|| Error::Data("the probe task needs labelled documents".into()))?;
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(Error::Config(format!(
            "probe test fraction {test_fraction}: must be in (0, 1)"
        )));
    }
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] as usize == c).collect();
        let mut rng = pretext_core::seed::stream_rng(seed, "probe-split", &[c as u64]);
        let perm = pretext_core::seed::permutation(idx.len(), &mut rng);
        let n_test = if idx.len() >= 2 {
            ((idx.len() as f64 * test_fraction).round() as usize).clamp(1, idx.len() - 1)
        } else {
            0
        };
        for (k, &p) in perm.iter().enumerate() {
            if k < n_test {
                test.push(idx[p]);
            } else {
                train.push(idx[p]);
            }
        }
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok((ds.select(&train), ds.select(&test)))
}

/// Builds the corpus from `all` (every document, labelled with its category
/// where known) and the probe task from the documents of `categories` (all
/// labels when `None`).
///
/// # Errors
/// Unknown categories, unlabelled data, too few documents.
pub fn build(all: &TextDataset, categories: Option<&[String]>, held_out_fraction: f64, seed: u64) -> Result<Corpus> {
    let labels = all.labels.as_ref().ok_or_else(|| {
        Error::Data(
            "the corpus has no labels, so there is no probe task (use labelled JSONL/Parquet or fortune files)".into(),
        )
    })?;
    let task = match categories {
        Some(cats) => {
            let mut keep = Vec::new();
            let mut lab = Vec::new();
            for (new, c) in cats.iter().enumerate() {
                let Some(old) = all.classes.iter().position(|x| x == c) else {
                    return Err(Error::Config(format!(
                        "probe category {c:?} is not in the corpus (it has {:?})",
                        all.classes
                    )));
                };
                for i in (0..all.len()).filter(|&i| labels[i] as usize == old) {
                    keep.push(i);
                    lab.push(new as u32);
                }
            }
            TextDataset {
                docs: keep.iter().map(|&i| all.docs[i].clone()).collect(),
                labels: Some(lab),
                classes: cats.to_vec(),
            }
        }
        None => all.clone(),
    };
    let task = dedup(&task);
    let (probe_train, probe_test) = stratified_split(&task, 0.2, seed)?;
    let test_text: HashSet<&str> = probe_test.docs.iter().map(String::as_str).collect();
    let pre: Vec<&String> = all.docs.iter().filter(|d| !test_text.contains(d.as_str())).collect();
    if pre.len() < 2 {
        return Err(Error::Data(format!(
            "only {} documents left for pretraining",
            pre.len()
        )));
    }
    let mut rng = pretext_core::seed::stream_rng(seed, "mlm-held-out", &[]);
    let perm = pretext_core::seed::permutation(pre.len(), &mut rng);
    let n_held = ((pre.len() as f64 * held_out_fraction).round() as usize).clamp(1, pre.len() - 1);
    let mut held: Vec<usize> = perm[..n_held].to_vec();
    let mut train: Vec<usize> = perm[n_held..].to_vec();
    held.sort_unstable();
    train.sort_unstable();
    Ok(Corpus {
        train: train.iter().map(|&i| pre[i].clone()).collect(),
        held_out: held.iter().map(|&i| pre[i].clone()).collect(),
        probe_train,
        probe_test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds() -> TextDataset {
        let mut docs = Vec::new();
        let mut labels = Vec::new();
        for c in 0..3u32 {
            for i in 0..20 {
                docs.push(format!("class {c} entry {i}"));
                labels.push(c);
            }
        }
        docs.push("class 0 entry 3".into()); // an exact duplicate
        labels.push(1);
        TextDataset {
            docs,
            labels: Some(labels),
            classes: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    #[test]
    fn probe_test_text_never_reaches_pretraining() -> Result<()> {
        let c = build(&ds(), Some(&["c".to_string(), "a".to_string()]), 0.1, 0)?;
        assert_eq!(c.probe_test.len(), 8, "20% of 20 per class, two classes");
        assert_eq!(c.probe_train.len(), 32);
        assert_eq!(c.probe_test.classes, vec!["c".to_string(), "a".to_string()]);
        let test: HashSet<&String> = c.probe_test.docs.iter().collect();
        assert!(c.train.iter().chain(&c.held_out).all(|d| !test.contains(d)));
        assert_eq!(
            c.train.len() + c.held_out.len() + 8,
            61 - usize::from(test.contains(&"class 0 entry 3".to_string()))
        );
        assert!(build(&ds(), Some(&["zzz".to_string()]), 0.1, 0).is_err());
        Ok(())
    }

    #[test]
    fn split_is_stratified_seeded_and_deduplicated() -> Result<()> {
        let d = dedup(&ds());
        assert_eq!(d.len(), 60);
        let (a, b) = stratified_split(&d, 0.2, 5)?;
        let (a2, b2) = stratified_split(&d, 0.2, 5)?;
        assert_eq!((a.docs.clone(), b.docs.clone()), (a2.docs, b2.docs));
        let (_, b3) = stratified_split(&d, 0.2, 6)?;
        assert_ne!(b.docs, b3.docs);
        for c in 0..3 {
            assert_eq!(
                b.labels.as_ref().map(|l| l.iter().filter(|&&x| x == c).count()),
                Some(4)
            );
        }
        Ok(())
    }
}
