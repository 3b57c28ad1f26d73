//! CPU inference kernels for the frozen backbone: the linear layers on our packed GEMMs
//! (`gemm_f32`, and `gemm_bf16` for `--precision bf16`), and multi-head attention fused per
//! (image, head).
//!
//! Why: with candle's plain ops a ViT-L/14 forward at 518 px spends most of its time in GEMM at
//! ~100 GFLOP/s, in a scalar `expf` over 16 × 1370² scores per layer, and in page faults from
//! materialising 120 MB score tensors and q/k/v copies. These kernels read q, k and v in place
//! from the fused qkv projection, keep one chunk of scores per task in a reused scratch buffer,
//! use a vectorised `exp`, and write each head straight into the merged `[B, L, D]` output.
//!
//! The f32 attention computes `Sᵀ = K Qᵀ` for a chunk of queries, so the scores land in the
//! layout the second product reads (`Pᵀ` as its packed right operand) and the softmax runs down
//! columns with the queries in vector lanes; `Oᵀ = Vᵀ Pᵀ` is written transposed into the merged
//! output with `1 / Σ` (and a head weight) as a column scale. No copy of the probabilities.
//!
//! On a bf16 unit, heads of 33-64 features (ViT-B and ViT-L) run fused ([`super::head`]): 32
//! queries at a time, the scores in tiles, the softmax written straight into the bf16 tiles of
//! `P v`; other head sizes take the blocked form below (`head_bf16`). In f32 on AVX-512 or AVX2,
//! heads of whole feature tiles without a mask run fused too (`head::f32_fused`: the same sums
//! in the same order as `head_f32`, so the same bits, without its padding and generic
//! epilogues: one ViT-L/14@518 layer's attention ~36 → ~26 ms on two Xeon cores).
//!
//! These paths have no backward: layers use them only when no learnable tensor is upstream
//! (`!track_op()`), on the CPU, in f32. Results equal the plain composition up to float
//! reassociation and the `exp` below (within 2 ulp of libm's); tests bound the difference.
//! Every row's result is independent of the other rows of the product (the images of a batch).

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use super::elementwise::{exp_approx, round_bf16_generic, simd, Simd};
pub use super::elementwise::{
    exp_shifted_in_place, gelu_in_place, layer_norm_stats, quick_gelu_in_place, round_bf16_in_place,
};
use super::gemm_bf16::{self, RowLines};
pub use super::gemm_bf16::{gemm_packed, gemm_to_packed, Kernel, PackedB, PackedRows};
pub use super::gemm_f32::PackedW;
use super::gemm_f32::{self, F32Kernel};
use super::head::{self, HeadJob};
use super::matrix::{with_scratch, SendPtr};
pub use super::matrix::{ASrc, Act, Epi, MatRef};

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

/// The name of the reference GEMM [`gemm`] runs on (`gemm`, or `onednn` with that feature), for
/// benchmarks.
pub fn reference_backend() -> &'static str {
    if cfg!(feature = "onednn") {
        "onednn"
    } else {
        "gemm"
    }
}

/// The f32 GEMM the backbone runs on: `f32-avx512`, `f32-avx2` or `f32-portable`.
pub fn gemm_backend() -> &'static str {
    gemm_f32::selected().name()
}

/// Borrow the f32 data of a contiguous CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("kernels: tensor must be contiguous");
    };
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(f(&v[start..end])),
        _ => candle_core::bail!("kernels: f32 CPU tensors only"),
    }
}

// Candle's elementwise ops on 64 Ki values or more run on candle's own thread pool, whose idle
// worker then spins (25,000 `pause`s, ~1.7 ms on a Xeon) beside rayon's threads; on two cores
// that spinning took ~3 ms of CPU per image from `zsad detect`. The per-batch ops of the
// inference path are therefore done here, with the same single IEEE operations (the same bits).

/// `[cls; patches_b] + positions` for every image `b`: `Tensor::cat` then `broadcast_add`, in one
/// pass. `cls: [D]`, `patches: [B, P, D]`, `positions: [1 + P, D]` (f32, CPU) -> `[B, 1 + P, D]`.
pub(crate) fn embed_tokens(
    cls: &Tensor,
    patches: &Tensor,
    positions: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, p, d) = patches.dims3()?;
    if cls.elem_count() != d || positions.dims() != [1 + p, d] {
        candle_core::bail!(
            "embed_tokens: cls {:?} and positions {:?} do not fit patches {:?}",
            cls.dims(),
            positions.dims(),
            patches.dims()
        );
    }
    let mut out = vec![0f32; b * (1 + p) * d];
    with_f32(&cls.contiguous()?, |cls| {
        with_f32(&patches.contiguous()?, |patches| {
            with_f32(&positions.contiguous()?, |pos| {
                // Indexed, not chunked: `p` or `d` may be 0.
                for i in 0..b {
                    let image = &mut out[i * (1 + p) * d..(i + 1) * (1 + p) * d];
                    let src = &patches[i * p * d..(i + 1) * p * d];
                    let (first, rest) = image.split_at_mut(d);
                    let (pos0, pos_rest) = pos.split_at(d);
                    for ((o, &c), &q) in first.iter_mut().zip(cls).zip(pos0) {
                        *o = c + q;
                    }
                    for ((o, &x), &q) in rest.iter_mut().zip(src).zip(pos_rest) {
                        *o = x + q;
                    }
                }
            })
        })
    })???;
    Tensor::from_vec(out, (b, 1 + p, d), &Device::Cpu)
}

/// `t / ‖t‖` over the last dimension (f32, CPU): `t.sqr().sum_keepdim(-1).sqrt()` then
/// `broadcast_div`. The squares and quotients are computed here; the sum stays candle's
/// reduction (single-threaded), so its order, and the bits, are what they were.
pub(crate) fn l2_normalize_last(t: &Tensor) -> candle_core::Result<Tensor> {
    let t = t.contiguous()?;
    let d = t.dim(candle_core::D::Minus1)?;
    let squares = with_f32(&t, |v| v.iter().map(|x| x * x).collect::<Vec<f32>>())?;
    let norms = Tensor::from_vec(squares, t.shape(), &Device::Cpu)?
        .sum_keepdim(candle_core::D::Minus1)?
        .sqrt()?
        .contiguous()?;
    let mut out = with_f32(&t, <[f32]>::to_vec)?;
    with_f32(&norms, |n| {
        for (row, &n) in out.chunks_mut(d.max(1)).zip(n) {
            row.iter_mut().for_each(|x| *x /= n);
        }
    })?;
    Tensor::from_vec(out, t.shape(), &Device::Cpu)
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
pub type Epilogue = Act;

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
    /// or the f32 kernel (`f32-avx512`, `f32-avx2`, `f32-portable`), with `+bf16-emulated`
    /// when bf16 is emulated.
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
    /// f32, packed for the f32 kernel.
    F32(&'a PackedW),
    /// f32 holding bf16 values ([`Precision::Bf16Emulated`]): the input is rounded to bf16 too.
    RoundedF32(&'a PackedW),
    /// Packed bf16 for a bf16 unit.
    Packed(&'a PackedB, Kernel),
}

impl Weight<'_> {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Weight::F32(w) | Weight::RoundedF32(w) => (w.n(), w.k()),
            Weight::Packed(p, _) => (p.n(), p.k()),
        }
    }

    /// `dst ⟵ epi(A Wᵀ)` for `A: [m, in]` read from `a`, `dst` with row stride `ld`.
    pub fn gemm(&self, m: usize, a: ASrc, dst: &mut [f32], ld: usize, epi: &Epi, parallel: bool) {
        match *self {
            Weight::F32(w) => gemm_f32::gemm(m, a, false, w, dst, ld, epi, parallel),
            Weight::RoundedF32(w) => gemm_f32::gemm(m, a, true, w, dst, ld, epi, parallel),
            Weight::Packed(p, kernel) => {
                gemm_bf16::gemm_epi(kernel, m, a, p, dst, ld, epi, parallel)
            }
        }
    }
}

/// `act(x Wᵀ + b)` for `x: [..., in]`, `W: [out, in]`: one GEMM with the bias and the activation
/// applied as each block of the output is written. Outputs are f32 in every [`Weight`] form; a
/// packed bf16 weight multiplies bf16 operands (`x` rounded while it is packed) with f32
/// accumulation.
pub fn linear(
    x: &Tensor,
    weight: Weight,
    bias: Option<&Tensor>,
    epilogue: Epilogue,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (n_out, n_in) = weight.dims();
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("linear: scalar input");
    };
    if last != n_in {
        candle_core::bail!("linear: input width {last}, weight expects {n_in}");
    }
    let m: usize = lead.iter().product();
    let mut out = vec![0f32; m * n_out];
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let mut run = |xs: &[f32], bias: Option<&[f32]>| {
        let epi = Epi {
            bias,
            act: epilogue,
            ..Default::default()
        };
        let a = ASrc::View(MatRef {
            data: xs,
            rs: n_in,
            cs: 1,
        });
        weight.gemm(m, a, &mut out, n_out, &epi, true)
    };
    with_f32(&x, |xs| match &bias {
        Some(b) => with_f32(b, |b| run(xs, Some(b))),
        None => {
            run(xs, None);
            Ok(())
        }
    })??;
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

/// Query rows per chunk on a bf16 unit (256 × L scores, 1.4 MB at 1370 tokens).
const QUERY_CHUNK: usize = 256;
/// Query columns per chunk of the f32 kernel (`Sᵀ` is L × 64: 350 KB at 1370 tokens).
const QUERY_CHUNK_F32: usize = 64;

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
    let mask = mask.map(|m| m.contiguous()).transpose()?;
    let mut out = vec![0f32; b * queries.min(l) * (d3 / 3)];
    let spec = AttentionSpec {
        batch: b,
        tokens: l,
        heads,
        scale: scale as f32,
        roles,
        queries,
        precision,
    };
    with_f32(&qkv, |xs| match &mask {
        Some(m) => with_f32(m, |m| attention_into(xs, &spec, Some(m), None, &mut out)),
        None => Ok(attention_into(xs, &spec, None, None, &mut out)),
    })???;
    Tensor::from_vec(out, (b, queries, d3 / 3), &Device::Cpu)
}

/// The shape and options of one fused attention.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    /// Images `B` and tokens `L` per image.
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub scale: f32,
    pub roles: QkvRoles,
    /// The first `queries` rows of each image are queries.
    pub queries: usize,
    pub precision: Precision,
}

/// [`attention_first_queries`] over slices: `qkv` `[B, L, 3D]`, `mask` `[L, L]`, optional
/// per-head weights (HeadCLIP: each head's output scaled), into `out` `[B, queries, D]`.
pub fn attention_into(
    qkv: &[f32],
    spec: &AttentionSpec,
    mask: Option<&[f32]>,
    head_weights: Option<&[f32]>,
    out: &mut [f32],
) -> candle_core::Result<()> {
    let (d3, hd) = check_attention(qkv, spec, mask, head_weights)?;
    if out.len() != spec.batch * spec.queries * d3 / 3 {
        candle_core::bail!("attention: output of the wrong size");
    }
    if spec.queries == 0 {
        return Ok(());
    }
    // Which head kernel runs: the same for every head, so decided once here.
    let path = match spec.precision {
        #[cfg(target_arch = "x86_64")]
        Precision::Bf16(kernel) if head::fused_fits(hd, kernel) => HeadPath::Bf16Fused(kernel),
        Precision::Bf16(kernel) => HeadPath::Bf16Blocked(kernel),
        precision => {
            let (kernel, round) = (gemm_f32::selected(), precision.is_bf16());
            #[cfg(target_arch = "x86_64")]
            let fused = head::f32_fused_fits(hd, kernel, mask.is_some(), round)
                .then_some(HeadPath::F32Fused(kernel));
            #[cfg(not(target_arch = "x86_64"))]
            let fused = None;
            fused.unwrap_or(HeadPath::F32Blocked(kernel, round))
        }
    };
    let dst = SendPtr(out.as_mut_ptr());
    run_heads(
        qkv,
        spec,
        (d3, hd),
        mask,
        head_weights,
        HeadsOut::F32(dst),
        path,
    );
    Ok(())
}

/// Whether [`attention_into_packed`] takes heads of `hd` features at `precision`: the fused
/// head on a bf16 unit, with whole 32-column lines per head.
pub fn attention_packs(precision: Precision, hd: usize) -> bool {
    match precision {
        #[cfg(target_arch = "x86_64")]
        Precision::Bf16(kernel) => hd.is_multiple_of(32) && head::fused_fits(hd, kernel),
        _ => false,
    }
}

/// [`attention_into`] with the heads merged straight into `out` as bf16 rows packed for the
/// output projection's left operand ([`gemm_packed`]), `[B · queries, D]`: each head rounds its
/// output as it stores it, so there is no f32 copy of the merged heads and no packing pass
/// before `out_proj`. The values are those [`attention_into`] gives, rounded to bf16 as packing
/// them would round them, so the projection's result is the same. For an `attention_packs`
/// precision and head size only (an error otherwise).
pub fn attention_into_packed(
    qkv: &[f32],
    spec: &AttentionSpec,
    mask: Option<&[f32]>,
    head_weights: Option<&[f32]>,
    out: &mut PackedRows,
) -> candle_core::Result<()> {
    let (d3, hd) = check_attention(qkv, spec, mask, head_weights)?;
    #[cfg(target_arch = "x86_64")]
    if let Precision::Bf16(kernel) = spec.precision {
        if attention_packs(spec.precision, hd) {
            let lines = out.prepare(spec.batch * spec.queries, d3 / 3);
            if spec.queries > 0 {
                let path = HeadPath::Bf16Fused(kernel);
                run_heads(
                    qkv,
                    spec,
                    (d3, hd),
                    mask,
                    head_weights,
                    HeadsOut::Packed(lines),
                    path,
                );
            }
            return Ok(());
        }
    }
    candle_core::bail!("attention: heads of {hd} features at this precision are not packed")
}

/// `(3D, head size)` of a well-formed attention over `qkv`, else the reason it is not.
fn check_attention(
    qkv: &[f32],
    spec: &AttentionSpec,
    mask: Option<&[f32]>,
    head_weights: Option<&[f32]>,
) -> candle_core::Result<(usize, usize)> {
    let &AttentionSpec {
        batch: b,
        tokens: l,
        heads,
        queries: lq,
        ..
    } = spec;
    let d3 = qkv.len().checked_div(b * l).unwrap_or(0);
    let d = d3 / 3;
    let hd = d / heads.max(1);
    if lq > l {
        candle_core::bail!("attention: {lq} queries of {l} tokens");
    }
    if heads == 0 || d3 != 3 * d || hd * heads != d || qkv.len() != b * l * d3 {
        candle_core::bail!("attention: width {d3} is not 3 x heads x head size");
    }
    if mask.is_some_and(|m| m.len() != l * l) {
        candle_core::bail!("attention: mask of {} for {l} tokens", mask.unwrap().len());
    }
    if head_weights.is_some_and(|w| w.len() != heads) {
        candle_core::bail!("attention: {heads} heads but other head weights");
    }
    Ok((d3, hd))
}

/// Where [`run_heads`] writes the merged heads.
#[derive(Clone, Copy)]
enum HeadsOut {
    /// `[B, queries, D]` f32.
    F32(SendPtr),
    /// The output projection's packed bf16 rows (the fused bf16 head only).
    Packed(RowLines),
}

/// The kernel that runs an attention's heads.
#[derive(Clone, Copy)]
enum HeadPath {
    /// `head::bf16_fused` on a bf16 unit.
    #[cfg(target_arch = "x86_64")]
    Bf16Fused(Kernel),
    /// [`head_bf16`], the blocked form, for other head sizes.
    Bf16Blocked(Kernel),
    /// `head::f32_fused` on AVX-512 or AVX2.
    #[cfg(target_arch = "x86_64")]
    F32Fused(F32Kernel),
    /// [`head_f32`], the blocked form (`true`: probabilities rounded to bf16, emulated).
    F32Blocked(F32Kernel, bool),
}

/// Every (image, head) of a checked [`attention_into`] (rows of `d3`, heads of `hd`) on
/// `path`, one task each.
fn run_heads(
    qkv: &[f32],
    spec: &AttentionSpec,
    (d3, hd): (usize, usize),
    mask: Option<&[f32]>,
    head_weights: Option<&[f32]>,
    out: HeadsOut,
    path: HeadPath,
) {
    let (l, lq, heads, d) = (spec.tokens, spec.queries, spec.heads, d3 / 3);
    (0..spec.batch * heads).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / heads, bh % heads);
        let base = bi * l * d3;
        let col = |role: usize| base + role * d + h * hd;
        let (dst, packed) = match out {
            HeadsOut::F32(dst) => (dst, None),
            HeadsOut::Packed(lines) => (
                SendPtr(std::ptr::null_mut()),
                Some((lines, bi * lq, h * hd)),
            ),
        };
        let job = HeadJob {
            xs: qkv,
            d3,
            l,
            lq,
            hd,
            cols: (col(spec.roles.q), col(spec.roles.k), col(spec.roles.v)),
            scale: spec.scale,
            mask,
            weight: head_weights.map_or(1.0, |w| w[h]),
            // SAFETY: the (image, head) block of `out` this task writes is inside `out` (no
            // f32 output with packed rows: `wrapping_add` keeps the null pointer defined).
            out: dst.0.wrapping_add(bi * lq * d + h * hd),
            ld: d,
            packed,
        };
        // SAFETY: each task writes its own (image, head) block of `out`, rows of `ld` floats;
        // the fused paths were chosen only where they fit.
        unsafe {
            match path {
                #[cfg(target_arch = "x86_64")]
                HeadPath::Bf16Fused(kernel) => head::bf16_fused(&job, kernel),
                HeadPath::Bf16Blocked(kernel) => head_bf16(&job, kernel),
                #[cfg(target_arch = "x86_64")]
                HeadPath::F32Fused(kernel) => head::f32_fused(&job, kernel),
                HeadPath::F32Blocked(kernel, round) => head_f32(&job, kernel, round),
            }
        }
    });
}

/// A head in f32 (`round`: the emulated bf16 path, q, k, v already rounded by the caller and
/// the probabilities rounded here): `Sᵀ = K Qᵀ` per chunk of queries into the packed layout of
/// `Pᵀ`, softmax down its columns, `Oᵀ = Vᵀ Pᵀ` stored transposed.
///
/// # Safety
/// `job.out` holds `lq` rows of `hd` floats, `ld` apart, that no other thread writes.
unsafe fn head_f32(job: &HeadJob, kernel: F32Kernel, round: bool) {
    let (mr, nr) = (kernel.mr(), kernel.nr());
    let (l, hd, d3) = (job.l, job.hd, job.d3);
    let qc = QUERY_CHUNK_F32.min(job.lq).div_ceil(nr) * nr;
    let k_len = l.div_ceil(mr) * mr * hd; // K as A: [L, hd]
    let v_len = hd.div_ceil(mr) * mr * l; // Vᵀ as A: [hd, L]
    let q_len = qc * hd; // Qᵀ as B: [hd, qc]
    let p_len = qc * l; // Pᵀ as B: [L, qc]
    with_scratch(k_len + v_len + q_len + p_len + qc, |buf| {
        let (ka, rest) = buf.split_at_mut(k_len);
        let (va, rest) = rest.split_at_mut(v_len);
        let (qb, rest) = rest.split_at_mut(q_len);
        let (pb, inv) = rest.split_at_mut(p_len);
        let (qcol, kcol, vcol) = job.cols;
        gemm_f32::pack_a_into(&ASrc::View(job.view(kcol, d3, 1)), l, hd, mr, false, ka);
        gemm_f32::pack_a_into(&ASrc::View(job.view(vcol, 1, d3)), hd, l, mr, false, va);
        for row0 in (0..job.lq).step_by(qc) {
            let rows = qc.min(job.lq - row0);
            gemm_f32::pack_b_into(job.view(qcol + row0 * d3, 1, d3), hd, rows, nr, qb);
            let panels = rows.div_ceil(nr);
            for p in 0..panels {
                let panel = &mut pb[p * l * nr..(p + 1) * l * nr];
                let epi = Epi {
                    alpha: job.scale,
                    ..Default::default()
                };
                let q = &qb[p * hd * nr..(p + 1) * hd * nr];
                gemm_f32::gemm_packed(kernel, ka, q, (l, nr, hd), panel.as_mut_ptr(), nr, &epi);
                let cols = nr.min(rows - p * nr);
                let mask = job.mask.map(|m| &m[(row0 + p * nr) * l..]);
                let inv = &mut inv[p * nr..(p + 1) * nr];
                softmax_columns(panel, l, nr, cols, mask, round, inv);
                inv.iter_mut().for_each(|x| *x *= job.weight);
            }
            let epi = Epi {
                col_scale: Some(&inv[..rows]),
                transposed: true,
                ..Default::default()
            };
            let out = job.out.add(row0 * job.ld);
            gemm_f32::gemm_packed(kernel, va, pb, (hd, rows, l), out, job.ld, &epi);
        }
    })
}

/// Softmax down the `cols` valid columns of a `[l, nr]` panel of scores `Sᵀ` (one query per
/// column): the mask column added (`mask[q · l + t]` for query `q`), `exp(s − max)` in place
/// (rounded to bf16 with `round`), and `1 / Σ` per column into `inv`.
fn softmax_columns(
    p: &mut [f32],
    l: usize,
    nr: usize,
    cols: usize,
    mask: Option<&[f32]>,
    round: bool,
    inv: &mut [f32],
) {
    if let Some(m) = mask {
        for c in 0..cols {
            for t in 0..l {
                p[t * nr + c] += m[c * l + t];
            }
        }
    }
    #[inline(always)]
    fn generic<const N: usize>(p: &mut [f32], l: usize, round: bool, inv: &mut [f32]) {
        let mut max = [f32::NEG_INFINITY; N];
        for row in p.chunks_exact(N).take(l) {
            max.iter_mut().zip(row).for_each(|(m, &x)| *m = m.max(x));
        }
        let mut sum = [0f32; N];
        for row in p.chunks_exact_mut(N).take(l) {
            for ((x, s), &m) in row.iter_mut().zip(sum.iter_mut()).zip(&max) {
                *x = exp_approx(*x - m);
                *s += *x;
            }
            if round {
                round_bf16_generic(row);
            }
        }
        inv.iter_mut().zip(&sum).for_each(|(i, &s)| *i = 1.0 / s);
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,avx2")]
        unsafe fn avx512<const N: usize>(p: &mut [f32], l: usize, round: bool, inv: &mut [f32]) {
            generic::<N>(p, l, round, inv)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<const N: usize>(p: &mut [f32], l: usize, round: bool, inv: &mut [f32]) {
            generic::<N>(p, l, round, inv)
        }
        // SAFETY: `simd` detected the features each function is compiled for.
        unsafe {
            match (simd(), nr) {
                (Simd::Avx512, 32) => return avx512::<32>(p, l, round, inv),
                (Simd::Avx512, 16) => return avx512::<16>(p, l, round, inv),
                (Simd::Avx2, 16) => return avx2::<16>(p, l, round, inv),
                _ => {}
            }
        }
    }
    match nr {
        32 => generic::<32>(p, l, round, inv),
        16 => generic::<16>(p, l, round, inv),
        _ => unreachable!("panels are 16 or 32 wide"),
    }
}

/// A head on a bf16 unit: `k` and `v` packed once for all the query chunks, `S = (q · scale) kᵀ`
/// by rows, softmax along them, `O = P v` with `1 / Σ` (and a head weight) as a row scale.
///
/// # Safety
/// As [`head_f32`].
unsafe fn head_bf16(job: &HeadJob, kernel: Kernel) {
    let (l, hd, d3) = (job.l, job.hd, job.d3);
    let (qcol, kcol, vcol) = job.cols;
    let qc = QUERY_CHUNK.min(job.lq);
    let (kt_len, v_len) = (
        gemm_bf16::BView::scratch_len(hd, l),
        gemm_bf16::BView::scratch_len(l, hd),
    );
    with_scratch(kt_len + v_len + qc * l, |buf| {
        let (kt, rest) = buf.split_at_mut(kt_len);
        let (v, scores) = rest.split_at_mut(v_len);
        // kᵀ as B[hd, L] and v as B[L, hd], packed once for all the query chunks.
        let kt = gemm_bf16::pack_columns(&job.xs[kcol..], d3, hd, l, kt);
        let v = gemm_bf16::pack_rows(&job.xs[vcol..], d3, l, hd, v);
        for row0 in (0..job.lq).step_by(qc) {
            let rows = qc.min(job.lq - row0);
            let s = &mut scores[..rows * l];
            let epi = Epi {
                alpha: job.scale,
                ..Default::default()
            };
            let q = job.view(qcol + row0 * d3, d3, 1);
            gemm_bf16::gemm_view(kernel, rows, ASrc::View(q), kt, s, l, &epi, false);
            // Packing the probabilities for P v rounds them.
            let mut inv_sums = exp_scores(s, l, job.mask, row0, false);
            inv_sums.iter_mut().for_each(|x| *x *= job.weight);
            let epi = Epi {
                row_scale: Some(&inv_sums[..rows]),
                ..Default::default()
            };
            let o = std::slice::from_raw_parts_mut(
                job.out.add(row0 * job.ld),
                (rows - 1) * job.ld + hd,
            );
            let p = ASrc::View(MatRef {
                data: s,
                rs: l,
                cs: 1,
            });
            gemm_bf16::gemm_view(kernel, rows, p, v, o, job.ld, &epi, false);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    fn rand(seed: u64, n: usize) -> Vec<f32> {
        crate::rng::SplitMix64(seed).normal(n, 1.0)
    }

    fn softmax_in_place(row: &mut [f32]) {
        let inv = 1.0 / exp_shifted_in_place(row);
        row.iter_mut().for_each(|x| *x *= inv);
    }

    /// `W` packed for the f32 kernel.
    fn packed(w: &Tensor) -> PackedW {
        let (n, k) = w.dims2().unwrap();
        PackedW::from_weight(&w.flatten_all().unwrap().to_vec1().unwrap(), n, k)
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
        let got = linear(&x, Weight::F32(&packed(&w)), Some(&b), Epilogue::None).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert!(max_diff(&got, &want) < 1e-5);
        let got = linear(&x, Weight::F32(&packed(&w)), None, Epilogue::QuickGelu).unwrap();
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
        let rounded = packed(&round_bf16(&w).unwrap());
        let got = linear(&x, Weight::RoundedF32(&rounded), Some(&b), Epilogue::None).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "emulated");
        let wb = w.to_dtype(candle_core::DType::BF16).unwrap();
        let packed_bf16 =
            PackedB::from_weight(&wb.flatten_all().unwrap().to_vec1().unwrap(), 300, 40);
        if crate::clip::gemm_bf16::available().is_empty() {
            println!("SKIP: no bf16 unit on this CPU; the packed linear layer is not run");
        }
        for &kernel in crate::clip::gemm_bf16::available() {
            for epilogue in [Epilogue::None, Epilogue::QuickGelu, Epilogue::Gelu] {
                let emulated =
                    linear(&x, Weight::RoundedF32(&rounded), Some(&b), epilogue).unwrap();
                let got =
                    linear(&x, Weight::Packed(&packed_bf16, kernel), Some(&b), epilogue).unwrap();
                let d = max_diff(&got, &emulated);
                assert!(d < 1e-5, "{} {epilogue:?}: {d}", kernel.name());
            }
        }
    }

    /// Fused attention equals the per-head composition, ordinary and V-V, with a causal mask
    /// and with more tokens than one query chunk.
    #[test]
    fn attention_matches_the_composition() {
        // 8: the blocked bf16 head; 64 (ViT-B and ViT-L): the fused one.
        for hd in [8, 64] {
            attention_matches_the_composition_for(hd);
        }
    }

    fn attention_matches_the_composition_for(hd: usize) {
        let dev = Device::Cpu;
        let (b, l, heads) = (2, QUERY_CHUNK + 9, 3);
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
                for queries in [l, 1, 33] {
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
                    // The products sum in another order than the emulation's, so a probability
                    // near a bf16 rounding boundary can round the other way: ~2⁻⁹ of its share
                    // of the output, more often with 64 features than with 8.
                    let tolerance = if hd <= 8 { 1e-5 } else { 1e-3 };
                    assert!(
                        d < tolerance,
                        "{} hd {hd} {roles:?} {queries} queries: {d}",
                        kernel.name()
                    );
                }
                // Head weights scale each head's output.
                let weights = [0.5f32, -2.0, 1.0];
                let spec = AttentionSpec {
                    batch: b,
                    tokens: l,
                    heads,
                    scale: 0.125,
                    roles,
                    queries: l,
                    precision: Precision::Bf16(kernel),
                };
                let xs = qkv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let m = mask.map(|m| m.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                let mut weighted = vec![0f32; b * l * d];
                attention_into(&xs, &spec, m.as_deref(), Some(&weights), &mut weighted).unwrap();
                let plain =
                    attention_first_queries(&qkv, heads, 0.125, mask, roles, l, spec.precision)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                for (i, (w, p)) in weighted.iter().zip(&plain).enumerate() {
                    let want = p * weights[(i % d) / hd];
                    assert!((w - want).abs() < 1e-6, "head weight at {i}: {w} vs {want}");
                }
            }
        }
    }

    /// Runs every head of `xs` (`[l, 3 · heads · hd]`, q | k | v) fused and blocked through
    /// `run(job, fused)` (scale 1/8, head weight 0.75) and asserts `agree(fused, blocked)` on
    /// every output value.
    fn both_heads_agree(
        xs: &[f32],
        (heads, hd, l, lq): (usize, usize, usize, usize),
        mask: Option<&[f32]>,
        run: impl Fn(&HeadJob, bool),
        agree: impl Fn(f32, f32) -> bool,
        what: &str,
    ) {
        let d3 = 3 * heads * hd;
        for h in 0..heads {
            let mut outs = [vec![0f32; lq * hd], vec![0f32; lq * hd]];
            for (fused, out) in [true, false].into_iter().zip(outs.iter_mut()) {
                let job = HeadJob {
                    xs,
                    d3,
                    l,
                    lq,
                    hd,
                    cols: (h * hd, (heads + h) * hd, (2 * heads + h) * hd),
                    scale: 0.125,
                    mask,
                    weight: 0.75,
                    out: out.as_mut_ptr(),
                    ld: hd,
                    packed: None,
                };
                run(&job, fused);
            }
            for (i, (&a, &b)) in outs[0].iter().zip(&outs[1]).enumerate() {
                assert!(agree(a, b), "{what} head {h} at {i}: {a} vs {b}");
            }
        }
    }

    /// The fused bf16 head equals the blocked one (the same tile products, exponentials and
    /// roundings; only the softmax sum runs in another order) over token counts around its
    /// 32-key chunks and 32-query blocks, with and without a mask, with a head weight.
    #[test]
    fn fused_bf16_head_equals_the_blocked_head() {
        let (hd, heads) = (64, 2);
        let d3 = 3 * heads * hd;
        let units = crate::clip::gemm_bf16::available();
        if !units.iter().any(|&k| head::fused_fits(hd, k)) {
            eprintln!("skipped: the fused head needs a bf16 unit and AVX512-BF16");
        }
        for &kernel in units {
            if !head::fused_fits(hd, kernel) {
                continue;
            }
            for l in [1, 31, 32, 33, 77, 100] {
                let xs = rand(l as u64, l * d3);
                let causal: Vec<f32> = (0..l * l)
                    .map(|i| {
                        if i % l > i / l {
                            f32::NEG_INFINITY
                        } else {
                            0.5
                        }
                    })
                    .collect();
                for (mask, lq) in [
                    (None, l),
                    (Some(&causal[..]), l),
                    (None, 1),
                    (None, l.min(33)),
                ] {
                    let what = format!("{} l {l} lq {lq} mask {}", kernel.name(), mask.is_some());
                    // SAFETY: the fused head fits (checked above); `job.out` holds its rows.
                    let run = |job: &HeadJob, fused: bool| unsafe {
                        if fused {
                            head::bf16_fused(job, kernel)
                        } else {
                            head_bf16(job, kernel)
                        }
                    };
                    let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * (1.0 + b.abs());
                    both_heads_agree(&xs, (heads, hd, l, lq), mask, run, close, &what);
                }
            }
        }
    }

    /// Heads written as packed bf16 rows give `out_proj` exactly the product it gets from the
    /// f32 heads packed by the GEMM: over batches whose images' rows share a 16-row group, one
    /// query or all, with a mask and head weights, and after a larger attention left other
    /// rows in the buffer (the padding rows must be zero again).
    #[test]
    fn packed_heads_equal_the_f32_heads_packed() {
        let (hd, heads) = (64, 3);
        let (d, d3, n) = (heads * hd, 3 * heads * hd, 96);
        let units = crate::clip::gemm_bf16::available();
        if !units
            .iter()
            .any(|&k| attention_packs(Precision::Bf16(k), hd))
        {
            eprintln!("skipped: packed heads need a bf16 unit and AVX512-BF16");
        }
        let w: Vec<half::bf16> = rand(7, n * d)
            .iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect();
        let w = PackedB::from_weight(&w, n, d);
        let weights = [0.5f32, 1.0, 2.0];
        for &kernel in units {
            let precision = Precision::Bf16(kernel);
            if !attention_packs(precision, hd) {
                continue;
            }
            let mut packed = PackedRows::default();
            for (b, l, lq, masked) in [(3, 77, 77, false), (2, 33, 33, true), (3, 21, 1, false)] {
                let xs = rand((b * l) as u64, b * l * d3);
                let mask: Vec<f32> = (0..l * l)
                    .map(|i| if i % 3 == 0 { -1.0 } else { 0.0 })
                    .collect();
                let mask = masked.then_some(&mask[..]);
                let spec = AttentionSpec {
                    batch: b,
                    tokens: l,
                    heads,
                    scale: 0.125,
                    roles: ORDINARY,
                    queries: lq,
                    precision,
                };
                let m = b * lq;
                let mut merged = vec![0f32; m * d];
                attention_into(&xs, &spec, mask, Some(&weights), &mut merged).unwrap();
                attention_into_packed(&xs, &spec, mask, Some(&weights), &mut packed).unwrap();
                assert_eq!(packed.dims(), (m, d));
                let a = MatRef {
                    data: &merged,
                    rs: d,
                    cs: 1,
                };
                let mut want = vec![0f32; m * n];
                gemm_bf16::gemm(kernel, m, a, &w, &mut want, n, 1.0, false, true);
                let mut got = vec![0f32; m * n];
                gemm_packed(kernel, &packed, &w, &mut got, n, &Epi::default(), true);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "b {b} l {l} lq {lq} at {i}: {g} vs {w}"
                    );
                }
            }
        }
        // Off a bf16 unit nothing is packed, and asking is an error.
        let spec = AttentionSpec {
            batch: 1,
            tokens: 2,
            heads: 1,
            scale: 1.0,
            roles: ORDINARY,
            queries: 2,
            precision: Precision::F32,
        };
        assert!(!attention_packs(Precision::F32, 64));
        let err = attention_into_packed(&[0.0; 6], &spec, None, None, &mut PackedRows::default());
        assert!(err.is_err());
    }

    /// The fused f32 head equals the blocked one exactly (the same sums in the same order, the
    /// same exponentials), on each kernel it runs on, over token counts around its key tiles,
    /// query blocks and 256-key passes, head sizes of 1 to 20 feature tiles, one query or all,
    /// with a head weight and with a NaN and an infinite key in the input.
    #[test]
    fn fused_f32_head_equals_the_blocked_head() {
        let kernels: Vec<F32Kernel> = gemm_f32::available()
            .iter()
            .copied()
            .filter(|&k| head::f32_fused_fits(64, k, false, false))
            .collect();
        if kernels.is_empty() {
            eprintln!("skipped: the fused f32 head needs the AVX-512 or AVX2 f32 kernel");
            return;
        }
        for &kernel in &kernels {
            assert!(!head::f32_fused_fits(64, kernel, true, false));
            assert!(!head::f32_fused_fits(64, kernel, false, true));
            assert!(!head::f32_fused_fits(62, kernel, false, false));
        }
        assert!(!head::f32_fused_fits(64, F32Kernel::Portable, false, false));
        let heads = 2;
        for &kernel in &kernels {
            for hd in [8, 64, 80] {
                let d3 = 3 * heads * hd;
                for l in [1, 5, 6, 7, 11, 12, 13, 32, 33, 77, 257, 300] {
                    let mut xs = rand(l as u64 + hd as u64, l * d3);
                    if l == 77 {
                        xs[5 * d3 + hd + 3] = f32::NAN; // a key of head 0 (a NaN score column)
                        xs[9 * d3 + (heads + 1) * hd] = f32::INFINITY; // a key of head 1
                    }
                    for lq in [l, 1, l.min(17), l.min(33)] {
                        let what = format!("{} hd {hd} l {l} lq {lq}", kernel.name());
                        // SAFETY: the fused head fits (checked above); `job.out` holds its rows.
                        let run = |job: &HeadJob, fused: bool| unsafe {
                            if fused {
                                head::f32_fused(job, kernel)
                            } else {
                                head_f32(job, kernel, false)
                            }
                        };
                        let equal = |a: f32, b: f32| a == b || (a.is_nan() && b.is_nan());
                        both_heads_agree(&xs, (heads, hd, l, lq), None, run, equal, &what);
                    }
                }
            }
        }
    }

    /// A batch of no images is an empty result on every head path (the path is chosen before
    /// any head runs).
    #[test]
    fn attention_of_no_images_is_empty() {
        let mut precisions = vec![Precision::F32, Precision::Bf16Emulated];
        precisions.extend(gemm_bf16::available().iter().map(|&k| Precision::Bf16(k)));
        for precision in precisions {
            let spec = AttentionSpec {
                batch: 0,
                tokens: 7,
                heads: 2,
                scale: 0.125,
                roles: ORDINARY,
                queries: 7,
                precision,
            };
            let mut out = vec![];
            attention_into(&[], &spec, None, None, &mut out).unwrap();
            assert!(out.is_empty());
        }
    }

    #[test]
    fn attention_refuses_zero_heads() {
        let qkv = Tensor::zeros((1, 4, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(attention(&qkv, 0, 1.0, None, ORDINARY).is_err());
    }

    /// The embedding and the L2 normalisation done here give candle's composition bit for bit,
    /// on shapes above and below candle's threshold for its own thread pool.
    #[test]
    fn embedding_and_normalisation_equal_candle() {
        let dev = Device::Cpu;
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        for (b, p, d) in [(1, 4, 8), (3, 196, 128), (2, 1, 1), (2, 0, 4)] {
            let patches = Tensor::from_vec(rand(1, b * p * d), (b, p, d), &dev).unwrap();
            let cls = Tensor::from_vec(rand(2, d), d, &dev).unwrap();
            let pos = Tensor::from_vec(rand(3, (1 + p) * d), (1 + p, d), &dev).unwrap();
            let want = Tensor::cat(
                &[
                    &cls.reshape((1, 1, d))
                        .unwrap()
                        .broadcast_as((b, 1, d))
                        .unwrap(),
                    &patches,
                ],
                1,
            )
            .unwrap()
            .broadcast_add(&pos.unsqueeze(0).unwrap())
            .unwrap();
            let got = embed_tokens(&cls, &patches, &pos).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(bits(&got), bits(&want), "embedding {b}x{p}x{d}");

            let n = patches
                .sqr()
                .unwrap()
                .sum_keepdim(candle_core::D::Minus1)
                .unwrap();
            let want = patches.broadcast_div(&n.sqrt().unwrap()).unwrap();
            let got = l2_normalize_last(&patches).unwrap();
            assert_eq!(bits(&got), bits(&want), "normalisation {b}x{p}x{d}");
        }
        // A zero row divides 0 by 0, as candle does.
        let zero = Tensor::zeros((1, 2, 4), candle_core::DType::F32, &dev).unwrap();
        let v: Vec<f32> = l2_normalize_last(&zero)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(v.iter().all(|x| x.is_nan()));
        let cls = Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap();
        let pos = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(
            embed_tokens(&cls, &zero, &pos).is_err(),
            "a class token of the wrong width"
        );
    }
}
