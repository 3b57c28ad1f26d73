//! `--reference` on `detect` and `eval` (normal images of the product, or a bank file) and
//! `zsad reference build` (a bank file to reuse across runs and machines).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::detector_args::DetectorArgs;
use super::{EXIT_OK, EXIT_SOME_FAILED};
use crate::batch::reference::{self as bank_builder, BankOptions, DEFAULT_MAX_PATCHES};
use crate::data::image::DecodeLimits;
use crate::data::inputs::{self, WalkOptions};
use crate::method::reference::{MemoryBank, ReferenceUse};
use crate::method::Detector;

/// How a run uses normal images of the product.
#[derive(Debug, Clone, Args)]
pub struct ReferenceArgs {
    /// Normal images of the product (files or folders, walked as inputs are), or one bank file
    /// from `zsad reference build`: each test patch is also compared with their patches, and
    /// its distance to the nearest one is fused into the map. Several paths may follow one
    /// --reference; give it after the INPUTs (or end its list with --)
    #[arg(long, value_name = "PATH", num_args = 1.., action = clap::ArgAction::Append)]
    pub reference: Vec<String>,
    /// Weight w of the reference map: map = (1 - w) * method + w * reference, from 0 to 1
    /// (default 0.5, WinCLIP+'s average)
    #[arg(
        long,
        value_name = "W",
        value_parser = super::flags::unit_interval,
        allow_negative_numbers = true
    )]
    pub reference_weight: Option<f64>,
    /// The reference map alone, no text: the score is the map's peak (a nearest-neighbour
    /// detector on the method's CLIP features, as PatchCore on CLIP)
    #[arg(long)]
    pub reference_only: bool,
    /// Most bank patches per layer when the bank is built from images (default 8192); more are
    /// cut to this many by PatchCore's greedy coreset
    #[arg(long, value_name = "N", value_parser = super::flags::at_least(1))]
    pub reference_max_patches: Option<usize>,
}

/// A bank in use: where it came from and how it joins the method.
pub struct Attached {
    pub bank: MemoryBank,
    pub file: Option<PathBuf>,
    pub how: ReferenceUse,
    /// Reference images that could not be used (each named, with why).
    pub failed: Vec<(String, String)>,
}

impl Attached {
    /// `settings.reference` in `run.json`.
    pub fn settings(&self) -> anyhow::Result<Value> {
        let mut v = bank_builder::run_settings(&self.bank, self.file.as_deref(), self.how)?;
        v["failed"] = serde_json::json!(self
            .failed
            .iter()
            .map(|(p, e)| serde_json::json!({"path": p, "error": e}))
            .collect::<Vec<_>>());
        Ok(v)
    }
}

/// A bank file rather than images: one `.safetensors` path.
fn bank_file(paths: &[String]) -> anyhow::Result<Option<PathBuf>> {
    let is_bank = |p: &String| p.to_ascii_lowercase().ends_with(".safetensors");
    match paths {
        [one] if is_bank(one) => Ok(Some(PathBuf::from(one))),
        many if many.iter().any(is_bank) => bail!(
            "--reference: a bank file is used alone, not with images or other banks ({})",
            many.join(", ")
        ),
        _ => Ok(None),
    }
}

impl ReferenceArgs {
    /// The flags alone, before anything is loaded.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.reference.is_empty() {
            if self.reference_only {
                bail!("--reference-only needs --reference PATH... (normal images of the product or a bank file)");
            }
            if self.reference_weight.is_some() {
                bail!("--reference-weight weighs the reference map: add --reference PATH..., or drop --reference-weight");
            }
            if self.reference_max_patches.is_some() {
                bail!("--reference-max-patches sizes the reference bank: add --reference PATH..., or drop it");
            }
            return Ok(());
        }
        if self.reference.iter().any(|p| p == "-") {
            bail!("--reference -: references are named paths (stdin is for the INPUTs)");
        }
        if self.reference_only && self.reference_weight.is_some() {
            bail!("--reference-only uses the reference map alone: drop --reference-weight");
        }
        if let Some(file) = bank_file(&self.reference)? {
            if self.reference_max_patches.is_some() {
                bail!(
                    "--reference-max-patches applies when a bank is built from images, not to the bank file {}: rebuild it with `zsad reference build --reference-max-patches N`",
                    file.display()
                );
            }
        }
        Ok(())
    }

    pub fn how(&self) -> ReferenceUse {
        ReferenceUse {
            weight: if self.reference_only {
                1.0
            } else {
                self.reference_weight
                    .unwrap_or(ReferenceUse::default().weight)
            },
            only: self.reference_only,
        }
    }

    /// The bank for `detector` (read from a bank file and checked against `settings`, or built
    /// from the reference images), or `None` without --reference. Unusable reference images
    /// are reported on stderr unless `quiet`.
    pub fn load(
        &self,
        detector: &Detector,
        settings: &Value,
        limits: DecodeLimits,
        batch_size: usize,
        quiet: bool,
    ) -> anyhow::Result<Option<Attached>> {
        self.check()?;
        if self.reference.is_empty() {
            return Ok(None);
        }
        let features = bank_builder::bank_features(settings);
        let how = self.how();
        if let Some(file) = bank_file(&self.reference)? {
            let bank = MemoryBank::load(&file, detector.device())?;
            bank.check_matches(&features, &file.display().to_string())?;
            return Ok(Some(Attached {
                bank,
                file: Some(file),
                how,
                failed: Vec::new(),
            }));
        }
        let opts = BankOptions {
            max_patches: self.reference_max_patches.unwrap_or(DEFAULT_MAX_PATCHES),
            limits,
            batch_size,
            quiet,
            ..Default::default()
        };
        let built = build_bank(&self.reference, detector, features, &opts)?;
        Ok(Some(Attached {
            bank: built.bank,
            file: None,
            how,
            failed: built.failed,
        }))
    }
}

impl ReferenceArgs {
    /// [`Self::load`], and the bank attached to `detector` and recorded in `settings`
    /// (`settings.reference`): the detector to run and the bank's record, if any.
    pub fn attach(
        &self,
        detector: Detector,
        settings: &mut Value,
        limits: DecodeLimits,
        batch_size: usize,
        quiet: bool,
    ) -> anyhow::Result<(Detector, Option<BankSummary>)> {
        match self.load(&detector, settings, limits, batch_size, quiet)? {
            Some(r) => {
                settings["reference"] = r.settings()?;
                let summary = BankSummary {
                    images: r.bank.info.sources.len(),
                    patches_per_layer: r.bank.info.patches_kept,
                    layers: r.bank.layers.len(),
                    bytes: r.bank.bytes(),
                };
                Ok((detector.with_reference(r.bank, r.how)?, Some(summary)))
            }
            None => Ok((detector, None)),
        }
    }
}

/// The size of a bank in use.
#[derive(Debug, Clone, Copy)]
pub struct BankSummary {
    pub images: usize,
    pub patches_per_layer: usize,
    pub layers: usize,
    pub bytes: usize,
}

/// Expands `paths` as detect's inputs are (masks left out) and builds their bank, reporting
/// each image that could not be used.
fn build_bank(
    paths: &[String],
    detector: &Detector,
    features: Value,
    opts: &BankOptions,
) -> anyhow::Result<bank_builder::Built> {
    let expanded = inputs::expand(paths, &mut std::io::empty(), WalkOptions::default())
        .context("--reference")?;
    let built = bank_builder::build(detector, &expanded, features, opts)?;
    if !opts.quiet {
        for (path, error) in &built.failed {
            eprintln!("zsad: warning: reference {path}: {error} (left out of the bank)");
        }
        let info = &built.bank.info;
        let coreset = match info.max_patches {
            Some(m) => format!(
                ", cut from {} by the coreset (--reference-max-patches {m})",
                info.patches_total
            ),
            None => String::new(),
        };
        eprintln!(
            "zsad: reference bank: {} image(s), {} patches per layer{coreset}, {} layer(s), {:.1} MB",
            info.sources.len(),
            info.patches_kept,
            info.layers.len(),
            built.bank.bytes() as f64 / 1e6
        );
    }
    Ok(built)
}

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
    #[command(after_help = super::AFTER_HELP)]
    Build(BuildArgs),
}

#[derive(Debug, Args)]
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
    #[arg(long, default_value_t = crate::data::image::DEFAULT_MAX_PIXELS, value_name = "N")]
    pub max_pixels: u64,
    /// No progress or per-file warnings
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn run(cmd: ReferenceCmd) -> anyhow::Result<u8> {
    let ReferenceAction::Build(args) = cmd.action;
    if !args
        .out
        .to_string_lossy()
        .to_ascii_lowercase()
        .ends_with(".safetensors")
    {
        bail!(
            "--out {}: a bank is a .safetensors file (e.g. --out bank.safetensors)",
            args.out.display()
        );
    }
    if args.out.is_dir() {
        bail!(
            "--out {} is a folder: name the bank file",
            args.out.display()
        );
    }
    if args.inputs.iter().any(|p| p == "-") {
        bail!("reference build -: name the images or folders (stdin is not read)");
    }
    let built = args.detector.build(args.quiet)?;
    let (detector, settings) = (built.detector, built.settings);
    let opts = BankOptions {
        max_patches: args.reference_max_patches,
        limits: DecodeLimits::with_max_pixels(args.max_pixels),
        batch_size: args.batch_size,
        quiet: args.quiet,
        ..Default::default()
    };
    let built = build_bank(
        &args.inputs,
        &detector,
        bank_builder::bank_features(&settings),
        &opts,
    )?;
    built.bank.save(&args.out)?;
    if !args.quiet {
        eprintln!("zsad: wrote {}", args.out.display());
    }
    Ok(if built.failed.is_empty() {
        EXIT_OK
    } else {
        EXIT_SOME_FAILED
    })
}
