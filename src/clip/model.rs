//! Both towers as one model (Hugging Face `CLIPModel`), and loading one: first the cheap plan
//! ([`plan_model`]: where the files are, the architecture, how the weights are named), then
//! the weights ([`ModelPlan::load`]).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{Activation, ClipConfig};
use super::encoder::Hooks;
use super::hub::{self, ModelSource};
use super::kernels;
use super::text::TextTransformer;
use super::vision::VisionTransformer;
use super::weights;
use crate::error::{Error, Result};

/// Both towers and their projections (Hugging Face `CLIPModel`).
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub vision: VisionTransformer,
    pub text: TextTransformer,
    pub config: ClipConfig,
    /// How the GEMMs multiply (set by [`Self::use_bf16`]).
    precision: kernels::Precision,
}

impl ClipModel {
    /// `--precision bf16`: both towers' blocks (and the image tower's patch embedding) keep
    /// their weights in bfloat16 and multiply bf16 operands with f32 accumulation; LayerNorm,
    /// softmax, activations, the class and position embeddings and the projections stay f32. On a GPU: its bf16 units through cuBLAS, as PyTorch's autocast
    /// ([`kernels::Precision::Bf16Autocast`]).
    ///
    /// The GEMMs run on the CPU's bf16 unit (AMX, else AVX512-BF16) where it has one; elsewhere
    /// the same rounding is emulated on the f32 kernels, at f32 speed. Returns which
    /// ([`kernels::Precision::gemm_name`] names it).
    pub fn use_bf16(&mut self) -> Result<kernels::Precision> {
        let precision = if self.vision.device().is_cpu() {
            kernels::Precision::bf16()
        } else {
            kernels::Precision::Bf16Autocast
        };
        self.vision.use_precision(precision)?;
        self.text.use_precision(precision)?;
        self.precision = precision;
        Ok(precision)
    }

    /// The GEMM path the backbone runs on, as `zsad info` and `zsad bench --json` report it:
    /// `cuda`, `amx-bf16`, `avx512-bf16`, or the f32 backend (`gemm`, `onednn`), with
    /// `+bf16-emulated` when `--precision bf16` runs on a CPU without bf16 units.
    pub fn gemm(&self) -> String {
        match (self.vision.device().is_cpu(), self.precision) {
            (true, p) => p.gemm_name(),
            (false, kernels::Precision::Bf16Autocast) => "cuda+bf16-autocast".to_string(),
            (false, _) => "cuda".to_string(),
        }
    }

    /// Builds the model from Hugging Face names under `vb` (`vision_model`, `text_model`,
    /// `visual_projection`, `text_projection`).
    pub fn load(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            vision: VisionTransformer::load(
                vb.pp("vision_model"),
                vb.pp("visual_projection"),
                &cfg.vision_config,
                cfg.projection_dim,
            )?,
            text: TextTransformer::load(
                vb.pp("text_model"),
                vb.pp("text_projection"),
                &cfg.text_config,
                cfg.projection_dim,
            )?,
            config: cfg.clone(),
            precision: kernels::Precision::F32,
        })
    }

    /// Hugging Face `get_image_features`: `[B, 3, S, S]` -> `[B, E]` (not normalised).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.vision.forward(pixels, &Hooks::default())?.pooled)
    }

    /// Hugging Face `get_text_features`: token ids -> `[N, E]` (not normalised).
    pub fn text_features(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        Ok(self.text.forward_ids(ids, &Hooks::default())?.pooled)
    }
}

/// Options for [`load_model`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Overrides the MLP activation of the checkpoint's config (AdaCLIP: exact GELU).
    pub activation: Option<Activation>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            activation: None,
        }
    }
}

/// A loaded model with what it came from.
pub struct LoadedModel {
    pub model: ClipModel,
    pub source: ModelSource,
    /// `tokenizer.json` found beside the weights, if any.
    pub tokenizer: Option<std::path::PathBuf>,
    /// How the weights were named (`None` for random weights).
    pub naming: Option<weights::Naming>,
}

/// What a model is before its weights are read: where its files are, its architecture (from
/// `config.json`, the architecture's name, or the weight files' shapes) and how its weights are
/// named. Cheap: weight files are opened (memory-mapped) but not read.
pub struct ModelPlan {
    pub source: ModelSource,
    /// The architecture, with the activation override applied.
    pub config: ClipConfig,
    /// How the weights are named (`None` for random weights).
    pub naming: Option<weights::Naming>,
    checkpoint: Option<weights::Checkpoint>,
}

/// Resolves `spec` (see [`hub::resolve`]) to a [`ModelPlan`].
pub fn plan_model(spec: &str, activation: Option<Activation>) -> Result<ModelPlan> {
    let source = hub::resolve(spec)?;
    let (config, checkpoint) = match &source {
        ModelSource::Random { arch, .. } => (
            ClipConfig::by_name(arch).expect("resolve checked the name"),
            None,
        ),
        ModelSource::Files {
            config, weights, ..
        } => {
            let ckpt = weights::Checkpoint::open(weights)?;
            let cfg = match config {
                Some(path) => {
                    let text = crate::fsio::read_text(path, crate::fsio::FileKind::ModelConfig)?;
                    ClipConfig::from_hf_json(&text)
                        .map_err(|e| Error::model(format!("{}: {e}", path.display())))?
                }
                None => ckpt.infer_config()?,
            };
            (cfg, Some(ckpt))
        }
    };
    let config = match activation {
        Some(a) => config.with_activation(a),
        None => config,
    };
    config.validate()?;
    Ok(ModelPlan {
        naming: checkpoint.as_ref().map(|c| c.naming()),
        source,
        config,
        checkpoint,
    })
}

impl ModelPlan {
    /// `tokenizer.json` beside the weights, if any.
    pub fn tokenizer(&self) -> Option<&std::path::Path> {
        match &self.source {
            ModelSource::Files { tokenizer, .. } => tokenizer.as_deref(),
            ModelSource::Random { .. } => None,
        }
    }

    /// Reads the weights (or makes the random ones) in `dtype` on `device`.
    pub fn load(self, dtype: DType, device: &Device) -> Result<LoadedModel> {
        let ModelPlan {
            source,
            config,
            naming,
            checkpoint,
        } = self;
        let model = match (&source, checkpoint) {
            (ModelSource::Random { seed, .. }, _) => {
                let vb = VarBuilder::from_backend(
                    Box::new(weights::RandomWeights { seed: *seed }),
                    dtype,
                    device.clone(),
                );
                ClipModel::load(vb, &config)?
            }
            (ModelSource::Files { weights: files, .. }, Some(ckpt)) => {
                let origin = files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                ClipModel::load(ckpt.var_builder(dtype, device), &config)
                    .map_err(|e| Error::weights(origin, e.to_string()))?
            }
            (ModelSource::Files { .. }, None) => unreachable!("planned with its checkpoint"),
        };
        let tokenizer = match &source {
            ModelSource::Files { tokenizer, .. } => tokenizer.clone(),
            ModelSource::Random { .. } => None,
        };
        Ok(LoadedModel {
            model,
            source,
            tokenizer,
            naming,
        })
    }
}

/// Resolves `spec` (see [`hub::resolve`]) and loads the model.
pub fn load_model(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    plan_model(spec, opts.activation)?.load(opts.dtype, &opts.device)
}
