//! bfloat16 GEMM on the CPU's bf16 units, with f32 accumulation: Intel AMX tiles (`tdpbf16ps`,
//! Sapphire Rapids and later) where present, AVX512-BF16 (`vdpbf16ps`, AMD Zen 4/5, Intel Cooper
//! Lake and later) otherwise. `--precision bf16` runs the backbone's linear layers and attention
//! products on it.
//!
//! Why our own kernels: the `gemm` crate (candle's) has no bf16 dot-product path, and oneDNN
//! exists here only behind the optional `onednn` feature (a system library), while every
//! default build should use the bf16 units of the CPU it lands on. The kernels are small: one
//! 32 x 32 AMX block (four accumulator tiles) and one 8 x 32 AVX-512 block (sixteen accumulator
//! registers), over operands packed once into the pair-interleaved layout both instructions read.
//!
//! Numerics: each operand is rounded to bf16 (nearest, ties to even, what `tensor.to(bfloat16)`
//! does) and the products are summed in f32, so results equal an f32 GEMM of the rounded
//! operands up to summation order (and the units' flushing of bf16 subnormals, below 1.2e-38).
//!
//! Layouts (`Line` = 64 bytes = 32 bf16):
//! - [`PackedB`] `B[k, n]`: 16 columns per block, k in pairs: element `(kk, j)` at
//!   `((j / 16) · kp/2 + kk / 2) · 32 + (j % 16) · 2 + kk % 2`. One line is one k-pair of one
//!   column block: a `vdpbf16ps` operand, and 16 consecutive lines are one AMX B tile.
//! - packed A: row-major `[mp, kp]`; 16 rows × one line is an AMX A tile, and a `u32` of a row
//!   is the k-pair `vdpbf16ps` broadcasts.
//!
//! `k` is padded to a multiple of 32 and `m`, `n` to multiples of 32 with zeros, so every
//! micro-kernel call is a full block; only the valid part of a block is written to `C`.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::elementwise::{simd, Simd};
use super::matrix::{with_scratch, ASrc, Epi, MatRef, SendPtr};

/// A bf16 unit this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles: `tdpbf16ps` on 16 × 16 f32 accumulator tiles.
    Amx,
    /// AVX512-BF16: `vdpbf16ps` on 16-lane registers.
    Avx512Bf16,
}

impl Kernel {
    /// The name `zsad info` and `zsad bench --json` report.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx-bf16",
            Kernel::Avx512Bf16 => "avx512-bf16",
        }
    }
}

/// Every bf16 kernel this CPU (and its OS) can run, best first.
pub fn available() -> &'static [Kernel] {
    static AVAILABLE: OnceLock<Vec<Kernel>> = OnceLock::new();
    AVAILABLE.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Vec<Kernel> {
    let mut found = Vec::new();
    if amx_usable() {
        found.push(Kernel::Amx);
    }
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16") {
        found.push(Kernel::Avx512Bf16);
    }
    found
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Vec<Kernel> {
    Vec::new()
}

/// AMX-BF16 and AMX-TILE in CPUID, and Linux's permission for this process to use the tile
/// state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, which fails where the kernel or
/// a hypervisor does not enable it). The permission is process-wide, so every thread may then
/// execute tile instructions.
#[cfg(target_arch = "x86_64")]
fn amx_usable() -> bool {
    let (max_leaf, leaf7) = (
        std::arch::x86_64::__cpuid(0).eax,
        std::arch::x86_64::__cpuid_count(7, 0),
    );
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    if max_leaf < 7 || !amx_bf16 || !amx_tile {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with this request only changes the process's permission bits.
        let status = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        status == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The kernel `--precision bf16` uses: the best one available, unless `ZSAD_BF16_KERNEL`
/// names another (`amx-bf16`, `avx512-bf16`, or `none` for the f32 emulation), for comparing
/// them on one machine. A name this CPU cannot run falls back to the best available.
pub fn selected() -> Option<Kernel> {
    static SELECTED: OnceLock<Option<Kernel>> = OnceLock::new();
    *SELECTED.get_or_init(|| {
        let best = available().first().copied();
        match std::env::var("ZSAD_BF16_KERNEL").ok().as_deref() {
            Some("none") => None,
            Some(name) => available()
                .iter()
                .copied()
                .find(|k| k.name() == name)
                .or(best),
            None => best,
        }
    })
}

/// One cache line of bf16 values (stored as their bits).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [u16; 32]);

pub(crate) const ZERO_LINE: Line = Line([0; 32]);

/// The bf16 bits of `x`, rounded to nearest with ties to even; NaN stays NaN.
#[inline(always)]
pub(crate) fn to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// The right operand `B[k, n]` of a GEMM, in bf16, in the kernels' layout.
pub struct PackedB {
    k: usize,
    n: usize,
    kp: usize,
    np: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB {{ k: {}, n: {} }}", self.k, self.n)
    }
}

impl PackedB {
    /// Packs `B` given by `at(kk, j)`, the bf16 bits of element `(kk, j)`.
    fn pack(k: usize, n: usize, parallel: bool, at: impl Fn(usize, usize) -> u16 + Sync) -> Self {
        let kp = k.div_ceil(32) * 32;
        let np = n.div_ceil(32) * 32;
        let mut lines = vec![ZERO_LINE; np / 16 * kp / 2];
        let fill = |jb: usize, block: &mut [Line]| {
            let cols = 16.min(n.saturating_sub(jb * 16));
            for (p, line) in block.iter_mut().enumerate().take(k.div_ceil(2)) {
                for c in 0..cols {
                    let j = jb * 16 + c;
                    line.0[2 * c] = at(2 * p, j);
                    if 2 * p + 1 < k {
                        line.0[2 * c + 1] = at(2 * p + 1, j);
                    }
                }
            }
        };
        if kp == 0 {
            // k = 0: nothing to pack (and no chunks to split the empty buffer into).
        } else if parallel {
            lines
                .par_chunks_mut(kp / 2)
                .enumerate()
                .for_each(|(jb, block)| fill(jb, block));
        } else {
            lines
                .chunks_mut(kp / 2)
                .enumerate()
                .for_each(|(jb, block)| fill(jb, block));
        }
        Self {
            k,
            n,
            kp,
            np,
            lines,
        }
    }

    /// `B = Wᵀ` for a linear layer's weight `W: [n, k]` (row-major bf16), the layout the
    /// checkpoint stores.
    pub fn from_weight(w: &[half::bf16], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "PackedB::from_weight: {n} x {k} weight");
        Self::pack(k, n, true, |kk, j| w[j * k + kk].to_bits())
    }

    /// `B[k, n]` from an f32 view (element `(kk, j)` at `data[kk · rs + j · cs]`), rounded to
    /// bf16. `parallel = false` packs on the calling thread.
    pub fn from_f32(b: MatRef, k: usize, n: usize, parallel: bool) -> Self {
        b.check(k, n, "PackedB::from_f32");
        Self::pack(k, n, parallel, |kk, j| {
            to_bf16_bits(b.data[kk * b.rs + j * b.cs])
        })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// `W = Bᵀ` back as row-major bf16 `[n, k]` (for the slow paths that need the tensor).
    pub fn to_weight(&self) -> Vec<half::bf16> {
        let mut w = vec![half::bf16::ZERO; self.n * self.k];
        w.par_chunks_mut(self.k.max(1))
            .enumerate()
            .for_each(|(j, row)| {
                for (kk, x) in row.iter_mut().enumerate() {
                    let line = &self.lines[(j / 16) * (self.kp / 2) + kk / 2];
                    *x = half::bf16::from_bits(line.0[(j % 16) * 2 + kk % 2]);
                }
            });
        w
    }

    /// Borrowed, as the kernels read it.
    fn view(&self) -> BView<'_> {
        BView {
            k: self.k,
            n: self.n,
            kp: self.kp,
            np: self.np,
            lines: &self.lines,
        }
    }
}

/// A packed `B[k, n]` ([`PackedB`]'s layout) in borrowed lines: a weight, or keys and values
/// packed per attention head into a scratch buffer.
#[derive(Clone, Copy)]
pub(crate) struct BView<'a> {
    pub(crate) k: usize,
    n: usize,
    kp: usize,
    np: usize,
    lines: &'a [Line],
}

impl BView<'_> {
    /// The lines of column block `jb` (16 columns, `kp / 2` k-pairs).
    pub(crate) fn block(&self, jb: usize) -> &[Line] {
        &self.lines[jb * (self.kp / 2)..(jb + 1) * (self.kp / 2)]
    }

    /// f32s of scratch that packing `B[k, n]` takes.
    pub(crate) fn scratch_len(k: usize, n: usize) -> usize {
        k.div_ceil(32) * 32 * n.div_ceil(32) * 32 / 2
    }
}

/// The lines of an f32 scratch buffer (64-byte aligned, a multiple of 16 f32s).
pub(crate) fn as_lines(buf: &mut [f32]) -> &mut [Line] {
    assert!(buf.len().is_multiple_of(16) && (buf.as_ptr() as usize).is_multiple_of(64));
    // SAFETY: `Line` is 64 bytes of plain data with 64-byte alignment, checked above.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut Line, buf.len() / 16) }
}

/// Packs `B[k, n]` with `B(kk, j) = rows[j · rs + kk]` (rows of a row-major matrix read as
/// columns: attention's `kᵀ`), rounded to bf16, into `buf` ([`BView::scratch_len`] f32s).
pub(crate) fn pack_columns<'a>(
    rows: &[f32],
    rs: usize,
    k: usize,
    n: usize,
    buf: &'a mut [f32],
) -> BView<'a> {
    assert!(
        n == 0 || (n - 1) * rs + k <= rows.len(),
        "pack_columns: {n} rows of {k}"
    );
    pack_view(rows, rs, k, n, buf, true)
}

/// [`pack_columns`] (`columns`) or [`pack_rows`] into `buf`, on AVX-512 where the CPU has it.
fn pack_view<'a>(
    rows: &[f32],
    rs: usize,
    k: usize,
    n: usize,
    buf: &'a mut [f32],
    columns: bool,
) -> BView<'a> {
    let lines = as_lines(&mut buf[..BView::scratch_len(k, n)]);
    let fill = match columns {
        true => fill_columns,
        false => fill_rows,
    };
    #[cfg(target_arch = "x86_64")]
    let fill = if packing_simd() {
        // SAFETY: the features were detected; the callers checked the rows' bounds.
        match columns {
            true => |r: &[f32], rs, k, n, l: &mut [Line]| unsafe {
                vector::fill_columns(r, rs, k, n, l)
            },
            false => {
                |r: &[f32], rs, k, n, l: &mut [Line]| unsafe { vector::fill_rows(r, rs, k, n, l) }
            }
        }
    } else {
        fill
    };
    fill(rows, rs, k, n, lines);
    BView {
        k,
        n,
        kp: k.div_ceil(32) * 32,
        np: n.div_ceil(32) * 32,
        lines,
    }
}

/// [`pack_columns`]'s lines, one element at a time.
fn fill_columns(rows: &[f32], rs: usize, k: usize, n: usize, lines: &mut [Line]) {
    let kp = k.div_ceil(32) * 32;
    lines.fill(ZERO_LINE);
    let mut bits = vec![0u16; kp];
    for j in 0..n {
        let row = &rows[j * rs..j * rs + k];
        for (b, &x) in bits.iter_mut().zip(row) {
            *b = to_bf16_bits(x);
        }
        let block = &mut lines[(j / 16) * (kp / 2)..(j / 16 + 1) * (kp / 2)];
        let slot = (j % 16) * 2;
        for (line, pair) in block.iter_mut().zip(bits.chunks_exact(2)) {
            line.0[slot] = pair[0];
            line.0[slot + 1] = pair[1];
        }
    }
}

/// Packs `B[k, n]` with `B(t, c) = rows[t · rs + c]` (a row-major matrix: attention's `v`),
/// rounded to bf16, into `buf` ([`BView::scratch_len`] f32s).
pub(crate) fn pack_rows<'a>(
    rows: &[f32],
    rs: usize,
    k: usize,
    n: usize,
    buf: &'a mut [f32],
) -> BView<'a> {
    assert!(
        k == 0 || (k - 1) * rs + n <= rows.len(),
        "pack_rows: {k} rows of {n}"
    );
    pack_view(rows, rs, k, n, buf, false)
}

/// [`pack_rows`]'s lines, one element at a time.
fn fill_rows(rows: &[f32], rs: usize, k: usize, n: usize, lines: &mut [Line]) {
    let kp = k.div_ceil(32) * 32;
    lines.fill(ZERO_LINE);
    let mut r = vec![0u16; 2 * n];
    for p in 0..k.div_ceil(2) {
        for h in 0..2 {
            let t = 2 * p + h;
            for (c, b) in r[h * n..(h + 1) * n].iter_mut().enumerate() {
                *b = if t < k {
                    to_bf16_bits(rows[t * rs + c])
                } else {
                    0
                };
            }
        }
        for c in 0..n {
            let line = &mut lines[(c / 16) * (kp / 2) + p].0;
            line[(c % 16) * 2] = r[c];
            line[(c % 16) * 2 + 1] = r[n + c];
        }
    }
}

/// Whether the vector packing of attention's `kᵀ` and `v` runs here (AVX-512 BW and BF16).
#[cfg(target_arch = "x86_64")]
pub(crate) fn packing_simd() -> bool {
    static SIMD: OnceLock<bool> = OnceLock::new();
    *SIMD.get_or_init(|| {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
    })
}

/// The packings of attention's `kᵀ` and `v` on AVX-512: `vcvtne2ps2bf16` rounds as
/// [`to_bf16_bits`] does (bf16 units flush subnormals anyway), a word permutation interleaves
/// the k-pairs of `v`, and a 16 × 16 transpose of 32-bit pairs turns rows of `k` into columns.
#[cfg(target_arch = "x86_64")]
mod vector {
    use crate::clip::gemm_bf16::{Line, ZERO_LINE};
    use std::arch::x86_64::*;

    /// The lanes `< n − from` of 16 (all of them from 16 on).
    #[inline(always)]
    fn lanes(n: usize, from: usize) -> __mmask16 {
        let k = n.saturating_sub(from).min(16);
        ((1u32 << k) - 1) as __mmask16
    }

    /// The bf16 bits of 32 values at `at` in lanes `k` (0 elsewhere; only those lanes are
    /// read): word `i` of the result is value `i`.
    #[inline(always)]
    unsafe fn bf16_32(at: *const f32, k: [__mmask16; 2]) -> __m512i {
        let lo = _mm512_maskz_loadu_ps(k[0], at);
        let hi = _mm512_maskz_loadu_ps(k[1], at.wrapping_add(16));
        std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo))
    }

    /// As [`fill_columns`](crate::clip::gemm_bf16::fill_columns).
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; `rows[j · rs .. j · rs + k]` in bounds for `j < n`; `lines` holds
    /// [`BView::scratch_len`](crate::clip::gemm_bf16::BView::scratch_len)`(k, n) / 16` lines.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn fill_columns(rows: &[f32], rs: usize, k: usize, n: usize, lines: &mut [Line]) {
        let kp = k.div_ceil(32) * 32;
        let np = n.div_ceil(32) * 32;
        assert!(lines.len() >= np / 16 * kp / 2);
        for jb in 0..np / 16 {
            let block = &mut lines[jb * (kp / 2)..(jb + 1) * (kp / 2)];
            for kc in (0..kp).step_by(32) {
                // Row j of the block: its 16 k-pairs from `kc` as 32-bit lanes.
                let mut r = [_mm512_setzero_si512(); 16];
                for (c, r) in r.iter_mut().enumerate() {
                    let j = jb * 16 + c;
                    if j < n {
                        let k = [lanes(k, kc), lanes(k, kc + 16)];
                        *r = bf16_32(rows.as_ptr().wrapping_add(j * rs + kc), k);
                    }
                }
                let t = transpose16(r);
                for (q, t) in t.iter().enumerate() {
                    _mm512_store_si512(block[kc / 2 + q].0.as_mut_ptr() as *mut _, *t);
                }
            }
        }
    }

    /// As [`fill_group`](crate::clip::gemm_bf16::fill_group) for a source read in place: a
    /// row-major view, or LayerNorm of one, a tile at a time with the tile's gamma and beta in
    /// registers and no copy through a row buffer. One thread, ViT-B/16's 197 × 768 on the
    /// Xeon: LayerNorm rows 51 → 23 µs, a view 39 → 14 µs against the line-at-a-time form
    /// (`fill_group_lines`). LayerNorm's steps are that form's own, unfused and in its order
    /// (`((x − mean) · rstd) · gamma + beta`), so the values are the same bits; the lanes past
    /// `k` are zero.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; the source holds `m × k` ([`ASrc::check`]); `group` holds
    /// `k.div_ceil(32)` tiles of 16 lines.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn fill_group(src: Src, m: usize, k: usize, g: usize, group: &mut [Line]) {
        let steps = k.div_ceil(32);
        assert!(group.len() >= steps * 16);
        let valid = 16.min(m.saturating_sub(16 * g));
        let store = |line: &mut Line, v: [__m512; 2]| {
            let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(v[1], v[0]));
            _mm512_store_si512(line.0.as_mut_ptr() as *mut _, bits);
        };
        // A tile (k-step) at a time, its 16 lines in order: the stores fill one 1 KB tile
        // while the loads run along 16 rows.
        for s in 0..steps {
            let kc = 32 * s;
            let keep = [lanes(k, kc), lanes(k, kc + 16)];
            let tile = &mut group[s * 16..s * 16 + 16];
            match src {
                Src::View { data, rs } => {
                    for (r, line) in tile.iter_mut().enumerate().take(valid) {
                        let at = data.wrapping_add((16 * g + r) * rs + kc);
                        let lo = _mm512_maskz_loadu_ps(keep[0], at);
                        let hi = _mm512_maskz_loadu_ps(keep[1], at.wrapping_add(16));
                        store(line, [lo, hi]);
                    }
                }
                Src::Norm {
                    x,
                    ld,
                    stats,
                    gamma,
                    beta,
                } => {
                    let gb = |h: usize, v: *const f32| {
                        _mm512_maskz_loadu_ps(keep[h], v.wrapping_add(kc + 16 * h))
                    };
                    let (g0, g1, b0, b1) = (gb(0, gamma), gb(1, gamma), gb(0, beta), gb(1, beta));
                    for (r, line) in tile.iter_mut().enumerate().take(valid) {
                        let i = 16 * g + r;
                        let [mean, rstd] = *stats.add(i);
                        let (mean, rstd) = (_mm512_set1_ps(mean), _mm512_set1_ps(rstd));
                        let at = x.wrapping_add(i * ld + kc);
                        let norm = |h: usize, g: __m512, b: __m512| {
                            let x = _mm512_maskz_loadu_ps(keep[h], at.wrapping_add(16 * h));
                            let y = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(x, mean), rstd), g);
                            // Lanes past `k` are 0, whatever `mean` makes of them.
                            _mm512_maskz_add_ps(keep[h], y, b)
                        };
                        store(line, [norm(0, g0, b0), norm(1, g1, b1)]);
                    }
                }
            }
            tile[valid..].fill(ZERO_LINE);
        }
    }

    /// A row-major [`ASrc`](crate::clip::matrix::ASrc) as raw pointers (the bounds were checked
    /// by the caller).
    #[derive(Clone, Copy)]
    pub enum Src {
        View {
            data: *const f32,
            rs: usize,
        },
        Norm {
            x: *const f32,
            ld: usize,
            stats: *const [f32; 2],
            gamma: *const f32,
            beta: *const f32,
        },
    }

    /// The 16 × 16 transpose of 32-bit lanes: row `c` of the result is lane `c` of every input.
    #[inline(always)]
    unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // Lane L of u[4 i + q] holds rows 4 i .. 4 i + 4 at column 4 L + q.
        let mut u = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        // Column 4 L + q is lane L of u[q], u[4 + q], u[8 + q], u[12 + q].
        let mut out = [_mm512_setzero_si512(); 16];
        for q in 0..4 {
            let even_a = _mm512_shuffle_i32x4::<0x88>(u[q], u[4 + q]);
            let even_b = _mm512_shuffle_i32x4::<0x88>(u[8 + q], u[12 + q]);
            let odd_a = _mm512_shuffle_i32x4::<0xDD>(u[q], u[4 + q]);
            let odd_b = _mm512_shuffle_i32x4::<0xDD>(u[8 + q], u[12 + q]);
            out[q] = _mm512_shuffle_i32x4::<0x88>(even_a, even_b);
            out[8 + q] = _mm512_shuffle_i32x4::<0xDD>(even_a, even_b);
            out[4 + q] = _mm512_shuffle_i32x4::<0x88>(odd_a, odd_b);
            out[12 + q] = _mm512_shuffle_i32x4::<0xDD>(odd_a, odd_b);
        }
        out
    }

    /// As [`fill_rows`](crate::clip::gemm_bf16::fill_rows).
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; `rows[t · rs .. t · rs + n]` in bounds for `t < k`; `lines` holds
    /// [`BView::scratch_len`](crate::clip::gemm_bf16::BView::scratch_len)`(k, n) / 16` lines.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn fill_rows(rows: &[f32], rs: usize, k: usize, n: usize, lines: &mut [Line]) {
        let kp = k.div_ceil(32) * 32;
        let np = n.div_ceil(32) * 32;
        assert!(lines.len() >= np / 16 * kp / 2);
        // Word 2 c + h of a line is value c of row h: words c and 16 + c of the conversion.
        let mut idx = [0u16; 32];
        for c in 0..16 {
            idx[2 * c] = c as u16;
            idx[2 * c + 1] = 16 + c as u16;
        }
        let idx = _mm512_loadu_si512(idx.as_ptr() as *const _);
        for p in 0..kp / 2 {
            let (t0, t1) = (2 * p, 2 * p + 1);
            for jb in 0..np / 16 {
                let line = &mut lines[jb * (kp / 2) + p];
                if t0 >= k {
                    *line = ZERO_LINE;
                    continue;
                }
                let kc = lanes(n, 16 * jb);
                let lo = _mm512_maskz_loadu_ps(kc, rows.as_ptr().wrapping_add(t0 * rs + 16 * jb));
                let hi = if t1 < k {
                    _mm512_maskz_loadu_ps(kc, rows.as_ptr().wrapping_add(t1 * rs + 16 * jb))
                } else {
                    _mm512_setzero_ps()
                };
                let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let bits = _mm512_permutexvar_epi16(idx, bits);
                _mm512_store_si512(line.0.as_mut_ptr() as *mut _, bits);
            }
        }
    }
}

/// The left operand `A[m, k]` rounded to bf16 in tiles: rows in groups of 16, each group a run
/// of `kp / 32` AMX A tiles (16 rows × one line, contiguous), zero-padded to a multiple of 32
/// rows. Borrowed from a per-thread scratch buffer (no allocation per product once warm).
pub(crate) struct PackedA<'a> {
    pub(crate) kp: usize,
    pub(crate) lines: &'a [Line],
}

impl PackedA<'_> {
    /// Lines for `m` rows.
    pub(crate) fn len(m: usize, kp: usize) -> usize {
        m.div_ceil(32) * 32 * kp / 32
    }

    /// The lines of row group `g` (16 rows) from k-step `s` on: tile `s + t` at `16 t`.
    pub(crate) fn group(&self, g: usize, s: usize) -> &[Line] {
        let steps = self.kp / 32;
        &self.lines[(g * steps + s) * 16..(g + 1) * steps * 16]
    }
}

/// Packs `A` into `lines` ([`PackedA::len`] of them), rounding to bf16.
pub(crate) fn pack_a(a: &ASrc, m: usize, k: usize, kp: usize, parallel: bool, lines: &mut [Line]) {
    // The vector packing reads the source through raw pointers: its bounds, checked once here.
    a.check(m, k, "bf16 packing");
    assert!(
        kp >= k && lines.len() >= PackedA::len(m, kp),
        "bf16 packing: too few lines"
    );
    let group_lines = kp / 32 * 16;
    if kp == 0 {
        return; // k = 0: an empty product, nothing to pack.
    }
    let fill = |(g, group): (usize, &mut [Line])| fill_group(a, m, k, g, group);
    if parallel {
        lines.par_chunks_mut(group_lines).enumerate().for_each(fill);
    } else {
        lines.chunks_mut(group_lines).enumerate().for_each(fill);
    }
}

/// [`fill_group`] a line at a time through a row buffer, each line rounded by `convert`: the
/// reference form, and the path of sources [`vector::fill_group`] does not read in place.
#[inline(always)]
fn fill_group_lines(
    a: &ASrc,
    m: usize,
    k: usize,
    g: usize,
    group: &mut [Line],
    convert: impl Fn(&[f32; 32], &mut [u16; 32]),
) {
    let valid = 16.min(m.saturating_sub(16 * g));
    for r in 0..16 {
        for (kl, chunk) in (0..k).step_by(32).enumerate() {
            let line = &mut group[kl * 16 + r].0;
            if r >= valid {
                *line = [0; 32];
                continue;
            }
            let len = 32.min(k - chunk);
            let i = 16 * g + r;
            let mut row = [0f32; 32];
            match *a {
                // The common case read in place (no copy through `ASrc::row`).
                ASrc::View(v) if v.cs == 1 && len == 32 => {
                    row.copy_from_slice(&v.data[i * v.rs + chunk..i * v.rs + chunk + 32])
                }
                _ => a.row(i, chunk, &mut row[..len]),
            }
            convert(&row, line);
        }
    }
}

/// `to_bf16_bits` on a line.
fn scalar_line(row: &[f32; 32], line: &mut [u16; 32]) {
    for (d, &x) in line.iter_mut().zip(row) {
        *d = to_bf16_bits(x);
    }
}

/// Rounds rows `16 g ..` of `A` into their group of tiles (vectorised where the CPU allows);
/// rows past `m` and columns past `k` are zero.
fn fill_group(a: &ASrc, m: usize, k: usize, g: usize, group: &mut [Line]) {
    #[cfg(target_arch = "x86_64")]
    {
        if packing_simd() {
            let src = match *a {
                ASrc::View(v) if v.cs == 1 => Some(vector::Src::View {
                    data: v.data.as_ptr(),
                    rs: v.rs,
                }),
                ASrc::Norm {
                    x,
                    ld,
                    stats,
                    gamma,
                    beta,
                } => Some(vector::Src::Norm {
                    x: x.as_ptr(),
                    ld,
                    stats: stats.as_ptr(),
                    gamma: gamma.as_ptr(),
                    beta: beta.as_ptr(),
                }),
                ASrc::View(_) => None,
            };
            if let Some(src) = src {
                // SAFETY: the features were detected; the callers checked that the source
                // holds `m × k` (`ASrc::check`) and sized the group.
                return unsafe { vector::fill_group(src, m, k, g, group) };
            }
        }
        /// `vcvtne2ps2bf16`: round to nearest even, as `to_bf16_bits` (bf16 units treat
        /// subnormals as zero anyway).
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn bf16(a: &ASrc, m: usize, k: usize, g: usize, group: &mut [Line]) {
            use std::arch::x86_64::*;
            let convert = |row: &[f32; 32], line: &mut [u16; 32]| {
                let lo = _mm512_loadu_ps(row.as_ptr());
                let hi = _mm512_loadu_ps(row.as_ptr().add(16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(line.as_mut_ptr() as *mut _, v);
            };
            fill_group_lines(a, m, k, g, group, convert)
        }
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn avx512(
            a: &ASrc,
            m: usize,
            k: usize,
            g: usize,
            group: &mut [Line],
            convert: impl Fn(&[f32; 32], &mut [u16; 32]),
        ) {
            fill_group_lines(a, m, k, g, group, convert)
        }
        if std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the features it was compiled for were just detected.
            return unsafe { bf16(a, m, k, g, group) };
        }
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
            // SAFETY: as above.
            return unsafe { avx512(a, m, k, g, group, scalar_line) };
        }
    }
    fill_group_lines(a, m, k, g, group, scalar_line)
}

/// Rows and columns of `C` per parallel task: 64 × 128 keeps the task's A rows (128 KB at
/// k = 1024) and B columns (256 KB) in a core's L2 while its blocks run.
const TASK_ROWS: usize = 64;
const TASK_COLS: usize = 128;

/// `C[m, n] = (C if accumulate else 0) + alpha · A[m, k] · B[k, n]` on `kernel`, with `A` an f32
/// view rounded to bf16 while it is packed and `C` row-major with row stride `ldc`.
/// `parallel = false` stays on the calling thread (for callers already running one task per
/// core).
///
/// # Panics
/// If `kernel` is not [`available`] or a view is out of bounds (programming errors).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    kernel: Kernel,
    m: usize,
    a: MatRef,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    let epi = Epi {
        alpha,
        accumulate,
        ..Default::default()
    };
    gemm_epi(kernel, m, ASrc::View(a), b, c, ldc, &epi, parallel)
}

/// `dst ⟵ epi(A[m, k] · B)` on `kernel`, `A` read from `a` (a view, or LayerNorm applied to
/// rows) and rounded to bf16 while it is packed, `dst` with row stride `ld` (column stride if
/// `epi.transposed`).
///
/// # Panics
/// If `kernel` is not [`available`] or a view, vector or `dst` is too small (programming
/// errors).
#[allow(clippy::too_many_arguments)]
pub fn gemm_epi(
    kernel: Kernel,
    m: usize,
    a: ASrc,
    b: &PackedB,
    dst: &mut [f32],
    ld: usize,
    epi: &Epi,
    parallel: bool,
) {
    gemm_view(kernel, m, a, b.view(), dst, ld, epi, parallel)
}

/// [`gemm_epi`] on a borrowed packed `B`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_view(
    kernel: Kernel,
    m: usize,
    a: ASrc,
    b: BView,
    dst: &mut [f32],
    ld: usize,
    epi: &Epi,
    parallel: bool,
) {
    assert_available(kernel);
    let (k, n) = (b.k, b.n);
    a.check(m, k, "bf16 gemm lhs");
    epi.check(m, n);
    epi.check_dst(m, n, ld, dst.len());
    if m == 0 || n == 0 {
        return;
    }
    let lines = PackedA::len(m, b.kp);
    with_scratch(lines * 16, |buf| {
        // SAFETY: `Line` is 64 bytes of plain data, the scratch is 64-byte aligned f32s.
        let lines: &mut [Line] = &mut as_lines(buf)[..lines];
        pack_a(&a, m, k, b.kp, parallel, lines);
        let pa = PackedA { kp: b.kp, lines };
        let dst = Dst::F32 {
            c: SendPtr(dst.as_mut_ptr()),
            ld,
        };
        // SAFETY: `dst` holds the valid `m × n` result with stride `ld` (checked above).
        unsafe { run_tasks(kernel, m, &pa, &b, dst, epi, parallel) }
    })
}

/// Panics unless `kernel` runs on this CPU (a programming error: callers pick from
/// [`available`]).
fn assert_available(kernel: Kernel) {
    assert!(
        available().contains(&kernel),
        "bf16 kernel {} is not available on this CPU",
        kernel.name()
    );
}

/// Where the tasks put `C`.
#[derive(Clone, Copy)]
enum Dst {
    /// Row-major f32 through the epilogue, row stride `ld`.
    F32 { c: SendPtr, ld: usize },
    /// As the next GEMM's packed, bf16 `A` ([`PackedRows`]): `steps` k-steps of 32 per row
    /// group; padding rows and columns written as zero.
    Packed { lines: SendLines, steps: usize },
}

/// A raw pointer to lines that tasks write disjoint parts of.
#[derive(Clone, Copy)]
struct SendLines(*mut Line);
// SAFETY: as `SendPtr`: each task writes only its own block's lines, and the buffer outlives
// the parallel loop.
unsafe impl Send for SendLines {}
unsafe impl Sync for SendLines {}

/// Runs every task of `C[m, n] = A · B` into `dst`.
///
/// # Safety
/// `kernel` is [`available`]; `dst` holds the result (f32: the valid `m × n` part with its
/// stride; packed: [`PackedA::len`]`(m, np)` lines) and nothing else touches it meanwhile.
unsafe fn run_tasks(
    kernel: Kernel,
    m: usize,
    pa: &PackedA,
    b: &BView,
    dst: Dst,
    epi: &Epi,
    parallel: bool,
) {
    let task_rows = m.div_ceil(32) * 32;
    let tasks_m = task_rows.div_ceil(TASK_ROWS);
    let tasks_n = b.np.div_ceil(TASK_COLS);
    let run = |t: usize| {
        let (ti, tj) = task_at(t, tasks_m, tasks_n, b.kp);
        let rows = (ti * TASK_ROWS, ((ti + 1) * TASK_ROWS).min(task_rows));
        let cols = (tj * TASK_COLS, ((tj + 1) * TASK_COLS).min(b.np));
        let dst = dst;
        // SAFETY: the task's block of `dst` is disjoint from every other task's and inside
        // `dst` (the caller's contract); `kernel` is available.
        unsafe { task(kernel, pa, b, rows, cols, (m, b.n), dst, epi) }
    };
    if parallel {
        (0..tasks_m * tasks_n).into_par_iter().for_each(run);
    } else {
        (0..tasks_m * tasks_n).for_each(run);
    }
}

/// Activations `A[m, k]` in bf16, packed as a GEMM reads its left operand, written by the
/// previous GEMM's epilogue ([`gemm_to_packed`]) and read by the next ([`gemm_packed`]): the
/// MLP's hidden layer (fc1 → fc2) without its f32 copy (22 MB at ViT-L/14@518) or a packing
/// pass. Rounded as packing the f32 values would round them, so results are unchanged.
#[derive(Default)]
pub struct PackedRows {
    m: usize,
    k: usize,
    kp: usize,
    lines: Vec<Line>,
}

impl PackedRows {
    /// Rows and columns held.
    pub fn dims(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// Room for `m × k` (the buffer grows, never shrinks: it is reused per block).
    fn reset(&mut self, m: usize, k: usize) {
        self.kp = k.div_ceil(32) * 32;
        let len = PackedA::len(m, self.kp);
        if self.lines.len() < len {
            self.lines.resize(len, ZERO_LINE);
        }
        (self.m, self.k) = (m, k);
    }

    /// Room for `m × k` written line by line by the caller ([`Self::line`]): the rows past `m`
    /// are zeroed here (the padding the next GEMM reads), the others are left to the caller.
    pub(crate) fn prepare(&mut self, m: usize, k: usize) -> RowLines {
        self.reset(m, k);
        let steps = self.kp / 32;
        for row in m..m.div_ceil(32) * 32 {
            for s in 0..steps {
                self.lines[((row / 16) * steps + s) * 16 + row % 16] = ZERO_LINE;
            }
        }
        RowLines {
            lines: self.lines.as_mut_ptr(),
            steps,
            rows: m,
        }
    }
}

/// Where the rows of a [`PackedRows`] lie, for writers on several threads
/// ([`PackedRows::prepare`]).
#[derive(Clone, Copy)]
pub(crate) struct RowLines {
    lines: *mut Line,
    steps: usize,
    rows: usize,
}

// SAFETY: the writers store disjoint lines, and the buffer outlives them (`prepare` borrows it
// mutably; its users end before the buffer is read).
unsafe impl Send for RowLines {}
unsafe impl Sync for RowLines {}

impl RowLines {
    /// The line of row `row`, columns `32 s ..`, to write through while no other thread
    /// touches it.
    ///
    /// # Safety
    /// `row` is below the rows prepared and `s` below `k.div_ceil(32)`.
    #[inline]
    pub(crate) unsafe fn line(&self, row: usize, s: usize) -> *mut Line {
        debug_assert!(row < self.rows && s < self.steps);
        self.lines
            .add(((row / 16) * self.steps + s) * 16 + row % 16)
    }
}

/// `out ⟵ epi(A[m, k] · B)` as bf16 in the layout of the next GEMM's left operand: the
/// epilogue's values (bias, activation) rounded to bf16 in place of f32 stores. `epi` must not
/// accumulate or transpose (there is nothing to add to, and the layout is fixed).
///
/// # Panics
/// As [`gemm_epi`], and on an accumulating or transposed `epi`.
pub fn gemm_to_packed(
    kernel: Kernel,
    m: usize,
    a: ASrc,
    b: &PackedB,
    epi: &Epi,
    out: &mut PackedRows,
    parallel: bool,
) {
    assert_available(kernel);
    assert!(
        !epi.accumulate && !epi.transposed,
        "gemm_to_packed: a plain epilogue"
    );
    let b = b.view();
    a.check(m, b.k, "bf16 gemm lhs");
    epi.check(m, b.n);
    out.reset(m, b.n);
    if m == 0 {
        return;
    }
    let lines = PackedA::len(m, b.kp);
    with_scratch(lines * 16, |buf| {
        let lines: &mut [Line] = &mut as_lines(buf)[..lines];
        pack_a(&a, m, b.k, b.kp, parallel, lines);
        let pa = PackedA { kp: b.kp, lines };
        let dst = Dst::Packed {
            lines: SendLines(out.lines.as_mut_ptr()),
            steps: out.kp / 32,
        };
        // SAFETY: `out` holds `PackedA::len(m, np)` lines (`reset`: its `kp` is `b.np`).
        unsafe { run_tasks(kernel, m, &pa, &b, dst, epi, parallel) }
    })
}

/// [`gemm_epi`] with `A` given packed ([`gemm_to_packed`]'s output).
///
/// # Panics
/// As [`gemm_epi`], and if `a`'s width is not `b`'s depth.
pub fn gemm_packed(
    kernel: Kernel,
    a: &PackedRows,
    b: &PackedB,
    dst: &mut [f32],
    ld: usize,
    epi: &Epi,
    parallel: bool,
) {
    assert_available(kernel);
    let (m, b) = (a.m, b.view());
    assert_eq!(a.k, b.k, "gemm_packed: A is {} wide, B {} deep", a.k, b.k);
    epi.check(m, b.n);
    epi.check_dst(m, b.n, ld, dst.len());
    if m == 0 || b.n == 0 {
        return;
    }
    let pa = PackedA {
        kp: a.kp,
        lines: &a.lines[..PackedA::len(m, a.kp)],
    };
    let dst = Dst::F32 {
        c: SendPtr(dst.as_mut_ptr()),
        ld,
    };
    // SAFETY: `dst` holds the valid `m × n` result with stride `ld` (checked above).
    unsafe { run_tasks(kernel, m, &pa, &b, dst, epi, parallel) }
}

/// The tasks run in groups of columns whose packed B takes at most this many bytes (512
/// columns of a 1024-deep weight, 128 of a 4096-deep one), each group's B staying in L2 while
/// every row block of A passes over it, each A row block reused by the group's tasks. Row by
/// row over all the columns instead, the whole of B (8 MB for ViT-L's MLP) streamed from L3
/// once per 64 rows. Best of interleaved runs on the 2-core Xeon (AMX), 1370 × 1024 @ 1024 ×
/// 4096: ~700 GFLOP/s row by row, ~1,400 grouped.
const GROUP_BYTES: usize = 1 << 20;

/// Task `t`'s (row block, column block) in the grouped order above, for B `kp` deep.
fn task_at(t: usize, tasks_m: usize, tasks_n: usize, kp: usize) -> (usize, usize) {
    let g = (GROUP_BYTES / (2 * kp * TASK_COLS).max(1)).clamp(1, tasks_n);
    let group = t / (tasks_m * g);
    let width = g.min(tasks_n - group * g);
    let within = t - group * tasks_m * g;
    (within / width, group * g + within % width)
}

/// k-steps (of 32) per pass over a task's blocks; the accumulators go back to the task's buffer
/// between passes. Best of 15 interleaved runs of the 1370 × 1024 @ 1024 × 4096 GEMM on the
/// 2-core Xeon (AMX) development machine, GFLOP/s for 2 / 4 / 8 / 16 / 32 / 64 steps:
/// 649 / 690 / 631 / 633 / 736 / 729 (a noisy host: differences under ~10% are not real).
const KC_STEPS: usize = 32;

/// One task: every 32 × 32 block of `C` in `rows` × `cols` (multiples of 32, at most
/// `TASK_ROWS` × `TASK_COLS`), written where it lies inside `valid = (m, n)` (or, packed,
/// every block with its padding zeroed).
///
/// # Safety
/// `kernel` is [`available`]; `dst` holds the task's part of the result, and no other thread
/// touches that part while the task runs.
#[allow(clippy::too_many_arguments)]
unsafe fn task(
    kernel: Kernel,
    a: &PackedA,
    b: &BView,
    rows: (usize, usize),
    cols: (usize, usize),
    valid: (usize, usize),
    dst: Dst,
    epi: &Epi,
) {
    const MAX_BLOCKS: usize = (TASK_ROWS / 32) * (TASK_COLS / 32);
    // A reused per-thread buffer, not zeroed (32 KB per task): the first pass overwrites every
    // block it stores.
    with_scratch(MAX_BLOCKS * 32 * 32, |buf| {
        // SAFETY: `Block` is 1024 plain f32s, 64-byte aligned like the scratch buffer.
        let acc =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut Block, MAX_BLOCKS) };
        task_blocks(kernel, a, b, rows, cols, valid, dst, epi, acc)
    })
}

/// [`task`] with its accumulators.
///
/// # Safety
/// As [`task`].
#[allow(clippy::too_many_arguments)]
unsafe fn task_blocks(
    kernel: Kernel,
    a: &PackedA,
    b: &BView,
    rows: (usize, usize),
    cols: (usize, usize),
    valid: (usize, usize),
    dst: Dst,
    epi: &Epi,
    acc: &mut [Block],
) {
    let (bi, bj) = ((rows.1 - rows.0) / 32, (cols.1 - cols.0) / 32);
    let steps = a.kp / 32;
    tiles_on(kernel);
    for s0 in (0..steps).step_by(KC_STEPS) {
        let pass = KC_STEPS.min(steps - s0);
        for j in 0..bj {
            let jb = (cols.0 + 32 * j) / 16;
            let (b0, b1) = (&b.block(jb)[s0 * 16..], &b.block(jb + 1)[s0 * 16..]);
            for i in 0..bi {
                let g = (rows.0 + 32 * i) / 16;
                let (a0, a1) = (a.group(g, s0), a.group(g + 1, s0));
                // Rows past `m` are never stored: a last block of 5 rows computes 16 (or 8).
                let valid_rows = valid.0.saturating_sub(rows.0 + 32 * i).clamp(1, 32);
                block32(
                    kernel,
                    (a0, a1),
                    (b0, b1),
                    pass,
                    valid_rows,
                    &mut acc[i * bj + j],
                    s0 > 0,
                );
            }
        }
    }
    tiles_off(kernel);
    if steps == 0 {
        acc.iter_mut().for_each(|b| b.0.fill(0.0));
    }
    let t = TaskBlocks {
        acc,
        bi,
        bj,
        rows,
        cols,
        valid,
    };
    match dst {
        Dst::F32 { c, ld } => store_blocks(t, c.0, ld, epi),
        Dst::Packed { lines, steps } => store_packed(t, lines.0, steps, epi),
    }
}

/// Prepares this thread for [`block32`] on `kernel` (the AMX tile configuration).
///
/// # Safety
/// `kernel` is [`available`].
pub(crate) unsafe fn tiles_on(kernel: Kernel) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Amx {
        amx::load_config();
    }
}

/// Ends a run of [`block32`] calls (releases the AMX tile state).
///
/// # Safety
/// As [`tiles_on`].
pub(crate) unsafe fn tiles_off(kernel: Kernel) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Amx {
        amx::release();
    }
}

/// `out (+)= A[32, 32 steps] · B[32 steps, 32]` on `kernel`: `a` the tiles of two 16-row groups
/// (one per k-step, 16 lines each, as [`PackedA::group`]), `b` two 16-column blocks of a packed
/// `B` from the same k-step on; `accumulate` starts from `out` instead of zero.
///
/// Only the first `rows` rows (1 to 32) of `out` are wanted: the others are computed only as
/// far as the unit's granularity needs (16 rows on AMX, 8 on AVX512-BF16) and hold whatever
/// that leaves. A product of 197 rows (ViT-B/16's tokens) computes 208 or 200 rows instead
/// of 224.
///
/// # Safety
/// [`tiles_on`] ran on this thread for `kernel`; the slices hold `steps` tiles each.
#[inline]
pub(crate) unsafe fn block32(
    kernel: Kernel,
    (a0, a1): (&[Line], &[Line]),
    (b0, b1): (&[Line], &[Line]),
    steps: usize,
    rows: usize,
    out: &mut Block,
    accumulate: bool,
) {
    debug_assert!((1..=32).contains(&rows));
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx => amx::block(
            a0,
            (rows > 16).then_some(a1),
            b0,
            b1,
            steps,
            out,
            accumulate,
        ),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => {
            for r in 0..rows.div_ceil(8) {
                let group = if r < 2 { a0 } else { a1 };
                avx512::block(
                    &group[(r % 2) * 8..],
                    b0,
                    b1,
                    steps,
                    &mut out.0[r * 8 * 32..(r + 1) * 8 * 32],
                    accumulate,
                )
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("no bf16 kernels off x86-64"),
    }
}

/// A task's accumulated 32 × 32 blocks (`bi` × `bj` of them, row-major) and where they lie:
/// rows `rows` and columns `cols` of `C`, of which `valid = (m, n)` is the result.
struct TaskBlocks<'a> {
    acc: &'a mut [Block],
    bi: usize,
    bj: usize,
    rows: (usize, usize),
    cols: (usize, usize),
    valid: (usize, usize),
}

/// The epilogue of a task's blocks, compiled for AVX-512 where the CPU has it.
///
/// # Safety
/// As [`task`].
#[allow(clippy::too_many_arguments)]
unsafe fn store_blocks(t: TaskBlocks, c: *mut f32, ldc: usize, epi: &Epi) {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn generic(t: TaskBlocks, c: *mut f32, ldc: usize, epi: &Epi) {
        let TaskBlocks {
            acc,
            bi,
            bj,
            rows,
            cols,
            valid,
        } = t;
        for i in 0..bi {
            let i0 = rows.0 + 32 * i;
            for j in 0..bj {
                let j0 = cols.0 + 32 * j;
                let (ri, cj) = (
                    32.min(valid.0.saturating_sub(i0)),
                    32.min(valid.1.saturating_sub(j0)),
                );
                if ri > 0 && cj > 0 {
                    epi.store_tile(&mut acc[i * bj + j].0, 32, (i0, ri), (j0, cj), c, ldc);
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx512(t: TaskBlocks, c: *mut f32, ldc: usize, epi: &Epi) {
            generic(t, c, ldc, epi)
        }
        if simd() == Simd::Avx512 {
            return avx512(t, c, ldc, epi);
        }
    }
    generic(t, c, ldc, epi)
}

/// The epilogue of a task's blocks into packed bf16 rows ([`Dst::Packed`]): row `i`'s 32
/// columns from `j0` are one line, of tile `(i / 16, j0 / 32)`; rows past `m` and columns past
/// `n` are zero (the next GEMM's padding).
///
/// # Safety
/// As [`task`]; `lines` holds the row groups of `rows` for `steps` k-steps.
#[allow(clippy::too_many_arguments)]
unsafe fn store_packed(t: TaskBlocks, lines: *mut Line, steps: usize, epi: &Epi) {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn generic(
        t: TaskBlocks,
        lines: *mut Line,
        steps: usize,
        epi: &Epi,
        convert: impl Fn(&[f32; 32], &mut Line),
    ) {
        let TaskBlocks {
            acc,
            bi,
            bj,
            rows,
            cols,
            valid,
        } = t;
        for j in 0..bj {
            let j0 = cols.0 + 32 * j;
            let cj = 32.min(valid.1.saturating_sub(j0));
            for i in 0..bi {
                let block = &mut acc[i * bj + j].0;
                let i0 = rows.0 + 32 * i;
                let ri = 32.min(valid.0.saturating_sub(i0));
                epi.apply_rows::<32>(block, 32, (i0, ri), (j0, cj));
                for r in 0..32 {
                    let row = i0 + r;
                    let line = &mut *lines.add(((row / 16) * steps + j0 / 32) * 16 + row % 16);
                    if r >= ri {
                        *line = ZERO_LINE;
                        continue;
                    }
                    let v = &mut *(block[r * 32..r * 32 + 32].as_mut_ptr() as *mut [f32; 32]);
                    v[cj..].fill(0.0);
                    convert(v, line);
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn bf16(t: TaskBlocks, lines: *mut Line, steps: usize, epi: &Epi) {
            use std::arch::x86_64::*;
            // `vcvtne2ps2bf16` rounds as `to_bf16_bits` (as packing the f32 values did).
            let convert = |v: &[f32; 32], line: &mut Line| {
                let lo = _mm512_loadu_ps(v.as_ptr());
                let hi = _mm512_loadu_ps(v.as_ptr().add(16));
                let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_store_si512(line.0.as_mut_ptr() as *mut _, bits);
            };
            generic(t, lines, steps, epi, convert)
        }
        if packing_simd() && simd() == Simd::Avx512 {
            return bf16(t, lines, steps, epi);
        }
    }
    let scalar = |v: &[f32; 32], line: &mut Line| {
        for (d, &x) in line.0.iter_mut().zip(v) {
            *d = to_bf16_bits(x);
        }
    };
    generic(t, lines, steps, epi, scalar)
}

/// A 32 × 32 f32 block of `C`, row-major.
#[repr(C, align(64))]
pub(crate) struct Block(pub(crate) [f32; 32 * 32]);

#[cfg(target_arch = "x86_64")]
mod amx {
    use crate::clip::gemm_bf16::{Block, Line};
    use std::arch::asm;

    /// Palette 1, tiles 0-7 all 16 rows × 64 bytes: tmm0-3 the f32 accumulators of a 32 × 32
    /// block, tmm4-5 two A tiles (16 rows × 32 k), tmm6-7 two B tiles (16 k-pairs × 16 columns).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    /// Loads the tile configuration on this thread (`ldtilecfg`).
    ///
    /// # Safety
    /// The CPU must have AMX and the process its permission (`available`).
    pub unsafe fn load_config() {
        let mut cfg = TileConfig([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            cfg.0[48 + t] = 16; // rows
        }
        // SAFETY: a valid palette-1 configuration, 64-byte aligned.
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    }

    /// Releases the tile state (`tilerelease`), so context switches stop saving it.
    ///
    /// # Safety
    /// As [`load_config`].
    pub unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// `out (+)= A[32, 32 steps] · B[32 steps, 32]`: `a0`, `a1` the A tiles of two 16-row
    /// groups (one per k-step, 16 lines each), `b0`, `b1` two B column blocks (16 lines per
    /// k-step); `accumulate` starts from `out` instead of zero. Without `a1`, only the first
    /// 16 rows of `out` (two accumulator tiles, half the products).
    ///
    /// # Safety
    /// [`load_config`] ran on this thread; the slices hold `steps` tiles each (asserted).
    #[inline]
    pub unsafe fn block(
        a0: &[Line],
        a1: Option<&[Line]>,
        b0: &[Line],
        b1: &[Line],
        steps: usize,
        out: &mut Block,
        accumulate: bool,
    ) {
        let tiles = 16 * steps;
        assert!(a0.len() >= tiles && b0.len() >= tiles && b1.len() >= tiles);
        assert!(a1.is_none_or(|a1| a1.len() >= tiles));
        let o = out.0.as_mut_ptr();
        let (o1, o2, o3) = (o.add(16), o.add(16 * 32), o.add(16 * 32 + 16));
        let (pa0, pb0, pb1) = (
            a0.as_ptr() as *const u8,
            b0.as_ptr() as *const u8,
            b1.as_ptr() as *const u8,
        );
        let Some(a1) = a1 else {
            return half_block(pa0, pb0, pb1, steps, (o, o1), accumulate);
        };
        if accumulate {
            // SAFETY: four 16 × 16 f32 quadrants of the 32 × 32 block, row stride 128 bytes.
            asm!(
                "tileloadd tmm0, [{o0} + {stride} * 1]",
                "tileloadd tmm1, [{o1} + {stride} * 1]",
                "tileloadd tmm2, [{o2} + {stride} * 1]",
                "tileloadd tmm3, [{o3} + {stride} * 1]",
                o0 = in(reg) o,
                o1 = in(reg) o1,
                o2 = in(reg) o2,
                o3 = in(reg) o3,
                stride = in(reg) 128usize,
                options(nostack, readonly)
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        let pa1 = a1.as_ptr() as *const u8;
        for s in 0..steps {
            // SAFETY: one 1 KB tile (16 rows × 64 bytes) from each pointer, inside the slices
            // asserted above.
            asm!(
                "tileloadd tmm4, [{a0} + {line} * 1]",
                "tileloadd tmm6, [{b0} + {line} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {line} * 1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {line} * 1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) pa0.add(s * 1024),
                a1 = in(reg) pa1.add(s * 1024),
                b0 = in(reg) pb0.add(s * 1024),
                b1 = in(reg) pb1.add(s * 1024),
                line = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        // SAFETY: as the loads above.
        asm!(
            "tilestored [{o0} + {stride} * 1], tmm0",
            "tilestored [{o1} + {stride} * 1], tmm1",
            "tilestored [{o2} + {stride} * 1], tmm2",
            "tilestored [{o3} + {stride} * 1], tmm3",
            o0 = in(reg) o,
            o1 = in(reg) o1,
            o2 = in(reg) o2,
            o3 = in(reg) o3,
            stride = in(reg) 128usize,
            options(nostack)
        );
    }

    /// [`block`]'s top 16 rows: accumulators tmm0-1 at `o0`, `o1` (row stride 128 bytes).
    ///
    /// # Safety
    /// As [`block`]: `a0`, `b0`, `b1` hold `steps` tiles each, `o0`, `o1` two 16 × 16 quadrants.
    #[inline]
    unsafe fn half_block(
        a0: *const u8,
        b0: *const u8,
        b1: *const u8,
        steps: usize,
        (o0, o1): (*mut f32, *mut f32),
        accumulate: bool,
    ) {
        if accumulate {
            // SAFETY: two 16 × 16 f32 quadrants, row stride 128 bytes.
            asm!(
                "tileloadd tmm0, [{o0} + {stride} * 1]",
                "tileloadd tmm1, [{o1} + {stride} * 1]",
                o0 = in(reg) o0,
                o1 = in(reg) o1,
                stride = in(reg) 128usize,
                options(nostack, readonly)
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        }
        for s in 0..steps {
            // SAFETY: one 1 KB tile from each pointer, inside the caller's slices.
            asm!(
                "tileloadd tmm4, [{a0} + {line} * 1]",
                "tileloadd tmm6, [{b0} + {line} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {line} * 1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                a0 = in(reg) a0.add(s * 1024),
                b0 = in(reg) b0.add(s * 1024),
                b1 = in(reg) b1.add(s * 1024),
                line = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        // SAFETY: as the loads above.
        asm!(
            "tilestored [{o0} + {stride} * 1], tmm0",
            "tilestored [{o1} + {stride} * 1], tmm1",
            o0 = in(reg) o0,
            o1 = in(reg) o1,
            stride = in(reg) 128usize,
            options(nostack)
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::clip::gemm_bf16::Line;
    use std::arch::x86_64::*;

    /// `out[8, 32] (+)= A[8, 32 steps] · B[32 steps, 32]`: `a` the tiles of a 16-row group from
    /// its row 0 or 8 (16 lines per k-step), `b0`, `b1` two B column blocks (16 lines per
    /// k-step); `accumulate` starts from `out` instead of zero.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX512-BF16; the slices hold `steps` tiles (asserted).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block(
        a: &[Line],
        b0: &[Line],
        b1: &[Line],
        steps: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        let tiles = 16 * steps;
        assert!(a.len() + 8 >= tiles && b0.len() >= tiles && b1.len() >= tiles);
        assert!(out.len() >= 8 * 32);
        let po = out.as_mut_ptr();
        let mut acc = [[_mm512_setzero_ps(); 2]; 8];
        if accumulate {
            for (r, acc) in acc.iter_mut().enumerate() {
                acc[0] = _mm512_loadu_ps(po.add(r * 32));
                acc[1] = _mm512_loadu_ps(po.add(r * 32 + 16));
            }
        }
        let pa = a.as_ptr() as *const i32;
        let (pb0, pb1) = (b0.as_ptr(), b1.as_ptr());
        for s in 0..steps {
            for p in 0..16 {
                // SAFETY: line 16 s + p of each B block and line 16 s + r of the A group (a
                // k-pair at u32 p) lie inside the slices asserted above.
                let l = 16 * s + p;
                let v0: __m512bh = std::mem::transmute(_mm512_load_si512(pb0.add(l) as *const _));
                let v1: __m512bh = std::mem::transmute(_mm512_load_si512(pb1.add(l) as *const _));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*pa.add((16 * s + r) * 16 + p)));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, v0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, v1);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(po.add(r * 32), acc[0]);
            _mm512_storeu_ps(po.add(r * 32 + 16), acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(seed: u64, n: usize) -> Vec<f32> {
        crate::rng::SplitMix64(seed).normal(n, 1.0)
    }

    /// A row-major f32 matrix with `cols` columns.
    fn rows(data: &[f32], cols: usize) -> MatRef<'_> {
        MatRef {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// `B[k, n]` packed from row-major f32.
    fn pack_rows(b: &[f32], k: usize, n: usize) -> PackedB {
        PackedB::from_f32(rows(b, n), k, n, true)
    }

    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter()
            .map(|&x| f32::from_bits((to_bf16_bits(x) as u32) << 16))
            .collect()
    }

    /// `C = alpha · A B (+ C)` in f64 over the bf16-rounded operands.
    fn reference(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        b: &[f32],
        c0: &[f32],
        alpha: f32,
        accumulate: bool,
    ) -> Vec<f32> {
        let (a, b) = (rounded(a), rounded(b));
        (0..m * n)
            .map(|idx| {
                let (i, j) = (idx / n, idx % n);
                let s: f64 = (0..k)
                    .map(|kk| a[i * k + kk] as f64 * b[kk * n + j] as f64)
                    .sum();
                let base = if accumulate { c0[idx] as f64 } else { 0.0 };
                (base + alpha as f64 * s) as f32
            })
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16_bits(1.0), 0x3f80);
        assert_eq!(to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80, "tie to even, down");
        assert_eq!(to_bf16_bits(1.0 + 3.0 / 256.0), 0x3f82, "tie to even, up");
        assert_eq!(
            to_bf16_bits(-2.5e-3),
            half::bf16::from_f32(-2.5e-3).to_bits()
        );
        assert_eq!(to_bf16_bits(f32::INFINITY), 0x7f80);
        assert!(half::bf16::from_bits(to_bf16_bits(f32::NAN)).is_nan());
        assert!(half::bf16::from_bits(to_bf16_bits(f32::from_bits(0x7fff_ffff))).is_nan());
    }

    #[test]
    fn packing_round_trips_a_weight() {
        let (n, k) = (37, 45);
        let w: Vec<half::bf16> = rand(1, n * k)
            .iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect();
        let p = PackedB::from_weight(&w, n, k);
        assert_eq!(p.to_weight(), w);
        let f: Vec<f32> = w.iter().map(|x| x.to_f32()).collect();
        // The same matrix as Bᵀ through the strided f32 path.
        let q = PackedB::from_f32(
            MatRef {
                data: &f,
                rs: 1,
                cs: k,
            },
            k,
            n,
            false,
        );
        assert_eq!(q.to_weight(), w);
    }

    /// Every available kernel against f64 sums of the bf16-rounded operands: odd shapes (edges
    /// in every dimension, k odd), accumulate or not, alpha, strided A, both thread modes. The
    /// tolerance is f32 summation order over k terms of magnitude <= |a||b|: 1e-6 · k relative
    /// to the sum of |terms|.
    #[test]
    fn kernels_match_rounded_f32_products() {
        if available().is_empty() {
            println!(
                "SKIP: this CPU has neither AMX nor AVX512-BF16; the bf16 kernels are not run"
            );
            return;
        }
        for &kernel in available() {
            for &(m, k, n) in &[
                (1usize, 1usize, 1usize),
                (3, 0, 5),
                (5, 3, 7),
                (33, 65, 31),
                (70, 100, 130),
                (197, 64, 40),
                (64, 1030, 96),
                // Last row blocks of 20 and 16 rows: 3 of 4 eight-row groups, one AMX half.
                (20, 40, 33),
                (48, 70, 64),
            ] {
                let a = rand(m as u64 * 7 + k as u64, m * k);
                let b = rand(n as u64 * 11 + 3, k * n);
                let c0 = rand(5, m * n);
                let packed = pack_rows(&b, k, n);
                for (accumulate, alpha, parallel) in [
                    (false, 1.0f32, true),
                    (true, 0.125, false),
                    (true, -2.0, true),
                ] {
                    let mut c = c0.clone();
                    gemm(
                        kernel,
                        m,
                        rows(&a, k),
                        &packed,
                        &mut c,
                        n,
                        alpha,
                        accumulate,
                        parallel,
                    );
                    let want = reference(m, k, n, &a, &b, &c0, alpha, accumulate);
                    let (ra, rb) = (rounded(&a), rounded(&b));
                    for idx in 0..m * n {
                        let (i, j) = (idx / n, idx % n);
                        let mag: f64 = (0..k)
                            .map(|kk| (ra[i * k + kk] as f64 * rb[kk * n + j] as f64).abs())
                            .sum::<f64>()
                            * alpha.abs() as f64
                            + c0[idx].abs() as f64;
                        let err = (c[idx] as f64 - want[idx] as f64).abs();
                        assert!(
                            err <= 1e-6 * (k as f64 + 2.0) * mag + 1e-30,
                            "{} {m}x{k}x{n} acc={accumulate}: C[{i},{j}] = {} want {}",
                            kernel.name(),
                            c[idx],
                            want[idx]
                        );
                    }
                }
                // A transposed view (column stride) packs to the same product.
                let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
                let mut c1 = vec![0f32; m * n];
                let mut c2 = vec![0f32; m * n];
                gemm(
                    kernel,
                    m,
                    rows(&a, k),
                    &packed,
                    &mut c1,
                    n,
                    1.0,
                    false,
                    true,
                );
                gemm(
                    kernel,
                    m,
                    MatRef {
                        data: &at,
                        rs: 1,
                        cs: m,
                    },
                    &packed,
                    &mut c2,
                    n,
                    1.0,
                    false,
                    true,
                );
                assert_eq!(c1, c2, "{} strided A", kernel.name());
            }
        }
    }

    /// The vector packings of attention's `kᵀ` and `v` write the same lines as the scalar
    /// ones, over shapes around the 16-column blocks and 32-row k-steps.
    #[test]
    fn vector_packing_equals_scalar_packing() {
        #[cfg(target_arch = "x86_64")]
        {
            if !packing_simd() {
                eprintln!("skipped: the vector packing needs AVX-512 BW and BF16");
                return;
            }
            for (k, n) in [
                (1, 1),
                (64, 77),
                (40, 37),
                (33, 16),
                (64, 100),
                (2, 33),
                (31, 5),
            ] {
                let rs = k.max(n) + 3;
                let rows = rand((k * 100 + n) as u64, rs * k.max(n) + 8);
                let mut a = vec![ZERO_LINE; BView::scratch_len(k, n) / 16];
                let mut b = vec![Line([7; 32]); BView::scratch_len(k, n) / 16];
                let same = |a: &[Line], b: &[Line]| a.iter().zip(b).all(|(x, y)| x.0 == y.0);
                a.fill(Line([7; 32]));
                fill_columns(&rows, rs, k, n, &mut a);
                // SAFETY: the features were detected; the rows are inside `rows`.
                unsafe { vector::fill_columns(&rows, rs, k, n, &mut b) };
                assert!(same(&a, &b), "columns k {k} n {n}");
                b.fill(Line([7; 32]));
                fill_rows(&rows, rs, k, n, &mut a);
                // SAFETY: as above.
                unsafe { vector::fill_rows(&rows, rs, k, n, &mut b) };
                assert!(same(&a, &b), "rows k {k} n {n}");
            }
        }
    }

    /// The in-place vector packing of a view and of LayerNorm rows equals the line-at-a-time
    /// scalar form bit for bit: widths around a line (the lanes past `k` zero), a last group of
    /// a few rows, a row stride wider than the rows, NaN, infinities and a zero rstd.
    #[test]
    fn vector_groups_equal_scalar_groups() {
        #[cfg(target_arch = "x86_64")]
        {
            if !packing_simd() {
                eprintln!("skipped: the vector packing needs AVX-512 BW and BF16");
                return;
            }
            for (m, k) in [
                (1, 1),
                (5, 31),
                (16, 32),
                (21, 33),
                (40, 64),
                (37, 100),
                (197, 768),
            ] {
                let ld = k + 5;
                let mut x = rand((m * 1000 + k) as u64, m * ld);
                x[0] = f32::NAN;
                let last = ld.min(x.len() - 1);
                x[last] = f32::INFINITY;
                let stats: Vec<[f32; 2]> = (0..m)
                    .map(|i| [0.25 * i as f32 - 1.0, if i == 2 { 0.0 } else { 0.8 }])
                    .collect();
                let (gamma, beta) = (rand(3, k), rand(4, k));
                let view = ASrc::View(MatRef {
                    data: &x,
                    rs: ld,
                    cs: 1,
                });
                let norm = ASrc::Norm {
                    x: &x,
                    ld,
                    stats: &stats,
                    gamma: &gamma,
                    beta: &beta,
                };
                for (what, a) in [("view", view), ("norm", norm)] {
                    let steps = k.div_ceil(32);
                    for g in 0..m.div_ceil(16) {
                        let mut want = vec![Line([7; 32]); steps * 16];
                        let mut got = vec![Line([9; 32]); steps * 16];
                        fill_group_lines(&a, m, k, g, &mut want, scalar_line);
                        let src = match a {
                            ASrc::View(v) => vector::Src::View {
                                data: v.data.as_ptr(),
                                rs: v.rs,
                            },
                            ASrc::Norm {
                                x,
                                ld,
                                stats,
                                gamma,
                                beta,
                            } => vector::Src::Norm {
                                x: x.as_ptr(),
                                ld,
                                stats: stats.as_ptr(),
                                gamma: gamma.as_ptr(),
                                beta: beta.as_ptr(),
                            },
                        };
                        // SAFETY: the features were detected; the source holds m × k.
                        unsafe { vector::fill_group(src, m, k, g, &mut got) };
                        for (i, (w, v)) in want.iter().zip(&got).enumerate() {
                            assert_eq!(w.0, v.0, "{what} m {m} k {k} group {g} line {i}");
                        }
                    }
                }
            }
        }
    }

    /// The grouped task order visits every (row block, column block) once, for any counts and
    /// depths, including a last group narrower than the others.
    #[test]
    fn task_order_covers_every_task_once() {
        for (tasks_m, tasks_n, kp) in [
            (1, 1, 32),
            (22, 32, 1024),
            (22, 8, 4096),
            (3, 7, 512),
            (4, 18, 768),
        ] {
            let mut seen = vec![false; tasks_m * tasks_n];
            for t in 0..tasks_m * tasks_n {
                let (ti, tj) = task_at(t, tasks_m, tasks_n, kp);
                assert!(
                    ti < tasks_m && tj < tasks_n && !seen[ti * tasks_n + tj],
                    "{t}"
                );
                seen[ti * tasks_n + tj] = true;
            }
        }
    }

    /// Two GEMMs handing over packed bf16 rows (fc1 → fc2) give the bits of the same two
    /// GEMMs through an f32 buffer, with a bias, an activation and a residual, for shapes with
    /// padding rows and columns; the reused buffer's stale contents do not leak in.
    #[test]
    fn packed_hand_over_equals_the_f32_round_trip() {
        if available().is_empty() {
            eprintln!("skipped: the packed hand-over needs a bf16 unit (AMX or AVX512-BF16)");
        }
        for &kernel in available() {
            let mut hidden = PackedRows::default();
            for &(m, k, h, n) in &[
                (197usize, 64usize, 96usize, 40usize),
                (33, 65, 70, 31),
                (1, 3, 1, 2),
            ] {
                let x = rand(m as u64 + 1, m * k);
                let (w1, w2) = (rand(2, k * h), rand(3, h * n));
                let (b1, b2) = (rand(4, h), rand(5, n));
                let (p1, p2) = (pack_rows(&w1, k, h), pack_rows(&w2, h, n));
                let residual = rand(6, m * n);
                let epi1 = Epi {
                    bias: Some(&b1),
                    act: crate::clip::matrix::Act::QuickGelu,
                    ..Default::default()
                };
                let epi2 = Epi {
                    bias: Some(&b2),
                    accumulate: true,
                    ..Default::default()
                };
                let mut f32_hidden = vec![0f32; m * h];
                gemm_epi(
                    kernel,
                    m,
                    ASrc::View(rows(&x, k)),
                    &p1,
                    &mut f32_hidden,
                    h,
                    &epi1,
                    true,
                );
                let mut want = residual.clone();
                let a = ASrc::View(rows(&f32_hidden, h));
                gemm_epi(kernel, m, a, &p2, &mut want, n, &epi2, true);
                // Stale lines from a wider product first.
                hidden.reset(64, 256);
                hidden.lines.fill(Line([0x7fc0; 32]));
                gemm_to_packed(
                    kernel,
                    m,
                    ASrc::View(rows(&x, k)),
                    &p1,
                    &epi1,
                    &mut hidden,
                    true,
                );
                assert_eq!(hidden.dims(), (m, h));
                let mut got = residual.clone();
                gemm_packed(kernel, &hidden, &p2, &mut got, n, &epi2, true);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{} m {m} k {k} h {h} n {n}", kernel.name());
            }
        }
    }

    /// Writes stay inside the valid block: a wider `ldc` keeps the columns beyond `n`.
    #[test]
    fn writes_only_the_valid_block() {
        for &kernel in available() {
            let (m, k, n, ldc) = (3, 8, 5, 9);
            let a = rand(1, m * k);
            let b = rand(2, k * n);
            let packed = pack_rows(&b, k, n);
            let mut c = vec![7f32; (m - 1) * ldc + n];
            gemm(
                kernel,
                m,
                rows(&a, k),
                &packed,
                &mut c,
                ldc,
                1.0,
                false,
                true,
            );
            for i in 0..m - 1 {
                assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&x| x == 7.0));
            }
        }
    }
}
