//! `zsad import-checkpoint`: published AdaCLIP / AnomalyCLIP weights -> a zsad adapter.

use crate::choice::Choice;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::ModelArgs;
use crate::method::import::{import_checkpoint, CheckpointFormat, ImportOptions};

#[derive(Debug, Args)]
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
    #[arg(long, value_delimiter = ',', value_name = "L,...")]
    pub layers: Option<Vec<usize>>,
    /// AnomalyCLIP: first layer (1-based) with the V-V path; 0 turns it off (default: depth/4,
    /// i.e. 6 of 24 = DPAM_layer 20)
    #[arg(long, value_name = "L")]
    pub vv_from: Option<usize>,
    /// Object word to record for the prompts (default `object`)
    #[arg(long, value_name = "NAME")]
    pub class_name: Option<String>,
    /// The adapter to write
    #[arg(long, short = 'o', value_name = "A.safetensors")]
    pub out: PathBuf,
}

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    // Only the architecture matters here; the method's activation is recorded in the adapter.
    let loaded = args.model.load()?;
    let opts = ImportOptions {
        image_size: args.image_size,
        layers: args.layers.clone(),
        vv_from: args.vv_from,
        class_name: args.class_name.clone(),
    };
    let adapter = import_checkpoint(
        args.format,
        &args.input,
        &loaded.model.config,
        &args.model.model,
        &opts,
    )
    .with_context(|| format!("cannot import {}", args.input.display()))?;
    super::write_atomic(&args.out, &adapter.to_bytes()?)?;
    let c = &adapter.config;
    eprintln!(
        "zsad: wrote {} ({} tensors): preset {}, image size {}, layers {:?}",
        args.out.display(),
        adapter.tensors.len(),
        c.preset.name(),
        c.image_size,
        c.layers
    );
    Ok(())
}
