//! `zsad report DIR`: the HTML page over a detect run's folder ([`crate::report`]).

use std::path::PathBuf;

use clap::Args;

use super::{EXIT_OK, EXIT_SOME_FAILED};
use crate::data::image::DecodeLimits;
use crate::report::{self, ReportOptions, ReportSummary};

/// The page's options, shared by `zsad report` and `zsad detect --report`.
#[derive(Debug, Clone, Args)]
pub struct PageArgs {
    /// Longest side of the row thumbnails (made once in DIR/thumbs/), in pixels
    #[arg(long, default_value_t = 160, value_name = "PX")]
    pub thumbnail_size: u32,
    /// Rows per page of the report
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub page_size: usize,
}

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
    #[arg(long, default_value_t = crate::data::image::DEFAULT_MAX_PIXELS, value_name = "N")]
    pub max_pixels: u64,
    /// No progress or summary lines
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl PageArgs {
    pub fn options(&self, max_pixels: u64, quiet: bool) -> ReportOptions {
        ReportOptions {
            eval: None,
            thumbnail_size: self.thumbnail_size,
            page_size: self.page_size,
            limits: DecodeLimits::with_max_pixels(max_pixels),
            quiet,
        }
    }
}

/// One line saying what the page shows; the exit status says whether every picture could be.
pub fn finish(s: &ReportSummary, quiet: bool) -> u8 {
    if !quiet {
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
        eprintln!(
            "zsad: report: {} scored, {} failed{anomalous}{unavailable} -> {}",
            s.scored,
            s.failed,
            s.page.display()
        );
    }
    if s.unavailable > 0 {
        EXIT_SOME_FAILED
    } else {
        EXIT_OK
    }
}

pub fn run(args: ReportArgs) -> anyhow::Result<u8> {
    if !(1..=crate::batch::detect::MAX_MAX_PIXELS).contains(&args.max_pixels) {
        anyhow::bail!(
            "--max-pixels {}: must be in 1..={}",
            args.max_pixels,
            crate::batch::detect::MAX_MAX_PIXELS
        );
    }
    if !args.dir.is_dir() {
        anyhow::bail!(
            "{}: not a folder; give the --out folder of a `zsad detect` run",
            args.dir.display()
        );
    }
    let mut opts = args.page.options(args.max_pixels, args.quiet);
    opts.eval = args.eval.clone();
    let s = report::build(&args.dir, &opts)?;
    Ok(finish(&s, args.quiet))
}
