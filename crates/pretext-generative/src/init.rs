//! Starting from existing weights (`--init`): a VAE export folder
//! (`model.safetensors` + `config.json`, the names the model uses), or, for
//! the MAE, an MAE export folder or timm ViT weights (the encoder; the
//! decoder starts fresh); the source's architecture becomes the config's.

use crate::error::{Error, Result};
use candle_core::Device;
use pretext_core::paradigm::InitSpec;
use pretext_core::warm_start::{safetensors_weights, InitialWeights};

/// Every weight of an exported VAE; a ViT's (an MAE export, timm weights)
/// under `encoder.` (a classifier's `head.*` kept as it is, and left unused).
///
/// # Errors
/// A source without weights, named.
pub fn initial_weights(spec: &InitSpec, device: &Device) -> Result<InitialWeights> {
    let file = if spec.path.is_file() {
        spec.path.clone()
    } else {
        spec.path.join("model.safetensors")
    };
    let mut w = safetensors_weights(&file, &spec.source, device)?;
    if w.tensors.contains_key("patch_embed.proj.weight") {
        w.tensors = w
            .tensors
            .into_iter()
            .map(|(n, t)| {
                if n.starts_with("head.") {
                    (n, t)
                } else {
                    (format!("encoder.{n}"), t)
                }
            })
            .collect();
    }
    Ok(w)
}

/// Whether a model weight must come from the source: all of a VAE's; an
/// MAE's encoder (its decoder and mask token start fresh).
pub fn init_required(name: &str) -> bool {
    !(name.starts_with("decoder_") || name == "mask_token")
}

fn list(v: &serde_json::Value) -> Option<String> {
    let items: Vec<String> = v.as_array()?.iter().map(ToString::to_string).collect();
    Some(format!("[{}]", items.join(", ")))
}

/// The settings of an export's `config.json`: architecture, latent, layer
/// sizes, likelihood, image channels and size.
///
/// # Errors
/// An unreadable `config.json`, or one of another model, named.
pub fn init_settings(spec: &InitSpec) -> Result<Vec<String>> {
    let config = spec.path.join("config.json");
    if !(spec.path.is_dir() && config.is_file()) {
        return vit_file_settings(spec);
    }
    let bytes = std::fs::read(&config).map_err(|e| pretext_core::Error::io(&config, e))?;
    let c: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Data(pretext_data::Error::format(&config, format!("not JSON ({e})"))))?;
    let arch = match c["architecture"].as_str().unwrap_or_default() {
        "vae-mlp" => "mlp",
        "vae-conv" => "conv",
        vit @ ("vit-tiny" | "vit-small") => {
            let mut s = vec!["method=\"mae\"".to_string(), format!("mae.arch={vit:?}")];
            for key in ["patch_size", "depth"] {
                if let Some(v) = c["vit"][key].as_u64() {
                    s.push(format!("mae.{key}={v}"));
                }
            }
            if let Some(ch) = c["in_channels"].as_u64() {
                s.push(format!("data.channels={ch}"));
            }
            if let Some(size) = c["image_size"].as_u64() {
                s.push(format!("data.image_size={size}"));
            }
            return Ok(s);
        }
        other => {
            return Err(Error::Data(pretext_data::Error::format(
                &config,
                format!(
                    "architecture {other:?} is not a model of pretext-generative (vae-mlp, vae-conv; vit-tiny, vit-small for the MAE)"
                ),
            )))
        }
    };
    let mut s = vec![format!("model.arch={arch:?}")];
    for key in ["hidden", "channels", "dec_channels", "enc_fc", "dec_fc"] {
        if let Some(v) = list(&c[key]) {
            s.push(format!("model.{key}={v}"));
        }
    }
    if let Some(z) = c["latent"].as_u64() {
        s.push(format!("model.latent={z}"));
    }
    if let Some(l) = c["likelihood"].as_str() {
        s.push(format!("model.likelihood={l:?}"));
    }
    if let Some(ch) = c["in_channels"].as_u64() {
        s.push(format!("data.channels={ch}"));
    }
    if let Some(size) = c["image_size"].as_u64() {
        s.push(format!("data.image_size={size}"));
    }
    Ok(s)
}

/// The settings of timm ViT weights in one file (an MAE starts from its
/// encoder): width, patch side and channels from `patch_embed.proj.weight`,
/// depth from the blocks, image size from `pos_embed`'s grid. Nothing for
/// any other file.
fn vit_file_settings(spec: &InitSpec) -> Result<Vec<String>> {
    let file = if spec.path.is_file() {
        spec.path.clone()
    } else {
        spec.path.join("model.safetensors")
    };
    if !file.is_file() {
        return Ok(vec![]);
    }
    let (tensors, _) = pretext_core::checkpoint::read_safetensors(&file, &Device::Cpu)?;
    let shape =
        pretext_vit::timm_shape(&tensors).map_err(|why| Error::Data(pretext_data::Error::format(&file, why)))?;
    let Some(v) = shape else {
        return Ok(vec![]);
    };
    Ok(vec![
        "method=\"mae\"".into(),
        format!("mae.arch={:?}", v.size.name()),
        format!("mae.patch_size={}", v.patch_size),
        format!("mae.depth={}", v.depth),
        format!("data.channels={}", v.in_channels),
        format!("data.image_size={}", v.image_size),
    ])
}
