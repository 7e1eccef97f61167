//! Starting from existing weights (`--init`): a contrastive export folder
//! (`model.safetensors` + `config.json`), torchvision ResNet-18 weights or
//! timm Vision Transformer weights (ViT-Tiny or ViT-Small width) in one
//! safetensors file; the encoder comes from the source, the projection head
//! starts fresh. The source's architecture becomes the config's.

use crate::error::{Error, Result};
use candle_core::Device;
use pretext_core::paradigm::InitSpec;
use pretext_core::warm_start::{safetensors_weights, InitialWeights};
use std::path::{Path, PathBuf};

/// ImageNet's per-channel statistics, with which torchvision's weights were trained.
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The weights file of a source: the file itself, or a folder's `model.safetensors`.
fn weights_file(path: &Path) -> PathBuf {
    if path.is_file() {
        path.to_path_buf()
    } else {
        path.join("model.safetensors")
    }
}

/// The encoder's weights of a source, under the model's names (`encoder.`
/// prefixed; a classifier's layer — torchvision's `fc.*`, timm's
/// `head.weight` / `head.bias` — kept as it is, and left unused).
///
/// # Errors
/// A source without weights, named.
pub fn initial_weights(spec: &InitSpec, device: &Device) -> Result<InitialWeights> {
    let mut w = safetensors_weights(&weights_file(&spec.path), &spec.source, device)?;
    w.tensors = w
        .tensors
        .into_iter()
        .map(|(n, t)| {
            if n.starts_with("fc.") || n == "head.weight" || n == "head.bias" {
                (n, t)
            } else {
                (format!("encoder.{n}"), t)
            }
        })
        .collect();
    Ok(w)
}

fn list(v: &[impl std::fmt::Display]) -> String {
    format!("[{}]", v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
}

/// The config settings a source's architecture asks for: from an export's
/// `config.json`, or read off torchvision weights (`conv1.weight`'s shape).
///
/// # Errors
/// An unreadable `config.json` or weights file, named.
pub fn init_settings(spec: &InitSpec) -> Result<Vec<String>> {
    let config = spec.path.join("config.json");
    if spec.path.is_dir() && config.is_file() {
        let bytes = std::fs::read(&config).map_err(|e| pretext_core::Error::io(&config, e))?;
        let c: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Data(pretext_data::Error::format(&config, format!("not JSON ({e})"))))?;
        let arch = c["architecture"].as_str().unwrap_or_default();
        let Some(kind) = crate::Arch::parse(arch) else {
            let names: Vec<&str> = crate::Arch::ALL.iter().map(|a| a.name()).collect();
            return Err(Error::Data(pretext_data::Error::format(
                &config,
                format!(
                    "architecture {arch:?} is not an image encoder of pretext-contrastive ({})",
                    names.join(", ")
                ),
            )));
        };
        let mut s = vec![format!("model.encoder.arch={arch:?}")];
        if kind.is_vit() {
            for key in ["patch_size", "depth"] {
                if let Some(v) = c["vit"][key].as_u64() {
                    s.push(format!("model.encoder.{key}={v}"));
                }
            }
        }
        if let Some(c_in) = c["in_channels"].as_u64() {
            s.push(format!("model.encoder.in_channels={c_in}"));
            s.push(format!("data.channels={c_in}"));
        }
        if let Some(stages) = c["stages"].as_array().filter(|_| arch == "small-resnet") {
            let col = |k: usize| -> Vec<u64> { stages.iter().filter_map(|st| st[k].as_u64()).collect() };
            s.push(format!("model.encoder.widths={}", list(&col(0))));
            s.push(format!("model.encoder.strides={}", list(&col(1))));
            s.push(format!("model.encoder.blocks={}", list(&col(2))));
        }
        if let Some(size) = c["image_size"].as_u64() {
            s.push(format!("data.image_size={size}"));
        }
        for key in ["mean", "std"] {
            if let Some(v) = c[key].as_array() {
                let vals: Vec<f64> = v.iter().filter_map(serde_json::Value::as_f64).collect();
                s.push(format!("data.augment.{key}={}", list(&vals)));
            }
        }
        return Ok(s);
    }
    let file = weights_file(&spec.path);
    if !file.is_file() {
        return Ok(vec![]);
    }
    let (tensors, _) = pretext_core::checkpoint::read_safetensors(&file, &Device::Cpu)?;
    let vit = pretext_vit::timm_shape(&tensors).map_err(|why| Error::Data(pretext_data::Error::format(&file, why)))?;
    if let Some(v) = vit {
        let mut s = vec![
            format!("model.encoder.arch={:?}", v.size.name()),
            format!("model.encoder.patch_size={}", v.patch_size),
            format!("model.encoder.depth={}", v.depth),
            format!("model.encoder.in_channels={}", v.in_channels),
            format!("data.channels={}", v.in_channels),
            format!("data.image_size={}", v.image_size),
        ];
        if v.in_channels == 3 {
            // timm's ViTs of the original recipe normalise with 0.5 / 0.5
            s.push("data.augment.mean=[0.5, 0.5, 0.5]".into());
            s.push("data.augment.std=[0.5, 0.5, 0.5]".into());
        }
        return Ok(s);
    }
    let Some(conv1) = tensors.get("conv1.weight") else {
        return Ok(vec![]);
    };
    let dims = conv1.dims();
    let (c_in, k) = (dims.get(1).copied().unwrap_or(3), dims.get(2).copied().unwrap_or(7));
    let arch = if k == 3 { "resnet18-cifar" } else { "resnet18" };
    let mut s = vec![
        format!("model.encoder.arch={arch:?}"),
        format!("model.encoder.in_channels={c_in}"),
        format!("data.channels={c_in}"),
    ];
    if c_in == 3 {
        s.push(format!("data.augment.mean={}", list(&IMAGENET_MEAN)));
        s.push(format!("data.augment.std={}", list(&IMAGENET_STD)));
    }
    Ok(s)
}
