//! One scored input's files: the map at the image's size (16-bit PNG or `.npy`), the heatmap
//! and, with a pixel threshold, the defect mask and its regions, encoded to bytes and then
//! written atomically.

use std::path::Path;

use image::RgbImage;

use crate::data::outputs::{self, HeatmapKind, MapFormat};
use crate::decision::regions::{defect_regions, Regions};
use crate::method::Detection;
use crate::{Error, Result};

/// The files written per input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputOptions {
    pub maps: MapFormat,
    pub heatmaps: HeatmapKind,
    /// Opacity of the colour in overlay heatmaps, in [0, 1].
    pub heatmap_alpha: f32,
    /// A defect mask (`masks/NAME.png`) and its regions where the map is at least this.
    pub pixel_threshold: Option<f32>,
    /// Regions smaller than this many pixels are dropped from the mask and the regions.
    pub min_region_area: u64,
}

impl Default for OutputOptions {
    fn default() -> Self {
        Self {
            maps: MapFormat::Png,
            heatmaps: HeatmapKind::Overlay,
            heatmap_alpha: 0.5,
            pixel_threshold: None,
            min_region_area: 1,
        }
    }
}

impl OutputOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.heatmap_alpha) {
            return Err(Error::Usage(format!(
                "--heatmap-alpha {}: must be in [0, 1] (0 shows only the image, 1 only the colour)",
                self.heatmap_alpha
            )));
        }
        if let Some(p) = self.pixel_threshold {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::Usage(format!(
                    "--pixel-threshold {p}: map values are in [0, 1], so the threshold must be too"
                )));
            }
        }
        Ok(())
    }
}

/// One scored input's files as bytes, with the statistics of its map at the image's size.
pub struct Rendered {
    /// `(path relative to the output folder, bytes)`: the map, then the heatmap.
    pub files: Vec<(String, Vec<u8>)>,
    pub map: Option<String>,
    pub heatmap: Option<String>,
    pub mask: Option<String>,
    pub regions: Option<Regions>,
    pub map_max: f32,
    pub map_mean: f32,
}

/// `DIR/KEY.EXT` as a `/`-separated path relative to the output folder.
pub fn output_path(dir: &str, key: &str, ext: &str) -> String {
    format!("{dir}/{key}.{ext}")
}

/// Resizes the map to the image and encodes what `opts` asks for, under `key` (the input's
/// output name, see [`crate::data::inputs::Input::key`]).
pub fn render(
    opts: &OutputOptions,
    key: &str,
    rgb: &RgbImage,
    det: &Detection,
) -> Result<Rendered> {
    let (w, h) = rgb.dimensions();
    let map = crate::method::maps::resize_map(&det.map, det.size, det.size, h as usize, w as usize);
    let mut files = Vec::new();
    let map_rel = match opts.maps {
        MapFormat::Png => Some((
            output_path("maps", key, "png"),
            outputs::map_png(&map, w, h)?,
        )),
        MapFormat::Npy => Some((
            output_path("maps", key, "npy"),
            outputs::map_npy(&map, w, h),
        )),
        MapFormat::None => None,
    }
    .map(|(r, bytes)| {
        files.push((r.clone(), bytes));
        r
    });
    let defects = opts
        .pixel_threshold
        .map(|t| defect_regions(&map, w as usize, h as usize, t, opts.min_region_area));
    let heat_rel = match opts.heatmaps {
        HeatmapKind::None => None,
        kind => {
            let r = output_path("heatmaps", key, "png");
            let under = (kind == HeatmapKind::Overlay).then_some(rgb);
            let mut img = outputs::heatmap(&map, under, w, h, opts.heatmap_alpha);
            if let (HeatmapKind::Overlay, Some((mask, _))) = (kind, &defects) {
                draw_outline(&mut img, mask);
            }
            files.push((r.clone(), outputs::png_bytes_rgb(&img)?));
            Some(r)
        }
    };
    let (mask_rel, regions) = match defects {
        None => (None, None),
        Some((mask, items)) => {
            let r = output_path("masks", key, "png");
            files.push((r.clone(), outputs::mask_png(&mask, w, h)?));
            let count = items.len();
            (Some(r), Some(Regions { count, items }))
        }
    };
    Ok(Rendered {
        files,
        map: map_rel,
        heatmap: heat_rel,
        mask: mask_rel,
        regions,
        map_max: map.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        map_mean: (map.iter().map(|&v| v as f64).sum::<f64>() / map.len() as f64) as f32,
    })
}

/// The outline colour of defect masks on overlays: cyan, far from every inferno colour.
pub const OUTLINE: [u8; 3] = [0, 255, 255];

/// Paints the mask's boundary (mask pixels with a 4-neighbour outside it or on the image's
/// edge) in [`OUTLINE`].
fn draw_outline(img: &mut RgbImage, mask: &[bool]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let inside = |x: isize, y: isize| {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && mask[y as usize * w + x as usize]
    };
    for y in 0..h {
        for x in 0..w {
            if !mask[y * w + x] {
                continue;
            }
            let (xi, yi) = (x as isize, y as isize);
            let edge = [(1, 0), (-1, 0), (0, 1), (0, -1)]
                .iter()
                .any(|(dx, dy)| !inside(xi + dx, yi + dy));
            if edge {
                img.put_pixel(x as u32, y as u32, image::Rgb(OUTLINE));
            }
        }
    }
}

/// Writes every file atomically under `out`.
pub fn write(out: &Path, rendered: &Rendered) -> Result<()> {
    for (rel, bytes) in &rendered.files {
        outputs::write_atomic(&out.join(rel), bytes)?;
    }
    Ok(())
}
