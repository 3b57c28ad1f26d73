//! End-to-end runs of `zsad detect`, `zsad merge` and `zsad import-checkpoint` on a tiny random
//! CLIP (`tests/fixtures/models/tiny-method`) with the real tokenizer from `../shared` (the tests
//! skip when it is absent).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use serde_json::Value;

fn tokenizer() -> Option<String> {
    Some(tokenizer_file())
}

/// The tokenizer path (../shared's, or the embedded vocabulary written to a file).
macro_rules! tokenizer_or_skip {
    () => {
        tokenizer_file()
    };
}

fn model() -> String {
    fixtures().join("models/tiny-method").display().to_string()
}

fn zsad(args: &[&str]) -> Output {
    run_zsad(args, "")
}

fn zsad_stdin(args: &[&str], stdin: &str) -> Output {
    run_zsad(args, stdin)
}

fn tmp(name: &str) -> PathBuf {
    fresh_dir("detect", name)
}

fn stderr(o: &Output) -> String {
    stderr_of(o)
}

fn detect_args<'a>(tok: &'a str, model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "detect",
        "--model",
        model,
        "--tokenizer",
        tok,
        "--out",
        out,
        "--quiet",
    ]
}

#[test]
fn every_preset_writes_valid_outputs() {
    let tok = tokenizer_or_skip!();
    let data = tmp("presets-data");
    write_png(&data.join("a/wide.png"), 40, 30, 1);
    std::fs::create_dir_all(data.join("b")).unwrap();
    image::GrayImage::from_fn(20, 20, |x, y| image::Luma([(x * 12 + y) as u8]))
        .save(data.join("b/grey.png"))
        .unwrap();
    let m = model();
    for preset in ["zero-shot", "adaclip", "anomalyclip", "headclip", "zsad"] {
        let out = tmp(&format!("presets-{preset}"));
        let o = out.display().to_string();
        let d = data.display().to_string();
        let mut args = detect_args(&tok, &m, &o);
        args.extend(["--preset", preset, &d]);
        let r = zsad(&args);
        assert!(r.status.success(), "{preset}: {}", stderr(&r));
        let recs = by_path(&records(&out));
        assert_eq!(recs.len(), 2, "{preset}");
        for (name, (w, h)) in [("a/wide.png", (40, 30)), ("b/grey.png", (20, 20))] {
            let rec = &recs[&format!("{d}/{name}")];
            let score = rec["score"].as_f64().unwrap();
            let global = rec["global_score"].as_f64().unwrap();
            let (mx, mean) = (
                rec["map_max"].as_f64().unwrap(),
                rec["map_mean"].as_f64().unwrap(),
            );
            assert!((0.0..=1.0).contains(&score), "{preset} {name}: {rec}");
            assert!(
                mean <= mx && (0.0..=1.0).contains(&mx),
                "{preset} {name}: {rec}"
            );
            assert_eq!(
                (rec["width"].as_u64(), rec["height"].as_u64()),
                (Some(w), Some(h))
            );
            let stem = name.trim_end_matches(".png");
            assert_eq!(rec["map"], format!("maps/{stem}.png"));
            assert_eq!(rec["heatmap"], format!("heatmaps/{stem}.png"));
            let map = image::open(out.join(rec["map"].as_str().unwrap())).unwrap();
            assert_eq!(map.color(), image::ColorType::L16);
            assert_eq!((map.width(), map.height()), (w as u32, h as u32));
            // The map file holds the same values the record summarises.
            let px = map.to_luma16().into_raw();
            let file_max = *px.iter().max().unwrap() as f64 / 65535.0;
            assert!(
                (file_max - mx).abs() < 1e-4,
                "{preset} {name}: {file_max} vs {mx}"
            );
            let heat = image::open(out.join(rec["heatmap"].as_str().unwrap())).unwrap();
            assert_eq!((heat.width(), heat.height()), (w as u32, h as u32));
            // Joint presets fuse the map's peak into the score (alpha 0.5); the others do not.
            match preset {
                "zero-shot" | "headclip" | "zsad" => {
                    assert!(
                        (score - (0.5 * global + 0.5 * mx)).abs() < 0.01,
                        "{preset}: {rec}"
                    )
                }
                _ => assert_eq!(score, global, "{preset}"),
            }
        }
    }
}

/// A folder with every kind of bad file: each is reported by name in the records, everything
/// else is scored, and the input folder is left as it was.
#[test]
fn bad_inputs_are_reported_and_the_rest_scored() {
    let tok = tokenizer_or_skip!();
    let data = tmp("bad-data");
    write_png(&data.join("good.png"), 30, 20, 2);
    let png = std::fs::read(data.join("good.png")).unwrap();
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("sub/corrupt.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(data.join("empty.png"), b"").unwrap();
    std::fs::write(data.join("notes.png"), b"this is not an image\n").unwrap();
    image::RgbImage::from_pixel(1, 1, image::Rgb([10, 200, 30]))
        .save(data.join("one.png"))
        .unwrap();
    image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(17, 9, |x, y| {
        image::Rgb([(x * 3000) as u16, (y * 7000) as u16, 65535])
    })
    .save(data.join("deep.png"))
    .unwrap();
    std::fs::copy(fixtures().join("images/cmyk.jpg"), data.join("cmyk.jpg")).unwrap();
    let before: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();

    let out = tmp("bad-out");
    let (o, d) = (out.display().to_string(), data.display().to_string());
    let missing = data.join("missing.png").display().to_string();
    let m = model();
    let mut args = detect_args(&tok, &m, &o);
    // Named on the command line, a path that does not exist is a typo: refused, nothing
    // written. Listed on stdin, it is that input's failed record.
    let mut typo = args.clone();
    typo.extend([d.as_str(), missing.as_str()]);
    let r = zsad(&typo);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(stderr(&r).contains("missing.png"), "{}", stderr(&r));
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none());
    args.extend([d.as_str(), "-"]);
    let r = zsad_stdin(&args, &format!("{missing}\n"));
    assert_eq!(
        r.status.code(),
        Some(1),
        "some inputs failed: {}",
        stderr(&r)
    );
    let recs = by_path(&records(&out));
    assert_eq!(recs.len(), 8, "{recs:?}");
    let err = |name: &str| -> String {
        let p = if name == "missing.png" {
            missing.clone()
        } else {
            format!("{d}/{name}")
        };
        recs[&p]["error"].as_str().unwrap_or("").to_string()
    };
    for ok in ["good.png", "one.png", "deep.png", "cmyk.jpg"] {
        assert_eq!(err(ok), "", "{ok}: {:?}", recs[&format!("{d}/{ok}")]);
        assert!(recs[&format!("{d}/{ok}")]["score"].is_number());
    }
    for (name, problem) in [
        ("sub/corrupt.png", "decode"),
        ("empty.png", "empty file"),
        ("notes.png", "not an image"),
        ("missing.png", "no such file"),
    ] {
        assert!(err(name).contains(problem), "{name}: {}", err(name));
    }
    for bad in ["sub/corrupt.png", "empty.png", "notes.png"] {
        assert!(recs[&format!("{d}/{bad}")].get("score").is_none());
    }
    // The 1x1 and the CMYK image give maps of their own size.
    assert_eq!(recs[&format!("{d}/one.png")]["width"], 1);
    assert_eq!(recs[&format!("{d}/cmyk.jpg")]["width"], 24);
    let after: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after, "the input folder was written to");
}

#[test]
fn resume_skips_what_is_done_and_retry_failed_rescores() {
    let tok = tokenizer_or_skip!();
    let data = tmp("resume-data");
    for i in 0..3 {
        write_png(&data.join(format!("{i}.png")), 24, 24, i);
    }
    std::fs::write(data.join("broken.png"), b"\x89PNG\r\n\x1a\n").unwrap();
    let out = tmp("resume-out");
    let (o, d) = (out.display().to_string(), data.display().to_string());
    let m = model();
    let run = |extra: &[&str]| {
        let mut a = detect_args(&tok, &m, &o);
        a.extend(extra);
        a.push(&d);
        zsad(&a)
    };
    assert_eq!(run(&[]).status.code(), Some(1));
    let first = std::fs::read_to_string(out.join("scores.jsonl")).unwrap();
    assert_eq!(first.lines().count(), 4);

    // Without --resume an existing run is not overwritten.
    let r = run(&[]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("--resume"), "{}", stderr(&r));
    assert_eq!(
        std::fs::read_to_string(out.join("scores.jsonl")).unwrap(),
        first
    );

    // Nothing new to do: the file is unchanged, the earlier failure still counts.
    assert_eq!(run(&["--resume"]).status.code(), Some(1));
    assert_eq!(
        std::fs::read_to_string(out.join("scores.jsonl")).unwrap(),
        first
    );

    // A new image and a line torn by a crash: only the new image is scored, the torn line is
    // dropped and its input scored again.
    write_png(&data.join("3.png"), 24, 24, 3);
    let torn_path = format!("{d}/2.png");
    let kept: String = first
        .lines()
        .filter(|l| !l.contains(&torn_path))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        out.join("scores.jsonl"),
        format!("{kept}{{\"path\":\"{torn_path}\",\"sco"),
    )
    .unwrap();
    assert_eq!(run(&["--resume"]).status.code(), Some(1));
    let recs = by_path(&records(&out));
    assert_eq!(recs.len(), 5);
    assert!(recs[&torn_path]["score"].is_number());

    // Repair the broken file and retry the failures.
    write_png(&data.join("broken.png"), 24, 24, 9);
    let r = run(&["--resume", "--retry-failed"]);
    assert_eq!(r.status.code(), Some(0), "{}", stderr(&r));
    let recs = records(&out);
    assert_eq!(recs.len(), 5);
    assert!(recs
        .iter()
        .all(|r| r.get("error").is_none() && r["score"].is_number()));
}

#[test]
fn shards_partition_the_inputs_and_merge_joins_them() {
    let tok = tokenizer_or_skip!();
    let data = tmp("shard-data");
    for i in 0..8 {
        write_png(&data.join(format!("c{}/{i}.png", i % 2)), 20 + i, 18, i);
    }
    let d = data.display().to_string();
    let m = model();
    let full = tmp("shard-full");
    let fo = full.display().to_string();
    let mut a = detect_args(&tok, &m, &fo);
    a.push(&d);
    assert!(zsad(&a).status.success());

    let mut shard_dirs = Vec::new();
    let mut seen = HashSet::new();
    for k in 0..3 {
        let out = tmp(&format!("shard-{k}"));
        let o = out.display().to_string();
        let spec = format!("{k}/3");
        let mut a = detect_args(&tok, &m, &o);
        a.extend(["--shard", spec.as_str(), "-"]);
        // Paths from stdin, as `find | zsad detect -` would give them.
        let list: String = (0..8)
            .map(|i| format!("{d}/c{}/{i}.png\n", i % 2))
            .collect();
        let r = zsad_stdin(&a, &list);
        assert!(r.status.success(), "{}", stderr(&r));
        for rec in records(&out) {
            assert!(
                seen.insert(rec["path"].as_str().unwrap().to_string()),
                "in two shards"
            );
        }
        shard_dirs.push(o);
    }
    assert_eq!(seen.len(), 8, "every input in exactly one shard");

    let merged = tmp("shard-merged");
    let mo = merged.display().to_string();
    let mut a = vec!["merge", "--out", mo.as_str()];
    a.extend(shard_dirs.iter().map(String::as_str));
    let r = zsad(&a);
    assert!(r.status.success(), "{}", stderr(&r));
    let got = by_path(&records(&merged));
    let want = by_path(&records(&full));
    assert_eq!(got.len(), 8);
    for (p, w) in &want {
        let g = &got[p];
        // Keys differ (stdin paths vs folder): compare what the model produced. Shards batch
        // different images together, which may change the last float bits.
        for key in ["score", "map_max"] {
            let (a, b) = (g[key].as_f64().unwrap(), w[key].as_f64().unwrap());
            assert!((a - b).abs() < 1e-6, "{p} {key}: {a} vs {b}");
        }
        assert!(merged.join(g["map"].as_str().unwrap()).exists());
        assert!(merged.join(g["heatmap"].as_str().unwrap()).exists());
    }
}

#[test]
fn csv_records_npy_maps_and_threshold() {
    let tok = tokenizer_or_skip!();
    let data = tmp("csv-data");
    write_png(&data.join("x.png"), 21, 13, 4);
    write_png(&data.join("y.png"), 16, 16, 5);
    let out = tmp("csv-out");
    let (o, d) = (out.display().to_string(), data.display().to_string());
    let m = model();
    let mut a = detect_args(&tok, &m, &o);
    a.extend([
        "--format",
        "csv",
        "--maps",
        "npy",
        "--heatmaps",
        "none",
        "--threshold",
        "0.5",
        &d,
    ]);
    let r = zsad(&a);
    assert!(r.status.success(), "{}", stderr(&r));
    let text = std::fs::read_to_string(out.join("scores.csv")).unwrap();
    let mut rd = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = rd.headers().unwrap().iter().map(String::from).collect();
    for k in [
        "path",
        "score",
        "map_max",
        "map_mean",
        "anomalous",
        "map",
        "heatmap",
        "error",
    ] {
        assert!(header.iter().any(|h| h == k), "{k} in {header:?}");
    }
    let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    for row in &rows {
        let score: f32 = row[col("score")].parse().unwrap();
        let anomalous: bool = row[col("anomalous")].parse().unwrap();
        assert_eq!(anomalous, score >= 0.5);
        assert_eq!(&row[col("heatmap")], "");
        let npy = std::fs::read(out.join(&row[col("map")])).unwrap();
        assert_eq!(&npy[..6], b"\x93NUMPY");
        let hlen = u16::from_le_bytes([npy[8], npy[9]]) as usize;
        let header = std::str::from_utf8(&npy[10..10 + hlen]).unwrap();
        let (w, h): (usize, usize) = (
            row[col("width")].parse().unwrap(),
            row[col("height")].parse().unwrap(),
        );
        assert!(header.contains(&format!("'shape': ({h}, {w})")), "{header}");
        assert_eq!(npy.len(), 10 + hlen + 4 * w * h);
        let vals: Vec<f32> = npy[10 + hlen..]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mx = vals.iter().copied().fold(f32::MIN, f32::max);
        assert_eq!(mx, row[col("map_max")].parse::<f32>().unwrap());
    }
    assert!(!out.join("heatmaps").exists());
}

#[test]
fn imported_checkpoints_run_and_bad_ones_are_named() {
    let tok = tokenizer_or_skip!();
    let dir = tmp("import");
    let m = model();
    let adapter = dir.join("anomalyclip.safetensors").display().to_string();
    let pth = fixtures()
        .join("anomalyclip_tiny.pth")
        .display()
        .to_string();
    let r = zsad(&[
        "import-checkpoint",
        "--format",
        "anomalyclip",
        &pth,
        "--model",
        &m,
        "--image-size",
        "64",
        "--layers",
        "2,4",
        "--vv-from",
        "2",
        "--out",
        &adapter,
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let data = tmp("import-data");
    write_png(&data.join("p.png"), 33, 27, 6);
    let out = dir.join("out").display().to_string();
    let d = data.display().to_string();
    let mut a = detect_args(&tok, &m, &out);
    a.extend(["--adapter", adapter.as_str(), &d]);
    let r = zsad(&a);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(records(Path::new(&out)).len(), 1);

    // An AdaCLIP file read as AnomalyCLIP: the error names the file and what is missing.
    let wrong = fixtures().join("adaclip_tiny.pth").display().to_string();
    let bad = dir.join("bad.safetensors").display().to_string();
    let r = zsad(&[
        "import-checkpoint",
        "--format",
        "anomalyclip",
        &wrong,
        "--model",
        &m,
        "--out",
        &bad,
    ]);
    assert_eq!(r.status.code(), Some(2));
    let e = stderr(&r);
    assert!(
        e.contains("adaclip_tiny.pth") && e.contains("prompt_learner"),
        "{e}"
    );
    assert!(!Path::new(&bad).exists());

    // A checkpoint for another backbone (its text tower is shallower and wider): refused, naming
    // the file and the mismatch.
    let r = zsad(&[
        "import-checkpoint",
        "--format",
        "adaclip",
        &wrong,
        "--model",
        "random:tiny",
        "--out",
        &bad,
    ]);
    assert_eq!(r.status.code(), Some(2));
    let e = stderr(&r);
    assert!(
        e.contains("adaclip_tiny.pth") && e.contains("text tower has 2 layers"),
        "{e}"
    );
}

#[test]
fn help_documents_outputs_and_exit_status() {
    let o = zsad(&["detect", "--help"]);
    let h = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "scores.jsonl",
        "maps/NAME.png",
        "Exit status: 0 every input scored; 1 some inputs failed",
        "--shard",
        "--resume",
        "random:ARCH",
    ] {
        assert!(h.contains(needle), "{needle} in {h}");
    }
}

#[test]
fn usage_and_model_errors_exit_2() {
    let out = tmp("usage");
    let o = out.display().to_string();
    let data = tmp("usage-data");
    write_png(&data.join("x.png"), 10, 10, 0);
    let d = data.display().to_string();
    // a --tokenizer that is not a tokenizer.json is named
    let bad_tok = data.join("tokenizer.json");
    std::fs::write(&bad_tok, "{not json").unwrap();
    let r = zsad(&[
        "detect",
        "--model",
        "random:tiny",
        "--tokenizer",
        bad_tok.to_str().unwrap(),
        "--out",
        &o,
        &d,
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(
        stderr(&r).contains(bad_tok.to_str().unwrap()),
        "{}",
        stderr(&r)
    );
    std::fs::remove_file(&bad_tok).unwrap();
    let r = zsad(&[
        "detect",
        "--model",
        "random:tiny",
        "--out",
        &o,
        "--shard",
        "3/3",
        &d,
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("0-based"), "{}", stderr(&r));
    let r = zsad(&[
        "detect",
        "--model",
        "random:tiny",
        "--out",
        &o,
        "--adapter",
        "/nonexistent.safetensors",
        &d,
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(
        stderr(&r).contains("/nonexistent.safetensors"),
        "{}",
        stderr(&r)
    );
}

/// Models without a tokenizer.json beside them (random weights, a folder of bare weights) run
/// on the CLIP vocabulary compiled into the binary, and score exactly as with ../shared's file.
#[test]
fn detect_without_a_tokenizer_uses_the_embedded_vocabulary() {
    let data = tmp("embedded-tok-data");
    write_png(&data.join("x.png"), 24, 20, 3);
    let d = data.display().to_string();
    // A folder holding only weights (no config.json, no tokenizer.json), as OpenAI/open_clip
    // checkpoints come.
    let bare = tmp("embedded-tok-model");
    std::fs::copy(
        fixtures().join("models/tiny-method/model.safetensors"),
        bare.join("model.safetensors"),
    )
    .unwrap();
    let bare = bare.display().to_string();
    for model in ["random:tiny", bare.as_str()] {
        let out = tmp("embedded-tok");
        let o = out.display().to_string();
        let r = zsad(&["detect", "--model", model, "--out", &o, "--quiet", &d]);
        assert!(r.status.success(), "{model}: {}", stderr(&r));
        let recs = records(&out);
        assert_eq!(recs.len(), 1, "{model}");
        let Some(tok) = tokenizer() else {
            skip(
                "detect_cli::detect_without_a_tokenizer_uses_the_embedded_vocabulary",
                "../shared/clip-tokenizer is absent",
            );
            continue;
        };
        let out2 = tmp("embedded-tok-file");
        let o2 = out2.display().to_string();
        let r = zsad(&[
            "detect",
            "--model",
            model,
            "--tokenizer",
            &tok,
            "--out",
            &o2,
            "--quiet",
            &d,
        ]);
        assert!(r.status.success(), "{model}: {}", stderr(&r));
        let with_file = records(&out2);
        for key in ["score", "global_score", "map_max", "map_mean"] {
            assert_eq!(recs[0][key], with_file[0][key], "{model} {key}");
        }
    }
}

/// The real sample images (900x900 MVTec bottles, MTD tiles of varied sizes with their masks
/// beside them): every file is scored and its map has the image's own size.
#[test]
fn real_images_get_maps_of_their_own_size() {
    let (Some(tok), Some(shared)) = (tokenizer(), shared()) else {
        skip(
            "detect_cli::real_images_get_maps_of_their_own_size",
            "../shared is absent",
        );
        return;
    };
    let bottle = shared.join("data/mvtec_ad/bottle/test/broken_large");
    let mtd = shared.join("data/mtd/MT_Blowhole/Imgs");
    if !bottle.exists() || !mtd.exists() {
        skip(
            "detect_cli::real_images_get_maps_of_their_own_size",
            "sample data is absent",
        );
        return;
    }
    let out = tmp("real");
    let o = out.display().to_string();
    let m = model();
    // A few files of each, through stdin.
    let mut list = String::new();
    for dir in [&bottle, &mtd] {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(4) {
            list.push_str(&format!("{}\n", f.display()));
        }
    }
    let mut a = detect_args(&tok, &m, &o);
    a.extend(["--heatmaps", "map", "-"]);
    let r = zsad_stdin(&a, &list);
    assert!(r.status.success(), "{}", stderr(&r));
    let recs = records(&out);
    assert_eq!(recs.len(), 8);
    for rec in &recs {
        let img = image::open(rec["path"].as_str().unwrap()).unwrap();
        let map = image::open(out.join(rec["map"].as_str().unwrap())).unwrap();
        assert_eq!(
            (map.width(), map.height()),
            (img.width(), img.height()),
            "{rec}"
        );
    }
}

#[test]
fn bench_reports_seconds_per_stage_as_json() {
    let tok = tokenizer_or_skip!();
    let data = tmp("bench-data");
    write_png(&data.join("a.png"), 50, 40, 1);
    write_png(&data.join("sub/b.png"), 30, 30, 2);
    let (m, d) = (model(), data.display().to_string());
    let r = zsad(&[
        "bench",
        "--model",
        &m,
        "--tokenizer",
        &tok,
        "--preset",
        "adaclip",
        "--images",
        &d,
        "--runs",
        "2",
        "--json",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let out = String::from_utf8(r.stdout).unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_eq!(v["images"], 4, "{v}");
    assert_eq!(v["preset"], "adaclip");
    assert!(v["gemm"].is_string(), "{v}");
    let per_image = v["seconds_per_image"].as_f64().unwrap();
    assert!(per_image > 0.0);
    assert!((v["images_per_second"].as_f64().unwrap() * per_image - 1.0).abs() < 1e-9);
    assert!(v["peak_rss_mb"].as_f64().unwrap() > 1.0, "{v}");
    let stages = v["stages"].as_object().unwrap();
    for k in [
        "decode",
        "resize",
        "backbone",
        "text",
        "maps",
        "smoothing",
        "png_encode",
        "write",
    ] {
        assert!(stages[k].as_f64().unwrap() >= 0.0, "{k}: {v}");
    }
    // The stages are disjoint parts of the per-image time, and the model did run.
    let sum: f64 = stages.values().map(|s| s.as_f64().unwrap()).sum();
    assert!(sum <= per_image * 1.01 + 1e-4, "{sum} > {per_image}");
    assert!(stages["backbone"].as_f64().unwrap() > 0.0);
    assert!(
        stages["text"].as_f64().unwrap() > 0.0,
        "adaclip encodes text per image: {v}"
    );

    let empty = tmp("bench-empty");
    let e = empty.display().to_string();
    let r = zsad(&["bench", "--model", &m, "--tokenizer", &tok, "--images", &e]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("no images"), "{}", stderr(&r));
}

/// `--precision bf16` gives maps close to f32 (bf16 operands, f32 accumulation) but not
/// identical; `--dtype bf16` on the CPU points to it.
#[test]
fn bf16_precision_is_close_to_f32() {
    let tok = tokenizer_or_skip!();
    let data = tmp("bf16-data");
    for i in 0..3 {
        write_png(&data.join(format!("{i}.png")), 48, 40, i);
    }
    let (m, d) = (model(), data.display().to_string());
    let mut maps = Vec::new();
    for precision in ["f32", "bf16"] {
        let out = tmp(&format!("bf16-{precision}"));
        let o = out.display().to_string();
        let mut args = detect_args(&tok, &m, &o);
        args.extend([
            "--preset",
            "adaclip",
            "--maps",
            "npy",
            "--precision",
            precision,
            &d,
        ]);
        let r = zsad(&args);
        assert!(r.status.success(), "{precision}: {}", stderr(&r));
        let recs = by_path(&records(&out));
        maps.push(
            recs.values()
                .map(|rec| {
                    let p = out.join(rec["map"].as_str().unwrap());
                    zsad::data::outputs::read_map_npy(&p).unwrap().0
                })
                .collect::<Vec<_>>(),
        );
    }
    let diff = maps[0]
        .iter()
        .flatten()
        .zip(maps[1].iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff > 0.0, "bf16 changed nothing: is it applied?");
    assert!(diff < 0.02, "bf16 maps differ from f32 by {diff}");

    let out = tmp("bf16-dtype");
    let o = out.display().to_string();
    let mut args = detect_args(&tok, &m, &o);
    args.extend(["--dtype", "bf16", &d]);
    let r = zsad(&args);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("--precision bf16"), "{}", stderr(&r));
}

/// Batches of several images score as one at a time does, with a failed input inside a batch.
#[test]
fn batches_score_like_single_images() {
    let tok = tokenizer_or_skip!();
    let data = tmp("batch-data");
    for i in 0..5 {
        write_png(&data.join(format!("{i}.png")), 40 + i, 30, i);
    }
    std::fs::write(data.join("2b-corrupt.png"), b"not a png").unwrap();
    let (m, d) = (model(), data.display().to_string());
    let mut runs = Vec::new();
    for bs in ["1", "3"] {
        let out = tmp(&format!("batch-{bs}"));
        let o = out.display().to_string();
        let mut args = detect_args(&tok, &m, &o);
        args.extend(["--preset", "anomalyclip", "--batch-size", bs, &d]);
        let r = zsad(&args);
        assert_eq!(r.status.code(), Some(1), "{bs}: {}", stderr(&r));
        runs.push(by_path(&records(&out)));
    }
    assert_eq!(runs[0].len(), 6);
    assert_eq!(
        runs[0].keys().collect::<Vec<_>>(),
        runs[1].keys().collect::<Vec<_>>()
    );
    for (path, one) in &runs[0] {
        let three = &runs[1][path];
        assert_eq!(
            one.get("error").is_some(),
            three.get("error").is_some(),
            "{path}"
        );
        for key in ["score", "global_score", "map_max", "map_mean"] {
            if let (Some(a), Some(b)) = (one[key].as_f64(), three[key].as_f64()) {
                assert!((a - b).abs() < 1e-5, "{path} {key}: {a} vs {b}");
            }
        }
    }
}
