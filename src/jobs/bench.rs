//! `zsad bench` as a library job: the detection pipeline over a folder of images, each stage
//! timed on its own (the stages run one after another, a pass at a time, so that their times
//! add up to the time per image), with peak memory.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::pipeline::{self, Outcome, PipelineOptions, StageSeconds};
use super::prelude::DetectorOptions;
use super::reference::{BankOptions, ReferenceOptions};
use super::render::{self, OutputOptions};
use crate::choice::Choice;
use crate::data::heatmap::HeatmapScale;
use crate::data::inputs::WalkOptions;
use crate::error::{Error, OptionError, Result};
use crate::fsio::TempDir;
use crate::method::StageTimes;
use crate::progress::Console;

/// Everything `zsad bench` is asked to do.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub detector: DetectorOptions,
    /// The files `zsad detect` would write (encoded and written to a temporary folder).
    pub output: OutputOptions,
    pub reference: ReferenceOptions,
    /// Folder of images (searched recursively); the first one is also the warm-up.
    pub images: PathBuf,
    /// Passes over the images (at least 1).
    pub runs: usize,
    /// Images per model pass (0: detect's default).
    pub batch_size: usize,
}

/// Seconds per image for every stage of `zsad detect`: decoding and resizing, the model's
/// stages ([`StageTimes`]), encoding and writing the files.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stages {
    pub decode: f64,
    pub resize: f64,
    #[serde(flatten)]
    pub model: StageTimes,
    /// Map resized to the image, map and heatmap encoded (what `maps`/`heatmaps` ask for).
    pub png_encode: f64,
    pub write: f64,
}

impl Stages {
    /// The stages in pipeline order with their names, as reports print them.
    pub fn named(&self) -> [(&'static str, f64); 10] {
        let m = &self.model;
        [
            ("decode", self.decode),
            ("resize", self.resize),
            ("backbone", m.backbone),
            ("text", m.text),
            ("maps", m.maps),
            ("reference", m.reference),
            ("transfer", m.transfer),
            ("smoothing", m.smoothing),
            ("png encode", self.png_encode),
            ("write", self.write),
        ]
    }

    /// Per image: the pipeline's summed seconds and the consumer's, over `n` images.
    fn per_image(s: &StageSeconds, (png_encode, write): (f64, f64), n: f64) -> Self {
        let m = &s.model;
        Self {
            decode: s.decode / n,
            resize: s.resize / n,
            model: StageTimes {
                backbone: m.backbone / n,
                text: m.text / n,
                maps: m.maps / n,
                reference: m.reference / n,
                transfer: m.transfer / n,
                smoothing: m.smoothing / n,
            },
            png_encode: png_encode / n,
            write: write / n,
        }
    }
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
    /// With `reference`: bank rows per layer, layers, the bank's memory and the seconds to
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

impl BenchOptions {
    fn check(&self) -> Result<()> {
        self.reference.check()?;
        self.output.validate()?;
        if self.output.heatmap_scale == HeatmapScale::Run {
            return Err(OptionError::rule(
                "`heatmap_scale` run draws the heatmaps after a whole run, not per image: bench times `fixed` or `image` (the same work per image)",
            ));
        }
        if self.batch_size > pipeline::MAX_BATCH_SIZE {
            return Err(OptionError::value(
                "batch_size",
                self.batch_size,
                format!(
                    "at most {} (0 is detect's default)",
                    pipeline::MAX_BATCH_SIZE
                ),
            ));
        }
        if self.runs == 0 {
            return Err(OptionError::value("runs", 0, "must be an integer >= 1"));
        }
        Ok(())
    }
}

/// `zsad bench` as a job.
pub fn bench(opts: &BenchOptions, console: &Console) -> Result<BenchReport> {
    opts.check()?;
    let files = crate::data::inputs::walk_with(&opts.images, &WalkOptions::default())
        .map_err(|e| e.context(format!("cannot list {}", opts.images.display())))?
        .files;
    if files.is_empty() {
        return Err(OptionError::rule(format!(
            "{}: no images",
            opts.images.display()
        )));
    }
    let t0 = Instant::now();
    let plan = opts.detector.plan(&Console::silent())?;
    let bank_file = opts.reference.read_bank_file(&plan.settings)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let built = plan.build()?;
    let setup_seconds = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let mut settings = built.settings.clone();
    let (det, bank) = opts.reference.attach(
        built.detector,
        &mut settings,
        bank_file,
        &BankOptions::default(),
        &Console::silent(),
    )?;
    let reference_bank = bank.map(|b| BankReport {
        images: b.images,
        patches_per_layer: b.patches_per_layer,
        layers: b.layers,
        megabytes: b.bytes as f64 / 1e6,
        build_seconds: t2.elapsed().as_secs_f64(),
    });
    let out = TempDir::new("bench")?;
    // detect's pipeline, its stages one after another on one pass at a time (one image unless
    // `batch_size` says otherwise), so each stage's time is its own share of the time per image.
    let pipe = PipelineOptions {
        batch_size: opts.batch_size,
        overlap: false,
        ..Default::default()
    };
    // (png_encode, write) seconds, summed; reset after the warm-up.
    let spent = std::sync::Mutex::new((0.0f64, 0.0f64));
    let consume = |path: PathBuf, outcome: Outcome| -> Result<()> {
        let (image, detection) = match outcome {
            Outcome::Scored { image, detection } => (image, detection),
            Outcome::Failed(message) => return Err(Error::input(path, message)),
        };
        let t = Instant::now();
        let rendered = render::render(&opts.output, "image", &image, &detection)?;
        let encode = t.elapsed().as_secs_f64();
        let t = Instant::now();
        render::write(out.out(), &rendered)?;
        let mut s = spent.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += encode;
        s.1 += t.elapsed().as_secs_f64();
        Ok(())
    };
    pipeline::run(
        vec![files[0].clone()],
        |p| p.as_path(),
        &det,
        &pipe,
        console,
        consume,
    )
    .map_err(|e| e.context(format!("warm-up on {}", files[0].display())))?;
    *spent.lock().unwrap_or_else(|e| e.into_inner()) = (0.0, 0.0);
    let all: Vec<PathBuf> = (0..opts.runs).flat_map(|_| files.iter().cloned()).collect();
    let n = all.len() as f64;
    let start = Instant::now();
    let secs = pipeline::run(all, |p| p.as_path(), &det, &pipe, console, consume)?;
    let total = start.elapsed().as_secs_f64();
    if crate::progress::stop_requested() {
        return Err(Error::Interrupted {
            kept: String::new(),
        });
    }
    let consumed = *spent.lock().unwrap_or_else(|e| e.into_inner());
    Ok(BenchReport {
        model: opts.detector.model.model.clone(),
        preset: built.adapter.config.preset.name().to_string(),
        image_size: det.image_size(),
        images: n as usize,
        threads: rayon::current_num_threads(),
        gemm: built.loaded.model.gemm(),
        seconds_per_image: total / n,
        images_per_second: n / total,
        stages: Stages::per_image(&secs, consumed, n),
        load_seconds,
        setup_seconds,
        reference_bank,
        peak_rss_mb: crate::fsio::peak_rss_mb(),
    })
}
