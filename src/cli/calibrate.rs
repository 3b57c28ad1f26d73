//! `zsad calibrate`: flags into [`CalibrateOptions`], the library's calibration, the chosen
//! thresholds on stderr.

use std::path::PathBuf;

use clap::Args;

use super::args::{DetectorArgs, ReferenceArgs};
use super::output::EXIT_OK;
use crate::error::Result;
use crate::jobs::calibrate::{calibrate, CalibrateOptions, CalibrationData};

#[derive(Debug, Args)]
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
    /// The lowest thresholds whose false-positive rate is at most F, from 0 to 1
    ///
    /// Normal images, and normal pixels, flagged; needed with --normal (default with --data:
    /// F1-max).
    #[arg(long, value_name = "F", value_parser = super::flags::unit_interval, allow_negative_numbers = true, conflicts_with = "min_recall")]
    pub max_fpr: Option<f64>,
    /// The highest thresholds whose recall (anomalous images, and defect pixels, found) is at
    /// least R, in (0, 1]
    #[arg(long, value_name = "R", value_parser = super::flags::unit_interval, allow_negative_numbers = true)]
    pub min_recall: Option<f64>,
    /// The thresholds file to write
    #[arg(long, short = 'o', value_name = "thresholds.json")]
    pub out: PathBuf,
    /// No progress, no summary
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn run(args: CalibrateArgs) -> Result<u8> {
    let console = super::output::console(args.quiet);
    let data = if args.normal.is_empty() {
        CalibrationData::Labelled {
            data: args.data.clone(),
            predictions: args.predictions.clone(),
        }
    } else {
        CalibrationData::Normal(args.normal.clone())
    };
    let opts = CalibrateOptions {
        data,
        detector: args.detector.options(),
        reference: args.reference.options(),
        max_fpr: args.max_fpr,
        min_recall: args.min_recall,
        out: args.out.clone(),
    };
    let s = calibrate(&opts, &console)?;
    if let Some(why) = &s.no_pixel_threshold {
        console.warn(why);
    }
    for (what, c) in [("image", &s.file.image), ("pixel", &s.file.pixel)] {
        let Some(c) = c else { continue };
        let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{:.1}%", 100.0 * x));
        let a = &c.achieved;
        console.note(&format!(
            "{what} threshold {} ({}): precision {}, recall {}, false-positive rate {}",
            c.threshold,
            c.rule,
            pct(a.precision),
            pct(a.recall),
            pct(a.fpr)
        ));
    }
    console.note(&format!("wrote {}", s.out.display()));
    Ok(EXIT_OK)
}
