//! The CLIP image tower (ViT), with taps, per-head weights, deep prompts and the V-V path.
//!
//! Reference: Hugging Face `CLIPVisionTransformer` / OpenAI `VisionTransformer.forward`:
//! `x = ln_pre([cls; conv1(img)] + pos); x = blocks(x); pooled = ln_post(x[:, 0]) @ proj`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::config::{PosInterpolation, VisionConfig};
use super::encoder::{Encoder, Hooks, LayerNorm, PromptPlacement};
use super::linear::Linear;
use crate::interp;
use crate::Result;

#[derive(Debug, Clone)]
pub struct VisionTransformer {
    /// `conv1` (stride = kernel = patch, no bias) as a linear layer over flattened patches,
    /// `[D, C·p·p]`: on the CPU it runs on the packed GEMMs (f32, or bf16 with `--precision
    /// bf16`) instead of candle's im2col and `gemm` crate (a few percent of a ViT-B/16 forward).
    patch_embedding: Linear,
    class_embedding: Tensor,
    /// The trained position embedding, `[1 + g*g, D]`.
    trained_positions: Tensor,
    /// The one in use at `image_size`, `[1 + g'*g', D]`.
    positions: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    projection: Linear,
    cfg: VisionConfig,
    image_size: usize,
    /// Width of the joint embedding space (`proj`'s output).
    embed_dim: usize,
}

/// Everything a vision forward pass can return.
pub struct VisionOutput {
    /// `ln_post(x[:, 0]) @ proj`, `[B, E]`: Hugging Face `image_embeds` (not normalised).
    pub pooled: Tensor,
    /// Final residual stream (prompt tokens removed), `[B, 1 + P, D]`.
    pub last: Tensor,
    /// Residual stream after each tapped layer, `[B, 1 + P, D]` (no ln_post, no proj).
    pub taps: Vec<Tensor>,
    /// V-V stream at the tapped layers when `Hooks::vv_from` is set.
    pub vv_taps: Vec<Tensor>,
}

impl VisionTransformer {
    /// Loads `vision_model.*` from `vb` and the projection from `proj_vb` (`visual_projection`).
    pub fn load(
        vb: VarBuilder,
        proj_vb: VarBuilder,
        cfg: &VisionConfig,
        embed_dim: usize,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let (c, p) = (cfg.num_channels, cfg.patch_size);
        let conv_w = emb.pp("patch_embedding").get((d, c, p, p), "weight")?;
        let patch_embedding = Linear::new(conv_w.reshape((d, c * p * p))?, None);
        let class_embedding = emb.get(d, "class_embedding")?;
        let n_pos = cfg.grid() * cfg.grid() + 1;
        let trained_positions = emb.pp("position_embedding").get((n_pos, d), "weight")?;
        Ok(Self {
            patch_embedding,
            class_embedding,
            positions: trained_positions.clone(),
            trained_positions,
            pre_layrnorm: LayerNorm::load(vb.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?,
            encoder: Encoder::load(
                vb.pp("encoder"),
                &super::encoder::EncoderConfig::of_vision(cfg)?,
            )?,
            post_layernorm: LayerNorm::load(vb.pp("post_layernorm"), d, cfg.layer_norm_eps)?,
            projection: Linear::new(proj_vb.get((embed_dim, d), "weight")?, None),
            cfg: cfg.clone(),
            image_size: cfg.image_size,
            embed_dim,
        })
    }

    /// Width of the joint embedding space, what [`Self::project`] gives.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }
    pub fn depth(&self) -> usize {
        self.encoder.depth()
    }
    pub fn device(&self) -> &candle_core::Device {
        self.class_embedding.device()
    }
    pub fn dtype(&self) -> candle_core::DType {
        self.class_embedding.dtype()
    }
    /// The input size this tower currently expects.
    pub fn image_size(&self) -> usize {
        self.image_size
    }
    /// Patches per side at the current input size.
    pub fn grid(&self) -> usize {
        self.image_size / self.cfg.patch_size
    }

    /// The same tower for `image_size` inputs: the position embedding is resized once here
    /// (CLS row kept), as AdaCLIP's `resize_pos_embed` does at load. The grid is
    /// `image_size / patch_size` (floor, like the strided convolution).
    pub fn at_image_size(&self, image_size: usize, mode: PosInterpolation) -> Result<Self> {
        let p = self.cfg.patch_size;
        if image_size < p {
            return Err(crate::error::invalid!(
                "image size {image_size} is smaller than one {p}px patch"
            ));
        }
        // The resized position embedding and every forward pass grow with the square of the
        // size: bound it before allocating.
        let max = super::config::MAX_INPUT_SIZE.max(self.cfg.image_size);
        if image_size > max {
            return Err(crate::error::invalid!(
                "image size {image_size} is larger than {max}"
            ));
        }
        let mut out = self.clone();
        out.image_size = image_size;
        out.positions = resize_positions(&self.trained_positions, image_size / p, mode)?;
        Ok(out)
    }

    /// `ln_pre([cls; patches] + pos)`, `[B, 1 + P, D]`.
    ///
    /// # Shapes
    /// `pixels: [B, C, S, S]` with `S` = [`Self::image_size`].
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _c, h, w) = pixels.dims4()?;
        if h != self.image_size || w != self.image_size {
            return Err(crate::error::invalid!(
                "input is {h}x{w} but the vision tower is set up for {s}x{s} (use at_image_size)",
                s = self.image_size
            ));
        }
        let x = self.patchify(&pixels.to_dtype(self.class_embedding.dtype())?)?;
        let x = self.patch_embedding.forward(&x)?; // [B, P, D]
        if super::kernels::applies(&x)
            && super::kernels::applies(&self.class_embedding)
            && super::kernels::applies(&self.positions)
        {
            let x = super::kernels::embed_tokens(&self.class_embedding, &x, &self.positions)?;
            return Ok(self.pre_layrnorm.forward(&x)?);
        }
        let d = self.cfg.hidden_size;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let x = x.broadcast_add(&self.positions.unsqueeze(0)?)?;
        Ok(self.pre_layrnorm.forward(&x)?)
    }

    /// The non-overlapping `p × p` patches of `pixels` `[B, C, S, S]` as rows `[B, g·g, C·p·p]`
    /// (row-major over the grid, each `(c, y, x)` as `conv1`'s weight is laid out); pixels past
    /// `g · p` are dropped, as the strided convolution drops them.
    fn patchify(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let g = self.image_size / p;
        let x = pixels
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .contiguous()?;
        let x = x.reshape((b, c, g, p, g, p))?.permute((0, 2, 4, 1, 3, 5))?;
        Ok(x.contiguous()?.reshape((b, g * g, c * p * p))?)
    }

    /// The full pass with hooks; `Hooks::default()` is Hugging Face `get_image_features`.
    pub fn forward(&self, pixels: &Tensor, hooks: &Hooks) -> Result<VisionOutput> {
        let x = self.embed(pixels)?;
        let out = self
            .encoder
            .forward(&x, None, hooks, PromptPlacement::Append)?;
        let cls = out.last.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.project(&cls)?;
        Ok(VisionOutput {
            pooled,
            last: out.last,
            taps: out.taps,
            vv_taps: out.vv_taps,
        })
    }

    /// The pooled embedding alone (`get_image_features`), skipping the last block's work on
    /// patch tokens that nothing reads.
    pub fn pooled(&self, pixels: &Tensor) -> Result<Tensor> {
        let hooks = Hooks {
            last_rows: Some(1),
            ..Default::default()
        };
        Ok(self.forward(pixels, &hooks)?.pooled)
    }

    /// `--precision` for the transformer blocks (see `encoder::Encoder::use_precision`) and
    /// the patch embedding: `conv1` is a product too, and PyTorch's autocast runs `conv2d` in
    /// bf16 (on the AMX Xeon, perf: 2.5% of a ViT-B/16 bf16 forward in f32, ~0.3% in bf16).
    pub fn use_precision(&mut self, precision: super::kernels::Precision) -> Result<()> {
        self.patch_embedding.use_precision(precision)?;
        self.encoder.use_precision(precision)
    }

    /// `ln_post(x) @ proj` on any tokens `[..., D]` -> `[..., E]` (AnomalyCLIP projects every
    /// patch token this way; AdaCLIP uses the raw stream instead).
    pub fn project(&self, tokens: &Tensor) -> Result<Tensor> {
        Ok(self
            .projection
            .forward(&self.post_layernorm.forward(tokens)?)?)
    }

    /// `x @ proj` without ln_post: AnomalyCLIP's image feature `x_ori[0, :, :] @ self.proj`
    /// (zqhang/AnomalyCLIP@45ed4dd `AnomalyCLIP_lib/AnomalyCLIP.py` l.387).
    pub fn project_without_ln(&self, tokens: &Tensor) -> Result<Tensor> {
        Ok(self.projection.forward(tokens)?)
    }
}

/// Resizes `[1 + g*g, D]` to `[1 + n*n, D]` (CLS row kept) with PyTorch-exact weights.
pub fn resize_positions(pos: &Tensor, n: usize, mode: PosInterpolation) -> Result<Tensor> {
    let (len, d) = pos.dims2()?;
    let g = ((len - 1) as f64).sqrt().round() as usize;
    if g * g + 1 != len {
        return Err(crate::error::invalid!(
            "position embedding of {len} rows is not 1 + a square grid"
        ));
    }
    if n == g {
        return Ok(pos.clone());
    }
    let m = match mode {
        PosInterpolation::Bicubic => interp::bicubic_matrix(g, n),
        PosInterpolation::Bilinear => interp::bilinear_matrix(g, n, false),
    };
    let dev = pos.device();
    let dtype = pos.dtype();
    let m = Tensor::from_vec(m, (n, g), dev)?;
    let grid = pos.narrow(0, 1, g * g)?.to_dtype(candle_core::DType::F32)?;
    // rows: [n, g] @ [g, g*D] -> [n, g, D]; columns: [n, n, g] @ [n, g, D] -> [n, n, D]
    let rows = m.matmul(&grid.reshape((g, g * d))?)?.reshape((n, g, d))?;
    let both = m
        .unsqueeze(0)?
        .broadcast_as((n, n, g))?
        .contiguous()?
        .matmul(&rows)?;
    let both = both.reshape((n * n, d))?.to_dtype(dtype)?;
    Ok(Tensor::cat(&[&pos.narrow(0, 0, 1)?, &both], 0)?)
}
