//! The device the model runs on (`--device cpu|cuda`), with errors that say what to change: a
//! build without CUDA, no GPU or driver, a GPU out of memory; and how many images one pass can
//! take on a GPU. On the CPU: its widest vector unit (`simd`) and `dispatch!`, which compiles
//! a vectorisable loop again for it (the crate itself targets baseline x86-64).

use candle_core::Device;

use std::sync::OnceLock;

use crate::error::{DeviceError, Error, Result};

/// The widest vector unit this CPU has that the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simd {
    /// AVX-512 F/BW/DQ/VL with FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Neither (or not x86-64): baseline code.
    Baseline,
}

/// Detected once.
pub(crate) fn simd() -> Simd {
    static LEVEL: OnceLock<Simd> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("avx2")
            {
                return Simd::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    })
}

/// Defines `$name`, which runs `$generic` compiled for the best vector unit of this CPU (the
/// crate itself targets baseline x86-64, so loops written for LLVM to vectorise get SSE2 only
/// unless compiled again this way). `$generic` should be `#[inline(always)]`.
macro_rules! dispatch {
    ($(#[$doc:meta])* $vis:vis $name:ident => $generic:ident ($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,avx2")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                match $crate::device::simd() {
                    // SAFETY: `simd` detected every feature the function is compiled for.
                    $crate::device::Simd::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above, for AVX2 and FMA.
                    $crate::device::Simd::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::device::Simd::Baseline => {}
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// The CUDA GPU `ordinal` (0 = the first one `CUDA_VISIBLE_DEVICES` leaves visible).
pub fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Device(DeviceError::NoCudaInBuild));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Device(DeviceError::NoGpu {
            ordinal,
            detail: one_line(&e.to_string()).to_string(),
        })
    })
}

/// The first line of a message (CUDA errors can carry backtraces).
fn one_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// The GPU's out-of-memory status inside a candle error, if that is what it is: the driver's
/// `CUDA_ERROR_OUT_OF_MEMORY` or cuBLAS's `CUBLAS_STATUS_ALLOC_FAILED`, read from the typed
/// errors candle wraps (`candle_core::cuda_backend::CudaError`), through any context or
/// backtrace wrappers. Always `None` in a build without CUDA.
pub fn out_of_memory(e: &candle_core::Error) -> Option<String> {
    match e {
        candle_core::Error::WithBacktrace { inner, .. }
        | candle_core::Error::Context { inner, .. } => out_of_memory(inner),
        #[cfg(feature = "cuda")]
        candle_core::Error::Cuda(inner) => {
            use candle_core::cuda_backend::cudarc::cublas::sys::cublasStatus_t;
            use candle_core::cuda_backend::cudarc::driver::sys::CUresult;
            use candle_core::cuda_backend::CudaError;
            let driver = |d: &candle_core::cuda_backend::cudarc::driver::result::DriverError| {
                (d.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY).then(|| "CUDA_ERROR_OUT_OF_MEMORY")
            };
            let status = match inner.downcast_ref::<CudaError>() {
                Some(CudaError::Cuda(d)) | Some(CudaError::Load { cuda: d, .. }) => driver(d),
                Some(CudaError::Cublas(c)) if c.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED => {
                    Some("CUBLAS_STATUS_ALLOC_FAILED")
                }
                _ => inner
                    .downcast_ref::<candle_core::cuda_backend::cudarc::driver::result::DriverError>(
                    )
                    .and_then(driver),
            };
            status.map(|s| format!("{s}: {}", one_line(&e.to_string())))
        }
        _ => None,
    }
}

/// `e` as a typed [`DeviceError::OutOfMemory`] when it is one, else unchanged.
pub fn classify(e: Error) -> Error {
    match e {
        Error::Tensor(t) => match out_of_memory(&t) {
            Some(detail) => Error::Device(DeviceError::OutOfMemory { detail }),
            None => Error::Tensor(t),
        },
        other => other,
    }
}

/// Free and total bytes of a GPU (`None` on the CPU, or where the driver does not say).
pub fn memory(dev: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (free as u64, total as u64));
    }
    let _ = dev;
    None
}

/// `12.3 GiB`.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// What one image costs in a forward pass without gradients, in bytes: the largest live set of
/// one block, dominated by attention: the scores and probabilities of every head (`heads` x
/// `tokens`², twice, plus one more in the softmax) and about 16 `tokens` x `width` activations
/// (the residual stream, q/k/v, the MLP's 4x hidden layer, the V-V path), `bytes` per value.
pub fn image_bytes(tokens: usize, heads: usize, width: usize, bytes: usize) -> u64 {
    let (t, h, w, b) = (tokens as u64, heads as u64, width as u64, bytes as u64);
    (3 * h * t * t + 16 * t * w) * b
}

/// `--batch-size 0` on a GPU: as many images as half of `free` holds at [`image_bytes`] each
/// (the weights are already resident; the other half is room for the allocator and the text
/// tower), between 1 and `cap`.
pub fn gpu_batch(free: u64, per_image: u64, cap: usize) -> usize {
    ((free / 2) / per_image.max(1)).clamp(1, cap as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_typed_gpu_errors_are_out_of_memory() {
        // A message that merely says so is not the driver's status.
        let msg = candle_core::Error::Msg("CUDA_ERROR_OUT_OF_MEMORY out of memory".into());
        assert_eq!(out_of_memory(&msg), None);
        assert!(!classify(Error::Tensor(msg)).is_out_of_memory());
        let oom = Error::Device(DeviceError::OutOfMemory {
            detail: "test".into(),
        });
        assert!(classify(oom).is_out_of_memory());
    }

    #[test]
    fn gpu_batches_by_the_memory_estimate() {
        // ViT-L/14 at 518 px in f32: 16 heads, 1370 tokens, width 1024: about 450 MB an image.
        let l = image_bytes(1370, 16, 1024, 4);
        assert!((400e6..500e6).contains(&(l as f64)), "{l}");
        // ViT-B/16 at 224 px: about 15 MB.
        let b = image_bytes(197, 12, 768, 4);
        assert!((10e6..20e6).contains(&(b as f64)), "{b}");
        // 80 GiB free: 64 ViT-L images (the cap would allow 95); 1 GiB: one.
        assert_eq!(gpu_batch(80 << 30, l, 64), 64);
        assert_eq!(gpu_batch(20 << 30, l, 64), 23);
        assert_eq!(gpu_batch(1 << 30, l, 64), 1);
        assert_eq!(gpu_batch(0, l, 64), 1);
    }

    #[test]
    fn cpu_has_no_gpu_memory_and_a_build_without_cuda_says_how_to_get_it() {
        assert_eq!(memory(&Device::Cpu), None);
        if !candle_core::utils::cuda_is_available() {
            let e = cuda(0).unwrap_err().to_string();
            assert!(e.contains("--features cuda") && e.contains("cpu"), "{e}");
        }
    }
}
