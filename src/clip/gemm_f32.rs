//! f32 GEMM on the CPU's vector units, for the backbone's linear layers and attention: an
//! AVX-512 micro-kernel (12 × 32 block of `C` in 24 registers), an AVX2+FMA one (6 × 16 in 12)
//! and a portable one, over operands packed into panels.
//!
//! Why our own: the `gemm` crate (candle's) runs its AVX2 kernels on AVX-512 CPUs (its AVX-512
//! path needs a nightly compiler), 60–100 GFLOP/s on two Xeon cores where MKL reaches ~170, and
//! picks its blocking from all three dimensions, so a row's result depended on how many rows
//! shared the product (the images of a batch). Here the blocking along `k` is a constant
//! ([`KC`]) and every element of `C` is summed in the same order whatever `m` is and whichever
//! panel or thread computes it: results are bit-identical for an image alone or in any batch.
//!
//! Layouts (`mr`, `nr` from the kernel):
//! - packed `B[k, n]` ([`PackedW`], a weight packed once at load): panels of `nr` columns,
//!   element `(kk, j)` at `(j / nr) · k · nr + kk · nr + j % nr`, `n` padded with zeros;
//! - packed `A[m, k]`: panels of `mr` rows, element `(i, kk)` at
//!   `(i / mr) · k · mr + kk · mr + i % mr`, packed per product from an [`ASrc`] (so a
//!   LayerNorm is applied on the way), `m` padded with zeros.
//!
//! A product runs in tasks of `MC × NC` output blocks (rayon); inside a task, for each `KC`
//! slice of `k`, every `nr`-column panel of `B` (`KC · nr` floats, in L1) meets every
//! `mr`-row panel of `A` (in L2); partial sums wait in a per-task buffer, and the last slice
//! goes through the epilogue ([`Epi`]: bias, activation, residual) into the destination.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::elementwise::{round_bf16_generic, simd, Simd};
#[cfg(target_arch = "x86_64")]
use super::lanes;
use super::lanes::Prefetch;
use super::matrix::{with_scratch, ASrc, Aligned, Epi, MatRef, SendPtr};

/// `k` per pass over a block: a `KC × 32` panel of `B` is 32 KB (L1 holds 32-48 KB).
pub const KC: usize = 256;
/// Rows and columns of `C` per task: a task's `A` rows (192 × `KC` floats, 192 KB) and `B`
/// columns (128 × `KC`, 128 KB) stay in L2 while its blocks run. Tasks run down the columns
/// (every row block of one column block, then the next), so a column block of `B`, a weight
/// read from memory, is used by all the rows while it is in cache.
const MC: usize = 192;
const NC: usize = 128;

/// An f32 micro-kernel this CPU can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Kernel {
    /// 12 × 32 blocks on AVX-512F.
    Avx512,
    /// 6 × 16 blocks on AVX2 + FMA.
    Avx2,
    /// 6 × 16 blocks in portable Rust.
    Portable,
}

impl F32Kernel {
    /// Rows of a register block (an `A` panel).
    pub const fn mr(self) -> usize {
        match self {
            F32Kernel::Avx512 => 12,
            F32Kernel::Avx2 | F32Kernel::Portable => 6,
        }
    }

    /// Columns of a register block (a `B` panel).
    pub const fn nr(self) -> usize {
        match self {
            F32Kernel::Avx512 => 32,
            F32Kernel::Avx2 | F32Kernel::Portable => 16,
        }
    }

    /// The name `zsad info` reports (`f32-avx512`, ...).
    pub fn name(self) -> &'static str {
        match self {
            F32Kernel::Avx512 => "f32-avx512",
            F32Kernel::Avx2 => "f32-avx2",
            F32Kernel::Portable => "f32-portable",
        }
    }
}

/// Every f32 kernel this CPU can run, best first.
pub fn available() -> &'static [F32Kernel] {
    static AVAILABLE: OnceLock<Vec<F32Kernel>> = OnceLock::new();
    AVAILABLE.get_or_init(|| {
        let mut found = Vec::new();
        if simd() == Simd::Avx512 {
            found.push(F32Kernel::Avx512);
        }
        if matches!(simd(), Simd::Avx512 | Simd::Avx2) {
            found.push(F32Kernel::Avx2);
        }
        found.push(F32Kernel::Portable);
        found
    })
}

/// The kernel the f32 products use: the best available, unless `ZSAD_F32_KERNEL` names another
/// (`f32-avx2`, `f32-portable`; a name this CPU cannot run falls back to the best).
pub fn selected() -> F32Kernel {
    static SELECTED: OnceLock<F32Kernel> = OnceLock::new();
    *SELECTED.get_or_init(|| {
        let best = available()[0];
        match std::env::var("ZSAD_F32_KERNEL").ok() {
            Some(name) => available()
                .iter()
                .copied()
                .find(|k| k.name() == name)
                .unwrap_or(best),
            None => best,
        }
    })
}

/// The right operand `B[k, n]` of a GEMM packed for a kernel (for a linear layer: `Wᵀ`, packed
/// once at load).
#[derive(Clone)]
pub struct PackedW {
    kernel: F32Kernel,
    k: usize,
    n: usize,
    data: Aligned,
}

impl std::fmt::Debug for PackedW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedW {{ k: {}, n: {} }}", self.k, self.n)
    }
}

impl PackedW {
    /// `B` from a view (element `(kk, j)` at `b.data[kk · rs + j · cs]`), for `kernel`.
    pub fn pack(b: MatRef, k: usize, n: usize, kernel: F32Kernel) -> Self {
        b.check(k, n, "PackedW::pack");
        let nr = kernel.nr();
        let mut data = Aligned::zeros(n.div_ceil(nr) * nr * k);
        if k > 0 {
            data.as_mut_slice()
                .par_chunks_mut(k * nr)
                .enumerate()
                .for_each(|(p, panel)| pack_b_panel(b, k, n, nr, p, panel));
        }
        Self { kernel, k, n, data }
    }

    /// `B = Wᵀ` for a linear layer's weight `W: [n, k]` (row-major), for the selected kernel.
    pub fn from_weight(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "PackedW::from_weight: {n} x {k} weight");
        Self::pack(
            MatRef {
                data: w,
                rs: 1,
                cs: k,
            },
            k,
            n,
            selected(),
        )
    }

    /// `W = Bᵀ` back as row-major `[n, k]`.
    pub fn to_weight(&self) -> Vec<f32> {
        let nr = self.kernel.nr();
        let data = self.data.as_slice();
        let mut w = vec![0f32; self.n * self.k];
        w.par_chunks_mut(self.k.max(1))
            .enumerate()
            .for_each(|(j, row)| {
                let panel = &data[(j / nr) * self.k * nr..];
                for (kk, x) in row.iter_mut().enumerate() {
                    *x = panel[kk * nr + j % nr];
                }
            });
        w
    }

    /// Rounds every value to bf16 (the emulated `--precision bf16`).
    pub fn round_bf16(&mut self) {
        self.data
            .as_mut_slice()
            .par_chunks_mut(16 * 1024)
            .for_each(super::elementwise::round_bf16_in_place);
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn kernel(&self) -> F32Kernel {
        self.kernel
    }
}

/// Packs column panel `p` (`nr` columns, zero beyond `n`) of `B[k, n]` into `out` (`k · nr`).
fn pack_b_panel(b: MatRef, k: usize, n: usize, nr: usize, p: usize, out: &mut [f32]) {
    let cols = nr.min(n - p * nr);
    if b.cs == 1 {
        for (kk, line) in out.chunks_exact_mut(nr).enumerate().take(k) {
            let src = &b.data[kk * b.rs + p * nr..kk * b.rs + p * nr + cols];
            line[..cols].copy_from_slice(src);
            line[cols..].fill(0.0);
        }
    } else {
        // Column-major sources (a weight `W[n, k]` read as `Wᵀ`): one column at a time.
        out[..k * nr].fill(0.0);
        for c in 0..cols {
            let j = p * nr + c;
            for kk in 0..k {
                out[kk * nr + c] = b.data[kk * b.rs + j * b.cs];
            }
        }
    }
}

/// Packs `B[k, n]` from a view into `out` (at least `n.div_ceil(nr) · nr · k` floats), on the
/// calling thread.
pub(crate) fn pack_b_into(b: MatRef, k: usize, n: usize, nr: usize, out: &mut [f32]) {
    b.check(k, n, "pack_b_into");
    if k == 0 {
        return;
    }
    for (p, panel) in out[..n.div_ceil(nr) * nr * k]
        .chunks_exact_mut(k * nr)
        .enumerate()
    {
        pack_b_panel(b, k, n, nr, p, panel);
    }
}

/// Packs row panel `p` (`mr` rows, zero beyond `m`) of `A[m, k]` into `out` (`k · mr`),
/// rounding to bf16 with `round`.
fn pack_a_panel(a: &ASrc, m: usize, k: usize, mr: usize, round: bool, p: usize, out: &mut [f32]) {
    const STEP: usize = 64;
    let mut rows = [[0f32; STEP]; 16];
    let valid = mr.min(m.saturating_sub(p * mr));
    for k0 in (0..k).step_by(STEP) {
        let len = STEP.min(k - k0);
        for (r, row) in rows.iter_mut().enumerate().take(mr) {
            if r < valid {
                a.row(p * mr + r, k0, &mut row[..len]);
                if round {
                    round_bf16_generic(&mut row[..len]);
                }
            } else {
                row[..len].fill(0.0);
            }
        }
        for kk in 0..len {
            let line = &mut out[(k0 + kk) * mr..(k0 + kk + 1) * mr];
            for (r, x) in line.iter_mut().enumerate() {
                *x = rows[r][kk];
            }
        }
    }
}

/// Packs all of `A[m, k]` into `out` (at least `m.div_ceil(mr) · mr · k` floats), on the
/// calling thread.
pub(crate) fn pack_a_into(a: &ASrc, m: usize, k: usize, mr: usize, round: bool, out: &mut [f32]) {
    a.check(m, k, "pack_a_into");
    if k == 0 {
        return;
    }
    for (p, panel) in out[..m.div_ceil(mr) * mr * k]
        .chunks_exact_mut(k * mr)
        .enumerate()
    {
        pack_a_panel(a, m, k, mr, round, p, panel);
    }
}

/// `dst ⟵ epi(A[m, k] · B)` with `A` read from `a` (rounded to bf16 with `round_a`) and `B`
/// packed; `dst` has row stride `ld` (column stride if `epi.transposed`). `parallel = false`
/// stays on the calling thread.
///
/// # Panics
/// If a view, vector or `dst` is too small for the shapes (programming errors).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    a: ASrc,
    round_a: bool,
    b: &PackedW,
    dst: &mut [f32],
    ld: usize,
    epi: &Epi,
    parallel: bool,
) {
    let (k, n, kernel) = (b.k, b.n, b.kernel);
    a.check(m, k, "gemm lhs");
    epi.check(m, n);
    epi.check_dst(m, n, ld, dst.len());
    if m == 0 || n == 0 {
        return;
    }
    let (mr, nr) = (kernel.mr(), kernel.nr());
    let (mp, np) = (m.div_ceil(mr), n.div_ceil(nr));
    with_scratch(mp * mr * k, |pa| {
        if k > 0 {
            let pack =
                |(p, panel): (usize, &mut [f32])| pack_a_panel(&a, m, k, mr, round_a, p, panel);
            if parallel {
                pa.par_chunks_mut(k * mr).enumerate().for_each(pack);
            } else {
                pa.chunks_mut(k * mr).enumerate().for_each(pack);
            }
        }
        // Row blocks of at most `mc()` rows, as even as the panels allow.
        let tm = mp.div_ceil((MC / mr).max(1));
        let mcp = mp.div_ceil(tm);
        let ncp = (NC / nr).max(1);
        let tn = np.div_ceil(ncp);
        let out = SendPtr(dst.as_mut_ptr());
        let pa = &*pa;
        let pb = b.data.as_slice();
        let run = |t: usize| {
            let (ti, tj) = (t % tm, t / tm);
            let rows = ti * mcp..((ti + 1) * mcp).min(mp);
            let cols = tj * ncp..((tj + 1) * ncp).min(np);
            let out = out;
            // SAFETY: the task's block of `dst` is disjoint from every other task's and inside
            // `dst` (checked above); the packed operands hold the panels named.
            unsafe { block(kernel, pa, pb, (m, n, k), rows, cols, out.0, ld, epi) }
        };
        if parallel && tm * tn > 1 {
            (0..tm * tn).into_par_iter().for_each(run);
        } else {
            (0..tm * tn).for_each(run);
        }
    })
}

/// `dst ⟵ epi(A · B)` for pre-packed `A` (`pa`, [`pack_a_into`]) and `B` (`pb`,
/// [`pack_b_into`]) of shapes `(m, n, k)`, on the calling thread.
///
/// # Safety
/// `pa` and `pb` hold the packed operands for `kernel`; `dst` with stride `ld` holds the result
/// (see [`Epi::check_dst`]) and no other thread writes it meanwhile; `epi` covers `m × n`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_packed(
    kernel: F32Kernel,
    pa: &[f32],
    pb: &[f32],
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ld: usize,
    epi: &Epi,
) {
    if m == 0 || n == 0 {
        return;
    }
    let (mp, np) = (m.div_ceil(kernel.mr()), n.div_ceil(kernel.nr()));
    block(kernel, pa, pb, (m, n, k), 0..mp, 0..np, dst, ld, epi)
}

/// One task: the row panels `rows` × column panels `cols` of `C`.
///
/// # Safety
/// As [`gemm_packed`], for the block.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    kernel: F32Kernel,
    pa: &[f32],
    pb: &[f32],
    dims: (usize, usize, usize),
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    dst: *mut f32,
    ld: usize,
    epi: &Epi,
) {
    let tile = kernel.mr() * kernel.nr();
    // One pass over k needs one tile of scratch; more keep every tile's partial sums.
    let tiles = if dims.2 <= KC {
        1
    } else {
        rows.len() * cols.len()
    };
    with_scratch(tiles * tile, |acc| {
        let args = BlockArgs {
            pa,
            pb,
            dims,
            rows,
            cols,
            dst,
            ld,
            epi,
            acc,
        };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Avx512 => block_avx512(args),
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Avx2 => block_avx2(args),
            _ => block_generic::<Portable>(args),
        }
    })
}

struct BlockArgs<'a, 'e> {
    pa: &'a [f32],
    pb: &'a [f32],
    dims: (usize, usize, usize),
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    dst: *mut f32,
    ld: usize,
    epi: &'a Epi<'e>,
    acc: &'a mut [f32],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,avx2")]
unsafe fn block_avx512(args: BlockArgs) {
    block_generic::<Avx512>(args)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(args: BlockArgs) {
    block_generic::<Avx2>(args)
}

/// A register-blocked micro-kernel: `C[MR, NR] (+)= A panel · B panel` over `kc` steps.
trait Micro {
    const MR: usize;
    const NR: usize;
    /// `c` (row-major `MR × NR`, 64-byte aligned) `=` (or `+=` with `load`) the product of
    /// `kc` steps of the panels at `a` (`MR` per step) and `b` (`NR` per step), prefetching
    /// `pf`'s lines on the way (ignored by the portable kernel).
    ///
    /// # Safety
    /// The pointers hold what they are read and written for; the CPU has the kernel's features.
    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, load: bool, pf: Prefetch);

    /// [`Self::tile`] for the first `MR / 2` rows only (the rest of `c` untouched): the last
    /// row panel of a product whose rows end in its first half (ViT-B/16's 197 tokens: 5 of
    /// the last 12), half the multiply-adds of a full tile.
    ///
    /// # Safety
    /// As [`Self::tile`].
    unsafe fn half_tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        load: bool,
        pf: Prefetch,
    );
}

#[inline(always)]
unsafe fn block_generic<K: Micro>(args: BlockArgs) {
    let BlockArgs {
        pa,
        pb,
        dims: (m, n, k),
        rows,
        cols,
        dst,
        ld,
        epi,
        acc,
    } = args;
    let (mr, nr) = (K::MR, K::NR);
    let tile = mr * nr;
    // A plain loop, not a closure: a closure is compiled as a function of its own, without
    // the target features of the kernel it sits in (its `exp` would call libm's `fmaf`).
    if k == 0 {
        for jp in cols.clone() {
            for ip in rows.clone() {
                let (i0, j0) = (ip * mr, jp * nr);
                let (ri, cj) = (mr.min(m - i0), nr.min(n - j0));
                // The epilogue works in place: a zero tile for each block.
                acc[..tile].fill(0.0);
                epi.store_tile(&mut acc[..tile], nr, (i0, ri), (j0, cj), dst, ld);
            }
        }
        return;
    }
    let single = k <= KC;
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let last = k0 + kc == k;
        for (jj, jp) in cols.clone().enumerate() {
            let b = pb.as_ptr().add(jp * k * nr + k0 * nr);
            // The next B slice (the next column panel, or the first one of the next k slice),
            // prefetched into L2 a part per row panel of this one, spread over that panel's
            // k-steps (`lanes::Prefetch`): a weight read from memory arrives while this slice
            // computes.
            let next = if jj + 1 < cols.len() {
                Some(pb.as_ptr().add((jp + 1) * k * nr + k0 * nr))
            } else if last {
                None
            } else {
                Some(pb.as_ptr().add(cols.start * k * nr + (k0 + kc) * nr))
            };
            let next_kc = if jj + 1 < cols.len() {
                kc
            } else {
                KC.min(k.saturating_sub(k0 + kc))
            };
            let lines = next_kc * nr / 16;
            for (ii, ip) in rows.clone().enumerate() {
                let mut pf = Prefetch::NONE;
                if let Some(next) = next {
                    let (spread, burst) = prefetch_share(ii, rows.len(), lines, kc);
                    pf = Prefetch {
                        // A hint only, never dereferenced: `wrapping_add`.
                        at: next.wrapping_add(spread.start * 16),
                        lines: spread.len(),
                    };
                    #[cfg(target_arch = "x86_64")]
                    for l in burst {
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                            next.add(l * 16) as *const i8,
                        );
                    }
                }
                let a = pa.as_ptr().add(ip * k * mr + k0 * mr);
                let t = if single {
                    0
                } else {
                    (ii * cols.len() + jj) * tile
                };
                let c = &mut acc[t..t + tile];
                let (i0, j0) = (ip * mr, jp * nr);
                let (ri, cj) = (mr.min(m - i0), nr.min(n - j0));
                if 2 * ri <= mr {
                    K::half_tile(kc, a, b, c.as_mut_ptr(), k0 > 0, pf);
                } else {
                    K::tile(kc, a, b, c.as_mut_ptr(), k0 > 0, pf);
                }
                if last {
                    epi.store_tile(c, nr, (i0, ri), (j0, cj), dst, ld);
                }
            }
        }
        k0 += kc;
    }
}

/// Row panel `ii`'s share (of `panels`) of the `lines` cache lines of the next `B` slice: the
/// lines its tile prefetches spread over its `kc` k-steps ([`Prefetch`]), then those it
/// prefetches at once before the tile, where the steps are too few (a product of few row
/// panels). Together the panels cover every line once.
fn prefetch_share(
    ii: usize,
    panels: usize,
    lines: usize,
    kc: usize,
) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let per = lines.div_ceil(panels.max(1));
    let (l0, l1) = ((ii * per).min(lines), ((ii + 1) * per).min(lines));
    let split = l0 + (l1 - l0).min(kc / Prefetch::STRIDE);
    (l0..split, split..l1)
}

struct Portable;

impl Micro for Portable {
    const MR: usize = 6;
    const NR: usize = 16;

    #[inline(always)]
    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, load: bool, pf: Prefetch) {
        let _ = pf; // no prefetch in the portable kernel
        Self::rows::<6>(kc, a, b, c, load)
    }

    #[inline(always)]
    unsafe fn half_tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        load: bool,
        pf: Prefetch,
    ) {
        let _ = pf;
        Self::rows::<3>(kc, a, b, c, load)
    }
}

impl Portable {
    /// The first `R` rows of a tile.
    #[inline(always)]
    unsafe fn rows<const R: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        load: bool,
    ) {
        let mut acc = [[0f32; 16]; R];
        if load {
            for (r, row) in acc.iter_mut().enumerate() {
                row.copy_from_slice(std::slice::from_raw_parts(c.add(r * 16), 16));
            }
        }
        for p in 0..kc {
            let bv = std::slice::from_raw_parts(b.add(p * 16), 16);
            for (r, row) in acc.iter_mut().enumerate() {
                let x = *a.add(p * 6 + r);
                row.iter_mut().zip(bv).for_each(|(o, &y)| *o += x * y);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            std::slice::from_raw_parts_mut(c.add(r * 16), 16).copy_from_slice(row);
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Micro for Avx512 {
    const MR: usize = 12;
    const NR: usize = 32;

    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, load: bool, pf: Prefetch) {
        simd_rows::<lanes::Avx512, 12>(kc, a, 12, b, c, load, pf)
    }

    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn half_tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        load: bool,
        pf: Prefetch,
    ) {
        simd_rows::<lanes::Avx512, 6>(kc, a, 12, b, c, load, pf)
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Micro for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, load: bool, pf: Prefetch) {
        simd_rows::<lanes::Avx2, 6>(kc, a, 6, b, c, load, pf)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn half_tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        load: bool,
        pf: Prefetch,
    ) {
        simd_rows::<lanes::Avx2, 3>(kc, a, 6, b, c, load, pf)
    }
}

/// The first `R` rows of a vector micro-kernel's tile (`A` panels `mr` rows apart): `c (+)=`
/// the register tile of [`lanes::tile`].
///
/// # Safety
/// As [`Micro::tile`]; the caller is compiled for `L`'s instruction set.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn simd_rows<L: lanes::Lanes, const R: usize>(
    kc: usize,
    a: *const f32,
    mr: usize,
    b: *const f32,
    c: *mut f32,
    load: bool,
    pf: Prefetch,
) {
    let acc = lanes::tile::<L, R>(kc, a, mr, b, load.then_some(c as *const f32), pf);
    lanes::store::<L, R>(&acc, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::matrix::Act;

    fn rand(seed: u64, n: usize) -> Vec<f32> {
        crate::rng::SplitMix64(seed).normal(n, 1.0)
    }

    /// Every kernel against f64 sums: odd shapes (edges everywhere, k across several passes),
    /// bias, residual, activation, row and column scales, a strided left operand, both thread
    /// modes, and the transposed store.
    #[test]
    fn kernels_match_f64_products() {
        for &kernel in available() {
            for &(m, k, n) in &[
                (1usize, 1usize, 1usize),
                (3, 0, 5),
                (5, 3, 7),
                (13, 65, 33),
                (70, 300, 130),
                (197, 64, 40),
                (100, 600, 97),
            ] {
                let a = rand(m as u64 * 7 + k as u64, m * k);
                let w = rand(n as u64 * 11 + 3, n * k); // W[n, k]
                let bias = rand(4, n);
                let rs = rand(6, m);
                let cs = rand(7, n);
                let c0 = rand(5, m * n);
                let b = PackedW::pack(
                    MatRef {
                        data: &w,
                        rs: 1,
                        cs: k,
                    },
                    k,
                    n,
                    kernel,
                );
                assert_eq!(b.to_weight(), w);
                let want = |i: usize, j: usize| -> f64 {
                    (0..k)
                        .map(|kk| a[i * k + kk] as f64 * w[j * k + kk] as f64)
                        .sum()
                };
                for parallel in [true, false] {
                    let mut c = c0.clone();
                    let epi = Epi {
                        alpha: 0.5,
                        row_scale: Some(&rs),
                        col_scale: Some(&cs),
                        bias: Some(&bias),
                        accumulate: true,
                        ..Default::default()
                    };
                    let view = MatRef {
                        data: &a,
                        rs: k,
                        cs: 1,
                    };
                    gemm(m, ASrc::View(view), false, &b, &mut c, n, &epi, parallel);
                    for i in 0..m {
                        for j in 0..n {
                            let v = c0[i * n + j] as f64
                                + 0.5 * rs[i] as f64 * cs[j] as f64 * want(i, j)
                                + bias[j] as f64;
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - v).abs() < 1e-4 * (1.0 + v.abs()) * (k as f64 + 1.0).sqrt(),
                                "{kernel:?} {m}x{k}x{n} [{i},{j}]: {got} vs {v}"
                            );
                        }
                    }
                }
                // Transposed store of a GELU'd product, from a transposed view of A.
                let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
                let mut ct = vec![0f32; n * m];
                let epi = Epi {
                    act: Act::Gelu,
                    transposed: true,
                    ..Default::default()
                };
                let view = MatRef {
                    data: &at,
                    rs: 1,
                    cs: m,
                };
                gemm(m, ASrc::View(view), false, &b, &mut ct, m, &epi, true);
                for i in 0..m {
                    for j in 0..n {
                        let x = want(i, j);
                        let g = 0.5 * x * (1.0 + erf64(x / 2f64.sqrt()));
                        let got = ct[j * m + i] as f64;
                        assert!((got - g).abs() < 1e-4 * (1.0 + g.abs()) * (k as f64 + 1.0).sqrt());
                    }
                }
            }
        }
    }

    fn erf64(x: f64) -> f64 {
        // Abramowitz-Stegun 7.1.26 is too coarse; integrate instead (tests only).
        let steps = 2000;
        let h = x / steps as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..steps {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// A row's result does not depend on how many rows share the product, nor where it sits.
    #[test]
    fn rows_are_independent_of_the_batch() {
        let (k, n) = (700, 200);
        let w = rand(1, n * k);
        let a = rand(2, 300 * k);
        for &kernel in available() {
            let b = PackedW::pack(
                MatRef {
                    data: &w,
                    rs: 1,
                    cs: k,
                },
                k,
                n,
                kernel,
            );
            let run = |rows: &[f32], m: usize| {
                let mut c = vec![0f32; m * n];
                let view = MatRef {
                    data: rows,
                    rs: k,
                    cs: 1,
                };
                gemm(
                    m,
                    ASrc::View(view),
                    false,
                    &b,
                    &mut c,
                    n,
                    &Epi::default(),
                    true,
                );
                c
            };
            let all = run(&a, 300);
            for (start, m) in [(0usize, 1usize), (5, 7), (13, 200), (299, 1)] {
                let part = run(&a[start * k..(start + m) * k], m);
                assert_eq!(&part[..], &all[start * n..(start + m) * n], "{kernel:?}");
            }
        }
    }

    /// The row panels' prefetch shares cover the next `B` slice's lines once each, none past
    /// it, with no more spread over a tile than its steps allow; at ViT-B/16's shape (197 rows:
    /// tasks of 9 and 8 row panels, 512 lines, `KC` steps) none is left to a burst.
    #[test]
    fn prefetch_shares_cover_the_next_slice_once() {
        for &(panels, lines, kc) in &[
            (9usize, 512usize, 256usize),
            (8, 512, 256),
            (1, 512, 256),
            (17, 512, 64),
            (32, 256, 256),
            (3, 7, 2),
            (4, 10, 1),
            (5, 0, 256),
            (6, 3, 256),
        ] {
            let mut seen = vec![0u32; lines];
            for ii in 0..panels {
                let (spread, burst) = prefetch_share(ii, panels, lines, kc);
                assert!(
                    spread.len() <= kc / Prefetch::STRIDE,
                    "{panels} {lines} {kc}"
                );
                assert_eq!(spread.end, burst.start);
                for l in spread.chain(burst) {
                    seen[l] += 1;
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "{panels} {lines} {kc}: {seen:?}"
            );
        }
        for panels in [9, 8] {
            for ii in 0..panels {
                assert!(prefetch_share(ii, panels, 512, KC).1.is_empty());
            }
        }
    }
}
