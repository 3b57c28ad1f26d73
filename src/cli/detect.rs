//! `zsad detect`: flags into [`DetectOptions`], the library's [`DetectJob`], its summary into
//! lines on stderr and the exit status. Without --out the records go to stdout.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::args::{DetectorArgs, OutputArgs, PageArgs, ReferenceArgs};
use super::output::{EXIT_OK, EXIT_SOME_FAILED};
use crate::data::image::DecodeLimits;
use crate::data::inputs::{Shard, WalkOptions};
use crate::data::records::{self, Record, RecordFormat};
use crate::error::{OptionError, Result};
use crate::jobs::detect::{DetectJob, DetectOptions, DetectSummary};
use crate::jobs::pipeline::PipelineOptions;

#[derive(Debug, Args)]
#[command(mut_arg("model", |a| a.required(true)))]
pub struct DetectArgs {
    /// Images, folders (searched recursively for png/jpg/jpeg/bmp/tif/tiff/webp) or `-` to read
    /// one path per line from stdin
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<String>,
    #[command(flatten)]
    pub detector: DetectorArgs,
    #[command(flatten)]
    pub reference: ReferenceArgs,
    /// Output folder (created) for records, maps and heatmaps; without it the records go to
    /// stdout and no file is written
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Record format: DIR/scores.jsonl or DIR/scores.csv (on stdout: JSON Lines or CSV)
    #[arg(long, value_enum, default_value = "jsonl", hide_short_help = true)]
    pub format: RecordFormat,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Adds `"anomalous": score >= T` to every record (T in [0, 1])
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    pub threshold: Option<f32>,
    /// A defect mask per image (masks/NAME.png: 255 where the map is >= P) and `regions` in
    /// every record (P in [0, 1])
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub pixel_threshold: Option<f32>,
    /// The image and pixel thresholds of `zsad calibrate` (instead of --threshold and
    /// --pixel-threshold); refused when calibrated with other settings
    #[arg(long, value_name = "thresholds.json", conflicts_with_all = ["threshold", "pixel_threshold"])]
    pub thresholds: Option<PathBuf>,
    /// Use --thresholds although they were calibrated with other settings
    #[arg(long, requires = "thresholds", hide_short_help = true)]
    pub force_thresholds: bool,
    /// Drop defect regions smaller than N pixels from the masks and the records' regions
    #[arg(long, default_value_t = 1, value_name = "N", hide_short_help = true)]
    pub min_region_area: u64,
    /// Continue a run: skip inputs that already have a record (scored or failed)
    #[arg(long)]
    pub resume: bool,
    /// With --resume: score failed inputs again, replacing their records
    #[arg(long, hide_short_help = true)]
    pub retry_failed: bool,
    /// Start again: remove the earlier run's records, run.json and the files they name
    #[arg(long)]
    pub overwrite: bool,
    /// Score only shard K of N (0-based), chosen by a stable hash of each path
    ///
    /// So N machines split a dataset; give each its own --out and join them with `zsad merge`.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Shard>,
    /// Images per model pass, at most 256; 0 = about 1024 tokens per pass
    ///
    /// At most 8 (ViT-B/16 at 224: 5 images, 16% less time per image on a CPU than one at a
    /// time; ViT-L at 518: 1). Scores do not depend on it beyond float rounding.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub batch_size: usize,
    /// Largest image accepted, in pixels (width x height), checked from the file's header
    ///
    /// Larger ones (decompression bombs) are failed inputs, as are images more elongated
    /// than 100:1.
    #[arg(long, default_value_t = crate::data::image::DEFAULT_MAX_PIXELS, value_name = "N", hide_short_help = true)]
    pub max_pixels: u64,
    /// Score mask files too
    ///
    /// By default folder walks leave out `ground_truth/` and `Masks/` folders, `X.png` beside
    /// `X.jpg` and `X_mask.png` beside `X.png` (the layouts `zsad eval` reads), and say how
    /// many they left out.
    #[arg(long, hide_short_help = true)]
    pub include_masks: bool,
    /// Also write DIR/report.html once the run is done (as `zsad report DIR`)
    #[arg(long)]
    pub report: bool,
    #[command(flatten)]
    pub page: PageArgs,
    /// No progress bar or per-file warnings (the exit status still tells)
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl DetectArgs {
    fn options(&self) -> Result<DetectOptions> {
        if self.out.as_deref() == Some(std::path::Path::new("-")) {
            return Err(OptionError::rule(
                "`out` -: records go to stdout when there is no `out`; name a folder to write maps and heatmaps",
            ));
        }
        if self.inputs.is_empty() {
            return Err(OptionError::rule(if self.reference.reference.len() > 1 {
                format!(
                    "no INPUT: `reference` took every path after it ({}); put the INPUTs before `reference`, or end its list with --",
                    self.reference.reference.join(" ")
                )
            } else {
                "no INPUT: name images, folders, or - to read paths from stdin".to_string()
            }));
        }
        let mut output = self.output.options(self.out.is_some());
        output.pixel_threshold = self.pixel_threshold;
        output.min_region_area = self.min_region_area;
        Ok(DetectOptions {
            inputs: self.inputs.clone(),
            detector: self.detector.options(),
            reference: self.reference.options(),
            out: self.out.clone(),
            format: self.format,
            output,
            threshold: self.threshold,
            thresholds: self.thresholds.clone(),
            force_thresholds: self.force_thresholds,
            resume: self.resume,
            retry_failed: self.retry_failed,
            overwrite: self.overwrite,
            shard: self.shard,
            pipeline: PipelineOptions {
                batch_size: self.batch_size,
                limits: DecodeLimits::with_max_pixels(self.max_pixels),
                overlap: true,
            },
            walk: WalkOptions {
                include_masks: self.include_masks,
                exclude: Vec::new(),
            },
            report: self.report.then(|| self.page.options(self.max_pixels)),
        })
    }
}

pub fn run(args: DetectArgs) -> Result<u8> {
    let console = super::output::console(args.quiet);
    // Options, inputs and the output folder are checked before any model is read.
    let job = DetectJob::new(args.options()?, &mut std::io::stdin().lock())?;
    let format = args.format;
    let mut stdout = std::io::stdout();
    let mut header = format == RecordFormat::Csv;
    let to_stdout = args.out.is_none();
    let mut print = |r: &Record| -> Result<()> {
        if !to_stdout {
            return Ok(());
        }
        let bytes = if std::mem::take(&mut header) {
            records::encode_all(std::slice::from_ref(r), format)?
        } else {
            records::encode(r, format)?
        };
        stdout
            .write_all(&bytes)
            .and_then(|()| stdout.flush())
            .map_err(|e| crate::Error::io("<stdout>", e))
    };
    let s = job.run(&console, std::env::args().collect(), &mut print)?;
    summarize(&s, &console);
    let mut status = if s.some_failed() {
        EXIT_SOME_FAILED
    } else {
        EXIT_OK
    };
    if let Some(r) = &s.report {
        status = status.max(super::report::finish(r, &console));
    }
    Ok(status)
}

/// The run's lines on stderr (nothing with --quiet).
fn summarize(s: &DetectSummary, console: &crate::progress::Console) {
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
    let to = s
        .records
        .as_ref()
        .map(|p| format!(" -> {}", p.display()))
        .unwrap_or_else(|| " -> stdout".into());
    console.note(&format!(
        "{} scored{rate}, {} failed{done}{to}",
        s.scored, s.failed
    ));
    if s.masks_skipped > 0 {
        console.note(&format!(
            "{} mask file(s) left out (ground_truth/ and Masks/ folders, masks beside their images); --include-masks scores them",
            s.masks_skipped
        ));
    }
    if s.links_skipped > 0 {
        console.note(&format!(
            "{} symbolic link(s) to folders already walked (or in a cycle) were followed once",
            s.links_skipped
        ));
    }
    for dir in &s.runs_skipped {
        console.note(&format!(
            "{}: left out of the inputs (a zsad output folder)",
            dir.display()
        ));
    }
    if s.temporaries_removed > 0 {
        console.note(&format!(
            "removed {} temporary file(s) an interrupted run left in the output folder",
            s.temporaries_removed
        ));
    }
    if let Some(r) = s.heatmap_range {
        let failed = if s.heatmaps_failed > 0 {
            format!(
                " ({} could not be drawn, named above; --resume draws them again)",
                s.heatmaps_failed
            )
        } else {
            String::new()
        };
        console.note(&format!(
            "heatmaps drawn on the run's scale, {} to {}{failed}",
            r.lo, r.hi
        ));
    }
    if s.prior_failed > 0 {
        console.note(&format!(
            "{} input(s) failed in the earlier run (--retry-failed tries them again)",
            s.prior_failed
        ));
    }
}
