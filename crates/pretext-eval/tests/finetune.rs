//! Few-label fine-tuning trains the encoder and the head, and feature
//! extraction returns exactly what the encoder computes.

use candle_core::{DType, Device, Tensor, Var};
use pretext_core::{NullObserver, SeededVarMap};
use pretext_data::ImageDataset;
use pretext_eval::{extract_features, fine_tune, FineTuneConfig, ImageEncoder};
use rand::{Rng, SeedableRng};

/// A one-layer encoder over flattened pixels (tanh).
struct Mlp {
    vars: SeededVarMap,
    layer: pretext_core::nn::Linear,
    dim: usize,
}

impl Mlp {
    fn new(input: usize, dim: usize, seed: u64) -> Self {
        let vars = SeededVarMap::from_seed(seed, "test");
        let layer = pretext_core::nn::linear(input, dim, true, vars.var_builder(DType::F32, &Device::Cpu).pp("enc"))
            .expect("linear");
        Self { vars, layer, dim }
    }
}

impl ImageEncoder for Mlp {
    fn encode(&self, images: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        self.layer.forward(&images.flatten_from(1)?)?.tanh()
    }
    fn feature_dim(&self) -> usize {
        self.dim
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        self.vars.named_vars()
    }
    fn state(&self) -> Vec<(String, Var)> {
        self.vars.named_vars()
    }
}

/// 8×8 images; class 0 has a bright left half, class 1 a bright right half, class 2 a bright top; plus noise.
fn halves(n: usize, seed: u64) -> ImageDataset {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let c = (i % 3) as u32;
        for y in 0..8 {
            for x in 0..8 {
                let on = match c {
                    0 => x < 4,
                    1 => x >= 4,
                    _ => y < 4,
                };
                let base: i32 = if on { 190 } else { 60 };
                pixels.push((base + rng.random_range(-40..=40)).clamp(0, 255) as u8);
            }
        }
        labels.push(c);
    }
    ImageDataset {
        height: 8,
        width: 8,
        channels: 1,
        pixels,
        labels: Some(labels),
        classes: vec![],
        ids: None,
    }
}

/// [`fine_tune`] on 8×8 one-channel images (mean 0.5, std 0.25), seed 0, on the CPU.
fn tune(
    enc: &Mlp,
    train: &ImageDataset,
    test: &ImageDataset,
    cfg: &FineTuneConfig,
    observer: &mut dyn pretext_core::trainer::Observer,
) -> pretext_eval::Result<pretext_eval::FineTuneResult> {
    fine_tune(enc, train, test, &[0.5], &[0.25], 8, cfg, 0, &Device::Cpu, observer)
}

#[test]
fn fine_tuning_learns_a_separable_task_and_moves_the_encoder() {
    let train = halves(60, 1);
    let test = halves(90, 2);
    let enc = Mlp::new(64, 8, 3);
    let before = enc.layer.weight().to_vec2::<f32>().unwrap();
    let cfg = FineTuneConfig {
        budget_images: 60 * 40,
        batch_size: 15,
        lr: 1e-2,
        crop_scale: (0.9, 1.0),
        flip_p: 0.0,
        ..FineTuneConfig::default()
    };
    let r = tune(&enc, &train, &test, &cfg, &mut NullObserver).unwrap();
    assert_eq!((r.n_train, r.n_test, r.epochs, r.steps), (60, 90, 40, 160));
    assert!(r.accuracy > 0.95, "accuracy {}", r.accuracy);
    assert!(r.final_loss < 0.3, "final loss {}", r.final_loss);
    let after = enc.layer.weight().to_vec2::<f32>().unwrap();
    let moved: f32 = before
        .iter()
        .flatten()
        .zip(after.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .sum();
    assert!(moved > 1e-2, "the encoder's weights did not change ({moved})");
}

#[test]
fn fine_tuning_is_deterministic_under_the_seed() {
    let train = halves(30, 4);
    let test = halves(30, 5);
    let cfg = FineTuneConfig {
        budget_images: 30 * 3,
        batch_size: 10,
        ..FineTuneConfig::default()
    };
    let run = || {
        let enc = Mlp::new(64, 4, 6);
        let r = tune(&enc, &train, &test, &cfg, &mut NullObserver).unwrap();
        (r.final_loss, enc.layer.weight().to_vec2::<f32>().unwrap())
    };
    assert_eq!(run(), run());
}

#[test]
fn fine_tuning_rejects_unlabelled_data() {
    let mut train = halves(12, 1);
    train.labels = None;
    let test = halves(12, 2);
    let enc = Mlp::new(64, 4, 6);
    let err = tune(&enc, &train, &test, &FineTuneConfig::default(), &mut NullObserver).unwrap_err();
    assert!(err.to_string().contains("labelled"), "{err}");
}

#[test]
fn extracted_features_are_the_encoder_outputs_of_normalised_pixels() {
    let ds = halves(1001, 7); // more than two extraction chunks
    let enc = Mlp::new(64, 5, 8);
    let idx: Vec<usize> = (0..ds.len()).rev().step_by(2).collect();
    let e = extract_features(
        &enc,
        &ds,
        &idx,
        &[0.5],
        &[0.25],
        8,
        &Device::Cpu,
        &mut NullObserver,
        "test",
    )
    .unwrap();
    assert_eq!((e.len(), e.dim), (idx.len(), 5));
    for (row, &i) in idx.iter().enumerate().step_by(97) {
        let x: Vec<f32> = ds
            .image(i)
            .iter()
            .map(|&p| (f32::from(p) / 255.0 - 0.5) / 0.25)
            .collect();
        let x = Tensor::from_vec(x, (1, 1, 8, 8), &Device::Cpu).unwrap();
        let want = enc
            .encode(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in e.row(row).iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "row {row}: {a} vs {b}");
        }
        assert_eq!(e.labels[row], ds.labels.as_ref().unwrap()[i]);
    }
}

/// Records the learning rate of every step.
#[derive(Default)]
struct Rates(Vec<f64>);

impl pretext_core::trainer::Observer for Rates {
    fn on_step(&mut self, r: &pretext_core::trainer::StepReport) {
        self.0.push(r.lr);
    }
}

#[test]
fn the_warm_up_raises_the_rate_linearly_over_its_share_of_the_steps_then_decays_it() {
    let train = halves(40, 7);
    let test = halves(30, 8);
    let run = |warmup_fraction: f64| {
        let cfg = FineTuneConfig {
            budget_images: 40 * 5,
            batch_size: 10,
            lr: 1e-2,
            warmup_fraction,
            ..FineTuneConfig::default()
        };
        let mut rates = Rates::default();
        let r = tune(&Mlp::new(64, 4, 9), &train, &test, &cfg, &mut rates);
        r.map(|r| (r.steps, rates.0))
    };
    // 5 epochs of 4 steps; a quarter of them (5 steps) warm up: lr·1/5 … lr·5/5
    let (steps, rates) = run(0.25).unwrap();
    assert_eq!((steps, rates.len()), (20, 20));
    for (i, r) in rates[..5].iter().enumerate() {
        assert!((r - 1e-2 * (i + 1) as f64 / 5.0).abs() < 1e-12, "step {i}: {r}");
    }
    assert!(
        rates[5..].windows(2).all(|w| w[1] < w[0]),
        "cosine decay after: {rates:?}"
    );
    // without it the first step runs at the full rate
    let (_, plain) = run(0.0).unwrap();
    assert!((plain[0] - 1e-2).abs() < 1e-12, "{plain:?}");
    // a share outside [0, 1) names the setting
    let err = run(1.0).unwrap_err().to_string();
    assert!(err.contains("eval.finetune.warmup_fraction"), "{err}");
}
