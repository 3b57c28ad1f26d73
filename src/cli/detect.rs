//! `zsad detect`: parses the options, loads the model and runs the library's detect job
//! ([`crate::batch::detect`]); the outcome becomes the exit status.

use std::path::PathBuf;

use clap::Args;

use super::detector_args::DetectorArgs;
use super::reference::ReferenceArgs;
use super::{EXIT_OK, EXIT_SOME_FAILED};
use crate::batch::detect::{DetectJob, DetectOptions};
use crate::batch::pipeline::PipelineOptions;
use crate::batch::render::OutputOptions;
use crate::data::heatmap::{HeatmapKind, HeatmapScale};
use crate::data::image::DecodeLimits;
use crate::data::inputs::{Shard, WalkOptions};
use crate::data::outputs::{MapFormat, RecordFormat};
use crate::decision::thresholds::ThresholdFile;

/// The files written per input (shared with `zsad bench`, which times producing them).
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Anomaly map files under DIR/maps/, at each image's own size
    #[arg(long, value_enum, default_value = "png")]
    pub maps: MapFormat,
    /// Heatmaps under DIR/heatmaps/ (inferno colormap, on --heatmap-scale); with a pixel
    /// threshold, overlays outline the defect mask in cyan
    #[arg(long, value_enum, default_value = "overlay")]
    pub heatmaps: HeatmapKind,
    /// The map values at the colormap's ends
    #[arg(long, value_enum, default_value = "fixed", value_name = "SCALE")]
    pub heatmap_scale: HeatmapScale,
    /// A colour bar beside each heatmap, labelled with its scale's values (the heatmap is then
    /// wider than the image)
    #[arg(long)]
    pub colorbar: bool,
    /// Opacity of the colour in overlay heatmaps, in [0, 1]
    #[arg(
        long,
        default_value_t = 0.5,
        value_name = "A",
        allow_negative_numbers = true
    )]
    pub heatmap_alpha: f32,
}

impl OutputArgs {
    pub fn options(&self) -> OutputOptions {
        OutputOptions {
            maps: self.maps,
            heatmaps: self.heatmaps,
            heatmap_alpha: self.heatmap_alpha,
            heatmap_scale: self.heatmap_scale,
            colorbar: self.colorbar,
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct DetectArgs {
    /// Images, folders (searched recursively for png/jpg/jpeg/bmp/tif/tiff/webp) or `-` to read
    /// one path per line from stdin
    #[arg(value_name = "INPUT", required = true)]
    pub inputs: Vec<String>,
    #[command(flatten)]
    pub detector: DetectorArgs,
    #[command(flatten)]
    pub reference: ReferenceArgs,
    /// Output folder (created); the input folders are never written to
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Record file format: DIR/scores.jsonl or DIR/scores.csv
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: RecordFormat,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Adds `"anomalous": score >= T` to every record (T in [0, 1])
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    pub threshold: Option<f32>,
    /// Writes a defect mask per image (masks/NAME.png: 255 where the map is >= P, at the
    /// image's size) and `regions` in every record (P in [0, 1])
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub pixel_threshold: Option<f32>,
    /// The image and pixel thresholds of `zsad calibrate` (instead of --threshold and
    /// --pixel-threshold); refused when calibrated with another model, adapter or detector
    /// setting
    #[arg(long, value_name = "thresholds.json", conflicts_with_all = ["threshold", "pixel_threshold"])]
    pub thresholds: Option<PathBuf>,
    /// Use --thresholds although they were calibrated with other settings
    #[arg(long, requires = "thresholds")]
    pub force_thresholds: bool,
    /// Drop defect regions smaller than N pixels from the masks and the records' regions
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub min_region_area: u64,
    /// Continue a run: skip inputs that already have a record (scored or failed)
    #[arg(long)]
    pub resume: bool,
    /// With --resume: score failed inputs again, replacing their records
    #[arg(long)]
    pub retry_failed: bool,
    /// Start again: remove the earlier run's records, run.json and the map and heatmap files
    /// its records name
    #[arg(long)]
    pub overwrite: bool,
    /// Score only shard K of N (0-based), chosen by a stable hash of each path, so N machines
    /// split a dataset; give each its own --out and join them with `zsad merge`
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Shard>,
    /// Images per model pass, at most 256; 0 = about 1024 tokens per pass, at most 8 (ViT-B/16
    /// at 224: 5 images, 16% less time per image on a CPU than one at a time; ViT-L at 518: 1).
    /// Scores do not depend on it beyond float rounding
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub batch_size: usize,
    /// Largest image accepted, in pixels (width x height), checked from the file's header before
    /// any decoding: larger ones (decompression bombs) are failed inputs
    #[arg(long, default_value_t = crate::data::image::DEFAULT_MAX_PIXELS, value_name = "N")]
    pub max_pixels: u64,
    /// Score mask files too: by default folder walks leave out `ground_truth/` and `Masks/`
    /// folders, `X.png` beside `X.jpg` and `X_mask.png` beside `X.png` (the dataset layouts
    /// `zsad eval` reads), and say how many they left out
    #[arg(long)]
    pub include_masks: bool,
    /// Also write DIR/report.html once the run is done (as `zsad report DIR`): every image by
    /// score with its heatmap, mask and decision, filters, histogram and settings
    #[arg(long)]
    pub report: bool,
    #[command(flatten)]
    pub page: super::report::PageArgs,
    /// No progress bar or per-file warnings (the exit status still tells)
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn run(args: DetectArgs) -> anyhow::Result<u8> {
    let page = args.page.options(args.max_pixels, args.quiet);
    // Checked before the model loads: a typo costs nothing.
    page.validate()?;
    let thresholds = match &args.thresholds {
        Some(p) => Some(ThresholdFile::load(p)?),
        None => None,
    };
    let (threshold, pixel_threshold) = match &thresholds {
        Some(f) => (
            f.image.as_ref().map(|c| c.threshold),
            f.pixel.as_ref().map(|c| c.threshold),
        ),
        None => (args.threshold, args.pixel_threshold),
    };
    if args.min_region_area != 1 && pixel_threshold.is_none() {
        anyhow::bail!("--min-region-area sizes defect regions: add --pixel-threshold P (or --thresholds with a pixel threshold)");
    }
    let mut output = args.output.options();
    output.pixel_threshold = pixel_threshold;
    output.min_region_area = args.min_region_area;
    let opts = DetectOptions {
        inputs: args.inputs.clone(),
        out: args.out.clone(),
        format: args.format,
        output,
        threshold,
        resume: args.resume,
        retry_failed: args.retry_failed,
        overwrite: args.overwrite,
        shard: args.shard,
        pipeline: PipelineOptions {
            batch_size: args.batch_size,
            limits: DecodeLimits::with_max_pixels(args.max_pixels),
            overlap: true,
        },
        walk: WalkOptions {
            include_masks: args.include_masks,
        },
        quiet: args.quiet,
    };
    // Inputs and options first: a mistyped folder or flag costs no model load.
    args.reference.check()?;
    let job = DetectJob::new(opts, &mut std::io::stdin().lock())?;
    let built = args.detector.build(args.quiet)?;
    let loaded = built.loaded;
    let mut model = built.settings;
    let (detector, _) = args.reference.attach(
        built.detector,
        &mut model,
        DecodeLimits::with_max_pixels(args.max_pixels),
        args.batch_size,
        args.quiet,
    )?;
    if let (Some(f), Some(path)) = (&thresholds, &args.thresholds) {
        let origin = path.display().to_string();
        match f.check_matches(&model, &origin) {
            Err(e) if args.force_thresholds => {
                if !args.quiet {
                    eprintln!("zsad: warning: --force-thresholds: {e}");
                }
            }
            other => other?,
        }
    }
    let info = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "batch_size": args.batch_size,
        "threads": rayon::current_num_threads(),
        "device": format!("{:?}", args.detector.model.device).to_lowercase(),
        "gemm": loaded.model.gemm(),
        // Records name inputs as given; relative ones are read from here again by the
        // run-scale heatmaps of `zsad merge` and by `zsad report`'s thumbnails.
        "cwd": std::env::current_dir().ok().map(|d| d.display().to_string()),
        "started_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let s = job.run(&detector, model, info)?;
    if !args.quiet {
        let rate = if s.scored > 0 {
            format!(
                " in {:.1} s ({:.3} s per image)",
                s.seconds,
                s.seconds / s.scored as f64
            )
        } else {
            String::new()
        };
        let done = if s.already_done > 0 {
            format!(", {} already done", s.already_done)
        } else {
            String::new()
        };
        eprintln!(
            "zsad: {} scored{rate}, {} failed{done} -> {}",
            s.scored,
            s.failed,
            s.records.display()
        );
        if s.masks_skipped > 0 {
            eprintln!(
                "zsad: {} mask file(s) left out (ground_truth/ and Masks/ folders, masks beside their images); --include-masks scores them",
                s.masks_skipped
            );
        }
        if s.links_skipped > 0 {
            eprintln!(
                "zsad: {} symbolic link(s) to folders already walked (or in a cycle) were followed once",
                s.links_skipped
            );
        }
        if let Some(r) = s.heatmap_range {
            eprintln!(
                "zsad: heatmaps drawn on the run's scale, {} to {}{}",
                r.lo,
                r.hi,
                if s.heatmaps_failed > 0 {
                    format!(
                        " ({} could not be drawn, named above; --resume draws them again)",
                        s.heatmaps_failed
                    )
                } else {
                    String::new()
                }
            );
        }
        if s.prior_failed > 0 {
            eprintln!(
                "zsad: {} input(s) failed in the earlier run (--retry-failed tries them again)",
                s.prior_failed
            );
        }
    }
    let mut status = if s.failed + s.prior_failed + s.heatmaps_failed > 0 {
        EXIT_SOME_FAILED
    } else {
        EXIT_OK
    };
    if args.report {
        let r = crate::report::build(&args.out, &page)?;
        status = status.max(super::report::finish(&r, args.quiet));
    }
    Ok(status)
}
