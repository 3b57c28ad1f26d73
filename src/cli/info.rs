//! `zsad info`: what a model is, as text or JSON.

use clap::Args;

use super::args::ModelArgs;
use super::output::EXIT_OK;
use crate::error::Result;
use crate::jobs::info::{info, ModelInfo};

#[derive(Debug, Args)]
#[command(mut_arg("model", |a| a.required(true)))]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

fn text(i: &ModelInfo) {
    let (v, t) = (&i.config.vision_config, &i.config.text_config);
    println!("source      {} ({} names)", i.source, i.naming);
    println!(
        "vision      ViT {} layers, width {}, {} heads x {}, MLP {}, {}",
        v.num_hidden_layers,
        v.hidden_size,
        v.num_attention_heads,
        v.head_dim(),
        v.intermediate_size,
        v.hidden_act
    );
    println!(
        "            {}px input, {}px patches, {}x{} grid = {} tokens, {:.1}M parameters",
        v.image_size,
        v.patch_size,
        i.grid,
        i.grid,
        i.grid * i.grid + 1,
        i.vision_parameters as f64 / 1e6
    );
    println!(
        "text        {} layers, width {}, {} heads, MLP {}, vocab {}, context {}, {}, {:.1}M parameters",
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.intermediate_size,
        t.vocab_size,
        t.max_position_embeddings,
        t.hidden_act,
        i.text_parameters as f64 / 1e6
    );
    println!("embedding   {}", i.config.projection_dim);
    println!("gemm        {}", i.gemm);
    println!(
        "tokenizer   {}",
        i.tokenizer.as_deref().unwrap_or(
            "the CLIP vocabulary built into zsad (no tokenizer.json beside the weights)"
        )
    );
}

pub fn run(args: InfoArgs) -> Result<u8> {
    let i = info(&args.model.options())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&i).unwrap_or_default());
    } else {
        text(&i);
    }
    Ok(EXIT_OK)
}
