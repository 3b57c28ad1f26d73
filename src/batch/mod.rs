//! Batch work over many images: the staged [`pipeline`] every scoring command runs, the
//! [`detect`] job with its [`run_record`] (`run.json`), and [`render`] for the files of one
//! scored input.

pub mod detect;
pub mod pipeline;
pub mod render;
pub mod run_record;
