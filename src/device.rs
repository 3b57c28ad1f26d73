//! The device the model runs on (`--device cpu|cuda`), with errors that say what to change: a
//! build without CUDA, no GPU or driver, a GPU out of memory; and how many images one pass can
//! take on a GPU.

use candle_core::Device;

use crate::{Error, Result};

/// The CUDA GPU `ordinal` (0 = the first one `CUDA_VISIBLE_DEVICES` leaves visible).
pub fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Device(
            "--device cuda: this zsad was built without CUDA support; build it with `cargo build --release --features cuda` where the CUDA toolkit is (README: GPUs), or use --device cpu".into(),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Device(format!(
            "--device cuda: no usable CUDA GPU {ordinal} ({}); check that `nvidia-smi` lists it and that the NVIDIA driver is loaded (CUDA_VISIBLE_DEVICES chooses the GPUs zsad sees)",
            one_line(&e.to_string())
        ))
    })
}

/// The first line of a message (CUDA errors can carry backtraces).
fn one_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// Whether an error message is a GPU running out of memory: the driver's
/// `CUDA_ERROR_OUT_OF_MEMORY`, cuBLAS's `CUBLAS_STATUS_ALLOC_FAILED`, the runtime's "out of
/// memory".
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out_of_memory") || m.contains("out of memory") || m.contains("alloc_failed")
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
    fn out_of_memory_is_recognised_in_each_spelling() {
        assert!(is_out_of_memory(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(is_out_of_memory("cublas error: CUBLAS_STATUS_ALLOC_FAILED"));
        assert!(!is_out_of_memory("shape mismatch in matmul, lhs: [2, 3]"));
        assert!(!is_out_of_memory("CUDA_ERROR_NOT_FOUND"));
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
            assert!(
                e.contains("--features cuda") && e.contains("--device cpu"),
                "{e}"
            );
        }
    }
}
