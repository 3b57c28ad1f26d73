//! `--heatmap-scale run`: every heatmap of a run on one scale, from the run's lowest to its
//! highest map value. That range is known only once every input is scored, so the heatmaps are
//! drawn in a second pass over the written maps (and, for overlays, the images read again),
//! after the last record. A run stopped before then draws them when resumed; `zsad merge`
//! draws a merged folder's on the range of all its shards.

use std::path::{Path, PathBuf};

use image::RgbImage;
use rayon::prelude::*;

use super::render::{self, OutputOptions};
use crate::choice::Choice;
use crate::data::heatmap::{HeatmapKind, HeatmapScale, ValueRange};
use crate::data::image::DecodeLimits;
use crate::data::outputs;
use crate::data::records::Record;
use crate::fsio::OutDir;
use crate::progress::{Console, Lines};
use crate::{Error, Result};

/// What the second pass did.
#[derive(Debug, Clone, Default)]
pub struct RunHeatmaps {
    /// The range every heatmap was drawn on (`None`: no scored input has a heatmap).
    pub range: Option<ValueRange>,
    pub drawn: usize,
    /// `(record path, why)` for the heatmaps that could not be drawn.
    pub failed: Vec<(String, String)>,
}

/// A record's file path inside `out`, or why not (records are data: a hand-edited
/// `../../x` must never be read or written).
fn inside(out: &OutDir, rel: &str) -> std::result::Result<PathBuf, String> {
    out.path(rel)
        .ok_or_else(|| format!("{rel}: not a path inside the output folder"))
}

/// The map values' range over the records that have a heatmap, from their `map_min` and
/// `map_max` (a record without them has its map read).
fn run_range(out: &OutDir, records: &[&Record]) -> Option<ValueRange> {
    records
        .iter()
        .filter_map(|r| match (r.map_min, r.map_max) {
            (Some(lo), Some(hi)) => ValueRange::of([lo, hi]),
            _ => {
                let p = inside(out, r.map.as_deref()?).ok()?;
                let (map, _, _) = outputs::read_map(&p).ok()?;
                ValueRange::of_slice(&map)
            }
        })
        .reduce(ValueRange::union)
}

/// Draws the heatmap of one record on `range`.
fn draw_one(
    out: &OutDir,
    r: &Record,
    opts: &OutputOptions,
    inputs_from: &Path,
    limits: &DecodeLimits,
    range: ValueRange,
) -> std::result::Result<(), String> {
    let heat = r.heatmap.as_deref().ok_or("no heatmap")?;
    let map_rel = r
        .map
        .as_deref()
        .ok_or("no map file to colour (the run wrote none)")?;
    let map_path = inside(out, map_rel)?;
    let (map, w, h) = outputs::read_map(&map_path).map_err(|e| e.to_string())?;
    let image: Option<RgbImage> = if opts.heatmaps == HeatmapKind::Overlay {
        let p = inputs_from.join(&r.path);
        let rgb = crate::data::image::decode_rgb(&p, limits)
            .map_err(|e| format!("cannot read the image again for its overlay: {e}"))?;
        if rgb.dimensions() != (w, h) {
            return Err(format!(
                "the image is now {}x{} but its map {map_rel} is {w}x{h} (the file changed since it was scored)",
                rgb.width(),
                rgb.height()
            ));
        }
        Some(rgb)
    } else {
        None
    };
    let mask = match r.mask.as_deref() {
        None => None,
        Some(rel) => {
            let p = inside(out, rel)?;
            let m = crate::data::image::decode_limited(&p, limits)
                .map_err(|e| e.to_string())?
                .to_luma8();
            if m.dimensions() != (w, h) {
                return Err(format!(
                    "{rel} is {}x{} but the map is {w}x{h}",
                    m.width(),
                    m.height()
                ));
            }
            Some(m.into_raw().into_iter().map(|v| v > 0).collect::<Vec<_>>())
        }
    };
    let img = render::draw_heatmap(opts, &map, (w, h), image.as_ref(), mask.as_deref(), range);
    let bytes = outputs::png_bytes_rgb(&img).map_err(|e| e.to_string())?;
    inside(out, heat)?;
    out.write(heat, &bytes).map_err(|e| e.to_string())
}

/// The heatmap options of a run whose `run.json` settings ask for the run scale (`None` for
/// every other scale, or no heatmaps), for drawing its heatmaps again (`zsad merge`).
pub fn options_from_settings(settings: &serde_json::Value) -> Option<OutputOptions> {
    let name = |k: &str| settings.get(k).and_then(serde_json::Value::as_str);
    if name("heatmap_scale")? != HeatmapScale::Run.name() {
        return None;
    }
    let heatmaps = HeatmapKind::from_name(name("heatmaps")?)?;
    if heatmaps == HeatmapKind::None {
        return None;
    }
    Some(OutputOptions {
        heatmaps,
        heatmap_alpha: settings.get("heatmap_alpha")?.as_f64()? as f32,
        heatmap_scale: HeatmapScale::Run,
        colorbar: settings
            .get("colorbar")
            .and_then(serde_json::Value::as_bool)
            == Some(true),
        ..Default::default()
    })
}

/// Draws the heatmap of every scored record in `records` on the run's range. Relative input
/// paths are read from `inputs_from` (the folder the run was started in). A heatmap that cannot
/// be drawn is named in the result and the others are drawn; an error is returned only when
/// nothing can be done at all.
pub fn draw(
    out: &OutDir,
    records: &[Record],
    opts: &OutputOptions,
    inputs_from: &Path,
    limits: &DecodeLimits,
    console: &Console,
) -> Result<RunHeatmaps> {
    if opts.heatmaps == HeatmapKind::None {
        return Ok(RunHeatmaps::default());
    }
    let todo: Vec<&Record> = records
        .iter()
        .filter(|r| !r.is_failure() && r.heatmap.is_some())
        .collect();
    let Some(range) = run_range(out, &todo) else {
        return Ok(RunHeatmaps::default());
    };
    let mut done = RunHeatmaps {
        range: Some(range),
        ..Default::default()
    };
    let total = todo.len() as u64;
    let mut progress = console.progress(
        total,
        "{elapsed_precise} [{bar:30}] {pos}/{len} heatmaps (run scale)  ETA {eta}",
        Lines::at_every_5_percent("detect: run-scale heatmaps", "image", total),
    );
    // Chunks keep memory bounded (each item holds one image and its map) and let the
    // progress advance between them.
    let chunk = 4 * rayon::current_num_threads().max(1);
    for part in todo.chunks(chunk) {
        let results: Vec<_> = part
            .par_iter()
            .map(|r| draw_one(out, r, opts, inputs_from, limits, range))
            .collect();
        for (r, res) in part.iter().zip(results) {
            match res {
                Ok(()) => done.drawn += 1,
                Err(e) => {
                    console.note(&format!("{}: heatmap not drawn: {e}", r.path));
                    done.failed.push((r.path.clone(), e));
                }
            }
        }
        progress.advance((done.drawn + done.failed.len()) as u64, String::new);
    }
    progress.finish();
    if done.drawn == 0 && !done.failed.is_empty() {
        return Err(Error::output(format!(
            "no heatmap could be drawn on the run's scale ({} failed; the first: {}: {})",
            done.failed.len(),
            done.failed[0].0,
            done.failed[0].1
        )));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside_the_output_folder() {
        let dir = std::env::temp_dir().join(format!("zsad-inside-{}", std::process::id()));
        let out = OutDir::create(&dir).unwrap();
        assert_eq!(
            inside(&out, "maps/a/b.png").unwrap(),
            dir.join("maps/a/b.png")
        );
        for bad in ["../x.png", "/etc/passwd", "maps/../../x", "./x", ""] {
            assert!(inside(&out, bad).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_range_spans_every_record_with_a_heatmap() {
        let rec = |lo: f32, hi: f32| Record {
            path: "x".into(),
            score: Some(0.5),
            map_min: Some(lo),
            map_max: Some(hi),
            heatmap: Some("heatmaps/x.png".into()),
            ..Default::default()
        };
        let (a, b) = (rec(0.2, 0.5), rec(0.1, 0.3));
        let dir = std::env::temp_dir().join(format!("zsad-range-{}", std::process::id()));
        let out = OutDir::create(&dir).unwrap();
        assert_eq!(
            run_range(&out, &[&a, &b]),
            Some(ValueRange { lo: 0.1, hi: 0.5 })
        );
        assert_eq!(run_range(&out, &[]), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
