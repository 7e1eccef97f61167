//! Data-parallel training of the generative methods, ranks as threads of
//! one process (`pretext_core::dist::LocalGroup`): 2 and 4 ranks, each with
//! its share of every batch, end where one process does — the conv VAE with
//! free bits and dynamic binarisation (noise and Bernoulli draws made for the
//! whole batch), and the MAE (masks drawn for the whole batch).

use candle_core::Device;
use pretext_core::dist::{Fitted, LocalGroup};
use pretext_core::{OptimConfig, ScheduleConfig, TrainConfig, Trainer};
use pretext_data::{AugmentConfig, BatcherConfig, ImageBatcher, ImageDataset, Pipeline};
use pretext_generative::{GenerativeModel, Mae, MaeConfig, Vae, VaeArch, VaeConfig};
use std::sync::Arc;

/// 48 16×16 grayscale images: stripes and checks with noise.
fn fixture() -> ImageDataset {
    let mut pixels = Vec::new();
    let mut state = 777u64;
    for i in 0..48 {
        for y in 0..16 {
            for x in 0..16 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let on = match i % 3 {
                    0 => x % 4 < 2,
                    1 => y % 4 < 2,
                    _ => (x / 4 + y / 4) % 2 == 0,
                };
                pixels.push(if on { 200 } else { 30 } + (state >> 60) as u8 * 3);
            }
        }
    }
    ImageDataset {
        height: 16,
        width: 16,
        channels: 1,
        pixels,
        labels: None,
        classes: vec![],
        ids: None,
    }
}

/// `make` builds the model; 4 steps of batch 8 on `ranks` threads; what
/// rank 0 ended with (every rank ends the same, or this fails).
fn train(ranks: usize, make: &(dyn Fn() -> GenerativeModel + Sync)) -> Fitted {
    LocalGroup::fit(ranks, || {
        let train = TrainConfig {
            max_steps: 4,
            batch_size: 8,
            seed: 2,
            ..TrainConfig::default()
        };
        let optim = OptimConfig {
            name: pretext_core::OptimKind::Sgd,
            lr: 0.01,
            momentum: 0.9,
            ..OptimConfig::default()
        };
        let trainer = Trainer::new(make(), &optim, &ScheduleConfig::default(), &train)?;
        let pipeline = Arc::new(Pipeline::new(AugmentConfig::none(vec![0.0], vec![1.0]), 16, 16)?);
        let bc = BatcherConfig::training(8, 1, 2, 1);
        let data = ImageBatcher::new(Arc::new(fixture()), pipeline, bc, &Device::Cpu)?;
        Ok((trainer, data))
    })
    .expect("data-parallel training")
}

fn same_as_one_process(what: &str, make: &(dyn Fn() -> GenerativeModel + Sync)) {
    let one = train(1, make);
    let l1 = &one.losses;
    assert_eq!(l1.len(), 4);
    for ranks in [2, 4] {
        let wn = train(ranks, make);
        let ln = &wn.losses;
        for (a, b) in l1.iter().zip(ln) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{what} on {ranks} ranks: {ln:?} vs {l1:?}"
            );
        }
        let worst = one.gap(&wn);
        assert!(worst < 1e-5, "{what} on {ranks} ranks: weights differ by {worst}");
    }
}

#[test]
fn the_conv_vae_with_free_bits_and_binarisation_trains_on_ranks_as_in_one_process() {
    let cfg = VaeConfig {
        arch: VaeArch::Conv,
        latent: 4,
        channels: vec![4, 8],
        dec_channels: vec![8, 4],
        enc_fc: vec![16],
        dec_fc: vec![16],
        free_bits: 0.05,
        ..VaeConfig::default()
    };
    same_as_one_process("conv VAE", &|| {
        GenerativeModel::Vae(Box::new(
            Vae::new(&cfg, 1, 16, 2, &Device::Cpu)
                .expect("vae")
                .with_dynamic_binarize(true),
        ))
    });
}

#[test]
fn the_mae_trains_on_ranks_as_in_one_process() {
    let cfg = MaeConfig {
        patch_size: 4,
        depth: 1,
        decoder_dim: 16,
        decoder_depth: 1,
        decoder_heads: 2,
        ..MaeConfig::default()
    };
    same_as_one_process("MAE", &|| {
        GenerativeModel::Mae(Box::new(Mae::new(&cfg, 1, 16, 2, &Device::Cpu).expect("mae")))
    });
}
