//! `zsad features` as a library job: CLIP embeddings and hidden states of images and texts,
//! for users who build on CLIP features and for parity checks against Python.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::prelude::ModelOptions;
use crate::clip::preprocess::preprocess;
use crate::clip::{Hooks, PosInterpolation};
use crate::data::image::{decode, into_rgb8};
use crate::error::{OptionError, Result};
use crate::fsio::OutDir;

/// Everything `zsad features` is asked to do.
#[derive(Debug, Clone)]
pub struct FeaturesOptions {
    pub model: ModelOptions,
    pub texts: Vec<String>,
    /// Hidden layers to store, 1-based.
    pub layers: Vec<usize>,
    /// Input size (default: the model's).
    pub image_size: Option<usize>,
    pub pos_interpolation: PosInterpolation,
    /// `tokenizer.json` (default: beside the model, else the built-in vocabulary).
    pub tokenizer: Option<PathBuf>,
    /// Images per forward pass, 1 to 256.
    pub batch_size: usize,
    /// The safetensors file to write.
    pub out: PathBuf,
    pub images: Vec<PathBuf>,
}

/// `image_embeds`, `layer_<i>` for each layer: passes of `batch_size` images, each moved to
/// host memory as it comes (a GPU holds one batch, however many images).
fn image_tensors(
    opts: &FeaturesOptions,
    vision: &crate::clip::VisionTransformer,
    size: usize,
    out: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let hooks = Hooks {
        taps: &opts.layers,
        ..Default::default()
    };
    let mut pooled = Vec::new();
    let mut taps: Vec<Vec<Tensor>> = vec![Vec::new(); opts.layers.len()];
    for chunk in opts.images.chunks(opts.batch_size) {
        let pixels = chunk
            .iter()
            .map(|p| preprocess(&into_rgb8(decode(p)?), size, vision.device()))
            .collect::<Result<Vec<_>>>()?;
        let o = vision.forward(&Tensor::stack(&pixels, 0)?, &hooks)?;
        pooled.push(o.pooled.to_device(&Device::Cpu)?);
        for (slot, t) in o.taps.into_iter().enumerate() {
            taps[slot].push(t.to_device(&Device::Cpu)?);
        }
    }
    out.insert("image_embeds".into(), Tensor::cat(&pooled, 0)?);
    for (l, parts) in opts.layers.iter().zip(taps) {
        out.insert(format!("layer_{l}"), Tensor::cat(&parts, 0)?);
    }
    Ok(())
}

/// `zsad features` as a job: the tensors written atomically to `out`.
pub fn features(opts: &FeaturesOptions) -> Result<PathBuf> {
    if opts.images.is_empty() && opts.texts.is_empty() {
        return Err(OptionError::rule(
            "nothing to embed: give IMAGE files and/or `text`",
        ));
    }
    if !(1..=256).contains(&opts.batch_size) {
        return Err(OptionError::value(
            "batch_size",
            opts.batch_size,
            "must be an integer from 1 to 256",
        ));
    }
    let plan = opts.model.plan(None)?;
    let depth = plan.config.vision_config.num_hidden_layers;
    if let Some(&l) = opts.layers.iter().find(|&&l| l == 0 || l > depth) {
        return Err(OptionError::value(
            "layers",
            l,
            format!("layers are 1-based, and the vision tower has {depth} (1..={depth})"),
        ));
    }
    let tokenizer_path = opts
        .tokenizer
        .clone()
        .or_else(|| plan.tokenizer().map(PathBuf::from));
    let tok = match &tokenizer_path {
        Some(p) => crate::clip::ClipTokenizer::from_file(p)?,
        None => crate::clip::ClipTokenizer::embedded()?,
    };
    let loaded = opts.model.build(plan)?;
    let model = &loaded.model;
    let size = opts.image_size.unwrap_or(model.vision.image_size());
    let vision = model.vision.at_image_size(size, opts.pos_interpolation)?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    if !opts.images.is_empty() {
        image_tensors(opts, &vision, size, &mut out)?;
    }
    if !opts.texts.is_empty() {
        let tok = tok.with_context_length(model.text.context_length());
        let ids = tok.encode_batch(&opts.texts)?;
        out.insert("text_embeds".into(), model.text_features(&ids)?);
    }
    let images: Vec<String> = opts
        .images
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let meta: HashMap<String, String> = [
        ("model".to_string(), opts.model.model.clone()),
        ("image_size".to_string(), size.to_string()),
        (
            "images".to_string(),
            serde_json::Value::from(images).to_string(),
        ),
        (
            "texts".to_string(),
            serde_json::Value::from(opts.texts.clone()).to_string(),
        ),
    ]
    .into_iter()
    .collect();
    let bytes = crate::data::tensors::serialize(&out, meta)?;
    let (dir, name) = OutDir::for_file(&opts.out)?;
    dir.write(&name, &bytes)?;
    Ok(opts.out.clone())
}
