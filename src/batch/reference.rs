//! Building a reference bank from normal images (`--reference`, `zsad reference build`): the
//! detector's own patch features of each image, per tapped layer, cut to a coreset when there
//! are more than the bank may hold. Images that cannot be used are reported and left out; a
//! bank needs at least one.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::pipeline::decode_for_model;
use super::run_record;
use crate::data::image::DecodeLimits;
use crate::data::inputs::Expanded;
use crate::method::reference::{coreset_rows, BankInfo, MemoryBank, SourceImage, FORMAT};
use crate::method::Detector;
use crate::progress::{Lines, Progress};
use crate::{Error, Result};

/// Bank rows per layer that `--reference-max-patches` allows by default: 16 references at
/// ViT-B/16 224 px (3,136 patches) are kept whole; at ViT-L/14 518 px (1,369 patches an
/// image) six images and more are cut to a coreset, which keeps the search to about a tenth
/// of the backbone's work per test image.
pub const DEFAULT_MAX_PATCHES: usize = 8192;

/// Seed of the coreset's projection and start (fixed, so a bank is reproducible).
pub const CORESET_SEED: u64 = 0;

/// How a bank is built.
#[derive(Debug, Clone, Copy)]
pub struct BankOptions {
    /// Most rows per layer; more are cut by the greedy coreset.
    pub max_patches: usize,
    pub coreset_seed: u64,
    pub limits: DecodeLimits,
    /// Images per model pass (0: as `zsad detect` picks).
    pub batch_size: usize,
    pub quiet: bool,
}

impl Default for BankOptions {
    fn default() -> Self {
        Self {
            max_patches: DEFAULT_MAX_PATCHES,
            coreset_seed: CORESET_SEED,
            limits: DecodeLimits::default(),
            batch_size: 0,
            quiet: true,
        }
    }
}

/// A bank and the reference images that could not be used, with why.
pub struct Built {
    pub bank: MemoryBank,
    pub failed: Vec<(String, String)>,
}

/// What makes a bank's features, from a run's model settings
/// ([`super::detect::model_settings`]): the backbone's files by content (not where they were
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

/// The bank of `inputs`' patch features under `detector`, recorded with `features`.
pub fn build(
    detector: &Detector,
    inputs: &Expanded,
    features: Value,
    opts: &BankOptions,
) -> Result<Built> {
    let mut failed: Vec<(String, String)> = inputs
        .missing
        .iter()
        .map(|m| (m.given.clone(), m.error.clone()))
        .collect();
    let batch = super::pipeline::pass_size(detector, opts.batch_size);
    let size = detector.image_size();
    let dev = detector.device().clone();
    let n_layers = detector.config().layers.len();
    let mut rows: Vec<Vec<Tensor>> = vec![Vec::new(); n_layers];
    let mut sources = Vec::new();
    let mut patches_per_image = 0;
    let total = inputs.inputs.len() as u64;
    let mut progress = Progress::new(
        total,
        opts.quiet,
        "{elapsed_precise} [{bar:30}] {pos}/{len} reference images  ETA {eta}",
        Lines {
            command: "reference",
            unit: "image",
            every: (total / 10).max(1),
        },
    );
    let mut done = 0;
    for chunk in inputs.inputs.chunks(batch) {
        let mut ok = Vec::new();
        let mut pixels = Vec::new();
        for input in chunk {
            match decode_for_model(&input.path, size, &dev, &opts.limits).0 {
                Ok((_, px)) => {
                    ok.push(input);
                    pixels.push(px);
                }
                Err(e) => failed.push((input.given.clone(), e)),
            }
        }
        if !ok.is_empty() {
            let feats = Tensor::stack(&pixels, 0).and_then(|px| {
                detector
                    .patch_features(&px)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            });
            match feats.and_then(|f| {
                f.iter()
                    .map(|t| t.to_dtype(DType::F32))
                    .collect::<candle_core::Result<Vec<_>>>()
            }) {
                Ok(feats) => {
                    // Per image: are all its features finite (NaN weights make a bank useless).
                    let finite = feats
                        .iter()
                        .map(|t| t.abs()?.sum((1, 2))?.to_vec1::<f32>())
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    for (i, input) in ok.iter().enumerate() {
                        if finite.iter().any(|per_image| !per_image[i].is_finite()) {
                            failed.push((
                                input.given.clone(),
                                "the model gave non-finite features: the model or adapter weights hold NaN or infinity".into(),
                            ));
                            continue;
                        }
                        for (layer, t) in feats.iter().enumerate() {
                            let one = t.get(i)?; // [P, E]
                            patches_per_image = one.dim(0)?;
                            rows[layer].push(one);
                        }
                        sources.push(SourceImage {
                            path: input.given.clone(),
                            sha256: run_record::sha256_file(&input.path)?,
                        });
                    }
                }
                Err(e) => {
                    for input in &ok {
                        failed.push((input.given.clone(), format!("model: {e}")));
                    }
                }
            }
        }
        done += chunk.len() as u64;
        progress.advance(done, String::new);
    }
    progress.finish();
    if sources.is_empty() {
        let why = match failed.first() {
            Some((path, e)) => format!(": {path}: {e}"),
            None => String::new(),
        };
        return Err(Error::Usage(format!(
            "no usable reference image among {} given{why}; --reference takes normal images of the product (files or folders) or a bank from `zsad reference build`",
            inputs.inputs.len() + inputs.missing.len()
        )));
    }
    let mut layers = Vec::with_capacity(n_layers);
    let mut total_rows = 0;
    for per_image in rows {
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
        image_size: size,
        patches_per_image,
        sources,
        patches_total: total_rows,
        patches_kept: kept,
        max_patches: (kept < total_rows).then_some(opts.max_patches),
        coreset_seed: opts.coreset_seed,
    };
    Ok(Built {
        bank: MemoryBank { layers, info },
        failed,
    })
}

/// What a run records of its bank in `run.json` (compared on `--resume`): where it came from
/// (a bank file by content), its source images by content, its size and how it is used.
pub fn run_settings(
    bank: &MemoryBank,
    file: Option<&Path>,
    how: crate::method::reference::ReferenceUse,
) -> Result<Value> {
    let file = match file {
        Some(p) => json!({"path": p.display().to_string(), "sha256": run_record::sha256_file(p)?}),
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
