//! `zsad report` and `zsad detect --report`: the page is written for runs with failed and
//! hostile inputs, pictures that cannot be made are named (exit 1), eval results are embedded;
//! then the page is loaded from disk in a real headless Chromium (skipped, saying so, where
//! there is none): its rows, their order, the filters, the pages, the keyboard, the enlarged
//! view and that every picture it shows loads, for a detect run and for 2,000 images.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::browser::Browser;
use common::{fresh_dir, records, run_zsad, stderr_of};
use serde_json::{json, Value};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn zsad(args: &[&str]) -> Output {
    run_zsad(args, "")
}

fn detect(inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    common::detect_tiny(inputs, out, extra)
}

/// The JSON data embedded in a report page.
fn page_data(page: &Path) -> Value {
    let html = std::fs::read_to_string(page).unwrap();
    let tag = r#"<script type="application/json" id="zsad-data">"#;
    let start = html.find(tag).unwrap() + tag.len();
    let end = start + html[start..].find("</script>").unwrap();
    serde_json::from_str(&html[start..end]).unwrap()
}

/// A folder of inputs: 12 textures, a file that is not an image, a truncated JPEG, a texture
/// under a hostile name and one as TIFF (browsers cannot show TIFF: the page shows a preview).
fn inputs(dir: &Path) -> PathBuf {
    common::textures::make_class(&dir.join("data"), 1, 12, 9);
    let d = dir.join("data/class1");
    for e in std::fs::read_dir(&d).unwrap() {
        let p = e.unwrap().path();
        if p.to_str().unwrap().ends_with("_mask.png") {
            std::fs::remove_file(p).unwrap();
        }
    }
    std::fs::write(d.join("notes.png"), b"not an image at all").unwrap();
    let mut jpg = Vec::new();
    image::RgbImage::from_pixel(40, 40, image::Rgb([10, 200, 30]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    jpg.truncate(jpg.len() / 2);
    std::fs::write(d.join("cut.jpg"), jpg).unwrap();
    std::fs::copy(d.join("003.png"), d.join("<b>&'\"#?%41 x.png")).unwrap();
    image::open(d.join("005.png"))
        .unwrap()
        .save(d.join("scan.tiff"))
        .unwrap();
    d
}

/// Runs detect over `data` with a threshold at the median score (so both decisions occur), a
/// pixel threshold and the report; returns the output folder.
fn detect_with_report(dir: &Path, data: &Path, extra: &[&str]) -> PathBuf {
    let out = dir.join("out");
    let o = detect(data, &out, &[]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "two inputs fail: {}",
        stderr_of(&o)
    );
    let mut scores: Vec<f64> = records(&out)
        .iter()
        .filter_map(|r| r["score"].as_f64())
        .collect();
    scores.sort_by(f64::total_cmp);
    let median = format!("{}", scores[scores.len() / 2]);
    let mut args = vec![
        "--overwrite",
        "--threshold",
        &median,
        "--pixel-threshold",
        "0.5",
        "--report",
    ];
    args.extend(extra);
    let o = detect(data, &out, &args);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(out.join("report.html").is_file());
    out
}

/// Record paths in the page's order: scored by score (highest first, ties by path), then the
/// failed ones by path.
fn expected_order(out: &Path) -> Vec<String> {
    let mut recs = records(out);
    recs.sort_by(|a, b| match (a["score"].as_f64(), b["score"].as_f64()) {
        (Some(x), Some(y)) => y
            .total_cmp(&x)
            .then_with(|| a["path"].as_str().cmp(&b["path"].as_str())),
        (x, y) => x
            .is_none()
            .cmp(&y.is_none())
            .then_with(|| a["path"].as_str().cmp(&b["path"].as_str())),
    });
    recs.iter()
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn report_without_a_browser_names_what_it_cannot_show() {
    let dir = fresh_dir("report", "cli");
    let data = inputs(&dir);
    let out = detect_with_report(&dir, &data, &[]);
    let page = out.join("report.html");
    let d = page_data(&page);
    let rows = d["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 16);
    let order: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(order, expected_order(&out));
    let by: BTreeMap<&str, &Value> = rows
        .iter()
        .map(|r| (r["path"].as_str().unwrap(), r))
        .collect();
    let notes = by[s(&data.join("notes.png"))];
    assert!(notes["error"].as_str().unwrap().contains("not"), "{notes}");
    let tiff = by[s(&data.join("scan.tiff"))];
    assert!(
        tiff["image_full"]
            .as_str()
            .unwrap()
            .ends_with("-preview.jpg"),
        "{tiff}"
    );
    let png = by[s(&data.join("000.png"))];
    assert_eq!(png["image_full"], "../data/class1/000.png");
    assert!(png["heatmap_full"]
        .as_str()
        .unwrap()
        .starts_with("heatmaps/"));
    assert!(png["mask"].as_str().unwrap().ends_with("-mask.png"));
    let hostile = by[s(&data.join("<b>&'\"#?%41 x.png"))];
    assert_eq!(
        hostile["image_full"],
        "../data/class1/%3Cb%3E%26%27%22%23%3F%2541%20x.png"
    );
    // Nothing from the hostile name reaches the markup unescaped.
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches("<script").count(), 2);
    assert!(!html.contains("<b>&"));

    // An input moved away: its row says so and the exit status is 1; the page is written.
    std::fs::rename(data.join("000.png"), dir.join("moved.png")).unwrap();
    std::fs::remove_dir_all(out.join("thumbs")).unwrap();
    let o = zsad(&["report", s(&out)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("1 picture(s) could not be shown"),
        "{}",
        stderr_of(&o)
    );
    let d = page_data(&page);
    let row = d["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == s(&data.join("000.png")))
        .unwrap()
        .clone();
    assert!(row["image"].is_null());
    assert!(
        row["problems"][0].as_str().unwrap().starts_with("image: "),
        "{row}"
    );
    assert!(row["heatmap"].is_string(), "the run's own files still show");

    // --overwrite removes the earlier report and its thumbnails.
    let o = detect(&data, &out, &["--overwrite"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!page.exists() && !out.join("thumbs").exists());
}

#[test]
fn report_refuses_what_is_not_a_run() {
    let dir = fresh_dir("report", "bad");
    for (args, says) in [
        (vec!["report", s(&dir)], "no scores.jsonl or scores.csv"),
        (vec!["report", "/nonexistent/zsad"], "not a folder"),
        (vec!["report", s(&dir), "--page-size", "0"], "--page-size 0"),
        (
            vec!["report", s(&dir), "--thumbnail-size", "5000"],
            "--thumbnail-size 5000",
        ),
        (
            vec!["report", s(&dir), "--max-pixels", "0"],
            "--max-pixels 0",
        ),
    ] {
        let o = zsad(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr_of(&o).contains(says), "{args:?}: {}", stderr_of(&o));
    }
    // detect --report checks the page's options before the model loads.
    common::write_png(&dir.join("in/a.png"), 16, 16, 1);
    let o = detect(
        &dir.join("in"),
        &dir.join("out"),
        &["--report", "--page-size", "0"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr_of(&o).contains("--page-size 0"), "{}", stderr_of(&o));
    assert!(
        !dir.join("out").exists(),
        "refused before anything is written"
    );
    // A metrics.json that is not eval's.
    std::fs::write(dir.join("scores.jsonl"), "").unwrap();
    let eval = dir.join("e");
    std::fs::create_dir_all(&eval).unwrap();
    std::fs::write(eval.join("metrics.json"), "{\"mean\": 1}").unwrap();
    let o = zsad(&["report", s(&dir), "--eval", s(&eval)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr_of(&o).contains("not the metrics.json of `zsad eval`"));
}

/// The curves of every `.plots` figure as the browser lays them out: each plot's width, its
/// curves (class, length on screen, points), texts, and whether every text lies inside it.
const PLOTS_DRAWN: &str = r#"(() => [...document.querySelectorAll('.plots figure.svg')].map(f => {
  const svg = f.querySelector('svg');
  const box = svg.getBoundingClientRect();
  const inside = t => { const r = t.getBoundingClientRect();
    return r.width > 0 && r.left >= box.left - 1 && r.right <= box.right + 1 && r.top >= box.top - 1 && r.bottom <= box.bottom + 1; };
  const texts = [...svg.querySelectorAll('text')];
  return {
    level: f.dataset.level, kind: f.dataset.kind, width: box.width,
    title: svg.querySelector('.title').textContent,
    labels: [...svg.querySelectorAll('.labels text')].map(t => t.textContent),
    ticks: [...svg.querySelectorAll('.ticks text')].map(t => t.textContent),
    tick_height: Math.min(...[...svg.querySelectorAll('.ticks text')].map(t => t.getBoundingClientRect().height)),
    curves: [...svg.querySelectorAll('path.curve')].map(p => ({ class: p.dataset.class,
      length: p.getTotalLength(), points: p.getAttribute('d').split(/[ML]/).length - 1,
      width: p.getBoundingClientRect().width })),
    legend: [...svg.querySelectorAll('.legend .entry text')].map(t => t.textContent),
    all_inside: texts.every(inside),
  };
}))()"#;

/// An eval folder as an older zsad wrote it: metrics.json and four PNG plots, no curves.json.
fn old_eval_folder(eval: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(eval.join("metrics.json"), to.join("metrics.json")).unwrap();
    for name in ["roc_image", "pr_image", "roc_pixel", "pr_pixel"] {
        image::RgbImage::from_pixel(720, 560, image::Rgb([250, 250, 250]))
            .save(to.join(format!("{name}.png")))
            .unwrap();
    }
}

#[test]
fn report_draws_eval_curves_from_their_numbers() {
    let dir = fresh_dir("report", "eval");
    let data = dir.join("data");
    common::textures::make_class(&data, 4, 8, 3);
    common::textures::make_class(&data, 5, 8, 4);
    let out = dir.join("out");
    let o = detect(&data, &out, &[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let eval = dir.join("eval");
    let o = zsad(&[
        "eval",
        "--data",
        s(&data),
        "--predictions",
        s(&out),
        "--out",
        s(&eval),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    // A plot file with a script in it: never inlined (the page draws from curves.json).
    std::fs::write(
        eval.join("roc_image.svg"),
        "<svg><script>window.pwned = 1</script>PWNED</svg>",
    )
    .unwrap();
    let o = zsad(&["report", s(&out), "--eval", s(&eval), "-q"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let metrics: Value =
        serde_json::from_slice(&std::fs::read(eval.join("metrics.json")).unwrap()).unwrap();
    let auroc = |class: &str| metrics["classes"][class]["image_auroc"].as_f64().unwrap();
    assert!(
        html.contains(&format!(
            "<th>class4</th><td>{:.1}</td>",
            100.0 * auroc("class4")
        )),
        "the metrics table"
    );
    assert_eq!(
        html.matches(r#"<figure class="plot svg""#).count(),
        4,
        "four plots"
    );
    assert!(!html.contains("data:image/png") && !html.contains("PWNED"));
    assert!(!html.contains("src=\"http"), "nothing from the network");

    // Older eval folders: their PNG plots, as before.
    let old = dir.join("eval-old");
    old_eval_folder(&eval, &old);
    let o = zsad(&["report", s(&out), "--eval", s(&old), "-q"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let old_html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(old_html.matches("data:image/png;base64,").count(), 4);
    assert!(!old_html.contains("<svg xmlns"));

    // A crafted curves.json: its class names are text, not markup.
    let crafted = dir.join("eval-crafted");
    std::fs::create_dir_all(&crafted).unwrap();
    std::fs::copy(eval.join("metrics.json"), crafted.join("metrics.json")).unwrap();
    let evil = "<img src=x onerror=\"window.pwned=1\">";
    let c = json!({"image": {"roc": [{"class": evil, "value": 0.5, "points": [[0, 0], [0.5, 0.9], [1, 1]]}], "pr": []},
                   "pixel": {"roc": [], "pr": []}});
    std::fs::write(crafted.join("curves.json"), c.to_string()).unwrap();
    let o = zsad(&["report", s(&out), "--eval", s(&crafted), "-q"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let crafted_html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(!crafted_html.contains("<img src=x"));
    assert_eq!(
        crafted_html.matches(r#"<figure class="plot svg""#).count(),
        1
    );
    // One that is not eval's is refused, naming it.
    std::fs::write(crafted.join("curves.json"), "{\"image\": 3}").unwrap();
    let o = zsad(&["report", s(&out), "--eval", s(&crafted), "-q"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr_of(&o).contains("not the curves.json of `zsad eval`"),
        "{}",
        stderr_of(&o)
    );

    let Some(mut b) = browser() else { return };
    let o = zsad(&["report", s(&out), "--eval", s(&eval), "-q"]);
    assert!(o.status.success());
    b.open(&out.join("report.html"), "", 1280, 900);
    let plots: Vec<Value> = serde_json::from_value(b.eval(PLOTS_DRAWN)).unwrap();
    assert_eq!(plots.len(), 4, "{plots:?}");
    for p in &plots {
        let roc = p["kind"] == "roc";
        let what = format!("{} {}", p["level"], p["kind"]);
        // Readable at the page's width: half of it at least, ticks as tall as text.
        assert!(p["width"].as_f64().unwrap() >= 480.0, "{what}: {p}");
        assert!(p["tick_height"].as_f64().unwrap() >= 10.0, "{what}: {p}");
        assert!(
            p["all_inside"] == json!(true),
            "{what}: text outside the plot: {p}"
        );
        let labels = if roc {
            json!(["false positive rate", "true positive rate"])
        } else {
            json!(["recall", "precision"])
        };
        assert_eq!(p["labels"], labels, "{what}");
        assert_eq!(p["ticks"][0], "0.0");
        assert_eq!(p["ticks"][11], "1.0");
        let curves = p["curves"].as_array().unwrap();
        assert_eq!(curves.len(), 2, "{what}: a curve per class");
        for c in curves {
            assert!(c["points"].as_u64().unwrap() >= 2, "{what}: {c}");
            assert!(c["length"].as_f64().unwrap() > 100.0, "{what}: drawn: {c}");
        }
        if p["level"] == "image" && roc {
            assert_eq!(p["title"], "Image ROC");
            assert_eq!(
                p["legend"],
                json!([
                    format!("class4 {:.1}", 100.0 * auroc("class4")),
                    format!("class5 {:.1}", 100.0 * auroc("class5"))
                ])
            );
        }
    }
    assert_eq!(b.eval("window.pwned === undefined"), json!(true));
    b.eval("document.querySelector('#metrics .plots').scrollIntoView()");
    b.screenshot(Path::new("target/test-screenshots/report-curves.png"));

    // The crafted names, in the browser: text in the legend, no element made from them.
    std::fs::write(crafted.join("curves.json"), c.to_string()).unwrap();
    let o = zsad(&["report", s(&out), "--eval", s(&crafted), "-q"]);
    assert!(o.status.success());
    b.open(&out.join("report.html"), "", 1280, 900);
    let plots: Vec<Value> = serde_json::from_value(b.eval(PLOTS_DRAWN)).unwrap();
    assert_eq!(plots[0]["curves"][0]["class"], evil);
    let cut: String = evil.chars().take(19).collect();
    assert_eq!(plots[0]["legend"][0], format!("{cut}… 50.0"));
    assert_eq!(
        b.eval("document.querySelectorAll('.plots img').length"),
        json!(0)
    );
    assert_eq!(b.eval("window.pwned === undefined"), json!(true));

    // The PNG plots of an older eval folder load.
    let o = zsad(&["report", s(&out), "--eval", s(&old), "-q"]);
    assert!(o.status.success());
    b.open(&out.join("report.html"), "", 1280, 900);
    let pngs =
        b.eval("[...document.querySelectorAll('.plots figure.png img')].map(i => i.naturalWidth)");
    assert_eq!(pngs, json!([720, 720, 720, 720]));
}

/// The browser to test with, or a visible skip.
fn browser() -> Option<Browser> {
    match Browser::find() {
        Some(exe) => Some(Browser::launch(&exe)),
        None => {
            eprintln!("SKIP: no chromium (install Debian's chromium, or set ZSAD_CHROMIUM): the report is not checked in a browser");
            None
        }
    }
}

/// The texts of the histogram that reach outside it (none should).
const HISTOGRAM_TEXT_OUTSIDE: &str = r#"(() => {
  const svg = document.querySelector('svg.histogram');
  const box = svg.getBoundingClientRect();
  return [...svg.querySelectorAll('text')].filter(t => {
    const r = t.getBoundingClientRect();
    return r.left < box.left - 0.5 || r.right > box.right + 0.5 || r.bottom > box.bottom + 0.5;
  }).map(t => t.textContent);
})()"#;

/// Every picture in the table (and the enlarged view) has loaded with a size: lazy pictures are
/// made eager and awaited first.
const ALL_PICTURES_LOAD: &str = r#"(async () => {
  const imgs = [...document.querySelectorAll('#rows img, #lightbox:not([hidden]) img')];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
  const bad = imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));
  return { count: imgs.length, bad };
})()"#;

fn shown(b: &mut Browser) -> Vec<String> {
    serde_json::from_value(b.eval("zsadReport.shown()")).unwrap()
}

fn assert_pictures_load(b: &mut Browser, at_least: u64) {
    let r = b.eval(ALL_PICTURES_LOAD);
    assert_eq!(r["bad"], json!([]), "pictures that did not load");
    assert!(r["count"].as_u64().unwrap() >= at_least, "{r}");
}

#[test]
fn report_page_works_in_a_browser() {
    let Some(mut b) = browser() else { return };
    let dir = fresh_dir("report", "browser");
    let data = inputs(&dir);
    let out = detect_with_report(
        &dir,
        &data,
        &[
            "--page-size",
            "10",
            "--heatmap-scale",
            "image",
            "--colorbar",
        ],
    );
    let order = expected_order(&out);
    let recs = common::by_path(&records(&out));
    let failed: Vec<String> = order
        .iter()
        .filter(|p| recs[*p]["error"].is_string())
        .cloned()
        .collect();
    let anomalous = recs
        .values()
        .filter(|r| r["anomalous"] == json!(true))
        .count();
    assert_eq!(failed.len(), 2);

    b.open(&out.join("report.html"), "", 1280, 900);
    assert_eq!(b.eval("zsadReport.total()"), json!(16));
    // The histogram's tick labels all lie inside it (the last one was cut off), and the
    // heatmaps' scale has its legend.
    assert_eq!(b.eval(HISTOGRAM_TEXT_OUTSIDE), json!([]));
    assert_eq!(
        b.eval("document.querySelector('#heatmap-scale .caption').textContent"),
        json!("Heatmap colours: each image's own range (colours do not compare across images)")
    );
    // Page 1 then page 2 (→), in score order; every picture shown loads.
    assert_eq!(shown(&mut b), order[..10]);
    assert_eq!(
        b.eval("document.querySelectorAll('#rows tbody tr').length"),
        json!(10)
    );
    assert_pictures_load(&mut b, 10 * 3 - 1);
    b.key("ArrowRight");
    assert_eq!(shown(&mut b), order[10..]);
    assert_eq!(b.eval("location.hash"), json!("#page=2"));
    assert_pictures_load(&mut b, 1);
    // The failed rows say why, with no pictures.
    let last = b.eval("[...document.querySelectorAll('#rows tbody tr')].map(t => [t.dataset.kind, t.querySelector('.error') && t.querySelector('.error').textContent])");
    let last = last.as_array().unwrap();
    assert_eq!(last[last.len() - 1][0], "failed");
    assert!(last[last.len() - 1][1].is_string());
    // The hostile name is shown as text, exactly.
    let hostile = s(&data.join("<b>&'\"#?%41 x.png")).to_string();
    let texts: Vec<String> = serde_json::from_value(b.eval(
        "[...document.querySelectorAll('#rows tbody tr code')].map(c => c.textContent).concat(zsadReport.shown())",
    ))
    .unwrap();
    assert!(order.contains(&hostile));
    if shown(&mut b).contains(&hostile) {
        assert!(texts.iter().filter(|t| **t == hostile).count() >= 2);
    }

    // Filters: counts on the buttons, rows of that kind only.
    b.eval("document.querySelector('[data-filter=failed]').click()");
    assert_eq!(shown(&mut b), failed);
    assert_eq!(
        b.eval("document.querySelector('[data-filter=failed] .count').textContent"),
        json!("(2)")
    );
    b.eval("document.querySelector('[data-filter=anomalous]').click()");
    assert_eq!(b.eval("zsadReport.total()"), json!(anomalous));
    assert!(shown(&mut b)
        .iter()
        .all(|p| recs[p]["anomalous"] == json!(true)));
    b.eval("document.querySelector('[data-filter=normal]').click()");
    assert_eq!(b.eval("zsadReport.total()"), json!(14 - anomalous));
    b.eval("document.querySelector('[data-filter=all]').click()");
    // Search by path.
    b.eval("{ const s = document.querySelector('#search'); s.focus(); s.value = 'scan'; s.dispatchEvent(new Event('input')); }");
    assert_eq!(shown(&mut b), vec![s(&data.join("scan.tiff")).to_string()]);
    // The TIFF's enlarged view shows its preview, and it loads.
    b.key("Enter");
    // Focus is in the search box: Enter there does nothing; Escape leaves it.
    assert_eq!(b.eval("zsadReport.enlarged()"), Value::Null);
    b.key("Escape");
    b.key("Enter");
    assert_eq!(
        b.eval("zsadReport.enlarged()"),
        json!(s(&data.join("scan.tiff")))
    );
    assert_pictures_load(&mut b, 3);
    b.key("Escape");
    b.eval("{ const s = document.querySelector('#search'); s.value = ''; s.dispatchEvent(new Event('input')); }");

    // Keyboard: j j moves to the third row, Enter enlarges it, → the next, Esc closes.
    b.key("j");
    b.key("j");
    assert_eq!(
        b.eval("document.querySelector('#rows tr.selected').dataset.path"),
        json!(order[2])
    );
    b.key("Enter");
    assert_eq!(b.eval("zsadReport.enlarged()"), json!(order[2]));
    assert_eq!(
        b.eval("document.querySelector('#lightbox').hidden"),
        json!(false)
    );
    assert_pictures_load(&mut b, 3);
    b.key("ArrowRight");
    assert_eq!(b.eval("zsadReport.enlarged()"), json!(order[3]));
    std::fs::create_dir_all("target/test-screenshots").unwrap();
    b.screenshot(Path::new("target/test-screenshots/report-enlarged.png"));
    b.key("Escape");
    assert_eq!(
        b.eval("document.querySelector('#lightbox').hidden"),
        json!(true)
    );
    // Moving past a page's last row turns the page.
    for _ in 0..8 {
        b.key("ArrowDown");
    }
    assert_eq!(b.eval("zsadReport.state().page"), json!(2));
    assert_eq!(
        b.eval("document.querySelector('#rows tr.selected').dataset.path"),
        json!(order[11])
    );

    // The state in the fragment: a link to the failed rows opens on them.
    b.open(&out.join("report.html"), "#filter=failed", 1280, 900);
    assert_eq!(shown(&mut b), failed);
    b.open(&out.join("report.html"), "", 1280, 900);
    let png = b.screenshot(Path::new("target/test-screenshots/report.png"));
    let shot = image::load_from_memory(&png).unwrap();
    assert_eq!((shot.width(), shot.height()), (1280, 900));
    // Not a blank page: the header is dark, most of the page light.
    let rgb = shot.to_rgb8();
    assert!(rgb.get_pixel(5, 5).0.iter().all(|&c| c < 80));
    let light = rgb
        .pixels()
        .filter(|p| p.0.iter().all(|&c| c > 200))
        .count();
    assert!(light > rgb.len() / 3 / 2, "{light} light pixels");
}

/// 2,000 inputs with records, maps, heatmaps and masks written here (no model: the page is
/// what is tested), 50 of them failed.
fn synthetic_run(dir: &Path, n: usize, failed: usize) -> PathBuf {
    let out = dir.join("run");
    let inputs = dir.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let mut rng = zsad::rng::SplitMix64(11);
    let png = |img: image::DynamicImage| {
        let mut v = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    };
    let heat = png(image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
        24,
        24,
        image::Rgb([200, 80, 20]),
    )));
    let mask = png(image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(
        24,
        24,
        |x, _| image::Luma([if x > 12 { 255 } else { 0 }]),
    )));
    let mut lines = String::new();
    for i in 0..n {
        let name = format!("img{i:05}");
        let path = inputs.join(format!("{name}.png"));
        let v = (i % 251) as u8;
        std::fs::write(
            &path,
            png(image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
                24,
                24,
                image::Rgb([v, 255 - v, 128]),
            ))),
        )
        .unwrap();
        let rec = if i < failed {
            json!({"path": path.to_str().unwrap(), "error": "truncated"})
        } else {
            let score = (rng.next_u64() % 1_000_000) as f64 / 1e6;
            for (sub, bytes) in [("heatmaps", &heat), ("masks", &mask)] {
                let p = out.join(sub).join(format!("{name}.png"));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, bytes).unwrap();
            }
            json!({"path": path.to_str().unwrap(), "score": score, "global_score": score,
                   "map_max": score, "map_mean": 0.1, "map_min": 0.0, "anomalous": score >= 0.5,
                   "width": 24, "height": 24, "heatmap": format!("heatmaps/{name}.png"),
                   "mask": format!("masks/{name}.png"), "regions": {"count": 1, "items": []}})
        };
        lines += &format!("{rec}\n");
    }
    std::fs::write(out.join("scores.jsonl"), lines).unwrap();
    let run = json!({"zsad_version": "test", "record_format_version": 2,
                     "settings": {"threshold": 0.5, "model": {"spec": "synthetic"}},
                     "info": {"command": ["synthetic"]}});
    std::fs::write(out.join("run.json"), run.to_string()).unwrap();
    out
}

#[test]
fn report_of_2000_images_in_a_browser() {
    let dir = fresh_dir("report", "2000");
    let out = synthetic_run(&dir, 2000, 50);
    let t = std::time::Instant::now();
    let o = zsad(&["report", s(&out), "-q"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    eprintln!(
        "zsad report, 2,000 images: {:.1} s (thumbnails made)",
        t.elapsed().as_secs_f64()
    );
    let t = std::time::Instant::now();
    let o = zsad(&["report", s(&out), "-q"]);
    assert!(o.status.success());
    eprintln!("again, thumbnails kept: {:.2} s", t.elapsed().as_secs_f64());
    let data = page_data(&out.join("report.html"));
    assert_eq!(data["rows"].as_array().unwrap().len(), 2000);
    let anomalous = data["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["anomalous"] == json!(true))
        .count();

    let Some(mut b) = browser() else { return };
    let t = std::time::Instant::now();
    b.open(&out.join("report.html"), "", 1280, 900);
    eprintln!(
        "page of 2,000 rows open in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(b.eval("zsadReport.total()"), json!(2000));
    assert_eq!(
        b.eval("document.querySelectorAll('#rows tbody tr').length"),
        json!(100)
    );
    assert!(b
        .eval("document.querySelector('.page-info').textContent")
        .as_str()
        .unwrap()
        .ends_with("page 1/20"));
    // Scores descend over the first page.
    let scores: Vec<f64> = serde_json::from_value(b.eval(
        "[...document.querySelectorAll('#rows tbody tr')].map(t => Number(t.dataset.score))",
    ))
    .unwrap();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]));
    assert_pictures_load(&mut b, 300);
    assert_eq!(
        b.eval("document.querySelector('[data-filter=anomalous] .count').textContent"),
        json!(format!("({anomalous})"))
    );
    // The last page holds the 50 failed rows after the 50 lowest scores.
    b.open(&out.join("report.html"), "#page=20", 1280, 900);
    let kinds: Vec<String> = serde_json::from_value(
        b.eval("[...document.querySelectorAll('#rows tbody tr')].map(t => t.dataset.kind)"),
    )
    .unwrap();
    assert_eq!(kinds.len(), 100);
    assert!(kinds[..50].iter().all(|k| k != "failed") && kinds[50..].iter().all(|k| k == "failed"));
    assert_pictures_load(&mut b, 150);
    b.screenshot(Path::new("target/test-screenshots/report-2000.png"));
}

/// A run written by hand (no model): three 600x400 inputs with heatmaps that carry a colour bar
/// (750 pixels wide) and masks of a 1-pixel line, regions with boxes (25 on the first), the
/// second normal by the image threshold with 3 regions; `heatmap_scale` run with its range,
/// and a pixel threshold stored as an older version did (0.7 widened from f32).
fn regions_run(dir: &Path) -> PathBuf {
    let inputs = dir.join("in");
    let out = dir.join("run");
    std::fs::create_dir_all(out.join("heatmaps")).unwrap();
    std::fs::create_dir_all(out.join("masks")).unwrap();
    let boxes = |n: u32| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"area": (i + 1) * 700, "peak": 0.9,
                             "bbox": {"x": 10 * i, "y": 10 * i, "width": 50 + 5 * i, "height": 40 + 5 * i}}))
            .collect()
    };
    let mut lines = String::new();
    for (i, (name, score, regions)) in [("a", 0.9, 25), ("b", 0.3, 3), ("c", 0.1, 0)]
        .into_iter()
        .enumerate()
    {
        let path = inputs.join(format!("{name}.png"));
        common::write_png(&path, 600, 400, i as u32);
        image::RgbImage::from_fn(750, 400, |x, _| {
            image::Rgb(if x < 600 {
                [70, 12, 100]
            } else {
                [255, 255, 255]
            })
        })
        .save(out.join(format!("heatmaps/{name}.png")))
        .unwrap();
        image::GrayImage::from_fn(600, 400, |x, y| {
            image::Luma([if regions > 0 && x == 300 && (100..300).contains(&y) {
                255
            } else {
                0
            }])
        })
        .save(out.join(format!("masks/{name}.png")))
        .unwrap();
        let rec = json!({"path": s(&path), "score": score, "global_score": score, "map_max": score,
            "map_mean": 0.1, "map_min": 0.0, "anomalous": score >= 0.5, "width": 600, "height": 400,
            "heatmap": format!("heatmaps/{name}.png"), "mask": format!("masks/{name}.png"),
            "regions": {"count": regions, "items": boxes(regions)}});
        lines += &format!("{rec}\n");
    }
    std::fs::write(out.join("scores.jsonl"), lines).unwrap();
    let run = json!({"zsad_version": "test", "record_format_version": 2,
        "settings": {"threshold": 0.5, "pixel_threshold": 0.7f32 as f64, "heatmap_scale": "run",
                     "model": {"spec": "synthetic"}},
        "info": {"command": ["synthetic"], "input_roots": [s(&inputs.canonicalize().unwrap())],
                 "heatmap_range": [0.1f32 as f64, 0.9f32 as f64]}});
    std::fs::write(out.join("run.json"), run.to_string()).unwrap();
    out
}

/// The enlarged view's figures: what each shows, where its picture is drawn (the picture's
/// content box, object-fit: contain), and the boxes over it, once they are fitted.
const ENLARGED: &str = r#"(async () => {
  const figs = [...document.querySelectorAll('#lightbox figure')];
  await Promise.all(figs.map(f => { const i = f.querySelector('img');
    return i.complete ? null : new Promise(r => { i.onload = i.onerror = r; }); }));
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return figs.map(f => {
    const img = f.querySelector('img');
    const svg = f.querySelector('svg.boxes');
    const b = img.getBoundingClientRect();
    const scale = Math.min(b.width / img.naturalWidth, b.height / img.naturalHeight);
    return {
      what: img.dataset.what, natural: [img.naturalWidth, img.naturalHeight], scale,
      left: b.left + (b.width - img.naturalWidth * scale) / 2,
      top: b.top + (b.height - img.naturalHeight * scale) / 2,
      ready: !!svg && svg.dataset.ready === 'true',
      boxes: svg ? [...svg.querySelectorAll('rect')].map(r => { const c = r.getBoundingClientRect();
        return [c.left, c.top, c.width, c.height]; }) : null,
      caption: f.querySelector('figcaption').textContent,
    };
  });
})()"#;

#[test]
fn report_shows_regions_legend_and_notes_in_a_browser() {
    let dir = fresh_dir("report", "regions");
    let out = regions_run(&dir);
    let o = zsad(&["report", s(&out)]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(!stderr_of(&o).contains("warning"), "{}", stderr_of(&o));
    let d = page_data(&out.join("report.html"));
    let rows = d["rows"].as_array().unwrap();
    // The 20 largest boxes, largest first.
    assert_eq!(rows[0]["boxes"].as_array().unwrap().len(), 20);
    assert_eq!(rows[0]["boxes"][0], json!([240, 240, 170, 160]));
    assert_eq!(rows[0]["boxes"][19], json!([50, 50, 75, 65]));
    assert_eq!(rows[1]["boxes"].as_array().unwrap().len(), 3);
    assert!(
        rows[2].get("boxes").is_none(),
        "no regions, no boxes: {}",
        rows[2]
    );
    // Heatmap thumbnails of rows with a mask show its outline (cyan) where the 1-pixel line
    // was: x = 300 of 750 is column 64 of 160.
    let thumb = rows[0]["heatmap"].as_str().unwrap();
    assert!(thumb.ends_with("-outlined.jpg"), "{thumb}");
    let t = image::open(out.join(thumb)).unwrap().to_rgb8();
    assert_eq!(t.dimensions(), (160, 85));
    let cyan = |x: u32, y: u32| {
        let p = t.get_pixel(x, y).0;
        p[0] < 110 && p[1] > 150 && p[2] > 150
    };
    assert!(
        (30..50).all(|y| (63..=65).any(|x| cyan(x, y))),
        "the outline"
    );
    assert!(!(0..85).any(|y| cyan(20, y) || cyan(110, y)), "only there");
    // The full-size heatmap is the run's own file, unchanged.
    assert_eq!(rows[0]["heatmap_full"], "heatmaps/a.png");

    let Some(mut b) = browser() else { return };
    b.open(&out.join("report.html"), "", 1280, 900);
    assert_eq!(b.eval(HISTOGRAM_TEXT_OUTSIDE), json!([]));
    // The heatmaps' legend: the run's range, numbers as typed.
    let legend = b.eval(
        "(() => { const l = document.querySelector('#heatmap-scale'); return [l.dataset.lo, l.dataset.hi, l.querySelector('.lo').textContent, l.querySelector('.hi').textContent, l.querySelector('svg rect').getBoundingClientRect().width]; })()",
    );
    assert_eq!(
        legend.as_array().unwrap()[0..4],
        [json!("0.1"), json!("0.9"), json!("0.1"), json!("0.9")]
    );
    assert!(legend[4].as_f64().unwrap() >= 200.0, "{legend}");
    // The settings as typed: 0.7, not 0.699999988079071.
    let typed = b.eval(
        "[...document.querySelectorAll('#settings tr')].find(tr => tr.querySelector('th').textContent === 'settings.pixel_threshold').querySelector('td').textContent",
    );
    assert_eq!(typed, json!("0.7"));
    assert!(b
        .eval("document.querySelector('header .model').textContent")
        .as_str()
        .unwrap()
        .contains("pixel threshold 0.7"));
    assert!(!b
        .eval("document.body.innerHTML")
        .as_str()
        .unwrap()
        .contains("0.699999988"));
    // The note on the row that is normal by the image threshold but has regions.
    let notes = b.eval(
        "[...document.querySelectorAll('#rows tbody tr')].map(t => { const n = t.querySelector('.threshold-note'); return n && n.textContent; })",
    );
    assert_eq!(
        notes,
        json!([
            null,
            "normal by the image threshold; 3 regions above the pixel threshold",
            null
        ])
    );
    b.screenshot(Path::new("target/test-screenshots/report-regions.png"));

    // The enlarged view: the boxes over the image and the heatmap (not the mask), scaled with
    // the picture as shown; the heatmap's colour bar widens it, the boxes stay on the image.
    b.key("Enter");
    let figs: Vec<Value> = serde_json::from_value(b.eval(ENLARGED)).unwrap();
    assert_eq!(figs.len(), 3);
    for f in &figs {
        let what = f["what"].as_str().unwrap();
        if what == "mask" {
            assert!(f["boxes"].is_null(), "{f}");
            continue;
        }
        assert!(f["ready"] == json!(true), "{f}");
        assert_eq!(
            f["caption"],
            format!("{what} · the 20 largest of 25 regions boxed")
        );
        let boxes = f["boxes"].as_array().unwrap();
        assert_eq!(boxes.len(), 20);
        let k = f["scale"].as_f64().unwrap() * f["natural"][1].as_f64().unwrap() / 400.0;
        assert!((k - 1.0).abs() > 0.05, "the picture is shown scaled: {f}");
        let (left, top) = (f["left"].as_f64().unwrap(), f["top"].as_f64().unwrap());
        for (got, want) in boxes[0].as_array().unwrap().iter().zip([
            left + 240.0 * k,
            top + 240.0 * k,
            170.0 * k,
            160.0 * k,
        ]) {
            assert!(
                (got.as_f64().unwrap() - want).abs() < 1.5,
                "{what}: {got} vs {want}: {f}"
            );
        }
    }
    assert_eq!(figs[1]["natural"], json!([750, 400]));
    assert_eq!(
        b.eval("document.querySelector('#lightbox .note').hidden"),
        json!(true)
    );
    b.screenshot(Path::new("target/test-screenshots/report-boxes.png"));
    b.key("ArrowRight");
    let figs: Vec<Value> = serde_json::from_value(b.eval(ENLARGED)).unwrap();
    assert_eq!(figs[0]["boxes"].as_array().unwrap().len(), 3);
    assert_eq!(figs[0]["caption"], "image · 3 regions boxed");
    assert_eq!(
        b.eval("(() => { const n = document.querySelector('#lightbox .note'); return n.hidden ? null : n.textContent; })()"),
        json!("normal by the image threshold; 3 regions above the pixel threshold")
    );
    b.key("ArrowRight");
    let figs: Vec<Value> = serde_json::from_value(b.eval(ENLARGED)).unwrap();
    assert!(
        figs.iter().all(|f| f["boxes"].is_null()),
        "no regions, no boxes"
    );
}

/// Inputs are read only from the run's input folders: a name that is not UTF-8 gets its
/// thumbnail; a record crafted to name a file elsewhere is not read (its row says why, exit
/// 1); a run that does not list its input folders (older versions) is read as before, with a
/// warning.
#[test]
fn report_reads_inputs_only_from_the_run_s_folders() {
    use std::os::unix::ffi::OsStrExt;
    let dir = fresh_dir("report", "roots");
    let inputs = dir.join("in");
    common::write_png(&inputs.join("a.png"), 48, 40, 1);
    let odd = inputs.join(std::ffi::OsStr::from_bytes(b"\xff\xfe odd.png"));
    common::write_png(&odd, 48, 40, 2);
    let secret = dir.join("secret.png");
    common::write_png(&secret, 48, 40, 3);
    let out = dir.join("out");
    let o = detect(&inputs, &out, &["--report"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let run: Value = serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        run["info"]["input_roots"],
        json!([s(&inputs.canonicalize().unwrap())])
    );
    let odd_text = format!("{}/\\xFF\\xFE odd.png", s(&inputs));
    let o = zsad(&["report", s(&out)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(!stderr_of(&o).contains("warning"), "{}", stderr_of(&o));
    let d = page_data(&out.join("report.html"));
    let row = |d: &Value, p: &str| -> Value {
        d["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["path"] == p)
            .unwrap_or_else(|| panic!("no row {p}: {d}"))
            .clone()
    };
    let r = row(&d, &odd_text);
    assert!(r["image"].as_str().unwrap().ends_with("-image.jpg"), "{r}");
    assert_eq!(r["image_full"], "../in/%FF%FE%20odd.png");
    assert_eq!(r["problems"], json!([]));

    // A record crafted to name a file outside the input folders.
    let mut recs = std::fs::read_to_string(out.join("scores.jsonl")).unwrap();
    let a = recs
        .lines()
        .find(|l| l.contains("a.png"))
        .unwrap()
        .to_string();
    let mut rec: Value = serde_json::from_str(&a).unwrap();
    rec["path"] = json!(s(&secret));
    rec["score"] = json!(2.0);
    recs += &format!("{rec}\n");
    std::fs::write(out.join("scores.jsonl"), &recs).unwrap();
    let o = zsad(&["report", s(&out)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let d = page_data(&out.join("report.html"));
    let crafted = row(&d, s(&secret));
    assert!(crafted["image"].is_null() && crafted["image_full"].is_null());
    let why = crafted["problems"][0].as_str().unwrap();
    assert!(
        why.starts_with("image: not read: ") && why.contains("outside the run's input folders"),
        "{why}"
    );
    let secret_thumb = zsad::report::thumbs::name(s(&secret), zsad::report::thumbs::Kind::Image);
    assert!(!out.join(&secret_thumb).exists(), "no thumbnail of it");

    if let Some(mut b) = browser() {
        b.open(&out.join("report.html"), "", 1280, 900);
        assert_pictures_load(&mut b, 5);
        let problem = b.eval(&format!(
            "[...document.querySelectorAll('#rows tbody tr')].find(t => t.dataset.path === {}).querySelector('.problem').textContent",
            json!(s(&secret))
        ));
        assert!(problem
            .as_str()
            .unwrap()
            .contains("outside the run's input folders"));
        let odd_img = b.eval(&format!(
            "[...document.querySelectorAll('#rows tbody tr')].find(t => t.dataset.path === {}).querySelector('img').naturalWidth",
            json!(odd_text)
        ));
        assert!(odd_img.as_u64().unwrap() > 0);
    }

    // A run of an older version lists no input folders: read as before, with one warning.
    let mut run = run;
    run["info"].as_object_mut().unwrap().remove("input_roots");
    std::fs::write(out.join("run.json"), run.to_string()).unwrap();
    let o = zsad(&["report", s(&out)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert_eq!(
        stderr_of(&o)
            .matches("does not list the run's input folders")
            .count(),
        1,
        "{}",
        stderr_of(&o)
    );
    let d = page_data(&out.join("report.html"));
    assert!(row(&d, s(&secret))["image"].is_string());
}
