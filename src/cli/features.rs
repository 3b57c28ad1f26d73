//! `zsad features`: CLIP embeddings and hidden states of images and texts, for users who build on
//! CLIP features and for parity checks against Python.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::bail;
use candle_core::Tensor;
use clap::Args;

use super::{ModelArgs, PosInterpArg};
use crate::clip::{preprocess::preprocess, Hooks};
use crate::data::image::{decode, to_rgb8};

#[derive(Debug, Args)]
#[command(after_help = "\
The output holds `image_embeds` [N, E] and `text_embeds` [T, E] (projected, not normalised, as
CLIPModel.get_image_features / get_text_features), and for each --layers i `layer_<i>`
[N, 1 + patches, width]: the residual stream after block i (Hugging Face hidden_states[i]; 0 is
the input of the first block). Images are squashed to the model's input size with PIL-style
bicubic resampling and CLIP-normalised. The metadata lists the model and the images in order.

Example:
  zsad features --model openai/clip-vit-base-patch16 --text 'a photo of a screw' \\
      --layers 6,12 --out feats.safetensors img1.png img2.jpg")]
pub struct FeaturesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A text to embed (repeatable)
    #[arg(long = "text", short = 't', value_name = "T")]
    pub texts: Vec<String>,
    /// Hidden layers to store, comma-separated, 1-based (e.g. 6,12)
    #[arg(long, value_delimiter = ',', value_name = "I,J")]
    pub layers: Vec<usize>,
    /// Input size in pixels (default: the model's); other sizes resize the position embedding
    #[arg(long, value_name = "S")]
    pub image_size: Option<usize>,
    /// How the position embedding is resized for --image-size
    #[arg(long, value_enum, default_value = "bicubic")]
    pub pos_interp: PosInterpArg,
    /// tokenizer.json to use (default: the one beside the model, else the CLIP vocabulary built in)
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Images per forward pass, 1 to 256
    #[arg(long, default_value_t = 8, value_parser = super::flags::count_in(1, 256))]
    pub batch_size: usize,
    /// Output safetensors file (written atomically)
    #[arg(long, short = 'o', value_name = "F")]
    pub out: PathBuf,
    /// Image files
    #[arg(value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
}

pub fn run(args: FeaturesArgs) -> anyhow::Result<()> {
    if args.images.is_empty() && args.texts.is_empty() {
        bail!("nothing to embed: give IMAGE files and/or --text");
    }
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let device = model.vision.device().clone();
    let size = args.image_size.unwrap_or(model.vision.image_size());
    let vision = model.vision.at_image_size(size, args.pos_interp.into())?;
    for &l in &args.layers {
        if l == 0 || l > vision.depth() {
            bail!(
                "--layers {l}: layers are 1-based, and the vision tower has {} (1..={})",
                vision.depth(),
                vision.depth()
            );
        }
    }
    let mut out: HashMap<String, Tensor> = HashMap::new();

    if !args.images.is_empty() {
        let hooks = Hooks {
            taps: &args.layers,
            ..Default::default()
        };
        let mut pooled = Vec::new();
        let mut taps: Vec<Vec<Tensor>> = vec![Vec::new(); args.layers.len()];
        for chunk in args.images.chunks(args.batch_size) {
            let pixels = chunk
                .iter()
                .map(|p| {
                    let img = decode(p)?;
                    preprocess(&to_rgb8(&img), size, &device)
                })
                .collect::<crate::Result<Vec<_>>>()?;
            let batch = Tensor::stack(&pixels, 0)?;
            let o = vision.forward(&batch, &hooks)?;
            // Kept in host memory as they come: a GPU holds one batch, however many images.
            let cpu = candle_core::Device::Cpu;
            pooled.push(o.pooled.to_device(&cpu)?);
            for (slot, t) in o.taps.into_iter().enumerate() {
                taps[slot].push(t.to_device(&cpu)?);
            }
        }
        out.insert("image_embeds".into(), Tensor::cat(&pooled, 0)?);
        for (l, parts) in args.layers.iter().zip(taps) {
            out.insert(format!("layer_{l}"), Tensor::cat(&parts, 0)?);
        }
    }

    if !args.texts.is_empty() {
        let tok = super::detector_args::tokenizer(&args.tokenizer, &loaded)?
            .with_context_length(model.text.context_length());
        let ids = tok.encode_batch(&args.texts)?;
        out.insert("text_embeds".into(), model.text_features(&ids)?);
    }

    let meta: HashMap<String, String> = [
        ("model".to_string(), args.model.model.clone()),
        ("image_size".to_string(), size.to_string()),
        (
            "images".to_string(),
            serde_json::to_string(
                &args
                    .images
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>(),
            )?,
        ),
        ("texts".to_string(), serde_json::to_string(&args.texts)?),
    ]
    .into_iter()
    .collect();
    let bytes = crate::data::tensors::serialize(&out, meta)?;
    super::write_atomic(&args.out, &bytes)?;
    Ok(())
}
