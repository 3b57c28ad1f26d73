//! The adapter's learned tensors, typed, and the one name tree they live under.
//!
//! [`AdapterParams::load`] is the only place a tensor name is written (as candle models write
//! theirs once, through `vb.pp`): fresh initialisation, loading and checking a file, importing a
//! published checkpoint and training all run the same tree over a different [`ParamSource`].
//!
//! The names (Linear weights are `[out, in]`, as PyTorch stores them):
//!
//! | name | shape | used by |
//! |---|---|---|
//! | `text.ctx_normal`, `text.ctx_abnormal` | `[n_ctx, Dt]` | learned text prompts |
//! | `text.deep.{i}`, i = 1..depth | `[len, Dt]` | deep text prompts (static part) |
//! | `text.dynamic.{k}.weight/.bias`, k < len | `[Dt, E]` / `[Dt]` | dynamic text prompts |
//! | `vision.deep.{i}`, i = 0..depth | `[len, Dv]` | deep visual prompts (static part) |
//! | `vision.dynamic.{k}.weight/.bias` | `[Dv, E]` / `[Dv]` | dynamic visual prompts |
//! | `vision.patch_proj.{j}.weight/.bias`, j per tapped layer | `[E, Dv]` / `[E]` | linear patch features |
//! | `vision.cls_proj.weight/.bias` | `[E, E]` / `[E]` | HSF image score |
//! | `vision.head_weights` | `[layers, heads]` | head weights (θ of the parametrisation) |

use std::collections::HashMap;
use std::fmt::Display;

use candle_core::{DType, Device, Tensor};

use super::config::{
    DeepPrompts, DetectorConfig, HeadWeights, ImageScore, PatchFeatures, TextPrompts, Tower,
};
use super::text::round_f16;
use crate::clip::ClipConfig;
use crate::rng::SplitMix64;
use crate::Result;

/// How a fresh tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// N(0, std²) (prompt tokens: std 0.02 as AdaCLIP and AnomalyCLIP).
    Normal(f64),
    /// U(−1/√fan_in, 1/√fan_in): PyTorch's default for `nn.Linear` weights and biases.
    LinearDefault {
        fan_in: usize,
    },
    Constant(f32),
}

/// Where the tree's tensors come from: asked for each name with the shape the configuration
/// needs and how a fresh one would be initialised.
pub trait ParamSource {
    fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor>;
}

/// A position in the name tree (candle's `vb.pp`): `tree.pp("vision").pp("deep").get(3, ..)`
/// asks the source for `vision.deep.3`.
pub struct ParamTree<'a> {
    source: &'a mut dyn ParamSource,
    prefix: String,
}

impl<'a> ParamTree<'a> {
    pub fn new(source: &'a mut dyn ParamSource) -> Self {
        Self {
            source,
            prefix: String::new(),
        }
    }

    fn path(&self, segment: impl Display) -> String {
        if self.prefix.is_empty() {
            segment.to_string()
        } else {
            format!("{}.{segment}", self.prefix)
        }
    }

    /// The subtree under `segment`.
    pub fn pp(&mut self, segment: impl Display) -> ParamTree<'_> {
        let prefix = self.path(segment);
        ParamTree {
            source: &mut *self.source,
            prefix,
        }
    }

    /// This node again, for a call that consumes a tree.
    pub fn by_ref(&mut self) -> ParamTree<'_> {
        ParamTree {
            source: &mut *self.source,
            prefix: self.prefix.clone(),
        }
    }

    pub fn get(&mut self, segment: impl Display, shape: &[usize], init: Init) -> Result<Tensor> {
        let name = self.path(segment);
        self.source.get(&name, shape, init)
    }
}

/// A learned `Linear(d_in → d_out)`.
#[derive(Debug, Clone)]
pub struct LinearParams {
    /// `[d_out, d_in]`.
    pub weight: Tensor,
    /// `[d_out]`.
    pub bias: Tensor,
}

impl LinearParams {
    fn load(mut tree: ParamTree, d_in: usize, d_out: usize) -> Result<Self> {
        let init = Init::LinearDefault { fan_in: d_in };
        Ok(Self {
            weight: tree.get("weight", &[d_out, d_in], init)?,
            bias: tree.get("bias", &[d_out], init)?,
        })
    }

    /// `x Wᵀ + b`.
    ///
    /// # Shapes
    /// `x: [..., d_in]` -> `[..., d_out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&inner, outer)) = dims.split_last() else {
            return Err(crate::error::invalid!(
                "a linear layer needs a rank >= 1 input"
            ));
        };
        let rows: usize = outer.iter().product();
        let y = x
            .reshape((rows, inner))?
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        let mut out_dims = outer.to_vec();
        out_dims.push(self.weight.dim(0)?);
        Ok(y.reshape(out_dims)?)
    }
}

/// AnomalyCLIP's object-agnostic context: the learned tokens after SOT of the two sentences.
#[derive(Debug, Clone)]
pub struct TextContext {
    /// `[n_ctx, Dt]` of "object." (the reference's `ctx_pos`).
    pub normal: Tensor,
    /// `[n_ctx, Dt]` of "damaged object." (`ctx_neg`).
    pub abnormal: Tensor,
}

/// One tower's deep prompts.
#[derive(Debug, Clone)]
pub struct DeepPromptParams {
    config: DeepPrompts,
    tower: Tower,
    /// `[len, D]` static tokens per prompted layer, from the tower's first prompted layer on.
    tokens: Vec<Tensor>,
    /// One generator `Linear(E → D)` per token when the prompts are dynamic.
    generators: Vec<LinearParams>,
}

impl DeepPromptParams {
    fn load(
        mut tree: ParamTree,
        tower: Tower,
        config: DeepPrompts,
        width: usize,
        embed: usize,
    ) -> Result<Self> {
        let tokens = config
            .layers(tower)
            .map(|i| {
                tree.pp("deep")
                    .get(i, &[config.len, width], Init::Normal(0.02))
            })
            .collect::<Result<_>>()?;
        let generators = if config.dynamic {
            (0..config.len)
                .map(|k| LinearParams::load(tree.pp("dynamic").pp(k), embed, width))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            config,
            tower,
            tokens,
            generators,
        })
    }

    pub fn is_dynamic(&self) -> bool {
        !self.generators.is_empty()
    }

    /// The image-conditioned part of every token, one generator per token.
    ///
    /// # Shapes
    /// `g: [B, E]` (the plain pass's global embedding) -> `[B, len, D]`.
    pub fn dynamic_part(&self, g: &Tensor) -> Result<Tensor> {
        let rows = self
            .generators
            .iter()
            .map(|l| l.forward(g))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 1)?)
    }

    /// The prompt tokens entering each layer below the depth (`None` where a layer takes none),
    /// static plus `dynamic`, rounded to fp16 when `round_f16` (the references' `.half()`).
    ///
    /// # Shapes
    /// `dynamic: [len, D]` or `[B, len, D]` -> per layer `[len, D]` / `[B, len, D]` (as `dynamic`).
    pub fn layer_prompts(
        &self,
        dynamic: Option<&Tensor>,
        round_f16_tokens: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut out = vec![None; self.tower.first_prompted_layer()];
        for s in &self.tokens {
            let p = match dynamic {
                Some(d) => d.broadcast_add(s)?,
                None => s.clone(),
            };
            out.push(Some(if round_f16_tokens { round_f16(&p)? } else { p }));
        }
        debug_assert_eq!(out.len(), self.config.depth);
        Ok(out)
    }
}

/// Everything an adapter learns, by role.
#[derive(Debug, Clone)]
pub struct AdapterParams {
    pub text_context: Option<TextContext>,
    pub text_prompts: Option<DeepPromptParams>,
    pub visual_prompts: Option<DeepPromptParams>,
    /// One projection `Linear(Dv → E)` per tapped layer (AdaCLIP's `patch_token_layer`).
    pub patch_proj: Vec<LinearParams>,
    /// HSF's class-token projection `Linear(E → E)` (AdaCLIP's `cls_token_layer`).
    pub cls_proj: Option<LinearParams>,
    /// θ `[layers, heads]` of the head-weight parametrisation.
    pub head_weights: Option<Tensor>,
}

impl AdapterParams {
    /// The name tree: what `cfg` learns on the backbone `clip`, each tensor asked of `source`.
    pub fn load(
        cfg: &DetectorConfig,
        clip: &ClipConfig,
        source: &mut dyn ParamSource,
    ) -> Result<Self> {
        let dt = clip.text_config.hidden_size;
        let dv = clip.vision_config.hidden_size;
        let e = clip.projection_dim;
        let mut root = ParamTree::new(source);
        let text_context = match cfg.text {
            TextPrompts::Learned { context_length: n } => {
                let mut t = root.pp("text");
                let init = Init::Normal(0.02);
                Some(TextContext {
                    normal: t.get("ctx_normal", &[n, dt], init)?,
                    abnormal: t.get("ctx_abnormal", &[n, dt], init)?,
                })
            }
            TextPrompts::Ensemble { .. } => None,
        };
        let text_prompts = cfg
            .text_prompts
            .map(|p| DeepPromptParams::load(root.pp("text"), Tower::Text, p, dt, e))
            .transpose()?;
        let mut vision = root.pp("vision");
        let visual_prompts = cfg
            .visual_prompts
            .map(|p| DeepPromptParams::load(vision.by_ref(), Tower::Vision, p, dv, e))
            .transpose()?;
        let patch_proj = match cfg.patch_features {
            PatchFeatures::Linear => (0..cfg.layers.len())
                .map(|j| LinearParams::load(vision.pp("patch_proj").pp(j), dv, e))
                .collect::<Result<_>>()?,
            PatchFeatures::Projected => Vec::new(),
        };
        let cls_proj = match cfg.image_score {
            ImageScore::Hsf { .. } => Some(LinearParams::load(vision.pp("cls_proj"), e, e)?),
            ImageScore::Cls { .. } => None,
        };
        let head_weights = cfg
            .head_weights
            .map(|kind| {
                let shape = [
                    clip.vision_config.num_hidden_layers,
                    clip.vision_config.num_attention_heads,
                ];
                let init = match kind {
                    HeadWeights::Raw => Init::Constant(1.0),
                    HeadWeights::Sigmoid => Init::Constant(0.0),
                };
                vision.get("head_weights", &shape, init)
            })
            .transpose()?;
        Ok(Self {
            text_context,
            text_prompts,
            visual_prompts,
            patch_proj,
            cls_proj,
            head_weights,
        })
    }
}

/// One learned tensor the configuration calls for.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// Records what the tree asks for; hands out empty stand-ins.
#[derive(Default)]
struct Specs(Vec<ParamSpec>);

impl ParamSource for Specs {
    fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.0.push(ParamSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
            init,
        });
        Ok(Tensor::zeros(0, DType::F32, &Device::Cpu)?)
    }
}

/// The tensors `cfg` needs on the backbone `clip`, in the tree's order.
pub fn param_specs(cfg: &DetectorConfig, clip: &ClipConfig) -> Vec<ParamSpec> {
    let mut specs = Specs::default();
    // The stand-ins are never shaped, so nothing in the tree can fail.
    AdapterParams::load(cfg, clip, &mut specs).expect("collecting names cannot fail");
    specs.0
}

/// Fresh tensors, each from a generator keyed by the seed and its name (so a tensor's values
/// do not depend on which other tensors the configuration has).
pub struct SeededInit {
    pub seed: u64,
    /// Every tensor made, by name.
    pub made: HashMap<String, Tensor>,
}

impl SeededInit {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            made: HashMap::new(),
        }
    }
}

impl ParamSource for SeededInit {
    fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut rng = SplitMix64::keyed(self.seed, name);
        let values = match init {
            Init::Normal(std) => rng.normal(n, std),
            Init::LinearDefault { fan_in } => rng.uniform(n, 1.0 / (fan_in as f64).sqrt()),
            Init::Constant(c) => vec![c; n],
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
        self.made.insert(name.to_string(), t.clone());
        Ok(t)
    }
}

/// Tensors by name (an adapter file, training variables, a converted checkpoint). Every
/// problem is collected instead of stopping at the first: [`Self::finish`] names them all,
/// with the names nobody asked for.
pub struct NamedTensors<'a> {
    tensors: &'a HashMap<String, Tensor>,
    /// Where to move and cast the tensors to (`None`: as stored, the same tensors, so that
    /// training's variables stay variables).
    target: Option<(Device, DType)>,
    asked: Vec<String>,
    problems: Vec<String>,
}

impl<'a> NamedTensors<'a> {
    /// The tensors as stored.
    pub fn new(tensors: &'a HashMap<String, Tensor>) -> Self {
        Self {
            tensors,
            target: None,
            asked: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// The tensors moved to `device` and cast to `dtype` as they are handed out.
    pub fn on(tensors: &'a HashMap<String, Tensor>, device: &Device, dtype: DType) -> Self {
        Self {
            target: Some((device.clone(), dtype)),
            ..Self::new(tensors)
        }
    }

    /// The problems, every one; empty when the tensors are exactly what the tree asked for.
    pub fn finish(self) -> Vec<String> {
        let mut problems = self.problems;
        let mut extra: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !self.asked.contains(k))
            .collect();
        extra.sort();
        problems.extend(
            extra
                .into_iter()
                .map(|k| format!("unexpected tensor `{k}`")),
        );
        problems
    }
}

impl ParamSource for NamedTensors<'_> {
    fn get(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Tensor> {
        self.asked.push(name.to_string());
        match self.tensors.get(name) {
            Some(t) if t.dims() == shape => Ok(match &self.target {
                Some((device, dtype)) => t.to_device(device)?.to_dtype(*dtype)?,
                None => t.clone(),
            }),
            found => {
                self.problems.push(match found {
                    None => format!("missing `{name}` {shape:?}"),
                    Some(t) => format!(
                        "`{name}` has shape {:?}, the backbone needs {shape:?}",
                        t.dims()
                    ),
                });
                // A stand-in of the right shape, so the tree goes on and finds the rest.
                let (device, dtype) = self.target.clone().unwrap_or((Device::Cpu, DType::F32));
                Ok(Tensor::zeros(shape, dtype, &device)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::config::Preset;

    #[test]
    fn linear_matches_pytorch_layout() {
        let dev = Device::Cpu;
        let l = LinearParams {
            weight: Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 1.0, 1.0]], &dev).unwrap(),
            bias: Tensor::new(&[0.5f32, -1.0], &dev).unwrap(),
        };
        let x = Tensor::new(&[[[1f32, 2.0, 3.0]], [[0.0, 0.0, -1.0]]], &dev).unwrap();
        let y = l.forward(&x).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(y, vec![vec![vec![1.5, 4.0]], vec![vec![0.5, -2.0]]]);
    }

    #[test]
    fn the_tree_names_every_tensor_once_per_role() {
        let clip = ClipConfig::tiny();
        let cfg = DetectorConfig::preset(Preset::Zsad, &clip, "x");
        let names: Vec<String> = param_specs(&cfg, &clip)
            .into_iter()
            .map(|s| s.name)
            .collect();
        let (td, vd) = (
            cfg.text_prompts.unwrap().depth,
            cfg.visual_prompts.unwrap().depth,
        );
        let mut want: Vec<String> = vec!["text.ctx_normal".into(), "text.ctx_abnormal".into()];
        want.extend((1..td).map(|i| format!("text.deep.{i}")));
        for k in 0..4 {
            want.extend(["weight", "bias"].map(|w| format!("text.dynamic.{k}.{w}")));
        }
        want.extend((0..vd).map(|i| format!("vision.deep.{i}")));
        for k in 0..5 {
            want.extend(["weight", "bias"].map(|w| format!("vision.dynamic.{k}.{w}")));
        }
        for j in 0..cfg.layers.len() {
            want.extend(["weight", "bias"].map(|w| format!("vision.patch_proj.{j}.{w}")));
        }
        want.extend([
            "vision.cls_proj.weight".into(),
            "vision.cls_proj.bias".into(),
        ]);
        want.push("vision.head_weights".into());
        assert_eq!(names, want);
    }

    /// Static tokens per prompted layer, `None` below the tower's first one; the dynamic part
    /// is broadcast onto every layer's tokens.
    #[test]
    fn layer_prompts_add_the_dynamic_part() {
        let dev = Device::Cpu;
        let tok = |v: f32| Tensor::full(v, (1, 2), &dev).unwrap();
        let p = DeepPromptParams {
            config: DeepPrompts {
                depth: 3,
                len: 1,
                dynamic: true,
            },
            tower: Tower::Text,
            tokens: vec![tok(1.0), tok(2.0)],
            generators: vec![LinearParams {
                weight: Tensor::new(&[[1f32], [-1.0]], &dev).unwrap(),
                bias: Tensor::new(&[0f32, 0.5], &dev).unwrap(),
            }],
        };
        // g = [[3], [5]] -> dynamic [[[3, -2.5]], [[5, -4.5]]]
        let g = Tensor::new(&[[3f32], [5.0]], &dev).unwrap();
        let d = p.dynamic_part(&g).unwrap();
        assert_eq!(
            d.to_vec3::<f32>().unwrap(),
            vec![vec![vec![3.0, -2.5]], vec![vec![5.0, -4.5]]]
        );
        let layers = p.layer_prompts(Some(&d), false).unwrap();
        assert_eq!(layers.len(), 3);
        assert!(layers[0].is_none());
        let l2 = layers[2].as_ref().unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(l2, vec![vec![vec![5.0, -0.5]], vec![vec![7.0, -2.5]]]);
        let plain = p.layer_prompts(None, false).unwrap();
        assert_eq!(
            plain[1].as_ref().unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0]]
        );
    }
}
