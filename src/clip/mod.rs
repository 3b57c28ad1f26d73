//! CLIP ViT backbone on candle: both towers, weight loading for every common naming, the
//! tokenizer and the preprocessing, with the hooks that the anomaly methods need
//! (taps, per-head weights, deep prompts, V-V attention).
//!
//! Layers, bottom up: [`kernels`] (fused CPU GEMM and attention, no autograd) and
//! [`gemm_bf16`] under `linear` (one linear layer: fused inference, frozen for training, plain)
//! and `attention` (one attention layer: fused, recompute-in-backward, plain; the two
//! hand-written backwards share `frozen_op`), composed by
//! `encoder` (block and stack with the hooks) into the two towers, [`vision`] and [`text`].
//! Weights come from [`weights`] (safetensors, `.pth` via [`pth`], every common naming) and
//! [`hub`]; [`config`] reads Hugging Face `config.json`.

mod attention;
pub mod config;
mod encoder;
mod frozen_op;
pub mod gemm_bf16;
pub mod hub;
pub mod kernels;
mod linear;
pub mod preprocess;
pub mod pth;
pub mod text;
pub mod tokenizer;
pub mod vision;
pub mod weights;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use attention::softmax_last_dim;
pub use config::{Activation, ClipConfig, PosInterpolation, TextConfig, VisionConfig};
pub use encoder::{EncoderConfig, Hooks};
pub use hub::ModelSource;
pub use text::{TextOutput, TextTransformer};
pub use tokenizer::ClipTokenizer;
pub use vision::{VisionOutput, VisionTransformer};

use crate::{Error, Result};

/// The type PyTorch's autocast computes exponentials, softmax, norms and losses in: f32 at least
/// (f64 stays f64). Half types keep 5 (f16) or 8 (bf16) bits of exponent or mantissa too few for
/// them: `e^x` leaves f16's range above x = 11.09, a sum of squares above 65504.
pub fn wide(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

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
    /// `--precision bf16`: both towers' blocks keep their weights in bfloat16 and multiply bf16
    /// operands with f32 accumulation; LayerNorm, softmax, activations, embeddings and
    /// projections stay f32. On a GPU: its bf16 units through cuBLAS, as PyTorch's autocast
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

/// Resolves `spec` (see [`hub::resolve`]) and loads the model.
pub fn load_model(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let source = hub::resolve(spec)?;
    match &source {
        ModelSource::Random { arch, seed } => {
            let mut cfg = ClipConfig::by_name(arch).expect("resolve checked the name");
            if let Some(a) = opts.activation {
                cfg = cfg.with_activation(a);
            }
            let vb = VarBuilder::from_backend(
                Box::new(weights::RandomWeights { seed: *seed }),
                opts.dtype,
                opts.device.clone(),
            );
            let model = ClipModel::load(vb, &cfg)?;
            Ok(LoadedModel {
                model,
                source,
                tokenizer: None,
                naming: None,
            })
        }
        ModelSource::Files {
            config,
            weights: files,
            tokenizer,
        } => {
            let ckpt = weights::Checkpoint::open(files)?;
            let naming = ckpt.naming();
            let mut cfg = match config {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                    ClipConfig::from_hf_json(&text)
                        .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?
                }
                None => ckpt.infer_config()?,
            };
            if let Some(a) = opts.activation {
                cfg = cfg.with_activation(a);
            }
            let origin = files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let model =
                ClipModel::load(ckpt.var_builder(opts.dtype, &opts.device), &cfg).map_err(|e| {
                    Error::Weights {
                        file: origin,
                        message: e.to_string(),
                    }
                })?;
            Ok(LoadedModel {
                model,
                source: source.clone(),
                tokenizer: tokenizer.clone(),
                naming: Some(naming),
            })
        }
    }
}

/// Small deterministic tensors and random weights for the layer tests.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::weights::RandomWeights;

    pub fn vb(seed: u64) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(RandomWeights { seed }), DType::F32, Device::Cpu)
    }

    /// Values in [-1, 1) from a multiplicative hash of the index.
    pub fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest absolute difference, in f64 on the CPU (any device, any float dtype).
    pub fn diff(a: &Tensor, b: &Tensor) -> f32 {
        let wide = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let d = (wide(a) - wide(b)).unwrap().abs().unwrap();
        d.max_all().unwrap().to_scalar::<f64>().unwrap() as f32
    }

    pub fn to2(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }
}
