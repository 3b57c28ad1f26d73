//! `zsad import-checkpoint` as a library job: a published AdaCLIP or AnomalyCLIP checkpoint
//! (`.pth`) converted into a zsad adapter for a backbone, recorded with that backbone's identity.

use std::path::PathBuf;

use super::prelude::ModelOptions;
use crate::error::{OptionError, Result};
use crate::fsio::OutDir;
use crate::method::adapter::backbone_identity;
use crate::method::import::{import_checkpoint, CheckpointFormat, ImportOptions};
use crate::method::Adapter;

/// Everything `zsad import-checkpoint` is asked to do.
#[derive(Debug, Clone)]
pub struct ImportJobOptions {
    pub input: PathBuf,
    pub format: CheckpointFormat,
    /// The backbone the checkpoint was trained on (widths are checked against it).
    pub model: ModelOptions,
    pub import: ImportOptions,
    /// The adapter to write.
    pub out: PathBuf,
}

/// `zsad import-checkpoint` as a job: the adapter written atomically and returned.
pub fn import(opts: &ImportJobOptions) -> Result<Adapter> {
    if opts.out == opts.input {
        return Err(OptionError::rule(
            "`out` is the checkpoint itself: name a new adapter file",
        ));
    }
    let plan = opts.model.plan(None)?;
    let spec = &opts.model.model;
    let mut adapter = import_checkpoint(opts.format, &opts.input, &plan.config, spec, &opts.import)
        .map_err(|e| e.context(format!("cannot import {}", opts.input.display())))?;
    adapter.backbone = Some(backbone_identity(&super::prelude::model_identity(
        &plan, spec,
    )?));
    let (dir, name) = OutDir::for_file(&opts.out)?;
    dir.write(&name, &adapter.to_bytes()?)?;
    Ok(adapter)
}
