//! `zsad calibrate` and `zsad detect --thresholds` end to end with the tiny random CLIP on the
//! synthetic textures: the thresholds achieve on their data what `thresholds.json` says, the
//! masks and regions agree with each other and with the pixel threshold, thresholds of another
//! model are refused, and bad flags and files exit 2 with a message.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::textures::make_class;
use common::*;
use serde_json::Value;

fn zsad(args: &[&str]) -> Output {
    run_zsad(args, "")
}

fn tmp(name: &str) -> PathBuf {
    fresh_dir("decision", name)
}

fn err(o: &Output) -> String {
    stderr_of(o)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ok(args: &[&str]) -> Output {
    let o = zsad(args);
    assert!(o.status.success(), "{args:?}: {}", err(&o));
    o
}

/// 24 texture images of class 3 (odd ones with defects and masks beside them).
fn data(dir: &Path) -> PathBuf {
    make_class(&dir.join("data"), 3, 24, 2);
    dir.join("data/class3")
}

fn detect(inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["detect", s(inputs), "--model", "random:tiny", "-q"];
    args.extend(["--out", s(out), "--heatmaps", "none"]);
    args.extend(extra);
    zsad(&args)
}

/// F1-max thresholds chosen on labelled data give, on that data, the F1 and counts the file
/// records; the image threshold is the same from `--predictions` of a detect run.
#[test]
fn calibrated_thresholds_achieve_what_they_record() {
    let dir = tmp("f1");
    let d = data(&dir);
    let t = dir.join("thresholds.json");
    ok(&[
        "calibrate",
        "--data",
        s(&d),
        "--model",
        "random:tiny",
        "-q",
        "--out",
        s(&t),
    ]);
    let file = json(&t);
    assert_eq!(file["format"], "zsad-thresholds/1");
    assert_eq!(file["image"]["rule"], "f1-max");
    assert_eq!(file["data"]["images"], 24);
    assert_eq!(file["data"]["anomalous_images"], 12);
    assert!(
        file["model"]["model"]["random"].is_string(),
        "{}",
        file["model"]
    );
    let th = file["image"]["threshold"].as_f64().unwrap() as f32;
    // Detect with the thresholds: every decision is score >= threshold, and the decisions on
    // the calibration data reproduce the recorded counts.
    let out = dir.join("det");
    let o = detect(&d, &out, &["--thresholds", s(&t)]);
    assert!(o.status.success(), "{}", err(&o));
    let recs = records(&out);
    assert_eq!(recs.len(), 24);
    let (mut tp, mut fp) = (0, 0);
    for r in &recs {
        let score = r["score"].as_f64().unwrap() as f32;
        let flagged = r["anomalous"].as_bool().unwrap();
        assert_eq!(flagged, score >= th, "{r}");
        let stem: u32 = Path::new(r["path"].as_str().unwrap())
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let defective = stem % 2 == 1;
        tp += (flagged && defective) as u64;
        fp += (flagged && !defective) as u64;
    }
    let a = &file["image"]["achieved"];
    assert_eq!(
        (a["true_positives"].as_u64(), a["false_positives"].as_u64()),
        (Some(tp), Some(fp))
    );
    let p = tp as f64 / (tp + fp) as f64;
    let r = tp as f64 / 12.0;
    assert!((a["f1"].as_f64().unwrap() - 2.0 * p * r / (p + r)).abs() < 1e-12);
    // The same image threshold from the detect run's records.
    let plain = dir.join("plain");
    assert!(detect(&d, &plain, &[]).status.success());
    let t2 = dir.join("from-predictions.json");
    ok(&[
        "calibrate",
        "--data",
        s(&d),
        "--predictions",
        s(&plain),
        "-q",
        "--out",
        s(&t2),
    ]);
    let f2 = json(&t2);
    assert_eq!(f2["image"]["threshold"], file["image"]["threshold"]);
    assert_eq!(
        f2["model"], file["model"],
        "the run's identity is the model's"
    );
    // A recall target and an FPR budget hold on the data.
    for (flag, v) in [("--min-recall", "0.75"), ("--max-fpr", "0.25")] {
        let t3 = dir.join(format!("{flag}.json"));
        ok(&[
            "calibrate",
            "--data",
            s(&d),
            "--model",
            "random:tiny",
            "-q",
            flag,
            v,
            "--out",
            s(&t3),
        ]);
        let a = &json(&t3)["image"]["achieved"];
        let target: f64 = v.parse().unwrap();
        if flag == "--min-recall" {
            assert!(a["recall"].as_f64().unwrap() >= target, "{a}");
        } else {
            assert!(a["fpr"].as_f64().unwrap() <= target, "{a}");
        }
    }
}

/// Masks and regions: the mask is 0/255 at the image's size, holds exactly the regions'
/// pixels, which are at least the pixel threshold; regions are largest first; specks go.
#[test]
fn masks_and_regions_agree() {
    let dir = tmp("masks");
    let d = data(&dir);
    let out = dir.join("det");
    let o = detect(&d, &out, &["--pixel-threshold", "0.55", "--maps", "npy"]);
    assert!(o.status.success(), "{}", err(&o));
    let mut any = false;
    for r in records(&out) {
        assert!(
            r.get("anomalous").is_none(),
            "no image threshold given: {r}"
        );
        let mask = image::open(out.join(r["mask"].as_str().unwrap()))
            .unwrap()
            .to_luma8();
        assert_eq!(mask.dimensions(), (64, 64));
        assert!(mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        let set = mask.pixels().filter(|p| p.0[0] == 255).count() as u64;
        let regions = &r["regions"];
        let items = regions["items"].as_array().unwrap();
        assert_eq!(regions["count"].as_u64().unwrap() as usize, items.len());
        let area: u64 = items.iter().map(|i| i["area"].as_u64().unwrap()).sum();
        assert_eq!(area, set, "{r}");
        let areas: Vec<u64> = items.iter().map(|i| i["area"].as_u64().unwrap()).collect();
        assert!(areas.windows(2).all(|w| w[0] >= w[1]), "{areas:?}");
        // Every masked pixel's map value is at least the threshold.
        let map = read_npy(&out.join(r["map"].as_str().unwrap()));
        for (m, v) in mask.pixels().zip(&map) {
            assert_eq!(m.0[0] == 255, *v >= 0.55, "{v}");
        }
        any |= !items.is_empty();
    }
    assert!(any, "no region at all: the test would not test regions");
    // Overlays outline the mask in cyan: only mask pixels, and some wherever there is a region.
    let out4 = dir.join("det4");
    let o = zsad(&[
        "detect",
        s(&d),
        "--model",
        "random:tiny",
        "-q",
        "--out",
        s(&out4),
        "--pixel-threshold",
        "0.55",
        "--heatmap-alpha",
        "0",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    for r in records(&out4) {
        let heat = image::open(out4.join(r["heatmap"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let mask = image::open(out4.join(r["mask"].as_str().unwrap()))
            .unwrap()
            .to_luma8();
        let src = image::open(r["path"].as_str().unwrap()).unwrap().to_rgb8();
        let mut outline = 0;
        for ((h, m), s) in heat.pixels().zip(mask.pixels()).zip(src.pixels()) {
            if h.0 == [0, 255, 255] && s.0 != [0, 255, 255] {
                assert_eq!(m.0[0], 255, "outline outside the mask");
                outline += 1;
            } else {
                assert_eq!(h.0, s.0, "alpha 0 shows the image itself elsewhere");
            }
        }
        assert_eq!(
            outline > 0,
            r["regions"]["count"].as_u64().unwrap() > 0,
            "{r}"
        );
    }
    // --min-region-area drops the small regions.
    let out2 = dir.join("det2");
    let o = detect(
        &d,
        &out2,
        &["--pixel-threshold", "0.55", "--min-region-area", "200"],
    );
    assert!(o.status.success(), "{}", err(&o));
    for r in records(&out2) {
        for i in r["regions"]["items"].as_array().unwrap() {
            assert!(i["area"].as_u64().unwrap() >= 200, "{i}");
        }
    }
    // CSV records carry the mask and the region count.
    let out3 = dir.join("det3");
    let o = detect(&d, &out3, &["--pixel-threshold", "0.55", "--format", "csv"]);
    assert!(o.status.success(), "{}", err(&o));
    let csv = std::fs::read_to_string(out3.join("scores.csv")).unwrap();
    assert!(
        csv.lines().next().unwrap().contains(",mask,regions"),
        "{csv}"
    );
}

/// The float32 values of a `.npy` map written by zsad.
fn read_npy(p: &Path) -> Vec<f32> {
    let b = std::fs::read(p).unwrap();
    let header = u16::from_le_bytes([b[8], b[9]]) as usize;
    b[10 + header..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Normal images only: at most the budget of them is flagged, and thresholds of another model
/// are refused unless forced.
#[test]
fn normal_calibration_and_refusals() {
    let dir = tmp("normal");
    make_class(&dir.join("refs"), 3, 40, 9);
    let normals: Vec<String> = (0..20)
        .map(|i| {
            dir.join(format!("refs/class3/{:03}.png", 2 * i))
                .display()
                .to_string()
        })
        .collect();
    let t = dir.join("t.json");
    let mut args = vec![
        "calibrate",
        "--model",
        "random:tiny",
        "-q",
        "--max-fpr",
        "0.1",
    ];
    args.extend(["--out", s(&t), "--normal"]);
    args.extend(normals.iter().map(String::as_str));
    ok(&args);
    let file = json(&t);
    assert_eq!(file["image"]["rule"], "normal-max-fpr");
    assert!(file["image"]["achieved"]["fpr"].as_f64().unwrap() <= 0.1);
    assert!(file["pixel"]["achieved"]["fpr"].as_f64().unwrap() <= 0.1);
    let th = file["image"]["threshold"].as_f64().unwrap() as f32;
    // The normal images themselves: at most 10% flagged.
    let list = dir.join("normals");
    std::fs::create_dir_all(&list).unwrap();
    for n in &normals {
        std::fs::copy(n, list.join(Path::new(n).file_name().unwrap())).unwrap();
    }
    let out = dir.join("det");
    let o = detect(&list, &out, &["--thresholds", s(&t)]);
    assert!(o.status.success(), "{}", err(&o));
    let flagged = records(&out)
        .iter()
        .filter(|r| r["anomalous"] == true)
        .count();
    assert!(flagged <= 2, "{flagged} of 20 flagged at threshold {th}");
    // Another preset: refused, naming the setting; forced: a warning.
    let o = detect(
        &list,
        &dir.join("x"),
        &["--thresholds", s(&t), "--preset", "anomalyclip"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(
        err(&o).contains("detector.preset") && err(&o).contains("--force-thresholds"),
        "{}",
        err(&o)
    );
    let o = zsad(&[
        "detect",
        s(&list),
        "--model",
        "random:tiny",
        "--out",
        s(&dir.join("y")),
        "--thresholds",
        s(&t),
        "--preset",
        "anomalyclip",
        "--force-thresholds",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("warning: --force-thresholds"),
        "{}",
        err(&o)
    );
}

#[test]
fn bad_decision_flags_exit_2_with_a_message() {
    let dir = tmp("flags");
    make_class(&dir.join("d"), 1, 2, 3);
    let d = dir.join("d/class1");
    let junk = dir.join("junk.json");
    std::fs::write(&junk, "{\"format\": 3}").unwrap();
    let other = dir.join("other.json");
    std::fs::write(
        &other,
        r#"{"format":"zsad-thresholds/9","image":null,"pixel":null,"model":{},"data":{}}"#,
    )
    .unwrap();
    let fifo = dir.join("fifo.json");
    mkfifo(&fifo);
    let out = dir.join("o");
    for (extra, want) in [
        (vec!["--thresholds", s(&fifo)], "FIFO"),
        (vec!["--pixel-threshold", "1.5"], "--pixel-threshold 1.5"),
        (vec!["--pixel-threshold", "nan"], "--pixel-threshold NaN"),
        (
            vec!["--min-region-area", "5"],
            "--min-region-area sizes defect regions",
        ),
        (vec!["--thresholds", s(&junk)], "junk.json"),
        (vec!["--thresholds", s(&other)], "zsad-thresholds/9"),
        (
            vec!["--thresholds", s(&junk), "--threshold", "0.5"],
            "cannot be used with",
        ),
        (vec!["--force-thresholds"], "--thresholds"),
    ] {
        let o = detect(&d, &out, &extra);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", err(&o));
        assert!(err(&o).contains(want), "{extra:?}: {}", err(&o));
    }
    let t = dir.join("t.json");
    for (extra, want) in [
        (vec!["--normal", s(&d)], "--normal needs --max-fpr"),
        (
            vec!["--normal", s(&d), "--min-recall", "0.5"],
            "--min-recall needs anomalous",
        ),
        (vec!["--data", s(&d), "--min-recall", "0"], "--min-recall"),
        (vec!["--data", s(&d), "--max-fpr", "2"], "--max-fpr"),
    ] {
        let mut args = vec!["calibrate", "--model", "random:tiny", "--out", s(&t)];
        args.extend(extra.iter().copied());
        let o = zsad(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", err(&o));
        assert!(err(&o).contains(want), "{extra:?}: {}", err(&o));
    }
}
