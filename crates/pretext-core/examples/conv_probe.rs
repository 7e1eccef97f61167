//! Times each convolution of the SimCLR trunk and of the default conv VAE
//! (batch `N`, default 512: the SimCLR step's two views of 256 images)
//! through the im2col path and the direct kernels, in f32 and bf16:
//! GFLOP/s of the forward pass, the input gradient and the weight gradient.
//!
//! `[N=64] [LAYERS=vae] cargo run --release -p pretext-core --example conv_probe`
//! (`LAYERS` keeps the layers whose name contains it).

use pretext_core::ops::bf16::Precision;
use pretext_core::ops::conv::{im2col_backward_input, im2col_backward_weight, im2col_forward, ConvGeom};
use pretext_core::ops::direct;
use std::time::Instant;

fn best<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    let mut t = f64::MAX;
    for _ in 0..reps {
        let s = Instant::now();
        std::hint::black_box(f());
        t = t.min(s.elapsed().as_secs_f64());
    }
    t
}

fn main() {
    println!("{}", pretext_core::cpu::CpuInfo::current().line());
    pretext_core::cpu::prepare_process();
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    let all = [
        ("stem 1→32 @28", 28, 1, 32, 3, 1, 1),
        ("32→32 @28", 28, 32, 32, 3, 1, 1),
        ("32→64 s2 @28", 28, 32, 64, 3, 2, 1),
        ("64→64 @14", 14, 64, 64, 3, 1, 1),
        ("32→64 1×1 s2", 28, 32, 64, 1, 2, 0),
        ("64→128 s2 @14", 14, 64, 128, 3, 2, 1),
        ("128→128 @7", 7, 128, 128, 3, 1, 1),
        ("64→128 1×1 s2", 14, 64, 128, 1, 2, 0),
        ("vae enc 1→32", 28, 1, 32, 4, 2, 1),
        ("vae enc 32→128", 14, 32, 128, 4, 2, 1),
        ("vae dec 96↔128", 14, 96, 128, 4, 2, 1),
        ("vae dec 1↔96", 28, 1, 96, 4, 2, 1),
    ];
    let only: String = std::env::var("LAYERS").unwrap_or_default();
    let layers: Vec<_> = all
        .into_iter()
        .filter(|l| only.is_empty() || l.0.contains(only.as_str()))
        .collect();
    println!(
        "{:<16} {:>31}  {:>31}  {:>31}",
        "layer (GF/s)", "fwd: im2col direct bf16:im2col direct", "dx: (same)", "dw: (same)"
    );
    for (name, hw, c, o, k, s, p) in layers {
        let g = ConvGeom::new(n, hw, hw, c, o, k, k, s, p).expect("the layers fit");
        let x: Vec<f32> = (0..n * hw * hw * c)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let w: Vec<f32> = (0..o * c * k * k)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let dy: Vec<f32> = (0..n * g.out_pixels() * o)
            .map(|i| ((i * 31) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let gf = 2.0 * (n * g.out_pixels() * o * g.k()) as f64 / 1e9;
        let r = 5;
        let f0 = gf / best(r, || im2col_forward(&x, &w, &g));
        let f1 = gf / best(r, || direct::forward(&x, &w, &g, Precision::F32));
        let b0 = gf / best(r, || im2col_backward_input(&dy, &w, &g));
        let b1 = gf
            / best(r, || {
                direct::backward_input(direct::Map::F32(&dy), &w, &g, Precision::F32)
            });
        let w0 = gf / best(r, || im2col_backward_weight(&x, &dy, &g));
        let w1 = gf
            / best(r, || {
                direct::backward_weight(&x, direct::Map::F32(&dy), &g, Precision::F32)
            });
        let bf = Precision::Bf16;
        let f2 = gf / bf.scope(|| best(r, || im2col_forward(&x, &w, &g)));
        let b2 = gf / bf.scope(|| best(r, || im2col_backward_input(&dy, &w, &g)));
        let f3 = gf / best(r, || direct::forward(&x, &w, &g, bf));
        let b3 = gf / best(r, || direct::backward_input(direct::Map::F32(&dy), &w, &g, bf));
        let w3 = gf / best(r, || direct::backward_weight(&x, direct::Map::F32(&dy), &g, bf));
        let w2 = gf / bf.scope(|| best(r, || im2col_backward_weight(&x, &dy, &g)));
        println!(
            "{name:<16} {f0:>7.1} {f1:>7.1} {f2:>7.1} {f3:>7.1}  {b0:>7.1} {b1:>7.1} {b2:>7.1} {b3:>7.1}  {w0:>7.1} {w1:>7.1} {w2:>7.1} {w3:>7.1}"
        );
    }
}
