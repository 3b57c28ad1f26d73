//! A linear layer for frozen weights. candle's matmul backward always computes and keeps the
//! gradient of both operands (CANDLE-NOTES), so training through a frozen backbone would also
//! compute, and hold until the end of the backward pass, a gradient for every backbone weight:
//! a third of the backward FLOPs and the model's size again in memory. When a learnable tensor
//! is upstream (`track_op`) on the CPU, the product runs as a custom op whose backward returns
//! the input gradient only.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};

/// `x Wᵀ + b` with `W` `[out, in]` never receiving a gradient.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
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

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = if x.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 {
            x.contiguous()?.apply_op1(MatmulFrozen {
                weight: self.weight.clone(),
            })?
        } else {
            x.broadcast_matmul(&self.weight.t()?)?
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
        let l = FrozenLinear::new(w.clone(), Some(b.clone()));
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
