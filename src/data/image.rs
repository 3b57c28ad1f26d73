//! Image decoding and resizing as the references do it (PIL).
//!
//! Decoding: PNG, JPEG (incl. CMYK), BMP, TIFF, WebP; 8/16-bit; grey, grey+alpha, RGB, RGBA. The
//! format is read from the bytes, not the extension. EXIF orientation is applied (camera photos
//! arrive rotated otherwise); PIL's `Image.open` does not, which only matters for EXIF-tagged
//! files, none of which are in the benchmark datasets. 16-bit samples are scaled to 8 bits by
//! rounding `v / 257` (PIL's `convert("RGB")` clips them instead, which saturates most 16-bit
//! images). Alpha is dropped without compositing, as `convert("RGB")` does.
//!
//! Resizing: Pillow's convolution resampling, bit-exact ([`super::resample`]): `BICUBIC`
//! (Keys a = -0.5) for images, `BILINEAR` for masks.

use std::path::Path;

use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage};

use super::resample::{resize, Filter};
use crate::{Error, Result};

fn image_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Decodes any supported image file, EXIF orientation applied.
pub fn decode(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_bytes(path, &bytes)
}

/// Decodes bytes; `path` only names the image in errors.
pub fn decode_bytes(path: &Path, bytes: &[u8]) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(image_error(path, "empty file (0 bytes)"));
    }
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_error(path, format!("cannot read: {e}")))?;
    if reader.format().is_none() {
        return Err(image_error(
            path,
            "not an image: unrecognised file signature",
        ));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| image_error(path, format!("cannot decode: {e}")))?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| image_error(path, format!("cannot decode: {e}")))?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(image_error(path, "image has no pixels"));
    }
    Ok(img)
}

/// 8-bit RGB as PIL's `convert("RGB")` gives it, but with 16-bit samples scaled (see module docs).
pub fn to_rgb8(img: &DynamicImage) -> RgbImage {
    // image's own conversion scales 16-bit and float samples to 8 bits and drops alpha.
    img.to_rgb8()
}

/// 8-bit grey (`convert("L")`-like) for masks: for colour masks, any channel's value counts.
pub fn to_luma8(img: &DynamicImage) -> GrayImage {
    match img {
        DynamicImage::ImageLuma8(g) => g.clone(),
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => {
            let rgb = img.to_rgb8();
            GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                let p = rgb.get_pixel(x, y).0;
                image::Luma([p[0].max(p[1]).max(p[2])])
            })
        }
        other => other.to_luma8(),
    }
}

/// Pillow-exact resize of an 8-bit image of any channel count.
fn resize_buffer<P: image::Pixel<Subpixel = u8>>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    w: u32,
    h: u32,
    filter: Filter,
) -> image::ImageBuffer<P, Vec<u8>> {
    let channels = P::CHANNEL_COUNT as usize;
    let (sw, sh) = (img.width() as usize, img.height() as usize);
    let out = resize(
        img.as_raw(),
        sw,
        sh,
        channels,
        w as usize,
        h as usize,
        filter,
    );
    image::ImageBuffer::from_raw(w, h, out).expect("size matches")
}

/// PIL `img.resize((w, h), Image.BICUBIC)` of an RGB image (aspect ratio not kept).
pub fn resize_bicubic(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    resize_buffer(img, w, h, Filter::Bicubic)
}

/// PIL `mask.resize((w, h), Image.BILINEAR)` of an 8-bit grey image.
pub fn resize_bilinear_gray(img: &GrayImage, w: u32, h: u32) -> GrayImage {
    resize_buffer(img, w, h, Filter::Bilinear)
}

/// The references' mask pipeline: bilinear resize of the 0/255 mask, `ToTensor`, `> 0.5`.
/// Row-major booleans.
pub fn resize_mask(mask: &GrayImage, w: u32, h: u32) -> Vec<bool> {
    resize_bilinear_gray(mask, w, h)
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 255.0 > 0.5)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_problem() {
        let p = Path::new("x.png");
        assert!(decode_bytes(p, b"")
            .unwrap_err()
            .to_string()
            .contains("empty file"));
        let e = decode_bytes(p, b"hello, I am text")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.png") && e.contains("not an image"), "{e}");
        let mut png = Vec::new();
        DynamicImage::new_rgb8(4, 4)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let e = decode_bytes(p, &png[..png.len() / 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot decode"), "{e}");
    }

    #[test]
    fn sixteen_bit_is_scaled_not_clipped() {
        let img = DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(
            2,
            2,
            image::Luma([32896u16]),
        ));
        assert_eq!(to_rgb8(&img).get_pixel(0, 0).0, [128, 128, 128]);
    }

    #[test]
    fn same_size_is_identity() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 70, 9]));
        assert_eq!(resize_bicubic(&img, 5, 3), img);
    }

    #[test]
    fn mask_threshold_is_strictly_above_half() {
        let m = GrayImage::from_raw(2, 1, vec![127, 128]).unwrap();
        assert_eq!(resize_mask(&m, 2, 1), vec![false, true]);
    }
}
