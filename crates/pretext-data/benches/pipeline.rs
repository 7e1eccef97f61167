//! Two-view SimCLR augmentation pipeline throughput, in views per second.
//!
//! `cargo bench -p pretext-data --bench pipeline`
//! One view = one augmented image; a two-view batch of 256 images is 512 views.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pretext_data::augment::{AugmentConfig, ColorJitter};
use pretext_data::{BatcherConfig, ImageBatcher, ImageDataset, Pipeline};
use std::sync::Arc;

fn synthetic(n: usize, h: usize, w: usize, c: usize) -> Arc<ImageDataset> {
    let pixels: Vec<u8> = (0..n * h * w * c)
        .map(|i| ((i * 2654435761usize) >> 13) as u8)
        .collect();
    Arc::new(ImageDataset {
        height: h,
        width: w,
        channels: c,
        pixels,
        labels: None,
        classes: vec![],
        ids: None,
    })
}

fn bench(c: &mut Criterion) {
    let batch = 256;
    let mut g = c.benchmark_group("two-view pipeline");
    g.throughput(Throughput::Elements((2 * batch) as u64));
    g.sample_size(20);
    let cases = [
        (
            "28x28 gray (Fashion-MNIST config)",
            28,
            1,
            AugmentConfig::fashion_mnist(),
        ),
        (
            "32x32 rgb (SimCLR CIFAR set)",
            32,
            3,
            AugmentConfig {
                jitter: ColorJitter {
                    p: 0.8,
                    brightness: 0.4,
                    contrast: 0.4,
                    saturation: 0.4,
                    hue: 0.1,
                },
                grayscale_p: 0.2,
                mean: vec![0.4914, 0.4822, 0.4465],
                std: vec![0.247, 0.243, 0.261],
                ..AugmentConfig::default()
            },
        ),
    ];
    for (name, size, ch, cfg) in cases {
        let data = synthetic(10_000, size, size, ch);
        let pipeline = Arc::new(Pipeline::new(cfg, size, size).expect("valid config"));
        let cfg = BatcherConfig {
            batch_size: batch,
            views: 2,
            seed: 0,
            prefetch: 0,
            ..Default::default()
        };
        let batcher = ImageBatcher::new(data, pipeline, cfg, &candle_core::Device::Cpu).expect("batcher");
        let mut step = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                step += 1;
                batcher.batch_now(step).expect("batch")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
