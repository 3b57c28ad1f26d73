//! A newcomer's first hour, as tests: mistakes refused at once and with nothing created,
//! records on stdout for pipes, `merge` that does not overwrite, adapters that belong to their
//! backbone, help that shows examples and exit statuses, Magnetic Tile Defect read as one
//! product, a typed threshold kept as typed, and predictions given by relative paths.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn tmp(name: &str) -> PathBuf {
    fresh_dir("first", name)
}

fn zsad(args: &[&str]) -> Output {
    run_zsad_timed(args, "", Duration::from_secs(120))
}

#[track_caller]
fn refused(o: &Output, want: &str) {
    let e = stderr_of(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2: {e}");
    assert!(e.contains(want), "missing `{want}` in:\n{e}");
}

/// A typo in the input path, an existing output folder and a finished run's --resume are
/// answered in well under 3 s even with a ViT-L model, and nothing is created.
#[test]
fn mistakes_are_refused_before_the_model_is_built() {
    let d = tmp("fast");
    write_png(&d.join("in/a.png"), 24, 24, 1);
    let m1 = d.join("m1");
    let t = Instant::now();
    let o = zsad(&[
        "detect",
        d.join("nonexist").to_str().unwrap(),
        "--model",
        "random:ViT-L-14-336",
        "--out",
        m1.to_str().unwrap(),
    ]);
    refused(&o, "nonexist");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(!m1.exists(), "nothing is created for a typo");
    // A finished run: refused without --resume; --resume has nothing to do.
    let out = d.join("out");
    let o = detect_tiny(&d.join("in"), &out, &[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let args = |extra: &'static str| {
        let mut a = vec![
            "detect".to_string(),
            d.join("in").display().to_string(),
            "--model".into(),
            "random:ViT-L-14-336".into(),
            "--out".into(),
            out.display().to_string(),
        ];
        if !extra.is_empty() {
            a.push(extra.into());
        }
        a
    };
    for extra in ["", "--resume"] {
        let a = args(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let t = Instant::now();
        let o = zsad(&a);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{extra}: {:?}",
            t.elapsed()
        );
        if extra.is_empty() {
            refused(&o, "--resume");
        } else {
            // Other settings (another model): refused, naming them, before any weights load.
            refused(&o, "model.random");
        }
    }
}

/// Without --out the records go to stdout (JSON Lines, or CSV), so `zsad detect | jq` works;
/// `--out -` is refused, and so are files that need a folder.
#[test]
fn records_go_to_stdout_without_an_output_folder() {
    let d = tmp("stdout");
    write_png(&d.join("a.png"), 24, 24, 1);
    write_png(&d.join("b.png"), 30, 20, 2);
    let data = d.display().to_string();
    let o = zsad(&["detect", "--model", "random:tiny", "-q", &data]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines
        .iter()
        .all(|r| r["score"].is_number() && r.get("map").is_none()));
    let o = zsad(&[
        "detect",
        "--model",
        "random:tiny",
        "-q",
        "--format",
        "csv",
        &data,
    ]);
    let csv = String::from_utf8(o.stdout).unwrap();
    assert!(csv.starts_with("path,score,"), "{csv}");
    assert_eq!(csv.lines().count(), 3, "{csv}");
    refused(
        &zsad(&["detect", "--model", "random:tiny", "--out", "-", &data]),
        "records go to stdout",
    );
    refused(
        &zsad(&["detect", "--model", "random:tiny", "--maps", "png", &data]),
        "needs an output folder",
    );
}

/// `merge` refuses a folder that holds an earlier merge, unless --overwrite; an unfinished or
/// missing shard is refused by name.
#[test]
fn merge_does_not_overwrite_and_names_missing_shards() {
    let d = tmp("merge");
    for i in 0..6 {
        write_png(&d.join(format!("in/{i}.png")), 20, 20, i);
    }
    let input = d.join("in");
    for k in 0..2 {
        let o = detect_tiny(
            &input,
            &d.join(format!("shard-{k}")),
            &["--shard", &format!("{k}/2")],
        );
        assert!(o.status.success(), "{}", stderr_of(&o));
    }
    let (s0, s1, all) = (d.join("shard-0"), d.join("shard-1"), d.join("all"));
    let merge = |shards: &[&Path], extra: &[&str]| {
        let mut a = vec!["merge".to_string()];
        a.extend(shards.iter().map(|p| p.display().to_string()));
        a.extend(["--out".to_string(), all.display().to_string()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        zsad(&a)
    };
    let o = merge(&[&s0, &s1], &[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(records(&all).len(), 6);
    let o = merge(&[&s0], &[]);
    refused(&o, "--overwrite");
    assert_eq!(records(&all).len(), 6, "the earlier merge is untouched");
    refused(&merge(&[&s0], &["--overwrite"]), "shard(s) 1/2 missing");
    let o = merge(&[&s0], &["--overwrite", "--partial"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(records(&all).len(), records(&s0).len());
}

/// A model folder that differs from tiny-method in one weight: same shapes, other weights.
fn other_weights(d: &Path) -> PathBuf {
    let src = fixtures().join("models/tiny-method");
    let dst = d.join("tiny-other");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    let w = dst.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&w, bytes).unwrap();
    dst
}

/// An adapter records the backbone it belongs to: another backbone of the same shapes is
/// refused naming both, and --force-adapter runs it with a warning.
#[test]
fn an_adapter_runs_only_on_its_backbone() {
    let d = tmp("adapter");
    let model = fixtures().join("models/tiny-method").display().to_string();
    let adapter = d.join("a.safetensors");
    let o = zsad(&[
        "import-checkpoint",
        fixtures().join("adaclip_tiny.pth").to_str().unwrap(),
        "--format",
        "adaclip",
        "--model",
        &model,
        "--image-size",
        "64",
        "--out",
        adapter.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    write_png(&d.join("x.png"), 24, 24, 1);
    let other = other_weights(&d).display().to_string();
    let run = |m: &str, extra: &[&str]| {
        let mut a = vec![
            "detect",
            "--model",
            m,
            "--adapter",
            adapter.to_str().unwrap(),
            "--tokenizer",
        ];
        let tok = tokenizer_file();
        let tok: &'static str = Box::leak(tok.into_boxed_str());
        a.push(tok);
        a.extend_from_slice(extra);
        let x = d.join("x.png");
        let x: &'static str = Box::leak(x.display().to_string().into_boxed_str());
        a.push(x);
        zsad(&a)
    };
    let o = run(&model, &["-q"]);
    assert!(o.status.success(), "its own backbone: {}", stderr_of(&o));
    let o = run(&other, &["-q"]);
    refused(&o, "adapter");
    refused(&o, "was trained with other settings");
    refused(&o, "--force-adapter");
    let o = run(&other, &["--force-adapter"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("warning: --force-adapter"),
        "{}",
        stderr_of(&o)
    );
}

/// Every command's --help shows examples and its exit status; -h fits a screen.
#[test]
fn help_has_examples_exit_statuses_and_a_short_form() {
    for cmd in [
        "detect",
        "eval",
        "calibrate",
        "train",
        "manifest",
        "import-checkpoint",
        "merge",
        "report",
        "bench",
        "info",
        "features",
    ] {
        let long = String::from_utf8(zsad(&[cmd, "--help"]).stdout).unwrap();
        assert!(long.contains("Examples:"), "{cmd} --help:\n{long}");
        assert!(long.contains("Exit status:"), "{cmd} --help:\n{long}");
        assert!(
            !long.contains("[default: ]"),
            "{cmd}: an empty default is shown"
        );
        let short = String::from_utf8(zsad(&[cmd, "-h"]).stdout).unwrap();
        assert!(
            short.lines().count() <= 60,
            "{cmd} -h is {} lines",
            short.lines().count()
        );
    }
    let long = String::from_utf8(zsad(&["reference", "build", "--help"]).stdout).unwrap();
    assert!(long.contains("Examples:") && long.contains("Exit status:"));
    // bench takes its folder as an argument.
    let o = zsad(&["bench", "/no/such/folder", "--model", "random:tiny"]);
    refused(&o, "/no/such/folder");
    // --reference that swallowed the inputs says so.
    let o = zsad(&[
        "detect",
        "--model",
        "random:tiny",
        "--reference",
        "a/",
        "b/",
    ]);
    refused(&o, "took every path after it");
}

/// Magnetic Tile Defect (a folder per defect type and one of normal tiles, masks beside the
/// images) is one product: image metrics are defined.
#[test]
fn magnetic_tile_defect_is_one_product() {
    let d = tmp("mtd");
    let root = d.join("mtd");
    for (folder, n, value) in [
        ("MT_Free", 3, 0u8),
        ("MT_Crack", 2, 255),
        ("MT_Break", 2, 255),
    ] {
        for i in 0..n {
            let stem = root.join(folder).join(format!("Imgs/{i}"));
            write_png(&stem.with_extension("jpg"), 24, 24, i);
            // A JPEG extension on PNG bytes is fine: the format is read from the bytes.
            let mut mask = image::GrayImage::new(24, 24);
            if value > 0 {
                for y in 8..14 {
                    for x in 8..14 {
                        mask.put_pixel(x, y, image::Luma([value]));
                    }
                }
            }
            mask.save(stem.with_extension("png")).unwrap();
        }
    }
    let out = d.join("eval");
    let o = zsad(&[
        "eval",
        "--data",
        root.to_str().unwrap(),
        "--model",
        "random:tiny",
        "-q",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let classes = m["classes"].as_object().unwrap();
    assert_eq!(classes.keys().collect::<Vec<_>>(), ["mtd"], "{m}");
    assert!(classes["mtd"]["image_auroc"].is_number(), "{m}");
}

/// A threshold typed as 0.7 is stored as 0.7 (not its f32's widening, 0.699999988079071).
#[test]
fn a_typed_threshold_is_kept_as_typed() {
    let d = tmp("typed");
    write_png(&d.join("in/a.png"), 24, 24, 1);
    let out = d.join("out");
    let o = detect_tiny(
        &d.join("in"),
        &out,
        &["--pixel-threshold", "0.7", "--threshold", "0.3"],
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    let text = std::fs::read_to_string(out.join("run.json")).unwrap();
    let run: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        run["settings"]["pixel_threshold"].to_string(),
        "0.7",
        "{text}"
    );
    assert_eq!(run["settings"]["threshold"].to_string(), "0.3", "{text}");
}

/// Predictions made from inside the dataset with relative paths are matched, from anywhere.
#[test]
fn predictions_given_by_relative_paths_are_matched() {
    let d = tmp("relative");
    let class = d.join("root/widget");
    for i in 0..2 {
        write_png(&class.join(format!("test/good/{i}.png")), 24, 24, i);
        write_png(&class.join(format!("test/bad/{i}.png")), 24, 24, 10 + i);
        let mut mask = image::GrayImage::new(24, 24);
        mask.put_pixel(5, 5, image::Luma([255]));
        let m = class.join(format!("ground_truth/bad/{i}_mask.png"));
        std::fs::create_dir_all(m.parent().unwrap()).unwrap();
        mask.save(m).unwrap();
    }
    let o = run_zsad_in(
        &class.join("test"),
        &[
            "detect",
            "good",
            "bad",
            "--model",
            "random:tiny",
            "-q",
            "--out",
            "o",
        ],
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    let o = zsad(&[
        "eval",
        "--data",
        d.join("root").to_str().unwrap(),
        "--predictions",
        class.join("test/o").to_str().unwrap(),
        "-q",
        "--out",
        d.join("ev").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
}
