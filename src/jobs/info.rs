//! `zsad info` as a library job: what a model is (architecture, parameters, naming, the GEMM
//! that runs), read from its plan and, for the GEMM, its built backbone.

use serde::Serialize;

use super::prelude::ModelOptions;
use crate::clip::{ClipConfig, LoadedModel, ModelSource};
use crate::error::Result;

/// A model described.
#[derive(Debug, Serialize)]
pub struct ModelInfo {
    /// The weight files (or `random weights (ARCH, seed N)`).
    pub source: String,
    /// `hugging_face`, `openai` or `random`.
    pub naming: &'static str,
    pub config: ClipConfig,
    pub grid: usize,
    pub vision_parameters: usize,
    pub text_parameters: usize,
    /// `tokenizer.json` beside the weights; `None`: the CLIP vocabulary built into zsad.
    pub tokenizer: Option<String>,
    pub gemm: String,
}

/// Parameters of the vision and text towers (projections included).
pub fn parameter_count(c: &ClipConfig) -> (usize, usize) {
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

/// `zsad info` as a job.
pub fn info(opts: &ModelOptions) -> Result<ModelInfo> {
    Ok(describe(&opts.load()?))
}

/// What a loaded model is (for a model already loaded, as the Python package's `Detector` holds).
pub fn describe(loaded: &LoadedModel) -> ModelInfo {
    let c = loaded.model.config.clone();
    let (vision_parameters, text_parameters) = parameter_count(&c);
    let source = match &loaded.source {
        ModelSource::Random { arch, seed } => format!("random weights ({arch}, seed {seed})"),
        ModelSource::Files { weights, .. } => weights
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    ModelInfo {
        source,
        naming: match loaded.naming {
            Some(crate::clip::weights::Naming::HuggingFace) => "hugging_face",
            Some(crate::clip::weights::Naming::OpenAi) => "openai",
            None => "random",
        },
        grid: c.vision_config.grid(),
        config: c,
        vision_parameters,
        text_parameters,
        tokenizer: loaded.tokenizer.as_ref().map(|p| p.display().to_string()),
        gemm: loaded.model.gemm(),
    }
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
