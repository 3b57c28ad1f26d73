//! What turns frozen CLIP into a detector: one configuration for every method, and the named
//! presets. The configuration travels in the adapter file's metadata, so a file alone says how
//! to run it.
//!
//! Layer choices scale with the backbone: the papers' 6/12/18/24 of 24 layers are the quarter
//! points, so every preset also runs on ViT-B (12 layers) and tiny test models.

use serde::{Deserialize, Serialize};

use crate::clip::config::MAX_INPUT_SIZE;
use crate::clip::{Activation, ClipConfig, PosInterpolation};
use crate::{Error, Result};

crate::choice::choice_enum! {
    /// The named methods.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum Preset {
        /// Training-free: hand-made prompt ensembles against V-V patch tokens of the upper layers.
        ZeroShot = "zero-shot",
        /// AdaCLIP (ECCV'24): static + dynamic prompts in both towers, per-layer projections, HSF.
        Adaclip = "adaclip",
        /// AnomalyCLIP (ICLR'24): object-agnostic learnable text prompts, deep text prompts, V-V.
        Anomalyclip = "anomalyclip",
        /// HeadCLIP: AnomalyCLIP's prompts + learnable attention-head weights + a joint score.
        Headclip = "headclip",
        /// Ours: head weights + hybrid static/dynamic prompts + learnable text + joint score.
        Zsad = "zsad",
    }
}

impl Preset {
    /// The MLP activation the method runs OpenAI weights with: exact GELU for AdaCLIP (its
    /// `create_model` builds `CLIP(**cfg)` from a config without `quick_gelu`, so `nn.GELU`:
    /// caoyunkang/AdaCLIP@e27ee32 `method/custom_clip.py` l.608-672, `method/clip_model.py` l.81),
    /// QuickGELU for AnomalyCLIP (zqhang/AnomalyCLIP@45ed4dd `AnomalyCLIP_lib/AnomalyCLIP.py`
    /// l.107-109) and HeadCLIP; `None` keeps the checkpoint's own.
    pub fn activation(self) -> Option<Activation> {
        match self {
            Self::Adaclip => Some(Activation::Gelu),
            Self::Anomalyclip | Self::Headclip => Some(Activation::QuickGelu),
            Self::ZeroShot | Self::Zsad => None,
        }
    }
}

/// Which hand-made templates an ensemble uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Templates {
    /// AdaCLIP's 4 templates (28 normal + 20 abnormal sentences).
    Adaclip,
    /// WinCLIP's 21 templates without its duplicate (20).
    Winclip,
}

/// How the normal/abnormal text embeddings are made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TextPrompts {
    /// States × templates around the class word; each sentence L2-normalised, averaged per
    /// state group, normalised again (AdaCLIP, April-GAN).
    Ensemble { templates: Templates },
    /// `[SOT] + ctx (n learnable tokens) + "object." / "damaged object." + [EOT]`, with separate
    /// context for the two sentences (AnomalyCLIP's object-agnostic prompts).
    Learned { context_length: usize },
}

/// Which patch tokens are compared with the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchFeatures {
    /// `ln_post(x) @ proj` of the tapped stream (the V-V stream when `vv_from` is set):
    /// AnomalyCLIP; the training-free preset.
    Projected,
    /// A learned `Linear(width → embed)` per tapped layer on the raw stream (AdaCLIP, April-GAN).
    Linear,
}

/// How per-layer patch-text similarities become one map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MapFusion {
    /// AdaCLIP: upsample each layer's logits (bilinear, align_corners=True), average over layers,
    /// softmax over {normal, abnormal}, take abnormal.
    MeanLogits,
    /// AnomalyCLIP: per layer softmax, upsample the probabilities (bilinear, align_corners=False),
    /// `(p_abnormal + 1 − p_normal) / 2`, average over layers. (AnomalyCLIP sums; the mean keeps
    /// the map a probability in [0, 1] and ranks pixels identically.)
    MeanProbs,
}

/// The global (image-level) score before pixel evidence is fused in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ImageScore {
    /// `softmax(scale · cos(image, T))[abnormal]` with the image embedding `ln_post(CLS) @ proj`,
    /// or `CLS @ proj` without ln_post (AnomalyCLIP's quirk) when `ln_post` is false.
    Cls { ln_post: bool },
    /// AdaCLIP's hybrid semantic fusion: the top `5·clusters` patches by the mean-logit map,
    /// k-means into `clusters`, `h` = normalised mean of the centres, fused with the projected
    /// class token as `normalize((1 − cls_weight)·h + cls_weight·c)`.
    Hsf { clusters: usize, cls_weight: f64 },
}

/// How the map's evidence enters the image score (HeadCLIP's joint anomaly score, arXiv
/// 2505.22259 abstract; its formula is not published, so these are our choices).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JointScore {
    /// The global score alone (AdaCLIP, AnomalyCLIP as published).
    None,
    /// `alpha · global + (1 − alpha) · max(map)`.
    Mean { alpha: f64 },
    /// `global · max(map)`.
    Product,
    /// `max(global, max(map))`.
    Max,
}

impl JointScore {
    pub fn combine(&self, global: f32, map_max: f32) -> f32 {
        match *self {
            Self::None => global,
            Self::Mean { alpha } => (alpha * global as f64 + (1.0 - alpha) * map_max as f64) as f32,
            Self::Product => global * map_max,
            Self::Max => global.max(map_max),
        }
    }
}

/// The two towers that take deep prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    Text,
    Vision,
}

impl Tower {
    /// The first layer (0-based) whose input takes deep prompts. The text tower's layer 0 reads
    /// the sentence's own tokens (the words, or AnomalyCLIP's learned context), so its deep
    /// prompts start at layer 1: AnomalyCLIP's `compound_prompts_text` enter every block but the
    /// first (`if not self.first_layer`, zqhang/AnomalyCLIP@45ed4dd, AnomalyCLIP_lib/
    /// AnomalyCLIP.py l.237-251), and AdaCLIP's text static prompt 0 is never read. The image
    /// tower's prompts are appended before block 0.
    pub fn first_prompted_layer(self) -> usize {
        match self {
            Self::Text => 1,
            Self::Vision => 0,
        }
    }

    /// The configuration field of the tower's prompts (as spelled in `zsad.config`).
    pub fn field(self) -> &'static str {
        match self {
            Self::Text => "text_prompts",
            Self::Vision => "visual_prompts",
        }
    }
}

/// Deep prompts of one tower: `len` learned tokens before each of the layers
/// `first_prompted_layer..depth`, plus, when `dynamic`, an image-conditioned part made from the
/// plain pass's global embedding by one linear generator per token (AdaCLIP's dynamic prompts:
/// one extra plain image pass per image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeepPrompts {
    /// The papers' "prompt depth": layers below it are prompted, from
    /// [`Tower::first_prompted_layer`] on.
    pub depth: usize,
    /// Tokens per prompted layer.
    #[serde(rename = "length")]
    pub len: usize,
    pub dynamic: bool,
}

impl DeepPrompts {
    /// Prompts of `depth` and `len` for `tower`, or `None` when that prompts no layer.
    pub fn for_tower(tower: Tower, depth: usize, len: usize, dynamic: bool) -> Option<Self> {
        (depth > tower.first_prompted_layer() && len > 0).then_some(Self {
            depth,
            len,
            dynamic,
        })
    }

    /// The prompted layers (0-based block indices).
    pub fn layers(&self, tower: Tower) -> std::ops::Range<usize> {
        tower.first_prompted_layer()..self.depth
    }
}

/// Parametrisation of HeadCLIP's learnable head weights `w[layer, head]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadWeights {
    /// `w = θ`, initialised to 1.
    Raw,
    /// `w = 2·σ(θ)`, initialised to θ = 0 (w = 1), bounded in (0, 2).
    Sigmoid,
}

/// Everything that defines a detector besides the backbone weights and the learned tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorConfig {
    pub preset: Preset,
    /// The `--model` the adapter was made for (informational; widths are checked on load).
    pub backbone: String,
    /// Square input size in pixels (the papers: 518 for ViT-L/14).
    pub image_size: usize,
    /// Tapped layers, 1-based (residual stream after that block).
    pub layers: Vec<usize>,
    /// MLP activation the method runs the backbone with (`None`: the checkpoint's own).
    pub activation: Option<Activation>,
    pub pos_interpolation: PosInterpolation,
    pub text: TextPrompts,
    /// The object word in prompts (`object` for object-agnostic methods).
    pub class_name: String,
    /// Deep text prompts: they replace positions `1..=len` at text layers `1..depth`.
    pub text_prompts: Option<DeepPrompts>,
    /// Deep visual prompts: appended before block 0, substituted before blocks `1..depth`.
    pub visual_prompts: Option<DeepPrompts>,
    /// Round the prompt tokens to fp16 before they enter the stream: AdaCLIP's `.half()` on its
    /// static + dynamic prompts in both towers, AnomalyCLIP's on its deep text prompts (layers
    /// 1.., not the first layer's learned context).
    pub round_prompts_f16: bool,
    pub patch_features: PatchFeatures,
    /// First layer (1-based) with the V-V attention path (AnomalyCLIP's DPAM).
    pub vv_from: Option<usize>,
    pub head_weights: Option<HeadWeights>,
    /// Multiplier of cosine similarities before softmax (100 = CLIP's; 1/0.07 AnomalyCLIP).
    pub logit_scale: f64,
    pub map_fusion: MapFusion,
    /// Gaussian smoothing of the map at `image_size` (scipy `gaussian_filter`; 0 = off).
    pub sigma: f64,
    pub image_score: ImageScore,
    pub joint: JointScore,
    /// Seed of HSF's k-means.
    pub kmeans_seed: u64,
    /// Where the learned tensors came from (training run, imported checkpoint); free-form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<serde_json::Value>,
}

/// Largest Gaussian smoothing (scipy's kernel then spans 513 pixels).
pub const MAX_SIGMA: f64 = 64.0;
/// Most HSF clusters (it ranks `5 · clusters` patches).
pub const MAX_CLUSTERS: usize = 1000;
/// Most deep visual prompt tokens (the papers use 5).
pub const MAX_VISUAL_PROMPTS: usize = 256;
/// Largest similarity multiplier (CLIP's is 100).
pub const MAX_LOGIT_SCALE: f64 = 1e4;

/// The input size the papers run a backbone at: 518 for ViT-L/14-336 (37x37 patches; AdaCLIP,
/// AnomalyCLIP, April-GAN), the trained size otherwise.
pub fn papers_image_size(clip: &ClipConfig) -> usize {
    let v = &clip.vision_config;
    if v.image_size == 336 && v.patch_size == 14 {
        518
    } else {
        v.image_size
    }
}

/// `[d/4, d/2, 3d/4, d]` without duplicates or zeros: the papers' 6/12/18/24 of 24.
pub fn quarter_layers(depth: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [depth / 4, depth / 2, 3 * depth / 4, depth]
        .into_iter()
        .filter(|&l| l > 0)
        .collect();
    v.dedup();
    v
}

/// Why `size` cannot be the square input size of a backbone with `patch` px patches that takes
/// at most `max` px (`None` when it can): outside one patch to `max`, or not a multiple of the
/// patch (the last partial patch would be dropped and the map shifted), with the sizes to use.
pub fn image_size_problem(size: usize, patch: usize, max: usize) -> Option<String> {
    if size < patch || size > max {
        return Some(format!(
            "is outside {patch}..={max} (one {patch} px patch to the largest input this backbone takes)"
        ));
    }
    if patch > 0 && !size.is_multiple_of(patch) {
        let below = size / patch * patch;
        return Some(format!(
            "is not a multiple of the model's {patch} px patch (the last partial patch would be dropped and the map shifted); use {}",
            if below >= patch {
                format!("{below} or {}", below + patch)
            } else {
                (below + patch).to_string()
            }
        ));
    }
    None
}

impl DetectorConfig {
    /// The preset's defaults for a backbone: the published settings at 24 layers (AdaCLIP's
    /// `app.py` l.20-28 and `train.py` l.47-49 at caoyunkang/AdaCLIP@e27ee32; AnomalyCLIP's
    /// `test.sh` at zqhang/AnomalyCLIP@45ed4dd), the depths scaled with the backbone.
    pub fn preset(preset: Preset, clip: &ClipConfig, backbone: &str) -> Self {
        let vd = clip.vision_config.num_hidden_layers;
        let td = clip.text_config.num_hidden_layers;
        let quarters = quarter_layers(vd);
        // The first V-V layer: 6 of 24 (AnomalyCLIP's DPAM_layer = 20).
        let vv_start = (vd / 4).max(1);
        let base = Self {
            preset,
            activation: preset.activation(),
            backbone: backbone.to_string(),
            image_size: clip.vision_config.image_size,
            layers: quarters.clone(),
            pos_interpolation: PosInterpolation::Bicubic,
            text: TextPrompts::Ensemble {
                templates: Templates::Adaclip,
            },
            class_name: "object".into(),
            text_prompts: None,
            visual_prompts: None,
            round_prompts_f16: false,
            patch_features: PatchFeatures::Projected,
            vv_from: None,
            head_weights: None,
            logit_scale: 100.0,
            map_fusion: MapFusion::MeanProbs,
            sigma: 4.0,
            image_score: ImageScore::Cls { ln_post: true },
            joint: JointScore::None,
            kmeans_seed: 111,
            provenance: None,
        };
        let anomalyclip = Self {
            pos_interpolation: PosInterpolation::Bilinear,
            text: TextPrompts::Learned { context_length: 12 },
            // AnomalyCLIP's `depth = 9` of 12 text layers: prompts at layers 1..8.
            text_prompts: DeepPrompts::for_tower(Tower::Text, (3 * td / 4).max(1), 4, false),
            vv_from: Some(vv_start),
            // The deep text prompts are rounded to fp16 as they enter the stream:
            // `textual_context.expand(..).permute(1, 0, 2).half()` (zqhang/AnomalyCLIP@45ed4dd,
            // AnomalyCLIP_lib/AnomalyCLIP.py l.246); the first layer's context is not.
            round_prompts_f16: true,
            // Layer 24 only: the published checkpoints' effective setting. Before
            // zqhang/AnomalyCLIP@2a7c886 an in-place `x += x_res` made every tapped layer
            // the last one; `test.sh` at 45ed4dd passes `--features_list 24`.
            layers: vec![vd],
            logit_scale: 1.0 / 0.07,
            image_score: ImageScore::Cls { ln_post: false },
            ..base.clone()
        };
        let j = 4.min(vd).min(td);
        match preset {
            Preset::ZeroShot => Self {
                // The upper quarter points: lower layers' tokens are not aligned with the text
                // space without training.
                layers: quarters.iter().copied().filter(|&l| 2 * l >= vd).collect(),
                text: TextPrompts::Ensemble {
                    templates: Templates::Winclip,
                },
                vv_from: Some(vv_start),
                joint: JointScore::Mean { alpha: 0.5 },
                ..base
            },
            Preset::Adaclip => Self {
                text_prompts: DeepPrompts::for_tower(Tower::Text, j, 5, true),
                visual_prompts: DeepPrompts::for_tower(Tower::Vision, j, 5, true),
                round_prompts_f16: true,
                patch_features: PatchFeatures::Linear,
                map_fusion: MapFusion::MeanLogits,
                image_score: ImageScore::Hsf {
                    clusters: 20,
                    cls_weight: 0.8,
                },
                ..base
            },
            Preset::Anomalyclip => anomalyclip,
            Preset::Headclip => Self {
                head_weights: Some(HeadWeights::Sigmoid),
                layers: quarters,
                joint: JointScore::Mean { alpha: 0.5 },
                ..anomalyclip
            },
            Preset::Zsad => Self {
                text: TextPrompts::Learned { context_length: 12 },
                text_prompts: DeepPrompts::for_tower(Tower::Text, j, 4, true),
                visual_prompts: DeepPrompts::for_tower(Tower::Vision, j, 5, true),
                patch_features: PatchFeatures::Linear,
                head_weights: Some(HeadWeights::Sigmoid),
                map_fusion: MapFusion::MeanLogits,
                image_score: ImageScore::Hsf {
                    clusters: 20,
                    cls_weight: 0.8,
                },
                joint: JointScore::Mean { alpha: 0.5 },
                ..base
            },
        }
    }

    /// Checks the configuration against a backbone: every numeric field in its range, each
    /// problem named with the field (as spelled in the adapter's `zsad.config`) and the range.
    /// The upper bounds keep a crafted adapter file from sizing huge allocations.
    pub fn validate(&self, clip: &ClipConfig) -> Result<()> {
        let vd = clip.vision_config.num_hidden_layers;
        let td = clip.text_config.num_hidden_layers;
        let p = clip.vision_config.patch_size;
        // [SOT] + tokens + [EOT] must fit the text context.
        let max_text_tokens = clip.text_config.max_position_embeddings.saturating_sub(2);
        let mut problems = Vec::new();
        let mut within = |field: &str, value: usize, lo: usize, hi: usize, why: &str| {
            if !(lo..=hi).contains(&value) {
                problems.push(format!("{field} = {value} is outside {lo}..={hi}{why}"));
            }
        };
        let image_tower = format!(" (the image tower has {vd} layers)");
        let text_tower = format!(" (the text tower has {td} layers)");
        let context = format!(
            " (the text context holds {} tokens with SOT and EOT)",
            clip.text_config.max_position_embeddings
        );
        let max_size = MAX_INPUT_SIZE.max(clip.vision_config.image_size);
        within("image_size", self.image_size, p, max_size, "");
        within("layers (count)", self.layers.len(), 1, vd, &image_tower);
        for &l in &self.layers {
            within("layers", l, 1, vd, &image_tower);
        }
        for (tower, prompts, layers, width_limit, why) in [
            (
                Tower::Text,
                &self.text_prompts,
                td,
                max_text_tokens,
                &context,
            ),
            (
                Tower::Vision,
                &self.visual_prompts,
                vd,
                MAX_VISUAL_PROMPTS,
                &String::new(),
            ),
        ] {
            if let Some(p) = prompts {
                let field = tower.field();
                let tower_why = match tower {
                    Tower::Text => &text_tower,
                    Tower::Vision => &image_tower,
                };
                let first = tower.first_prompted_layer();
                within(
                    &format!("{field}.depth"),
                    p.depth,
                    first + 1,
                    layers,
                    tower_why,
                );
                within(&format!("{field}.length"), p.len, 1, width_limit, why);
            }
        }
        if let Some(v) = self.vv_from {
            within("vv_from", v, 1, vd, &image_tower);
        }
        if let TextPrompts::Learned { context_length } = self.text {
            within(
                "text.context_length",
                context_length,
                1,
                max_text_tokens,
                &context,
            );
        }
        if let ImageScore::Hsf { clusters, .. } = self.image_score {
            within("image_score.clusters", clusters, 1, MAX_CLUSTERS, "");
        }
        if p > 0 && !self.image_size.is_multiple_of(p) {
            if let Some(why) = image_size_problem(self.image_size, p, max_size) {
                problems.push(format!("image_size = {} {why}", self.image_size));
            }
        }
        self.check_reals(&mut problems);
        self.check_combinations(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::adapter(problems.join("; ")))
        }
    }

    /// The real-valued fields in their ranges (finite, `(lo, hi]` or `[lo, hi]`).
    /// Settings that do not go together.
    fn check_combinations(&self, problems: &mut Vec<String>) {
        if matches!(self.image_score, ImageScore::Hsf { .. })
            && self.patch_features != PatchFeatures::Linear
        {
            problems.push(
                "HSF image scores need learned patch projections (patch_features = linear)".into(),
            );
        }
        if let (TextPrompts::Learned { context_length }, Some(p)) = (&self.text, self.text_prompts)
        {
            // Deep prompts replace positions 1..=len, which must stay inside the context.
            if p.len > *context_length {
                problems.push(format!(
                    "deep text prompts of length {} overrun {context_length} context tokens",
                    p.len
                ));
            }
        }
    }

    fn check_reals(&self, problems: &mut Vec<String>) {
        let mut real = |field: &str, value: f64, lo: f64, hi: f64, open_lo: bool| {
            let ok = value.is_finite() && value <= hi && (value > lo || (!open_lo && value == lo));
            if !ok {
                let l = if open_lo { '(' } else { '[' };
                problems.push(format!("{field} = {value} is outside {l}{lo}, {hi}]"));
            }
        };
        real("logit_scale", self.logit_scale, 0.0, MAX_LOGIT_SCALE, true);
        real("sigma", self.sigma, 0.0, MAX_SIGMA, false);
        if let ImageScore::Hsf { cls_weight, .. } = self.image_score {
            real("image_score.cls_weight", cls_weight, 0.0, 1.0, false);
        }
        if let JointScore::Mean { alpha } = self.joint {
            real("joint.alpha", alpha, 0.0, 1.0, false);
        }
    }

    /// Whether the text features depend on the image (then they are encoded per image).
    pub fn text_is_dynamic(&self) -> bool {
        self.text_prompts.is_some_and(|p| p.dynamic)
    }

    /// Whether any tower has image-conditioned prompts (then each image takes an extra plain
    /// pass for its global embedding).
    pub fn has_dynamic_prompts(&self) -> bool {
        [self.text_prompts, self.visual_prompts]
            .iter()
            .flatten()
            .any(|p| p.dynamic)
    }

    /// Reads a configuration from its JSON, as `zsad.config` holds it. Files written before
    /// prompts were grouped per tower (`zsad-adapter/1`: flat `text_prompt_depth`,
    /// `text_prompt_length`, `visual_prompt_depth`, `visual_prompt_length`, `dynamic_prompts`)
    /// are read as the same configuration.
    pub fn from_json(json: &str) -> serde_json::Result<Self> {
        let mut value: serde_json::Value = serde_json::from_str(json)?;
        if let Some(obj) = value.as_object_mut() {
            upgrade_flat_prompts(obj)?;
        }
        serde_json::from_value(value)
    }
}

/// Rewrites the flat prompt fields of a `zsad-adapter/1` configuration into per-tower
/// [`DeepPrompts`] in place (no-op on today's layout).
fn upgrade_flat_prompts(
    obj: &mut serde_json::Map<String, serde_json::Value>,
) -> serde_json::Result<()> {
    use serde::de::Error as _;
    const FLAT: [&str; 5] = [
        "text_prompt_depth",
        "text_prompt_length",
        "visual_prompt_depth",
        "visual_prompt_length",
        "dynamic_prompts",
    ];
    if !FLAT.iter().any(|k| obj.contains_key(*k)) {
        return Ok(());
    }
    let mut take = |k: &str| obj.remove(k).unwrap_or(serde_json::Value::Null);
    let count = |k: &str, v: serde_json::Value| -> serde_json::Result<usize> {
        match v {
            serde_json::Value::Null => Ok(0),
            v => serde_json::from_value(v)
                .map_err(|e| serde_json::Error::custom(format!("{k}: {e}"))),
        }
    };
    let (td, tl) = (take(FLAT[0]), take(FLAT[1]));
    let (vd, vl) = (take(FLAT[2]), take(FLAT[3]));
    let dynamic = match take(FLAT[4]) {
        serde_json::Value::Null => false,
        v => serde_json::from_value(v)
            .map_err(|e| serde_json::Error::custom(format!("dynamic_prompts: {e}")))?,
    };
    let text = DeepPrompts::for_tower(
        Tower::Text,
        count(FLAT[0], td)?,
        count(FLAT[1], tl)?,
        dynamic,
    );
    let vision = DeepPrompts::for_tower(
        Tower::Vision,
        count(FLAT[2], vd)?,
        count(FLAT[3], vl)?,
        dynamic,
    );
    obj.insert(Tower::Text.field().into(), serde_json::to_value(text)?);
    obj.insert(Tower::Vision.field().into(), serde_json::to_value(vision)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::choice::Choice;

    #[test]
    fn quarter_points() {
        assert_eq!(quarter_layers(24), vec![6, 12, 18, 24]);
        assert_eq!(quarter_layers(12), vec![3, 6, 9, 12]);
        assert_eq!(quarter_layers(4), vec![1, 2, 3, 4]);
        assert_eq!(quarter_layers(3), vec![1, 2, 3]);
        assert_eq!(quarter_layers(1), vec![1]);
    }

    #[test]
    fn papers_settings_at_vit_l() {
        let clip = ClipConfig::vit_l_14_336();
        let a = DetectorConfig::preset(Preset::Adaclip, &clip, "x");
        assert_eq!(a.image_size, 336);
        assert_eq!(papers_image_size(&clip), 518);
        assert_eq!(papers_image_size(&ClipConfig::vit_b_16()), 224);
        assert_eq!(a.layers, vec![6, 12, 18, 24]);
        let deep = |p: Option<DeepPrompts>| p.map(|p| (p.depth, p.len, p.dynamic));
        assert_eq!(deep(a.visual_prompts), Some((4, 5, true)));
        assert_eq!(deep(a.text_prompts), Some((4, 5, true)));
        assert_eq!(a.activation, Some(Activation::Gelu));
        let c = DetectorConfig::preset(Preset::Anomalyclip, &clip, "x");
        assert_eq!(c.vv_from, Some(6));
        assert_eq!(c.layers, vec![24]);
        assert_eq!(deep(c.text_prompts), Some((9, 4, false)));
        assert_eq!(c.visual_prompts, None);
        let z = DetectorConfig::preset(Preset::ZeroShot, &clip, "x");
        assert_eq!(z.layers, vec![12, 18, 24]);
        for &p in Preset::ALL {
            for c in [
                ClipConfig::vit_l_14_336(),
                ClipConfig::vit_b_16(),
                ClipConfig::tiny(),
            ] {
                let cfg = DetectorConfig::preset(p, &c, "x");
                cfg.validate(&c).unwrap();
                let json = serde_json::to_string(&cfg).unwrap();
                assert_eq!(serde_json::from_str::<DetectorConfig>(&json).unwrap(), cfg);
            }
        }
    }

    #[test]
    fn joint_scores() {
        assert_eq!(JointScore::None.combine(0.2, 0.9), 0.2);
        assert!((JointScore::Mean { alpha: 0.5 }.combine(0.2, 0.9) - 0.55).abs() < 1e-6);
        assert!((JointScore::Product.combine(0.5, 0.8) - 0.4).abs() < 1e-6);
        assert_eq!(JointScore::Max.combine(0.5, 0.8), 0.8);
    }
}
