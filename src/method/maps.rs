//! Anomaly-map post-processing exactly as the references do it: bilinear upsampling of patch
//! grids (`F.interpolate`: AdaCLIP with `align_corners=True` on logits, caoyunkang/AdaCLIP@e27ee32
//! `method/adaclip.py` l.534; AnomalyCLIP with `align_corners=False` on probabilities,
//! zqhang/AnomalyCLIP@45ed4dd `AnomalyCLIP_lib/AnomalyCLIP.py` `get_similarity_map`) and
//! `scipy.ndimage.gaussian_filter(sigma=4)` (AnomalyCLIP `test.py` l.111, AdaCLIP
//! `method/trainer.py` l.194): `truncate=4`, mode `reflect`, separable, f32 after each axis.

use candle_core::{Device, Tensor};

use crate::interp::bilinear_matrix;
use crate::Result;

/// `F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=...)` of `[C, h, w]` ->
/// `[C, out_h, out_w]`, as two matmuls with PyTorch-exact weights, so gradients flow through it
/// (candle's `upsample_bilinear2d` has no backward).
///
/// AdaCLIP and April-GAN upsample logits with `align_corners=True`; AnomalyCLIP upsamples
/// probabilities with `align_corners=False`.
pub fn upsample_bilinear(
    x: &Tensor,
    out_h: usize,
    out_w: usize,
    align_corners: bool,
) -> Result<Tensor> {
    let (c, h, w) = x.dims3()?;
    if !x.track_op() && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        let out = upsample_channels(&v, (c, h, w), out_h, out_w, align_corners);
        return Ok(Tensor::from_vec(out, (c, out_h, out_w), &Device::Cpu)?);
    }
    let dev = x.device();
    let wh = Tensor::from_vec(bilinear_matrix(h, out_h, align_corners), (out_h, h), dev)?
        .to_dtype(x.dtype())?;
    let ww = Tensor::from_vec(bilinear_matrix(w, out_w, align_corners), (out_w, w), dev)?
        .to_dtype(x.dtype())?;
    // [C, h, w] @ [w, W] -> [C, h, W]; [H, h] @ [C, h, W] -> [C, H, W]
    let cols = x
        .reshape((c * h, w))?
        .matmul(&ww.t()?)?
        .reshape((c, h, out_w))?;
    let rows = wh
        .unsqueeze(0)?
        .broadcast_as((c, out_h, h))?
        .contiguous()?
        .matmul(&cols)?;
    Ok(rows)
}

/// The non-zero `(index, weight)` entries of each row of an interpolation matrix `[n_out, n_in]`
/// (two per row for bilinear), in increasing index order.
fn sparse_rows(dense: &[f32], n_in: usize) -> Vec<Vec<(usize, f32)>> {
    dense
        .chunks(n_in.max(1))
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, &w)| w != 0.0)
                .map(|(i, &w)| (i, w))
                .collect()
        })
        .collect()
}

/// [`upsample_bilinear`] for inference on the CPU: the same two products over the non-zero
/// weights only, each channel on its own, so a channel's result does not depend on how many
/// channels (images) are upsampled together, and an output pixel costs four multiply-adds.
fn upsample_channels(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    out_h: usize,
    out_w: usize,
    align_corners: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    let wh = sparse_rows(&bilinear_matrix(h, out_h, align_corners), h);
    let ww = sparse_rows(&bilinear_matrix(w, out_w, align_corners), w);
    let mut out = vec![0f32; c * out_h * out_w];
    if c * h * w == 0 {
        return out;
    }
    out.par_chunks_mut(out_h * out_w)
        .zip(x.par_chunks(h * w))
        .for_each(|(out, x)| {
            // [h, w] @ Wwᵀ -> [h, W], then Wh @ that -> [H, W].
            let mut cols = vec![0f32; h * out_w];
            for (src, dst) in x.chunks(w).zip(cols.chunks_mut(out_w)) {
                for (d, taps) in dst.iter_mut().zip(&ww) {
                    *d = taps.iter().fold(0.0, |acc, &(j, wt)| acc + wt * src[j]);
                }
            }
            for (dst, taps) in out.chunks_mut(out_w).zip(&wh) {
                dst.fill(0.0);
                for &(i, wt) in taps {
                    let src = &cols[i * out_w..(i + 1) * out_w];
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += wt * s);
                }
            }
        });
    out
}

/// scipy's `_gaussian_kernel1d(sigma, 0, radius)` with `radius = int(truncate * sigma + 0.5)`.
pub fn gaussian_kernel(sigma: f64, truncate: f64) -> Vec<f64> {
    let radius = (truncate * sigma + 0.5) as i64;
    let s2 = sigma * sigma;
    let phi: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 / s2 * (x * x) as f64).exp())
        .collect();
    let sum: f64 = phi.iter().sum();
    phi.into_iter().map(|p| p / sum).collect()
}

/// scipy's `mode="reflect"` (half-sample symmetric, `d c b a | a b c d | d c b a`) index.
fn reflect(i: i64, n: i64) -> usize {
    let period = 2 * n;
    let m = i.rem_euclid(period);
    (if m >= n { period - 1 - m } else { m }) as usize
}

/// One `correlate1d` pass along a strided line set, in f64, stored as f32 (scipy casts each
/// pass's output to the input dtype).
#[inline(always)]
fn correlate_pass(
    src: &[f32],
    dst: &mut [f32],
    lines: usize,
    len: usize,
    line_stride: usize,
    step: usize,
    k: &[f64],
) {
    let r = k.len() / 2;
    if step == 1 {
        // Along rows: each line padded with its reflection, then the taps outer and the
        // positions inner (vectorised), every output summed in the same order as below.
        let mut pad = vec![0f64; len + 2 * r];
        let mut acc = vec![0f64; len];
        for l in 0..lines {
            let base = l * line_stride;
            for (p, v) in pad.iter_mut().enumerate() {
                *v = src[base + reflect(p as i64 - r as i64, len as i64)] as f64;
            }
            taps_along(&pad, &mut acc, k);
            for (d, &a) in dst[base..base + len].iter_mut().zip(&acc) {
                *d = a as f32;
            }
        }
        return;
    }
    // Along columns (`step` = row stride, `lines` columns side by side): whole rows at a time,
    // the columns in vector lanes.
    debug_assert_eq!(line_stride, 1);
    let rows: Vec<Vec<f64>> = (0..len)
        .map(|i| {
            src[i * step..i * step + lines]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    let mut acc = vec![0f64; lines];
    for i in 0..len as i64 {
        let centre = &rows[i as usize];
        acc.iter_mut().zip(centre).for_each(|(a, &c)| *a = c * k[r]);
        for j in 1..=r as i64 {
            let a = &rows[reflect(i - j, len as i64)];
            let b = &rows[reflect(i + j, len as i64)];
            let kj = k[r + j as usize];
            for ((acc, &a), &b) in acc.iter_mut().zip(a).zip(b) {
                *acc += (a + b) * kj;
            }
        }
        let out = &mut dst[i as usize * step..i as usize * step + lines];
        out.iter_mut().zip(&acc).for_each(|(d, &a)| *d = a as f32);
    }
}

/// `acc[i] = pad[i + r] k[r] + Σ_{j=1..r} (pad[i + r − j] + pad[i + r + j]) k[r + j]`, in that
/// order for every `i`.
#[inline(always)]
fn taps_along(pad: &[f64], acc: &mut [f64], k: &[f64]) {
    let r = k.len() / 2;
    let n = acc.len();
    acc.iter_mut()
        .zip(&pad[r..r + n])
        .for_each(|(a, &c)| *a = c * k[r]);
    for j in 1..=r {
        let (lo, hi) = (&pad[r - j..r - j + n], &pad[r + j..r + j + n]);
        let kj = k[r + j];
        for ((acc, &a), &b) in acc.iter_mut().zip(lo).zip(hi) {
            *acc += (a + b) * kj;
        }
    }
}

crate::device::dispatch!(
    /// `scipy.ndimage.gaussian_filter(map, sigma, truncate=4.0, mode="reflect")` of a row-major
    /// `h x w` f32 map: axis 0 then axis 1, each pass cast to f32. Compiled for this CPU's
    /// vector unit: the passes' f64 multiply-adds run 8 or 4 positions at a time instead of
    /// SSE2's 2, each output summed in the same order.
    pub gaussian_filter => gaussian_filter_generic(
        map: &[f32],
        h: usize,
        w: usize,
        sigma: f64
    ) -> Vec<f32>
);

#[inline(always)]
fn gaussian_filter_generic(map: &[f32], h: usize, w: usize, sigma: f64) -> Vec<f32> {
    assert_eq!(map.len(), h * w, "map does not match {h}x{w}");
    if sigma <= 0.0 {
        return map.to_vec();
    }
    let k = gaussian_kernel(sigma, 4.0);
    let mut tmp = vec![0f32; h * w];
    correlate_pass(map, &mut tmp, w, h, 1, w, &k); // along axis 0 (columns)
    let mut out = vec![0f32; h * w];
    correlate_pass(&tmp, &mut out, h, w, w, 1, &k); // along axis 1 (rows)
    out
}

/// Convenience: the same on a `[h, w]` tensor (computed on the CPU).
pub fn gaussian_filter_tensor(map: &Tensor, sigma: f64) -> Result<Tensor> {
    let (h, w) = map.dims2()?;
    let v = map
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(
        Tensor::from_vec(gaussian_filter(&v, h, w, sigma), (h, w), &Device::Cpu)?
            .to_device(map.device())?,
    )
}

/// Bilinear resize of a row-major `h x w` f32 map to `out_h x out_w`, as
/// `F.interpolate(mode="bilinear", align_corners=False)` without antialiasing: how a map at the
/// model's input size is brought back to the image's own size. Bilinear weights are convex, so
/// values stay inside the input's range.
pub fn resize_map(map: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    assert_eq!(map.len(), h * w, "map does not match {h}x{w}");
    if (h, w) == (out_h, out_w) {
        return map.to_vec();
    }
    // (i0, i1, weight of i1) per output coordinate, PyTorch's area_pixel_compute_source_index.
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f64 / n_out as f64;
        (0..n_out)
            .map(|o| {
                let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, (src - i0 as f64) as f32)
            })
            .collect()
    };
    let ty = taps(h, out_h);
    let tx = taps(w, out_w);
    let mut rows = vec![0f32; h * out_w];
    for y in 0..h {
        let src = &map[y * w..(y + 1) * w];
        for (x, &(i0, i1, l)) in tx.iter().enumerate() {
            rows[y * out_w + x] = (1.0 - l) * src[i0] + l * src[i1];
        }
    }
    let mut out = vec![0f32; out_h * out_w];
    for (y, &(i0, i1, l)) in ty.iter().enumerate() {
        for x in 0..out_w {
            out[y * out_w + x] = (1.0 - l) * rows[i0 * out_w + x] + l * rows[i1 * out_w + x];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_radius_and_normalisation() {
        // sigma 4 -> radius int(4 * 4 + 0.5) = 16, 33 taps (scipy's `truncate=4.0` default).
        let k = gaussian_kernel(4.0, 4.0);
        assert_eq!(k.len(), 33);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((k[16] / k[17] - (1.0f64 / 32.0).exp()).abs() < 1e-12);
    }

    #[test]
    fn reflect_is_half_sample_symmetric() {
        let idx: Vec<usize> = (-5..9).map(|i| reflect(i, 4)).collect();
        assert_eq!(idx, vec![3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0]);
    }

    #[test]
    fn constant_map_is_unchanged() {
        let m = vec![0.25f32; 6 * 9];
        for v in gaussian_filter(&m, 6, 9, 4.0) {
            assert!((v - 0.25).abs() < 1e-7);
        }
    }

    #[test]
    fn upsampling_a_constant_grid_is_constant() {
        let x = Tensor::full(0.5f32, (2, 3, 4), &Device::Cpu).unwrap();
        for ac in [true, false] {
            let y = upsample_bilinear(&x, 7, 9, ac).unwrap();
            assert_eq!(y.dims(), &[2, 7, 9]);
            let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|&v| (v - 0.5).abs() < 1e-6));
        }
    }

    #[test]
    fn resize_map_matches_the_interpolation_matrices() {
        let (h, w) = (5, 7);
        let m: Vec<f32> = (0..h * w).map(|i| ((i * 37) % 11) as f32 / 10.0).collect();
        for (oh, ow) in [(9, 13), (3, 4), (5, 7), (1, 1)] {
            let got = resize_map(&m, h, w, oh, ow);
            let x = Tensor::from_vec(m.clone(), (1, h, w), &Device::Cpu).unwrap();
            let want = upsample_bilinear(&x, oh, ow, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{oh}x{ow}: {a} vs {b}");
            }
        }
    }
}
