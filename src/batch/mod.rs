//! Batch work over many images: the staged [`pipeline`] every scoring command runs, the
//! [`detect`] job with its [`run_record`] (`run.json`), the per-input files ([`render`]) and
//! [`progress`] reporting for terminals and logs alike.

pub mod detect;
pub mod pipeline;
pub mod progress;
pub mod render;
pub mod run_record;
