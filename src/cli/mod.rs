//! The `zsad` command line: parsing, model options shared by subcommands, exit codes.

mod features;
mod info;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::clip::{self, Activation, LoadOptions, LoadedModel, PosInterpolation};

/// Exit status when the command did what was asked.
pub const EXIT_OK: u8 = 0;
/// Exit status for bad usage, a model that cannot be loaded, or an output that cannot be written.
pub const EXIT_ERROR: u8 = 2;

const AFTER_HELP: &str = "\
Models (--model):
  a folder        with config.json + model.safetensors (Hugging Face CLIPModel layout) or an
                  OpenAI/open_clip state dict (open_clip_model.safetensors, *.bin, *.pth)
  a file          one weight file; config.json and tokenizer.json are read from beside it
  org/name        a Hugging Face hub id, e.g. openai/clip-vit-large-patch14-336: read from the
                  local hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
                  ~/.cache/huggingface/hub) and downloaded when missing, unless HF_HUB_OFFLINE=1
  random:ARCH     deterministic random weights of ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336 or
                  tiny, for benchmarks and tests without downloads (append :SEED to vary them)

Exit status: 0 success; 2 bad usage, a model that cannot be loaded, an unreadable input or an
output that cannot be written (the message names the file).";

/// Zero-shot visual anomaly detection with CLIP.
#[derive(Debug, Parser)]
#[command(name = "zsad", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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

/// Options that pick and load a CLIP model.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// CLIP model: folder, weight file, hub id (org/name) or random:ARCH (see below)
    #[arg(long, short = 'm', value_name = "M")]
    pub model: String,
    /// Override the MLP activation of the checkpoint's config
    #[arg(long, value_enum)]
    pub activation: Option<ActivationArg>,
    /// Compute precision of the backbone (bf16: CUDA only)
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Where to run the model
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let device = match self.device {
            DeviceArg::Cpu => candle_core::Device::Cpu,
            DeviceArg::Cuda => candle_core::Device::new_cuda(0)
                .context("--device cuda: no CUDA device (is zsad built with --features cuda?)")?,
        };
        if matches!((self.dtype, self.device), (DTypeArg::Bf16, DeviceArg::Cpu)) {
            anyhow::bail!("--dtype bf16 needs --device cuda: candle's CPU matmul has no bf16 kernel (use f32 or f16 on CPU)");
        }
        let opts = LoadOptions {
            dtype: match self.dtype {
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
        clip::load_model(&self.model, &opts)
            .with_context(|| format!("cannot load model `{}`", self.model))
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

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Runs the command line; returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Features(a) => features::run(a),
    };
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
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
