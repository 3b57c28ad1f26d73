//! `zsad train` as a library job: the output checked, the data read and checked, the model
//! planned and built, then [`crate::train::fit::fit`]; the adapter written with what it was
//! trained on (the data, the options, the losses and the backbone's identity).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::prelude::DetectorOptions;
use crate::data::dataset::{self, Sample};
use crate::error::{Error, OptionError, Result};
use crate::fsio::OutDir;
use crate::method::adapter::backbone_identity;
use crate::method::Preset;
use crate::progress::Console;
use crate::train::fit::{fit, Checkpoint, FitData};
use crate::train::{self, trainable_presets, DiceGroups, ImageLoss, TrainOptions, Trainer};

/// Bounds of `epochs` and `batch_size`: far above any published recipe, low enough that a
/// typo (an extra zero or two) is refused instead of running for days or out of memory.
pub const MAX_EPOCHS: usize = 10_000;
pub const MAX_BATCH: usize = 1024;

/// Everything `zsad train` is asked to do; `None` hyper-parameters take the method's.
#[derive(Debug, Clone)]
pub struct TrainJobOptions {
    /// Annotated training data (dataset roots, manifests, folders with masks).
    pub data: Vec<PathBuf>,
    /// The model and method: a preset (fresh parameters) or an adapter (continued).
    pub detector: DetectorOptions,
    /// The adapter file to write; its checkpoint is kept beside it.
    pub out: PathBuf,
    pub resume: bool,
    pub overwrite: bool,
    pub epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    pub mosaic_rate: Option<f64>,
    pub image_loss: Option<ImageLoss>,
    pub dice: Option<DiceGroups>,
    pub seed: u64,
    pub max_steps: Option<usize>,
}

/// What a training run did.
pub struct TrainSummary {
    pub out: PathBuf,
    pub steps_run: usize,
    pub seconds: f64,
    /// The epoch a resumed run started after, and its step.
    pub resumed_at: Option<(usize, usize)>,
}

/// `<stem>.ckpt.safetensors` beside the adapter.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{stem}.ckpt.safetensors"))
}

impl TrainJobOptions {
    /// The numbers in their ranges, before anything is read.
    fn check_values(&self) -> Result<()> {
        let count = |name: &'static str, v: Option<usize>, hi: usize| match v {
            Some(n) if !(1..=hi).contains(&n) => Err(OptionError::value(
                name,
                n,
                format!("must be an integer from 1 to {hi}"),
            )),
            _ => Ok(()),
        };
        count("epochs", self.epochs, MAX_EPOCHS)?;
        count("batch_size", self.batch_size, MAX_BATCH)?;
        if self.max_steps == Some(0) {
            return Err(OptionError::value(
                "max_steps",
                0,
                "must be an integer >= 1",
            ));
        }
        let real = |name: &'static str, v: Option<f64>, ok: fn(f64) -> bool, what: &str| match v {
            Some(x) if !(x.is_finite() && ok(x)) => Err(OptionError::value(name, x, what)),
            _ => Ok(()),
        };
        real(
            "lr",
            self.lr,
            |x| x > 0.0,
            "must be a finite number > 0, e.g. 0.001",
        )?;
        real(
            "weight_decay",
            self.weight_decay,
            |x| x >= 0.0,
            "must be a finite number >= 0 (0 turns it off)",
        )?;
        real(
            "mosaic_rate",
            self.mosaic_rate,
            |x| (0.0..=1.0).contains(&x),
            "must be a number from 0 to 1",
        )
    }

    /// `out` must name a file, and an existing adapter or checkpoint is replaced only on
    /// purpose; checked before the data and the model are read, so a mistake costs no time.
    fn check_out(&self) -> Result<()> {
        let out = &self.out;
        let text = out.as_os_str().to_string_lossy();
        if text.ends_with('/') || crate::fsio::is_dir(out) {
            return Err(OptionError::rule(format!(
                "`out` {}: names a folder; `out` must be a file path like DIR/adapter.safetensors (e.g. `out` {})",
                out.display(),
                Path::new(text.trim_end_matches('/'))
                    .join("adapter.safetensors")
                    .display()
            )));
        }
        if out.file_name().is_none() {
            return Err(OptionError::rule(format!(
                "`out` {}: must be a file path like DIR/adapter.safetensors",
                out.display()
            )));
        }
        let ckpt = checkpoint_path(out);
        // `resume` continues the run that writes `out`, so replacing it is what was asked.
        if !self.resume && !self.overwrite {
            if out.exists() {
                return Err(OptionError::rule(format!(
                    "{} exists: pass `overwrite` to replace it, `resume` to continue the run that wrote it (from {}), or choose another `out`",
                    out.display(),
                    ckpt.display()
                )));
            }
            if ckpt.exists() {
                return Err(OptionError::rule(format!(
                    "{} exists: the checkpoint of an unfinished run writing {}; continue it with `resume`, or start over with `overwrite`",
                    ckpt.display(),
                    out.display()
                )));
            }
        }
        if self.resume && self.overwrite {
            return Err(OptionError::rule(
                "`resume` and `overwrite` exclude each other",
            ));
        }
        Ok(())
    }

    /// The method's defaults with this run's overrides.
    fn train_options(&self, preset: Preset, layers: usize) -> TrainOptions {
        let mut o = TrainOptions::for_preset(preset, layers);
        o.seed = self.seed;
        o.max_steps = self.max_steps;
        o.epochs = self.epochs.unwrap_or(o.epochs);
        o.batch_size = self.batch_size.unwrap_or(o.batch_size);
        o.lr = self.lr.unwrap_or(o.lr);
        o.weight_decay = self.weight_decay.unwrap_or(o.weight_decay);
        o.mosaic_rate = self.mosaic_rate.unwrap_or(o.mosaic_rate);
        o.image_loss = self.image_loss.unwrap_or(o.image_loss);
        o.dice = self.dice.unwrap_or(o.dice);
        o
    }
}

fn load_data(paths: &[PathBuf]) -> Result<Vec<Sample>> {
    let samples = dataset::read_all(paths)?;
    if !samples.iter().any(|s| s.mask.is_some()) {
        return Err(Error::dataset(
            "no image in the training data has a mask: the pixel losses need anomalous examples",
        ));
    }
    Ok(samples)
}

/// `zsad train` as a job.
pub fn train(opts: &TrainJobOptions, console: &Console) -> Result<TrainSummary> {
    if opts.detector.adapter.is_none() && opts.detector.preset == Preset::ZeroShot {
        return Err(OptionError::rule(format!(
            "`preset` zero-shot (the default) is training-free: there is nothing to train; give `preset` P with P one of {}, or `adapter` A to continue training an adapter",
            trainable_presets()
        )));
    }
    opts.check_values()?;
    opts.check_out()?;
    let samples = load_data(&opts.data)?;
    let (dir, name) = OutDir::for_file(&opts.out)?;
    // Fail now, not after the first epoch, when the folder cannot be written.
    dir.probe()?;
    let ckpt_name = checkpoint_path(Path::new(&name)).display().to_string();
    let plan = opts.detector.plan(&Console::silent())?;
    let cfg = plan.adapter.config.clone();
    let (loaded, adapter, tokenizer, settings) = plan.build_model()?;
    let model = &loaded.model;
    let train_opts = opts.train_options(cfg.preset, cfg.layers.len());
    let mut trainer = Trainer::new(
        adapter,
        train_opts.clone(),
        model.vision.device(),
        model.vision.dtype(),
    )?;
    if opts.overwrite {
        // The checkpoint belongs to the run being replaced: left there, a later `resume`
        // would continue that run instead of this one.
        dir.remove(&ckpt_name)?;
    }
    let mut resumed_at = None;
    if opts.resume {
        let ckpt = dir.root().join(&ckpt_name);
        trainer
            .restore(&ckpt)
            .map_err(|e| e.context(format!("cannot resume from {}", ckpt.display())))?;
        resumed_at = Some((trainer.progress.epochs_done, trainer.progress.steps));
        console.note(&format!(
            "resuming after epoch {} (step {})",
            trainer.progress.epochs_done, trainer.progress.steps
        ));
    }
    let fixed_word = opts.detector.class_name.is_some();
    let mut texts = HashMap::new();
    for s in &samples {
        if !texts.contains_key(&s.class) {
            let t = train::text_inputs_for(&trainer.adapter, &s.class, &tokenizer, fixed_word)?;
            texts.insert(s.class.clone(), t);
        }
    }
    let vision = model
        .vision
        .at_image_size(cfg.image_size, cfg.pos_interpolation)?;
    let data = FitData {
        model,
        vision: &vision,
        texts: &texts,
        samples: &samples,
    };
    let ckpt = Checkpoint {
        dir: &dir,
        name: &ckpt_name,
    };
    let run = fit(&mut trainer, &data, &ckpt, console)?;
    let mut adapter = trainer.snapshot()?;
    let mut classes: Vec<&str> = samples.iter().map(|s| s.class.as_str()).collect();
    classes.sort();
    classes.dedup();
    adapter.config.provenance = Some(serde_json::json!({
        "trained_on": opts.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "classes": classes,
        "images": samples.len(),
        "epochs": trainer.progress.epochs_done,
        "steps": trainer.progress.steps,
        "epoch_losses": trainer.progress.epoch_losses,
        "final_loss": trainer.progress.epoch_losses.last(),
        "options": train_opts,
    }));
    adapter.backbone = Some(backbone_identity(&settings["model"]));
    dir.write(&name, &adapter.to_bytes()?)?;
    Ok(TrainSummary {
        out: opts.out.clone(),
        steps_run: run.steps_run,
        seconds: run.seconds,
        resumed_at,
    })
}
