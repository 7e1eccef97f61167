//! The text the model learns from and, where the corpus is labelled, the
//! task it is probed on.
//!
//! By default both come from the shipped fortunes: the probe task is the
//! entries of 8 categories (computers, science, politics, love, food, sports,
//! law, medicine), exact duplicates dropped, split 80/20 per class under the
//! seed; the pretraining corpus is every fortune entry **except the probe's
//! test entries** (so no test text is seen in pretraining), of which a seeded
//! 5% is held out for masked-token accuracy. An unlabelled corpus (plain
//! text, a table without a label field) is all pretraining text, and has no
//! probe task of its own: `probe --data` gives it one.

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

/// Pretraining text and the labelled probe task, if the corpus has labels.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Documents to pretrain on.
    pub train: Vec<String>,
    /// Held-out documents for masked-token accuracy and perplexity.
    pub held_out: Vec<String>,
    /// The probe task of a labelled corpus.
    pub probe: Option<ProbeTask>,
}

/// The labelled task a corpus with labels is probed on.
#[derive(Debug, Clone)]
pub struct ProbeTask {
    /// Labelled training documents (subsets are drawn from them).
    pub train: TextDataset,
    /// Labelled test documents (never in the corpus's `train` or `held_out`).
    pub test: TextDataset,
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
    let (train, test) = pretext_data::subset::stratified_split(labels, test_fraction, seed)
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok((ds.select(&train), ds.select(&test)))
}

/// Builds the corpus from `all` (every document, labelled with its category
/// where known) and, for a labelled corpus, the probe task from the
/// documents of `categories` (all labels when `None`).
///
/// # Errors
/// Unknown categories, too few documents.
pub fn build(all: &TextDataset, categories: Option<&[String]>, held_out_fraction: f64, seed: u64) -> Result<Corpus> {
    let probe = match &all.labels {
        Some(labels) => Some(probe_task(all, labels, categories, seed)?),
        None => None,
    };
    let test_text: HashSet<&str> = probe
        .iter()
        .flat_map(|p| p.test.docs.iter().map(String::as_str))
        .collect();
    let pre: Vec<&String> = all.docs.iter().filter(|d| !test_text.contains(d.as_str())).collect();
    if pre.len() < 2 {
        return Err(Error::Data(format!(
            "only {} documents left for pretraining (at least 2 are needed: one to train on, one held out)",
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
        probe,
    })
}

/// The probe task of a labelled corpus: the documents of `categories` (all
/// when `None`), deduplicated, split 80/20 per class.
fn probe_task(all: &TextDataset, labels: &[u32], categories: Option<&[String]>, seed: u64) -> Result<ProbeTask> {
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
                splits: None,
            }
        }
        None => all.clone(),
    };
    let (train, test) = stratified_split(&dedup(&task), 0.2, seed)?;
    Ok(ProbeTask { train, test })
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
            splits: None,
        }
    }

    #[test]
    fn an_unlabelled_corpus_is_all_pretraining_text() -> Result<()> {
        let all = TextDataset { labels: None, ..ds() };
        let c = build(&all, None, 0.1, 0)?;
        assert!(c.probe.is_none());
        assert_eq!(c.train.len() + c.held_out.len(), 61);
        assert_eq!(c.held_out.len(), 6);
        let one = TextDataset {
            docs: vec!["alone".into()],
            ..Default::default()
        };
        let e = build(&one, None, 0.1, 0).expect_err("one document");
        assert!(e.to_string().contains("only 1 documents left"), "{e}");
        Ok(())
    }

    #[test]
    fn probe_test_text_never_reaches_pretraining() -> Result<()> {
        let c = build(&ds(), Some(&["c".to_string(), "a".to_string()]), 0.1, 0)?;
        let p = c.probe.as_ref().expect("a labelled corpus has a probe task");
        assert_eq!(p.test.len(), 8, "20% of 20 per class, two classes");
        assert_eq!(p.train.len(), 32);
        assert_eq!(p.test.classes, vec!["c".to_string(), "a".to_string()]);
        let test: HashSet<&String> = p.test.docs.iter().collect();
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
