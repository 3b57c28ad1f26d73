//! ROC and precision-recall plots as PNG: one curve per class on the unit square, with axes,
//! ticks, a title and a legend, drawn with the `image` crate and an 8x8 bitmap font (no system
//! fonts needed, so it works the same on every machine).

use image::{Rgb, RgbImage};

use crate::data::draw::{line, text};

const W: u32 = 720;
const H: u32 = 560;
const LEFT: i64 = 70;
const RIGHT: i64 = 250; // room for the legend
const TOP: i64 = 52;
const BOTTOM: i64 = 60;

/// Plots `curves` (name, points in the unit square, legend value) under `title`.
pub fn plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    curves: &[(String, Vec<(f64, f64)>, Option<f64>)],
) -> RgbImage {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let (pw, ph) = (
        (W as i64 - LEFT - RIGHT) as f64,
        (H as i64 - TOP - BOTTOM) as f64,
    );
    let to_px = |(x, y): (f64, f64)| {
        (
            LEFT as f64 + x.clamp(0.0, 1.0) * pw,
            TOP as f64 + (1.0 - y.clamp(0.0, 1.0)) * ph,
        )
    };
    let grey = Rgb([200, 200, 200]);
    let black = Rgb([0, 0, 0]);
    // Grid, ticks and tick labels.
    for k in 0..=5 {
        let v = k as f64 / 5.0;
        line(&mut img, to_px((v, 0.0)), to_px((v, 1.0)), grey, 1);
        line(&mut img, to_px((0.0, v)), to_px((1.0, v)), grey, 1);
        let label = format!("{v:.1}");
        let (x, y) = to_px((v, 0.0));
        text(&mut img, x as i64 - 12, y as i64 + 8, &label, black, 1);
        let (x, y) = to_px((0.0, v));
        text(&mut img, x as i64 - 30, y as i64 - 4, &label, black, 1);
    }
    // Frame.
    for (a, b) in [
        ((0.0, 0.0), (1.0, 0.0)),
        ((0.0, 0.0), (0.0, 1.0)),
        ((1.0, 0.0), (1.0, 1.0)),
        ((0.0, 1.0), (1.0, 1.0)),
    ] {
        line(&mut img, to_px(a), to_px(b), black, 1);
    }
    text(&mut img, LEFT, 8, title, black, 2);
    text(
        &mut img,
        LEFT + (pw as i64) / 2 - 4 * x_label.len() as i64,
        H as i64 - 28,
        x_label,
        black,
        1,
    );
    text(&mut img, 6, TOP - 16, y_label, black, 1); // below the title
                                                    // Curves and legend.
    let palette = colorous::TABLEAU10;
    for (i, (name, pts, value)) in curves.iter().enumerate() {
        let c = palette[i % palette.len()];
        let color = Rgb([c.r, c.g, c.b]);
        for w in pts.windows(2) {
            line(&mut img, to_px(w[0]), to_px(w[1]), color, 2);
        }
        let y = TOP + 4 + 14 * i as i64;
        if y > H as i64 - 20 {
            text(&mut img, W as i64 - RIGHT + 16, y, "...", black, 1);
            break;
        }
        line(
            &mut img,
            ((W as i64 - RIGHT + 12) as f64, (y + 4) as f64),
            ((W as i64 - RIGHT + 30) as f64, (y + 4) as f64),
            color,
            3,
        );
        let mut label: String = name.chars().take(18).collect();
        if let Some(v) = value {
            label += &format!(" {:.1}", 100.0 * v);
        }
        text(&mut img, W as i64 - RIGHT + 36, y, &label, black, 1);
    }
    img
}

/// At most `n` points of a curve, evenly by index, keeping both ends (plots do not need
/// millions of points).
pub fn thin(points: Vec<(f64, f64)>, n: usize) -> Vec<(f64, f64)> {
    if points.len() <= n || n < 2 {
        return points;
    }
    let last = points.len() - 1;
    (0..n).map(|k| points[k * last / (n - 1)]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_curves_in_their_colours() {
        let img = plot(
            "ROC",
            "FPR",
            "TPR",
            &[("a".into(), vec![(0.0, 0.0), (1.0, 1.0)], Some(0.5))],
        );
        assert_eq!(img.dimensions(), (W, H));
        let c = colorous::TABLEAU10[0];
        // The diagonal passes through the centre of the plot area.
        let (x, y) = (
            LEFT as f64 + 0.5 * (W as i64 - LEFT - RIGHT) as f64,
            TOP as f64 + 0.5 * (H as i64 - TOP - BOTTOM) as f64,
        );
        assert_eq!(
            img.get_pixel(x.round() as u32, y.round() as u32).0,
            [c.r, c.g, c.b]
        );
        assert_eq!(thin((0..10).map(|i| (i as f64, 0.0)).collect(), 4).len(), 4);
    }
}
