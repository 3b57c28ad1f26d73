//! One configurable detector that runs every preset: frozen CLIP plus the adapter's tensors
//! -> per-layer patch-text similarities -> an anomaly map and an image score.
//!
//! The forward follows SPEC §1 (AdaCLIP) and §2 (AnomalyCLIP) step by step; which steps run is
//! decided by [`DetectorConfig`]. [`Detector::forward`] is differentiable in the adapter's
//! tensors (training); [`Detector::detect`] adds the non-differentiable post-processing
//! (Gaussian smoothing, joint score) for inference.

use std::collections::HashMap;

use candle_core::{DType, IndexOp, Tensor};

use super::adapter::Adapter;
use super::config::{DetectorConfig, HeadWeights, ImageScore, MapFusion, PatchFeatures};
use super::kmeans::kmeans;
use super::maps::{gaussian_filter, upsample_bilinear};
use super::text::{normalize, round_f16, TextInputs, TextSide};
use crate::clip::{ClipModel, Hooks, TextTransformer, VisionTransformer};
use crate::error::invalid;
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
}

/// Wall time per stage of [`Detector::forward`] / [`Detector::detect`], accumulated (CPU ops
/// are synchronous, so wall time between stages is the stage's time).
#[derive(Debug, Clone, Default)]
pub struct StageTimes {
    /// Image tower passes and patch features.
    pub backbone: f64,
    /// Text tower (per image only with dynamic prompts).
    pub text: f64,
    /// Similarities, upsampling, fusion, image score.
    pub maps: f64,
    /// Gaussian smoothing and the joint score.
    pub smoothing: f64,
}

struct Lap<'a> {
    times: Option<&'a mut StageTimes>,
    last: std::time::Instant,
}

impl Lap<'_> {
    fn mark(&mut self, stage: fn(&mut StageTimes) -> &mut f64) {
        let now = std::time::Instant::now();
        if let Some(t) = self.times.as_deref_mut() {
            *stage(t) += (now - self.last).as_secs_f64();
        }
        self.last = now;
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
        self.map.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

pub struct Detector {
    cfg: DetectorConfig,
    vision: VisionTransformer,
    text: TextTransformer,
    text_side: TextSide,
    params: HashMap<String, Tensor>,
    /// `T` `[2, E]` when it does not depend on the image: computed once per run.
    static_text: Option<Tensor>,
}

/// `x Wᵀ + b` with PyTorch-layout `[out, in]` weights, for `x: [..., in]`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("rank >= 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x
        .reshape((rows, inner))?
        .matmul(&w.t()?)?
        .broadcast_add(b)?;
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// Softmax over a pair `(a0, a1)` of equal-shape tensors, elementwise: `(p0, p1)`.
fn pair_softmax(a0: &Tensor, a1: &Tensor) -> Result<(Tensor, Tensor)> {
    let p1 = ((a0 - a1)?.exp()? + 1.0)?.recip()?;
    let p0 = (1.0 - &p1)?;
    Ok((p0, p1))
}

/// Indices of the `k` largest values, ties broken by the lower index.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

impl Detector {
    /// Sets the backbone up for the configuration (position embedding at `image_size`) and
    /// encodes the text once when it does not depend on the image.
    pub fn new(model: &ClipModel, adapter: &Adapter, inputs: TextInputs) -> Result<Self> {
        adapter.check(&model.config)?;
        let cfg = adapter.config.clone();
        let vision = model
            .vision
            .at_image_size(cfg.image_size, cfg.pos_interpolation)?;
        let dev = vision.device().clone();
        let dtype = vision.dtype();
        let params = adapter
            .tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(&dev)?.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Self::with_params(cfg, vision, model.text.clone(), params, inputs)
    }

    /// The same from tensors already on the device (training passes `Var`s here).
    pub fn with_params(
        cfg: DetectorConfig,
        vision: VisionTransformer,
        text: TextTransformer,
        params: HashMap<String, Tensor>,
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
        };
        if !det.cfg.text_is_dynamic() {
            det.static_text = Some(det.encode_text(None)?);
        }
        Ok(det)
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
    /// Whether `T` was encoded once for the run (it is re-encoded per image only when dynamic
    /// prompts reach the text tower).
    pub fn text_is_cached(&self) -> bool {
        self.static_text.is_some()
    }

    fn param(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .ok_or_else(|| invalid!("the adapter has no `{name}`"))
    }

    fn apply_linear(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        linear(
            x,
            self.param(&format!("{prefix}.weight"))?,
            self.param(&format!("{prefix}.bias"))?,
        )
    }

    /// `[B, n, out]`: the `n` dynamic prompt generators applied to the global feature `g [B, E]`.
    fn dynamic(&self, g: &Tensor, prefix: &str, n: usize) -> Result<Tensor> {
        let rows = (0..n)
            .map(|k| self.apply_linear(g, &format!("{prefix}.{k}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 1)?)
    }

    /// Static (+ dynamic) prompt tokens, rounded to fp16 when configured.
    fn prompt(&self, name: &str, dynamic: Option<&Tensor>) -> Result<Tensor> {
        let s = self.param(name)?;
        let p = match dynamic {
            Some(d) => d.broadcast_add(s)?,
            None => s.clone(),
        };
        if self.cfg.round_prompts_f16 {
            round_f16(&p)
        } else {
            Ok(p)
        }
    }

    /// `T` `[2, E]`, with the dynamic text prompts of one image `[M, Dt]` if any.
    fn encode_text(&self, dynamic: Option<&Tensor>) -> Result<Tensor> {
        let depth = if self.cfg.text_prompt_length > 0 {
            self.cfg.text_prompt_depth
        } else {
            0
        };
        let deep = (0..depth)
            .map(|i| {
                if i == 0 {
                    Ok(None)
                } else {
                    self.prompt(&format!("text.deep.{i}"), dynamic).map(Some)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let ctx = match (
            self.params.get("text.ctx_normal"),
            self.params.get("text.ctx_abnormal"),
        ) {
            (Some(n), Some(a)) => Some((n, a)),
            _ => None,
        };
        self.text_side.encode(&self.text, &deep, ctx)
    }

    /// The effective head weights `[layers, heads]`.
    fn head_weights(&self) -> Result<Option<Tensor>> {
        let Some(kind) = self.cfg.head_weights else {
            return Ok(None);
        };
        let theta = self.param("vision.head_weights")?;
        Ok(Some(match kind {
            HeadWeights::Raw => theta.clone(),
            // 2·σ(θ), written with basic ops so that it has a backward.
            HeadWeights::Sigmoid => ((theta.neg()?.exp()? + 1.0)?.recip()? * 2.0)?,
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
        };
        let cfg = &self.cfg;
        let b = pixels.dim(0)?;
        let scale = cfg.logit_scale;

        // A. Dynamic prompts from the plain pass's global embedding (AdaCLIP step A).
        let g = if cfg.dynamic_prompts {
            Some(self.vision.pooled(pixels)?)
        } else {
            None
        };
        let vis_len = cfg.visual_prompt_length;
        let dyn_vis = match &g {
            Some(g) if cfg.visual_prompt_depth > 0 => {
                Some(self.dynamic(g, "vision.dynamic", vis_len)?)
            }
            _ => None,
        };
        let dyn_txt = match &g {
            Some(g) if cfg.text_is_dynamic() => {
                Some(self.dynamic(g, "text.dynamic", cfg.text_prompt_length)?)
            }
            _ => None,
        };

        // B. The prompted, head-weighted pass with taps.
        let vis_prompts = (0..if vis_len > 0 {
            cfg.visual_prompt_depth
        } else {
            0
        })
            .map(|i| {
                self.prompt(&format!("vision.deep.{i}"), dyn_vis.as_ref())
                    .map(Some)
            })
            .collect::<Result<Vec<_>>>()?;
        let hw = self.head_weights()?;
        let hooks = Hooks {
            taps: &cfg.layers,
            head_weights: hw.as_ref(),
            prompts: &vis_prompts,
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

        // C. Patch features F_l [B, P, E], unit length.
        let n_tok = streams[0].dim(1)?;
        let feats = streams
            .iter()
            .enumerate()
            .map(|(j, t)| {
                let patches = t.narrow(1, 1, n_tok - 1)?;
                let f = match cfg.patch_features {
                    PatchFeatures::Projected => self.vision.project(&patches)?,
                    PatchFeatures::Linear => {
                        self.apply_linear(&patches, &format!("vision.patch_proj.{j}"))?
                    }
                };
                normalize(&f)
            })
            .collect::<Result<Vec<_>>>()?;

        lap.mark(|t| &mut t.backbone);

        // D. Text T [B, 2, E].
        let text = match &self.static_text {
            Some(t) => {
                let (two, e) = t.dims2()?;
                t.unsqueeze(0)?.broadcast_as((b, two, e))?
            }
            None => {
                let dt = dyn_txt.as_ref().expect("dynamic text prompts");
                let ts = (0..b)
                    .map(|i| self.encode_text(Some(&dt.i(i)?)))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&ts, 0)?
            }
        };
        let text_t = text.transpose(1, 2)?.contiguous()?; // [B, E, 2]
        lap.mark(|t| &mut t.text);

        // E1. Logits per layer A_l = scale · F_l Tᵀ, [B, P, 2].
        let logits = feats
            .iter()
            .map(|f| Ok((f.matmul(&text_t)? * scale)?))
            .collect::<Result<Vec<_>>>()?;

        // E2. Image-level probabilities.
        let image_probs = match &cfg.image_score {
            ImageScore::Cls { ln_post } => {
                let img = if *ln_post {
                    out.pooled.clone()
                } else {
                    let cls = out.last.narrow(1, 0, 1)?.squeeze(1)?;
                    self.vision.project_without_ln(&cls)?
                };
                let l = (normalize(&img)?.unsqueeze(1)?.matmul(&text_t)? * scale)?.squeeze(1)?;
                crate::clip::layers::softmax_last_dim(&l)?
            }
            ImageScore::Hsf {
                clusters,
                cls_weight,
            } => {
                let c = normalize(&self.apply_linear(&out.pooled, "vision.cls_proj")?)?;
                let h = self.hybrid_semantic_fusion(&feats, &logits, *clusters)?;
                let s = normalize(&((h * (1.0 - cls_weight))? + (c * *cls_weight)?)?)?;
                let l = (s.unsqueeze(1)?.matmul(&text_t)? * scale)?.squeeze(1)?;
                crate::clip::layers::softmax_last_dim(&l)?
            }
        };

        // E3. Maps at the input size.
        let size = cfg.image_size;
        let grid = ((n_tok - 1) as f64).sqrt() as usize;
        let to_grid = |a: &Tensor| -> Result<Tensor> {
            // [B, P, 2] -> [B*2, g, g]
            Ok(a.transpose(1, 2)?
                .contiguous()?
                .reshape((b * 2, grid, grid))?)
        };
        let up = |x: &Tensor, align: bool| -> Result<Tensor> {
            Ok(upsample_bilinear(x, size, size, align)?.reshape((b, 2, size, size))?)
        };
        let channels =
            |x: &Tensor| -> Result<(Tensor, Tensor)> { Ok((x.i((.., 0))?, x.i((.., 1))?)) };
        let mut layer_maps = Vec::new();
        let n_layers = logits.len() as f64;
        let map = match cfg.map_fusion {
            MapFusion::MeanLogits => {
                let mut sum: Option<Tensor> = None;
                for a in &logits {
                    let u = up(&to_grid(a)?, true)?;
                    if with_layer_maps {
                        let (a0, a1) = channels(&u)?;
                        let (p0, p1) = pair_softmax(&a0, &a1)?;
                        layer_maps.push(Tensor::stack(&[p0, p1], 1)?);
                    }
                    sum = Some(match sum {
                        Some(s) => (s + u)?,
                        None => u,
                    });
                }
                let mean = (sum.expect("at least one layer") / n_layers)?;
                let (a0, a1) = channels(&mean)?;
                pair_softmax(&a0, &a1)?.1
            }
            MapFusion::MeanProbs => {
                let mut sum: Option<Tensor> = None;
                for a in &logits {
                    let (a0, a1) = (a.i((.., .., 0))?, a.i((.., .., 1))?);
                    let (p0, p1) = pair_softmax(&a0, &a1)?;
                    let probs = Tensor::stack(&[p0, p1], 2)?; // [B, P, 2]
                    let u = up(&to_grid(&probs)?, false)?;
                    let (q0, q1) = channels(&u)?;
                    let m = (((q1 - q0)? + 1.0)? * 0.5)?;
                    if with_layer_maps {
                        layer_maps.push(u);
                    }
                    sum = Some(match sum {
                        Some(s) => (s + m)?,
                        None => m,
                    });
                }
                (sum.expect("at least one layer") / n_layers)?
            }
        };
        // Materialise the lazy results before the clock stops (a no-op on the CPU).
        map.device().synchronize()?;
        lap.mark(|t| &mut t.maps);
        Ok(Forward {
            image_probs,
            layer_maps,
            map,
        })
    }

    /// AdaCLIP's HSF (code version, SPEC §1 E2): `h [B, E]` from the `5·clusters` patches with
    /// the highest mean-logit anomaly probability. The cluster assignment is a constant; the
    /// gradient flows through the gathered tokens.
    fn hybrid_semantic_fusion(
        &self,
        feats: &[Tensor],
        logits: &[Tensor],
        clusters: usize,
    ) -> Result<Tensor> {
        let n_layers = feats.len();
        let mean_logits = (Tensor::stack(logits, 0)?.sum(0)? / n_layers as f64)?; // [B, P, 2]
        let (a0, a1) = (mean_logits.i((.., .., 0))?, mean_logits.i((.., .., 1))?);
        let p = pair_softmax(&a0, &a1)?.1.to_dtype(DType::F32)?; // [B, P]
        let (b, n_patch) = p.dims2()?;
        let k = n_patch.min(5 * clusters);
        let z_all = (Tensor::stack(feats, 0)?.sum(0)? / n_layers as f64)?; // [B, P, E]
        let mut hs = Vec::with_capacity(b);
        for bi in 0..b {
            let idx = top_k(&p.i(bi)?.to_vec1::<f32>()?, k);
            let idx_t = Tensor::from_vec(
                idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                k,
                p.device(),
            )?
            .to_device(z_all.device())?;
            // k-means on the concatenation over layers of the selected tokens.
            let sel: Vec<Tensor> = feats
                .iter()
                .map(|f| f.i(bi)?.index_select(&idx_t, 0))
                .collect::<candle_core::Result<_>>()?;
            let data = Tensor::cat(&sel, 1)?.to_dtype(DType::F32)?;
            let d = data.dim(1)?;
            let flat = data.flatten_all()?.to_vec1::<f32>()?;
            let km = kmeans(&flat, k, d, clusters, self.cfg.kmeans_seed);
            // Mean of the (non-empty) cluster centres = a fixed weighting of the tokens.
            let mut count = vec![0usize; km.k];
            for &l in &km.labels {
                count[l] += 1;
            }
            let used = count.iter().filter(|&&c| c > 0).count() as f64;
            let w: Vec<f32> = km
                .labels
                .iter()
                .map(|&l| (1.0 / (count[l] as f64 * used)) as f32)
                .collect();
            let z = z_all.i(bi)?.index_select(&idx_t, 0)?; // [k, E]
            let w = Tensor::from_vec(w, (1, k), z.device())?.to_dtype(z.dtype())?;
            hs.push(w.matmul(&z)?.squeeze(0)?);
        }
        normalize(&Tensor::stack(&hs, 0)?)
    }

    /// Inference for a batch: maps smoothed as the references do, scores fused per the config.
    pub fn detect(&self, pixels: &Tensor) -> Result<Vec<Detection>> {
        self.detect_timed(pixels, None)
    }

    /// [`Self::detect`], adding each stage's wall time to `times`.
    pub fn detect_timed(
        &self,
        pixels: &Tensor,
        mut times: Option<&mut StageTimes>,
    ) -> Result<Vec<Detection>> {
        let fwd = self.forward_timed(pixels, false, times.as_deref_mut())?;
        let started = std::time::Instant::now();
        let probs = fwd.image_probs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let maps = fwd.map.to_dtype(DType::F32)?;
        let size = self.cfg.image_size;
        probs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let raw = maps.i(i)?.flatten_all()?.to_vec1::<f32>()?;
                let map = gaussian_filter(&raw, size, size, self.cfg.sigma);
                let global = p[1];
                let mut det = Detection {
                    global,
                    score: global,
                    map,
                    size,
                };
                det.score = self.cfg.joint.combine(global, det.map_max());
                Ok(det)
            })
            .collect::<Result<Vec<_>>>()
            .inspect(|_| {
                if let Some(t) = times {
                    t.smoothing += started.elapsed().as_secs_f64();
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn linear_matches_pytorch_layout() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0, 3.0]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 1.0, 1.0]], &dev).unwrap();
        let b = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
        let y = linear(&x, &w, &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![1.5, 4.0]]);
    }

    #[test]
    fn pair_softmax_is_softmax_with_temperature() {
        let dev = Device::Cpu;
        let a0 = Tensor::new(&[0.3f32, -2.0], &dev).unwrap();
        let a1 = Tensor::new(&[0.1f32, 5.0], &dev).unwrap();
        let (p0, p1) = pair_softmax(&(&a0 * 100.0).unwrap(), &(&a1 * 100.0).unwrap()).unwrap();
        let (p0, p1) = (p0.to_vec1::<f32>().unwrap(), p1.to_vec1::<f32>().unwrap());
        // softmax([30, 10]) = [1/(1+e^-20), e^-20/(1+e^-20)]
        let e = (-20f64).exp();
        assert!((p1[0] as f64 - e / (1.0 + e)).abs() < 1e-12);
        assert!((p0[0] as f64 - 1.0 / (1.0 + e)).abs() < 1e-7);
        assert!((p1[1] - 1.0).abs() < 1e-7);
    }

    #[test]
    fn top_k_is_stable_on_ties() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.9, 0.2], 3), vec![3, 1, 2]);
        assert_eq!(top_k(&[1.0, 1.0], 5), vec![0, 1]);
    }

    /// AnomalyCLIP rounds its deep text prompts to fp16 as they replace the stream's prompt rows
    /// (`textual_context ... .half()`, zqhang/AnomalyCLIP@45ed4dd, AnomalyCLIP_lib/AnomalyCLIP.py
    /// l.246): prompts that differ below fp16's precision give the same text features, and
    /// without the rounding they do not.
    #[test]
    fn anomalyclip_rounds_deep_text_prompts_to_f16() {
        use crate::method::adapter::Adapter;
        use crate::method::config::{DetectorConfig, Preset};
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
            cfg.text_prompt_depth = 2;
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
}
