//! Where a SimCLR step spends its time: forward, backward, optimizer.
//! `cargo run --release -p pretext-contrastive --example step_profile`
use candle_core::{DType, Device, Tensor};
use pretext_contrastive::{ModelConfig, SimClr};
use pretext_core::trainer::Method;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    pretext_core::cpu::prepare_process();
    let dev = Device::Cpu;
    let model = SimClr::new(&ModelConfig::default(), 0, &dev)?;
    let v1 = Tensor::randn(0f32, 1.0, (256, 1, 28, 28), &dev)?;
    let v2 = Tensor::randn(0f32, 1.0, (256, 1, 28, 28), &dev)?;
    let vars = pretext_core::init::named_vars(model.vars());
    let optim = pretext_core::OptimConfig::default().build(vars)?;
    let mut optim = optim;
    for i in 0..6 {
        let t0 = Instant::now();
        let loss = model.loss(&v1, &v2, true)?;
        let _ = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        optim.step(&grads, 1e-3)?;
        let t3 = Instant::now();
        drop(grads);
        let t4 = Instant::now();
        println!(
            "iter {i}: forward {:.0} ms, backward {:.0} ms, optim {:.0} ms, drop {:.0} ms",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            (t3 - t2).as_secs_f64() * 1e3,
            (t4 - t3).as_secs_f64() * 1e3
        );
    }
    Ok(())
}
