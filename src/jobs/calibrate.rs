//! `zsad calibrate` as a library job: image and pixel thresholds for `detect --thresholds`,
//! chosen on labelled data (F1-max, an FPR budget or a recall target) or on normal images only
//! (an FPR budget), written to `thresholds.json` with the data and model they came from.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::evaluate::{read_predictions, score_dataset, Resolution, Scoring};
use super::pipeline::{self, Outcome, PipelineOptions};
use super::prelude::DetectorOptions;
use super::reference::{BankOptions, ReferenceOptions};
use crate::data::dataset;
use crate::data::inputs::{self, WalkOptions};
use crate::data::run_record::RunRecord;
use crate::decision::thresholds::{select, select_normal, Chosen, Rule, ThresholdFile, FORMAT};
use crate::error::{Error, OptionError, Result};
use crate::eval::metrics::Curve;
use crate::fsio::OutDir;
use crate::progress::Console;

/// What the thresholds are chosen on.
#[derive(Debug, Clone)]
pub enum CalibrationData {
    /// Labelled data, any layout `eval` reads; `predictions`: a detect run over it instead of
    /// running the model.
    Labelled {
        data: Vec<PathBuf>,
        predictions: Option<PathBuf>,
    },
    /// Normal images only (files or folders).
    Normal(Vec<String>),
}

/// Everything `zsad calibrate` is asked to do.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    pub data: CalibrationData,
    pub detector: DetectorOptions,
    pub reference: ReferenceOptions,
    /// The lowest thresholds whose false-positive rate is at most this.
    pub max_fpr: Option<f64>,
    /// The highest thresholds whose recall is at least this.
    pub min_recall: Option<f64>,
    /// The thresholds file to write.
    pub out: PathBuf,
}

/// What was chosen and written.
pub struct CalibrateSummary {
    pub file: ThresholdFile,
    pub out: PathBuf,
    /// Why no pixel threshold could be chosen, when none was.
    pub no_pixel_threshold: Option<String>,
}

impl CalibrateOptions {
    fn check(&self) -> Result<()> {
        self.reference.check()?;
        if let CalibrationData::Labelled {
            predictions: Some(_),
            ..
        } = &self.data
        {
            if self.reference.is_set() {
                return Err(OptionError::rule(
                    "`reference` runs with the model; `predictions` reads a finished detect run (whose run.json records its references): drop one",
                ));
            }
        }
        if crate::fsio::is_dir(&self.out) {
            return Err(OptionError::rule(format!(
                "`out` {} is a folder: name the file, e.g. thresholds.json",
                self.out.display()
            )));
        }
        if let Some(f) = self.max_fpr {
            if !(0.0..=1.0).contains(&f) {
                return Err(OptionError::value(
                    "max_fpr",
                    f,
                    "must be a number from 0 to 1",
                ));
            }
        }
        if let Some(r) = self.min_recall {
            if !(r > 0.0 && r <= 1.0) {
                return Err(OptionError::value(
                    "min_recall",
                    r,
                    "must be a number above 0, at most 1",
                ));
            }
        }
        if self.max_fpr.is_some() && self.min_recall.is_some() {
            return Err(OptionError::rule(
                "`max_fpr` and `min_recall` exclude each other",
            ));
        }
        Ok(())
    }
}

fn rule_name(rule: Rule) -> (&'static str, Option<f64>) {
    match rule {
        Rule::F1Max => ("f1-max", None),
        Rule::MaxFpr(f) => ("max-fpr", Some(f)),
        Rule::MinRecall(r) => ("min-recall", Some(r)),
    }
}

fn labelled(
    opts: &CalibrateOptions,
    data: &[PathBuf],
    predictions: Option<&PathBuf>,
    rule: Rule,
    console: &Console,
) -> Result<CalibrateSummary> {
    let samples = dataset::read_all(data)?;
    let (eval, settings) = match predictions {
        Some(dir) => {
            let eval = read_predictions(dir, &samples, "calibrate", console)?;
            let record = RunRecord::read(dir)?.ok_or_else(|| {
                Error::output(format!(
                    "{}: no run.json, so the model that made these predictions is unknown",
                    dir.display()
                ))
            })?;
            (eval, record.settings)
        }
        None => {
            if opts.detector.model.model.is_empty() {
                return Err(OptionError::rule(
                    "give `model` (with `adapter` or `preset`) to score the data, or `predictions` DIR",
                ));
            }
            let scoring = Scoring {
                detector: &opts.detector,
                reference: &opts.reference,
                resolution: Resolution::Model,
                // The scores `zsad detect` gives with these options.
                class_words: false,
                command: "calibrate",
            };
            score_dataset(&scoring, &samples, console)?
        }
    };
    let (image_curve, pixel_curve, images) = eval.pooled_curves();
    let (name, target) = rule_name(rule);
    let totals = |c: &Curve| {
        (
            c.tps.last().copied().unwrap_or(0),
            c.fps.last().copied().unwrap_or(0),
        )
    };
    let (anomalous, normal) = totals(&image_curve);
    let image = select(&image_curve, rule).ok_or_else(|| {
        OptionError::rule(format!(
            "{name} needs {} images in `data` ({anomalous} anomalous, {normal} normal); with normal images only use `normal` PATH... with `max_fpr` F",
            if anomalous == 0 { "anomalous" } else { "normal" }
        ))
    })?;
    let pixel = select(&pixel_curve, rule);
    let (defect_px, normal_px) = totals(&pixel_curve);
    let no_pixel_threshold = pixel.is_none().then(|| {
        format!(
            "no pixel threshold: {name} needs {} pixels ({defect_px} defect, {normal_px} normal; defect pixels come from masks)",
            if defect_px == 0 { "defect" } else { "normal" }
        )
    });
    let file = ThresholdFile {
        format: FORMAT.into(),
        image: Some(Chosen::new(&image, name, target)),
        pixel: pixel.map(|p| Chosen::new(&p, name, target)),
        model: ThresholdFile::identity(&settings),
        data: json!({
            "kind": "labelled",
            "data": data.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
            "predictions": predictions.map(|d| d.display().to_string()),
            "images": images,
            "anomalous_images": anomalous,
            "pixels": defect_px + normal_px,
            "defect_pixels": defect_px,
            "resolution": "model",
        }),
    };
    Ok(CalibrateSummary {
        file,
        out: opts.out.clone(),
        no_pixel_threshold,
    })
}

fn normal_only(
    opts: &CalibrateOptions,
    normal: &[String],
    max_fpr: f64,
    console: &Console,
) -> Result<CalibrateSummary> {
    if opts.detector.model.model.is_empty() {
        return Err(OptionError::rule(
            "`normal` scores the images: give `model` (with `adapter` or `preset`)",
        ));
    }
    let expanded = inputs::expand(normal, &mut std::io::empty(), &WalkOptions::default())
        .map_err(|e| e.context("`normal`"))?;
    let plan = opts.detector.plan(console)?;
    let bank_file = opts.reference.read_bank_file(&plan.settings)?;
    let built = plan.build()?;
    let mut settings: Value = built.settings;
    let (det, _) = opts.reference.attach(
        built.detector,
        &mut settings,
        bank_file,
        &BankOptions::default(),
        console,
    )?;
    let (mut scores, mut pixels) = (Vec::new(), Vec::new());
    let mut failed = expanded.missing.len();
    for m in &expanded.missing {
        console.warn(&format!("{}: {} (left out)", m.given, m.error));
    }
    pipeline::run(
        expanded.inputs,
        |i| i.path.as_path(),
        &det,
        &PipelineOptions::default(),
        console,
        |input, outcome| {
            match outcome {
                Outcome::Scored { detection, .. } => {
                    scores.push(detection.score);
                    pixels.extend_from_slice(&detection.map);
                }
                Outcome::Failed(e) => {
                    failed += 1;
                    console.warn(&format!("{}: {e} (left out)", input.given));
                }
            }
            Ok(())
        },
    )?;
    if crate::progress::stop_requested() {
        return Err(Error::Interrupted {
            kept: String::new(),
        });
    }
    let images = scores.len();
    let n_pixels = pixels.len();
    let image = select_normal(&mut scores, max_fpr).ok_or_else(|| {
        OptionError::rule(format!(
            "none of the `normal` images could be scored ({failed} failed)"
        ))
    })?;
    let pixel = select_normal(&mut pixels, max_fpr).expect("images were scored");
    let name = "normal-max-fpr";
    let file = ThresholdFile {
        format: FORMAT.into(),
        image: Some(Chosen::new(&image, name, Some(max_fpr))),
        pixel: Some(Chosen::new(&pixel, name, Some(max_fpr))),
        model: ThresholdFile::identity(&settings),
        data: json!({
            "kind": "normal",
            "normal": normal,
            "images": images,
            "failed": failed,
            "pixels": n_pixels,
            "resolution": "model",
        }),
    };
    Ok(CalibrateSummary {
        file,
        out: opts.out.clone(),
        no_pixel_threshold: None,
    })
}

/// `zsad calibrate` as a job: the thresholds chosen and written atomically.
pub fn calibrate(opts: &CalibrateOptions, console: &Console) -> Result<CalibrateSummary> {
    opts.check()?;
    let summary = match &opts.data {
        CalibrationData::Labelled { data, predictions } => {
            let rule = match (opts.max_fpr, opts.min_recall) {
                (Some(f), _) => Rule::MaxFpr(f),
                (None, Some(r)) => Rule::MinRecall(r),
                (None, None) => Rule::F1Max,
            };
            labelled(opts, data, predictions.as_ref(), rule, console)?
        }
        CalibrationData::Normal(normal) => {
            if opts.min_recall.is_some() {
                return Err(OptionError::rule(
                    "`min_recall` needs anomalous samples: with `normal` use `max_fpr` F",
                ));
            }
            let f = opts.max_fpr.ok_or_else(|| {
                OptionError::rule(
                    "`normal` needs `max_fpr` F: the share of normal images (and of normal pixels) that may be flagged, e.g. 0.01",
                )
            })?;
            normal_only(opts, normal, f, console)?
        }
    };
    let mut bytes = serde_json::to_vec_pretty(&summary.file)
        .map_err(|e| Error::output(format!("thresholds: {e}")))?;
    bytes.push(b'\n');
    let (dir, name) = OutDir::for_file(&opts.out)?;
    dir.write(&name, &bytes)?;
    Ok(summary)
}
