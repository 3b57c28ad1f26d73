//! Building `DIR/report.html`: the run's records sorted, a row per record with its thumbnails
//! made (or kept), the eval results embedded, the page written atomically.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use super::html;
use super::model::{Eval, ReportOptions, ReportSummary, Row, FILE_NAME, PREVIEW_SIZE};
use super::page;
use super::thumbs;
use crate::data::records::{self, Record, RecordFormat};
use crate::data::run_record::RunRecord;
use crate::error::{Error, OptionError, Result};
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

/// The row of one record: its thumbnails made (or kept), its files linked.
fn row(dir: &OutDir, dir_abs: &Path, inputs_from: &Path, r: &Record, opts: &ReportOptions) -> Row {
    let mut row = Row::of(r);
    if r.is_failure() {
        return row;
    }
    let sizes = thumbs::Sizes {
        thumbnail: opts.thumbnail_size,
        preview: PREVIEW_SIZE,
    };
    // The pictures of one source (decoded once), or why there are none.
    let mut thumbs_of =
        |source: &Path, kinds: &[thumbs::Kind], what: &str| -> Vec<Option<String>> {
            match thumbs::make(dir, &r.path, source, kinds, sizes, &opts.limits) {
                Ok(rels) => rels.iter().map(|rel| Some(html::url_path(rel))).collect(),
                Err(e) => {
                    row.problems.push(format!("{what}: {e}"));
                    vec![None; kinds.len()]
                }
            }
        };
    let input = inputs_from.join(&r.path);
    let (image, full) = if thumbs::browser_shows(&input) {
        let image = thumbs_of(&input, &[thumbs::Kind::Image], "image").remove(0);
        let full = image.as_ref().and_then(|_| {
            let p = input.canonicalize().ok()?;
            Some(html::url_of_path(&html::relative(dir_abs, &p)))
        });
        (image, full)
    } else {
        // Formats browsers cannot show get a preview for the enlarged view.
        let mut v = thumbs_of(
            &input,
            &[thumbs::Kind::Image, thumbs::Kind::Preview],
            "image",
        );
        let preview = v.pop().flatten();
        (v.pop().flatten(), preview)
    };
    // The run's own files, checked to stay inside the folder (records are data).
    let own = |rel: &Option<String>| -> Option<(PathBuf, String)> {
        let rel = rel.as_deref()?;
        Some((dir.path(rel)?, html::url_path(rel)))
    };
    let heatmap = own(&r.heatmap).and_then(|(p, url)| {
        thumbs_of(&p, &[thumbs::Kind::Heatmap], "heatmap")
            .remove(0)
            .map(|t| (t, url))
    });
    let mask = own(&r.mask).and_then(|(p, url)| {
        thumbs_of(&p, &[thumbs::Kind::Mask], "mask")
            .remove(0)
            .map(|t| (t, url))
    });
    row.image = image;
    row.image_full = full;
    (row.heatmap, row.heatmap_full) = heatmap.unzip();
    (row.mask, row.mask_full) = mask.unzip();
    row
}

fn load_eval(dir: &Path) -> Result<Eval> {
    use base64::Engine;
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
    let mut plots = Vec::new();
    for (file, title) in [
        ("roc_image.png", "Image ROC"),
        ("pr_image.png", "Image precision-recall"),
        ("roc_pixel.png", "Pixel ROC"),
        ("pr_pixel.png", "Pixel precision-recall"),
    ] {
        if let Ok(png) = crate::fsio::read(&dir.join(file), crate::fsio::FileKind::RunPicture) {
            let b64 = base64::engine::general_purpose::STANDARD.encode(png);
            plots.push((title.to_string(), format!("data:image/png;base64,{b64}")));
        }
    }
    Ok(Eval {
        source: dir.to_path_buf(),
        metrics,
        plots,
    })
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
    let run = RunRecord::read(dir).unwrap_or_else(|e| {
        console.warn(&format!("{e}; the report shows no settings"));
        None
    });
    // Records name inputs as given to detect: relative ones are read from where it ran.
    let here = std::env::current_dir().map_err(|e| Error::io(Path::new("."), e))?;
    let inputs_from = run
        .as_ref()
        .and_then(|r| r.info.get("cwd")?.as_str().map(PathBuf::from))
        .filter(|d| d.is_dir())
        .unwrap_or(here);
    let dir_abs = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let out = OutDir::create(dir)?;
    sort_records(&mut records);

    let total = records.len() as u64;
    let mut progress = console.progress(
        total,
        "{elapsed_precise} [{bar:30}] {pos}/{len} thumbnails  ETA {eta}",
        Lines::at_every_5_percent("report", "image", total),
    );
    let mut rows = Vec::with_capacity(records.len());
    // Chunks bound memory (each item decodes one image) and let the progress advance.
    for part in records.chunks(4 * rayon::current_num_threads().max(1)) {
        rows.extend(
            part.par_iter()
                .map(|r| row(&out, &dir_abs, &inputs_from, r, opts))
                .collect::<Vec<_>>(),
        );
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
