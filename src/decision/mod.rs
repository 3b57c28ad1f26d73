//! From scores to decisions: [`thresholds`] chosen on labelled or normal data as
//! scikit-learn's curves define them, and the defect [`regions`] of a map above a pixel
//! threshold.

pub mod regions;
pub mod thresholds;
