//! `cargo bench --bench pipeline`: the CPU that `zsad detect` spends on an image outside the
//! model, stage by stage, on one thread: decoding, the CLIP preprocessing, the map's smoothing
//! (σ = 4 at 224), the map at the image's size and its statistics, the map PNG (and `.npy`),
//! drawing and encoding the heatmap, and all of `render` together. On two cores this work
//! competes with the backbone for the same CPUs, so every millisecond here is throughput
//! (issue 25's `detect` against the backbone).
//!
//! The image is MVTec bottle `test/broken_large/000.png` (900x900) from `../shared` where it is
//! present, else a synthetic 900x900 picture; the map is a smooth 224x224 blob. Each stage runs
//! `ZSAD_BENCH_RUNS` times (default 20); the median and the fastest run are printed. A filter
//! argument keeps the stages whose name contains it.

use std::path::Path;
use std::time::Instant;

use zsad::data::heatmap::ValueRange;
use zsad::data::image::DecodeLimits;
use zsad::jobs::render::{self, MapStats, OutputOptions};
use zsad::method::detector::Detection;

const SHARED_IMAGE: &str = "../shared/data/mvtec_ad/bottle/test/broken_large/000.png";

fn time<R>(name: &str, runs: usize, filter: &str, mut f: impl FnMut() -> R) {
    if !name.contains(filter) {
        return;
    }
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    println!(
        "{name:<22} {:>8.2} ms median {:>8.2} ms fastest",
        t[t.len() / 2],
        t[0]
    );
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let runs: usize = std::env::var("ZSAD_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
        .max(1);
    let tmp = std::env::temp_dir().join(format!("zsad-pipeline-bench-{}", std::process::id()));
    let path = if Path::new(SHARED_IMAGE).is_file() {
        Path::new(SHARED_IMAGE).to_path_buf()
    } else {
        eprintln!("{SHARED_IMAGE} is missing: timing a synthetic 900x900 picture instead");
        let img = image::RgbImage::from_fn(900, 900, |x, y| {
            let v = ((x as f32 * 0.05).sin() * 60.0 + (y as f32 * 0.03).cos() * 60.0 + 128.0) as u8;
            image::Rgb([v, v / 2 + (x % 7) as u8, 255 - v])
        });
        std::fs::create_dir_all(&tmp).unwrap();
        let p = tmp.join("synthetic.png");
        img.save(&p).unwrap();
        p
    };
    let limits = DecodeLimits::default();
    let rgb = zsad::data::image::decode_rgb(&path, &limits).unwrap();
    let (w, h) = rgb.dimensions();
    let size = 224;
    let map: Vec<f32> = (0..size * size)
        .map(|i| {
            let (x, y) = ((i % size) as f32 - 150.0, (i / size) as f32 - 80.0);
            0.2 + 0.7 * (-(x * x + y * y) / 800.0).exp()
        })
        .collect();
    let det = Detection {
        global: 0.5,
        score: 0.5,
        map,
        size,
    };
    let opts = OutputOptions::default();
    let full = render::map_at_image_size(&det, w, h);
    let heat = render::draw_heatmap(&opts, &full, (w, h), Some(&rgb), None, ValueRange::UNIT);
    println!(
        "{} ({w}x{h}), {runs} runs per stage, one thread",
        path.display()
    );
    time("decode", runs, &filter, || {
        zsad::data::image::decode_rgb(&path, &limits).unwrap()
    });
    time("preprocess", runs, &filter, || {
        zsad::clip::preprocess::preprocess(&rgb, size, &candle_core::Device::Cpu).unwrap()
    });
    time("smoothing", runs, &filter, || {
        zsad::method::maps::gaussian_filter(&det.map, size, size, 4.0)
    });
    time("map_at_image_size", runs, &filter, || {
        render::map_at_image_size(&det, w, h)
    });
    time("map_stats", runs, &filter, || MapStats::of(&full));
    time("map_png", runs, &filter, || {
        zsad::data::outputs::map_png(&full, w, h).unwrap()
    });
    time("map_npy", runs, &filter, || {
        zsad::data::outputs::map_npy(&full, w, h)
    });
    time("heatmap_draw", runs, &filter, || {
        render::draw_heatmap(&opts, &full, (w, h), Some(&rgb), None, ValueRange::UNIT)
    });
    time("heatmap_png", runs, &filter, || {
        zsad::data::outputs::png_bytes_rgb(&heat).unwrap()
    });
    time("render", runs, &filter, || {
        render::render(&opts, "image", &rgb, &det).unwrap()
    });
    let _ = std::fs::remove_dir_all(&tmp);
}
