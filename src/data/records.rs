//! A run's records: one per input, in `scores.jsonl` (JSON Lines) or `scores.csv`, appended as
//! each input finishes and readable back for `--resume`, `merge`, `eval` and `report`; with the
//! defect regions a record carries.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsio::{Appender, FileKind, OutDir};

/// One line of `scores.jsonl` / row of `scores.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Record {
    /// The input's path as given on the command line (folder arguments joined with the file).
    pub path: String,
    /// Image-level anomaly score in [0, 1] (joint with the map where the method says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// The method's global score before pixel evidence is fused in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_score: Option<f32>,
    /// Maximum, mean and minimum of the written map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_max: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_mean: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_min: Option<f32>,
    /// `score >= --threshold`, when a threshold is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomalous: Option<bool>,
    /// The image's own size (the map's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Paths relative to the output folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heatmap: Option<String>,
    /// The binary defect mask (`map >= pixel threshold`), relative to the output folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// The mask's connected regions, when a pixel threshold is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Regions>,
    /// Why the input could not be scored (then no score).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Record {
    pub fn failed(path: &str, error: impl Into<String>) -> Self {
        Self {
            path: path.to_string(),
            error: Some(error.into()),
            ..Default::default()
        }
    }
    pub fn is_failure(&self) -> bool {
        self.error.is_some() || self.score.is_none()
    }
}

crate::choice::choice_enum! {
    /// Record file format.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RecordFormat {
        /// `scores.jsonl`: one JSON object per line
        Jsonl = "jsonl",
        /// `scores.csv`: a header and one row per input
        Csv = "csv",
    }
}

impl RecordFormat {
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Jsonl => "scores.jsonl",
            Self::Csv => "scores.csv",
        }
    }
}

const CSV_COLUMNS: &[&str] = &[
    "path",
    "score",
    "global_score",
    "map_max",
    "map_mean",
    "anomalous",
    "width",
    "height",
    "map",
    "heatmap",
    "error",
    "mask",
    "regions",
    "map_min",
];

fn csv_row(r: &Record) -> Vec<String> {
    let f = |v: Option<f32>| v.map(|x| x.to_string()).unwrap_or_default();
    let u = |v: Option<u32>| v.map(|x| x.to_string()).unwrap_or_default();
    vec![
        r.path.clone(),
        f(r.score),
        f(r.global_score),
        f(r.map_max),
        f(r.map_mean),
        r.anomalous.map(|b| b.to_string()).unwrap_or_default(),
        u(r.width),
        u(r.height),
        r.map.clone().unwrap_or_default(),
        r.heatmap.clone().unwrap_or_default(),
        r.error.clone().unwrap_or_default(),
        r.mask.clone().unwrap_or_default(),
        // The region count; the regions themselves are in the JSON Lines format only.
        r.regions
            .as_ref()
            .map(|g| g.count.to_string())
            .unwrap_or_default(),
        f(r.map_min),
    ]
}

fn csv_line(fields: &[String]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(fields)
        .map_err(|e| Error::output(format!("csv: {e}")))?;
    w.into_inner()
        .map_err(|e| Error::output(format!("csv: {e}")))
}

/// One serialised record including its line end.
pub fn encode(r: &Record, format: RecordFormat) -> Result<Vec<u8>> {
    match format {
        RecordFormat::Jsonl => {
            let mut v = serde_json::to_vec(r).map_err(|e| Error::output(format!("json: {e}")))?;
            v.push(b'\n');
            Ok(v)
        }
        RecordFormat::Csv => csv_line(&csv_row(r)),
    }
}

/// The records in `text`; lines that do not parse (a line cut short by a crash) are returned as
/// their line numbers, 1-based.
pub fn parse(text: &str, format: RecordFormat) -> (Vec<Record>, Vec<usize>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    match format {
        RecordFormat::Jsonl => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Record>(line) {
                    Ok(r) => good.push(r),
                    Err(_) => bad.push(i + 1),
                }
            }
        }
        RecordFormat::Csv => {
            let mut rd = csv::ReaderBuilder::new()
                .flexible(true)
                .from_reader(text.as_bytes());
            let header: Vec<String> = match rd.headers() {
                Ok(h) => h.iter().map(str::to_string).collect(),
                Err(_) => return (good, vec![1]),
            };
            let col = |name: &str| header.iter().position(|h| h == name);
            let idx: HashMap<&str, Option<usize>> =
                CSV_COLUMNS.iter().map(|c| (*c, col(c))).collect();
            for (i, row) in rd.records().enumerate() {
                let line = i + 2;
                let Ok(row) = row else {
                    bad.push(line);
                    continue;
                };
                let get = |c: &str| -> Option<String> {
                    idx[c]
                        .and_then(|j| row.get(j))
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                };
                let Some(path) = get("path") else {
                    bad.push(line);
                    continue;
                };
                if row.len() != header.len() {
                    bad.push(line);
                    continue;
                }
                let num = |c: &str| get(c).and_then(|s| s.parse::<f32>().ok());
                good.push(Record {
                    path,
                    score: num("score"),
                    global_score: num("global_score"),
                    map_max: num("map_max"),
                    map_mean: num("map_mean"),
                    map_min: num("map_min"),
                    anomalous: get("anomalous").and_then(|s| s.parse().ok()),
                    width: get("width").and_then(|s| s.parse().ok()),
                    height: get("height").and_then(|s| s.parse().ok()),
                    map: get("map"),
                    heatmap: get("heatmap"),
                    error: get("error"),
                    mask: get("mask"),
                    regions: get("regions")
                        .and_then(|s| s.parse().ok())
                        .map(|count| Regions {
                            count,
                            items: Vec::new(),
                        }),
                });
            }
        }
    }
    (good, bad)
}

/// Reads a record file (format by extension: `.csv`, else JSON Lines).
pub fn read_records(path: &Path) -> Result<(Vec<Record>, Vec<usize>)> {
    let text = crate::fsio::read_text(path, FileKind::Records)?;
    let format = if path.extension().is_some_and(|e| e == "csv") {
        RecordFormat::Csv
    } else {
        RecordFormat::Jsonl
    };
    Ok(parse(&text, format))
}

/// The whole file content for `records` (with the CSV header).
pub fn encode_all(records: &[Record], format: RecordFormat) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if format == RecordFormat::Csv {
        out.extend(csv_line(
            &CSV_COLUMNS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )?);
    }
    for r in records {
        out.extend(encode(r, format)?);
    }
    Ok(out)
}

/// The append-only record file of a run. Each record is one `write` of a whole line, flushed,
/// so a crash loses at most the line being written, which `--resume` then drops.
pub struct RecordLog {
    file: Appender,
    format: RecordFormat,
}

impl RecordLog {
    /// Starts `out/name` with `kept` (rewritten atomically, e.g. the records a resumed run
    /// keeps) and opens it for appending.
    pub fn create(out: &OutDir, name: &str, format: RecordFormat, kept: &[Record]) -> Result<Self> {
        out.write(name, &encode_all(kept, format)?)?;
        Ok(Self {
            file: out.append(name)?,
            format,
        })
    }

    pub fn append(&mut self, r: &Record) -> Result<()> {
        self.file.append(&encode(r, self.format)?)
    }
}

/// A record's `regions`: how many, and each one, largest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Regions {
    pub count: usize,
    #[serde(default)]
    pub items: Vec<Region>,
}

/// One connected region of the defect mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Region {
    /// Pixels in the region.
    pub area: u64,
    /// Bounding box in pixels: left column, top row, width and height.
    pub bbox: BBox,
    /// The highest map value inside the region.
    pub peak: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BBox {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record {
                path: "a/b, \"c\".png".into(),
                score: Some(0.25),
                global_score: Some(0.125),
                map_max: Some(0.5),
                map_mean: Some(0.1),
                map_min: Some(0.0),
                anomalous: Some(false),
                width: Some(3),
                height: Some(2),
                map: Some("maps/b.png".into()),
                heatmap: None,
                error: None,
                mask: Some("masks/b.png".into()),
                regions: Some(Regions {
                    count: 0,
                    items: Vec::new(),
                }),
            },
            Record::failed("x.png", "x.png: not an image"),
        ]
    }

    #[test]
    fn records_round_trip_in_both_formats_and_torn_lines_are_dropped() {
        for f in [RecordFormat::Jsonl, RecordFormat::Csv] {
            let mut bytes = encode_all(&sample(), f).unwrap();
            let (back, bad) = parse(std::str::from_utf8(&bytes).unwrap(), f);
            assert_eq!(back, sample(), "{f:?}");
            assert!(bad.is_empty());
            // A crash in the middle of a line.
            let tail = encode(&sample()[0], f).unwrap();
            bytes.extend_from_slice(&tail[..tail.len() / 2]);
            let (back, bad) = parse(std::str::from_utf8(&bytes).unwrap(), f);
            assert_eq!(back, sample(), "{f:?}");
            assert_eq!(bad.len(), 1, "{f:?}");
        }
    }

    #[test]
    fn jsonl_keys_are_the_documented_ones() {
        let line = String::from_utf8(encode(&sample()[0], RecordFormat::Jsonl).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        for k in ["path", "score", "map_max", "map_mean", "map"] {
            assert!(v.get(k).is_some(), "{k} in {line}");
        }
        let f = String::from_utf8(encode(&sample()[1], RecordFormat::Jsonl).unwrap()).unwrap();
        assert_eq!(
            f,
            "{\"path\":\"x.png\",\"error\":\"x.png: not an image\"}\n"
        );
    }
}
