//! Annotated datasets: the MVTec AD layout, the VisA split CSV, manifests (CSV or JSON Lines)
//! and folders with masks beside the images (MTD). A dataset is a list of [`Sample`]s; it is
//! checked as a whole before any work, and every problem is reported at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::inputs::{is_image_name, walk};
use crate::{Error, Result};

/// One annotated image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub image: PathBuf,
    /// Ground-truth mask (non-zero = anomalous); `None` means all normal.
    pub mask: Option<PathBuf>,
    /// Image label: `Some(true)` anomalous; `None`: anomalous iff the mask has a positive pixel.
    pub label: Option<bool>,
    /// Sub-category the metrics are grouped by.
    pub class: String,
}

/// The layout a `--data` path was read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `<root>/<class>/test/<defect>/*.png`, masks `<root>/<class>/ground_truth/<defect>/<stem>_mask.png`,
    /// `good` = normal. `<root>` may also be one class folder.
    Mvtec,
    /// `<root>/split_csv/1cls.csv` (object, split, label, image, mask; paths relative to root),
    /// test split.
    Visa,
    /// A CSV or JSON Lines file with `image`, `mask`, `label`, `class` (paths relative to it).
    Manifest,
    /// `<root>/<class>/.../<stem>.<jpg|...>` with the mask `<stem>.png` or `<stem>_mask.png`
    /// beside it (MTD); the label comes from the mask.
    SideBySide,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::InvalidArgument(format!("{}: {}", path.display(), msg.into()))
}

/// Reads `path` as whichever layout it has.
pub fn read(path: &Path) -> Result<(Layout, Vec<Sample>)> {
    if path.is_file() {
        return Ok((Layout::Manifest, read_manifest(path)?));
    }
    if !path.is_dir() {
        return Err(bad(path, "no such file or folder"));
    }
    let visa = path.join("split_csv/1cls.csv");
    if visa.is_file() {
        return Ok((Layout::Visa, read_visa(path, &visa)?));
    }
    if path.join("test").is_dir() {
        return Ok((Layout::Mvtec, read_mvtec_class(path)?));
    }
    let mut mvtec = Vec::new();
    let mut subdirs = sorted_dirs(path)?;
    subdirs.retain(|d| d.join("test").is_dir());
    if !subdirs.is_empty() {
        for d in subdirs {
            mvtec.extend(read_mvtec_class(&d)?);
        }
        return Ok((Layout::Mvtec, mvtec));
    }
    let samples = read_side_by_side(path)?;
    if samples.is_empty() {
        return Err(bad(
            path,
            "not a dataset: expected an MVTec AD layout (<class>/test, <class>/ground_truth), a VisA root (split_csv/1cls.csv), a manifest file, or images with <stem>.png / <stem>_mask.png masks beside them",
        ));
    }
    Ok((Layout::SideBySide, samples))
}

fn sorted_dirs(p: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .map_err(|e| Error::io(p, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_mvtec_class(class_dir: &Path) -> Result<Vec<Sample>> {
    let class = name_of(class_dir);
    let mut out = Vec::new();
    for defect in sorted_dirs(&class_dir.join("test"))? {
        let kind = name_of(&defect);
        let normal = kind == "good";
        for img in walk(&defect)? {
            let mask = (!normal).then(|| {
                let stem = img.file_stem().unwrap_or_default().to_string_lossy();
                class_dir
                    .join("ground_truth")
                    .join(&kind)
                    .join(format!("{stem}_mask.png"))
            });
            out.push(Sample {
                image: img,
                mask,
                label: Some(!normal),
                class: class.clone(),
            });
        }
    }
    Ok(out)
}

fn read_visa(root: &Path, csv_path: &Path) -> Result<Vec<Sample>> {
    let mut rd = csv::Reader::from_path(csv_path).map_err(|e| bad(csv_path, e.to_string()))?;
    let header: Vec<String> = rd
        .headers()
        .map_err(|e| bad(csv_path, e.to_string()))?
        .iter()
        .map(str::to_string)
        .collect();
    let col = |n: &str| {
        header
            .iter()
            .position(|h| h == n)
            .ok_or_else(|| bad(csv_path, format!("no `{n}` column")))
    };
    let (c_obj, c_split, c_label, c_img, c_mask) = (
        col("object")?,
        col("split")?,
        col("label")?,
        col("image")?,
        col("mask")?,
    );
    let mut out = Vec::new();
    for (i, row) in rd.records().enumerate() {
        let row = row.map_err(|e| bad(csv_path, format!("line {}: {e}", i + 2)))?;
        if row.get(c_split) != Some("test") {
            continue;
        }
        let label = match row.get(c_label).unwrap_or("") {
            "anomaly" | "1" => true,
            "normal" | "0" => false,
            other => {
                return Err(bad(csv_path, format!("line {}: label `{other}`", i + 2)));
            }
        };
        let mask = row
            .get(c_mask)
            .filter(|m| !m.is_empty())
            .map(|m| root.join(m));
        out.push(Sample {
            image: root.join(row.get(c_img).unwrap_or("")),
            mask,
            label: Some(label),
            class: row.get(c_obj).unwrap_or("").to_string(),
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct ManifestRow {
    image: String,
    #[serde(default)]
    mask: Option<String>,
    #[serde(default)]
    label: Option<serde_json::Value>,
    #[serde(default)]
    class: Option<String>,
}

fn parse_label(v: &serde_json::Value) -> Option<Option<bool>> {
    use serde_json::Value;
    match v {
        Value::Null => Some(None),
        Value::Bool(b) => Some(Some(*b)),
        Value::Number(n) => match n.as_f64() {
            Some(x) if x == 0.0 => Some(Some(false)),
            Some(x) if x == 1.0 => Some(Some(true)),
            _ => None,
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "" => Some(None),
            "0" | "normal" | "good" | "false" => Some(Some(false)),
            "1" | "anomaly" | "anomalous" | "abnormal" | "true" => Some(Some(true)),
            _ => None,
        },
        _ => None,
    }
}

/// A manifest: `.csv` with a header, or JSON Lines (anything else), columns/keys `image`,
/// `mask`, `label` (0/1, normal/anomaly, or empty = from the mask), `class` (default: `all`).
pub fn read_manifest(path: &Path) -> Result<Vec<Sample>> {
    let base = path.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let rows: Vec<(usize, ManifestRow)> = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
    {
        let mut rd = csv::Reader::from_reader(text.as_bytes());
        let mut v = Vec::new();
        for (i, r) in rd.deserialize::<BTreeMap<String, String>>().enumerate() {
            let r = r.map_err(|e| bad(path, format!("line {}: {e}", i + 2)))?;
            let get = |k: &str| r.get(k).filter(|s| !s.is_empty()).cloned();
            v.push((
                i + 2,
                ManifestRow {
                    image: get("image")
                        .ok_or_else(|| bad(path, format!("line {}: no image", i + 2)))?,
                    mask: get("mask"),
                    label: get("label").map(serde_json::Value::String),
                    class: get("class"),
                },
            ));
        }
        v
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str::<ManifestRow>(l)
                    .map(|r| (i + 1, r))
                    .map_err(|e| bad(path, format!("line {}: {e}", i + 1)))
            })
            .collect::<Result<_>>()?
    };
    rows.into_iter()
        .map(|(line, r)| {
            let label = match &r.label {
                None => None,
                Some(v) => parse_label(v)
                    .ok_or_else(|| bad(path, format!("line {line}: label {v} is not 0/1")))?,
            };
            Ok(Sample {
                image: base.join(&r.image),
                mask: r.mask.map(|m| base.join(m)),
                label,
                class: r.class.unwrap_or_else(|| "all".into()),
            })
        })
        .collect()
}

/// Images with a mask beside them: `<stem>_mask.png`, or `<stem>.png` for a non-PNG image.
/// The class is the top-level folder under `root` (or `root`'s name for files directly in it).
pub fn read_side_by_side(root: &Path) -> Result<Vec<Sample>> {
    let files = walk(root)?;
    let set: std::collections::HashSet<&PathBuf> = files.iter().collect();
    let mut masks = std::collections::HashSet::new();
    let mut out = Vec::new();
    for f in &files {
        let stem = f
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let is_png = f.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
        let candidates = [
            f.with_file_name(format!("{stem}_mask.png")),
            f.with_extension("png"),
        ];
        let mask = candidates
            .into_iter()
            .find(|m| m != f && set.contains(m) && !(is_png && m == &f.with_extension("png")));
        if let Some(m) = mask {
            masks.insert(m.clone());
            let rel = f.strip_prefix(root).unwrap_or(f);
            let class = match rel.components().count() {
                0 | 1 => name_of(root),
                _ => rel
                    .components()
                    .next()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            out.push(Sample {
                image: f.clone(),
                mask: Some(m),
                label: None,
                class,
            });
        }
    }
    out.retain(|s| !masks.contains(&s.image) && is_image_name(&s.image));
    Ok(out)
}

/// Reads and combines several datasets, then checks them as a whole ([`check`]); the error
/// lists every problem.
pub fn read_all(paths: &[PathBuf]) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for d in paths {
        let (_, s) = read(d)?;
        if s.is_empty() {
            return Err(bad(d, "no images"));
        }
        samples.extend(s);
    }
    let problems = check(&samples, &[]);
    if !problems.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the data has {} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        )));
    }
    Ok(samples)
}

/// Checks every sample before any work: files exist and decode their headers, masks exist
/// for anomalous images and match their image's size, no class is empty. Returns all
/// problems, one line each.
pub fn check(samples: &[Sample], classes_expected: &[String]) -> Vec<String> {
    let dims = |p: &Path| -> std::result::Result<(u32, u32), String> {
        image::ImageReader::open(p)
            .map_err(|e| e.to_string())?
            .with_guessed_format()
            .map_err(|e| e.to_string())?
            .into_dimensions()
            .map_err(|e| e.to_string())
    };
    let mut problems = Vec::new();
    for s in samples {
        let img = match dims(&s.image) {
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(format!("{}: unreadable image: {e}", s.image.display()));
                None
            }
        };
        match &s.mask {
            Some(m) => match dims(m) {
                Ok(md) => {
                    if let Some(id) = img {
                        if id != md {
                            problems.push(format!(
                                "{}: mask is {}x{} but the image {} is {}x{}",
                                m.display(),
                                md.0,
                                md.1,
                                s.image.display(),
                                id.0,
                                id.1
                            ));
                        }
                    }
                }
                Err(e) => problems.push(format!(
                    "{}: mask of {} is unreadable or missing: {e}",
                    m.display(),
                    s.image.display()
                )),
            },
            None if s.label == Some(true) => problems.push(format!(
                "{}: anomalous image without a mask",
                s.image.display()
            )),
            None => {}
        }
    }
    for c in classes_expected {
        if !samples.iter().any(|s| &s.class == c) {
            problems.push(format!("class `{c}` has no images"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch_png(p: &Path, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(w, h, image::Luma([v]))
            .save(p)
            .unwrap();
    }

    #[test]
    fn mvtec_layout_and_checks() {
        let d = std::env::temp_dir().join(format!("zsad-ds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        touch_png(&d.join("bottle/test/good/000.png"), 8, 8, 10);
        touch_png(&d.join("bottle/test/broken/000.png"), 8, 8, 10);
        touch_png(
            &d.join("bottle/ground_truth/broken/000_mask.png"),
            8,
            6,
            255,
        );
        touch_png(&d.join("bottle/test/crack/001.png"), 8, 8, 10);
        let (layout, s) = read(&d).unwrap();
        assert_eq!(layout, Layout::Mvtec);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].class, "bottle");
        let problems = check(&s, &["bottle".into(), "cable".into()]);
        // size mismatch, missing mask, empty class: all reported at once
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].contains("mask is 8x6"));
        assert!(problems[1].contains("001_mask.png"));
        assert!(problems[2].contains("`cable`"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn visa_split_csv_test_rows() {
        let d = std::env::temp_dir().join(format!("zsad-ds3-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("split_csv")).unwrap();
        std::fs::write(
            d.join("split_csv/1cls.csv"),
            "object,split,label,image,mask\n\
             candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n\
             candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n\
             pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png\n",
        )
        .unwrap();
        let (layout, s) = read(&d).unwrap();
        assert_eq!(layout, Layout::Visa);
        assert_eq!(s.len(), 2, "the test split only");
        assert_eq!(
            (s[0].class.as_str(), s[0].label, s[0].mask.is_none()),
            ("candle", Some(false), true)
        );
        assert_eq!(s[1].label, Some(true));
        assert_eq!(
            s[1].mask.as_deref(),
            Some(d.join("pcb1/Data/Masks/Anomaly/000.png").as_path())
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn side_by_side_and_manifest() {
        let d = std::env::temp_dir().join(format!("zsad-ds2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("MT_Free/Imgs")).unwrap();
        image::RgbImage::new(4, 4)
            .save(d.join("MT_Free/Imgs/a.jpg"))
            .unwrap();
        touch_png(&d.join("MT_Free/Imgs/a.png"), 4, 4, 0);
        touch_png(&d.join("MT_Crack/Imgs/b.png"), 4, 4, 9);
        touch_png(&d.join("MT_Crack/Imgs/b_mask.png"), 4, 4, 255);
        let (layout, s) = read(&d).unwrap();
        assert_eq!(layout, Layout::SideBySide);
        let names: Vec<(String, String)> = s
            .iter()
            .map(|s| (s.class.clone(), name_of(&s.image)))
            .collect();
        assert_eq!(
            names,
            vec![
                ("MT_Crack".to_string(), "b.png".to_string()),
                ("MT_Free".into(), "a.jpg".into())
            ]
        );
        let m = d.join("m.jsonl");
        std::fs::write(
            &m,
            "{\"image\":\"MT_Crack/Imgs/b.png\",\"mask\":\"MT_Crack/Imgs/b_mask.png\",\"label\":1,\"class\":\"tile\"}\n{\"image\":\"MT_Free/Imgs/a.jpg\",\"label\":\"normal\"}\n",
        )
        .unwrap();
        let s = read_manifest(&m).unwrap();
        assert_eq!(s[0].label, Some(true));
        assert_eq!(s[1].class, "all");
        assert_eq!(s[1].mask, None);
        assert!(check(&s, &[]).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
