//! Batch work over many images: the staged [`pipeline`] every scoring command runs, the
//! [`detect`] job with its [`run_record`] (`run.json`), [`render`] for the files of one
//! scored input ([`run_heatmaps`] for heatmaps on the run's scale), and [`reference`] banks built from normal images.

pub mod detect;
pub mod pipeline;
pub mod reference;
pub mod render;
pub mod run_heatmaps;
pub mod run_record;
