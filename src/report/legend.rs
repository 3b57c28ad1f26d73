//! The legend of the heatmaps' colours: an inferno colour bar with the map values at its ends,
//! as the run drew them (`run.json`'s `heatmap_scale`: `fixed` 0 to 1 by default, `image` each
//! map's own range, `run` the run's range recorded in `info.heatmap_range`).

use std::fmt::Write;

use serde_json::Value;

use super::html::escape;
use super::numbers::number;
use crate::data::run_record::RunRecord;

/// What the colour bar's ends stand for.
#[derive(Debug, Clone, PartialEq)]
pub enum Scale {
    /// Map values, low and high end.
    Values(String, String),
    /// Each image's own lowest and highest value.
    PerImage,
    /// The run's range, not (yet) recorded.
    RunUnknown,
}

/// The scale of `run`'s heatmaps, or `None` when it drew none.
pub fn scale(run: &RunRecord) -> Option<Scale> {
    let s = &run.settings;
    if s.get("heatmaps").and_then(Value::as_str) == Some("none") {
        return None;
    }
    Some(match s.get("heatmap_scale").and_then(Value::as_str) {
        Some("image") => Scale::PerImage,
        Some("run") => {
            let range = run.info.get("heatmap_range").and_then(Value::as_array);
            match range.map(|r| r.as_slice()) {
                Some([Value::Number(lo), Value::Number(hi)]) => {
                    Scale::Values(number(lo), number(hi))
                }
                _ => Scale::RunUnknown,
            }
        }
        _ => Scale::Values("0".into(), "1".into()),
    })
}

const W: f64 = 300.0;
const BAR: f64 = 14.0;

/// The legend as HTML: a caption, the colour bar as SVG and the values of its ends.
pub fn html(scale: &Scale) -> String {
    let (lo, hi, what) = match scale {
        Scale::Values(lo, hi) => (lo.clone(), hi.clone(), "map value".to_string()),
        Scale::PerImage => (
            "lowest".into(),
            "highest".into(),
            "each image's own range (colours do not compare across images)".into(),
        ),
        Scale::RunUnknown => (
            "run's lowest".into(),
            "highest".into(),
            "the run's range (not recorded in run.json)".into(),
        ),
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<div id="heatmap-scale" class="legend" data-lo="{lo}" data-hi="{hi}"><span class="caption">Heatmap colours: {what}</span><svg class="colorbar" viewBox="0 0 {W} 34" width="{W}" height="34" role="img" aria-label="inferno colour bar from {lo} to {hi}"><defs><linearGradient id="zsad-inferno" x1="0" x2="1" y1="0" y2="0">"##,
        lo = escape(&lo),
        hi = escape(&hi),
        what = escape(&what)
    );
    for k in 0..=16 {
        let t = k as f64 / 16.0;
        let c = colorous::INFERNO.eval_continuous(t);
        let _ = write!(
            s,
            r##"<stop offset="{t:.4}" stop-color="#{:02x}{:02x}{:02x}"/>"##,
            c.r, c.g, c.b
        );
    }
    let _ = write!(
        s,
        r##"</linearGradient></defs><rect x="1" y="1" width="{bw}" height="{BAR}" fill="url(#zsad-inferno)" stroke="#555"/><text class="lo" x="1" y="31" text-anchor="start">{lo}</text><text class="hi" x="{hx}" y="31" text-anchor="end">{hi}</text></svg></div>"##,
        bw = W - 2.0,
        hx = W - 1.0,
        lo = escape(&lo),
        hi = escape(&hi)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_scale_follows_run_json() {
        let run = |s: Value, i: Value| scale(&RunRecord::new(s, i));
        let unit = Some(Scale::Values("0".into(), "1".into()));
        assert_eq!(run(json!({}), json!({})), unit, "fixed by default");
        assert_eq!(run(json!({"heatmap_scale": "fixed"}), json!({})), unit);
        assert_eq!(
            run(json!({"heatmap_scale": "image"}), json!({})),
            Some(Scale::PerImage)
        );
        assert_eq!(
            run(
                json!({"heatmap_scale": "run"}),
                json!({"heatmap_range": [0.125f32 as f64, 0.7f32 as f64]})
            ),
            Some(Scale::Values("0.125".into(), "0.7".into()))
        );
        assert_eq!(
            run(json!({"heatmap_scale": "run"}), json!({})),
            Some(Scale::RunUnknown)
        );
        assert_eq!(run(json!({"heatmaps": "none"}), json!({})), None);
    }

    #[test]
    fn the_bar_runs_through_inferno_with_its_ends_written() {
        let h = html(&Scale::Values("0".into(), "1".into()));
        assert!(h.contains(r#"<text class="lo" x="1" y="31" text-anchor="start">0</text>"#));
        assert!(h.contains(r#"text-anchor="end">1</text>"#));
        assert_eq!(h.matches("<stop ").count(), 17);
        assert!(
            h.contains(r##"stop-color="#000004""##),
            "inferno's darkest end"
        );
        let each = html(&Scale::PerImage);
        assert!(each.contains("each image&#39;s own range"));
        assert!(each.contains(">lowest</text>") && each.contains(">highest</text>"));
    }
}
