//! Data I/O that does not depend on the model: image decoding and PIL-exact resizing.

pub mod image;
pub mod inputs;
pub mod outputs;
pub mod resample;
pub mod tensors;
