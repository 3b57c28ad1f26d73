//! Weight files: Hugging Face `CLIPModel` safetensors, OpenAI / open_clip state dicts (packed
//! `in_proj_weight`, `ln_pre`, `proj` stored as `[width, embed]`), `.bin`/`.pth` pickles, and
//! deterministic random weights of any architecture.
//!
//! The model code asks for Hugging Face names only. Other namings are translated in one table
//! ([`openai_name`]), so each weight name is written once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::config::{ClipConfig, TextConfig, VisionConfig};
use crate::{Error, Result};

/// The key layout of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// `vision_model.embeddings.patch_embedding.weight`, ...
    HuggingFace,
    /// `visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`, ...
    OpenAi,
}

/// Raw tensors of one or more files.
enum Raw {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Pickle(super::pth::PthFile),
}

impl Raw {
    fn open(files: &[PathBuf]) -> Result<Self> {
        let first = files
            .first()
            .ok_or_else(|| Error::model("no weight file given"))?;
        let is_pickle = files.len() == 1
            && matches!(
                first.extension().and_then(|e| e.to_str()),
                Some("bin" | "pt" | "pth" | "ckpt")
            );
        if is_pickle {
            let pth = super::pth::PthFile::open(first, None).map_err(|mut err| {
                if let Error::Model(crate::error::ModelError::Weights { problem, .. }) = &mut err {
                    problem.push_str(
                        " (TorchScript archives such as OpenAI's ViT-*.pt cannot be read: use the \
                         Hugging Face safetensors of the same model)",
                    );
                }
                err
            })?;
            Ok(Raw::Pickle(pth))
        } else {
            // Only regular files, within the bound of weights, are mapped.
            for f in files {
                crate::fsio::check_regular(f, crate::fsio::FileKind::Weights)?;
            }
            // SAFETY: the file is mapped read-only; like every mmap user we assume it is not
            // truncated while the model loads.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }.map_err(
                |e| Error::weights(first.display().to_string(), format!("cannot read: {e}")),
            )?;
            Ok(Raw::Safetensors(st))
        }
    }

    fn names(&self) -> Vec<String> {
        match self {
            Raw::Safetensors(s) => s.tensors().into_iter().map(|(n, _)| n).collect(),
            Raw::Pickle(p) => p.names().to_vec(),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            Raw::Safetensors(s) => s.get(name).ok().map(|v| v.shape().to_vec()),
            Raw::Pickle(p) => p.shape(name).map(<[usize]>::to_vec),
        }
    }

    /// The tensor, or why it cannot be read (naming it, not the file).
    fn load(&self, name: &str, dev: &Device) -> std::result::Result<Tensor, String> {
        match self {
            Raw::Safetensors(s) => s
                .load(name, dev)
                .map_err(|e| format!("tensor `{name}`: {e}")),
            Raw::Pickle(p) => match p.load(name) {
                Ok(t) => t.to_device(dev).map_err(|e| e.to_string()),
                Err(Error::Model(crate::error::ModelError::Weights { problem, .. })) => {
                    Err(problem)
                }
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// How a Hugging Face tensor is derived from a foreign one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Derive {
    Same,
    /// Transposed 2-D (OpenAI stores `x @ proj`, HF stores a Linear weight).
    Transpose,
    /// Rows `[k*D, (k+1)*D)` of a packed `in_proj` tensor (k = 0 q, 1 k, 2 v).
    Chunk(usize),
}

/// Hugging Face name -> (OpenAI/open_clip name, derivation). The one place foreign names live.
pub fn openai_name(hf: &str) -> Option<(String, Derive)> {
    use Derive::*;
    let fixed = [
        (
            "vision_model.embeddings.patch_embedding.weight",
            "visual.conv1.weight",
            Same,
        ),
        (
            "vision_model.embeddings.class_embedding",
            "visual.class_embedding",
            Same,
        ),
        (
            "vision_model.embeddings.position_embedding.weight",
            "visual.positional_embedding",
            Same,
        ),
        (
            "vision_model.pre_layrnorm.weight",
            "visual.ln_pre.weight",
            Same,
        ),
        ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias", Same),
        (
            "vision_model.post_layernorm.weight",
            "visual.ln_post.weight",
            Same,
        ),
        (
            "vision_model.post_layernorm.bias",
            "visual.ln_post.bias",
            Same,
        ),
        ("visual_projection.weight", "visual.proj", Transpose),
        (
            "text_model.embeddings.token_embedding.weight",
            "token_embedding.weight",
            Same,
        ),
        (
            "text_model.embeddings.position_embedding.weight",
            "positional_embedding",
            Same,
        ),
        (
            "text_model.final_layer_norm.weight",
            "ln_final.weight",
            Same,
        ),
        ("text_model.final_layer_norm.bias", "ln_final.bias", Same),
        ("text_projection.weight", "text_projection", Transpose),
    ];
    if let Some((_, o, d)) = fixed.iter().find(|(h, _, _)| *h == hf) {
        return Some((o.to_string(), *d));
    }
    let (tower, rest) = if let Some(r) = hf.strip_prefix("vision_model.encoder.layers.") {
        ("visual.transformer.resblocks.", r)
    } else if let Some(r) = hf.strip_prefix("text_model.encoder.layers.") {
        ("transformer.resblocks.", r)
    } else {
        return None;
    };
    let (layer, param) = rest.split_once('.')?;
    let (name, derive) = match param {
        "layer_norm1.weight" => ("ln_1.weight".to_string(), Same),
        "layer_norm1.bias" => ("ln_1.bias".into(), Same),
        "layer_norm2.weight" => ("ln_2.weight".into(), Same),
        "layer_norm2.bias" => ("ln_2.bias".into(), Same),
        "mlp.fc1.weight" => ("mlp.c_fc.weight".into(), Same),
        "mlp.fc1.bias" => ("mlp.c_fc.bias".into(), Same),
        "mlp.fc2.weight" => ("mlp.c_proj.weight".into(), Same),
        "mlp.fc2.bias" => ("mlp.c_proj.bias".into(), Same),
        "self_attn.out_proj.weight" => ("attn.out_proj.weight".into(), Same),
        "self_attn.out_proj.bias" => ("attn.out_proj.bias".into(), Same),
        p => {
            let (proj, kind) = p.strip_prefix("self_attn.")?.split_once('.')?;
            let k = match proj {
                "q_proj" => 0,
                "k_proj" => 1,
                "v_proj" => 2,
                _ => return None,
            };
            (format!("attn.in_proj_{kind}"), Chunk(k))
        }
    };
    Some((format!("{tower}{layer}.{name}"), derive))
}

/// A checkpoint opened for reading under Hugging Face names.
pub struct Checkpoint {
    raw: Raw,
    naming: Naming,
    /// Prefix found in front of every key (`module.`, `model.`), stripped on lookup.
    prefix: String,
    origin: String,
}

impl Checkpoint {
    /// Opens one or more weight files (several = a sharded safetensors checkpoint).
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let raw = Raw::open(files)?;
        let origin = files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let names: HashSet<String> = raw.names().into_iter().collect();
        let probes = [
            (
                "vision_model.embeddings.patch_embedding.weight",
                Naming::HuggingFace,
            ),
            ("visual.conv1.weight", Naming::OpenAi),
        ];
        for (probe, naming) in probes {
            for prefix in ["", "module.", "model.", "clip.", "clip_model."] {
                if names.contains(&format!("{prefix}{probe}")) {
                    return Ok(Self {
                        raw,
                        naming,
                        prefix: prefix.into(),
                        origin,
                    });
                }
            }
        }
        Err(Error::weights(
            origin,
            "no CLIP vision tower found: expected `vision_model.embeddings.patch_embedding.weight` \
             (Hugging Face) or `visual.conv1.weight` (OpenAI/open_clip)",
        ))
    }

    pub fn naming(&self) -> Naming {
        self.naming
    }

    fn shape_of(&self, foreign: &str) -> Option<Vec<usize>> {
        self.raw.shape(&format!("{}{foreign}", self.prefix))
    }

    /// Infers the architecture from tensor shapes (OpenAI/open_clip files carry no config):
    /// widths, depths, patch size and trained input size; heads = width / 64 as in every CLIP
    /// ViT. The activation is QuickGELU, OpenAI's; override it for GELU-trained weights.
    pub fn infer_config(&self) -> Result<ClipConfig> {
        let err = |m: &str| Error::weights(self.origin.clone(), m.to_string());
        let (conv, pos, vproj, tok, tpos, tproj, vlayer, tlayer) = match self.naming {
            Naming::HuggingFace => (
                "vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.position_embedding.weight",
                "visual_projection.weight",
                "text_model.embeddings.token_embedding.weight",
                "text_model.embeddings.position_embedding.weight",
                "text_projection.weight",
                "vision_model.encoder.layers.",
                "text_model.encoder.layers.",
            ),
            Naming::OpenAi => (
                "visual.conv1.weight",
                "visual.positional_embedding",
                "visual.proj",
                "token_embedding.weight",
                "positional_embedding",
                "text_projection",
                "visual.transformer.resblocks.",
                "transformer.resblocks.",
            ),
        };
        let need = |name: &str| {
            self.shape_of(name)
                .ok_or_else(|| err(&format!("tensor `{}{name}` is missing", self.prefix)))
        };
        let (conv, pos, vproj) = (need(conv)?, need(pos)?, need(vproj)?);
        let (tok, tpos) = (need(tok)?, need(tpos)?);
        // Only its presence matters: the embedding width comes from the visual projection.
        need(tproj)?;
        for (name, shape, rank) in [
            ("patch embedding", &conv, 4),
            ("position embedding", &pos, 2),
            ("visual projection", &vproj, 2),
            ("token embedding", &tok, 2),
            ("text position embedding", &tpos, 2),
        ] {
            if shape.len() != rank {
                return Err(err(&format!(
                    "the {name} has shape {shape:?}, a CLIP ViT's has {rank} dimensions"
                )));
            }
        }
        if conv[2] != conv[3] {
            return Err(err(&format!(
                "the patch embedding has shape {conv:?}: patches must be square"
            )));
        }
        let count_layers = |prefix: &str| {
            let full = format!("{}{prefix}", self.prefix);
            self.raw
                .names()
                .iter()
                .filter_map(|n| {
                    n.strip_prefix(&full)?
                        .split('.')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .max()
                .map_or(0, |m: usize| m.saturating_add(1))
        };
        let width = conv[0];
        let patch = conv[2];
        let grid = (pos[0].saturating_sub(1) as f64).sqrt().round() as usize;
        if pos[0] == 0 || grid.checked_mul(grid).map(|g| g + 1) != Some(pos[0]) {
            return Err(err(&format!(
                "the position embedding has {} rows, not 1 + a square grid of patches",
                pos[0]
            )));
        }
        let embed = match self.naming {
            Naming::HuggingFace => vproj[0],
            Naming::OpenAi => vproj[1],
        };
        let text_width = tok[1];
        let cfg = ClipConfig {
            vision_config: VisionConfig {
                hidden_size: width,
                intermediate_size: 4 * width,
                num_hidden_layers: count_layers(vlayer),
                num_attention_heads: (width / 64).max(1),
                image_size: grid.saturating_mul(patch),
                patch_size: patch,
                num_channels: conv[1],
                layer_norm_eps: 1e-5,
                hidden_act: "quick_gelu".into(),
            },
            text_config: TextConfig {
                vocab_size: tok[0],
                hidden_size: text_width,
                intermediate_size: 4 * text_width,
                num_hidden_layers: count_layers(tlayer),
                num_attention_heads: (text_width / 64).max(1),
                max_position_embeddings: tpos[0],
                layer_norm_eps: 1e-5,
                hidden_act: "quick_gelu".into(),
                eos_token_id: 2,
            },
            projection_dim: embed,
        };
        // MLP widths are read, not assumed.
        let mut cfg = cfg;
        let fc1 = |tower: &str| match self.naming {
            Naming::HuggingFace => format!("{tower}0.mlp.fc1.weight"),
            Naming::OpenAi => format!("{tower}0.mlp.c_fc.weight"),
        };
        if let Some(&rows) = self
            .shape_of(&fc1(vlayer))
            .as_deref()
            .and_then(<[_]>::first)
        {
            cfg.vision_config.intermediate_size = rows;
        }
        if let Some(&rows) = self
            .shape_of(&fc1(tlayer))
            .as_deref()
            .and_then(<[_]>::first)
        {
            cfg.text_config.intermediate_size = rows;
        }
        cfg.validate().map_err(|e| {
            err(&format!(
                "the shapes describe no usable CLIP ViT (inferred, as the files carry no config.json): {e}"
            ))
        })?;
        Ok(cfg)
    }

    /// A `VarBuilder` that serves Hugging Face names from this checkpoint, converted to `dtype`.
    pub fn var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, dev.clone())
    }

    fn fetch(&self, hf: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let (name, derive) = match self.naming {
            Naming::HuggingFace => (hf.to_string(), Derive::Same),
            Naming::OpenAi => openai_name(hf).ok_or_else(|| {
                candle_core::Error::Msg(format!("no OpenAI/open_clip name is known for `{hf}`"))
            })?,
        };
        let full = format!("{}{name}", self.prefix);
        let msg = |m: String| candle_core::Error::Msg(format!("{}: {m}", self.origin));
        let Some(shape) = self.raw.shape(&full) else {
            return Err(msg(format!("tensor `{full}` is missing")));
        };
        // Malformed checkpoints: the derivations below need these ranks.
        let rank_ok = match derive {
            Derive::Same => true,
            Derive::Transpose => shape.len() == 2,
            Derive::Chunk(_) => !shape.is_empty() && shape[0] % 3 == 0,
        };
        if !rank_ok {
            return Err(msg(format!(
                "tensor `{full}` has shape {shape:?}, expected {}",
                match derive {
                    Derive::Transpose => "2 dimensions",
                    _ => "a first dimension divisible by 3 (packed q, k, v)",
                }
            )));
        }
        let t = self.raw.load(&full, dev).map_err(msg)?;
        match derive {
            Derive::Same => Ok(t),
            Derive::Transpose => t.t()?.contiguous(),
            Derive::Chunk(k) => {
                let rows = t.dim(0)? / 3;
                t.narrow(0, k * rows, rows)?.contiguous()
            }
        }
    }
}

impl SimpleBackend for Checkpoint {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.fetch(name, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has shape {:?}, the model expects {:?}",
                self.origin,
                t.dims(),
                s.dims()
            )));
        }
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let foreign = match self.naming {
            Naming::HuggingFace => Some(name.to_string()),
            Naming::OpenAi => openai_name(name).map(|(n, _)| n),
        };
        foreign.is_some_and(|n| self.shape_of(&n).is_some())
    }
}

/// Deterministic random weights (for benchmarks and tests without downloads): LayerNorm weights
/// 1, biases 0, everything else N(0, 0.02²) from a generator seeded by `seed` and the tensor name,
/// so a tensor does not depend on the order in which the model asks for it.
pub struct RandomWeights {
    pub seed: u64,
}

impl RandomWeights {
    fn values(&self, name: &str, n: usize) -> Vec<f32> {
        let is_norm = ["layer_norm", "layrnorm", "layernorm"]
            .iter()
            .any(|k| name.contains(k));
        if name.ends_with(".bias") {
            return vec![0.0; n];
        }
        if is_norm {
            return vec![1.0; n];
        }
        crate::rng::SplitMix64::keyed(self.seed, name).normal(n, 0.02)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.values(name, s.elem_count()), s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Whether `path` looks like a weight file we can read.
pub fn is_weight_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("safetensors" | "bin" | "pt" | "pth")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn openai_names_cover_a_block() {
        let cases = [
            (
                "vision_model.encoder.layers.3.self_attn.q_proj.weight",
                "visual.transformer.resblocks.3.attn.in_proj_weight",
                Derive::Chunk(0),
            ),
            (
                "vision_model.encoder.layers.3.self_attn.k_proj.bias",
                "visual.transformer.resblocks.3.attn.in_proj_bias",
                Derive::Chunk(1),
            ),
            (
                "text_model.encoder.layers.11.self_attn.v_proj.weight",
                "transformer.resblocks.11.attn.in_proj_weight",
                Derive::Chunk(2),
            ),
            (
                "text_model.encoder.layers.0.mlp.fc2.bias",
                "transformer.resblocks.0.mlp.c_proj.bias",
                Derive::Same,
            ),
            ("visual_projection.weight", "visual.proj", Derive::Transpose),
        ];
        for (hf, oa, d) in cases {
            assert_eq!(openai_name(hf), Some((oa.to_string(), d)), "{hf}");
        }
        assert_eq!(openai_name("logit_scale"), None);
    }

    #[test]
    fn random_weights_are_deterministic_and_name_dependent() {
        let r = RandomWeights { seed: 7 };
        assert_eq!(r.values("a.weight", 10), r.values("a.weight", 10));
        assert_ne!(r.values("a.weight", 10), r.values("b.weight", 10));
        assert_eq!(r.values("x.layer_norm1.weight", 3), vec![1.0; 3]);
        let v = r.values("big.weight", 100_000);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
            "{mean} {std}"
        );
    }

    /// The OpenAI-named tiny fixture with `edit` applied, saved to a fresh folder; the result of
    /// loading it (the architecture is inferred from the shapes).
    fn load_edited(name: &str, edit: impl Fn(&mut HashMap<String, Tensor>)) -> Result<()> {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/tiny-vitb-openai/open_clip_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&fixture, &Device::Cpu).unwrap();
        edit(&mut tensors);
        let dir = std::env::temp_dir().join(format!("zsad-weights-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("open_clip_model.safetensors");
        candle_core::safetensors::save(&tensors, &file).unwrap();
        super::super::load_model(file.to_str().unwrap(), &Default::default()).map(|_| ())
    }

    /// Malformed checkpoints: each is an error naming the tensor and what is wrong with it,
    /// never an index out of bounds or an underflow.
    #[test]
    fn malformed_checkpoints_name_the_tensor() {
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let cases: Vec<(&str, &str, Vec<usize>, &str)> = vec![
            ("rank", "visual.conv1.weight", vec![128, 3, 16], "the patch embedding has shape [128, 3, 16], a CLIP ViT's has 4 dimensions"),
            ("square", "visual.conv1.weight", vec![128, 3, 16, 8], "patches must be square"),
            ("grid", "visual.positional_embedding", vec![198, 128], "the position embedding has 198 rows, not 1 + a square grid of patches"),
            ("empty-grid", "visual.positional_embedding", vec![0, 128], "the position embedding has 0 rows"),
            ("packed", "visual.transformer.resblocks.0.attn.in_proj_weight", vec![383, 128], "tensor `visual.transformer.resblocks.0.attn.in_proj_weight` has shape [383, 128], expected a first dimension divisible by 3 (packed q, k, v)"),
            ("transposed", "text_projection", vec![64], "tensor `text_projection` has shape [64], expected 2 dimensions"),
            ("mlp-rank-0", "visual.transformer.resblocks.0.mlp.c_fc.weight", vec![], "tensor `vision_model.encoder.layers.0.mlp.fc1.weight` has shape [], the model expects [512, 128]"),
            ("heads", "visual.conv1.weight", vec![0, 3, 16, 16], "vision_config.hidden_size = 0 is outside 1..=16384"),
        ];
        for (name, tensor, shape, want) in cases {
            let e = load_edited(name, |t| {
                t.insert(tensor.to_string(), zeros(&shape));
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("open_clip_model.safetensors") && e.contains(want),
                "{name}: {e}"
            );
        }
        let e = load_edited("missing", |t| {
            t.remove("text_projection");
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("tensor `text_projection` is missing"), "{e}");
    }
}
