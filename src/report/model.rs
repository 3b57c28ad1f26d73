//! What a report is made of: its options, the rows of the page (a record and the URLs of its
//! pictures), an evaluation's metrics and plots, and what the page holds.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::data::image::DecodeLimits;
use crate::data::records::Record;
use crate::error::{OptionError, Result};
use crate::eval::plot::Curves;

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
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            eval: None,
            thumbnail_size: 160,
            page_size: 100,
            limits: DecodeLimits::default(),
        }
    }
}

/// Limits of the options, checked before any work.
pub const THUMBNAIL_SIZES: std::ops::RangeInclusive<u32> = 16..=1024;
pub const PAGE_SIZES: std::ops::RangeInclusive<usize> = 10..=1000;
/// Longest side of the previews of images a browser cannot show (TIFF).
pub const PREVIEW_SIZE: u32 = 1600;

impl ReportOptions {
    pub fn validate(&self) -> Result<()> {
        let px = self.limits.max_pixels;
        if !(1..=crate::data::outputs::MAX_MAP_PIXELS).contains(&px) {
            return Err(OptionError::value(
                "max_pixels",
                px,
                format!("must be in 1..={}", crate::data::outputs::MAX_MAP_PIXELS),
            ));
        }
        if !THUMBNAIL_SIZES.contains(&self.thumbnail_size) {
            return Err(OptionError::value(
                "thumbnail_size",
                self.thumbnail_size,
                format!(
                    "must be in {}..={} pixels",
                    THUMBNAIL_SIZES.start(),
                    THUMBNAIL_SIZES.end()
                ),
            ));
        }
        if !PAGE_SIZES.contains(&self.page_size) {
            return Err(OptionError::value(
                "page_size",
                self.page_size,
                format!(
                    "must be in {}..={} rows",
                    PAGE_SIZES.start(),
                    PAGE_SIZES.end()
                ),
            ));
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
pub struct Row {
    pub path: String,
    pub score: Option<f32>,
    pub global_score: Option<f32>,
    pub anomalous: Option<bool>,
    pub error: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub map_max: Option<f32>,
    pub regions: Option<usize>,
    /// `[x, y, width, height]` in image pixels of the largest regions (at most
    /// [`MAX_BOXES`]), drawn on the enlarged view; left out of the page's data when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub boxes: Vec<[u32; 4]>,
    pub image: Option<String>,
    pub image_full: Option<String>,
    pub heatmap: Option<String>,
    pub heatmap_full: Option<String>,
    pub mask: Option<String>,
    pub mask_full: Option<String>,
    /// Why a picture is missing.
    pub problems: Vec<String>,
}

impl Row {
    /// The record's values, with no pictures yet.
    pub fn of(r: &Record) -> Self {
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
            boxes: largest_boxes(r),
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

/// Region boxes a row carries at most: a page of 10,000 rows stays small, and more boxes
/// than this would hide the picture.
pub const MAX_BOXES: usize = 20;

/// The boxes of a record's [`MAX_BOXES`] largest regions (by area, then as listed).
fn largest_boxes(r: &Record) -> Vec<[u32; 4]> {
    let Some(g) = &r.regions else {
        return Vec::new();
    };
    let mut items: Vec<_> = g.items.iter().collect();
    items.sort_by_key(|i| std::cmp::Reverse(i.area));
    items
        .iter()
        .take(MAX_BOXES)
        .map(|i| [i.bbox.x, i.bbox.y, i.bbox.width, i.bbox.height])
        .collect()
}

/// A `zsad eval` result: `metrics.json` and the curves beside it.
pub struct Eval {
    pub source: PathBuf,
    pub metrics: Value,
    /// The curves' numbers (`curves.json`), drawn by the page itself.
    pub curves: Option<Curves>,
    /// `(title, data URL)` of the PNG plots of older versions, when there is no `curves.json`.
    pub plots: Vec<(String, String)>,
}
