//! The linear layer of both towers, in its three roles behind one interface
//! ([`Module::forward`], and [`Linear::forward_with`] for a fused activation):
//!
//! - inference on the CPU in f32: the fused GEMM kernels of `kernels`, with the weight
//!   kept as `--precision` asks (f32, rounded to bf16, or packed for a bf16 unit);
//! - training through the frozen backbone: candle's matmul backward always computes and keeps
//!   the gradient of both operands (`candle-core` `backprop.rs`, `Op::Matmul`), so a frozen
//!   backbone would also get, and hold until the end of the backward pass, a gradient for every
//!   weight: a third of the backward FLOPs and the model's size again in memory. When a
//!   learnable tensor is upstream (`track_op`), on any device and in any dtype, the product
//!   is a `frozen_op` whose backward returns the input gradient only
//!   (tested below and in `tests/gradients.rs`);
//! - anything else (inference on other devices and dtypes): candle's plain `broadcast_matmul`.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::frozen_op::{self, Backward1};
use super::kernels::{self, ASrc, Act, Epi, Kernel, PackedB, PackedW, Precision, Weight};
use crate::Result;

/// `x Wᵀ + b` with `W` `[out, in]` never receiving a gradient.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Stored,
    bias: Option<Tensor>,
    /// The weight as a tensor for the plain ops (training, other dtypes), unpacked from a
    /// packed form on first use and shared by clones.
    unpacked: Arc<OnceLock<Tensor>>,
}

/// How the weight is kept, by `--precision`.
#[derive(Debug, Clone)]
enum Stored {
    /// As loaded (not on the CPU, or not f32).
    Tensor(Tensor),
    /// f32 on the CPU: packed once at load for the f32 kernel (the tensor is not kept).
    F32(Arc<PackedW>),
    /// bf16 emulated: f32 values rounded to bf16 once at load, packed for the f32 kernel.
    RoundedF32(Arc<PackedW>),
    /// bf16 on a bf16 unit: packed once at load into the kernel's layout (half the memory).
    Packed(Arc<PackedB>, Kernel),
    /// bf16 for a GPU's autocast products ([`Precision::Bf16Autocast`]).
    Bf16(Tensor),
}

impl Linear {
    /// A CPU f32 weight is packed for the f32 kernel here, once.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let weight = match Self::pack_f32(&weight) {
            Some(p) => Stored::F32(Arc::new(p)),
            None => Stored::Tensor(weight),
        };
        Self {
            weight,
            bias,
            unpacked: Arc::default(),
        }
    }

    /// `W` packed for the f32 kernel, if it is a 2-D f32 CPU tensor.
    fn pack_f32(w: &Tensor) -> Option<PackedW> {
        if !w.device().is_cpu() || w.dtype() != DType::F32 || w.rank() != 2 || w.track_op() {
            return None;
        }
        let (n, k) = w.dims2().ok()?;
        let w = w.contiguous().ok()?;
        kernels::with_f32(&w, |data| PackedW::from_weight(data, n, k)).ok()
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

    /// The f32 weight `[out, in]` (before [`Self::use_precision`]).
    #[cfg(test)]
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            Stored::Packed(..) | Stored::Bf16(_) => {
                candle_core::bail!("the weight is kept in bf16")
            }
            _ => self.weight_as(DType::F32),
        }
    }

    /// Converts the weight for `precision` (`--precision bf16`: packed for the CPU's bf16 unit,
    /// or rounded to bf16 values once for the emulation).
    pub fn use_precision(&mut self, precision: Precision) -> candle_core::Result<()> {
        let w = match &self.weight {
            Stored::Tensor(w) => w.clone(),
            Stored::F32(p) if precision == Precision::Bf16Emulated => {
                let mut p = PackedW::clone(p);
                p.round_bf16();
                self.weight = Stored::RoundedF32(Arc::new(p));
                self.unpacked = Arc::default();
                return Ok(());
            }
            Stored::F32(_) => self.weight_as(DType::F32)?,
            _ => candle_core::bail!("the weight was already converted"),
        };
        self.weight = match precision {
            Precision::F32 => return Ok(()),
            Precision::Bf16Autocast => Stored::Bf16(w.to_dtype(DType::BF16)?),
            Precision::Bf16Emulated => {
                Stored::Tensor(kernels::round_bf16(&w)?) // not a CPU f32 weight: kept as is
            }
            Precision::Bf16(kernel) => {
                let (n, k) = w.dims2()?;
                let w = w
                    .to_dtype(DType::BF16)?
                    .flatten_all()?
                    .to_vec1::<half::bf16>()?;
                Stored::Packed(Arc::new(PackedB::from_weight(&w, n, k)), kernel)
            }
        };
        self.unpacked = Arc::default();
        Ok(())
    }

    #[cfg(test)]
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight as the fused kernels take it.
    fn kernel_weight(&self) -> candle_core::Result<Weight<'_>> {
        Ok(match &self.weight {
            Stored::F32(w) => Weight::F32(w),
            Stored::RoundedF32(w) => Weight::RoundedF32(w),
            Stored::Packed(p, k) => Weight::Packed(p, *k),
            Stored::Tensor(_) | Stored::Bf16(_) => {
                candle_core::bail!("this weight is multiplied by candle's ops, not the CPU kernels")
            }
        })
    }

    /// The weight in `dtype` for the plain ops (training, other devices and dtypes): a packed
    /// weight (CPU only) is unpacked once and kept.
    fn weight_as(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let cpu = &candle_core::Device::Cpu;
        let unpacked = |make: &dyn Fn() -> candle_core::Result<Tensor>| {
            if let Some(t) = self.unpacked.get() {
                return candle_core::Result::Ok(t.clone());
            }
            let t = make()?;
            Ok(self.unpacked.get_or_init(|| t).clone())
        };
        match &self.weight {
            Stored::Tensor(w) | Stored::Bf16(w) => w.to_dtype(dtype),
            Stored::F32(p) | Stored::RoundedF32(p) => {
                unpacked(&|| Tensor::from_vec(p.to_weight(), (p.n(), p.k()), cpu))?.to_dtype(dtype)
            }
            Stored::Packed(p, _) => {
                unpacked(&|| Tensor::from_vec(p.to_weight(), (p.n(), p.k()), cpu))?.to_dtype(dtype)
            }
        }
    }

    /// Whether the fused CPU kernels can multiply this weight.
    pub fn fused(&self) -> bool {
        matches!(
            self.weight,
            Stored::F32(_) | Stored::RoundedF32(_) | Stored::Packed(..)
        )
    }

    /// The bf16 unit this layer's packed weight multiplies on, if it is packed for one.
    pub fn bf16_unit(&self) -> Option<Kernel> {
        self.packed_bf16().ok().map(|(_, k)| k)
    }

    /// The weight packed for a bf16 unit, and the unit.
    fn packed_bf16(&self) -> candle_core::Result<(&PackedB, Kernel)> {
        match &self.weight {
            Stored::Packed(w, k) => Ok((w, *k)),
            _ => candle_core::bail!("the weight is not packed for a bf16 unit"),
        }
    }

    /// `out ⟵ act(A Wᵀ + b)` as packed bf16 rows for the next layer ([`Self::gemm_from_packed`]),
    /// for layers with a [`Self::bf16_unit`].
    pub fn gemm_to_packed(
        &self,
        m: usize,
        a: ASrc,
        act: Act,
        out: &mut kernels::PackedRows,
    ) -> candle_core::Result<()> {
        let (w, kernel) = self.packed_bf16()?;
        self.with_bias(|bias| {
            let epi = Epi {
                bias,
                act,
                ..Default::default()
            };
            kernels::gemm_to_packed(kernel, m, a, w, &epi, out, true)
        })
    }

    /// `dst (+)= A Wᵀ + b` with `A` the packed rows [`Self::gemm_to_packed`] wrote.
    pub fn gemm_from_packed(
        &self,
        a: &kernels::PackedRows,
        dst: &mut [f32],
        ld: usize,
        accumulate: bool,
    ) -> candle_core::Result<()> {
        let (w, kernel) = self.packed_bf16()?;
        self.with_bias(|bias| {
            let epi = Epi {
                bias,
                accumulate,
                ..Default::default()
            };
            kernels::gemm_packed(kernel, a, w, dst, ld, &epi, true)
        })
    }

    /// `f` with the bias as f32 values (`None` without a bias).
    fn with_bias<R>(&self, f: impl FnOnce(Option<&[f32]>) -> R) -> candle_core::Result<R> {
        match &self.bias {
            Some(b) => kernels::with_f32(&b.contiguous()?, |b| f(Some(b))),
            None => Ok(f(None)),
        }
    }

    /// `dst ⟵ act(A Wᵀ + b)` (`dst +=` with `accumulate`, rounded to bf16 with `round`) for
    /// `A: [m, in]` read from `a` (a view, or LayerNorm applied to rows), `dst` with row stride
    /// `ld`: the fused inference path, for callers that checked [`Self::fused`].
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_into(
        &self,
        m: usize,
        a: ASrc,
        dst: &mut [f32],
        ld: usize,
        act: Act,
        accumulate: bool,
        round: bool,
    ) -> candle_core::Result<()> {
        let weight = self.kernel_weight()?;
        self.with_bias(|bias| {
            let epi = Epi {
                bias,
                act,
                accumulate,
                round_bf16: round,
                ..Default::default()
            };
            weight.gemm(m, a, dst, ld, &epi, true)
        })
    }
}

/// The backward of `x Wᵀ` as a function of `x` alone: `∂x = ∂y W`.
struct FrozenWeight {
    weight: Tensor,
}

impl Backward1 for FrozenWeight {
    const NAME: &'static str = "matmul-frozen";

    fn backward(&self, _x: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // Contiguous, as cuBLAS' strided-batch products need (see `attention`'s backward).
        Ok(Some(grad.contiguous()?.broadcast_matmul(&self.weight)?))
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
        kernels::linear(x, self.kernel_weight()?, self.bias.as_ref(), epilogue)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let (Stored::Bf16(w), false) = (&self.weight, x.track_op()) {
            // Autocast: the product of bf16 operands, read back in the activations' dtype.
            let y = x
                .to_dtype(DType::BF16)?
                .broadcast_matmul(&w.t()?)?
                .to_dtype(x.dtype())?;
            return match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                None => Ok(y),
            };
        }
        if kernels::applies(x) && self.fused() {
            return self.forward_with(x, kernels::Epilogue::None);
        }
        // Outside the fast path (training, other devices) a bf16 weight is widened per call.
        let weight = self.weight_as(x.dtype())?;
        let y = if x.track_op() {
            let y = x.detach().broadcast_matmul(&weight.t()?)?;
            frozen_op::apply1(x, y, FrozenWeight { weight })?
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

    /// GPU autocast (run here on the CPU's bf16 matmul): the product of the operands rounded to
    /// bf16, rounded to bf16 once more as a bf16 product's result, plus the f32 bias; the
    /// training path multiplies the widened weight in the input's dtype.
    #[test]
    fn bf16_autocast_multiplies_bf16_operands() {
        use crate::clip::testing::{diff, randn};
        let (w, b, x) = (randn(&[5, 9], 7), randn(&[5], 8), randn(&[2, 3, 9], 9));
        let mut l = Linear::new(w.clone(), Some(b.clone()));
        l.use_precision(Precision::Bf16Autocast).unwrap();
        let got = l.forward(&x).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let r = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let want = r(&r(&x).broadcast_matmul(&r(&w).t().unwrap()).unwrap())
            .broadcast_add(&b)
            .unwrap();
        // f32 sums of bf16 products against bf16 accumulation order: within a bf16 step.
        let scale = diff(&want, &want.zeros_like().unwrap());
        assert!(diff(&got, &want) <= scale / 128.0);
        // The training path multiplies the widened weight.
        let plain = candle_nn::Linear::new(r(&w), Some(b)).forward(&x).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let tracked = l.forward(xv.as_tensor()).unwrap();
        assert!(diff(&tracked, &plain) < 1e-5);
    }

    /// In each dtype the op gives candle's `Linear`'s values and input gradient, and no weight
    /// gradient (f64 and f32 exactly: the same products; bf16 through the same bf16 products).
    #[test]
    fn same_values_and_input_gradient_no_weight_gradient() {
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32, DType::BF16] {
            let w = Tensor::new(&[[1f32, 2.0, 3.0], [0.5, -1.0, 0.0]], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = Tensor::new(&[0.1f32, 0.2], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let l = Linear::new(w.clone(), Some(b.clone()));
            let x = Tensor::new(&[[[1f32, 0.0, -1.0], [2.0, 1.0, 0.5]]], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let y = l.forward(x.as_tensor()).unwrap();
            let plain = candle_nn::Linear::new(w.clone(), Some(b))
                .forward(x.as_tensor())
                .unwrap();
            let f64s = |t: &Tensor| -> Vec<f64> {
                let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                t.to_vec1::<f64>().unwrap()
            };
            assert_eq!(y.dtype(), dtype);
            assert_eq!(f64s(&y), f64s(&plain), "{dtype:?}");
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let plain_grads = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            assert_eq!(
                f64s(grads.get(x.as_tensor()).unwrap()),
                f64s(plain_grads.get(x.as_tensor()).unwrap()),
                "{dtype:?}"
            );
            // candle's Linear keeps gradients for x, the product, the weight's transposed view
            // and the bias; ours none for the weight.
            assert!(grads.get(&w).is_none());
            assert_eq!(plain_grads.get_ids().count(), grads.get_ids().count() + 1);
        }
    }

    /// Without a learnable tensor upstream no graph is recorded (the plain product).
    #[test]
    fn untracked_input_records_no_op() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f64, 2.0], [0.5, -1.0]], &dev).unwrap();
        let x = Tensor::new(&[[1f64, 3.0]], &dev).unwrap();
        let y = Linear::new(w, None).forward(&x).unwrap();
        assert!(!y.track_op());
        assert_eq!(y.to_vec2::<f64>().unwrap(), [[7.0, -2.5]]);
    }
}
