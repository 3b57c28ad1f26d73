//! `zsad merge`: join the outputs of `zsad detect --shard` runs into one folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

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

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
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
    for (r, dir) in &all {
        if same_dir(dir, &args.out) {
            continue;
        }
        for rel in [&r.map, &r.heatmap].into_iter().flatten() {
            let from = dir.join(rel);
            let to = args.out.join(rel);
            let bytes = std::fs::read(&from)
                .with_context(|| format!("{}: cannot read {}", r.path, from.display()))?;
            outputs::write_atomic(&to, &bytes)?;
        }
    }
    let records: Vec<Record> = all.into_iter().map(|(r, _)| r).collect();
    let path = args.out.join(args.format.file_name());
    outputs::write_atomic(&path, &outputs::encode_all(&records, args.format)?)?;
    let failed = records.iter().filter(|r| r.is_failure()).count();
    eprintln!(
        "zsad: merged {} records ({} failed) -> {}",
        records.len(),
        failed,
        path.display()
    );
    Ok(())
}
