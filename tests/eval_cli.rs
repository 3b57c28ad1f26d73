//! End-to-end `zsad eval` on the real sample data in `../shared/data` (MVTec AD bottle, MTD)
//! with the tiny random CLIP: the reports exist and parse, and evaluating the written
//! predictions gives the same numbers as evaluating the model directly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use serde_json::{json, Value};

fn zsad(args: &[&str], stdin: &str) -> Output {
    run_zsad(args, stdin)
}

fn tmp(name: &str) -> PathBuf {
    fresh_dir("eval", name)
}

fn err(o: &Output) -> String {
    stderr_of(o)
}

fn metrics(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap()
}

const KEYS: [&str; 7] = [
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
];

/// A small mixed manifest: bottle images (normal and defective) and MTD tiles of two classes.
fn manifest(shared: &Path, dir: &Path) -> Option<PathBuf> {
    let bottle = shared.join("data/mvtec_ad/bottle");
    let mtd = shared.join("data/mtd");
    if !bottle.exists() || !mtd.exists() {
        return None;
    }
    let mut lines = Vec::new();
    for (kind, n) in [("good", 2), ("broken_large", 2), ("contamination", 1)] {
        for i in 0..n {
            let img = bottle.join(format!("test/{kind}/{i:03}.png"));
            let mask = bottle.join(format!("ground_truth/{kind}/{i:03}_mask.png"));
            let mut v = serde_json::json!({"image": img, "class": "bottle", "label": (kind != "good") as u8});
            if kind != "good" {
                v["mask"] = serde_json::json!(mask);
            }
            lines.push(v.to_string());
        }
    }
    for class in ["MT_Free", "MT_Crack"] {
        let d = mtd.join(class).join("Imgs");
        let mut jpgs: Vec<PathBuf> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        jpgs.sort();
        for j in jpgs.iter().take(3) {
            lines.push(
                serde_json::json!({"image": j, "mask": j.with_extension("png"), "class": class})
                    .to_string(),
            );
        }
    }
    let p = dir.join("manifest.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    Some(p)
}

/// `zsad eval --data D --predictions P --out O`.
fn eval_predictions(data: &str, predictions: &str, out: &str) -> std::process::Output {
    zsad(
        &[
            "eval",
            "--data",
            data,
            "--predictions",
            predictions,
            "--out",
            out,
        ],
        "",
    )
}

#[test]
fn predictions_and_model_runs_agree_and_reports_parse() {
    let Some(shared) = shared() else {
        skip(
            "eval_cli::predictions_and_model_runs_agree_and_reports_parse",
            "../shared is absent",
        );
        return;
    };
    let dir = tmp("agree");
    let Some(man) = manifest(&shared, &dir) else {
        skip(
            "eval_cli::predictions_and_model_runs_agree_and_reports_parse",
            "sample data is absent",
        );
        return;
    };
    let tok = shared
        .join("clip-tokenizer/tokenizer.json")
        .display()
        .to_string();
    let model = fixtures().join("models/tiny-method").display().to_string();
    let m = man.display().to_string();
    // 1. detect writes float maps at each image's size.
    let images: String = std::fs::read_to_string(&man)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["image"]
                .as_str()
                .unwrap()
                .to_string()
                + "\n"
        })
        .collect();
    let pred = dir.join("pred").display().to_string();
    let o = zsad(
        &[
            "detect",
            "--model",
            &model,
            "--tokenizer",
            &tok,
            "--maps",
            "npy",
            "--heatmaps",
            "none",
            // One image per pass; `eval --model` batches each class, so the two paths agree
            // to float rounding (1e-6 below), not bit for bit.
            "--batch-size",
            "1",
            "--out",
            &pred,
            "-q",
            "-",
        ],
        &images,
    );
    assert!(o.status.success(), "{}", err(&o));
    // 2. eval from the predictions; 3. eval running the model at the original resolution.
    let from_pred = dir.join("from-pred");
    let o = zsad(
        &[
            "eval",
            "--data",
            &m,
            "--predictions",
            &pred,
            "--out",
            from_pred.to_str().unwrap(),
            "-q",
        ],
        "",
    );
    assert!(o.status.success(), "{}", err(&o));
    let from_model = dir.join("from-model");
    let o = zsad(
        &[
            "eval",
            "--data",
            &m,
            "--model",
            &model,
            "--tokenizer",
            &tok,
            "--class-name",
            "object",
            "--resolution",
            "original",
            "--out",
            from_model.to_str().unwrap(),
        ],
        "",
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("| **mean** |"),
        "the table is printed"
    );
    let (a, b) = (metrics(&from_pred), metrics(&from_model));
    for class in ["bottle", "MT_Crack", "MT_Free", "mean"] {
        let (x, y) = if class == "mean" {
            (&a["mean"], &b["mean"])
        } else {
            (&a["classes"][class], &b["classes"][class])
        };
        for k in KEYS {
            match (x[k].as_f64(), y[k].as_f64()) {
                // detect batches all images, eval --model each class's: other batch
                // companions round the maps differently in the last float bits.
                (Some(p), Some(q)) => assert!((p - q).abs() < 1e-6, "{class} {k}: {p} vs {q}"),
                (None, None) => {}
                _ => panic!("{class} {k}: {} vs {}", x[k], y[k]),
            }
        }
    }
    // MT_Free has only normal tiles: its image and pixel metrics are undefined and it says so.
    let free = &a["classes"]["MT_Free"];
    assert!(free["image_auroc"].is_null() && free["pixel_aupro"].is_null());
    assert!(free["note"]
        .as_str()
        .unwrap()
        .contains("only normal images"));
    assert_eq!(a["classes"]["bottle"]["images"], 5);
    assert_eq!(a["classes"]["bottle"]["anomalous_images"], 3);
    // The mean is over the classes where a metric is defined.
    let mean_auroc = (a["classes"]["bottle"]["image_auroc"].as_f64().unwrap()
        + a["classes"]["MT_Crack"]["image_auroc"]
            .as_f64()
            .unwrap_or(f64::NAN))
        / 2.0;
    if mean_auroc.is_finite() {
        assert!((a["mean"]["image_auroc"].as_f64().unwrap() - mean_auroc).abs() < 1e-12);
    }
    // The other reports and the plots.
    let csv = std::fs::read_to_string(from_pred.join("metrics.csv")).unwrap();
    assert!(csv.starts_with(
        "class,image_auroc,image_ap,image_f1_max,pixel_auroc,pixel_ap,pixel_f1_max,pixel_aupro"
    ));
    assert_eq!(csv.lines().count(), 1 + 3 + 1);
    let md = std::fs::read_to_string(from_pred.join("metrics.md")).unwrap();
    assert!(md.contains("| MT_Free | n/a |"), "{md}");
    for plot in [
        "roc_image.svg",
        "pr_image.svg",
        "roc_pixel.svg",
        "pr_pixel.svg",
    ] {
        let svg = std::fs::read_to_string(from_pred.join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg xmlns=") && svg.ends_with("</svg>"),
            "{plot}"
        );
        assert!(svg.contains("<path class=\"curve\""), "{plot}: a curve");
        assert!(!from_pred.join(plot.replace(".svg", ".png")).exists());
    }
    // The curves' numbers, for the report: one class with a defined image AUROC per curve.
    let curves: Value =
        serde_json::from_slice(&std::fs::read(from_pred.join("curves.json")).unwrap()).unwrap();
    for series in curves["image"]["roc"].as_array().unwrap() {
        let class = series["class"].as_str().unwrap();
        assert_eq!(
            series["value"], a["classes"][class]["image_auroc"],
            "{class}"
        );
        let pts = series["points"].as_array().unwrap();
        assert!(pts.len() >= 2 && pts[0] == json!([0.0, 0.0]), "{series}");
        assert_eq!(*pts.last().unwrap(), json!([1.0, 1.0]));
    }
    assert!(!curves["image"]["roc"].as_array().unwrap().is_empty());
    assert!(curves["pixel"]["pr"].is_array());

    // AdaCLIP's rule counts single-label classes as 0.
    let zero = dir.join("zero");
    let o = zsad(
        &[
            "eval",
            "--data",
            &m,
            "--predictions",
            &pred,
            "--single-label",
            "zero",
            "--out",
            zero.to_str().unwrap(),
            "-q",
        ],
        "",
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(metrics(&zero)["classes"]["MT_Free"]["image_auroc"], 0.0);
}

#[test]
fn an_mvtec_root_is_read_and_problems_are_named() {
    let Some(shared) = shared() else {
        skip(
            "eval_cli::an_mvtec_root_is_read_and_problems_are_named",
            "../shared is absent",
        );
        return;
    };
    let root = shared.join("data/mvtec_ad");
    if !root.exists() {
        return;
    }
    let tok = shared
        .join("clip-tokenizer/tokenizer.json")
        .display()
        .to_string();
    let model = fixtures().join("models/tiny-method").display().to_string();
    let out = tmp("mvtec");
    let o = zsad(
        &[
            "eval",
            "--data",
            root.to_str().unwrap(),
            "--model",
            &model,
            "--tokenizer",
            &tok,
            "--out",
            out.to_str().unwrap(),
            "-q",
        ],
        "",
    );
    assert!(o.status.success(), "{}", err(&o));
    let m = metrics(&out);
    let bottle = &m["classes"]["bottle"];
    assert_eq!(bottle["images"], 83);
    assert_eq!(bottle["anomalous_images"], 63);
    // At the model's input size (32 px for this tiny model): 83 * 32 * 32 pixels.
    assert_eq!(bottle["pixels"], 83 * 32 * 32);
    for k in KEYS {
        let v = bottle[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }

    // Predictions missing for some images: every one is named, nothing is written.
    let pred = tmp("partial");
    let one = root.join("bottle/test/good/000.png").display().to_string();
    let o = zsad(
        &[
            "detect",
            "--model",
            &model,
            "--tokenizer",
            &tok,
            "--out",
            pred.to_str().unwrap(),
            "-q",
            &one,
        ],
        "",
    );
    assert!(o.status.success(), "{}", err(&o));
    let out2 = tmp("partial-out");
    let o = eval_predictions(
        root.to_str().unwrap(),
        pred.to_str().unwrap(),
        out2.to_str().unwrap(),
    );
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert!(
        e.contains("82 prediction problem(s)") && e.contains("001.png: no prediction"),
        "{e}"
    );
    assert!(!out2.join("metrics.json").exists());

    // A map of the wrong size is named.
    let man = out2.join("one.jsonl");
    std::fs::write(
        &man,
        format!("{{\"image\": \"{one}\", \"class\": \"bottle\", \"label\": 0}}\n"),
    )
    .unwrap();
    let rec: Value = serde_json::from_str(
        std::fs::read_to_string(pred.join("scores.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::new(10, 10)
        .save(pred.join(rec["map"].as_str().unwrap()))
        .unwrap();
    let o = eval_predictions(
        man.to_str().unwrap(),
        pred.to_str().unwrap(),
        out2.to_str().unwrap(),
    );
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert!(
        e.contains("the map is 10x10 but the image is 900x900"),
        "{e}"
    );
}

/// A detect run given `./` and relative paths (from another folder, through a symlink) is
/// matched to the dataset by file; records naming the images by other paths (another machine)
/// by the path inside the dataset; every missing or unreadable map is named at once.
#[test]
fn predictions_match_by_file_then_by_path_inside_the_dataset() {
    let Some(shared) = shared() else {
        skip(
            "eval_cli::predictions_match_by_file_then_by_path_inside_the_dataset",
            "../shared is absent",
        );
        return;
    };
    let bottle = shared.join("data/mvtec_ad/bottle");
    if !bottle.exists() {
        skip(
            "eval_cli::predictions_match_by_file_then_by_path_inside_the_dataset",
            "sample data is absent",
        );
        return;
    }
    let tok = shared
        .join("clip-tokenizer/tokenizer.json")
        .display()
        .to_string();
    let model = fixtures().join("models/tiny-method").display().to_string();
    let dir = tmp("relative");
    // The data through a symlink: detect's canonical paths are the real files'.
    std::os::unix::fs::symlink(bottle.canonicalize().unwrap(), dir.join("bottle")).unwrap();
    let images = [
        "test/good/000.png",
        "test/good/001.png",
        "test/broken_large/000.png",
        "test/contamination/000.png",
    ];
    let man = dir.join("m.jsonl");
    let lines: Vec<String> = images
        .iter()
        .map(|i| {
            let mut v = serde_json::json!({"image": format!("bottle/{i}"), "class": "bottle"});
            if !i.contains("good") {
                v["mask"] = serde_json::json!(format!(
                    "bottle/{}",
                    i.replace("test/", "ground_truth/")
                        .replace(".png", "_mask.png")
                ));
            }
            v.to_string()
        })
        .collect();
    std::fs::write(&man, lines.join("\n") + "\n").unwrap();
    let inputs: Vec<String> = images
        .iter()
        .enumerate()
        .map(|(k, i)| {
            if k % 2 == 0 {
                format!("./bottle/{i}")
            } else {
                format!("bottle/{i}")
            }
        })
        .collect();
    let mut args = vec![
        "detect",
        "--model",
        &model,
        "--tokenizer",
        &tok,
        "--maps",
        "npy",
        "--heatmaps",
        "none",
        "--out",
        "pred",
        "-q",
    ];
    args.extend(inputs.iter().map(String::as_str));
    let o = run_zsad_in(&dir, &args);
    assert!(o.status.success(), "{}", err(&o));
    let pred = dir.join("pred");
    let man_s = man.display().to_string();
    let eval = |cwd: &Path, out: &str, quiet: bool| {
        let out = dir.join(out).display().to_string();
        let pred = pred.display().to_string();
        let mut a = vec![
            "eval",
            "--data",
            &man_s,
            "--predictions",
            &pred,
            "--out",
            &out,
        ];
        if quiet {
            a.push("-q");
        }
        run_zsad_in(cwd, &a)
    };
    // From the folder detect ran in: the records' relative paths name the same files.
    let o = eval(&dir, "same-folder", false);
    assert!(o.status.success(), "{}", err(&o));
    let e = err(&o);
    // Not a terminal: plain progress lines (here the last image only: 4 < 50).
    assert!(e.contains("zsad: eval: image 4/4 (bottle) "), "{e}");
    assert!(!e.contains("image 3/4"), "{e}");
    let want = metrics(&dir.join("same-folder"));
    assert_eq!(want["classes"]["bottle"]["images"], 4);
    // From elsewhere the relative paths do not resolve: matched by `bottle/test/...`.
    let o = eval(&fixtures(), "elsewhere", true);
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).is_empty(), "--quiet: {}", err(&o));
    assert_eq!(metrics(&dir.join("elsewhere")), want);
    // Records made on another machine: other roots, same paths inside the dataset.
    let scores = pred.join("scores.jsonl");
    let original = std::fs::read_to_string(&scores).unwrap();
    let moved = original
        .replace("\"./bottle/", "\"/mnt/other/mvtec/bottle/")
        .replace("\"bottle/", "\"/mnt/other/mvtec/bottle/");
    assert!(!moved.contains("\"./"));
    std::fs::write(&scores, &moved).unwrap();
    let o = eval(&dir, "moved", true);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(metrics(&dir.join("moved")), want);
    // Two records ending with the same path inside the dataset: ambiguous, both named.
    let first = moved.lines().find(|l| l.contains("good/000.png")).unwrap();
    std::fs::write(
        &scores,
        format!("{moved}{}\n", first.replace("/mnt/other/", "/mnt/third/")),
    )
    .unwrap();
    let o = eval(&dir, "ambiguous", true);
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert!(
        e.contains("1 prediction problem(s)")
            && e.contains("2 predictions end with bottle/test/good/000.png: /mnt/other/mvtec/")
            && e.contains("/mnt/third/mvtec/"),
        "{e}"
    );
    std::fs::write(&scores, &original).unwrap();

    // Missing maps: all of them at once, before any is read.
    let recs: Vec<Value> = original
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let map_of = |k: usize| pred.join(recs[k]["map"].as_str().unwrap());
    std::fs::remove_file(map_of(0)).unwrap();
    std::fs::remove_file(map_of(2)).unwrap();
    let o = eval(&dir, "missing", true);
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert!(e.contains("2 prediction problem(s)"), "{e}");
    for k in [0, 2] {
        assert!(
            e.contains(&format!("map {} is missing", map_of(k).display())),
            "{e}"
        );
    }
    assert!(!dir.join("missing/metrics.json").exists());
    // Unreadable maps: all of them, after the others were read.
    std::fs::write(map_of(0), b"not a map").unwrap();
    std::fs::write(map_of(2), b"not a map either").unwrap();
    let o = eval(&dir, "unreadable", true);
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert!(e.contains("2 map problem(s)"), "{e}");
    for k in [0, 2] {
        assert!(
            e.contains(&format!(
                "unreadable map: {}: not a .npy file",
                map_of(k).display()
            )),
            "{e}"
        );
    }
    assert!(!dir.join("unreadable/metrics.json").exists());
}

/// Every dataset problem is reported at once, before any model is loaded.
#[test]
fn every_dataset_problem_is_reported_at_once() {
    let dir = tmp("problems");
    image::GrayImage::new(4, 4)
        .save(dir.join("ok.png"))
        .unwrap();
    image::GrayImage::from_pixel(4, 4, image::Luma([255]))
        .save(dir.join("ok_mask.png"))
        .unwrap();
    let man = dir.join("m.csv");
    std::fs::write(
        &man,
        "image,mask,label,class\n\
         ok.png,ok_mask.png,1,a\n\
         ok.png,,maybe,a\n\
         ,ok_mask.png,1,a\n\
         gone1.png,,0,a\n\
         ok.png,gone_mask.png,1,a\n\
         ok.png,,anomalous?,a\n\
         gone2.png,,0,b\n\
         gone3.png,,0,b\n\
         gone4.png,,0,b\n",
    )
    .unwrap();
    let out = dir.join("out");
    let o = zsad(
        &[
            "eval",
            "--data",
            man.to_str().unwrap(),
            "--model",
            "no-such-model",
            "--out",
            out.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert!(e.contains("the data has 8 problem(s)"), "{e}");
    let m = man.display();
    for want in [
        format!("{m}: line 3: label \"maybe\""),
        format!("{m}: line 4: empty `image`"),
        format!(
            "{m}: line 5: image {}: not found",
            dir.join("gone1.png").display()
        ),
        format!("{m}: line 6: mask {}", dir.join("gone_mask.png").display()),
        format!("{m}: line 7: label \"anomalous?\""),
        format!("{m}: line 10: image {}", dir.join("gone4.png").display()),
    ] {
        assert!(e.contains(&want), "missing `{want}` in\n{e}");
    }
    assert!(
        !e.contains("no-such-model"),
        "the data is checked first: {e}"
    );

    // No `image` column: said so, with the columns there are.
    std::fs::write(&man, "file,label\nok.png,0\n").unwrap();
    let o = eval_predictions(
        man.to_str().unwrap(),
        dir.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert!(
        e.contains(&format!(
            "manifest {m}: no `image` column; the columns are: file, label"
        )),
        "{e}"
    );

    // An MVTec AD class with an empty test/ folder is named, not dropped.
    let root = dir.join("mvtec");
    std::fs::create_dir_all(root.join("bottle/test/good")).unwrap();
    image::GrayImage::new(4, 4)
        .save(root.join("bottle/test/good/000.png"))
        .unwrap();
    std::fs::create_dir_all(root.join("cable/test/good")).unwrap();
    let o = eval_predictions(
        root.to_str().unwrap(),
        dir.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert!(
        e.contains("the data has 1 problem(s)") && e.contains("class `cable` has no images"),
        "{e}"
    );
}
