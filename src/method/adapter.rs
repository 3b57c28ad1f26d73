//! The adapter file: the few learned tensors that turn frozen CLIP into a detector, plus its
//! [`DetectorConfig`] in the safetensors metadata (key `zsad.config`), so that a file alone says
//! how to run it.
//!
//! The tensors and their names are those of [`AdapterParams`]'s tree (`params`).

use crate::choice::Choice;
use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::config::DetectorConfig;
pub use super::params::{param_specs, Init, ParamSpec};
use super::params::{AdapterParams, NamedTensors, SeededInit};
use crate::clip::ClipConfig;
use crate::{Error, Result};

/// Metadata key of the configuration JSON.
pub const CONFIG_KEY: &str = "zsad.config";
/// Metadata key of the backbone the adapter was trained (or imported) on: its identity as
/// [`backbone_identity`] gives it, JSON.
pub const BACKBONE_KEY: &str = "zsad.backbone";
/// Metadata key of the format marker.
pub const FORMAT_KEY: &str = "zsad.format";
/// `zsad-adapter/2` groups the prompts per tower; `/1` files are read as well
/// ([`DetectorConfig::from_json`]).
pub const FORMAT: &str = "zsad-adapter/2";

/// A detector configuration with its learned tensors (f32, on the CPU until used).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: DetectorConfig,
    pub tensors: HashMap<String, Tensor>,
    /// The backbone it was trained on ([`backbone_identity`]); `None` in files of older
    /// versions and for fresh parameters.
    pub backbone: Option<serde_json::Value>,
}

/// What identifies a backbone's weights, from `run.json`'s model settings: the random
/// architecture and seed, or the SHA-256 of each weight file (not where the files are, nor
/// their names).
pub fn backbone_identity(model_settings: &serde_json::Value) -> serde_json::Value {
    match model_settings.get("random") {
        Some(arch) => serde_json::json!({"random": arch, "seed": model_settings["seed"]}),
        None => serde_json::json!({
            "weights_sha256": model_settings["files"]
                .as_array()
                .map(|files| files.iter().map(|f| f["sha256"].clone()).collect::<Vec<_>>())
                .unwrap_or_default(),
        }),
    }
}

impl Adapter {
    /// Fresh, untrained tensors for `config` (seeded): what training starts from, and what
    /// `zsad detect --preset P` runs when no adapter file is given.
    pub fn init(config: DetectorConfig, clip: &ClipConfig, seed: u64) -> Result<Self> {
        config.validate(clip)?;
        let mut fresh = SeededInit::new(seed);
        AdapterParams::load(&config, clip, &mut fresh)?;
        Ok(Self {
            config,
            tensors: fresh.made,
            backbone: None,
        })
    }

    /// Checks that the tensors are exactly those the configuration needs on `clip`, with the
    /// right shapes; the error names every problem at once.
    pub fn check(&self, clip: &ClipConfig) -> Result<()> {
        self.config.validate(clip)?;
        let mut named = NamedTensors::new(&self.tensors);
        AdapterParams::load(&self.config, clip, &mut named)?;
        let problems = named.finish();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::adapter(format!(
                "adapter does not fit the {} preset on this backbone: {}",
                self.config.preset.name(),
                problems.join("; ")
            )))
        }
    }

    /// The tensors by role on `device` in `dtype`, after [`Self::check`].
    pub fn params(
        &self,
        clip: &ClipConfig,
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> Result<AdapterParams> {
        self.check(clip)?;
        AdapterParams::load(
            &self.config,
            clip,
            &mut NamedTensors::on(&self.tensors, device, dtype),
        )
    }

    /// The safetensors bytes (tensors as f32, the configuration in the metadata).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let config = serde_json::to_string(&self.config)
            .map_err(|e| Error::output(format!("cannot serialise the config: {e}")))?;
        let mut meta = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (CONFIG_KEY.to_string(), config),
        ]);
        if let Some(b) = &self.backbone {
            meta.insert(BACKBONE_KEY.to_string(), b.to_string());
        }
        crate::data::tensors::serialize(&self.tensors, meta)
    }

    /// Reads an adapter file written by [`Self::to_bytes`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::fsio::read(path, crate::fsio::FileKind::Tensors)?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// [`Self::load`] on bytes in memory; `origin` names them in errors. Refuses non-finite
    /// values, which would silently turn every score into NaN. The configuration's ranges are
    /// checked against the backbone by [`Self::check`].
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let (tensors, meta) = crate::data::tensors::parse(bytes, origin)?;
        let bad = |m: String| Error::weights(origin.to_string(), m);
        let json = meta.get(CONFIG_KEY).ok_or_else(|| {
            bad(format!(
                "not a zsad adapter (no `{CONFIG_KEY}` metadata); convert published checkpoints with `zsad import-checkpoint`"
            ))
        })?;
        let config = DetectorConfig::from_json(json)
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
        let backbone = match meta.get(BACKBONE_KEY) {
            Some(s) => Some(
                serde_json::from_str(s)
                    .map_err(|e| bad(format!("unreadable `{BACKBONE_KEY}` metadata: {e}")))?,
            ),
            None => None,
        };
        Ok(Self {
            config,
            tensors: out,
            backbone,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::config::Preset;
    use candle_core::Device;

    #[test]
    fn init_fits_and_round_trips() {
        let clip = ClipConfig::tiny();
        for &p in Preset::ALL {
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
        // AdaCLIP's released checkpoints hold 10,665,472 f32 parameters (the learnable
        // `clip_model.*` entries saved by caoyunkang/AdaCLIP@e27ee32 method/trainer.py l.89-98;
        // 42.66 MB, the published files' size), of which text static prompt 0 (5 x 768) is
        // never read by the forward.
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
                "image_size = 36 is not a multiple of the model's 8 px patch",
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
                "visual_prompts",
                json!({"depth": 99, "length": 5, "dynamic": true}),
                "visual_prompts.depth = 99 is outside 1..=4 (the image tower has 4 layers)",
            ),
            (
                &zsad,
                "visual_prompts",
                json!({"depth": 2, "length": 100_000, "dynamic": true}),
                "visual_prompts.length = 100000 is outside 1..=256",
            ),
            (
                &zsad,
                "text_prompts",
                json!({"depth": 3, "length": 4, "dynamic": true}),
                "text_prompts.depth = 3 is outside 2..=2 (the text tower has 2 layers)",
            ),
            (
                &zsad,
                "text_prompts",
                json!({"depth": 2, "length": 1_000_000, "dynamic": true}),
                "text_prompts.length = 1000000 is outside 1..=75",
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

    /// A `zsad-adapter/1` file (flat prompt fields) reads as the same configuration, and its
    /// out-of-range fields are refused as in today's layout.
    #[test]
    fn flat_prompt_fields_of_format_1_are_read() {
        use serde_json::json;
        let clip = ClipConfig::tiny();
        for &p in Preset::ALL {
            let a = Adapter::init(DetectorConfig::preset(p, &clip, "x"), &clip, 1).unwrap();
            let flat = |depth_text: usize| {
                with_config(&a, |j| {
                    let o = j.as_object_mut().unwrap();
                    let t = o.remove("text_prompts").unwrap();
                    let v = o.remove("visual_prompts").unwrap();
                    let field =
                        |p: &serde_json::Value, k: &str| p.get(k).cloned().unwrap_or(json!(0));
                    o.insert(
                        "text_prompt_depth".into(),
                        json!(depth_text.max(field(&t, "depth").as_u64().unwrap() as usize)),
                    );
                    o.insert("text_prompt_length".into(), field(&t, "length"));
                    o.insert("visual_prompt_depth".into(), field(&v, "depth"));
                    o.insert("visual_prompt_length".into(), field(&v, "length"));
                    let dynamic = [&t, &v]
                        .iter()
                        .any(|p| p.get("dynamic") == Some(&json!(true)));
                    o.insert("dynamic_prompts".into(), json!(dynamic));
                })
            };
            let b = Adapter::from_bytes(&flat(0), "old.safetensors").unwrap();
            assert_eq!(b.config, a.config, "{}", p.name());
            b.check(&clip).unwrap();
            if a.config.text_prompts.is_some() {
                let e = Adapter::from_bytes(&flat(9), "old.safetensors")
                    .unwrap()
                    .check(&clip)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("text_prompts.depth = 9 is outside 2..=2"), "{e}");
            }
        }
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
