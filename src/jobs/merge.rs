//! `zsad merge` as a library job: the output folders of `zsad detect --shard` runs joined into
//! one. Every shard must be a finished run of the same settings, and together they must be
//! the shards `0..N` of one split, each once; a shard that failed, stopped or is missing is
//! refused by name (unless `partial`). Files are read only from inside their shard's folder
//! and written under names zsad builds from a checked output key, never from a path a record
//! holds: a crafted record cannot make merge read or write outside the folders.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::run_heatmaps;
use crate::data::image::DecodeLimits;
use crate::data::records::{self, Record, RecordFormat};
use crate::data::run_record::{self, RunRecord};
use crate::error::{Error, OptionError, Result};
use crate::fsio::{FileKind, OutDir};
use crate::progress::Console;

/// Everything `zsad merge` is asked to do.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// The shards' output folders (or their record files).
    pub shards: Vec<PathBuf>,
    /// The folder to merge into (may be one of the shards).
    pub out: PathBuf,
    pub format: RecordFormat,
    /// Replace what a non-empty `out` holds.
    pub overwrite: bool,
    /// Merge although shards are missing, unfinished or without `run.json` (warned).
    pub partial: bool,
}

/// What a merge did.
pub struct MergeSummary {
    pub records: usize,
    pub failed: usize,
    pub path: PathBuf,
    pub heatmap_range: Option<crate::data::heatmap::ValueRange>,
    pub heatmaps_failed: usize,
}

/// One shard: its record file and folder, and its run.
struct Shard {
    file: PathBuf,
    dir: OutDir,
    run: Option<RunRecord>,
}

fn open_shard(p: &Path) -> Result<Shard> {
    let (file, dir) = if crate::fsio::is_file(p) {
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        (p.to_path_buf(), dir.to_path_buf())
    } else {
        let found = [RecordFormat::Jsonl, RecordFormat::Csv]
            .iter()
            .map(|f| p.join(f.file_name()))
            .find(|c| crate::fsio::is_file(c));
        match found {
            Some(f) => (f, p.to_path_buf()),
            None => {
                return Err(OptionError::rule(format!(
                    "shard {}: no scores.jsonl or scores.csv (a shard that never ran, or not a detect output folder)",
                    p.display()
                )))
            }
        }
    };
    Ok(Shard {
        run: RunRecord::read(&dir)?,
        dir: OutDir::create(&dir)?,
        file,
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The shards' settings must agree on everything but the shard, each shard must have finished,
/// and together they must be one split's `0..N`, each once. Returns the merged run record.
fn check_shards(shards: &[Shard], partial: bool, console: &Console) -> Result<Option<RunRecord>> {
    let mut problems = Vec::new();
    let mut first: Option<(&Path, RunRecord)> = None;
    let mut split: HashMap<u64, Vec<u64>> = HashMap::new();
    for s in shards {
        let dir = s.dir.root();
        let Some(r) = &s.run else {
            problems.push(format!(
                "{}: no run.json, so nothing says which settings made it or whether it finished",
                dir.display()
            ));
            continue;
        };
        if r.info.get("complete").and_then(Value::as_bool) == Some(false) {
            problems.push(format!(
                "{}: its run did not finish (stopped, killed or failed): run the same `zsad detect` with --resume there first",
                dir.display()
            ));
        }
        if let Some((k, n)) = r
            .settings
            .get("shard")
            .and_then(Value::as_str)
            .and_then(parse_shard)
        {
            split.entry(n).or_default().push(k);
        }
        let mut r = r.clone();
        if let Value::Object(m) = &mut r.settings {
            m.insert("shard".into(), Value::Null);
        }
        match &first {
            None => first = Some((dir, r)),
            Some((d0, r0)) => {
                let diff = r0.differences_named(
                    &r,
                    &format!("in {}", d0.display()),
                    &format!("in {}", dir.display()),
                );
                if !diff.is_empty() {
                    return Err(OptionError::rule(format!(
                        "{} and {} were made with other settings; their records would be mixed:\n  {}",
                        d0.display(),
                        dir.display(),
                        diff.join("\n  ")
                    )));
                }
            }
        }
    }
    problems.extend(split_problems(&split));
    if !problems.is_empty() {
        let text = problems.join("\n  ");
        if !partial {
            return Err(OptionError::rule(format!(
                "cannot merge:\n  {text}\n(`partial` merges what there is)"
            )));
        }
        console.warn(&format!("`partial`: merging anyway:\n  {text}"));
    }
    Ok(first.map(|(_, mut r)| {
        let from: Vec<String> = shards
            .iter()
            .map(|s| s.dir.root().display().to_string())
            .collect();
        // Where the first shard ran: relative input paths are read from there again to draw
        // run-scale overlays.
        let cwd = r.info.get("cwd").cloned();
        let mut roots: Vec<&str> = shards
            .iter()
            .filter_map(|s| s.run.as_ref()?.info.get("input_roots")?.as_array())
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        roots.sort();
        roots.dedup();
        r.info = serde_json::json!({
            "merged_from": from,
            "complete": problems.is_empty(),
            "input_roots": roots,
        });
        if let Some(cwd) = cwd {
            r.info["cwd"] = cwd;
        }
        r
    }))
}

fn parse_shard(s: &str) -> Option<(u64, u64)> {
    let (k, n) = s.split_once('/')?;
    Some((k.parse().ok()?, n.parse().ok()?))
}

/// Shards that are missing or given twice, per split.
fn split_problems(split: &HashMap<u64, Vec<u64>>) -> Vec<String> {
    let mut out = Vec::new();
    if split.len() > 1 {
        let ns: BTreeSet<_> = split.keys().collect();
        out.push(format!("the shards come from splits into {ns:?} parts"));
    }
    for (&n, ks) in split {
        let given: BTreeSet<u64> = ks.iter().copied().collect();
        let missing: Vec<String> = (0..n)
            .filter(|k| !given.contains(k))
            .map(|k| format!("{k}/{n}"))
            .collect();
        if !missing.is_empty() {
            out.push(format!("shard(s) {} missing", missing.join(", ")));
        }
        if given.len() < ks.len() {
            out.push(format!("a shard of {n} is given twice"));
        }
    }
    out
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

/// The output key of a record's files: `maps/KEY.png` gives `KEY`, checked to be a plain
/// relative name; the heatmap and mask must be `heatmaps/KEY.png` and `masks/KEY.png`.
fn record_key(r: &Record) -> std::result::Result<Option<String>, String> {
    let parts = [
        ("maps/", &r.map),
        ("heatmaps/", &r.heatmap),
        ("masks/", &r.mask),
    ];
    let mut key: Option<String> = None;
    for (folder, rel) in parts {
        let Some(rel) = rel else { continue };
        let k = rel
            .strip_prefix(folder)
            .and_then(|s| s.rsplit_once('.').map(|(k, _)| k))
            .filter(|k| crate::fsio::is_confined(k) && crate::fsio::is_confined(rel))
            .ok_or_else(|| format!("its file `{rel}` is not a name zsad writes ({folder}KEY.EXT inside the folder)"))?;
        match &key {
            Some(k0) if k0 != k => {
                return Err(format!(
                    "its files `{rel}` and another name different inputs"
                ))
            }
            _ => key = Some(k.to_string()),
        }
    }
    Ok(key)
}

/// The records of every shard, one per input: a scored record beats a failure, later shards
/// beat earlier ones; sorted by path. Each with the index of its shard.
fn collect_records(shards: &[Shard], console: &Console) -> Result<Vec<(Record, usize)>> {
    let mut merged: HashMap<String, (Record, usize)> = HashMap::new();
    for (i, s) in shards.iter().enumerate() {
        let (records, torn) = records::read_records(&s.file)?;
        if !torn.is_empty() {
            console.warn(&format!(
                "{}: skipping {} unreadable line(s) {:?}",
                s.file.display(),
                torn.len(),
                torn
            ));
        }
        for r in records {
            if let Err(why) = record_key(&r) {
                return Err(OptionError::rule(format!(
                    "shard {}: record {}: {why}; refusing to merge a record file edited by hand",
                    s.dir.root().display(),
                    r.path
                )));
            }
            let replace = match merged.get(&r.path) {
                Some((old, _)) => old.is_failure() || !r.is_failure(),
                None => true,
            };
            if replace {
                merged.insert(r.path.clone(), (r, i));
            }
        }
    }
    let mut all: Vec<(Record, usize)> = merged.into_values().collect();
    all.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    Ok(all)
}

/// Copies each record's files into `out` under their key (with `~N` where two shards name
/// different inputs' files alike), updating the record. Records whose files are already in
/// `out` keep their names, so no copy can overwrite a file that is still to be read.
fn copy_files(
    all: &mut [(Record, usize)],
    shards: &[Shard],
    out: &OutDir,
    redraw: bool,
) -> Result<()> {
    // Compared ignoring case, as some file systems do.
    let mut taken: HashSet<String> = HashSet::new();
    let in_place = |i: usize| same_dir(shards[i].dir.root(), out.root());
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.sort_by_key(|&j| !in_place(all[j].1));
    for j in order {
        let (r, i) = &mut all[j];
        let shard = &shards[*i];
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
        let heatmap = r.heatmap.clone();
        for (rel, kind) in [
            (&mut r.map, FileKind::Map),
            (&mut r.heatmap, FileKind::RunPicture),
            (&mut r.mask, FileKind::RunPicture),
        ] {
            let Some(rel) = rel else { continue };
            let to_rel = with_suffix(rel, &suffix);
            taken.insert(to_rel.to_lowercase());
            if in_place(*i) && suffix.is_empty() {
                continue;
            }
            let from = shard.dir.path(rel).expect("checked by record_key");
            match crate::fsio::read(&from, kind) {
                Ok(bytes) => out.write(&to_rel, &bytes)?,
                // A run-scale heatmap not drawn yet (its run stopped early) is drawn below.
                Err(Error::File(e))
                    if e.is_not_found() && redraw && heatmap.as_deref() == Some(rel.as_str()) => {}
                Err(e) => {
                    return Err(e.context(format!(
                        "{}: cannot copy {}",
                        shard.dir.root().display(),
                        rel
                    )))
                }
            }
            *rel = to_rel;
        }
    }
    Ok(())
}

/// A non-empty `out` that is not one of the shards is replaced only with `overwrite`.
fn check_out(opts: &MergeOptions, shards: &[Shard]) -> Result<()> {
    if std::fs::metadata(&opts.out).is_ok_and(|m| !m.is_dir()) {
        return Err(OptionError::rule(format!(
            "`out` {}: exists and is not a folder",
            opts.out.display()
        )));
    }
    let is_shard = shards.iter().any(|s| same_dir(s.dir.root(), &opts.out));
    let empty = crate::fsio::list_dir(&opts.out).map_or(true, |names| {
        names.iter().all(|n| n == crate::fsio::LOCK_NAME)
    });
    if !is_shard && !empty && !opts.overwrite {
        return Err(Error::Output(crate::error::OutputError::NotEmpty {
            path: opts.out.clone(),
            what: "holds files already (an earlier merge or run)".into(),
        }));
    }
    Ok(())
}

/// `zsad merge` as a job.
pub fn merge(opts: &MergeOptions, console: &Console) -> Result<MergeSummary> {
    if opts.shards.is_empty() {
        return Err(OptionError::rule(
            "name the shards' output folders to merge",
        ));
    }
    let shards = opts
        .shards
        .iter()
        .map(|p| open_shard(p))
        .collect::<Result<Vec<_>>>()?;
    // Checked before anything is written.
    check_out(opts, &shards)?;
    let run = check_shards(&shards, opts.partial, console)?;
    let out = OutDir::create(&opts.out)?;
    let _lock = out.lock()?;
    if opts.overwrite && !shards.iter().any(|s| same_dir(s.dir.root(), out.root())) {
        clear(&out)?;
    }
    // Shards drew run-scale heatmaps on their own ranges: the merged folder's are drawn again
    // on the range of all of them.
    let redraw = run
        .as_ref()
        .and_then(|r| run_heatmaps::options_from_settings(&r.settings));
    let mut all = collect_records(&shards, console)?;
    copy_files(&mut all, &shards, &out, redraw.is_some())?;
    let records: Vec<Record> = all.into_iter().map(|(r, _)| r).collect();
    if let Some(run) = &run {
        run.write(&out)?;
    }
    let name = opts.format.file_name();
    out.write(name, &records::encode_all(&records, opts.format)?)?;
    let mut summary = MergeSummary {
        records: records.len(),
        failed: records.iter().filter(|r| r.is_failure()).count(),
        path: opts.out.join(name),
        heatmap_range: None,
        heatmaps_failed: 0,
    };
    if let Some(heat) = &redraw {
        let from = run
            .as_ref()
            .and_then(|r| r.info.get("cwd")?.as_str().map(PathBuf::from));
        let from = match from {
            Some(d) => d,
            None => std::env::current_dir().map_err(|e| Error::io(Path::new("."), e))?,
        };
        let max_pixels = run
            .as_ref()
            .and_then(|r| r.settings.get("max_pixels")?.as_u64())
            .unwrap_or(crate::data::image::DEFAULT_MAX_PIXELS);
        let limits = DecodeLimits::with_max_pixels(max_pixels);
        let drawn = run_heatmaps::draw(&out, &records, heat, &from, &limits, console)?;
        if let Some(r) = drawn.range {
            run_record::note_info(&out, "heatmap_range", serde_json::json!([r.lo, r.hi]))?;
        }
        summary.heatmap_range = drawn.range;
        summary.heatmaps_failed = drawn.failed.len();
    }
    Ok(summary)
}

/// Removes what an earlier merge or run left in `out`: the files its records name (inside
/// the folder), its record files and `run.json`.
fn clear(out: &OutDir) -> Result<()> {
    for f in [RecordFormat::Jsonl, RecordFormat::Csv] {
        let path = out.root().join(f.file_name());
        if !crate::fsio::is_file(&path) {
            continue;
        }
        let (records, _) = records::read_records(&path)?;
        for rel in records
            .iter()
            .flat_map(|r| [&r.map, &r.heatmap, &r.mask])
            .flatten()
        {
            if crate::fsio::is_confined(rel) {
                out.remove(rel)?;
            }
        }
        out.remove(f.file_name())?;
    }
    out.remove(run_record::FILE_NAME)?;
    Ok(())
}
