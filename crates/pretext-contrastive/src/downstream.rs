//! `embed`, `finetune` and `predict` for SimCLR / MoCo encoders (the flows
//! are [`pretext_eval::downstream`]'s): a classifier is the encoder under
//! torchvision's names plus `fc.weight` / `fc.bias`, so a ResNet-18 one
//! loads strictly into `torchvision.models.resnet18(num_classes=K)`; a ViT
//! one is timm's names plus `head.weight` / `head.bias`, for
//! `timm.create_model(…, num_classes=K)`.

use crate::app::Contrastive;
use crate::config::ContrastiveConfig;
use crate::encoder::Arch;
use crate::model::ContrastiveModel;
use candle_core::Device;
use pretext_core::trainer::Observer;
use pretext_data::{ImageDataset, Labelled};
use pretext_eval::downstream::{ClassifierFiles, ClassifierInputs, Downstream};
use pretext_eval::finetune::{FineTuneResult, ImageView, LinearHead};
use pretext_eval::image_downstream::{self as images, ImageReading};
use pretext_eval::{Embedded, ImageEncoder, RunResult};
use std::path::Path;

fn reading(cfg: &ContrastiveConfig) -> ImageReading {
    ImageReading {
        format: cfg.data.format,
        size: cfg.data.image_size,
        channels: cfg.data.channels,
    }
}

fn view(cfg: &ContrastiveConfig) -> ImageView<'_> {
    ImageView {
        mean: &cfg.data.augment.mean,
        std: &cfg.data.augment.std,
        size: cfg.data.image_size,
    }
}

/// PyTorch source defining `model` (this encoder with an `fc` of `classes` outputs).
fn module_py(cfg: &ContrastiveConfig, feature_dim: usize, classes: usize) -> String {
    let enc = &cfg.model.encoder;
    match enc.arch {
        Arch::SmallResnet => {
            let stages: Vec<[usize; 3]> = enc.stages().into_iter().map(|(w, s, n)| [w, s, n]).collect();
            format!(
                "{}model.fc = torch.nn.Linear({feature_dim}, {classes})\n",
                crate::export::small_resnet_py(enc.in_channels, &stages)
            )
        }
        arch => match enc.vit(cfg.data.image_size) {
            Some((size, dims)) => pretext_vit::timm_py(size, &dims, classes),
            None => crate::export::torchvision_resnet_py(
                arch,
                enc.in_channels,
                &format!("torch.nn.Linear({feature_dim}, {classes})"),
            ),
        },
    }
}

impl Downstream for Contrastive {
    type Inputs = ImageDataset;
    type Classifier = (ContrastiveModel, LinearHead);
    const TASK: &'static str = "image-classification";

    fn read_inputs(cfg: &ContrastiveConfig, path: &Path) -> RunResult<ImageDataset> {
        images::read_inputs(path, &reading(cfg))
    }

    fn read_labelled(cfg: &ContrastiveConfig, path: &Path) -> RunResult<Labelled<ImageDataset>> {
        images::read_labelled(path, &reading(cfg), cfg.train.seed)
    }

    fn features(
        cfg: &ContrastiveConfig,
        model: &ContrastiveModel,
        _: &(),
        inputs: &ImageDataset,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<(Vec<f32>, usize)> {
        images::features(model, inputs, &view(cfg), device, observer)
    }

    fn raw_features(
        _: &ContrastiveConfig,
        train: &ImageDataset,
        test: &ImageDataset,
    ) -> RunResult<(Embedded, Embedded)> {
        images::raw_features(train, test)
    }

    fn finetune(
        cfg: &ContrastiveConfig,
        model: &ContrastiveModel,
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
        let enc = &cfg.model.encoder;
        let classes = data.classes.len();
        let architecture = match enc.arch {
            Arch::SmallResnet => "small-resnet",
            Arch::VitTiny | Arch::VitSmall => "vit",
            Arch::Resnet18 | Arch::Resnet18Cifar => "resnet18",
        }
        .to_string();
        let vit = enc
            .vit(cfg.data.image_size)
            .map(|(_, dims)| pretext_vit::VitShape::from(&dims));
        let config = serde_json::json!({
            "architecture": enc.arch.name(),
            "in_channels": enc.in_channels,
            "stages": enc.stages().into_iter().map(|(w, s, n)| [w, s, n]).collect::<Vec<_>>(),
            "vit": vit,
            "feature_dim": model.feature_dim(),
            "num_classes": classes,
            "id2label": pretext_eval::downstream::id2label(data.classes),
            "image_size": cfg.data.image_size,
            "mean": cfg.data.augment.mean,
            "std": cfg.data.augment.std,
        });
        let files = ClassifierFiles {
            tensors: images::classifier_tensors(model, &head)?,
            config,
            files: vec![],
            python: images::python_usage(&module_py(cfg, model.feature_dim(), classes), &v, enc.in_channels),
            architecture,
        };
        Ok((result, files))
    }

    fn load_classifier(cfg: &ContrastiveConfig, dir: &Path, device: &Device) -> RunResult<Self::Classifier> {
        let model = crate::app::new_model(cfg, device)?;
        let head = images::load_classifier(&model, dir, device)?;
        Ok((model, head))
    }

    fn predict(
        cfg: &ContrastiveConfig,
        (model, head): &Self::Classifier,
        inputs: &ImageDataset,
        device: &Device,
        observer: &mut dyn Observer,
    ) -> RunResult<Vec<f32>> {
        images::predict(model, head, inputs, &view(cfg), device, observer)
    }
}
