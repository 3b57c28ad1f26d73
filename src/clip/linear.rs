//! The linear layer of both towers, in its three roles behind one interface
//! ([`Module::forward`], and [`Linear::forward_with`] for a fused activation):
//!
//! - inference on the CPU in f32: the fused GEMM kernels of [`super::kernels`], with the weight
//!   kept as `--precision` asks (f32, rounded to bf16, or packed for a bf16 unit);
//! - training through the frozen backbone: candle's matmul backward always computes and keeps
//!   the gradient of both operands (`candle-core` `backprop.rs`, `Op::Matmul`), so a frozen
//!   backbone would also get, and hold until the end of the backward pass, a gradient for every
//!   weight: a third of the backward FLOPs and the model's size again in memory. When a
//!   learnable tensor is upstream (`track_op`) on the CPU the product runs as a custom op whose
//!   backward returns the input gradient only (tested below and in `tests/gradients.rs`);
//! - anything else (other devices and dtypes): candle's plain `broadcast_matmul`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;

use super::kernels::{self, Kernel, PackedB, Precision, Weight};
use crate::Result;

/// `x Wᵀ + b` with `W` `[out, in]` never receiving a gradient.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Stored,
    bias: Option<Tensor>,
}

/// How the weight is kept, by `--precision`.
#[derive(Debug, Clone)]
enum Stored {
    F32(Tensor),
    /// bf16 emulated: f32 values rounded to bf16 once at load.
    RoundedF32(Tensor),
    /// bf16 on a bf16 unit: packed once at load into the kernel's layout (half the memory).
    Packed(Arc<PackedB>, Kernel),
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Stored::F32(weight),
            bias,
        }
    }

    /// Loads `weight` `[d_out, d_in]` and, with `bias`, `bias` `[d_out]` under `vb`.
    pub fn load(vb: VarBuilder, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let w = vb.get((d_out, d_in), "weight")?;
        let b = if bias {
            Some(vb.get(d_out, "bias")?)
        } else {
            None
        };
        Ok(Self::new(w, b))
    }

    /// The f32 weight `[out, in]` as loaded (before [`Self::use_precision`]).
    #[cfg(test)]
    pub fn weight(&self) -> candle_core::Result<&Tensor> {
        match &self.weight {
            Stored::F32(w) | Stored::RoundedF32(w) => Ok(w),
            Stored::Packed(..) => candle_core::bail!("the weight is packed for the bf16 kernel"),
        }
    }

    /// Converts the weight for `precision` (`--precision bf16`: packed for the CPU's bf16 unit,
    /// or rounded to bf16 values once for the emulation).
    pub fn use_precision(&mut self, precision: Precision) -> candle_core::Result<()> {
        let Stored::F32(w) = &self.weight else {
            candle_core::bail!("the weight was already converted");
        };
        self.weight = match precision {
            Precision::F32 => return Ok(()),
            Precision::Bf16Emulated => Stored::RoundedF32(kernels::round_bf16(w)?),
            Precision::Bf16(kernel) => {
                let (n, k) = w.dims2()?;
                let w = w
                    .to_dtype(DType::BF16)?
                    .flatten_all()?
                    .to_vec1::<half::bf16>()?;
                Stored::Packed(Arc::new(PackedB::from_weight(&w, n, k)), kernel)
            }
        };
        Ok(())
    }

    #[cfg(test)]
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight as the fused kernels take it.
    fn kernel_weight(&self) -> Weight<'_> {
        match &self.weight {
            Stored::F32(w) => Weight::F32(w),
            Stored::RoundedF32(w) => Weight::RoundedF32(w),
            Stored::Packed(p, k) => Weight::Packed(p, *k),
        }
    }

    /// An f32 weight tensor for the plain ops (training, other devices): a packed weight is
    /// unpacked and widened per call.
    fn weight_f32(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match &self.weight {
            Stored::F32(w) | Stored::RoundedF32(w) => w.to_dtype(dtype),
            Stored::Packed(p, _) => {
                Tensor::from_vec(p.to_weight(), (p.n(), p.k()), &candle_core::Device::Cpu)?
                    .to_dtype(dtype)
            }
        }
    }
}

/// `x Wᵀ` as an op of `x` alone.
struct MatmulFrozen {
    weight: Tensor,
}

impl CustomOp1 for MatmulFrozen {
    fn name(&self) -> &'static str {
        "matmul-frozen"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = match storage {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("matmul-frozen: f32 only"),
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("matmul-frozen: input must be contiguous");
        };
        let x = Tensor::from_slice(&data[start..end], layout.shape(), &candle_core::Device::Cpu)?;
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.broadcast_matmul(&self.weight)?))
    }
}

impl Linear {
    /// `act(x Wᵀ + b)` on the fused CPU kernel: for callers that checked
    /// [`kernels::applies`] (it has no backward).
    pub fn forward_with(
        &self,
        x: &Tensor,
        epilogue: kernels::Epilogue,
    ) -> candle_core::Result<Tensor> {
        kernels::linear(x, self.kernel_weight(), self.bias.as_ref(), epilogue)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if kernels::applies(x) {
            return self.forward_with(x, kernels::Epilogue::None);
        }
        // Outside the fast path (training, other devices) a bf16 weight is widened per call.
        let weight = self.weight_f32(x.dtype())?;
        let y = if x.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 {
            x.contiguous()?.apply_op1(MatmulFrozen { weight })?
        } else {
            x.broadcast_matmul(&weight.t()?)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn same_values_and_input_gradient_no_weight_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0, 3.0], [0.5, -1.0, 0.0]], &dev).unwrap();
        let b = Tensor::new(&[0.1f32, 0.2], &dev).unwrap();
        let l = Linear::new(w.clone(), Some(b.clone()));
        let x = Var::new(&[[[1f32, 0.0, -1.0], [2.0, 1.0, 0.5]]], &dev).unwrap();
        let y = l.forward(x.as_tensor()).unwrap();
        let plain = candle_nn::Linear::new(w.clone(), Some(b))
            .forward(x.as_tensor())
            .unwrap();
        assert_eq!(y.to_vec3::<f32>().unwrap(), plain.to_vec3::<f32>().unwrap());
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let plain_grads = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            grads.get(x.as_tensor()).unwrap().to_vec3::<f32>().unwrap(),
            plain_grads
                .get(x.as_tensor())
                .unwrap()
                .to_vec3::<f32>()
                .unwrap()
        );
        // candle's Linear keeps gradients for x, the product, the weight's transposed view and
        // the bias; ours none for the weight.
        assert!(grads.get(&w).is_none());
        assert_eq!(plain_grads.get_ids().count(), grads.get_ids().count() + 1);
    }
}
