//! One (image, head) of the fused attention (`kernels::attention_into`): where its q,
//! k, v and output lie ([`HeadJob`]), the head fused on a bf16 unit ([`bf16_fused`]) and in f32
//! on AVX-512 or AVX2 ([`f32_fused`], at the end of this file).
//!
//! Why a fused head: the blocked form (`S` for 256 queries stored as f32 through a GEMM
//! epilogue, a softmax pass over it, then packing the probabilities to bf16 for `P v`) spent
//! ~70% of a ViT-L/14@518 attention moving `S` (perf on an AMX Xeon: the exponentials ~34%, the
//! f32 stores of `S` ~18%, packing `P` ~17%, the tile products ~17%). The fused head works on
//! blocks of 32 queries:
//! 1. `S = q kᵀ` in 32 × 32 tiles, stored as they come out of the accumulators into a buffer
//!    that stays in L2 (32 × L f32: 175 KB at 1370 tokens);
//! 2. each row's softmax in two passes over the row (its max, then `exp(x − max)`, the sum, and
//!    the bf16 rounding into the tiles that `P v` reads: no f32 copy of `P`, no packing pass);
//! 3. `O = P v` with the accumulators in tiles over all the keys, `1 / Σ` (and a head weight)
//!    applied as `O` is stored.
//!
//! The softmax is exact per row (not flash attention's running max), so `O` is never rescaled,
//! and the result is the blocked form's up to the order of the softmax sum.

use super::gemm_bf16::{
    self, as_lines, block32, pack_columns, pack_rows, tiles_off, tiles_on, BView, Block, Kernel,
    Line, PackedA, ZERO_LINE,
};
use super::gemm_f32::F32Kernel;
use super::matrix::{with_scratch, ASrc, MatRef};

/// One (image, head) of an attention: `lq` queries over `l` tokens of `hd` features, q, k and v
/// at columns `cols` of rows `d3` apart in `xs`, the output at `out` (rows `ld` apart).
pub(crate) struct HeadJob<'a> {
    pub xs: &'a [f32],
    pub d3: usize,
    pub l: usize,
    pub lq: usize,
    pub hd: usize,
    pub cols: (usize, usize, usize),
    pub scale: f32,
    /// Additive `[L, L]`, row `i` for query `i`.
    pub mask: Option<&'a [f32]>,
    /// A factor on the head's output (HeadCLIP's head weights; 1 otherwise).
    pub weight: f32,
    pub out: *mut f32,
    pub ld: usize,
}

impl HeadJob<'_> {
    /// `xs` from column `col` on, with row stride `rs` and column stride `cs`.
    pub fn view(&self, col: usize, rs: usize, cs: usize) -> MatRef<'_> {
        MatRef {
            data: &self.xs[col..],
            rs,
            cs,
        }
    }
}

/// Whether [`bf16_fused`] takes heads of `hd` features on `kernel`: two k-steps of 32 for
/// `q kᵀ` and two 32-column halves of `O` (ViT-B/16 and ViT-L/14 have 64), and AVX512-BF16 for
/// rounding the probabilities (every CPU with either bf16 unit has it).
pub(crate) fn fused_fits(hd: usize, kernel: Kernel) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (33..=64).contains(&hd)
            && gemm_bf16::available().contains(&kernel)
            && gemm_bf16::packing_simd()
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (hd, kernel);
        false
    }
}

/// Queries per block: two 16-row tile groups.
const QUERY_BLOCK: usize = 32;
/// f32s between the 32 × 32 score blocks of a query block: one cache line more than a block,
/// so one row's 128-byte pieces of successive blocks fall in different L1 sets (at 4 KB apart
/// all 43 of a 1370-token row would share one set and the second pass would miss).
const S_STRIDE: usize = 32 * 32 + 16;

/// The head on `kernel` (see the module docs).
///
/// # Safety
/// [`fused_fits`]`(job.hd, kernel)`; `job.out` holds `lq` rows of `hd` floats, `ld` apart,
/// that no other thread writes.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn bf16_fused(job: &HeadJob, kernel: Kernel) {
    debug_assert!(fused_fits(job.hd, kernel));
    let (l, hd, d3) = (job.l, job.hd, job.d3);
    let (qcol, kcol, vcol) = job.cols;
    let chunks = l.div_ceil(32); // k-steps of `P v`, 32 keys each
    let kt_len = BView::scratch_len(hd, l);
    let v_len = BView::scratch_len(l, hd);
    let q_len = PackedA::len(QUERY_BLOCK, 64) * 16;
    let p_len = PackedA::len(QUERY_BLOCK, 32 * chunks) * 16;
    let s_len = chunks * S_STRIDE;
    with_scratch(kt_len + v_len + q_len + p_len + s_len + 1024, |buf| {
        let (kt, rest) = buf.split_at_mut(kt_len);
        let (v, rest) = rest.split_at_mut(v_len);
        let (q_buf, rest) = rest.split_at_mut(q_len);
        let (p_buf, rest) = rest.split_at_mut(p_len);
        let (s_buf, o_buf) = rest.split_at_mut(s_len);
        // kᵀ as B[hd, L] (k-steps padded to 64) and v as B[L, hd], once for all the queries.
        let kt = pack_columns(&job.xs[kcol..], d3, hd, l, kt);
        let v = pack_rows(&job.xs[vcol..], d3, l, hd, v);
        let (q_lines, p_lines) = (as_lines(q_buf), as_lines(p_buf));
        let o = block_at(o_buf, 0);
        tiles_on(kernel);
        for row0 in (0..job.lq).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(job.lq - row0);
            let q = ASrc::View(job.view(qcol + row0 * d3, d3, 1));
            gemm_bf16::pack_a(&q, rows, hd, 64, false, q_lines);
            let qa = PackedA {
                kp: 64,
                lines: q_lines,
            };
            for c in 0..chunks {
                let keys = (kt.block(2 * c), kt.block(2 * c + 1));
                let s = block_at(s_buf, c * S_STRIDE);
                block32(
                    kernel,
                    (qa.group(0, 0), qa.group(1, 0)),
                    keys,
                    2,
                    rows,
                    s,
                    false,
                );
            }
            let mut inv = [0f32; QUERY_BLOCK];
            for (r, inv) in inv.iter_mut().enumerate() {
                if r >= rows {
                    // Padding rows: zero probabilities, outputs not stored.
                    (0..chunks).for_each(|c| *p_line(p_lines, chunks, r, c) = ZERO_LINE);
                    continue;
                }
                let mask = job.mask.map(|m| &m[(row0 + r) * l..(row0 + r + 1) * l]);
                let sum = softmax_row(s_buf, r, l, job.scale, mask, p_lines, chunks);
                *inv = 1.0 / sum * job.weight;
            }
            let pa = PackedA {
                kp: 32 * chunks,
                lines: p_lines,
            };
            for half in 0..2 {
                let values = (v.block(2 * half), v.block(2 * half + 1));
                block32(
                    kernel,
                    (pa.group(0, 0), pa.group(1, 0)),
                    values,
                    chunks,
                    rows,
                    o,
                    false,
                );
                let cols = 32.min(hd - 32 * half);
                for (r, &inv) in inv.iter().enumerate().take(rows) {
                    let dst = job.out.add((row0 + r) * job.ld + 32 * half);
                    for (cc, &x) in o.0[r * 32..r * 32 + cols].iter().enumerate() {
                        *dst.add(cc) = x * inv;
                    }
                }
            }
        }
        tiles_off(kernel);
    })
}

/// The 32 × 32 block at `buf[at..]`.
fn block_at(buf: &mut [f32], at: usize) -> &mut Block {
    let block = &mut buf[at..at + 32 * 32];
    assert!((block.as_ptr() as usize).is_multiple_of(64));
    // SAFETY: `Block` is 1024 plain f32s with 64-byte alignment, both checked above.
    unsafe { &mut *(block.as_mut_ptr() as *mut Block) }
}

/// Row `r`'s line of the probabilities' tiles for keys `32 c ..` (row `r % 16` of group
/// `r / 16`'s tile for k-step `c`, [`PackedA`]'s layout).
#[inline(always)]
fn p_line(lines: &mut [Line], chunks: usize, r: usize, c: usize) -> &mut Line {
    &mut lines[((r / 16) * chunks + c) * 16 + r % 16]
}

/// Row `r` of the query block: `x = s · scale + mask` over the `l` keys, `e = exp(x − max x)`
/// rounded to bf16 into the row's lines of `P` (zero past `l`); returns `Σ e` of the unrounded
/// values (the softmax's denominator, as the blocked form sums).
///
/// # Safety
/// The CPU has AVX-512 F/BW, AVX512-BF16 and FMA ([`fused_fits`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
unsafe fn softmax_row(
    s: &[f32],
    r: usize,
    l: usize,
    scale: f32,
    mask: Option<&[f32]>,
    p: &mut [Line],
    chunks: usize,
) -> f32 {
    use super::elementwise::exp16_nonpositive;
    use std::arch::x86_64::*;
    assert!(s.len() >= (chunks - 1) * S_STRIDE + 32 * 32 && 32 * chunks >= l && r < 32);
    assert!(mask.is_none_or(|m| m.len() >= l));
    let scale = _mm512_set1_ps(scale);
    let minus_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let row = s.as_ptr().add(r * 32);
    // Keys `32 c + 16 h ..` that are real (all but in the last chunk).
    let lanes = |c: usize, h: usize| -> __mmask16 {
        let k = l.saturating_sub(32 * c + 16 * h).min(16);
        ((1u32 << k) - 1) as __mmask16
    };
    // `s · scale (+ mask)` of keys `32 c + 16 h ..` in lanes `k`, `-inf` in the others.
    let x = |c: usize, h: usize, k: __mmask16| -> __m512 {
        let v = _mm512_mul_ps(
            _mm512_maskz_loadu_ps(k, row.add(c * S_STRIDE + 16 * h)),
            scale,
        );
        let v = match mask {
            Some(m) => _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, m.as_ptr().add(32 * c + 16 * h))),
            None => v,
        };
        if k == !0 {
            v
        } else {
            _mm512_mask_blend_ps(k, minus_inf, v)
        }
    };
    // The max. Without a mask, `max(s) · scale` is `max(s · scale)` (scale > 0 and rounding is
    // monotonic), so the full chunks need only the raw scores. `x > m ? x : m` passes a NaN
    // score over, as the blocked form's max does.
    let full = if mask.is_none() { l / 32 } else { 0 };
    let (mut raw, mut scaled) = ([minus_inf; 2], [minus_inf; 2]);
    for c in 0..chunks {
        for h in 0..2 {
            if c < full {
                raw[h] = _mm512_max_ps(_mm512_load_ps(row.add(c * S_STRIDE + 16 * h)), raw[h]);
            } else {
                scaled[h] = _mm512_max_ps(x(c, h, lanes(c, h)), scaled[h]);
            }
        }
    }
    let max = (_mm512_reduce_max_ps(_mm512_max_ps(raw[0], raw[1])) * _mm512_cvtss_f32(scale))
        .max(_mm512_reduce_max_ps(_mm512_max_ps(scaled[0], scaled[1])));
    let max = _mm512_set1_ps(max);
    let mut sums = [_mm512_setzero_ps(); 2];
    for c in 0..chunks {
        let mut e = [_mm512_setzero_ps(); 2];
        for h in 0..2 {
            // Keys past `l` are `-inf`, and their exponentials 0.
            e[h] = exp16_nonpositive(_mm512_sub_ps(x(c, h, lanes(c, h)), max));
            sums[h] = _mm512_add_ps(sums[h], e[h]);
        }
        // `vcvtne2ps2bf16`: round to nearest even, as packing `P` did.
        let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(e[1], e[0]));
        _mm512_store_si512(p_line(p, chunks, r, c).0.as_mut_ptr() as *mut _, bits);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(sums[0], sums[1]))
}

/// Keys per pass of `Oᵀ = Vᵀ Pᵀ` in the fused f32 head: a slice of `Pᵀ` (32 KB on AVX-512)
/// stays in L1 while every feature tile reads it.
const F32_KEY_PASS: usize = 256;

/// Whether [`f32_fused`] takes a head on `kernel`: the AVX-512 or AVX2 f32 kernel, heads of
/// whole feature tiles ([`Lanes::FEATURES`]), no mask (the text tower's causal heads are 77
/// tokens and keep the blocked form) and f32 probabilities (the emulated bf16 path rounds them,
/// and keeps the blocked form).
pub(crate) fn f32_fused_fits(hd: usize, kernel: F32Kernel, masked: bool, round: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let features = match kernel {
            F32Kernel::Avx512 => Avx512::FEATURES,
            F32Kernel::Avx2 => Avx2::FEATURES,
            F32Kernel::Portable => return false,
        };
        hd > 0
            && hd.is_multiple_of(features)
            && !masked
            && !round
            && super::gemm_f32::available().contains(&kernel)
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (hd, kernel, masked, round);
        false
    }
}

/// A head in f32, fused per block of `2 W` queries (two `W`-lane vectors across a row of `Sᵀ`;
/// 32 on AVX-512, 16 on AVX2): the blocked form's products and softmax (`kernels::head_f32`),
/// in the same order, without its padding of `Vᵀ` to whole 12-row panels (64 features computed
/// 72), its generic epilogues and its separate max pass:
/// 1. `Sᵀ = (K Qᵀ) · scale` in `KEYS × 2W` register tiles into an `[L, 2W]` buffer in L2, the
///    column maxima kept as the tiles are stored;
/// 2. `exp(s − max)` in place down the columns, the column sums in two vectors;
/// 3. `Oᵀ = Vᵀ Pᵀ` in `FEATURES × 2W` tiles over passes of 256 keys, and `O = Oᵀᵀ · (w / Σ)`
///    stored.
///
/// Every sum runs in the blocked form's order (`d` ascending for a score, keys ascending for
/// the max, the denominators and `O`) and the exponential is `exp_approx` bit for bit, so the
/// result equals `kernels::head_f32`'s exactly. One ViT-L/14@518 layer (16 heads × 1,370
/// tokens) on two Xeon cores, AVX-512: ~36 ms blocked, ~26 ms fused.
///
/// # Safety
/// [`f32_fused_fits`] holds for the job on `kernel`; `job.out` holds `lq` rows of `hd` floats,
/// `ld` apart, that no other thread writes.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn f32_fused(job: &HeadJob, kernel: F32Kernel) {
    debug_assert!(f32_fused_fits(job.hd, kernel, job.mask.is_some(), false));
    // The scratch closure sits in the functions compiled for the instruction set (a closure
    // takes the target features of the function it is written in, not those of a generic
    // function it would be written in, and without them no vector operation inlines).
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn avx512(job: &HeadJob) {
        with_scratch(scratch_len::<Avx512>(job), |buf| {
            fused::<Avx512, { Avx512::KEYS }, { Avx512::FEATURES }>(job, buf)
        })
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(job: &HeadJob) {
        with_scratch(scratch_len::<Avx2>(job), |buf| {
            fused::<Avx2, { Avx2::KEYS }, { Avx2::FEATURES }>(job, buf)
        })
    }
    match kernel {
        F32Kernel::Avx512 => avx512(job),
        F32Kernel::Avx2 => avx2(job),
        F32Kernel::Portable => unreachable!("f32_fused_fits refuses the portable kernel"),
    }
}

/// The vector operations of the fused f32 head on `W` lanes, and its tile shapes: `KEYS` rows
/// of `Sᵀ` and `FEATURES` rows of `Oᵀ` per register tile (two vectors each), so that the
/// tiles' accumulators, two operand vectors and a broadcast fit the register file.
///
/// # Safety
/// Every method needs the instruction set of its implementation (the callers are compiled
/// for it).
#[cfg(target_arch = "x86_64")]
trait Lanes {
    type V: Copy;
    const W: usize;
    const KEYS: usize;
    const FEATURES: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a · b + c`, rounded once.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a > b ? a : b`, keeping `b` where `a` is NaN (as `f32::max(b, a)`).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `exp_approx` on arguments `≤ 0` (also `-inf` and NaN), bit for bit.
    unsafe fn exp_nonpositive(x: Self::V) -> Self::V;
}

#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx512 {
    type V = std::arch::x86_64::__m512;
    const W: usize = 16;
    /// 12 × 32: 24 accumulators of 32 registers.
    const KEYS: usize = 12;
    /// 8 × 32: 16 accumulators, and 64 features in 8 tiles.
    const FEATURES: usize = 8;
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn splat(x: f32) -> Self::V {
        std::arch::x86_64::_mm512_set1_ps(x)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm512_storeu_ps(p, v)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        // `vmaxps` returns the second operand where either is NaN.
        std::arch::x86_64::_mm512_max_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn exp_nonpositive(x: Self::V) -> Self::V {
        super::elementwise::exp16_nonpositive(x)
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2 {
    type V = std::arch::x86_64::__m256;
    const W: usize = 8;
    /// 6 × 16: 12 accumulators of 16 registers.
    const KEYS: usize = 6;
    /// 4 × 16: 8 accumulators, and 64 features in 16 tiles.
    const FEATURES: usize = 4;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn splat(x: f32) -> Self::V {
        std::arch::x86_64::_mm256_set1_ps(x)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm256_storeu_ps(p, v)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        // `vmaxps` returns the second operand where either is NaN.
        std::arch::x86_64::_mm256_max_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_nonpositive(x: Self::V) -> Self::V {
        super::elementwise::exp8_nonpositive(x)
    }
}

/// [`f32_fused`] on `L`'s lanes and tiles.
///
/// # Safety
/// As [`f32_fused`]; the CPU has `L`'s instruction set and the caller is compiled for it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fused<L: Lanes, const KEYS: usize, const FEATURES: usize>(
    job: &HeadJob,
    buf: &mut [f32],
) {
    let (l, hd, d3) = (job.l, job.hd, job.d3);
    let (qcol, kcol, vcol) = job.cols;
    let (keys, features, queries) = (KEYS, FEATURES, 2 * L::W);
    let key_tiles = l.div_ceil(keys);
    let [k_len, v_len, q_len, p_len, _] = scratch_parts::<L>(job);
    {
        let (kp, rest) = buf.split_at_mut(k_len);
        let (vt, rest) = rest.split_at_mut(v_len);
        let (qt, rest) = rest.split_at_mut(q_len);
        let (pt, ot) = rest.split_at_mut(p_len);
        let xs = job.xs;
        for (t, tile) in kp.chunks_exact_mut(keys * hd).enumerate() {
            for r in 0..keys {
                let key = t * keys + r;
                for d in 0..hd {
                    tile[d * keys + r] = if key < l {
                        xs[kcol + key * d3 + d]
                    } else {
                        0.0
                    };
                }
            }
        }
        for (f, tile) in vt.chunks_exact_mut(l * features).enumerate() {
            for (key, line) in tile.chunks_exact_mut(features).enumerate() {
                let at = vcol + key * d3 + f * features;
                line.copy_from_slice(&xs[at..at + features]);
            }
        }
        let scale = L::splat(job.scale);
        for row0 in (0..job.lq).step_by(queries) {
            let rows = queries.min(job.lq - row0);
            // Qᵀ, zero past the block's queries (their scores are 0, never stored).
            for (d, line) in qt.chunks_exact_mut(queries).enumerate() {
                for (c, x) in line.iter_mut().enumerate() {
                    *x = if c < rows {
                        xs[qcol + (row0 + c) * d3 + d]
                    } else {
                        0.0
                    };
                }
            }
            // 1. Sᵀ and its column maxima.
            let mut max = [L::splat(f32::NEG_INFINITY); 2];
            for t in 0..key_tiles {
                let valid = keys.min(l - t * keys);
                let acc = s_tile::<L, KEYS>(hd, kp.as_ptr().add(t * keys * hd), qt.as_ptr());
                for (r, acc) in acc.iter().enumerate().take(valid) {
                    let dst = pt.as_mut_ptr().add((t * keys + r) * queries);
                    for h in 0..2 {
                        let s = L::mul(acc[h], scale);
                        L::store(dst.add(L::W * h), s);
                        max[h] = L::max(s, max[h]);
                    }
                }
            }
            // 2. exp(s − max) in place, and the sums.
            let mut sum = [L::zero(); 2];
            for line in pt.chunks_exact_mut(queries) {
                for h in 0..2 {
                    let p = line.as_mut_ptr().add(L::W * h);
                    let e = L::exp_nonpositive(L::sub(L::load(p), max[h]));
                    sum[h] = L::add(sum[h], e);
                    L::store(p, e);
                }
            }
            let mut inv = [0f32; 32];
            for (h, &sum) in sum.iter().enumerate() {
                L::store(inv.as_mut_ptr().add(L::W * h), sum);
            }
            inv.iter_mut().for_each(|i| *i = 1.0 / *i * job.weight);
            // 3. Oᵀ = Vᵀ Pᵀ, then O scaled by w / Σ per query.
            for k0 in (0..l).step_by(F32_KEY_PASS) {
                let kc = F32_KEY_PASS.min(l - k0);
                for f in 0..hd / features {
                    o_tile::<L, FEATURES>(
                        kc,
                        vt.as_ptr().add((f * l + k0) * features),
                        pt.as_ptr().add(k0 * queries),
                        ot.as_mut_ptr().add(f * features * queries),
                        k0 > 0,
                    );
                }
            }
            for (c, &inv) in inv.iter().enumerate().take(rows) {
                let dst = job.out.add((row0 + c) * job.ld);
                for e in 0..hd {
                    *dst.add(e) = ot[e * queries + c] * inv;
                }
            }
        }
    }
}

/// The lengths of [`fused`]'s buffers on `L`: K packed `[tile][d][KEYS keys]`, `Vᵀ`
/// `[feature tile][key][FEATURES]`, `Qᵀ` `[d][2W]`, `Sᵀ` (then `Pᵀ`) `[key][2W]` and `Oᵀ`
/// `[feature][2W]`.
#[cfg(target_arch = "x86_64")]
fn scratch_parts<L: Lanes>(job: &HeadJob) -> [usize; 5] {
    let queries = 2 * L::W;
    [
        job.l.div_ceil(L::KEYS) * L::KEYS * job.hd,
        job.hd * job.l,
        job.hd * queries,
        job.l * queries,
        job.hd * queries,
    ]
}

#[cfg(target_arch = "x86_64")]
fn scratch_len<L: Lanes>(job: &HeadJob) -> usize {
    scratch_parts::<L>(job).iter().sum()
}

/// One `KEYS × 2W` tile of `Sᵀ`: keys `K[KEYS, hd]` (packed `[d][KEYS]` at `k`) times
/// `Qᵀ[hd, 2W]` (at `q`), summed over `d` ascending.
///
/// # Safety
/// `k` holds `KEYS · hd` floats and `q` `2W · hd`; the CPU has `L`'s instruction set.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn s_tile<L: Lanes, const KEYS: usize>(
    hd: usize,
    k: *const f32,
    q: *const f32,
) -> [[L::V; 2]; KEYS] {
    let mut acc = [[L::zero(); 2]; KEYS];
    let (mut k, mut q) = (k, q);
    for _ in 0..hd {
        let q0 = L::load(q);
        let q1 = L::load(q.add(L::W));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = L::splat(*k.add(r));
            acc[0] = L::fmadd(x, q0, acc[0]);
            acc[1] = L::fmadd(x, q1, acc[1]);
        }
        k = k.add(KEYS);
        q = q.add(2 * L::W);
    }
    acc
}

/// One `FEATURES × 2W` tile of `Oᵀ` over `kc` keys: `Vᵀ[FEATURES, kc]` (packed
/// `[key][FEATURES]` at `v`) times `Pᵀ[kc, 2W]` (at `p`), into `o` (`[FEATURES][2W]`, added to
/// it with `load`).
///
/// # Safety
/// `v` holds `FEATURES · kc` floats, `p` `2W · kc` and `o` `FEATURES · 2W`; the CPU has `L`'s
/// instruction set.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn o_tile<L: Lanes, const FEATURES: usize>(
    kc: usize,
    v: *const f32,
    p: *const f32,
    o: *mut f32,
    load: bool,
) {
    let q = 2 * L::W;
    let mut acc = [[L::zero(); 2]; FEATURES];
    if load {
        for (r, acc) in acc.iter_mut().enumerate() {
            acc[0] = L::load(o.add(r * q));
            acc[1] = L::load(o.add(r * q + L::W));
        }
    }
    let (mut v, mut p) = (v, p);
    for _ in 0..kc {
        let p0 = L::load(p);
        let p1 = L::load(p.add(L::W));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = L::splat(*v.add(r));
            acc[0] = L::fmadd(x, p0, acc[0]);
            acc[1] = L::fmadd(x, p1, acc[1]);
        }
        v = v.add(FEATURES);
        p = p.add(q);
    }
    for (r, acc) in acc.iter().enumerate() {
        L::store(o.add(r * q), acc[0]);
        L::store(o.add(r * q + L::W), acc[1]);
    }
}
