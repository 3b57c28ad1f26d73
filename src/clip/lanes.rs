//! f32 register tiles on AVX-512 and AVX2, written once over the vector width: the [`Lanes`]
//! operations, and [`tile`], the `R × 2W` multiply-add block that both the f32 GEMM's
//! micro-kernel (`gemm_f32`) and the fused attention head (`head`) run.
//!
//! Everything here is inlined into callers compiled for its instruction set
//! (`#[target_feature]` functions, or closures written inside one), where the operations become
//! a loop over registers; called from anywhere else they would be function calls.

/// The f32 vector operations the register tiles need, on `W` lanes.
///
/// # Safety
/// Every method needs the instruction set of its implementation (the callers are compiled
/// for it).
pub(crate) trait Lanes {
    type V: Copy;
    const W: usize;
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

/// AVX-512F and FMA: 16 lanes.
pub(crate) struct Avx512;

impl Lanes for Avx512 {
    type V = std::arch::x86_64::__m512;
    const W: usize = 16;
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

/// AVX2 and FMA: 8 lanes.
pub(crate) struct Avx2;

impl Lanes for Avx2 {
    type V = std::arch::x86_64::__m256;
    const W: usize = 8;
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

/// Cache lines a [`tile`] brings into L2 while it multiplies: `lines` consecutive 64-byte
/// lines from `at`, one every [`Prefetch::STRIDE`] k-steps (at most `kc / STRIDE` of them).
///
/// Spread this way, the prefetches of the next operand panel stay a few in flight at a time.
/// Issued in one burst before a tile (~60 at once), they held every line-fill buffer, and the
/// tile's own loads waited behind them: the f32 ViT-B/16 forward ran ~8% slower on an
/// Emerald Rapids Xeon. Off x86-64 it is ignored.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Prefetch {
    pub at: *const f32,
    pub lines: usize,
}

impl Prefetch {
    pub const NONE: Self = Self {
        at: std::ptr::null(),
        lines: 0,
    };
    /// k-steps between two prefetches (a power of two: the test is a mask and a shift).
    pub const STRIDE: usize = 2;
}

/// An `R × 2W` register tile: `acc[r] = c[r] + Σ_s a_s[r] · b_s` over `kc` steps, `a_s` the `R`
/// values at `a + s · a_step` (each broadcast), `b_s` the `2W` values at `b + s · 2W`, `c` the
/// tile at `init` (rows `2W` apart) or zero. Each sum runs over the steps in order, one rounding
/// per multiply-add. `pf`'s lines are prefetched on the way (it changes no value).
///
/// # Safety
/// `a` holds `(kc − 1) · a_step + R` floats, `b` `2W · kc`, `init` `2W · R`; the CPU has `L`'s
/// instruction set and the caller is compiled for it. (`pf` may point anywhere: a prefetch
/// never faults.)
#[inline(always)]
pub(crate) unsafe fn tile<L: Lanes, const R: usize>(
    kc: usize,
    a: *const f32,
    a_step: usize,
    b: *const f32,
    init: Option<*const f32>,
    pf: Prefetch,
) -> [[L::V; 2]; R] {
    let mut acc = [[L::zero(); 2]; R];
    if let Some(c) = init {
        for (r, acc) in acc.iter_mut().enumerate() {
            acc[0] = L::load(c.add(2 * L::W * r));
            acc[1] = L::load(c.add(2 * L::W * r + L::W));
        }
    }
    let (mut a, mut b) = (a, b);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = pf;
    for s in 0..kc {
        #[cfg(target_arch = "x86_64")]
        if s % Prefetch::STRIDE == 0 && s / Prefetch::STRIDE < pf.lines {
            // `wrapping_add`: the address is only a hint, never dereferenced.
            let line = pf.at.wrapping_add(s / Prefetch::STRIDE * 16);
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                line as *const i8,
            );
        }
        let b0 = L::load(b);
        let b1 = L::load(b.add(L::W));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = L::splat(*a.add(r));
            acc[0] = L::fmadd(x, b0, acc[0]);
            acc[1] = L::fmadd(x, b1, acc[1]);
        }
        a = a.add(a_step);
        b = b.add(2 * L::W);
    }
    acc
}

/// Stores a tile's rows `2W` apart at `c`.
///
/// # Safety
/// `c` holds `2W · R` floats; as [`tile`].
#[inline(always)]
pub(crate) unsafe fn store<L: Lanes, const R: usize>(acc: &[[L::V; 2]; R], c: *mut f32) {
    for (r, acc) in acc.iter().enumerate() {
        L::store(c.add(2 * L::W * r), acc[0]);
        L::store(c.add(2 * L::W * r + L::W), acc[1]);
    }
}
