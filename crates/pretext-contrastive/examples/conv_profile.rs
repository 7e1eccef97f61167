//! Per-layer timing of the NHWC convolution kernels at SimCLR batch size (512 images):
//! `[PRETEXT_BENCH_PRECISION=bf16] cargo run --release -p pretext-contrastive --example conv_profile`.
use pretext_core::ops::conv::{conv2d_backward_input, conv2d_backward_weight, conv2d_forward, ConvGeom};
use std::time::Instant;

fn time(f: impl Fn() -> Vec<f32>) -> f64 {
    let _ = f();
    let t = Instant::now();
    for _ in 0..3 {
        std::hint::black_box(f());
    }
    t.elapsed().as_secs_f64() / 3.0 * 1e3
}

fn main() {
    // `PRETEXT_BENCH_PRECISION=bf16` times the products in bf16.
    let precision: pretext_core::ops::bf16::Precision = std::env::var("PRETEXT_BENCH_PRECISION")
        .unwrap_or_else(|_| "f32".into())
        .parse()
        .expect("PRETEXT_BENCH_PRECISION: f32 or bf16");
    println!("products: {}", precision.describe());
    precision.scope(layers);
}

fn layers() {
    pretext_core::cpu::prepare_process();
    let n = 512;
    let layers = [
        ("stem 1->32 28", 28, 1, 32, 3, 1, 1),
        ("l1 32->32 28", 28, 32, 32, 3, 1, 1),
        ("l2a 32->64 s2", 28, 32, 64, 3, 2, 1),
        ("l2b 64->64 14", 14, 64, 64, 3, 1, 1),
        ("l2s 32->64 1x1 s2", 28, 32, 64, 1, 2, 0),
        ("l3a 64->128 s2", 14, 64, 128, 3, 2, 1),
        ("l3b 128->128 7", 7, 128, 128, 3, 1, 1),
        ("l3s 64->128 1x1 s2", 14, 64, 128, 1, 2, 0),
    ];
    let (mut tf, mut ti, mut tw) = (0.0, 0.0, 0.0);
    for (name, h, c, o, k, s, p) in layers {
        let g = ConvGeom::new(n, h, h, c, o, k, k, s, p).expect("valid layer geometry");
        let x: Vec<f32> = (0..n * h * h * c).map(|i| (i % 13) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..o * c * k * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..n * g.oh * g.ow * o).map(|i| (i % 5) as f32 * 0.1).collect();
        let gf = 2.0 * (n * g.oh * g.ow * o * g.k()) as f64 / 1e6;
        let f = time(|| conv2d_forward(&x, &w, &g));
        let bi = if c > 1 {
            time(|| conv2d_backward_input(&dy, &w, &g))
        } else {
            0.0
        };
        let bw = time(|| conv2d_backward_weight(&x, &dy, &g));
        tf += f;
        ti += bi;
        tw += bw;
        println!(
            "{name:20} fwd {f:6.1} ms ({:5.1} GF/s)  bwd-in {bi:6.1} ms ({:5.1})  bwd-w {bw:6.1} ms ({:5.1})",
            gf / f,
            gf / bi,
            gf / bw
        );
    }
    println!("total fwd {tf:.0} ms, bwd-in {ti:.0} ms, bwd-w {tw:.0} ms");
}
