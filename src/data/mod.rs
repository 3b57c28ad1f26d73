//! Data I/O that does not depend on the model: image decoding and PIL-exact resizing, input
//! lists, output records and maps, annotated datasets, safetensors files.

pub mod dataset;
pub mod draw;
pub mod heatmap;
pub mod image;
pub mod inputs;
pub mod outputs;
pub mod records;
pub mod resample;
pub mod run_record;
pub mod tensors;
