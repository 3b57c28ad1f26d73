//! The transformer stack shared by both towers: LayerNorm, MLP, the pre-LN residual block and
//! the encoder with the anomaly-detection hooks (taps, per-head weights, deep prompts, the V-V
//! path). Attention and linear layers live in `attention` and `linear`.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::attention::{Attention, AttentionRequest};
use super::config::{Activation, TextConfig, VisionConfig};
use super::kernels;
use super::linear::Linear;
use crate::Result;

/// The shape of a tower's transformer stack, read from its `config.json` section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderConfig {
    /// Residual blocks.
    pub depth: usize,
    /// Residual stream width `D`.
    pub width: usize,
    pub heads: usize,
    /// MLP hidden width.
    pub mlp_width: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl EncoderConfig {
    /// The image tower's stack.
    pub fn of_vision(c: &VisionConfig) -> Result<Self> {
        Ok(Self {
            depth: c.num_hidden_layers,
            width: c.hidden_size,
            heads: c.num_attention_heads,
            mlp_width: c.intermediate_size,
            layer_norm_eps: c.layer_norm_eps,
            activation: c.activation()?,
        })
    }

    /// The text tower's stack.
    pub fn of_text(c: &TextConfig) -> Result<Self> {
        Ok(Self {
            depth: c.num_hidden_layers,
            width: c.hidden_size,
            heads: c.num_attention_heads,
            mlp_width: c.intermediate_size,
            layer_norm_eps: c.layer_norm_eps,
            activation: c.activation()?,
        })
    }
}

/// LayerNorm over the last dimension (torch semantics: biased variance, eps inside the sqrt).
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    /// `(gamma, beta)` for the fused kernels (f32 weights on the CPU), else empty.
    host: std::sync::Arc<(Vec<f32>, Vec<f32>)>,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let (weight, bias) = (vb.get(dim, "weight")?, vb.get(dim, "bias")?);
        let host = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            (weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?)
        } else {
            Default::default()
        };
        Ok(Self {
            weight,
            bias,
            eps,
            host: std::sync::Arc::new(host),
        })
    }

    /// Whether the fused kernels can apply it.
    fn fused(&self) -> bool {
        !self.host.0.is_empty()
    }

    /// `stats[i] = [mean, rstd]` of each `d`-wide row of `x` (`stats.len()` rows).
    fn stats(&self, x: &[f32], d: usize, stats: &mut [[f32; 2]]) {
        let eps = self.eps as f32;
        x[..stats.len() * d]
            .par_chunks(64 * d)
            .zip(stats.par_chunks_mut(64))
            .for_each(|(x, s)| kernels::layer_norm_stats(x, d, eps, s));
    }

    /// The rows of `x` (`ld` apart) normalised, as a GEMM's left operand.
    fn source<'a>(&'a self, x: &'a [f32], ld: usize, stats: &'a [[f32; 2]]) -> kernels::ASrc<'a> {
        kernels::ASrc::Norm {
            x,
            ld,
            stats,
            gamma: &self.host.0,
            beta: &self.host.1,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // candle-nn's fused `layer_norm` has no backward (upstream would silently get a zero
        // gradient) and no f64.
        if xs.track_op() || xs.dtype() == DType::F64 {
            candle_nn::ops::layer_norm_slow(xs, &self.weight, &self.bias, self.eps as f32)
        } else {
            candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// `fc2(act(fc1(x)))`.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    width: usize,
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
            fc1: Linear::load(vb.pp("fc1"), dim, hidden, true)?,
            fc2: Linear::load(vb.pp("fc2"), hidden, dim, true)?,
            act,
            width: hidden,
        })
    }
}

impl Mlp {
    /// The MLP's hidden width (fc1's outputs).
    fn fc2_width(&self) -> usize {
        self.width
    }

    fn fused(&self) -> bool {
        self.fc1.fused() && self.fc2.fused()
    }

    fn act(&self) -> kernels::Act {
        match self.act {
            Activation::QuickGelu => kernels::Act::QuickGelu,
            Activation::Gelu => kernels::Act::Gelu,
        }
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if kernels::applies(xs) && self.fused() {
            let h = self.fc1.forward_with(xs, self.act())?;
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

/// Pre-LN residual block: `x += attn(ln_1(x)); x += mlp(ln_2(x))`.
#[derive(Debug, Clone)]
pub(crate) struct ResidualBlock {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl ResidualBlock {
    pub fn load(vb: VarBuilder, cfg: &EncoderConfig) -> Result<Self> {
        let (dim, eps) = (cfg.width, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), dim, eps)?,
            self_attn: Attention::load(vb.pp("self_attn"), dim, cfg.heads)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), dim, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), dim, cfg.mlp_width, cfg.activation)?,
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

    /// Returns `(x, vv)`: the block's output for the first `request.rows` tokens (all by
    /// default; every token still serves as key and value, the attention's queries and the MLP
    /// shrink to those rows), and the V-V attention output (without residual, every token) when
    /// `request.with_vv`: AnomalyCLIP's DPAM block adds it to its own stream, no MLP.
    ///
    /// # Shapes
    /// `xs: [B, L, D]` -> `([B, rows, D], Option<[B, L, D]>)`.
    pub fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        head_weights: Option<&Tensor>,
        request: AttentionRequest,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let h = self.layer_norm1.forward(xs)?;
        let attn = self.self_attn.forward(&h, mask, head_weights, request)?;
        let rows = attn.ori.dim(1)?;
        let residual = if rows < xs.dim(1)? {
            xs.narrow(1, 0, rows)?
        } else {
            xs.clone()
        };
        let x = (residual + attn.ori)?;
        let x = (&x + self.mlp.forward(&self.layer_norm2.forward(&x)?)?)?;
        Ok((x, attn.vv))
    }
}

/// The buffers of the fused inference path, reused by every block of a pass (and by the next
/// pass on the same thread).
#[derive(Default)]
struct Workspace {
    stats: Vec<[f32; 2]>,
    qkv: Vec<f32>,
    /// The merged heads (f32), or on a bf16 unit packed for `out_proj`.
    attn: Vec<f32>,
    attn_bf16: kernels::PackedRows,
    hidden: Vec<f32>,
    /// The MLP's hidden layer on a bf16 unit.
    hidden_bf16: kernels::PackedRows,
}

thread_local! {
    static WORKSPACE: std::cell::Cell<Option<Workspace>> = const { std::cell::Cell::new(None) };
}

/// The first `n` elements of `v`, grown (zero-filled) if it is shorter.
fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// Where the fused path's attention reads its options, per block.
struct BlockCtx<'a> {
    /// Images and tokens per image of the stream entering the block.
    batch: usize,
    len: usize,
    /// Ordinary queries wanted (the stream leaves with `rows` tokens per image).
    rows: usize,
    mask: Option<&'a [f32]>,
    head_weights: Option<&'a [f32]>,
}

impl ResidualBlock {
    /// Whether [`Self::forward_fused`] can run this block.
    fn fused(&self) -> bool {
        self.self_attn.fused()
            && self.mlp.fused()
            && self.layer_norm1.fused()
            && self.layer_norm2.fused()
    }

    /// The block on the fused CPU kernels, in place on the row-major stream `x` `[B, L, D]`,
    /// which leaves as `[B, rows, D]`: LayerNorm applied while the qkv and fc1 operands are
    /// packed, attention per head, the residual adds in the epilogues of out_proj and fc2, the
    /// activation in fc1's. With `vv` (the V-V stream, `[B, L, D]`), the V-V attention's
    /// projection is added to it (AnomalyCLIP's DPAM). No tensor is allocated.
    fn forward_fused(
        &self,
        x: &mut Vec<f32>,
        vv: Option<&mut Vec<f32>>,
        ctx: &BlockCtx,
        ws: &mut Workspace,
    ) -> Result<()> {
        let (b, l, rows) = (ctx.batch, ctx.len, ctx.rows);
        let d = self.layer_norm1.host.0.len();
        let m = b * l;
        let attn = &self.self_attn;
        let stats = grow(&mut ws.stats, m);
        self.layer_norm1.stats(x, d, stats);
        let qkv = grow(&mut ws.qkv, m * 3 * d);
        attn.qkv_into(m, self.layer_norm1.source(x, d, stats), qkv)?;
        let (mask, hw) = (ctx.mask, ctx.head_weights);
        let merged = (&mut ws.attn, &mut ws.attn_bf16);
        if let Some(vv) = vv {
            let vv = &mut vv[..m * d];
            attn.attend_project_into(qkv, (b, l), kernels::VALUE_VALUE, l, mask, hw, merged, vv)?;
        }
        if rows < l {
            for bi in 1..b {
                x.copy_within(bi * l * d..(bi * l + rows) * d, bi * rows * d);
            }
            x.truncate(b * rows * d);
        }
        // The attention reads `qkv` alone, so the residual stream's rows can move first.
        let m = b * rows;
        let merged = (&mut ws.attn, &mut ws.attn_bf16);
        attn.attend_project_into(
            qkv,
            (b, l),
            kernels::ORDINARY,
            rows,
            mask,
            hw,
            merged,
            &mut x[..m * d],
        )?;
        let stats = &mut ws.stats[..m];
        self.layer_norm2.stats(x, d, stats);
        let width = self.mlp.fc2_width();
        let a = self.layer_norm2.source(x, d, stats);
        let (fc1, fc2) = (&self.mlp.fc1, &self.mlp.fc2);
        if fc1.bf16_unit().is_some() && fc1.bf16_unit() == fc2.bf16_unit() {
            // On a bf16 unit the hidden layer goes from fc1 to fc2 as packed bf16 rows.
            fc1.gemm_to_packed(m, a, self.mlp.act(), &mut ws.hidden_bf16)?;
            return Ok(fc2.gemm_from_packed(&ws.hidden_bf16, &mut x[..m * d], d, true)?);
        }
        let hidden = grow(&mut ws.hidden, m * width);
        fc1.gemm_into(m, a, hidden, width, self.mlp.act(), false, false)?;
        let a = kernels::ASrc::View(kernels::MatRef {
            data: hidden,
            rs: width,
            cs: 1,
        });
        let none = kernels::Act::None;
        Ok(self.mlp.fc2.gemm_into(m, a, x, d, none, true, false)?)
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
pub(crate) struct Encoder {
    layers: Vec<ResidualBlock>,
}

impl Encoder {
    /// Loads `layers.{0..depth}` under `vb`.
    pub fn load(vb: VarBuilder, cfg: &EncoderConfig) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..cfg.depth)
            .map(|i| ResidualBlock::load(vb.pp(i), cfg))
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
        if self.can_fuse(xs, mask, hooks) {
            return self.forward_fused(xs, mask, hooks, placement);
        }
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
                let at = PromptAt {
                    layer: i,
                    present: n_prompt,
                    base_len,
                    placement,
                };
                x = insert_prompts(&x, p, &at)?;
                if let Some(v) = &x_vv {
                    x_vv = Some(insert_prompts(v, p, &at)?);
                }
                if placement == PromptPlacement::Append {
                    n_prompt = prompt_rows(p)?;
                }
            }
            let layer = i + 1;
            let with_vv = hooks.vv_from.is_some_and(|v| layer >= v);
            let hw = match hooks.head_weights {
                Some(w) => Some(w.get(i)?),
                None => None,
            };
            let request = AttentionRequest {
                rows: self.rows_only(hooks, layer, with_vv),
                with_vv,
            };
            let (next, vv) = block.forward(&x, mask, hw.as_ref(), request)?;
            if let Some(vv) = vv {
                // DPAM: the V-V stream starts from the ordinary stream entering its first layer.
                let base = x_vv.as_ref().unwrap_or(&x);
                x_vv = Some((base + vv)?);
            }
            x = next;
            record(layer, &x, x_vv.as_ref())?;
        }
        let _ = batch;
        Ok(EncoderOutput {
            last: strip(&x)?,
            taps: collect_taps(taps),
            vv_taps: if hooks.vv_from.is_some() {
                collect_taps(vv_taps)
            } else {
                Vec::new()
            },
        })
    }

    /// `Hooks::last_rows` where it applies to `layer`.
    fn rows_only(&self, hooks: &Hooks, layer: usize, with_vv: bool) -> Option<usize> {
        hooks
            .last_rows
            .filter(|_| layer == self.layers.len() && (with_vv || !hooks.taps.contains(&layer)))
    }

    /// Whether the whole pass can run on the fused CPU kernels: f32 on the CPU, nothing
    /// learnable in the input or the hooks, every block's weights packed for the kernels.
    fn can_fuse(&self, xs: &Tensor, mask: Option<&Tensor>, hooks: &Hooks) -> bool {
        let plain = |t: &Tensor| kernels::applies(t);
        plain(xs)
            && mask.is_none_or(plain)
            && hooks
                .head_weights
                .is_none_or(|w| !w.track_op() && w.device().is_cpu())
            && hooks
                .prompts
                .iter()
                .flatten()
                .all(|p| !p.track_op() && p.device().is_cpu())
            && self.layers.iter().all(ResidualBlock::fused)
    }

    /// [`Self::forward`] on the fused kernels: the residual stream (and the V-V stream) kept as
    /// row-major buffers updated in place by each block ([`ResidualBlock::forward_fused`]);
    /// tensors are made only for the taps, the output, and where prompts enter.
    fn forward_fused(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        hooks: &Hooks,
        placement: PromptPlacement,
    ) -> Result<EncoderOutput> {
        let (batch, base_len, dim) = xs.dims3()?;
        let mask = match mask {
            Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let heads = self.layers.first().map_or(1, |l| l.num_heads());
        let head_weights = match hooks.head_weights {
            Some(w) => Some(w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let mut stream = Stream {
            x: xs.flatten_all()?.to_vec1::<f32>()?,
            vv: None,
            batch,
            len: base_len,
            dim,
            base_len,
        };
        let mut taps: Vec<Option<Tensor>> = vec![None; hooks.taps.len()];
        let mut vv_taps: Vec<Option<Tensor>> = vec![None; hooks.taps.len()];
        let mut record = |layer: usize, s: &Stream| -> Result<()> {
            for (slot, &t) in hooks.taps.iter().enumerate() {
                if t == layer {
                    taps[slot] = Some(s.tensor(&s.x, s.len)?);
                    let vv = s.vv.as_ref().unwrap_or(&s.x);
                    vv_taps[slot] = Some(s.tensor(vv, s.len.max(s.vv_len()))?);
                }
            }
            Ok(())
        };
        record(0, &stream)?;
        let mut ws = WORKSPACE.with(|w| w.take()).unwrap_or_default();
        let mut n_prompt = 0usize;
        for (i, block) in self.layers.iter().enumerate() {
            if let Some(Some(p)) = hooks.prompts.get(i) {
                let at = PromptAt {
                    layer: i,
                    present: n_prompt,
                    base_len,
                    placement,
                };
                stream.insert_prompts(p, &at)?;
                if placement == PromptPlacement::Append {
                    n_prompt = prompt_rows(p)?;
                }
            }
            let layer = i + 1;
            let with_vv = hooks.vv_from.is_some_and(|v| layer >= v);
            if with_vv && stream.vv.is_none() {
                // DPAM: the V-V stream starts from the ordinary stream entering its first layer.
                stream.vv = Some(stream.x.clone());
            }
            let ctx = BlockCtx {
                batch,
                len: stream.len,
                rows: self
                    .rows_only(hooks, layer, with_vv)
                    .map_or(stream.len, |r| r.min(stream.len)),
                mask: mask.as_deref(),
                head_weights: head_weights
                    .as_ref()
                    .map(|w| &w[i * heads..(i + 1) * heads]),
            };
            let vv = if with_vv { stream.vv.as_mut() } else { None };
            block.forward_fused(&mut stream.x, vv, &ctx, &mut ws)?;
            stream.len = ctx.rows;
            record(layer, &stream)?;
        }
        WORKSPACE.with(|w| w.set(Some(ws)));
        Ok(EncoderOutput {
            last: stream.tensor(&stream.x, stream.len)?,
            taps: collect_taps(taps),
            vv_taps: if hooks.vv_from.is_some() {
                collect_taps(vv_taps)
            } else {
                Vec::new()
            },
        })
    }
}

fn collect_taps(v: Vec<Option<Tensor>>) -> Vec<Tensor> {
    v.into_iter()
        .map(|t| t.expect("every tap recorded"))
        .collect()
}

/// The fused path's residual streams, row-major `[batch, len, dim]` (the V-V stream, once it
/// exists, keeps every token).
struct Stream {
    x: Vec<f32>,
    vv: Option<Vec<f32>>,
    batch: usize,
    len: usize,
    dim: usize,
    base_len: usize,
}

impl Stream {
    fn vv_len(&self) -> usize {
        self.vv
            .as_ref()
            .map_or(0, |v| v.len() / (self.batch * self.dim).max(1))
    }

    /// `data` (`[batch, len, dim]`) as a tensor of its first `base_len` tokens at most (prompt
    /// tokens dropped).
    fn tensor(&self, data: &[f32], len: usize) -> Result<Tensor> {
        let keep = len.min(self.base_len);
        let (b, d) = (self.batch, self.dim);
        let v: Vec<f32> = if keep == len {
            data[..b * len * d].to_vec()
        } else {
            (0..b)
                .flat_map(|i| &data[i * len * d..(i * len + keep) * d])
                .copied()
                .collect()
        };
        Ok(Tensor::from_vec(v, (b, keep, d), &Device::Cpu)?)
    }

    /// Prompts enter as in the tensor path ([`insert_prompts`]), on both streams.
    fn insert_prompts(&mut self, p: &Tensor, at: &PromptAt) -> Result<()> {
        let (b, d) = (self.batch, self.dim);
        let apply = |data: &[f32], len: usize| -> Result<(Vec<f32>, usize)> {
            let t = Tensor::from_slice(&data[..b * len * d], (b, len, d), &Device::Cpu)?;
            let t = insert_prompts(&t, p, at)?;
            let len = t.dim(1)?;
            Ok((t.flatten_all()?.to_vec1::<f32>()?, len))
        };
        let (x, len) = apply(&self.x, self.len)?;
        if let Some(vv) = &self.vv {
            let vv_len = self.vv_len();
            self.vv = Some(apply(vv, vv_len)?.0);
        }
        self.x = x;
        self.len = len;
        Ok(())
    }
}

/// Where prompts enter: before block `layer`, `present` prompt tokens already appended.
struct PromptAt {
    layer: usize,
    present: usize,
    base_len: usize,
    placement: PromptPlacement,
}

/// Prompt tokens per image (`[n, D]` or `[B, n, D]`).
fn prompt_rows(p: &Tensor) -> Result<usize> {
    Ok(if p.rank() == 2 { p.dim(0)? } else { p.dim(1)? })
}

/// `x` with the prompts `p` entered per [`PromptPlacement`].
fn insert_prompts(x: &Tensor, p: &Tensor, at: &PromptAt) -> Result<Tensor> {
    let (batch, _, dim) = x.dims3()?;
    let p = if p.rank() == 2 {
        p.unsqueeze(0)?
    } else {
        p.clone()
    };
    let p = p
        .to_dtype(x.dtype())?
        .broadcast_as((batch, p.dim(1)?, dim))?;
    let n = p.dim(1)?;
    Ok(match at.placement {
        PromptPlacement::Append if at.present == 0 => Tensor::cat(&[x, &p], 1)?,
        PromptPlacement::Append => {
            if n != at.present {
                return Err(crate::error::invalid!(
                    "layer {} substitutes {n} prompt tokens but {} are present",
                    at.layer,
                    at.present
                ));
            }
            Tensor::cat(&[&x.narrow(1, 0, at.base_len)?, &p], 1)?
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::testing::{diff, randn, vb};
    use candle_core::{Device, IndexOp};

    fn run(enc: &Encoder, x: &Tensor, hooks: Hooks, placement: PromptPlacement) -> EncoderOutput {
        enc.forward(x, None, &hooks, placement).unwrap()
    }

    fn encoder() -> Encoder {
        let cfg = EncoderConfig {
            depth: 3,
            width: 8,
            heads: 2,
            mlp_width: 16,
            layer_norm_eps: 1e-5,
            activation: Activation::QuickGelu,
        };
        Encoder::load(vb(5), &cfg).unwrap()
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
        let blk = |i: usize, x: &Tensor| {
            enc.layers[i]
                .forward(x, None, None, AttentionRequest::default())
                .unwrap()
                .0
        };
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
                .forward(
                    &h,
                    None,
                    None,
                    AttentionRequest {
                        rows: None,
                        with_vv: true,
                    },
                )
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
