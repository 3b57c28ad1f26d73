//! Building `DIR/report.html`: the run's records sorted, a row per record with its thumbnails
//! made (or kept), the eval results embedded, the page written atomically.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use super::html;
use super::inputs::InputPolicy;
use super::model::{Eval, ReportOptions, ReportSummary, Row, FILE_NAME, PREVIEW_SIZE};
use super::page;
use super::thumbs::{self, Kind};
use crate::data::image::DecodeLimits;
use crate::data::records::{self, Record, RecordFormat};
use crate::data::run_record::RunRecord;
use crate::error::{Error, OptionError, Result};
use crate::eval::plot::{Curves, CURVES_FILE};
use crate::fsio::OutDir;
use crate::progress::{Console, Lines};

/// The record file of a run folder (JSON Lines first).
fn record_file(dir: &Path) -> Result<PathBuf> {
    [RecordFormat::Jsonl, RecordFormat::Csv]
        .iter()
        .map(|f| dir.join(f.file_name()))
        .find(|p| crate::fsio::is_file(p))
        .ok_or_else(|| {
            OptionError::rule(format!(
                "{}: no scores.jsonl or scores.csv; `zsad report` reads the `out` folder of a `zsad detect` run",
                dir.display()
            ))
        })
}

/// Scored records by score, highest first (ties by path), then the failed ones by path.
fn sort_records(records: &mut [Record]) {
    records.sort_by(|a, b| match (a.score, b.score) {
        (Some(x), Some(y)) if a.error.is_none() && b.error.is_none() => {
            y.total_cmp(&x).then_with(|| a.path.cmp(&b.path))
        }
        _ => a
            .is_failure()
            .cmp(&b.is_failure())
            .then_with(|| a.path.cmp(&b.path)),
    });
}

/// What every row's pictures are made with.
struct Making<'a> {
    dir: &'a OutDir,
    /// The run's folder, canonical (links to inputs are relative to it).
    dir_abs: &'a Path,
    inputs: &'a InputPolicy,
    sizes: thumbs::Sizes,
    limits: &'a DecodeLimits,
}

/// The thumbnail (and the enlarged view's URL) of a record's input image, read only where the
/// run's inputs are; or why there is none, in `problems`.
fn input_pictures(
    m: &Making,
    r: &Record,
    problems: &mut Vec<String>,
) -> (Option<String>, Option<String>) {
    let input = match m.inputs.locate(&r.path) {
        Ok(p) => p,
        Err(e) => {
            problems.push(format!("image: {e}"));
            return (None, None);
        }
    };
    let mut make = |kinds: &[Kind]| -> Vec<Option<String>> {
        match thumbs::make(m.dir, &r.path, &input, kinds, m.sizes, m.limits) {
            Ok(rels) => rels.iter().map(|rel| Some(html::url_path(rel))).collect(),
            Err(e) => {
                problems.push(format!("image: {e}"));
                vec![None; kinds.len()]
            }
        }
    };
    if thumbs::browser_shows(&input) {
        let image = make(&[Kind::Image]).remove(0);
        let full = image
            .as_ref()
            .map(|_| html::url_of_path(&html::relative(m.dir_abs, &input)));
        (image, full)
    } else {
        // Formats browsers cannot show get a preview for the enlarged view.
        let mut v = make(&[Kind::Image, Kind::Preview]);
        let preview = v.pop().flatten();
        (v.pop().flatten(), preview)
    }
}

/// The thumbnails of the run's own heatmap (with the mask's outline when there is a mask) and
/// mask, with the URLs of the files themselves.
fn own_pictures(m: &Making, r: &Record, row: &mut Row) {
    // The run's own files, checked to stay inside the folder (records are data).
    let own = |rel: &Option<String>| -> Option<(PathBuf, String)> {
        let rel = rel.as_deref()?;
        Some((m.dir.path(rel)?, html::url_path(rel)))
    };
    let mask = own(&r.mask);
    let mut thumb = |what: &str, made: std::result::Result<String, String>| match made {
        Ok(rel) => Some(html::url_path(&rel)),
        Err(e) => {
            row.problems.push(format!("{what}: {e}"));
            None
        }
    };
    let heatmap = own(&r.heatmap).and_then(|(p, url)| {
        let made = match &mask {
            Some((mp, _)) => thumbs::make_outlined(m.dir, &r.path, &p, mp, m.sizes, m.limits),
            None => thumbs::make(m.dir, &r.path, &p, &[Kind::Heatmap], m.sizes, m.limits)
                .map(|mut v| v.remove(0)),
        };
        Some((thumb("heatmap", made)?, url))
    });
    let mask = mask.and_then(|(p, url)| {
        let made = thumbs::make(m.dir, &r.path, &p, &[Kind::Mask], m.sizes, m.limits);
        Some((thumb("mask", made.map(|mut v| v.remove(0)))?, url))
    });
    (row.heatmap, row.heatmap_full) = heatmap.unzip();
    (row.mask, row.mask_full) = mask.unzip();
}

/// The row of one record: its thumbnails made (or kept), its files linked.
fn row(m: &Making, r: &Record) -> Row {
    let mut row = Row::of(r);
    if r.is_failure() {
        return row;
    }
    let mut problems = Vec::new();
    (row.image, row.image_full) = input_pictures(m, r, &mut problems);
    row.problems = problems;
    own_pictures(m, r, &mut row);
    row
}

/// `metrics.json` of an eval folder, checked to be eval's.
fn read_metrics(dir: &Path) -> Result<Value> {
    let path = dir.join("metrics.json");
    let bytes = crate::fsio::read(&path, crate::fsio::FileKind::Settings)?;
    let metrics: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Error::output(format!(
            "{}: not the metrics.json of `zsad eval` ({e})",
            path.display()
        ))
    })?;
    if !metrics.get("classes").is_some_and(Value::is_object) {
        return Err(Error::output(format!(
            "{}: no \"classes\" object; not the metrics.json of `zsad eval`",
            path.display()
        )));
    }
    Ok(metrics)
}

/// An eval folder: its metrics, and its curves' numbers (`curves.json`) or, from versions that
/// wrote none, its PNG plots embedded as data URLs.
fn load_eval(dir: &Path) -> Result<Eval> {
    use base64::Engine;
    let metrics = read_metrics(dir)?;
    let curves_path = dir.join(CURVES_FILE);
    let curves = if crate::fsio::is_file(&curves_path) {
        let bytes = crate::fsio::read(&curves_path, crate::fsio::FileKind::Settings)?;
        Some(serde_json::from_slice::<Curves>(&bytes).map_err(|e| {
            Error::output(format!(
                "{}: not the curves.json of `zsad eval` ({e})",
                curves_path.display()
            ))
        })?)
    } else {
        None
    };
    let mut plots = Vec::new();
    let pngs = [
        ("roc_image.png", "Image ROC"),
        ("pr_image.png", "Image precision-recall"),
        ("roc_pixel.png", "Pixel ROC"),
        ("pr_pixel.png", "Pixel precision-recall"),
    ];
    for (file, title) in pngs.into_iter().filter(|_| curves.is_none()) {
        if let Ok(png) = crate::fsio::read(&dir.join(file), crate::fsio::FileKind::RunPicture) {
            let b64 = base64::engine::general_purpose::STANDARD.encode(png);
            plots.push((title.to_string(), format!("data:image/png;base64,{b64}")));
        }
    }
    Ok(Eval {
        source: dir.to_path_buf(),
        metrics,
        curves,
        plots,
    })
}

/// The run's records, sorted, with a warning for lines that could not be read.
fn sorted_records(dir: &Path, console: &Console) -> Result<Vec<Record>> {
    let file = record_file(dir)?;
    let (mut records, torn) = records::read_records(&file)?;
    if !torn.is_empty() {
        console.warn(&format!(
            "{}: {} unreadable line(s) {:?} left out of the report",
            file.display(),
            torn.len(),
            torn
        ));
    }
    sort_records(&mut records);
    Ok(records)
}

/// Where the run's inputs are read from; a warning for runs that do not record their input
/// folders (older versions), whose records are then trusted as before.
fn input_policy(run: Option<&RunRecord>, console: &Console) -> Result<InputPolicy> {
    let here = std::env::current_dir().map_err(|e| Error::io(Path::new("."), e))?;
    let policy = InputPolicy::of(run, here);
    if policy.roots.is_none() {
        console.warn(
            "run.json does not list the run's input folders (info.input_roots; a run of an older zsad): input images are read wherever the records name them",
        );
    }
    Ok(policy)
}

/// Writes `DIR/report.html` (and the thumbnails it needs) for the run in `dir`.
pub fn build(dir: &Path, opts: &ReportOptions, console: &Console) -> Result<ReportSummary> {
    opts.validate()?;
    if !crate::fsio::is_dir(dir) {
        return Err(OptionError::rule(format!(
            "{}: not a folder; give the `out` folder of a `zsad detect` run",
            dir.display()
        )));
    }
    let eval_dir = match &opts.eval {
        Some(d) => Some(d.clone()),
        None => dir
            .join("metrics.json")
            .is_file()
            .then(|| dir.to_path_buf()),
    };
    let eval = eval_dir.as_deref().map(load_eval).transpose()?;
    let records = sorted_records(dir, console)?;
    let run = RunRecord::read(dir).unwrap_or_else(|e| {
        console.warn(&format!("{e}; the report shows no settings"));
        None
    });
    let inputs = input_policy(run.as_ref(), console)?;
    let dir_abs = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let out = OutDir::create(dir)?;
    let making = Making {
        dir: &out,
        dir_abs: &dir_abs,
        inputs: &inputs,
        sizes: thumbs::Sizes {
            thumbnail: opts.thumbnail_size,
            preview: PREVIEW_SIZE,
        },
        limits: &opts.limits,
    };

    let total = records.len() as u64;
    let mut progress = console.progress(
        total,
        "{elapsed_precise} [{bar:30}] {pos}/{len} thumbnails  ETA {eta}",
        Lines::at_every_5_percent("report", "image", total),
    );
    let mut rows = Vec::with_capacity(records.len());
    // Chunks bound memory (each item decodes one image) and let the progress advance.
    for part in records.chunks(4 * rayon::current_num_threads().max(1)) {
        rows.extend(part.par_iter().map(|r| row(&making, r)).collect::<Vec<_>>());
        progress.advance(rows.len() as u64, String::new);
    }
    progress.finish();

    let threshold = run
        .as_ref()
        .and_then(|r| r.settings.get("threshold")?.as_f64())
        .map(|t| t as f32);
    let summary = ReportSummary {
        page: dir.join(FILE_NAME),
        scored: records.iter().filter(|r| !r.is_failure()).count(),
        failed: records.iter().filter(|r| r.is_failure()).count(),
        anomalous: threshold.map(|_| records.iter().filter(|r| r.anomalous == Some(true)).count()),
        unavailable: rows.iter().map(|r| r.problems.len()).sum(),
    };
    let page = page::render(&page::Page {
        title: dir_abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir_abs.display().to_string()),
        rows: &rows,
        run: run.as_ref(),
        threshold,
        eval: eval.as_ref(),
        page_size: opts.page_size,
        summary: &summary,
    });
    out.write(FILE_NAME, page.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sort_by_score_then_path_failed_last() {
        let rec = |p: &str, s: Option<f32>| Record {
            path: p.into(),
            score: s,
            error: s.is_none().then(|| "bad".to_string()),
            ..Default::default()
        };
        let mut v = vec![
            rec("z", None),
            rec("b", Some(0.5)),
            rec("a", Some(0.5)),
            rec("c", Some(0.9)),
            rec("d", Some(0.1)),
            rec("a0", None),
        ];
        sort_records(&mut v);
        let order: Vec<&str> = v.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(order, ["c", "a", "b", "d", "a0", "z"]);
    }

    #[test]
    fn options_are_range_checked() {
        let bad = |o: ReportOptions| o.validate().unwrap_err().to_string();
        assert!(bad(ReportOptions {
            thumbnail_size: 0,
            ..Default::default()
        })
        .contains("`thumbnail_size` 0"));
        assert!(bad(ReportOptions {
            page_size: 5000,
            ..Default::default()
        })
        .contains("`page_size` 5000"));
        ReportOptions::default().validate().unwrap();
    }
}
