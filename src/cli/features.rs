//! `zsad features`: flags into [`FeaturesOptions`], the library's feature extraction.

use std::path::PathBuf;

use clap::Args;

use super::args::{ModelArgs, PosInterpArg};
use super::output::EXIT_OK;
use crate::error::Result;
use crate::jobs::features::{features, FeaturesOptions};

#[derive(Debug, Args)]
#[command(mut_arg("model", |a| a.required(true)))]
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
    #[arg(long, value_enum, default_value = "bicubic", hide_short_help = true)]
    pub pos_interp: PosInterpArg,
    /// tokenizer.json to use (default: the one beside the model, else the CLIP vocabulary built in)
    #[arg(long, value_name = "FILE", hide_short_help = true)]
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

pub fn run(args: FeaturesArgs) -> Result<u8> {
    features(&FeaturesOptions {
        model: args.model.options(),
        texts: args.texts.clone(),
        layers: args.layers.clone(),
        image_size: args.image_size,
        pos_interpolation: args.pos_interp.into(),
        tokenizer: args.tokenizer.clone(),
        batch_size: args.batch_size,
        out: args.out.clone(),
        images: args.images.clone(),
    })?;
    Ok(EXIT_OK)
}
