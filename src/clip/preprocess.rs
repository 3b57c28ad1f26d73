//! CLIP input tensors: PIL-bicubic squash to the model size, `ToTensor`, CLIP mean/std.

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::data::image::resize_bicubic;
use crate::Result;

pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
// Written as OpenAI's CLIP writes them (clip/clip.py, `Normalize`), not in f32's shortest form.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// `[3, H, W]` normalised planes of an RGB image, `(v / 255 - mean) / std`.
pub fn normalize(img: &RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = (px.0[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    out
}

/// Resizes to `size`x`size` without keeping the aspect ratio (as AdaCLIP/AnomalyCLIP do) and
/// normalises: `[3, size, size]`.
pub fn preprocess(img: &RgbImage, size: usize, dev: &Device) -> Result<Tensor> {
    let resized = resize_bicubic(img, size as u32, size as u32);
    Ok(Tensor::from_vec(normalize(&resized), (3, size, size), dev)?)
}
