//! The `zsad` command line: parsing, model options shared by subcommands, exit codes.

mod bench;
mod calibrate;
mod detect;
mod detector_args;
mod eval;
mod features;
mod flags;
mod import;
mod info;
mod manifest;
mod merge;
mod reference;
mod report;
mod train;
mod values;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::clip::{self, Activation, LoadOptions, LoadedModel, PosInterpolation};

/// Exit status when the command did what was asked.
pub const EXIT_OK: u8 = 0;
/// Exit status when some inputs could not be scored (the others were, and were written).
pub const EXIT_SOME_FAILED: u8 = 1;
/// Exit status for bad usage, a model that cannot be loaded, or an output that cannot be written.
pub const EXIT_ERROR: u8 = 2;

/// The `--model` forms, shared by every command's help.
macro_rules! models_help {
    () => {
        "Models (--model):
  a folder        with config.json + model.safetensors (Hugging Face CLIPModel layout) or an
                  OpenAI/open_clip state dict (open_clip_model.safetensors, *.bin, *.pth)
  a file          one weight file; config.json and tokenizer.json are read from beside it
  org/name        a Hugging Face hub id, e.g. openai/clip-vit-large-patch14-336: read from the
                  local hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
                  ~/.cache/huggingface/hub) and downloaded when missing, unless HF_HUB_OFFLINE=1
  random:ARCH     deterministic random weights of ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336 or
                  tiny, for benchmarks and tests without downloads (append :SEED to vary them)"
    };
}

const AFTER_HELP: &str = concat!(
    models_help!(),
    "

Exit status: 0 success; 1 some inputs could not be scored (detect: each is reported in the
record file with an `error`, every other input is scored and written); 2 bad usage, a model or
adapter that cannot be loaded, or an output that cannot be written (the message names the file).
A closed stdout (`zsad eval ... | head -1`) ends zsad by SIGPIPE (141 in a shell), as it does cat."
);

const REPORT_AFTER_HELP: &str =
    "The page lists every input of the run's records (scores.jsonl or scores.csv), highest
score first, failed inputs last, with its image, heatmap and defect mask side by side, a page
of rows at a time. Thumbnails are made in DIR/thumbs/ (again only when their source changed);
the enlarged view shows the run's own heatmap and mask and the input image itself (a preview
for formats browsers cannot show, such as TIFF). Relative input paths are read from the folder
detect ran in (run.json's info.cwd). The filters, order and page are kept in the URL
(report.html#filter=failed&page=2). Keys: j/k or arrows move, Enter enlarges, left/right turn
pages (images when enlarged), Esc closes, / searches.

Exit status: 0 the page shows every picture; 1 some pictures could not be made (an input moved
away, a heatmap missing; each row says why, the page is written); 2 bad usage or no records in
DIR.";

const DETECT_AFTER_HELP: &str = concat!(
    "Outputs in --out DIR, written as each input finishes:
  run.json        the settings that made the records (model and adapter SHA-256, detector
                  configuration, output options); --resume refuses other settings
  scores.jsonl    one JSON object per input: path, score, global_score, map_max, map_mean,
                  map_min, width, height, map, heatmap (paths relative to DIR), anomalous
                  (--threshold),
                  mask, regions (--pixel-threshold);
                  a failed input has path and error instead (--format csv: scores.csv)
  maps/NAME.png   the anomaly map at the image's size, 16-bit grey, value = round(p * 65535)
  heatmaps/NAME.png  inferno colormap over the image, on --heatmap-scale: fixed [0, 1] (default),
                  image (each map's own range) or run (the whole run's range, drawn after the
                  last record); --colorbar adds a labelled colour bar
  report.html     with --report: the page of `zsad report` (thumbnails in thumbs/)
  masks/NAME.png  with --pixel-threshold or --thresholds: the defect mask (255 where map >= P),
                  and `regions` (count, and each region's area, bbox, peak) in the record
NAME is the path inside the folder argument (or as given) without extension (see the README
for how names are kept distinct). Folder walks leave out masks (ground_truth/, Masks/, X.png
beside X.jpg; --include-masks keeps them), read only regular files and walk each folder once.

Decisions: --thresholds thresholds.json (from `zsad calibrate`) or --threshold T and
--pixel-threshold P; --min-region-area N drops specks from masks and regions.

Batch runs: --resume skips inputs already recorded; --shard K/N scores one of N shares (give
each its own --out, then `zsad merge`).

A few normal images: --reference good/ compares every patch with theirs as well and fuses the
distance into the map ((1 - w) * method + w * reference, w = --reference-weight, default 0.5);
`zsad reference build` saves the bank to reuse (--reference bank.safetensors).

",
    models_help!(),
    "

Exit status: 0 every input scored; 1 some inputs failed (each has an `error` record, the others
are scored and written); 2 bad usage, a model or adapter that cannot be loaded, or an output
that cannot be written."
);

/// Zero-shot visual anomaly detection with CLIP.
#[derive(Debug, Parser)]
#[command(name = "zsad", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score images: an anomaly score and a pixel anomaly map per image, written as records
    /// (JSON Lines or CSV), 16-bit map PNGs and heatmaps.
    #[command(after_help = DETECT_AFTER_HELP)]
    Detect(detect::DetectArgs),
    /// Evaluate on an annotated dataset: image and pixel AUROC, AP, F1-max and AUPRO per class
    /// and their mean, exactly as the papers compute them, with ROC and PR plots.
    #[command(after_help = AFTER_HELP)]
    Eval(eval::EvalArgs),
    /// Choose image and pixel thresholds (thresholds.json for `detect --thresholds`) on
    /// labelled data (F1-max, --max-fpr or --min-recall) or on normal images only (--normal
    /// with --max-fpr).
    #[command(after_help = AFTER_HELP)]
    Calibrate(calibrate::CalibrateArgs),
    /// Train an adapter on annotated auxiliary data (the target classes are never seen).
    #[command(after_help = AFTER_HELP)]
    Train(train::TrainArgs),
    /// Write a manifest (image, mask, label, class) from a dataset folder.
    Manifest(manifest::ManifestArgs),
    /// Convert a published AdaCLIP or AnomalyCLIP checkpoint (.pth) into a zsad adapter.
    #[command(after_help = AFTER_HELP)]
    ImportCheckpoint(import::ImportArgs),
    /// Join the output folders of `zsad detect --shard` runs.
    Merge(merge::MergeArgs),
    /// Write DIR/report.html for a detect run: every image sorted by score with its heatmap,
    /// mask and decision, the score histogram with the threshold, filters, keyboard navigation,
    /// the run's settings and, with eval results, the metrics and curves. One self-contained
    /// file (thumbnails in DIR/thumbs/), opened straight from disk.
    #[command(after_help = REPORT_AFTER_HELP)]
    Report(report::ReportArgs),
    /// Time the detection pipeline per stage (decode, resize, backbone, text, maps, smoothing,
    /// PNG encoding, writing) over a folder of images, with peak memory.
    #[command(after_help = AFTER_HELP)]
    Bench(bench::BenchArgs),
    /// Reference banks: normal patch features of a product, for `--reference` on detect and
    /// eval.
    Reference(reference::ReferenceCmd),
    /// Print a model's architecture (widths, depths, patch grid, parameters, naming).
    Info(info::InfoArgs),
    /// Write CLIP image/text embeddings and per-layer hidden states to a safetensors file.
    Features(features::FeaturesArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ActivationArg {
    /// x·σ(1.702x), OpenAI's training activation (AnomalyCLIP)
    QuickGelu,
    /// exact erf GELU (AdaCLIP, April-GAN run OpenAI weights this way)
    Gelu,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    /// needs a build with `--features cuda`
    Cuda,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PosInterpArg {
    /// PyTorch bicubic, A = -0.75 (AdaCLIP, Hugging Face)
    Bicubic,
    /// PyTorch bilinear (AnomalyCLIP)
    Bilinear,
}

impl From<Activation> for ActivationArg {
    fn from(a: Activation) -> Self {
        match a {
            Activation::QuickGelu => Self::QuickGelu,
            Activation::Gelu => Self::Gelu,
        }
    }
}

/// Options that pick and load a CLIP model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// CLIP model: folder, weight file, hub id (org/name) or random:ARCH (see below)
    #[arg(long, short = 'm', value_name = "M")]
    pub model: String,
    /// Override the MLP activation of the checkpoint's config
    #[arg(long, value_enum)]
    pub activation: Option<ActivationArg>,
    /// Tensor type of the whole backbone (f16/bf16: for CUDA; on the CPU use --precision)
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// GEMM precision: bf16 multiplies bf16 operands with f32 accumulation, as PyTorch's
    /// autocast does, on the CPU's AMX or AVX512-BF16 unit (weights packed once, half the
    /// memory); everything else stays f32. A CPU without them computes the same numbers at f32
    /// speed (`zsad info` says which GEMM runs). On CUDA: the GPU's bf16 units through cuBLAS,
    /// the rest in f32 (--dtype bf16 runs the whole model in bf16)
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionArg,
    /// Where to run the model
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let device = match self.device {
            DeviceArg::Cpu => candle_core::Device::Cpu,
            DeviceArg::Cuda => crate::device::cuda(0)?,
        };
        if matches!((self.dtype, self.device), (DTypeArg::Bf16, DeviceArg::Cpu)) {
            anyhow::bail!("--dtype bf16 needs --device cuda: on the CPU use --precision bf16 (bf16 GEMMs, the rest in f32)");
        }
        // bf16 products in an f32 model, on either device (the CPU's bf16 units, or a GPU's as
        // PyTorch's autocast); --dtype bf16 is the whole model in bf16, on a GPU.
        let bf16 = self.precision == PrecisionArg::Bf16;
        if bf16 && !matches!(self.dtype, DTypeArg::F32) {
            anyhow::bail!("--precision bf16 multiplies bf16 operands in an f32 model: drop --dtype (or, on CUDA, use --dtype bf16 alone for a model wholly in bf16)");
        }
        let dtype = self.dtype;
        let opts = LoadOptions {
            dtype: match dtype {
                DTypeArg::F32 => candle_core::DType::F32,
                DTypeArg::F16 => candle_core::DType::F16,
                DTypeArg::Bf16 => candle_core::DType::BF16,
            },
            device,
            activation: self.activation.map(|a| match a {
                ActivationArg::QuickGelu => Activation::QuickGelu,
                ActivationArg::Gelu => Activation::Gelu,
            }),
        };
        let mut loaded = clip::load_model(&self.model, &opts)
            .with_context(|| format!("cannot load model `{}`", self.model))?;
        if bf16 {
            loaded.model.use_bf16().context("--precision bf16")?;
        }
        Ok(loaded)
    }
}

impl From<PosInterpArg> for PosInterpolation {
    fn from(a: PosInterpArg) -> Self {
        match a {
            PosInterpArg::Bicubic => PosInterpolation::Bicubic,
            PosInterpArg::Bilinear => PosInterpolation::Bilinear,
        }
    }
}

/// Writes `bytes` to `path` atomically (temporary file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(crate::data::outputs::write_atomic(path, bytes)?)
}

/// Runs the command line; returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Detect(a) => detect::run(a),
        Command::Eval(a) => eval::run(a).map(|()| EXIT_OK),
        Command::Calibrate(a) => calibrate::run(a).map(|()| EXIT_OK),
        Command::Train(a) => train::run(a).map(|()| EXIT_OK),
        Command::Manifest(a) => manifest::run(a).map(|()| EXIT_OK),
        Command::ImportCheckpoint(a) => import::run(a).map(|()| EXIT_OK),
        Command::Merge(a) => merge::run(a),
        Command::Report(a) => report::run(a),
        Command::Bench(a) => bench::run(a).map(|()| EXIT_OK),
        Command::Reference(a) => reference::run(a),
        Command::Info(a) => info::run(a).map(|()| EXIT_OK),
        Command::Features(a) => features::run(a).map(|()| EXIT_OK),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("zsad: error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
