//! MLM training throughput: BERT at batch 32 × 128 tokens on packed fortunes
//! (the reference's BERT-mini by default: 4 layers × 256, 4 heads, FFN 1024,
//! WordPiece vocabulary 8000), full training steps (forward, backward, AdamW)
//! through the core trainer, masking included.
//!
//! `cargo bench -p pretext-mlm --bench mlm_step`
//! Environment: `PRETEXT_BENCH_SIZE` (`mini`; any `model.size` preset),
//! `PRETEXT_BENCH_BATCH` (32), `PRETEXT_BENCH_SEQ` (128), `PRETEXT_BENCH_WARMUP` (5),
//! `PRETEXT_BENCH_PRECISION` (`f32`; `bf16` = `train.precision`), `PRETEXT_BENCH_ITERS` (30). The last line is machine-readable:
//! `RESULT mlm_step tok_per_s=<x> median_ms=<y>`.

use candle_core::Device;
use pretext_core::trainer::{BatchSource, Observer, StepReport, TrainConfig, Trainer};
use pretext_core::{OptimConfig, ScheduleConfig};
use pretext_mlm::collator::{sequences, MaskingConfig, MlmBatcher, Packing};
use pretext_mlm::config::ModelConfig;
use pretext_mlm::{BertMlm, WordPieceTokenizer};
use std::sync::Arc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Times(Vec<f64>);

impl Observer for Times {
    fn on_step(&mut self, r: &StepReport) {
        self.0.push(r.elapsed_s);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // the machine the figures belong to (xtask copies this line into its tables)
    println!("{}", pretext_core::cpu::CpuInfo::current().line());
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    pretext_core::cpu::prepare_process();
    let size = std::env::var("PRETEXT_BENCH_SIZE").unwrap_or_else(|_| "mini".into());
    let batch = env("PRETEXT_BENCH_BATCH", 32);
    let seq = env("PRETEXT_BENCH_SEQ", 128);
    let warmup = env("PRETEXT_BENCH_WARMUP", 5);
    let iters = env("PRETEXT_BENCH_ITERS", 30);
    let dev = Device::Cpu;
    let docs = pretext_data::shipped::fortunes(&pretext_data::shipped::datasets_dir()?, None)?.docs;
    let tok = WordPieceTokenizer::train(&docs, 8000, 2)?;
    let ids = tok.special_ids()?;
    let seqs = sequences(&tok.encode_all(&docs)?, seq, Packing::Pack, &ids)?;
    let mc = ModelConfig {
        size: size.clone(),
        max_position: seq,
        ..Default::default()
    };
    let dims = mc.dims(tok.vocab_size())?;
    let model = BertMlm::new(&dims, 0, &dev)?;
    let precision: pretext_core::ops::bf16::Precision = std::env::var("PRETEXT_BENCH_PRECISION")
        .unwrap_or_else(|_| "f32".into())
        .parse()?;
    println!("products: {}", precision.describe());
    let train = TrainConfig {
        precision,
        max_steps: (warmup + iters) as u64,
        batch_size: batch,
        checkpoint_every: 0,
        ..Default::default()
    };
    let optim = OptimConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, &optim, &ScheduleConfig::default(), &train)?;
    let mut batcher = MlmBatcher::new(Arc::new(seqs), batch, 0, MaskingConfig::default(), ids, &dev);
    let _ = batcher.steps_per_epoch();
    let mut times = Times(Vec::new());
    trainer.fit(&mut batcher, &mut times)?;
    let mut steps: Vec<f64> = times.0.windows(2).skip(warmup).map(|w| w[1] - w[0]).collect();
    steps.sort_by(f64::total_cmp);
    let median = steps[steps.len() / 2];
    let tok_s = (batch * seq) as f64 / median;
    println!(
        "BERT {size} ({} layers × {}, {:.2} M parameters), batch {batch} × {seq}: median step {:.0} ms, {tok_s:.0} tokens/s",
        dims.num_hidden_layers,
        dims.hidden_size,
        dims.parameter_count() as f64 / 1e6,
        median * 1e3
    );
    println!("RESULT mlm_step tok_per_s={tok_s:.1} median_ms={:.1}", median * 1e3);
    Ok(())
}
