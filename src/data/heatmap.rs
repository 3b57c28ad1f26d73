//! Heatmaps: an anomaly map through the perceptually uniform *inferno* colormap, alone or blended
//! over its image, on a chosen value scale, with an optional colour bar and the defect mask's
//! outline.

use image::{Rgb, RgbImage};

use super::draw;

crate::choice::choice_enum! {
    /// What heatmap to draw.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum HeatmapKind {
        /// no heatmaps
        None = "none",
        /// the colour-mapped anomaly map alone
        Map = "map",
        /// the colour-mapped map blended over the image
        Overlay = "overlay",
    }
}

crate::choice::choice_enum! {
    /// Which map values the colormap's ends stand for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum HeatmapScale {
        /// 0 to 1 for every image: colours compare across images and runs
        Fixed = "fixed",
        /// each image's own lowest to highest value: most contrast, colours do not compare
        Image = "image",
        /// the run's lowest to highest value, drawn once every input is scored
        Run = "run",
    }
}

/// The map values drawn as the colormap's first and last colour; values outside are clamped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueRange {
    pub lo: f32,
    pub hi: f32,
}

impl ValueRange {
    /// The fixed scale: map values are probabilities.
    pub const UNIT: Self = Self { lo: 0.0, hi: 1.0 };

    /// The lowest and highest finite value (`None` when there is none).
    pub fn of(values: impl IntoIterator<Item = f32>) -> Option<Self> {
        values
            .into_iter()
            .filter(|v| v.is_finite())
            .fold(None, |r, v| match r {
                None => Some(Self { lo: v, hi: v }),
                Some(r) => Some(Self {
                    lo: r.lo.min(v),
                    hi: r.hi.max(v),
                }),
            })
    }

    /// [`Self::of`] over a slice, in one vectorised pass (a map at its image's size is about a
    /// million values, and the statistics are drawn for every image).
    pub fn of_slice(values: &[f32]) -> Option<Self> {
        let (lo, hi) = finite_extremes(values);
        // Only finite values enter, so `lo <= hi` exactly when there was one.
        (lo <= hi).then_some(Self { lo, hi })
    }

    /// The range covering both.
    pub fn union(self, other: Self) -> Self {
        Self {
            lo: self.lo.min(other.lo),
            hi: self.hi.max(other.hi),
        }
    }

    /// `v` as a position on the colormap, in [0, 1]. A range of one value (a flat map on the
    /// image scale) draws everything in the lowest colour: there is no contrast to show.
    pub fn position(self, v: f32) -> f32 {
        let span = self.hi - self.lo;
        if span > 0.0 {
            ((v - self.lo) / span).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// The lowest and highest finite value, `(+inf, -inf)` without one: 16 running extremes that
/// a vector register holds, merged at the end (min and max do not depend on the order).
#[inline(always)]
fn finite_extremes_generic(values: &[f32]) -> (f32, f32) {
    const LANES: usize = 16;
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for k in 0..LANES {
            let v = chunk[k];
            let finite = v.is_finite();
            lo[k] = if finite && v < lo[k] { v } else { lo[k] };
            hi[k] = if finite && v > hi[k] { v } else { hi[k] };
        }
    }
    let (mut l, mut h) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in rest.iter().chain(&lo).chain(&hi) {
        if v.is_finite() {
            l = l.min(v);
            h = h.max(v);
        }
    }
    (l, h)
}

crate::device::dispatch!(
    /// [`finite_extremes_generic`] on this CPU's vector unit.
    finite_extremes => finite_extremes_generic(values: &[f32]) -> (f32, f32)
);

/// The colormap as a 256-entry table: a colour shows less than the maps' 16-bit precision.
fn inferno_table() -> [[u8; 3]; 256] {
    let mut lut = [[0u8; 3]; 256];
    for (i, c) in lut.iter_mut().enumerate() {
        let v = colorous::INFERNO.eval_continuous(i as f64 / 255.0);
        *c = [v.r, v.g, v.b];
    }
    lut
}

/// The colour of colormap position `t` in [0, 1].
fn colour(lut: &[[u8; 3]; 256], t: f32) -> [u8; 3] {
    lut[lut_index(t)]
}

/// `t` clamped to [0, 1], NaN to 0: comparisons only, defined for every bit pattern (where
/// `f32::max(NaN, 0.0)` may pass a signalling NaN on as a quiet one), and vectorised.
#[inline(always)]
pub(crate) fn unit_clamp(t: f32) -> f32 {
    if t > 0.0 {
        if t < 1.0 {
            t
        } else {
            1.0
        }
    } else {
        0.0
    }
}

/// `round(t · 255)` for `t` clamped to [0, 1], as `f32::round` gives it (half away from zero)
/// without a libm call per pixel: `v - trunc(v)` is exact below 2^23, so the comparison decides
/// the same half-way cases `round` does. NaN is index 0.
#[inline(always)]
fn lut_index(t: f32) -> usize {
    // `clamp` that also sends NaN (quiet or signalling) to 0, so `v` is always in [0, 255].
    let v = unit_clamp(t) * 255.0;
    // SAFETY: `v` is finite and in [0, 255], which `u32` holds; `as` would add a scalar range
    // check per value and keep the loop from being vectorised.
    let i = unsafe { v.to_int_unchecked::<u32>() } as usize;
    i + (v - i as f32 >= 0.5) as usize
}

/// `round((1 - alpha) · base + alpha · colour)` for every colour and base byte, indexed
/// `[colour · 256 + base]`: the overlay's blend computed once per picture (64 KiB) instead of
/// three float blends and roundings per pixel, with the same float expression, so the same
/// bytes.
fn blend_table(alpha: f32) -> Vec<u8> {
    let mut table = vec![0u8; 256 * 256];
    for (c, row) in table.chunks_exact_mut(256).enumerate() {
        for (b, out) in row.iter_mut().enumerate() {
            // `round()` as in `lut_index`: the blend lies in [0, 255].
            let v = (1.0 - alpha) * b as f32 + alpha * c as f32;
            let i = v as u32;
            // `min`: `round() as u8` saturates where an opacity outside [0, 1] goes past 255.
            *out = (i + (v - i as f32 >= 0.5) as u32).min(255) as u8;
        }
    }
    table
}

/// Pixels coloured per pass: their colormap indices fit a small stack buffer that stays in L1.
const COLOUR_CHUNK: usize = 2048;

/// The colormap index of every value: a separate, branch-free pass that is vectorised (the
/// float division and rounding were most of the per-pixel cost when done beside the table
/// lookups).
#[inline(always)]
fn colour_indices_generic(values: &[f32], range: ValueRange, out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = lut_index(range.position(v)) as u8;
    }
}

crate::device::dispatch!(
    /// [`colour_indices_generic`] on this CPU's vector unit.
    colour_indices => colour_indices_generic(values: &[f32], range: ValueRange, out: &mut [u8]) -> ()
);

/// The `w` x `h` map (row-major) through inferno with `range` at its ends, blended over `image`
/// with the colour's opacity `alpha`, or alone without an image.
pub fn heatmap(
    map: &[f32],
    image: Option<&RgbImage>,
    w: u32,
    h: u32,
    alpha: f32,
    range: ValueRange,
) -> RgbImage {
    let lut = inferno_table();
    let n = w as usize * h as usize;
    let mut out = RgbImage::new(w, h);
    let dst = &mut out.as_mut()[..n * 3];
    let blend = image.map(|_| blend_table(alpha));
    let base = image.map(|img| &img.as_raw()[..n * 3]);
    let mut idx = [0u8; COLOUR_CHUNK];
    for (c, (values, dst)) in map[..n]
        .chunks(COLOUR_CHUNK)
        .zip(dst.chunks_mut(3 * COLOUR_CHUNK))
        .enumerate()
    {
        let idx = &mut idx[..values.len()];
        colour_indices(values, range, idx);
        match (&blend, base) {
            (Some(blend), Some(base)) => {
                let base = &base[3 * c * COLOUR_CHUNK..][..dst.len()];
                for ((px, o), &i) in dst.chunks_exact_mut(3).zip(base.chunks_exact(3)).zip(&*idx) {
                    let colour = &lut[i as usize];
                    for k in 0..3 {
                        px[k] = blend[(colour[k] as usize) << 8 | o[k] as usize];
                    }
                }
            }
            _ => {
                for (px, &i) in dst.chunks_exact_mut(3).zip(&*idx) {
                    px.copy_from_slice(&lut[i as usize]);
                }
            }
        }
    }
    out
}

/// The outline colour of defect masks on overlays: cyan, far from every inferno colour.
pub const OUTLINE: [u8; 3] = [0, 255, 255];

/// Paints the mask's boundary (mask pixels with a 4-neighbour outside it or on the image's
/// edge) in [`OUTLINE`].
pub fn draw_outline(img: &mut RgbImage, mask: &[bool]) {
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
                img.put_pixel(x as u32, y as u32, Rgb(OUTLINE));
            }
        }
    }
}

/// Decimals that tell the ends of `range` apart: 2, more for narrow ranges (at most 6).
fn label_decimals(range: ValueRange) -> usize {
    let span = (range.hi - range.lo) as f64;
    if span > 0.0 && span < 0.1 {
        ((-span.log10()).ceil() as usize + 1).clamp(2, 6)
    } else {
        2
    }
}

/// `img` with a colour bar on its right: a white panel as tall as the image holding the
/// colormap from `range.lo` (bottom) to `range.hi` (top), framed, with the values of its ends and
/// middle written beside it where the image is tall enough for them. The image itself is left
/// pixel for pixel as it was.
pub fn with_colorbar(img: &RgbImage, range: ValueRange) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let scale = if h >= 320 { 2 } else { 1 };
    let glyph = draw::GLYPH * scale;
    let pad = 4 * scale;
    let bar_w = 12 * scale;
    let decimals = label_decimals(range);
    let labels: Vec<(f32, String)> = [range.hi, (range.lo + range.hi) / 2.0, range.lo]
        .iter()
        .map(|&v| (v, format!("{v:.decimals$}")))
        .collect();
    let label_w = labels
        .iter()
        .map(|(_, s)| s.len() as i64)
        .max()
        .unwrap_or(0)
        * glyph;
    // Labels are centred on the bar's ends, so the bar stops half a glyph from the edges.
    let (top, bottom) = (glyph / 2 + 1, h - 2 - glyph / 2);
    let show_labels = bottom - top >= 3 * glyph;
    let (top, bottom) = if show_labels {
        (top, bottom)
    } else {
        (0, h - 1)
    };
    let panel_w = pad + bar_w + if show_labels { pad + label_w } else { 0 } + pad;
    let mut out = RgbImage::from_pixel((w + panel_w) as u32, h as u32, Rgb([255, 255, 255]));
    image::imageops::replace(&mut out, img, 0, 0);
    let lut = inferno_table();
    let x0 = w + pad;
    let span = (bottom - top).max(1) as f32;
    for y in top..=bottom {
        let t = (bottom - y) as f32 / span;
        draw::fill(&mut out, x0, y, bar_w, 1, Rgb(colour(&lut, t)));
    }
    let frame = Rgb([60, 60, 60]);
    for (a, b) in [
        ((x0 - 1, top - 1), (x0 + bar_w, top - 1)),
        ((x0 - 1, bottom + 1), (x0 + bar_w, bottom + 1)),
        ((x0 - 1, top - 1), (x0 - 1, bottom + 1)),
        ((x0 + bar_w, top - 1), (x0 + bar_w, bottom + 1)),
    ] {
        draw::line(
            &mut out,
            (a.0 as f64, a.1 as f64),
            (b.0 as f64, b.1 as f64),
            frame,
            1,
        );
    }
    if show_labels {
        let black = Rgb([0, 0, 0]);
        for (v, s) in &labels {
            let y = bottom - (range.position(*v) * span).round() as i64;
            draw::fill(&mut out, x0 + bar_w, y, pad / 2, 1, black);
            draw::text(&mut out, x0 + bar_w + pad, y - glyph / 2, s, black, scale);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inferno(t: f64) -> [u8; 3] {
        let c = colorous::INFERNO.eval_continuous(t);
        [c.r, c.g, c.b]
    }

    #[test]
    fn blends_on_a_fixed_scale() {
        let img = RgbImage::from_pixel(2, 1, Rgb([200, 100, 0]));
        let h = heatmap(&[0.0, 1.0], Some(&img), 2, 1, 0.5, ValueRange::UNIT);
        let lo = inferno(0.0);
        assert_eq!(
            h.get_pixel(0, 0).0,
            [
                ((200.0 + lo[0] as f32) / 2.0).round() as u8,
                ((100.0 + lo[1] as f32) / 2.0).round() as u8,
                ((0.0 + lo[2] as f32) / 2.0).round() as u8
            ]
        );
        let alone = heatmap(&[1.0], None, 1, 1, 0.5, ValueRange::UNIT);
        assert_eq!(alone.get_pixel(0, 0).0, inferno(1.0));
    }

    /// The table lookups give the bytes of the per-pixel float formula they replace: every
    /// half-way position of the colormap, values around them, NaN and the infinities, on
    /// three opacities and every base byte.
    #[test]
    fn lookups_equal_the_float_formula() {
        let lut = inferno_table();
        let mut values = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 2.0];
        for i in 0..=510 {
            let v = i as f32 / 510.0;
            values.extend([v, v.next_up(), v.next_down()]);
        }
        let (w, h) = (values.len() as u32, 1);
        for alpha in [0.5f32, 0.35, 1.0] {
            for base in [0u8, 1, 77, 128, 254, 255] {
                let img = RgbImage::from_pixel(w, h, Rgb([base, 255 - base, base / 2]));
                let got = heatmap(&values, Some(&img), w, h, alpha, ValueRange::UNIT);
                for (x, &v) in values.iter().enumerate() {
                    let t = ValueRange::UNIT.position(v);
                    let c = lut[(t.clamp(0.0, 1.0) * 255.0).round() as usize];
                    let o = img.get_pixel(x as u32, 0).0;
                    let want: [u8; 3] = std::array::from_fn(|k| {
                        ((1.0 - alpha) * o[k] as f32 + alpha * c[k] as f32).round() as u8
                    });
                    assert_eq!(
                        got.get_pixel(x as u32, 0).0,
                        want,
                        "value {v}, alpha {alpha}"
                    );
                }
            }
        }
    }

    #[test]
    fn ranges_stretch_the_colormap() {
        // On [0.2, 0.4] the value 0.3 sits in the middle (entry 128 of 256: round(0.5 * 255)).
        let r = ValueRange { lo: 0.2, hi: 0.4 };
        let h = heatmap(&[0.2, 0.3, 0.4, 0.9, -1.0], None, 5, 1, 1.0, r);
        assert_eq!(h.get_pixel(0, 0).0, inferno(0.0));
        assert_eq!(h.get_pixel(1, 0).0, inferno(128.0 / 255.0));
        assert_eq!(h.get_pixel(2, 0).0, inferno(1.0));
        assert_eq!(h.get_pixel(3, 0).0, inferno(1.0), "clamped above");
        assert_eq!(h.get_pixel(4, 0).0, inferno(0.0), "clamped below");
        // A flat map on its own scale has no contrast: the lowest colour.
        let flat = ValueRange::of([0.7, 0.7]).unwrap();
        assert_eq!(flat.position(0.7), 0.0);
        assert_eq!(
            ValueRange::of([0.5, f32::NAN, -0.25, 2.0, f32::INFINITY]),
            Some(ValueRange { lo: -0.25, hi: 2.0 })
        );
        assert_eq!(ValueRange::of([f32::NAN]), None);
        assert_eq!(
            ValueRange { lo: 0.1, hi: 0.5 }.union(ValueRange { lo: 0.3, hi: 0.9 }),
            ValueRange { lo: 0.1, hi: 0.9 }
        );
    }

    /// Pictures of more than one colour chunk (and a partial last one) get every pixel's
    /// colour, blended or alone, from its own value and base pixel.
    #[test]
    fn chunks_keep_each_pixel_in_place() {
        let mut rng = crate::rng::SplitMix64(9);
        let (w, h) = (97u32, 43u32); // 4,171 pixels: two whole chunks and a part
        let n = (w * h) as usize;
        let mut values: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 / 999.0).collect();
        values[5] = f32::NAN;
        values[n - 1] = 7.0;
        let img = RgbImage::from_fn(w, h, |_, _| {
            let v = rng.next_u64();
            Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
        });
        let lut = inferno_table();
        let range = ValueRange { lo: 0.1, hi: 0.9 };
        for image in [Some(&img), None] {
            let got = heatmap(&values, image, w, h, 0.35, range);
            for (i, &v) in values.iter().enumerate() {
                let (x, y) = (i as u32 % w, i as u32 / w);
                let c = lut[(range.position(v).clamp(0.0, 1.0) * 255.0).round() as usize];
                let want: [u8; 3] = match image {
                    Some(img) => {
                        let o = img.get_pixel(x, y).0;
                        std::array::from_fn(|k| {
                            ((1.0 - 0.35f32) * o[k] as f32 + 0.35 * c[k] as f32).round() as u8
                        })
                    }
                    None => c,
                };
                assert_eq!(got.get_pixel(x, y).0, want, "pixel {i}, value {v}");
            }
        }
    }

    /// The vectorised extremes equal the iterator form on every length around the 16 lanes,
    /// with NaN and infinities scattered in, and on slices with no finite value.
    #[test]
    fn slice_extremes_equal_the_iterator_form() {
        let mut rng = crate::rng::SplitMix64(5);
        for n in 0..70 {
            let mut v = rng.normal(n, 2.0);
            for (i, x) in v.iter_mut().enumerate() {
                match (i * 7 + n) % 11 {
                    0 => *x = f32::NAN,
                    1 => *x = f32::INFINITY,
                    2 => *x = f32::NEG_INFINITY,
                    _ => {}
                }
            }
            assert_eq!(
                ValueRange::of_slice(&v),
                ValueRange::of(v.iter().copied()),
                "{v:?}"
            );
        }
        assert_eq!(ValueRange::of_slice(&[f32::NAN; 40]), None);
        assert_eq!(
            ValueRange::of_slice(&[f32::INFINITY, f32::NEG_INFINITY]),
            None
        );
    }

    #[test]
    fn colorbar_runs_from_low_at_the_bottom_to_high_at_the_top() {
        let img = RgbImage::from_pixel(50, 200, Rgb([1, 2, 3]));
        let out = with_colorbar(&img, ValueRange::UNIT);
        assert_eq!(out.height(), 200);
        assert!(out.width() > 50);
        // The image is kept pixel for pixel.
        for (x, y, p) in img.enumerate_pixels() {
            assert_eq!(out.get_pixel(x, y), p);
        }
        // Bar pixels: the middle column of the bar, its top and bottom rows.
        let x = 50 + 4 + 6;
        let (top, bottom) = (4 + 1, 200 - 2 - 4);
        assert_eq!(out.get_pixel(x, top).0, inferno(1.0));
        assert_eq!(out.get_pixel(x, bottom).0, inferno(0.0));
        // Colours rise monotonically in brightness from bottom to top.
        let lum = |y: u32| out.get_pixel(x, y).0.iter().map(|&c| c as u32).sum::<u32>();
        assert!((top..bottom).all(|y| lum(y) >= lum(y + 1)));
        // Labels are drawn in black to the right of the bar.
        let label_x = 50 + 4 + 12 + 4;
        let black = (label_x..out.width())
            .flat_map(|x| (0..200).map(move |y| (x, y)))
            .filter(|&(x, y)| out.get_pixel(x, y).0 == [0, 0, 0])
            .count();
        assert!(black > 20, "{black} black pixels of labels");
    }

    #[test]
    fn colorbar_on_tiny_images_and_narrow_ranges() {
        // Too short for labels: the bar alone, the image's full height.
        let img = RgbImage::new(3, 10);
        let out = with_colorbar(&img, ValueRange::UNIT);
        assert_eq!(out.dimensions(), (3 + 4 + 12 + 4, 10));
        assert_eq!(out.get_pixel(3 + 4, 0).0, inferno(1.0));
        assert_eq!(out.get_pixel(3 + 4, 9).0, inferno(0.0));
        let one = with_colorbar(&RgbImage::new(1, 1), ValueRange::UNIT);
        assert_eq!(one.height(), 1);
        // Narrow ranges get the decimals that tell their ends apart.
        assert_eq!(label_decimals(ValueRange { lo: 0.0, hi: 1.0 }), 2);
        assert_eq!(
            label_decimals(ValueRange {
                lo: 0.41,
                hi: 0.4105
            }),
            5
        );
        assert_eq!(label_decimals(ValueRange { lo: 0.5, hi: 0.5 }), 2);
        assert_eq!(label_decimals(ValueRange { lo: 0.0, hi: 1e-12 }), 6);
    }

    #[test]
    fn outline_marks_the_mask_boundary_only() {
        // A 3x3 mask inside 5x5: its 8 border pixels are outlined, the centre is not.
        let mut mask = vec![false; 25];
        for y in 1..4 {
            for x in 1..4 {
                mask[y * 5 + x] = true;
            }
        }
        let mut img = RgbImage::new(5, 5);
        draw_outline(&mut img, &mask);
        let cyan: Vec<(u32, u32)> = img
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0 == OUTLINE)
            .map(|(x, y, _)| (x, y))
            .collect();
        assert_eq!(cyan.len(), 8);
        assert!(!cyan.contains(&(2, 2)));
        assert!(cyan.iter().all(|&(x, y)| mask[y as usize * 5 + x as usize]));
    }
}
