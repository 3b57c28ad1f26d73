//! CPU inference kernels for the frozen backbone (f32): the linear layers on the fastest GEMM
//! available, and multi-head attention fused over query chunks.
//!
//! Why: with candle's plain ops a ViT-L/14 forward at 518 px spends most of its time in GEMM at
//! ~100 GFLOP/s (PyTorch's MKL reaches ~150 here), in a scalar `expf` over 16 × 1370² scores per
//! layer, and in page faults from materialising 120 MB score tensors and q/k/v copies. These
//! kernels read q, k and v in place from the fused qkv projection, keep one chunk of scores
//! (256 × L floats) per task, use a vectorised `exp`, and write each head straight into
//! the merged `[B, L, D]` output.
//!
//! GEMM backend: the `gemm` crate (what candle itself uses; pure Rust, runtime CPU dispatch) by
//! default; oneDNN's `dnnl_sgemm` with the `onednn` cargo feature (Debian `libdnnl-dev`).
//!
//! These paths have no backward: layers use them only when no learnable tensor is upstream
//! (`!track_op()`), on the CPU, in f32. Results equal the plain composition up to float
//! reassociation and the `exp` below (within 2 ulp of libm's); tests bound the difference.

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use super::gemm_bf16;
pub use super::gemm_bf16::{Kernel, PackedB};
pub use super::matrix::MatRef;

/// `C[m, n] = (C if accumulate else 0) + alpha · A[m, k] · B[k, n]`, `C` row-major with row
/// stride `ldc` starting at `c[0]`. `parallel = false` keeps the call on the current thread (for
/// callers that already run one task per core).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    ldc: usize,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    if m > 0 && n > 0 {
        assert!((m - 1) * ldc + n <= c.len(), "gemm: dst out of bounds");
    }
    // SAFETY: every index the kernels touch was bounds-checked above.
    unsafe {
        backend::gemm(
            m,
            n,
            k,
            a,
            b,
            c.as_mut_ptr(),
            ldc,
            alpha,
            accumulate,
            parallel,
        )
    }
}

#[cfg(not(feature = "onednn"))]
mod backend {
    use crate::clip::matrix::MatRef;

    /// # Safety
    /// Every element the views `a` (m × k), `b` (k × n) and `c` (m rows of `ldc`, n used) address
    /// must lie inside their allocations; `gemm` checks this before calling.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: MatRef,
        b: MatRef,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        accumulate: bool,
        parallel: bool,
    ) {
        let par = if parallel {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        // gemm's convention: dst = alpha·dst + beta·lhs·rhs.
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(feature = "onednn")]
mod backend {
    use crate::clip::matrix::MatRef;
    use std::os::raw::{c_char, c_int};

    #[link(name = "dnnl")]
    extern "C" {
        fn dnnl_sgemm(
            transa: c_char,
            transb: c_char,
            m: i64,
            n: i64,
            k: i64,
            alpha: f32,
            a: *const f32,
            lda: i64,
            b: *const f32,
            ldb: i64,
            beta: f32,
            c: *mut f32,
            ldc: i64,
        ) -> c_int;
    }
    // oneDNN's Debian build threads with OpenMP (libgomp).
    #[link(name = "gomp")]
    extern "C" {
        fn omp_get_max_threads() -> c_int;
        fn omp_set_num_threads(n: c_int);
    }

    /// oneDNN wants each operand with unit stride along rows or columns.
    fn layout(m: &MatRef, rows: usize, cols: usize) -> Option<(c_char, i64)> {
        if m.cs == 1 {
            Some((b'N' as c_char, m.rs.max(cols).max(1) as i64))
        } else if m.rs == 1 {
            Some((b'T' as c_char, m.cs.max(rows).max(1) as i64))
        } else {
            None
        }
    }

    /// # Safety
    /// Every element the views `a` (m × k), `b` (k × n) and `c` (m rows of `ldc`, n used) address
    /// must lie inside their allocations; `gemm` checks this before calling.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: MatRef,
        b: MatRef,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        accumulate: bool,
        parallel: bool,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let (Some((ta, lda)), Some((tb, ldb))) = (layout(&a, m, k), layout(&b, k, n)) else {
            panic!("dnnl_sgemm needs unit-stride operands");
        };
        let beta = if accumulate { 1.0 } else { 0.0 };
        // One OpenMP thread when the caller already runs one task per core, so rayon's
        // workers and OpenMP's do not oversubscribe the cores.
        let saved = (!parallel).then(|| {
            let t = omp_get_max_threads();
            omp_set_num_threads(1);
            t
        });
        let status = dnnl_sgemm(
            ta,
            tb,
            m as i64,
            n as i64,
            k as i64,
            alpha,
            a.data.as_ptr(),
            lda,
            b.data.as_ptr(),
            ldb,
            beta,
            c,
            ldc.max(n) as i64,
        );
        if let Some(t) = saved {
            omp_set_num_threads(t);
        }
        assert_eq!(status, 0, "dnnl_sgemm failed with status {status}");
    }
}

/// The name of the GEMM backend compiled in.
pub fn gemm_backend() -> &'static str {
    if cfg!(feature = "onednn") {
        "onednn"
    } else {
        "gemm"
    }
}

/// Borrow the f32 data of a contiguous CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("kernels: tensor must be contiguous");
    };
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(f(&v[start..end])),
        _ => candle_core::bail!("kernels: f32 CPU tensors only"),
    }
}

/// Rounds every value to the nearest bfloat16 (ties to even), kept as f32: what an autocast
/// `x.to(bfloat16)` keeps of it.
#[inline(always)]
fn round_bf16_generic(xs: &mut [f32]) {
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

/// A copy of `t` (f32, CPU) with every value rounded to bfloat16.
pub fn round_bf16(t: &Tensor) -> candle_core::Result<Tensor> {
    let v = with_f32(&t.contiguous()?, rounded_copy)?;
    Tensor::from_vec(v, t.shape(), &Device::Cpu)
}

/// `xs` rounded to bfloat16, copied and rounded in one pass per cache-sized chunk.
fn rounded_copy(xs: &[f32]) -> Vec<f32> {
    let mut v = vec![0f32; xs.len()];
    v.par_chunks_mut(16 * 1024)
        .zip(xs.par_chunks(16 * 1024))
        .for_each(|(d, s)| {
            d.copy_from_slice(s);
            round_bf16_in_place(d)
        });
    v
}

/// Whether the fast kernels can take `t`: f32 on the CPU with nothing learnable upstream.
pub fn applies(t: &Tensor) -> bool {
    !t.track_op() && t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// The activation fused into a linear layer's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// `x · σ(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// `x · Φ(x)` with the exact erf (AdaCLIP, April-GAN).
    Gelu,
}

/// How `--precision` multiplies in the fused kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 operands (the default).
    F32,
    /// bf16 operands with f32 accumulation on the CPU's bf16 units.
    Bf16(Kernel),
    /// bf16 operands emulated on a CPU without bf16 units: f32 GEMMs of operands rounded to
    /// bf16 (weights once at load, activations per product), the same numbers up to summation
    /// order, at f32 speed.
    Bf16Emulated,
    /// bf16 operands on a GPU's bf16 units (tensor cores, through cuBLAS), as PyTorch's CUDA
    /// autocast: the weights kept in bf16 (half the memory), activations cast to bf16 per
    /// product and its result read back in f32; LayerNorm, softmax, activations and the rest
    /// stay f32.
    Bf16Autocast,
}

impl Precision {
    /// `--precision bf16` on this CPU: its best bf16 unit, or the emulation.
    pub fn bf16() -> Self {
        match gemm_bf16::selected() {
            Some(k) => Precision::Bf16(k),
            None => Precision::Bf16Emulated,
        }
    }

    pub fn is_bf16(self) -> bool {
        self != Precision::F32
    }

    /// What `zsad info` and `zsad bench --json` report as `"gemm"`: `amx-bf16`, `avx512-bf16`,
    /// or the f32 backend (`gemm`, `onednn`), with `+bf16-emulated` when bf16 is emulated.
    pub fn gemm_name(self) -> String {
        match self {
            Precision::F32 => gemm_backend().to_string(),
            Precision::Bf16(k) => k.name().to_string(),
            Precision::Bf16Emulated => format!("{}+bf16-emulated", gemm_backend()),
            Precision::Bf16Autocast => "bf16-autocast".to_string(),
        }
    }
}

/// A linear layer's weight `W: [out, in]` as the fused kernel reads it.
#[derive(Debug, Clone, Copy)]
pub enum Weight<'a> {
    /// f32, multiplied as is.
    F32(&'a Tensor),
    /// f32 holding bf16 values ([`Precision::Bf16Emulated`]): the input is rounded to bf16 too.
    RoundedF32(&'a Tensor),
    /// Packed bf16 for a bf16 unit.
    Packed(&'a PackedB, Kernel),
}

impl Weight<'_> {
    /// `(out, in)`.
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Weight::F32(w) | Weight::RoundedF32(w) => w.dims2(),
            Weight::Packed(p, _) => Ok((p.n(), p.k())),
        }
    }
}

/// `act(x Wᵀ + b)` for `x: [..., in]`, `W: [out, in]`: one GEMM with the bias preloaded into the
/// output, the activation applied in the same pass over it. Outputs are f32 in every
/// [`Weight`] form; a packed weight multiplies bf16 operands (`x` rounded while it is packed)
/// with f32 accumulation.
pub fn linear(
    x: &Tensor,
    weight: Weight,
    bias: Option<&Tensor>,
    epilogue: Epilogue,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (n_out, n_in) = weight.dims()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("linear: scalar input");
    };
    if last != n_in {
        candle_core::bail!("linear: input width {last}, weight expects {n_in}");
    }
    let m: usize = lead.iter().product();
    let mut out = vec![0f32; m * n_out];
    if let Some(b) = bias {
        with_f32(&b.contiguous()?, |b| {
            out.par_chunks_mut(n_out * 64)
                .for_each(|rows| rows.chunks_mut(n_out).for_each(|r| r.copy_from_slice(b)))
        })?;
    }
    let f32_gemm = |xs: &[f32], w: &Tensor, out: &mut [f32]| {
        with_f32(w, |w| {
            gemm(
                m,
                n_out,
                n_in,
                MatRef {
                    data: xs,
                    rs: n_in,
                    cs: 1,
                },
                // Wᵀ: element (i, j) = W[j, i].
                MatRef {
                    data: w,
                    rs: 1,
                    cs: n_in,
                },
                out,
                n_out,
                1.0,
                bias.is_some(),
                true,
            )
        })
    };
    match weight {
        Weight::F32(w) => with_f32(&x, |xs| f32_gemm(xs, w, &mut out))??,
        Weight::RoundedF32(w) => {
            let xs = with_f32(&x, rounded_copy)?;
            f32_gemm(&xs, w, &mut out)?
        }
        Weight::Packed(p, kernel) => with_f32(&x, |xs| {
            gemm_bf16::gemm(
                kernel,
                m,
                MatRef {
                    data: xs,
                    rs: n_in,
                    cs: 1,
                },
                p,
                &mut out,
                n_out,
                1.0,
                bias.is_some(),
                true,
            )
        })?,
    }
    match epilogue {
        Epilogue::None => {}
        Epilogue::QuickGelu => out.par_chunks_mut(16 * 1024).for_each(quick_gelu_in_place),
        Epilogue::Gelu => out.par_chunks_mut(16 * 1024).for_each(gelu_in_place),
    }
    let mut shape = lead.to_vec();
    shape.push(n_out);
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// Which thirds of the fused qkv rows play q, k and v: `(0, 1, 2)` ordinary, `(2, 2, 2)` V-V.
#[derive(Debug, Clone, Copy)]
pub struct QkvRoles {
    pub q: usize,
    pub k: usize,
    pub v: usize,
}

pub const ORDINARY: QkvRoles = QkvRoles { q: 0, k: 1, v: 2 };
pub const VALUE_VALUE: QkvRoles = QkvRoles { q: 2, k: 2, v: 2 };

/// Query rows per task (256 × L scores, 1.4 MB at 1370 tokens): measured 74 / 69 / 68 ms per
/// ViT-L/14@518 attention for 128 / 256 / 512 on the 2-core development machine.
const QUERY_CHUNK: usize = 256;

/// The attention output, shared by the tasks that each write their own block of it.
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint (rows × head columns) blocks through it, and the buffer
// outlives them (the parallel loop ends before it is read or freed).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `exp(s − max)` in place over each `l`-wide score row of a query chunk starting at query
/// `row0`, after adding its mask row; returns `1 / row sum` per row. The division is applied
/// to the 64-wide output rows instead of the L-wide score rows (as flash attention does).
/// `round` rounds the unnormalised probabilities to bf16 (the emulated bf16 path).
fn exp_scores(
    s: &mut [f32],
    l: usize,
    mask: Option<&[f32]>,
    row0: usize,
    round: bool,
) -> [f32; QUERY_CHUNK] {
    let mut inv_sums = [0f32; QUERY_CHUNK];
    for (i, row) in s.chunks_mut(l).enumerate() {
        if let Some(m) = mask {
            let mrow = &m[(row0 + i) * l..(row0 + i + 1) * l];
            row.iter_mut().zip(mrow).for_each(|(x, m)| *x += m);
        }
        inv_sums[i] = 1.0 / exp_shifted_in_place(row);
        if round {
            round_bf16_in_place(row);
        }
    }
    inv_sums
}

/// `softmax(q kᵀ · scale + mask) v` for every head, reading q, k, v from the fused projection
/// `qkv: [B, L, 3D]` (rows laid out `[q | k | v]`, heads contiguous inside each) and returning
/// the heads merged, `[B, L, D]` (what `out_proj` takes). `mask: [L, L]` is additive.
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    mask: Option<&Tensor>,
    roles: QkvRoles,
) -> candle_core::Result<Tensor> {
    attention_first_queries(qkv, heads, scale, mask, roles, qkv.dim(1)?, Precision::F32)
}

/// [`attention`] for the first `queries` query rows only (keys and values are all `L` rows):
/// `[B, queries, D]`. A final layer whose only wanted output is the CLS token needs one row.
///
/// With a bf16 `precision` both products take bf16 operands: `q`, `k`, `v` and the
/// (unnormalised) probabilities rounded to bf16, f32 accumulation. On a bf16 unit the rounding
/// happens while packing (`k` and `v` once per head); emulated, the caller passes `qkv` already
/// rounded and the probabilities are rounded here.
pub fn attention_first_queries(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    mask: Option<&Tensor>,
    roles: QkvRoles,
    queries: usize,
    precision: Precision,
) -> candle_core::Result<Tensor> {
    let qkv = qkv.contiguous()?;
    let (b, l, d3) = qkv.dims3()?;
    if queries > l {
        candle_core::bail!("attention: {queries} queries of {l} tokens");
    }
    let lq = queries;
    let d = d3 / 3;
    let hd = d / heads.max(1);
    if heads == 0 || d3 != 3 * d || hd * heads != d {
        candle_core::bail!("attention: width {d3} is not 3 x heads x head size");
    }
    let mask = mask.map(|m| m.contiguous()).transpose()?;
    if let Some(m) = &mask {
        if m.dims() != [l, l] {
            candle_core::bail!("attention: mask {:?} for {l} tokens", m.dims());
        }
    }
    let qc = QUERY_CHUNK;
    let mut out = vec![0f32; b * lq * d];
    let chunks = lq.div_ceil(qc);
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    let run = |xs: &[f32], mask: Option<&[f32]>| {
        (0..b * heads * chunks).into_par_iter().for_each_init(
            || vec![0f32; qc * l],
            |scores, item| {
                let (bh, c) = (item / chunks, item % chunks);
                let (bi, h) = (bh / heads, bh % heads);
                let rows = qc.min(lq - c * qc);
                let row0 = c * qc;
                let base = bi * l * d3;
                let col = |role: usize| base + role * d + h * hd;
                let s = &mut scores[..rows * l];
                // S = (q · scale) kᵀ over this chunk of queries.
                gemm(
                    rows,
                    l,
                    hd,
                    MatRef {
                        data: &xs[col(roles.q) + row0 * d3..],
                        rs: d3,
                        cs: 1,
                    },
                    MatRef {
                        data: &xs[col(roles.k)..],
                        rs: 1,
                        cs: d3,
                    },
                    s,
                    l,
                    scale as f32,
                    false,
                    false,
                );
                let inv_sums = exp_scores(s, l, mask, row0, precision.is_bf16());
                // O[rows, head h] = P v, written into the merged output.
                // SAFETY: each task writes its own rows × head-columns block of `out`.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(
                        dst.0.add((bi * lq + row0) * d + h * hd),
                        (rows - 1) * d + hd,
                    )
                };
                gemm(
                    rows,
                    hd,
                    l,
                    MatRef {
                        data: s,
                        rs: l,
                        cs: 1,
                    },
                    MatRef {
                        data: &xs[col(roles.v)..],
                        rs: d3,
                        cs: 1,
                    },
                    o,
                    d,
                    1.0,
                    false,
                    false,
                );
                for (i, inv) in inv_sums[..rows].iter().enumerate() {
                    o[i * d..i * d + hd].iter_mut().for_each(|x| *x *= inv);
                }
            },
        )
    };
    // On a bf16 unit: one task per (image, head), so k and v are packed once for all the
    // query chunks.
    let run_bf16 = |xs: &[f32], mask: Option<&[f32]>, kernel: Kernel| {
        (0..b * heads).into_par_iter().for_each_init(
            || vec![0f32; qc * l],
            |scores, bh| {
                let (bi, h) = (bh / heads, bh % heads);
                let base = bi * l * d3;
                let col = |role: usize| base + role * d + h * hd;
                // kᵀ as B[hd, L]: element (kk, j) = k[j, kk].
                let kt = PackedB::from_f32(
                    MatRef {
                        data: &xs[col(roles.k)..],
                        rs: 1,
                        cs: d3,
                    },
                    hd,
                    l,
                    false,
                );
                let v = PackedB::from_f32(
                    MatRef {
                        data: &xs[col(roles.v)..],
                        rs: d3,
                        cs: 1,
                    },
                    l,
                    hd,
                    false,
                );
                for c in 0..chunks {
                    let rows = qc.min(lq - c * qc);
                    let row0 = c * qc;
                    let s = &mut scores[..rows * l];
                    let q = MatRef {
                        data: &xs[col(roles.q) + row0 * d3..],
                        rs: d3,
                        cs: 1,
                    };
                    gemm_bf16::gemm(kernel, rows, q, &kt, s, l, scale as f32, false, false);
                    // Packing the probabilities for P v rounds them.
                    let inv_sums = exp_scores(s, l, mask, row0, false);
                    // SAFETY: each task writes its own rows × head-columns block of `out`.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(
                            dst.0.add((bi * lq + row0) * d + h * hd),
                            (rows - 1) * d + hd,
                        )
                    };
                    let p = MatRef {
                        data: s,
                        rs: l,
                        cs: 1,
                    };
                    gemm_bf16::gemm(kernel, rows, p, &v, o, d, 1.0, false, false);
                    for (i, inv) in inv_sums[..rows].iter().enumerate() {
                        o[i * d..i * d + hd].iter_mut().for_each(|x| *x *= inv);
                    }
                }
            },
        )
    };
    let run_any = |xs: &[f32], mask: Option<&[f32]>| match precision {
        Precision::Bf16(kernel) => run_bf16(xs, mask, kernel),
        _ => run(xs, mask),
    };
    with_f32(&qkv, |xs| match &mask {
        Some(m) => with_f32(m, |m| run_any(xs, Some(m))),
        None => {
            run_any(xs, None);
            Ok(())
        }
    })??;
    Tensor::from_vec(out, (b, lq, d), &Device::Cpu)
}

// ---------------------------------------------------------------------------------------------
// Vectorised element-wise math. The loops are written so LLVM vectorises them; the wrappers
// compile them again with AVX2+FMA / AVX-512 and pick one at run time (the crate itself targets
// baseline x86-64).

/// `exp(x)` within 2 ulp for x in [-87.3, 88.7]; exactly 0 below (so -inf masks give 0).
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits (vectorises, unlike
    // `round`, which is a libm call per element).
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let t = xc.mul_add(LOG2E, MAGIC);
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    // Taylor to degree 7 on |r| <= ln2/2: truncation error < 5e-9 relative.
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scaled = p * f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        scaled
    }
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

#[cfg(test)]
fn softmax_in_place(row: &mut [f32]) {
    let inv = 1.0 / exp_shifted_in_place(row);
    row.iter_mut().for_each(|x| *x *= inv);
}

#[inline(always)]
fn quick_gelu_generic(xs: &mut [f32]) {
    xs.iter_mut()
        .for_each(|x| *x /= 1.0 + exp_approx(-1.702 * *x));
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
fn gelu_generic(xs: &mut [f32]) {
    xs.iter_mut()
        .for_each(|x| *x = 0.5 * *x * (1.0 + erf_approx(*x * std::f32::consts::FRAC_1_SQRT_2)));
}

macro_rules! dispatch {
    ($name:ident, $generic:ident, $ret:ty) => {
        pub fn $name(xs: &mut [f32]) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
                unsafe fn avx512(xs: &mut [f32]) -> $ret {
                    $generic(xs)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2(xs: &mut [f32]) -> $ret {
                    $generic(xs)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("fma")
                {
                    // SAFETY: every feature `avx512` is compiled for was detected just above.
                    return unsafe { avx512(xs) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for AVX2 and FMA.
                    return unsafe { avx2(xs) };
                }
            }
            $generic(xs)
        }
    };
}

dispatch!(exp_shifted_in_place, exp_shifted_generic, f32);
dispatch!(quick_gelu_in_place, quick_gelu_generic, ());
dispatch!(gelu_in_place, gelu_generic, ());
dispatch!(round_bf16_in_place, round_bf16_generic, ());

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    fn rand(seed: u64, n: usize) -> Vec<f32> {
        crate::rng::SplitMix64(seed).normal(n, 1.0)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

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

    #[test]
    fn softmax_and_quick_gelu_match_candle() {
        let dev = Device::Cpu;
        for n in [1usize, 7, 8, 37, 1370] {
            let mut v: Vec<f32> = rand(n as u64, 3 * n).iter().map(|x| 6.0 * x).collect();
            if n > 1 {
                v[0] = f32::NEG_INFINITY; // a masked score
            }
            let t = Tensor::from_vec(v.clone(), (3, n), &dev).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&t).unwrap();
            v.chunks_mut(n).for_each(softmax_in_place);
            let got = Tensor::from_vec(v, (3, n), &dev).unwrap();
            assert!(max_diff(&got, &want) < 1e-6, "n = {n}");
        }
        let x = Tensor::from_vec(
            rand(9, 4096).iter().map(|x| 8.0 * x).collect::<Vec<_>>(),
            4096,
            &dev,
        )
        .unwrap();
        let want = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap();
        let mut v = x.to_vec1::<f32>().unwrap();
        quick_gelu_in_place(&mut v);
        let got = Tensor::from_vec(v, 4096, &dev).unwrap();
        assert!(max_diff(&got, &want) < 2e-6);
        // Exact GELU against candle's erf, over the whole range where it is not saturated.
        let x = Tensor::from_vec(
            (0..20_001)
                .map(|i| -10.0 + i as f32 * 1e-3)
                .collect::<Vec<_>>(),
            20_001,
            &dev,
        )
        .unwrap();
        let want = x.gelu_erf().unwrap();
        let mut v = x.to_vec1::<f32>().unwrap();
        gelu_in_place(&mut v);
        let got = Tensor::from_vec(v, 20_001, &dev).unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-6, "gelu differs by {d}");
    }

    #[test]
    fn linear_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(rand(1, 2 * 37 * 48), (2, 37, 48), &dev).unwrap();
        let w = Tensor::from_vec(rand(2, 80 * 48), (80, 48), &dev).unwrap();
        let b = Tensor::from_vec(rand(3, 80), 80, &dev).unwrap();
        let want = candle_nn::Linear::new(w.clone(), Some(b.clone()))
            .forward(&x)
            .unwrap();
        let got = linear(&x, Weight::F32(&w), Some(&b), Epilogue::None).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert!(max_diff(&got, &want) < 1e-5);
        let got = linear(&x, Weight::F32(&w), None, Epilogue::QuickGelu).unwrap();
        let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let want = (&y * candle_nn::ops::sigmoid(&(&y * 1.702).unwrap()).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }

    /// bf16 rounding: ties to even, as torch's `.to(torch.bfloat16)`; a bf16 weight gives the
    /// f32 product of the rounded operands.
    #[test]
    fn bf16_rounding_and_linear() {
        let mut v = vec![
            1.0f32,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -2.5e-3,
            f32::INFINITY,
            0.0,
        ];
        round_bf16_in_place(&mut v);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], 1.0, "a tie rounds to the even mantissa");
        assert_eq!(
            v[2],
            1.0 + 4.0 / 256.0,
            "a tie rounds up to the even mantissa"
        );
        assert_eq!(v[3], half::bf16::from_f32(-2.5e-3).to_f32());
        assert_eq!((v[4], v[5]), (f32::INFINITY, 0.0));
        let dev = Device::Cpu;
        let x = Tensor::from_vec(rand(5, 3 * 300 * 40), (3, 300, 40), &dev).unwrap();
        let w = Tensor::from_vec(rand(6, 300 * 40), (300, 40), &dev).unwrap();
        let b = Tensor::from_vec(rand(7, 300), 300, &dev).unwrap();
        let want = candle_nn::Linear::new(round_bf16(&w).unwrap(), Some(b.clone()))
            .forward(&round_bf16(&x).unwrap())
            .unwrap();
        let rounded = round_bf16(&w).unwrap();
        let got = linear(&x, Weight::RoundedF32(&rounded), Some(&b), Epilogue::None).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "emulated");
        let wb = w.to_dtype(candle_core::DType::BF16).unwrap();
        let packed = PackedB::from_weight(&wb.flatten_all().unwrap().to_vec1().unwrap(), 300, 40);
        if crate::clip::gemm_bf16::available().is_empty() {
            println!("SKIP: no bf16 unit on this CPU; the packed linear layer is not run");
        }
        for &kernel in crate::clip::gemm_bf16::available() {
            for epilogue in [Epilogue::None, Epilogue::QuickGelu, Epilogue::Gelu] {
                let emulated =
                    linear(&x, Weight::RoundedF32(&rounded), Some(&b), epilogue).unwrap();
                let got = linear(&x, Weight::Packed(&packed, kernel), Some(&b), epilogue).unwrap();
                let d = max_diff(&got, &emulated);
                assert!(d < 1e-5, "{} {epilogue:?}: {d}", kernel.name());
            }
        }
    }

    /// Fused attention equals the per-head composition, ordinary and V-V, with a causal mask
    /// and with more tokens than one query chunk.
    #[test]
    fn attention_matches_the_composition() {
        let dev = Device::Cpu;
        let (b, l, heads, hd) = (2, QUERY_CHUNK + 9, 3, 8);
        let d = heads * hd;
        let qkv = Tensor::from_vec(rand(4, b * l * 3 * d), (b, l, 3 * d), &dev).unwrap();
        let causal: Vec<f32> = (0..l * l)
            .map(|i| {
                if i % l > i / l {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let causal = Tensor::from_vec(causal, (l, l), &dev).unwrap();
        let split = qkv
            .reshape((b, l, 3, heads, hd))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap();
        let part = |i: usize| split.get(i).unwrap().contiguous().unwrap();
        for (roles, mask) in [
            (ORDINARY, None),
            (ORDINARY, Some(&causal)),
            (VALUE_VALUE, None),
        ] {
            let (q, k, v) = (part(roles.q), part(roles.k), part(roles.v));
            let s = (q * 0.125).unwrap().matmul(&k.t().unwrap()).unwrap();
            let s = match mask {
                Some(m) => s.broadcast_add(m).unwrap(),
                None => s,
            };
            let want = candle_nn::ops::softmax_last_dim(&s)
                .unwrap()
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, l, d))
                .unwrap();
            let got = attention(&qkv, heads, 0.125, mask, roles).unwrap();
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5, "{roles:?} mask {}: {diff}", mask.is_some());
            let first = attention_first_queries(&qkv, heads, 0.125, mask, roles, 3, Precision::F32)
                .unwrap();
            // The same sums, perhaps blocked differently by the GEMM for 3 rows than for 137.
            assert!(max_diff(&first, &got.narrow(1, 0, 3).unwrap()) < 1e-6);
            // bf16: the emulation (qkv rounded by the caller) against each bf16 unit.
            let rounded = round_bf16(&qkv).unwrap();
            let l = qkv.dim(1).unwrap();
            let emulated = attention_first_queries(
                &rounded,
                heads,
                0.125,
                mask,
                roles,
                l,
                Precision::Bf16Emulated,
            )
            .unwrap();
            assert!(max_diff(&emulated, &got) < 0.05, "bf16 is near f32");
            for &kernel in crate::clip::gemm_bf16::available() {
                for queries in [l, 1] {
                    let unit = attention_first_queries(
                        &qkv,
                        heads,
                        0.125,
                        mask,
                        roles,
                        queries,
                        Precision::Bf16(kernel),
                    )
                    .unwrap();
                    let d = max_diff(&unit, &emulated.narrow(1, 0, queries).unwrap());
                    assert!(
                        d < 1e-5,
                        "{} {roles:?} {queries} queries: {d}",
                        kernel.name()
                    );
                }
            }
        }
    }

    #[test]
    fn attention_refuses_zero_heads() {
        let qkv = Tensor::zeros((1, 4, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(attention(&qkv, 0, 1.0, None, ORDINARY).is_err());
    }
}
