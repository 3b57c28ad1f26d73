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
mod elementwise;
mod encoder;
mod frozen_op;
pub mod gemm_bf16;
pub mod gemm_f32;
mod head;
pub mod hub;
pub mod kernels;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod linear;
pub mod matrix;
mod model;
mod numerics;
pub mod preprocess;
pub mod pth;
pub mod text;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use attention::softmax_last_dim;
pub use config::{Activation, ClipConfig, PosInterpolation, TextConfig, VisionConfig};
pub use encoder::{EncoderConfig, Hooks};
pub use hub::ModelSource;
pub use model::{load_model, plan_model, ClipModel, LoadOptions, LoadedModel, ModelPlan};
pub use numerics::wide;
pub use text::{TextOutput, TextTransformer};
pub use tokenizer::ClipTokenizer;
pub use vision::{VisionOutput, VisionTransformer};

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
