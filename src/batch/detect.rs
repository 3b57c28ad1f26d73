//! `zsad detect` as a library job: inputs expanded and checked, the output folder locked and
//! its run record compared, then every input through the [`pipeline`](super::pipeline), each
//! one's files written before its record is appended.
//!
//! What a folder holds after a run: `run.json` (the settings, [`super::run_record`]), one
//! record per input in `scores.jsonl` or `scores.csv`, and the files the records name.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::pipeline::{self, Outcome, PipelineOptions, MAX_BATCH_SIZE};
use super::render::{self, OutputOptions};
use super::run_heatmaps;
use super::run_record::{self, RunRecord};
use crate::choice::Choice;
use crate::clip::{LoadedModel, ModelSource};
use crate::data::heatmap::{HeatmapKind, HeatmapScale, ValueRange};
use crate::data::inputs::{self, Expanded, Input, Shard, WalkOptions};
use crate::data::outputs::{self, Record, RecordFormat, RecordLog};
use crate::method::{Adapter, Detector};
use crate::progress::{Lines, Progress};
use crate::{Error, Result};

/// The largest `--max-pixels`: 4 gigapixels, past any camera; its decoded frame (12 GB) is
/// already more than most machines can hold twice.
pub const MAX_MAX_PIXELS: u64 = 4_000_000_000;

/// Everything `zsad detect` is asked to do, besides the model.
#[derive(Debug, Clone)]
pub struct DetectOptions {
    /// Files, folders and `-` (one path per line from stdin).
    pub inputs: Vec<String>,
    pub out: PathBuf,
    pub format: RecordFormat,
    pub output: OutputOptions,
    /// `anomalous: score >= T` in every record.
    pub threshold: Option<f32>,
    pub resume: bool,
    pub retry_failed: bool,
    pub overwrite: bool,
    pub shard: Option<Shard>,
    pub pipeline: PipelineOptions,
    pub walk: WalkOptions,
    /// No progress and no per-input messages.
    pub quiet: bool,
}

impl DetectOptions {
    /// Range checks of every option, with the flag named.
    pub fn validate(&self) -> Result<()> {
        self.output.validate()?;
        if let Some(t) = self.threshold {
            // A calibrated threshold may sit just above the highest score (flag nothing).
            if !(0.0..=1.0f32.next_up()).contains(&t) {
                return Err(Error::Usage(format!(
                    "--threshold {t}: scores are in [0, 1], so the threshold must be too"
                )));
            }
        }
        if self.pipeline.batch_size > MAX_BATCH_SIZE {
            return Err(Error::Usage(format!(
                "--batch-size {}: at most {MAX_BATCH_SIZE} (0 picks about 1024 tokens per pass)",
                self.pipeline.batch_size
            )));
        }
        let px = self.pipeline.limits.max_pixels;
        if !(1..=MAX_MAX_PIXELS).contains(&px) {
            return Err(Error::Usage(format!(
                "--max-pixels {px}: must be in 1..={MAX_MAX_PIXELS}"
            )));
        }
        if self.inputs.iter().filter(|a| *a == "-").count() > 1 {
            return Err(Error::Usage(
                "`-` (read paths from stdin) may be given once".into(),
            ));
        }
        if self.retry_failed && !self.resume {
            return Err(Error::Usage("--retry-failed goes with --resume".into()));
        }
        if self.resume && self.overwrite {
            return Err(Error::Usage(
                "--resume and --overwrite exclude each other".into(),
            ));
        }
        Ok(())
    }

    /// The settings of the job itself that change what is written (for `run.json`).
    fn settings(&self) -> Value {
        let mut v = json!({
            "records": self.format.file_name(),
            "maps": format!("{:?}", self.output.maps).to_lowercase(),
            "heatmaps": format!("{:?}", self.output.heatmaps).to_lowercase(),
            "heatmap_alpha": self.output.heatmap_alpha,
            "threshold": self.threshold,
            "max_pixels": self.pipeline.limits.max_pixels,
            "include_masks": self.walk.include_masks,
            "shard": self.shard.map(|s| format!("{}/{}", s.k, s.n)),
        });
        // Only when set, so that the folders of earlier versions still resume.
        if let Some(p) = self.output.pixel_threshold {
            v["pixel_threshold"] = json!(p);
            v["min_region_area"] = json!(self.output.min_region_area);
        }
        if self.output.heatmap_scale != HeatmapScale::Fixed {
            v["heatmap_scale"] = json!(self.output.heatmap_scale.name());
        }
        if self.output.colorbar {
            v["colorbar"] = json!(true);
        }
        v
    }
}

/// What a finished run did.
#[derive(Debug, Clone, Default)]
pub struct DetectSummary {
    pub scored: usize,
    pub failed: usize,
    /// Inputs with a record from an earlier run (`--resume`), and how many of those failed.
    pub already_done: usize,
    pub prior_failed: usize,
    pub masks_skipped: usize,
    pub links_skipped: usize,
    pub seconds: f64,
    pub records: PathBuf,
    /// `--heatmap-scale run`: the range drawn, and the heatmaps that could not be drawn.
    pub heatmap_range: Option<ValueRange>,
    pub heatmaps_failed: usize,
}

/// The settings of the model side for `run.json`: the weights by content, the adapter (file by
/// content, or preset and seed), the detector's configuration after every override.
pub fn model_settings(
    loaded: &LoadedModel,
    spec: &str,
    adapter_file: Option<&Path>,
    adapter: &Adapter,
    init_seed: u64,
    tokenizer: Option<&Path>,
    precision: &str,
) -> Result<Value> {
    let model = match &loaded.source {
        ModelSource::Random { arch, seed } => json!({"spec": spec, "random": arch, "seed": seed}),
        ModelSource::Files {
            config, weights, ..
        } => {
            let files = config
                .iter()
                .chain(weights)
                .map(|p| run_record::file_entry(p))
                .collect::<Result<Vec<_>>>()?;
            json!({"spec": spec, "files": files})
        }
    };
    let adapter_v = match adapter_file {
        Some(p) => json!({"path": p.display().to_string(), "sha256": run_record::sha256_file(p)?}),
        None => json!({"untrained_preset_seed": init_seed}),
    };
    let tok = match tokenizer {
        Some(p) => json!({"path": p.display().to_string(), "sha256": run_record::sha256_file(p)?}),
        None => json!("embedded"),
    };
    Ok(json!({
        "model": model,
        "clip": serde_json::to_value(&loaded.model.config).unwrap_or(Value::Null),
        "adapter": adapter_v,
        "detector": serde_json::to_value(&adapter.config).unwrap_or(Value::Null),
        "tokenizer": tok,
        "precision": precision,
    }))
}

/// A detect run with its inputs expanded and options checked, before any model is loaded (a
/// mistyped folder costs nothing).
pub struct DetectJob {
    opts: DetectOptions,
    expanded: Expanded,
}

impl DetectJob {
    pub fn new(opts: DetectOptions, stdin: &mut dyn BufRead) -> Result<Self> {
        opts.validate()?;
        let expanded = inputs::expand(&opts.inputs, stdin, opts.walk)?;
        if expanded.inputs.is_empty() && expanded.missing.is_empty() {
            let masks = if expanded.masks_skipped > 0 {
                format!(
                    " ({} mask file(s) were left out: pass --include-masks to score them)",
                    expanded.masks_skipped
                )
            } else {
                String::new()
            };
            return Err(Error::Usage(format!(
                "no images to score in {}{masks}; folders are searched for {}",
                opts.inputs.join(" "),
                inputs::IMAGE_EXTENSIONS.join("/")
            )));
        }
        Ok(Self { opts, expanded })
    }

    pub fn inputs(&self) -> &[Input] {
        &self.expanded.inputs
    }

    /// Runs the job. `model` is [`model_settings`]; `info` goes to `run.json` uncompared.
    pub fn run(self, detector: &Detector, model: Value, info: Value) -> Result<DetectSummary> {
        let Self { opts, expanded } = self;
        let out = &opts.out;
        let _lock = lock_out_dir(out)?;
        let mut settings = model;
        if let (Value::Object(m), Value::Object(job)) = (&mut settings, opts.settings()) {
            m.extend(job);
        }
        let record = RunRecord::new(settings, info);
        let log_path = out.join(opts.format.file_name());
        let kept = previous_records(&opts, &record)?;
        record_or_keep(&opts, &record)?;

        let done: HashSet<&str> = kept.iter().map(|r| r.path.as_str()).collect();
        let in_shard = |given: &str| opts.shard.is_none_or(|s| s.contains(given));
        let wanted = |given: &str| in_shard(given) && !done.contains(given);
        let missing: Vec<_> = expanded
            .missing
            .iter()
            .filter(|m| wanted(&m.given))
            .collect();
        let todo: Vec<Input> = expanded
            .inputs
            .iter()
            .filter(|i| wanted(&i.given))
            .cloned()
            .collect();
        let mut summary = DetectSummary {
            already_done: kept.len(),
            prior_failed: kept.iter().filter(|r| r.is_failure()).count(),
            masks_skipped: expanded.masks_skipped,
            links_skipped: expanded.links_skipped,
            records: log_path.clone(),
            ..Default::default()
        };
        drop(done);

        let mut log = RecordLog::create(&log_path, opts.format, &kept)?;
        let total = todo.len() as u64;
        let mut progress = Progress::new(
            total,
            opts.quiet,
            "{elapsed_precise} [{bar:30}] {pos}/{len} images  {per_sec}  ETA {eta}",
            Lines {
                command: "detect",
                unit: "image",
                // A line at every 5% (and at least every 30 s).
                every: (total / 20).max(1),
            },
        );
        let show = !opts.quiet;
        for m in &missing {
            if show {
                progress.println(&format!("zsad: {}: {}", m.given, m.error));
            }
            log.append(&Record::failed(&m.given, &m.error))?;
            summary.failed += 1;
        }
        let started = std::time::Instant::now();
        let (mut scored, mut failed) = (0usize, 0usize);
        // Rendering (map resize, PNG encoding) is the step a GPU outruns: it may run for
        // several inputs at once (`run_with`); writing and the record stay in input order.
        let rendered = |input: &Input, outcome: Outcome| match outcome {
            Outcome::Failed(e) => Err(e),
            Outcome::Scored { image, detection } => Ok((
                render::render(&opts.output, &input.key, &image, &detection),
                image.dimensions(),
                detection,
            )),
        };
        pipeline::run_with(
            todo,
            |i: &Input| i.path.as_path(),
            detector,
            &opts.pipeline,
            rendered,
            |input, done| {
                let record = match done {
                    Err(e) => Record::failed(&input.given, e),
                    Ok((r, (w, h), detection)) => {
                        let r =
                            r.and_then(|r| render::write(out, &r).map(|()| r))
                                .map_err(|e| {
                                    Error::Output(format!(
                                        "cannot write the outputs of {}: {e}",
                                        input.given
                                    ))
                                })?;
                        Record {
                            path: input.given.clone(),
                            score: Some(detection.score),
                            global_score: Some(detection.global),
                            map_max: Some(r.map_max),
                            map_mean: Some(r.map_mean),
                            map_min: Some(r.map_min),
                            anomalous: opts.threshold.map(|t| detection.score >= t),
                            width: Some(w),
                            height: Some(h),
                            map: r.map,
                            heatmap: r.heatmap,
                            mask: r.mask,
                            regions: r.regions,
                            error: None,
                        }
                    }
                };
                match &record.error {
                    Some(e) => {
                        failed += 1;
                        if show {
                            progress.println(&format!("zsad: {}: {e}", record.path));
                        }
                    }
                    None => scored += 1,
                }
                log.append(&record)?;
                progress.advance((scored + failed) as u64, String::new);
                Ok(())
            },
        )?;
        progress.finish();
        drop(log);
        summary.scored = scored;
        summary.failed += failed;
        if opts.output.heatmaps != HeatmapKind::None
            && opts.output.heatmap_scale == HeatmapScale::Run
        {
            let (records, _) = outputs::read_records(&log_path)?;
            let here = std::env::current_dir().map_err(|e| Error::io(Path::new("."), e))?;
            let drawn = run_heatmaps::draw(
                out,
                &records,
                &opts.output,
                &here,
                &opts.pipeline.limits,
                opts.quiet,
            )?;
            if let Some(range) = drawn.range {
                run_record::note_info(out, "heatmap_range", json!([range.lo, range.hi]))?;
            }
            summary.heatmap_range = drawn.range;
            summary.heatmaps_failed = drawn.failed.len();
        }
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(summary)
    }
}

/// The record files a folder may hold (either format).
fn record_files(out: &Path) -> Vec<PathBuf> {
    [RecordFormat::Jsonl, RecordFormat::Csv]
        .iter()
        .map(|f| out.join(f.file_name()))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .collect()
}

/// The records a run keeps: none for a new folder or `--overwrite` (which removes the earlier
/// run's records, `run.json` and the files its records name), those of the earlier run for
/// `--resume` once its settings are the same.
fn previous_records(opts: &DetectOptions, now: &RunRecord) -> Result<Vec<Record>> {
    let out = &opts.out;
    let existing = record_files(out);
    if existing.is_empty() {
        return Ok(Vec::new());
    }
    let names = existing
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ");
    if opts.overwrite {
        remove_run(out, &existing)?;
        return Ok(Vec::new());
    }
    if !opts.resume {
        return Err(Error::Usage(format!(
            "{names} exists: pass --resume to continue that run or --overwrite to start again"
        )));
    }
    let then = RunRecord::read(out)?.ok_or_else(|| {
        Error::Output(format!(
            "{names} exists but {} does not, so nothing says which settings made it (a run of an older zsad, or files put there by hand): --resume cannot check that it would not mix results; use another --out, or --overwrite to start again",
            out.join(run_record::FILE_NAME).display()
        ))
    })?;
    let diff = then.differences(now);
    if !diff.is_empty() {
        return Err(Error::Output(format!(
            "{} was made with other settings than this run; resuming would mix their results in one record file:\n  {}\nrun with the earlier settings, use another --out, or --overwrite to start again",
            out.join(run_record::FILE_NAME).display(),
            diff.join("\n  ")
        )));
    }
    let log_path = out.join(opts.format.file_name());
    let (records, torn) = outputs::read_records(&log_path)?;
    if !torn.is_empty() && !opts.quiet {
        eprintln!(
            "zsad: warning: {}: dropping {} unreadable line(s) ({:?}); those inputs are scored again",
            log_path.display(),
            torn.len(),
            torn
        );
    }
    Ok(records
        .into_iter()
        .filter(|r| !(opts.retry_failed && r.is_failure()))
        .collect())
}

/// `run.json` for this run: written when the folder holds no run (or after `--overwrite`);
/// kept as it is on `--resume`, whose settings were found equal.
fn record_or_keep(opts: &DetectOptions, now: &RunRecord) -> Result<()> {
    if opts.resume && RunRecord::read(&opts.out)?.is_some() {
        return Ok(());
    }
    now.write(&opts.out)
}

/// Removes an earlier run: the files its records name (inside `out` only), its record files
/// and `run.json`.
fn remove_run(out: &Path, record_files: &[PathBuf]) -> Result<()> {
    for f in record_files {
        let (records, _) = outputs::read_records(f)?;
        for rel in records
            .iter()
            .flat_map(|r| [&r.map, &r.heatmap, &r.mask])
            .flatten()
        {
            if let Some(p) = outputs::inside(out, rel) {
                let _ = std::fs::remove_file(p);
            }
        }
        std::fs::remove_file(f).map_err(|e| Error::io(f, e))?;
    }
    // The report of the earlier run and its thumbnails (only the names zsad gives them).
    let _ = std::fs::remove_file(out.join(crate::report::FILE_NAME));
    let thumbs = out.join(crate::report::thumbs::FOLDER);
    if let Ok(entries) = std::fs::read_dir(&thumbs) {
        for e in entries.flatten() {
            if crate::report::thumbs::is_thumbnail_name(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&thumbs);
    }
    let rj = out.join(run_record::FILE_NAME);
    match std::fs::remove_file(&rj) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&rj, e)),
        _ => Ok(()),
    }
}

/// Holds an exclusive lock on `DIR/.zsad.lock` while a run writes there.
fn lock_out_dir(dir: &Path) -> Result<std::fs::File> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Usage(format!(
            "--out {}: exists and is not a folder",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(".zsad.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Output(format!(
            "another zsad process is writing to {} (give each run or shard its own --out)",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}
