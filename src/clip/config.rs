//! CLIP architecture description: Hugging Face `config.json` fields, named presets, and the
//! numerics switches (activation, position-embedding interpolation) the anomaly methods need.

use serde::{Deserialize, Serialize};

/// MLP non-linearity. OpenAI weights were trained with QuickGELU, but AdaCLIP and April-GAN run
/// them with exact-erf GELU (SPEC §0), so the choice is a run-time switch, not a property of weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · σ(1.702 x)` (Hugging Face `quick_gelu`).
    QuickGelu,
    /// Exact GELU `x · Φ(x)` with erf (Hugging Face `gelu`), not the tanh approximation.
    Gelu,
}

impl Activation {
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::QuickGelu => "quick_gelu",
            Self::Gelu => "gelu",
        }
    }
}

/// How the position embedding is resized when the input size differs from the trained one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PosInterpolation {
    /// PyTorch `bicubic`, `align_corners=False`, A = -0.75 (AdaCLIP's `resize_pos_embed`, HF's
    /// `interpolate_pos_encoding`).
    #[default]
    Bicubic,
    /// PyTorch `bilinear`, `align_corners=False` (AnomalyCLIP).
    Bilinear,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_channels() -> usize {
    3
}

/// The image tower (Hugging Face `vision_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Input size the position embedding was trained for.
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

/// The text tower (Hugging Face `text_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Hugging Face's legacy value 2 means "pool at the argmax token id" (the EOT id 49407 is the
    /// largest id of the CLIP vocabulary); any other value pools at its first occurrence.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_eos() -> u32 {
    2
}

/// A whole CLIP model: both towers and the shared embedding width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub vision_config: VisionConfig,
    pub text_config: TextConfig,
    pub projection_dim: usize,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// Patches per side at the trained input size.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn activation(&self) -> crate::Result<Activation> {
        Activation::from_hf_name(&self.hidden_act).ok_or_else(|| {
            crate::error::invalid!("vision hidden_act {:?} is not supported", self.hidden_act)
        })
    }
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn activation(&self) -> crate::Result<Activation> {
        Activation::from_hf_name(&self.hidden_act).ok_or_else(|| {
            crate::error::invalid!("text hidden_act {:?} is not supported", self.hidden_act)
        })
    }
}

impl ClipConfig {
    /// Parses a Hugging Face `CLIPModel` `config.json`.
    pub fn from_hf_json(text: &str) -> crate::Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| crate::Error::Model(format!("config.json is not a CLIP config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> crate::Result<()> {
        let v = &self.vision_config;
        let t = &self.text_config;
        let bad = |m: String| Err(crate::Error::Model(m));
        if v.hidden_size % v.num_attention_heads != 0 {
            return bad(format!(
                "vision hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            return bad(format!(
                "text hidden_size {} is not divisible by num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return bad(format!(
                "vision image_size {} / patch_size {} give no patch",
                v.image_size, v.patch_size
            ));
        }
        v.activation()?;
        t.activation()?;
        Ok(())
    }

    /// Sets the MLP activation of both towers (AdaCLIP runs OpenAI weights with exact GELU).
    pub fn with_activation(mut self, act: Activation) -> Self {
        self.vision_config.hidden_act = act.hf_name().into();
        self.text_config.hidden_act = act.hf_name().into();
        self
    }

    #[allow(clippy::too_many_arguments)]
    fn openai(
        width: usize,
        layers: usize,
        patch: usize,
        image: usize,
        text_width: usize,
        text_heads: usize,
        embed: usize,
    ) -> Self {
        Self {
            vision_config: VisionConfig {
                hidden_size: width,
                intermediate_size: 4 * width,
                num_hidden_layers: layers,
                num_attention_heads: width / 64,
                image_size: image,
                patch_size: patch,
                num_channels: 3,
                layer_norm_eps: 1e-5,
                hidden_act: "quick_gelu".into(),
            },
            text_config: TextConfig {
                vocab_size: 49408,
                hidden_size: text_width,
                intermediate_size: 4 * text_width,
                num_hidden_layers: 12,
                num_attention_heads: text_heads,
                max_position_embeddings: 77,
                layer_norm_eps: 1e-5,
                hidden_act: "quick_gelu".into(),
                eos_token_id: 2,
            },
            projection_dim: embed,
        }
    }

    /// `openai/clip-vit-base-patch32`.
    pub fn vit_b_32() -> Self {
        Self::openai(768, 12, 32, 224, 512, 8, 512)
    }
    /// `openai/clip-vit-base-patch16`.
    pub fn vit_b_16() -> Self {
        Self::openai(768, 12, 16, 224, 512, 8, 512)
    }
    /// `openai/clip-vit-large-patch14`.
    pub fn vit_l_14() -> Self {
        Self::openai(1024, 24, 14, 224, 768, 12, 768)
    }
    /// `openai/clip-vit-large-patch14-336`, the backbone of AdaCLIP and AnomalyCLIP.
    pub fn vit_l_14_336() -> Self {
        Self::openai(1024, 24, 14, 336, 768, 12, 768)
    }
    /// A tiny model of the same structure for tests and smoke runs (not a real architecture).
    pub fn tiny() -> Self {
        Self {
            vision_config: VisionConfig {
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 4,
                num_attention_heads: 2,
                image_size: 32,
                patch_size: 8,
                num_channels: 3,
                layer_norm_eps: 1e-5,
                hidden_act: "quick_gelu".into(),
            },
            text_config: TextConfig {
                vocab_size: 49408,
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                max_position_embeddings: 77,
                layer_norm_eps: 1e-5,
                hidden_act: "quick_gelu".into(),
                eos_token_id: 2,
            },
            projection_dim: 24,
        }
    }

    /// Named architectures, as open_clip spells them (`ViT-L-14-336`), with the HF ids they match.
    pub fn by_name(name: &str) -> Option<Self> {
        let n = name.to_ascii_lowercase().replace(['/', '_', '@'], "-");
        Some(match n.as_str() {
            "vit-b-32" | "openai-clip-vit-base-patch32" => Self::vit_b_32(),
            "vit-b-16" | "openai-clip-vit-base-patch16" => Self::vit_b_16(),
            "vit-l-14" | "openai-clip-vit-large-patch14" => Self::vit_l_14(),
            "vit-l-14-336" | "vit-l-14-336px" | "openai-clip-vit-large-patch14-336" => {
                Self::vit_l_14_336()
            }
            "tiny" => Self::tiny(),
            _ => return None,
        })
    }

    pub const NAMES: &'static [&'static str] =
        &["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "tiny"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_real_openai_config() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/clip-tokenizer/config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("skipping: {} is absent", path.display());
            return;
        };
        let cfg = ClipConfig::from_hf_json(&text).unwrap();
        assert_eq!(cfg, ClipConfig::vit_b_32());
    }

    #[test]
    fn presets_by_name() {
        for name in ClipConfig::NAMES {
            let cfg = ClipConfig::by_name(name).unwrap();
            cfg.validate().unwrap();
        }
        let l = ClipConfig::by_name("ViT-L/14@336").unwrap();
        assert_eq!(l.vision_config.grid(), 24);
        assert_eq!(
            ClipConfig::by_name("openai/clip-vit-base-patch16"),
            Some(ClipConfig::vit_b_16())
        );
        assert!(ClipConfig::by_name("resnet50").is_none());
    }

    #[test]
    fn rejects_bad_heads() {
        let mut c = ClipConfig::tiny();
        c.vision_config.num_attention_heads = 3;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_attention_heads"));
    }
}
