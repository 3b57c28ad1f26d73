//! Annotated datasets: the MVTec AD layout, the VisA split CSV, manifests (CSV or JSON Lines)
//! and folders with masks beside the images (MTD). A dataset is a list of [`Sample`]s; it is
//! checked as a whole before any work, and every problem is reported at once: rows that do not
//! parse, missing or unreadable files, empty classes.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::inputs::{is_image_name, walk};
use crate::fsio::FileKind;
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
    /// The image's path inside its dataset: from the root (for one MVTec AD class folder, from
    /// its parent, so it starts with the class), as written in a manifest or the VisA CSV.
    /// `eval --predictions` falls back to it when the records name the images by other paths
    /// (another machine, another mount point).
    #[serde(default)]
    pub rel: PathBuf,
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
    /// beside it; the label comes from the mask. When the top folders are defect types of one
    /// product (each all normal or all anomalous: Magnetic Tile Defect), the class is the
    /// root's name.
    SideBySide,
}

/// How many problems an error lists before "... and N more": enough to see every kind of
/// mistake, few enough to read.
pub const MAX_LISTED: usize = 50;

/// `"{n} {what}:\n  p1\n  p2 ..."`, at most [`MAX_LISTED`] lines then "... and N more".
pub fn problem_list(what: &str, problems: &[String]) -> String {
    let mut s = format!("{} {what}:", problems.len());
    for p in problems.iter().take(MAX_LISTED) {
        s.push_str("\n  ");
        s.push_str(p);
    }
    if problems.len() > MAX_LISTED {
        s.push_str(&format!("\n  ... and {} more", problems.len() - MAX_LISTED));
    }
    s
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::dataset(format!("{}: {}", path.display(), msg.into()))
}

/// A dataset as read, before its files are checked.
#[derive(Debug, Default)]
pub struct Parsed {
    pub samples: Vec<Sample>,
    /// Where each sample was declared (`m.csv: line 5`), for the messages about its files;
    /// `None` for folder layouts, where the path says it all.
    pub origins: Vec<Option<String>>,
    /// Rows and folders that could not be read, with their line or path; they are not in
    /// `samples`.
    pub problems: Vec<String>,
}

impl Parsed {
    fn push(&mut self, s: Sample, origin: Option<String>) {
        self.samples.push(s);
        self.origins.push(origin);
    }
}

/// Reads `path` as whichever layout it has; every problem of its rows or folders is listed in
/// the error. The files themselves are checked by [`read_all`] / [`check`].
pub fn read(path: &Path) -> Result<(Layout, Vec<Sample>)> {
    let (layout, parsed) = parse(path)?;
    if !parsed.problems.is_empty() {
        return Err(Error::dataset(problem_list(
            &format!("problem(s) in {}", path.display()),
            &parsed.problems,
        )));
    }
    Ok((layout, parsed.samples))
}

/// Reads `path` as whichever layout it has, keeping going past bad rows and empty classes
/// (returned in [`Parsed::problems`]). Fails only when `path` cannot be read as a dataset at
/// all.
pub fn parse(path: &Path) -> Result<(Layout, Parsed)> {
    if path.is_file() {
        return Ok((Layout::Manifest, parse_manifest(path)?));
    }
    if !path.is_dir() {
        return Err(bad(path, "no such file or folder"));
    }
    let visa = path.join("split_csv/1cls.csv");
    if visa.is_file() {
        return Ok((Layout::Visa, parse_visa(path, &visa)?));
    }
    let mut parsed = Parsed::default();
    if path.join("test").is_dir() {
        read_mvtec_class(path, &mut parsed)?;
        return Ok((Layout::Mvtec, parsed));
    }
    let subdirs = sorted_dirs(path)?;
    let classes: Vec<&PathBuf> = subdirs.iter().filter(|d| d.join("test").is_dir()).collect();
    if !classes.is_empty() {
        for d in &subdirs {
            if d.join("test").is_dir() {
                read_mvtec_class(d, &mut parsed)?;
            } else if d.join("train").is_dir() || d.join("ground_truth").is_dir() {
                // A class half extracted or moved: leaving it out would silently change the
                // mean over classes.
                parsed.problems.push(format!(
                    "{}: an MVTec AD class folder without test/ (the other classes have one)",
                    d.display()
                ));
            }
        }
        return Ok((Layout::Mvtec, parsed));
    }
    let samples = read_side_by_side(path)?;
    if samples.is_empty() {
        return Err(bad(
            path,
            "not a dataset: expected an MVTec AD layout (<class>/test, <class>/ground_truth), a VisA root (split_csv/1cls.csv), a manifest file, or images with <stem>.png / <stem>_mask.png masks beside them",
        ));
    }
    for s in samples {
        parsed.push(s, None);
    }
    Ok((Layout::SideBySide, parsed))
}

fn sorted_dirs(p: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = crate::fsio::list_dir(p)
        .map_err(|e| Error::io(p, e))?
        .into_iter()
        .map(|n| p.join(n))
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

/// `p` relative to `base` (`p` itself when it is not under `base`).
fn rel_to(p: &Path, base: &Path) -> PathBuf {
    p.strip_prefix(base).unwrap_or(p).to_path_buf()
}

fn read_mvtec_class(class_dir: &Path, parsed: &mut Parsed) -> Result<()> {
    let class = name_of(class_dir);
    // From the class folder's parent: the class name is part of the path.
    let base = class_dir.parent().unwrap_or(Path::new(""));
    let before = parsed.samples.len();
    // A zsad output folder made inside test/ (`cd class/test && zsad detect good bad --out o`)
    // is not a defect type.
    let defects = sorted_dirs(&class_dir.join("test"))?
        .into_iter()
        .filter(|d| !crate::data::inputs::is_run_folder(d));
    for defect in defects {
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
            let rel = rel_to(&img, base);
            parsed.push(
                Sample {
                    image: img,
                    mask,
                    label: Some(!normal),
                    class: class.clone(),
                    rel,
                },
                None,
            );
        }
    }
    if parsed.samples.len() == before {
        parsed.problems.push(format!(
            "{}: class `{class}` has no images (expected test/<defect>/*.png)",
            class_dir.join("test").display()
        ));
    }
    Ok(())
}

/// The position of each column of `header` named in `wanted` (trimmed, any case: spreadsheets
/// pad headers and change their case, neither should lose a column).
fn column_positions(header: &csv::StringRecord, wanted: &[&str]) -> Vec<Option<usize>> {
    let names: Vec<String> = header.iter().map(|h| h.trim().to_lowercase()).collect();
    wanted
        .iter()
        .map(|w| names.iter().position(|n| n == w))
        .collect()
}

fn column_list(header: &csv::StringRecord) -> String {
    if header.iter().all(|h| h.trim().is_empty()) {
        "(none)".into()
    } else {
        header.iter().collect::<Vec<_>>().join(", ")
    }
}

/// The 1-based line a CSV record starts on.
fn csv_line(pos: Option<&csv::Position>, fallback: usize) -> usize {
    pos.map(|p| p.line() as usize).unwrap_or(fallback)
}

fn parse_visa(root: &Path, csv_path: &Path) -> Result<Parsed> {
    let text = crate::fsio::read_text(csv_path, FileKind::Manifest)?;
    let mut rd = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let header = rd
        .headers()
        .map_err(|e| bad(csv_path, e.to_string()))?
        .clone();
    const COLS: [&str; 5] = ["object", "split", "label", "image", "mask"];
    let pos = column_positions(&header, &COLS);
    let missing: Vec<String> = COLS
        .iter()
        .zip(&pos)
        .filter(|(_, p)| p.is_none())
        .map(|(c, _)| format!("`{c}`"))
        .collect();
    if !missing.is_empty() {
        return Err(bad(
            csv_path,
            format!(
                "no {} column; the columns are: {} (VisA's split_csv/1cls.csv has object, split, label, image, mask)",
                missing.join(", "),
                column_list(&header)
            ),
        ));
    }
    let [c_obj, c_split, c_label, c_img, c_mask] =
        [0, 1, 2, 3, 4].map(|i| pos[i].expect("checked"));
    let mut parsed = Parsed::default();
    let at = |line: usize| format!("{}: line {line}", csv_path.display());
    for (i, row) in rd.records().enumerate() {
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                let line = csv_line(e.position(), i + 2);
                parsed.problems.push(format!("{}: {e}", at(line)));
                continue;
            }
        };
        let line = csv_line(row.position(), i + 2);
        if row.get(c_split).map(str::trim) != Some("test") {
            continue;
        }
        let field = |c: usize| row.get(c).unwrap_or("").trim();
        let label = match field(c_label) {
            "anomaly" | "1" => true,
            "normal" | "0" => false,
            other => {
                parsed.problems.push(format!(
                    "{}: label `{other}` is not normal/anomaly (or 0/1)",
                    at(line)
                ));
                continue;
            }
        };
        if field(c_img).is_empty() {
            parsed.problems.push(format!("{}: empty `image`", at(line)));
            continue;
        }
        let mask = Some(field(c_mask))
            .filter(|m| !m.is_empty())
            .map(|m| root.join(m));
        parsed.push(
            Sample {
                image: root.join(field(c_img)),
                mask,
                label: Some(label),
                class: field(c_obj).to_string(),
                rel: PathBuf::from(field(c_img)),
            },
            Some(at(line)),
        );
    }
    Ok(parsed)
}

/// One manifest row before its paths are resolved.
struct ManifestRow {
    image: String,
    mask: Option<String>,
    label: Option<serde_json::Value>,
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
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "" => Some(None),
            "0" | "normal" | "good" | "false" => Some(Some(false)),
            "1" | "anomaly" | "anomalous" | "abnormal" | "true" => Some(Some(true)),
            _ => None,
        },
        _ => None,
    }
}

const LABELS: &str =
    "0/1, normal/anomaly, good, true/false, or empty (anomalous iff the mask has a positive pixel)";

const MANIFEST_COLUMNS: &str =
    "image (required), mask, label, class; paths relative to the manifest";

/// The rows of a CSV manifest, with the problems of the rows that do not parse.
fn manifest_csv_rows(
    path: &Path,
    text: &str,
) -> Result<(Vec<(usize, ManifestRow)>, Vec<(usize, String)>)> {
    let mut rd = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let header = rd
        .headers()
        .map_err(|e| bad(path, format!("manifest header: {e}")))?
        .clone();
    let pos = column_positions(&header, &["image", "mask", "label", "class"]);
    let Some(c_img) = pos[0] else {
        return Err(Error::dataset(format!(
            "manifest {}: no `image` column; the columns are: {} (expected a header line with {MANIFEST_COLUMNS})",
            path.display(),
            column_list(&header)
        )));
    };
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for (i, r) in rd.records().enumerate() {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                problems.push((csv_line(e.position(), i + 2), e.to_string()));
                continue;
            }
        };
        let line = csv_line(r.position(), i + 2);
        if r.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if r.len() != header.len() {
            problems.push((
                line,
                format!("{} fields, the header has {}", r.len(), header.len()),
            ));
            continue;
        }
        let get = |c: Option<usize>| {
            c.and_then(|c| r.get(c))
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let Some(image) = get(Some(c_img)) else {
            problems.push((line, "empty `image`".into()));
            continue;
        };
        rows.push((
            line,
            ManifestRow {
                image,
                mask: get(pos[1]),
                label: get(pos[2]).map(serde_json::Value::String),
                class: get(pos[3]),
            },
        ));
    }
    Ok((rows, problems))
}

/// The rows of a JSON Lines manifest, with the problems of the lines that do not parse.
fn manifest_jsonl_rows(
    path: &Path,
    text: &str,
) -> Result<(Vec<(usize, ManifestRow)>, Vec<(usize, String)>)> {
    use serde_json::Value;
    if text.trim_start().starts_with('[') {
        return Err(Error::dataset(format!(
            "manifest {}: a JSON array; a manifest is JSON Lines (one object per line, keys {MANIFEST_COLUMNS}) or a .csv file",
            path.display()
        )));
    }
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let mut keys = BTreeSet::new();
    let mut any_image = false;
    let mut no_image = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let obj = match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(o)) => o,
            Ok(_) => {
                problems.push((line, "not a JSON object".into()));
                continue;
            }
            Err(e) => {
                problems.push((line, format!("not JSON: {e}")));
                continue;
            }
        };
        keys.extend(obj.keys().cloned());
        any_image |= obj.contains_key("image");
        match jsonl_row(&obj) {
            Ok(Some(row)) => rows.push((line, row)),
            Ok(None) => no_image.push(line),
            Err(row_problems) => problems.extend(row_problems.into_iter().map(|p| (line, p))),
        }
    }
    let key_list = || {
        if keys.is_empty() {
            "(none)".to_string()
        } else {
            keys.iter().cloned().collect::<Vec<_>>().join(", ")
        }
    };
    if !any_image && !no_image.is_empty() {
        return Err(Error::dataset(format!(
            "manifest {}: no `image` key on any line; the keys are: {} (expected {MANIFEST_COLUMNS})",
            path.display(),
            key_list()
        )));
    }
    problems.extend(
        no_image
            .into_iter()
            .map(|l| (l, "no `image` key".to_string())),
    );
    Ok((rows, problems))
}

/// One JSON Lines manifest object as a row: `Ok(None)` when it has no `image` key, `Err` with
/// every problem of the row.
fn jsonl_row(
    obj: &serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<Option<ManifestRow>, Vec<String>> {
    use serde_json::Value;
    let text_of = |k: &str| -> std::result::Result<Option<String>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
            Some(v) => Err(format!("`{k}` is {v}, not a string")),
        }
    };
    let mut problems = Vec::new();
    let image = match text_of("image") {
        Ok(Some(s)) => Some(s),
        Ok(None) if !obj.contains_key("image") => None,
        Ok(None) => {
            problems.push("empty `image`".to_string());
            None
        }
        Err(e) => {
            problems.push(e);
            None
        }
    };
    let mask = text_of("mask").unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    let class = match obj.get("class") {
        // A number is a fine class name (`"class": 3`).
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => text_of("class").unwrap_or_else(|e| {
            problems.push(e);
            None
        }),
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(image.map(|image| ManifestRow {
        image,
        mask,
        label: obj.get("label").cloned(),
        class,
    }))
}

/// A manifest: `.csv` with a header, or JSON Lines (anything else), columns/keys `image`,
/// `mask`, `label` (0/1, normal/anomaly, or empty = from the mask), `class` (default: `all`).
/// Every row that does not parse is listed in the error.
pub fn read_manifest(path: &Path) -> Result<Vec<Sample>> {
    let parsed = parse_manifest(path)?;
    if !parsed.problems.is_empty() {
        return Err(Error::dataset(problem_list(
            &format!("problem(s) in {}", path.display()),
            &parsed.problems,
        )));
    }
    Ok(parsed.samples)
}

/// Like [`read_manifest`], keeping going past the rows that do not parse.
pub fn parse_manifest(path: &Path) -> Result<Parsed> {
    let base = path.parent().unwrap_or(Path::new("."));
    let text = crate::fsio::read_text(path, FileKind::Manifest)?;
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let (rows, mut problems) = if csv {
        manifest_csv_rows(path, &text)?
    } else {
        manifest_jsonl_rows(path, &text)?
    };
    let mut parsed = Parsed::default();
    for (line, r) in rows {
        let label = match &r.label {
            None => None,
            Some(v) => match parse_label(v) {
                Some(l) => l,
                None => {
                    problems.push((line, format!("label {v} is not {LABELS}")));
                    continue;
                }
            },
        };
        parsed.push(
            Sample {
                image: base.join(&r.image),
                mask: r.mask.map(|m| base.join(m)),
                label,
                class: r.class.unwrap_or_else(|| "all".into()),
                rel: PathBuf::from(&r.image),
            },
            Some(format!("{}: line {line}", path.display())),
        );
    }
    problems.sort_by_key(|(line, _)| *line);
    parsed.problems = problems
        .into_iter()
        .map(|(line, p)| format!("{}: line {line}: {p}", path.display()))
        .collect();
    Ok(parsed)
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
                rel: rel.to_path_buf(),
            });
        }
    }
    out.retain(|s| !masks.contains(&s.image) && is_image_name(&s.image));
    one_product_by_defect_type(root, &mut out);
    Ok(out)
}

/// Magnetic Tile Defect's layout: one product, one folder per defect type and one of normal
/// images (`MT_Blowhole/`, ..., `MT_Free/`). When every top folder's images are all normal or
/// all anomalous (read from their masks), and both kinds occur, the folders are defect types,
/// not classes: every sample gets the root's name as its class (image metrics need both labels
/// in one class). The labels read from the masks are kept.
fn one_product_by_defect_type(root: &Path, samples: &mut [Sample]) {
    let mut by_folder: std::collections::BTreeMap<String, Vec<bool>> = Default::default();
    let mut labels = Vec::with_capacity(samples.len());
    for s in samples.iter() {
        let Some(mask) = &s.mask else { return };
        let Ok(m) = crate::data::image::decode_mask(mask) else {
            return; // the file checks report it
        };
        let anomalous = m.as_raw().iter().any(|&v| v > 127);
        labels.push(anomalous);
        by_folder
            .entry(s.class.clone())
            .or_default()
            .push(anomalous);
    }
    let uniform = by_folder.values().all(|v| v.iter().all(|&a| a == v[0]));
    let kinds: BTreeSet<bool> = by_folder.values().map(|v| v[0]).collect();
    if by_folder.len() < 2 || !uniform || kinds.len() < 2 {
        return;
    }
    let product = name_of(root);
    for (s, anomalous) in samples.iter_mut().zip(labels) {
        s.class = product.clone();
        s.label = Some(anomalous);
    }
}

/// Reads and combines several datasets, then checks their files; the error lists every
/// problem of every dataset at once (rows that do not parse, empty classes, missing or
/// unreadable files), up to [`MAX_LISTED`] lines.
pub fn read_all(paths: &[PathBuf]) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let mut problems = Vec::new();
    for d in paths {
        match parse(d) {
            Err(e) => problems.push(e.to_string()),
            Ok((_, parsed)) => {
                if parsed.samples.is_empty() && parsed.problems.is_empty() {
                    problems.push(format!("{}: no images", d.display()));
                }
                problems.extend(parsed.problems);
                problems.extend(check_files(&parsed.samples, &parsed.origins));
                samples.extend(parsed.samples);
            }
        }
    }
    if !problems.is_empty() {
        return Err(Error::dataset(format!(
            "the data has {}",
            problem_list("problem(s)", &problems)
        )));
    }
    Ok(samples)
}

/// Checks every sample before any work: files exist and decode their headers, masks exist
/// for anomalous images and match their image's size, no class is empty. Returns all
/// problems, one line each.
pub fn check(samples: &[Sample], classes_expected: &[String]) -> Vec<String> {
    let mut problems = check_files(samples, &[]);
    for c in classes_expected {
        if !samples.iter().any(|s| &s.class == c) {
            problems.push(format!("class `{c}` has no images"));
        }
    }
    problems
}

/// The file problems of `samples`, each prefixed with its origin (`m.csv: line 5: `) where
/// `origins` has one.
fn check_files(samples: &[Sample], origins: &[Option<String>]) -> Vec<String> {
    // Only the header is read, through the guarded reader: a FIFO or a device in a manifest
    // row is refused without a read, never waited on.
    let dims = |p: &Path| -> std::result::Result<(u32, u32), String> {
        if std::fs::symlink_metadata(p).is_err() {
            return Err("not found".into());
        }
        crate::data::image::dimensions(p)
            .map_err(|e| crate::data::image::strip_path(e.to_string(), p))
    };
    let mut problems = Vec::new();
    for (k, s) in samples.iter().enumerate() {
        let at = match origins.get(k) {
            Some(Some(o)) => format!("{o}: "),
            _ => String::new(),
        };
        let img = match dims(&s.image) {
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(format!("{at}image {}: {e}", s.image.display()));
                None
            }
        };
        match &s.mask {
            Some(m) => match dims(m) {
                Ok(md) => {
                    if let Some(id) = img {
                        if id != md {
                            problems.push(format!(
                                "{at}{}: mask is {}x{} but the image {} is {}x{}",
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
                    "{at}mask {} of {}: {e}",
                    m.display(),
                    s.image.display()
                )),
            },
            None if s.label == Some(true) => problems.push(format!(
                "{at}{}: anomalous image without a mask",
                s.image.display()
            )),
            None => {}
        }
    }
    problems
}

/// The normal components of `p` (no root, `.` or `..`), as strings.
pub fn path_words(p: &Path) -> Vec<String> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
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
        // Magnetic Tile Defect: the folders are defect types of one product, named after the
        // root, with the labels read from the masks.
        let root = name_of(&d);
        assert_eq!(
            names,
            vec![(root.clone(), "b.png".to_string()), (root, "a.jpg".into())]
        );
        assert_eq!((s[0].label, s[1].label), (Some(true), Some(false)));
        // Folders that each hold normal and anomalous images are classes.
        touch_png(&d.join("MT_Crack/Imgs/c.png"), 4, 4, 9);
        touch_png(&d.join("MT_Crack/Imgs/c_mask.png"), 4, 4, 0);
        let (_, s) = read(&d).unwrap();
        let classes: BTreeSet<&str> = s.iter().map(|s| s.class.as_str()).collect();
        assert_eq!(classes, BTreeSet::from(["MT_Crack", "MT_Free"]));
        std::fs::remove_file(d.join("MT_Crack/Imgs/c.png")).unwrap();
        std::fs::remove_file(d.join("MT_Crack/Imgs/c_mask.png")).unwrap();
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

    fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn a_manifest_reports_every_parse_and_file_problem_at_once() {
        let d = std::env::temp_dir().join(format!("zsad-ds4-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        touch_png(&d.join("ok.png"), 4, 4, 0);
        touch_png(&d.join("ok_mask.png"), 4, 4, 255);
        let m = d.join("m.csv");
        // 8 problems: 3 that do not parse (labels, an empty image, a short row) and 4 files
        // (two images, two masks) plus one anomalous image without a mask.
        std::fs::write(
            &m,
            "image,mask,label,class\n\
             ok.png,ok_mask.png,1,a\n\
             ok.png,,maybe,a\n\
             ,ok_mask.png,1,a\n\
             gone1.png,,0,a\n\
             ok.png,gone_mask.png,1,a\n\
             ok.png,,2,a\n\
             gone2.png,gone2_mask.png,1,b\n\
             ok.png,,1,b\n\
             ok.png,ok_mask.png\n",
        )
        .unwrap();
        let e = err_of(read_all(&[m.clone()]));
        assert!(e.contains("the data has 9 problem(s)"), "{e}");
        let ms = m.display();
        for want in [
            format!("{ms}: line 3: label \"maybe\" is not 0/1"),
            format!("{ms}: line 4: empty `image`"),
            format!(
                "{ms}: line 5: image {}: not found",
                d.join("gone1.png").display()
            ),
            format!("{ms}: line 6: mask {}", d.join("gone_mask.png").display()),
            format!("{ms}: line 7: label \"2\""),
            format!("{ms}: line 8: image {}", d.join("gone2.png").display()),
            format!("{ms}: line 8: mask {}", d.join("gone2_mask.png").display()),
            format!(
                "{ms}: line 9: {}: anomalous image without a mask",
                d.join("ok.png").display()
            ),
            format!("{ms}: line 10: 2 fields, the header has 4"),
        ] {
            assert!(e.contains(&want), "missing `{want}` in\n{e}");
        }
        // In line order.
        let l3 = e.find("line 3:").unwrap();
        let l10 = e.find("line 10:").unwrap();
        assert!(l3 < l10);

        // JSON Lines: the same, by line.
        let j = d.join("m.jsonl");
        std::fs::write(
            &j,
            "{\"image\":\"ok.png\",\"mask\":\"ok_mask.png\",\"label\":1}\n\
             {\"image\":\"\",\"label\":0}\n\
             {\"img\":\"ok.png\"}\n\
             not json\n\
             \n\
             {\"image\":\"gone.png\",\"label\":\"bad\"}\n\
             {\"image\":\"gone.png\",\"label\":0}\n",
        )
        .unwrap();
        let e = err_of(read_all(&[j.clone()]));
        assert!(e.contains("the data has 5 problem(s)"), "{e}");
        for want in [
            "line 2: empty `image`",
            "line 3: no `image` key",
            "line 4: not JSON",
            "line 6: label \"bad\"",
            "line 7: image ",
        ] {
            assert!(e.contains(want), "missing `{want}` in\n{e}");
        }
        // Several datasets: the problems of all of them.
        let e = err_of(read_all(&[m, j, d.join("nowhere")]));
        assert!(e.contains("the data has 15 problem(s)"), "{e}");
        assert!(e.contains("nowhere: no such file or folder"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_manifest_without_an_image_column_says_so() {
        let d = std::env::temp_dir().join(format!("zsad-ds5-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let m = d.join("m.csv");
        std::fs::write(&m, "path,mask,label\na.png,,0\n").unwrap();
        let e = err_of(read_manifest(&m));
        assert_eq!(
            e,
            format!(
                "manifest {}: no `image` column; the columns are: path, mask, label (expected a header line with image (required), mask, label, class; paths relative to the manifest)",
                m.display()
            )
        );
        // Headers are matched trimmed and in any case.
        std::fs::write(&m, " Image ,Label\na.png,0\n").unwrap();
        assert_eq!(read_manifest(&m).unwrap()[0].rel, PathBuf::from("a.png"));
        let j = d.join("m.jsonl");
        std::fs::write(&j, "{\"path\":\"a.png\"}\n{\"file\":\"b.png\"}\n").unwrap();
        let e = err_of(read_manifest(&j));
        assert!(
            e.contains("no `image` key on any line; the keys are: file, path"),
            "{e}"
        );
        std::fs::write(&j, "[{\"image\":\"a.png\"}]\n").unwrap();
        assert!(err_of(read_manifest(&j)).contains("a JSON array"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_empty_mvtec_class_is_reported() {
        let d = std::env::temp_dir().join(format!("zsad-ds6-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        touch_png(&d.join("bottle/test/good/000.png"), 8, 8, 10);
        std::fs::create_dir_all(d.join("cable/test/good")).unwrap();
        std::fs::create_dir_all(d.join("screw/train/good")).unwrap();
        let e = err_of(read_all(&[d.clone()]));
        assert!(e.contains("the data has 2 problem(s)"), "{e}");
        assert!(
            e.contains(&format!(
                "{}: class `cable` has no images",
                d.join("cable/test").display()
            )),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "{}: an MVTec AD class folder without test/",
                d.join("screw").display()
            )),
            "{e}"
        );
        // One class folder given directly.
        let e = err_of(read_all(&[d.join("cable")]));
        assert!(e.contains("class `cable` has no images"), "{e}");
        let (_, s) = read(&d.join("bottle")).unwrap();
        assert_eq!(s[0].rel, Path::new("bottle/test/good/000.png"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn long_lists_are_cut() {
        let problems: Vec<String> = (0..57).map(|i| format!("p{i}")).collect();
        let s = problem_list("problem(s)", &problems);
        assert!(s.starts_with("57 problem(s):\n  p0\n"));
        assert!(s.contains("\n  p49\n  ... and 7 more"), "{s}");
        assert!(!s.contains("p50"));
    }
}
