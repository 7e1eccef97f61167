//! Starting from existing weights (`--init`): a VAE export folder
//! (`model.safetensors` + `config.json`, the names the model uses); its
//! architecture becomes the config's.

use crate::error::{Error, Result};
use candle_core::Device;
use pretext_core::paradigm::InitSpec;
use pretext_core::warm_start::{safetensors_weights, InitialWeights};

/// Every weight of an exported VAE.
///
/// # Errors
/// A source without weights, named.
pub fn initial_weights(spec: &InitSpec, device: &Device) -> Result<InitialWeights> {
    let file = if spec.path.is_file() {
        spec.path.clone()
    } else {
        spec.path.join("model.safetensors")
    };
    Ok(safetensors_weights(&file, &spec.source, device)?)
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
        return Ok(vec![]);
    }
    let bytes = std::fs::read(&config).map_err(|e| pretext_core::Error::io(&config, e))?;
    let c: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Data(pretext_data::Error::format(&config, format!("not JSON ({e})"))))?;
    let arch = match c["architecture"].as_str().unwrap_or_default() {
        "vae-mlp" => "mlp",
        "vae-conv" => "conv",
        other => {
            return Err(Error::Data(pretext_data::Error::format(
                &config,
                format!("architecture {other:?} is not a VAE of pretext-generative (vae-mlp, vae-conv)"),
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
