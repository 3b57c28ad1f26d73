//! The adapter file: the few learned tensors that turn frozen CLIP into a detector, plus its
//! [`DetectorConfig`] in the safetensors metadata (key `zsad.config`), so that a file alone says
//! how to run it.
//!
//! Tensor names (Linear weights are `[out, in]`, as PyTorch stores them):
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
use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::{DetectorConfig, HeadWeights, ImageScore, PatchFeatures, TextPrompts};
use crate::clip::ClipConfig;
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// Metadata key of the configuration JSON.
pub const CONFIG_KEY: &str = "zsad.config";
/// Metadata key of the format marker.
pub const FORMAT_KEY: &str = "zsad.format";
pub const FORMAT: &str = "zsad-adapter/1";

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

/// One learned tensor the configuration calls for.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// The tensors `cfg` needs on the backbone `clip`, in a fixed order.
pub fn param_specs(cfg: &DetectorConfig, clip: &ClipConfig) -> Vec<ParamSpec> {
    let dt = clip.text_config.hidden_size;
    let dv = clip.vision_config.hidden_size;
    let e = clip.projection_dim;
    let mut out = Vec::new();
    let mut push =
        |name: String, shape: Vec<usize>, init: Init| out.push(ParamSpec { name, shape, init });
    let prompt = Init::Normal(0.02);
    let linear =
        |prefix: &str, push: &mut dyn FnMut(String, Vec<usize>, Init), o: usize, i: usize| {
            push(
                format!("{prefix}.weight"),
                vec![o, i],
                Init::LinearDefault { fan_in: i },
            );
            push(
                format!("{prefix}.bias"),
                vec![o],
                Init::LinearDefault { fan_in: i },
            );
        };
    if let TextPrompts::Learned { context_length } = cfg.text {
        push("text.ctx_normal".into(), vec![context_length, dt], prompt);
        push("text.ctx_abnormal".into(), vec![context_length, dt], prompt);
    }
    // Deep prompts: static tokens per prompted layer, plus one generator per token when
    // dynamic. Text layer 0 is never prompted.
    let deep = [
        ("text", 1, cfg.text_prompt_depth, cfg.text_prompt_length, dt),
        (
            "vision",
            0,
            cfg.visual_prompt_depth,
            cfg.visual_prompt_length,
            dv,
        ),
    ];
    for (tower, first, depth, len, width) in deep {
        if depth <= first || len == 0 {
            continue;
        }
        for i in first..depth {
            push(format!("{tower}.deep.{i}"), vec![len, width], prompt);
        }
        if cfg.dynamic_prompts {
            for k in 0..len {
                linear(&format!("{tower}.dynamic.{k}"), &mut push, width, e);
            }
        }
    }
    if cfg.patch_features == PatchFeatures::Linear {
        for j in 0..cfg.layers.len() {
            linear(&format!("vision.patch_proj.{j}"), &mut push, e, dv);
        }
    }
    if matches!(cfg.image_score, ImageScore::Hsf { .. }) {
        linear("vision.cls_proj", &mut push, e, e);
    }
    if let Some(hw) = cfg.head_weights {
        let init = match hw {
            HeadWeights::Raw => Init::Constant(1.0),
            HeadWeights::Sigmoid => Init::Constant(0.0),
        };
        push(
            "vision.head_weights".into(),
            vec![
                clip.vision_config.num_hidden_layers,
                clip.vision_config.num_attention_heads,
            ],
            init,
        );
    }
    out
}

/// A detector configuration with its learned tensors (f32, on the CPU until used).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: DetectorConfig,
    pub tensors: HashMap<String, Tensor>,
}

impl Adapter {
    /// Fresh, untrained tensors for `config` (seeded): what training starts from, and what
    /// `zsad detect --preset P` runs when no adapter file is given.
    pub fn init(config: DetectorConfig, clip: &ClipConfig, seed: u64) -> Result<Self> {
        config.validate(clip)?;
        let mut tensors = HashMap::new();
        for spec in param_specs(&config, clip) {
            let n: usize = spec.shape.iter().product();
            let mut rng = SplitMix64::keyed(seed, &spec.name);
            let values = match spec.init {
                Init::Normal(std) => rng.normal(n, std),
                Init::LinearDefault { fan_in } => rng.uniform(n, 1.0 / (fan_in as f64).sqrt()),
                Init::Constant(c) => vec![c; n],
            };
            tensors.insert(
                spec.name,
                Tensor::from_vec(values, spec.shape, &Device::Cpu)?,
            );
        }
        Ok(Self { config, tensors })
    }

    /// Checks that the tensors are exactly those the configuration needs on `clip`, with the
    /// right shapes; the error names every problem at once.
    pub fn check(&self, clip: &ClipConfig) -> Result<()> {
        self.config.validate(clip)?;
        let specs = param_specs(&self.config, clip);
        let mut problems = Vec::new();
        for s in &specs {
            match self.tensors.get(&s.name) {
                None => problems.push(format!("missing `{}` {:?}", s.name, s.shape)),
                Some(t) if t.dims() != s.shape.as_slice() => problems.push(format!(
                    "`{}` has shape {:?}, the backbone needs {:?}",
                    s.name,
                    t.dims(),
                    s.shape
                )),
                _ => {}
            }
        }
        let mut extra: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !specs.iter().any(|s| &s.name == *k))
            .collect();
        extra.sort();
        for k in extra {
            problems.push(format!("unexpected tensor `{k}`"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "adapter does not fit the {} preset on this backbone: {}",
                self.config.preset.name(),
                problems.join("; ")
            )))
        }
    }

    /// The safetensors bytes (tensors as f32, the configuration in the metadata).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let config = serde_json::to_string(&self.config)
            .map_err(|e| Error::InvalidArgument(format!("cannot serialise the config: {e}")))?;
        let meta = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (CONFIG_KEY.to_string(), config),
        ]);
        crate::data::tensors::serialize(&self.tensors, meta)
    }

    /// Reads an adapter file written by [`Self::to_bytes`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// [`Self::load`] on bytes in memory; `origin` names them in errors. Refuses non-finite
    /// values, which would silently turn every score into NaN. The configuration's ranges are
    /// checked against the backbone by [`Self::check`].
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let (tensors, meta) = crate::data::tensors::parse(bytes, origin)?;
        let bad = |m: String| Error::Weights {
            file: origin.to_string(),
            message: m,
        };
        let json = meta.get(CONFIG_KEY).ok_or_else(|| {
            bad(format!(
                "not a zsad adapter (no `{CONFIG_KEY}` metadata); convert published checkpoints with `zsad import-checkpoint`"
            ))
        })?;
        let config: DetectorConfig = serde_json::from_str(json)
            .map_err(|e| bad(format!("unreadable `{CONFIG_KEY}` metadata: {e}")))?;
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut out = HashMap::with_capacity(tensors.len());
        for name in names {
            let t = tensors[name].to_dtype(candle_core::DType::F32)?;
            let bad_values = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .filter(|v| !v.is_finite())
                .count();
            if bad_values > 0 {
                return Err(bad(format!(
                    "tensor `{name}` holds {bad_values} NaN or infinite values (a diverged training run?)"
                )));
            }
            out.insert(name.clone(), t);
        }
        Ok(Self {
            config,
            tensors: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::config::Preset;

    #[test]
    fn init_fits_and_round_trips() {
        let clip = ClipConfig::tiny();
        for p in Preset::ALL {
            let cfg = DetectorConfig::preset(p, &clip, "random:tiny");
            let a = Adapter::init(cfg, &clip, 7).unwrap();
            a.check(&clip).unwrap();
            let dir = std::env::temp_dir().join(format!("zsad-adapter-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{}.safetensors", p.name()));
            std::fs::write(&path, a.to_bytes().unwrap()).unwrap();
            let b = Adapter::load(&path).unwrap();
            assert_eq!(a.config, b.config);
            assert_eq!(a.tensors.len(), b.tensors.len());
            for (k, t) in &a.tensors {
                let u = &b.tensors[k];
                let d = (t - u).unwrap().abs().unwrap().flatten_all().unwrap();
                assert_eq!(d.max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0, "{k}");
            }
        }
    }

    #[test]
    fn adaclip_has_the_published_parameter_count_at_vit_l() {
        // SPEC §7: 10,665,472 parameters, minus text static prompt 0 (dead, 5 x 768).
        let clip = ClipConfig::vit_l_14_336();
        let cfg = DetectorConfig::preset(Preset::Adaclip, &clip, "x");
        let n: usize = param_specs(&cfg, &clip)
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        assert_eq!(n, 10_665_472 - 5 * 768);
    }

    #[test]
    fn check_names_every_problem() {
        let clip = ClipConfig::tiny();
        let cfg = DetectorConfig::preset(Preset::Anomalyclip, &clip, "x");
        let mut a = Adapter::init(cfg, &clip, 1).unwrap();
        a.tensors.remove("text.ctx_normal");
        a.tensors.insert(
            "text.ctx_abnormal".into(),
            Tensor::zeros((3, 5), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        a.tensors.insert(
            "bogus".into(),
            Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let e = a.check(&clip).unwrap_err().to_string();
        assert!(e.contains("missing `text.ctx_normal`"), "{e}");
        assert!(e.contains("`text.ctx_abnormal` has shape [3, 5]"), "{e}");
        assert!(e.contains("unexpected tensor `bogus`"), "{e}");
    }

    /// The bytes of `a` with its `zsad.config` edited.
    fn with_config(a: &Adapter, edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
        let mut j = serde_json::to_value(&a.config).unwrap();
        edit(&mut j);
        let meta = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (CONFIG_KEY.to_string(), j.to_string()),
        ]);
        crate::data::tensors::serialize(&a.tensors, meta).unwrap()
    }

    /// Crafted metadata: each field out of range is refused by name with its valid range
    /// (image_size 10000000 and sigma 1e9 used to abort on huge allocations, sigma -1 passed).
    #[test]
    fn crafted_metadata_names_the_field_and_range() {
        use serde_json::json;
        let clip = ClipConfig::tiny();
        let zsad =
            Adapter::init(DetectorConfig::preset(Preset::Zsad, &clip, "x"), &clip, 1).unwrap();
        let acl = Adapter::init(
            DetectorConfig::preset(Preset::Anomalyclip, &clip, "x"),
            &clip,
            1,
        )
        .unwrap();
        let cases: Vec<(&Adapter, &str, serde_json::Value, &str)> = vec![
            (
                &zsad,
                "image_size",
                json!(10_000_000),
                "image_size = 10000000 is outside 8..=2048",
            ),
            (
                &zsad,
                "image_size",
                json!(0),
                "image_size = 0 is outside 8..=2048",
            ),
            (
                &zsad,
                "image_size",
                json!(36),
                "image_size = 36 is not a multiple of the 8px patch",
            ),
            (
                &zsad,
                "sigma",
                json!(1e9),
                "sigma = 1000000000 is outside [0, 64]",
            ),
            (&zsad, "sigma", json!(-1.0), "sigma = -1 is outside [0, 64]"),
            (
                &zsad,
                "logit_scale",
                json!(0.0),
                "logit_scale = 0 is outside (0, 10000]",
            ),
            (
                &zsad,
                "layers",
                json!([0, 2]),
                "layers = 0 is outside 1..=4 (the image tower has 4 layers)",
            ),
            (
                &zsad,
                "layers",
                json!([]),
                "layers (count) = 0 is outside 1..=4",
            ),
            (
                &zsad,
                "visual_prompt_depth",
                json!(99),
                "visual_prompt_depth = 99 is outside 0..=4",
            ),
            (
                &zsad,
                "visual_prompt_length",
                json!(100_000),
                "visual_prompt_length = 100000 is outside 0..=256",
            ),
            (
                &zsad,
                "text_prompt_depth",
                json!(3),
                "text_prompt_depth = 3 is outside 0..=2 (the text tower has 2 layers)",
            ),
            (
                &zsad,
                "text_prompt_length",
                json!(1_000_000),
                "text_prompt_length = 1000000 is outside 0..=75",
            ),
            (
                &zsad,
                "text",
                json!({"kind": "learned", "context_length": 1_000_000_000u64}),
                "text.context_length = 1000000000 is outside 1..=75",
            ),
            (
                &zsad,
                "image_score",
                json!({"kind": "hsf", "clusters": 0, "cls_weight": 0.8}),
                "image_score.clusters = 0 is outside 1..=1000",
            ),
            (
                &zsad,
                "image_score",
                json!({"kind": "hsf", "clusters": 1u64 << 62, "cls_weight": 0.8}),
                "image_score.clusters = 4611686018427387904 is outside 1..=1000",
            ),
            (
                &zsad,
                "image_score",
                json!({"kind": "hsf", "clusters": 20, "cls_weight": 2.0}),
                "image_score.cls_weight = 2 is outside [0, 1]",
            ),
            (
                &zsad,
                "joint",
                json!({"kind": "mean", "alpha": 1.5}),
                "joint.alpha = 1.5 is outside [0, 1]",
            ),
            (&acl, "vv_from", json!(9), "vv_from = 9 is outside 1..=4"),
        ];
        for (a, field, value, want) in cases {
            let bytes = with_config(a, |j| j[field] = value.clone());
            let loaded = Adapter::from_bytes(&bytes, "a.safetensors").unwrap();
            let e = loaded.check(&clip).unwrap_err().to_string();
            assert!(e.contains(want), "{field} = {value}: {e}");
        }
        // JSON that does not fit the field's type never gets that far.
        let bytes = with_config(&zsad, |j| j["image_size"] = json!(1e7));
        let e = Adapter::from_bytes(&bytes, "a.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("weights a.safetensors: unreadable `zsad.config` metadata: invalid type: floating point"),
            "{e}"
        );
    }

    #[test]
    fn non_finite_tensors_are_refused_by_name() {
        let clip = ClipConfig::tiny();
        let mut a =
            Adapter::init(DetectorConfig::preset(Preset::Zsad, &clip, "x"), &clip, 1).unwrap();
        for (value, what) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
            let t = &a.tensors["vision.cls_proj.bias"];
            let mut v = t.to_vec1::<f32>().unwrap();
            v[3] = value;
            a.tensors.insert(
                "vision.cls_proj.bias".into(),
                Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap(),
            );
            let e = Adapter::from_bytes(&a.to_bytes().unwrap(), "a.safetensors")
                .unwrap_err()
                .to_string();
            assert_eq!(
                e,
                "weights a.safetensors: tensor `vision.cls_proj.bias` holds 1 NaN or infinite values (a diverged training run?)",
                "{what}"
            );
        }
    }
}
