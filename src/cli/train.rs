//! `zsad train`: flags into [`TrainJobOptions`], the library's training job, its summary on
//! stderr.

use std::path::PathBuf;

use clap::Args;

use super::args::DetectorArgs;
use super::flags;
use super::output::EXIT_OK;
use crate::error::Result;
use crate::jobs::train::{train, TrainJobOptions, MAX_BATCH, MAX_EPOCHS};
use crate::train::{DiceGroups, ImageLoss};

#[derive(Debug, Args)]
#[command(mut_arg("model", |a| a.required(true)))]
pub struct TrainArgs {
    /// Annotated training data (MVTec AD / VisA roots, manifests, folders with masks beside the
    /// images); repeat to combine datasets, e.g. --data visa --data clinicdb.csv
    #[arg(long, required = true, value_name = "D")]
    pub data: Vec<PathBuf>,
    /// Model and method: --model M --preset P (start from fresh parameters) or --adapter A
    /// (continue training an adapter)
    #[command(flatten)]
    pub detector: DetectorArgs,
    /// The adapter file to write, e.g. DIR/adapter.safetensors
    ///
    /// A checkpoint `<name>.ckpt.safetensors` is kept beside it after every epoch; an existing
    /// one is replaced only with --overwrite or --resume.
    #[arg(long, short = 'o', value_name = "A.safetensors")]
    pub out: PathBuf,
    /// Continue from the checkpoint beside --out (and replace --out when done)
    #[arg(long)]
    pub resume: bool,
    /// Start over even though --out or its checkpoint exists: both are replaced
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Epochs, 1 to 10000 (default: the method's: AdaCLIP 5, AnomalyCLIP/HeadCLIP 15)
    // allow_negative_numbers on the numeric flags: `--lr -1` gets the range message, not
    // clap's "unexpected argument '-1'".
    #[arg(long, value_name = "N", value_parser = flags::count_in(1, MAX_EPOCHS), allow_negative_numbers = true)]
    pub epochs: Option<usize>,
    /// Images per step, 1 to 1024 (default: AdaCLIP 1, AnomalyCLIP 8)
    #[arg(long, value_name = "N", value_parser = flags::count_in(1, MAX_BATCH), allow_negative_numbers = true)]
    pub batch_size: Option<usize>,
    /// Learning rate, a finite number > 0 (default: AdaCLIP 0.01, AnomalyCLIP 0.001)
    #[arg(long, value_name = "LR", value_parser = flags::positive, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Decoupled weight decay >= 0, 0 = Adam (default: AdaCLIP 0.01 (AdamW), AnomalyCLIP 0)
    #[arg(long, value_name = "W", value_parser = flags::non_negative, allow_negative_numbers = true, hide_short_help = true)]
    pub weight_decay: Option<f64>,
    /// Probability from 0 to 1 of a 2x2 same-class mosaic per sample (default: AdaCLIP 0.2,
    /// AnomalyCLIP 0)
    #[arg(long, value_name = "P", value_parser = flags::unit_interval, allow_negative_numbers = true, hide_short_help = true)]
    pub mosaic_rate: Option<f64>,
    /// Image-level loss (default: AdaCLIP focal, AnomalyCLIP cross-entropy)
    #[arg(long, value_enum, hide_short_help = true)]
    pub image_loss: Option<ImageLoss>,
    /// Dice groups (default: AdaCLIP per mask row, AnomalyCLIP per image)
    #[arg(long, value_enum, hide_short_help = true)]
    pub dice: Option<DiceGroups>,
    /// Shuffling and augmentation seed (the references use 111)
    #[arg(long, default_value_t = 111, value_name = "N", hide_short_help = true)]
    pub seed: u64,
    /// Stop after this many steps in all, at least 1 (smoke runs)
    #[arg(long, value_name = "N", value_parser = flags::at_least(1), allow_negative_numbers = true, hide_short_help = true)]
    pub max_steps: Option<usize>,
    /// No progress bar, progress lines or per-epoch lines
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn run(args: TrainArgs) -> Result<u8> {
    let console = super::output::console(args.quiet);
    let opts = TrainJobOptions {
        data: args.data.clone(),
        detector: args.detector.options(),
        out: args.out.clone(),
        resume: args.resume,
        overwrite: args.overwrite,
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: args.weight_decay,
        mosaic_rate: args.mosaic_rate,
        image_loss: args.image_loss,
        dice: args.dice,
        seed: args.seed,
        max_steps: args.max_steps,
    };
    let s = train(&opts, &console)?;
    console.note(&format!(
        "{} steps in {:.1} s ({:.3} s per step) -> {}",
        s.steps_run,
        s.seconds,
        s.seconds / s.steps_run.max(1) as f64,
        s.out.display()
    ));
    Ok(EXIT_OK)
}
