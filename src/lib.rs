//! zsad: zero-shot visual anomaly detection with CLIP, on candle.
//!
//! Layers, from the bottom: [`clip`] (the backbone, exact to the reference implementations),
//! [`data`] (image decoding and PIL-exact resizing), [`interp`] (PyTorch-exact interpolation
//! weights), [`method`] (anomaly-detection pieces on top of CLIP) and [`cli`] (the `zsad`
//! command line).

pub mod batch;
pub mod cli;
pub mod clip;
pub mod data;
pub mod error;
pub mod eval;
pub mod interp;
pub mod method;
pub mod progress;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
