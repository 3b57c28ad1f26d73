//! CLIP architecture description: Hugging Face `config.json` fields, named presets, and the
//! numerics switches (activation, position-embedding interpolation) the anomaly methods need.

use serde::{Deserialize, Serialize};

/// MLP non-linearity. OpenAI weights were trained with QuickGELU, but AdaCLIP and April-GAN run
/// them with exact-erf GELU (caoyunkang/AdaCLIP@e27ee32 `method/clip_model.py` l.81: `act_layer =
/// nn.GELU` without `quick_gelu`), so the choice is a run-time switch, not a property of weights.
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

/// Widest hidden state, embedding and (a quarter of the) MLP width a config may declare.
pub const MAX_WIDTH: usize = 16384;
/// Most blocks per tower.
pub const MAX_LAYERS: usize = 256;
/// Largest image size (and patch size) a config may declare as trained.
pub const MAX_IMAGE_SIZE: usize = 4096;
/// Largest input size a model runs at, unless it was trained larger: ViT-L/14 at 2048 px is
/// 21,316 tokens per image, 16 times the papers' 518.
pub const MAX_INPUT_SIZE: usize = 2048;
/// Largest vocabulary and text context.
pub const MAX_VOCAB: usize = 1 << 20;
pub const MAX_POSITIONS: usize = 4096;

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
            crate::Error::model(format!(
                "vision hidden_act {:?} is not supported",
                self.hidden_act
            ))
        })
    }
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn activation(&self) -> crate::Result<Activation> {
        Activation::from_hf_name(&self.hidden_act).ok_or_else(|| {
            crate::Error::model(format!(
                "text hidden_act {:?} is not supported",
                self.hidden_act
            ))
        })
    }
}

impl ClipConfig {
    /// Parses a Hugging Face `CLIPModel` `config.json`.
    pub fn from_hf_json(text: &str) -> crate::Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| crate::Error::model(format!("config.json is not a CLIP config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field, naming each one that is out of range with its valid range. The upper
    /// bounds are far above every released CLIP (ViT-bigG: width 1664, MLP 8192, 48 layers) and
    /// keep a crafted config.json from sizing absurd allocations or dividing by zero.
    pub fn validate(&self) -> crate::Result<()> {
        let v = &self.vision_config;
        let t = &self.text_config;
        let mut problems = Vec::new();
        let mut within = |field: &str, value: usize, lo: usize, hi: usize| {
            if !(lo..=hi).contains(&value) {
                problems.push(format!("{field} = {value} is outside {lo}..={hi}"));
            }
        };
        for (tower, hidden, mlp, layers) in [
            (
                "vision_config",
                v.hidden_size,
                v.intermediate_size,
                v.num_hidden_layers,
            ),
            (
                "text_config",
                t.hidden_size,
                t.intermediate_size,
                t.num_hidden_layers,
            ),
        ] {
            within(&format!("{tower}.hidden_size"), hidden, 1, MAX_WIDTH);
            within(&format!("{tower}.intermediate_size"), mlp, 1, 4 * MAX_WIDTH);
            within(&format!("{tower}.num_hidden_layers"), layers, 1, MAX_LAYERS);
        }
        within("projection_dim", self.projection_dim, 1, MAX_WIDTH);
        within("vision_config.patch_size", v.patch_size, 1, MAX_IMAGE_SIZE);
        within(
            "vision_config.image_size",
            v.image_size,
            v.patch_size.max(1),
            MAX_IMAGE_SIZE,
        );
        // Ids past the vocabulary are refused when tokens are embedded, so small test
        // vocabularies stay usable.
        within("text_config.vocab_size", t.vocab_size, 1, MAX_VOCAB);
        within(
            "text_config.max_position_embeddings",
            t.max_position_embeddings,
            2,
            MAX_POSITIONS,
        );
        // The preprocessing always makes RGB pixels.
        within("vision_config.num_channels", v.num_channels, 3, 3);
        for (tower, hidden, heads) in [
            ("vision_config", v.hidden_size, v.num_attention_heads),
            ("text_config", t.hidden_size, t.num_attention_heads),
        ] {
            if heads == 0 || heads > hidden || hidden % heads != 0 {
                problems.push(format!(
                    "{tower}.num_attention_heads = {heads} must divide hidden_size = {hidden} (1..={hidden})"
                ));
            }
        }
        if v.patch_size > 0 && !v.image_size.is_multiple_of(v.patch_size) {
            problems.push(format!(
                "vision_config.image_size = {} is not a multiple of patch_size = {}",
                v.image_size, v.patch_size
            ));
        }
        for (field, eps) in [
            ("vision_config.layer_norm_eps", v.layer_norm_eps),
            ("text_config.layer_norm_eps", t.layer_norm_eps),
        ] {
            if !(eps > 0.0 && eps < 1.0) {
                problems.push(format!("{field} = {eps} is outside (0, 1)"));
            }
        }
        for act in [v.activation(), t.activation()] {
            if let Err(e) = act {
                problems.push(e.to_string());
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(crate::Error::model(format!(
                "not a usable CLIP config: {}",
                problems.join("; ")
            )))
        }
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

    /// A config.json with each field broken in turn: an error naming the field and its range,
    /// never a panic (`num_attention_heads: 0` used to divide by zero).
    #[test]
    fn every_field_is_range_checked() {
        let good = serde_json::to_value(ClipConfig::tiny()).unwrap();
        let cases: &[(&str, &str, serde_json::Value, &str)] = &[
            (
                "vision_config",
                "num_attention_heads",
                0.into(),
                "vision_config.num_attention_heads = 0 must divide hidden_size = 32 (1..=32)",
            ),
            (
                "text_config",
                "num_attention_heads",
                3.into(),
                "text_config.num_attention_heads = 3 must divide hidden_size = 32",
            ),
            (
                "vision_config",
                "hidden_size",
                0.into(),
                "vision_config.hidden_size = 0 is outside 1..=16384",
            ),
            (
                "text_config",
                "hidden_size",
                1_000_000.into(),
                "text_config.hidden_size = 1000000 is outside 1..=16384",
            ),
            (
                "vision_config",
                "num_hidden_layers",
                0.into(),
                "vision_config.num_hidden_layers = 0 is outside 1..=256",
            ),
            (
                "text_config",
                "num_hidden_layers",
                100_000.into(),
                "text_config.num_hidden_layers = 100000 is outside 1..=256",
            ),
            (
                "vision_config",
                "intermediate_size",
                0.into(),
                "vision_config.intermediate_size = 0 is outside 1..=65536",
            ),
            (
                "vision_config",
                "patch_size",
                0.into(),
                "vision_config.patch_size = 0 is outside 1..=4096",
            ),
            (
                "vision_config",
                "image_size",
                36.into(),
                "vision_config.image_size = 36 is not a multiple of patch_size = 8",
            ),
            (
                "vision_config",
                "image_size",
                10_000_000.into(),
                "vision_config.image_size = 10000000 is outside 8..=4096",
            ),
            (
                "vision_config",
                "image_size",
                4.into(),
                "vision_config.image_size = 4 is outside 8..=4096",
            ),
            (
                "vision_config",
                "num_channels",
                1.into(),
                "vision_config.num_channels = 1 is outside 3..=3",
            ),
            (
                "vision_config",
                "layer_norm_eps",
                (-1.0).into(),
                "vision_config.layer_norm_eps = -1 is outside (0, 1)",
            ),
            (
                "text_config",
                "vocab_size",
                0.into(),
                "text_config.vocab_size = 0 is outside 1..=1048576",
            ),
            (
                "text_config",
                "max_position_embeddings",
                0.into(),
                "text_config.max_position_embeddings = 0 is outside 2..=4096",
            ),
            (
                "text_config",
                "hidden_act",
                "relu".into(),
                "text hidden_act \"relu\" is not supported",
            ),
        ];
        for (tower, field, value, want) in cases {
            let mut j = good.clone();
            j[*tower][*field] = value.clone();
            let e = ClipConfig::from_hf_json(&j.to_string())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{tower}.{field} = {value}: {e}");
        }
        let mut j = good.clone();
        j["projection_dim"] = 0.into();
        let e = ClipConfig::from_hf_json(&j.to_string())
            .unwrap_err()
            .to_string();
        assert!(e.contains("projection_dim = 0 is outside 1..=16384"), "{e}");
        // Every problem at once.
        let mut j = good;
        j["vision_config"]["num_attention_heads"] = 0.into();
        j["text_config"]["num_hidden_layers"] = 0.into();
        let e = ClipConfig::from_hf_json(&j.to_string())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_attention_heads") && e.contains("num_hidden_layers"),
            "{e}"
        );
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
