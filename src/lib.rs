//! zsad: zero-shot visual anomaly detection with CLIP, on candle.
//!
//! Layers, from the bottom (each uses only those above it in this list):
//! - [`error`], [`choice`] (named alternatives the CLI offers), [`rng`], [`progress`], [`device`]
//!   (the GPU: its errors and memory);
//! - [`interp`] (PyTorch-exact interpolation weights) and [`data`] (inputs, image decoding and
//!   PIL-exact resizing, datasets, output files);
//! - [`clip`]: the backbone, exact to the reference implementations (linear and attention layers
//!   with fused CPU kernels, the encoder with the anomaly hooks, both towers, weights, tokenizer);
//! - [`method`]: the detectors on top of CLIP: a configuration ([`method::DetectorConfig`]), the
//!   learnable parameters under one name tree ([`method::params`]), the forward as stages over
//!   pure scoring functions ([`method::scoring`], [`method::maps`]), adapter files and the import
//!   of published checkpoints;
//! - [`train`] (losses, optimiser, augmentation, the training loop), [`eval`] (the field's
//!   metrics as the reference code computes them) and [`batch`] (scoring folders: decoding,
//!   batching and writing overlapped, resumable, sharded), [`decision`] (thresholds, defect
//!   masks and regions) and [`report`] (the HTML page over a run's folder);
//! - [`cli`]: the `zsad` command line, the only place that knows about flags and `anyhow`.

pub mod batch;
pub mod choice;
pub mod cli;
pub mod clip;
pub mod data;
pub mod decision;
pub mod device;
pub mod error;
pub mod eval;
pub mod interp;
pub mod method;
pub mod progress;
pub mod report;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
