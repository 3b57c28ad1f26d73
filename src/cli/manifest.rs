//! `zsad manifest`: a dataset folder's manifest, written by the library job.

use std::path::PathBuf;

use clap::Args;

use super::output::EXIT_OK;
use crate::error::Result;
use crate::jobs::manifest::write_manifest;

#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// Dataset root (MVTec AD, VisA, or images with `<stem>.png` / `<stem>_mask.png` masks beside
    /// them, e.g. Magnetic Tile Defect)
    #[arg(value_name = "ROOT")]
    pub root: PathBuf,
    /// Manifest to write: `.csv` or `.jsonl`; paths inside it are relative to its folder where
    /// possible
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: PathBuf,
    /// No summary line
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn run(args: ManifestArgs) -> Result<u8> {
    let s = write_manifest(&args.root, &args.out)?;
    super::output::console(args.quiet).note(&format!(
        "{} ({} anomalous) in {}, read as {:?} -> {}",
        super::output::count(s.images, "image", "images"),
        s.anomalous,
        super::output::count(s.classes, "class", "classes"),
        s.layout,
        args.out.display()
    ));
    Ok(EXIT_OK)
}
