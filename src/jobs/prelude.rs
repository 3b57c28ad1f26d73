//! What every job that runs a model does first, in the same order: its options checked, then
//! the model *planned* (where its files are, its architecture, the adapter or preset and
//! every override applied, the tokenizer read, the run's settings with the weights' SHA-256),
//! so that everything that needs no weights (the adapter, a reference bank or thresholds
//! against the model's identity, an output folder's earlier run) is checked before the
//! weights are read; then the model *built* ([`DetectorPlan::build`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::choice::{choice_enum, Choice};
use crate::clip::{Activation, ClipTokenizer, LoadedModel, ModelPlan, ModelSource};
use crate::error::{Error, MismatchError, OptionError, Result};
use crate::fsio::FileKind;
use crate::method::config::JointScore;
use crate::method::{Adapter, Detector, DetectorConfig, Preset, TextInputs};
use crate::progress::Console;

choice_enum! {
    /// Where the model runs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ComputeDevice {
        /// the CPU
        Cpu = "cpu",
        /// the first CUDA GPU (needs a build with `--features cuda`)
        Cuda = "cuda",
    }
}

// Written out: `#[default]` cannot pass through `choice_enum!`.
#[allow(clippy::derivable_impls)]
impl Default for ComputeDevice {
    fn default() -> Self {
        Self::Cpu
    }
}

choice_enum! {
    /// The tensor type of the whole backbone.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ModelDtype {
        /// 32-bit floats
        F32 = "f32",
        /// 16-bit floats (for CUDA)
        F16 = "f16",
        /// bfloat16 (for CUDA; on the CPU use the bf16 precision)
        Bf16 = "bf16",
    }
}

// Written out: `#[default]` cannot pass through `choice_enum!`.
#[allow(clippy::derivable_impls)]
impl Default for ModelDtype {
    fn default() -> Self {
        Self::F32
    }
}

choice_enum! {
    /// How the GEMMs multiply.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum GemmPrecision {
        /// f32 products
        F32 = "f32",
        /// bf16 operands with f32 accumulation (PyTorch's autocast)
        Bf16 = "bf16",
    }
}

// Written out: `#[default]` cannot pass through `choice_enum!`.
#[allow(clippy::derivable_impls)]
impl Default for GemmPrecision {
    fn default() -> Self {
        Self::F32
    }
}

choice_enum! {
    /// How map evidence is fused into the image score.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum JointChoice {
        /// the method's global score alone
        None = "none",
        /// alpha · global + (1 − alpha) · max(map)
        Mean = "mean",
        /// global · max(map)
        Product = "product",
        /// max(global, max(map))
        Max = "max",
    }
}

/// Which CLIP model and how to run it.
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// A folder, a weight file, a hub id (`org/name`) or `random:ARCH`.
    pub model: String,
    /// Overrides the MLP activation of the checkpoint's config.
    pub activation: Option<Activation>,
    pub dtype: ModelDtype,
    pub precision: GemmPrecision,
    pub device: ComputeDevice,
}

impl ModelOptions {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            ..Default::default()
        }
    }

    /// The combinations of device, dtype and precision that exist.
    pub fn check(&self) -> Result<()> {
        if self.model.trim().is_empty() {
            return Err(OptionError::rule(
                "`model` is empty: name a model folder, file, hub id or random:ARCH",
            ));
        }
        if self.dtype == ModelDtype::Bf16 && self.device == ComputeDevice::Cpu {
            return Err(OptionError::rule(
                "`dtype` bf16 needs `device` cuda: on the CPU use `precision` bf16 (bf16 GEMMs, the rest in f32)",
            ));
        }
        if self.precision == GemmPrecision::Bf16 && self.dtype != ModelDtype::F32 {
            return Err(OptionError::rule(
                "`precision` bf16 multiplies bf16 operands in an f32 model: drop `dtype` (or, on CUDA, use `dtype` bf16 alone for a model wholly in bf16)",
            ));
        }
        Ok(())
    }

    /// The device (a CUDA GPU is opened here: a build without CUDA fails now).
    pub fn device(&self) -> Result<Device> {
        match self.device {
            ComputeDevice::Cpu => Ok(Device::Cpu),
            ComputeDevice::Cuda => crate::device::cuda(0),
        }
    }

    fn dtype(&self) -> DType {
        match self.dtype {
            ModelDtype::F32 => DType::F32,
            ModelDtype::F16 => DType::F16,
            ModelDtype::Bf16 => DType::BF16,
        }
    }

    /// Where the model's files are and its architecture, without reading the weights.
    pub fn plan(&self, activation: Option<Activation>) -> Result<ModelPlan> {
        self.check()?;
        crate::clip::plan_model(&self.model, self.activation.or(activation))
            .map_err(|e| e.context(format!("cannot load model `{}`", self.model)))
    }

    /// Reads the weights of a planned model onto the device, in the precision asked for.
    pub fn build(&self, plan: ModelPlan) -> Result<LoadedModel> {
        let device = self.device()?;
        let mut loaded = plan
            .load(self.dtype(), &device)
            .map_err(|e| e.context(format!("cannot load model `{}`", self.model)))?;
        if self.precision == GemmPrecision::Bf16 {
            loaded.model.use_bf16()?;
        }
        Ok(loaded)
    }

    /// [`Self::plan`] and [`Self::build`] at once (commands that need the backbone only).
    pub fn load(&self) -> Result<LoadedModel> {
        self.build(self.plan(None)?)
    }
}

/// A CLIP model plus an adapter file or a preset, with run-time overrides: what `detect`,
/// `eval`, `calibrate`, `bench`, `train` and `reference build` run.
#[derive(Debug, Clone)]
pub struct DetectorOptions {
    pub model: ModelOptions,
    /// An adapter file (from `zsad train` or `zsad import-checkpoint`).
    pub adapter: Option<PathBuf>,
    /// The method when no adapter is given.
    pub preset: Preset,
    /// Seed of the untrained parameters of a preset without an adapter.
    pub init_seed: u64,
    /// Square input size (default: the adapter's, else the backbone's).
    pub image_size: Option<usize>,
    /// Object word in the prompts of methods that use one.
    pub class_name: Option<String>,
    pub joint: Option<JointChoice>,
    /// Weight of the global score in a `mean` joint score.
    pub joint_alpha: Option<f64>,
    /// `tokenizer.json` (default: the one beside the model, else the built-in vocabulary).
    pub tokenizer: Option<PathBuf>,
    /// Run an adapter trained on another backbone (warned, not refused).
    pub force_adapter: bool,
}

impl Default for DetectorOptions {
    fn default() -> Self {
        Self {
            model: ModelOptions::default(),
            adapter: None,
            preset: Preset::ZeroShot,
            init_seed: 0,
            image_size: None,
            class_name: None,
            joint: None,
            joint_alpha: None,
            tokenizer: None,
            force_adapter: false,
        }
    }
}

/// Why `size` cannot be the input size of a backbone with `patch` px patches that takes at
/// most `max` px: outside one patch to `max`, or not a multiple of the patch. The one check
/// of an image size, used by the options and by [`DetectorConfig::validate`].
pub use crate::method::config::image_size_problem;

/// A detector planned but not built: the checks that need no weights are done.
pub struct DetectorPlan {
    pub options: DetectorOptions,
    pub model: ModelPlan,
    pub adapter: Adapter,
    pub tokenizer: ClipTokenizer,
    pub tokenizer_path: Option<PathBuf>,
    /// `run.json`'s model side: the weights by content, the adapter, the detector
    /// configuration after every override, the tokenizer and the precision.
    pub settings: Value,
}

/// A detector ready to run, with what made it.
pub struct Built {
    pub loaded: LoadedModel,
    pub adapter: Adapter,
    pub detector: Detector,
    pub tokenizer: ClipTokenizer,
    pub settings: Value,
}

impl DetectorOptions {
    /// The options alone, before any file is read.
    pub fn check(&self) -> Result<()> {
        self.model.check()?;
        if let Some(c) = &self.class_name {
            if c.trim().is_empty() {
                return Err(OptionError::rule(
                    "`class_name` is empty: name the object, e.g. screw",
                ));
            }
        }
        if let Some(a) = self.joint_alpha {
            if !(0.0..=1.0).contains(&a) {
                return Err(OptionError::value("joint_alpha", a, "must be in [0, 1]"));
            }
        }
        if let Some(s) = self.image_size {
            if s == 0 {
                return Err(OptionError::value(
                    "image_size",
                    s,
                    "must be at least one patch",
                ));
            }
        }
        Ok(())
    }

    /// The adapter file, read and its format checked (before any model is looked at).
    pub fn read_adapter(&self) -> Result<Option<Adapter>> {
        match &self.adapter {
            Some(p) => Adapter::load(p)
                .map(Some)
                .map_err(|e| e.context(format!("cannot read adapter {}", p.display()))),
            None => Ok(None),
        }
    }

    /// Plans the detector: the adapter read and every override applied, the model planned
    /// (its activation per method), the adapter checked against the backbone (shapes, and the
    /// backbone it was trained on), the tokenizer read, and the run's settings.
    pub fn plan(&self, console: &Console) -> Result<DetectorPlan> {
        self.check()?;
        let file_adapter = self.read_adapter()?;
        let activation = match &file_adapter {
            Some(a) => a.config.activation,
            None => self.preset.activation(),
        };
        let model = self.model.plan(activation)?;
        let clip = &model.config;
        let mut adapter = match file_adapter {
            Some(a) => a,
            None => {
                let cfg = DetectorConfig::preset(self.preset, clip, &self.model.model);
                if self.preset != Preset::ZeroShot {
                    console.warn(&format!(
                        "`preset` {} without `adapter` runs untrained parameters (seed {}); train one with `zsad train` or import a published checkpoint",
                        self.preset.name(),
                        self.init_seed
                    ));
                }
                Adapter::init(cfg, clip, self.init_seed)?
            }
        };
        self.apply_overrides(&mut adapter.config, clip)?;
        adapter.check(clip).map_err(|e| {
            e.context(match &self.adapter {
                Some(p) => format!(
                    "adapter {} does not fit model `{}`",
                    p.display(),
                    self.model.model
                ),
                None => format!(
                    "preset {} on model `{}`",
                    self.preset.name(),
                    self.model.model
                ),
            })
        })?;
        let tokenizer_path = self
            .tokenizer
            .clone()
            .or_else(|| model.tokenizer().map(Path::to_path_buf));
        let tokenizer = match &tokenizer_path {
            Some(p) => ClipTokenizer::from_file(p)?,
            None => ClipTokenizer::embedded()?,
        };
        let settings = model_settings(
            &model,
            &self.model.model,
            self.adapter.as_deref(),
            &adapter,
            self.init_seed,
            tokenizer_path.as_deref(),
            self.model.precision.name(),
        )?;
        self.check_adapter_backbone(&adapter, &settings, console)?;
        Ok(DetectorPlan {
            options: self.clone(),
            model,
            adapter,
            tokenizer,
            tokenizer_path,
            settings,
        })
    }

    /// `image_size`, `class_name`, `joint` and `joint_alpha` over the adapter's configuration.
    fn apply_overrides(
        &self,
        cfg: &mut DetectorConfig,
        clip: &crate::clip::ClipConfig,
    ) -> Result<()> {
        if let Some(s) = self.image_size {
            let p = clip.vision_config.patch_size;
            let max = crate::clip::config::MAX_INPUT_SIZE.max(clip.vision_config.image_size);
            if let Some(problem) = image_size_problem(s, p, max) {
                return Err(OptionError::rule(format!("`image_size` {s} {problem}")));
            }
            cfg.image_size = s;
        }
        if let Some(c) = &self.class_name {
            cfg.class_name = c.clone();
        }
        if let Some(j) = self.joint {
            cfg.joint = match j {
                JointChoice::None => JointScore::None,
                JointChoice::Mean => JointScore::Mean { alpha: 0.5 },
                JointChoice::Product => JointScore::Product,
                JointChoice::Max => JointScore::Max,
            };
        }
        if let Some(a) = self.joint_alpha {
            match &mut cfg.joint {
                JointScore::Mean { alpha } => *alpha = a,
                other => {
                    return Err(OptionError::rule(format!(
                        "`joint_alpha` weighs the `mean` joint score, but this run's is {other:?}: set `joint` mean, or drop `joint_alpha`"
                    )))
                }
            }
        }
        Ok(())
    }

    /// An adapter runs only on the backbone it was trained (or imported) on, unless
    /// `force_adapter`: the same widths with other weights give confident nonsense.
    fn check_adapter_backbone(
        &self,
        adapter: &Adapter,
        settings: &Value,
        console: &Console,
    ) -> Result<()> {
        let (Some(path), Some(trained)) = (&self.adapter, &adapter.backbone) else {
            return Ok(());
        };
        let now = crate::method::adapter::backbone_identity(&settings["model"]);
        let differences = crate::settings::described_differences(trained, &now, "trained", "run");
        if differences.is_empty() {
            return Ok(());
        }
        let e = Error::Mismatch(MismatchError {
            what: "adapter",
            file: path.clone(),
            verb: "was trained",
            differences,
            remedy: format!(
                "run it with the backbone it was trained on (not `{}`), or set `force_adapter`",
                self.model.model
            ),
        });
        if self.force_adapter {
            console.warn(&format!("`force_adapter`: {e}"));
            Ok(())
        } else {
            Err(e)
        }
    }
}

impl DetectorPlan {
    /// Reads the weights and sets the detector up (text encoded once where it can be).
    pub fn build(self) -> Result<Built> {
        let loaded = self.options.model.build(self.model)?;
        let detector = Detector::new(
            &loaded.model,
            &self.adapter,
            TextInputs::build(&self.adapter.config, &self.tokenizer)?,
        )
        .map_err(|e| e.context("cannot set up the detector"))?;
        Ok(Built {
            loaded,
            adapter: self.adapter,
            detector,
            tokenizer: self.tokenizer,
            settings: self.settings,
        })
    }

    /// The weights alone, with the adapter (training builds its own detector per class).
    pub fn build_model(self) -> Result<(LoadedModel, Adapter, ClipTokenizer, Value)> {
        let loaded = self.options.model.build(self.model)?;
        Ok((loaded, self.adapter, self.tokenizer, self.settings))
    }
}

/// `run.json`'s `model`: the random architecture and seed, or each file (config and weights)
/// with its size and SHA-256, and the spec as given (shown, not compared).
pub fn model_identity(plan: &ModelPlan, spec: &str) -> Result<Value> {
    Ok(match &plan.source {
        ModelSource::Random { arch, seed } => json!({"spec": spec, "random": arch, "seed": seed}),
        ModelSource::Files {
            config, weights, ..
        } => {
            let mut files = Vec::new();
            if let Some(p) = config {
                files.push(crate::data::run_record::file_entry(
                    p,
                    FileKind::ModelConfig,
                )?);
            }
            for p in weights {
                files.push(crate::data::run_record::file_entry(p, FileKind::Weights)?);
            }
            json!({"spec": spec, "files": files})
        }
    })
}

/// The settings of the model side for `run.json`: the weights by content, the adapter (file by
/// content, or preset and seed), the detector's configuration after every override.
pub fn model_settings(
    plan: &ModelPlan,
    spec: &str,
    adapter_file: Option<&Path>,
    adapter: &Adapter,
    init_seed: u64,
    tokenizer: Option<&Path>,
    precision: &str,
) -> Result<Value> {
    let model = model_identity(plan, spec)?;
    let adapter_v = match adapter_file {
        Some(p) => {
            json!({"path": p.display().to_string(), "sha256": crate::fsio::sha256(p, FileKind::Tensors)?})
        }
        None => json!({"untrained_preset_seed": init_seed}),
    };
    let tok = match tokenizer {
        Some(p) => {
            json!({"path": p.display().to_string(), "sha256": crate::fsio::sha256(p, FileKind::Tokenizer)?})
        }
        None => json!("embedded"),
    };
    Ok(json!({
        "model": model,
        "clip": serde_json::to_value(&plan.config).unwrap_or(Value::Null),
        "adapter": adapter_v,
        "detector": serde_json::to_value(&adapter.config).unwrap_or(Value::Null),
        "tokenizer": tok,
        "precision": precision,
    }))
}

/// What every run's `run.json` `info` holds: the command, the working folder (relative input
/// paths are read from there again by `merge` and `report`), threads, device, GEMM and start.
pub fn run_info(
    command: Vec<String>,
    batch_size: usize,
    device: ComputeDevice,
    gemm: &str,
) -> Value {
    json!({
        "command": command,
        "batch_size": batch_size,
        "threads": rayon::current_num_threads(),
        "device": device.name(),
        "gemm": gemm,
        "cwd": std::env::current_dir().ok().map(|d| d.display().to_string()),
        "started_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}
