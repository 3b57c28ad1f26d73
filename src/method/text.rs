//! The text side of every method: normal/abnormal embeddings `T = [t_n, t_a]` from hand-made
//! ensembles (AdaCLIP, WinCLIP) or learned context (AnomalyCLIP), with optional deep prompts
//! (static, plus an image-conditioned dynamic part as in AdaCLIP).

use candle_core::{DType, IndexOp, Tensor, D};

use super::config::{DetectorConfig, Templates, TextPrompts};
use super::prompts::{self, ABNORMAL_STATES, ADACLIP_TEMPLATES, NORMAL_STATES, WINCLIP_TEMPLATES};
use crate::clip::tokenizer::{ClipTokenizer, EOT, SOT};
use crate::clip::{Hooks, TextTransformer};
use crate::Result;

/// The token inputs of a run; they depend on the configuration and the class word only.
#[derive(Debug, Clone, PartialEq)]
pub enum TextInputs {
    /// Token ids (77 each) of the normal and abnormal sentences.
    Ensemble {
        normal: Vec<Vec<u32>>,
        abnormal: Vec<Vec<u32>>,
    },
    /// BPE ids after the learned context: `object .` and `damaged object .`.
    Learned {
        normal_suffix: Vec<u32>,
        abnormal_suffix: Vec<u32>,
    },
}

impl TextInputs {
    pub fn build(cfg: &DetectorConfig, tok: &ClipTokenizer) -> Result<Self> {
        let object = &cfg.class_name;
        Ok(match cfg.text {
            TextPrompts::Ensemble { templates } => {
                let t = match templates {
                    Templates::Adaclip => ADACLIP_TEMPLATES,
                    Templates::Winclip => WINCLIP_TEMPLATES,
                };
                Self::Ensemble {
                    normal: tok.encode_batch(&prompts::sentences(NORMAL_STATES, t, object))?,
                    abnormal: tok.encode_batch(&prompts::sentences(ABNORMAL_STATES, t, object))?,
                }
            }
            TextPrompts::Learned { .. } => Self::Learned {
                normal_suffix: tok.bpe(&format!("{object}."))?,
                abnormal_suffix: tok.bpe(&format!("damaged {object}."))?,
            },
        })
    }
}

/// Rounds to fp16 and back (AdaCLIP's `.half()` on prompt tokens).
pub(crate) fn round_f16(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F16)?.to_dtype(t.dtype())?)
}

/// L2-normalises the last dimension, in f32 at least (in f16 a sum of squares overflows once a
/// vector is longer than 256); the result is in `t`'s dtype.
pub(crate) fn normalize(t: &Tensor) -> Result<Tensor> {
    if crate::clip::kernels::applies(t) {
        return Ok(crate::clip::kernels::l2_normalize_last(t)?);
    }
    let w = t.to_dtype(crate::clip::wide(t.dtype()))?;
    let n = w.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(w.broadcast_div(&n)?.to_dtype(t.dtype())?)
}

/// Encodes `T` for the text tower with learned tensors looked up by `param`.
pub struct TextSide {
    inputs: TextInputs,
    /// Token embeddings of the ensemble sentences `[N, L, Dt]` and their EOT positions, or of
    /// the two learned sequences (context rows are substituted at encode time).
    embeds: Tensor,
    eot: Vec<usize>,
    n_normal: usize,
    context_length: usize,
}

impl TextSide {
    pub fn new(cfg: &DetectorConfig, inputs: TextInputs, text: &TextTransformer) -> Result<Self> {
        let ctx_len = text.context_length();
        match &inputs {
            TextInputs::Ensemble { normal, abnormal } => {
                let ids: Vec<Vec<u32>> = normal.iter().chain(abnormal).cloned().collect();
                let eot = text.eot_positions(&ids);
                let embeds = text.embed_tokens(&ids)?;
                Ok(Self {
                    n_normal: normal.len(),
                    inputs,
                    embeds,
                    eot,
                    context_length: 0,
                })
            }
            TextInputs::Learned {
                normal_suffix,
                abnormal_suffix,
            } => {
                let TextPrompts::Learned { context_length: n } = cfg.text else {
                    return Err(crate::Error::adapter(
                        "learned text inputs need learned text prompts in the config",
                    ));
                };
                let mut ids = Vec::new();
                let mut eot = Vec::new();
                for suffix in [normal_suffix, abnormal_suffix] {
                    // [SOT] + n placeholders (replaced by the context) + suffix + [EOT], padded.
                    let mut seq = vec![SOT];
                    seq.extend(std::iter::repeat_n(0u32, n));
                    seq.extend(suffix);
                    seq.push(EOT);
                    if seq.len() > ctx_len {
                        return Err(crate::Error::adapter(format!(
                            "{n} context tokens + the class words exceed {ctx_len} tokens"
                        )));
                    }
                    eot.push(seq.len() - 1);
                    seq.resize(ctx_len, 0);
                    ids.push(seq);
                }
                let embeds = text.embed_tokens(&ids)?;
                Ok(Self {
                    n_normal: 1,
                    inputs,
                    embeds,
                    eot,
                    context_length: n,
                })
            }
        }
    }

    pub fn inputs(&self) -> &TextInputs {
        &self.inputs
    }

    /// `T` as `[2, E]`, rows normalised. `deep[i]` (i ≥ 1) are the prompt tokens entering text
    /// layer `i`; `ctx` the learned context `(normal, abnormal)` `[n, Dt]`.
    pub fn encode(
        &self,
        text: &TextTransformer,
        deep: &[Option<Tensor>],
        ctx: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let hooks = Hooks {
            prompts: deep,
            ..Default::default()
        };
        match &self.inputs {
            TextInputs::Ensemble { .. } => {
                let pooled =
                    normalize(&text.forward_embeds(&self.embeds, &self.eot, &hooks)?.pooled)?;
                let n = self.n_normal;
                let total = pooled.dim(0)?;
                let group = |start: usize, len: usize| -> Result<Tensor> {
                    normalize(&pooled.narrow(0, start, len)?.mean_keepdim(0)?)
                };
                Ok(Tensor::cat(&[group(0, n)?, group(n, total - n)?], 0)?)
            }
            TextInputs::Learned { .. } => {
                let (cn, ca) = ctx.ok_or_else(|| {
                    crate::Error::adapter("learned text prompts need their context tensors")
                })?;
                let n = self.context_length;
                let rows = [(0usize, cn), (1, ca)]
                    .into_iter()
                    .map(|(i, c)| {
                        let e = self.embeds.i(i)?; // [L, Dt]
                        let l = e.dim(0)?;
                        Ok(Tensor::cat(
                            &[
                                &e.narrow(0, 0, 1)?,
                                &c.to_dtype(e.dtype())?,
                                &e.narrow(0, 1 + n, l - 1 - n)?,
                            ],
                            0,
                        )?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let tokens = Tensor::stack(&rows, 0)?;
                normalize(&text.forward_embeds(&tokens, &self.eot, &hooks)?.pooled)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::{load_model, LoadOptions};
    use crate::method::config::{DetectorConfig, Preset};
    use candle_core::Device;

    /// `[SOT] + n context + suffix + [EOT]`: EOT lands right after the suffix; the context
    /// enters at positions 1..=n and changes the output, padding after EOT does not.
    #[test]
    fn learned_prompt_positions() {
        let m = load_model("random:tiny", &LoadOptions::default())
            .unwrap()
            .model;
        let mut cfg = DetectorConfig::preset(Preset::Anomalyclip, &m.config, "random:tiny");
        cfg.text = TextPrompts::Learned { context_length: 3 };
        let inputs = TextInputs::Learned {
            normal_suffix: vec![5, 6],
            abnormal_suffix: vec![7, 5, 6],
        };
        let side = TextSide::new(&cfg, inputs, &m.text).unwrap();
        assert_eq!(side.eot, vec![6, 7]);
        let ids = m
            .text
            .embed_tokens(&[vec![SOT, 0, 0, 0, 5, 6, EOT]])
            .unwrap();
        // Placeholders are substituted, the rest is the tokens' own embedding.
        let e = side.embeds.i(0).unwrap().narrow(0, 0, 7).unwrap();
        let diff = (e - ids.i(0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);

        let dt = m.config.text_config.hidden_size;
        // Not constant rows: LayerNorm would remove a constant.
        let ctx = |seed: u64| {
            let v = crate::rng::SplitMix64(seed).normal(3 * dt, 1.0);
            Tensor::from_vec(v, (3, dt), &Device::Cpu).unwrap()
        };
        let t1 = side.encode(&m.text, &[], Some((&ctx(1), &ctx(2)))).unwrap();
        let t2 = side.encode(&m.text, &[], Some((&ctx(3), &ctx(2)))).unwrap();
        assert_eq!(t1.dims(), &[2, m.config.projection_dim]);
        let d = (&t1 - &t2).unwrap().abs().unwrap();
        let row = |i: usize| {
            d.i(i)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(row(0) > 1e-4, "normal context changes t_n");
        assert_eq!(
            row(1),
            0.0,
            "abnormal sentence is independent of the normal context"
        );
        // Unit rows.
        let n = t1.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(n.iter().all(|v| (v - 1.0).abs() < 1e-5));
    }

    /// Ensemble: rows are normalised means of normalised sentence embeddings, normal first.
    #[test]
    fn ensemble_groups_normal_then_abnormal() {
        let m = load_model("random:tiny", &LoadOptions::default())
            .unwrap()
            .model;
        let cfg = DetectorConfig::preset(Preset::ZeroShot, &m.config, "random:tiny");
        let seq = |w: u32| {
            let mut s = vec![SOT, w, EOT];
            s.resize(77, 0);
            s
        };
        let inputs = TextInputs::Ensemble {
            normal: vec![seq(10), seq(11)],
            abnormal: vec![seq(12)],
        };
        let side = TextSide::new(&cfg, inputs, &m.text).unwrap();
        let t = side.encode(&m.text, &[], None).unwrap();
        let f = normalize(&m.text_features(&[seq(10), seq(11), seq(12)]).unwrap()).unwrap();
        let want_n = normalize(&f.narrow(0, 0, 2).unwrap().mean_keepdim(0).unwrap()).unwrap();
        let want_a = f.narrow(0, 2, 1).unwrap();
        let want = Tensor::cat(&[want_n, want_a], 0).unwrap();
        let err = (t - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
