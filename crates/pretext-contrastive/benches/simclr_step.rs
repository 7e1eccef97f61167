//! One SimCLR training step of the reference "small-resnet" (widths 32/64/128,
//! 28×28 input, BatchNorm in training mode, projection head, NT-Xent, AdamW)
//! at batch 256 pairs on pre-augmented Fashion-MNIST batches (a distinct batch
//! per step, as in the PyTorch reference's `simclr-bench`).
//!
//! `cargo bench -p pretext-contrastive --bench simclr_step`
//! Environment: `PRETEXT_BENCH_BATCH` (256), `PRETEXT_BENCH_WARMUP` (3),
//! `PRETEXT_BENCH_PRECISION` (`f32`; `bf16` = `train.precision`), `PRETEXT_BENCH_ITERS` (10). The last line is machine-readable:
//! `RESULT simclr_step img_per_s=<x> median_ms=<y> gflops=<z>`.

use candle_core::Device;
use pretext_contrastive::{ModelConfig, SimClr};
use pretext_core::trainer::{BatchSource, NullObserver, TrainConfig, Trainer};
use pretext_core::{OptimConfig, OptimKind, ScheduleConfig, ScheduleKind};
use pretext_data::{AugmentConfig, BatcherConfig, ImageBatch, ImageBatcher, Pipeline};
use std::sync::Arc;
use std::time::Instant;

/// Source-image FLOPs of one step (2 views, forward + backward), as counted by
/// the reference with torch's FlopCounterMode (conv + linear, multiply-add = 2).
const STEP_MFLOP_PER_IMAGE: f64 = 445.6;

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
        return Ok(()); // `cargo bench -- --list` probing
    }
    pretext_core::cpu::prepare_process();
    let batch = env("PRETEXT_BENCH_BATCH", 256);
    let warmup = env("PRETEXT_BENCH_WARMUP", 3);
    let iters = env("PRETEXT_BENCH_ITERS", 10);
    let dev = Device::Cpu;
    let data = pretext_data::shipped::fashion_mnist(&pretext_data::shipped::datasets_dir()?)?;
    let pipeline = Arc::new(Pipeline::new(AugmentConfig::fashion_mnist(), 28, 28)?);
    let cfg = BatcherConfig {
        batch_size: batch,
        views: 2,
        seed: 0,
        prefetch: 0,
        ..Default::default()
    };
    let batcher = ImageBatcher::new(Arc::new(data.train), pipeline, cfg, &dev)?;
    let batches: Vec<ImageBatch> = (0..(warmup + iters) as u64)
        .map(|s| batcher.batch_now(s))
        .collect::<Result<_, _>>()?;
    let mut source = Prebuilt(batches);

    let model = SimClr::new(&ModelConfig::default(), 0, &dev)?;
    let optim = OptimConfig {
        name: OptimKind::AdamW,
        lr: 1e-3,
        ..Default::default()
    };
    let schedule = ScheduleConfig {
        kind: ScheduleKind::Constant,
        ..Default::default()
    };
    let precision: pretext_core::ops::bf16::Precision = std::env::var("PRETEXT_BENCH_PRECISION")
        .unwrap_or_else(|_| "f32".into())
        .parse()?;
    println!("products: {}", precision.describe());
    let train = TrainConfig {
        precision,
        max_steps: (warmup + iters) as u64,
        batch_size: batch,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, &optim, &schedule, &train)?;
    let mut times = Vec::new();
    for s in 0..warmup + iters {
        let t0 = Instant::now();
        let out = trainer.fit_until(&mut source, &mut NullObserver, s as u64 + 1)?;
        let dt = t0.elapsed().as_secs_f64();
        if s >= warmup {
            times.push(dt);
        }
        eprintln!(
            "step {s}: {:.0} ms, loss {:.4}",
            dt * 1e3,
            out.losses.last().copied().unwrap_or(f64::NAN)
        );
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let ips = batch as f64 / med;
    let gflops = STEP_MFLOP_PER_IMAGE * batch as f64 / med / 1e3;
    println!(
        "pretext SimCLR step, batch {batch} pairs, {precision} products, AdamW: median {:.0} ms over {iters} steps = {ips:.1} img/s ({:.0} views/s), {gflops:.1} GFLOP/s",
        med * 1e3,
        2.0 * ips
    );
    println!(
        "RESULT simclr_step img_per_s={ips:.2} median_ms={:.1} gflops={gflops:.2}",
        med * 1e3
    );
    Ok(())
}
