//! `embed`, `finetune` and `predict` for the VAE and the MAE (the flows are
//! [`pretext_eval::downstream`]'s): the VAE's features are the posterior
//! means μ, and a classifier is its encoder (`enc.*`, `enc_fc.*`, `mu.*`,
//! `logvar.*`, the export's names) plus `fc.weight` / `fc.bias` on μ; the
//! MAE's features are the class token of its ViT encoder, and a classifier
//! is timm's `VisionTransformer` (its names plus `head.*`).

use crate::app::Generative;
use crate::config::GenerativeConfig;
use crate::method::GenerativeModel;
use crate::model::VaeArch;
use candle_core::Device;
use pretext_core::trainer::Observer;
use pretext_data::{ImageDataset, Labelled};
use pretext_eval::downstream::{ClassifierFiles, ClassifierInputs, Downstream};
use pretext_eval::finetune::{FineTuneResult, ImageView, LinearHead};
use pretext_eval::image_downstream::{self as images, ImageReading};
use pretext_eval::{Embedded, RunResult};
use std::path::Path;

fn reading(cfg: &GenerativeConfig) -> ImageReading {
    ImageReading {
        format: cfg.data.format,
        size: cfg.data.image_size,
        channels: cfg.data.channels,
    }
}

/// The VAE sees intensities in [0, 1], unnormalised.
fn view(cfg: &GenerativeConfig) -> ImageView<'_> {
    ImageView {
        mean: &[],
        std: &[],
        size: cfg.data.image_size,
    }
}

/// PyTorch source defining `model`: the VAE's encoder and a linear layer on
/// μ, or the MAE's encoder as timm's ViT with a `head`.
fn module_py(cfg: &GenerativeConfig, model: &GenerativeModel, classes: usize) -> String {
    if let Some(mae) = model.mae() {
        return pretext_vit::timm_py(mae.config().arch, mae.encoder().dims(), classes);
    }
    let m = &cfg.model;
    let (c, s) = (cfg.data.channels, cfg.data.image_size);
    let tuple = |v: &[usize]| {
        if v.is_empty() {
            "()".to_string()
        } else {
            format!(
                "({},)",
                v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            )
        }
    };
    let trunk = match m.arch {
        VaeArch::Mlp => format!(
            "        layers, d = [], {d}\n        for h in {hidden}:\n            layers += [nn.Linear(d, h), nn.ReLU()]\n            d = h\n        self.enc = nn.Sequential(*layers)\n",
            d = c * s * s,
            hidden = tuple(&m.hidden),
        ),
        VaeArch::Conv => format!(
            "        self.enc = nn.Sequential(nn.Conv2d({c}, {c1}, 4, 2, 1), nn.ReLU(), nn.Conv2d({c1}, {c2}, 4, 2, 1), nn.ReLU())\n        layers, d = [], {c2} * ({s} // 4) ** 2\n        for h in {fc}:\n            layers += [nn.Linear(d, h), nn.ReLU()]\n            d = h\n        self.enc_fc = nn.Sequential(*layers)\n",
            c1 = m.channels[0],
            c2 = m.channels[1],
            fc = tuple(&m.enc_fc),
        ),
    };
    let forward = match m.arch {
        VaeArch::Mlp => "self.enc(x.flatten(1))",
        VaeArch::Conv => "self.enc_fc(self.enc(x).flatten(1))",
    };
    format!(
        "import torch.nn as nn\n\nclass VaeClassifier(nn.Module):  # the VAE's encoder; classes from the posterior mean\n    def __init__(self):\n        super().__init__()\n{trunk}        self.mu = nn.Linear(d, {z})\n        self.logvar = nn.Linear(d, {z})\n        self.fc = nn.Linear({z}, {classes})\n\n    def forward(self, x):  # x: (n, {c}, {s}, {s}) in [0, 1]\n        return self.fc(self.mu({forward}))\n\nmodel = VaeClassifier()\n",
        z = m.latent,
    )
}

impl Downstream for Generative {
    type Inputs = ImageDataset;
    type Classifier = (GenerativeModel, LinearHead);
    const TASK: &'static str = "image-classification";

    fn read_inputs(cfg: &GenerativeConfig, path: &Path) -> RunResult<ImageDataset> {
        images::read_inputs(path, &reading(cfg))
    }

    fn read_labelled(cfg: &GenerativeConfig, path: &Path) -> RunResult<Labelled<ImageDataset>> {
        images::read_labelled(path, &reading(cfg), cfg.train.seed)
    }

    fn features(
        cfg: &GenerativeConfig,
        model: &GenerativeModel,
        _: &(),
        inputs: &ImageDataset,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<(Vec<f32>, usize)> {
        images::features(model, inputs, &view(cfg), device, observer)
    }

    fn raw_features(
        _: &GenerativeConfig,
        train: &ImageDataset,
        test: &ImageDataset,
    ) -> RunResult<(Embedded, Embedded)> {
        images::raw_features(train, test)
    }

    fn finetune(
        cfg: &GenerativeConfig,
        model: &GenerativeModel,
        _: &(),
        data: &ClassifierInputs<'_, ImageDataset>,
        frozen: bool,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<(FineTuneResult, ClassifierFiles)> {
        let v = view(cfg);
        let (result, head) = images::finetune(
            model,
            data,
            &v,
            &cfg.eval.finetune,
            frozen,
            cfg.train.seed,
            device,
            observer,
        )?;
        let classes = data.classes.len();
        let config = if let Some(mae) = model.mae() {
            let d = mae.encoder().dims();
            serde_json::json!({
                "architecture": mae.config().arch.name(),
                "vit": pretext_vit::VitShape::from(d),
                "feature_dim": d.embed_dim,
                "in_channels": cfg.data.channels,
                "image_size": cfg.data.image_size,
                "inputs": "intensities in [0, 1], NCHW",
                "num_classes": classes,
                "id2label": pretext_eval::downstream::id2label(data.classes),
            })
        } else {
            serde_json::json!({
            "architecture": match cfg.model.arch { VaeArch::Mlp => "vae-mlp-encoder", VaeArch::Conv => "vae-conv-encoder" },
            "latent": cfg.model.latent,
            "hidden": cfg.model.hidden,
            "channels": cfg.model.channels,
            "enc_fc": cfg.model.enc_fc,
            "in_channels": cfg.data.channels,
            "image_size": cfg.data.image_size,
            "inputs": "intensities in [0, 1], NCHW",
            "num_classes": classes,
            "id2label": pretext_eval::downstream::id2label(data.classes),
            })
        };
        let files = ClassifierFiles {
            tensors: images::classifier_tensors(model, &head)?,
            config,
            files: vec![],
            python: images::python_usage(&module_py(cfg, model, classes), &v, cfg.data.channels),
            architecture: if model.mae().is_some() { "vit" } else { "VAE encoder" }.into(),
        };
        Ok((result, files))
    }

    fn load_classifier(cfg: &GenerativeConfig, dir: &Path, device: &Device) -> RunResult<Self::Classifier> {
        let model = crate::app::new_model(cfg, device)?;
        let head = images::load_classifier(&model, dir, device)?;
        Ok((model, head))
    }

    fn predict(
        cfg: &GenerativeConfig,
        (model, head): &Self::Classifier,
        inputs: &ImageDataset,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<Vec<f32>> {
        images::predict(model, head, inputs, &view(cfg), device, observer)
    }
}
