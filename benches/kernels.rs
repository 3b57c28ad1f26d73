//! GEMM and attention kernel speed: `cargo bench --bench kernels [--features onednn]`.
//!
//! Prints GFLOP/s of the backbone GEMM backend (`zsad::clip::kernels::gemm_backend()`) on the
//! shapes of a ViT-L/14 at 518 px (1370 tokens x 1024 -> 4096, as in the 1024 x 1024 @
//! 1024 x 4096), candle's own matmul on the same shapes, and the fused attention.

use std::time::Instant;

use candle_core::{Device, Tensor};
use zsad::clip::kernels;

fn best_of<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let dev = Device::Cpu;
    println!(
        "threads: {}, backend: {}",
        rayon::current_num_threads(),
        kernels::gemm_backend()
    );
    let shapes = [
        (1024usize, 1024usize, 4096usize),
        (1370, 1024, 4096),
        (1370, 4096, 1024),
        (1370, 1024, 3072),
    ];
    for (m, k, n) in shapes
        .into_iter()
        .filter(|_| "linear".contains(filter.as_str()))
    {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let flop = 2.0 * (m * n * k) as f64;
        let ours = best_of(5, || {
            kernels::linear(&x, &w, Some(&b), kernels::Epilogue::None).unwrap();
        });
        let wt = w.t().unwrap();
        let candle = best_of(5, || {
            x.matmul(&wt).unwrap().broadcast_add(&b).unwrap();
        });
        println!(
            "linear {m}x{k} -> {n}: {:>6.1} GFLOP/s ({}), candle matmul + bias {:>6.1} GFLOP/s",
            flop / ours / 1e9,
            kernels::gemm_backend(),
            flop / candle / 1e9
        );
    }
    // Weight layout: [out, in] as stored (read transposed) vs pre-transposed [in, out].
    for (m, k, n) in [
        (197usize, 768usize, 2304usize),
        (197, 768, 3072),
        (1370, 1024, 4096),
    ]
    .into_iter()
    .filter(|_| "layout".contains(filter.as_str()))
    {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32).collect();
        let mut c = vec![0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64;
        let xr = kernels::MatRef {
            data: &x,
            rs: k,
            cs: 1,
        };
        let stored = best_of(10, || {
            kernels::gemm(
                m,
                n,
                k,
                xr,
                kernels::MatRef {
                    data: &w,
                    rs: 1,
                    cs: k,
                },
                &mut c,
                n,
                1.0,
                false,
                true,
            )
        });
        let pre = best_of(10, || {
            kernels::gemm(
                m,
                n,
                k,
                xr,
                kernels::MatRef {
                    data: &w,
                    rs: n,
                    cs: 1,
                },
                &mut c,
                n,
                1.0,
                false,
                true,
            )
        });
        println!(
            "layout {m}x{k} -> {n}: [out, in] {:.1} GFLOP/s, [in, out] {:.1} GFLOP/s",
            flop / stored / 1e9,
            flop / pre / 1e9
        );
    }
    if !"attention".contains(filter.as_str()) {
        return;
    }
    let (l, heads, hd) = (1370usize, 16usize, 64usize);
    let qkv = Tensor::randn(0f32, 1.0, (1, l, 3 * heads * hd), &dev).unwrap();
    let t = best_of(10, || {
        kernels::attention(&qkv, heads, 0.125, None, kernels::ORDINARY).unwrap();
    });
    let flop = 4.0 * (l * l * heads * hd) as f64;
    println!(
        "attention {heads} heads x {l} tokens: {:.1} ms, {:.1} GFLOP/s",
        t * 1e3,
        flop / t / 1e9
    );
}
