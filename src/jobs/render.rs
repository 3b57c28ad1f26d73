//! One scored input's files: the map at the image's size (16-bit PNG or `.npy`), the heatmap
//! and, with a pixel threshold, the defect mask and its regions, encoded to bytes and then
//! written atomically.

use image::RgbImage;

use crate::choice::Choice;
use crate::data::heatmap::{self, HeatmapKind, HeatmapScale, ValueRange};
use crate::data::outputs::{self, MapFormat};
use crate::data::records::Regions;
use crate::decision::regions::defect_regions;
use crate::error::{OptionError, Result};
use crate::fsio::OutDir;
use crate::method::Detection;

/// The files written per input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputOptions {
    pub maps: MapFormat,
    pub heatmaps: HeatmapKind,
    /// Opacity of the colour in overlay heatmaps, in [0, 1].
    pub heatmap_alpha: f32,
    /// Which map values the colormap's ends stand for.
    pub heatmap_scale: HeatmapScale,
    /// A colour bar with the scale's values beside each heatmap.
    pub colorbar: bool,
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
            heatmap_scale: HeatmapScale::Fixed,
            colorbar: false,
            pixel_threshold: None,
            min_region_area: 1,
        }
    }
}

impl OutputOptions {
    /// No files at all: records only (a run without an output folder).
    pub fn records_only() -> Self {
        Self {
            maps: MapFormat::None,
            heatmaps: HeatmapKind::None,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.heatmap_alpha) {
            return Err(OptionError::value(
                "heatmap_alpha",
                self.heatmap_alpha,
                "must be in [0, 1] (0 shows only the image, 1 only the colour)",
            ));
        }
        if let Some(p) = self.pixel_threshold {
            if !(0.0..=1.0).contains(&p) {
                return Err(OptionError::value(
                    "pixel_threshold",
                    p,
                    "map values are in [0, 1], so the threshold must be too",
                ));
            }
        }
        if self.heatmaps == HeatmapKind::None {
            if self.colorbar {
                return Err(OptionError::rule(
                    "`colorbar` draws beside the heatmaps: drop `heatmaps` none",
                ));
            }
            if self.heatmap_scale != HeatmapScale::Fixed {
                return Err(OptionError::rule(format!(
                    "`heatmap_scale` {} colours the heatmaps: drop `heatmaps` none",
                    self.heatmap_scale.name()
                )));
            }
        }
        if self.heatmap_scale == HeatmapScale::Run && self.maps == MapFormat::None {
            return Err(OptionError::rule(
                "`heatmap_scale` run colours the heatmaps from the written maps once every input is scored: use `maps` png or npy (or `heatmap_scale` image)",
            ));
        }
        Ok(())
    }

    /// Whether heatmaps are drawn per input as it is scored (every scale but `run`, whose range
    /// is known only at the run's end: see `run_heatmaps`).
    pub fn heatmaps_per_input(&self) -> bool {
        self.heatmaps != HeatmapKind::None && self.heatmap_scale != HeatmapScale::Run
    }
}

/// One scored input's files as bytes, with the statistics of its map at the image's size.
pub struct Rendered {
    /// `(path relative to the output folder, bytes)`: the map, then the heatmap.
    pub files: Vec<(String, Vec<u8>)>,
    pub map: Option<String>,
    /// The heatmap's path; with `--heatmap-scale run` the file is drawn after the run.
    pub heatmap: Option<String>,
    pub mask: Option<String>,
    pub regions: Option<Regions>,
    pub map_max: f32,
    pub map_mean: f32,
    pub map_min: f32,
}

/// The statistics of a map at its image's size that a record carries (`map_max`, `map_mean`,
/// `map_min`): the extremes over the finite values, the mean summed in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapStats {
    pub max: f32,
    pub mean: f32,
    pub min: f32,
}

impl MapStats {
    pub fn of(map: &[f32]) -> Self {
        let observed = ValueRange::of_slice(map).unwrap_or(ValueRange::UNIT);
        Self {
            max: observed.hi,
            mean: (sum_f64(map) / map.len() as f64) as f32,
            min: observed.lo,
        }
    }
}

/// The sum of `values` in f64, as 8 running sums (one AVX-512 register) added at the end: one
/// chain of dependent f64 additions over a million values cost ~3 ms an image. The order moves
/// only f64 roundings (at worst ~n·2⁻⁵³, ~1e-10 relative at a million values), far below the
/// f32 the mean is recorded in: the recorded mean can differ from the sequential sum's by one
/// f32 step on rare maps.
#[inline(always)]
fn sum_f64_generic(values: &[f32]) -> f64 {
    const LANES: usize = 8;
    // -0.0, the identity of addition, as `Iterator::sum` starts (a map of -0.0 sums to -0.0).
    let mut acc = [-0.0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for chunk in chunks {
        for k in 0..LANES {
            acc[k] += chunk[k] as f64;
        }
    }
    acc.iter().sum::<f64>() + rest
}

crate::device::dispatch!(
    /// [`sum_f64_generic`] on this CPU's vector unit.
    sum_f64 => sum_f64_generic(values: &[f32]) -> f64
);

/// The map of a detection at its image's size (`w` x `h`, row-major): what every file and
/// record of `zsad detect` is made from.
pub fn map_at_image_size(det: &Detection, w: u32, h: u32) -> Vec<f32> {
    crate::method::maps::resize_map(&det.map, det.size, det.size, h as usize, w as usize)
}

/// `DIR/KEY.EXT` as a `/`-separated path relative to the output folder.
pub fn output_path(dir: &str, key: &str, ext: &str) -> String {
    format!("{dir}/{key}.{ext}")
}

/// The heatmap of a `w` x `h` map at its image's size: `image` is the image (read for overlays
/// only), `mask` the defect mask to outline (overlays only), `range` the map values at the
/// colormap's ends.
pub fn draw_heatmap(
    opts: &OutputOptions,
    map: &[f32],
    (w, h): (u32, u32),
    image: Option<&RgbImage>,
    mask: Option<&[bool]>,
    range: ValueRange,
) -> RgbImage {
    let overlay = opts.heatmaps == HeatmapKind::Overlay;
    let under = if overlay { image } else { None };
    let mut img = heatmap::heatmap(map, under, w, h, opts.heatmap_alpha, range);
    if let (true, Some(mask)) = (overlay, mask) {
        heatmap::draw_outline(&mut img, mask);
    }
    if opts.colorbar {
        img = heatmap::with_colorbar(&img, range);
    }
    img
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
    let map = map_at_image_size(det, w, h);
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
    let stats = MapStats::of(&map);
    let observed = ValueRange {
        lo: stats.min,
        hi: stats.max,
    };
    let heat_rel =
        (opts.heatmaps != HeatmapKind::None).then(|| output_path("heatmaps", key, "png"));
    if let (Some(r), true) = (&heat_rel, opts.heatmaps_per_input()) {
        let range = match opts.heatmap_scale {
            HeatmapScale::Image => observed,
            _ => ValueRange::UNIT,
        };
        let mask = defects.as_ref().map(|(m, _)| m.as_slice());
        let img = draw_heatmap(opts, &map, (w, h), Some(rgb), mask, range);
        files.push((r.clone(), outputs::png_bytes_rgb(&img)?));
    }
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
        map_max: stats.max,
        map_mean: stats.mean,
        map_min: stats.min,
    })
}

/// Writes every file atomically under `out`.
pub fn write(out: &OutDir, rendered: &Rendered) -> Result<()> {
    for (rel, bytes) in &rendered.files {
        out.write(rel, bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statistics equal the sequential forms they replaced: the extremes exactly, the f64
    /// sum to ~1e-15 relative, and so (on these fixed maps) the recorded f32 mean exactly.
    #[test]
    fn map_stats_equal_the_sequential_forms() {
        let mut rng = crate::rng::SplitMix64(11);
        for n in [1usize, 7, 8, 9, 100, 50_625, 810_000] {
            let map: Vec<f32> = rng
                .normal(n, 0.3)
                .iter()
                .map(|v| v.abs().min(1.0))
                .collect();
            let s = MapStats::of(&map);
            let sequential: f64 = map.iter().map(|&v| v as f64).sum();
            let sum = sum_f64(&map);
            assert!(
                (sum - sequential).abs() <= 1e-15 * sequential.abs().max(1.0),
                "{n}"
            );
            assert_eq!(s.mean, (sequential / n as f64) as f32, "{n}");
            let r = ValueRange::of(map.iter().copied()).unwrap();
            assert_eq!((s.min, s.max), (r.lo, r.hi), "{n}");
        }
        // No finite value: the unit range, and a NaN mean.
        let s = MapStats::of(&[f32::NAN, f32::INFINITY]);
        assert_eq!((s.min, s.max), (0.0, 1.0));
        assert!(s.mean.is_nan());
    }
}
