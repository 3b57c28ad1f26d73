//! Small copies of each row's image, heatmap and mask, so a page of a 10,000-image run opens
//! at once and shows formats a browser cannot (TIFF). They live in `DIR/thumbs/`, named by a
//! hash of the record's path, and are made again only when missing or older than their source.

use std::path::Path;

use image::{DynamicImage, GrayImage, RgbImage};
use sha2::{Digest, Sha256};

use crate::data::image::DecodeLimits;
use crate::fsio::OutDir;

/// The folder of thumbnails inside a run's folder.
pub const FOLDER: &str = "thumbs";

/// What a thumbnail shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Image,
    /// A larger copy of an image whose format a browser cannot show (TIFF), for the enlarged
    /// view.
    Preview,
    Heatmap,
    /// A heatmap with its defect mask's outline drawn after shrinking (a 1-pixel outline of the
    /// full-size heatmap would vanish).
    Outlined,
    Mask,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Preview => "preview",
            Self::Heatmap => "heatmap",
            Self::Outlined => "outlined",
            Self::Mask => "mask",
        }
    }

    /// Masks stay lossless PNG (sharp edges); the rest are JPEG (a tenth of the bytes).
    fn extension(self) -> &'static str {
        match self {
            Self::Mask => "png",
            _ => "jpg",
        }
    }
}

/// Formats every browser shows: the original is linked for the enlarged view.
pub fn browser_shows(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["png", "jpg", "jpeg", "bmp", "webp", "gif"]
            .iter()
            .any(|x| x.eq_ignore_ascii_case(e))
    })
}

/// `thumbs/<16 hex digits of SHA-256(record path)>-<kind>.<ext>`, relative to the run folder.
pub fn name(record_path: &str, kind: Kind) -> String {
    let h = Sha256::digest(record_path.as_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{FOLDER}/{hex}-{}.{}", kind.name(), kind.extension())
}

/// Whether `name` is a file [`name`] makes (so `--overwrite` removes only those).
pub fn is_thumbnail_name(name: &str) -> bool {
    let Some((hex, rest)) = name.split_once('-') else {
        return false;
    };
    hex.len() == 16
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && [
            Kind::Image,
            Kind::Preview,
            Kind::Heatmap,
            Kind::Outlined,
            Kind::Mask,
        ]
        .iter()
        .any(|k| rest == format!("{}.{}", k.name(), k.extension()))
}

/// The size thumbnails are made at.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Longest side of row thumbnails.
    pub thumbnail: u32,
    /// Longest side of previews.
    pub preview: u32,
}

/// Whether `thumb` exists and is at least as new as `source`.
fn fresh(thumb: &Path, source: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((modified(thumb), modified(source)), (Some(t), Some(s)) if t >= s)
}

fn shrink(img: &DynamicImage, side: u32) -> DynamicImage {
    let (w, h) = (img.width(), img.height());
    if w.max(h) <= side {
        return img.clone();
    }
    let scale = side as f64 / w.max(h) as f64;
    let (tw, th) = (
        ((w as f64 * scale).round() as u32).max(1),
        ((h as f64 * scale).round() as u32).max(1),
    );
    img.thumbnail_exact(tw, th)
}

fn encode(img: &DynamicImage, kind: Kind) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let r = match kind {
        Kind::Mask => {
            let g: GrayImage = img.to_luma8();
            g.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        }
        _ => {
            let rgb: RgbImage = img.to_rgb8();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85).encode_image(&rgb)
        }
    };
    r.map(|()| out)
        .map_err(|e| format!("cannot encode a thumbnail: {e}"))
}

/// Makes (or keeps, when fresh) the thumbnails of `kinds` of `source` for the record
/// `record_path` in `dir`, decoding `source` once for all that are stale; returns their paths
/// relative to `dir`, in the order of `kinds`, or why there are none. `kinds` are all of the
/// input ([`Kind::Image`], [`Kind::Preview`]) or all of the run's own files.
pub fn make(
    dir: &OutDir,
    record_path: &str,
    source: &Path,
    kinds: &[Kind],
    sizes: Sizes,
    limits: &DecodeLimits,
) -> Result<Vec<String>, String> {
    let rels: Vec<String> = kinds.iter().map(|&k| name(record_path, k)).collect();
    let stale: Vec<(Kind, &String)> = kinds
        .iter()
        .zip(&rels)
        .filter(|(_, rel)| !fresh(&dir.root().join(rel), source))
        .map(|(&k, rel)| (k, rel))
        .collect();
    let Some(&(first, _)) = stale.first() else {
        return Ok(rels);
    };
    let img: DynamicImage = match first {
        Kind::Image | Kind::Preview => {
            crate::data::image::decode_rgb(source, limits).map(DynamicImage::ImageRgb8)?
        }
        // The run's own files: PNGs at most as large as the images.
        Kind::Heatmap | Kind::Outlined | Kind::Mask => {
            crate::data::image::decode_limited(source, limits).map_err(|e| e.to_string())?
        }
    };
    for (kind, rel) in stale {
        let side = match kind {
            Kind::Preview => sizes.preview,
            _ => sizes.thumbnail,
        };
        let bytes = encode(&shrink(&img, side), kind)?;
        dir.write(rel, &bytes).map_err(|e| e.to_string())?;
    }
    Ok(rels)
}

/// The mask (`mw` x `mh`, row-major) on a `tw` x `th` thumbnail of a picture `w` pixels wide
/// and `mh` tall whose top-left `mw` x `mh` pixels it covers (a heatmap with a colour bar is
/// wider than its mask): a thumbnail pixel is in the mask when any of its source pixels is.
fn shrink_mask(mask: &[bool], (mw, mh): (u32, u32), w: u32, (tw, th): (u32, u32)) -> Vec<bool> {
    let mut out = vec![false; (tw * th) as usize];
    for y in 0..mh {
        let ty = (y as u64 * th as u64 / mh.max(1) as u64) as u32;
        for x in 0..mw {
            if mask[(y * mw + x) as usize] {
                let tx = (x as u64 * tw as u64 / w.max(1) as u64) as u32;
                out[(ty.min(th - 1) * tw + tx.min(tw - 1)) as usize] = true;
            }
        }
    }
    out
}

/// Paints the outline of `mask` (the thumbnail's size) one to two pixels wide: the mask pixels
/// with a 4-neighbour outside it, and the outside pixels right of or below a mask pixel (so a
/// line one pixel wide, the outline of a thin defect, is drawn two wide: JPEG's halved colour
/// resolution keeps it).
fn draw_outline(img: &mut RgbImage, mask: &[bool]) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let inside = |x: i64, y: i64| x >= 0 && y >= 0 && x < w && y < h && mask[(y * w + x) as usize];
    for y in 0..h {
        for x in 0..w {
            let edge = if inside(x, y) {
                [(1, 0), (-1, 0), (0, 1), (0, -1)]
                    .iter()
                    .any(|(dx, dy)| !inside(x + dx, y + dy))
            } else {
                inside(x - 1, y) || inside(x, y - 1)
            };
            if edge {
                img.put_pixel(
                    x as u32,
                    y as u32,
                    image::Rgb(crate::data::heatmap::OUTLINE),
                );
            }
        }
    }
}

/// The thumbnail of a heatmap with the outline of the record's defect mask drawn on it after
/// shrinking ([`Kind::Outlined`]); made again when either file is newer. A mask that cannot be
/// read, or does not fit the heatmap, leaves the thumbnail without an outline (the mask's own
/// thumbnail says why).
pub fn make_outlined(
    dir: &OutDir,
    record_path: &str,
    heatmap: &Path,
    mask: &Path,
    sizes: Sizes,
    limits: &DecodeLimits,
) -> Result<String, String> {
    let rel = name(record_path, Kind::Outlined);
    let thumb = dir.root().join(&rel);
    if fresh(&thumb, heatmap) && fresh(&thumb, mask) {
        return Ok(rel);
    }
    let img = crate::data::image::decode_limited(heatmap, limits).map_err(|e| e.to_string())?;
    let mut small = shrink(&img, sizes.thumbnail).to_rgb8();
    let m = crate::data::image::decode_limited(mask, limits).map(|m| m.to_luma8());
    if let Some(m) = m
        .ok()
        .filter(|m| m.height() == img.height() && m.width() <= img.width())
    {
        let bits: Vec<bool> = m.as_raw().iter().map(|&v| v > 127).collect();
        let shrunk = shrink_mask(&bits, m.dimensions(), img.width(), small.dimensions());
        draw_outline(&mut small, &shrunk);
    }
    let bytes = encode(&DynamicImage::ImageRgb8(small), Kind::Outlined)?;
    dir.write(&rel, &bytes).map_err(|e| e.to_string())?;
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::GenericImageView;

    #[test]
    fn names_are_stable_and_recognised() {
        let a = name("data/x.png", Kind::Image);
        assert_eq!(a, name("data/x.png", Kind::Image));
        assert_ne!(a, name("data/y.png", Kind::Image));
        assert!(a.starts_with("thumbs/") && a.ends_with("-image.jpg"));
        assert!(name("x", Kind::Mask).ends_with("-mask.png"));
        let file = |k| name("q", k).trim_start_matches("thumbs/").to_string();
        for k in [
            Kind::Image,
            Kind::Preview,
            Kind::Heatmap,
            Kind::Outlined,
            Kind::Mask,
        ] {
            assert!(is_thumbnail_name(&file(k)));
        }
        for bad in [
            "x-image.jpg",
            "0123456789abcdef-image.png",
            "report.html",
            "0123456789abcdeg-mask.png",
        ] {
            assert!(!is_thumbnail_name(bad), "{bad}");
        }
        assert!(browser_shows(Path::new("a/B.JPG")) && !browser_shows(Path::new("a.tiff")));
    }

    #[test]
    fn shrinks_to_the_longest_side_and_keeps_small_images() {
        let img = DynamicImage::ImageRgb8(RgbImage::new(900, 300));
        assert_eq!(shrink(&img, 180).dimensions(), (180, 60));
        let tall = DynamicImage::ImageRgb8(RgbImage::new(1, 5000));
        assert_eq!(shrink(&tall, 100).dimensions(), (1, 100));
        let small = DynamicImage::ImageRgb8(RgbImage::new(20, 10));
        assert_eq!(shrink(&small, 180).dimensions(), (20, 10));
    }

    #[test]
    fn a_mask_shrinks_to_every_thumbnail_pixel_it_touches() {
        // One pixel of a 100 x 100 mask is a pixel of a 10 x 10 thumbnail.
        let mut m = vec![false; 100 * 100];
        m[57 * 100 + 53] = true;
        let t = shrink_mask(&m, (100, 100), 100, (10, 10));
        assert_eq!(t.iter().filter(|&&b| b).count(), 1);
        assert!(t[5 * 10 + 5]);
        // Beside a colour bar (the heatmap 130 wide), the mask keeps the image's scale.
        let mut m = vec![false; 100 * 100];
        m[99] = true;
        let t = shrink_mask(&m, (100, 100), 130, (13, 10));
        assert!(t[9] && t.iter().filter(|&&b| b).count() == 1);
        // Its outline: the pixel, and the ones right of and below it (two pixels wide).
        let mut img = RgbImage::new(10, 10);
        let mut one = vec![false; 100];
        one[5 * 10 + 5] = true;
        draw_outline(&mut img, &one);
        let cyan: Vec<(u32, u32)> = (0..10)
            .flat_map(|y| (0..10).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0 == crate::data::heatmap::OUTLINE)
            .collect();
        assert_eq!(cyan, vec![(5, 5), (6, 5), (5, 6)]);
        // A filled square: its edge one pixel inside, plus one outside on the right and below.
        let mut img = RgbImage::new(10, 10);
        let square: Vec<bool> = (0..100)
            .map(|i| (2..6).contains(&(i % 10)) && (2..6).contains(&(i / 10)))
            .collect();
        draw_outline(&mut img, &square);
        let row = |y: u32| -> Vec<bool> {
            (0..10)
                .map(|x| img.get_pixel(x, y).0 == crate::data::heatmap::OUTLINE)
                .collect()
        };
        let t = true;
        let f = false;
        assert_eq!(row(1), [f; 10]);
        assert_eq!(row(2), [f, f, t, t, t, t, t, f, f, f]);
        assert_eq!(row(3), [f, f, t, f, f, t, t, f, f, f]);
        assert_eq!(row(6), [f, f, t, t, t, t, f, f, f, f]);
    }

    #[test]
    fn outlined_heatmap_thumbnails_show_a_one_pixel_mask() {
        let dir = std::env::temp_dir().join(format!("zsad-outlined-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let heat = dir.join("heat.png");
        RgbImage::from_pixel(400, 400, image::Rgb([60, 10, 90]))
            .save(&heat)
            .unwrap();
        // A mask of one thin line: lost when the mask itself is shrunk by averaging.
        let mask = dir.join("mask.png");
        GrayImage::from_fn(400, 400, |x, y| {
            image::Luma([if x == 200 && (100..300).contains(&y) {
                255
            } else {
                0
            }])
        })
        .save(&mask)
        .unwrap();
        let out = OutDir::create(&dir).unwrap();
        let sizes = Sizes {
            thumbnail: 100,
            preview: 300,
        };
        let rel =
            make_outlined(&out, "x.png", &heat, &mask, sizes, &DecodeLimits::default()).unwrap();
        assert!(rel.ends_with("-outlined.jpg"));
        let t = image::open(dir.join(&rel)).unwrap().to_rgb8();
        assert_eq!(t.dimensions(), (100, 100));
        let cyanish = |p: &image::Rgb<u8>| p.0[0] < 100 && p.0[1] > 160 && p.0[2] > 160;
        assert!(cyanish(t.get_pixel(50, 50)), "{:?}", t.get_pixel(50, 50));
        assert!(!cyanish(t.get_pixel(20, 50)) && !cyanish(t.get_pixel(50, 10)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn made_once_then_kept_until_the_source_changes() {
        let dir = std::env::temp_dir().join(format!("zsad-thumbs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("in.png");
        RgbImage::from_pixel(400, 200, image::Rgb([200, 10, 10]))
            .save(&src)
            .unwrap();
        let sizes = Sizes {
            thumbnail: 100,
            preview: 300,
        };
        let limits = DecodeLimits::default();
        let out = OutDir::create(&dir).unwrap();
        let rels = make(
            &out,
            "in.png",
            &src,
            &[Kind::Image, Kind::Preview],
            sizes,
            &limits,
        )
        .unwrap();
        assert_eq!(
            image::open(dir.join(&rels[1])).unwrap().dimensions(),
            (300, 150)
        );
        let rel = rels[0].clone();
        let t = image::open(dir.join(&rel)).unwrap();
        assert_eq!(t.dimensions(), (100, 50));
        let px = t.to_rgb8().get_pixel(50, 25).0;
        assert!(px[0] > 180 && px[1] < 40, "{px:?}");
        // Kept while fresh: a thumbnail replaced by hand stays.
        std::fs::write(dir.join(&rel), b"kept").unwrap();
        make(&out, "in.png", &src, &[Kind::Image], sizes, &limits).unwrap();
        assert_eq!(std::fs::read(dir.join(&rel)).unwrap(), b"kept");
        // Remade once the source is newer.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_modified(later)
            .unwrap();
        make(&out, "in.png", &src, &[Kind::Image], sizes, &limits).unwrap();
        assert!(image::open(dir.join(&rel)).is_ok());
        // A source that is not an image says why.
        std::fs::write(dir.join("bad.png"), b"not a png").unwrap();
        let e = make(
            &out,
            "bad.png",
            &dir.join("bad.png"),
            &[Kind::Image],
            sizes,
            &limits,
        )
        .unwrap_err();
        assert!(!e.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
