//! `zsad eval`: metrics per class and their mean, as the papers compute them, from a model run
//! over an annotated dataset or from the written predictions of `zsad detect`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use super::detector_args::{tokenizer, DetectorArgs};
use super::reference::{Attached, ReferenceArgs};
use crate::batch::pipeline::{self, Outcome, PipelineOptions};
use crate::data::dataset::{self, path_words, problem_list, Sample};
use crate::data::outputs::{self, Record};
use crate::eval::metrics::Curve;
use crate::eval::report::ClassMetrics;
use crate::eval::{plot, Evaluation, SingleLabel};
use crate::method::config::TextPrompts;
use crate::method::{prompts, Detector, TextInputs};
use crate::progress::{Lines, Progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resolution {
    /// the model's input size (the papers: 518), masks resized with PIL bilinear, then > 0.5
    Model,
    /// each image's own size, maps resized bilinearly
    Original,
}

#[derive(Debug, Args)]
// The model is needed only without --predictions.
#[command(mut_arg("model", |a| a.required(false).default_value("")))]
pub struct EvalArgs {
    /// Annotated data: an MVTec AD root or class folder, a VisA root (split_csv/1cls.csv), a
    /// manifest (.csv / .jsonl with image, mask, label, class), or a folder of images with masks
    /// beside them; may be repeated
    #[arg(long, required = true, value_name = "D")]
    pub data: Vec<PathBuf>,
    /// Evaluate the records and maps that `zsad detect` wrote to this folder instead of running
    /// a model (at the resolution of the written maps)
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    pub predictions: Option<PathBuf>,
    #[command(flatten)]
    pub detector: DetectorArgs,
    #[command(flatten)]
    pub reference: ReferenceArgs,
    /// Output folder for metrics.json, metrics.csv, metrics.md and the curve plots
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Resolution of the pixel metrics when running a model
    #[arg(long, value_enum, default_value = "model")]
    pub resolution: Resolution,
    /// Classes whose images (or pixels) all have one label: leave the metric out of the mean
    /// (skip), or count it as 0 as AdaCLIP does (zero)
    #[arg(long, value_enum, default_value = "skip")]
    pub single_label: SingleLabel,
    /// How AUPRO's 200-threshold grid is evaluated: as under NumPy 1.x (AnomalyCLIP's pinned
    /// environment, the published numbers) or NumPy 2.x; they differ only on exact ties with
    /// a threshold
    #[arg(long, value_enum, default_value = "numpy1")]
    pub aupro_grid: crate::eval::metrics::ProGrid,
    /// No progress bar (on a terminal) or progress lines (otherwise), no table, no summary
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn read_mask(s: &Sample) -> anyhow::Result<Option<image::GrayImage>> {
    match &s.mask {
        None => Ok(None),
        Some(m) => Ok(Some(crate::data::image::to_luma8(
            &crate::data::image::decode(m)
                .with_context(|| format!("mask of {}", s.image.display()))?,
        ))),
    }
}

/// The mask at its own size, `> 0.5` after `ToTensor` (i.e. > 127).
fn mask_bits(mask: &Option<image::GrayImage>, w: u32, h: u32) -> Vec<bool> {
    match mask {
        Some(m) => m.as_raw().iter().map(|&v| v > 127).collect(),
        None => vec![false; (w * h) as usize],
    }
}

/// Images scored between two plain progress lines (when stderr is not a terminal).
const LINE_EVERY: u64 = 50;

fn progress(n: usize, quiet: bool) -> Progress {
    Progress::new(
        n as u64,
        quiet,
        "{elapsed_precise} [{bar:30}] {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
        Lines {
            command: "eval",
            unit: "image",
            every: LINE_EVERY,
        },
    )
}

fn by_class(samples: &[Sample]) -> BTreeMap<String, Vec<&Sample>> {
    let mut m: BTreeMap<String, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        m.entry(s.class.clone()).or_default().push(s);
    }
    m
}

/// How a dataset is scored by a model (`eval --model`, `calibrate --data`).
pub struct Scoring<'a> {
    pub detector: &'a DetectorArgs,
    pub reference: &'a ReferenceArgs,
    pub resolution: Resolution,
    /// Name the object in hand-made prompts by each class's word (eval, as the papers do);
    /// off, the adapter's word or --class-name is used, as `zsad detect` does.
    pub class_words: bool,
    pub quiet: bool,
}

/// Scores every sample with the model, class by class: the evidence and `run.json`'s settings.
pub fn run_model(
    args: &Scoring,
    samples: &[Sample],
) -> anyhow::Result<(Evaluation, serde_json::Value)> {
    let detector_args = args.detector;
    let (loaded, adapter) = detector_args.setup(args.quiet)?;
    let tok = tokenizer(&detector_args.tokenizer, &loaded)?;
    let mut settings = detector_args.run_settings(&loaded, &adapter)?;
    // One bank for every class: the image pass does not depend on the class word.
    let reference = if args.reference.reference.is_empty() {
        None
    } else {
        let det = Detector::new(
            &loaded.model,
            &adapter,
            TextInputs::build(&adapter.config, &tok)?,
        )?;
        let limits = crate::data::image::DecodeLimits::default();
        args.reference
            .load(&det, &settings, limits, 0, args.quiet)?
    };
    if let Some(r) = &reference {
        settings["reference"] = r.settings()?;
        warn_about_references(args, samples, r);
    }
    let mut bar = progress(samples.len(), args.quiet);
    let mut done = 0u64;
    let mut eval = Evaluation::default();
    for (class, group) in by_class(samples) {
        // Hand-made ensembles name the object: the dataset's class word, as the papers do,
        // unless --class-name fixes one; learned prompts keep their own word.
        let mut a = adapter.clone();
        if args.class_words
            && detector_args.class_name.is_none()
            && matches!(a.config.text, TextPrompts::Ensemble { .. })
        {
            a.config.class_name = prompts::class_word(&class);
        }
        let mut det = Detector::new(&loaded.model, &a, TextInputs::build(&a.config, &tok)?)?;
        if let Some(r) = &reference {
            det = det.with_reference(r.bank.clone(), r.how)?;
        }
        let size = det.image_size();
        bar.bar().set_message(class.clone());
        // detect's pipeline; a sample that cannot be scored stops the evaluation (its metrics
        // would silently leave it out), naming the file.
        pipeline::run(
            group,
            |s: &&Sample| s.image.as_path(),
            &det,
            &PipelineOptions::default(),
            |s, outcome| {
                let (rgb, d) = match outcome {
                    Outcome::Scored { image, detection } => (image, detection),
                    Outcome::Failed(e) => {
                        return Err(crate::Error::Image {
                            path: s.image.clone(),
                            message: e,
                        })
                    }
                };
                let mask = read_mask(s).map_err(|e| crate::Error::Dataset(format!("{e:#}")))?;
                let (w, h) = rgb.dimensions();
                let own_mask = mask_bits(&mask, w, h);
                let anomalous = s.label.unwrap_or_else(|| own_mask.iter().any(|&b| b));
                match args.resolution {
                    Resolution::Model => {
                        let m = match &mask {
                            Some(m) => crate::data::image::resize_mask(m, size as u32, size as u32),
                            None => vec![false; size * size],
                        };
                        eval.add(&class, d.score, anomalous, &d.map, &m, size, size);
                    }
                    Resolution::Original => {
                        let map = crate::method::maps::resize_map(
                            &d.map, size, size, h as usize, w as usize,
                        );
                        eval.add(
                            &class, d.score, anomalous, &map, &own_mask, h as usize, w as usize,
                        );
                    }
                }
                done += 1;
                bar.advance(done, || format!("({class})"));
                Ok(())
            },
        )?;
    }
    bar.finish();
    Ok((eval, settings))
}

/// References are of one product, and an image that is both a reference and a test sample
/// scores as normal whatever it shows: both are said, not refused (a user may mean it).
fn warn_about_references(args: &Scoring, samples: &[Sample], r: &Attached) {
    if args.quiet {
        return;
    }
    let classes = by_class(samples).len();
    if classes > 1 {
        eprintln!(
            "zsad: warning: one reference bank for {classes} classes: references should show the product being tested; evaluate each class with its own --reference"
        );
    }
    let sources: std::collections::HashSet<PathBuf> = r
        .bank
        .info
        .sources
        .iter()
        .filter_map(|s| canonical(Path::new(&s.path)))
        .collect();
    let shared = samples
        .iter()
        .filter(|s| canonical(&s.image).is_some_and(|c| sources.contains(&c)))
        .count();
    if shared > 0 {
        eprintln!(
            "zsad: warning: {shared} test image(s) are also reference images: their scores are not zero-shot evidence"
        );
    }
}

fn canonical(p: &Path) -> Option<PathBuf> {
    p.canonicalize().ok()
}

/// The record of each sample: the one naming the same file (canonical paths: `./` and
/// relative paths resolved against the current folder, symlinks followed), else the one whose
/// path ends with the sample's path inside its dataset (`bottle/test/good/000.png`), so that
/// predictions made on another machine, mount point or working folder still match. `Err`
/// says why there is none.
fn match_records(samples: &[Sample], records: &[Record]) -> Vec<Result<usize, String>> {
    let mut by_file: HashMap<PathBuf, usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        let p = Path::new(&r.path);
        by_file.insert(p.to_path_buf(), i);
        if let Some(c) = canonical(p) {
            by_file.insert(c, i);
        }
    }
    // Records by their last n path components, built for each n the samples need.
    let record_words: Vec<Vec<String>> = records
        .iter()
        .map(|r| path_words(Path::new(&r.path)))
        .collect();
    let mut by_tail: HashMap<usize, HashMap<&[String], Vec<usize>>> = HashMap::new();
    samples
        .iter()
        .map(|s| {
            let exact = by_file
                .get(&s.image)
                .or_else(|| canonical(&s.image).and_then(|c| by_file.get(&c)));
            if let Some(&i) = exact {
                return Ok(i);
            }
            let key = path_words(&s.rel);
            if key.is_empty() {
                return Err("no prediction".into());
            }
            let n = key.len();
            let tails = by_tail.entry(n).or_insert_with(|| {
                let mut m: HashMap<&[String], Vec<usize>> = HashMap::new();
                for (i, w) in record_words.iter().enumerate() {
                    if w.len() >= n {
                        m.entry(&w[w.len() - n..]).or_default().push(i);
                    }
                }
                m
            });
            match tails.get(key.as_slice()).map(Vec::as_slice) {
                None | Some([]) => Err("no prediction".into()),
                Some([i]) => Ok(*i),
                Some(many) => Err(format!(
                    "{} predictions end with {}: {}",
                    many.len(),
                    s.rel.display(),
                    many.iter()
                        .take(3)
                        .map(|&i| records[i].path.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        })
        .collect()
}

/// The evidence of the records and maps that `zsad detect` wrote to `dir` for `samples`.
pub fn read_predictions(quiet: bool, dir: &Path, samples: &[Sample]) -> anyhow::Result<Evaluation> {
    let file = [dir.join("scores.jsonl"), dir.join("scores.csv")]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("{}: no scores.jsonl or scores.csv", dir.display()))?;
    let (records, torn) = outputs::read_records(&file)?;
    if !torn.is_empty() {
        bail!("{}: unreadable lines {:?}", file.display(), torn);
    }
    let matched = match_records(samples, &records);
    // Every problem at once: missing predictions, failed inputs, missing map files.
    let mut problems = Vec::new();
    let mut unmatched = false;
    for (s, m) in samples.iter().zip(&matched) {
        let r = match m {
            Err(why) => {
                unmatched = true;
                problems.push(format!(
                    "{}: {why} in {}",
                    s.image.display(),
                    file.display()
                ));
                continue;
            }
            Ok(i) => &records[*i],
        };
        match (&r.score, &r.map) {
            (None, _) => problems.push(format!(
                "{}: detection failed: {}",
                s.image.display(),
                r.error.as_deref().unwrap_or("no score")
            )),
            (_, None) => problems.push(format!(
                "{}: no map was written (run detect with --maps png or npy)",
                s.image.display()
            )),
            (_, Some(map)) if !dir.join(map).is_file() => problems.push(format!(
                "{}: map {} is missing",
                s.image.display(),
                dir.join(map).display()
            )),
            _ => {}
        }
    }
    let how = "records are matched to images by file (canonical path), else by the path inside the dataset, e.g. `<class>/test/<defect>/<name>`; `zsad detect --resume` scores the missing ones";
    if !problems.is_empty() {
        bail!(
            "{}{}",
            problem_list("prediction problem(s)", &problems),
            if unmatched {
                format!("\n({how})")
            } else {
                String::new()
            }
        );
    }
    let mut bar = progress(samples.len(), quiet);
    let mut done = 0u64;
    let mut eval = Evaluation::default();
    let index: HashMap<&Path, usize> = samples
        .iter()
        .zip(&matched)
        .map(|(s, m)| (s.image.as_path(), *m.as_ref().expect("checked")))
        .collect();
    // Maps that cannot be read or do not fit are all named at the end, not one per run.
    for (class, group) in by_class(samples) {
        bar.bar().set_message(class.clone());
        for s in group {
            let problem = 'one: {
                let r = &records[index[s.image.as_path()]];
                let map_path = dir.join(r.map.as_ref().expect("checked"));
                let read = outputs::read_map(&map_path);
                let (map, w, h) = match read {
                    Ok(m) => m,
                    Err(e) => break 'one Some(format!("unreadable map: {e}")),
                };
                let mask = read_mask(s)?;
                let (mw, mh) = match &mask {
                    Some(m) => m.dimensions(),
                    None => image::ImageReader::open(&s.image)?
                        .with_guessed_format()?
                        .into_dimensions()?,
                };
                if (mw, mh) != (w, h) {
                    break 'one Some(format!(
                        "{}: the map is {w}x{h} but {} is {mw}x{mh}",
                        map_path.display(),
                        if mask.is_some() {
                            "the mask"
                        } else {
                            "the image"
                        }
                    ));
                }
                let bits = mask_bits(&mask, w, h);
                let anomalous = s.label.unwrap_or_else(|| bits.iter().any(|&b| b));
                eval.add(
                    &class,
                    r.score.expect("checked"),
                    anomalous,
                    &map,
                    &bits,
                    h as usize,
                    w as usize,
                );
                None
            };
            problems.extend(problem);
            done += 1;
            bar.advance(done, || format!("({class})"));
        }
    }
    bar.finish();
    if !problems.is_empty() {
        bail!("{}", problem_list("map problem(s)", &problems));
    }
    Ok(eval)
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    args.reference.check()?;
    if args.predictions.is_some() && !args.reference.reference.is_empty() {
        bail!("--reference runs with the model; --predictions evaluates a finished detect run: run `zsad detect --reference ...` and evaluate its folder, or drop --predictions");
    }
    let samples = dataset::read_all(&args.data)?;
    let started = std::time::Instant::now();
    let (eval, settings) = match &args.predictions {
        Some(dir) => (
            read_predictions(args.quiet, dir, &samples)?,
            serde_json::json!({"predictions": dir.display().to_string()}),
        ),
        None if args.detector.model.model.is_empty() => {
            bail!(
                "give --model (with --adapter or --preset) to run a detector, or --predictions DIR"
            )
        }
        None => run_model(
            &Scoring {
                detector: &args.detector,
                reference: &args.reference,
                resolution: args.resolution,
                class_words: true,
                quiet: args.quiet,
            },
            &samples,
        )?,
    };
    let report = eval.finish(args.single_label, args.aupro_grid);
    let out = &args.out;
    let mut settings = settings;
    settings["data"] = serde_json::json!(args
        .data
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>());
    settings["resolution"] = serde_json::json!(format!("{:?}", args.resolution).to_lowercase());
    crate::batch::run_record::RunRecord::new(
        settings,
        serde_json::json!({"command": std::env::args().collect::<Vec<_>>()}),
    )
    .write(out)?;
    outputs::write_atomic(&out.join("metrics.json"), report.to_json().as_bytes())?;
    outputs::write_atomic(&out.join("metrics.csv"), report.to_csv().as_bytes())?;
    let md = report.to_markdown();
    outputs::write_atomic(&out.join("metrics.md"), md.as_bytes())?;
    type Pick = fn(&(Curve, Curve)) -> &Curve;
    type Value = fn(&ClassMetrics) -> Option<f64>;
    let levels: [(&str, Pick, Value, Value); 2] = [
        ("image", |c| &c.0, |m| m.image_auroc, |m| m.image_ap),
        ("pixel", |c| &c.1, |m| m.pixel_auroc, |m| m.pixel_ap),
    ];
    for (level, pick, auroc, ap) in levels {
        let series = |points: fn(&Curve) -> Vec<(f64, f64)>, value: Value| -> Vec<_> {
            report
                .curves
                .iter()
                // Classes where the metric is undefined (one label) have no curve to show.
                .filter(|(n, _)| value(&report.classes[*n]).is_some())
                .map(|(n, c)| {
                    (
                        n.clone(),
                        plot::thin(points(pick(c)), 2000),
                        value(&report.classes[n]),
                    )
                })
                .collect()
        };
        let roc = plot::plot(
            &format!("{level} ROC (AUROC %)"),
            "false positive rate",
            "true positive rate",
            &series(Curve::roc_points, auroc),
        );
        let pr = plot::plot(
            &format!("{level} PR (AP %)"),
            "recall",
            "precision",
            &series(Curve::pr_points, ap),
        );
        outputs::write_atomic(
            &out.join(format!("roc_{level}.png")),
            &outputs::png_bytes_rgb(&roc)?,
        )?;
        outputs::write_atomic(
            &out.join(format!("pr_{level}.png")),
            &outputs::png_bytes_rgb(&pr)?,
        )?;
    }
    if !args.quiet {
        print!("{md}");
        eprintln!(
            "zsad: evaluated {} images of {} classes in {:.1} s -> {}",
            samples.len(),
            report.classes.len(),
            started.elapsed().as_secs_f64(),
            out.join("metrics.json").display()
        );
    }
    Ok(())
}
