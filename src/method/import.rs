//! Conversion of the published checkpoints into adapters (SPEC §7).
//!
//! What the tensors' shapes say (prompt depth and length, widths, number of tapped layers) is
//! read from them and checked against the backbone; what the checkpoint does not say (image
//! size, which layers, V-V start, class word) comes from [`ImportOptions`], defaulting to the
//! papers' settings, and is recorded in the adapter's configuration.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::adapter::Adapter;
use super::config::{papers_image_size, quarter_layers, DetectorConfig, Preset, TextPrompts};
use crate::clip::ClipConfig;
use crate::{Error, Result};

/// Which published checkpoint layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckpointFormat {
    /// AdaCLIP `pretrained_*.pth`: a dict of `clip_model.*` tensors.
    Adaclip,
    /// AnomalyCLIP `epoch_*.pth`: `{"prompt_learner": state_dict}`.
    Anomalyclip,
}

/// Settings the checkpoint cannot tell (`None`: the paper's default for the backbone).
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub image_size: Option<usize>,
    pub layers: Option<Vec<usize>>,
    pub vv_from: Option<usize>,
    pub class_name: Option<String>,
}

struct Source<'a> {
    path: &'a Path,
    tensors: HashMap<String, Tensor>,
    /// Tensors the archive lists but that cannot be read (unsupported dtype or layout), with
    /// why: an error if the conversion needs them, ignored otherwise.
    unreadable: HashMap<String, String>,
}

impl Source<'_> {
    fn error(&self, message: String) -> Error {
        Error::Weights {
            file: self.path.display().to_string(),
            message,
        }
    }

    fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| match self.unreadable.get(name) {
                Some(why) => self.error(format!("tensor `{name}`: {why}")),
                None => self.error(format!("missing tensor `{name}`")),
            })
    }

    /// The token count of a prompt tensor `[len, width]`.
    fn prompt_rows(&self, name: &str) -> Result<usize> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| self.error(format!("missing tensor `{name}`")))?;
        match t.dims() {
            &[len, _] => Ok(len),
            d => Err(self.error(format!(
                "`{name}` has shape {d:?}, expected [tokens, width]"
            ))),
        }
    }

    /// What was read but not converted, and what could not be read, sorted.
    fn leftovers(self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.into_keys().collect();
        v.extend(
            self.unreadable
                .into_iter()
                .map(|(k, why)| format!("{k} (unreadable: {why})")),
        );
        v.sort();
        v
    }

    /// How many `{prefix}{i}{suffix}` exist for i = 0, 1, ... (contiguous).
    fn count(&self, prefix: &str, suffix: &str) -> usize {
        (0..)
            .take_while(|i| self.tensors.contains_key(&format!("{prefix}{i}{suffix}")))
            .count()
    }
}

type Tensors = (HashMap<String, Tensor>, HashMap<String, String>);

/// The checkpoint's tensors as f32, and those it lists but that cannot be read.
fn read(path: &Path, key: Option<&str>) -> Result<Tensors> {
    let bad = |m: String| Error::Weights {
        file: path.display().to_string(),
        message: m,
    };
    if !path.exists() {
        return Err(bad("no such file".into()));
    }
    let pth = crate::clip::pth::PthFile::open(path, key)?;
    if pth.names().is_empty() {
        return Err(bad(match key {
            Some(k) => format!("no tensors under `{k}` (is this the right --format?)"),
            None => "no tensors (is this the right --format?)".into(),
        }));
    }
    let unreadable = pth
        .names()
        .iter()
        .filter_map(|n| Some((n.clone(), pth.problem(n)?.to_string())))
        .collect();
    let tensors = pth
        .load_all()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(candle_core::DType::F32)?)))
        .collect::<Result<_>>()?;
    Ok((tensors, unreadable))
}

/// Reads a published checkpoint and returns the equivalent adapter for `clip`.
pub fn import_checkpoint(
    format: CheckpointFormat,
    path: &Path,
    clip: &ClipConfig,
    backbone: &str,
    opts: &ImportOptions,
) -> Result<Adapter> {
    let (mut cfg, tensors, ignored) = match format {
        CheckpointFormat::Adaclip => adaclip(path, clip, backbone, opts)?,
        CheckpointFormat::Anomalyclip => anomalyclip(path, clip, backbone, opts)?,
    };
    cfg.image_size = opts.image_size.unwrap_or_else(|| papers_image_size(clip));
    if let Some(c) = &opts.class_name {
        cfg.class_name = c.clone();
    }
    cfg.provenance = Some(serde_json::json!({
        "imported_from": path.display().to_string(),
        "format": match format {
            CheckpointFormat::Adaclip => "adaclip",
            CheckpointFormat::Anomalyclip => "anomalyclip",
        },
        "ignored_tensors": ignored,
    }));
    let adapter = Adapter {
        config: cfg,
        tensors,
    };
    adapter.check(clip).map_err(|e| Error::Weights {
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(adapter)
}

type Converted = (DetectorConfig, HashMap<String, Tensor>, Vec<String>);

fn adaclip(
    path: &Path,
    clip: &ClipConfig,
    backbone: &str,
    opts: &ImportOptions,
) -> Result<Converted> {
    let (raw, unreadable) = read(path, None)?;
    let strip = |k: String| k.strip_prefix("clip_model.").unwrap_or(&k).to_string();
    let tensors = raw.into_iter().map(|(k, v)| (strip(k), v)).collect();
    let unreadable = unreadable.into_iter().map(|(k, v)| (strip(k), v)).collect();
    let mut src = Source {
        path,
        tensors,
        unreadable,
    };
    let vis_depth = src.count("visual_prompter.static_prompts.", "");
    let txt_depth = src.count("text_prompter.static_prompts.", "");
    let n_layers = src.count("patch_token_layer.head.", ".weight");
    let n_dyn_vis = src.count("dynamic_visual_prompt_generator.head.", ".weight");
    let n_dyn_txt = src.count("dynamic_text_prompt_generator.head.", ".weight");
    if vis_depth == 0 || n_layers == 0 {
        return Err(src.error(
            "no `visual_prompter.static_prompts.*` or `patch_token_layer.head.*`: not an AdaCLIP checkpoint".into(),
        ));
    }
    let vis_len = src.prompt_rows("visual_prompter.static_prompts.0")?;
    let txt_len = if txt_depth > 0 {
        src.prompt_rows("text_prompter.static_prompts.0")?
    } else {
        0
    };
    let layers = match &opts.layers {
        Some(l) => l.clone(),
        None => quarter_layers(clip.vision_config.num_hidden_layers),
    };
    if layers.len() != n_layers {
        return Err(src.error(format!(
            "the checkpoint projects {n_layers} layers but {} are selected ({layers:?}); pass --layers",
            layers.len()
        )));
    }
    if n_dyn_vis != vis_len || n_dyn_txt != txt_len {
        return Err(src.error(format!(
            "{n_dyn_vis} visual / {n_dyn_txt} text dynamic generators for prompts of length {vis_len} / {txt_len}"
        )));
    }
    let mut cfg = DetectorConfig::preset(Preset::Adaclip, clip, backbone);
    cfg.layers = layers;
    cfg.visual_prompt_depth = vis_depth;
    cfg.visual_prompt_length = vis_len;
    cfg.text_prompt_depth = txt_depth;
    cfg.text_prompt_length = txt_len;

    let mut out = HashMap::new();
    for i in 0..vis_depth {
        out.insert(
            format!("vision.deep.{i}"),
            src.take(&format!("visual_prompter.static_prompts.{i}"))?,
        );
    }
    // Text prompt 0 is never used by AdaCLIP's forward (layer 0 is not prompted).
    for i in 0..txt_depth {
        let t = src.take(&format!("text_prompter.static_prompts.{i}"))?;
        if i > 0 {
            out.insert(format!("text.deep.{i}"), t);
        }
    }
    let mut linear = |src: &mut Source, from: &str, to: &str| -> Result<()> {
        out.insert(format!("{to}.weight"), src.take(&format!("{from}.weight"))?);
        out.insert(format!("{to}.bias"), src.take(&format!("{from}.bias"))?);
        Ok(())
    };
    for j in 0..n_layers {
        linear(
            &mut src,
            &format!("patch_token_layer.head.{j}"),
            &format!("vision.patch_proj.{j}"),
        )?;
    }
    linear(&mut src, "cls_token_layer.head.0", "vision.cls_proj")?;
    for k in 0..n_dyn_vis {
        linear(
            &mut src,
            &format!("dynamic_visual_prompt_generator.head.{k}"),
            &format!("vision.dynamic.{k}"),
        )?;
    }
    for k in 0..n_dyn_txt {
        linear(
            &mut src,
            &format!("dynamic_text_prompt_generator.head.{k}"),
            &format!("text.dynamic.{k}"),
        )?;
    }
    let mut ignored = src.leftovers();
    ignored.insert(
        0,
        "text_prompter.static_prompts.0 (unused by the forward)".into(),
    );
    Ok((cfg, out, ignored))
}

fn anomalyclip(
    path: &Path,
    clip: &ClipConfig,
    backbone: &str,
    opts: &ImportOptions,
) -> Result<Converted> {
    let (tensors, unreadable) = read(path, Some("prompt_learner"))?;
    let mut src = Source {
        path,
        tensors,
        unreadable,
    };
    let squeeze_ctx = |t: Tensor| -> Result<Tensor> {
        // [1, 1, n, Dt] -> [n, Dt]
        let d = t.dims().to_vec();
        let n = d.len();
        if n < 2 || d[..n - 2].iter().any(|&x| x != 1) {
            return Err(Error::InvalidArgument(format!(
                "context has shape {d:?}, expected [1, 1, n, width]"
            )));
        }
        Ok(t.reshape((d[n - 2], d[n - 1]))?)
    };
    let ctx_pos =
        squeeze_ctx(src.take("ctx_pos")?).map_err(|e| src.error(format!("`ctx_pos`: {e}")))?;
    let ctx_neg =
        squeeze_ctx(src.take("ctx_neg")?).map_err(|e| src.error(format!("`ctx_neg`: {e}")))?;
    let n_ctx = ctx_pos.dim(0)?;
    let deep = src.count("compound_prompts_text.", "");
    let mut cfg = DetectorConfig::preset(Preset::Anomalyclip, clip, backbone);
    cfg.text = TextPrompts::Learned {
        context_length: n_ctx,
    };
    cfg.text_prompt_depth = if deep > 0 { deep + 1 } else { 0 };
    cfg.text_prompt_length = if deep > 0 {
        src.prompt_rows("compound_prompts_text.0")?
    } else {
        0
    };
    if let Some(l) = &opts.layers {
        cfg.layers = l.clone();
    }
    if let Some(v) = opts.vv_from {
        cfg.vv_from = if v == 0 { None } else { Some(v) };
    }
    let mut out = HashMap::new();
    out.insert("text.ctx_normal".to_string(), ctx_pos);
    out.insert("text.ctx_abnormal".to_string(), ctx_neg);
    for k in 0..deep {
        out.insert(
            format!("text.deep.{}", k + 1),
            src.take(&format!("compound_prompts_text.{k}"))?,
        );
    }
    // The projections are never used in AnomalyCLIP's forward; the buffers are token
    // embeddings of the fixed words, recomputed from the backbone.
    Ok((cfg, out, src.leftovers()))
}
