//! The binaries answer `--help` with their subcommands and fail cleanly.

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_binary_lists_its_subcommands() {
    let cases: [(&str, &[&str]); 3] = [
        (
            env!("CARGO_BIN_EXE_pretext-contrastive"),
            &["pretrain", "resume", "probe", "export"],
        ),
        (
            env!("CARGO_BIN_EXE_pretext-generative"),
            &["pretrain", "resume", "probe", "sample", "export"],
        ),
        (
            env!("CARGO_BIN_EXE_pretext-mlm"),
            &["tokenizer", "pretrain", "resume", "probe", "fill-mask", "export"],
        ),
    ];
    for (bin, subs) in cases {
        let (ok, text) = run(bin, &["--help"]);
        assert!(ok, "{bin} --help failed: {text}");
        for s in subs {
            assert!(text.contains(s), "{bin} --help lacks {s}: {text}");
        }
    }
}

#[test]
fn pretrain_help_explains_the_shared_flags() {
    let (ok, text) = run(env!("CARGO_BIN_EXE_pretext-contrastive"), &["pretrain", "--help"]);
    assert!(ok, "{text}");
    for flag in [
        "--config", "--set", "--device", "--seed", "--out", "--quiet", "--method", "--data",
    ] {
        assert!(text.contains(flag), "pretrain --help lacks {flag}: {text}");
    }
}

#[test]
fn bad_usage_exits_non_zero_with_a_message() {
    let (ok, text) = run(
        env!("CARGO_BIN_EXE_pretext-contrastive"),
        &["pretrain", "--method", "swav"],
    );
    assert!(!ok);
    assert!(text.contains("swav") && text.contains("barlow_twins"), "{text}");
}

/// Every shipped contrastive config merges over the defaults (as `--config`
/// does) and validates, with the settings its name promises.
#[test]
fn shipped_contrastive_configs_are_valid() {
    use pretext_contrastive::{Arch, ContrastiveConfig, DEFAULT_CONFIG};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pretext-contrastive/configs");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        let r: pretext_cli::config::Resolved<ContrastiveConfig> =
            pretext_cli::config::resolve(DEFAULT_CONFIG, Some(&path), &[]).expect("resolves");
        let cfg = r.config;
        cfg.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        assert!(name.starts_with(&cfg.method), "{name}: method {}", cfg.method);
        // (view side, batch, epochs, steps, bf16): the files that recipe another
        // training setup must say so whole, since they lie over the default's
        let setup = (
            cfg.view_side(),
            cfg.train.batch_size,
            cfg.train.epochs,
            cfg.train.max_steps,
            cfg.train.precision == pretext_core::ops::bf16::Precision::Bf16,
        );
        match name.as_str() {
            "simclr-reference-fmnist.toml" => assert_eq!(setup, (28, 256, 5, 0, false), "{name}"),
            "simclr-cifar10.toml" => assert_eq!(setup, (32, 512, 100, 0, false), "{name}"),
            "moco-cifar10.toml" => assert_eq!(setup, (32, 256, 200, 0, false), "{name}"),
            _ => assert_eq!(setup.0, 16, "{name}: the default's views"),
        }
        if name.contains("cifar") {
            assert_eq!((cfg.data.channels, cfg.data.image_size), (3, 32), "{name}");
            assert_eq!(cfg.model.encoder.arch, Arch::Resnet18Cifar, "{name}");
        } else {
            assert_eq!((cfg.data.channels, cfg.data.image_size), (1, 28), "{name}");
        }
        seen.push(name);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "barlow_twins-fmnist.toml",
            "byol-fmnist.toml",
            "dino-fmnist.toml",
            "moco-cifar10.toml",
            "moco-fmnist.toml",
            "simclr-cifar10.toml",
            "simclr-fmnist.toml",
            "simclr-reference-fmnist.toml",
            "simsiam-fmnist.toml",
            "vicreg-fmnist.toml"
        ]
    );
}

/// Every shipped generative config (VAE, MAE) merges over the defaults and validates.
#[test]
fn shipped_generative_configs_are_valid() {
    use pretext_generative::{GenerativeConfig, VaeArch, DEFAULT_CONFIG};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pretext-generative/configs");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        let r: pretext_cli::config::Resolved<GenerativeConfig> =
            pretext_cli::config::resolve(DEFAULT_CONFIG, Some(&path), &[]).expect("resolves");
        r.config
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        assert!(name.starts_with(&r.config.method), "{name}: method {}", r.config.method);
        if r.config.method == "mae" {
            let mae = &r.config.mae;
            assert_eq!((mae.arch.name(), mae.mask_ratio), ("vit-tiny", 0.75), "{name}");
            assert_eq!(
                r.config.train.ema_decay, 0.0,
                "{name}: the MAE publishes its own weights"
            );
            seen.push(name);
            continue;
        }
        let want = if name.contains("mlp") {
            (VaeArch::Mlp, 32)
        } else {
            (VaeArch::Conv, 64)
        };
        assert_eq!((r.config.model.arch, r.config.model.latent), want, "{name}");
        if want.0 == VaeArch::Mlp {
            // laid over the conv default, the reference's recipe must not
            // inherit its free bits or its weight averaging
            assert_eq!(r.config.model.free_bits, 0.0, "{name}");
            assert_eq!(r.config.train.ema_decay, 0.0, "{name}");
        } else {
            assert!(
                r.config.train.ema_decay > 0.0,
                "{name}: the default publishes averaged weights"
            );
        }
        seen.push(name);
    }
    seen.sort();
    assert_eq!(seen, ["mae-fmnist.toml", "vae-fmnist.toml", "vae-mlp-fmnist.toml"]);
}

#[test]
fn mlm_default_config_resolves_validates_and_rejects_unknown_keys() {
    use pretext_mlm::config::{MlmConfig, DEFAULT_CONFIG};
    let r: pretext_cli::config::Resolved<MlmConfig> =
        pretext_cli::config::resolve(DEFAULT_CONFIG, None, &[]).expect("default config resolves");
    r.config.validate().expect("default config is valid");
    assert_eq!(r.config.model.size, "tiny");
    let d = r.config.model.dims(8000).expect("dims");
    assert_eq!(d.hidden_size % d.num_attention_heads, 0);
    let bad: anyhow::Result<pretext_cli::config::Resolved<MlmConfig>> =
        pretext_cli::config::resolve(DEFAULT_CONFIG, None, &["model.sizes=\"tiny\"".to_string()]);
    assert!(bad.is_err(), "unknown keys are rejected");
}
