//! `zsad bench`: the detection pipeline over a folder of images, timed per stage.

use crate::choice::Choice;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use super::detect::OutputArgs;
use super::detector_args::{tokenizer, DetectorArgs};
use super::reference::ReferenceArgs;
use crate::batch::pipeline::{self, Outcome, PipelineOptions};
use crate::batch::render;
use crate::data::inputs::WalkOptions;
use crate::method::{Detector, TextInputs};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub detector: DetectorArgs,
    /// The files `zsad detect` would write (encoded and written to a temporary folder)
    #[command(flatten)]
    pub output: OutputArgs,
    /// Normal images or a bank, as for detect: the nearest-patch search is timed as its own
    /// stage, and the bank's size and set-up reported
    #[command(flatten)]
    pub reference: ReferenceArgs,
    /// Folder of images to run over (searched recursively); the first one is also the warm-up
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Passes over the images (at least 1)
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = super::flags::at_least(1))]
    pub runs: usize,
    /// Images per model pass: 1 (default) times each stage one image at a time; 0 is detect's
    /// default (about 1024 tokens on a CPU, what half the free memory holds on a GPU), where
    /// throughput on a GPU comes from
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub batch_size: usize,
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
    /// Nearest-patch search in the reference bank and its map (`--reference`).
    pub reference: f64,
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
    /// The GEMM path the backbone ran on (`amx-bf16`, `avx512-bf16`, `gemm`, ...; see
    /// `ClipModel::gemm`).
    pub gemm: String,
    pub seconds_per_image: f64,
    pub images_per_second: f64,
    pub stages: Stages,
    /// One-time costs: weights and detector set-up (text encoded once included).
    pub load_seconds: f64,
    pub setup_seconds: f64,
    /// With `--reference`: bank rows per layer, layers, the bank's memory and the seconds to
    /// build (or read) it.
    pub reference_bank: Option<BankReport>,
    pub peak_rss_mb: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct BankReport {
    pub images: usize,
    pub patches_per_layer: usize,
    pub layers: usize,
    pub megabytes: f64,
    pub build_seconds: f64,
}

/// Peak resident set size of this process (Linux `VmHWM`), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.reference.check()?;
    let output = args.output.options();
    output.validate()?;
    if output.heatmap_scale == crate::data::heatmap::HeatmapScale::Run {
        bail!("--heatmap-scale run draws the heatmaps after a whole run, not per image: bench times `fixed` or `image` (the same work per image)");
    }
    let files = crate::data::inputs::walk_with(&args.images, WalkOptions::default())
        .with_context(|| format!("cannot list {}", args.images.display()))?
        .files;
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
    let t2 = Instant::now();
    let mut settings = args.detector.run_settings(&loaded, &adapter)?;
    let limits = crate::data::image::DecodeLimits::default();
    let (det, bank) = args.reference.attach(det, &mut settings, limits, 0, true)?;
    let reference_bank = bank.map(|b| BankReport {
        images: b.images,
        patches_per_layer: b.patches_per_layer,
        layers: b.layers,
        megabytes: b.bytes as f64 / 1e6,
        build_seconds: t2.elapsed().as_secs_f64(),
    });
    let size = det.image_size();
    let out = tempdir()?;

    // detect's pipeline, its stages one after another on one pass at a time (one image unless
    // --batch-size says otherwise), so each stage's time is its own share of the time per image.
    if args.batch_size > pipeline::MAX_BATCH_SIZE {
        bail!(
            "--batch-size {}: at most {} (0 is detect's default)",
            args.batch_size,
            pipeline::MAX_BATCH_SIZE
        );
    }
    let opts = PipelineOptions {
        batch_size: args.batch_size,
        overlap: false,
        ..Default::default()
    };
    // (png_encode, write) seconds, summed; reset after the warm-up.
    let spent = std::sync::Mutex::new((0.0f64, 0.0f64));
    let consume = |path: PathBuf, outcome: Outcome| -> crate::Result<()> {
        let (image, detection) = match outcome {
            Outcome::Scored { image, detection } => (image, detection),
            Outcome::Failed(message) => return Err(crate::Error::Image { path, message }),
        };
        let t = Instant::now();
        let rendered = render::render(&output, "image", &image, &detection)?;
        let encode = t.elapsed().as_secs_f64();
        let t = Instant::now();
        render::write(&out, &rendered)?;
        let mut s = spent.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += encode;
        s.1 += t.elapsed().as_secs_f64();
        Ok(())
    };
    pipeline::run(
        vec![files[0].clone()],
        |p| p.as_path(),
        &det,
        &opts,
        consume,
    )
    .with_context(|| format!("warm-up on {}", files[0].display()))?;
    *spent.lock().unwrap_or_else(|e| e.into_inner()) = (0.0, 0.0);
    let all: Vec<PathBuf> = (0..args.runs).flat_map(|_| files.iter().cloned()).collect();
    let count = all.len();
    let start = Instant::now();
    let secs = pipeline::run(all, |p| p.as_path(), &det, &opts, consume)?;
    let total = start.elapsed().as_secs_f64();
    let (png_encode, write) = *spent.lock().unwrap_or_else(|e| e.into_inner());
    let mut stages = Stages {
        decode: secs.decode,
        resize: secs.resize,
        backbone: secs.model.backbone,
        text: secs.model.text,
        maps: secs.model.maps,
        reference: secs.model.reference,
        smoothing: secs.model.smoothing,
        png_encode,
        write,
    };
    let _ = std::fs::remove_dir_all(&out);
    let n = count as f64;
    for v in [
        &mut stages.decode,
        &mut stages.resize,
        &mut stages.backbone,
        &mut stages.text,
        &mut stages.maps,
        &mut stages.reference,
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
        gemm: loaded.model.gemm(),
        seconds_per_image: total / n,
        images_per_second: n / total,
        stages,
        load_seconds,
        setup_seconds,
        reference_bank,
        peak_rss_mb: peak_rss_mb(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let s = &report.stages;
        println!(
            "{} {} @ {} px, {} images, {} threads, gemm {}",
            report.model,
            report.preset,
            report.image_size,
            report.images,
            report.threads,
            report.gemm
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
            ("reference", s.reference),
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
        if let Some(b) = &report.reference_bank {
            println!(
                "reference bank: {} image(s), {} patches x {} layer(s), {:.1} MB, built in {:.2} s",
                b.images, b.patches_per_layer, b.layers, b.megabytes, b.build_seconds
            );
        }
    }
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("zsad-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}
