//! Every command as a library job over typed options: flags (or Python keywords) become an
//! options struct, the job checks it, does the work and returns a summary; the caller turns the
//! summary into output and an exit status. Jobs that run a model share the [`prelude`] (the
//! same checks in the same order, everything that needs no weights before the weights are
//! read).
//!
//! Scoring jobs share the staged [`pipeline`] (decoding, the model and writing overlapped) and,
//! for detect, [`render`] (the files of one scored input) and [`run_heatmaps`] (heatmaps on
//! the run's scale). [`single`] runs a built detector on images held in memory (the Python
//! package's `Detector`), with detect's numbers.

pub mod bench;
pub mod calibrate;
pub mod detect;
pub mod evaluate;
pub mod features;
pub mod import;
pub mod info;
pub mod manifest;
pub mod merge;
pub mod pipeline;
pub mod prelude;
pub mod reference;
pub mod render;
pub mod run_heatmaps;
pub mod single;
pub mod train;
