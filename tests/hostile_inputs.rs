//! `zsad detect` against hostile folders and flags (issue: runs a quality engineer can trust):
//! every bad input is a record with its error, every other input is scored, nothing hangs,
//! nothing aborts, and nothing of two runs is ever mixed. The hostile files are made here.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn model() -> String {
    fixtures().join("models/tiny-method").display().to_string()
}

fn tmp(name: &str) -> PathBuf {
    fresh_dir("hostile", name)
}

fn image_bytes(format: image::ImageFormat, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 9) as u8, (y * 5) as u8, 77]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), format)
        .unwrap();
    out
}

fn zsad(args: &[&str]) -> Output {
    run_zsad_timed(args, "", Duration::from_secs(120))
}

fn detect(inputs: &[&str], out: &Path, extra: &[&str]) -> Output {
    let m = model();
    let o = out.display().to_string();
    let mut args = vec!["detect", "--model", &m, "--out", &o];
    args.extend_from_slice(extra);
    args.extend_from_slice(inputs);
    zsad(&args)
}

fn error_of<'a>(recs: &'a BTreeMap<String, Value>, suffix: &str) -> &'a str {
    let (_, r) = recs
        .iter()
        .find(|(p, _)| p.ends_with(suffix))
        .unwrap_or_else(|| panic!("no record for {suffix}: {:?}", recs.keys()));
    r["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{suffix} was not an error: {r}"))
}

/// CRC-32 (PNG's), for crafting chunk headers.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A 69-byte PNG: signature, an IHDR declaring `w x h` RGB, an empty IDAT, IEND.
fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[]);
    chunk(b"IEND", &[]);
    out
}

/// A BMP whose header declares `w x h` 24-bit pixels, with hardly any data.
fn bmp_bomb(w: i32, h: i32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(b"BM");
    b.extend(102u32.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(54u32.to_le_bytes());
    b.extend(40u32.to_le_bytes());
    b.extend(w.to_le_bytes());
    b.extend(h.to_le_bytes());
    b.extend(1u16.to_le_bytes());
    b.extend(24u16.to_le_bytes());
    b.extend([0u8; 24]);
    b.extend([0u8; 48]);
    b
}

/// A real JPEG whose frame header is patched to declare `w x h`.
fn jpeg_bomb(w: u16, h: u16) -> Vec<u8> {
    let mut j = image_bytes(image::ImageFormat::Jpeg, 16, 16);
    let sof = j
        .windows(2)
        .position(|x| x == [0xFF, 0xC0])
        .expect("baseline JPEG");
    j[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    j[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    j
}

#[test]
fn hostile_files_are_failed_records_and_the_rest_is_scored() {
    let d = tmp("files");
    let data = d.join("data");
    write_png(&data.join("good/a.png"), 40, 30, 1);
    write_png(&data.join("good/b.png"), 24, 24, 2);
    // A FIFO named like an image: reading it would block forever.
    mkfifo(&data.join("y.png"));
    // A link to an endless device, and links that make the walk a cycle.
    std::os::unix::fs::symlink("/dev/zero", data.join("zero.png")).unwrap();
    std::os::unix::fs::symlink("..", data.join("good/up")).unwrap();
    std::os::unix::fs::symlink(".", data.join("good/self")).unwrap();
    std::os::unix::fs::symlink(data.join("nowhere.png"), data.join("broken.png")).unwrap();
    // Decompression bombs declared in headers.
    std::fs::write(data.join("bomb.bmp"), bmp_bomb(60000, 60000)).unwrap();
    std::fs::write(data.join("pbomb.png"), png_bomb(50000, 50000)).unwrap();
    std::fs::write(data.join("bomb.jpg"), jpeg_bomb(65500, 65500)).unwrap();
    // Truncated files: Pillow refuses them ("image file is truncated").
    let jpg = image_bytes(image::ImageFormat::Jpeg, 64, 48);
    std::fs::write(data.join("cut.jpg"), &jpg[..jpg.len() / 2]).unwrap();
    let png = image_bytes(image::ImageFormat::Png, 64, 48);
    std::fs::write(data.join("pcut.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(data.join("empty.png"), b"").unwrap();
    let out = d.join("out");
    let o = detect(&[data.to_str().unwrap()], &out, &[]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let recs = records(&out);
    let by = by_path(&recs);
    // Each file once: the `..` and `.` links do not make the walk visit anything twice.
    assert_eq!(recs.len(), by.len(), "{:?}", by.keys());
    assert_eq!(recs.len(), 11, "{:?}", by.keys());
    for good in ["good/a.png", "good/b.png"] {
        let r = by.iter().find(|(p, _)| p.ends_with(good)).unwrap().1;
        assert!(r["score"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
    assert!(error_of(&by, "/y.png").contains("FIFO"));
    assert!(error_of(&by, "/zero.png").contains("character device"));
    assert!(error_of(&by, "/broken.png").contains("broken symbolic link"));
    for bomb in ["/bomb.bmp", "/pbomb.png", "/bomb.jpg"] {
        let e = error_of(&by, bomb);
        assert!(
            e.contains("--max-pixels") && e.contains("pixels"),
            "{bomb}: {e}"
        );
    }
    assert!(error_of(&by, "/cut.jpg").contains("truncated"));
    assert!(error_of(&by, "/pcut.png").contains("cannot decode"));
    assert!(error_of(&by, "/empty.png").contains("empty file"));
    assert!(err.contains("followed once"), "{err}");
    // The budget is a flag: a smaller one refuses the good images too, by name.
    let out2 = d.join("out2");
    let o = detect(
        &[data.join("good/a.png").to_str().unwrap()],
        &out2,
        &["--max-pixels", "1000"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(error_of(&by_path(&records(&out2)), "/a.png").contains("40x30 = 1200 pixels"));
}

#[test]
fn masks_are_not_inputs_unless_asked() {
    let d = tmp("masks");
    // MVTec: class/{train,test,ground_truth}
    let class = d.join("bottle");
    write_png(&class.join("train/good/000.png"), 20, 20, 1);
    write_png(&class.join("test/good/000.png"), 20, 20, 2);
    write_png(&class.join("test/broken/000.png"), 20, 20, 3);
    write_png(&class.join("ground_truth/broken/000_mask.png"), 20, 20, 4);
    // Magnetic Tile: X.jpg with its mask X.png beside it; and X_mask.png beside X.png.
    let mtd = d.join("mtd/MT_Crack/Imgs");
    std::fs::create_dir_all(&mtd).unwrap();
    std::fs::write(
        mtd.join("exp1.jpg"),
        image_bytes(image::ImageFormat::Jpeg, 20, 20),
    )
    .unwrap();
    write_png(&mtd.join("exp1.png"), 20, 20, 5);
    write_png(&mtd.join("p.png"), 20, 20, 6);
    write_png(&mtd.join("p_mask.png"), 20, 20, 7);
    let out = d.join("out");
    let o = detect(
        &[class.to_str().unwrap(), d.join("mtd").to_str().unwrap()],
        &out,
        &[],
    );
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let paths: HashSet<String> = by_path(&records(&out)).into_keys().collect();
    assert_eq!(paths.len(), 5, "{paths:?}");
    assert!(
        paths.iter().all(|p| !p.contains("ground_truth")
            && !p.ends_with("exp1.png")
            && !p.ends_with("p_mask.png")),
        "{paths:?}"
    );
    assert!(
        err.contains("3 mask file(s) left out") && err.contains("--include-masks"),
        "{err}"
    );
    let out = d.join("out-all");
    let o = detect(&[class.to_str().unwrap()], &out, &["--include-masks"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(records(&out).len(), 4);
    // A folder of masks only: nothing to score is bad usage, and says why.
    let o = detect(
        &[class.join("ground_truth").to_str().unwrap()],
        &d.join("o3"),
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr_of(&o).contains("no images to score") && stderr_of(&o).contains("--include-masks")
    );
}

#[test]
fn empty_inputs_are_bad_usage() {
    let d = tmp("empty");
    std::fs::create_dir_all(d.join("nothing")).unwrap();
    std::fs::write(d.join("nothing/readme.txt"), "x").unwrap();
    let o = detect(&[d.join("nothing").to_str().unwrap()], &d.join("out"), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr_of(&o).contains("no images to score"),
        "{}",
        stderr_of(&o)
    );
    let m = model();
    let out = d.join("out2").display().to_string();
    let o = run_zsad_timed(
        &["detect", "--model", &m, "--out", &out, "-"],
        "",
        Duration::from_secs(60),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr_of(&o).contains("no images to score"));
}

#[test]
fn names_stay_distinct_and_outputs_never_collide() {
    let d = tmp("names");
    let data = d.join("data");
    // Two names that a lossy conversion would make one, and `\` against `/`.
    let a = data.join(OsStr::from_bytes(b"a\xff.png"));
    let b = data.join(OsStr::from_bytes(b"a\xfe.png"));
    write_png(&a, 16, 16, 1);
    write_png(&b, 16, 16, 2);
    write_png(&data.join("back\\slash.png"), 16, 16, 3);
    write_png(&data.join("back/slash.png"), 16, 16, 4);
    write_png(&data.join("Case.png"), 16, 16, 5);
    write_png(&data.join("case.png"), 16, 16, 6);
    let out = d.join("out");
    let o = detect(&[data.to_str().unwrap()], &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let recs = records(&out);
    assert_eq!(recs.len(), 6);
    let paths: HashSet<&str> = recs.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths.len(), 6, "{paths:?}");
    assert!(paths.iter().any(|p| p.ends_with("a\\xFF.png")), "{paths:?}");
    let maps: HashSet<String> = recs
        .iter()
        .map(|r| r["map"].as_str().unwrap().to_lowercase())
        .collect();
    assert_eq!(maps.len(), 6, "{maps:?}");
    for r in &recs {
        assert!(out.join(r["map"].as_str().unwrap()).is_file(), "{r}");
    }
    // The same inner names in two shards' outputs: merge keeps every record's own map.
    let (s0, s1) = (d.join("s0"), d.join("s1"));
    write_png(&d.join("x/img.png"), 16, 16, 7);
    write_png(&d.join("y/img.jpg"), 16, 16, 8);
    assert_eq!(
        detect(&[d.join("x").to_str().unwrap()], &s0, &[])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        detect(&[d.join("y").to_str().unwrap()], &s1, &[])
            .status
            .code(),
        Some(0)
    );
    let merged = d.join("merged");
    let o = zsad(&[
        "merge",
        s0.to_str().unwrap(),
        s1.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let recs = records(&merged);
    assert_eq!(recs.len(), 2);
    let (m0, m1) = (
        recs[0]["map"].as_str().unwrap(),
        recs[1]["map"].as_str().unwrap(),
    );
    assert_ne!(m0, m1);
    for (r, src) in recs.iter().zip([&s0, &s1]) {
        let name = r["map"].as_str().unwrap();
        let orig = by_path(&records(src)).into_values().next().unwrap();
        assert_eq!(
            std::fs::read(merged.join(name)).unwrap(),
            std::fs::read(src.join(orig["map"].as_str().unwrap())).unwrap(),
            "{name}"
        );
    }
}

/// The tiny model with every weight of one tensor set to NaN.
fn nan_model(dir: &Path) -> PathBuf {
    let src = fixtures().join("models/tiny-method");
    let dst = dir.join("nan-model");
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
    let path = dst.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let key = tensors
        .keys()
        .find(|k| k.contains("post_layernorm.weight"))
        .cloned()
        .unwrap();
    let t = &tensors[&key];
    let nan = (t.ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert(key, nan);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    dst
}

#[test]
fn nan_weights_fail_every_input_instead_of_null_scores() {
    let d = tmp("nan");
    write_png(&d.join("data/a.png"), 20, 20, 1);
    write_png(&d.join("data/b.png"), 20, 20, 2);
    let m = nan_model(&d);
    let out = d.join("out");
    let o = zsad(&[
        "detect",
        "--model",
        m.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        d.join("data").to_str().unwrap(),
    ]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("0 scored") && err.contains("2 failed"),
        "{err}"
    );
    for r in records(&out) {
        assert!(r.get("score").is_none(), "{r}");
        assert!(r["error"].as_str().unwrap().contains("NaN"), "{r}");
    }
}

#[test]
fn resume_refuses_other_settings_and_overwrite_starts_clean() {
    let d = tmp("resume");
    write_png(&d.join("data/a.png"), 20, 20, 1);
    write_png(&d.join("data/b.png"), 20, 20, 2);
    let data = d.join("data").display().to_string();
    let out = d.join("out");
    assert_eq!(detect(&[&data], &out, &[]).status.code(), Some(0));
    let run: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    let files = run["settings"]["model"]["files"].as_array().unwrap();
    assert!(
        files
            .iter()
            .all(|f| f["sha256"].as_str().unwrap().len() == 64),
        "{run}"
    );
    assert_eq!(run["settings"]["detector"]["preset"], "zero-shot");
    assert_eq!(run["settings"]["records"], "scores.jsonl");
    // Same settings: nothing left to do.
    let o = detect(&[&data], &out, &["--resume"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("0 scored") && stderr_of(&o).contains("2 already done"));
    // Another preset, class word, threshold: refused, each difference named.
    let o = detect(
        &[&data],
        &out,
        &[
            "--resume",
            "--preset",
            "anomalyclip",
            "--class-name",
            "screw",
            "--threshold",
            "0.5",
        ],
    );
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for key in ["detector.preset", "detector.class_name", "threshold"] {
        assert!(err.contains(key), "{key}: {err}");
    }
    assert_eq!(records(&out).len(), 2, "nothing was added");
    // Another record format into the same folder: refused without --resume, named with it.
    let o = detect(&[&data], &out, &["--format", "csv"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr_of(&o).contains("--resume") && stderr_of(&o).contains("--overwrite"));
    let o = detect(&[&data], &out, &["--format", "csv", "--resume"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr_of(&o).contains("records"), "{}", stderr_of(&o));
    assert!(!out.join("scores.csv").exists());
    // A folder without run.json cannot be resumed: nothing says what made it.
    std::fs::remove_file(out.join("run.json")).unwrap();
    let o = detect(&[&data], &out, &["--resume"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr_of(&o).contains("run.json"), "{}", stderr_of(&o));
    // --overwrite removes the earlier run's records and files before starting.
    let old_maps: Vec<PathBuf> = records(&out)
        .iter()
        .map(|r| out.join(r["map"].as_str().unwrap()))
        .collect();
    let o = detect(
        &[&d.join("data/a.png").display().to_string()],
        &out,
        &["--overwrite", "--format", "csv"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(!out.join("scores.jsonl").exists());
    assert!(out.join("scores.csv").exists() && out.join("run.json").exists());
    assert!(
        old_maps.iter().all(|m| !m.exists()),
        "the earlier run's maps are gone"
    );
    let rdr = std::fs::read_to_string(out.join("scores.csv")).unwrap();
    assert_eq!(rdr.lines().count(), 2, "{rdr}");
}

#[test]
fn numeric_flags_are_range_checked() {
    let d = tmp("flags");
    write_png(&d.join("a.png"), 20, 20, 1);
    let img = d.join("a.png").display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--heatmap-alpha", "3"], "--heatmap-alpha"),
        (&["--heatmap-alpha", "nan"], "--heatmap-alpha"),
        (&["--threshold", "2"], "--threshold"),
        (&["--threshold", "nan"], "--threshold"),
        (&["--threshold", "-1"], "--threshold"),
        (&["--image-size", "33"], "--image-size"),
        (&["--batch-size", "1000000000"], "--batch-size"),
        (&["--max-pixels", "0"], "--max-pixels"),
        (&["--joint-alpha", "0.3", "--joint", "max"], "--joint-alpha"),
        (&["--joint-alpha", "-1"], "--joint-alpha"),
        (&["--retry-failed"], "--retry-failed"),
    ];
    for (flags, name) in cases {
        let o = detect(&[&img], &d.join("out"), flags);
        let err = stderr_of(&o);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(name), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
    }
    // The largest batch with one image: buffers sized by the inputs, not by the flag.
    let o = detect(&[&img], &d.join("out-b"), &["--batch-size", "256"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    // --joint-alpha with a mean joint score changes the score.
    let s = |extra: &[&str], name: &str| {
        let out = d.join(name);
        let mut f = vec!["--joint", "mean"];
        f.extend_from_slice(extra);
        assert_eq!(detect(&[&img], &out, &f).status.code(), Some(0));
        records(&out)[0]["score"].as_f64().unwrap()
    };
    assert_ne!(s(&[], "j1"), s(&["--joint-alpha", "0.9"], "j2"));
}

#[test]
fn plain_progress_lines_without_a_terminal() {
    let d = tmp("progress");
    for i in 0..4 {
        write_png(&d.join(format!("data/{i}.png")), 16, 16, i);
    }
    let o = detect(&[d.join("data").to_str().unwrap()], &d.join("out"), &[]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(0));
    assert!(err.contains("zsad: detect: image 4/4"), "{err}");
}

/// Seeded byte mutations of small valid images in every format read.
fn mutated(seed: u64, n: usize) -> Vec<(String, Vec<u8>)> {
    let formats = [
        (image::ImageFormat::Png, "png"),
        (image::ImageFormat::Jpeg, "jpg"),
        (image::ImageFormat::Bmp, "bmp"),
        (image::ImageFormat::Tiff, "tif"),
        (image::ImageFormat::WebP, "webp"),
    ];
    let seeds: Vec<(Vec<u8>, &str)> = formats
        .iter()
        .map(|(f, ext)| (image_bytes(*f, 24, 20), *ext))
        .collect();
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|i| {
            let (base, ext) = &seeds[i % seeds.len()];
            let mut b = base.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % 64.min(b.len() as u64)) as usize; // headers live up front
                match next() % 3 {
                    0 => b[at] = next() as u8,
                    1 => b[at] ^= 0x80,
                    _ => b.truncate(b.len() - (next() % (b.len() as u64 / 2)) as usize),
                }
            }
            (format!("f{i:05}.{ext}"), b)
        })
        .collect()
}

/// The acceptance run: 2,000 inputs with hostile files mixed in; every good image scored,
/// every bad one recorded; memory bounded; a kill -9 in the middle and --resume lose nothing.
#[test]
fn two_thousand_inputs_with_hostile_files_survive_kill_and_resume() {
    let d = tmp("two-thousand");
    let data = d.join("data");
    let mut expected_good = HashSet::new();
    let fuzzed = mutated(7, 300);
    for (name, bytes) in &fuzzed {
        std::fs::create_dir_all(data.join("fuzz")).unwrap();
        std::fs::write(data.join("fuzz").join(name), bytes).unwrap();
    }
    for i in 0..1690u32 {
        let p = data.join(format!("good/{:02}/{i:04}.png", i % 40));
        write_png(&p, 16 + i % 9, 16 + i % 7, i);
        expected_good.insert(p.display().to_string());
    }
    std::fs::create_dir_all(data.join("bad")).unwrap();
    mkfifo(&data.join("bad/fifo.png"));
    std::os::unix::fs::symlink("/dev/zero", data.join("bad/zero.png")).unwrap();
    std::os::unix::fs::symlink("..", data.join("bad/loop")).unwrap();
    std::fs::write(data.join("bad/bomb.bmp"), bmp_bomb(60000, 60000)).unwrap();
    std::fs::write(data.join("bad/pbomb.png"), png_bomb(50000, 50000)).unwrap();
    std::fs::write(data.join("bad/bomb.jpg"), jpeg_bomb(65500, 65500)).unwrap();
    for i in 0..4 {
        let jpg = image_bytes(image::ImageFormat::Jpeg, 32, 32);
        std::fs::write(data.join(format!("bad/cut{i}.jpg")), &jpg[..jpg.len() / 2]).unwrap();
    }
    // The side doors' kinds: a strip past 100:1, a link to itself, a name that needs hashing.
    image::RgbImage::new(5000, 2)
        .save(data.join("bad/strip.png"))
        .unwrap();
    std::os::unix::fs::symlink("self.png", data.join("bad/self.png")).unwrap();
    let long = data.join(format!("good/{}.png", "%".repeat(120)));
    write_png(&long, 20, 20, 7);
    expected_good.insert(long.display().to_string());
    let total = 300 + 1690 + 9 + 3;

    let out = d.join("out");
    let m = model();
    let args = |resume: bool| {
        let mut a = vec![
            "detect".to_string(),
            "--model".into(),
            m.clone(),
            "--out".into(),
            out.display().to_string(),
            "--heatmaps".into(),
            "none".into(),
            data.display().to_string(),
        ];
        if resume {
            a.push("--resume".into());
        }
        a
    };
    // First run, killed once a few hundred records are in.
    let mut child = Command::new(env!("CARGO_BIN_EXE_zsad"))
        .args(args(false))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let n = std::fs::read_to_string(out.join("scores.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 300 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill ({n} records)"
        );
        assert!(start.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Resume to the end, measuring the child's peak memory.
    let o = Command::new(env!("CARGO_BIN_EXE_zsad"))
        .args(args(true))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let peak_mb = usage.ru_maxrss as f64 / 1024.0;
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let recs = records(&out);
    let by = by_path(&recs);
    assert_eq!(recs.len(), by.len(), "one record per input");
    assert_eq!(recs.len(), total, "every input recorded");
    for g in &expected_good {
        let r = &by[g];
        assert!(r["score"].as_f64().is_some_and(f64::is_finite), "{g}: {r}");
        assert!(out.join(r["map"].as_str().unwrap()).is_file(), "{g}");
    }
    for bad in [
        "/fifo.png",
        "/zero.png",
        "/bomb.bmp",
        "/pbomb.png",
        "/bomb.jpg",
        "/cut0.jpg",
        "/strip.png",
        "/self.png",
    ] {
        error_of(&by, bad);
    }
    // Fuzzed files: each is a record, scored or failed, none lost.
    assert_eq!(by.keys().filter(|p| p.contains("/fuzz/")).count(), 300);
    eprintln!("peak RSS of the largest zsad child: {peak_mb:.0} MB");
    assert!(peak_mb < 1024.0, "peak RSS {peak_mb:.0} MB");
}
