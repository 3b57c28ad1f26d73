//! The transformer pieces shared by both towers: LayerNorm, MLP, multi-head attention with the
//! anomaly-detection hooks (per-head weights, V-V path), and the residual block.
//!
//! Differentiability: candle's fused `layer_norm` and `softmax_last_dim` have no backward and
//! silently give zero gradients (CANDLE-NOTES). Every op here checks `track_op()` on its input and
//! takes the differentiable composition when a learnable tensor is upstream, the fused kernel
//! otherwise, so inference stays fast and training gets true gradients without a mode flag.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use super::frozen::FrozenLinear as Linear;
use super::kernels;

use super::config::Activation;
use crate::Result;

/// Softmax over the last dimension, in f32 at least (f64 stays f64), differentiable when needed.
pub fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = xs.dtype();
    let xs = if dtype == DType::F64 {
        xs.clone()
    } else {
        xs.to_dtype(DType::F32)?
    };
    let ys = if xs.track_op() {
        candle_nn::ops::softmax(&xs, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)?
    };
    ys.to_dtype(dtype)
}

/// LayerNorm over the last dimension (torch semantics: biased variance, eps inside the sqrt).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // The fused kernel has no backward and no f64.
        if xs.track_op() || xs.dtype() == DType::F64 {
            candle_nn::ops::layer_norm_slow(xs, &self.weight, &self.bias, self.eps as f32)
        } else {
            candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

fn linear(vb: VarBuilder, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
    let w = vb.get((d_out, d_in), "weight")?;
    let b = if bias {
        Some(vb.get(d_out, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// `fc2(act(fc1(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    /// Converts the weights for `precision` (see [`Encoder::use_precision`]).
    pub fn use_precision(&mut self, precision: kernels::Precision) -> Result<()> {
        self.fc1.use_precision(precision)?;
        self.fc2.use_precision(precision)?;
        Ok(())
    }

    pub fn load(vb: VarBuilder, dim: usize, hidden: usize, act: Activation) -> Result<Self> {
        Ok(Self {
            fc1: linear(vb.pp("fc1"), dim, hidden, true)?,
            fc2: linear(vb.pp("fc2"), hidden, dim, true)?,
            act,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if kernels::applies(xs) {
            let epilogue = match self.act {
                Activation::QuickGelu => kernels::Epilogue::QuickGelu,
                Activation::Gelu => kernels::Epilogue::Gelu,
            };
            let h = self.fc1.forward_with(xs, epilogue)?;
            return self.fc2.forward(&h);
        }
        let xs = self.fc1.forward(xs)?;
        let xs = match self.act {
            Activation::QuickGelu => (&xs * candle_nn::ops::sigmoid(&(&xs * 1.702)?)?)?,
            Activation::Gelu => xs.gelu_erf()?,
        };
        self.fc2.forward(&xs)
    }
}

/// Multi-head self-attention with q/k/v fused into one projection (one matmul instead of three).
///
/// Reference: `nn.MultiheadAttention` (OpenAI) / `CLIPAttention` (Hugging Face); the V-V branch is
/// AnomalyCLIP's `Attention.forward` (`AnomalyCLIP.py` l.58-94).
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
    /// How the fused kernels multiply (`--precision`).
    precision: kernels::Precision,
}

/// What one attention call returns: the ordinary output and, on request, the V-V output.
pub struct AttentionOutput {
    pub ori: Tensor,
    pub vv: Option<Tensor>,
}

impl Attention {
    /// Loads `{q,k,v,out}_proj` (Hugging Face names; other namings are mapped by the weight
    /// backend) and fuses q/k/v rows as `[q; k; v]`, the layout of OpenAI's `in_proj_weight`.
    pub fn load(vb: VarBuilder, dim: usize, num_heads: usize) -> Result<Self> {
        let q = linear(vb.pp("q_proj"), dim, dim, true)?;
        let k = linear(vb.pp("k_proj"), dim, dim, true)?;
        let v = linear(vb.pp("v_proj"), dim, dim, true)?;
        let w = Tensor::cat(&[q.weight()?, k.weight()?, v.weight()?], 0)?;
        let bias = |l: &Linear| l.bias().cloned().expect("loaded with bias");
        let b = Tensor::cat(&[bias(&q), bias(&k), bias(&v)], 0)?;
        let head_dim = dim / num_heads;
        Ok(Self {
            qkv: Linear::new(w, Some(b)),
            out_proj: linear(vb.pp("out_proj"), dim, dim, true)?,
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

    /// q, k, v for the fused kernel: the projection, rounded to bf16 when bf16 is emulated
    /// (a bf16 unit's kernels round while packing).
    fn fused_qkv(&self, xs: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(xs)?;
        Ok(if self.precision == kernels::Precision::Bf16Emulated {
            kernels::round_bf16(&qkv)?
        } else {
            qkv
        })
    }

    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// `softmax(a bᵀ · scale + mask) v` per head; `[B, H, L, hd]`.
    fn attend(&self, a: &Tensor, b: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        Ok(super::frozen::attention(a, b, v, self.scale, mask)?)
    }

    /// Scales each head by its weight, merges heads and applies `out_proj`.
    fn merge(&self, heads: Tensor, head_weights: Option<&Tensor>) -> Result<Tensor> {
        let (b, h, l, hd) = heads.dims4()?;
        let heads = match head_weights {
            Some(w) => heads.broadcast_mul(&w.reshape((1, h, 1, 1))?.to_dtype(heads.dtype())?)?,
            None => heads,
        };
        let merged = heads.transpose(1, 2)?.reshape((b, l, h * hd))?;
        Ok(self.out_proj.forward(&merged)?)
    }

    /// One attention path on the fused kernel for the first `queries` rows, heads weighted and
    /// merged, through `out_proj`: `[B, queries, D]`.
    fn fused_path(
        &self,
        qkv: &Tensor,
        mask: Option<&Tensor>,
        head_weights: Option<&Tensor>,
        roles: kernels::QkvRoles,
        queries: usize,
    ) -> Result<Tensor> {
        let b = qkv.dim(0)?;
        let merged = kernels::attention_first_queries(
            qkv,
            self.num_heads,
            self.scale,
            mask,
            roles,
            queries,
            self.precision,
        )?;
        let merged = match head_weights {
            Some(w) => merged
                .reshape((b, queries, self.num_heads, self.head_dim))?
                .broadcast_mul(&w.reshape((1, 1, self.num_heads, 1))?)?
                .reshape((b, queries, self.num_heads * self.head_dim))?,
            None => merged,
        };
        Ok(self.out_proj.forward(&merged)?)
    }

    /// The ordinary output for the first `rows` queries (`[B, rows, D]`; all of them for the
    /// ordinary pass) and, with `with_vv`, the full V-V output, when the fused CPU kernels apply
    /// (`None` otherwise: the caller takes the plain ops).
    fn forward_fused(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        head_weights: Option<&Tensor>,
        rows: usize,
        with_vv: bool,
    ) -> Result<Option<AttentionOutput>> {
        if !kernels::applies(xs) {
            return Ok(None);
        }
        let qkv = self.fused_qkv(xs)?;
        let ori = self.fused_path(&qkv, mask, head_weights, kernels::ORDINARY, rows)?;
        let vv = if with_vv {
            Some(self.fused_path(&qkv, mask, head_weights, kernels::VALUE_VALUE, xs.dim(1)?)?)
        } else {
            None
        };
        Ok(Some(AttentionOutput { ori, vv }))
    }

    /// # Shapes
    /// `xs: [B, L, D]`, `mask: [L, L]` additive, `head_weights: [H]` -> `[B, L, D]` (and the V-V
    /// output of the same shape when `with_vv`).
    pub fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        head_weights: Option<&Tensor>,
        with_vv: bool,
    ) -> Result<AttentionOutput> {
        let (b, l, _) = xs.dims3()?;
        // Fused kernel: q, k, v read in place, heads come back merged [B, L, D].
        if let Some(out) = self.forward_fused(xs, mask, head_weights, l, with_vv)? {
            return Ok(out);
        }
        let qkv = self.qkv.forward(xs)?; // [B, L, 3D]
        let qkv = qkv
            .reshape((b, l, 3, self.num_heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?; // [3, B, H, L, hd]
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let ori = self.merge(self.attend(&q, &k, &v, mask)?, head_weights)?;
        let vv = if with_vv {
            Some(self.merge(self.attend(&v, &v, &v, mask)?, head_weights)?)
        } else {
            None
        };
        Ok(AttentionOutput { ori, vv })
    }
}

/// Pre-LN residual block: `x += attn(ln_1(x)); x += mlp(ln_2(x))`.
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl ResidualBlock {
    pub fn load(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        mlp_dim: usize,
        eps: f64,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), dim, eps)?,
            self_attn: Attention::load(vb.pp("self_attn"), dim, heads)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), dim, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), dim, mlp_dim, act)?,
        })
    }

    pub fn num_heads(&self) -> usize {
        self.self_attn.num_heads()
    }

    /// Converts the block's weights for `precision` (see [`Encoder::use_precision`]).
    pub fn use_precision(&mut self, precision: kernels::Precision) -> Result<()> {
        self.self_attn.use_precision(precision)?;
        self.mlp.use_precision(precision)
    }

    /// The ordinary block. Returns `(x_ori, vv)` where `vv` is the V-V attention output (without
    /// residual) when requested: AnomalyCLIP's DPAM block adds it to its own stream, no MLP.
    pub fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        head_weights: Option<&Tensor>,
        with_vv: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let residual = xs;
        let h = self.layer_norm1.forward(xs)?;
        let attn = self.self_attn.forward(&h, mask, head_weights, with_vv)?;
        let xs = (residual + attn.ori)?;
        let residual = &xs;
        let xs = (residual + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?)?;
        Ok((xs, attn.vv))
    }

    /// The block's output for the first `rows` tokens only, `[B, rows, D]` (every token still
    /// serves as key and value), and the full V-V output when `with_vv`: the ordinary path's
    /// attention and MLP shrink to those rows.
    pub fn forward_first_rows(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        head_weights: Option<&Tensor>,
        rows: usize,
        with_vv: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let h = self.layer_norm1.forward(xs)?;
        let attn = match self
            .self_attn
            .forward_fused(&h, mask, head_weights, rows, with_vv)?
        {
            Some(attn) => attn,
            None => {
                let (x, vv) = self.forward(xs, mask, head_weights, with_vv)?;
                return Ok((x.narrow(1, 0, rows)?, vv));
            }
        };
        let x = (xs.narrow(1, 0, rows)? + attn.ori)?;
        let x = (&x + self.mlp.forward(&self.layer_norm2.forward(&x)?)?)?;
        Ok((x, attn.vv))
    }
}

/// Where a tower puts its deep prompt tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptPlacement {
    /// Vision (AdaCLIP): appended after the last token the first time, then the same last `n`
    /// tokens are substituted at later layers; they are dropped from every tapped output.
    Append,
    /// Text (AdaCLIP, AnomalyCLIP): substitute positions `1..=n`, right after SOT.
    AfterStart,
}

/// Hooks into a tower's forward pass; `Default` gives the plain CLIP forward.
#[derive(Debug, Clone, Default)]
pub struct Hooks<'a> {
    /// Layers whose residual stream is returned, 1-based like Hugging Face `hidden_states[i]`
    /// (0 = the input of the first block, i.e. after `ln_pre` for vision).
    pub taps: &'a [usize],
    /// `[layers, heads]` scalars on each head's output before `out_proj` (HeadCLIP); 1 = identity.
    pub head_weights: Option<&'a Tensor>,
    /// `prompts[i]` (`[n, D]` or `[B, n, D]`) enters before block `i` (0-based), per
    /// [`PromptPlacement`]. Shorter than the depth is fine.
    pub prompts: &'a [Option<Tensor>],
    /// First layer (1-based) whose attention also computes the V-V path (AnomalyCLIP's DPAM:
    /// `Some(6)` for 24 layers). Vision only.
    pub vv_from: Option<usize>,
    /// Only the first `n` tokens of the final ordinary stream are wanted (`Some(1)`: the CLS
    /// token for the pooled embedding), so the last block computes its ordinary queries and MLP
    /// for those rows alone; `EncoderOutput::last` then has `n` tokens. Ignored when the last
    /// layer is tapped without V-V; with V-V there (AnomalyCLIP reads the V-V stream) the
    /// ordinary tap of that layer has `n` tokens too, and the V-V stream stays whole.
    pub last_rows: Option<usize>,
}

/// What the encoder stack returns.
pub struct EncoderOutput {
    /// Final residual stream (prompt tokens removed), `[B, L, D]`.
    pub last: Tensor,
    /// Residual stream at each tapped layer, in the order of `Hooks::taps`.
    pub taps: Vec<Tensor>,
    /// V-V stream at each tapped layer (empty without `vv_from`); equals the ordinary stream for
    /// layers before the V-V path starts.
    pub vv_taps: Vec<Tensor>,
}

/// A stack of residual blocks with the hooks.
#[derive(Debug, Clone)]
pub struct Encoder {
    layers: Vec<ResidualBlock>,
}

impl Encoder {
    pub fn load(
        vb: VarBuilder,
        depth: usize,
        dim: usize,
        heads: usize,
        mlp_dim: usize,
        eps: f64,
        act: Activation,
    ) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..depth)
            .map(|i| ResidualBlock::load(vb.pp(i), dim, heads, mlp_dim, eps, act))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// `--precision bf16` for every block: GEMM operands (weights, activations, attention
    /// q/k/v and probabilities) in bfloat16, accumulation and everything else in f32 (the
    /// numerics of PyTorch's CPU autocast). On a bf16 unit the weights are packed once for it;
    /// emulated, they are rounded once. CPU inference; training widens them per product.
    pub fn use_precision(&mut self, precision: kernels::Precision) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|l| l.use_precision(precision))
    }

    fn check_hooks(&self, hooks: &Hooks, dim: usize) -> Result<()> {
        let depth = self.layers.len();
        if let Some(&bad) = hooks.taps.iter().find(|&&t| t > depth) {
            return Err(crate::error::invalid!(
                "layer {bad} requested but the tower has {depth} layers"
            ));
        }
        if let Some(w) = hooks.head_weights {
            let heads = self.layers[0].num_heads();
            if w.dims() != [depth, heads] {
                return Err(crate::error::invalid!(
                    "head weights have shape {:?}, expected [{depth}, {heads}]",
                    w.dims()
                ));
            }
        }
        if hooks.prompts.len() > depth {
            return Err(crate::error::invalid!(
                "prompts given for {} layers but the tower has {depth}",
                hooks.prompts.len()
            ));
        }
        for p in hooks.prompts.iter().flatten() {
            if p.dim(D::Minus1)? != dim || !(2..=3).contains(&p.rank()) {
                return Err(crate::error::invalid!(
                    "prompt tokens have shape {:?}, expected [n, {dim}] or [B, n, {dim}]",
                    p.dims()
                ));
            }
        }
        if let Some(v) = hooks.vv_from {
            if v == 0 || v > depth {
                return Err(crate::error::invalid!(
                    "V-V start layer {v} is outside 1..={depth}"
                ));
            }
        }
        Ok(())
    }

    /// # Shapes
    /// `xs: [B, L, D]` -> [`EncoderOutput`] with `[B, L, D]` tensors.
    pub fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        hooks: &Hooks,
        placement: PromptPlacement,
    ) -> Result<EncoderOutput> {
        let (batch, base_len, dim) = xs.dims3()?;
        self.check_hooks(hooks, dim)?;
        let mut x = xs.clone();
        let mut x_vv: Option<Tensor> = None;
        let mut n_prompt = 0usize; // prompt tokens currently appended (Append placement)
        let mut taps: Vec<Option<Tensor>> = vec![None; hooks.taps.len()];
        let mut vv_taps: Vec<Option<Tensor>> = vec![None; hooks.taps.len()];
        let strip = |t: &Tensor| -> Result<Tensor> {
            Ok(if t.dim(1)? <= base_len {
                t.clone()
            } else {
                t.narrow(1, 0, base_len)?
            })
        };
        let mut record = |layer: usize, x: &Tensor, vv: Option<&Tensor>| -> Result<()> {
            for (slot, &t) in hooks.taps.iter().enumerate() {
                if t == layer {
                    taps[slot] = Some(strip(x)?);
                    vv_taps[slot] = Some(strip(vv.unwrap_or(x))?);
                }
            }
            Ok(())
        };
        record(0, &x, None)?;
        for (i, block) in self.layers.iter().enumerate() {
            if let Some(Some(p)) = hooks.prompts.get(i) {
                let p = if p.rank() == 2 {
                    p.unsqueeze(0)?
                } else {
                    p.clone()
                };
                let p = p
                    .to_dtype(x.dtype())?
                    .broadcast_as((batch, p.dim(1)?, dim))?;
                let n = p.dim(1)?;
                let insert = |x: &Tensor| -> Result<Tensor> {
                    Ok(match placement {
                        PromptPlacement::Append if n_prompt == 0 => Tensor::cat(&[x, &p], 1)?,
                        PromptPlacement::Append => {
                            if n != n_prompt {
                                return Err(crate::error::invalid!(
                                    "layer {i} substitutes {n} prompt tokens but {n_prompt} are present"
                                ));
                            }
                            Tensor::cat(&[&x.narrow(1, 0, base_len)?, &p], 1)?
                        }
                        PromptPlacement::AfterStart => {
                            let len = x.dim(1)?;
                            if 1 + n > len {
                                return Err(crate::error::invalid!(
                                    "{n} prompt tokens do not fit after SOT in {len} positions"
                                ));
                            }
                            Tensor::cat(
                                &[&x.narrow(1, 0, 1)?, &p, &x.narrow(1, 1 + n, len - 1 - n)?],
                                1,
                            )?
                        }
                    })
                };
                x = insert(&x)?;
                if let Some(v) = &x_vv {
                    x_vv = Some(insert(v)?);
                }
                if placement == PromptPlacement::Append {
                    n_prompt = n;
                }
            }
            let layer = i + 1;
            let with_vv = hooks.vv_from.is_some_and(|v| layer >= v);
            let hw = match hooks.head_weights {
                Some(w) => Some(w.get(i)?),
                None => None,
            };
            let rows_only = hooks.last_rows.filter(|_| {
                layer == self.layers.len() && (with_vv || !hooks.taps.contains(&layer))
            });
            let (next, vv) = match rows_only {
                Some(rows) => {
                    let rows = rows.min(x.dim(1)?);
                    block.forward_first_rows(&x, mask, hw.as_ref(), rows, with_vv)?
                }
                None => block.forward(&x, mask, hw.as_ref(), with_vv)?,
            };
            if let Some(vv) = vv {
                // DPAM: the V-V stream starts from the ordinary stream entering its first layer.
                let base = x_vv.as_ref().unwrap_or(&x);
                x_vv = Some((base + vv)?);
            }
            x = next;
            record(layer, &x, x_vv.as_ref())?;
        }
        drop(record);
        let collect = |v: Vec<Option<Tensor>>| {
            v.into_iter()
                .map(|t| t.expect("every tap recorded"))
                .collect()
        };
        Ok(EncoderOutput {
            last: strip(&x)?,
            taps: collect(taps),
            vv_taps: if hooks.vv_from.is_some() {
                collect(vv_taps)
            } else {
                Vec::new()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::weights::RandomWeights;
    use candle_core::{Device, IndexOp};

    fn vb(seed: u64) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(RandomWeights { seed }), DType::F32, Device::Cpu)
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn to2(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    /// Naive single-sequence attention, one head at a time, from the fused weights:
    /// `out_proj(concat_h w_h · softmax(a_h b_hᵀ / sqrt(hd)) v_h)`, a/b = q/k or v/v.
    fn naive(att: &Attention, x: &[Vec<f32>], hw: &[f32], vv: bool) -> Vec<Vec<f32>> {
        let w = to2(att.qkv.weight().unwrap());
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
        let ow = to2(att.out_proj.weight().unwrap());
        let ob = att.out_proj.bias().unwrap().to_vec1::<f32>().unwrap();
        (0..l)
            .map(|i| {
                (0..d)
                    .map(|o| ob[o] + (0..d).map(|k| ow[o][k] * merged[i][k]).sum::<f32>())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn attention_matches_a_naive_per_head_computation() {
        let att = Attention::load(vb(3).pp("attn"), 8, 2).unwrap();
        let x = randn(&[1, 5, 8], 1);
        let hw = Tensor::new(&[0.5f32, 2.0], &Device::Cpu).unwrap();
        let out = att.forward(&x, None, Some(&hw), true).unwrap();
        let xs = to2(&x.i(0).unwrap());
        for (got, vv) in [(out.ori, false), (out.vv.unwrap(), true)] {
            let want = naive(&att, &xs, &[0.5, 2.0], vv);
            let got = to2(&got.i(0).unwrap());
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() < 1e-5, "vv={vv}: {g} vs {w}");
            }
        }
    }

    fn run(enc: &Encoder, x: &Tensor, hooks: Hooks, placement: PromptPlacement) -> EncoderOutput {
        enc.forward(x, None, &hooks, placement).unwrap()
    }

    fn encoder() -> Encoder {
        Encoder::load(vb(5), 3, 8, 2, 16, 1e-5, Activation::QuickGelu).unwrap()
    }

    /// Append placement: prompts at layer 0 are appended, at layer 1 they replace the last n
    /// tokens; taps drop them. Checked against the blocks applied by hand.
    #[test]
    fn vision_prompts_are_appended_then_substituted() {
        let enc = encoder();
        let x = randn(&[2, 4, 8], 2);
        let p0 = randn(&[3, 8], 3);
        let p1 = randn(&[2, 3, 8], 4); // per-image prompts
        let prompts = [Some(p0.clone()), Some(p1.clone())];
        let taps = [1, 3];
        let got = run(
            &enc,
            &x,
            Hooks {
                taps: &taps,
                prompts: &prompts,
                ..Default::default()
            },
            PromptPlacement::Append,
        );
        let blk = |i: usize, x: &Tensor| enc.layers[i].forward(x, None, None, false).unwrap().0;
        let x1 = blk(
            0,
            &Tensor::cat(
                &[
                    &x,
                    &p0.unsqueeze(0).unwrap().broadcast_as((2, 3, 8)).unwrap(),
                ],
                1,
            )
            .unwrap(),
        );
        let x2 = blk(
            1,
            &Tensor::cat(&[&x1.narrow(1, 0, 4).unwrap(), &p1], 1).unwrap(),
        );
        let x3 = blk(2, &x2);
        assert_eq!(got.taps[0].dims(), &[2, 4, 8]);
        assert!(diff(&got.taps[0], &x1.narrow(1, 0, 4).unwrap()) < 1e-6);
        assert!(diff(&got.taps[1], &x3.narrow(1, 0, 4).unwrap()) < 1e-6);
        assert!(diff(&got.last, &got.taps[1]) == 0.0);
    }

    /// `last_rows`: the final stream's first rows equal the full pass's (with prompts appended and
    /// head weights); the option is ignored when the last layer is tapped, and with V-V there
    /// only the ordinary stream shrinks.
    #[test]
    fn last_rows_only_computes_the_first_tokens() {
        let enc = encoder();
        let x = randn(&[2, 6, 8], 7);
        let prompts = [Some(randn(&[2, 8], 8))];
        let hw = randn(&[3, 2], 9);
        let full = run(
            &enc,
            &x,
            Hooks {
                taps: &[1],
                prompts: &prompts,
                head_weights: Some(&hw),
                ..Default::default()
            },
            PromptPlacement::Append,
        );
        let rows = run(
            &enc,
            &x,
            Hooks {
                taps: &[1],
                prompts: &prompts,
                head_weights: Some(&hw),
                last_rows: Some(2),
                ..Default::default()
            },
            PromptPlacement::Append,
        );
        assert_eq!(rows.last.dims(), &[2, 2, 8]);
        assert!(diff(&rows.last, &full.last.narrow(1, 0, 2).unwrap()) < 1e-6);
        assert!(diff(&rows.taps[0], &full.taps[0]) == 0.0);
        let tapped = Hooks {
            taps: &[3],
            last_rows: Some(1),
            ..Default::default()
        };
        assert_eq!(
            run(&enc, &x, tapped, PromptPlacement::Append).last.dims(),
            &[2, 6, 8]
        );
        // V-V at the last layer: the V-V stream stays whole, the ordinary one shrinks.
        let vv = |last_rows| Hooks {
            taps: &[2, 3],
            vv_from: Some(2),
            last_rows,
            ..Default::default()
        };
        let full = run(&enc, &x, vv(None), PromptPlacement::Append);
        let rows = run(&enc, &x, vv(Some(1)), PromptPlacement::Append);
        assert_eq!(rows.last.dims(), &[2, 1, 8]);
        assert_eq!(rows.taps[1].dims(), &[2, 1, 8]);
        assert!(diff(&rows.last, &full.last.narrow(1, 0, 1).unwrap()) < 1e-6);
        for i in 0..2 {
            assert_eq!(rows.vv_taps[i].dims(), &[2, 6, 8]);
            assert!(diff(&rows.vv_taps[i], &full.vv_taps[i]) < 1e-6);
        }
    }

    /// AfterStart placement substitutes positions 1..=n: substituting the values already there
    /// changes nothing, other values change everything after SOT.
    #[test]
    fn text_prompts_substitute_after_start() {
        let enc = encoder();
        let x = randn(&[2, 6, 8], 6);
        let same = x.narrow(1, 1, 2).unwrap(); // [2, 2, 8]
        let taps = [3];
        let plain = run(
            &enc,
            &x,
            Hooks {
                taps: &taps,
                ..Default::default()
            },
            PromptPlacement::AfterStart,
        );
        let prompts = [Some(same)];
        let subst = run(
            &enc,
            &x,
            Hooks {
                taps: &taps,
                prompts: &prompts,
                ..Default::default()
            },
            PromptPlacement::AfterStart,
        );
        assert_eq!(diff(&plain.taps[0], &subst.taps[0]), 0.0);
        let other = [None, Some(randn(&[2, 8], 7))];
        let changed = run(
            &enc,
            &x,
            Hooks {
                taps: &taps,
                prompts: &other,
                ..Default::default()
            },
            PromptPlacement::AfterStart,
        );
        assert_eq!(changed.taps[0].dims(), &[2, 6, 8]);
        let sot = (plain.taps[0].i((.., 0)).unwrap() - changed.taps[0].i((.., 0)).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(
            sot.to_scalar::<f32>().unwrap() > 0.0,
            "without a causal mask SOT sees the prompts"
        );
    }

    /// AnomalyCLIP's DPAM recursion: x_vv starts as the stream entering layer v and accumulates
    /// only V-V attention outputs (no MLP), while the ordinary stream is unchanged.
    #[test]
    fn vv_path_follows_anomalyclip() {
        let enc = encoder();
        let x = randn(&[1, 4, 8], 8);
        let taps = [1, 2, 3];
        let plain = run(
            &enc,
            &x,
            Hooks {
                taps: &taps,
                ..Default::default()
            },
            PromptPlacement::Append,
        );
        let out = run(
            &enc,
            &x,
            Hooks {
                taps: &taps,
                vv_from: Some(2),
                ..Default::default()
            },
            PromptPlacement::Append,
        );
        for i in 0..3 {
            assert_eq!(
                diff(&plain.taps[i], &out.taps[i]),
                0.0,
                "ordinary stream untouched"
            );
        }
        assert_eq!(
            diff(&out.vv_taps[0], &out.taps[0]),
            0.0,
            "before the V-V start both streams agree"
        );
        let x1 = &out.taps[0];
        let vv = |i: usize, x_ori: &Tensor| {
            let h = enc.layers[i].layer_norm1.forward(x_ori).unwrap();
            enc.layers[i]
                .self_attn
                .forward(&h, None, None, true)
                .unwrap()
                .vv
                .unwrap()
        };
        let want2 = (x1 + vv(1, x1)).unwrap();
        let want3 = (&want2 + vv(2, &out.taps[1])).unwrap();
        assert!(diff(&out.vv_taps[1], &want2) < 1e-6);
        assert!(diff(&out.vv_taps[2], &want3) < 1e-6);
    }

    /// With a learnable tensor upstream, the differentiable ops are used: gradients are non-zero.
    #[test]
    fn gradients_reach_prompts_and_head_weights() {
        let enc = encoder();
        let x = randn(&[1, 4, 8], 9);
        let p = candle_core::Var::from_tensor(&randn(&[2, 8], 10)).unwrap();
        let hw = candle_core::Var::ones((3, 2), DType::F32, &Device::Cpu).unwrap();
        let prompts = [Some(p.as_tensor().clone())];
        let out = run(
            &enc,
            &x,
            Hooks {
                taps: &[3],
                prompts: &prompts,
                head_weights: Some(hw.as_tensor()),
                vv_from: Some(2),
                last_rows: None,
            },
            PromptPlacement::Append,
        );
        let loss = (out.taps[0].sqr().unwrap().sum_all().unwrap()
            + out.vv_taps[0].sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in [("prompt", &p), ("head weights", &hw)] {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 1e-12, "{name} gradient is zero");
        }
    }
}
