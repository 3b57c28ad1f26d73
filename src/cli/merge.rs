//! `zsad merge`: flags into [`MergeOptions`], the library's merge, a line on stderr.

use std::path::PathBuf;

use clap::Args;

use super::output::{EXIT_OK, EXIT_SOME_FAILED};
use crate::data::records::RecordFormat;
use crate::error::Result;
use crate::jobs::merge::{merge, MergeOptions};

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Output folders of the shards (or their scores.jsonl / scores.csv files)
    #[arg(value_name = "SHARD", required = true)]
    pub shards: Vec<PathBuf>,
    /// Folder to merge into: a new or empty one, or one of the shards; map, heatmap and mask
    /// files are copied there
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Record file format written
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: RecordFormat,
    /// Replace what --out holds (an earlier merge or run)
    #[arg(long)]
    pub overwrite: bool,
    /// Merge although shards are missing, unfinished or without run.json (warned)
    #[arg(long)]
    pub partial: bool,
    /// No warnings or summary
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn run(args: MergeArgs) -> Result<u8> {
    let console = super::output::console(args.quiet);
    let opts = MergeOptions {
        shards: args.shards.clone(),
        out: args.out.clone(),
        format: args.format,
        overwrite: args.overwrite,
        partial: args.partial,
    };
    let s = merge(&opts, &console)?;
    if let Some(r) = s.heatmap_range {
        console.note(&format!(
            "heatmaps drawn again on the merged run's scale, {} to {}",
            r.lo, r.hi
        ));
    }
    console.note(&format!(
        "merged {} records ({} failed) -> {}",
        s.records,
        s.failed,
        s.path.display()
    ));
    Ok(if s.heatmaps_failed > 0 {
        EXIT_SOME_FAILED
    } else {
        EXIT_OK
    })
}
