//! zsad: zero-shot visual anomaly detection with CLIP, on candle.
//!
//! The modules form layers; each uses only those listed before it (`tests/architecture.rs`
//! reads `src/` and fails on an import that points up, or on two files that import each
//! other). From the bottom:
//!
//! 1. Foundations: [`error`] (errors by concern), [`fsio`] (the one guarded reader and the one
//!    confined writer), [`rng`], [`choice`] (named alternatives), [`progress`], [`interp`]
//!    (PyTorch-exact interpolation weights), [`settings`] (run settings flattened and compared),
//!    [`device`] (the GPU: its errors and memory).
//! 2. [`data`]: decoding and PIL-exact resizing, inputs, records and regions, maps, `run.json`,
//!    annotated datasets, heatmaps, safetensors files.
//! 3. [`clip`]: the backbone, exact to the reference implementations, with the anomaly hooks.
//! 4. [`method`]: the detectors on CLIP: configuration, learnable parameters, the forward as
//!    stages over pure scoring functions, adapter files, reference banks.
//! 5. [`eval`] (the field's metrics as the reference code computes them), then [`decision`]
//!    (thresholds, defect masks and regions), [`train`] (losses, optimiser, augmentation, the
//!    training loop) and [`report`] (the HTML page over a run's folder).
//! 6. [`jobs`]: every command as a library job over typed options (detect, eval, calibrate,
//!    train, merge, bench, features, reference banks, manifests, imports), sharing one prelude.
//! 7. [`cli`]: the `zsad` command line: flags to options, results to output and exit status.

pub mod choice;
pub mod cli;
pub mod clip;
pub mod data;
pub mod decision;
pub mod device;
pub mod error;
pub mod eval;
pub mod fsio;
pub mod interp;
pub mod jobs;
pub mod method;
pub mod progress;
pub mod report;
pub mod rng;
pub mod settings;
pub mod train;

pub use error::{Error, Result};

/// This zsad's version (the `zsad --version` of the same build, and the Python package's
/// `zsad.__version__`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
