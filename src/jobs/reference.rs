//! Reference banks: normal images of the product whose patch features each test patch is also
//! compared with (`--reference` on detect, eval, calibrate and bench), built here from images
//! (the detector's own patch features per tapped layer, cut to a coreset when there are more
//! than the bank may hold) or read from a bank file of `zsad reference build` and checked
//! against the run's features. Images that cannot be used are reported and left out; a bank
//! needs at least one.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::pipeline::{decode_for_model, PipelineOptions};
use super::prelude::DetectorOptions;
use crate::data::image::DecodeLimits;
use crate::data::inputs::{self, Expanded, Input, WalkOptions};
use crate::error::{OptionError, Result};
use crate::fsio::{FileKind, OutDir};
use crate::method::reference::{
    coreset_rows, BankInfo, MemoryBank, ReferenceUse, SourceImage, FORMAT,
};
use crate::method::Detector;
use crate::progress::{Console, Lines};

/// Bank rows per layer that `reference_max_patches` allows by default: 16 references at
/// ViT-B/16 224 px (3,136 patches) are kept whole; at ViT-L/14 518 px (1,369 patches an
/// image) six images and more are cut to a coreset, which keeps the search to about a tenth
/// of the backbone's work per test image.
pub const DEFAULT_MAX_PATCHES: usize = 8192;

/// Seed of the coreset's projection and start (fixed, so a bank is reproducible).
pub const CORESET_SEED: u64 = 0;

/// How a run uses normal images of the product.
#[derive(Debug, Clone, Default)]
pub struct ReferenceOptions {
    /// Normal images (files or folders), or one bank file (`.safetensors`).
    pub reference: Vec<String>,
    /// Weight of the reference map, in [0, 1] (default 0.5).
    pub reference_weight: Option<f64>,
    /// The reference map alone, no text.
    pub reference_only: bool,
    /// Most bank rows per layer when built from images (default [`DEFAULT_MAX_PATCHES`]).
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
    pub fn settings(&self) -> Result<Value> {
        let mut v = run_settings(&self.bank, self.file.as_deref(), self.how)?;
        v["failed"] = json!(self
            .failed
            .iter()
            .map(|(p, e)| json!({"path": p, "error": e}))
            .collect::<Vec<_>>());
        Ok(v)
    }

    /// The size of the bank.
    pub fn summary(&self) -> BankSummary {
        BankSummary {
            images: self.bank.info.sources.len(),
            patches_per_layer: self.bank.info.patches_kept,
            layers: self.bank.layers.len(),
            bytes: self.bank.bytes(),
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

impl ReferenceOptions {
    pub fn is_set(&self) -> bool {
        !self.reference.is_empty()
    }

    /// A bank file rather than images: one `.safetensors` path.
    pub fn bank_file(&self) -> Result<Option<PathBuf>> {
        let is_bank = |p: &String| p.to_ascii_lowercase().ends_with(".safetensors");
        match self.reference.as_slice() {
            [one] if is_bank(one) => Ok(Some(PathBuf::from(one))),
            many if many.iter().any(is_bank) => Err(OptionError::rule(format!(
                "`reference`: a bank file is used alone, not with images or other banks ({})",
                many.join(", ")
            ))),
            _ => Ok(None),
        }
    }

    /// The options alone, before anything is loaded.
    pub fn check(&self) -> Result<()> {
        if !self.is_set() {
            if self.reference_only {
                return Err(OptionError::rule(
                    "`reference_only` needs `reference` PATH... (normal images of the product or a bank file)",
                ));
            }
            if self.reference_weight.is_some() {
                return Err(OptionError::rule(
                    "`reference_weight` weighs the reference map: add `reference` PATH..., or drop `reference_weight`",
                ));
            }
            if self.reference_max_patches.is_some() {
                return Err(OptionError::rule(
                    "`reference_max_patches` sizes the reference bank: add `reference` PATH..., or drop it",
                ));
            }
            return Ok(());
        }
        if self.reference.iter().any(|p| p == "-") {
            return Err(OptionError::rule(
                "`reference` -: references are named paths (stdin is for the inputs)",
            ));
        }
        if let Some(w) = self.reference_weight {
            if !(0.0..=1.0).contains(&w) {
                return Err(OptionError::value(
                    "reference_weight",
                    w,
                    "must be in [0, 1]",
                ));
            }
        }
        if self.reference_max_patches == Some(0) {
            return Err(OptionError::value(
                "reference_max_patches",
                0,
                "must be at least 1",
            ));
        }
        if self.reference_only && self.reference_weight.is_some() {
            return Err(OptionError::rule(
                "`reference_only` uses the reference map alone: drop `reference_weight`",
            ));
        }
        if let Some(file) = self.bank_file()? {
            if self.reference_max_patches.is_some() {
                return Err(OptionError::rule(format!(
                    "`reference_max_patches` applies when a bank is built from images, not to the bank file {}: rebuild it with `zsad reference build` and that option",
                    file.display()
                )));
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

    /// A bank file, read and checked against the run's model `settings` (no weights needed):
    /// `None` when the references are images (or there are none).
    pub fn read_bank_file(&self, settings: &Value) -> Result<Option<Attached>> {
        let Some(file) = self.bank_file()? else {
            return Ok(None);
        };
        let bank = MemoryBank::load(&file, &candle_core::Device::Cpu)?;
        bank.check_matches(&bank_features(settings), &file)?;
        Ok(Some(Attached {
            bank,
            file: Some(file),
            how: self.how(),
            failed: Vec::new(),
        }))
    }

    /// The bank for `detector`: `file` (from [`Self::read_bank_file`]) or built from the
    /// reference images; `None` without references. Unusable reference images are reported.
    pub fn load(
        &self,
        detector: &Detector,
        settings: &Value,
        file: Option<Attached>,
        build: &BankOptions,
        console: &Console,
    ) -> Result<Option<Attached>> {
        if !self.is_set() {
            return Ok(None);
        }
        if let Some(f) = file {
            return Ok(Some(f));
        }
        if let Some(f) = self.read_bank_file(settings)? {
            return Ok(Some(f));
        }
        let opts = BankOptions {
            max_patches: self.reference_max_patches.unwrap_or(DEFAULT_MAX_PATCHES),
            ..*build
        };
        let built = build_from_paths(
            &self.reference,
            detector,
            bank_features(settings),
            &opts,
            console,
        )?;
        Ok(Some(Attached {
            bank: built.bank,
            file: None,
            how: self.how(),
            failed: built.failed,
        }))
    }

    /// [`Self::load`], the bank attached to `detector` and recorded in `settings`
    /// (`settings.reference`): the detector to run and the bank's size, if any.
    pub fn attach(
        &self,
        detector: Detector,
        settings: &mut Value,
        file: Option<Attached>,
        build: &BankOptions,
        console: &Console,
    ) -> Result<(Detector, Option<BankSummary>)> {
        match self.load(&detector, settings, file, build, console)? {
            Some(r) => {
                settings["reference"] = r.settings()?;
                let summary = r.summary();
                Ok((detector.with_reference(r.bank, r.how)?, Some(summary)))
            }
            None => Ok((detector, None)),
        }
    }
}

/// How a bank is built.
#[derive(Debug, Clone, Copy)]
pub struct BankOptions {
    /// Most rows per layer; more are cut by the greedy coreset.
    pub max_patches: usize,
    pub coreset_seed: u64,
    pub limits: DecodeLimits,
    /// Images per model pass (0: as `zsad detect` picks).
    pub batch_size: usize,
}

impl BankOptions {
    /// A bank built from reference images inside a detect run: its decode limits and batch.
    pub fn for_pipeline(pipeline: &PipelineOptions) -> Self {
        Self {
            limits: pipeline.limits,
            batch_size: pipeline.batch_size,
            ..Default::default()
        }
    }
}

impl Default for BankOptions {
    fn default() -> Self {
        Self {
            max_patches: DEFAULT_MAX_PATCHES,
            coreset_seed: CORESET_SEED,
            limits: DecodeLimits::default(),
            batch_size: 0,
        }
    }
}

/// A bank and the reference images that could not be used, with why.
pub struct Built {
    pub bank: MemoryBank,
    pub failed: Vec<(String, String)>,
}

/// What makes a bank's features, from a run's model settings
/// (`detect::model_settings`): the backbone's files by content (not where they were
/// read from), the adapter by content (or the untrained preset's seed), the CLIP configuration,
/// and the detector settings that the image pass reads. The text side (prompts, class name,
/// scores, smoothing) is left out: one bank serves every text setting.
pub fn bank_features(settings: &Value) -> Value {
    let without = |v: &Value, key: &str| {
        let mut v = v.clone();
        if let Value::Object(m) = &mut v {
            m.remove(key);
        }
        v
    };
    let detector = &settings["detector"];
    let image_pass: serde_json::Map<String, Value> = [
        "preset",
        "activation",
        "image_size",
        "layers",
        "pos_interpolation",
        "visual_prompts",
        "round_prompts_f16",
        "patch_features",
        "vv_from",
        "head_weights",
    ]
    .into_iter()
    .map(|k| {
        (
            k.to_string(),
            detector.get(k).cloned().unwrap_or(Value::Null),
        )
    })
    .collect();
    json!({
        "model": without(&settings["model"], "spec"),
        "clip": settings["clip"],
        "adapter": without(&settings["adapter"], "path"),
        "image_pass": image_pass,
    })
}

/// Expands `paths` as detect's inputs are (masks left out) and builds their bank, reporting
/// each image that could not be used and the bank's size.
pub fn build_from_paths(
    paths: &[String],
    detector: &Detector,
    features: Value,
    opts: &BankOptions,
    console: &Console,
) -> Result<Built> {
    let expanded = inputs::expand(paths, &mut std::io::empty(), &WalkOptions::default())
        .map_err(|e| e.context("`reference`"))?;
    let built = build(detector, &expanded, features, opts, console)?;
    for (path, error) in &built.failed {
        console.warn(&format!("reference {path}: {error} (left out of the bank)"));
    }
    let info = &built.bank.info;
    let coreset = match info.max_patches {
        Some(m) => format!(
            ", cut from {} by the coreset (`reference_max_patches` {m})",
            info.patches_total
        ),
        None => String::new(),
    };
    console.note(&format!(
        "reference bank: {} image(s), {} patches per layer{coreset}, {} layer(s), {:.1} MB",
        info.sources.len(),
        info.patches_kept,
        info.layers.len(),
        built.bank.bytes() as f64 / 1e6
    ));
    Ok(built)
}

/// The patch features of the usable reference images, per layer, one `[P, E]` tensor an
/// image, with their sources and the images left out.
struct Collected {
    rows: Vec<Vec<Tensor>>,
    sources: Vec<SourceImage>,
    failed: Vec<(String, String)>,
    patches_per_image: usize,
}

/// The features of one pass's images: appended to `c` for those whose features are finite
/// (NaN weights make a bank useless), the others named in `c.failed`.
fn add_pass(
    detector: &Detector,
    ok: &[&Input],
    pixels: &[Tensor],
    c: &mut Collected,
) -> Result<()> {
    let feats = Tensor::stack(pixels, 0)
        .map_err(crate::Error::from)
        .and_then(|px| detector.patch_features(&px))
        .and_then(|f| {
            f.iter()
                .map(|t| t.to_dtype(DType::F32).map_err(crate::Error::from))
                .collect::<Result<Vec<_>>>()
        });
    let feats = match feats {
        Ok(f) => f,
        Err(e) => {
            for input in ok {
                c.failed.push((input.given.clone(), format!("model: {e}")));
            }
            return Ok(());
        }
    };
    let finite = feats
        .iter()
        .map(|t| t.abs()?.sum((1, 2))?.to_vec1::<f32>())
        .collect::<candle_core::Result<Vec<_>>>()?;
    for (i, input) in ok.iter().enumerate() {
        if finite.iter().any(|per_image| !per_image[i].is_finite()) {
            c.failed.push((
                input.given.clone(),
                "the model gave non-finite features: the model or adapter weights hold NaN or infinity".into(),
            ));
            continue;
        }
        for (layer, t) in feats.iter().enumerate() {
            let one = t.get(i)?; // [P, E]
            c.patches_per_image = one.dim(0)?;
            c.rows[layer].push(one);
        }
        c.sources.push(SourceImage {
            path: input.given.clone(),
            sha256: crate::fsio::sha256(&input.path, FileKind::Image)?,
        });
    }
    Ok(())
}

/// Every usable image's features, a pass at a time.
fn collect(
    detector: &Detector,
    inputs: &Expanded,
    opts: &BankOptions,
    console: &Console,
) -> Result<Collected> {
    let mut c = Collected {
        rows: vec![Vec::new(); detector.config().layers.len()],
        sources: Vec::new(),
        failed: inputs
            .missing
            .iter()
            .map(|m| (m.given.clone(), m.error.clone()))
            .collect(),
        patches_per_image: 0,
    };
    let batch = super::pipeline::pass_size(detector, opts.batch_size);
    let (size, dev) = (detector.image_size(), detector.device().clone());
    let total = inputs.inputs.len() as u64;
    let mut progress = console.progress(
        total,
        "{elapsed_precise} [{bar:30}] {pos}/{len} reference images  ETA {eta}",
        Lines::at_every_5_percent("reference", "image", total),
    );
    let mut done = 0;
    for chunk in inputs.inputs.chunks(batch) {
        if crate::progress::stop_requested() {
            return Err(crate::Error::Interrupted {
                kept: "no bank was written".into(),
            });
        }
        let (mut ok, mut pixels) = (Vec::new(), Vec::new());
        for input in chunk {
            match decode_for_model(&input.path, size, &dev, &opts.limits).0 {
                Ok((_, px)) => {
                    ok.push(input);
                    pixels.push(px);
                }
                Err(e) => c.failed.push((input.given.clone(), e)),
            }
        }
        if !ok.is_empty() {
            add_pass(detector, &ok, &pixels, &mut c)?;
        }
        done += chunk.len() as u64;
        progress.advance(done, String::new);
    }
    progress.finish();
    Ok(c)
}

/// The bank of `inputs`' patch features under `detector`, recorded with `features`.
pub fn build(
    detector: &Detector,
    inputs: &Expanded,
    features: Value,
    opts: &BankOptions,
    console: &Console,
) -> Result<Built> {
    let c = collect(detector, inputs, opts, console)?;
    if c.sources.is_empty() {
        let why = match c.failed.first() {
            Some((path, e)) => format!(": {path}: {e}"),
            None => String::new(),
        };
        return Err(OptionError::rule(format!(
            "no usable reference image among {} given{why}; `reference` takes normal images of the product (files or folders) or a bank from `zsad reference build`",
            inputs.inputs.len() + inputs.missing.len()
        )));
    }
    let mut layers = Vec::with_capacity(c.rows.len());
    let mut total_rows = 0;
    for per_image in c.rows {
        let all = Tensor::cat(&per_image, 0)?; // [N, E]
        total_rows = all.dim(0)?;
        let keep = coreset_rows(&all, opts.max_patches, opts.coreset_seed)?;
        layers.push(if keep.len() == total_rows {
            all
        } else {
            let idx = Tensor::from_vec(
                keep.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                keep.len(),
                all.device(),
            )?;
            all.index_select(&idx, 0)?
        });
    }
    let kept = layers[0].dim(0)?;
    let info = BankInfo {
        format: FORMAT.to_string(),
        features,
        layers: detector.config().layers.clone(),
        image_size: detector.image_size(),
        patches_per_image: c.patches_per_image,
        sources: c.sources,
        patches_total: total_rows,
        patches_kept: kept,
        max_patches: (kept < total_rows).then_some(opts.max_patches),
        coreset_seed: opts.coreset_seed,
    };
    Ok(Built {
        bank: MemoryBank { layers, info },
        failed: c.failed,
    })
}

/// What a run records of its bank in `run.json` (compared on `--resume`): where it came from
/// (a bank file by content), its source images by content, its size and how it is used.
pub fn run_settings(bank: &MemoryBank, file: Option<&Path>, how: ReferenceUse) -> Result<Value> {
    let file = match file {
        Some(p) => {
            json!({"path": p.display().to_string(), "sha256": crate::fsio::sha256(p, FileKind::Tensors)?})
        }
        None => Value::Null,
    };
    Ok(json!({
        "bank_file": file,
        "sources": bank.info.sources,
        "patches_total": bank.info.patches_total,
        "patches_kept": bank.info.patches_kept,
        "max_patches": bank.info.max_patches,
        "weight": how.weight,
        "only": how.only,
    }))
}

/// `zsad reference build`: a bank file from normal images of the product.
#[derive(Debug, Clone)]
pub struct BuildBankOptions {
    /// Normal images: files or folders.
    pub inputs: Vec<String>,
    pub detector: DetectorOptions,
    /// The bank file to write (`.safetensors`).
    pub out: PathBuf,
    pub build: BankOptions,
}

/// What `zsad reference build` made.
pub struct BuildBankSummary {
    pub out: PathBuf,
    pub images: usize,
    /// Images that could not be used (named in warnings).
    pub failed: usize,
}

/// `zsad reference build` as a job: checked, planned, the model built, the bank built and
/// written atomically.
pub fn build_bank_file(opts: &BuildBankOptions, console: &Console) -> Result<BuildBankSummary> {
    if !opts
        .out
        .to_string_lossy()
        .to_ascii_lowercase()
        .ends_with(".safetensors")
    {
        return Err(OptionError::rule(format!(
            "`out` {}: a bank is a .safetensors file (e.g. bank.safetensors)",
            opts.out.display()
        )));
    }
    if crate::fsio::is_dir(&opts.out) {
        return Err(OptionError::rule(format!(
            "`out` {} is a folder: name the bank file",
            opts.out.display()
        )));
    }
    if opts.inputs.iter().any(|p| p == "-") {
        return Err(OptionError::rule(
            "reference build -: name the images or folders (stdin is not read)",
        ));
    }
    if opts.build.max_patches == 0 {
        return Err(OptionError::value(
            "reference_max_patches",
            0,
            "must be at least 1",
        ));
    }
    let (dir, name) = OutDir::for_file(&opts.out)?;
    let built = opts.detector.plan(console)?.build()?;
    let bank = build_from_paths(
        &opts.inputs,
        &built.detector,
        bank_features(&built.settings),
        &opts.build,
        console,
    )?;
    dir.write(&name, &bank.bank.to_bytes()?)?;
    console.note(&format!("wrote {}", opts.out.display()));
    Ok(BuildBankSummary {
        out: opts.out.clone(),
        images: bank.bank.info.sources.len(),
        failed: bank.failed.len(),
    })
}
