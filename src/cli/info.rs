//! `zsad info`: what a model is.

use clap::Args;

use super::ModelArgs;
use crate::clip::{ClipConfig, ModelSource};

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

fn parameter_count(c: &ClipConfig) -> (usize, usize) {
    let v = &c.vision_config;
    let t = &c.text_config;
    let block = |d: usize, m: usize| 4 * d * d + 4 * d + 2 * d * m + m + d + 4 * d;
    let g = v.grid();
    let vision = v.hidden_size * v.num_channels * v.patch_size * v.patch_size
        + v.hidden_size * (g * g + 2)
        + 4 * v.hidden_size
        + v.num_hidden_layers * block(v.hidden_size, v.intermediate_size)
        + v.hidden_size * c.projection_dim;
    let text = t.hidden_size * (t.vocab_size + t.max_position_embeddings)
        + 2 * t.hidden_size
        + t.num_hidden_layers * block(t.hidden_size, t.intermediate_size)
        + t.hidden_size * c.projection_dim;
    (vision, text)
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let c = &loaded.model.config;
    let v = &c.vision_config;
    let t = &c.text_config;
    let (pv, pt) = parameter_count(c);
    let source = match &loaded.source {
        ModelSource::Random { arch, seed } => format!("random weights ({arch}, seed {seed})"),
        ModelSource::Files { weights, .. } => weights
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let naming = match loaded.naming {
        Some(crate::clip::weights::Naming::HuggingFace) => "hugging_face",
        Some(crate::clip::weights::Naming::OpenAi) => "openai",
        None => "random",
    };
    if args.json {
        let j = serde_json::json!({
            "source": source,
            "naming": naming,
            "config": c,
            "grid": v.grid(),
            "vision_parameters": pv,
            "text_parameters": pt,
            "tokenizer": loaded.tokenizer.as_ref().map(|p| p.display().to_string()),
            "gemm": loaded.model.gemm(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!("source      {source} ({naming} names)");
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
        v.grid(),
        v.grid(),
        v.grid() * v.grid() + 1,
        pv as f64 / 1e6
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
        pt as f64 / 1e6
    );
    println!("embedding   {}", c.projection_dim);
    println!("gemm        {}", loaded.model.gemm());
    println!(
        "tokenizer   {}",
        loaded.tokenizer.as_ref().map_or(
            "none beside the weights (pass --tokenizer where needed)".into(),
            |p| p.display().to_string()
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published sizes: ViT-B/32 has 87.8M vision and 63.2M text parameters (151.3M in all).
    #[test]
    fn parameter_count_of_vit_b_32() {
        let (v, t) = parameter_count(&ClipConfig::vit_b_32());
        assert_eq!(v + t, 151_277_313 - 1, "vision {v} text {t}");
    }
}
