//! `zsad calibrate`: image and pixel thresholds for `zsad detect --thresholds`, chosen on
//! labelled data (F1-max, an FPR budget or a recall target) or on normal images only (an FPR
//! budget), written to `thresholds.json` with the data and model they came from.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::detector_args::DetectorArgs;
use super::eval::{read_predictions, run_model, Resolution, Scoring};
use super::reference::ReferenceArgs;
use crate::batch::pipeline::{self, Outcome, PipelineOptions};
use crate::batch::run_record::RunRecord;
use crate::data::dataset;
use crate::data::inputs::{self, WalkOptions};
use crate::decision::thresholds::{
    select, select_normal, Chosen, Rule, Selected, ThresholdFile, FORMAT,
};
use crate::eval::metrics::Curve;

#[derive(Debug, Args)]
// The model is needed only without --predictions.
#[command(mut_arg("model", |a| a.required(false).default_value("")))]
pub struct CalibrateArgs {
    /// Labelled data, any layout `zsad eval` reads (MVTec AD, VisA, a manifest, images with
    /// masks beside them); may be repeated
    #[arg(long, value_name = "D", required_unless_present = "normal")]
    pub data: Vec<PathBuf>,
    /// Normal images only (files or folders): thresholds at the --max-fpr share of their
    /// scores and of their pixels
    #[arg(long, value_name = "PATH", num_args = 1.., conflicts_with_all = ["data", "predictions"])]
    pub normal: Vec<String>,
    /// The records and maps of a `zsad detect` run on --data, instead of running a model
    #[arg(long, value_name = "DIR", requires = "data")]
    pub predictions: Option<PathBuf>,
    #[command(flatten)]
    pub detector: DetectorArgs,
    #[command(flatten)]
    pub reference: ReferenceArgs,
    /// The lowest thresholds whose false-positive rate (normal images, and normal pixels,
    /// flagged) is at most F, from 0 to 1; needed with --normal (default with --data: F1-max)
    #[arg(long, value_name = "F", value_parser = super::flags::unit_interval, allow_negative_numbers = true, conflicts_with = "min_recall")]
    pub max_fpr: Option<f64>,
    /// The highest thresholds whose recall (anomalous images, and defect pixels, found) is at
    /// least R, in (0, 1]
    #[arg(long, value_name = "R", value_parser = recall, allow_negative_numbers = true)]
    pub min_recall: Option<f64>,
    /// The thresholds file to write
    #[arg(long, short = 'o', value_name = "thresholds.json")]
    pub out: PathBuf,
    /// No progress, no summary
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn recall(s: &str) -> Result<f64, String> {
    match super::flags::unit_interval(s)? {
        v if v > 0.0 => Ok(v),
        _ => Err("must be a number above 0, at most 1".into()),
    }
}

fn rule_name(rule: Rule) -> (&'static str, Option<f64>) {
    match rule {
        Rule::F1Max => ("f1-max", None),
        Rule::MaxFpr(f) => ("max-fpr", Some(f)),
        Rule::MinRecall(r) => ("min-recall", Some(r)),
    }
}

/// The model side of the settings, with the references where used, for the thresholds'
/// record.
fn scored_settings(
    args: &CalibrateArgs,
    samples: &[dataset::Sample],
) -> anyhow::Result<(crate::eval::Evaluation, Value)> {
    match &args.predictions {
        Some(dir) => {
            let eval = read_predictions(args.quiet, dir, samples)?;
            let record = RunRecord::read(dir)?.with_context(|| {
                format!(
                    "{}: no run.json, so the model that made these predictions is unknown",
                    dir.display()
                )
            })?;
            Ok((eval, record.settings))
        }
        None => {
            if args.detector.model.model.is_empty() {
                bail!("give --model (with --adapter or --preset) to score --data, or --predictions DIR");
            }
            run_model(
                &Scoring {
                    detector: &args.detector,
                    reference: &args.reference,
                    resolution: Resolution::Model,
                    // The scores `zsad detect` gives with these options.
                    class_words: false,
                    quiet: args.quiet,
                },
                samples,
            )
        }
    }
}

fn labelled(args: &CalibrateArgs, rule: Rule) -> anyhow::Result<ThresholdFile> {
    let samples = dataset::read_all(&args.data)?;
    let (eval, settings) = scored_settings(args, &samples)?;
    let (image_curve, pixel_curve, images) = eval.pooled_curves();
    let (name, target) = rule_name(rule);
    let totals = |c: &Curve| {
        (
            c.tps.last().copied().unwrap_or(0),
            c.fps.last().copied().unwrap_or(0),
        )
    };
    let (anomalous, normal) = totals(&image_curve);
    let image = select(&image_curve, rule).with_context(|| {
        format!(
            "{name} needs {} images in --data ({anomalous} anomalous, {normal} normal); with normal images only use --normal PATH... --max-fpr F",
            if anomalous == 0 { "anomalous" } else { "normal" }
        )
    })?;
    let pixel = select(&pixel_curve, rule);
    let (defect_px, normal_px) = totals(&pixel_curve);
    if pixel.is_none() && !args.quiet {
        eprintln!(
            "zsad: warning: no pixel threshold: {name} needs {} pixels ({defect_px} defect, {normal_px} normal; defect pixels come from masks)",
            if defect_px == 0 { "defect" } else { "normal" }
        );
    }
    Ok(ThresholdFile {
        format: FORMAT.into(),
        image: Some(Chosen::new(&image, name, target)),
        pixel: pixel.map(|p| Chosen::new(&p, name, target)),
        model: ThresholdFile::identity(&settings),
        data: json!({
            "kind": "labelled",
            "data": args.data.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
            "predictions": args.predictions.as_ref().map(|d| d.display().to_string()),
            "images": images,
            "anomalous_images": anomalous,
            "pixels": defect_px + normal_px,
            "defect_pixels": defect_px,
            "resolution": "model",
        }),
    })
}

fn normal_only(args: &CalibrateArgs, max_fpr: f64) -> anyhow::Result<ThresholdFile> {
    if args.detector.model.model.is_empty() {
        bail!("--normal scores the images: give --model (with --adapter or --preset)");
    }
    let expanded = inputs::expand(&args.normal, &mut std::io::empty(), WalkOptions::default())
        .context("--normal")?;
    let built = args.detector.build(args.quiet)?;
    let mut settings = built.settings;
    let limits = crate::data::image::DecodeLimits::default();
    let (det, _) = args
        .reference
        .attach(built.detector, &mut settings, limits, 0, args.quiet)?;
    let mut scores = Vec::new();
    let mut pixels = Vec::new();
    let mut failed = expanded.missing.len();
    for m in &expanded.missing {
        if !args.quiet {
            eprintln!("zsad: warning: {}: {} (left out)", m.given, m.error);
        }
    }
    pipeline::run(
        expanded.inputs,
        |i| i.path.as_path(),
        &det,
        &PipelineOptions::default(),
        |input, outcome| {
            match outcome {
                Outcome::Scored { detection, .. } => {
                    scores.push(detection.score);
                    pixels.extend_from_slice(&detection.map);
                }
                Outcome::Failed(e) => {
                    failed += 1;
                    if !args.quiet {
                        eprintln!("zsad: warning: {}: {e} (left out)", input.given);
                    }
                }
            }
            Ok(())
        },
    )?;
    let images = scores.len();
    let n_pixels = pixels.len();
    let image = select_normal(&mut scores, max_fpr).with_context(|| {
        format!("none of the --normal images could be scored ({failed} failed)")
    })?;
    let pixel: Selected = select_normal(&mut pixels, max_fpr).expect("images were scored");
    let name = "normal-max-fpr";
    Ok(ThresholdFile {
        format: FORMAT.into(),
        image: Some(Chosen::new(&image, name, Some(max_fpr))),
        pixel: Some(Chosen::new(&pixel, name, Some(max_fpr))),
        model: ThresholdFile::identity(&settings),
        data: json!({
            "kind": "normal",
            "normal": args.normal,
            "images": images,
            "failed": failed,
            "pixels": n_pixels,
            "resolution": "model",
        }),
    })
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    args.reference.check()?;
    if args.predictions.is_some() && !args.reference.reference.is_empty() {
        bail!("--reference runs with the model; --predictions reads a finished detect run (whose run.json records its references): drop one");
    }
    if args.out.is_dir() {
        bail!(
            "--out {} is a folder: name the file, e.g. --out thresholds.json",
            args.out.display()
        );
    }
    let file = if args.normal.is_empty() {
        let rule = match (args.max_fpr, args.min_recall) {
            (Some(f), _) => Rule::MaxFpr(f),
            (None, Some(r)) => Rule::MinRecall(r),
            (None, None) => Rule::F1Max,
        };
        labelled(&args, rule)?
    } else {
        if args.min_recall.is_some() {
            bail!("--min-recall needs anomalous samples: with --normal use --max-fpr F");
        }
        let f = args.max_fpr.context(
            "--normal needs --max-fpr F: the share of normal images (and of normal pixels) that may be flagged, e.g. --max-fpr 0.01",
        )?;
        normal_only(&args, f)?
    };
    let mut bytes = serde_json::to_vec_pretty(&file)?;
    bytes.push(b'\n');
    crate::data::outputs::write_atomic(&args.out, &bytes)?;
    if !args.quiet {
        for (what, c) in [("image", &file.image), ("pixel", &file.pixel)] {
            let Some(c) = c else { continue };
            let pct =
                |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{:.1}%", 100.0 * x));
            let a = &c.achieved;
            eprintln!(
                "zsad: {what} threshold {} ({}): precision {}, recall {}, false-positive rate {}",
                c.threshold,
                c.rule,
                pct(a.precision),
                pct(a.recall),
                pct(a.fpr)
            );
        }
        eprintln!("zsad: wrote {}", args.out.display());
    }
    Ok(())
}
