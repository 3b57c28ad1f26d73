//! `zsad eval` as a library job: metrics per class and their mean, as the papers compute them,
//! from a model run over an annotated dataset ([`score_dataset`], shared with `calibrate`) or
//! from the records and maps that `zsad detect` wrote ([`read_predictions`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::pipeline::{self, Outcome, PipelineOptions};
use super::prelude::DetectorOptions;
use super::reference::{Attached, BankOptions, ReferenceOptions};
use crate::choice::{choice_enum, Choice};
use crate::data::dataset::{self, path_words, problem_list, Sample};
use crate::data::outputs;
use crate::data::records::{self, Record};
use crate::data::run_record::RunRecord;
use crate::error::{Error, OptionError, Result};
use crate::eval::metrics::{Curve, ProGrid};
use crate::eval::report::{ClassMetrics, Report};
use crate::eval::{plot, Evaluation, SingleLabel};
use crate::fsio::OutDir;
use crate::method::config::TextPrompts;
use crate::method::{prompts, Detector, TextInputs};
use crate::progress::{Console, Lines, Progress};

choice_enum! {
    /// The resolution of the pixel metrics when a model runs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Resolution {
        /// the model's input size (the papers: 518), masks resized with PIL bilinear, then > 0.5
        Model = "model",
        /// each image's own size, maps resized bilinearly
        Original = "original",
    }
}

// Written out: `#[default]` cannot pass through `choice_enum!`.
#[allow(clippy::derivable_impls)]
impl Default for Resolution {
    fn default() -> Self {
        Self::Model
    }
}

/// Everything `zsad eval` is asked to do.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Annotated data: dataset roots, class folders, manifests.
    pub data: Vec<PathBuf>,
    /// Evaluate a finished detect run's folder instead of running a model.
    pub predictions: Option<PathBuf>,
    pub detector: DetectorOptions,
    pub reference: ReferenceOptions,
    /// Folder for metrics.json, metrics.csv, metrics.md and the curve plots.
    pub out: PathBuf,
    pub resolution: Resolution,
    pub single_label: SingleLabel,
    pub aupro_grid: ProGrid,
}

/// What an evaluation found and wrote.
pub struct EvalSummary {
    pub images: usize,
    pub report: Report,
    pub seconds: f64,
    pub metrics: PathBuf,
}

/// How a dataset is scored by a model (`eval`, `calibrate`).
pub struct Scoring<'a> {
    pub detector: &'a DetectorOptions,
    pub reference: &'a ReferenceOptions,
    pub resolution: Resolution,
    /// Name the object in hand-made prompts by each class's word (eval, as the papers do);
    /// off, the adapter's word or `class_name` is used, as `zsad detect` does.
    pub class_words: bool,
    /// The command named in plain progress lines (`eval`, `calibrate`).
    pub command: &'static str,
}

fn by_class(samples: &[Sample]) -> BTreeMap<String, Vec<&Sample>> {
    let mut m: BTreeMap<String, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        m.entry(s.class.clone()).or_default().push(s);
    }
    m
}

fn progress(n: usize, command: &'static str, console: &Console) -> Progress {
    console.progress(
        n as u64,
        "{elapsed_precise} [{bar:30}] {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
        Lines {
            command,
            unit: "image",
            every: 50,
        },
    )
}

/// The mask at its own size, `> 0.5` after `ToTensor` (i.e. > 127).
fn mask_bits(mask: &Option<image::GrayImage>, w: u32, h: u32) -> Vec<bool> {
    match mask {
        Some(m) => m.as_raw().iter().map(|&v| v > 127).collect(),
        None => vec![false; (w * h) as usize],
    }
}

fn read_mask(s: &Sample) -> Result<Option<image::GrayImage>> {
    match &s.mask {
        None => Ok(None),
        Some(m) => crate::data::image::decode_mask(m)
            .map(Some)
            .map_err(|e| Error::dataset(format!("mask of {}: {e}", s.image.display()))),
    }
}

/// Adds one scored sample to `eval` at the resolution asked for.
fn add_scored(
    eval: &mut Evaluation,
    class: &str,
    s: &Sample,
    rgb: &image::RgbImage,
    d: &crate::method::Detection,
    resolution: Resolution,
) -> Result<()> {
    let mask = read_mask(s)?;
    let (w, h) = rgb.dimensions();
    let own_mask = mask_bits(&mask, w, h);
    let anomalous = s.label.unwrap_or_else(|| own_mask.iter().any(|&b| b));
    let size = d.size;
    match resolution {
        Resolution::Model => {
            let m = match &mask {
                Some(m) => crate::data::image::resize_mask(m, size as u32, size as u32),
                None => vec![false; size * size],
            };
            eval.add(class, d.score, anomalous, &d.map, &m, size, size);
        }
        Resolution::Original => {
            let map = crate::method::maps::resize_map(&d.map, size, size, h as usize, w as usize);
            eval.add(
                class, d.score, anomalous, &map, &own_mask, h as usize, w as usize,
            );
        }
    }
    Ok(())
}

/// Scores every sample with the model, class by class: the evidence and `run.json`'s settings.
pub fn score_dataset(
    scoring: &Scoring,
    samples: &[Sample],
    console: &Console,
) -> Result<(Evaluation, Value)> {
    let plan = scoring.detector.plan(console)?;
    let bank_file = scoring.reference.read_bank_file(&plan.settings)?;
    let built = plan.build()?;
    let mut settings = built.settings;
    // One bank for every class: the image pass does not depend on the class word.
    let reference = scoring.reference.load(
        &built.detector,
        &settings,
        bank_file,
        &BankOptions::default(),
        console,
    )?;
    if let Some(r) = &reference {
        settings["reference"] = r.settings()?;
        warn_about_references(samples, r, console);
    }
    let mut bar = progress(samples.len(), scoring.command, console);
    let mut done = 0u64;
    let mut eval = Evaluation::default();
    for (class, group) in by_class(samples) {
        // Hand-made ensembles name the object: the dataset's class word, as the papers do,
        // unless `class_name` fixes one; learned prompts keep their own word.
        let mut a = built.adapter.clone();
        if scoring.class_words
            && scoring.detector.class_name.is_none()
            && matches!(a.config.text, TextPrompts::Ensemble { .. })
        {
            a.config.class_name = prompts::class_word(&class);
        }
        let mut det = Detector::new(
            &built.loaded.model,
            &a,
            TextInputs::build(&a.config, &built.tokenizer)?,
        )?;
        if let Some(r) = &reference {
            det = det.with_reference(r.bank.clone(), r.how)?;
        }
        bar.bar().set_message(class.clone());
        // detect's pipeline; a sample that cannot be scored stops the evaluation (its metrics
        // would silently leave it out), naming the file.
        pipeline::run(
            group,
            |s: &&Sample| s.image.as_path(),
            &det,
            &PipelineOptions::default(),
            console,
            |s, outcome| {
                let (rgb, d) = match outcome {
                    Outcome::Scored { image, detection } => (image, detection),
                    Outcome::Failed(e) => return Err(Error::input(&s.image, e)),
                };
                add_scored(&mut eval, &class, s, &rgb, &d, scoring.resolution)?;
                done += 1;
                bar.advance(done, || format!("({class})"));
                Ok(())
            },
        )?;
        if crate::progress::stop_requested() {
            return Err(Error::Interrupted {
                kept: String::new(),
            });
        }
    }
    bar.finish();
    Ok((eval, settings))
}

/// References are of one product, and an image that is both a reference and a test sample
/// scores as normal whatever it shows: both are said, not refused (a user may mean it).
fn warn_about_references(samples: &[Sample], r: &Attached, console: &Console) {
    let classes = by_class(samples).len();
    if classes > 1 {
        console.warn(&format!(
            "one reference bank for {classes} classes: references should show the product being tested; evaluate each class with its own `reference`"
        ));
    }
    let sources: std::collections::HashSet<PathBuf> = r
        .bank
        .info
        .sources
        .iter()
        .filter_map(|s| Path::new(&s.path).canonicalize().ok())
        .collect();
    let shared = samples
        .iter()
        .filter(|s| s.image.canonicalize().is_ok_and(|c| sources.contains(&c)))
        .count();
    if shared > 0 {
        console.warn(&format!(
            "{shared} test image(s) are also reference images: their scores are not zero-shot evidence"
        ));
    }
}

/// The record of each sample: the one naming the same file (canonical paths: relative record
/// paths resolved against `records_from`, the folder the detect run ran in, symlinks
/// followed), else the one whose path ends with the sample's path inside its dataset
/// (`bottle/test/good/000.png`), so that predictions made on another machine, mount point or
/// working folder still match. `Err` says why there is none.
fn match_records(
    samples: &[Sample],
    records: &[Record],
    records_from: &Path,
) -> Vec<std::result::Result<usize, String>> {
    let mut by_file: HashMap<PathBuf, usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        let p = records_from.join(&r.path);
        by_file.insert(PathBuf::from(&r.path), i);
        if let Ok(c) = p.canonicalize() {
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
                .or_else(|| s.image.canonicalize().ok().and_then(|c| by_file.get(&c)));
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

/// Every problem of the matched predictions at once: missing predictions, failed inputs,
/// missing map files.
fn prediction_problems(
    dir: &OutDir,
    file: &Path,
    samples: &[Sample],
    records: &[Record],
    matched: &[std::result::Result<usize, String>],
) -> Result<()> {
    let mut problems = Vec::new();
    let mut unmatched = false;
    for (s, m) in samples.iter().zip(matched) {
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
                "{}: no map was written (run detect with `maps` png or npy)",
                s.image.display()
            )),
            (_, Some(map)) if !dir.path(map).is_some_and(|p| crate::fsio::is_file(&p)) => problems
                .push(format!(
                    "{}: map {} is missing",
                    s.image.display(),
                    dir.root().join(map).display()
                )),
            _ => {}
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let how = "records are matched to images by file (canonical path, relative ones from where detect ran), else by the path inside the dataset, e.g. `<class>/test/<defect>/<name>`; `zsad detect --resume` scores the missing ones";
    Err(Error::dataset(format!(
        "{}{}",
        problem_list("prediction problem(s)", &problems),
        if unmatched {
            format!("\n({how})")
        } else {
            String::new()
        }
    )))
}

/// One sample's evidence from its record's map, or why its map does not fit.
fn add_prediction(
    eval: &mut Evaluation,
    class: &str,
    s: &Sample,
    r: &Record,
    dir: &OutDir,
) -> Result<Option<String>> {
    let rel = r.map.as_deref().unwrap_or_default();
    let Some(map_path) = dir.path(rel) else {
        return Ok(Some(format!("{rel}: not a path inside the run's folder")));
    };
    let (map, w, h) = match outputs::read_map(&map_path) {
        Ok(m) => m,
        Err(e) => return Ok(Some(format!("unreadable map: {e}"))),
    };
    let mask = read_mask(s)?;
    let (mw, mh) = match &mask {
        Some(m) => m.dimensions(),
        None => crate::data::image::dimensions(&s.image)?,
    };
    if (mw, mh) != (w, h) {
        return Ok(Some(format!(
            "{}: the map is {w}x{h} but {} is {mw}x{mh}",
            map_path.display(),
            if mask.is_some() {
                "the mask"
            } else {
                "the image"
            }
        )));
    }
    let bits = mask_bits(&mask, w, h);
    let anomalous = s.label.unwrap_or_else(|| bits.iter().any(|&b| b));
    let score = r.score.unwrap_or(f32::NAN);
    eval.add(class, score, anomalous, &map, &bits, h as usize, w as usize);
    Ok(None)
}

/// The evidence of the records and maps that `zsad detect` wrote to `dir` for `samples`.
pub fn read_predictions(
    dir: &Path,
    samples: &[Sample],
    command: &'static str,
    console: &Console,
) -> Result<Evaluation> {
    let file = [dir.join("scores.jsonl"), dir.join("scores.csv")]
        .into_iter()
        .find(|p| crate::fsio::is_file(p))
        .ok_or_else(|| {
            OptionError::rule(format!("{}: no scores.jsonl or scores.csv", dir.display()))
        })?;
    let (records, torn) = records::read_records(&file)?;
    if !torn.is_empty() {
        return Err(Error::output(format!(
            "{}: unreadable lines {:?}",
            file.display(),
            torn
        )));
    }
    // Relative record paths are relative to where detect ran (run.json's info.cwd).
    let here = std::env::current_dir().map_err(|e| Error::io(Path::new("."), e))?;
    let records_from = RunRecord::read(dir)
        .ok()
        .flatten()
        .and_then(|r| r.info.get("cwd")?.as_str().map(PathBuf::from))
        .unwrap_or(here);
    let out = OutDir::create(dir)?;
    let matched = match_records(samples, &records, &records_from);
    prediction_problems(&out, &file, samples, &records, &matched)?;
    let index: HashMap<&Path, usize> = samples
        .iter()
        .zip(&matched)
        .filter_map(|(s, m)| Some((s.image.as_path(), *m.as_ref().ok()?)))
        .collect();
    let mut bar = progress(samples.len(), command, console);
    let mut done = 0u64;
    let mut eval = Evaluation::default();
    // Maps that cannot be read or do not fit are all named at the end, not one per run.
    let mut problems = Vec::new();
    for (class, group) in by_class(samples) {
        bar.bar().set_message(class.clone());
        for s in group {
            let r = &records[index[s.image.as_path()]];
            problems.extend(add_prediction(&mut eval, &class, s, r, &out)?);
            done += 1;
            bar.advance(done, || format!("({class})"));
        }
    }
    bar.finish();
    if !problems.is_empty() {
        return Err(Error::dataset(problem_list("map problem(s)", &problems)));
    }
    Ok(eval)
}

/// `zsad eval` as a job: the data read, scored (or its predictions read), the metrics and
/// plots written to `out` with `run.json`.
pub fn evaluate(
    opts: &EvalOptions,
    console: &Console,
    command: Vec<String>,
) -> Result<EvalSummary> {
    opts.reference.check()?;
    if opts.predictions.is_some() && opts.reference.is_set() {
        return Err(OptionError::rule(
            "`reference` runs with the model; `predictions` evaluates a finished detect run: run `zsad detect --reference ...` and evaluate its folder, or drop `predictions`",
        ));
    }
    if opts.predictions.is_none() && opts.detector.model.model.is_empty() {
        return Err(OptionError::rule(
            "give `model` (with `adapter` or `preset`) to run a detector, or `predictions` DIR",
        ));
    }
    if std::fs::metadata(&opts.out).is_ok_and(|m| !m.is_dir()) {
        return Err(OptionError::rule(format!(
            "`out` {}: exists and is not a folder",
            opts.out.display()
        )));
    }
    let samples = dataset::read_all(&opts.data)?;
    let started = std::time::Instant::now();
    let (eval, mut settings) = match &opts.predictions {
        Some(dir) => (
            read_predictions(dir, &samples, "eval", console)?,
            json!({"predictions": dir.display().to_string()}),
        ),
        None => score_dataset(
            &Scoring {
                detector: &opts.detector,
                reference: &opts.reference,
                resolution: opts.resolution,
                class_words: true,
                command: "eval",
            },
            &samples,
            console,
        )?,
    };
    let report = eval.finish(opts.single_label, opts.aupro_grid);
    settings["data"] = json!(opts
        .data
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>());
    settings["resolution"] = json!(opts.resolution.name());
    let out = OutDir::create(&opts.out)?;
    RunRecord::new(settings, json!({"command": command})).write(&out)?;
    out.write("metrics.json", report.to_json().as_bytes())?;
    out.write("metrics.csv", report.to_csv().as_bytes())?;
    out.write("metrics.md", report.to_markdown().as_bytes())?;
    write_plots(&out, &report)?;
    Ok(EvalSummary {
        images: samples.len(),
        report,
        seconds: started.elapsed().as_secs_f64(),
        metrics: opts.out.join("metrics.json"),
    })
}

/// The ROC and PR curves of every class with a defined metric, image and pixel level: their
/// numbers (thinned) in `curves.json`, each plot as SVG.
fn write_plots(out: &OutDir, report: &Report) -> Result<()> {
    type Pick = fn(&(Curve, Curve)) -> &Curve;
    type Metric = fn(&ClassMetrics) -> Option<f64>;
    let level = |pick: Pick, auroc: Metric, ap: Metric| {
        let series = |points: fn(&Curve) -> Vec<(f64, f64)>, value: Metric| -> Vec<_> {
            report
                .curves
                .iter()
                // Classes where the metric is undefined (one label) have no curve to show.
                .filter(|(n, _)| value(&report.classes[*n]).is_some())
                .map(|(n, c)| plot::Series {
                    class: n.clone(),
                    value: value(&report.classes[n]),
                    points: plot::thin(&points(pick(c))),
                })
                .collect()
        };
        plot::LevelCurves {
            roc: series(Curve::roc_points, auroc),
            pr: series(Curve::pr_points, ap),
        }
    };
    let curves = plot::Curves {
        image: level(|c| &c.0, |m| m.image_auroc, |m| m.image_ap),
        pixel: level(|c| &c.1, |m| m.pixel_auroc, |m| m.pixel_ap),
    };
    for (level, kind, series) in curves.plots() {
        let svg = plot::svg(&kind.title(level), kind, series);
        out.write(&format!("{}_{level}.svg", kind.name()), svg.as_bytes())?;
    }
    let json = serde_json::to_vec(&curves)
        .map_err(|e| Error::output(format!("{}: {e}", plot::CURVES_FILE)))?;
    out.write(plot::CURVES_FILE, &json)
}
