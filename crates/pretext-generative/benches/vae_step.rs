//! VAE training throughput: the reference's MLP VAE (784-512-256-32, Bernoulli,
//! Adam 1e-3) at batch 128 on Fashion-MNIST images in [0, 1], batches built
//! beforehand (as the reference's in-memory tensors), full training steps
//! (forward, backward, optimizer) through the core trainer.
//!
//! `cargo bench -p pretext-generative --bench vae_step`
//! Environment: `PRETEXT_BENCH_BATCH` (128), `PRETEXT_BENCH_WARMUP` (20),
//! `PRETEXT_BENCH_PRECISION` (`f32`; `bf16` = `train.precision`), `PRETEXT_BENCH_ITERS` (300), `PRETEXT_BENCH_MODEL` (`mlp` = the reference's
//! MLP; `default` = the default config's conv VAE, whose own batch is 64),
//! `PRETEXT_BENCH_DEC` (the conv decoder's channels `d1,d2`, e.g. `32,128`
//! for the encoder's; default: the model's own). The last line is machine-readable:
//! `RESULT vae_step img_per_s=<x>`.

use candle_core::Device;
use pretext_core::trainer::{BatchSource, NullObserver, TrainConfig, Trainer};
use pretext_core::{OptimConfig, ScheduleConfig, ScheduleKind};
use pretext_data::{AugmentConfig, BatcherConfig, ImageBatch, ImageBatcher, Pipeline};
use pretext_generative::{Vae, VaeArch, VaeConfig};
use std::sync::Arc;
use std::time::Instant;

struct Prebuilt(Vec<ImageBatch>);

impl BatchSource for Prebuilt {
    type Batch = ImageBatch;
    fn steps_per_epoch(&self) -> u64 {
        self.0.len() as u64
    }
    fn batch(&mut self, step: u64) -> pretext_core::Result<ImageBatch> {
        Ok(self.0[step as usize % self.0.len()].clone())
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // the machine the figures belong to (xtask copies this line into its tables)
    println!("{}", pretext_core::cpu::CpuInfo::current().line());
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    pretext_core::cpu::prepare_process();
    let batch = env("PRETEXT_BENCH_BATCH", 128);
    let warmup = env("PRETEXT_BENCH_WARMUP", 20);
    let iters = env("PRETEXT_BENCH_ITERS", 300);
    let dev = Device::Cpu;
    let data = pretext_data::shipped::fashion_mnist(&pretext_data::shipped::datasets_dir()?)?;
    let pipeline = Arc::new(Pipeline::new(AugmentConfig::none(vec![], vec![]), 28, 28)?);
    let cfg = BatcherConfig {
        batch_size: batch,
        views: 1,
        seed: 0,
        prefetch: 0,
        ..Default::default()
    };
    let batcher = ImageBatcher::new(Arc::new(data.train), pipeline, cfg, &dev)?;
    let distinct = 100.min(warmup + iters) as u64;
    let batches: Vec<ImageBatch> = (0..distinct).map(|s| batcher.batch_now(s)).collect::<Result<_, _>>()?;
    let mut source = Prebuilt(batches);
    // (model, train.ema_decay)
    let (vae, ema_decay) = match std::env::var("PRETEXT_BENCH_MODEL").as_deref() {
        Err(_) | Ok("mlp") => (VaeConfig::default(), 0.0),
        // the model section and the weight averaging of configs/vae-fmnist.toml
        // (library crates do not parse TOML)
        Ok("default") => (
            VaeConfig {
                arch: VaeArch::Conv,
                latent: 64,
                channels: vec![32, 128],
                dec_channels: vec![96, 128],
                free_bits: 0.5,
                free_bits_decay_steps: 4685,
                ..VaeConfig::default()
            },
            0.999,
        ),
        Ok(other) => return Err(format!("PRETEXT_BENCH_MODEL = {other:?}: expected mlp or default").into()),
    };
    let mut vae = vae;
    if let Ok(d) = std::env::var("PRETEXT_BENCH_DEC") {
        vae.dec_channels = d
            .split(',')
            .map(|v| v.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("PRETEXT_BENCH_DEC = {d:?}: {e}"))?;
    }
    let model = Vae::new(&vae, 1, 28, 0, &dev)?;
    let precision: pretext_core::ops::bf16::Precision = std::env::var("PRETEXT_BENCH_PRECISION")
        .unwrap_or_else(|_| "f32".into())
        .parse()?;
    println!("products: {}", precision.describe());
    let train = TrainConfig {
        precision,
        max_steps: (warmup + iters) as u64,
        batch_size: batch,
        ema_decay,
        ..TrainConfig::default()
    };
    let schedule = ScheduleConfig {
        kind: ScheduleKind::Constant,
        ..ScheduleConfig::default()
    };
    let mut trainer = Trainer::new(model, &OptimConfig::default(), &schedule, &train)?;
    trainer.fit_until(&mut source, &mut NullObserver, warmup as u64)?;
    let t = Instant::now();
    trainer.fit_until(&mut source, &mut NullObserver, (warmup + iters) as u64)?;
    let secs = t.elapsed().as_secs_f64();
    let ips = (iters * batch) as f64 / secs;
    println!(
        "vae_step ({:?}, latent {}): {iters} steps of {batch} images in {secs:.2} s",
        vae.arch, vae.latent
    );
    println!("RESULT vae_step img_per_s={ips:.1}");
    Ok(())
}
