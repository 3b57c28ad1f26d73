//! Memory-light training through the frozen backbone: a linear layer for frozen weights and an
//! attention op that recomputes its probabilities in the backward pass.
//!
//! The linear layer: candle's matmul backward always computes and keeps the
//! gradient of both operands (CANDLE-NOTES), so training through a frozen backbone would also
//! compute, and hold until the end of the backward pass, a gradient for every backbone weight:
//! a third of the backward FLOPs and the model's size again in memory. When a learnable tensor
//! is upstream (`track_op`) on the CPU, the product runs as a custom op whose backward returns
//! the input gradient only.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};

use super::kernels::{Kernel, PackedB, Precision, Weight};

/// `x Wᵀ + b` with `W` `[out, in]` never receiving a gradient.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
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

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Stored::F32(weight),
            bias,
        }
    }

    /// The f32 weight `[out, in]` as loaded (before [`Self::use_precision`]).
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
            Precision::Bf16Emulated => Stored::RoundedF32(super::kernels::round_bf16(w)?),
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

impl FrozenLinear {
    /// `act(x Wᵀ + b)` on the fused CPU kernel: for callers that checked
    /// [`super::kernels::applies`] (it has no backward).
    pub fn forward_with(
        &self,
        x: &Tensor,
        epilogue: super::kernels::Epilogue,
    ) -> candle_core::Result<Tensor> {
        super::kernels::linear(x, self.kernel_weight(), self.bias.as_ref(), epilogue)
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if super::kernels::applies(x) {
            return self.forward_with(x, super::kernels::Epilogue::None);
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

/// `softmax(q kᵀ · scale + mask) v` as one op whose backward recomputes the attention
/// probabilities instead of keeping them: training through a ViT-L at 518 px (1375 tokens, 16
/// heads) would otherwise hold about six 121 MB score-sized tensors per layer.
struct Attention {
    scale: f64,
    mask: Option<Tensor>,
}

fn to_tensor(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("attention: inputs must be contiguous");
    };
    let dev = candle_core::Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], l.shape(), &dev),
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], l.shape(), &dev),
        _ => candle_core::bail!("attention: f32 or f64 only"),
    }
}

fn to_storage(t: &Tensor) -> candle_core::Result<CpuStorage> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F64 => CpuStorage::F64(t.to_vec1::<f64>()?),
        _ => CpuStorage::F32(t.to_vec1::<f32>()?),
    })
}

impl Attention {
    /// The attention probabilities `[B, H, Lq, Lk]`.
    fn probs(&self, q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
        let s = (q * self.scale)?.matmul(&k.t()?)?;
        let s = match &self.mask {
            Some(m) => s.broadcast_add(&m.to_dtype(s.dtype())?)?,
            None => s,
        };
        candle_nn::ops::softmax_last_dim(&s.contiguous()?)
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention-recompute"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (to_tensor(s1, l1)?, to_tensor(s2, l2)?, to_tensor(s3, l3)?);
        let o = self.probs(&q, &k)?.matmul(&v)?;
        Ok((to_storage(&o)?, o.shape().clone()))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, g) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let p = self.probs(&q, &k)?;
        let dv = p.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?;
        // softmax backward: dS = P ⊙ (dP − Σ_j dP ⊙ P)
        let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(candle_core::D::Minus1)?)?)?;
        let dq = (ds.matmul(&k)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `softmax(q kᵀ · scale + mask) v` for `[B, H, L, d]` inputs: the plain ops for inference, the
/// recomputing op when a learnable tensor is upstream (CPU, f32/f64).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if tracked && q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64) {
        let op = Attention {
            scale,
            mask: mask.cloned(),
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    // Scale q (as `nn.MultiheadAttention` and Hugging Face do) rather than the L x L scores:
    // 64x fewer multiplications at 1370 tokens, the same values for the power-of-two 1/8.
    let s = (q * scale)?.matmul(&k.t()?)?;
    let s = match mask {
        Some(m) => s.broadcast_add(m)?,
        None => s,
    };
    crate::clip::layers::softmax_last_dim(&s)?.matmul(v)
}

#[cfg(test)]
mod attention_tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The recomputing op gives the plain composition's values and gradients (f64), with and
    /// without a causal mask, and for the V-V form q = k = v.
    #[test]
    fn matches_the_plain_composition() {
        let dev = Device::Cpu;
        let r = |seed: u64, n: usize| {
            crate::rng::SplitMix64(seed)
                .normal(n, 1.0)
                .into_iter()
                .map(f64::from)
                .collect::<Vec<_>>()
        };
        let shape = (1, 2, 5, 3);
        let q = Var::from_vec(r(1, 30), shape, &dev).unwrap();
        let k = Var::from_vec(r(2, 30), shape, &dev).unwrap();
        let v = Var::from_vec(r(3, 30), shape, &dev).unwrap();
        let m: Vec<f64> = (0..25)
            .map(|i| {
                if i % 5 > i / 5 {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(m, (5, 5), &dev).unwrap();
        let w = Tensor::from_vec(r(4, 30), shape, &dev).unwrap();
        for (mask, vv) in [(None, false), (Some(&mask), false), (None, true)] {
            let (qq, kk) = if vv { (&v, &v) } else { (&q, &k) };
            let fast = attention(qq.as_tensor(), kk.as_tensor(), v.as_tensor(), 0.5, mask).unwrap();
            let plain = {
                let s =
                    (qq.as_tensor().matmul(&kk.as_tensor().t().unwrap()).unwrap() * 0.5).unwrap();
                let s = match mask {
                    Some(m) => s.broadcast_add(m).unwrap(),
                    None => s,
                };
                candle_nn::ops::softmax(&s, candle_core::D::Minus1)
                    .unwrap()
                    .matmul(v.as_tensor())
                    .unwrap()
            };
            let d = (&fast - &plain)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-12, "values differ by {d}");
            let g1 = (fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for t in [&q, &k, &v] {
                match (g1.get(t.as_tensor()), g2.get(t.as_tensor())) {
                    (Some(a), Some(b)) => {
                        let d = (a - b)
                            .unwrap()
                            .abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap();
                        assert!(
                            d < 1e-10,
                            "gradients differ by {d} (mask {}, vv {vv})",
                            mask.is_some()
                        );
                    }
                    (None, None) => {}
                    _ => panic!("a gradient is missing on one side"),
                }
            }
        }
    }
}
