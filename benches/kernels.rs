//! GEMM and attention kernel speed: `cargo bench --bench kernels [--features onednn]`.
//!
//! Prints GFLOP/s of the backbone's f32 GEMM (`zsad::clip::kernels::gemm_backend()`, each f32
//! kernel this CPU has) on the shapes of a ViT-B/16 at 224 px and a ViT-L/14 at 518 px (1370
//! tokens x 1024 -> 4096, as in the 1024 x 1024 @ 1024 x 4096), the `gemm` crate (or
//! oneDNN with `--features onednn`) and candle's own matmul on the same shapes, the bf16 units,
//! and the fused attention. Filters: `linear`, `f32`, `layout`, `bf16`, `attention`, and two
//! that run only when named: `epilogue` (fc1's bias + QuickGELU epilogue against the bare
//! product) and `peak` (the vector units' multiply-add ceiling, to read the rest against).

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

/// The smallest CPU time (all threads) of `runs` calls: on a host shared with other work this
/// says what the kernel costs better than wall time does.
fn best_cpu_of<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let t = cpu_seconds();
            f();
            cpu_seconds() - t
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
        "threads: {}, f32 kernel: {}, reference GEMM: {}",
        rayon::current_num_threads(),
        kernels::gemm_backend(),
        kernels::reference_backend()
    );
    let shapes = [
        (197usize, 768usize, 2304usize),
        (197, 768, 3072),
        (197, 3072, 768),
        (1024, 1024, 4096),
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
        let ws = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut line = format!("linear {m}x{k} -> {n}:");
        for &kernel in zsad::clip::gemm_f32::available() {
            let packed = kernels::PackedW::pack(
                kernels::MatRef {
                    data: &ws,
                    rs: 1,
                    cs: k,
                },
                k,
                n,
                kernel,
            );
            let ours = best_of(5, || {
                kernels::linear(
                    &x,
                    kernels::Weight::F32(&packed),
                    Some(&b),
                    kernels::Epilogue::None,
                )
                .unwrap();
            });
            line += &format!(" {} {:>6.1},", kernel.name(), flop / ours / 1e9);
        }
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut c = vec![0f32; m * n];
        let reference = best_of(5, || {
            kernels::gemm(
                m,
                n,
                k,
                kernels::MatRef {
                    data: &xs,
                    rs: k,
                    cs: 1,
                },
                kernels::MatRef {
                    data: &ws,
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
        let wt = w.t().unwrap();
        let candle = best_of(5, || {
            x.matmul(&wt).unwrap().broadcast_add(&b).unwrap();
        });
        println!(
            "{line} {} {:>6.1}, candle matmul + bias {:>6.1} GFLOP/s",
            kernels::reference_backend(),
            flop / reference / 1e9,
            flop / candle / 1e9
        );
    }
    // "f32": the selected f32 kernel alone, per shape (quick comparisons).
    for (m, k, n) in shapes.into_iter().filter(|_| filter.as_str() == "f32") {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w: Vec<f32> = Tensor::randn(0f32, 1.0, (n, k), &dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let packed = kernels::PackedW::from_weight(&w, n, k);
        let run = || {
            kernels::linear(
                &x,
                kernels::Weight::F32(&packed),
                Some(&b),
                kernels::Epilogue::None,
            )
            .unwrap();
        };
        let (t, cpu) = (best_of(7, run), best_cpu_of(7, run));
        let flop = 2.0 * (m * n * k) as f64;
        println!(
            "f32 {m}x{k} -> {n}: {:>6.1} GFLOP/s, {:>6.1} GFLOP per CPU-second",
            flop / t / 1e9,
            flop / cpu / 1e9
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
    // bf16: the linear layer on a packed bf16 weight, per bf16 unit this CPU has, against the
    // emulation (f32 GEMM of rounded operands), on the same shapes.
    let units = zsad::clip::gemm_bf16::available();
    if "bf16".contains(filter.as_str()) && units.is_empty() {
        println!("bf16: this CPU has no bf16 unit (AMX or AVX512-BF16); only the emulation runs");
    }
    for (m, k, n) in shapes
        .into_iter()
        .filter(|_| "bf16".contains(filter.as_str()))
    {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let flop = 2.0 * (m * n * k) as f64;
        let mut rounded = kernels::PackedW::from_weight(
            &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            n,
            k,
        );
        rounded.round_bf16();
        let emulated = best_of(5, || {
            kernels::linear(
                &x,
                kernels::Weight::RoundedF32(&rounded),
                Some(&b),
                kernels::Epilogue::None,
            )
            .unwrap();
        });
        let mut line = format!(
            "bf16 linear {m}x{k} -> {n}: emulated {:>6.1} GFLOP/s",
            flop / emulated / 1e9
        );
        let wb = w.to_dtype(candle_core::DType::BF16).unwrap();
        let packed =
            kernels::PackedB::from_weight(&wb.flatten_all().unwrap().to_vec1().unwrap(), n, k);
        for &unit in units {
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut c = vec![0f32; m * n];
            let g = best_of(10, || {
                zsad::clip::gemm_bf16::gemm(
                    unit,
                    m,
                    kernels::MatRef {
                        data: &xs,
                        rs: k,
                        cs: 1,
                    },
                    &packed,
                    &mut c,
                    n,
                    1.0,
                    false,
                    true,
                )
            });
            line += &format!(", {} GEMM alone {:>6.1}", unit.name(), flop / g / 1e9);
            let t = best_of(10, || {
                kernels::linear(
                    &x,
                    kernels::Weight::Packed(&packed, unit),
                    Some(&b),
                    kernels::Epilogue::None,
                )
                .unwrap();
            });
            line += &format!(", {} {:>6.1} GFLOP/s", unit.name(), flop / t / 1e9);
        }
        println!("{line}");
    }
    // "peak": the vector units' ceiling, for reading the GFLOP/s above as a fraction of it.
    if filter == "peak" {
        peak();
        return;
    }
    // "epilogue": ViT-B/16's fc1 (197 x 768 -> 3072) with bias and QuickGELU against the bare
    // product, alternating passes, best of each: the difference is what the activation epilogue
    // costs. f32 through `linear`; bf16 into packed rows (`gemm_to_packed`, as the MLP runs it).
    if filter == "epilogue" {
        let (m, k, n) = (197usize, 768usize, 3072usize);
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w: Vec<f32> = Tensor::randn(0f32, 1.0, (n, k), &dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let bias = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let bias_v = bias.to_vec1::<f32>().unwrap();
        let packed = kernels::PackedW::from_weight(&w, n, k);
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let packed_b = kernels::PackedB::from_f32(
            kernels::MatRef {
                data: &wt,
                rs: n,
                cs: 1,
            },
            k,
            n,
            true,
        );
        let mut rows = kernels::PackedRows::default();
        let mut run = |act: kernels::Act, unit: Option<kernels::Kernel>| match unit {
            None => {
                let b = (act != kernels::Act::None).then_some(&bias);
                kernels::linear(&x, kernels::Weight::F32(&packed), b, act).unwrap();
            }
            Some(unit) => {
                let epi = kernels::Epi {
                    bias: (act != kernels::Act::None).then_some(&bias_v[..]),
                    act,
                    ..Default::default()
                };
                let a = kernels::ASrc::View(kernels::MatRef {
                    data: &xs,
                    rs: k,
                    cs: 1,
                });
                kernels::gemm_to_packed(unit, m, a, &packed_b, &epi, &mut rows, true);
            }
        };
        let mut variants = vec![None];
        variants.extend(units.iter().map(|&u| Some(u)));
        for unit in variants {
            let (mut bare, mut gelu) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..40 {
                bare = bare.min(best_of(1, || run(kernels::Act::None, unit)));
                gelu = gelu.min(best_of(1, || run(kernels::Act::QuickGelu, unit)));
            }
            println!(
                "epilogue {m}x{k} -> {n} ({}): bare {:.3} ms, bias + QuickGELU {:.3} ms, \
                 epilogue {:.2} ns per value",
                unit.map_or("f32".to_string(), |u| u.name().to_string()),
                bare * 1e3,
                gelu * 1e3,
                (gelu - bare) / (m * n) as f64 * 1e9
            );
        }
        return;
    }
    if !"attention".contains(filter.as_str()) {
        return;
    }
    let (l, heads, hd) = (1370usize, 16usize, 64usize);
    let qkv = Tensor::randn(0f32, 1.0, (1, l, 3 * heads * hd), &dev).unwrap();
    let flop = 4.0 * (l * l * heads * hd) as f64;
    let mut precisions = vec![kernels::Precision::F32];
    precisions.extend(units.iter().map(|&u| kernels::Precision::Bf16(u)));
    for precision in precisions {
        let t = best_of(10, || {
            kernels::attention_first_queries(
                &qkv,
                heads,
                0.125,
                None,
                kernels::ORDINARY,
                l,
                precision,
            )
            .unwrap();
        });
        println!(
            "attention {heads} heads x {l} tokens ({}): {:.1} ms, {:.1} GFLOP/s",
            precision.gemm_name(),
            t * 1e3,
            flop / t / 1e9
        );
    }
}

/// Multiply-add throughput with no memory traffic: 14 independent accumulator chains per thread
/// (enough to cover the latency of two FMA ports), on one thread and on every thread, for each
/// instruction this CPU has: AVX-512 and AVX2 `vfmadd` (f32) and `vdpbf16ps` (bf16 pairs).
fn peak() {
    #[cfg(target_arch = "x86_64")]
    {
        const ITERS: usize = 50_000_000;
        // Written in assembly: compiled from intrinsics, LLVM rotated the 16 accumulators
        // through register moves and a stack slot, and measured its own shuffling.
        macro_rules! chains {
            ($name:ident, $features:literal, $op:literal, $reg:literal) => {
                #[target_feature(enable = $features)]
                unsafe fn $name() {
                    std::arch::asm!(
                        "2:",
                        concat!($op, " ", $reg, "0, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "1, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "2, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "3, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "4, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "5, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "6, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "7, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "8, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "9, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "10, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "11, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "12, ", $reg, "14, ", $reg, "15"),
                        concat!($op, " ", $reg, "13, ", $reg, "14, ", $reg, "15"),
                        "dec {n}",
                        "jnz 2b",
                        n = inout(reg) ITERS => _,
                        out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                        out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                        out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                        out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                        options(nostack, nomem),
                    );
                }
            };
        }
        chains!(fma512, "avx512f,fma", "vfmadd231ps", "zmm");
        chains!(fma256, "avx2,fma", "vfmadd231ps", "ymm");
        chains!(dpbf16, "avx512f,avx512bf16", "vdpbf16ps", "zmm");
        /// A unit's name, FLOP per instruction, instructions per iteration, and its loop.
        type Unit = (&'static str, f64, f64, unsafe fn());
        let mut units: Vec<Unit> = Vec::new();
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            units.push(("f32 AVX-512 vfmadd", 32.0, 14.0, fma512));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            units.push(("f32 AVX2 vfmadd", 16.0, 14.0, fma256));
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
            units.push(("bf16 vdpbf16ps", 64.0, 14.0, dpbf16));
        }
        let all = std::thread::available_parallelism().map_or(1, |n| n.get());
        for (name, flop, per_iter, run) in units {
            let mut line = format!("peak {name}:");
            for threads in [1, all] {
                let t0 = std::time::Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        // SAFETY: the features `run` needs were detected above.
                        s.spawn(move || unsafe { run() });
                    }
                });
                let gflops =
                    (threads * ITERS) as f64 * per_iter * flop / t0.elapsed().as_secs_f64() / 1e9;
                line += &format!(" {threads} thread(s) {gflops:.0} GFLOP/s,");
            }
            println!("{}", line.trim_end_matches(','));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("peak: x86-64 only");
}
