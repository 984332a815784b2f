use inferlab_reference::model::bf16::{self, Bf16Rows, Bf16Vnni, Kernel};
use ndarray::Array2;
use std::time::Instant;

fn randn(r: usize, c: usize, seed: u64) -> Array2<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    Array2::from_shape_fn((r, c), |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    })
}

extern "C" {
    fn mallopt(param: i32, value: i32) -> i32;
}
fn main() {
    unsafe {
        mallopt(-3, 1 << 30);
        mallopt(-1, i32::MAX);
        mallopt(-2, 64 << 20);
    }
    let reps = 20;
    let which = std::env::args().nth(1).unwrap_or_default();
    if which.is_empty() || which == "mm" {
        for &(m, k, n) in &[
            (512, 576, 576),
            (512, 576, 1536),
            (512, 1536, 576),
            (512, 576, 192),
        ] {
            let x = randn(m, k, 1);
            let w = randn(n, k, 2);
            let t = Instant::now();
            let mut a = Bf16Rows::new(x.view());
            for _ in 1..reps {
                a = Bf16Rows::new(x.view());
            }
            let conv = t.elapsed().as_secs_f64() / reps as f64;
            let b = Bf16Vnni::from_nk(w.view());
            let _ = bf16::matmul(&a, &b, Kernel::Fast);
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(bf16::matmul(&a, &b, Kernel::Fast));
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            let fl = 2.0 * (m * k * n) as f64;
            println!(
                "matmul {m}x{k}x{n}: {:.3} ms {:.0} GFLOP/s; convert A {:.3} ms ({:.2} ns/elem)",
                dt * 1e3,
                fl / dt / 1e9,
                conv * 1e3,
                conv * 1e9 / (m * k) as f64
            );
        }
    }
    if which.is_empty() || which == "gram" {
        for &(t_, d) in &[(8192, 576), (8192, 1536)] {
            let x = randn(t_, d, 3);
            let xs: Vec<_> = x.axis_chunks_iter(ndarray::Axis(0), 512).collect();
            let _ = bf16::gram(&xs, Kernel::Fast);
            let t = Instant::now();
            for _ in 0..reps / 4 {
                std::hint::black_box(bf16::gram(&xs, Kernel::Fast));
            }
            let dt = t.elapsed().as_secs_f64() / (reps / 4) as f64;
            let fl = (t_ * d * d) as f64; // upper half of 2*t*d*d
            println!(
                "gram {t_}x{d}: {:.3} ms {:.0} GFLOP/s (upper-half flops)",
                dt * 1e3,
                fl / dt / 1e9
            );
        }
    }
}
#[allow(dead_code)]
fn _unused() {}
