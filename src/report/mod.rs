//! `zsad report DIR`: one self-contained HTML page (`DIR/report.html`) over the folder of a
//! `zsad detect` run, to look at what the detector did: every input sorted by score with its
//! image, heatmap and mask side by side and its decision, the scores' histogram with the
//! threshold, filters, an enlarged view with keyboard navigation, the run's settings and, when
//! `zsad eval` results are at hand, the metrics and their curves.
//!
//! The page needs no network and no file but the run's own: its data is one JSON element, its
//! style and script are inline, the eval curves are drawn from their numbers (`curves.json`;
//! the PNG plots of older versions are embedded), and pictures are the thumbnails made in
//! `DIR/thumbs/` ([`thumbs`]), the run's own maps and masks, and the input images (by relative
//! URL, for the enlarged view), read only from the run's input folders. Pages of rows are
//! drawn from the data on demand and thumbnails load lazily, so a run of 10,000 images opens
//! as fast as one of 100.

mod build;
pub mod histogram;
pub mod html;
mod inputs;
mod legend;
mod model;
mod numbers;
mod page;
pub mod thumbs;

pub use build::build;
pub use model::{
    ReportOptions, ReportSummary, FILE_NAME, HEADLESS_CHROMIUM, PAGE_SIZES, THUMBNAIL_SIZES,
};
