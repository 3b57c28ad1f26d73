//! `zsad detect` as a library job: options checked and inputs expanded ([`DetectJob::new`],
//! no model), then the model planned and everything that needs no weights checked (the
//! thresholds, a bank file and an earlier run against the model's identity), then the model
//! built and every input run through the `pipeline`, each one's files
//! written before its record.
//!
//! What a folder holds after a run: `run.json` (the settings, [`crate::data::run_record`]),
//! one record per input in `scores.jsonl` or `scores.csv`, and the files the records name.
//! Without an output folder the records go to the caller only (`zsad detect | jq`).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::pipeline::{self, Outcome, PipelineOptions, MAX_BATCH_SIZE};
use super::prelude::{DetectorOptions, DetectorPlan};
use super::reference::{Attached, BankOptions, ReferenceOptions};
use super::render::{self, OutputOptions, Rendered};
use super::run_heatmaps;
use crate::choice::Choice;
use crate::data::heatmap::{HeatmapKind, HeatmapScale, ValueRange};
use crate::data::image::DecodeLimits;
use crate::data::inputs::{self, Expanded, Input, Shard, WalkOptions};
use crate::data::outputs::MapFormat;
use crate::data::records::{self, Record, RecordFormat, RecordLog};
use crate::data::run_record::{self, RunRecord};
use crate::decision::thresholds::ThresholdFile;
use crate::error::{Error, OptionError, OutputError, Result};
use crate::fsio::{DirLock, OutDir};
use crate::method::Detector;
use crate::progress::{Console, Lines};
use crate::report::{ReportOptions, ReportSummary};
use crate::settings::f32_value;

/// The largest `max_pixels`: 4 gigapixels, past any camera; its decoded frame (12 GB) is
/// already more than most machines can hold twice.
pub const MAX_MAX_PIXELS: u64 = crate::data::outputs::MAX_MAP_PIXELS;

/// Everything `zsad detect` is asked to do.
#[derive(Debug, Clone)]
pub struct DetectOptions {
    /// Files, folders and `-` (one path per line from stdin).
    pub inputs: Vec<String>,
    pub detector: DetectorOptions,
    pub reference: ReferenceOptions,
    /// The output folder; `None`: records go to the caller only, no files are written.
    pub out: Option<PathBuf>,
    pub format: RecordFormat,
    pub output: OutputOptions,
    /// `anomalous: score >= T` in every record.
    pub threshold: Option<f32>,
    /// A thresholds file of `zsad calibrate` (instead of `threshold` and `pixel_threshold`).
    pub thresholds: Option<PathBuf>,
    /// Use `thresholds` although they were calibrated with other settings.
    pub force_thresholds: bool,
    pub resume: bool,
    pub retry_failed: bool,
    pub overwrite: bool,
    pub shard: Option<Shard>,
    pub pipeline: PipelineOptions,
    pub walk: WalkOptions,
    /// Write `report.html` once the run is done.
    pub report: Option<ReportOptions>,
}

impl DetectOptions {
    /// Options with every default of `zsad detect` for `inputs`, a model and an output folder.
    pub fn new(inputs: Vec<String>, model: &str, out: Option<PathBuf>) -> Self {
        let mut detector = DetectorOptions::default();
        detector.model.model = model.to_string();
        Self {
            inputs,
            detector,
            reference: ReferenceOptions::default(),
            output: if out.is_some() {
                OutputOptions::default()
            } else {
                OutputOptions::records_only()
            },
            out,
            format: RecordFormat::Jsonl,
            threshold: None,
            thresholds: None,
            force_thresholds: false,
            resume: false,
            retry_failed: false,
            overwrite: false,
            shard: None,
            pipeline: PipelineOptions::default(),
            walk: WalkOptions::default(),
            report: None,
        }
    }

    /// Range checks of every option and the rules between them, each option named.
    pub fn validate(&self) -> Result<()> {
        self.validate_settings()?;
        self.validate_without_folder()
    }

    /// [`Self::validate`] without the rules about where results go: what a caller that keeps
    /// results in memory (`jobs::single`, the Python package's `Detector`) checks, so that its
    /// options are refused exactly as `zsad detect` refuses them.
    pub fn validate_settings(&self) -> Result<()> {
        self.output.validate()?;
        self.detector.check()?;
        self.reference.check()?;
        if let Some(t) = self.threshold {
            // A calibrated threshold may sit just above the highest score (flag nothing).
            if !(0.0..=1.0f32.next_up()).contains(&t) {
                return Err(OptionError::value(
                    "threshold",
                    t,
                    "scores are in [0, 1], so the threshold must be too",
                ));
            }
        }
        if self.thresholds.is_some()
            && (self.threshold.is_some() || self.output.pixel_threshold.is_some())
        {
            return Err(OptionError::rule(
                "`thresholds` sets the image and pixel thresholds: drop `threshold` and `pixel_threshold`",
            ));
        }
        if self.force_thresholds && self.thresholds.is_none() {
            return Err(OptionError::rule(
                "`force_thresholds` goes with `thresholds`",
            ));
        }
        if self.output.min_region_area != 1
            && self.output.pixel_threshold.is_none()
            && self.thresholds.is_none()
        {
            return Err(OptionError::rule(
                "`min_region_area` sizes defect regions: add `pixel_threshold` P (or `thresholds` with a pixel threshold)",
            ));
        }
        if self.pipeline.batch_size > MAX_BATCH_SIZE {
            return Err(OptionError::value(
                "batch_size",
                self.pipeline.batch_size,
                format!("at most {MAX_BATCH_SIZE} (0 picks about 1024 tokens per pass)"),
            ));
        }
        let px = self.pipeline.limits.max_pixels;
        if !(1..=MAX_MAX_PIXELS).contains(&px) {
            return Err(OptionError::value(
                "max_pixels",
                px,
                format!("must be in 1..={MAX_MAX_PIXELS}"),
            ));
        }
        if self.inputs.iter().filter(|a| *a == "-").count() > 1 {
            return Err(OptionError::rule(
                "`-` (read paths from stdin) may be given once",
            ));
        }
        if self.retry_failed && !self.resume {
            return Err(OptionError::rule("`retry_failed` goes with `resume`"));
        }
        if self.resume && self.overwrite {
            return Err(OptionError::rule(
                "`resume` and `overwrite` exclude each other",
            ));
        }
        if let Some(r) = &self.report {
            r.validate()?;
        }
        Ok(())
    }

    /// What a run without an output folder cannot do: its records go to the caller, no file is
    /// written.
    fn validate_without_folder(&self) -> Result<()> {
        if self.out.is_some() {
            return Ok(());
        }
        let needs = |what: &str| {
            Err(OptionError::rule(format!(
                "{what} needs an output folder: set `out` DIR (without it, records go to stdout and no file is written)"
            )))
        };
        if self.output.maps != MapFormat::None || self.output.heatmaps != HeatmapKind::None {
            return needs("writing maps or heatmaps (`maps`, `heatmaps`)");
        }
        if self.output.pixel_threshold.is_some() {
            return needs("a defect mask per image (`pixel_threshold`)");
        }
        if self.resume || self.overwrite {
            return needs("`resume` or `overwrite`");
        }
        if self.report.is_some() {
            return needs("`report`");
        }
        Ok(())
    }

    /// The settings of the job itself that change what is written (for `run.json`).
    fn settings(&self) -> Value {
        let mut v = json!({
            "records": self.format.file_name(),
            "maps": self.output.maps.name(),
            "heatmaps": self.output.heatmaps.name(),
            "heatmap_alpha": f32_value(self.output.heatmap_alpha),
            "threshold": self.threshold.map(f32_value),
            "max_pixels": self.pipeline.limits.max_pixels,
            "include_masks": self.walk.include_masks,
            "shard": self.shard.map(|s| format!("{}/{}", s.k, s.n)),
        });
        // Only when set, so that the folders of earlier versions still resume.
        if let Some(p) = self.output.pixel_threshold {
            v["pixel_threshold"] = f32_value(p);
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
    /// Inputs with a record from an earlier run (`resume`), and how many of those failed.
    pub already_done: usize,
    pub prior_failed: usize,
    pub masks_skipped: usize,
    pub links_skipped: usize,
    /// Output folders left out of the walk (this run's, other runs').
    pub runs_skipped: Vec<PathBuf>,
    pub seconds: f64,
    /// The record file (`None` without an output folder).
    pub records: Option<PathBuf>,
    /// `heatmap_scale` run: the range drawn, and the heatmaps that could not be drawn.
    pub heatmap_range: Option<ValueRange>,
    pub heatmaps_failed: usize,
    /// The page, when asked for.
    pub report: Option<ReportSummary>,
    /// Temporary files of killed runs removed from the output folder.
    pub temporaries_removed: usize,
}

impl DetectSummary {
    /// Whether some input (of this run or an earlier one) or some heatmap failed.
    pub fn some_failed(&self) -> bool {
        self.failed + self.prior_failed + self.heatmaps_failed > 0
    }
}

/// A detect run with its options checked, inputs expanded and output folder looked at, before
/// any model is read (a mistyped folder or flag costs nothing).
pub struct DetectJob {
    opts: DetectOptions,
    expanded: Expanded,
    thresholds: Option<ThresholdFile>,
    /// Where the inputs are: the canonical paths of the arguments (and of the folders of the
    /// files listed on stdin), recorded in `run.json` so that `report` reads input images from
    /// there only, never from wherever a record points.
    input_roots: Vec<String>,
}

impl DetectJob {
    pub fn new(mut opts: DetectOptions, stdin: &mut dyn BufRead) -> Result<Self> {
        opts.validate()?;
        let thresholds = match &opts.thresholds {
            Some(p) => {
                let f = ThresholdFile::load(p)?;
                opts.threshold = f.image.as_ref().map(|c| c.threshold);
                opts.output.pixel_threshold = f.pixel.as_ref().map(|c| c.threshold);
                Some(f)
            }
            None => None,
        };
        if let Some(out) = &opts.out {
            check_out_dir(out, &opts)?;
            if let Ok(c) = out.canonicalize() {
                opts.walk.exclude.push(c);
            }
        }
        let expanded = inputs::expand(&opts.inputs, stdin, &opts.walk)?;
        let typos: Vec<&str> = expanded
            .missing
            .iter()
            .filter(|m| m.argument_not_found)
            .map(|m| m.given.as_str())
            .collect();
        if !typos.is_empty() {
            return Err(OptionError::rule(format!(
                "no such file or folder: {} (check the spelling; nothing was written)",
                typos.join(", ")
            )));
        }
        if expanded.inputs.is_empty() && expanded.missing.is_empty() {
            let masks = if expanded.masks_skipped > 0 {
                format!(
                    " ({} mask file(s) were left out: set `include_masks` to score them)",
                    expanded.masks_skipped
                )
            } else {
                String::new()
            };
            return Err(OptionError::rule(format!(
                "no images to score in {}{masks}; folders are searched for {}",
                opts.inputs.join(" "),
                inputs::IMAGE_EXTENSIONS.join("/")
            )));
        }
        let input_roots = input_roots(&opts.inputs, &expanded);
        Ok(Self {
            opts,
            expanded,
            thresholds,
            input_roots,
        })
    }

    pub fn inputs(&self) -> &[Input] {
        &self.expanded.inputs
    }

    pub fn options(&self) -> &DetectOptions {
        &self.opts
    }

    /// Runs the job: plans the model and checks what needs no weights, then scores every
    /// input that is not done yet, handing each record to `on_record` once it is written.
    /// `command` goes to `run.json`'s `info`.
    pub fn run(
        self,
        console: &Console,
        command: Vec<String>,
        on_record: &mut (dyn FnMut(&Record) -> Result<()> + Send),
    ) -> Result<DetectSummary> {
        let plan = self.opts.detector.plan(console)?;
        let mut settings = plan.settings.clone();
        if let (Value::Object(m), Value::Object(job)) = (&mut settings, self.opts.settings()) {
            m.extend(job);
        }
        // A bank file is checked against the model's identity now; one built from images
        // is known only once the model runs.
        let bank_file = self.opts.reference.read_bank_file(&plan.settings)?;
        if let Some(b) = &bank_file {
            settings["reference"] = b.settings()?;
        }
        let references_pending = self.opts.reference.is_set() && bank_file.is_none();
        if !references_pending {
            self.check_thresholds(&settings, console)?;
        }
        let folder = match &self.opts.out {
            Some(out) => Some(Folder::open(
                out,
                &self.opts,
                &settings,
                references_pending,
                console,
            )?),
            None => None,
        };
        self.score(
            plan, bank_file, settings, folder, console, command, on_record,
        )
    }

    /// Thresholds calibrated with other settings are refused (or warned, when forced).
    fn check_thresholds(&self, settings: &Value, console: &Console) -> Result<()> {
        let (Some(f), Some(path)) = (&self.thresholds, &self.opts.thresholds) else {
            return Ok(());
        };
        match f.check_matches(settings, path) {
            Err(e) if self.opts.force_thresholds => {
                console.warn(&format!("`force_thresholds`: {e}"));
                Ok(())
            }
            other => other,
        }
    }

    /// The inputs still to score: in this shard and without a record (the same file under any
    /// spelling: `in/x`, `./in/x` and its absolute path are one input).
    fn todo(&self, kept: &[Record], kept_from: &Path) -> (Vec<Input>, Vec<&inputs::Missing>) {
        let done_text: HashSet<&str> = kept.iter().map(|r| r.path.as_str()).collect();
        let done_files: HashSet<PathBuf> = kept
            .iter()
            .filter_map(|r| kept_from.join(&r.path).canonicalize().ok())
            .collect();
        let shard = self.opts.shard;
        let in_shard = |given: &str| shard.is_none_or(|s| s.contains(given));
        let done = |given: &str, path: Option<&Path>| {
            done_text.contains(given)
                || path.is_some_and(|p| p.canonicalize().is_ok_and(|c| done_files.contains(&c)))
        };
        let missing = self
            .expanded
            .missing
            .iter()
            .filter(|m| in_shard(&m.given) && !done(&m.given, None))
            .collect();
        let todo = self
            .expanded
            .inputs
            .iter()
            .filter(|i| in_shard(&i.given) && !done(&i.given, Some(&i.path)))
            .cloned()
            .collect();
        (todo, missing)
    }

    /// The detector for what is left to do (`None` when nothing is), with its bank attached and
    /// recorded in `settings`, and the GEMM it runs on.
    fn build(
        &self,
        plan: DetectorPlan,
        bank_file: Option<Attached>,
        settings: &mut Value,
        console: &Console,
    ) -> Result<(Detector, String)> {
        let opts = &self.opts;
        let built = plan.build()?;
        let gemm = built.loaded.model.gemm();
        let bank = BankOptions::for_pipeline(&opts.pipeline);
        let (detector, _) =
            opts.reference
                .attach(built.detector, settings, bank_file, &bank, console)?;
        self.check_thresholds(settings, console)?;
        Ok((detector, gemm))
    }

    #[allow(clippy::too_many_arguments)]
    fn score(
        &self,
        plan: DetectorPlan,
        bank_file: Option<Attached>,
        mut settings: Value,
        folder: Option<Folder>,
        console: &Console,
        command: Vec<String>,
        on_record: &mut (dyn FnMut(&Record) -> Result<()> + Send),
    ) -> Result<DetectSummary> {
        let opts = &self.opts;
        let kept: &[Record] = folder.as_ref().map_or(&[], |f| f.kept.as_slice());
        let here = std::env::current_dir().map_err(|e| Error::io(Path::new("."), e))?;
        let kept_from = folder.as_ref().and_then(|f| f.cwd.clone()).unwrap_or(here);
        let (todo, missing) = self.todo(kept, &kept_from);
        let mut summary = self.summary(kept, folder.as_ref());
        let started = std::time::Instant::now();
        // The model is read only when something is left to score; run.json is written (or
        // compared, on `resume`) before the first record.
        let model = match todo.is_empty() {
            true => None,
            false => Some(self.build(plan, bank_file, &mut settings, console)?),
        };
        let mut sink = None;
        if let Some(f) = &folder {
            let info = match &model {
                Some((_, gemm)) => super::prelude::run_info(
                    command,
                    opts.pipeline.batch_size,
                    opts.detector.model.device,
                    gemm,
                ),
                None => json!({ "command": command }),
            };
            f.record_run(&settings, info, &self.input_roots, opts)?;
            let name = opts.format.file_name();
            sink = Some(RecordLog::create(&f.dir, name, opts.format, kept)?);
        }
        let mut emit = |r: &Record| -> Result<()> {
            if let Some(log) = &mut sink {
                log.append(r)?;
            }
            on_record(r)
        };
        for m in &missing {
            console.note(&format!("{}: {}", m.given, m.error));
            emit(&Record::failed(&m.given, console.render(&m.error)))?;
            summary.failed += 1;
        }
        if let Some((detector, _)) = &model {
            let dir = folder.as_ref().map(|f| &f.dir);
            let (scored, failed) = score_inputs(todo, detector, opts, dir, console, &mut emit)?;
            summary.scored = scored;
            summary.failed += failed;
        }
        drop(sink);
        summary.seconds = started.elapsed().as_secs_f64();
        if crate::progress::stop_requested() {
            return Err(interrupted(&summary));
        }
        if let Some(f) = &folder {
            f.finished()?;
            self.finish_folder(f, &mut summary, console)?;
        }
        Ok(summary)
    }

    /// What is known before scoring: the earlier run's records, the walk's counts.
    fn summary(&self, kept: &[Record], folder: Option<&Folder>) -> DetectSummary {
        DetectSummary {
            already_done: kept.len(),
            prior_failed: kept.iter().filter(|r| r.is_failure()).count(),
            masks_skipped: self.expanded.masks_skipped,
            links_skipped: self.expanded.links_skipped,
            runs_skipped: self.expanded.runs_skipped.clone(),
            records: folder.map(|f| f.dir.root().join(self.opts.format.file_name())),
            temporaries_removed: folder.map_or(0, |f| f.temporaries_removed),
            ..Default::default()
        }
    }

    /// After the last record: run-scale heatmaps and the report.
    fn finish_folder(
        &self,
        f: &Folder,
        summary: &mut DetectSummary,
        console: &Console,
    ) -> Result<()> {
        let opts = &self.opts;
        if opts.output.heatmaps != HeatmapKind::None
            && opts.output.heatmap_scale == HeatmapScale::Run
        {
            let log = f.dir.root().join(opts.format.file_name());
            let (records, _) = records::read_records(&log)?;
            let here = std::env::current_dir().map_err(|e| Error::io(Path::new("."), e))?;
            let drawn = run_heatmaps::draw(
                &f.dir,
                &records,
                &opts.output,
                &here,
                &opts.pipeline.limits,
                console,
            )?;
            if let Some(range) = drawn.range {
                run_record::note_info(&f.dir, "heatmap_range", json!([range.lo, range.hi]))?;
            }
            summary.heatmap_range = drawn.range;
            summary.heatmaps_failed = drawn.failed.len();
        }
        if let Some(r) = &opts.report {
            summary.report = Some(crate::report::build(f.dir.root(), r, console)?);
        }
        Ok(())
    }
}

/// The canonical paths of the input arguments (folders and files), and the canonical folders
/// of the inputs that lie under none of them (files listed on stdin), as text.
fn input_roots(args: &[String], expanded: &Expanded) -> Vec<String> {
    let mut roots: Vec<PathBuf> = args
        .iter()
        .filter(|a| *a != "-")
        .filter_map(|a| Path::new(a).canonicalize().ok())
        .collect();
    for input in &expanded.inputs {
        let Ok(c) = input.path.canonicalize() else {
            continue;
        };
        if !roots.iter().any(|r| c.starts_with(r)) {
            if let Some(parent) = c.parent() {
                roots.push(parent.to_path_buf());
            }
        }
    }
    let mut text: Vec<String> = roots.iter().map(|r| inputs::path_text(r)).collect();
    text.sort();
    text.dedup();
    text
}

/// A stop request's error: what was kept, and that `resume` goes on.
fn interrupted(summary: &DetectSummary) -> Error {
    Error::Interrupted {
        kept: match &summary.records {
            Some(p) => format!(
                "{} records in {} (each input's files are written before its record); the same command with `resume` continues",
                summary.already_done + summary.scored + summary.failed,
                p.display()
            ),
            None => format!("{} records written", summary.scored + summary.failed),
        },
    }
}

/// Scores `todo` through the pipeline: each input's files written (when there is a folder)
/// before its record is emitted. Returns (scored, failed).
fn score_inputs(
    todo: Vec<Input>,
    detector: &Detector,
    opts: &DetectOptions,
    dir: Option<&OutDir>,
    console: &Console,
    emit: &mut (dyn FnMut(&Record) -> Result<()> + Send),
) -> Result<(usize, usize)> {
    let total = todo.len() as u64;
    let mut progress = console.progress(
        total,
        "{elapsed_precise} [{bar:30}] {pos}/{len} images  {per_sec}  ETA {eta}",
        Lines::at_every_5_percent("detect", "image", total),
    );
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
        console,
        rendered,
        |input, done| {
            let record = match done {
                Err(e) => Record::failed(&input.given, console.render(&e)),
                Ok((r, (w, h), detection)) => {
                    let r = r
                        .and_then(|r| write_rendered(dir, &r).map(|()| r))
                        .map_err(|e| {
                            Error::output(format!(
                                "cannot write the outputs of {}: {e}",
                                input.given
                            ))
                        })?;
                    scored_record(&input.given, &r, (w, h), &detection, opts.threshold)
                }
            };
            match &record.error {
                Some(e) => {
                    failed += 1;
                    console.note(&format!("{}: {e}", record.path));
                }
                None => scored += 1,
            }
            emit(&record)?;
            progress.advance((scored + failed) as u64, String::new);
            Ok(())
        },
    )?;
    progress.finish();
    Ok((scored, failed))
}

fn write_rendered(dir: Option<&OutDir>, r: &Rendered) -> Result<()> {
    match dir {
        Some(d) => render::write(d, r),
        None => Ok(()),
    }
}

/// The record of a scored input.
fn scored_record(
    given: &str,
    r: &Rendered,
    (w, h): (u32, u32),
    detection: &crate::method::Detection,
    threshold: Option<f32>,
) -> Record {
    Record {
        path: given.to_string(),
        score: Some(detection.score),
        global_score: Some(detection.global),
        map_max: Some(r.map_max),
        map_mean: Some(r.map_mean),
        map_min: Some(r.map_min),
        anomalous: threshold.map(|t| detection.score >= t),
        width: Some(w),
        height: Some(h),
        map: r.map.clone(),
        heatmap: r.heatmap.clone(),
        mask: r.mask.clone(),
        regions: r.regions.clone(),
        error: None,
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

/// What can be told about `--out` without a model: a file in its place, an earlier run that
/// would be replaced silently (refused before anything is loaded).
fn check_out_dir(out: &Path, opts: &DetectOptions) -> Result<()> {
    if let Ok(m) = std::fs::metadata(out) {
        if !m.is_dir() {
            return Err(OptionError::rule(format!(
                "`out` {}: exists and is not a folder",
                out.display()
            )));
        }
    }
    let existing = record_files(out);
    if !existing.is_empty() && !opts.resume && !opts.overwrite {
        return Err(Error::Output(OutputError::RunExists { files: existing }));
    }
    if opts.resume && !existing.is_empty() && RunRecord::read(out)?.is_none() {
        return Err(no_run_record(out, &existing));
    }
    Ok(())
}

fn no_run_record(out: &Path, existing: &[PathBuf]) -> Error {
    Error::output(format!(
        "{} exists but {} does not, so nothing says which settings made it (a run of an older zsad, or files put there by hand): `resume` cannot check that it would not mix results; use another `out`, or `overwrite` to start again",
        existing
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        out.join(run_record::FILE_NAME).display()
    ))
}

/// An output folder opened for a run: locked, temporaries of killed runs removed, and the
/// records it keeps (none for a new folder or `overwrite`; the earlier run's for `resume`,
/// once its settings are found equal).
struct Folder {
    dir: OutDir,
    _lock: DirLock,
    kept: Vec<Record>,
    /// Where the earlier run ran (its relative record paths are relative to this).
    cwd: Option<PathBuf>,
    temporaries_removed: usize,
}

impl Folder {
    fn open(
        out: &Path,
        opts: &DetectOptions,
        settings: &Value,
        references_pending: bool,
        console: &Console,
    ) -> Result<Self> {
        let dir = OutDir::create(out)?;
        let lock = dir.lock()?;
        let temporaries_removed = dir.clean_temporaries();
        let existing = record_files(out);
        let mut folder = Folder {
            dir,
            _lock: lock,
            kept: Vec::new(),
            cwd: None,
            temporaries_removed,
        };
        if existing.is_empty() {
            return Ok(folder);
        }
        if opts.overwrite {
            remove_run(&folder.dir, &existing)?;
            return Ok(folder);
        }
        if !opts.resume {
            return Err(Error::Output(OutputError::RunExists { files: existing }));
        }
        let then = RunRecord::read(out)?.ok_or_else(|| no_run_record(out, &existing))?;
        let mut now = settings.clone();
        if references_pending {
            // Compared again, whole, once the bank is built.
            if let (Value::Object(n), Some(r)) = (&mut now, then.settings.get("reference")) {
                n.insert("reference".into(), r.clone());
            }
        }
        compare_settings(out, &then, &now)?;
        folder.cwd = then
            .info
            .get("cwd")
            .and_then(Value::as_str)
            .map(PathBuf::from);
        let log_path = out.join(opts.format.file_name());
        let (records, torn) = records::read_records(&log_path)?;
        if !torn.is_empty() {
            console.warn(&format!(
                "{}: dropping {} unreadable line(s) ({:?}); those inputs are scored again",
                log_path.display(),
                torn.len(),
                torn
            ));
        }
        folder.kept = records
            .into_iter()
            .filter(|r| !(opts.retry_failed && r.is_failure()))
            .collect();
        Ok(folder)
    }

    /// `run.json` for this run: written when the folder holds no run (or after
    /// `overwrite`); on `resume`, compared once more (with the bank now built) and kept.
    fn record_run(
        &self,
        settings: &Value,
        mut info: Value,
        roots: &[String],
        opts: &DetectOptions,
    ) -> Result<()> {
        let then = match opts.resume {
            true => RunRecord::read(self.dir.root())?,
            false => None,
        };
        match then {
            Some(then) => {
                compare_settings(self.dir.root(), &then, settings)?;
                // A resumed run may name its inputs otherwise: the roots of both.
                let mut all: Vec<String> = then.info["input_roots"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(String::from))
                    .chain(roots.iter().cloned())
                    .collect();
                all.sort();
                all.dedup();
                run_record::note_info(&self.dir, "input_roots", json!(all))?;
            }
            None => {
                info["input_roots"] = json!(roots);
                RunRecord::new(settings.clone(), info).write(&self.dir)?
            }
        }
        // Until the last input is recorded, the folder holds an unfinished run (`merge`
        // refuses it).
        run_record::note_info(&self.dir, "complete", json!(false))
    }

    /// Marks the run finished: every input of the run (or shard) has its record.
    fn finished(&self) -> Result<()> {
        run_record::note_info(&self.dir, "complete", json!(true))?;
        // What the run cost: its peak memory (`VmHWM`), for capacity planning.
        if let Some(mb) = crate::fsio::peak_rss_mb() {
            run_record::note_info(&self.dir, "peak_rss_mb", json!(mb.round()))?;
        }
        Ok(())
    }
}

fn compare_settings(out: &Path, then: &RunRecord, now: &Value) -> Result<()> {
    let diff = then.differences(&RunRecord::new(now.clone(), Value::Null));
    if diff.is_empty() {
        return Ok(());
    }
    Err(Error::Output(OutputError::SettingsDiffer {
        file: out.join(run_record::FILE_NAME),
        differences: diff,
        consequence: "resuming would mix their results in one record file".into(),
        remedy: "run with the earlier settings, use another `out`, or `overwrite` to start again"
            .into(),
    }))
}

/// Removes an earlier run: the files its records name (inside the folder only), its record
/// files, its report and thumbnails and `run.json`.
fn remove_run(dir: &OutDir, record_files: &[PathBuf]) -> Result<()> {
    for f in record_files {
        let (records, _) = records::read_records(f)?;
        for rel in records
            .iter()
            .flat_map(|r| [&r.map, &r.heatmap, &r.mask])
            .flatten()
        {
            if crate::fsio::is_confined(rel) {
                dir.remove(rel)?;
            }
        }
        if let Some(name) = f.file_name().and_then(|n| n.to_str()) {
            dir.remove(name)?;
        }
    }
    // The report of the earlier run and its thumbnails (only the names zsad gives them).
    dir.remove(crate::report::FILE_NAME)?;
    let thumbs = crate::report::thumbs::FOLDER;
    for name in dir.list(thumbs) {
        if crate::report::thumbs::is_thumbnail_name(&name) {
            dir.remove(&format!("{thumbs}/{name}"))?;
        }
    }
    dir.remove_empty_dir(thumbs);
    dir.remove(run_record::FILE_NAME)?;
    Ok(())
}

/// The decode limits of a pixel budget (`max_pixels`).
pub fn limits(max_pixels: u64) -> DecodeLimits {
    DecodeLimits::with_max_pixels(max_pixels)
}
