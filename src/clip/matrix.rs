//! What the CPU kernels (`gemm_f32`, `gemm_bf16`, `kernels`) share: the strided matrix view,
//! where a GEMM's left operand comes from ([`ASrc`]: a view, or LayerNorm applied to rows while
//! they are packed), what happens to its result on the way out ([`Epi`]: scales, bias,
//! activation, residual, bf16 rounding) and per-thread scratch buffers reused across calls.

use std::cell::Cell;

use super::elementwise::{gelu_generic, quick_gelu_generic, round_bf16_generic};

/// A read-only strided f32 matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl MatRef<'_> {
    pub(crate) fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm: {what} out of bounds");
        }
    }
}

/// The activation applied to a GEMM's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    /// `x · σ(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// `x · Φ(x)` with the exact erf (AdaCLIP, April-GAN).
    Gelu,
}

/// The left operand `A[m, k]` of a GEMM, as its rows are read while packing.
#[derive(Clone, Copy)]
pub enum ASrc<'a> {
    /// The values of a view.
    View(MatRef<'a>),
    /// LayerNorm of the rows of a row-major matrix (row stride `ld`):
    /// `(x − mean) · rstd · gamma + beta` with `stats[i] = [mean, rstd]` of row `i`.
    Norm {
        x: &'a [f32],
        ld: usize,
        stats: &'a [[f32; 2]],
        gamma: &'a [f32],
        beta: &'a [f32],
    },
}

impl ASrc<'_> {
    /// Panics unless an `m × k` matrix lies inside the source.
    pub(crate) fn check(&self, m: usize, k: usize, what: &str) {
        match self {
            ASrc::View(v) => v.check(m, k, what),
            ASrc::Norm {
                x,
                ld,
                stats,
                gamma,
                beta,
            } => {
                if m > 0 && k > 0 {
                    assert!((m - 1) * ld + k <= x.len(), "gemm: {what} out of bounds");
                    assert!(stats.len() >= m && gamma.len() >= k && beta.len() >= k);
                }
            }
        }
    }

    /// Row `i`, columns `k0 .. k0 + out.len()`, into `out`.
    #[inline(always)]
    pub(crate) fn row(&self, i: usize, k0: usize, out: &mut [f32]) {
        let len = out.len();
        match *self {
            ASrc::View(v) if v.cs == 1 => {
                out.copy_from_slice(&v.data[i * v.rs + k0..i * v.rs + k0 + len])
            }
            ASrc::View(v) => {
                for (t, o) in out.iter_mut().enumerate() {
                    *o = v.data[i * v.rs + (k0 + t) * v.cs];
                }
            }
            ASrc::Norm {
                x,
                ld,
                stats,
                gamma,
                beta,
            } => {
                let [mean, rstd] = stats[i];
                let src = &x[i * ld + k0..i * ld + k0 + len];
                let (g, b) = (&gamma[k0..k0 + len], &beta[k0..k0 + len]);
                for (((o, &x), &g), &b) in out.iter_mut().zip(src).zip(g).zip(b) {
                    *o = (x - mean) * rstd * g + b;
                }
            }
        }
    }
}

/// What happens to a GEMM's result `acc[i, j]` on its way to `dst`:
/// `v = act(alpha · row_scale[i] · col_scale[j] · acc + bias[j])`, rounded to bf16 if asked,
/// then `dst[i, j] = v` or, with `accumulate`, `dst[i, j] += v` (a residual). With
/// `transposed`, element `(i, j)` goes to `dst[j · ld + i]` instead of `dst[i · ld + j]`.
#[derive(Clone, Copy)]
pub struct Epi<'a> {
    pub alpha: f32,
    pub row_scale: Option<&'a [f32]>,
    pub col_scale: Option<&'a [f32]>,
    pub bias: Option<&'a [f32]>,
    pub act: Act,
    pub accumulate: bool,
    pub round_bf16: bool,
    pub transposed: bool,
}

impl Default for Epi<'_> {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            row_scale: None,
            col_scale: None,
            bias: None,
            act: Act::None,
            accumulate: false,
            round_bf16: false,
            transposed: false,
        }
    }
}

impl Epi<'_> {
    /// Panics unless the vectors cover an `m × n` result.
    pub(crate) fn check(&self, m: usize, n: usize) {
        assert!(
            self.row_scale.is_none_or(|r| r.len() >= m),
            "epilogue: row scale"
        );
        assert!(
            self.col_scale.is_none_or(|c| c.len() >= n),
            "epilogue: col scale"
        );
        assert!(self.bias.is_none_or(|b| b.len() >= n), "epilogue: bias");
    }

    /// Whether `dst` needs `(m − 1) · ld + n` elements (`(n − 1) · ld + m` transposed).
    pub(crate) fn check_dst(&self, m: usize, n: usize, ld: usize, len: usize) {
        if m > 0 && n > 0 {
            let need = if self.transposed {
                (n - 1) * ld + m
            } else {
                (m - 1) * ld + n
            };
            assert!(need <= len, "gemm: dst out of bounds");
        }
    }

    /// Writes the result block `rows × cols` (at most 32 columns) at `(i0, j0)` from `tile`
    /// (row stride `ts`) into `dst`. The epilogue is applied to `tile` in place first
    /// ([`Self::apply_rows`]), so `tile` holds the stored values afterwards.
    ///
    /// # Safety
    /// `dst` with row stride `ld` (column stride, transposed) holds the block, and no other
    /// thread touches it meanwhile; the vectors cover it ([`Self::check`]).
    #[inline(always)]
    pub(crate) unsafe fn store_tile(
        &self,
        tile: &mut [f32],
        ts: usize,
        rows: (usize, usize),
        cols: (usize, usize),
        dst: *mut f32,
        ld: usize,
    ) {
        debug_assert!(cols.1 <= 32);
        if cols.1 <= 16 {
            self.store_rows::<16>(tile, ts, rows, cols, dst, ld)
        } else {
            self.store_rows::<32>(tile, ts, rows, cols, dst, ld)
        }
    }

    /// The element-wise part on `rows` rows of `N` lanes of `tile` (row stride `ts`), in place:
    /// result rows `i0 ..`, columns `j0 ..` of which the first `cols` are real (the lanes past
    /// them are computed on whatever they hold and never stored). Scale, `col_scale` and bias,
    /// the activation, bf16 rounding if asked.
    ///
    /// Each step runs over all the rows before the next: the rows are independent, so the
    /// activation's long dependency chains (an `exp`, then three Newton steps for `1 / d`)
    /// overlap across rows, where a row at a time waited on each chain in turn (that made the
    /// GELU epilogue ~45 cycles per 16 values on a Xeon).
    #[inline(always)]
    pub(crate) fn apply_rows<const N: usize>(
        &self,
        tile: &mut [f32],
        ts: usize,
        (i0, rows): (usize, usize),
        (j0, cols): (usize, usize),
    ) {
        let (bias, col_scale) = self.col_lanes::<N>(j0, cols);
        let row = |tile: &mut [f32], r: usize| -> *mut [f32; N] {
            let row: &mut [f32] = &mut tile[r * ts..r * ts + N];
            row.as_mut_ptr() as *mut [f32; N]
        };
        for r in 0..rows {
            let s = self.alpha * self.row_scale.map_or(1.0, |rs| rs[i0 + r]);
            // SAFETY: `row` is N in-bounds floats of `tile` (sliced above).
            let v = unsafe { &mut *row(tile, r) };
            for c in 0..N {
                v[c] = v[c] * s * col_scale[c] + bias[c];
            }
        }
        match self.act {
            Act::None => {}
            // SAFETY (both): as above.
            Act::QuickGelu => {
                (0..rows).for_each(|r| quick_gelu_generic(unsafe { &mut *row(tile, r) }))
            }
            Act::Gelu => (0..rows).for_each(|r| gelu_generic(unsafe { &mut *row(tile, r) })),
        }
        if self.round_bf16 {
            // SAFETY: as above.
            (0..rows).for_each(|r| round_bf16_generic(unsafe { &mut *row(tile, r) }));
        }
    }

    /// The bias and column-scale lanes of columns `j0 .. j0 + cols` (0 and 1 past them).
    #[inline(always)]
    pub(crate) fn col_lanes<const N: usize>(&self, j0: usize, cols: usize) -> ([f32; N], [f32; N]) {
        let lanes = |v: Option<&[f32]>, fill: f32| -> [f32; N] {
            let mut out = [fill; N];
            if let Some(v) = v {
                out[..cols].copy_from_slice(&v[j0..j0 + cols]);
            }
            out
        };
        (lanes(self.bias, 0.0), lanes(self.col_scale, 1.0))
    }

    /// [`Self::store_tile`] on `N`-wide rows (a row of `tile` has at least `N` values, the
    /// first `cols` stored).
    #[inline(always)]
    unsafe fn store_rows<const N: usize>(
        &self,
        tile: &mut [f32],
        ts: usize,
        (i0, rows): (usize, usize),
        (j0, cols): (usize, usize),
        dst: *mut f32,
        ld: usize,
    ) {
        self.apply_rows::<N>(tile, ts, (i0, rows), (j0, cols));
        let full = cols == N;
        for r in 0..rows {
            let i = i0 + r;
            let v = &tile[r * ts..r * ts + N];
            if self.transposed {
                for (c, &x) in v.iter().enumerate().take(cols) {
                    let d = dst.add((j0 + c) * ld + i);
                    *d = if self.accumulate { *d + x } else { x };
                }
            } else if full {
                let d = &mut *(dst.add(i * ld + j0) as *mut [f32; N]);
                if self.accumulate {
                    for c in 0..N {
                        d[c] += v[c];
                    }
                } else {
                    d.copy_from_slice(v);
                }
            } else {
                let d = std::slice::from_raw_parts_mut(dst.add(i * ld + j0), cols);
                if self.accumulate {
                    d.iter_mut().zip(v).for_each(|(d, x)| *d += x);
                } else {
                    d.copy_from_slice(&v[..cols]);
                }
            }
        }
    }
}

/// A raw output pointer shared by tasks that write disjoint blocks through it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: the users write disjoint blocks through it, and the buffer outlives the parallel loop
// (it ends before the buffer is read or freed).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// 64 bytes of f32, 64-byte aligned: the unit of the scratch buffers.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line64(pub [f32; 16]);

/// A 64-byte aligned f32 buffer.
#[derive(Default, Clone)]
pub(crate) struct Aligned(Vec<Line64>);

impl Aligned {
    pub fn zeros(len: usize) -> Self {
        Self(vec![Line64([0.0; 16]); len.div_ceil(16)])
    }

    pub fn capacity(&self) -> usize {
        self.0.len() * 16
    }

    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `Line64` is 16 f32s with no padding.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const f32, self.0.len() * 16) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut f32, self.0.len() * 16)
        }
    }
}

thread_local! {
    /// Buffers this thread has used and given back, for the next call to reuse.
    static SCRATCH: Cell<Vec<Aligned>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on a 64-byte aligned buffer of at least `len` f32s (contents unspecified) from this
/// thread's pool, so the kernels allocate nothing per call once warm. Nested calls (and rayon
/// tasks that run inside a waiting one) each get a buffer of their own.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| {
        let mut pool = s.take();
        // The smallest buffer that is large enough, else the largest (grown below).
        let pick = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .or_else(|| pool.iter().enumerate().max_by_key(|(_, b)| b.capacity()))
            .map(|(i, _)| i);
        let buf = pick.map(|i| pool.swap_remove(i));
        s.set(pool);
        buf.unwrap_or_default()
    });
    if buf.capacity() < len {
        buf = Aligned::zeros(len);
    }
    let out = f(&mut buf.as_mut_slice()[..len]);
    SCRATCH.with(|s| {
        let mut pool = s.take();
        pool.push(buf);
        s.set(pool);
    });
    out
}
