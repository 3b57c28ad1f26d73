//! The flag groups that several commands share, each turned into the library options it stands
//! for: the model, the detector (model plus adapter or preset and overrides), references, the
//! files written per input, and the report page. Advanced flags are left out of `-h` (`--help`
//! lists them all).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::clip::{Activation, PosInterpolation};
use crate::data::heatmap::{HeatmapKind, HeatmapScale};
use crate::data::image::DecodeLimits;
use crate::data::outputs::MapFormat;
use crate::jobs::prelude::{
    ComputeDevice, DetectorOptions, GemmPrecision, JointChoice, ModelDtype, ModelOptions,
};
use crate::jobs::reference::ReferenceOptions;
use crate::jobs::render::OutputOptions;
use crate::method::Preset;
use crate::report::ReportOptions;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ActivationArg {
    /// x·σ(1.702x), OpenAI's training activation (AnomalyCLIP)
    QuickGelu,
    /// exact erf GELU (AdaCLIP, April-GAN run OpenAI weights this way)
    Gelu,
}

impl From<ActivationArg> for Activation {
    fn from(a: ActivationArg) -> Self {
        match a {
            ActivationArg::QuickGelu => Activation::QuickGelu,
            ActivationArg::Gelu => Activation::Gelu,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PosInterpArg {
    /// PyTorch bicubic, A = -0.75 (AdaCLIP, Hugging Face)
    Bicubic,
    /// PyTorch bilinear (AnomalyCLIP)
    Bilinear,
}

impl From<PosInterpArg> for PosInterpolation {
    fn from(a: PosInterpArg) -> Self {
        match a {
            PosInterpArg::Bicubic => PosInterpolation::Bicubic,
            PosInterpArg::Bilinear => PosInterpolation::Bilinear,
        }
    }
}

/// Options that pick and load a CLIP model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// CLIP model: folder, weight file, hub id (org/name) or random:ARCH (see --help)
    #[arg(long, short = 'm', value_name = "M")]
    pub model: Option<String>,
    /// Override the MLP activation of the checkpoint's config
    #[arg(long, value_enum, hide_short_help = true)]
    pub activation: Option<ActivationArg>,
    /// Tensor type of the whole backbone (f16/bf16: for CUDA; on the CPU use --precision)
    #[arg(long, value_enum, default_value = "f32", hide_short_help = true)]
    pub dtype: ModelDtype,
    /// GEMM precision: bf16 multiplies bf16 operands with f32 accumulation
    ///
    /// As PyTorch's autocast does, on the CPU's AMX or AVX512-BF16 unit (weights packed once,
    /// half the memory); everything else stays f32. A CPU without them computes the same
    /// numbers at f32 speed (`zsad info` says which GEMM runs). On CUDA: the GPU's bf16 units
    /// through cuBLAS, the rest in f32 (--dtype bf16 runs the whole model in bf16)
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: GemmPrecision,
    /// Where to run the model
    #[arg(long, value_enum, default_value = "cpu", hide_short_help = true)]
    pub device: ComputeDevice,
}

impl ModelArgs {
    pub fn options(&self) -> ModelOptions {
        ModelOptions {
            model: self.model.clone().unwrap_or_default(),
            activation: self.activation.map(Into::into),
            dtype: self.dtype,
            precision: self.precision,
            device: self.device,
        }
    }
}

/// A CLIP model plus an adapter file or a preset, with run-time overrides.
#[derive(Debug, Args)]
pub struct DetectorArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter file (from `zsad train` or `zsad import-checkpoint`)
    ///
    /// It records its preset, image size, layers and switches, and the backbone it was
    /// trained on: another backbone is refused (--force-adapter runs it anyway).
    #[arg(long, short = 'a', value_name = "A.safetensors")]
    pub adapter: Option<PathBuf>,
    /// Run --adapter although it was trained on another backbone (warned)
    #[arg(long, requires = "adapter", hide_short_help = true)]
    pub force_adapter: bool,
    /// Method when no adapter is given
    ///
    /// Only zero-shot is meaningful untrained; the others run with freshly initialised
    /// (untrained) parameters, for timing and smoke tests.
    #[arg(long, value_enum, default_value = "zero-shot")]
    pub preset: Preset,
    /// Seed of the untrained parameters of --preset without --adapter
    #[arg(long, default_value_t = 0, value_name = "N", hide_short_help = true)]
    pub init_seed: u64,
    /// Square input size of the model (default: the adapter's, else the backbone's)
    ///
    /// The papers run ViT-L/14-336 at 518.
    #[arg(long, value_name = "S")]
    pub image_size: Option<usize>,
    /// Object word in the prompts of methods that use one (default: the adapter's, `object`)
    #[arg(long, value_name = "NAME", hide_short_help = true)]
    pub class_name: Option<String>,
    /// How map evidence is fused into the image score (default: the method's)
    #[arg(long, value_enum, hide_short_help = true)]
    pub joint: Option<JointChoice>,
    /// Weight of the global score in a `mean` joint score, from 0 to 1
    ///
    /// Default 0.5, or the adapter's; refused when the joint score is not `mean`.
    #[arg(
        long,
        value_name = "ALPHA",
        value_parser = super::flags::unit_interval,
        allow_negative_numbers = true,
        hide_short_help = true
    )]
    pub joint_alpha: Option<f64>,
    /// tokenizer.json (default: the one beside the model, else the CLIP vocabulary built in)
    #[arg(long, value_name = "FILE", hide_short_help = true)]
    pub tokenizer: Option<PathBuf>,
}

impl DetectorArgs {
    pub fn options(&self) -> DetectorOptions {
        DetectorOptions {
            model: self.model.options(),
            adapter: self.adapter.clone(),
            preset: self.preset,
            init_seed: self.init_seed,
            image_size: self.image_size,
            class_name: self.class_name.clone(),
            joint: self.joint,
            joint_alpha: self.joint_alpha,
            tokenizer: self.tokenizer.clone(),
            force_adapter: self.force_adapter,
        }
    }
}

/// How a run uses normal images of the product.
#[derive(Debug, Clone, Args)]
pub struct ReferenceArgs {
    /// Normal images of the product (files or folders), or a bank from `zsad reference build`
    ///
    /// Each test patch is also compared with their patches, and its distance to the nearest
    /// one is fused into the map. Several paths may follow one --reference (end its list with
    /// --, or repeat --reference per path).
    #[arg(long, value_name = "PATH", num_args = 1.., action = clap::ArgAction::Append)]
    pub reference: Vec<String>,
    /// Weight w of the reference map: map = (1 - w) * method + w * reference (default 0.5)
    #[arg(
        long,
        value_name = "W",
        value_parser = super::flags::unit_interval,
        allow_negative_numbers = true,
        hide_short_help = true
    )]
    pub reference_weight: Option<f64>,
    /// The reference map alone, no text: the score is the map's peak
    ///
    /// A nearest-neighbour detector on the method's CLIP features, as PatchCore on CLIP.
    #[arg(long, hide_short_help = true)]
    pub reference_only: bool,
    /// Most bank patches per layer when the bank is built from images (default 8192)
    ///
    /// More are cut to this many by PatchCore's greedy coreset.
    #[arg(long, value_name = "N", value_parser = super::flags::at_least(1), hide_short_help = true)]
    pub reference_max_patches: Option<usize>,
}

impl ReferenceArgs {
    pub fn options(&self) -> ReferenceOptions {
        ReferenceOptions {
            reference: self.reference.clone(),
            reference_weight: self.reference_weight,
            reference_only: self.reference_only,
            reference_max_patches: self.reference_max_patches,
        }
    }
}

/// The files written per input (shared with `zsad bench`, which times producing them).
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Anomaly map files under DIR/maps/, at each image's own size [default: png; none
    /// without --out]
    #[arg(long, value_enum)]
    pub maps: Option<MapFormat>,
    /// Heatmaps under DIR/heatmaps/ (inferno colormap) [default: overlay; none without --out]
    ///
    /// With a pixel threshold, overlays outline the defect mask in cyan.
    #[arg(long, value_enum)]
    pub heatmaps: Option<HeatmapKind>,
    /// The map values at the colormap's ends: fixed [0, 1], each image's own range, or the run's
    #[arg(
        long,
        value_enum,
        default_value = "fixed",
        value_name = "SCALE",
        hide_short_help = true
    )]
    pub heatmap_scale: HeatmapScale,
    /// A colour bar beside each heatmap, labelled with its scale's values
    ///
    /// The heatmap is then wider than the image.
    #[arg(long, hide_short_help = true)]
    pub colorbar: bool,
    /// Opacity of the colour in overlay heatmaps, in [0, 1]
    #[arg(
        long,
        default_value_t = 0.5,
        value_name = "A",
        allow_negative_numbers = true,
        hide_short_help = true
    )]
    pub heatmap_alpha: f32,
}

impl OutputArgs {
    /// The options; maps and heatmaps default to none when there is no output folder.
    pub fn options(&self, with_folder: bool) -> OutputOptions {
        let base = if with_folder {
            OutputOptions::default()
        } else {
            OutputOptions::records_only()
        };
        OutputOptions {
            maps: self.maps.unwrap_or(base.maps),
            heatmaps: self.heatmaps.unwrap_or(base.heatmaps),
            heatmap_alpha: self.heatmap_alpha,
            heatmap_scale: self.heatmap_scale,
            colorbar: self.colorbar,
            ..base
        }
    }
}

/// The page's options, shared by `zsad report` and `zsad detect --report`.
#[derive(Debug, Clone, Args)]
pub struct PageArgs {
    /// Longest side of the row thumbnails (made once in DIR/thumbs/), in pixels
    #[arg(long, default_value_t = 160, value_name = "PX", hide_short_help = true)]
    pub thumbnail_size: u32,
    /// Rows per page of the report
    #[arg(long, default_value_t = 100, value_name = "N", hide_short_help = true)]
    pub page_size: usize,
}

impl PageArgs {
    pub fn options(&self, max_pixels: u64) -> ReportOptions {
        ReportOptions {
            eval: None,
            thumbnail_size: self.thumbnail_size,
            page_size: self.page_size,
            limits: DecodeLimits::with_max_pixels(max_pixels),
        }
    }
}
