//! The anomaly-detection methods on top of the CLIP towers: one configurable detector
//! ([`detector`]) whose named presets are AdaCLIP, AnomalyCLIP, HeadCLIP, a training-free
//! ensemble and our own combination ([`config`]); the adapter file format ([`adapter`]);
//! import of the published checkpoints ([`import`]); and the pieces they share.

pub mod adapter;
pub mod config;
pub mod detector;
pub mod import;
pub mod kmeans;
pub mod maps;
pub mod params;
pub mod prompts;
pub mod reference;
pub mod scoring;
pub mod text;

pub use adapter::Adapter;
pub use config::{DetectorConfig, Preset};
pub use detector::{Detection, Detector, StageTimes};
pub use text::TextInputs;
