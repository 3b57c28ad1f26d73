//! `cargo bench --bench report`: how `zsad report` scales with the number of images. A synthetic
//! run of N inputs (`ZSAD_BENCH_REPORT_N`, default 10,000; 64x64 PNG inputs with heatmaps and
//! masks, 2% failed) is written to a temporary folder, then timed: making the page with every
//! thumbnail, making it again with the thumbnails kept, and, where Debian's `chromium` is
//! installed, opening it headless until the first page of rows is drawn (`--dump-dom`, minus
//! the same for an empty page).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::json;
use zsad::report::{self, ReportOptions};

fn png(img: image::DynamicImage) -> Vec<u8> {
    let mut v = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
        .unwrap();
    v
}

fn synthetic_run(root: &Path, n: usize) -> PathBuf {
    let out = root.join("run");
    let inputs = root.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let mut rng = zsad::rng::SplitMix64(7);
    let mask = png(image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(
        64,
        64,
        |x, y| {
            image::Luma([if (x as i32 - 32).pow(2) + (y as i32 - 20).pow(2) < 90 {
                255
            } else {
                0
            }])
        },
    )));
    let mut lines = String::new();
    for i in 0..n {
        let name = format!("part{i:06}");
        let path = inputs.join(format!("{name}.png"));
        let v = (i % 251) as u8;
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([v, ((x * 4) as u8) ^ v, (y * 4) as u8])
        });
        std::fs::write(&path, png(image::DynamicImage::ImageRgb8(img.clone()))).unwrap();
        let rec = if i % 50 == 0 {
            json!({"path": path.to_str().unwrap(), "error": "file is truncated"})
        } else {
            let score = (rng.next_u64() % 1_000_000) as f64 / 1e6;
            let heat = png(image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(
                64,
                64,
                |x, y| image::Rgb([(x * 4) as u8, 40, (y * 4) as u8]),
            )));
            for (sub, bytes) in [("heatmaps", &heat), ("masks", &mask)] {
                let p = out.join(sub).join(format!("{name}.png"));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, bytes).unwrap();
            }
            json!({"path": path.to_str().unwrap(), "score": score, "global_score": score,
                   "map_max": score, "map_mean": 0.1, "map_min": 0.0, "anomalous": score >= 0.7,
                   "width": 64, "height": 64, "heatmap": format!("heatmaps/{name}.png"),
                   "mask": format!("masks/{name}.png"), "regions": {"count": 1, "items": []}})
        };
        lines += &format!("{rec}\n");
    }
    std::fs::write(out.join("scores.jsonl"), lines).unwrap();
    let roots = [inputs.canonicalize().unwrap().to_str().unwrap().to_string()];
    let run = json!({"record_format_version": 2,
                     "settings": {"threshold": 0.7, "model": {"spec": "synthetic"}},
                     "info": {"input_roots": roots}});
    std::fs::write(out.join("run.json"), run.to_string()).unwrap();
    out
}

/// Seconds for headless Chromium to load `url` and print its DOM (the page's script has run).
fn chromium_seconds(exe: &str, url: &str, profile: &Path) -> Option<f64> {
    let t = Instant::now();
    let o = Command::new(exe)
        .args(report::HEADLESS_CHROMIUM)
        .arg("--dump-dom")
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .ok()?;
    let dom = String::from_utf8_lossy(&o.stdout);
    (o.status.success() && (url == "about:blank" || dom.contains("<tr class=")))
        .then(|| t.elapsed().as_secs_f64())
}

fn main() {
    let n: usize = std::env::var("ZSAD_BENCH_REPORT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let root = std::env::temp_dir().join(format!("zsad-bench-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let t = Instant::now();
    let dir = synthetic_run(&root, n);
    println!(
        "synthetic run of {n} images written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let opts = ReportOptions::default();
    let quiet = zsad::progress::Console::silent();
    let t = Instant::now();
    report::build(&dir, &opts, &quiet).unwrap();
    println!(
        "zsad report, thumbnails made:  {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    report::build(&dir, &opts, &quiet).unwrap();
    println!(
        "zsad report, thumbnails kept:  {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let page = dir.join(report::FILE_NAME);
    let bytes = std::fs::metadata(&page).unwrap().len();
    println!("report.html: {:.1} MB", bytes as f64 / 1e6);
    match ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|e| Command::new(e).arg("--version").output().is_ok())
    {
        Some(exe) => {
            let profile = root.join("profile");
            let blank = chromium_seconds(exe, "about:blank", &profile);
            let full = chromium_seconds(exe, &format!("file://{}", page.display()), &profile);
            match (blank, full) {
                (Some(b), Some(f)) => println!(
                    "headless {exe}: page with its first rows drawn in {:.2} s ({:.2} s with the browser's start)",
                    f - b,
                    f
                ),
                _ => println!("headless {exe}: the page could not be loaded"),
            }
        }
        None => println!("no chromium: the page's load time is not measured"),
    }
    let _ = std::fs::remove_dir_all(&root);
}
