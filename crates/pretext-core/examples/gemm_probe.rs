//! GFLOP/s of pretext's matrix products in f32 and bf16 on the shapes of the
//! SimCLR, MLM and conv VAE steps: `cargo run --release -p pretext-core --example gemm_probe`.

use std::time::Instant;

use pretext_core::cpu::CpuInfo;
use pretext_core::ops::bf16::Precision;
use pretext_core::ops::gemm::{product, Mat};

fn main() {
    println!("{}", CpuInfo::current().line());
    println!("bf16 products: {}", Precision::Bf16.describe());
    let threads = rayon::current_num_threads();
    // (label, m, n, k, a transposed, b transposed, threads)
    let shapes = [
        ("conv fwd 3x3 64->64, 8 imgs of 14x14", 1568, 64, 576, false, false, 1),
        ("conv dx 3x3 64->64", 1568, 576, 64, false, true, 1),
        ("conv dw 3x3 64->64", 576, 64, 1568, true, false, 1),
        ("conv fwd 3x3 32->32, 8 imgs of 28x28", 6272, 32, 288, false, false, 1),
        ("linear fwd 4096x256 -> 1024", 4096, 1024, 256, false, true, threads),
        (
            "linear dw 1024x256 over 4096 rows",
            1024,
            256,
            4096,
            true,
            false,
            threads,
        ),
        ("square 2048", 2048, 2048, 2048, false, false, threads),
        // the conv VAE's linear layers at batch 64 (6272 = 128 × 7 × 7)
        ("vae enc fwd 6272 -> 64", 64, 64, 6272, false, true, threads),
        ("vae enc dx", 64, 6272, 64, false, false, threads),
        ("vae enc dw", 64, 6272, 64, true, false, threads),
        ("vae dec fwd 64 -> 6272", 64, 6272, 64, false, true, threads),
        ("vae dec dx", 64, 64, 6272, false, false, threads),
        ("vae dec dw", 6272, 64, 64, true, false, threads),
    ];
    for (label, m, n, k, ta, tb, th) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 89) as f32 - 44.0) * 0.01).collect();
        let mut c = vec![0f32; m * n];
        let (am, bm, cm) = (Mat::stored(m, k, ta), Mat::stored(k, n, tb), Mat::row_major(m, n));
        let mut line = format!("{label:<40} {m}x{n}x{k} on {th}:");
        for p in Precision::ALL {
            let flop = 2.0 * (m * n * k) as f64;
            let reps = ((4e9 / flop) as usize).clamp(3, 200);
            product(p, &a, am, &b, bm, &mut c, cm, false, th);
            let t = Instant::now();
            for _ in 0..reps {
                product(p, &a, am, &b, bm, &mut c, cm, false, th);
            }
            let g = flop * reps as f64 / t.elapsed().as_secs_f64() / 1e9;
            line.push_str(&format!(" {p} {g:.0}"));
        }
        println!("{line} GFLOP/s");
    }
}
