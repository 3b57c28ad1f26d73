//! What `zsad detect` writes: one record per input (JSON Lines or CSV, appended as each input
//! finishes, readable back for `--resume`), anomaly maps (16-bit PNG or `.npy`) and heatmaps.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{ImageBuffer, Luma, RgbImage};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

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
    pub regions: Option<crate::decision::regions::Regions>,
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
        .map_err(|e| Error::Output(format!("csv: {e}")))?;
    w.into_inner()
        .map_err(|e| Error::Output(format!("csv: {e}")))
}

/// One serialised record including its line end.
pub fn encode(r: &Record, format: RecordFormat) -> Result<Vec<u8>> {
    match format {
        RecordFormat::Jsonl => {
            let mut v = serde_json::to_vec(r).map_err(|e| Error::Output(format!("json: {e}")))?;
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
                    regions: get("regions").and_then(|s| s.parse().ok()).map(|count| {
                        crate::decision::regions::Regions {
                            count,
                            items: Vec::new(),
                        }
                    }),
                });
            }
        }
    }
    (good, bad)
}

/// `dir/rel` for a record's file path `rel` that stays inside `dir` (plain names separated by
/// `/`); `None` for an empty path, an absolute one, or one with `.` or `..` (records are data: a
/// hand-edited `../../x` must never be read, written or removed).
pub fn inside(dir: &Path, rel: &str) -> Option<PathBuf> {
    let p = Path::new(rel);
    (!rel.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_))))
    .then(|| dir.join(p))
}

/// Reads a record file (format by extension: `.csv`, else JSON Lines).
pub fn read_records(path: &Path) -> Result<(Vec<Record>, Vec<usize>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
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

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, synced, then renamed
/// over the target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Output(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The append-only record file of a run. Each record is one `write` of a whole line, flushed,
/// so a crash loses at most the line being written, which `--resume` then drops.
pub struct RecordLog {
    file: std::fs::File,
    path: PathBuf,
    format: RecordFormat,
}

impl RecordLog {
    /// Starts the file with `kept` (rewritten atomically, e.g. the records a resumed run keeps)
    /// and opens it for appending.
    pub fn create(path: &Path, format: RecordFormat, kept: &[Record]) -> Result<Self> {
        write_atomic(path, &encode_all(kept, format)?)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            format,
        })
    }

    pub fn append(&mut self, r: &Record) -> Result<()> {
        let line = encode(r, self.format)?;
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// `round(p · 65535)` as a 16-bit grey PNG: one fixed scale for every image.
/// A defect mask as an 8-bit grey PNG: 255 where set, 0 elsewhere.
pub fn mask_png(mask: &[bool], w: u32, h: u32) -> Result<Vec<u8>> {
    let px: Vec<u8> = mask.iter().map(|&b| if b { 255 } else { 0 }).collect();
    let img: ImageBuffer<Luma<u8>, Vec<u8>> = ImageBuffer::from_raw(w, h, px)
        .ok_or_else(|| Error::Output(format!("mask is not {w}x{h}")))?;
    encode_png(&img)
}

pub fn map_png(map: &[f32], w: u32, h: u32) -> Result<Vec<u8>> {
    let px: Vec<u16> = map
        .iter()
        .map(|&p| (p.clamp(0.0, 1.0) * 65535.0).round() as u16)
        .collect();
    let img: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_raw(w, h, px)
        .ok_or_else(|| Error::Output(format!("map is not {w}x{h}")))?;
    encode_png(&img)
}

/// PNG bytes with fast compression: maps and heatmaps are written once per input, and zlib's
/// default level costs more than the model on small backbones (about 40 ms at 900x900).
fn encode_png<I>(img: &I) -> Result<Vec<u8>>
where
    I: image::GenericImageView,
    I::Pixel: image::PixelWithColorType,
    [<I::Pixel as image::Pixel>::Subpixel]: image::EncodableLayout,
    I: std::ops::Deref<Target = [<I::Pixel as image::Pixel>::Subpixel]>,
{
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::{EncodableLayout, ImageEncoder, PixelWithColorType};
    let mut out = Vec::new();
    let (w, h) = img.dimensions();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(
            img.as_bytes(),
            w,
            h,
            <I::Pixel as PixelWithColorType>::COLOR_TYPE.into(),
        )
        .map_err(|e| Error::Output(format!("cannot encode PNG: {e}")))?;
    Ok(out)
}

/// Reads a map PNG written by [`map_png`] back as probabilities.
pub fn read_map_png(path: &Path) -> Result<(Vec<f32>, u32, u32)> {
    let img = crate::data::image::decode(path)?;
    let g = img.to_luma16();
    let (w, h) = g.dimensions();
    Ok((
        g.into_raw().iter().map(|&v| v as f32 / 65535.0).collect(),
        w,
        h,
    ))
}

/// A little-endian f32 `.npy` (NumPy format 1.0) of shape `(h, w)`.
pub fn map_npy(map: &[f32], w: u32, h: u32) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({h}, {w}), }}");
    // magic (6) + version (2) + header length (2) + header + '\n' is a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + map.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in map {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads a map written by [`map_npy`]: `(values, width, height)`.
pub fn read_map_npy(path: &Path) -> Result<(Vec<f32>, u32, u32)> {
    // A map is at most the largest image: 4 bytes a pixel of --max-pixels' ceiling (4
    // gigapixels), plus the header. Only a regular file is read (a FIFO cannot stall).
    const LIMIT: u64 = 4 * 4_000_000_000 + 4096;
    let bytes = crate::data::image::read_regular(path, LIMIT, " for a map")?;
    parse_map_npy(&bytes, path)
}

/// A written map, `.npy` or 16-bit PNG by its extension: values, width, height.
pub fn read_map(path: &Path) -> Result<(Vec<f32>, u32, u32)> {
    if path.extension().is_some_and(|e| e == "npy") {
        read_map_npy(path)
    } else {
        read_map_png(path)
    }
}

/// [`read_map_npy`] on bytes in memory (`path` names them in errors).
pub fn parse_map_npy(bytes: &[u8], path: &Path) -> Result<(Vec<f32>, u32, u32)> {
    let bad = |m: &str| Error::Image {
        path: path.to_path_buf(),
        message: m.to_string(),
    };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(
        bytes
            .get(10..10 + hlen)
            .ok_or_else(|| bad("truncated header"))?,
    )
    .map_err(|_| bad("unreadable header"))?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("expected a little-endian float32 array in C order"));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<u32> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_>>()?;
    let [h, w] = dims[..] else {
        return Err(bad("expected a 2-D array"));
    };
    let data = &bytes[10 + hlen..];
    // A crafted shape must not overflow into a size that happens to match the data.
    let want = (w as u64)
        .checked_mul(h as u64)
        .and_then(|n| n.checked_mul(4));
    if want != Some(data.len() as u64) {
        let want = want.map_or("more than 2^64".to_string(), |n| n.to_string());
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: format!(
                "shape ({h}, {w}) needs {want} bytes of float32 data, the file holds {}",
                data.len()
            ),
        });
    }
    let v = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((v, w, h))
}

crate::choice::choice_enum! {
    /// What map file to write.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum MapFormat {
        /// 16-bit grey PNG, value = round(p · 65535)
        Png = "png",
        /// float32 NumPy array (full precision)
        Npy = "npy",
        /// no map files (scores only)
        None = "none",
    }
}

pub fn png_bytes_rgb(img: &RgbImage) -> Result<Vec<u8>> {
    encode_png(img)
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
                regions: Some(crate::decision::regions::Regions {
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

    #[test]
    fn map_png_is_16_bit_on_a_fixed_scale() {
        let m = [0.0f32, 0.5, 1.0, 2.0, -1.0, 0.25];
        let bytes = map_png(&m, 3, 2).unwrap();
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!(img.color(), image::ColorType::L16);
        let v = img.to_luma16().into_raw();
        assert_eq!(v, vec![0, 32768, 65535, 65535, 0, 16384]);
    }

    #[test]
    fn npy_header_is_aligned() {
        let b = map_npy(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2);
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert_eq!(b.len(), 10 + hlen + 24);
        assert_eq!(&b[10 + hlen..10 + hlen + 4], &1.0f32.to_le_bytes());
        let p = std::env::temp_dir().join(format!("zsad-npy-{}.npy", std::process::id()));
        std::fs::write(&p, &b).unwrap();
        let (v, w, h) = read_map_npy(&p).unwrap();
        assert_eq!((v, w, h), (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2));
        std::fs::remove_file(&p).unwrap();
    }

    /// (65536, 65536) overflowed `u32` to 0 elements and matched an empty file.
    #[test]
    fn npy_shapes_are_checked_against_the_data() {
        let p = Path::new("crafted.npy");
        let mut b = map_npy(&[], 0, 0);
        let e = |b: &[u8]| parse_map_npy(b, p).unwrap_err().to_string();
        let header = |b: &mut Vec<u8>, shape: &str| {
            let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
            let h = std::str::from_utf8(&b[10..10 + hlen])
                .unwrap()
                .replace("(0, 0)", shape);
            let h = format!("{h:<width$}", width = hlen);
            b.splice(10..10 + hlen, h.bytes().take(hlen)).for_each(drop);
        };
        header(&mut b, "(65536, 65536)");
        assert_eq!(
            e(&b),
            "crafted.npy: shape (65536, 65536) needs 17179869184 bytes of float32 data, the file holds 0"
        );
        let mut b = map_npy(&[1.0, 2.0], 1, 2);
        b.pop();
        assert!(e(&b).contains("needs 8 bytes of float32 data, the file holds 7"));
        let mut b = map_npy(&[], 0, 0);
        header(&mut b, "(4294967295, 4294967295)");
        assert!(e(&b).contains("needs more than 2^64 bytes"), "{}", e(&b));
        assert!(e(b"\x93NUMPY\x01\x00\xff\xff{").contains("truncated header"));
    }
}
