//! Anomaly-detection methods built on the CLIP backbone (SPEC §1-§4). Pieces land here as the
//! methods are built: `maps` (upsampling and smoothing of anomaly maps), `kmeans` (HSF
//! clustering), `prompts` (hand-made prompt ensembles).

pub mod kmeans;
pub mod maps;
pub mod prompts;
