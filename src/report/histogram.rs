//! The histogram of a run's image scores as inline SVG: equal bins over the scores' range, the
//! anomalous part of each bin stacked on the rest, and the image threshold marked.

use std::fmt::Write;

/// The score axis: [0, 1], or a closer view when every score (and the threshold) lies in a
/// narrower band (an untrained model's scores can all sit within 0.01 of each other), padded by
/// a twentieth of its width.
pub fn axis(scores: &[(f32, bool)], threshold: Option<f32>) -> (f64, f64) {
    let values = scores
        .iter()
        .map(|s| s.0 as f64)
        .chain(threshold.map(f64::from))
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !(lo <= hi) || hi - lo >= 0.5 {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) / 20.0).max(0.001);
    ((lo - pad).max(0.0), (hi + pad).min(1.0))
}

/// Counts per bin: `(all, anomalous)`, `bins` equal bins over `[lo, hi]`; a score of `hi` falls
/// in the last bin, scores outside in the first or last.
pub fn counts(scores: &[(f32, bool)], bins: usize, (lo, hi): (f64, f64)) -> Vec<(usize, usize)> {
    let mut c = vec![(0usize, 0usize); bins.max(1)];
    let last = c.len() - 1;
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    for &(s, anomalous) in scores {
        let t = ((s as f64 - lo) / span).clamp(0.0, 1.0);
        let i = ((t * c.len() as f64) as usize).min(last);
        c[i].0 += 1;
        c[i].1 += anomalous as usize;
    }
    c
}

/// Decimals that tell ticks `step` apart.
fn decimals(step: f64) -> usize {
    if step >= 0.1 {
        2
    } else {
        ((-step.log10()).ceil() as usize + 1).min(6)
    }
}

const W: f64 = 640.0;
const H: f64 = 190.0;
const LEFT: f64 = 44.0;
/// Room for half the last tick's label (`0.123456` with 6 decimals), centred on the axis' end.
const RIGHT: f64 = 30.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 30.0;

/// The histogram as an `<svg>` element. Every bar carries its range and counts in a `<title>`
/// (a tooltip) and `data-count` / `data-anomalous` attributes; the threshold is a dashed line
/// with its value.
pub fn svg(scores: &[(f32, bool)], threshold: Option<f32>, bins: usize) -> String {
    let (lo_axis, hi_axis) = axis(scores, threshold);
    let c = counts(scores, bins, (lo_axis, hi_axis));
    let at = |v: f64| (v - lo_axis) / (hi_axis - lo_axis);
    let top = c.iter().map(|b| b.0).max().unwrap_or(0).max(1);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let bw = pw / c.len() as f64;
    let y_of = |n: usize| TOP + ph * (1.0 - n as f64 / top as f64);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg class="histogram" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="Histogram of {n} image scores">"##,
        n = scores.len()
    );
    // Axes with ticks at 0, 0.25, ..., 1 and the highest count.
    let _ = write!(
        s,
        r##"<g class="axes"><line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}"/>"##,
        b = TOP + ph,
        r = LEFT + pw
    );
    let d = decimals((hi_axis - lo_axis) / 4.0);
    for k in 0..=4 {
        let v = lo_axis + (hi_axis - lo_axis) * k as f64 / 4.0;
        let x = LEFT + at(v) * pw;
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{b}" x2="{x:.1}" y2="{t}"/><text x="{x:.1}" y="{ty}" text-anchor="middle">{v:.d$}</text>"##,
            b = TOP + ph,
            t = TOP + ph + 4.0,
            ty = TOP + ph + 16.0
        );
    }
    let _ = write!(
        s,
        r##"<text x="{x}" y="{y}" text-anchor="end">{top}</text><text x="{x}" y="{y0}" text-anchor="end">0</text><text x="{cx}" y="{ly}" text-anchor="middle">image score</text></g>"##,
        x = LEFT - 4.0,
        y = TOP + 4.0,
        y0 = TOP + ph,
        cx = LEFT + pw / 2.0,
        ly = H - 2.0
    );
    for (i, &(all, anomalous)) in c.iter().enumerate() {
        if all == 0 {
            continue;
        }
        let x = LEFT + i as f64 * bw;
        let w = (hi_axis - lo_axis) / c.len() as f64;
        let (lo, hi) = (lo_axis + i as f64 * w, lo_axis + (i + 1) as f64 * w);
        let dd = decimals(w);
        let _ = write!(
            s,
            r##"<g class="bin" data-count="{all}" data-anomalous="{anomalous}"><title>{lo:.dd$} to {hi:.dd$}: {all} image{pl}{an}</title>"##,
            pl = if all == 1 { "" } else { "s" },
            an = if anomalous > 0 {
                format!(", {anomalous} anomalous")
            } else {
                String::new()
            }
        );
        let normal = all - anomalous;
        if normal > 0 {
            let _ = write!(
                s,
                r##"<rect class="normal" x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}"/>"##,
                y = y_of(all),
                w = (bw - 1.0).max(0.5),
                h = y_of(anomalous) - y_of(all)
            );
        }
        if anomalous > 0 {
            let _ = write!(
                s,
                r##"<rect class="anomalous" x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}"/>"##,
                y = y_of(anomalous),
                w = (bw - 1.0).max(0.5),
                h = TOP + ph - y_of(anomalous)
            );
        }
        s.push_str("</g>");
    }
    if let Some(t) = threshold.filter(|t| t.is_finite()) {
        let pos = at(t as f64).clamp(0.0, 1.0);
        let x = LEFT + pos * pw;
        let anchor = if pos > 0.7 { "end" } else { "start" };
        let dx = if pos > 0.7 { -4.0 } else { 4.0 };
        let _ = write!(
            s,
            r##"<g class="threshold" data-threshold="{t}"><line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{b}"/><text x="{tx:.1}" y="{ty}" text-anchor="{anchor}">threshold {t}</text></g>"##,
            b = TOP + ph,
            tx = x + dx,
            ty = TOP + 10.0
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_count_by_hand() {
        let s = [
            (0.0, false),
            (0.09, false),
            (0.1, true),
            (0.55, true),
            (1.0, true),
            (1.5, false),
            (-0.2, false),
        ];
        let c = counts(&s, 10, (0.0, 1.0));
        assert_eq!(c[0], (3, 0)); // 0.0, 0.09 and -0.2 (clamped)
        assert_eq!(c[1], (1, 1)); // 0.1
        assert_eq!(c[5], (1, 1)); // 0.55
        assert_eq!(c[9], (2, 1)); // 1.0 and 1.5 (clamped) in the last bin
        assert_eq!(c.iter().map(|b| b.0).sum::<usize>(), s.len());
        assert_eq!(counts(&[], 0, (0.0, 1.0)), vec![(0, 0)]);
        // A narrow axis: 0.50 to 0.52 in 4 bins of 0.005.
        let c = counts(
            &[(0.501, false), (0.5051, true), (0.519, false)],
            4,
            (0.5, 0.52),
        );
        assert_eq!(c, vec![(1, 0), (1, 1), (0, 0), (1, 0)]);
    }

    #[test]
    fn the_axis_zooms_on_narrow_scores_and_keeps_the_threshold_in_view() {
        assert_eq!(axis(&[(0.1, false), (0.9, true)], None), (0.0, 1.0));
        assert_eq!(axis(&[], None), (0.0, 1.0));
        let (lo, hi) = axis(&[(0.50, false), (0.52, true)], Some(0.51));
        assert!(
            (lo - 0.499).abs() < 1e-6 && (hi - 0.521).abs() < 1e-6,
            "{lo} {hi}"
        );
        let (lo, hi) = axis(&[(0.50, false), (0.52, true)], Some(0.9));
        assert!(lo < 0.5 && hi > 0.9 && hi <= 1.0);
        let (lo, hi) = axis(&[(1.0, true)], None);
        assert!(lo < 1.0 && hi == 1.0);
        assert_eq!(decimals(0.25), 2);
        assert_eq!(decimals(0.005), 4);
    }

    #[test]
    fn svg_has_a_bar_per_nonempty_bin_and_the_threshold() {
        let s = svg(&[(0.2, false), (0.21, false), (0.9, true)], Some(0.5), 20);
        assert_eq!(s.matches(r#"class="bin""#).count(), 2);
        assert!(s.contains(r#"data-count="2" data-anomalous="0""#));
        assert!(s.contains(r#"data-count="1" data-anomalous="1""#));
        assert!(s.contains(r#"data-threshold="0.5""#));
        assert!(s.contains("threshold 0.5"));
        let none = svg(&[], None, 20);
        assert!(!none.contains("threshold") && none.ends_with("</svg>"));
    }
}
