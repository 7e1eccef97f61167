//! The image half of [`crate::downstream`], shared by every paradigm whose
//! model is an [`ImageEncoder`] (SimCLR / MoCo, the VAE): reading images,
//! features, pixel baselines, training and storing a classifier as the
//! encoder's export tensors plus PyTorch's `fc.weight` / `fc.bias` (timm's
//! `head.*` for a Vision Transformer).

use crate::downstream::ClassifierInputs;
use crate::features::ImageEncoder;
use crate::finetune::{ClassifierData, FineTuneConfig, FineTuneResult, ImageView, LinearHead};
use crate::{Embedded, LinearProbeConfig, RunError, RunResult};
use candle_core::{Device, Tensor};
use pretext_core::trainer::Observer;
use pretext_data::source::ImageFormat;
use pretext_data::{ImageDataset, Labelled};
use std::collections::HashMap;
use std::path::Path;

/// How a paradigm's images are read.
#[derive(Debug, Clone, Copy)]
pub struct ImageReading {
    /// The format (`auto` detects).
    pub format: ImageFormat,
    /// Side of the square images the encoder takes.
    pub size: usize,
    /// Channels the encoder takes.
    pub channels: usize,
}

fn check_channels(found: usize, expected: usize, path: &Path) -> RunResult<()> {
    if found != expected {
        return Err(RunError::Config {
            key: "data.channels".into(),
            reason: format!(
                "the encoder takes {expected} channel(s), but {} has {found}: give it images with {expected}",
                path.display()
            ),
        });
    }
    Ok(())
}

/// Every image at `path` (both splits where it has two), labels optional.
///
/// # Errors
/// Reader errors naming the file; another channel count than the encoder's.
pub fn read_inputs(path: &Path, how: &ImageReading) -> RunResult<ImageDataset> {
    let splits = pretext_data::source::load_images(path, how.format, (how.size, how.size), how.channels)?;
    let all = splits.into_all();
    check_channels(all.channels, how.channels, path)?;
    Ok(all)
}

/// Labelled images at `path`, split for transfer.
///
/// # Errors
/// Reader errors; unlabelled images; a single class; another channel count.
pub fn read_labelled(path: &Path, how: &ImageReading, seed: u64) -> RunResult<Labelled<ImageDataset>> {
    let l = pretext_data::labelled::load_labelled_images(path, how.format, how.size, how.channels, seed)?;
    check_channels(l.train.channels, how.channels, path)?;
    Ok(l)
}

/// The probe's features of every image of `ds`.
///
/// # Errors
/// Tensor errors.
pub fn features(
    encoder: &dyn ImageEncoder,
    ds: &ImageDataset,
    view: &ImageView<'_>,
    device: &Device,
    observer: &mut dyn Observer,
) -> RunResult<(Vec<f32>, usize)> {
    let idx: Vec<usize> = (0..ds.len()).collect();
    let f = crate::encode_images(
        encoder, ds, &idx, view.mean, view.std, view.size, device, observer, "features",
    )?;
    Ok((f, encoder.feature_dim()))
}

/// Pixels in [0, 1] of `train` and `test`.
///
/// # Errors
/// Unlabelled images.
pub fn raw_features(train: &ImageDataset, test: &ImageDataset) -> RunResult<(Embedded, Embedded)> {
    Ok((Embedded::from_pixels(train)?, Embedded::from_pixels(test)?))
}

/// Trains `encoder` + a linear head on `data` (frozen: a linear layer on
/// the frozen features, the linear probe's recipe), with `ft`.
///
/// # Errors
/// Tensor errors, divergence.
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    encoder: &dyn ImageEncoder,
    data: &ClassifierInputs<'_, ImageDataset>,
    view: &ImageView<'_>,
    ft: &FineTuneConfig,
    frozen: bool,
    seed: u64,
    device: &Device,
    observer: &mut dyn Observer,
) -> RunResult<(FineTuneResult, LinearHead)> {
    let d = ClassifierData {
        train: data.train,
        validation: data.validation,
        test: data.test,
        classes: data.classes.len(),
    };
    let t = if frozen {
        let probe = LinearProbeConfig {
            seed,
            ..Default::default()
        };
        crate::linear_classifier(encoder, &d, view, &probe, device, observer)?
    } else {
        crate::train_classifier(encoder, &d, view, ft, seed, device, observer)?
    };
    Ok((t.result, t.head))
}

/// The names of the classification layer's weight and bias
/// (`fc.weight`, `fc.bias` for torchvision's ResNets).
fn head_names(encoder: &dyn ImageEncoder) -> (String, String) {
    let layer = encoder.classifier_layer();
    (format!("{layer}.weight"), format!("{layer}.bias"))
}

/// The classifier's tensors: the encoder's state under its export names,
/// then the classification layer's (`fc.weight` and `fc.bias`, or the
/// encoder's [`ImageEncoder::classifier_layer`]), sorted by name.
///
/// # Errors
/// Tensor errors.
pub fn classifier_tensors(encoder: &dyn ImageEncoder, head: &LinearHead) -> RunResult<Vec<(String, Tensor)>> {
    let mut t: Vec<(String, Tensor)> = encoder
        .state()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let (w, b) = head.tensors(&Device::Cpu)?;
    let (wn, bn) = head_names(encoder);
    t.push((wn, w));
    t.push((bn, b));
    t.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(t)
}

/// Loads `dir/model.safetensors` into `encoder` (its state, by export
/// names) and returns the head; every tensor must be there with its shape
/// and a floating-point dtype (integer counters stay integers), and none
/// may be left over.
///
/// # Errors
/// Missing, unexpected or mis-shaped tensors, named with the file.
pub fn load_classifier(encoder: &dyn ImageEncoder, dir: &Path, device: &Device) -> RunResult<LinearHead> {
    let path = dir.join("model.safetensors");
    let (found, _) = pretext_core::checkpoint::read_safetensors(&path, device)?;
    let state = encoder.state();
    let mut expected: Vec<(String, Tensor)> = state.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let (fc_weight, fc_bias) = head_names(encoder);
    let w = found.get(&fc_weight);
    let head_shape = w.map(|w| w.dims().to_vec()).unwrap_or_default();
    let (c, d) = match head_shape.as_slice() {
        [c, d] => (*c, *d),
        _ => (0, encoder.feature_dim()),
    };
    if d != encoder.feature_dim() {
        return Err(RunError::Core(pretext_core::Error::Shape {
            path,
            name: fc_weight.clone(),
            expected: format!("[classes, {}]", encoder.feature_dim()),
            found: format!("{head_shape:?}"),
        }));
    }
    expected.push((
        fc_weight.clone(),
        Tensor::zeros((c.max(1), d), candle_core::DType::F32, device)?,
    ));
    expected.push((
        fc_bias.clone(),
        Tensor::zeros(c.max(1), candle_core::DType::F32, device)?,
    ));
    let matched = pretext_core::checkpoint::match_tensors(&path, &expected, &found)?;
    let by_name: HashMap<String, Tensor> = matched.into_iter().collect();
    for (name, var) in &state {
        if let Some(t) = by_name.get(name) {
            var.set(t)?;
        }
    }
    let (Some(w), Some(b)) = (by_name.get(&fc_weight), by_name.get(&fc_bias)) else {
        return Err(RunError::Eval(format!("{}: no classification head", path.display())));
    };
    Ok(LinearHead::from_tensors(w, b)?)
}

/// Class probabilities of every image of `ds`.
///
/// # Errors
/// Tensor errors.
pub fn predict(
    encoder: &dyn ImageEncoder,
    head: &LinearHead,
    ds: &ImageDataset,
    view: &ImageView<'_>,
    device: &Device,
    observer: &mut dyn Observer,
) -> RunResult<Vec<f32>> {
    Ok(crate::classify_images(encoder, head, ds, view, device, observer)?)
}

/// The model card's "load it in Python" section: `module_py` defines
/// `model`, whose `forward` returns logits through its classification layer; the
/// state is loaded strictly and one image classified.
pub fn python_usage(module_py: &str, view: &ImageView<'_>, channels: usize) -> String {
    format!(
        "## Load it in Python\n\n```python\nimport json\nimport torch\nfrom safetensors.torch import load_file\n\nstate = load_file(\"model.safetensors\")\nclasses = json.load(open(\"config.json\"))[\"pretext\"][\"classes\"]\n\n{module_py}\
model.load_state_dict(state)  # strict: every tensor has its place\nmodel.eval()\n\n\
# inputs: {channels} channel(s), {s}x{s}, pixels in [0, 1] normalised with mean {mean:?} and std {std:?}, NCHW\n\
x = torch.rand(1, {channels}, {s}, {s})\nprobabilities = model(x).softmax(-1)\nprint(classes[int(probabilities.argmax())])\n```\n",
        s = view.size,
        mean = view.mean,
        std = view.std,
    )
}
