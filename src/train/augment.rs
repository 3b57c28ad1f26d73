//! April-GAN's 2x2 mosaic (AdaCLIP `dataset/mvtec.py` `combine_img`): four images of one class
//! pasted into one, masks likewise, before the resize to the model's input size.

use image::{imageops, GrayImage, RgbImage};

use crate::data::dataset::Sample;
use crate::data::image::{decode, resize_bicubic, resize_bilinear_gray, to_luma8, to_rgb8};
use crate::Result;

/// An image and its 0/255 mask (all zero without a mask file).
pub fn load(s: &Sample) -> Result<(RgbImage, GrayImage)> {
    let rgb = to_rgb8(&decode(&s.image)?);
    let mask = match &s.mask {
        Some(m) => to_luma8(&decode(m)?),
        None => GrayImage::new(rgb.width(), rgb.height()),
    };
    Ok((rgb, mask))
}

/// One sample as it is, or four pasted in a 2x2 grid (each brought to the first one's size).
pub fn compose(samples: &[&Sample]) -> Result<(RgbImage, GrayImage)> {
    let mut loaded = samples
        .iter()
        .map(|s| load(s))
        .collect::<Result<Vec<_>>>()?;
    if loaded.len() == 1 {
        return Ok(loaded.remove(0));
    }
    let (w, h) = loaded[0].0.dimensions();
    let mut img = RgbImage::new(2 * w, 2 * h);
    let mut mask = GrayImage::new(2 * w, 2 * h);
    for (i, (rgb, m)) in loaded.into_iter().enumerate().take(4) {
        let (rgb, m) = if rgb.dimensions() == (w, h) {
            (rgb, m)
        } else {
            (resize_bicubic(&rgb, w, h), resize_bilinear_gray(&m, w, h))
        };
        let (x, y) = ((i as u32 % 2) * w, (i as u32 / 2) * h);
        imageops::replace(&mut img, &rgb, x as i64, y as i64);
        imageops::replace(&mut mask, &m, x as i64, y as i64);
    }
    Ok((img, mask))
}
