//! `zsad report DIR`: one self-contained HTML page (`DIR/report.html`) over the folder of a
//! `zsad detect` run, to look at what the detector did: every input sorted by score with its
//! image, heatmap and mask side by side and its decision, the scores' histogram with the
//! threshold, filters, an enlarged view with keyboard navigation, the run's settings and, when
//! `zsad eval` results are at hand, the metrics and their curves.
//!
//! The page needs no network and no file but the run's own: its data is one JSON element, its
//! style and script are inline, the eval plots are embedded, and pictures are the thumbnails
//! made in `DIR/thumbs/` ([`thumbs`]), the run's own maps and masks, and the input images (by
//! relative URL, for the enlarged view). Pages of rows are drawn from the data on demand and
//! thumbnails load lazily, so a run of 10,000 images opens as fast as one of 100.

pub mod histogram;
pub mod html;
mod page;
pub mod thumbs;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::batch::run_record::RunRecord;
use crate::data::image::DecodeLimits;
use crate::data::outputs::{self, Record, RecordFormat};
use crate::progress::{Lines, Progress};
use crate::{Error, Result};

/// Flags for a headless Chromium on a machine with a closed network (the tests and
/// `benches/report.rs` open the page with them): no sandbox (root in CI), no GPU, and none of
/// the background connections that would be refused over and over.
pub const HEADLESS_CHROMIUM: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
];

/// The page's file name in the run's folder.
pub const FILE_NAME: &str = "report.html";

/// How the page is made.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// A `zsad eval` output folder (its `metrics.json` and plots); else `DIR/metrics.json` when
    /// there is one.
    pub eval: Option<PathBuf>,
    /// Longest side of the row thumbnails, in pixels.
    pub thumbnail_size: u32,
    /// Rows per page.
    pub page_size: usize,
    /// What an input image may cost to read again for its thumbnail.
    pub limits: DecodeLimits,
    pub quiet: bool,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            eval: None,
            thumbnail_size: 160,
            page_size: 100,
            limits: DecodeLimits::default(),
            quiet: false,
        }
    }
}

/// Limits of the options, checked before any work.
pub const THUMBNAIL_SIZES: std::ops::RangeInclusive<u32> = 16..=1024;
pub const PAGE_SIZES: std::ops::RangeInclusive<usize> = 10..=1000;
/// Longest side of the previews of images a browser cannot show (TIFF).
const PREVIEW_SIZE: u32 = 1600;

impl ReportOptions {
    pub fn validate(&self) -> Result<()> {
        if !THUMBNAIL_SIZES.contains(&self.thumbnail_size) {
            return Err(Error::Usage(format!(
                "--thumbnail-size {}: must be in {}..={} pixels",
                self.thumbnail_size,
                THUMBNAIL_SIZES.start(),
                THUMBNAIL_SIZES.end()
            )));
        }
        if !PAGE_SIZES.contains(&self.page_size) {
            return Err(Error::Usage(format!(
                "--page-size {}: must be in {}..={} rows",
                self.page_size,
                PAGE_SIZES.start(),
                PAGE_SIZES.end()
            )));
        }
        Ok(())
    }
}

/// What a report holds.
#[derive(Debug, Clone, Default)]
pub struct ReportSummary {
    pub page: PathBuf,
    pub scored: usize,
    pub failed: usize,
    /// Inputs over the threshold (`None` without a threshold).
    pub anomalous: Option<usize>,
    /// Pictures that could not be shown (an input moved away, a heatmap not drawn), each named
    /// in its row.
    pub unavailable: usize,
}

/// One row of the page's data: the record and the URLs of its pictures, relative to the page.
#[derive(Debug, Clone, Serialize)]
struct Row {
    path: String,
    score: Option<f32>,
    global_score: Option<f32>,
    anomalous: Option<bool>,
    error: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    map_max: Option<f32>,
    regions: Option<usize>,
    image: Option<String>,
    image_full: Option<String>,
    heatmap: Option<String>,
    heatmap_full: Option<String>,
    mask: Option<String>,
    mask_full: Option<String>,
    /// Why a picture is missing.
    problems: Vec<String>,
}

impl Row {
    /// The record's values, with no pictures yet.
    fn of(r: &Record) -> Self {
        Row {
            path: r.path.clone(),
            score: r.score,
            global_score: r.global_score,
            anomalous: r.anomalous,
            error: r.error.clone(),
            width: r.width,
            height: r.height,
            map_max: r.map_max,
            regions: r.regions.as_ref().map(|g| g.count),
            image: None,
            image_full: None,
            heatmap: None,
            heatmap_full: None,
            mask: None,
            mask_full: None,
            problems: Vec::new(),
        }
    }
}

/// The record file of a run folder (JSON Lines first).
fn record_file(dir: &Path) -> Result<PathBuf> {
    [RecordFormat::Jsonl, RecordFormat::Csv]
        .iter()
        .map(|f| dir.join(f.file_name()))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Usage(format!(
                "{}: no scores.jsonl or scores.csv; `zsad report` reads the --out folder of a `zsad detect` run",
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
fn row(dir: &Path, dir_abs: &Path, inputs_from: &Path, r: &Record, opts: &ReportOptions) -> Row {
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
        Some((outputs::inside(dir, rel)?, html::url_path(rel)))
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

/// A `zsad eval` result: `metrics.json` and the plots beside it.
struct Eval {
    source: PathBuf,
    metrics: Value,
    /// `(title, data URL)` of the ROC and PR plots found.
    plots: Vec<(String, String)>,
}

fn load_eval(dir: &Path) -> Result<Eval> {
    use base64::Engine;
    let path = dir.join("metrics.json");
    let bytes = crate::data::image::read_regular(&path, 64 << 20, "")?;
    let metrics: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Usage(format!(
            "{}: not the metrics.json of `zsad eval` ({e})",
            path.display()
        ))
    })?;
    if !metrics.get("classes").is_some_and(Value::is_object) {
        return Err(Error::Usage(format!(
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
        if let Ok(png) = crate::data::image::read_regular(&dir.join(file), 16 << 20, "") {
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
pub fn build(dir: &Path, opts: &ReportOptions) -> Result<ReportSummary> {
    opts.validate()?;
    let eval_dir = match &opts.eval {
        Some(d) => Some(d.clone()),
        None => dir
            .join("metrics.json")
            .is_file()
            .then(|| dir.to_path_buf()),
    };
    let eval = eval_dir.as_deref().map(load_eval).transpose()?;
    let file = record_file(dir)?;
    let (mut records, torn) = outputs::read_records(&file)?;
    if !torn.is_empty() && !opts.quiet {
        eprintln!(
            "zsad: warning: {}: {} unreadable line(s) {:?} left out of the report",
            file.display(),
            torn.len(),
            torn
        );
    }
    let run = RunRecord::read(dir).unwrap_or_else(|e| {
        if !opts.quiet {
            eprintln!("zsad: warning: {e}; the report shows no settings");
        }
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
    sort_records(&mut records);

    let total = records.len() as u64;
    let mut progress = Progress::new(
        total,
        opts.quiet,
        "{elapsed_precise} [{bar:30}] {pos}/{len} thumbnails  ETA {eta}",
        Lines {
            command: "report",
            unit: "image",
            every: (total / 20).max(1),
        },
    );
    let mut rows = Vec::with_capacity(records.len());
    // Chunks bound memory (each item decodes one image) and let the progress advance.
    for part in records.chunks(4 * rayon::current_num_threads().max(1)) {
        rows.extend(
            part.par_iter()
                .map(|r| row(dir, &dir_abs, &inputs_from, r, opts))
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
    outputs::write_atomic(&summary.page, page.as_bytes())?;
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
        .contains("--thumbnail-size 0"));
        assert!(bad(ReportOptions {
            page_size: 5000,
            ..Default::default()
        })
        .contains("--page-size 5000"));
        ReportOptions::default().validate().unwrap();
    }
}
