//! One configurable detector that runs every preset: frozen CLIP plus the adapter's tensors
//! -> per-layer patch-text similarities -> an anomaly map and an image score.
//!
//! [`Detector::forward`] composes the stages, which read like AdaCLIP's forward
//! (caoyunkang/AdaCLIP@e27ee32 method/adaclip.py, `AdaCLIP.forward`) and AnomalyCLIP's test loop
//! (zqhang/AnomalyCLIP@45ed4dd test.py l.80-111): A. dynamic prompts from a plain pass's global
//! embedding; B. the prompted, head-weighted image pass and its patch features; D. the text
//! features; E. logits, image probabilities and the fused map (`scoring`). Which steps
//! run is decided by [`DetectorConfig`]. `forward` is differentiable in the adapter's tensors
//! (training); [`Detector::detect`] adds the post-processing (Gaussian smoothing, joint score).

use candle_core::{DType, IndexOp, Tensor};
use rayon::prelude::*;

use super::adapter::Adapter;
use super::config::{DetectorConfig, HeadWeights, ImageScore, JointScore, PatchFeatures};
use super::params::AdapterParams;
use super::reference::{self, MemoryBank, ReferenceUse};
use super::scoring::{self, ScoreRule};
use super::text::{normalize, TextInputs, TextSide};
use crate::clip::{ClipModel, Hooks, TextTransformer, VisionOutput, VisionTransformer};
use crate::Result;

/// Differentiable outputs for a batch.
pub struct Forward {
    /// `[B, 2]` image-level {normal, abnormal} probabilities (the global score is column 1).
    pub image_probs: Tensor,
    /// Per tapped layer `[B, 2, S, S]` {normal, abnormal} probability maps (AdaCLIP trains on
    /// these with `aggregation=False`); empty unless requested.
    pub layer_maps: Vec<Tensor>,
    /// `[B, S, S]` fused anomaly map before smoothing.
    pub map: Tensor,
    /// Per tapped layer `[B, P, E]`, unit rows: the patch features compared with the text (and
    /// with a reference bank's).
    pub patches: Vec<Tensor>,
}

/// Wall time per stage of [`Detector::forward`] / [`Detector::detect`], accumulated (CPU ops
/// are synchronous, so wall time between stages is the stage's time).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StageTimes {
    /// Image tower passes and patch features.
    pub backbone: f64,
    /// Text tower (per image only with dynamic prompts).
    pub text: f64,
    /// Similarities, upsampling, fusion, image score.
    pub maps: f64,
    /// Nearest-patch search in the reference bank, its map and the fusion with the method's.
    pub reference: f64,
    /// The batch's maps copied to the host (a device synchronisation on a GPU).
    pub transfer: f64,
    /// Gaussian smoothing and the image scores.
    pub smoothing: f64,
}

struct Lap<'a> {
    times: Option<&'a mut StageTimes>,
    last: std::time::Instant,
    device: &'a candle_core::Device,
}

impl Lap<'_> {
    /// Ends a stage. When stages are timed, the device's queued work is waited for first (a
    /// no-op on the CPU): on CUDA a stage's kernels would otherwise be counted in the stage
    /// that next reads a result back.
    fn mark(&mut self, stage: fn(&mut StageTimes) -> &mut f64) -> Result<()> {
        if self.times.is_some() {
            self.device.synchronize()?;
        }
        let now = std::time::Instant::now();
        if let Some(t) = self.times.as_deref_mut() {
            *stage(t) += (now - self.last).as_secs_f64();
        }
        self.last = now;
        Ok(())
    }
}

/// The result for one image.
#[derive(Debug, Clone)]
pub struct Detection {
    /// The method's image-level score before pixel evidence is fused in.
    pub global: f32,
    /// The image score (joint with the map where the configuration says so).
    pub score: f32,
    /// The smoothed anomaly map, `size x size`, row-major, values in [0, 1].
    pub map: Vec<f32>,
    pub size: usize,
}

impl Detection {
    pub fn map_max(&self) -> f32 {
        scoring::map_peak(&self.map)
    }
}

pub struct Detector {
    cfg: DetectorConfig,
    vision: VisionTransformer,
    text: TextTransformer,
    text_side: TextSide,
    params: AdapterParams,
    /// `T` `[2, E]` when it does not depend on the image: computed once per run.
    static_text: Option<Tensor>,
    /// Normal patches to compare with (`--reference`) and how their map joins the method's.
    reference: Option<(MemoryBank, ReferenceUse)>,
}

/// What the image pass gives the later stages.
struct ImageFeatures {
    out: VisionOutput,
    /// Per tapped layer `[B, P, E]`, unit rows: the patch tokens compared with the text.
    patches: Vec<Tensor>,
}

impl Detector {
    /// Sets the backbone up for the configuration (position embedding at `image_size`) and
    /// encodes the text once when it does not depend on the image.
    pub fn new(model: &ClipModel, adapter: &Adapter, inputs: TextInputs) -> Result<Self> {
        let cfg = adapter.config.clone();
        cfg.validate(&model.config)?;
        let vision = model
            .vision
            .at_image_size(cfg.image_size, cfg.pos_interpolation)?;
        let params = adapter.params(&model.config, vision.device(), vision.dtype())?;
        Self::with_params(cfg, vision, model.text.clone(), params, inputs)
    }

    /// The same from tensors already on the device (training passes its variables here).
    pub fn with_params(
        cfg: DetectorConfig,
        vision: VisionTransformer,
        text: TextTransformer,
        params: AdapterParams,
        inputs: TextInputs,
    ) -> Result<Self> {
        let text_side = TextSide::new(&cfg, inputs, &text)?;
        let mut det = Self {
            cfg,
            vision,
            text,
            text_side,
            params,
            static_text: None,
            reference: None,
        };
        if !det.cfg.text_is_dynamic() {
            det.static_text = Some(det.encode_text(None)?);
        }
        Ok(det)
    }

    /// Compares every patch with `bank`'s normal patches as well (`--reference`). The bank must
    /// hold this detector's layers at its image size and feature width.
    pub fn with_reference(mut self, bank: MemoryBank, how: ReferenceUse) -> Result<Self> {
        let info = &bank.info;
        if info.layers != self.cfg.layers || info.image_size != self.cfg.image_size {
            return Err(crate::Error::adapter(format!(
                "the reference bank holds layers {:?} at {} px, this detector maps with layers {:?} at {} px",
                info.layers, info.image_size, self.cfg.layers, self.cfg.image_size
            )));
        }
        if !(0.0..=1.0).contains(&how.weight) {
            return Err(crate::error::OptionError::value(
                "reference_weight",
                how.weight,
                "must be in [0, 1]",
            ));
        }
        for (j, (l, t)) in info.layers.iter().zip(&bank.layers).enumerate() {
            let width = match self.cfg.patch_features {
                PatchFeatures::Projected => self.vision.embed_dim(),
                PatchFeatures::Linear => self.params.patch_proj[j].weight.dim(0)?,
            };
            if t.dim(1)? != width {
                return Err(crate::Error::adapter(format!(
                    "the reference bank's layer {l} features are {} wide, this detector's are {width}",
                    t.dim(1)?
                )));
            }
        }
        let bank = MemoryBank {
            layers: bank
                .layers
                .iter()
                .map(|t| t.to_dtype(DType::F32)?.to_device(self.device()))
                .collect::<candle_core::Result<_>>()?,
            info: bank.info,
        };
        self.reference = Some((bank, how));
        Ok(self)
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }
    pub fn image_size(&self) -> usize {
        self.cfg.image_size
    }
    /// Tokens per image in the image tower (patches + CLS).
    pub fn image_tokens(&self) -> usize {
        self.vision.grid().pow(2) + 1
    }
    pub fn device(&self) -> &candle_core::Device {
        self.vision.device()
    }
    /// The memory one image takes in a pass of the image tower ([`crate::device::image_bytes`]).
    pub fn bytes_per_image(&self) -> u64 {
        let c = self.vision.config();
        crate::device::image_bytes(
            self.image_tokens(),
            c.num_attention_heads,
            c.hidden_size,
            self.vision.dtype().size_in_bytes(),
        )
    }
    /// Whether `T` was encoded once for the run (it is re-encoded per image only when dynamic
    /// prompts reach the text tower).
    pub fn text_is_cached(&self) -> bool {
        self.static_text.is_some()
    }

    /// `T` `[2, E]`, with the dynamic text prompts of one image `[len, Dt]` if any.
    fn encode_text(&self, dynamic: Option<&Tensor>) -> Result<Tensor> {
        let deep = match &self.params.text_prompts {
            Some(p) => p.layer_prompts(dynamic, self.cfg.round_prompts_f16)?,
            None => Vec::new(),
        };
        let ctx = self
            .params
            .text_context
            .as_ref()
            .map(|c| (&c.normal, &c.abnormal));
        self.text_side.encode(&self.text, &deep, ctx)
    }

    /// The effective head weights `[layers, heads]`.
    fn head_weights(&self) -> Result<Option<Tensor>> {
        let (Some(kind), Some(theta)) = (self.cfg.head_weights, &self.params.head_weights) else {
            return Ok(None);
        };
        Ok(Some(match kind {
            HeadWeights::Raw => theta.clone(),
            // 2·σ(θ), written with basic ops so that it has a backward, in f32 at least: in
            // f16 e^−θ is infinite below θ = −11.09 and its backward 0·∞ = NaN.
            HeadWeights::Sigmoid => {
                let t = theta.to_dtype(crate::clip::wide(theta.dtype()))?;
                ((t.neg()?.exp()? + 1.0)?.recip()? * 2.0)?
            }
        }))
    }

    /// The differentiable pass for `pixels: [B, 3, S, S]` (normalised).
    pub fn forward(&self, pixels: &Tensor, with_layer_maps: bool) -> Result<Forward> {
        self.forward_timed(pixels, with_layer_maps, None)
    }

    /// [`Self::forward`], adding each stage's wall time to `times`.
    pub fn forward_timed(
        &self,
        pixels: &Tensor,
        with_layer_maps: bool,
        times: Option<&mut StageTimes>,
    ) -> Result<Forward> {
        let mut lap = Lap {
            times,
            last: std::time::Instant::now(),
            device: pixels.device(),
        };
        let cfg = &self.cfg;
        let g = self.global_embedding(pixels)?;
        let image = self.image_features(pixels, g.as_ref())?;
        lap.mark(|t| &mut t.backbone)?;
        let text_t = self.text_features(g.as_ref(), pixels.dim(0)?)?;
        lap.mark(|t| &mut t.text)?;
        let logits = scoring::patch_logits(&image.patches, &text_t, cfg.logit_scale)?;
        let image_probs = self.image_probs(&image, &logits, &text_t)?;
        let (map, layer_maps) =
            scoring::fuse_maps(&logits, cfg.map_fusion, cfg.image_size, with_layer_maps)?;
        // Materialise the lazy results before the clock stops (a no-op on the CPU).
        map.device().synchronize()?;
        lap.mark(|t| &mut t.maps)?;
        Ok(Forward {
            image_probs,
            layer_maps,
            map,
            patches: image.patches,
        })
    }

    /// Stages A and B alone: the unit patch features of each tapped layer, what a reference
    /// bank holds (`zsad reference build`).
    ///
    /// # Shapes
    /// `pixels: [B, 3, S, S]` -> per layer `[B, P, E]`.
    pub fn patch_features(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let g = self.global_embedding(pixels)?;
        Ok(self.image_features(pixels, g.as_ref())?.patches)
    }

    /// Stage A: the global embedding `g` of a plain pass, which dynamic prompts are made from.
    ///
    /// # Shapes
    /// `pixels: [B, 3, S, S]` -> `[B, E]`, or `None` when no prompts are dynamic.
    fn global_embedding(&self, pixels: &Tensor) -> Result<Option<Tensor>> {
        if self.cfg.has_dynamic_prompts() {
            Ok(Some(self.vision.pooled(pixels)?))
        } else {
            Ok(None)
        }
    }

    /// Stage B: the prompted, head-weighted image pass with its taps, and the unit patch
    /// features of each tapped layer (of the V-V stream where it runs): `ln_post(x) @ proj`, or
    /// the adapter's projection of the raw stream.
    ///
    /// # Shapes
    /// `pixels: [B, 3, S, S]`, `g: [B, E]` -> patches per layer `[B, P, E]`.
    fn image_features(&self, pixels: &Tensor, g: Option<&Tensor>) -> Result<ImageFeatures> {
        let cfg = &self.cfg;
        let prompts = match &self.params.visual_prompts {
            Some(p) => {
                let dynamic = match g {
                    Some(g) if p.is_dynamic() => Some(p.dynamic_part(g)?),
                    _ => None,
                };
                p.layer_prompts(dynamic.as_ref(), cfg.round_prompts_f16)?
            }
            None => Vec::new(),
        };
        let head_weights = self.head_weights()?;
        let hooks = Hooks {
            taps: &cfg.layers,
            head_weights: head_weights.as_ref(),
            prompts: &prompts,
            vv_from: cfg.vv_from,
            // Beyond the taps only the CLS token is read (the pooled embedding).
            last_rows: Some(1),
        };
        let out = self.vision.forward(pixels, &hooks)?;
        let streams = if cfg.vv_from.is_some() {
            &out.vv_taps
        } else {
            &out.taps
        };
        let patches = streams
            .iter()
            .enumerate()
            .map(|(j, t)| {
                let n_tok = t.dim(1)?;
                let tokens = t.narrow(1, 1, n_tok - 1)?;
                let f = match cfg.patch_features {
                    PatchFeatures::Projected => self.vision.project(&tokens)?,
                    PatchFeatures::Linear => self.params.patch_proj[j].forward(&tokens)?,
                };
                normalize(&f)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ImageFeatures { out, patches })
    }

    /// Stage D: the text features, once per run or per image with dynamic text prompts.
    ///
    /// # Shapes
    /// `g: [B, E]` -> `Tᵀ: [B, E, 2]` (unit columns {normal, abnormal}).
    fn text_features(&self, g: Option<&Tensor>, batch: usize) -> Result<Tensor> {
        let text = match (&self.static_text, &self.params.text_prompts, g) {
            (Some(t), _, _) => {
                let (two, e) = t.dims2()?;
                t.unsqueeze(0)?.broadcast_as((batch, two, e))?
            }
            (None, Some(p), Some(g)) => {
                let dynamic = p.dynamic_part(g)?; // [B, len, Dt]
                let per_image = (0..batch)
                    .map(|i| self.encode_text(Some(&dynamic.i(i)?)))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&per_image, 0)?
            }
            _ => unreachable!("text is encoded once unless its prompts are dynamic"),
        };
        Ok(text.transpose(1, 2)?.contiguous()?)
    }

    /// Stage E2: the image-level {normal, abnormal} probabilities, from the class token or
    /// AdaCLIP's hybrid semantic fusion.
    ///
    /// # Shapes
    /// patches per layer `[B, P, E]`, `logits` per layer `[B, P, 2]`, `text_t: [B, E, 2]` ->
    /// `[B, 2]`.
    fn image_probs(
        &self,
        image: &ImageFeatures,
        logits: &[Tensor],
        text_t: &Tensor,
    ) -> Result<Tensor> {
        let scale = self.cfg.logit_scale;
        let embedding = match &self.cfg.image_score {
            ImageScore::Cls { ln_post: true } => normalize(&image.out.pooled)?,
            ImageScore::Cls { ln_post: false } => {
                let cls = image.out.last.narrow(1, 0, 1)?.squeeze(1)?;
                normalize(&self.vision.project_without_ln(&cls)?)?
            }
            ImageScore::Hsf {
                clusters,
                cls_weight,
            } => {
                let proj = self.params.cls_proj.as_ref().expect("checked on load");
                let c = normalize(&proj.forward(&image.out.pooled)?)?;
                let h = scoring::hsf_embedding(
                    &image.patches,
                    logits,
                    *clusters,
                    self.cfg.kmeans_seed,
                )?;
                scoring::hsf_fuse(&h, &c, *cls_weight)?
            }
        };
        scoring::text_probs(&embedding, text_t, scale)
    }

    /// Inference for a batch: maps smoothed as the references do, scores fused per the config.
    pub fn detect(&self, pixels: &Tensor) -> Result<Vec<Detection>> {
        self.detect_timed(pixels, None)
    }

    /// [`Self::detect`], adding each stage's wall time to `times`: the method's evidence
    /// ([`Self::forward_timed`]: backbone, text, maps), the reference map, the fusion of the
    /// two, the one copy to the host, and the post-processing ([`scoring::postprocess`]).
    ///
    /// With a reference bank the raw map is `(1 − w) · method + w · reference` before the
    /// smoothing; the image score is the configuration's joint score on the fused map, or,
    /// for methods without one (AdaCLIP, AnomalyCLIP), WinCLIP+'s
    /// `(1 − w) · global + w · max(reference map)` (anomalib `winclip/torch_model.py`,
    /// `forward`: the zero-shot and few-shot image scores averaged, `w = 0.5`). With
    /// `--reference-only` the text is never used: the map is the reference map and the score
    /// its peak (PatchCore's image score).
    ///
    /// # Shapes
    /// `pixels: [B, 3, S, S]` -> `B` detections with `S·S` maps.
    pub fn detect_timed(
        &self,
        pixels: &Tensor,
        times: Option<&mut StageTimes>,
    ) -> Result<Vec<Detection>> {
        let mut lap = Lap {
            times,
            last: std::time::Instant::now(),
            device: pixels.device(),
        };
        let evidence = self.method_evidence(pixels, &mut lap)?;
        let reference = self.reference_evidence(&evidence.patches)?;
        let fused = self.fuse(evidence.map.as_ref(), reference.as_ref())?;
        lap.mark(|t| &mut t.reference)?;
        let host = self.to_host(&fused, reference.as_ref(), evidence.globals.is_some())?;
        lap.mark(|t| &mut t.transfer)?;
        let detections = self.postprocess(&host, evidence.globals.as_deref());
        lap.mark(|t| &mut t.smoothing)?;
        Ok(detections)
    }

    /// The method's evidence: the image-level global scores and the fused map from the text
    /// (none with `--reference-only`), and the unit patch features.
    ///
    /// # Shapes
    /// `pixels: [B, 3, S, S]` -> globals `B`, map `[B, S, S]`, patches per layer `[B, P, E]`.
    fn method_evidence(&self, pixels: &Tensor, lap: &mut Lap) -> Result<Evidence> {
        if self.reference.as_ref().is_some_and(|(_, how)| how.only) {
            let patches = self.patch_features(pixels)?;
            lap.mark(|t| &mut t.backbone)?;
            return Ok(Evidence {
                globals: None,
                map: None,
                patches,
            });
        }
        let fwd = self.forward_timed(pixels, false, lap.times.as_deref_mut())?;
        lap.last = std::time::Instant::now();
        let probs = fwd.image_probs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(Evidence {
            globals: Some(probs.iter().map(|p| p[1]).collect()),
            map: Some(fwd.map),
            patches: fwd.patches,
        })
    }

    /// The reference map of the patches against the bank, `None` without a bank.
    ///
    /// # Shapes
    /// per layer `[B, P, E]` -> `[B, S, S]`.
    fn reference_evidence(&self, patches: &[Tensor]) -> Result<Option<Tensor>> {
        let Some((bank, _)) = &self.reference else {
            return Ok(None);
        };
        let (fusion, size) = (self.cfg.map_fusion, self.cfg.image_size);
        Ok(Some(reference::reference_map(
            patches,
            &bank.layers,
            fusion,
            size,
        )?))
    }

    /// The raw map of each image: the method's, the reference's, or `(1 − w) · method +
    /// w · reference`, in f32 on the device.
    ///
    /// # Shapes
    /// `method, reference: [B, S, S]` -> `[B, S, S]`.
    fn fuse(&self, method: Option<&Tensor>, reference: Option<&Tensor>) -> Result<Tensor> {
        let weight = self.reference.as_ref().map(|(_, h)| h.weight);
        Ok(match (method, reference, weight) {
            (Some(m), Some(r), Some(w)) => reference::fuse_reference(m, r, w)?,
            (Some(m), None, _) => m.to_dtype(DType::F32)?,
            (None, Some(r), _) => r.clone(),
            _ => unreachable!("a method map, a reference map or both"),
        })
    }

    /// One copy of the batch's maps to the host (not one per image, each a device sync), and
    /// of the raw reference maps where the score needs their peak (methods without a joint
    /// score).
    ///
    /// # Shapes
    /// `fused, reference: [B, S, S]` -> `B·S·S` values each, row-major per image.
    fn to_host(
        &self,
        fused: &Tensor,
        reference: Option<&Tensor>,
        with_method: bool,
    ) -> Result<HostMaps> {
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let reference = match reference {
            Some(r) if with_method && self.cfg.joint == JointScore::None => Some(host(r)?),
            _ => None,
        };
        Ok(HostMaps {
            fused: host(fused)?,
            reference,
        })
    }

    /// Smoothing and the image score of every image, on all cores ([`scoring::postprocess`]):
    /// on a GPU this CPU step is what the pass waits for (at 518 px, 60 ms an image on one
    /// core).
    ///
    /// # Shapes
    /// `B·S·S` host values, `globals: B` -> `B` detections.
    fn postprocess(&self, host: &HostMaps, globals: Option<&[f32]>) -> Vec<Detection> {
        let (size, sigma) = (self.cfg.image_size, self.cfg.sigma);
        let area = size * size;
        let weight = self.reference.as_ref().map(|(_, h)| h.weight);
        host.fused
            .par_chunks(area)
            .enumerate()
            .map(|(i, raw)| {
                let rule = match (globals, &host.reference, weight) {
                    (None, _, _) => ScoreRule::Peak,
                    (Some(g), Some(r), Some(weight)) => {
                        let r = &r[i * area..(i + 1) * area];
                        let (_, reference_peak, _) =
                            scoring::postprocess(r, size, sigma, ScoreRule::Peak);
                        ScoreRule::Reference {
                            global: g[i],
                            weight,
                            reference_peak,
                        }
                    }
                    (Some(g), _, _) => ScoreRule::Joint {
                        global: g[i],
                        joint: self.cfg.joint,
                    },
                };
                let (map, score, global) = scoring::postprocess(raw, size, sigma, rule);
                Detection {
                    global,
                    score,
                    map,
                    size,
                }
            })
            .collect()
    }
}

/// What the method gives a batch before post-processing.
struct Evidence {
    /// The image-level abnormal probability of each image (`None`: `--reference-only`).
    globals: Option<Vec<f32>>,
    /// `[B, S, S]` fused map from the text (`None`: `--reference-only`).
    map: Option<Tensor>,
    /// Per tapped layer `[B, P, E]`, unit rows.
    patches: Vec<Tensor>,
}

/// A batch's maps on the host.
struct HostMaps {
    fused: Vec<f32>,
    /// The raw reference maps, where the score needs their peak.
    reference: Option<Vec<f32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AnomalyCLIP rounds its deep text prompts to fp16 as they replace the stream's prompt rows
    /// (`textual_context ... .half()`, zqhang/AnomalyCLIP@45ed4dd, AnomalyCLIP_lib/AnomalyCLIP.py
    /// l.246): prompts that differ below fp16's precision give the same text features, and
    /// without the rounding they do not.
    #[test]
    fn anomalyclip_rounds_deep_text_prompts_to_f16() {
        use crate::method::adapter::Adapter;
        use crate::method::config::{DeepPrompts, DetectorConfig, Preset, Tower};
        use crate::method::text::TextInputs;
        let m = crate::clip::load_model("random:tiny", &Default::default())
            .unwrap()
            .model;
        let tok = crate::clip::ClipTokenizer::embedded().unwrap();
        let text = |round: bool, offset: f64| {
            let mut cfg = DetectorConfig::preset(Preset::Anomalyclip, &m.config, "random:tiny");
            assert!(cfg.round_prompts_f16, "the preset follows the reference");
            cfg.round_prompts_f16 = round;
            // The tiny model's depth leaves no deep layer; prompts at layer 1 as well.
            cfg.text_prompts = DeepPrompts::for_tower(Tower::Text, 2, 4, false);
            let mut adapter = Adapter::init(cfg, &m.config, 5).unwrap();
            let deep = adapter.tensors.get_mut("text.deep.1").unwrap();
            // fp16-representable values, scaled by 1 + 2^-13: less than half of fp16's
            // relative spacing (2^-10), so the scaled values round back to them.
            let exact = crate::method::text::round_f16(deep).unwrap();
            *deep = (exact * (1.0 + offset)).unwrap();
            let inputs = TextInputs::build(&adapter.config, &tok).unwrap();
            let det = Detector::new(&m, &adapter, inputs).unwrap();
            det.encode_text(None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let tiny = 2f64.powi(-13);
        assert_eq!(text(true, 0.0), text(true, tiny));
        assert_ne!(text(false, 0.0), text(false, tiny));
    }

    /// Deterministic pixels `[n, 3, s, s]` in about [-1, 1], varied by `k`.
    fn pixels(n: usize, s: usize, k: f64) -> Tensor {
        let len = n * 3 * s * s;
        let t = Tensor::arange(0f32, len as f32, &candle_core::Device::Cpu).unwrap();
        ((t * (0.37 + k)).unwrap().sin().unwrap())
            .reshape((n, 3, s, s))
            .unwrap()
    }

    /// The reference map joins the method's as `(1 − w) · method + w · reference` (sigma 0 so
    /// the raw maps compare), the score of a method without a joint score as WinCLIP+'s
    /// `(1 − w) · global + w · max(reference)`, and `--reference-only` is the reference map
    /// with its peak as the score; `w = 0` changes nothing, bit for bit.
    #[test]
    fn reference_fusion_follows_its_formula() {
        use crate::method::adapter::Adapter;
        use crate::method::config::Preset;
        use crate::method::reference::{reference_map, BankInfo};
        let m = crate::clip::load_model("random:tiny", &Default::default())
            .unwrap()
            .model;
        let tok = crate::clip::ClipTokenizer::embedded().unwrap();
        let mut cfg = DetectorConfig::preset(Preset::ZeroShot, &m.config, "random:tiny");
        cfg.sigma = 0.0;
        // The zero-shot preset's `mean` joint score is checked at the end; first none, as
        // AdaCLIP and AnomalyCLIP have.
        let joint = cfg.joint;
        assert!(matches!(joint, JointScore::Mean { .. }));
        cfg.joint = JointScore::None;
        let adapter = Adapter::init(cfg.clone(), &m.config, 0).unwrap();
        let det = || {
            Detector::new(
                &m,
                &adapter,
                TextInputs::build(&adapter.config, &tok).unwrap(),
            )
            .unwrap()
        };
        let refs = det().patch_features(&pixels(3, 32, 0.5)).unwrap();
        let layers: Vec<Tensor> = refs
            .iter()
            .map(|t| {
                let (b, p, e) = t.dims3().unwrap();
                t.reshape((b * p, e)).unwrap()
            })
            .collect();
        let bank = MemoryBank {
            info: BankInfo {
                format: reference::FORMAT.into(),
                features: serde_json::Value::Null,
                layers: cfg.layers.clone(),
                image_size: 32,
                patches_per_image: 16,
                sources: Vec::new(),
                patches_total: 48,
                patches_kept: 48,
                max_patches: None,
                coreset_seed: 0,
            },
            layers,
        };
        let px = pixels(2, 32, 0.0);
        let plain = det().detect(&px).unwrap();
        let with = |w: f64, only: bool| {
            det()
                .with_reference(bank.clone(), ReferenceUse { weight: w, only })
                .unwrap()
                .detect(&px)
                .unwrap()
        };
        let reference = reference_map(
            &det().patch_features(&px).unwrap(),
            &bank.layers,
            cfg.map_fusion,
            32,
        )
        .unwrap();
        let zero = with(0.0, false);
        let fused = with(0.3, false);
        let only = with(1.0, true);
        for i in 0..2 {
            let r = reference
                .i(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let r_peak = scoring::map_peak(&r);
            assert!(r_peak > 0.0 && r_peak <= 1.0, "{r_peak}");
            assert_eq!(zero[i].map, plain[i].map);
            assert_eq!(zero[i].score, plain[i].score);
            for ((f, p), r) in fused[i].map.iter().zip(&plain[i].map).zip(&r) {
                assert!((f - (0.7 * p + 0.3 * r)).abs() < 1e-6, "{f} {p} {r}");
            }
            let want = 0.7 * plain[i].global + 0.3 * r_peak;
            assert!(
                (fused[i].score - want).abs() < 1e-6,
                "{} {want}",
                fused[i].score
            );
            assert_eq!(fused[i].global, plain[i].global);
            assert_eq!(only[i].map, r);
            assert_eq!((only[i].score, only[i].global), (r_peak, r_peak));
        }
        // A joint score takes the fused map's peak.
        let mut joint_adapter = adapter.clone();
        joint_adapter.config.joint = joint;
        let inputs = TextInputs::build(&joint_adapter.config, &tok).unwrap();
        let d = Detector::new(&m, &joint_adapter, inputs)
            .unwrap()
            .with_reference(
                bank.clone(),
                ReferenceUse {
                    weight: 0.3,
                    only: false,
                },
            )
            .unwrap()
            .detect(&px)
            .unwrap();
        for (d, f) in d.iter().zip(&fused) {
            assert_eq!(d.map, f.map);
            assert_eq!(d.score, joint.combine(d.global, f.map_max()));
        }
        // A bank of other layers, or at another size, is refused.
        let mut other = bank.clone();
        other.info.layers = vec![1];
        let e = det()
            .with_reference(other, ReferenceUse::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("layers"), "{e}");
        let mut other = bank;
        other.info.image_size = 64;
        let e = det()
            .with_reference(other, ReferenceUse::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("64 px"), "{e}");
    }

    /// The inference stages on `random:tiny`: the host copy holds `B·S·S` values, the
    /// post-processing of each image is `scoring::postprocess` of its raw map, and every stage
    /// of a timed pass is timed.
    #[test]
    fn inference_stages_compose_and_are_timed() {
        use crate::method::adapter::Adapter;
        use crate::method::config::Preset;
        let m = crate::clip::load_model("random:tiny", &Default::default())
            .unwrap()
            .model;
        let tok = crate::clip::ClipTokenizer::embedded().unwrap();
        let cfg = DetectorConfig::preset(Preset::ZeroShot, &m.config, "random:tiny");
        let adapter = Adapter::init(cfg, &m.config, 0).unwrap();
        let inputs = TextInputs::build(&adapter.config, &tok).unwrap();
        let det = Detector::new(&m, &adapter, inputs).unwrap();
        let px = pixels(2, 32, 0.25);
        let mut lap = Lap {
            times: None,
            last: std::time::Instant::now(),
            device: px.device(),
        };
        let ev = det.method_evidence(&px, &mut lap).unwrap();
        assert_eq!(ev.map.as_ref().unwrap().dims(), &[2, 32, 32]);
        assert_eq!(ev.globals.as_ref().unwrap().len(), 2);
        assert!(det.reference_evidence(&ev.patches).unwrap().is_none());
        let fused = det.fuse(ev.map.as_ref(), None).unwrap();
        let host = det.to_host(&fused, None, true).unwrap();
        assert_eq!(host.fused.len(), 2 * 32 * 32);
        assert!(host.reference.is_none());
        let dets = det.postprocess(&host, ev.globals.as_deref());
        for (i, d) in dets.iter().enumerate() {
            let rule = ScoreRule::Joint {
                global: ev.globals.as_ref().unwrap()[i],
                joint: det.cfg.joint,
            };
            let raw = &host.fused[i * 1024..(i + 1) * 1024];
            let (map, score, _) = scoring::postprocess(raw, 32, det.cfg.sigma, rule);
            assert_eq!((d.map.clone(), d.score), (map, score));
        }
        let mut times = StageTimes::default();
        let timed = det.detect_timed(&px, Some(&mut times)).unwrap();
        assert_eq!(timed[0].map, dets[0].map, "timing changes nothing");
        for (name, v) in [
            ("backbone", times.backbone),
            ("text", times.text),
            ("maps", times.maps),
            ("reference", times.reference),
            ("transfer", times.transfer),
            ("smoothing", times.smoothing),
        ] {
            assert!(v > 0.0, "{name} was not timed");
        }
    }
}
