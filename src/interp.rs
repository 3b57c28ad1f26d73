//! 1-D interpolation weights as dense `[out, in]` matrices, matching PyTorch's `F.interpolate`.
//!
//! A separable 2-D resize of a grid `X [in_h, in_w]` is `Wh · X · Wwᵀ`. Expressing resizes as
//! matrices keeps them exact to the reference, makes them differentiable through plain matmuls
//! (candle's `upsample_bilinear2d` has no backward), and lets bicubic exist at all (candle has none).

/// PyTorch's cubic convolution constant (`upsample_bicubic2d`), not PIL's -0.5.
pub const TORCH_CUBIC_A: f64 = -0.75;

/// Source coordinate for `align_corners=False` (half-pixel centres), PyTorch's
/// `area_pixel_compute_source_index` before any clamping.
fn half_pixel_source(dst: usize, n_in: usize, n_out: usize) -> f64 {
    let scale = n_in as f64 / n_out as f64;
    scale * (dst as f64 + 0.5) - 0.5
}

fn cubic_near(x: f64, a: f64) -> f64 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

fn cubic_far(x: f64, a: f64) -> f64 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

/// Bicubic weights of `F.interpolate(mode="bicubic", align_corners=False)` (no antialias):
/// Keys kernel with `A = -0.75`, unclamped half-pixel source, neighbours clamped to the border.
/// Row-major `[n_out, n_in]`.
pub fn bicubic_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0f64; n_out * n_in];
    for o in 0..n_out {
        let src = half_pixel_source(o, n_in, n_out);
        let i0 = src.floor();
        let t = src - i0;
        let w = [
            cubic_far(t + 1.0, TORCH_CUBIC_A),
            cubic_near(t, TORCH_CUBIC_A),
            cubic_near(1.0 - t, TORCH_CUBIC_A),
            cubic_far(2.0 - t, TORCH_CUBIC_A),
        ];
        for (k, wk) in w.iter().enumerate() {
            let idx = (i0 as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
            m[o * n_in + idx] += wk;
        }
    }
    m.into_iter().map(|v| v as f32).collect()
}

/// Bilinear weights of `F.interpolate(mode="bilinear", align_corners=...)` (no antialias).
/// Row-major `[n_out, n_in]`.
pub fn bilinear_matrix(n_in: usize, n_out: usize, align_corners: bool) -> Vec<f32> {
    let mut m = vec![0f64; n_out * n_in];
    for o in 0..n_out {
        let src = if align_corners {
            if n_out > 1 {
                o as f64 * (n_in as f64 - 1.0) / (n_out as f64 - 1.0)
            } else {
                0.0
            }
        } else {
            half_pixel_source(o, n_in, n_out).max(0.0)
        };
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
        let l1 = src - i0 as f64;
        m[o * n_in + i0] += 1.0 - l1;
        m[o * n_in + i1] += l1;
    }
    m.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f32 = 1e-6;

    #[test]
    fn identity_when_sizes_match() {
        for m in [
            bicubic_matrix(5, 5),
            bilinear_matrix(5, 5, false),
            bilinear_matrix(5, 5, true),
        ] {
            for r in 0..5 {
                for c in 0..5 {
                    let want = if r == c { 1.0 } else { 0.0 };
                    assert!(
                        (m[r * 5 + c] - want).abs() < TOL,
                        "{r},{c}: {}",
                        m[r * 5 + c]
                    );
                }
            }
        }
    }

    #[test]
    fn rows_sum_to_one() {
        for (n_in, n_out) in [(24, 37), (37, 24), (2, 7), (7, 1)] {
            for m in [
                bicubic_matrix(n_in, n_out),
                bilinear_matrix(n_in, n_out, false),
                bilinear_matrix(n_in, n_out, true),
            ] {
                for r in 0..n_out {
                    let s: f32 = m[r * n_in..(r + 1) * n_in].iter().sum();
                    assert!((s - 1.0).abs() < 1e-5, "{n_in}->{n_out} row {r}: {s}");
                }
            }
        }
    }

    /// Hand-computed: 2 -> 4 with align_corners=False has sources -0.25, 0.25, 0.75, 1.25.
    #[test]
    fn bilinear_half_pixel_by_hand() {
        let m = bilinear_matrix(2, 4, false);
        let want = [1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0];
        for (a, b) in m.iter().zip(want) {
            assert!((a - b).abs() < TOL, "{m:?}");
        }
    }

    /// Hand-computed: 2 -> 3 with align_corners=True has sources 0, 0.5, 1.
    #[test]
    fn bilinear_align_corners_by_hand() {
        let m = bilinear_matrix(2, 3, true);
        let want = [1.0, 0.0, 0.5, 0.5, 0.0, 1.0];
        for (a, b) in m.iter().zip(want) {
            assert!((a - b).abs() < TOL, "{m:?}");
        }
    }

    /// torch: F.interpolate(torch.tensor([[[[0.,1.,2.,3.]]]]), size=(1,8), mode="bicubic")
    /// = [-0.10546875, 0.19140625, 0.66796875, 1.296875, 1.703125, 2.33203125, 2.80859375, 3.10546875]
    #[test]
    fn bicubic_matches_torch_on_a_ramp() {
        let m = bicubic_matrix(4, 8);
        let x = [0.0f32, 1.0, 2.0, 3.0];
        // Exact binary fractions, as PyTorch prints them.
        #[allow(clippy::excessive_precision)]
        let want = [
            -0.10546875,
            0.19140625,
            0.66796875,
            1.296875,
            1.703125,
            2.33203125,
            2.80859375,
            3.10546875,
        ];
        for o in 0..8 {
            let y: f32 = (0..4).map(|i| m[o * 4 + i] * x[i]).sum();
            assert!((y - want[o]).abs() < 1e-5, "{o}: {y} vs {}", want[o]);
        }
    }
}
