//! The page itself: a static frame (summary, histogram, metrics, settings) written here, and
//! the rows drawn by the inline script (`page.js`) from the embedded JSON, a page at a time.

use std::fmt::Write;

use serde_json::{json, Value};

use super::html::{escape, script_json};
use super::legend;
use super::model::{Eval, ReportSummary, Row};
use super::numbers;
use crate::data::run_record::RunRecord;
use crate::settings::flatten;

const CSS: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");

/// Everything the page shows.
pub(super) struct Page<'a> {
    pub title: String,
    pub rows: &'a [Row],
    pub run: Option<&'a RunRecord>,
    pub threshold: Option<f32>,
    pub eval: Option<&'a Eval>,
    pub page_size: usize,
    pub summary: &'a ReportSummary,
}

/// A metric value as a percentage with one decimal, or a dash when undefined.
fn percent(v: Option<&Value>) -> String {
    match v.and_then(Value::as_f64) {
        Some(x) => format!("{:.1}", 100.0 * x),
        None => "–".to_string(),
    }
}

/// The metrics table (classes, then the mean) and the curves: drawn here from `curves.json`'s
/// numbers, or the PNG plots of older versions.
fn metrics_section(eval: &Eval) -> String {
    let names = crate::eval::report::METRICS;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<section id="metrics"><h2>Evaluation</h2><p class="note">From {} (<code>zsad eval</code>), in percent.</p><table class="metrics"><thead><tr><th>class</th>"#,
        escape(&eval.source.join("metrics.json").display().to_string())
    );
    for n in names {
        let _ = write!(s, "<th>{}</th>", escape(&n.replace('_', " ")));
    }
    s.push_str("<th>images</th></tr></thead><tbody>");
    let mut line = |name: &str, m: &Value, class: &str| {
        let _ = write!(s, r#"<tr class="{class}"><th>{}</th>"#, escape(name));
        for n in names {
            let _ = write!(s, "<td>{}</td>", percent(m.get(n)));
        }
        let images = m.get("images").and_then(Value::as_u64);
        let _ = write!(
            s,
            "<td>{}</td></tr>",
            images.map(|n| n.to_string()).unwrap_or_default()
        );
    };
    if let Some(classes) = eval.metrics.get("classes").and_then(Value::as_object) {
        for (name, m) in classes {
            line(name, m, "class");
        }
    }
    if let Some(mean) = eval.metrics.get("mean") {
        line("mean", mean, "mean");
    }
    s.push_str("</tbody></table>");
    s.push_str(&plots(eval));
    s.push_str("</section>");
    s
}

/// The ROC and PR plots: inline SVG drawn from the curves' numbers (plots without a class are
/// left out), or the embedded PNGs of an eval folder of an older version.
fn plots(eval: &Eval) -> String {
    let mut s = String::new();
    if let Some(curves) = &eval.curves {
        for (level, kind, series) in curves.plots() {
            if !series.is_empty() {
                let _ = write!(
                    s,
                    r#"<figure class="plot svg" data-level="{level}" data-kind="{}">{}</figure>"#,
                    kind.name(),
                    crate::eval::plot::svg(&kind.title(level), kind, series)
                );
            }
        }
    } else {
        for (title, url) in &eval.plots {
            let _ = write!(
                s,
                r#"<figure class="plot png"><img src="{url}" alt="{t}"><figcaption>{t}</figcaption></figure>"#,
                t = escape(title)
            );
        }
    }
    if s.is_empty() {
        return s;
    }
    format!(r#"<div class="plots">{s}</div>"#)
}

/// The run's settings and information, one line per leaf (`detector.preset`), numbers as
/// typed ([`numbers::shown`]).
fn settings_section(run: &RunRecord) -> String {
    let mut s = String::from(
        r#"<details id="settings"><summary>Run settings (run.json)</summary><table class="settings">"#,
    );
    for (part, v) in [("settings", &run.settings), ("info", &run.info)] {
        for (k, x) in flatten(v) {
            let _ = write!(
                s,
                r#"<tr><th>{}.{}</th><td>{}</td></tr>"#,
                part,
                escape(&k),
                escape(&numbers::shown(&x))
            );
        }
    }
    s.push_str("</table></details>");
    s
}

/// The header's two lines: what the run holds, and the model with its main settings.
fn header_lines(p: &Page) -> (String, String) {
    let s = p.summary;
    let setting = |k: &str| -> Option<String> {
        let v = p.run?.settings.pointer(k)?;
        (!v.is_null()).then(|| numbers::shown(v))
    };
    let mut head = format!("{} scored, {} failed", s.scored, s.failed);
    if let Some(n) = s.anomalous {
        let _ = write!(
            head,
            ", {n} anomalous (score ≥ {})",
            p.threshold.unwrap_or(f32::NAN)
        );
    }
    let model = [
        setting("/model/spec"),
        setting("/detector/preset").map(|x| format!("preset {x}")),
        setting("/pixel_threshold").map(|x| format!("pixel threshold {x}")),
        setting("/heatmap_scale").map(|x| format!("heatmap scale {x}")),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" · ");
    (head, model)
}

/// The scores' histogram, the heatmaps' colour legend and a warning when pictures are missing.
fn overview(p: &Page) -> String {
    let scores: Vec<(f32, bool)> = p
        .rows
        .iter()
        .filter(|r| r.error.is_none())
        .filter_map(|r| Some((r.score?, r.anomalous == Some(true))))
        .collect();
    let mut out = format!(
        r#"<section id="overview"><h2>Scores</h2>{}"#,
        super::histogram::svg(&scores, p.threshold, 50)
    );
    if let Some(scale) = p.run.and_then(legend::scale) {
        out.push_str(&legend::html(&scale));
    }
    if p.summary.unavailable > 0 {
        let _ = write!(
            out,
            r#"<p class="warning">{} picture(s) could not be shown; each row says why.</p>"#,
            p.summary.unavailable
        );
    }
    out.push_str("</section>");
    out
}

/// The controls, the rows' table and the enlarged view, filled by the script.
const BODY: &str = r#"
<nav id="controls" aria-label="Filters and pages">
<div class="filters" role="group" aria-label="Filter">
<button type="button" data-filter="all">All <span class="count"></span></button>
<button type="button" data-filter="anomalous">Anomalous <span class="count"></span></button>
<button type="button" data-filter="normal">Normal <span class="count"></span></button>
<button type="button" data-filter="failed">Failed <span class="count"></span></button>
</div>
<input type="search" id="search" placeholder="Filter by path (/)" aria-label="Filter by path">
<select id="sort" aria-label="Order"><option value="score-desc">score, highest first</option><option value="score-asc">score, lowest first</option><option value="path">path</option></select>
<div class="pager"><button type="button" class="prev" aria-label="Previous page">‹</button><span class="page-info"></span><button type="button" class="next" aria-label="Next page">›</button></div>
</nav>
<p class="help">Keys: <kbd>j</kbd>/<kbd>k</kbd> or <kbd>↓</kbd>/<kbd>↑</kbd> move, <kbd>Enter</kbd> enlarges, <kbd>←</kbd>/<kbd>→</kbd> turn pages (images when enlarged), <kbd>Esc</kbd> closes, <kbd>/</kbd> searches.</p>
<table id="rows"><thead><tr><th>#</th><th>image</th><th>heatmap</th><th>mask</th><th>input</th></tr></thead><tbody></tbody></table>
<p id="empty" hidden>No image matches this filter.</p>
<div id="lightbox" hidden role="dialog" aria-modal="true" aria-label="Enlarged view">
<div class="bar"><button type="button" class="prev" aria-label="Previous image">‹</button><span class="caption"></span><button type="button" class="next" aria-label="Next image">›</button><button type="button" class="close" aria-label="Close">✕</button></div>
<p class="note" hidden></p>
<div class="pictures"></div>
</div>
"#;

/// The whole page.
pub(super) fn render(p: &Page) -> String {
    let (head, model) = header_lines(p);
    let data = json!({
        "page_size": p.page_size,
        "threshold": p.threshold,
        "rows": p.rows,
    });
    let mut out = String::with_capacity(4096 + 400 * p.rows.len());
    let _ = write!(
        out,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="zsad {version}">
<title>zsad report: {title}</title><style>{CSS}</style></head>
<body>
<header><h1>zsad report: <span class="dir">{title}</span></h1><p class="summary">{head}</p><p class="model">{model}</p></header>
{overview}"#,
        version = env!("CARGO_PKG_VERSION"),
        title = escape(&p.title),
        head = escape(&head),
        model = escape(&model),
        overview = overview(p),
    );
    if let Some(e) = p.eval {
        out.push_str(&metrics_section(e));
    }
    if let Some(run) = p.run {
        out.push_str(&settings_section(run));
    }
    out.push_str(BODY);
    let _ = write!(
        out,
        r#"<script type="application/json" id="zsad-data">{}</script>
<script>{SCRIPT}</script>
</body></html>
"#,
        script_json(&data)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: &str, score: Option<f32>, anomalous: Option<bool>) -> Row {
        Row::of(&crate::data::records::Record {
            path: path.into(),
            score,
            global_score: score,
            anomalous,
            error: score.is_none().then(|| "broken <file>".into()),
            width: Some(4),
            height: Some(4),
            map_max: score,
            ..Default::default()
        })
    }

    #[test]
    fn the_frame_escapes_everything_it_is_given() {
        let rows = vec![
            row("<script>alert(1)</script>.png", Some(0.9), Some(true)),
            row("ok.png", Some(0.1), Some(false)),
            row("bad.png", None, None),
        ];
        let run = RunRecord::new(
            json!({"model": {"spec": "<b>m</b>"}, "detector": {"preset": "zero-shot"}, "threshold": 0.5}),
            json!({"command": ["zsad", "</script>"]}),
        );
        let summary = ReportSummary {
            scored: 2,
            failed: 1,
            anomalous: Some(1),
            ..Default::default()
        };
        let html = render(&Page {
            title: "<out>".into(),
            rows: &rows,
            run: Some(&run),
            threshold: Some(0.5),
            eval: None,
            page_size: 100,
            summary: &summary,
        });
        // Only our own elements: the one script element and the data element.
        assert_eq!(html.matches("<script").count(), 2);
        assert_eq!(html.matches("</script>").count(), 2);
        assert!(!html.contains("<b>m</b>") && html.contains("&lt;b&gt;m&lt;/b&gt;"));
        assert!(html.contains("zsad report: <span class=\"dir\">&lt;out&gt;</span>"));
        assert!(html.contains("2 scored, 1 failed, 1 anomalous (score ≥ 0.5)"));
        assert!(html.contains(r#"data-threshold="0.5""#));
        assert!(html.contains("settings.detector.preset"));
        // The data element parses back to the rows.
        let start = html.find(r#"id="zsad-data">"#).unwrap() + r#"id="zsad-data">"#.len();
        let end = start + html[start..].find("</script>").unwrap();
        let data: Value = serde_json::from_str(&html[start..end]).unwrap();
        assert_eq!(data["rows"][0]["path"], "<script>alert(1)</script>.png");
        assert_eq!(data["rows"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn metrics_table_in_percent_with_dashes_for_undefined() {
        let eval = Eval {
            source: "eval".into(),
            metrics: json!({"classes": {"bottle": {"image_auroc": 0.9876, "pixel_aupro": null, "images": 83}},
                            "mean": {"image_auroc": 0.9876, "images": 83}}),
            curves: None,
            plots: vec![("Image ROC".into(), "data:image/png;base64,AA==".into())],
        };
        let s = metrics_section(&eval);
        assert!(s.contains("<th>bottle</th><td>98.8</td>"));
        assert!(s.contains("<td>–</td>"));
        assert!(s.contains(r#"<tr class="mean"><th>mean</th>"#));
        assert!(s.contains(r#"<img src="data:image/png;base64,AA==" alt="Image ROC">"#));
    }

    #[test]
    fn curves_are_drawn_from_their_numbers_with_names_escaped() {
        use crate::eval::plot::{Curves, LevelCurves, Series};
        let series = |class: &str| Series {
            class: class.into(),
            value: Some(0.5),
            points: vec![[0.0, 0.0], [0.2, 0.9], [1.0, 1.0]],
        };
        let eval = Eval {
            source: "eval".into(),
            metrics: json!({"classes": {}}),
            curves: Some(Curves {
                image: LevelCurves {
                    roc: vec![series("<img src=x onerror=alert(1)>"), series("b")],
                    pr: vec![series("b")],
                },
                pixel: LevelCurves::default(),
            }),
            // Ignored when there are curves.
            plots: vec![("Image ROC".into(), "data:image/png;base64,AA==".into())],
        };
        let s = metrics_section(&eval);
        assert_eq!(
            s.matches("<svg ").count(),
            2,
            "the pixel level has no class: no plot"
        );
        assert_eq!(s.matches(r#"<path class="curve""#).count(), 3);
        assert!(!s.contains("<img") && s.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(s.contains(r#"data-level="image" data-kind="roc""#));
        assert!(s.contains(">Image precision-recall</text>"));
    }

    #[test]
    fn settings_show_numbers_as_typed_and_the_heatmap_legend() {
        let run = RunRecord::new(
            json!({"pixel_threshold": 0.7f32 as f64, "threshold": 0.35, "heatmap_scale": "run", "max_pixels": 100}),
            json!({"heatmap_range": [0.1f32 as f64, 0.9f32 as f64]}),
        );
        let s = settings_section(&run);
        assert!(
            s.contains("<th>settings.pixel_threshold</th><td>0.7</td>"),
            "{s}"
        );
        assert!(s.contains("<td>0.35</td>") && s.contains("<td>100</td>"));
        assert!(
            s.contains("<th>info.heatmap_range[1]</th><td>0.9</td>"),
            "{s}"
        );
        let summary = ReportSummary::default();
        let page = Page {
            title: "t".into(),
            rows: &[],
            run: Some(&run),
            threshold: None,
            eval: None,
            page_size: 100,
            summary: &summary,
        };
        let (_, model) = header_lines(&page);
        assert!(
            model.contains("pixel threshold 0.7 · heatmap scale run"),
            "{model}"
        );
        let o = overview(&page);
        assert!(
            o.contains(r#"id="heatmap-scale" class="legend" data-lo="0.1" data-hi="0.9""#),
            "{o}"
        );
    }
}
