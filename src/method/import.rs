//! Conversion of the published checkpoints into adapters: AdaCLIP's `torch.save` of selected
//! `state_dict` entries (caoyunkang/AdaCLIP@e27ee32 `method/trainer.py` l.89-98) and
//! AnomalyCLIP's `{"prompt_learner": state_dict}` (zqhang/AnomalyCLIP@45ed4dd `train.py`).
//!
//! What the tensors' shapes say (prompt depth and length, widths, number of tapped layers) is
//! read from them and checked against the backbone; what the checkpoint does not say (image
//! size, which layers, V-V start, class word) comes from [`ImportOptions`], defaulting to the
//! papers' settings, and is recorded in the adapter's configuration.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::adapter::Adapter;
use super::config::{
    papers_image_size, quarter_layers, DeepPrompts, DetectorConfig, Preset, TextPrompts, Tower,
};
use super::params::{AdapterParams, Init, ParamSource};
use crate::clip::ClipConfig;
use crate::{Error, Result};

crate::choice::choice_enum! {
    /// Which published checkpoint layout.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum CheckpointFormat {
        /// AdaCLIP `pretrained_*.pth`: a dict of `clip_model.*` tensors.
        Adaclip = "adaclip",
        /// AnomalyCLIP `epoch_*.pth`: `{"prompt_learner": state_dict}`.
        Anomalyclip = "anomalyclip",
    }
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
        Error::weights(self.path.display().to_string(), message)
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

/// The checkpoint's tensors handed to the adapter's name tree: each of our names is looked up
/// under its published name (`key`), checked against the shape the configuration needs
/// (leading 1-dimensions, as in AnomalyCLIP's `[1, 1, n, width]` context, are dropped), and
/// kept under our name.
struct Renamed<'a, 'p> {
    src: &'a mut Source<'p>,
    key: fn(&str) -> Option<String>,
    out: HashMap<String, Tensor>,
}

impl ParamSource for Renamed<'_, '_> {
    fn get(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Tensor> {
        let key = (self.key)(name).ok_or_else(|| {
            self.src
                .error(format!("the format has no tensor for `{name}`"))
        })?;
        let t = self.src.take(&key)?;
        let dims = t.dims();
        let extra = dims.len().saturating_sub(shape.len());
        let fits = &dims[extra..] == shape && dims[..extra].iter().all(|&d| d == 1);
        if !fits {
            return Err(self.src.error(format!(
                "`{key}` has shape {dims:?}, the backbone needs {shape:?}"
            )));
        }
        let t = t.reshape(shape)?;
        self.out.insert(name.to_string(), t.clone());
        Ok(t)
    }
}

/// AdaCLIP's module names for ours (`clip_model.` stripped): the prompters, the per-layer patch
/// projections and the generators of caoyunkang/AdaCLIP@e27ee32 method/adaclip.py.
fn adaclip_key(name: &str) -> Option<String> {
    const RENAMES: [(&str, &str); 6] = [
        ("vision.deep.", "visual_prompter.static_prompts."),
        ("text.deep.", "text_prompter.static_prompts."),
        ("vision.patch_proj.", "patch_token_layer.head."),
        ("vision.cls_proj.", "cls_token_layer.head.0."),
        ("vision.dynamic.", "dynamic_visual_prompt_generator.head."),
        ("text.dynamic.", "dynamic_text_prompt_generator.head."),
    ];
    RENAMES
        .iter()
        .find_map(|(ours, theirs)| Some(format!("{theirs}{}", name.strip_prefix(ours)?)))
}

/// AnomalyCLIP's prompt-learner names for ours: `ctx_pos`/`ctx_neg` are the contexts of the
/// normal and the damaged sentence, and `compound_prompts_text.{k}` enters text layer `k + 1`
/// (zqhang/AnomalyCLIP@45ed4dd AnomalyCLIP_lib/AnomalyCLIP.py l.237-251).
fn anomalyclip_key(name: &str) -> Option<String> {
    match name {
        "text.ctx_normal" => Some("ctx_pos".into()),
        "text.ctx_abnormal" => Some("ctx_neg".into()),
        _ => {
            let layer: usize = name.strip_prefix("text.deep.")?.parse().ok()?;
            Some(format!("compound_prompts_text.{}", layer.checked_sub(1)?))
        }
    }
}

/// Runs the adapter's name tree for `cfg` over the checkpoint; what the tree does not ask for
/// stays in `src` (the leftovers). The configuration read from the checkpoint's shapes is checked
/// against the backbone first, so a checkpoint for another backbone is named by its depths (the
/// clearest difference) rather than by the first tensor whose width differs.
fn convert(
    src: &mut Source,
    key: fn(&str) -> Option<String>,
    cfg: &DetectorConfig,
    clip: &ClipConfig,
) -> Result<HashMap<String, Tensor>> {
    cfg.validate(clip).map_err(|e| src.error(e.to_string()))?;
    let mut renamed = Renamed {
        src,
        key,
        out: HashMap::new(),
    };
    AdapterParams::load(cfg, clip, &mut renamed)?;
    Ok(renamed.out)
}

type Tensors = (HashMap<String, Tensor>, HashMap<String, String>);

/// The checkpoint's tensors as f32, and those it lists but that cannot be read.
fn read(path: &Path, key: Option<&str>) -> Result<Tensors> {
    let bad = |m: String| Error::weights(path.display().to_string(), m);
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
        backbone: None,
    };
    adapter
        .check(clip)
        .map_err(|e| Error::weights(path.display().to_string(), e.to_string()))?;
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
    cfg.visual_prompts = DeepPrompts::for_tower(Tower::Vision, vis_depth, vis_len, true);
    cfg.text_prompts = DeepPrompts::for_tower(Tower::Text, txt_depth, txt_len, true);
    // Text prompt 0 is never used by AdaCLIP's forward (layer 0 is not prompted).
    let dead = "text_prompter.static_prompts.0";
    let had_dead = src.tensors.remove(dead).is_some();
    let out = convert(&mut src, adaclip_key, &cfg, clip)?;
    let mut ignored = src.leftovers();
    if had_dead {
        ignored.insert(0, format!("{dead} (unused by the forward)"));
    }
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
    // `ctx_pos` is `[1, 1, n_ctx, width]`.
    let n_ctx = match src.tensors.get("ctx_pos").map(|t| t.dims().to_vec()) {
        Some(d) if d.len() >= 2 && d[..d.len() - 2].iter().all(|&x| x == 1) => d[d.len() - 2],
        Some(d) => {
            return Err(src.error(format!(
                "`ctx_pos` has shape {d:?}, expected [1, 1, n, width]"
            )))
        }
        None => return Err(src.error("missing tensor `ctx_pos`".into())),
    };
    let deep = src.count("compound_prompts_text.", "");
    let mut cfg = DetectorConfig::preset(Preset::Anomalyclip, clip, backbone);
    cfg.text = TextPrompts::Learned {
        context_length: n_ctx,
    };
    cfg.text_prompts = if deep > 0 {
        let len = src.prompt_rows("compound_prompts_text.0")?;
        DeepPrompts::for_tower(Tower::Text, deep + 1, len, false)
    } else {
        None
    };
    if let Some(l) = &opts.layers {
        cfg.layers = l.clone();
    }
    if let Some(v) = opts.vv_from {
        cfg.vv_from = if v == 0 { None } else { Some(v) };
    }
    let out = convert(&mut src, anomalyclip_key, &cfg, clip)?;
    // The projections are never used in AnomalyCLIP's forward; the buffers are token
    // embeddings of the fixed words, recomputed from the backbone.
    Ok((cfg, out, src.leftovers()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_names() {
        assert_eq!(
            adaclip_key("vision.cls_proj.weight").as_deref(),
            Some("cls_token_layer.head.0.weight")
        );
        assert_eq!(
            adaclip_key("text.dynamic.3.bias").as_deref(),
            Some("dynamic_text_prompt_generator.head.3.bias")
        );
        assert_eq!(adaclip_key("vision.head_weights"), None);
        assert_eq!(
            anomalyclip_key("text.deep.1").as_deref(),
            Some("compound_prompts_text.0")
        );
        assert_eq!(anomalyclip_key("text.deep.0"), None);
        assert_eq!(
            anomalyclip_key("text.ctx_abnormal").as_deref(),
            Some("ctx_neg")
        );
    }
}
