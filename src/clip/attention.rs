//! Multi-head self-attention of both towers, with the anomaly-detection hooks (per-head weights,
//! the V-V path), behind one interface ([`Attention::forward`]) over three implementations:
//!
//! - inference on the CPU in f32: the fused kernel of `kernels`, which reads q, k and v
//!   in place from the qkv projection and writes heads merged;
//! - training (a learnable tensor upstream, any device and dtype): [`scaled_dot_product`] as
//!   one `frozen_op` whose backward recomputes the probabilities;
//! - anything else: candle's plain ops.
//!
//! Differentiability: candle-nn's fused `softmax_last_dim` (and `layer_norm`) are custom ops
//! without a backward, so what is upstream of them silently gets a zero gradient
//! (`tests/gradients.rs` checks that ours are true gradients). Every op here checks `track_op()`
//! on its input and takes a differentiable form when a learnable tensor is upstream, the fused
//! kernel otherwise, so inference stays fast and training gets true gradients without a mode
//! flag.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use super::frozen_op::{self, Backward3};
use super::kernels;
use super::linear::Linear;
use crate::Result;

/// Softmax over the last dimension, in f32 at least (f64 stays f64), differentiable when needed.
pub fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    softmax_wide(xs)?.to_dtype(xs.dtype())
}

/// [`softmax_last_dim`] left in the dtype it is computed in (f32, or f64).
fn softmax_wide(xs: &Tensor) -> candle_core::Result<Tensor> {
    let xs = xs.to_dtype(super::numerics::wide(xs.dtype()))?;
    if xs.track_op() {
        candle_nn::ops::softmax(&xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

/// Multi-head self-attention with q/k/v fused into one projection (one matmul instead of three).
///
/// Reference: `nn.MultiheadAttention` (OpenAI) / `CLIPAttention` (Hugging Face); the V-V branch is
/// AnomalyCLIP's `Attention.forward` (zqhang/AnomalyCLIP@45ed4dd, `AnomalyCLIP_lib/AnomalyCLIP.py`
/// l.58-94).
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    qkv: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
    /// How the fused kernels multiply (`--precision`).
    precision: kernels::Precision,
}

/// What one attention call returns: the ordinary output and, on request, the V-V output.
pub(crate) struct AttentionOutput {
    /// `[B, rows, D]`: the first `rows` queries (all of them unless asked otherwise).
    pub ori: Tensor,
    /// `[B, L, D]`, every query.
    pub vv: Option<Tensor>,
}

/// Which outputs a caller needs from [`Attention::forward`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AttentionRequest {
    /// Only the first `rows` queries of the ordinary path (every token is still a key and a
    /// value); `None` = all.
    pub rows: Option<usize>,
    /// Also the V-V path (AnomalyCLIP's DPAM), for every query.
    pub with_vv: bool,
}

impl Attention {
    /// Loads `{q,k,v,out}_proj` (Hugging Face names; other namings are mapped by the weight
    /// backend) and fuses q/k/v rows as `[q; k; v]`, the layout of OpenAI's `in_proj_weight`.
    pub fn load(vb: VarBuilder, dim: usize, num_heads: usize) -> Result<Self> {
        let mut weights = Vec::with_capacity(3);
        let mut biases = Vec::with_capacity(3);
        for name in ["q_proj", "k_proj", "v_proj"] {
            let vb = vb.pp(name);
            weights.push(vb.get((dim, dim), "weight")?);
            biases.push(vb.get(dim, "bias")?);
        }
        let head_dim = dim / num_heads;
        Ok(Self {
            qkv: Linear::new(Tensor::cat(&weights, 0)?, Some(Tensor::cat(&biases, 0)?)),
            out_proj: Linear::load(vb.pp("out_proj"), dim, dim, true)?,
            num_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            precision: kernels::Precision::F32,
        })
    }

    /// Converts the weights for `precision`; the attention products follow it too.
    pub fn use_precision(&mut self, precision: kernels::Precision) -> Result<()> {
        self.qkv.use_precision(precision)?;
        self.out_proj.use_precision(precision)?;
        self.precision = precision;
        Ok(())
    }

    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// # Shapes
    /// `xs: [B, L, D]`, `mask: [L, L]` additive, `head_weights: [H]` (HeadCLIP: each head's
    /// output scaled before `out_proj`) -> [`AttentionOutput`].
    pub fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        head_weights: Option<&Tensor>,
        request: AttentionRequest,
    ) -> Result<AttentionOutput> {
        let (b, l, _) = xs.dims3()?;
        let rows = request.rows.unwrap_or(l).min(l);
        let (ori, vv) = if kernels::applies(xs) && self.fused() {
            self.forward_fused(xs, mask, rows, request.with_vv)?
        } else {
            let (ori, vv) = self.forward_plain(xs, mask, request.with_vv)?;
            let ori = if rows < l {
                ori.narrow(1, 0, rows)?
            } else {
                ori
            };
            (ori, vv)
        };
        let out = |merged: Tensor| -> Result<Tensor> {
            let merged = weight_heads(&merged, head_weights, self.num_heads)?;
            Ok(self.out_proj.forward(&merged)?)
        };
        debug_assert_eq!(ori.dim(0)?, b);
        Ok(AttentionOutput {
            ori: out(ori)?,
            vv: vv.map(out).transpose()?,
        })
    }

    /// Whether the fused CPU kernels can run this layer (its weights packed for them).
    pub fn fused(&self) -> bool {
        self.qkv.fused() && self.out_proj.fused()
    }

    /// `dst [m, 3D] ⟵ qkv(A)` for the fused path, `A` read from `a` (LayerNorm applied to rows);
    /// rounded to bf16 when bf16 is emulated (as [`Self::forward`] does).
    pub fn qkv_into(&self, m: usize, a: kernels::ASrc, dst: &mut [f32]) -> Result<()> {
        let d3 = 3 * self.num_heads * self.head_dim;
        let round = self.precision == kernels::Precision::Bf16Emulated;
        Ok(self
            .qkv
            .gemm_into(m, a, dst, d3, kernels::Act::None, false, round)?)
    }

    /// `residual [B · queries, D] += out_proj(heads merged)`, from `qkv [B, L, 3D]` (`tokens =
    /// (B, L)`), each head scaled by its weight: the fused path's attention and projection. The
    /// heads are merged into `merged` (f32) for `out_proj`, or, where the heads and `out_proj`
    /// both run on a bf16 unit, written as bf16 rows packed for it into `packed`
    /// ([`kernels::attention_into_packed`]): the same result without the f32 copy and the
    /// packing pass.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_project_into(
        &self,
        qkv: &[f32],
        (batch, tokens): (usize, usize),
        roles: kernels::QkvRoles,
        queries: usize,
        mask: Option<&[f32]>,
        head_weights: Option<&[f32]>,
        (merged, packed): (&mut Vec<f32>, &mut kernels::PackedRows),
        residual: &mut [f32],
    ) -> Result<()> {
        let (m, d) = (batch * queries, self.num_heads * self.head_dim);
        let spec = kernels::AttentionSpec {
            batch,
            tokens,
            heads: self.num_heads,
            scale: self.scale as f32,
            roles,
            queries,
            precision: self.precision,
        };
        if kernels::attention_packs(self.precision, self.head_dim)
            && self.out_proj.bf16_unit().is_some()
        {
            kernels::attention_into_packed(qkv, &spec, mask, head_weights, packed)?;
            return Ok(self.out_proj.gemm_from_packed(packed, residual, d, true)?);
        }
        if merged.len() < m * d {
            merged.resize(m * d, 0.0);
        }
        let merged = &mut merged[..m * d];
        kernels::attention_into(qkv, &spec, mask, head_weights, merged)?;
        let a = kernels::ASrc::View(kernels::MatRef {
            data: merged,
            rs: d,
            cs: 1,
        });
        Ok(self
            .out_proj
            .gemm_into(m, a, residual, d, kernels::Act::None, true, false)?)
    }

    /// Both paths on the fused kernel, heads merged but not yet weighted: `[B, rows, D]` and
    /// `[B, L, D]`. q, k, v are rounded to bf16 when bf16 is emulated (a bf16 unit's kernels
    /// round while packing).
    fn forward_fused(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        rows: usize,
        with_vv: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let qkv = self.qkv.forward(xs)?;
        let qkv = if self.precision == kernels::Precision::Bf16Emulated {
            kernels::round_bf16(&qkv)?
        } else {
            qkv
        };
        let path = |roles: kernels::QkvRoles, queries: usize| -> Result<Tensor> {
            Ok(kernels::attention_first_queries(
                &qkv,
                self.num_heads,
                self.scale,
                mask,
                roles,
                queries,
                self.precision,
            )?)
        };
        let ori = path(kernels::ORDINARY, rows)?;
        let vv = if with_vv {
            Some(path(kernels::VALUE_VALUE, xs.dim(1)?)?)
        } else {
            None
        };
        Ok((ori, vv))
    }

    /// Both paths on the plain (differentiable) ops, heads merged but not yet weighted:
    /// `[B, L, D]` each.
    fn forward_plain(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        with_vv: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, l, _) = xs.dims3()?;
        let qkv = self.qkv.forward(xs)?; // [B, L, 3D]
        let qkv = qkv
            .reshape((b, l, 3, self.num_heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?; // [3, B, H, L, hd]
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let merge = |heads: Tensor| -> Result<Tensor> {
            let (b, h, l, hd) = heads.dims4()?;
            Ok(heads.transpose(1, 2)?.reshape((b, l, h * hd))?)
        };
        let autocast = self.precision == kernels::Precision::Bf16Autocast && !xs.track_op();
        let attend = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
            Ok(if autocast {
                scaled_dot_product_bf16(a, b, &v, self.scale, mask)?
            } else {
                scaled_dot_product(a, b, &v, self.scale, mask)?
            })
        };
        let ori = merge(attend(&q, &k)?)?;
        let vv = if with_vv {
            Some(merge(attend(&v, &v)?)?)
        } else {
            None
        };
        Ok((ori, vv))
    }
}

/// Scales each head's slice of merged attention outputs by its weight (HeadCLIP's learnable
/// head weights; `None` = all ones).
///
/// # Shapes
/// `merged: [B, L, H * hd]`, `weights: [H]` -> `[B, L, H * hd]`.
pub(crate) fn weight_heads(
    merged: &Tensor,
    weights: Option<&Tensor>,
    heads: usize,
) -> Result<Tensor> {
    let Some(w) = weights else {
        return Ok(merged.clone());
    };
    let (b, l, d) = merged.dims3()?;
    Ok(merged
        .reshape((b, l, heads, d / heads))?
        .broadcast_mul(&w.reshape((1, 1, heads, 1))?.to_dtype(merged.dtype())?)?
        .reshape((b, l, d))?)
}

/// The attention probabilities `softmax(q kᵀ · scale + mask)` `[B, H, Lq, Lk]`, in f32 at least
/// (f64 stays f64), as [`softmax_last_dim`] computes it.
///
/// Scales q (as `nn.MultiheadAttention` and Hugging Face do) rather than the L x L scores: 64x
/// fewer multiplications at 1370 tokens, the same values for the power-of-two 1/8.
fn probabilities(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let s = (q * scale)?.matmul(&k.t()?)?;
    let s = match mask {
        Some(m) => s.broadcast_add(&m.to_dtype(s.dtype())?)?,
        None => s,
    };
    softmax_wide(&s)
}

/// The backward of `softmax(q kᵀ · scale + mask) v`, recomputing the attention probabilities
/// instead of keeping them: training through a ViT-L at 518 px (1375 tokens, 16 heads) would
/// otherwise hold about six 121 MB score-sized tensors per layer.
struct RecomputeAttention {
    scale: f64,
    mask: Option<Tensor>,
}

impl Backward3 for RecomputeAttention {
    const NAME: &'static str = "attention-recompute";

    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        [q, k, v]: [&Tensor; 3],
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dtype = q.dtype();
        // Contiguous: the gradient of the merged heads arrives transposed, which cuBLAS'
        // strided-batch products refuse (candle-core `cuda_backend` `gemm_config`).
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let g = grad.detach().contiguous()?;
        // P in f32 at least, as the forward's softmax; the products in the inputs' dtype, as
        // candle's backward of the plain ops computes them.
        let p_wide = probabilities(&q, &k, self.scale, self.mask.as_ref())?;
        let p = p_wide.to_dtype(dtype)?;
        let dv = p.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?.to_dtype(p_wide.dtype())?;
        // softmax backward: dS = P ⊙ (dP − Σ_j dP ⊙ P)
        let ds = (&p_wide * dp.broadcast_sub(&(&dp * &p_wide)?.sum_keepdim(D::Minus1)?)?)?
            .to_dtype(dtype)?;
        let dq = (ds.matmul(&k)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `softmax(q kᵀ · scale + mask) v` for `[B, H, L, d]` inputs: the plain ops for inference, and
/// one op with a recomputing backward when a learnable tensor is upstream (any device, any
/// float dtype).
pub(crate) fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let out = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
        probabilities(q, k, scale, mask)?
            .to_dtype(v.dtype())?
            .matmul(v)
    };
    if q.track_op() || k.track_op() || v.track_op() {
        let output = out(&q.detach(), &k.detach(), &v.detach())?;
        let backward = RecomputeAttention {
            scale,
            mask: mask.cloned(),
        };
        return frozen_op::apply3([q, k, v], output, backward);
    }
    out(q, k, v)
}

/// [`scaled_dot_product`] under GPU autocast ([`kernels::Precision::Bf16Autocast`], inference):
/// both products on bf16 operands, the scores, mask and softmax in f32 (PyTorch's autocast
/// keeps softmax in f32), the output read back in `q`'s dtype.
pub(crate) fn scaled_dot_product_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16);
    let s = bf16(&(q * scale)?)?
        .matmul(&bf16(k)?.t()?)?
        .to_dtype(DType::F32)?;
    let s = match mask {
        Some(m) => s.broadcast_add(&m.to_dtype(DType::F32)?)?,
        None => s,
    };
    bf16(&softmax_wide(&s)?)?
        .matmul(&bf16(v)?)?
        .to_dtype(q.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::testing::{randn, to2, vb};

    /// Autocast attention stays within bf16's precision of the f32 one (run here on the CPU's
    /// bf16 matmul; on a GPU the same ops run on its tensor cores).
    #[test]
    fn bf16_autocast_attention_is_close_to_f32() {
        let q = randn(&[2, 3, 17, 8], 1);
        let k = randn(&[2, 3, 17, 8], 2);
        let v = randn(&[2, 3, 17, 8], 3);
        let mask = randn(&[17, 17], 4);
        let want = scaled_dot_product(&q, &k, &v, 0.35, Some(&mask)).unwrap();
        let got = scaled_dot_product_bf16(&q, &k, &v, 0.35, Some(&mask)).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let d = crate::clip::testing::diff(&got, &want);
        assert!(d > 0.0 && d < 0.05, "{d}");
    }
    use candle_core::{Device, IndexOp, Var};

    /// Naive single-sequence attention, one head at a time, from the fused weights:
    /// `out_proj(concat_h w_h · softmax(a_h b_hᵀ / sqrt(hd)) v_h)`, a/b = q/k or v/v.
    fn naive(att: &Attention, x: &[Vec<f32>], hw: &[f32], vv: bool) -> Vec<Vec<f32>> {
        let w = to2(&att.qkv.weight().unwrap());
        let b = att.qkv.bias().unwrap().to_vec1::<f32>().unwrap();
        let (l, d) = (x.len(), x[0].len());
        let proj = |r: usize| -> Vec<Vec<f32>> {
            (0..l)
                .map(|i| {
                    (0..d)
                        .map(|o| {
                            b[r * d + o] + (0..d).map(|k| w[r * d + o][k] * x[i][k]).sum::<f32>()
                        })
                        .collect()
                })
                .collect()
        };
        let (q, k, v) = (proj(0), proj(1), proj(2));
        let (a, bb) = if vv { (&v, &v) } else { (&q, &k) };
        let hd = att.head_dim;
        let mut merged = vec![vec![0f32; d]; l];
        for h in 0..att.num_heads {
            for i in 0..l {
                let s: Vec<f32> = (0..l)
                    .map(|j| {
                        (0..hd)
                            .map(|c| a[i][h * hd + c] * bb[j][h * hd + c])
                            .sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for c in 0..hd {
                    merged[i][h * hd + c] =
                        hw[h] * (0..l).map(|j| e[j] / z * v[j][h * hd + c]).sum::<f32>();
                }
            }
        }
        let ow = to2(&att.out_proj.weight().unwrap());
        let ob = att.out_proj.bias().unwrap().to_vec1::<f32>().unwrap();
        (0..l)
            .map(|i| {
                (0..d)
                    .map(|o| ob[o] + (0..d).map(|k| ow[o][k] * merged[i][k]).sum::<f32>())
                    .collect()
            })
            .collect()
    }

    /// Head weights scale each head's slice: two heads of width 2, weights 2 and -1.
    #[test]
    fn head_weights_scale_their_slices() {
        let m = Tensor::new(&[[[1f32, 2.0, 3.0, 4.0]]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[2f32, -1.0], &Device::Cpu).unwrap();
        let got = weight_heads(&m, Some(&w), 2).unwrap();
        assert_eq!(got.to_vec3::<f32>().unwrap(), [[[2.0, 4.0, -3.0, -4.0]]]);
        let same = weight_heads(&m, None, 2).unwrap();
        assert_eq!(same.to_vec3::<f32>().unwrap(), m.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn attention_matches_a_naive_per_head_computation() {
        let att = Attention::load(vb(3).pp("attn"), 8, 2).unwrap();
        let x = randn(&[1, 5, 8], 1);
        let hw = Tensor::new(&[0.5f32, 2.0], &Device::Cpu).unwrap();
        let xs = to2(&x.i(0).unwrap());
        // The fused kernel (plain input) and the plain ops (a tracked input).
        let tracked = Var::from_tensor(&x).unwrap();
        for input in [x.clone(), tracked.as_tensor().clone()] {
            let request = AttentionRequest {
                rows: None,
                with_vv: true,
            };
            let out = att.forward(&input, None, Some(&hw), request).unwrap();
            for (got, vv) in [(out.ori, false), (out.vv.unwrap(), true)] {
                let want = naive(&att, &xs, &[0.5, 2.0], vv);
                let got = to2(&got.i(0).unwrap());
                for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                    assert!((g - w).abs() < 1e-5, "vv={vv}: {g} vs {w}");
                }
            }
            // The first rows alone are the first rows of the whole.
            let request = AttentionRequest {
                rows: Some(2),
                with_vv: false,
            };
            let rows = att.forward(&input, None, Some(&hw), request).unwrap();
            let want = naive(&att, &xs, &[0.5, 2.0], false);
            let got = to2(&rows.ori.i(0).unwrap());
            assert_eq!(got.len(), 2);
            for (g, w) in got.iter().flatten().zip(want[..2].iter().flatten()) {
                assert!((g - w).abs() < 1e-5, "rows: {g} vs {w}");
            }
        }
    }

    /// The recomputing op gives the plain composition's values and gradients (f64 to 1e-12 and
    /// f32 to 1e-5, bf16 to its rounding), with and without a causal mask, and for the V-V
    /// form q = k = v.
    #[test]
    fn matches_the_plain_composition() {
        for (dtype, value_tol, grad_tol) in [
            (DType::F64, 1e-12, 1e-10),
            (DType::F32, 1e-5, 1e-4),
            (DType::BF16, 0.05, 0.1),
        ] {
            check_against_plain(dtype, value_tol, grad_tol);
        }
    }

    fn check_against_plain(dtype: DType, value_tol: f64, grad_tol: f64) {
        let dev = Device::Cpu;
        let r = |seed: u64, n: usize| {
            let v = crate::rng::SplitMix64(seed).normal(n, 1.0);
            Tensor::from_vec(v, (1, 2, 5, 3), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let q = Var::from_tensor(&r(1, 30)).unwrap();
        let k = Var::from_tensor(&r(2, 30)).unwrap();
        let v = Var::from_tensor(&r(3, 30)).unwrap();
        let m: Vec<f32> = (0..25)
            .map(|i| {
                if i % 5 > i / 5 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(m, (5, 5), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let w = r(4, 30);
        let max_diff = |a: &Tensor, b: &Tensor| crate::clip::testing::diff(a, b) as f64;
        for (mask, vv) in [(None, false), (Some(&mask), false), (None, true)] {
            let (qq, kk) = if vv { (&v, &v) } else { (&q, &k) };
            let fast = scaled_dot_product(qq.as_tensor(), kk.as_tensor(), v.as_tensor(), 0.5, mask)
                .unwrap();
            assert_eq!(fast.dtype(), dtype);
            // candle's ops, softmax (composed, differentiable) in f32 at least as ours.
            let plain = {
                let s =
                    (qq.as_tensor().matmul(&kk.as_tensor().t().unwrap()).unwrap() * 0.5).unwrap();
                let s = match mask {
                    Some(m) => s.broadcast_add(m).unwrap(),
                    None => s,
                };
                let wide = if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                candle_nn::ops::softmax(&s.to_dtype(wide).unwrap(), candle_core::D::Minus1)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .matmul(v.as_tensor())
                    .unwrap()
            };
            let d = max_diff(&fast, &plain);
            assert!(d < value_tol, "{dtype:?}: values differ by {d}");
            let g1 = (fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for t in [&q, &k, &v] {
                match (g1.get(t.as_tensor()), g2.get(t.as_tensor())) {
                    (Some(a), Some(b)) => {
                        assert_eq!(a.dtype(), dtype);
                        let d = max_diff(a, b);
                        assert!(
                            d < grad_tol,
                            "{dtype:?}: gradients differ by {d} (mask {}, vv {vv})",
                            mask.is_some()
                        );
                    }
                    (None, None) => {}
                    _ => panic!("a gradient is missing on one side"),
                }
            }
        }
    }
}
