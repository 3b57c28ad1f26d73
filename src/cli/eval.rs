//! `zsad eval`: flags into [`EvalOptions`], the library's evaluation, the metrics table on
//! stdout.

use std::path::PathBuf;

use clap::Args;

use super::args::{DetectorArgs, ReferenceArgs};
use super::output::EXIT_OK;
use crate::error::Result;
use crate::eval::metrics::ProGrid;
use crate::eval::SingleLabel;
use crate::jobs::evaluate::{evaluate, EvalOptions, Resolution};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Annotated data: an MVTec AD root or class folder, a VisA root, a manifest, or a folder of
    /// images with masks beside them (MTD); may be repeated
    ///
    /// A manifest is a .csv / .jsonl with image, mask, label, class; a VisA root holds
    /// split_csv/1cls.csv.
    #[arg(long, required = true, value_name = "D")]
    pub data: Vec<PathBuf>,
    /// Evaluate the records and maps that `zsad detect` wrote to this folder instead of running
    /// a model (at the resolution of the written maps)
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    pub predictions: Option<PathBuf>,
    #[command(flatten)]
    pub detector: DetectorArgs,
    #[command(flatten)]
    pub reference: ReferenceArgs,
    /// Output folder for metrics.json, metrics.csv, metrics.md and the curve plots
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Resolution of the pixel metrics when running a model
    #[arg(long, value_enum, default_value = "model")]
    pub resolution: Resolution,
    /// Classes whose images (or pixels) all have one label: leave the metric out of the mean
    /// (skip), or count it as 0 as AdaCLIP does (zero)
    #[arg(long, value_enum, default_value = "skip", hide_short_help = true)]
    pub single_label: SingleLabel,
    /// How AUPRO's 200-threshold grid is evaluated: as under NumPy 1.x or 2.x
    ///
    /// numpy1 is AnomalyCLIP's pinned environment (the published numbers); they differ only on
    /// exact ties with a threshold.
    #[arg(long, value_enum, default_value = "numpy1", hide_short_help = true)]
    pub aupro_grid: ProGrid,
    /// No progress bar (on a terminal) or progress lines (otherwise), no table, no summary
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn run(args: EvalArgs) -> Result<u8> {
    let console = super::output::console(args.quiet);
    let opts = EvalOptions {
        data: args.data.clone(),
        predictions: args.predictions.clone(),
        detector: args.detector.options(),
        reference: args.reference.options(),
        out: args.out.clone(),
        resolution: args.resolution,
        single_label: args.single_label,
        aupro_grid: args.aupro_grid,
    };
    let s = evaluate(&opts, &console, std::env::args().collect())?;
    if !args.quiet {
        print!("{}", s.report.to_markdown());
        console.note(&format!(
            "evaluated {} of {} in {:.1} s -> {}",
            super::output::count(s.images, "image", "images"),
            super::output::count(s.report.classes.len(), "class", "classes"),
            s.seconds,
            s.metrics.display()
        ));
    }
    Ok(EXIT_OK)
}
