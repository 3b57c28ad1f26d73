//! `zsad report DIR`: the HTML page over a detect run's folder ([`crate::report`]).

use std::path::PathBuf;

use clap::Args;

use super::args::PageArgs;
use super::output::{EXIT_OK, EXIT_SOME_FAILED};
use crate::error::Result;
use crate::progress::Console;
use crate::report::ReportSummary;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The --out folder of a `zsad detect` run
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// A `zsad eval` output folder whose metrics and ROC/PR curves the page shows (default:
    /// DIR itself when it holds a metrics.json)
    #[arg(long, value_name = "EVAL_DIR")]
    pub eval: Option<PathBuf>,
    #[command(flatten)]
    pub page: PageArgs,
    /// Largest input image read again for its thumbnail, in pixels (width x height)
    #[arg(long, default_value_t = crate::data::image::DEFAULT_MAX_PIXELS, value_name = "N", hide_short_help = true)]
    pub max_pixels: u64,
    /// No progress or summary lines
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// One line saying what the page shows; the exit status says whether every picture could be.
pub fn finish(s: &ReportSummary, console: &Console) -> u8 {
    let anomalous = s
        .anomalous
        .map(|n| format!(", {n} anomalous"))
        .unwrap_or_default();
    let unavailable = if s.unavailable > 0 {
        format!(
            "; {} picture(s) could not be shown (each row says why)",
            s.unavailable
        )
    } else {
        String::new()
    };
    console.note(&format!(
        "report: {} scored, {} failed{anomalous}{unavailable} -> {}",
        s.scored,
        s.failed,
        s.page.display()
    ));
    if s.unavailable > 0 {
        EXIT_SOME_FAILED
    } else {
        EXIT_OK
    }
}

pub fn run(args: ReportArgs) -> Result<u8> {
    let console = super::output::console(args.quiet);
    let mut opts = args.page.options(args.max_pixels);
    opts.eval = args.eval.clone();
    let s = crate::report::build(&args.dir, &opts, &console)?;
    Ok(finish(&s, &console))
}
