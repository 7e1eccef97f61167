//! Features with labels, as the evaluators take them.

use crate::{Error, Result};

/// `n` feature vectors of size `d` (row-major) with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// Features, `n × d`, row-major.
    pub features: Vec<f32>,
    /// Feature size.
    pub dim: usize,
    /// One label per row.
    pub labels: Vec<u32>,
}

impl Embedded {
    /// Wraps features and labels.
    ///
    /// # Errors
    /// [`Error::Invalid`] when sizes disagree or there are no rows.
    pub fn new(features: Vec<f32>, dim: usize, labels: Vec<u32>) -> Result<Self> {
        if dim == 0 || features.len() != labels.len() * dim || labels.is_empty() {
            return Err(Error::Invalid(format!(
                "{} features of size {dim} do not fit {} labels",
                features.len(),
                labels.len()
            )));
        }
        Ok(Self { features, dim, labels })
    }

    /// Rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// Number of classes (max label + 1).
    pub fn num_classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |m| *m as usize + 1)
    }

    /// The rows at `indices`.
    pub fn select(&self, indices: &[usize]) -> Embedded {
        let mut f = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            f.extend_from_slice(self.row(i));
        }
        Embedded {
            features: f,
            dim: self.dim,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// Raw pixels of an image dataset as features, scaled to [0, 1].
    ///
    /// # Errors
    /// [`Error::Invalid`] when the dataset has no labels.
    pub fn from_pixels(ds: &pretext_data::ImageDataset) -> Result<Self> {
        let labels = ds
            .labels
            .clone()
            .ok_or_else(|| Error::Invalid("the dataset has no labels".into()))?;
        let features = ds.pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
        Self::new(features, ds.image_len(), labels)
    }
}
