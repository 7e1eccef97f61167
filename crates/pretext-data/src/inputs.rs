//! What the commands that use a trained model (`embed`, `finetune`,
//! `predict`) need of a dataset, whatever its modality: its size, the name
//! of each record, optional labels and class names, and subsets.

use crate::dataset::{ImageDataset, TextDataset};

/// A dataset of records (images or documents) a model reads.
pub trait Inputs: Clone + Send + Sync {
    /// Number of records.
    fn count(&self) -> usize;
    /// The name of record `i`: its path inside an image folder, else its row number.
    fn id(&self, i: usize) -> String;
    /// One label per record, if the data has them.
    fn labels(&self) -> Option<&[u32]>;
    /// Class names by label (may be shorter than the labels need: then the
    /// label value names the class).
    fn classes(&self) -> &[String];
    /// The records at `indices`, in that order.
    fn subset(&self, indices: &[usize]) -> Self;

    /// The name of class `label`.
    fn class_name(&self, label: u32) -> String {
        self.classes()
            .get(label as usize)
            .cloned()
            .unwrap_or_else(|| label.to_string())
    }
}

impl Inputs for ImageDataset {
    fn count(&self) -> usize {
        self.len()
    }
    fn id(&self, i: usize) -> String {
        ImageDataset::id(self, i)
    }
    fn labels(&self) -> Option<&[u32]> {
        self.labels.as_deref()
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn subset(&self, indices: &[usize]) -> Self {
        self.select(indices)
    }
}

impl Inputs for TextDataset {
    fn count(&self) -> usize {
        self.len()
    }
    fn id(&self, i: usize) -> String {
        i.to_string()
    }
    fn labels(&self) -> Option<&[u32]> {
        self.labels.as_deref()
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn subset(&self, indices: &[usize]) -> Self {
        self.select(indices)
    }
}
