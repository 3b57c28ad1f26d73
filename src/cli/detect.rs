//! `zsad detect`: score images, write maps, heatmaps and one record per input.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use image::RgbImage;

use super::detector_args::{tokenizer, DetectorArgs};
use super::{EXIT_OK, EXIT_SOME_FAILED};
use crate::data::inputs::{self, Input, Shard};
use crate::data::outputs::{self, HeatmapKind, Record, RecordFormat, RecordLog};
use crate::method::{Detection, Detector, TextInputs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MapFormat {
    /// 16-bit grey PNG, value = round(p · 65535)
    Png,
    /// float32 NumPy array (full precision)
    Npy,
    /// no map files (scores only)
    None,
}

/// The files written per input (shared with `zsad bench`, which times producing them).
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Anomaly map files under DIR/maps/, at each image's own size
    #[arg(long, value_enum, default_value = "png")]
    pub maps: MapFormat,
    /// Heatmaps under DIR/heatmaps/ (inferno colormap, fixed [0, 1] scale)
    #[arg(long, value_enum, default_value = "overlay")]
    pub heatmaps: HeatmapKind,
    /// Opacity of the colour in overlay heatmaps
    #[arg(long, default_value_t = 0.5, value_name = "A")]
    pub heatmap_alpha: f32,
}

#[derive(Debug, Args)]
pub struct DetectArgs {
    /// Images, folders (searched recursively for png/jpg/jpeg/bmp/tif/tiff/webp) or `-` to read
    /// one path per line from stdin
    #[arg(value_name = "INPUT", required = true)]
    pub inputs: Vec<String>,
    #[command(flatten)]
    pub detector: DetectorArgs,
    /// Output folder (created); the input folders are never written to
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Record file format: DIR/scores.jsonl or DIR/scores.csv
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: RecordFormat,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Adds `"anomalous": score >= T` to every record
    #[arg(long, value_name = "T")]
    pub threshold: Option<f32>,
    /// Continue a run: skip inputs that already have a record (scored or failed)
    #[arg(long)]
    pub resume: bool,
    /// With --resume: score failed inputs again, replacing their records
    #[arg(long, requires = "resume")]
    pub retry_failed: bool,
    /// Start again, replacing an existing record file
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Score only shard K of N (0-based), chosen by a stable hash of each path, so N machines
    /// split a dataset; give each its own --out and join them with `zsad merge`
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Shard>,
    /// Images per model pass; 0 = about 1024 tokens per pass, at most 8 (ViT-B/16 at 224: 5
    /// images, 16% less time per image on a CPU than one at a time; ViT-L at 518: 1). Scores do
    /// not depend on it beyond float rounding
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub batch_size: usize,
    /// No progress bar or per-file warnings (the exit status still tells)
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// `--batch-size 0`: enough images for about 1024 tokens per pass (GEMMs with few rows re-read
/// every weight per image), at most 8.
fn auto_batch(tokens: usize) -> usize {
    (1024 / tokens.max(1)).clamp(1, 8)
}

/// A decoded, preprocessed input on its way to the model.
struct Prepared {
    input: Input,
    result: Result<(RgbImage, candle_core::Tensor), String>,
}

fn prepare(input: Input, size: usize, dev: &candle_core::Device) -> Prepared {
    let result = (|| -> crate::Result<(RgbImage, candle_core::Tensor)> {
        let img = crate::data::image::decode(&input.path)?;
        let rgb = crate::data::image::to_rgb8(&img);
        let pixels = crate::clip::preprocess::preprocess(&rgb, size, dev)?;
        Ok((rgb, pixels))
    })()
    .map_err(|e| {
        // Image errors already name the file; the record's path says which input it was.
        let msg = e.to_string();
        let prefix = format!("{}: ", input.path.display());
        msg.strip_prefix(&prefix).unwrap_or(&msg).to_string()
    });
    Prepared { input, result }
}

/// What the model thread hands to the writing thread.
enum Scored {
    Done(Input, RgbImage, Detection),
    Failed(Record),
}

/// One scored input's files as bytes, with the statistics of its map at the image's size.
pub struct Rendered {
    /// `(path relative to the output folder, bytes)`: the map, then the heatmap.
    pub files: Vec<(String, Vec<u8>)>,
    pub map: Option<String>,
    pub heatmap: Option<String>,
    pub map_max: f32,
    pub map_mean: f32,
}

/// Resizes the map to the image and encodes what `opts` asks for, under `key` (the input's
/// name without extension).
pub fn render_outputs(
    opts: &OutputArgs,
    key: &Path,
    rgb: &RgbImage,
    det: &Detection,
) -> anyhow::Result<Rendered> {
    let (w, h) = rgb.dimensions();
    let map = crate::method::maps::resize_map(&det.map, det.size, det.size, h as usize, w as usize);
    let rel = |dir: &str, ext: &str| -> String {
        let mut p = PathBuf::from(dir);
        p.push(key);
        let mut s = p.into_os_string();
        s.push(".");
        s.push(ext);
        PathBuf::from(s).to_string_lossy().replace('\\', "/")
    };
    let mut files = Vec::new();
    let map_rel = match opts.maps {
        MapFormat::Png => Some((rel("maps", "png"), outputs::map_png(&map, w, h)?)),
        MapFormat::Npy => Some((rel("maps", "npy"), outputs::map_npy(&map, w, h))),
        MapFormat::None => None,
    }
    .map(|(r, bytes)| {
        files.push((r.clone(), bytes));
        r
    });
    let heat_rel = match opts.heatmaps {
        HeatmapKind::None => None,
        kind => {
            let r = rel("heatmaps", "png");
            let under = (kind == HeatmapKind::Overlay).then_some(rgb);
            let img = outputs::heatmap(&map, under, w, h, opts.heatmap_alpha);
            files.push((r.clone(), outputs::png_bytes_rgb(&img)?));
            Some(r)
        }
    };
    Ok(Rendered {
        files,
        map: map_rel,
        heatmap: heat_rel,
        map_max: map.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        map_mean: (map.iter().map(|&v| v as f64).sum::<f64>() / map.len() as f64) as f32,
    })
}

/// Writes every file atomically under `out`.
pub fn write_rendered(out: &Path, rendered: &Rendered) -> anyhow::Result<()> {
    for (rel, bytes) in &rendered.files {
        outputs::write_atomic(&out.join(rel), bytes)?;
    }
    Ok(())
}

/// Writes the files of one scored input and returns its record.
fn write_outputs(
    args: &DetectArgs,
    input: &Input,
    rgb: &RgbImage,
    det: &Detection,
) -> anyhow::Result<Record> {
    let r = render_outputs(&args.output, &input.key, rgb, det)?;
    write_rendered(&args.out, &r)?;
    let (w, h) = rgb.dimensions();
    Ok(Record {
        path: input.given.clone(),
        score: Some(det.score),
        global_score: Some(det.global),
        map_max: Some(r.map_max),
        map_mean: Some(r.map_mean),
        anomalous: args.threshold.map(|t| det.score >= t),
        width: Some(w),
        height: Some(h),
        map: r.map,
        heatmap: r.heatmap,
        error: None,
    })
}

/// Holds an exclusive lock on `DIR/.zsad.lock` while a run writes there.
fn lock_out_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(".zsad.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another zsad process is writing to {} (give each run or shard its own --out)",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

pub fn run(args: DetectArgs) -> anyhow::Result<u8> {
    if args.inputs.iter().filter(|a| *a == "-").count() > 1 {
        bail!("`-` (read paths from stdin) may be given once");
    }
    let (loaded, adapter) = args.detector.setup(args.quiet)?;
    let tok = tokenizer(&args.detector.tokenizer, &loaded)?;
    let inputs_text = TextInputs::build(&adapter.config, &tok)?;
    let detector = Detector::new(&loaded.model, &adapter, inputs_text)
        .context("cannot set up the detector")?;

    let _lock = lock_out_dir(&args.out)?;
    let log_path = args.out.join(args.format.file_name());
    let mut kept: Vec<Record> = Vec::new();
    if log_path.exists() && std::fs::metadata(&log_path)?.len() > 0 {
        if args.resume {
            let (records, torn) = outputs::read_records(&log_path)?;
            if !torn.is_empty() && !args.quiet {
                eprintln!(
                    "zsad: warning: {}: dropping {} unreadable line(s) ({:?}); those inputs are scored again",
                    log_path.display(),
                    torn.len(),
                    torn
                );
            }
            kept = records
                .into_iter()
                .filter(|r| !(args.retry_failed && r.is_failure()))
                .collect();
        } else if !args.overwrite {
            bail!(
                "{} exists: pass --resume to continue that run or --overwrite to start again",
                log_path.display()
            );
        }
    }
    let done: std::collections::HashSet<String> = kept.iter().map(|r| r.path.clone()).collect();

    let (all, missing) = inputs::expand(&args.inputs, &mut std::io::stdin().lock())?;
    let in_shard = |given: &str| args.shard.is_none_or(|s| s.contains(given));
    let todo: Vec<Input> = all
        .into_iter()
        .filter(|i| in_shard(&i.given) && !done.contains(&i.given))
        .collect();
    let missing: Vec<_> = missing
        .into_iter()
        .filter(|m| in_shard(&m.given) && !done.contains(&m.given))
        .collect();
    let skipped = done.len();
    let prior_failed = kept.iter().filter(|r| r.is_failure()).count();

    let mut log = RecordLog::create(&log_path, args.format, &kept)?;
    let mut failed = 0usize;
    let mut scored = 0usize;
    let show = !args.quiet;
    for m in &missing {
        if show {
            eprintln!("zsad: {}: {}", m.given, m.error);
        }
        log.append(&Record::failed(&m.given, &m.error))?;
        failed += 1;
    }

    let bar = if show && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(todo.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} images  {per_sec}  ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );

    let started = std::time::Instant::now();
    // Three stages overlap: decoding and resizing on one thread, the model on this one, map
    // resizing, PNG encoding and writing on a third. Both channels are bounded, so memory stays
    // flat however many images there are.
    let size = detector.image_size();
    let dev = detector.device().clone();
    let batch = match args.batch_size {
        0 => auto_batch(detector.image_tokens()),
        n => n,
    };
    let (tx, rx) = mpsc::sync_channel::<Prepared>(2 * batch);
    let (out_tx, out_rx) = mpsc::sync_channel::<Scored>(2 * batch);
    let args_ref = &args;
    let (scored_now, failed_now) = std::thread::scope(|scope| -> anyhow::Result<(usize, usize)> {
        scope.spawn(move || {
            for input in todo {
                if tx.send(prepare(input, size, &dev)).is_err() {
                    break;
                }
            }
        });
        let bar_w = bar.clone();
        let writer = scope.spawn(move || -> anyhow::Result<(usize, usize)> {
            let (mut scored, mut failed) = (0usize, 0usize);
            for item in out_rx {
                let record = match item {
                    Scored::Failed(record) => record,
                    Scored::Done(input, rgb, det) => write_outputs(args_ref, &input, &rgb, &det)
                        .with_context(|| format!("cannot write the outputs of {}", input.given))?,
                };
                if let Some(e) = &record.error {
                    failed += 1;
                    if show {
                        bar_w.suspend(|| eprintln!("zsad: {}: {e}", record.path));
                    }
                } else {
                    scored += 1;
                }
                log.append(&record)?;
                bar_w.inc(1);
            }
            Ok((scored, failed))
        });
        let mut pending = rx.into_iter().peekable();
        'batches: while pending.peek().is_some() {
            // Up to `batch` images that decoded; failures pass through in order.
            let items: Vec<Prepared> = pending.by_ref().take(batch).collect();
            let ok: Vec<&candle_core::Tensor> = items
                .iter()
                .filter_map(|i| i.result.as_ref().ok().map(|(_, px)| px))
                .collect();
            let mut dets = if ok.is_empty() {
                Ok(Vec::new())
            } else {
                candle_core::Tensor::stack(&ok, 0)
                    .map_err(crate::Error::from)
                    .and_then(|px| detector.detect(&px))
            }
            .map(|d| d.into_iter());
            for item in items {
                let out = match (item.result, &mut dets) {
                    (Err(e), _) => Scored::Failed(Record::failed(&item.input.given, e)),
                    (Ok((rgb, _)), Ok(d)) => {
                        Scored::Done(item.input, rgb, d.next().expect("one detection per image"))
                    }
                    (Ok(_), Err(e)) => {
                        Scored::Failed(Record::failed(&item.input.given, format!("model: {e}")))
                    }
                };
                if out_tx.send(out).is_err() {
                    break 'batches; // the writer stopped on an error, reported below
                }
            }
        }
        drop(out_tx);
        writer.join().expect("the writing thread panicked")
    })?;
    scored += scored_now;
    failed += failed_now;
    bar.finish_and_clear();
    if show {
        let secs = started.elapsed().as_secs_f64();
        let rate = if scored > 0 {
            format!(" in {secs:.1} s ({:.3} s per image)", secs / scored as f64)
        } else {
            String::new()
        };
        eprintln!(
            "zsad: {scored} scored{rate}, {failed} failed{} -> {}",
            if skipped > 0 {
                format!(", {skipped} already done")
            } else {
                String::new()
            },
            log_path.display()
        );
    }
    if show && prior_failed > 0 {
        eprintln!("zsad: {prior_failed} input(s) failed in the earlier run (--retry-failed tries them again)");
    }
    Ok(if failed + prior_failed > 0 {
        EXIT_SOME_FAILED
    } else {
        EXIT_OK
    })
}
