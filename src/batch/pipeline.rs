//! The staged pipeline every command that scores images runs (`detect`, `eval --model`,
//! `bench`): decoding and preprocessing on one thread, the model on the calling thread,
//! the consumer (rendering and writing, or metrics) on a third, with bounded queues between
//! them so memory stays flat however many images there are. Per-input problems (a file that
//! does not decode, a model that gives NaN) become [`Outcome::Failed`] for that input; every
//! other input goes on.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::data::image::DecodeLimits;
use crate::method::{Detection, Detector, StageTimes};
use crate::{Error, Result};

/// The largest `--batch-size`: far past the point where batching pays on any device (8 images
/// already amortise the weight reads on a CPU), and small enough that a mistyped flag cannot
/// ask for hundreds of gigabytes.
pub const MAX_BATCH_SIZE: usize = 256;

/// How the pipeline runs.
#[derive(Debug, Clone, Copy)]
pub struct PipelineOptions {
    /// Images per model pass; 0 picks about 1024 tokens per pass ([`auto_batch`]). Never more
    /// than there are inputs.
    pub batch_size: usize,
    /// What one input may cost before it is refused.
    pub limits: DecodeLimits,
    /// Run the three stages on their own threads (false: one after another on the calling
    /// thread, so per-stage times add up to the total, as `zsad bench` reports them).
    pub overlap: bool,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            batch_size: 0,
            limits: DecodeLimits::default(),
            overlap: true,
        }
    }
}

/// `--batch-size 0`: enough images for about 1024 tokens per pass (GEMMs with few rows re-read
/// every weight per image), at most 8.
pub fn auto_batch(tokens: usize) -> usize {
    (1024 / tokens.max(1)).clamp(1, 8)
}

/// What became of one input.
pub enum Outcome {
    Scored {
        /// The decoded image (8-bit RGB, EXIF orientation applied), for maps at its size.
        image: RgbImage,
        detection: Detection,
    },
    /// Why it could not be scored (the record's `error`; the path is not repeated).
    Failed(String),
}

/// Seconds spent in each stage, summed over the inputs.
#[derive(Debug, Clone, Default)]
pub struct StageSeconds {
    pub decode: f64,
    pub resize: f64,
    pub model: StageTimes,
    /// In the consumer.
    pub consume: f64,
}

struct Prepared<T> {
    item: T,
    result: std::result::Result<(RgbImage, Tensor), String>,
    decode: f64,
    resize: f64,
}

fn strip_path(msg: String, path: &Path) -> String {
    // Image errors name the file; the record's path already says which input it was.
    let prefix = format!("{}: ", path.display());
    msg.strip_prefix(&prefix).map(str::to_string).unwrap_or(msg)
}

fn prepare<T>(
    item: T,
    path: &Path,
    size: usize,
    dev: &Device,
    limits: &DecodeLimits,
) -> Prepared<T> {
    let (result, decode, resize) = decode_for_model(path, size, dev, limits);
    Prepared {
        item,
        result,
        decode,
        resize,
    }
}

/// Decodes `path` within `limits` and preprocesses it for a model at `size`: the image and its
/// pixels `[3, S, S]`, or why not (the path left out), with the seconds spent decoding and
/// resizing.
pub(crate) fn decode_for_model(
    path: &Path,
    size: usize,
    dev: &Device,
    limits: &DecodeLimits,
) -> (std::result::Result<(RgbImage, Tensor), String>, f64, f64) {
    let t0 = Instant::now();
    let decoded = decode_rgb(path, limits);
    let decode = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let result = decoded.and_then(|rgb| {
        crate::clip::preprocess::preprocess(&rgb, size, dev)
            .map(|px| (rgb, px))
            .map_err(|e| strip_path(e.to_string(), path))
    });
    (result, decode, t1.elapsed().as_secs_f64())
}

/// Decodes `path` within `limits` to 8-bit RGB (EXIF orientation applied), or says why not
/// (the path left out). A decoder bug must cost one input, not the run: a panic inside it is
/// that input's error.
pub(crate) fn decode_rgb(
    path: &Path,
    limits: &DecodeLimits,
) -> std::result::Result<RgbImage, String> {
    let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| {
        crate::data::image::decode_limited(path, limits)
            .map(|img| crate::data::image::to_rgb8(&img))
    }));
    match decoded {
        Err(panic) => Err(format!(
            "the image decoder failed on this file ({}); the file is probably malformed",
            panic_text(&panic)
        )),
        Ok(Err(e)) => Err(strip_path(e.to_string(), path)),
        Ok(Ok(rgb)) => Ok(rgb),
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// A detection is only a result if every number in it is: NaN or infinity (from NaN weights,
/// an adapter trained into overflow) is that input's error, never a `null` score.
pub fn check_finite(d: &Detection) -> std::result::Result<(), String> {
    let bad_map = d.map.iter().filter(|v| !v.is_finite()).count();
    if d.score.is_finite() && d.global.is_finite() && bad_map == 0 {
        return Ok(());
    }
    Err(format!(
        "the model gave non-finite values (score {}, global score {}, {} of {} map values): the model or adapter weights hold NaN or infinity",
        d.score,
        d.global,
        bad_map,
        d.map.len()
    ))
}

/// Runs `detector` over `items` and hands each item, in order, with its [`Outcome`] to
/// `consume`. An error from `consume` (an output that cannot be written) stops the run and is
/// returned; per-input problems never do.
pub fn run<T, P, C>(
    items: Vec<T>,
    path_of: P,
    detector: &Detector,
    opts: &PipelineOptions,
    mut consume: C,
) -> Result<StageSeconds>
where
    T: Send,
    P: Fn(&T) -> &Path + Sync,
    C: FnMut(T, Outcome) -> Result<()> + Send,
{
    if items.is_empty() {
        return Ok(StageSeconds::default());
    }
    let batch = match opts.batch_size {
        0 => auto_batch(detector.image_tokens()),
        n => n.min(MAX_BATCH_SIZE),
    }
    .min(items.len())
    .max(1);
    let size = detector.image_size();
    let dev = detector.device().clone();
    let limits = opts.limits;
    let mut secs = StageSeconds::default();

    if !opts.overlap {
        let mut pending = items.into_iter().peekable();
        while pending.peek().is_some() {
            let prepared: Vec<_> = pending
                .by_ref()
                .take(batch)
                .map(|item| {
                    let p = path_of(&item).to_path_buf();
                    prepare(item, &p, size, &dev, &limits)
                })
                .collect();
            for (item, outcome) in score_batch(detector, prepared, &mut secs) {
                let t = Instant::now();
                consume(item, outcome)?;
                secs.consume += t.elapsed().as_secs_f64();
            }
        }
        return Ok(secs);
    }

    let (tx, rx) = mpsc::sync_channel::<Prepared<T>>(2 * batch);
    let (out_tx, out_rx) = mpsc::sync_channel::<(T, Outcome)>(2 * batch);
    std::thread::scope(|scope| -> Result<StageSeconds> {
        let path_of = &path_of;
        let dev = &dev;
        scope.spawn(move || {
            for item in items {
                let p = path_of(&item).to_path_buf();
                if tx.send(prepare(item, &p, size, dev, &limits)).is_err() {
                    break; // the model stage stopped
                }
            }
        });
        let consumer = scope.spawn(move || -> Result<f64> {
            let mut spent = 0.0;
            for (item, outcome) in out_rx {
                let t = Instant::now();
                consume(item, outcome)?;
                spent += t.elapsed().as_secs_f64();
            }
            Ok(spent)
        });
        let mut pending = rx.into_iter().peekable();
        'batches: while pending.peek().is_some() {
            let prepared: Vec<_> = pending.by_ref().take(batch).collect();
            for scored in score_batch(detector, prepared, &mut secs) {
                if out_tx.send(scored).is_err() {
                    break 'batches; // the consumer stopped on an error, returned below
                }
            }
        }
        drop(out_tx);
        drop(pending);
        secs.consume = consumer
            .join()
            .map_err(|p| Error::Output(format!("the output stage failed: {}", panic_text(&p))))??;
        Ok(secs.clone())
    })
}

/// One model pass over the inputs of a batch that decoded; the others pass through, in order.
fn score_batch<T>(
    detector: &Detector,
    prepared: Vec<Prepared<T>>,
    secs: &mut StageSeconds,
) -> Vec<(T, Outcome)> {
    for p in &prepared {
        secs.decode += p.decode;
        secs.resize += p.resize;
    }
    let ok: Vec<&Tensor> = prepared
        .iter()
        .filter_map(|p| p.result.as_ref().ok().map(|(_, px)| px))
        .collect();
    let dets = if ok.is_empty() {
        Ok(Vec::new())
    } else {
        Tensor::stack(&ok, 0)
            .map_err(Error::from)
            .and_then(|px| detector.detect_timed(&px, Some(&mut secs.model)))
            .and_then(|d| {
                if d.len() == ok.len() {
                    Ok(d)
                } else {
                    Err(Error::InvalidArgument(format!(
                        "{} detections for {} images",
                        d.len(),
                        ok.len()
                    )))
                }
            })
    };
    let mut dets = dets.map(|d| d.into_iter());
    prepared
        .into_iter()
        .map(|p| {
            let outcome = match (p.result, &mut dets) {
                (Err(e), _) => Outcome::Failed(e),
                (Ok((image, _)), Ok(d)) => {
                    let detection = d.next().expect("counted above");
                    match check_finite(&detection) {
                        Ok(()) => Outcome::Scored { image, detection },
                        Err(e) => Outcome::Failed(e),
                    }
                }
                (Ok(_), Err(e)) => Outcome::Failed(format!("model: {e}")),
            };
            (p.item, outcome)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(score: f32, map: Vec<f32>) -> Detection {
        Detection {
            global: 0.5,
            score,
            size: 2,
            map,
        }
    }

    #[test]
    fn non_finite_detections_are_errors() {
        assert!(check_finite(&det(0.3, vec![0.0, 0.1, 0.2, 1.0])).is_ok());
        let e = check_finite(&det(f32::NAN, vec![0.0; 4])).unwrap_err();
        assert!(e.contains("NaN") && e.contains("score NaN"), "{e}");
        let e = check_finite(&det(0.3, vec![0.0, f32::INFINITY, f32::NAN, 0.0])).unwrap_err();
        assert!(e.contains("2 of 4 map values"), "{e}");
    }

    #[test]
    fn auto_batch_targets_1024_tokens() {
        assert_eq!(auto_batch(197), 5); // ViT-B/16 at 224
        assert_eq!(auto_batch(1370), 1); // ViT-L/14 at 518
        assert_eq!(auto_batch(50), 8);
        assert_eq!(auto_batch(0), 8);
    }
}
