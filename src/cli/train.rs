//! `zsad train`: learn an adapter on auxiliary annotated data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use super::detector_args::{tokenizer, DetectorArgs};
use super::flags;
use crate::data::dataset::{self, Sample};
use crate::data::outputs::write_atomic;
use crate::method::Preset;
use crate::progress::{Lines, Progress};
use crate::rng::SplitMix64;
use crate::train::{
    self, epoch_batches, load_example, trainable_presets, DiceGroups, ImageLoss, TrainOptions,
    Trainer,
};

/// Bounds of `--epochs` and `--batch-size`: far above any published recipe, low enough that a
/// typo (an extra zero or two) is refused instead of running for days or out of memory.
const MAX_EPOCHS: usize = 10_000;
const MAX_BATCH: usize = 1024;

/// Steps between two plain progress lines (when stderr is not a terminal).
const LINE_EVERY: u64 = 10;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Annotated training data (MVTec AD / VisA roots, manifests, folders with masks beside the
    /// images); repeat to combine datasets, e.g. --data visa --data clinicdb.csv
    #[arg(long, required = true, value_name = "D")]
    pub data: Vec<PathBuf>,
    /// Model and method: --model M --preset P (start from fresh parameters) or --adapter A
    /// (continue training an adapter)
    #[command(flatten)]
    pub detector: DetectorArgs,
    /// The adapter file to write, e.g. DIR/adapter.safetensors (a checkpoint
    /// `<name>.ckpt.safetensors` is kept beside it after every epoch); an existing one is
    /// replaced only with --overwrite or --resume
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
    #[arg(
        long,
        value_name = "N",
        value_parser = flags::count_in(1, MAX_EPOCHS),
        allow_negative_numbers = true
    )]
    pub epochs: Option<usize>,
    /// Images per step, 1 to 1024 (default: AdaCLIP 1, AnomalyCLIP 8)
    #[arg(
        long,
        value_name = "N",
        value_parser = flags::count_in(1, MAX_BATCH),
        allow_negative_numbers = true
    )]
    pub batch_size: Option<usize>,
    /// Learning rate, a finite number > 0 (default: AdaCLIP 0.01, AnomalyCLIP 0.001)
    #[arg(
        long,
        value_name = "LR",
        value_parser = flags::positive,
        allow_negative_numbers = true
    )]
    pub lr: Option<f64>,
    /// Decoupled weight decay >= 0, 0 = Adam (default: AdaCLIP 0.01 (AdamW), AnomalyCLIP 0
    /// (Adam))
    #[arg(
        long,
        value_name = "W",
        value_parser = flags::non_negative,
        allow_negative_numbers = true
    )]
    pub weight_decay: Option<f64>,
    /// Probability from 0 to 1 of a 2x2 same-class mosaic per sample (default: AdaCLIP 0.2,
    /// AnomalyCLIP 0)
    #[arg(
        long,
        value_name = "P",
        value_parser = flags::unit_interval,
        allow_negative_numbers = true
    )]
    pub mosaic_rate: Option<f64>,
    /// Image-level loss (default: AdaCLIP focal, AnomalyCLIP cross-entropy)
    #[arg(long, value_enum)]
    pub image_loss: Option<ImageLoss>,
    /// Dice groups (default: AdaCLIP per mask row, AnomalyCLIP per image)
    #[arg(long, value_enum)]
    pub dice: Option<DiceGroups>,
    /// Shuffling and augmentation seed (the references use 111)
    #[arg(long, default_value_t = 111, value_name = "N")]
    pub seed: u64,
    /// Stop after this many steps in all, at least 1 (smoke runs)
    #[arg(
        long,
        value_name = "N",
        value_parser = flags::at_least(1),
        allow_negative_numbers = true
    )]
    pub max_steps: Option<usize>,
    /// No progress bar, progress lines or per-epoch lines
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn checkpoint_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{stem}.ckpt.safetensors"))
}

/// `--out` must name a file, and an existing adapter or checkpoint is replaced only on
/// purpose; checked before the data and the model are read, so a mistake costs no time.
fn check_out(args: &TrainArgs) -> anyhow::Result<()> {
    let out = &args.out;
    let text = out.as_os_str().to_string_lossy();
    if text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) || out.is_dir() {
        bail!(
            "--out {}: names a folder; --out must be a file path like DIR/adapter.safetensors (e.g. --out {})",
            out.display(),
            Path::new(text.trim_end_matches(['/', std::path::MAIN_SEPARATOR]))
                .join("adapter.safetensors")
                .display()
        );
    }
    if out.file_name().is_none() {
        bail!(
            "--out {}: must be a file path like DIR/adapter.safetensors",
            out.display()
        );
    }
    let ckpt = checkpoint_path(out);
    // --resume continues the run that writes --out, so replacing it is what was asked.
    if !args.resume && !args.overwrite {
        if out.exists() {
            bail!(
                "{} exists: pass --overwrite to replace it, --resume to continue the run that wrote it (from {}), or choose another --out",
                out.display(),
                ckpt.display()
            );
        }
        if ckpt.exists() {
            bail!(
                "{} exists: the checkpoint of an unfinished run writing {}; continue it with --resume, or start over with --overwrite",
                ckpt.display(),
                out.display()
            );
        }
    }
    // Fail now, not after the first epoch, when the folder cannot be written.
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--out: cannot create {}", dir.display()))?;
    let probe = dir.join(format!(".zsad-train-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("--out: cannot write in {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn load_data(paths: &[PathBuf]) -> anyhow::Result<Vec<Sample>> {
    let samples = dataset::read_all(paths)?;
    if !samples.iter().any(|s| s.mask.is_some()) {
        bail!("no image in the training data has a mask: the pixel losses need anomalous examples");
    }
    Ok(samples)
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if args.detector.adapter.is_none() && args.detector.preset == Preset::ZeroShot {
        bail!(
            "--preset zero-shot (the default) is training-free: there is nothing to train; give --preset P with P one of {}, or --adapter A to continue training an adapter",
            trainable_presets()
        );
    }
    check_out(&args)?;
    let samples = load_data(&args.data)?;
    let (loaded, adapter) = args.detector.setup(true)?;
    let cfg = adapter.config.clone();
    let patch = loaded.model.config.vision_config.patch_size;
    if cfg.image_size % patch != 0 {
        let (lo, hi) = (
            cfg.image_size / patch * patch,
            (cfg.image_size / patch + 1) * patch,
        );
        bail!(
            "{} {} is not a multiple of the model's {patch} px patch (the maps would miss the edge pixels their masks train); use {}",
            if args.detector.image_size.is_some() {
                "--image-size"
            } else {
                "the image size"
            },
            cfg.image_size,
            if lo >= patch {
                format!("{lo} or {hi}")
            } else {
                hi.to_string()
            }
        );
    }
    let mut opts = TrainOptions::for_preset(cfg.preset, cfg.layers.len());
    opts.seed = args.seed;
    opts.max_steps = args.max_steps;
    if let Some(v) = args.epochs {
        opts.epochs = v;
    }
    if let Some(v) = args.batch_size {
        opts.batch_size = v;
    }
    if let Some(v) = args.lr {
        opts.lr = v;
    }
    if let Some(v) = args.weight_decay {
        opts.weight_decay = v;
    }
    if let Some(v) = args.mosaic_rate {
        opts.mosaic_rate = v;
    }
    if let Some(v) = args.image_loss {
        opts.image_loss = v;
    }
    if let Some(v) = args.dice {
        opts.dice = v;
    }
    let model = &loaded.model;
    let device = model.vision.device().clone();
    let dtype = model.vision.dtype();
    let mut trainer = Trainer::new(adapter, opts.clone(), &device, dtype)?;
    let ckpt = checkpoint_path(&args.out);
    if args.overwrite && ckpt.exists() {
        // The checkpoint belongs to the run being replaced: left there, a later --resume would
        // continue that run instead of this one.
        std::fs::remove_file(&ckpt).with_context(|| format!("cannot remove {}", ckpt.display()))?;
    }
    if args.resume {
        trainer
            .restore(&ckpt)
            .with_context(|| format!("cannot resume from {}", ckpt.display()))?;
        if !args.quiet {
            eprintln!(
                "zsad: resuming after epoch {} (step {})",
                trainer.progress.epochs_done, trainer.progress.steps
            );
        }
    }
    let tok = tokenizer(&args.detector.tokenizer, &loaded)?;
    let fixed_word = args.detector.class_name.is_some();
    let mut texts = HashMap::new();
    for s in &samples {
        if !texts.contains_key(&s.class) {
            let t = train::text_inputs_for(&trainer.adapter, &s.class, &tok, fixed_word)?;
            texts.insert(s.class.clone(), t);
        }
    }
    let vision = model
        .vision
        .at_image_size(cfg.image_size, cfg.pos_interpolation)?;
    let by_class: HashMap<&str, Vec<usize>> =
        samples
            .iter()
            .enumerate()
            .fold(HashMap::new(), |mut m, (i, s)| {
                m.entry(s.class.as_str()).or_default().push(i);
                m
            });

    let steps_per_epoch = epoch_batches(&samples, opts.batch_size, opts.seed, 0).len();
    let total = opts
        .max_steps
        .unwrap_or(usize::MAX)
        .min(steps_per_epoch * opts.epochs);
    let mut bar = Progress::new(
        total as u64,
        args.quiet,
        "epoch {prefix} [{bar:30}] {pos}/{len} steps  {per_sec}  ETA {eta}  loss {msg}",
        Lines {
            command: "train",
            unit: "step",
            every: LINE_EVERY,
        },
    );
    bar.start_at(trainer.progress.steps.min(total) as u64);
    let started = std::time::Instant::now();
    let steps_at_start = trainer.progress.steps;
    // The loss of a progress line is the mean over the steps since the previous line: single
    // steps (batch 1, focal loss) are too noisy to read a trend from.
    let (mut line_sum, mut line_n) = (0.0, 0usize);
    'epochs: for epoch in trainer.progress.epochs_done..opts.epochs {
        bar.bar()
            .set_prefix(format!("{}/{}", epoch + 1, opts.epochs));
        let mut sum = 0.0;
        let mut n = 0usize;
        for (k, batch) in epoch_batches(&samples, opts.batch_size, opts.seed, epoch)
            .into_iter()
            .enumerate()
        {
            if trainer.progress.steps >= total {
                break 'epochs;
            }
            let mut rng = SplitMix64::keyed(opts.seed, &format!("mosaic {epoch} {k}"));
            let class = samples[batch[0]].class.as_str();
            let examples = batch
                .iter()
                .map(|&i| {
                    let same = &by_class[samples[i].class.as_str()];
                    let group: Vec<&Sample> = if same.len() >= 4
                        && rng.next_f64() < opts.mosaic_rate
                    {
                        // the sample and three random others of its class
                        std::iter::once(i)
                            .chain(
                                (0..3).map(|_| same[(rng.next_u64() % same.len() as u64) as usize]),
                            )
                            .map(|j| &samples[j])
                            .collect()
                    } else {
                        vec![&samples[i]]
                    };
                    load_example(&group, cfg.image_size)
                        .with_context(|| format!("cannot load {}", samples[i].image.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let loss = trainer
                .step(model, &vision, &texts[class], &examples)
                .map_err(|e| step_error(e, opts.batch_size, cfg.image_size, &device))
                .with_context(|| format!("training step {}", trainer.progress.steps + 1))?;
            sum += loss;
            n += 1;
            line_sum += loss;
            line_n += 1;
            bar.bar().set_message(format!("{loss:.4}"));
            let printed = bar.advance(trainer.progress.steps as u64, || {
                format!(
                    "epoch {}/{} loss {:.4}",
                    epoch + 1,
                    opts.epochs,
                    line_sum / line_n.max(1) as f64
                )
            });
            if printed {
                (line_sum, line_n) = (0.0, 0);
            }
        }
        if n == 0 {
            break;
        }
        trainer.progress.epochs_done = epoch + 1;
        trainer.progress.epoch_losses.push(sum / n as f64);
        write_atomic(&ckpt, &trainer.checkpoint_bytes()?)?;
        if !args.quiet {
            bar.println(&format!(
                "zsad: epoch {}/{}: mean loss {:.5} ({} steps) -> {}",
                epoch + 1,
                opts.epochs,
                sum / n as f64,
                n,
                ckpt.display()
            ));
        }
    }
    bar.finish();
    let steps_run = trainer.progress.steps - steps_at_start;
    let mut adapter = trainer.snapshot()?;
    let mut classes: Vec<&str> = by_class.keys().copied().collect();
    classes.sort();
    adapter.config.provenance = Some(serde_json::json!({
        "trained_on": args.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "classes": classes,
        "images": samples.len(),
        "epochs": trainer.progress.epochs_done,
        "steps": trainer.progress.steps,
        "epoch_losses": trainer.progress.epoch_losses,
        "final_loss": trainer.progress.epoch_losses.last(),
        "options": opts,
    }));
    write_atomic(&args.out, &adapter.to_bytes()?)?;
    if !args.quiet {
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "zsad: {} steps in {:.1} s ({:.3} s per step) -> {}",
            steps_run,
            secs,
            secs / steps_run.max(1) as f64,
            args.out.display()
        );
    }
    Ok(())
}

/// A training step's error; a GPU out of memory says which setting to lower (the batch is the
/// loss's, so it is not split behind the user's back as detection's passes are).
fn step_error(
    e: crate::Error,
    batch: usize,
    image_size: usize,
    device: &candle_core::Device,
) -> anyhow::Error {
    if !crate::device::is_out_of_memory(&e.to_string()) {
        return e.into();
    }
    let memory = crate::device::memory(device)
        .map(|(free, total)| {
            format!(
                " ({} of {} free after the step)",
                crate::device::gib(free),
                crate::device::gib(total)
            )
        })
        .unwrap_or_default();
    let hint = if batch > 1 {
        format!("try --batch-size {} (halved)", batch / 2)
    } else {
        "one image per step does not fit: use --dtype bf16, a smaller --image-size, or a GPU with more memory".into()
    };
    anyhow::anyhow!(
        "the GPU ran out of memory in a training step at --batch-size {batch}, --image-size {image_size}{memory}: {hint}"
    )
}
