//! `zsad train`: learn an adapter on auxiliary annotated data.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use super::detector_args::{tokenizer, DetectorArgs};
use crate::data::dataset::{self, Sample};
use crate::data::outputs::write_atomic;
use crate::rng::SplitMix64;
use crate::train::{
    self, epoch_batches, load_example, DiceGroups, ImageLoss, TrainOptions, Trainer,
};

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
    /// The adapter to write (a checkpoint `<name>.ckpt.safetensors` is kept beside it after
    /// every epoch)
    #[arg(long, short = 'o', value_name = "A.safetensors")]
    pub out: PathBuf,
    /// Continue from the checkpoint beside --out
    #[arg(long)]
    pub resume: bool,
    /// Epochs (default: the method's: AdaCLIP 5, AnomalyCLIP/HeadCLIP 15)
    #[arg(long, value_name = "N")]
    pub epochs: Option<usize>,
    /// Images per step (default: AdaCLIP 1, AnomalyCLIP 8)
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Learning rate (default: AdaCLIP 0.01, AnomalyCLIP 0.001)
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
    /// Decoupled weight decay, 0 = Adam (default: AdaCLIP 0.01 (AdamW), AnomalyCLIP 0 (Adam))
    #[arg(long, value_name = "W")]
    pub weight_decay: Option<f64>,
    /// Probability of a 2x2 same-class mosaic per sample (default: AdaCLIP 0.2, AnomalyCLIP 0)
    #[arg(long, value_name = "P")]
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
    /// Stop after this many steps (smoke runs)
    #[arg(long, value_name = "N")]
    pub max_steps: Option<usize>,
    /// No progress bar or per-epoch lines
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn checkpoint_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{stem}.ckpt.safetensors"))
}

fn load_data(paths: &[PathBuf]) -> anyhow::Result<Vec<Sample>> {
    let samples = dataset::read_all(paths)?;
    if !samples.iter().any(|s| s.mask.is_some()) {
        bail!("no image in the training data has a mask: the pixel losses need anomalous examples");
    }
    Ok(samples)
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let samples = load_data(&args.data)?;
    let (loaded, adapter) = args.detector.setup(true)?;
    let cfg = adapter.config.clone();
    let mut opts = TrainOptions::for_preset(cfg.preset, cfg.layers.len());
    opts.seed = args.seed;
    opts.max_steps = args.max_steps;
    if let Some(v) = args.epochs {
        opts.epochs = v;
    }
    if let Some(v) = args.batch_size {
        opts.batch_size = v.max(1);
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
    let bar = if !args.quiet && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} steps  {per_sec}  ETA {eta}  loss {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(trainer.progress.steps.min(total) as u64);
    let started = std::time::Instant::now();
    let steps_at_start = trainer.progress.steps;
    'epochs: for epoch in trainer.progress.epochs_done..opts.epochs {
        bar.set_prefix(format!("{}/{}", epoch + 1, opts.epochs));
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
                .with_context(|| format!("training step {}", trainer.progress.steps + 1))?;
            sum += loss;
            n += 1;
            bar.set_message(format!("{loss:.4}"));
            bar.inc(1);
        }
        if n == 0 {
            break;
        }
        trainer.progress.epochs_done = epoch + 1;
        trainer.progress.epoch_losses.push(sum / n as f64);
        write_atomic(&ckpt, &trainer.checkpoint_bytes()?)?;
        if !args.quiet {
            bar.suspend(|| {
                eprintln!(
                    "zsad: epoch {}/{}: mean loss {:.5} ({} steps) -> {}",
                    epoch + 1,
                    opts.epochs,
                    sum / n as f64,
                    n,
                    ckpt.display()
                )
            });
        }
    }
    bar.finish_and_clear();
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
