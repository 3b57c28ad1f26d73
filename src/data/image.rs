//! Image decoding and resizing as the references do it (PIL).
//!
//! Decoding: PNG, JPEG (incl. CMYK), BMP, TIFF, WebP; 8/16-bit; grey, grey+alpha, RGB, RGBA. The
//! format is read from the bytes, not the extension. EXIF orientation is applied (camera photos
//! arrive rotated otherwise); PIL's `Image.open` does not, which only matters for EXIF-tagged
//! files, none of which are in the benchmark datasets. 16-bit samples are scaled to 8 bits by
//! rounding `v / 257` (PIL's `convert("RGB")` clips them instead, which saturates most 16-bit
//! images). Alpha is dropped without compositing, as `convert("RGB")` does.
//!
//! Resizing: Pillow's convolution resampling, bit-exact (`resample`): `BICUBIC`
//! (Keys a = -0.5) for images, `BILINEAR` for masks.

use std::panic::AssertUnwindSafe;
use std::path::Path;

use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage};

use super::resample::{resize, Filter};
use crate::error::{Error, Result};
use crate::fsio::FileKind;

fn image_error(path: &Path, message: impl Into<String>) -> Error {
    // Some decoders end their messages with a newline: one line per error.
    Error::input(path, message.into().trim_end().to_string())
}

/// What an input may cost before it is refused: checked against the file's size and the
/// header's dimensions before any pixel buffer is allocated, so a decompression bomb (a 100-byte
/// BMP that declares 60000x60000) or a 40,000,000x1 strip is an error for that input, never an
/// abort of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest `width * height` accepted (`--max-pixels`).
    pub max_pixels: u64,
    /// Largest file read, in bytes.
    pub max_file_bytes: u64,
    /// Largest ratio of the long side to the short one.
    pub max_aspect: u32,
}

/// 40 megapixels: above every inspection camera in the benchmark datasets (MVTec's largest is
/// 1024x1024, VisA's 2168x1516, a 20 MP line-scan frame fits) with room to spare.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// The most elongated image read: 100:1. The model squashes every image to a square, so a
/// strip beyond that holds no usable detail across its short side, while its map at full size
/// (and the resampling on the way) would cost memory out of all proportion.
pub const MAX_ASPECT: u32 = 100;

impl Default for DecodeLimits {
    fn default() -> Self {
        Self::with_max_pixels(DEFAULT_MAX_PIXELS)
    }
}

impl DecodeLimits {
    /// Limits for a pixel budget; the file may hold at most 16 bytes per pixel (uncompressed
    /// 16-bit RGBA is 8) plus 64 MiB of metadata.
    pub fn with_max_pixels(max_pixels: u64) -> Self {
        Self {
            max_pixels,
            max_file_bytes: max_pixels.saturating_mul(16).saturating_add(64 << 20),
            max_aspect: MAX_ASPECT,
        }
    }
}

/// Decodes any supported image file with the default limits, EXIF orientation applied.
pub fn decode(path: &Path) -> Result<DynamicImage> {
    decode_limited(path, &DecodeLimits::default())
}

/// Decodes an image file within `limits` (read through [`crate::fsio`]: regular files only,
/// bounded). A decoder bug must cost one file, not the command: a panic inside the decoder is
/// this file's error.
pub fn decode_limited(path: &Path, limits: &DecodeLimits) -> Result<DynamicImage> {
    let bytes = crate::fsio::read_bounded(path, FileKind::Image, limits.max_file_bytes)?;
    match std::panic::catch_unwind(AssertUnwindSafe(|| {
        decode_bytes_limited(path, &bytes, limits)
    })) {
        Ok(r) => r,
        Err(panic) => Err(image_error(
            path,
            format!(
                "the image decoder failed on this file ({}); the file is probably malformed",
                panic_text(&panic)
            ),
        )),
    }
}

/// The text of a caught panic.
pub fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// An error's message without the leading `path: ` (a record already names its input).
pub fn strip_path(msg: String, path: &Path) -> String {
    let prefix = format!("{}: ", path.display());
    msg.strip_prefix(&prefix).map(str::to_string).unwrap_or(msg)
}

/// Decodes `path` within `limits` to 8-bit RGB (EXIF orientation applied), or says why not
/// (the path left out, for a record's `error`).
pub fn decode_rgb(path: &Path, limits: &DecodeLimits) -> std::result::Result<RgbImage, String> {
    decode_limited(path, limits)
        .map(into_rgb8)
        .map_err(|e| strip_path(e.to_string(), path))
}

/// An image file's width and height from its header alone, read through the guarded reader
/// (a FIFO or a device is refused, never waited on).
pub fn dimensions(path: &Path) -> Result<(u32, u32)> {
    let opened = crate::fsio::open(path, FileKind::Image)?;
    ImageReader::new(std::io::BufReader::new(opened.file))
        .with_guessed_format()
        .map_err(|e| image_error(path, format!("cannot read: {e}")))?
        .into_dimensions()
        .map_err(|e| image_error(path, format!("unreadable: {e}")))
}

/// A mask file as 8-bit grey (any channel counts), read and decoded the guarded way.
pub fn decode_mask(path: &Path) -> Result<GrayImage> {
    decode(path).map(|img| to_luma8(&img))
}

/// Decodes bytes with the default limits; `path` only names the image in errors.
pub fn decode_bytes(path: &Path, bytes: &[u8]) -> Result<DynamicImage> {
    decode_bytes_limited(path, bytes, &DecodeLimits::default())
}

/// JPEG data must end its last scan with an EOI marker. A JPEG cut short decodes "fine" with
/// the missing rows painted grey; Pillow refuses it ("image file is truncated"), and so do we.
/// Entropy-coded data never holds `FF D9` (0xFF bytes are stuffed as `FF 00`), so the last EOI
/// must come after the last start-of-scan (`FF DA`); an EXIF thumbnail's own markers come
/// before the main image's scans.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let find_last = |m: [u8; 2]| bytes.windows(2).rposition(|w| w == m);
    match (find_last([0xFF, 0xDA]), find_last([0xFF, 0xD9])) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

/// Decodes bytes within `limits`; `path` only names the image in errors.
pub fn decode_bytes_limited(
    path: &Path,
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(image_error(path, "empty file (0 bytes)"));
    }
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_error(path, format!("cannot read: {e}")))?;
    let Some(format) = reader.format() else {
        return Err(image_error(
            path,
            "not an image: unrecognised file signature",
        ));
    };
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(image_error(
            path,
            "image file is truncated (the JPEG data ends before its end-of-image marker)",
        ));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| image_error(path, format!("cannot decode: {e}")))?;
    let (w, h) = decoder.dimensions();
    check_dimensions(path, w, h, limits)?;
    // The decoder's own allocations (the frame, a decoder's scratch rows) stay within what the
    // budget implies for the worst sample type (16-bit RGBA, 8 bytes a pixel), doubled.
    let mut dec_limits = image::Limits::default();
    dec_limits.max_image_width = Some(w);
    dec_limits.max_image_height = Some(h);
    dec_limits.max_alloc = Some(limits.max_pixels.saturating_mul(16).max(64 << 20));
    decoder
        .set_limits(dec_limits)
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

/// Whether a `w` x `h` image is within `limits` (its shape and its pixel budget), checked before
/// any pixel buffer is allocated; `path` names the image in the error. Decoded files and images
/// handed over in memory (the Python package's arrays) are held to the same limits.
pub fn check_dimensions(path: &Path, w: u32, h: u32, limits: &DecodeLimits) -> Result<()> {
    let pixels = w as u64 * h as u64;
    let (long, short) = (w.max(h) as u64, w.min(h).max(1) as u64);
    if short > 0 && long > limits.max_aspect as u64 * short {
        return Err(image_error(
            path,
            format!(
                "{w}x{h} is more elongated than {}:1; the model squashes images to a square, so split it into tiles of a shape the model can see",
                limits.max_aspect
            ),
        ));
    }
    if pixels > limits.max_pixels {
        return Err(image_error(
            path,
            format!(
                "{w}x{h} = {pixels} pixels is over the budget of {} (`max_pixels`; raise it if the image is real)",
                limits.max_pixels
            ),
        ));
    }
    Ok(())
}

/// 8-bit RGB as PIL's `convert("RGB")` gives it, but with 16-bit samples scaled (see module docs).
pub fn to_rgb8(img: &DynamicImage) -> RgbImage {
    // image's own conversion scales 16-bit and float samples to 8 bits and drops alpha.
    img.to_rgb8()
}

/// [`to_rgb8`] that keeps an 8-bit RGB image's own buffer (most photographs and PNGs) instead
/// of converting it pixel by pixel into a copy.
pub fn into_rgb8(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => to_rgb8(&other),
    }
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

    fn encoded(format: image::ImageFormat, w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 13) as u8, (y * 7) as u8, 40]));
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut out), format)
            .unwrap();
        out
    }

    #[test]
    fn truncated_files_of_every_format_are_errors() {
        let p = Path::new("x");
        for f in [
            image::ImageFormat::Png,
            image::ImageFormat::Jpeg,
            image::ImageFormat::Bmp,
            image::ImageFormat::Tiff,
            image::ImageFormat::WebP,
        ] {
            let b = encoded(f, 64, 48);
            assert!(decode_bytes(p, &b).is_ok(), "{f:?} whole");
            // (A PNG cut inside its final IEND chunk has all its pixels: Pillow reads it too.)
            let near_end = if f == image::ImageFormat::Png {
                b.len() - 16
            } else {
                b.len() - 4
            };
            for cut in [b.len() / 2, b.len() * 3 / 4, near_end] {
                assert!(
                    decode_bytes(p, &b[..cut]).is_err(),
                    "{f:?} cut at {cut} of {} decoded",
                    b.len()
                );
            }
        }
        // A JPEG with trailing bytes after its end is whole, as for Pillow.
        let mut j = encoded(image::ImageFormat::Jpeg, 16, 16);
        j.extend(b"trailing");
        assert!(decode_bytes(p, &j).is_ok());
    }

    #[test]
    fn the_pixel_budget_is_checked_before_decoding() {
        let b = encoded(image::ImageFormat::Png, 40, 30);
        let small = DecodeLimits::with_max_pixels(1199);
        let e = decode_bytes_limited(Path::new("x.png"), &b, &small)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("40x30 = 1200 pixels") && e.contains("`max_pixels`"),
            "{e}"
        );
        assert!(
            decode_bytes_limited(Path::new("x.png"), &b, &DecodeLimits::with_max_pixels(1200))
                .is_ok()
        );
        let e = decode(Path::new("/dev/null")).unwrap_err().to_string();
        assert!(e.contains("character device"), "{e}");
        let e = decode(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("folder"), "{e}");
        // A strip more elongated than 100:1 is refused from the header, both ways round.
        for (w, h) in [(1001, 10), (10, 1001)] {
            let b = encoded(image::ImageFormat::Png, w, h);
            let e = decode_bytes(Path::new("x.png"), &b)
                .unwrap_err()
                .to_string();
            assert!(e.contains("more elongated than 100:1"), "{e}");
        }
        assert!(decode_bytes(
            Path::new("x.png"),
            &encoded(image::ImageFormat::Png, 1000, 10)
        )
        .is_ok());
    }

    /// Seeded mutations of small valid files in every format: each decodes or is an error,
    /// never a panic and never an allocation past the budget (an abort would end the test).
    #[test]
    fn mutated_images_never_panic() {
        let mut rng = crate::rng::SplitMix64(11);
        let limits = DecodeLimits::with_max_pixels(1 << 20);
        let bases: Vec<Vec<u8>> = [
            image::ImageFormat::Png,
            image::ImageFormat::Jpeg,
            image::ImageFormat::Bmp,
            image::ImageFormat::Tiff,
            image::ImageFormat::WebP,
        ]
        .iter()
        .map(|&f| encoded(f, 24, 20))
        .collect();
        let mut errors = 0;
        for i in 0..4000 {
            let mut b = bases[i % bases.len()].clone();
            for _ in 0..1 + rng.next_u64() % 4 {
                let span = if rng.next_u64().is_multiple_of(2) {
                    64
                } else {
                    b.len()
                } as u64;
                let at = (rng.next_u64() % span.min(b.len() as u64)) as usize;
                match rng.next_u64() % 4 {
                    0 => b[at] = rng.next_u64() as u8,
                    1 => b[at] ^= 1 << (rng.next_u64() % 8),
                    2 => b.insert(at, rng.next_u64() as u8),
                    _ => b.truncate(at.max(1)),
                }
            }
            let r = std::panic::catch_unwind(|| {
                decode_bytes_limited(Path::new("f"), &b, &limits).is_err()
            });
            match r {
                Ok(failed) => errors += failed as usize,
                Err(_) => panic!("mutation {i} panicked the decoder"),
            }
        }
        assert!(
            errors > 1000,
            "the mutations should break most files ({errors})"
        );
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
