//! `zsad merge`: join the outputs of `zsad detect --shard` runs into one folder.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use crate::batch::run_heatmaps;
use crate::batch::run_record::{self, RunRecord};
use crate::data::image::DecodeLimits;
use crate::data::outputs::{self, Record, RecordFormat};

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Output folders of the shards (or their scores.jsonl / scores.csv files)
    #[arg(value_name = "SHARD", required = true)]
    pub shards: Vec<PathBuf>,
    /// Folder to merge into (may be one of the shards); map and heatmap files are copied there
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Record file format written
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: RecordFormat,
}

fn record_file(p: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    if p.is_file() {
        let dir = p.parent().unwrap_or(Path::new(".")).to_path_buf();
        return Ok((p.to_path_buf(), dir));
    }
    for f in [RecordFormat::Jsonl, RecordFormat::Csv] {
        let c = p.join(f.file_name());
        if c.is_file() {
            return Ok((c, p.to_path_buf()));
        }
    }
    bail!("{}: no scores.jsonl or scores.csv", p.display())
}

/// `maps/a/b.png` with `~2` is `maps/a/b~2.png`.
fn with_suffix(rel: &str, suffix: &str) -> String {
    if suffix.is_empty() {
        return rel.to_string();
    }
    match rel.rfind('.') {
        Some(dot) if !rel[dot..].contains('/') => format!("{}{suffix}{}", &rel[..dot], &rel[dot..]),
        _ => format!("{rel}{suffix}"),
    }
}

/// The shards' `run.json`, which must agree on every setting but the shard: merging the
/// records of two models into one file is what `run.json` exists to prevent.
fn merged_run_record(shards: &[PathBuf]) -> anyhow::Result<Option<RunRecord>> {
    let mut first: Option<(PathBuf, RunRecord)> = None;
    let mut from = Vec::new();
    for s in shards {
        let (_, dir) = record_file(s)?;
        let Some(mut r) = RunRecord::read(&dir)? else {
            eprintln!(
                "zsad: warning: {} has no run.json: its settings cannot be checked against the other shards",
                dir.display()
            );
            continue;
        };
        if let serde_json::Value::Object(m) = &mut r.settings {
            m.insert("shard".into(), serde_json::Value::Null);
        }
        from.push(dir.display().to_string());
        match &first {
            None => first = Some((dir, r)),
            Some((d0, r0)) => {
                let diff = r0.differences(&r);
                if !diff.is_empty() {
                    bail!(
                        "{} and {} were made with other settings; their records would be mixed:\n  {}",
                        d0.display(),
                        dir.display(),
                        diff.join("\n  ")
                    );
                }
            }
        }
    }
    Ok(first.map(|(_, mut r)| {
        // Where the first shard ran: relative input paths are read from there again to draw
        // run-scale overlays.
        let cwd = r.info.get("cwd").cloned();
        r.info = serde_json::json!({ "merged_from": from });
        if let Some(cwd) = cwd {
            r.info["cwd"] = cwd;
        }
        r
    }))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

pub fn run(args: MergeArgs) -> anyhow::Result<u8> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    // Checked before anything is written.
    let run = merged_run_record(&args.shards)?;
    // Shards drew run-scale heatmaps on their own ranges: the merged folder's are drawn again
    // on the range of all of them.
    let redraw = run
        .as_ref()
        .and_then(|r| run_heatmaps::options_from_settings(&r.settings));
    // path -> (record, folder its files are relative to); a scored record beats a failure,
    // later shards beat earlier ones.
    let mut merged: HashMap<String, (Record, PathBuf)> = HashMap::new();
    for s in &args.shards {
        let (file, dir) = record_file(s)?;
        let (records, torn) = outputs::read_records(&file)?;
        if !torn.is_empty() {
            eprintln!(
                "zsad: warning: {}: skipping {} unreadable line(s) {:?}",
                file.display(),
                torn.len(),
                torn
            );
        }
        for r in records {
            let replace = match merged.get(&r.path) {
                Some((old, _)) => old.is_failure() || !r.is_failure(),
                None => true,
            };
            if replace {
                merged.insert(r.path.clone(), (r, dir.clone()));
            }
        }
    }
    let mut all: Vec<(Record, PathBuf)> = merged.into_values().collect();
    all.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    // Two shards can name different inputs' files alike (runs over different lists): the
    // second gets `NAME~2.*`, so no record ever points at another input's map. Compared
    // ignoring case, as some file systems do.
    let mut taken: HashSet<String> = HashSet::new();
    // Records whose files are already in --out keep their names, so no copy can overwrite a
    // file that is still to be read.
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.sort_by_key(|&i| !same_dir(&all[i].1, &args.out));
    for i in order {
        let (r, dir) = &mut all[i];
        let free = |suffix: &str, r: &Record, taken: &HashSet<String>| {
            [&r.map, &r.heatmap, &r.mask]
                .into_iter()
                .flatten()
                .all(|rel| !taken.contains(&with_suffix(rel, suffix).to_lowercase()))
        };
        let mut suffix = String::new();
        let mut n = 2;
        while !free(&suffix, r, &taken) {
            suffix = format!("~{n}");
            n += 1;
        }
        let in_place = same_dir(dir, &args.out);
        let heatmap = r.heatmap.clone();
        for rel in [&mut r.map, &mut r.heatmap, &mut r.mask]
            .into_iter()
            .flatten()
        {
            let to_rel = with_suffix(rel, &suffix);
            taken.insert(to_rel.to_lowercase());
            if in_place && suffix.is_empty() {
                continue;
            }
            let from = dir.join(&*rel);
            let bytes = match std::fs::read(&from) {
                Ok(b) => b,
                // A run-scale heatmap not drawn yet (its run stopped early) is drawn below.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && redraw.is_some()
                        && heatmap.as_deref() == Some(&**rel) =>
                {
                    *rel = to_rel;
                    continue;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("{}: cannot read {}", r.path, from.display()))
                }
            };
            outputs::write_atomic(&args.out.join(&to_rel), &bytes)?;
            *rel = to_rel;
        }
    }
    let records: Vec<Record> = all.into_iter().map(|(r, _)| r).collect();
    if let Some(run) = &run {
        run.write(&args.out)?;
    }
    let path = args.out.join(args.format.file_name());
    outputs::write_atomic(&path, &outputs::encode_all(&records, args.format)?)?;
    let mut heatmaps_failed = 0;
    if let Some(opts) = &redraw {
        let from = run
            .as_ref()
            .and_then(|r| r.info.get("cwd")?.as_str().map(PathBuf::from));
        let from = match from {
            Some(d) => d,
            None => std::env::current_dir()?,
        };
        let drawn = run_heatmaps::draw(
            &args.out,
            &records,
            opts,
            &from,
            &DecodeLimits::with_max_pixels(
                run.as_ref()
                    .and_then(|r| r.settings.get("max_pixels")?.as_u64())
                    .unwrap_or(crate::data::image::DEFAULT_MAX_PIXELS),
            ),
            false,
        )?;
        if let Some(r) = drawn.range {
            run_record::note_info(&args.out, "heatmap_range", serde_json::json!([r.lo, r.hi]))?;
            eprintln!(
                "zsad: heatmaps drawn again on the merged run's scale, {} to {}",
                r.lo, r.hi
            );
        }
        heatmaps_failed = drawn.failed.len();
    }
    let failed = records.iter().filter(|r| r.is_failure()).count();
    eprintln!(
        "zsad: merged {} records ({} failed) -> {}",
        records.len(),
        failed,
        path.display()
    );
    Ok(if heatmaps_failed > 0 {
        super::EXIT_SOME_FAILED
    } else {
        super::EXIT_OK
    })
}
