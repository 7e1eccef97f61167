//! Data-parallel training of the generative methods, ranks as threads of
//! one process (`pretext_core::dist::LocalGroup`): 2 and 4 ranks, each with
//! its share of every batch, end where one process does — the conv VAE with
//! free bits and dynamic binarisation (noise and Bernoulli draws made for the
//! whole batch), and the MAE (masks drawn for the whole batch).

use candle_core::{DType, Device};
use pretext_core::{LossLog, OptimConfig, ScheduleConfig, TrainConfig, Trainer};
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

/// `make` builds the model; 4 steps of batch 8 on `ranks` threads; rank 0's
/// losses and final weights (every rank's must be the same).
fn train(ranks: usize, make: &(dyn Fn() -> GenerativeModel + Sync)) -> (Vec<f64>, Vec<Vec<f32>>) {
    let mut out = pretext_core::dist::LocalGroup::run(ranks, |world| {
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
        let mut trainer = Trainer::new(make(), &optim, &ScheduleConfig::default(), &train).expect("trainer");
        trainer.set_world(world);
        let pipeline = Arc::new(Pipeline::new(AugmentConfig::none(vec![0.0], vec![1.0]), 16, 16).expect("pipeline"));
        let bc = BatcherConfig::training(8, 1, 2, 1);
        let mut data = ImageBatcher::new(Arc::new(fixture()), pipeline, bc, &Device::Cpu).expect("batcher");
        let mut losses = LossLog::default();
        trainer.fit(&mut data, &mut losses).expect("fit");
        let w = trainer
            .model_tensors()
            .iter()
            .map(|(_, t)| {
                t.to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("weights")
            })
            .collect::<Vec<_>>();
        (losses.0, w)
    });
    let first = out.remove(0);
    for (r, other) in out.iter().enumerate() {
        assert_eq!(other.1, first.1, "rank {} ends where rank 0 does", r + 1);
    }
    first
}

fn same_as_one_process(what: &str, make: &(dyn Fn() -> GenerativeModel + Sync)) {
    let (l1, w1) = train(1, make);
    assert_eq!(l1.len(), 4);
    for ranks in [2, 4] {
        let (ln, wn) = train(ranks, make);
        for (a, b) in l1.iter().zip(&ln) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{what} on {ranks} ranks: {ln:?} vs {l1:?}"
            );
        }
        let worst = w1
            .iter()
            .flatten()
            .zip(wn.iter().flatten())
            .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
            .fold(0f32, f32::max);
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
