//! Heatmap options end to end (tiny random CLIP): `--heatmap-scale image|run` colour each pixel
//! as the map's value on that scale, `run` draws after the last record (again on `--resume`,
//! and on the union of the shards' ranges in `zsad merge`), `--colorbar` widens the heatmap and
//! leaves the image part as it was; impossible combinations are refused with the flag named.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{fresh_dir, records, run_zsad, stderr_of};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn zsad(args: &[&str]) -> Output {
    run_zsad(args, "")
}

fn ok(args: &[&str]) -> Output {
    let o = zsad(args);
    assert!(o.status.success(), "zsad {args:?}: {}", stderr_of(&o));
    o
}

/// Six 64x64 texture images (three with defects).
fn images(dir: &Path) -> PathBuf {
    common::textures::make_class(&dir.join("data"), 2, 6, 5);
    let d = dir.join("data/class2");
    // Masks beside the images are left out of detect's walk.
    d
}

fn detect(inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    common::detect_tiny(inputs, out, extra)
}

fn inferno(t: f32) -> [u8; 3] {
    let c = colorous::INFERNO.eval_continuous((t.clamp(0.0, 1.0) * 255.0).round() as f64 / 255.0);
    [c.r, c.g, c.b]
}

fn npy(path: &Path) -> (Vec<f32>, u32, u32) {
    zsad::data::outputs::read_map_npy(path).unwrap()
}

/// The `.npy` maps of `recs` in `out`, with the lowest and highest value over all of them.
fn maps_and_range(out: &Path, recs: &[serde_json::Value]) -> (Vec<Vec<f32>>, f32, f32) {
    let maps: Vec<Vec<f32>> = recs
        .iter()
        .map(|r| npy(&out.join(r["map"].as_str().unwrap())).0)
        .collect();
    let lo = maps.iter().flatten().copied().fold(f32::INFINITY, f32::min);
    let hi = maps
        .iter()
        .flatten()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    (maps, lo, hi)
}

/// Every pixel of `heatmap` is inferno at the map value's position on `[lo, hi]`.
fn assert_coloured(heatmap: &Path, map: &[f32], lo: f32, hi: f32) {
    let img = image::open(heatmap).unwrap().to_rgb8();
    for (i, p) in img.pixels().enumerate() {
        let want = inferno(if hi > lo {
            (map[i] - lo) / (hi - lo)
        } else {
            0.0
        });
        assert_eq!(
            p.0,
            want,
            "{} pixel {i}: value {}",
            heatmap.display(),
            map[i]
        );
    }
}

#[test]
fn image_scale_spans_each_maps_own_range() {
    let dir = fresh_dir("heat", "image");
    let data = images(&dir);
    let out = dir.join("out");
    let o = detect(
        &data,
        &out,
        &[
            "--maps",
            "npy",
            "--heatmaps",
            "map",
            "--heatmap-scale",
            "image",
        ],
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    let recs = records(&out);
    assert_eq!(recs.len(), 6);
    for r in &recs {
        let (map, _, _) = npy(&out.join(r["map"].as_str().unwrap()));
        let lo = map.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(r["map_min"].as_f64().unwrap() as f32, lo);
        assert_eq!(r["map_max"].as_f64().unwrap() as f32, hi);
        assert!(hi > lo);
        assert_coloured(&out.join(r["heatmap"].as_str().unwrap()), &map, lo, hi);
    }
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["settings"]["heatmap_scale"], "image");
}

#[test]
fn run_scale_spans_the_whole_run_and_is_drawn_again_on_resume() {
    let dir = fresh_dir("heat", "run");
    let data = images(&dir);
    let out = dir.join("out");
    let args = [
        "--maps",
        "npy",
        "--heatmaps",
        "map",
        "--heatmap-scale",
        "run",
    ];
    let o = detect(&data, &out, &args);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let recs = records(&out);
    let (maps, lo, hi) = maps_and_range(&out, &recs);
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        run["info"]["heatmap_range"],
        serde_json::json!([lo, hi]),
        "run.json records the range drawn"
    );
    for (r, map) in recs.iter().zip(&maps) {
        assert_coloured(&out.join(r["heatmap"].as_str().unwrap()), map, lo, hi);
    }
    // A run stopped before its heatmaps were drawn: --resume draws them (nothing to score).
    let h0 = out.join(recs[0]["heatmap"].as_str().unwrap());
    std::fs::remove_file(&h0).unwrap();
    let o = detect(&data, &out, &[&args[..], &["--resume"]].concat());
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_coloured(&h0, &maps[0], lo, hi);
    // Overlays on the run's scale, from the images read again, outline the masks.
    let o = detect(
        &data,
        &out,
        &[
            "--heatmap-scale",
            "run",
            "--overwrite",
            "--pixel-threshold",
            "0.5",
        ],
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    for r in records(&out) {
        let h = image::open(out.join(r["heatmap"].as_str().unwrap())).unwrap();
        assert_eq!(h.width(), 64);
    }
}

#[test]
fn merge_draws_run_scale_heatmaps_on_all_shards_range_and_copies_masks() {
    let dir = fresh_dir("heat", "merge");
    let data = images(&dir);
    let mut shards = Vec::new();
    for k in 0..2 {
        let out = dir.join(format!("shard{k}"));
        let o = detect(
            &data,
            &out,
            &[
                "--maps",
                "npy",
                "--heatmaps",
                "map",
                "--heatmap-scale",
                "run",
                "--pixel-threshold",
                "0.5",
                "--shard",
                &format!("{k}/2"),
            ],
        );
        assert!(o.status.success(), "{}", stderr_of(&o));
        shards.push(out);
    }
    let merged = dir.join("merged");
    ok(&["merge", s(&shards[0]), s(&shards[1]), "--out", s(&merged)]);
    let recs = records(&merged);
    assert_eq!(recs.len(), 6);
    let (maps, lo, hi) = maps_and_range(&merged, &recs);
    for (r, map) in recs.iter().zip(&maps) {
        assert_coloured(&merged.join(r["heatmap"].as_str().unwrap()), map, lo, hi);
        assert!(
            merged.join(r["mask"].as_str().unwrap()).is_file(),
            "mask copied"
        );
    }
}

#[test]
fn colorbar_widens_the_heatmap_and_keeps_the_image_part() {
    let dir = fresh_dir("heat", "bar");
    let data = images(&dir);
    let (plain, bar) = (dir.join("plain"), dir.join("bar"));
    assert!(detect(&data, &plain, &["--heatmaps", "map"])
        .status
        .success());
    let o = detect(&data, &bar, &["--heatmaps", "map", "--colorbar"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    for r in records(&plain) {
        let rel = r["heatmap"].as_str().unwrap();
        let a = image::open(plain.join(rel)).unwrap().to_rgb8();
        let b = image::open(bar.join(rel)).unwrap().to_rgb8();
        assert_eq!(b.height(), a.height());
        assert!(b.width() > a.width());
        for (x, y, p) in a.enumerate_pixels() {
            assert_eq!(b.get_pixel(x, y), p);
        }
    }
}

#[test]
fn impossible_combinations_are_refused_naming_the_flag() {
    let dir = fresh_dir("heat", "bad");
    let data = images(&dir);
    for (extra, says) in [
        (
            &["--heatmap-scale", "run", "--maps", "none"][..],
            "--heatmap-scale run",
        ),
        (&["--colorbar", "--heatmaps", "none"][..], "--colorbar"),
        (
            &["--heatmap-scale", "image", "--heatmaps", "none"][..],
            "--heatmap-scale image",
        ),
        (&["--heatmap-scale", "sideways"][..], "sideways"),
    ] {
        let o = detect(&data, &dir.join("out"), extra);
        assert_eq!(o.status.code(), Some(2), "{extra:?}");
        assert!(stderr_of(&o).contains(says), "{extra:?}: {}", stderr_of(&o));
    }
    let o = zsad(&[
        "bench",
        "--model",
        "random:tiny",
        "--images",
        s(&data),
        "--heatmap-scale",
        "run",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr_of(&o).contains("--heatmap-scale run"),
        "{}",
        stderr_of(&o)
    );
    let o = zsad(&[
        "bench",
        "--model",
        "random:tiny",
        "--images",
        s(&data),
        "--batch-size",
        "300",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr_of(&o).contains("--batch-size 300: at most 256"),
        "{}",
        stderr_of(&o)
    );
}
