//! The CLIP text tower, taking token ids or token embeddings (for learnable context tokens).
//!
//! Reference: Hugging Face `CLIPTextTransformer`: `x = tok_emb + pos; x = blocks(x, causal);
//! pooled = ln_final(x)[eot] @ text_projection`.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::TextConfig;
use super::encoder::{Encoder, Hooks, LayerNorm, PromptPlacement};
use super::linear::Linear;
use crate::Result;

#[derive(Debug, Clone)]
pub struct TextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    projection: Linear,
    cfg: TextConfig,
}

pub struct TextOutput {
    /// `ln_final(x)[eot] @ text_projection`, `[N, E]`: Hugging Face `text_embeds` (not normalised).
    pub pooled: Tensor,
    /// Residual stream after each tapped layer, `[N, L', D]` where `L'` = longest EOT + 1: the
    /// causal mask makes later positions irrelevant, so the sequence is cut there (exact).
    pub taps: Vec<Tensor>,
}

impl TextTransformer {
    pub fn load(
        vb: VarBuilder,
        proj_vb: VarBuilder,
        cfg: &TextConfig,
        embed_dim: usize,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let tok = emb
            .pp("token_embedding")
            .get((cfg.vocab_size, d), "weight")?;
        Ok(Self {
            token_embedding: Embedding::new(tok, d),
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, d), "weight")?,
            encoder: Encoder::load(
                vb.pp("encoder"),
                &super::encoder::EncoderConfig::of_text(cfg)?,
            )?,
            final_layer_norm: LayerNorm::load(vb.pp("final_layer_norm"), d, cfg.layer_norm_eps)?,
            projection: Linear::new(proj_vb.get((embed_dim, d), "weight")?, None),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }
    pub fn depth(&self) -> usize {
        self.encoder.depth()
    }
    pub fn context_length(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// Pooling position per sequence, as Hugging Face chooses it (see [`TextConfig::eos_token_id`]).
    pub fn eot_positions(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        ids.iter()
            .map(|seq| {
                if self.cfg.eos_token_id == 2 {
                    // torch argmax returns the first maximal index.
                    let max = seq.iter().copied().max().unwrap_or(0);
                    seq.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    seq.iter()
                        .position(|&t| t == self.cfg.eos_token_id)
                        .unwrap_or(0)
                }
            })
            .collect()
    }

    /// Token embeddings `[N, L, D]` (no position embedding) for ids `[N, L]`.
    pub fn embed_tokens(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let n = ids.len();
        let l = ids.first().map_or(0, |s| s.len());
        if ids.iter().any(|s| s.len() != l) {
            return Err(crate::error::invalid!("token sequences differ in length"));
        }
        if let Some(&bad) = ids
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.cfg.vocab_size)
        {
            return Err(crate::error::invalid!(
                "token id {bad} is outside the text model's vocabulary of {}",
                self.cfg.vocab_size
            ));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let dev = self.position_embedding.device();
        let t = Tensor::from_vec(flat, (n, l), dev)?;
        Ok(self.token_embedding.forward(&t)?)
    }

    /// `--precision` for the transformer blocks (see `encoder::Encoder::use_precision`).
    pub fn use_precision(&mut self, precision: super::kernels::Precision) -> Result<()> {
        self.encoder.use_precision(precision)
    }

    /// The plain pass from ids `[N, L]`: Hugging Face `get_text_features`.
    pub fn forward_ids(&self, ids: &[Vec<u32>], hooks: &Hooks) -> Result<TextOutput> {
        let x = self.embed_tokens(ids)?;
        self.forward_embeds(&x, &self.eot_positions(ids), hooks)
    }

    /// The pass from token embeddings `[N, L, D]` (learnable context already spliced in) with
    /// the pooling position of each sequence. Prompt tokens of `hooks` replace positions `1..=n`.
    pub fn forward_embeds(
        &self,
        tokens: &Tensor,
        eot: &[usize],
        hooks: &Hooks,
    ) -> Result<TextOutput> {
        let (n, l, _d) = tokens.dims3()?;
        if eot.len() != n {
            return Err(crate::error::invalid!(
                "{} EOT positions for {n} sequences",
                eot.len()
            ));
        }
        if l > self.cfg.max_position_embeddings {
            return Err(crate::error::invalid!(
                "{l} tokens exceed the context length {}",
                self.cfg.max_position_embeddings
            ));
        }
        if let Some(&bad) = eot.iter().find(|&&e| e >= l) {
            return Err(crate::error::invalid!(
                "EOT position {bad} is outside {l} tokens"
            ));
        }
        let widest_prompt = hooks
            .prompts
            .iter()
            .flatten()
            .map(|p| p.dim(p.rank() - 2))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let need = eot
            .iter()
            .max()
            .map_or(1, |m| m + 1)
            .max(1 + widest_prompt.into_iter().max().unwrap_or(0));
        let len = need.min(l);
        let x = tokens.narrow(1, 0, len)?;
        let x = x.broadcast_add(
            &self
                .position_embedding
                .narrow(0, 0, len)?
                .unsqueeze(0)?
                .to_dtype(x.dtype())?,
        )?;
        let mask = causal_mask(len, x.dtype(), x.device())?;
        let out = self
            .encoder
            .forward(&x, Some(&mask), hooks, PromptPlacement::AfterStart)?;
        let h = self.final_layer_norm.forward(&out.last)?;
        let rows = eot
            .iter()
            .enumerate()
            .map(|(i, &e)| h.i((i, e)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = self.projection.forward(&Tensor::stack(&rows, 0)?)?;
        Ok(TextOutput {
            pooled,
            taps: out.taps,
        })
    }
}

/// Additive causal mask `[L, L]`: 0 on and below the diagonal, -inf above.
fn causal_mask(len: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (len, len), dev)?.to_dtype(dtype)?)
}
