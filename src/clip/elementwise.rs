//! Vectorised element-wise math of the CPU kernels: `exp`, the two GELUs, bf16 rounding and
//! LayerNorm statistics. The loops are written so LLVM vectorises them; the `*_in_place`
//! wrappers compile them again with AVX2+FMA / AVX-512 and pick one at run time (the crate
//! itself targets baseline x86-64). The `*_generic` forms are `#[inline(always)]` so the GEMM
//! epilogues (`matrix::Epi`), compiled inside the kernels' AVX-512 / AVX2 functions, get the
//! vector code too.

pub(crate) use crate::device::{simd, Simd};

/// `ln 2` in two parts (the high one exact in few bits), for `r = x − n ln 2` without
/// cancellation error.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding 1.5 · 2²³ rounds to an integer in the low mantissa bits (vectorises, unlike `round`,
/// which is a libm call per element).
const MAGIC: f32 = 12_582_912.0;
/// Below this `exp` is 0 (and above it `2ⁿ` is a normal number).
const EXP_FLOOR: f32 = -87.3;
/// The Taylor coefficients of `exp(r)` after the leading `1 / 7!`, for Horner's rule.
const EXP_TAYLOR: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `exp(x)` within 2 ulp for x in [-87.3, 88.7]; exactly 0 below (so -inf masks give 0).
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    let xc = x.clamp(EXP_FLOOR, 88.7);
    let t = xc.mul_add(std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    // Taylor to degree 7 on |r| <= ln2/2: truncation error < 5e-9 relative. Horner in fused
    // multiply-adds: 7 instructions where a multiply and an add each were 14 (the vector
    // callers are compiled with FMA; a CPU without it is before 2013 and takes libm's fmaf).
    let p = EXP_TAYLOR
        .iter()
        .fold(1.0f32 / 5040.0, |p, &c| p.mul_add(r, c));
    let scaled = p * f32::from_bits(((ni + 127) as u32) << 23);
    if x < EXP_FLOOR {
        0.0
    } else {
        scaled
    }
}

/// [`exp_approx`] on 16 lanes of softmax arguments `x = s − max ≤ 0` (also `-inf` and NaN),
/// bit for bit, in 14 instructions: no upper clamp (nothing is above 0), `vscalefps` for
/// `p · 2ⁿ` (n ≥ −126 after the clamp, so the product is the same exact scaling) with the
/// lanes below −87.3 zeroed in the same instruction.
///
/// # Safety
/// The CPU has AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn exp16_nonpositive(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let floor = _mm512_set1_ps(EXP_FLOOR);
    // `max(floor, x)` returns x where x is NaN (the second operand), as `clamp` does.
    let xc = _mm512_max_ps(floor, x);
    let t = _mm512_fmadd_ps(
        xc,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(MAGIC),
    );
    let n = _mm512_sub_ps(t, _mm512_set1_ps(MAGIC));
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), xc);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in EXP_TAYLOR {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    // Kept unless x < −87.3 (NaN compares unordered: kept, and stays NaN).
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, floor);
    _mm512_maskz_scalef_ps(keep, p, n)
}

/// [`exp_approx`] on 8 lanes of softmax arguments `x ≤ 0` (also `-inf` and NaN), bit for bit,
/// on AVX2: [`exp16_nonpositive`]'s steps with `2ⁿ` built from its exponent bits (n ≥ −126
/// after the clamp, a normal number) instead of `vscalefps`, and the lanes below −87.3 zeroed.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp8_nonpositive(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let floor = _mm256_set1_ps(EXP_FLOOR);
    // `max(floor, x)` returns x where x is NaN (the second operand), as `clamp` does.
    let xc = _mm256_max_ps(floor, x);
    let t = _mm256_fmadd_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(MAGIC),
    );
    let n = _mm256_sub_ps(t, _mm256_set1_ps(MAGIC));
    let ni = _mm256_sub_epi32(
        _mm256_castps_si256(t),
        _mm256_set1_epi32(MAGIC.to_bits() as i32),
    );
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), xc);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in EXP_TAYLOR {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        ni,
        _mm256_set1_epi32(127),
    )));
    let scaled = _mm256_mul_ps(p, two_n);
    // Zero where x < −87.3 (NaN compares unordered: kept, and stays NaN).
    let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, floor);
    _mm256_andnot_ps(below, scaled)
}

/// `x ← exp(x − max x)` over the row; returns the sum (the softmax's denominator).
#[inline(always)]
fn exp_shifted_generic(row: &mut [f32]) -> f32 {
    let mut maxes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (m, &x) in maxes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&maxes)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0.0f32;
    // Eight partial sums keep the reduction vectorised.
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
            *x = exp_approx(*x - max);
            *a += *x;
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_approx(*x - max);
        sum += *x;
    }
    sum + acc.iter().sum::<f32>()
}

/// `1 / d` for `d >= 1` without a division (a vector division costs 10-16 cycles per 16
/// lanes): a bit-level first guess, then three Newton steps (error 12% → 1.5% → 2e-4 → 5e-8,
/// then f32 rounding), each `r + r (1 − d r)` in two fused multiply-adds (three operations
/// as `r (2 − d r)`, whose residual `1 − d r` is also rounded once more).
#[inline(always)]
fn recip_at_least_one(d: f32) -> f32 {
    let d = d.min(1e30);
    let mut r = f32::from_bits(0x7EF3_11C3u32.wrapping_sub(d.to_bits()));
    for _ in 0..3 {
        r = r.mul_add((-d).mul_add(r, 1.0), r);
    }
    r
}

#[inline(always)]
pub(crate) fn quick_gelu_generic(xs: &mut [f32]) {
    xs.iter_mut()
        .for_each(|x| *x *= recip_at_least_one(1.0 + exp_approx(-1.702 * *x)));
}

/// `erf(x)` as a rational function on [-4, 4] (saturating outside): within 1e-7 of the exact
/// value, the accuracy of the f32 erf that torch and candle evaluate.
#[inline(always)]
fn erf_approx(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_4e-5);
    p = p.mul_add(x2, -7.349_906_3e-4);
    p = p.mul_add(x2, -2.954_600_1e-3);
    p = p.mul_add(x2, -1.609_603_3e-2);
    let mut q = -1.456_607_2e-5f32;
    q = q.mul_add(x2, -2.133_740_6e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329_3e-3);
    q = q.mul_add(x2, -1.426_474e-2);
    x * p / q
}

#[inline(always)]
pub(crate) fn gelu_generic(xs: &mut [f32]) {
    xs.iter_mut()
        .for_each(|x| *x = 0.5 * *x * (1.0 + erf_approx(*x * std::f32::consts::FRAC_1_SQRT_2)));
}

/// Rounds every value to the nearest bfloat16 (ties to even), kept as f32: what an autocast
/// `x.to(bfloat16)` keeps of it.
#[inline(always)]
pub(crate) fn round_bf16_generic(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| {
        let b = x.to_bits();
        let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
        // NaN stays NaN (rounding could carry its payload into infinity).
        *x = if x.is_nan() {
            *x
        } else {
            f32::from_bits(rounded)
        };
    })
}

/// `(mean, 1 / sqrt(var + eps))` of a row, the variance biased (torch's LayerNorm), both
/// passes in f32 with eight partial sums.
#[inline(always)]
fn mean_rstd_generic(row: &[f32], eps: f32) -> [f32; 2] {
    let n = row.len().max(1) as f32;
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        acc.iter_mut().zip(c).for_each(|(a, &x)| *a += x);
    }
    let mean = (acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()) / n;
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        acc.iter_mut()
            .zip(c)
            .for_each(|(a, &x)| *a += (x - mean) * (x - mean));
    }
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|&x| (x - mean) * (x - mean))
        .sum();
    let var = (acc.iter().sum::<f32>() + rest) / n;
    [mean, 1.0 / (var + eps).sqrt()]
}

/// LayerNorm statistics of each `d`-wide row of `x` into `stats`.
#[inline(always)]
fn layer_norm_stats_generic(x: &[f32], d: usize, eps: f32, stats: &mut [[f32; 2]]) {
    for (s, row) in stats.iter_mut().zip(x.chunks_exact(d)) {
        *s = mean_rstd_generic(row, eps);
    }
}

crate::device::dispatch!(
    /// `x ← exp(x − max x)` over the row; returns the sum.
    pub exp_shifted_in_place => exp_shifted_generic(row: &mut [f32]) -> f32
);
crate::device::dispatch!(
    /// `x ← x σ(1.702 x)`.
    pub quick_gelu_in_place => quick_gelu_generic(xs: &mut [f32]) -> ()
);
crate::device::dispatch!(
    /// `x ← x Φ(x)` (exact erf).
    pub gelu_in_place => gelu_generic(xs: &mut [f32]) -> ()
);
crate::device::dispatch!(
    /// Rounds to bf16 (nearest, ties to even), kept as f32.
    pub round_bf16_in_place => round_bf16_generic(xs: &mut [f32]) -> ()
);
crate::device::dispatch!(
    /// `(mean, rstd)` of every `d`-wide row of `x`.
    pub layer_norm_stats => layer_norm_stats_generic(x: &[f32], d: usize, eps: f32, stats: &mut [[f32; 2]]) -> ()
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -87.0 + 175.0 * (i as f32 / 200_000.0);
            let (a, b) = (exp_approx(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
    }

    /// The 16-lane (AVX-512) and 8-lane (AVX2) softmax exponentials are `exp_approx` bit for bit
    /// on everything they are given.
    #[test]
    fn vector_exps_equal_exp_approx_on_nonpositive_arguments() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            let mut xs: Vec<f32> = (0..400_000)
                .map(|i| -110.0 * i as f32 / 400_000.0)
                .collect();
            xs.extend([
                f32::NEG_INFINITY,
                f32::NAN,
                -0.0,
                0.0,
                -87.3,
                -87.299_99,
                -f32::MIN_POSITIVE,
            ]);
            xs.extend((0..16).map(|_| 0.0));
            let check = |chunk: &[f32], got: &[f32]| {
                for (&x, &g) in chunk.iter().zip(got) {
                    let want = exp_approx(x);
                    assert!(
                        g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                        "exp({x}): {g} vs {want}"
                    );
                }
            };
            let fma = std::is_x86_feature_detected!("fma");
            if std::is_x86_feature_detected!("avx512f") && fma {
                for chunk in xs.chunks_exact(16) {
                    let mut got = [0f32; 16];
                    // SAFETY: the features were detected above.
                    unsafe {
                        let v = exp16_nonpositive(_mm512_loadu_ps(chunk.as_ptr()));
                        _mm512_storeu_ps(got.as_mut_ptr(), v);
                    }
                    check(chunk, &got);
                }
            } else {
                eprintln!("skipped: exp16 needs AVX-512 and FMA, which this CPU lacks");
            }
            if std::is_x86_feature_detected!("avx2") && fma {
                for chunk in xs.chunks_exact(8) {
                    let mut got = [0f32; 8];
                    // SAFETY: the features were detected above.
                    unsafe {
                        let v = exp8_nonpositive(_mm256_loadu_ps(chunk.as_ptr()));
                        _mm256_storeu_ps(got.as_mut_ptr(), v);
                    }
                    check(chunk, &got);
                }
            } else {
                eprintln!("skipped: exp8 needs AVX2 and FMA, which this CPU lacks");
            }
        }
    }

    #[test]
    fn reciprocal_is_within_an_ulp_or_two() {
        for i in 0..100_000 {
            let d = 1.0 + (i as f32) * 0.37 + (i as f32).powi(3) * 1e-3;
            let (got, want) = (recip_at_least_one(d), 1.0 / d);
            assert!(((got - want) / want).abs() < 3e-7, "1/{d}: {got} vs {want}");
        }
        assert!(recip_at_least_one(f32::INFINITY) <= 1e-30);
    }

    #[test]
    fn layer_norm_stats_match_f64() {
        let x: Vec<f32> = crate::rng::SplitMix64(3)
            .normal(3 * 77, 2.0)
            .iter()
            .map(|v| v + 5.0)
            .collect();
        let mut stats = vec![[0f32; 2]; 3];
        layer_norm_stats(&x, 77, 1e-5, &mut stats);
        for (row, s) in x.chunks(77).zip(&stats) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 77.0;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 77.0;
            assert!((s[0] as f64 - mean).abs() < 1e-5);
            assert!((s[1] as f64 - 1.0 / (var + 1e-5).sqrt()).abs() < 1e-5);
        }
    }
}
