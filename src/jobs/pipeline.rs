//! The staged pipeline every command that scores images runs (`detect`, `eval --model`,
//! `bench`): decoding and preprocessing on one thread, the model on the calling thread,
//! the consumer (rendering and writing, or metrics) on a third, with bounded queues between
//! them so memory stays flat however many images there are. Per-input problems (a file that
//! does not decode, a model that gives NaN) become [`Outcome::Failed`] for that input; every
//! other input goes on.

use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use rayon::prelude::*;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::data::image::{decode_rgb, panic_text, strip_path, DecodeLimits};
use crate::error::{DeviceError, Error, Result};
use crate::method::{Detection, Detector, StageTimes};
use crate::progress::Console;

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

/// The most images `--batch-size 0` puts in one pass on a GPU.
pub const GPU_AUTO_MAX: usize = 64;

/// Images per model pass: `--batch-size` (at most [`MAX_BATCH_SIZE`]), or for 0 about 1024
/// tokens on the CPU ([`auto_batch`]) and what half of a GPU's free memory holds
/// ([`crate::device::gpu_batch`], at most [`GPU_AUTO_MAX`]).
pub fn pass_size(detector: &Detector, requested: usize) -> usize {
    match requested {
        0 => match crate::device::memory(detector.device()) {
            Some((free, _)) => {
                crate::device::gpu_batch(free, detector.bytes_per_image(), GPU_AUTO_MAX)
            }
            None => auto_batch(detector.image_tokens()),
        },
        n => n.min(MAX_BATCH_SIZE),
    }
    .max(1)
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

/// What the images in flight may take, in bytes of image-sized buffers: a run's memory is
/// bounded by this (and the model), not by how many large images a folder holds.
pub const IN_FLIGHT_BYTES: u64 = 768 << 20;

/// Bytes per pixel an image holds from decoding to its record: the RGB frame (3), its map at
/// full size (4), the heatmap (3), the mask (1) and encoding buffers (1).
const BYTES_PER_PIXEL: u64 = 12;

/// A counting budget of bytes in flight between the stages. One item is always let through,
/// so an image larger than the whole budget still runs, alone.
struct Budget {
    max: u64,
    used: std::sync::Mutex<u64>,
    freed: std::sync::Condvar,
    /// Whether the producer waits for room: the model stage then runs the items it has
    /// instead of waiting for a full pass.
    waiting: std::sync::atomic::AtomicBool,
}

/// An item's share of the [`Budget`], given back when dropped (its record written).
struct Ticket<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Budget {
    fn new(max: u64) -> Self {
        Self {
            max,
            used: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
            waiting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn is_waiting(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `bytes` fit (or nothing else is in flight) and takes them.
    fn take(&self, bytes: u64) -> Ticket<'_> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + bytes > self.max {
            self.waiting
                .store(true, std::sync::atomic::Ordering::SeqCst);
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        self.waiting
            .store(false, std::sync::atomic::Ordering::SeqCst);
        *used += bytes;
        Ticket {
            budget: self,
            bytes,
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= self.bytes;
        self.budget.freed.notify_all();
    }
}

struct Prepared<T> {
    item: T,
    result: std::result::Result<(RgbImage, Tensor), String>,
    decode: f64,
    resize: f64,
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
/// returned; per-input problems never do. A stop request (`progress::stop_requested`)
/// ends the feeding of new items: the items in flight are finished and handed on, the rest are
/// not.
pub fn run<T, P, C>(
    items: Vec<T>,
    path_of: P,
    detector: &Detector,
    opts: &PipelineOptions,
    console: &Console,
    consume: C,
) -> Result<StageSeconds>
where
    T: Send,
    P: Fn(&T) -> &Path + Sync,
    C: FnMut(T, Outcome) -> Result<()> + Send,
{
    run_with(items, path_of, detector, opts, console, |_, o| o, consume)
}

/// The stages of one run: what they share, and each stage over a pass of items.
struct Stages<'a, P, R> {
    detector: &'a Detector,
    console: &'a Console,
    path_of: P,
    render: R,
    batch: usize,
    size: usize,
    dev: Device,
    /// Decode and render a pass's worth on all cores (a GPU runs the model).
    parallel: bool,
    limits: DecodeLimits,
}

impl<P, R> Stages<'_, P, R> {
    fn prepare_all<T: Send>(&self, chunk: Vec<T>) -> Vec<Prepared<T>>
    where
        P: Fn(&T) -> &Path + Sync,
        R: Sync,
    {
        let one = |item: T| {
            let p = (self.path_of)(&item).to_path_buf();
            prepare(item, &p, self.size, &self.dev, &self.limits)
        };
        if self.parallel {
            chunk.into_par_iter().map(one).collect()
        } else {
            chunk.into_iter().map(one).collect()
        }
    }

    fn render_all<T: Send, U: Send>(&self, scored: Vec<(T, Outcome)>) -> Vec<(T, U)>
    where
        P: Sync,
        R: Fn(&T, Outcome) -> U + Sync,
    {
        let one = |(item, outcome): (T, Outcome)| {
            let u = (self.render)(&item, outcome);
            (item, u)
        };
        if self.parallel {
            scored.into_par_iter().map(one).collect()
        } else {
            scored.into_iter().map(one).collect()
        }
    }

    fn score<T>(
        &self,
        prepared: Vec<Prepared<T>>,
        secs: &mut StageSeconds,
        limit: &mut usize,
    ) -> Result<Vec<(T, Outcome)>> {
        score_batch(self.detector, self.console, prepared, secs, limit)
    }
}

/// [`run`] with a `render` step between the model and `consume`: `render` turns an item's
/// outcome into what `consume` writes (encoded files, say), and can run for several items at
/// once. When the model runs on a GPU, the inputs of a pass are decoded and the outcomes of a
/// pass rendered on all cores (rayon), so that decoding and PNG encoding keep up with the GPU;
/// on the CPU each keeps its one thread beside the model, whose GEMMs have the cores.
pub fn run_with<T, U, P, R, C>(
    items: Vec<T>,
    path_of: P,
    detector: &Detector,
    opts: &PipelineOptions,
    console: &Console,
    render: R,
    consume: C,
) -> Result<StageSeconds>
where
    T: Send,
    U: Send,
    P: Fn(&T) -> &Path + Sync,
    R: Fn(&T, Outcome) -> U + Sync,
    C: FnMut(T, U) -> Result<()> + Send,
{
    if items.is_empty() {
        return Ok(StageSeconds::default());
    }
    let dev = detector.device().clone();
    let stages = Stages {
        detector,
        console,
        path_of,
        render,
        batch: pass_size(detector, opts.batch_size).min(items.len()).max(1),
        size: detector.image_size(),
        parallel: !dev.is_cpu(),
        dev,
        limits: opts.limits,
    };
    if opts.overlap {
        overlapped(&stages, items, consume)
    } else {
        sequential(&stages, items, consume)
    }
}

/// The stages one after another on the calling thread, a pass at a time (so that per-stage
/// times add up to the total, as `zsad bench` reports them).
fn sequential<T, U, P, R, C>(
    stages: &Stages<P, R>,
    items: Vec<T>,
    mut consume: C,
) -> Result<StageSeconds>
where
    T: Send,
    U: Send,
    P: Fn(&T) -> &Path + Sync,
    R: Fn(&T, Outcome) -> U + Sync,
    C: FnMut(T, U) -> Result<()>,
{
    let mut secs = StageSeconds::default();
    // Lowered for the rest of the run when a GPU runs out of memory.
    let mut limit = stages.batch;
    let mut pending = items.into_iter().peekable();
    while pending.peek().is_some() && !crate::progress::stop_requested() {
        let prepared = stages.prepare_all(pending.by_ref().take(stages.batch).collect());
        let scored = stages.score(prepared, &mut secs, &mut limit)?;
        let t = Instant::now();
        for (item, u) in stages.render_all(scored) {
            consume(item, u)?;
        }
        secs.consume += t.elapsed().as_secs_f64();
    }
    Ok(secs)
}

/// Decoding, the model and the consumer on three threads with two passes in flight between
/// each, so that memory stays flat however many items there are.
fn overlapped<T, U, P, R, C>(
    stages: &Stages<P, R>,
    items: Vec<T>,
    mut consume: C,
) -> Result<StageSeconds>
where
    T: Send,
    U: Send,
    P: Fn(&T) -> &Path + Sync,
    R: Fn(&T, Outcome) -> U + Sync,
    C: FnMut(T, U) -> Result<()> + Send,
{
    let batch = stages.batch;
    let mut secs = StageSeconds::default();
    let mut limit = batch;
    let budget = Budget::new(IN_FLIGHT_BYTES);
    let budget = &budget;
    let (tx, rx) = mpsc::sync_channel::<Prepared<(T, Ticket)>>(2 * batch);
    let (out_tx, out_rx) = mpsc::sync_channel::<((T, Ticket), Outcome)>(2 * batch);
    std::thread::scope(|scope| -> Result<StageSeconds> {
        scope.spawn(move || {
            let mut items = items.into_iter().peekable();
            while items.peek().is_some() && !crate::progress::stop_requested() {
                // One item at a time on the CPU (its thread beside the model), a pass's worth
                // at once on all cores for a GPU.
                let n = if stages.parallel { batch } else { 1 };
                for p in stages.prepare_all(items.by_ref().take(n).collect()) {
                    let bytes = match &p.result {
                        Ok((image, _)) => {
                            image.width() as u64 * image.height() as u64 * BYTES_PER_PIXEL
                        }
                        Err(_) => 0,
                    };
                    let ticket = budget.take(bytes);
                    let p = Prepared {
                        item: (p.item, ticket),
                        result: p.result,
                        decode: p.decode,
                        resize: p.resize,
                    };
                    if tx.send(p).is_err() {
                        return; // the model stage stopped
                    }
                }
            }
        });
        let consumer = scope.spawn(move || -> Result<f64> {
            let mut spent = 0.0;
            while let Ok(first) = out_rx.recv() {
                // What has arrived, up to a pass's worth, rendered together.
                let mut ready = vec![first];
                while ready.len() < batch {
                    match out_rx.try_recv() {
                        Ok(next) => ready.push(next),
                        Err(_) => break,
                    }
                }
                let t = Instant::now();
                // The tickets are given back once their records are written.
                let (ready, tickets): (Vec<_>, Vec<_>) = ready
                    .into_iter()
                    .map(|((item, ticket), o)| ((item, o), ticket))
                    .unzip();
                for (item, u) in stages.render_all(ready) {
                    consume(item, u)?;
                }
                drop(tickets);
                spent += t.elapsed().as_secs_f64();
            }
            Ok(spent)
        });
        'batches: while let Ok(first) = rx.recv() {
            let prepared = fill_pass(first, &rx, batch, budget);
            for scored in stages.score(prepared, &mut secs, &mut limit)? {
                if out_tx.send(scored).is_err() {
                    break 'batches; // the consumer stopped on an error, returned below
                }
            }
        }
        drop(out_tx);
        drop(rx);
        secs.consume = consumer
            .join()
            .map_err(|p| Error::output(format!("the output stage failed: {}", panic_text(&p))))??;
        Ok(secs.clone())
    })
}

/// A pass of up to `batch` items, starting with `first`: waits for more until the pass is full,
/// the inputs end, or the producer waits for memory (the items in flight must move on first).
fn fill_pass<P>(first: P, rx: &mpsc::Receiver<P>, batch: usize, budget: &Budget) -> Vec<P> {
    let mut pass = vec![first];
    while pass.len() < batch {
        match rx.recv_timeout(std::time::Duration::from_millis(5)) {
            Ok(p) => pass.push(p),
            Err(mpsc::RecvTimeoutError::Timeout) if budget.is_waiting() => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    pass
}

/// Runs `run` over `0..n` in consecutive parts of at most `*limit` items. When a part runs
/// the GPU out of memory it is halved and tried again, and `*limit` stays lowered for the rest
/// of the run (`shrunk(from, to)` is told); out of memory with one item is an
/// [`Error::Device`]. Other errors end the parts and are returned.
pub(crate) fn in_parts<D>(
    n: usize,
    limit: &mut usize,
    mut run: impl FnMut(std::ops::Range<usize>) -> Result<Vec<D>>,
    mut shrunk: impl FnMut(usize, usize),
) -> Result<Vec<D>> {
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let len = (*limit).clamp(1, n - start);
        match run(start..start + len) {
            Ok(v) => {
                out.extend(v);
                start += len;
            }
            Err(e) if e.is_out_of_memory() => {
                if len == 1 {
                    return Err(Error::Device(DeviceError::OneImageTooLarge {
                        detail: e.to_string().lines().next().unwrap_or("").to_string(),
                    }));
                }
                *limit = len / 2;
                shrunk(len, *limit);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The detector over preprocessed images, `*limit` to a pass at most, halving the pass on a
/// GPU out of memory (see [`in_parts`], which says so on `console`); with `times`, each
/// stage's wall time is added there. Shared by the pipeline and the in-memory job
/// (`jobs::single`).
pub(crate) fn detect_in_parts<P: AsRef<Tensor>>(
    detector: &Detector,
    pixels: &[P],
    limit: &mut usize,
    console: &Console,
    mut times: Option<&mut StageTimes>,
) -> Result<Vec<Detection>> {
    in_parts(
        pixels.len(),
        limit,
        |part| {
            let d = Tensor::stack(&pixels[part.clone()], 0)
                .map_err(Error::from)
                .and_then(|px| detector.detect_timed(&px, times.as_deref_mut()))
                .map_err(crate::device::classify)?;
            if d.len() == part.len() {
                Ok(d)
            } else {
                Err(Error::InvalidArgument(format!(
                    "{} detections for {} images",
                    d.len(),
                    part.len()
                )))
            }
        },
        |from, to| {
            console.warn(&format!(
                "the GPU ran out of memory with {from} images per pass; going on with {to} (`batch_size` {to} starts there)"
            ))
        },
    )
}

/// One model pass (or several of at most `*limit` images, see [`in_parts`]) over the inputs of
/// a batch that decoded; the others pass through, in order. A GPU that cannot hold even one
/// image is an error for the run.
fn score_batch<T>(
    detector: &Detector,
    console: &Console,
    prepared: Vec<Prepared<T>>,
    secs: &mut StageSeconds,
    limit: &mut usize,
) -> Result<Vec<(T, Outcome)>> {
    for p in &prepared {
        secs.decode += p.decode;
        secs.resize += p.resize;
    }
    let ok: Vec<&Tensor> = prepared
        .iter()
        .filter_map(|p| p.result.as_ref().ok().map(|(_, px)| px))
        .collect();
    let dets = detect_in_parts(detector, &ok, limit, console, Some(&mut secs.model));
    let mut dets = match dets {
        Err(e @ Error::Device(DeviceError::OneImageTooLarge { .. })) => return Err(e),
        other => other.map(|d| d.into_iter()),
    };
    Ok(prepared
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
        .collect())
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

    /// A pretend GPU that holds at most `fits` images per pass.
    fn pretend(
        fits: usize,
        calls: &mut Vec<usize>,
        part: std::ops::Range<usize>,
    ) -> Result<Vec<usize>> {
        calls.push(part.len());
        if part.len() > fits {
            Err(Error::Device(DeviceError::OutOfMemory {
                detail: "CUDA_ERROR_OUT_OF_MEMORY".into(),
            }))
        } else {
            Ok(part.collect())
        }
    }

    #[test]
    fn out_of_memory_halves_the_pass_and_keeps_it_lowered() {
        let (mut calls, mut told) = (Vec::new(), Vec::new());
        let mut limit = 8;
        let got = in_parts(
            10,
            &mut limit,
            |p| pretend(3, &mut calls, p),
            |a, b| told.push((a, b)),
        )
        .unwrap();
        assert_eq!(got, (0..10).collect::<Vec<_>>(), "every item, in order");
        assert_eq!(limit, 2);
        assert_eq!(told, [(8, 4), (4, 2)]);
        assert_eq!(calls, [8, 4, 2, 2, 2, 2, 2]);
        // The lowered limit carries over to the next batch.
        calls.clear();
        in_parts(3, &mut limit, |p| pretend(3, &mut calls, p), |_, _| {}).unwrap();
        assert_eq!(calls, [2, 1]);
    }

    #[test]
    fn out_of_memory_with_one_image_is_an_error_and_other_errors_pass_through() {
        let mut limit = 4;
        let e = in_parts(5, &mut limit, |p| pretend(0, &mut Vec::new(), p), |_, _| {}).unwrap_err();
        assert!(
            matches!(e, Error::Device(DeviceError::OneImageTooLarge { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("one image per pass"), "{e}");
        let e = in_parts(
            5,
            &mut 4,
            |_| -> Result<Vec<u8>> { Err(Error::InvalidArgument("shape".into())) },
            |_, _| panic!("not out of memory"),
        )
        .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        assert!(
            in_parts(0, &mut 4, |_| -> Result<Vec<u8>> { panic!() }, |_, _| {})
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn non_finite_detections_are_errors() {
        assert!(check_finite(&det(0.3, vec![0.0, 0.1, 0.2, 1.0])).is_ok());
        let e = check_finite(&det(f32::NAN, vec![0.0; 4])).unwrap_err();
        assert!(e.contains("NaN") && e.contains("score NaN"), "{e}");
        let e = check_finite(&det(0.3, vec![0.0, f32::INFINITY, f32::NAN, 0.0])).unwrap_err();
        assert!(e.contains("2 of 4 map values"), "{e}");
    }

    /// The budget lets one oversized item through alone, holds back what does not fit until
    /// an item in flight is given back, and says the producer waits meanwhile.
    #[test]
    fn the_memory_budget_bounds_what_is_in_flight() {
        let b = Budget::new(100);
        let big = b.take(250);
        assert_eq!(*b.used.lock().unwrap(), 250);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let ticket = b.take(60);
                let used = *b.used.lock().unwrap();
                drop(ticket);
                used
            });
            while !b.is_waiting() {
                std::thread::yield_now();
            }
            drop(big);
            assert_eq!(waiter.join().unwrap(), 60);
        });
        assert!(!b.is_waiting());
        assert_eq!(*b.used.lock().unwrap(), 0);
        let (x, y) = (b.take(50), b.take(50));
        assert_eq!(*b.used.lock().unwrap(), 100);
        drop((x, y));
    }

    #[test]
    fn auto_batch_targets_1024_tokens() {
        assert_eq!(auto_batch(197), 5); // ViT-B/16 at 224
        assert_eq!(auto_batch(1370), 1); // ViT-L/14 at 518
        assert_eq!(auto_batch(50), 8);
        assert_eq!(auto_batch(0), 8);
    }
}
