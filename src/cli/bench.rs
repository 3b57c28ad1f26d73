//! `zsad bench`: the detection pipeline over a folder of images, timed per stage.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use super::detect::{render_outputs, write_rendered, OutputArgs};
use super::detector_args::{tokenizer, DetectorArgs};
use crate::method::{Detector, StageTimes, TextInputs};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub detector: DetectorArgs,
    /// The files `zsad detect` would write (encoded and written to a temporary folder)
    #[command(flatten)]
    pub output: OutputArgs,
    /// Folder of images to run over (searched recursively); the first one is also the warm-up
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Passes over the images
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub runs: usize,
    /// Print one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Seconds per image for every stage of `zsad detect`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stages {
    pub decode: f64,
    pub resize: f64,
    pub backbone: f64,
    pub text: f64,
    pub maps: f64,
    pub smoothing: f64,
    /// Map resized to the image, map and heatmap encoded (what `--maps`/`--heatmaps` ask for).
    pub png_encode: f64,
    pub write: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub preset: String,
    pub image_size: usize,
    pub images: usize,
    pub threads: usize,
    pub seconds_per_image: f64,
    pub images_per_second: f64,
    pub stages: Stages,
    /// One-time costs: weights and detector set-up (text encoded once included).
    pub load_seconds: f64,
    pub setup_seconds: f64,
    pub peak_rss_mb: Option<f64>,
}

/// Peak resident set size of this process (Linux `VmHWM`), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let files = crate::data::inputs::walk(&args.images)
        .with_context(|| format!("cannot list {}", args.images.display()))?;
    if files.is_empty() {
        bail!("{}: no images", args.images.display());
    }
    let t0 = Instant::now();
    let (loaded, adapter) = args.detector.setup(true)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let tok = tokenizer(&args.detector.tokenizer, &loaded)?;
    let det = Detector::new(
        &loaded.model,
        &adapter,
        TextInputs::build(&adapter.config, &tok)?,
    )?;
    let setup_seconds = t1.elapsed().as_secs_f64();
    let size = det.image_size();
    let out = tempdir()?;

    let mut stages = Stages::default();
    let mut inner = StageTimes::default();
    let mut count = 0usize;
    let mut total = 0.0;
    // The first image once as a warm-up, then every image `runs` times.
    let order = std::iter::once((true, &files[0]))
        .chain((0..args.runs).flat_map(|_| files.iter().map(|f| (false, f))));
    for (warm_up, path) in order {
        let start = Instant::now();
        let mut st = Stages::default();
        let mut it = StageTimes::default();
        let t = Instant::now();
        let img = crate::data::image::decode(path)?;
        st.decode = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let rgb = crate::data::image::to_rgb8(&img);
        let px = crate::clip::preprocess::preprocess(&rgb, size, det.device())?.unsqueeze(0)?;
        st.resize = t.elapsed().as_secs_f64();
        let d = det.detect_timed(&px, Some(&mut it))?.remove(0);
        let t = Instant::now();
        let rendered = render_outputs(&args.output, Path::new("image"), &rgb, &d)?;
        st.png_encode = t.elapsed().as_secs_f64();
        let t = Instant::now();
        write_rendered(&out, &rendered)?;
        st.write = t.elapsed().as_secs_f64();
        if !warm_up {
            count += 1;
            total += start.elapsed().as_secs_f64();
            for (acc, v) in [
                (&mut stages.decode, st.decode),
                (&mut stages.resize, st.resize),
                (&mut stages.png_encode, st.png_encode),
                (&mut stages.write, st.write),
                (&mut inner.backbone, it.backbone),
                (&mut inner.text, it.text),
                (&mut inner.maps, it.maps),
                (&mut inner.smoothing, it.smoothing),
            ] {
                *acc += v;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    let n = count as f64;
    stages.backbone = inner.backbone;
    stages.text = inner.text;
    stages.maps = inner.maps;
    stages.smoothing = inner.smoothing;
    for v in [
        &mut stages.decode,
        &mut stages.resize,
        &mut stages.backbone,
        &mut stages.text,
        &mut stages.maps,
        &mut stages.smoothing,
        &mut stages.png_encode,
        &mut stages.write,
    ] {
        *v /= n;
    }
    let report = BenchReport {
        model: args.detector.model.model.clone(),
        preset: adapter.config.preset.name().to_string(),
        image_size: size,
        images: count,
        threads: rayon::current_num_threads(),
        seconds_per_image: total / n,
        images_per_second: n / total,
        stages,
        load_seconds,
        setup_seconds,
        peak_rss_mb: peak_rss_mb(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let s = &report.stages;
        println!(
            "{} {} @ {} px, {} images, {} threads",
            report.model, report.preset, report.image_size, report.images, report.threads
        );
        println!(
            "{:.4} s per image, {:.2} images per second (after one warm-up image)",
            report.seconds_per_image, report.images_per_second
        );
        for (name, v) in [
            ("decode", s.decode),
            ("resize", s.resize),
            ("backbone", s.backbone),
            ("text", s.text),
            ("maps", s.maps),
            ("smoothing", s.smoothing),
            ("png encode", s.png_encode),
            ("write", s.write),
        ] {
            println!(
                "  {name:<11} {:>9.4} s  {:>5.1}%",
                v,
                100.0 * v / report.seconds_per_image
            );
        }
        println!(
            "load {:.2} s, set-up {:.2} s, peak RSS {}",
            report.load_seconds,
            report.setup_seconds,
            report
                .peak_rss_mb
                .map(|m| format!("{m:.0} MB"))
                .unwrap_or_else(|| "n/a".into())
        );
    }
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("zsad-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}
