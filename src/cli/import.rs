//! `zsad import-checkpoint`: published AdaCLIP / AnomalyCLIP weights -> a zsad adapter.

use std::path::PathBuf;

use clap::Args;

use super::args::ModelArgs;
use super::output::EXIT_OK;
use crate::choice::Choice;
use crate::error::Result;
use crate::jobs::import::{import, ImportJobOptions};
use crate::method::import::{CheckpointFormat, ImportOptions};

#[derive(Debug, Args)]
#[command(mut_arg("model", |a| a.required(true)))]
pub struct ImportArgs {
    /// The checkpoint (.pth), e.g. AdaCLIP's pretrained_visa_clinicdb.pth or AnomalyCLIP's
    /// epoch_15.pth
    #[arg(value_name = "IN.pth")]
    pub input: PathBuf,
    /// Which project's layout
    #[arg(long, value_enum)]
    pub format: CheckpointFormat,
    /// The backbone the checkpoint was trained on (widths are checked against it)
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input size to record (default: 518 for ViT-L/14-336, else the backbone's)
    #[arg(long, value_name = "S")]
    pub image_size: Option<usize>,
    /// Tapped layers, 1-based, comma-separated (default: AdaCLIP the quarter points 6,12,18,24;
    /// AnomalyCLIP the last layer, as its released checkpoints effectively used)
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "L,...",
        hide_short_help = true
    )]
    pub layers: Option<Vec<usize>>,
    /// AnomalyCLIP: first layer (1-based) with the V-V path; 0 turns it off (default: depth/4,
    /// i.e. 6 of 24 = DPAM_layer 20)
    #[arg(long, value_name = "L", hide_short_help = true)]
    pub vv_from: Option<usize>,
    /// Object word to record for the prompts (default `object`)
    #[arg(long, value_name = "NAME", hide_short_help = true)]
    pub class_name: Option<String>,
    /// The adapter to write
    #[arg(long, short = 'o', value_name = "A.safetensors")]
    pub out: PathBuf,
}

pub fn run(args: ImportArgs) -> Result<u8> {
    let adapter = import(&ImportJobOptions {
        input: args.input.clone(),
        format: args.format,
        model: args.model.options(),
        import: ImportOptions {
            image_size: args.image_size,
            layers: args.layers.clone(),
            vv_from: args.vv_from,
            class_name: args.class_name.clone(),
        },
        out: args.out.clone(),
    })?;
    let c = &adapter.config;
    super::output::console(false).note(&format!(
        "wrote {} ({} tensors): preset {}, image size {}, layers {:?}",
        args.out.display(),
        adapter.tensors.len(),
        c.preset.name(),
        c.image_size,
        c.layers
    ));
    Ok(EXIT_OK)
}
