//! The options that pick a model and a method, shared by `detect` and `eval`.

use crate::choice::Choice;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};

use super::ModelArgs;
use crate::clip::{ClipTokenizer, LoadedModel};
use crate::method::config::JointScore;
use crate::method::{Adapter, DetectorConfig, Preset};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JointArg {
    /// the method's global score alone
    None,
    /// alpha · global + (1 − alpha) · max(map)
    Mean,
    /// global · max(map)
    Product,
    /// max(global, max(map))
    Max,
}

/// A CLIP model plus an adapter file or a preset, with run-time overrides.
#[derive(Debug, Args)]
pub struct DetectorArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter file (from `zsad train` or `zsad import-checkpoint`); it records its preset,
    /// image size, layers and switches
    #[arg(long, short = 'a', value_name = "A.safetensors")]
    pub adapter: Option<PathBuf>,
    /// Method when no adapter is given. Only zero-shot is meaningful untrained; the others run
    /// with freshly initialised (untrained) parameters, for timing and smoke tests
    #[arg(long, value_enum, default_value = "zero-shot")]
    pub preset: Preset,
    /// Seed of the untrained parameters of --preset without --adapter
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub init_seed: u64,
    /// Square input size of the model (default: the adapter's, else the backbone's; the papers
    /// run ViT-L/14-336 at 518)
    #[arg(long, value_name = "S")]
    pub image_size: Option<usize>,
    /// Object word in the prompts of methods that use one (default: the adapter's, `object`)
    #[arg(long, value_name = "NAME")]
    pub class_name: Option<String>,
    /// How map evidence is fused into the image score (default: the method's)
    #[arg(long, value_enum)]
    pub joint: Option<JointArg>,
    /// Weight of the global score in a `mean` joint score, from 0 to 1 (default 0.5, or the
    /// adapter's); refused when the joint score is not `mean`
    #[arg(
        long,
        value_name = "ALPHA",
        value_parser = super::flags::unit_interval,
        allow_negative_numbers = true
    )]
    pub joint_alpha: Option<f64>,
    /// tokenizer.json (default: the one beside the model, else the CLIP vocabulary built in)
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
}

impl DetectorArgs {
    /// Builds the detector configuration and the model it needs (activation per method).
    pub fn setup(&self, quiet: bool) -> anyhow::Result<(LoadedModel, Adapter)> {
        let args = self;
        let file_adapter = match &args.adapter {
            Some(p) => Some(
                Adapter::load(p).with_context(|| format!("cannot read adapter {}", p.display()))?,
            ),
            None => None,
        };
        let mut model_args = args.model.clone();
        if model_args.activation.is_none() {
            let act = match &file_adapter {
                Some(a) => a.config.activation,
                None => args.preset.activation(),
            };
            model_args.activation = act.map(Into::into);
        }
        let loaded = model_args.load()?;
        let clip = &loaded.model.config;
        let mut adapter = match file_adapter {
            Some(a) => a,
            None => {
                let cfg = DetectorConfig::preset(args.preset, clip, &args.model.model);
                if args.preset != Preset::ZeroShot && !quiet {
                    eprintln!(
                        "zsad: warning: --preset {} without --adapter runs untrained parameters (seed {}); train one with `zsad train` or import a published checkpoint",
                        args.preset.name(),
                        args.init_seed
                    );
                }
                Adapter::init(cfg, clip, args.init_seed)?
            }
        };
        let cfg = &mut adapter.config;
        if let Some(s) = args.image_size {
            let p = clip.vision_config.patch_size;
            let max = crate::clip::config::MAX_INPUT_SIZE.max(clip.vision_config.image_size);
            if s < p || s > max {
                anyhow::bail!("--image-size {s} is outside {p}..={max} (one {p} px patch to the largest input this backbone takes)");
            }
            if s % p != 0 {
                anyhow::bail!(
                    "--image-size {s} is not a multiple of the model's {p} px patch (the last partial patch would be dropped); use {} or {}",
                    s / p * p,
                    (s / p + 1) * p
                );
            }
            cfg.image_size = s;
        }
        if let Some(c) = &args.class_name {
            if c.trim().is_empty() {
                anyhow::bail!("--class-name is empty: name the object, e.g. --class-name screw");
            }
            cfg.class_name = c.clone();
        }
        if let Some(j) = args.joint {
            cfg.joint = match j {
                JointArg::None => JointScore::None,
                JointArg::Mean => JointScore::Mean { alpha: 0.5 },
                JointArg::Product => JointScore::Product,
                JointArg::Max => JointScore::Max,
            };
        }
        if let Some(a) = args.joint_alpha {
            if !(0.0..=1.0).contains(&a) {
                anyhow::bail!("--joint-alpha {a}: must be in [0, 1]");
            }
            match &mut cfg.joint {
                JointScore::Mean { alpha } => *alpha = a,
                other => anyhow::bail!(
                    "--joint-alpha weighs the `mean` joint score, but this run's is {other:?}: add --joint mean, or drop --joint-alpha"
                ),
            }
        }
        adapter.check(clip).with_context(|| match &args.adapter {
            Some(p) => format!(
                "adapter {} does not fit model `{}`",
                p.display(),
                args.model.model
            ),
            None => format!(
                "preset {} on model `{}`",
                args.preset.name(),
                args.model.model
            ),
        })?;
        Ok((loaded, adapter))
    }
}

/// A detector ready to run, with what made it.
pub struct Built {
    pub loaded: LoadedModel,
    pub adapter: Adapter,
    pub detector: crate::method::Detector,
    /// `run.json`'s model side ([`DetectorArgs::run_settings`]).
    pub settings: serde_json::Value,
}

impl DetectorArgs {
    /// Loads the model, sets the detector up (text encoded once where it can be) and records
    /// its settings.
    pub fn build(&self, quiet: bool) -> anyhow::Result<Built> {
        let (loaded, adapter) = self.setup(quiet)?;
        let tok = tokenizer(&self.tokenizer, &loaded)?;
        let detector = crate::method::Detector::new(
            &loaded.model,
            &adapter,
            crate::method::TextInputs::build(&adapter.config, &tok)?,
        )
        .context("cannot set up the detector")?;
        let settings = self.run_settings(&loaded, &adapter)?;
        Ok(Built {
            loaded,
            adapter,
            detector,
            settings,
        })
    }

    /// What `run.json` records of the model, adapter, detector, tokenizer and precision (and
    /// what a reference bank's features are compared with).
    pub fn run_settings(
        &self,
        loaded: &LoadedModel,
        adapter: &Adapter,
    ) -> anyhow::Result<serde_json::Value> {
        let tok_path = tokenizer_path(&self.tokenizer, loaded);
        Ok(crate::batch::detect::model_settings(
            loaded,
            &self.model.model,
            self.adapter.as_deref(),
            adapter,
            self.init_seed,
            tok_path.as_deref(),
            &format!("{:?}", self.model.precision).to_lowercase(),
        )?)
    }
}

/// The tokenizer file in use: `--tokenizer`, else `tokenizer.json` beside the model.
pub fn tokenizer_path(flag: &Option<PathBuf>, loaded: &LoadedModel) -> Option<PathBuf> {
    flag.clone().or_else(|| loaded.tokenizer.clone())
}

/// The tokenizer: `--tokenizer`, else `tokenizer.json` beside the model, else the CLIP
/// vocabulary compiled into the binary (every CLIP model shares it).
pub fn tokenizer(flag: &Option<PathBuf>, loaded: &LoadedModel) -> anyhow::Result<ClipTokenizer> {
    match flag.as_ref().or(loaded.tokenizer.as_ref()) {
        Some(path) => Ok(ClipTokenizer::from_file(path)?),
        None => Ok(ClipTokenizer::embedded()?),
    }
}
