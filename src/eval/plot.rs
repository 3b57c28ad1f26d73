//! ROC and precision-recall curves as SVG, written by hand like the report's histogram: axes
//! with ticks and labels, a title, one curve per class and a legend with each class's AUROC or
//! AP. The viewer renders the text, so no font is needed and the labels stay sharp at any size.
//!
//! The same curves go to `curves.json` ([`Curves`]): the report reads those numbers back and
//! draws them with [`svg`] into its page, so no markup from an eval folder is ever inlined.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

/// The file of the curves' numbers in an eval folder.
pub const CURVES_FILE: &str = "curves.json";

/// Points of a curve kept for plotting: neighbours closer than this (in the unit square, along
/// either axis) are dropped, a tenth of a pixel of a 400-pixel plot ...
pub const TOLERANCE: f64 = 0.002;
/// ... and at most this many are kept (evenly by index, both ends included).
pub const MAX_POINTS: usize = 1000;

/// One class's curve: its points in the unit square and the metric its legend shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub class: String,
    /// AUROC (ROC) or AP (PR) as a fraction; `None` when undefined.
    pub value: Option<f64>,
    /// `[x, y]`: (false positive rate, true positive rate) or (recall, precision).
    pub points: Vec<[f64; 2]>,
}

/// Both kinds of curve of one level (image or pixel).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LevelCurves {
    pub roc: Vec<Series>,
    pub pr: Vec<Series>,
}

/// `curves.json`: the plotted curves of an evaluation, image and pixel level.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Curves {
    pub image: LevelCurves,
    pub pixel: LevelCurves,
}

/// What a curve plots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CurveKind {
    Roc,
    Pr,
}

impl CurveKind {
    /// `roc` or `pr`, as in the file names (`roc_image.svg`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Roc => "roc",
            Self::Pr => "pr",
        }
    }

    /// The x and y axis labels.
    pub fn axes(self) -> (&'static str, &'static str) {
        match self {
            Self::Roc => ("false positive rate", "true positive rate"),
            Self::Pr => ("recall", "precision"),
        }
    }

    /// The metric the legend shows.
    pub fn metric(self) -> &'static str {
        match self {
            Self::Roc => "AUROC",
            Self::Pr => "AP",
        }
    }

    /// `Image ROC`, `Pixel precision-recall`.
    pub fn title(self, level: &str) -> String {
        let mut level = level.to_string();
        if let Some(c) = level.get_mut(0..1) {
            c.make_ascii_uppercase();
        }
        match self {
            Self::Roc => format!("{level} ROC"),
            Self::Pr => format!("{level} precision-recall"),
        }
    }
}

impl Curves {
    /// The four plots: `(level, kind, series)`, image ROC first.
    pub fn plots(&self) -> [(&'static str, CurveKind, &[Series]); 4] {
        [
            ("image", CurveKind::Roc, &self.image.roc),
            ("image", CurveKind::Pr, &self.image.pr),
            ("pixel", CurveKind::Roc, &self.pixel.roc),
            ("pixel", CurveKind::Pr, &self.pixel.pr),
        ]
    }
}

/// The points of a curve to plot: neighbours within [`TOLERANCE`] of the last kept point
/// dropped (a pixel curve has a point per distinct score, millions), then at most
/// [`MAX_POINTS`] kept evenly by index; both ends always stay. Non-finite points are left out
/// and values rounded to 4 decimals (a 25th of a pixel at 400 pixels).
pub fn thin(points: &[(f64, f64)]) -> Vec<[f64; 2]> {
    let finite: Vec<[f64; 2]> = points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|&(x, y)| [x, y])
        .collect();
    let Some(&last) = finite.last() else {
        return Vec::new();
    };
    let mut kept: Vec<[f64; 2]> = Vec::new();
    for &p in &finite {
        let far = kept.last().is_none_or(|q: &[f64; 2]| {
            (p[0] - q[0]).abs() >= TOLERANCE || (p[1] - q[1]).abs() >= TOLERANCE
        });
        if far {
            kept.push(p);
        }
    }
    if kept.last() != Some(&last) {
        kept.push(last);
    }
    if kept.len() > MAX_POINTS {
        let end = kept.len() - 1;
        kept = (0..MAX_POINTS)
            .map(|k| kept[k * end / (MAX_POINTS - 1)])
            .collect();
    }
    let round = |v: f64| (v * 1e4).round() / 1e4;
    kept.into_iter()
        .map(|[x, y]| [round(x), round(y)])
        .collect()
}

/// `s` with `& < > " '` escaped, for SVG text and attribute values (and for the report's HTML,
/// which draws these plots into its page: `report::html` uses this one).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The colour and dash pattern of the `i`th curve: Tableau's ten colours, dashed after ten.
fn style(i: usize) -> (String, &'static str) {
    let c = colorous::TABLEAU10[i % 10];
    let dash = match (i / 10) % 3 {
        0 => "",
        1 => r#" stroke-dasharray="7 4""#,
        _ => r#" stroke-dasharray="2 3""#,
    };
    (format!("#{:02x}{:02x}{:02x}", c.r, c.g, c.b), dash)
}

/// A class name cut to `n` characters for the legend (the whole name is its tooltip).
fn short(name: &str, n: usize) -> String {
    if name.chars().count() <= n {
        name.to_string()
    } else {
        name.chars().take(n - 1).chain(['…']).collect()
    }
}

const W: f64 = 660.0;
const LEFT: f64 = 64.0;
const TOP: f64 = 44.0;
const PLOT: f64 = 380.0;
const BOTTOM: f64 = 56.0;
const LEGEND_X: f64 = LEFT + PLOT + 24.0;
const LEGEND_ROW: f64 = 19.0;
const FONT: &str = r#"font-family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif""#;

/// The frame of a plot: title, grid, axes with ticks at every 0.2, their labels.
fn frame(s: &mut String, title: &str, kind: CurveKind) {
    let bottom = TOP + PLOT;
    let _ = write!(
        s,
        r##"<text class="title" x="{LEFT}" y="26" font-size="17" font-weight="600" fill="#1d1d1f">{}</text><g class="grid" stroke="#e3e3e3" stroke-width="1">"##,
        escape(title)
    );
    for k in 1..5 {
        let v = PLOT * k as f64 / 5.0;
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{bottom}"/><line x1="{LEFT}" y1="{y:.1}" x2="{r}" y2="{y:.1}"/>"#,
            x = LEFT + v,
            y = bottom - v,
            r = LEFT + PLOT
        );
    }
    let _ = write!(
        s,
        r##"</g><rect class="frame" x="{LEFT}" y="{TOP}" width="{PLOT}" height="{PLOT}" fill="none" stroke="#555"/><g class="ticks" font-size="13" fill="#333" stroke="#555">"##
    );
    for k in 0..=5 {
        let v = k as f64 / 5.0;
        let (x, y) = (LEFT + v * PLOT, bottom - v * PLOT);
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{b5}"/><text x="{x:.1}" y="{ty}" text-anchor="middle" stroke="none">{v:.1}</text><line x1="{l5}" y1="{y:.1}" x2="{LEFT}" y2="{y:.1}"/><text x="{tx}" y="{yy:.1}" text-anchor="end" stroke="none">{v:.1}</text>"#,
            b5 = bottom + 5.0,
            ty = bottom + 20.0,
            l5 = LEFT - 5.0,
            tx = LEFT - 8.0,
            yy = y + 4.5
        );
    }
    let (xl, yl) = kind.axes();
    let _ = write!(
        s,
        r##"</g><g class="labels" font-size="14" fill="#1d1d1f"><text class="x-label" x="{cx}" y="{ly}" text-anchor="middle">{xl}</text><text class="y-label" transform="translate(18 {cy}) rotate(-90)" text-anchor="middle">{yl}</text></g>"##,
        cx = LEFT + PLOT / 2.0,
        ly = bottom + 42.0,
        cy = TOP + PLOT / 2.0
    );
    if kind == CurveKind::Roc {
        let _ = write!(
            s,
            r##"<line class="chance" x1="{LEFT}" y1="{bottom}" x2="{r}" y2="{TOP}" stroke="#999" stroke-dasharray="4 4"/>"##,
            r = LEFT + PLOT
        );
    }
}

/// One curve as a path over the plot area (points clamped to the unit square).
fn curve(s: &mut String, i: usize, series: &Series) {
    let (colour, dash) = style(i);
    let mut d = String::with_capacity(16 * series.points.len());
    for (k, [x, y]) in series.points.iter().enumerate() {
        if !(x.is_finite() && y.is_finite()) {
            continue;
        }
        let px = LEFT + x.clamp(0.0, 1.0) * PLOT;
        let py = TOP + (1.0 - y.clamp(0.0, 1.0)) * PLOT;
        let _ = write!(d, "{}{px:.1} {py:.1}", if k == 0 { 'M' } else { 'L' });
    }
    if d.starts_with('L') {
        d.replace_range(0..1, "M");
    }
    let _ = write!(
        s,
        r#"<path class="curve" data-class="{name}" data-points="{n}" d="{d}" fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round"{dash}><title>{name}</title></path>"#,
        name = escape(&series.class),
        n = series.points.len()
    );
}

/// The legend: the metric's name, then a line of each class's colour with its name and value
/// in percent.
fn legend(s: &mut String, kind: CurveKind, series: &[Series]) {
    let _ = write!(
        s,
        r##"<g class="legend" font-size="13" fill="#1d1d1f"><text x="{LEGEND_X}" y="{y}" font-weight="600">{} (%)</text>"##,
        kind.metric(),
        y = TOP + 4.0
    );
    for (i, c) in series.iter().enumerate() {
        let (colour, dash) = style(i);
        let y = TOP + 4.0 + LEGEND_ROW * (i + 1) as f64;
        let value = c
            .value
            .filter(|v| v.is_finite())
            .map_or("–".to_string(), |v| format!("{:.1}", 100.0 * v));
        let _ = write!(
            s,
            r#"<g class="entry"><title>{name}</title><line x1="{LEGEND_X}" y1="{ly:.1}" x2="{x2}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"{dash}/><text x="{tx}" y="{y:.1}">{short} <tspan class="value" font-weight="600">{value}</tspan></text></g>"#,
            name = escape(&c.class),
            ly = y - 4.5,
            x2 = LEGEND_X + 22.0,
            tx = LEGEND_X + 28.0,
            short = escape(&short(&c.class, 20))
        );
    }
    if series.is_empty() {
        let _ = write!(
            s,
            r##"<text x="{LEGEND_X}" y="{y}" fill="#666">no class with a defined {}</text>"##,
            kind.metric(),
            y = TOP + 4.0 + LEGEND_ROW
        );
    }
    s.push_str("</g>");
}

/// The plot of `series` under `title` as a standalone `<svg>` element (a file of its own, or
/// inline in a page): 660 pixels wide, taller when the legend needs it. Class names are
/// escaped.
pub fn svg(title: &str, kind: CurveKind, series: &[Series]) -> String {
    let h = (TOP + PLOT + BOTTOM).max(TOP + LEGEND_ROW * (series.len() + 1) as f64 + 12.0);
    let mut s =
        String::with_capacity(4096 + 12 * series.iter().map(|c| c.points.len()).sum::<usize>());
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="curves" data-kind="{k}" viewBox="0 0 {W} {h}" width="{W}" height="{h}" role="img" aria-label="{t}" {FONT}><rect width="{W}" height="{h}" fill="#fff"/>"##,
        k = kind.name(),
        t = escape(title)
    );
    frame(&mut s, title, kind);
    s.push_str(r#"<g class="series">"#);
    for (i, c) in series.iter().enumerate() {
        curve(&mut s, i, c);
    }
    s.push_str("</g>");
    legend(&mut s, kind, series);
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(class: &str, points: &[(f64, f64)], value: Option<f64>) -> Series {
        Series {
            class: class.into(),
            value,
            points: thin(points),
        }
    }

    #[test]
    fn a_curve_is_a_path_through_its_points() {
        let s = svg(
            "Image ROC",
            CurveKind::Roc,
            &[series(
                "bottle",
                &[(0.0, 0.0), (0.5, 1.0), (1.0, 1.0)],
                Some(0.75),
            )],
        );
        assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(s.ends_with("</svg>"));
        // (0, 0) is the plot's bottom-left corner, (0.5, 1) the middle of its top.
        let d = format!(
            "M{LEFT:.1} {b:.1}L{m:.1} {TOP:.1}L{r:.1} {TOP:.1}",
            b = TOP + PLOT,
            m = LEFT + PLOT / 2.0,
            r = LEFT + PLOT
        );
        assert!(s.contains(&format!(r#"d="{d}""#)), "{s}");
        assert!(s.contains(r#"data-class="bottle" data-points="3""#));
        assert!(
            s.contains(r##"stroke="#4e79a7""##),
            "Tableau's first colour"
        );
        // Title, axis labels, ticks from 0.0 to 1.0, the legend with the value in percent.
        for text in [
            ">Image ROC</text>",
            ">false positive rate</text>",
            ">true positive rate</text>",
            ">0.0</text>",
            ">0.6</text>",
            ">1.0</text>",
            ">AUROC (%)</text>",
            r#">bottle <tspan class="value" font-weight="600">75.0</tspan>"#,
        ] {
            assert!(s.contains(text), "{text}");
        }
        assert!(s.contains(r#"class="chance""#));
        let pr = svg("Pixel precision-recall", CurveKind::Pr, &[]);
        assert!(pr.contains(">recall</text>") && pr.contains(">AP (%)</text>"));
        assert!(pr.contains("no class with a defined AP") && !pr.contains("chance"));
    }

    #[test]
    fn names_are_escaped_and_legends_grow() {
        let many: Vec<Series> = (0..40)
            .map(|i| series(&format!("<b>&'\"{i}"), &[(0.0, 0.0), (1.0, 1.0)], None))
            .collect();
        let s = svg("x", CurveKind::Pr, &many);
        assert!(!s.contains("<b>") && s.contains("&lt;b&gt;&amp;&#39;&quot;39"));
        assert_eq!(s.matches("<path ").count(), 40);
        assert_eq!(
            s.matches(">–</tspan>").count(),
            40,
            "undefined values as dashes"
        );
        let h = TOP + LEGEND_ROW * 41.0 + 12.0;
        assert!(
            s.contains(&format!(r#"viewBox="0 0 {W} {h}""#)),
            "taller for 40 entries"
        );
        assert!(
            s.contains(r#"stroke-dasharray="7 4""#),
            "after ten colours, dashes"
        );
        assert_eq!(short("abcdefghijklmnopqrstuvwxyz", 5), "abcd…");
        assert_eq!(CurveKind::Pr.title("pixel"), "Pixel precision-recall");
    }

    #[test]
    fn thinning_keeps_the_ends_and_drops_close_neighbours() {
        // A pixel curve of a million points on the diagonal.
        let pts: Vec<(f64, f64)> = (0..=1_000_000)
            .map(|i| (i as f64 / 1e6, i as f64 / 1e6))
            .collect();
        let t = thin(&pts);
        assert!(t.len() <= MAX_POINTS && t.len() > 400, "{}", t.len());
        assert_eq!(t[0], [0.0, 0.0]);
        assert_eq!(*t.last().unwrap(), [1.0, 1.0]);
        assert!(t.windows(2).all(|w| w[1][0] - w[0][0] >= TOLERANCE - 1e-4));
        // A zig-zag of precision is capped by index, ends kept.
        let zig: Vec<(f64, f64)> = (0..50_000)
            .map(|i| (i as f64 / 5e4, (i % 2) as f64))
            .collect();
        let t = thin(&zig);
        assert_eq!(t.len(), MAX_POINTS);
        assert_eq!(t[0], [0.0, 0.0]);
        assert_eq!(*t.last().unwrap(), [1.0, 1.0], "(0.99998, 1) rounded");
        // Few points stay; non-finite ones go; values are rounded.
        assert_eq!(
            thin(&[(0.0, 0.0), (f64::NAN, 1.0), (0.123456, 1.0)]),
            vec![[0.0, 0.0], [0.1235, 1.0]]
        );
        assert!(thin(&[]).is_empty());
    }

    #[test]
    fn curves_json_reads_back() {
        let c = Curves {
            image: LevelCurves {
                roc: vec![series("a", &[(0.0, 0.0), (1.0, 1.0)], Some(0.5))],
                pr: vec![],
            },
            pixel: LevelCurves::default(),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            text.contains(r#""roc":[{"class":"a","value":0.5,"points":[[0.0,0.0],[1.0,1.0]]}]"#)
        );
        assert_eq!(serde_json::from_str::<Curves>(&text).unwrap(), c);
        assert_eq!(c.plots()[0].2.len(), 1);
        assert_eq!(c.plots()[3].0, "pixel");
    }
}
