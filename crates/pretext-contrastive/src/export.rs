//! `export`: the backbone of a trained run, ready for the Hub and for
//! PyTorch: `export/model.safetensors` (encoder only, names as the PyTorch
//! module: torchvision's `resnet18`, the reference's `SmallResNet` or
//! timm's `VisionTransformer`),
//! `export/config.json` and `export/README.md` (a model card with YAML
//! metadata and the probe's figures when `report/eval.json` exists).

use crate::app::Contrastive;
use crate::config::ContrastiveConfig;
use crate::encoder::Arch;
use crate::error::Result;
use crate::model::ContrastiveModel;
use pretext_core::paradigm::{Paradigm, Trained};
use serde::Serialize;
use std::collections::BTreeMap;

/// The reference's `SmallResNet` in PyTorch, for the model card (`{cin}` and
/// `{stages}` are filled in).
const SMALL_RESNET_PY: &str = r#"import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.short = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self, cin={cin}, stages={stages}):  # (width, stride, blocks) per stage
        super().__init__()
        w0 = stages[0][0]
        self.stem = nn.Sequential(nn.Conv2d(cin, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        blocks, c = [], w0
        for w, s, n in stages:
            stage = []
            for j in range(n):
                stage.append(BasicBlock(c, w, s if j == 0 else 1))
                c = w
            blocks.append(stage[0] if n == 1 else nn.Sequential(*stage))
        self.stages = nn.Sequential(*blocks)

    def forward(self, x):
        features = self.stages(self.stem(x)).mean(dim=(2, 3))
        return self.fc(features) if hasattr(self, "fc") else features


model = SmallResNet()
"#;

/// PyTorch source of the reference's `SmallResNet` with these stages; it
/// defines `model` (features out; logits once it has an `fc` layer).
pub fn small_resnet_py(in_channels: usize, stages: &[[usize; 3]]) -> String {
    let stages = stages.iter().map(|s| (s[0], s[1], s[2])).collect::<Vec<_>>();
    SMALL_RESNET_PY
        .replace("{cin}", &in_channels.to_string())
        .replace("{stages}", &format!("{stages:?}"))
}

/// PyTorch source that defines `model` as torchvision's ResNet-18 with this
/// encoder's stem and `fc` of `head` (`Identity` for the backbone alone).
pub fn torchvision_resnet_py(arch: Arch, in_channels: usize, head: &str) -> String {
    let mut y = String::from("import torchvision\n\nmodel = torchvision.models.resnet18()\n");
    if arch == Arch::Resnet18Cifar {
        y.push_str(&format!(
            "model.conv1 = torch.nn.Conv2d({in_channels}, 64, 3, 1, 1, bias=False)  # CIFAR stem\nmodel.maxpool = torch.nn.Identity()\n"
        ));
    } else if in_channels != 3 {
        y.push_str(&format!(
            "model.conv1 = torch.nn.Conv2d({in_channels}, 64, 7, 2, 3, bias=False)\n"
        ));
    }
    y.push_str(&format!("model.fc = {head}\n"));
    y
}

/// `config.json` of an exported backbone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportConfig {
    /// `small-resnet`, `resnet18-cifar`, `resnet18`, `vit-tiny` or `vit-small`.
    pub architecture: String,
    /// Input channels.
    pub in_channels: usize,
    /// Stage widths, strides and blocks (ResNets).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<[usize; 3]>,
    /// Patch side, blocks, width and heads (ViTs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vit: Option<pretext_vit::VitShape>,
    /// Size of the feature vector (after global average pooling; a ViT's
    /// class token).
    pub feature_dim: usize,
    /// Side of the square training images.
    pub image_size: usize,
    /// Per-channel normalisation applied to inputs in [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
    /// `contrastive`.
    pub paradigm: String,
    /// `simclr` or `moco`.
    pub method: String,
    /// Dataset the encoder was pretrained on.
    pub dataset: String,
    /// Optimizer steps of the checkpoint.
    pub steps: u64,
    /// Library and version that wrote it.
    pub library: String,
}

/// The encoder's tensors (weights and batch-norm buffers) without the
/// `encoder.` prefix, sorted by name.
pub fn backbone_tensors(model: &ContrastiveModel) -> Vec<(String, candle_core::Tensor)> {
    pretext_core::trainer::model_tensors(model)
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix("encoder.").map(|s| (s.to_string(), t)))
        .collect()
}

fn dataset_tag(name: &str) -> &str {
    match name {
        "fashion-mnist" => "fashion_mnist",
        other if other.to_lowercase().contains("cifar") => "cifar10",
        _ => "custom",
    }
}

/// The model card (`README.md`): YAML front matter (library, tags, datasets,
/// probe metrics), then what it is, how it was trained and how to load it.
pub fn model_card(
    cfg: &ContrastiveConfig,
    conf: &ExportConfig,
    report: Option<&pretext_eval::EvalReport>,
    config_toml: &str,
) -> String {
    let mut y = String::from("---\nlibrary_name: pretext\nlicense: mit\ntags:\n- self-supervised\n- contrastive\n");
    y.push_str(&format!(
        "- {}\n- {}\n- image-feature-extraction\n",
        conf.method, conf.architecture
    ));
    y.push_str(&format!(
        "datasets:\n- {}\npipeline_tag: image-feature-extraction\n",
        dataset_tag(&conf.dataset)
    ));
    let linear: Vec<&pretext_eval::EvalRecord> = report
        .map(|r| r.records.iter().filter(|x| x.features == "pretrained").collect())
        .unwrap_or_default();
    if !linear.is_empty() {
        y.push_str("metrics:\n- accuracy\nmodel-index:\n");
        y.push_str(&format!(
            "- name: pretext-{}-{}\n  results:\n",
            conf.method, conf.architecture
        ));
        for r in &linear {
            y.push_str(&format!(
                "  - task:\n      type: image-classification\n      name: {} ({} labels)\n    dataset:\n      type: {}\n      name: {}\n      split: test\n    metrics:\n    - type: accuracy\n      value: {:.4}\n      name: {} accuracy, {} labels\n",
                protocol_name(&r.protocol, cfg),
                pretext_eval::report::fraction_label(r.labels),
                dataset_tag(&conf.dataset),
                conf.dataset,
                r.accuracy,
                protocol_name(&r.protocol, cfg),
                pretext_eval::report::fraction_label(r.labels),
            ));
        }
    }
    y.push_str("---\n\n");
    let method_long = crate::model::MethodKind::parse(&conf.method)
        .map(|m| m.description())
        .unwrap_or(conf.method.as_str());
    y.push_str(&format!(
        "# {} {} encoder pretrained on {}\n\nA {} backbone trained without labels by {method_long} with \
[pretext](https://github.com/pretext-rs/pretext), {} optimizer steps. It maps a {}×{} image with {} channel(s) \
to a {}-dimensional feature vector ({}); use it for linear probes, kNN retrieval or fine-tuning with few labels.\n\n",
        conf.method,
        conf.architecture,
        conf.dataset,
        conf.architecture,
        conf.steps,
        conf.image_size,
        conf.image_size,
        conf.in_channels,
        conf.feature_dim,
        if conf.vit.is_some() {
            "the class token after the final LayerNorm"
        } else {
            "global average pool of the last stage"
        },
    ));
    if let Some(r) = report {
        y.push_str("## Transfer (test accuracy, %)\n\n");
        let md = r.markdown();
        let table: String = md
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .collect::<Vec<_>>()
            .join("\n");
        y.push_str(&table);
        y.push_str(
            "\n\n`pretrained` is this encoder; `random-init` the same architecture untrained; `raw` the input pixels; \
`finetune` from `random-init` is supervised training from scratch with the same budget.\n\n",
        );
    }
    y.push_str(&format!(
        "## Inputs\n\nPixels scaled to [0, 1], then normalised per channel with mean {:?} and std {:?}, \
{}×{}, channels first (NCHW) in PyTorch.\n\n",
        conf.mean, conf.std, conf.image_size, conf.image_size
    ));
    y.push_str("## Load it in Python\n\n```python\nimport torch\nfrom safetensors.torch import load_file\n\nstate = load_file(\"model.safetensors\")\n");
    match cfg.model.encoder.arch {
        arch @ (Arch::Resnet18 | Arch::Resnet18Cifar) => {
            y.push_str(&torchvision_resnet_py(
                arch,
                conf.in_channels,
                "torch.nn.Identity()  # the backbone has no classifier",
            ));
            y.push_str("model.load_state_dict(state)\nmodel.eval()\n");
        }
        Arch::SmallResnet => {
            y.push_str(&small_resnet_py(conf.in_channels, &conf.stages));
            y.push_str("model.load_state_dict(state)\nmodel.eval()\n");
        }
        Arch::VitTiny | Arch::VitSmall => {
            if let Some((size, dims)) = cfg.model.encoder.vit(conf.image_size) {
                y.push_str(&pretext_vit::timm_py(size, &dims, 0));
                y.push_str("model.load_state_dict(state)  # timm's names: cls_token, pos_embed, patch_embed, blocks, norm\nmodel.eval()\n");
            }
        }
    }
    y.push_str(&format!(
        "features = model(torch.rand(1, {c}, {s}, {s}))  # -> (1, {d})\n```\n\n",
        c = conf.in_channels,
        s = conf.image_size,
        d = conf.feature_dim
    ));
    y.push_str("## Load it in pretext\n\nThe run folder's checkpoints resume and probe with `pretext-contrastive resume|probe RUN`; \
`model.safetensors` here is the backbone alone.\n\n## Training configuration\n\n```toml\n");
    y.push_str(config_toml.trim_end());
    y.push_str("\n```\n");
    y
}

fn protocol_name(p: &str, cfg: &ContrastiveConfig) -> String {
    match p {
        "linear" => "linear probe".into(),
        "knn" => format!("kNN (k={}, cosine)", cfg.eval.knn_k),
        "finetune" => "fine-tuning".into(),
        other => other.into(),
    }
}

/// The files of `export/` from a trained run: the backbone
/// (`model.safetensors`, PyTorch names), `config.json` and the model card.
///
/// # Errors
/// Tensor and encoding errors; an unreadable `config.toml`.
pub fn export_files(cfg: &ContrastiveConfig, trained: &Trained<Contrastive>) -> Result<Vec<(String, Vec<u8>)>> {
    let model = &trained.model;
    let conf = ExportConfig {
        architecture: cfg.model.encoder.arch.name().to_string(),
        in_channels: cfg.model.encoder.in_channels,
        stages: cfg
            .model
            .encoder
            .stages()
            .into_iter()
            .map(|(w, s, n)| [w, s, n])
            .collect(),
        vit: cfg
            .model
            .encoder
            .vit(cfg.data.image_size)
            .map(|(_, dims)| pretext_vit::VitShape::from(&dims)),
        feature_dim: model.encoder().out_dim(),
        image_size: cfg.data.image_size,
        mean: cfg.data.augment.mean.clone(),
        std: cfg.data.augment.std.clone(),
        paradigm: Contrastive::NAME.into(),
        method: cfg.method.clone(),
        dataset: Contrastive::dataset_name(cfg),
        steps: trained.step,
        library: format!("pretext {}", env!("CARGO_PKG_VERSION")),
    };
    let report: Option<pretext_eval::EvalReport> =
        std::fs::read(trained.run.root().join("report").join(pretext_eval::report::EVAL_JSON))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    let mut meta: BTreeMap<String, String> = pretext_core::Method::metadata(model);
    meta.insert("pretext.version".into(), env!("CARGO_PKG_VERSION").into());
    meta.insert("pretext.content".into(), "backbone".into());
    let bytes = pretext_core::checkpoint::safetensors_bytes(&backbone_tensors(model), &meta)?;
    let config_json =
        serde_json::to_vec_pretty(&conf).map_err(|e| pretext_core::Error::Config(format!("config.json: {e}")))?;
    let card = model_card(cfg, &conf, report.as_ref(), &trained.run.config_text()?);
    Ok(vec![
        ("model.safetensors".into(), bytes),
        ("config.json".into(), config_json),
        ("README.md".into(), card.into_bytes()),
    ])
}
