//! Raster drawing for the images zsad makes itself (plots, colour bars): text in an 8x8 bitmap
//! font (no system fonts, so every machine draws the same pixels) and thick lines.

use image::{Rgb, RgbImage};

/// The width and height of one glyph at scale 1.
pub const GLYPH: i64 = 8;

/// `s` in the 8x8 font at (x, y), top-left, each font pixel `scale` pixels wide; characters
/// outside ASCII are drawn as `?`, pixels outside the image are skipped.
pub fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, color: Rgb<u8>, scale: i64) {
    let mut cx = x;
    for ch in s.chars() {
        let glyph = font8x8::legacy::BASIC_LEGACY[if (ch as u32) < 128 {
            ch as usize
        } else {
            b'?' as usize
        }];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..GLYPH {
                if bits >> col & 1 == 1 {
                    fill(
                        img,
                        cx + col * scale,
                        y + row as i64 * scale,
                        scale,
                        scale,
                        color,
                    );
                }
            }
        }
        cx += GLYPH * scale;
    }
}

/// One pixel, skipped when outside the image.
pub fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// A `w` x `h` rectangle with its top-left corner at (x, y), clipped to the image.
pub fn fill(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>) {
    for dy in 0..h {
        for dx in 0..w {
            put(img, x + dx, y + dy, c);
        }
    }
}

/// A line `width` pixels thick (DDA with a square brush).
pub fn line(
    img: &mut RgbImage,
    (x0, y0): (f64, f64),
    (x1, y1): (f64, f64),
    c: Rgb<u8>,
    width: i64,
) {
    let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as i64;
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
        fill(
            img,
            x.round() as i64 - width / 2,
            y.round() as i64 - width / 2,
            width,
            width,
            c,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_draws_the_glyph_scaled_and_clips() {
        let white = Rgb([255, 255, 255]);
        let mut img = RgbImage::new(20, 10);
        // 'I' in font8x8: row 0 is 0x1E (columns 1..=4 set).
        text(&mut img, 0, 0, "I", white, 2);
        assert_eq!(img.get_pixel(2, 0).0, [255; 3]);
        assert_eq!(img.get_pixel(3, 1).0, [255; 3]);
        assert_eq!(img.get_pixel(0, 0).0, [0; 3]);
        assert_eq!(img.get_pixel(10, 0).0, [0; 3]);
        // Drawing past the edges is clipped, not a panic.
        text(&mut img, 15, 5, "WW", white, 3);
        text(&mut img, -30, -30, "x", white, 1);
        line(&mut img, (-5.0, -5.0), (40.0, 40.0), white, 3);
    }
}
