//! The files `zsad detect` writes beside its records: anomaly maps (16-bit PNG or `.npy`),
//! defect masks, and PNG encoding for heatmaps and plots; and reading maps back.

use std::path::Path;

use image::{ImageBuffer, Luma, RgbImage};

use crate::error::{Error, Result};
use crate::fsio::FileKind;

/// A defect mask as an 8-bit grey PNG: 255 where set, 0 elsewhere.
pub fn mask_png(mask: &[bool], w: u32, h: u32) -> Result<Vec<u8>> {
    let px: Vec<u8> = mask.iter().map(|&b| if b { 255 } else { 0 }).collect();
    let img: ImageBuffer<Luma<u8>, Vec<u8>> = ImageBuffer::from_raw(w, h, px)
        .ok_or_else(|| Error::output(format!("mask is not {w}x{h}")))?;
    encode_png(&img)
}

/// `round(p · 65535)` as a 16-bit grey PNG: one fixed scale for every image.
pub fn map_png(map: &[f32], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut px = vec![0u16; map.len()];
    levels16(map, &mut px);
    let img: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_raw(w, h, px)
        .ok_or_else(|| Error::output(format!("map is not {w}x{h}")))?;
    encode_png(&img)
}

/// `round(clamp(p, 0, 1) · 65535)`. `round()` (half away from zero) is a libm call per pixel;
/// on these non-negative values truncation plus a comparison of the (exact) fraction gives the
/// same integers, vectorised. NaN is level 0.
#[inline(always)]
fn level16(p: f32) -> u16 {
    // `clamp` that also sends NaN to 0, so `v` is always in [0, 65535].
    let v = crate::data::heatmap::unit_clamp(p) * 65535.0;
    // SAFETY: `v` is finite and in [0, 65535] (see above), which `u32` holds. The unchecked
    // conversion is one vector instruction; `as` adds a scalar range check per value.
    let t = unsafe { v.to_int_unchecked::<u32>() };
    (t + (v - t as f32 >= 0.5) as u32) as u16
}

#[inline(always)]
fn levels16_generic(map: &[f32], out: &mut [u16]) {
    for (o, &p) in out.iter_mut().zip(map) {
        *o = level16(p);
    }
}

crate::device::dispatch!(
    /// [`level16`] of every value, on this CPU's vector unit.
    levels16 => levels16_generic(map: &[f32], out: &mut [u16]) -> ()
);

/// PNG bytes with fast compression: maps and heatmaps are written once per input, and zlib's
/// default level costs more than the model on small backbones (about 40 ms at 900x900).
/// Adaptive filtering (each row tries all five filters) for maps and masks, whose bytes users
/// keep; the `Up` filter alone for heatmaps (pictures to look at), a quarter cheaper at 900x900
/// for about 25% more bytes.
fn encode_png<I>(img: &I) -> Result<Vec<u8>>
where
    I: image::GenericImageView,
    I::Pixel: image::PixelWithColorType,
    [<I::Pixel as image::Pixel>::Subpixel]: image::EncodableLayout,
    I: std::ops::Deref<Target = [<I::Pixel as image::Pixel>::Subpixel]>,
{
    encode_png_with(img, image::codecs::png::FilterType::Adaptive)
}

fn encode_png_with<I>(img: &I, filter: image::codecs::png::FilterType) -> Result<Vec<u8>>
where
    I: image::GenericImageView,
    I::Pixel: image::PixelWithColorType,
    [<I::Pixel as image::Pixel>::Subpixel]: image::EncodableLayout,
    I: std::ops::Deref<Target = [<I::Pixel as image::Pixel>::Subpixel]>,
{
    use image::codecs::png::{CompressionType, PngEncoder};
    use image::{EncodableLayout, ImageEncoder, PixelWithColorType};
    let mut out = Vec::new();
    let (w, h) = img.dimensions();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, filter)
        .write_image(
            img.as_bytes(),
            w,
            h,
            <I::Pixel as PixelWithColorType>::COLOR_TYPE,
        )
        .map_err(|e| Error::output(format!("cannot encode PNG: {e}")))?;
    Ok(out)
}

/// The largest map read back: the largest pixel budget an image may have (`max_pixels`).
pub const MAX_MAP_PIXELS: u64 = 4_000_000_000;

/// Reads a map PNG written by [`map_png`] back as probabilities.
pub fn read_map_png(path: &Path) -> Result<(Vec<f32>, u32, u32)> {
    let limits = crate::data::image::DecodeLimits::with_max_pixels(MAX_MAP_PIXELS);
    let img = crate::data::image::decode_limited(path, &limits)?;
    let g = img.to_luma16();
    let (w, h) = g.dimensions();
    Ok((
        g.into_raw().iter().map(|&v| v as f32 / 65535.0).collect(),
        w,
        h,
    ))
}

/// A little-endian f32 `.npy` (NumPy format 1.0) of shape `(h, w)`.
pub fn map_npy(map: &[f32], w: u32, h: u32) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({h}, {w}), }}");
    // magic (6) + version (2) + header length (2) + header + '\n' is a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + map.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    // The values into a buffer of their final size: a copy on little-endian machines, where
    // growing the vector four bytes at a time cost ~1.5 ms at 900x900.
    let start = out.len();
    out.resize(start + map.len() * 4, 0);
    for (o, v) in out[start..].chunks_exact_mut(4).zip(map) {
        o.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads a map written by [`map_npy`]: `(values, width, height)`.
pub fn read_map_npy(path: &Path) -> Result<(Vec<f32>, u32, u32)> {
    // A map is at most the largest image: 4 bytes a pixel of the largest pixel budget, plus
    // the header. Only a regular file is read (a FIFO cannot stall).
    let bytes = crate::fsio::read_bounded(path, FileKind::Map, 4 * MAX_MAP_PIXELS + 4096)?;
    parse_map_npy(&bytes, path)
}

/// A written map, `.npy` or 16-bit PNG by its extension: values, width, height.
pub fn read_map(path: &Path) -> Result<(Vec<f32>, u32, u32)> {
    if path.extension().is_some_and(|e| e == "npy") {
        read_map_npy(path)
    } else {
        read_map_png(path)
    }
}

/// [`read_map_npy`] on bytes in memory (`path` names them in errors).
pub fn parse_map_npy(bytes: &[u8], path: &Path) -> Result<(Vec<f32>, u32, u32)> {
    let bad = |m: &str| Error::input(path.to_path_buf(), m.to_string());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(
        bytes
            .get(10..10 + hlen)
            .ok_or_else(|| bad("truncated header"))?,
    )
    .map_err(|_| bad("unreadable header"))?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("expected a little-endian float32 array in C order"));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<u32> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_>>()?;
    let [h, w] = dims[..] else {
        return Err(bad("expected a 2-D array"));
    };
    let data = &bytes[10 + hlen..];
    // A crafted shape must not overflow into a size that happens to match the data.
    let want = (w as u64)
        .checked_mul(h as u64)
        .and_then(|n| n.checked_mul(4));
    if want != Some(data.len() as u64) {
        let want = want.map_or("more than 2^64".to_string(), |n| n.to_string());
        return Err(Error::input(
            path,
            format!(
                "shape ({h}, {w}) needs {want} bytes of float32 data, the file holds {}",
                data.len()
            ),
        ));
    }
    let v = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((v, w, h))
}

crate::choice::choice_enum! {
    /// What map file to write.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum MapFormat {
        /// 16-bit grey PNG, value = round(p · 65535)
        Png = "png",
        /// float32 NumPy array (full precision)
        Npy = "npy",
        /// no map files (scores only)
        None = "none",
    }
}

/// An RGB picture (heatmap, plot) as PNG bytes, with the cheaper `Up` filter.
pub fn png_bytes_rgb(img: &RgbImage) -> Result<Vec<u8>> {
    encode_png_with(img, image::codecs::png::FilterType::Up)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised rounding equals `round()` on every value the map scale produces near
    /// its half-way points.
    #[test]
    fn map_rounding_matches_round() {
        for i in 0..=65535u32 {
            for d in [-1e-3f32, -1e-6, 0.0, 1e-6, 1e-3] {
                let p = (i as f32 + 0.5) / 65535.0 + d;
                let want = (p.clamp(0.0, 1.0) * 65535.0).round() as u16;
                assert_eq!(level16(p), want, "{p}");
            }
        }
    }

    /// The dispatched conversion (AVX-512 or AVX2 where the CPU has them) gives `round()`'s
    /// levels, NaN and the infinities included.
    #[test]
    fn vector_levels_match_round() {
        let mut v: Vec<f32> = (0..=65535u32)
            .flat_map(|i| {
                let p = (i as f32 + 0.5) / 65535.0;
                [p, p.next_up(), p.next_down()]
            })
            .collect();
        v.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            -1.0,
            2.0,
            1.0,
        ]);
        let mut got = vec![0u16; v.len()];
        levels16(&v, &mut got);
        for (&p, &g) in v.iter().zip(&got) {
            let want = if p.is_nan() {
                0
            } else {
                (p.clamp(0.0, 1.0) * 65535.0).round() as u16
            };
            assert_eq!(g, want, "{p}");
        }
    }

    #[test]
    fn map_png_is_16_bit_on_a_fixed_scale() {
        let m = [0.0f32, 0.5, 1.0, 2.0, -1.0, 0.25];
        let bytes = map_png(&m, 3, 2).unwrap();
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!(img.color(), image::ColorType::L16);
        let v = img.to_luma16().into_raw();
        assert_eq!(v, vec![0, 32768, 65535, 65535, 0, 16384]);
    }

    #[test]
    fn npy_header_is_aligned() {
        let b = map_npy(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2);
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert_eq!(b.len(), 10 + hlen + 24);
        assert_eq!(&b[10 + hlen..10 + hlen + 4], &1.0f32.to_le_bytes());
        let p = std::env::temp_dir().join(format!("zsad-npy-{}.npy", std::process::id()));
        std::fs::write(&p, &b).unwrap();
        let (v, w, h) = read_map_npy(&p).unwrap();
        assert_eq!((v, w, h), (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2));
        std::fs::remove_file(&p).unwrap();
    }

    /// (65536, 65536) overflowed `u32` to 0 elements and matched an empty file.
    #[test]
    fn npy_shapes_are_checked_against_the_data() {
        let p = Path::new("crafted.npy");
        let mut b = map_npy(&[], 0, 0);
        let e = |b: &[u8]| parse_map_npy(b, p).unwrap_err().to_string();
        let header = |b: &mut Vec<u8>, shape: &str| {
            let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
            let h = std::str::from_utf8(&b[10..10 + hlen])
                .unwrap()
                .replace("(0, 0)", shape);
            let h = format!("{h:<width$}", width = hlen);
            b.splice(10..10 + hlen, h.bytes().take(hlen)).for_each(drop);
        };
        header(&mut b, "(65536, 65536)");
        assert_eq!(
            e(&b),
            "crafted.npy: shape (65536, 65536) needs 17179869184 bytes of float32 data, the file holds 0"
        );
        let mut b = map_npy(&[1.0, 2.0], 1, 2);
        b.pop();
        assert!(e(&b).contains("needs 8 bytes of float32 data, the file holds 7"));
        let mut b = map_npy(&[], 0, 0);
        header(&mut b, "(4294967295, 4294967295)");
        assert!(e(&b).contains("needs more than 2^64 bytes"), "{}", e(&b));
        assert!(e(b"\x93NUMPY\x01\x00\xff\xff{").contains("truncated header"));
    }
}
