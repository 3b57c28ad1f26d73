//! Image-encoder forward speed on random weights of the real shapes (no downloads).
//!
//! `cargo bench --bench encoder [-- FILTER]` prints, per configuration, ms per image and the
//! achieved GFLOP/s (matmul FLOPs of the forward pass, counted analytically). Configurations:
//! ViT-B/16 at 224 px and ViT-L/14 at 518 px (the AdaCLIP/AnomalyCLIP resolution, 37x37 grid),
//! f32 (or `ZSAD_BENCH_PRECISION=bf16`), all threads of the machine, one image per pass
//! (`ZSAD_BENCH_BATCH=N`: N per pass, times per image); each also with the V-V path (`+vv`,
//! whose extra attention FLOPs are not counted) unless `ZSAD_BENCH_VV=0`. The header line
//! says `threads: T, precision: P, batch: B`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use zsad::clip::{load_model, Hooks, LoadOptions, PosInterpolation};

/// Multiply-add FLOPs of one ViT forward: patch embedding, q/k/v/out, QKᵀ and AV, MLP, proj.
fn vit_flops(
    width: usize,
    mlp: usize,
    layers: usize,
    patch: usize,
    grid: usize,
    embed: usize,
) -> f64 {
    let p = (grid * grid) as f64;
    let t = p + 1.0;
    let (d, m) = (width as f64, mlp as f64);
    let patch_embed = 2.0 * p * d * 3.0 * (patch * patch) as f64;
    let per_layer = 2.0 * t * (4.0 * d * d + 2.0 * d * m) + 4.0 * t * t * d;
    patch_embed + layers as f64 * per_layer + 2.0 * d * embed as f64
}

/// CPU seconds this process has used (all threads).
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let runs: usize = std::env::var("ZSAD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // ZSAD_BENCH_PRECISION=bf16: the `--precision bf16` numerics (bf16 weights and operands).
    let bf16 = std::env::var("ZSAD_BENCH_PRECISION").is_ok_and(|p| p == "bf16");
    // ZSAD_BENCH_BATCH=N: N images per pass (times are per image).
    let batch: usize = std::env::var("ZSAD_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // ZSAD_BENCH_VV=0: skip the +vv configurations.
    let vv_too = std::env::var("ZSAD_BENCH_VV").map_or(true, |v| v != "0");
    println!(
        "threads: {}, precision: {}, batch: {batch}",
        rayon::current_num_threads(),
        if bf16 { "bf16" } else { "f32" }
    );
    for (arch, size, vv) in [
        ("ViT-B-16", 224usize, false),
        ("ViT-B-16", 224, true),
        ("ViT-L-14-336", 518, false),
        ("ViT-L-14-336", 518, true),
    ] {
        if vv && !vv_too {
            continue;
        }
        let name = format!("{arch}@{size}{}", if vv { "+vv" } else { "" });
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let t0 = Instant::now();
        let mut model = load_model(&format!("random:{arch}"), &LoadOptions::default())
            .unwrap()
            .model;
        if bf16 {
            model.use_bf16().unwrap();
        }
        let load_s = t0.elapsed().as_secs_f64();
        let vision = model
            .vision
            .at_image_size(size, PosInterpolation::Bicubic)
            .unwrap();
        let c = vision.config();
        let flops = vit_flops(
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.patch_size,
            vision.grid(),
            model.config.projection_dim,
        );
        let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let taps: Vec<usize> = (1..=4).map(|q| q * c.num_hidden_layers / 4).collect();
        // "+vv": AnomalyCLIP's V-V path from layer depth/4 (6 of 24), one more attention per layer.
        let hooks = Hooks {
            taps: &taps,
            vv_from: vv.then_some(c.num_hidden_layers / 4),
            ..Default::default()
        };
        vision.forward(&x, &hooks).unwrap(); // warm-up
        let mut times = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..runs {
            let (t, c) = (Instant::now(), cpu_seconds());
            let out = vision.forward(&x, &hooks).unwrap();
            out.pooled.to_vec2::<f32>().unwrap();
            times.push(t.elapsed().as_secs_f64() / batch as f64);
            cpu.push((cpu_seconds() - c) / batch as f64);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        cpu.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = times[times.len() / 2];
        // The CPU time (all threads) says what a pass costs when other work shares the cores.
        println!(
            "{name:<18} {:>9.1} ms/image (median of {runs}, min {:.1})  {:>7.1} GFLOP/s  ({:.0} GFLOP/pass, random weights built in {:.1} s; CPU {:.1} ms/image median)",
            median * 1e3,
            times[0] * 1e3,
            flops / median / 1e9,
            flops / 1e9,
            load_s,
            cpu[cpu.len() / 2] * 1e3
        );
    }
}
