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
    Line, PackedA, RowLines, ZERO_LINE,
};
use super::gemm_f32::F32Kernel;
#[cfg(target_arch = "x86_64")]
use super::lanes::{self, Avx2, Avx512, Lanes};
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
    /// Instead of `out`: the head's output as bf16 into the output projection's packed rows,
    /// `(rows, row0, col0)`: query `i` is row `row0 + i`, feature `c` column `col0 + c` (a
    /// multiple of 32). Only [`bf16_fused`] writes it, for heads of a multiple of 32 features.
    pub packed: Option<(RowLines, usize, usize)>,
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
                if let Some((lines, prow0, col0)) = job.packed {
                    debug_assert!(hd.is_multiple_of(32) && col0.is_multiple_of(32));
                    for (r, &inv) in inv.iter().enumerate().take(rows) {
                        // Each (image, head) task writes the lines of its own rows and columns.
                        let line = &mut *lines.line(prow0 + row0 + r, (col0 + 32 * half) / 32);
                        scaled_bf16_line(&o.0[r * 32..r * 32 + 32], inv, line);
                    }
                    continue;
                }
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

/// `line ⟵ bf16(o · inv)` for 32 values: the f32 products the f32 output would hold, rounded
/// as packing them for the next GEMM rounds them (`vcvtne2ps2bf16`, nearest even).
///
/// # Safety
/// The CPU has AVX-512 F/BW and AVX512-BF16 ([`fused_fits`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn scaled_bf16_line(o: &[f32], inv: f32, line: &mut Line) {
    use std::arch::x86_64::*;
    assert!(o.len() >= 32);
    let inv = _mm512_set1_ps(inv);
    let lo = _mm512_mul_ps(_mm512_loadu_ps(o.as_ptr()), inv);
    let hi = _mm512_mul_ps(_mm512_loadu_ps(o.as_ptr().add(16)), inv);
    let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
    _mm512_store_si512(line.0.as_mut_ptr() as *mut _, bits);
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

/// Keys × features per register tile of the fused f32 head (`Sᵀ` and `Oᵀ` rows, two vectors
/// each): on AVX-512 12 × 32 (24 accumulators of 32 registers) and 8 × 32 (16, and 64 features
/// in 8 tiles); on AVX2 6 × 16 (12 of 16) and 4 × 16 (8, 64 features in 16 tiles).
const AVX512_TILES: (usize, usize) = (12, 8);
const AVX2_TILES: (usize, usize) = (6, 4);

/// Keys per pass of `Oᵀ = Vᵀ Pᵀ` in the fused f32 head: a slice of `Pᵀ` (32 KB on AVX-512)
/// stays in L1 while every feature tile reads it.
const F32_KEY_PASS: usize = 256;

/// Whether [`f32_fused`] takes a head on `kernel`: the AVX-512 or AVX2 f32 kernel, heads of
/// whole feature tiles (8 features on AVX-512, 4 on AVX2), no mask (the text tower's causal heads are 77
/// tokens and keep the blocked form) and f32 probabilities (the emulated bf16 path rounds them,
/// and keeps the blocked form).
pub(crate) fn f32_fused_fits(hd: usize, kernel: F32Kernel, masked: bool, round: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let features = match kernel {
            F32Kernel::Avx512 => AVX512_TILES.1,
            F32Kernel::Avx2 => AVX2_TILES.1,
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
        with_scratch(scratch_len::<Avx512>(job, AVX512_TILES.0), |buf| {
            fused::<Avx512, { AVX512_TILES.0 }, { AVX512_TILES.1 }>(job, buf)
        })
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(job: &HeadJob) {
        with_scratch(scratch_len::<Avx2>(job, AVX2_TILES.0), |buf| {
            fused::<Avx2, { AVX2_TILES.0 }, { AVX2_TILES.1 }>(job, buf)
        })
    }
    match kernel {
        F32Kernel::Avx512 => avx512(job),
        F32Kernel::Avx2 => avx2(job),
        F32Kernel::Portable => unreachable!("f32_fused_fits refuses the portable kernel"),
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
    let [k_len, v_len, q_len, p_len, _] = scratch_parts(job, L::W, KEYS);
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
                // A `KEYS × 2W` tile over `d`: K packed `[d][KEYS]` times Qᵀ `[d][2W]`.
                let k = kp.as_ptr().add(t * keys * hd);
                let acc =
                    lanes::tile::<L, KEYS>(hd, k, keys, qt.as_ptr(), None, lanes::Prefetch::NONE);
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
                    // A `FEATURES × 2W` tile over the pass's keys: Vᵀ packed `[key][FEATURES]`
                    // times Pᵀ `[key][2W]`, added to the previous passes' sums.
                    let o = ot.as_mut_ptr().add(f * features * queries);
                    let acc = lanes::tile::<L, FEATURES>(
                        kc,
                        vt.as_ptr().add((f * l + k0) * features),
                        features,
                        pt.as_ptr().add(k0 * queries),
                        (k0 > 0).then_some(o as *const f32),
                        lanes::Prefetch::NONE,
                    );
                    lanes::store::<L, FEATURES>(&acc, o);
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

/// The lengths of [`fused`]'s buffers on `w` lanes and tiles of `keys`: K packed `[tile][d][keys]`, `Vᵀ`
/// `[feature tile][key][FEATURES]`, `Qᵀ` `[d][2W]`, `Sᵀ` (then `Pᵀ`) `[key][2W]` and `Oᵀ`
/// `[feature][2W]`.
#[cfg(target_arch = "x86_64")]
fn scratch_parts(job: &HeadJob, w: usize, keys: usize) -> [usize; 5] {
    let queries = 2 * w;
    [
        job.l.div_ceil(keys) * keys * job.hd,
        job.hd * job.l,
        job.hd * queries,
        job.l * queries,
        job.hd * queries,
    ]
}

#[cfg(target_arch = "x86_64")]
fn scratch_len<L: Lanes>(job: &HeadJob, keys: usize) -> usize {
    scratch_parts(job, L::W, keys).iter().sum()
}
