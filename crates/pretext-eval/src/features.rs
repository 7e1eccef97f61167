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

/// An image encoder that evaluation can run and train: frozen for feature
/// extraction (linear probe, kNN), end to end for fine-tuning.
///
/// Implemented by each paradigm's model; this crate never needs to know how
/// the encoder was pretrained.
pub trait ImageEncoder {
    /// Images `(n, c, h, w)` (normalised, NCHW) → features `(n, feature_dim)`.
    /// `train` selects training-mode normalisation (batch statistics, running
    /// statistics updated) over evaluation mode.
    ///
    /// # Errors
    /// Shapes that do not fit.
    fn encode(&self, images: &candle_core::Tensor, train: bool) -> candle_core::Result<candle_core::Tensor>;

    /// Size of a feature vector.
    fn feature_dim(&self) -> usize;

    /// The parameters that fine-tuning trains, by name.
    fn trainable(&self) -> Vec<(String, candle_core::Var)>;

    /// Everything a classifier keeps of the encoder (weights and
    /// normalisation statistics), by the names of the paradigm's export (the
    /// PyTorch module's): what fine-tuning snapshots for early stopping, and
    /// what a classifier folder stores and loads.
    fn state(&self) -> Vec<(String, candle_core::Var)>;

    /// The name of the classification layer the PyTorch module puts on
    /// these features: `fc` (torchvision's ResNets, the default) or `head`
    /// (timm's Vision Transformers). A classifier stores `NAME.weight` and
    /// `NAME.bias`.
    fn classifier_layer(&self) -> &'static str {
        "fc"
    }
}

/// Rows per forward pass in [`extract_features`].
pub const EXTRACT_CHUNK: usize = 500;

/// Frozen features of `ds[indices]`: eval mode, no augmentation (resize to
/// `size` and normalise with `mean`/`std`), batched, no autograd graph kept.
/// Reports progress to `observer` as task `task`.
///
/// # Errors
/// [`Error::Invalid`] for unlabelled data; tensor errors.
#[allow(clippy::too_many_arguments)]
pub fn extract_features(
    encoder: &dyn ImageEncoder,
    ds: &pretext_data::ImageDataset,
    indices: &[usize],
    mean: &[f32],
    std: &[f32],
    size: usize,
    device: &candle_core::Device,
    observer: &mut dyn pretext_core::trainer::Observer,
    task: &str,
) -> Result<Embedded> {
    let labels = ds
        .labels
        .as_ref()
        .ok_or_else(|| Error::Invalid("feature extraction for evaluation needs labelled data".into()))?;
    let feats = encode_images(encoder, ds, indices, mean, std, size, device, observer, task)?;
    Embedded::new(
        feats,
        encoder.feature_dim(),
        indices.iter().map(|&i| labels[i]).collect(),
    )
}

/// As [`extract_features`] for images with or without labels: the features
/// of `ds[indices]`, `indices.len() × feature_dim`, row-major.
///
/// # Errors
/// Tensor errors.
#[allow(clippy::too_many_arguments)]
pub fn encode_images(
    encoder: &dyn ImageEncoder,
    ds: &pretext_data::ImageDataset,
    indices: &[usize],
    mean: &[f32],
    std: &[f32],
    size: usize,
    device: &candle_core::Device,
    observer: &mut dyn pretext_core::trainer::Observer,
    task: &str,
) -> Result<Vec<f32>> {
    let plain = eval_pipeline(mean, std, size)?;
    let per = ds.channels * size * size;
    let total = indices.len() as u64;
    let mut feats = Vec::with_capacity(indices.len() * encoder.feature_dim());
    observer.on_progress(task, 0, total);
    let mut done = 0u64;
    for chunk in indices.chunks(EXTRACT_CHUNK) {
        let x = eval_batch(&plain, ds, chunk, per, size, device)?;
        let h = encoder.encode(&x, false).map_err(core_err)?.detach();
        feats.extend(h.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(core_err)?);
        done += chunk.len() as u64;
        observer.on_progress(task, done, total);
    }
    Ok(feats)
}

/// The evaluation transform: resize only, then normalise.
///
/// # Errors
/// Normalisation that does not fit the channels.
pub fn eval_pipeline(mean: &[f32], std: &[f32], size: usize) -> Result<pretext_data::Pipeline> {
    Ok(pretext_data::Pipeline::new(
        pretext_data::AugmentConfig::none(mean.to_vec(), std.to_vec()),
        size,
        size,
    )
    .map_err(pretext_core::Error::from)?)
}

/// Images `ds[chunk]` through `plain` as one `(n, c, size, size)` tensor
/// (`per` = values per image).
///
/// # Errors
/// Tensor errors.
pub fn eval_batch(
    plain: &pretext_data::Pipeline,
    ds: &pretext_data::ImageDataset,
    chunk: &[usize],
    per: usize,
    size: usize,
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    let mut buf = vec![0f32; chunk.len() * per];
    // the eval pipeline draws nothing; the generator only fills the signature
    let mut rng = pretext_core::seed::stream_rng(0, pretext_core::seed::EVAL, &[]);
    for (out, &i) in buf.chunks_mut(per).zip(chunk) {
        plain.view_into(ds.image(i), ds.height, ds.width, ds.channels, &mut rng, out);
    }
    candle_core::Tensor::from_vec(buf, (chunk.len(), ds.channels, size, size), device).map_err(core_err)
}

pub(crate) fn core_err(e: candle_core::Error) -> Error {
    Error::Core(pretext_core::Error::from(e))
}
