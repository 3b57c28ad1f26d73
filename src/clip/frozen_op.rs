//! Ops through the frozen backbone whose backward is written by hand, on any device and dtype.
//!
//! candle records every op's inputs for the backward pass and computes a gradient for every
//! operand, frozen ones included (`candle-core` 0.11.1 `backprop.rs`). Two ops of the backbone
//! are cheaper as one op with a hand-written backward: the linear layer (no gradient for the
//! weight) and attention (probabilities recomputed in the backward instead of kept).
//!
//! candle's custom ops are written per backend (`CustomOp1::cpu_fwd`, `cuda_fwd`, `metal_fwd`).
//! Here the forward is computed *before* the op, with ordinary tensor ops on detached inputs
//! (so no graph is kept for it, and it runs wherever candle's ops run), and the op's forward
//! hands that result back as its output; only the backward ([`Backward1`], [`Backward3`], in
//! tensor ops too) is the op's own. The price is one copy of the output (candle gives no way to
//! move a tensor's storage out), small next to the products that made it.

use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, Layout, MetalStorage, Shape, Storage, Tensor,
};

/// The backward of a one-input op: the gradient of its input from the output's.
pub(crate) trait Backward1: Send + Sync + 'static {
    /// The op's name in candle's graph and errors.
    const NAME: &'static str;
    fn backward(&self, arg: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>>;
}

/// The backward of a three-input op.
pub(crate) trait Backward3: Send + Sync + 'static {
    const NAME: &'static str;
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        args: [&Tensor; 3],
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;
}

/// `output` as a function of `x` whose gradient is `backward`'s.
///
/// `output` must be what the op computes from `x`, computed from `x.detach()` (a graph kept on
/// it would only be dropped). Without a learnable tensor upstream of `x` no graph is recorded
/// and `output` is returned as it is.
pub(crate) fn apply1<B: Backward1>(
    x: &Tensor,
    output: Tensor,
    backward: B,
) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(Op1 {
        output: Precomputed::new(output, x, B::NAME)?,
        backward,
    })
}

/// [`apply1`] for three inputs (all on one device).
pub(crate) fn apply3<B: Backward3>(
    args: [&Tensor; 3],
    output: Tensor,
    backward: B,
) -> candle_core::Result<Tensor> {
    if !args.iter().any(|a| a.track_op()) {
        return Ok(output);
    }
    args[0].apply_op3(
        args[1],
        args[2],
        Op3 {
            output: Precomputed::new(output, args[0], B::NAME)?,
            backward,
        },
    )
}

/// The forward's result, taken (not cloned) by the op's forward, so that the graph, which keeps
/// the op, keeps no second copy of it.
struct Precomputed {
    output: Mutex<Option<Tensor>>,
    name: &'static str,
}

impl Precomputed {
    fn new(output: Tensor, input: &Tensor, name: &'static str) -> candle_core::Result<Self> {
        if !output.device().same_device(input.device()) {
            candle_core::bail!(
                "{name}: the output is on {:?}, the input on {:?}",
                output.device().location(),
                input.device().location()
            );
        }
        Ok(Self {
            output: Mutex::new(Some(output.detach())),
            name,
        })
    }

    fn take(&self) -> candle_core::Result<Tensor> {
        let taken = match self.output.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        taken.ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: the forward ran twice", self.name)).bt()
        })
    }

    /// A fresh contiguous storage holding the output, from `pick`'s backend.
    fn storage<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> candle_core::Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let output = self.take()?;
        let (storage, layout) = output.storage_and_layout();
        let Some(src) = pick(&storage) else {
            candle_core::bail!(
                "{}: the output is on {:?}, not on the input's device",
                self.name,
                output.device().location()
            );
        };
        let shape = layout.shape().clone();
        // As candle's own `Tensor::force_contiguous` (tensor.rs, 0.11.1): allocate, then copy
        // through the layout, which gives an exact-size contiguous buffer whatever the output's
        // strides and offset (`try_clone` would copy the whole underlying buffer as it is).
        // SAFETY: `copy_strided_src` writes each of the `shape.elem_count()` elements.
        let mut dst = unsafe { src.device().alloc_uninit(&shape, src.dtype())? };
        src.copy_strided_src(&mut dst, 0, layout)?;
        Ok((dst, shape))
    }

    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        self.storage(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        self.storage(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal(&self) -> candle_core::Result<(MetalStorage, Shape)> {
        self.storage(|s| match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }
}

struct Op1<B> {
    output: Precomputed,
    backward: B,
}

impl<B: Backward1> CustomOp1 for Op1<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        self.output.metal()
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.backward.backward(arg, grad)
    }
}

struct Op3<B> {
    output: Precomputed,
    backward: B,
}

impl<B: Backward3> CustomOp3 for Op3<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        self.output.metal()
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward.backward([a1, a2, a3], grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// `y = (2 x)ᵀ`, precomputed as a strided view (a transpose), with its backward.
    struct DoubleTransposed;

    impl Backward1 for DoubleTransposed {
        const NAME: &'static str = "double-transposed";

        fn backward(&self, _x: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
            Ok(Some((grad.t()? * 2.0)?))
        }
    }

    /// The output is copied through its layout (a transposed view here), in every float dtype,
    /// and the gradient is the backward's.
    #[test]
    fn strided_output_and_gradient_in_each_dtype() {
        for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
            let x = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let precomputed = (x.as_tensor().detach() * 2.0).unwrap().t().unwrap();
            assert!(!precomputed.is_contiguous());
            let y = apply1(x.as_tensor(), precomputed, DoubleTransposed).unwrap();
            assert_eq!(y.dtype(), dtype);
            assert!(y.is_contiguous());
            let y64 = y.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            assert_eq!(y64, [[2.0, 8.0], [4.0, 10.0], [6.0, 12.0]], "{dtype:?}");
            let w = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let grads = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap();
            let g64 = g.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            assert_eq!(g64, [[2.0, 0.0, 2.0], [0.0, 2.0, 2.0]], "{dtype:?}");
        }
    }

    /// A narrow view at an offset is copied to an exact-size buffer of its own.
    #[test]
    fn offset_view_output() {
        let x = Var::new(&[1f64, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
        let big = Tensor::new(&[9f64, 2.0, 4.0, 6.0, 8.0, 9.0], &Device::Cpu).unwrap();
        struct Twice;
        impl Backward1 for Twice {
            const NAME: &'static str = "twice";
            fn backward(&self, _x: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
                Ok(Some((g * 2.0)?))
            }
        }
        let y = apply1(x.as_tensor(), big.narrow(0, 1, 4).unwrap(), Twice).unwrap();
        assert_eq!(y.to_vec1::<f64>().unwrap(), [2.0, 4.0, 6.0, 8.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap(),
            [2.0; 4]
        );
    }

    /// Without a learnable tensor upstream, the output is returned as it is, with no op.
    #[test]
    fn untracked_input_records_nothing() {
        let x = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let y = apply1(&x, (&x * 2.0).unwrap(), DoubleTransposed).unwrap();
        assert!(!y.track_op());
    }

    /// On a CUDA device (skipped without one) the two ops through this module give the CPU's
    /// values and gradients in f32, f16 and bf16, and the linear layer's weight gets none.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_matches_the_cpu() {
        use crate::clip::attention::scaled_dot_product;
        use crate::clip::linear::Linear;
        use candle_core::Module;
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("skipped: no CUDA device");
            return;
        };
        let cpu = Device::Cpu;
        let r = |seed: u64, shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::from_vec(crate::rng::SplitMix64(seed).normal(n, 1.0), shape, &cpu).unwrap()
        };
        let max_diff = |a: &Tensor, b: &Tensor| crate::clip::testing::diff(a, b) as f64;
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F16, 2e-2), (DType::BF16, 1e-1)] {
            // Each op on each device: the output and the gradients of sum(output * w).
            let run = |dev: &Device| -> Vec<Tensor> {
                let t = |seed, shape: &[usize]| {
                    r(seed, shape)
                        .to_dtype(dtype)
                        .unwrap()
                        .to_device(dev)
                        .unwrap()
                };
                let weight = t(1, &[6, 4]);
                let x = Var::from_tensor(&t(2, &[2, 3, 4])).unwrap();
                let y = Linear::new(weight.clone(), None)
                    .forward(x.as_tensor())
                    .unwrap();
                let g = (&y * t(3, &[2, 3, 6])).unwrap().sum_all().unwrap();
                let g = g.backward().unwrap();
                assert!(g.get(&weight).is_none(), "{dtype:?}: a weight gradient");
                let (q, k, v) = (
                    t(4, &[1, 2, 5, 4]),
                    t(5, &[1, 2, 5, 4]),
                    t(6, &[1, 2, 5, 4]),
                );
                let (q, k, v) = (
                    Var::from_tensor(&q).unwrap(),
                    Var::from_tensor(&k).unwrap(),
                    Var::from_tensor(&v).unwrap(),
                );
                let mask = t(7, &[5, 5]);
                let a = scaled_dot_product(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    0.5,
                    Some(&mask),
                )
                .unwrap();
                let ga = (&a * t(8, &[1, 2, 5, 4])).unwrap().sum_all().unwrap();
                let ga = ga.backward().unwrap();
                let mut out = vec![y, g.get(x.as_tensor()).unwrap().clone(), a];
                for t in [&q, &k, &v] {
                    out.push(ga.get(t.as_tensor()).unwrap().clone());
                }
                out
            };
            let (on_cpu, on_gpu) = (run(&cpu), run(&gpu));
            for (i, (c, g)) in on_cpu.iter().zip(&on_gpu).enumerate() {
                assert!(g.device().is_cuda());
                assert_eq!(g.dtype(), dtype);
                let scale = c
                    .abs()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .max_all()
                    .unwrap();
                let scale = 1.0 + scale.to_scalar::<f64>().unwrap();
                let d = max_diff(c, g);
                assert!(
                    d < tol * scale,
                    "{dtype:?}: output {i} differs by {d} (scale {scale})"
                );
            }
        }
    }
}
