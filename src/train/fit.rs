//! The training loop: the epochs of `epoch_batches`, each batch's examples loaded (a
//! 2x2 mosaic by `augment::mosaic_group`), one optimiser step per batch, a checkpoint
//! after every epoch, progress as a bar or plain lines. A run resumed from a checkpoint goes on
//! where it stopped, on the same batches.

use std::collections::HashMap;

use candle_core::Device;

use super::augment::mosaic_group;
use super::{epoch_batches, load_example, Trainer};
use crate::clip::{ClipModel, VisionTransformer};
use crate::data::dataset::Sample;
use crate::error::{DeviceError, Error, Result};
use crate::fsio::OutDir;
use crate::method::TextInputs;
use crate::progress::{Console, Lines};
use crate::rng::SplitMix64;

/// Steps between two plain progress lines (when stderr is not a terminal).
const LINE_EVERY: u64 = 10;

/// What the loop runs on.
pub struct FitData<'a> {
    pub model: &'a ClipModel,
    /// The image tower at the training size.
    pub vision: &'a VisionTransformer,
    /// The text inputs of each class.
    pub texts: &'a HashMap<String, TextInputs>,
    pub samples: &'a [Sample],
}

/// Where the checkpoint after every epoch goes.
pub struct Checkpoint<'a> {
    pub dir: &'a OutDir,
    pub name: &'a str,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct FitSummary {
    /// Steps run by this call (not counting those of a resumed run's past).
    pub steps_run: usize,
    pub seconds: f64,
}

/// Trains until the epochs (or `max_steps`) are done, checkpointing after every epoch. A stop
/// request ends it between steps with [`Error::Interrupted`], the last checkpoint kept.
pub fn fit(
    trainer: &mut Trainer,
    data: &FitData,
    ckpt: &Checkpoint,
    console: &Console,
) -> Result<FitSummary> {
    let opts = trainer.options.clone();
    let by_class = class_index(data.samples);
    let steps_per_epoch = epoch_batches(data.samples, opts.batch_size, opts.seed, 0).len();
    let total = opts
        .max_steps
        .unwrap_or(usize::MAX)
        .min(steps_per_epoch * opts.epochs);
    let mut bar = console.progress(
        total as u64,
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
        let (mut sum, mut n) = (0.0, 0usize);
        for (k, batch) in epoch_batches(data.samples, opts.batch_size, opts.seed, epoch)
            .into_iter()
            .enumerate()
        {
            if trainer.progress.steps >= total {
                break 'epochs;
            }
            if crate::progress::stop_requested() {
                return Err(interrupted(trainer, ckpt));
            }
            let mut rng = SplitMix64::keyed(opts.seed, &format!("mosaic {epoch} {k}"));
            let loss = step(trainer, data, &by_class, &batch, &mut rng)?;
            (sum, n, line_sum, line_n) = (sum + loss, n + 1, line_sum + loss, line_n + 1);
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
        ckpt.dir.write(ckpt.name, &trainer.checkpoint_bytes()?)?;
        console.note(&format!(
            "epoch {}/{}: mean loss {:.5} ({} steps) -> {}",
            epoch + 1,
            opts.epochs,
            sum / n as f64,
            n,
            ckpt.dir.root().join(ckpt.name).display()
        ));
    }
    bar.finish();
    Ok(FitSummary {
        steps_run: trainer.progress.steps - steps_at_start,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The sample indices of each class.
fn class_index(samples: &[Sample]) -> HashMap<&str, Vec<usize>> {
    samples
        .iter()
        .enumerate()
        .fold(HashMap::new(), |mut m, (i, s)| {
            m.entry(s.class.as_str()).or_default().push(i);
            m
        })
}

/// One optimiser step on `batch` (sample indices of one class); returns the loss.
fn step(
    trainer: &mut Trainer,
    data: &FitData,
    by_class: &HashMap<&str, Vec<usize>>,
    batch: &[usize],
    rng: &mut SplitMix64,
) -> Result<f64> {
    let samples = data.samples;
    let size = trainer.adapter.config.image_size;
    let class = samples[batch[0]].class.as_str();
    let examples = batch
        .iter()
        .map(|&i| {
            let group = mosaic_group(
                i,
                &by_class[samples[i].class.as_str()],
                trainer.options.mosaic_rate,
                rng,
            );
            let group: Vec<&Sample> = group.into_iter().map(|j| &samples[j]).collect();
            load_example(&group, size)
                .map_err(|e| e.context(format!("cannot load {}", samples[i].image.display())))
        })
        .collect::<Result<Vec<_>>>()?;
    let device = data.vision.device().clone();
    trainer
        .step(data.model, data.vision, &data.texts[class], &examples)
        .map_err(|e| step_error(e, trainer.options.batch_size, size, &device))
        .map_err(|e| e.context(format!("training step {}", trainer.progress.steps + 1)))
}

/// A training step's error; a GPU out of memory names the setting to lower (the batch is the
/// loss's, so it is not split behind the user's back as detection's passes are).
fn step_error(e: Error, batch_size: usize, image_size: usize, device: &Device) -> Error {
    let e = crate::device::classify(e);
    if !e.is_out_of_memory() {
        return e;
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
    Error::Device(DeviceError::TrainingOutOfMemory {
        batch_size,
        image_size,
        memory,
    })
}

fn interrupted(trainer: &Trainer, ckpt: &Checkpoint) -> Error {
    Error::Interrupted {
        kept: if trainer.progress.epochs_done > 0 {
            format!(
                "the checkpoint after epoch {} is kept in {}; `resume` continues from there",
                trainer.progress.epochs_done,
                ckpt.dir.root().join(ckpt.name).display()
            )
        } else {
            "no epoch finished, so no checkpoint was written".into()
        },
    }
}
