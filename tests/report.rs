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

#[test]
fn report_embeds_eval_metrics_and_curves() {
    let dir = fresh_dir("report", "eval");
    common::textures::make_class(&dir.join("data"), 4, 8, 3);
    let data = dir.join("data");
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
    let o = zsad(&["report", s(&out), "--eval", s(&eval), "-q"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let metrics: Value =
        serde_json::from_slice(&std::fs::read(eval.join("metrics.json")).unwrap()).unwrap();
    let auroc = metrics["classes"]["class4"]["image_auroc"]
        .as_f64()
        .unwrap();
    assert!(
        html.contains(&format!("<th>class4</th><td>{:.1}</td>", 100.0 * auroc)),
        "the metrics table"
    );
    assert_eq!(
        html.matches("data:image/png;base64,").count(),
        4,
        "four curves"
    );
    assert!(!html.contains("src=\"http"), "nothing from the network");
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
