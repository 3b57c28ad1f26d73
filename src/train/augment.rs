//! April-GAN's 2x2 mosaic (AdaCLIP `dataset/mvtec.py` `combine_img`): four images of one class
//! pasted into one, masks likewise, before the resize to the model's input size.

use image::{imageops, GrayImage, RgbImage};

use crate::data::dataset::Sample;
use crate::data::image::{decode, decode_mask, into_rgb8, resize_bicubic, resize_bilinear_gray};
use crate::rng::SplitMix64;
use crate::Result;

/// An image and its 0/255 mask (all zero without a mask file).
pub fn load(s: &Sample) -> Result<(RgbImage, GrayImage)> {
    let rgb = into_rgb8(decode(&s.image)?);
    let mask = match &s.mask {
        Some(m) => decode_mask(m)?,
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

/// The samples one example is made of: sample `i` alone, or, with probability `rate` when its
/// class has at least four samples, `i` and three others of its class drawn at random
/// (`same`: the indices of `i`'s class).
pub fn mosaic_group(i: usize, same: &[usize], rate: f64, rng: &mut SplitMix64) -> Vec<usize> {
    if same.len() >= 4 && rng.next_f64() < rate {
        std::iter::once(i)
            .chain((0..3).map(|_| same[(rng.next_u64() % same.len() as u64) as usize]))
            .collect()
    } else {
        vec![i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mosaic takes the sample first and three of its class; a class of three never mosaics,
    /// nor a rate of 0; a rate of 1 always does.
    #[test]
    fn mosaic_groups_draw_from_the_class() {
        let mut rng = SplitMix64(7);
        let same = [3, 5, 8, 9];
        for _ in 0..20 {
            let g = mosaic_group(5, &same, 1.0, &mut rng);
            assert_eq!(g.len(), 4);
            assert_eq!(g[0], 5);
            assert!(g.iter().all(|j| same.contains(j)));
        }
        assert_eq!(mosaic_group(5, &same, 0.0, &mut rng), vec![5]);
        assert_eq!(mosaic_group(5, &[3, 5, 8], 1.0, &mut rng), vec![5]);
    }
}
