//! `--reference` end to end with the tiny random CLIP: a few normal images make detection
//! better (on the synthetic textures, and on the real MVTec AD bottle when `../shared` is
//! there), a bank built, saved and loaded gives the maps of one built in the run, a bank made
//! with other features is refused, and bad flags and bad reference images are reported.

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
    fresh_dir("reference", name)
}

fn err(o: &Output) -> String {
    stderr_of(o)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Mean pixel and image AUROC of `zsad eval --data data --model random:tiny extra...`.
fn eval(data: &Path, out: &Path, extra: &[&str]) -> (f64, f64) {
    let mut args = vec!["eval", "--data", s(data), "--model", "random:tiny", "-q"];
    args.extend(["--out", s(out)]);
    args.extend(extra);
    let o = zsad(&args);
    assert!(o.status.success(), "{args:?}: {}", err(&o));
    let m = json(&out.join("metrics.json"));
    (
        100.0 * m["mean"]["pixel_auroc"].as_f64().unwrap(),
        100.0 * m["mean"]["image_auroc"].as_f64().unwrap_or(f64::NAN),
    )
}

/// Normal texture images of class 3 for references: the even-numbered ones of another draw
/// (odd ones have pasted defects).
fn texture_references(dir: &Path, n: usize) -> Vec<String> {
    make_class(dir, 3, 2 * n, 9);
    (0..n)
        .map(|i| {
            dir.join(format!("class3/{:03}.png", 2 * i))
                .display()
                .to_string()
        })
        .collect()
}

/// The test that can fail: 4 normal references against none, same model and data. Measured
/// (Intel Xeon, 2 cores; the numbers do not depend on the machine beyond float rounding):
/// pixel AUROC 19.1 -> 51.6 fused at the default weight, 97.3 with the reference map alone.
#[test]
fn four_normal_references_raise_pixel_auroc_on_textures() {
    let dir = tmp("textures");
    let data = dir.join("test");
    make_class(&data, 3, 24, 2);
    let refs = texture_references(&dir.join("refs"), 4);
    let mut with = vec!["--reference"];
    with.extend(refs.iter().map(String::as_str));
    let (none, _) = eval(&data.join("class3"), &dir.join("none"), &[]);
    let (fused, _) = eval(&data.join("class3"), &dir.join("fused"), &with);
    with.push("--reference-only");
    let (only, _) = eval(&data.join("class3"), &dir.join("only"), &with);
    eprintln!("pixel AUROC: none {none:.1}, fused {fused:.1}, reference only {only:.1}");
    assert!(fused >= none + 15.0, "fused {fused} vs none {none}");
    assert!(only >= none + 50.0, "only {only} vs none {none}");
    // The run's record of settings says which references were used.
    let run = json(&dir.join("fused/run.json"));
    let r = &run["settings"]["reference"];
    assert_eq!(r["sources"].as_array().unwrap().len(), 4, "{r}");
    assert_eq!(r["sources"][0]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(r["weight"], 0.5);
    assert_eq!(r["only"], false);
    assert_eq!(r["patches_kept"], 4 * 16);
}

/// The same on the real bottle images: 4 of its normal training images. Measured: pixel AUROC
/// 27.4 -> 29.6 fused at the default weight (the random backbone's text map is noise), 83.9
/// with the reference map alone; image AUROC 49.8 -> 88.7 with the reference map alone.
#[test]
fn four_normal_references_raise_auroc_on_mvtec_bottle() {
    let Some(shared) = shared() else {
        skip(
            "reference_cli::four_normal_references_raise_auroc_on_mvtec_bottle",
            "../shared is absent",
        );
        return;
    };
    let bottle = shared.join("data/mvtec_ad/bottle");
    if !bottle.exists() {
        skip(
            "reference_cli::four_normal_references_raise_auroc_on_mvtec_bottle",
            &format!("{} is absent", bottle.display()),
        );
        return;
    }
    let dir = tmp("bottle");
    let refs: Vec<String> = (0..4)
        .map(|i| {
            bottle
                .join(format!("train/good/{i:03}.png"))
                .display()
                .to_string()
        })
        .collect();
    let mut with = vec!["--reference"];
    with.extend(refs.iter().map(String::as_str));
    let (none, none_image) = eval(&bottle, &dir.join("none"), &[]);
    let (fused, _) = eval(&bottle, &dir.join("fused"), &with);
    with.push("--reference-only");
    let (only, only_image) = eval(&bottle, &dir.join("only"), &with);
    eprintln!("bottle pixel AUROC: none {none:.1}, fused {fused:.1}, only {only:.1}; image AUROC none {none_image:.1}, only {only_image:.1}");
    assert!(fused >= none + 1.0, "fused {fused} vs none {none}");
    assert!(only >= none + 30.0, "only {only} vs none {none}");
    assert!(
        only_image >= none_image + 20.0,
        "{only_image} vs {none_image}"
    );
}

fn detect(inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["detect", s(inputs), "--model", "random:tiny", "-q"];
    args.extend(["--out", s(out), "--maps", "npy", "--heatmaps", "none"]);
    args.extend(extra);
    zsad(&args)
}

/// Every file under `dir` (relative path -> bytes), `run.json` and the lock left out.
fn outputs(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !["run.json", ".zsad.lock"]
                .contains(&p.file_name().unwrap().to_str().unwrap())
            {
                files.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    files
}

/// A bank built in the run and the same bank saved by `zsad reference build` and loaded give
/// bit-equal maps and records, for presets that read different features (projected tokens,
/// V-V tokens, the adapter's linear projections), with and without a coreset.
#[test]
fn saved_bank_gives_bit_equal_maps() {
    let dir = tmp("bank");
    make_class(&dir.join("test"), 1, 6, 3);
    let refs = texture_references(&dir.join("refs"), 3);
    for (preset, cut) in [
        ("zero-shot", None),
        ("anomalyclip", None),
        ("adaclip", Some("20")),
    ] {
        let bank = dir.join(format!("{preset}.safetensors"));
        let mut build = vec!["reference", "build"];
        build.extend(refs.iter().map(String::as_str));
        build.extend(["--model", "random:tiny", "--preset", preset, "-q"]);
        build.extend(["--out", s(&bank)]);
        let mut in_run = vec!["--preset", preset, "--reference"];
        in_run.extend(refs.iter().map(String::as_str));
        if let Some(n) = cut {
            build.extend(["--reference-max-patches", n]);
            in_run.extend(["--reference-max-patches", n]);
        }
        let o = zsad(&build);
        assert!(o.status.success(), "{preset}: {}", err(&o));
        let a = dir.join(format!("{preset}-in-run"));
        let b = dir.join(format!("{preset}-from-file"));
        let o = detect(&dir.join("test"), &a, &in_run);
        assert!(o.status.success(), "{preset}: {}", err(&o));
        let o = detect(
            &dir.join("test"),
            &b,
            &["--preset", preset, "--reference", s(&bank)],
        );
        assert!(o.status.success(), "{preset}: {}", err(&o));
        let (fa, fb) = (outputs(&a), outputs(&b));
        assert_eq!(fa.len(), 1 + 6, "{preset}: {:?}", fa.keys()); // records + 6 maps
        assert!(fa == fb, "{preset}: the maps or records differ");
        let ra = json(&a.join("run.json"))["settings"]["reference"].clone();
        let rb = json(&b.join("run.json"))["settings"]["reference"].clone();
        assert_eq!(ra["sources"], rb["sources"], "{preset}");
        assert_eq!(rb["bank_file"]["sha256"].as_str().unwrap().len(), 64);
        match cut {
            Some(n) => {
                assert_eq!(ra["patches_total"], 3 * 16, "{preset}");
                assert_eq!(ra["patches_kept"].to_string(), n, "{preset}");
                assert_eq!(ra["max_patches"].to_string(), n, "{preset}");
            }
            None => assert_eq!(ra["patches_kept"], 3 * 16, "{preset}"),
        }
        // References change the result: the maps are not those of a run without them.
        let c = dir.join(format!("{preset}-without"));
        let o = detect(&dir.join("test"), &c, &["--preset", preset]);
        assert!(o.status.success(), "{preset}: {}", err(&o));
        assert!(outputs(&c) != fa, "{preset}: references made no difference");
    }
}

/// A bank made with other features than the run's is refused, naming what differs.
#[test]
fn mismatched_bank_is_refused() {
    let dir = tmp("mismatch");
    make_class(&dir.join("test"), 1, 2, 3);
    let refs = texture_references(&dir.join("refs"), 2);
    let bank = dir.join("bank.safetensors");
    let mut build = vec!["reference", "build"];
    build.extend(refs.iter().map(String::as_str));
    build.extend(["--model", "random:tiny", "-q", "--out", s(&bank)]);
    let o = zsad(&build);
    assert!(o.status.success(), "{}", err(&o));
    for (extra, names) in [
        (vec!["--preset", "anomalyclip"], "image_pass.preset"),
        (vec!["--image-size", "64"], "image_pass.image_size"),
    ] {
        let mut args = extra.clone();
        args.extend(["--reference", s(&bank)]);
        let o = detect(&dir.join("test"), &dir.join("out"), &args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", err(&o));
        let e = err(&o);
        assert!(
            e.contains(names) && e.contains("zsad reference build"),
            "{extra:?}: {e}"
        );
    }
    // Another backbone (the random model's seed).
    let o = zsad(&[
        "detect",
        s(&dir.join("test")),
        "--model",
        "random:tiny:1",
        "-q",
        "--out",
        s(&dir.join("out2")),
        "--reference",
        s(&bank),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("model.seed"), "{}", err(&o));
    // A FIFO named like a bank is an error, not a hang; so is one given as the adapter.
    let fifo = dir.join("fifo.safetensors");
    mkfifo(&fifo);
    for flag in ["--reference", "--adapter"] {
        let o = run_zsad_timed(
            &[
                "detect",
                s(&dir.join("test")),
                "--model",
                "random:tiny",
                "-q",
                "--out",
                s(&dir.join("out4")),
                flag,
                s(&fifo),
            ],
            "",
            std::time::Duration::from_secs(60),
        );
        assert_eq!(o.status.code(), Some(2), "{flag}: {}", err(&o));
        assert!(err(&o).contains("FIFO"), "{flag}: {}", err(&o));
    }
    // Not a bank at all.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let o = detect(
        &dir.join("test"),
        &dir.join("out3"),
        &["--reference", s(&junk)],
    );
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("junk.safetensors"), "{}", err(&o));
}

#[test]
fn bad_reference_flags_exit_2_with_a_message() {
    let dir = tmp("flags");
    make_class(&dir.join("test"), 1, 2, 3);
    let refs = texture_references(&dir.join("refs"), 2);
    let r = refs[0].as_str();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--reference", r, "--reference-weight", "nan"],
            "--reference-weight",
        ),
        (
            vec!["--reference", r, "--reference-weight", "-0.1"],
            "--reference-weight",
        ),
        (
            vec!["--reference", r, "--reference-weight", "1.5"],
            "--reference-weight",
        ),
        (
            vec!["--reference", r, "--reference-max-patches", "0"],
            "--reference-max-patches",
        ),
        (
            vec!["--reference-only"],
            "--reference-only needs --reference",
        ),
        (vec!["--reference-weight", "0.3"], "add --reference"),
        (
            vec![
                "--reference",
                r,
                "--reference-only",
                "--reference-weight",
                "0.3",
            ],
            "drop --reference-weight",
        ),
        (
            vec!["--reference", "bank.safetensors", r],
            "a bank file is used alone",
        ),
        (vec!["--reference", "-"], "stdin"),
        (
            vec![
                "--reference",
                "bank.safetensors",
                "--reference-max-patches",
                "5",
            ],
            "applies when a bank is built",
        ),
    ];
    for (extra, want) in cases {
        let o = detect(&dir.join("test"), &dir.join("out"), &extra);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", err(&o));
        assert!(err(&o).contains(want), "{extra:?}: {}", err(&o));
    }
    // A folder without images, and a missing path: no usable reference.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for bad in [empty.clone(), dir.join("missing")] {
        let o = detect(
            &dir.join("test"),
            &dir.join("out"),
            &["--reference", s(&bad)],
        );
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", err(&o));
        assert!(err(&o).contains("no usable reference image"), "{}", err(&o));
    }
    // `reference build` checks its output name.
    let o = zsad(&[
        "reference",
        "build",
        r,
        "--model",
        "random:tiny",
        "--out",
        s(&dir.join("bank.txt")),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains(".safetensors"), "{}", err(&o));
}

/// A truncated file among the references is named and left out; the others make the bank.
#[test]
fn unusable_reference_images_are_reported_and_left_out() {
    let dir = tmp("bad-refs");
    make_class(&dir.join("test"), 1, 2, 3);
    let mut refs = texture_references(&dir.join("refs"), 2);
    let broken = dir.join("refs/broken.png");
    let bytes = std::fs::read(&refs[0]).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() / 3]).unwrap();
    refs.push(broken.display().to_string());
    let (test, out) = (dir.join("test"), dir.join("out"));
    let mut args = vec!["detect", s(&test), "--model", "random:tiny"];
    args.extend(["--out", s(&out), "--reference"]);
    args.extend(refs.iter().map(String::as_str));
    let o = zsad(&args);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let e = err(&o);
    assert!(
        e.contains("broken.png") && e.contains("left out of the bank"),
        "{e}"
    );
    assert!(e.contains("reference bank: 2 image(s)"), "{e}");
    let r = &json(&dir.join("out/run.json"))["settings"]["reference"];
    assert_eq!(r["sources"].as_array().unwrap().len(), 2, "{r}");
    assert!(
        r["failed"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("broken.png"),
        "{r}"
    );
    // `reference build` writes the bank and exits 1: some inputs could not be used.
    let bank = dir.join("bank.safetensors");
    let mut build = vec!["reference", "build"];
    build.extend(refs.iter().map(String::as_str));
    build.extend(["--model", "random:tiny", "--out", s(&bank)]);
    let o = zsad(&build);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(bank.exists());
}
