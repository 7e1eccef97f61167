//! The bag-of-words baseline of text tasks: TF-IDF features as scikit-learn's
//! `TfidfVectorizer(sublinear_tf=True)` computes them (lowercased tokens of
//! two or more word characters, `1 + ln tf`, smoothed idf
//! `ln((1 + n) / (1 + df)) + 1`, rows scaled to unit L2 norm), with the
//! vocabulary fitted on the training documents only.

use crate::features::Embedded;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};

/// A fitted vocabulary and its idf weights.
#[derive(Debug, Clone)]
pub struct TfIdf {
    vocab: HashMap<String, usize>,
    idf: Vec<f32>,
}

/// Lowercased tokens of two or more word characters (scikit-learn's default `\b\w\w+\b`).
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        if ch.is_alphanumeric() || ch == '_' {
            cur.extend(ch.to_lowercase());
        } else {
            if cur.chars().count() >= 2 {
                out.push(std::mem::take(&mut cur));
            }
            cur.clear();
        }
    }
    if cur.chars().count() >= 2 {
        out.push(cur);
    }
    out
}

impl TfIdf {
    /// Fits the vocabulary (terms in at least `min_df` documents) on `docs`.
    ///
    /// # Errors
    /// No term survives.
    pub fn fit(docs: &[String], min_df: usize) -> Result<Self> {
        let mut df: BTreeMap<String, usize> = BTreeMap::new();
        for d in docs {
            let mut w = words(d);
            w.sort_unstable();
            w.dedup();
            for t in w {
                *df.entry(t).or_default() += 1;
            }
        }
        let n = docs.len() as f64;
        let mut vocab = HashMap::new();
        let mut idf = Vec::new();
        for (t, c) in df.into_iter().filter(|(_, c)| *c >= min_df.max(1)) {
            vocab.insert(t, idf.len());
            idf.push((((1.0 + n) / (1.0 + c as f64)).ln() + 1.0) as f32);
        }
        if idf.is_empty() {
            return Err(Error::Invalid(
                "TF-IDF: no term occurs in enough training documents".into(),
            ));
        }
        Ok(Self { vocab, idf })
    }

    /// Terms in the vocabulary (the feature dimension).
    pub fn dim(&self) -> usize {
        self.idf.len()
    }

    /// Dense TF-IDF rows of `docs` with their labels.
    ///
    /// # Errors
    /// Mismatched labels.
    pub fn transform(&self, docs: &[String], labels: &[u32]) -> Result<Embedded> {
        let d = self.dim();
        let mut x = vec![0f32; docs.len() * d];
        for (row, doc) in x.chunks_mut(d).zip(docs) {
            let mut tf: HashMap<usize, u32> = HashMap::new();
            for w in words(doc) {
                if let Some(&j) = self.vocab.get(&w) {
                    *tf.entry(j).or_default() += 1;
                }
            }
            for (j, c) in tf {
                row[j] = (1.0 + (c as f32).ln()) * self.idf[j];
            }
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|v| *v /= norm);
            }
        }
        Embedded::new(x, d, labels.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_hand_computation() -> Result<()> {
        // two documents; "the" occurs in both, "cat" twice in the first
        let docs = vec!["The cat, the CAT!".to_string(), "the dog a".to_string()];
        assert_eq!(words(&docs[0]), vec!["the", "cat", "the", "cat"]);
        let t = TfIdf::fit(&docs, 1)?;
        assert_eq!(t.dim(), 3, "cat, dog, the ('a' is too short)");
        let e = t.transform(&docs, &[0, 1])?;
        // vocabulary sorted: cat, dog, the
        let idf_rare = (3f32 / 2.0).ln() + 1.0;
        let idf_the = 1.0f32;
        let cat = (1.0 + 2f32.ln()) * idf_rare;
        let the = (1.0 + 2f32.ln()) * idf_the;
        let n = (cat * cat + the * the).sqrt();
        let r = e.row(0);
        assert!(
            (r[0] - cat / n).abs() < 1e-6 && r[1] == 0.0 && (r[2] - the / n).abs() < 1e-6,
            "{r:?}"
        );
        let r = e.row(1);
        let n = (idf_rare * idf_rare + 1.0).sqrt();
        assert!(
            (r[1] - idf_rare / n).abs() < 1e-6 && (r[2] - 1.0 / n).abs() < 1e-6,
            "{r:?}"
        );
        // min_df drops rare terms
        assert_eq!(TfIdf::fit(&docs, 2)?.dim(), 1);
        assert!(TfIdf::fit(&docs, 3).is_err());
        Ok(())
    }
}
