//! `zsad reference build`: flags into [`BuildBankOptions`], the library's bank builder.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::args::DetectorArgs;
use super::output::{EXIT_OK, EXIT_SOME_FAILED};
use crate::data::image::DecodeLimits;
use crate::error::Result;
use crate::jobs::reference::{build_bank_file, BankOptions, BuildBankOptions, DEFAULT_MAX_PATCHES};

#[derive(Debug, Args)]
pub struct ReferenceCmd {
    #[command(subcommand)]
    pub action: ReferenceAction,
}

#[derive(Debug, Subcommand)]
pub enum ReferenceAction {
    /// Build a bank of normal patch features from images of the product, for `--reference
    /// bank.safetensors` on detect and eval. The bank records the backbone, adapter, layers,
    /// image size and source images; a run with other features refuses it.
    #[command(after_help = super::help::SHORT, after_long_help = super::help::REFERENCE_BUILD)]
    Build(BuildArgs),
}

#[derive(Debug, Args)]
#[command(mut_arg("model", |a| a.required(true)))]
pub struct BuildArgs {
    /// Normal images of the product: files or folders (searched recursively, masks left out)
    #[arg(value_name = "PATH", required = true)]
    pub inputs: Vec<String>,
    #[command(flatten)]
    pub detector: DetectorArgs,
    /// The bank file to write
    #[arg(long, short = 'o', value_name = "bank.safetensors")]
    pub out: PathBuf,
    /// Most bank patches per layer; more are cut to this many by PatchCore's greedy coreset
    #[arg(long, default_value_t = DEFAULT_MAX_PATCHES, value_name = "N", value_parser = super::flags::at_least(1))]
    pub reference_max_patches: usize,
    /// Images per model pass, at most 256 (0: as `zsad detect` picks)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub batch_size: usize,
    /// Largest image accepted, in pixels (width x height), checked before decoding
    #[arg(long, default_value_t = crate::data::image::DEFAULT_MAX_PIXELS, value_name = "N", hide_short_help = true)]
    pub max_pixels: u64,
    /// No progress or per-file warnings
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn run(cmd: ReferenceCmd) -> Result<u8> {
    let ReferenceAction::Build(args) = cmd.action;
    let console = super::output::console(args.quiet);
    let opts = BuildBankOptions {
        inputs: args.inputs.clone(),
        detector: args.detector.options(),
        out: args.out.clone(),
        build: BankOptions {
            max_patches: args.reference_max_patches,
            limits: DecodeLimits::with_max_pixels(args.max_pixels),
            batch_size: args.batch_size,
            ..Default::default()
        },
    };
    let s = build_bank_file(&opts, &console)?;
    Ok(if s.failed == 0 {
        EXIT_OK
    } else {
        EXIT_SOME_FAILED
    })
}
