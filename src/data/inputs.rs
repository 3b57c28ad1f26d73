//! Turning command-line inputs (files, folders, `-` for a list on stdin) into the list of images
//! to score, each with the path the user gave and a collision-free output name, plus the
//! deterministic sharding that splits a dataset across machines.
//!
//! A folder is hostile until walked: only regular files are read (a FIFO or a device named
//! `x.png` becomes a failed input, never a read), a folder reached twice through symbolic links
//! (a `..` link, a cycle) is walked once, and masks are not images to score (`ground_truth/` and
//! `Masks/` folders, `X.png` beside `X.jpg`, `X_mask.png` beside `X.png`: the layouts `zsad eval`
//! reads) unless asked for.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::BufRead;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// File extensions picked up when walking a folder (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"];

/// Folders that hold masks in the dataset layouts `zsad eval` reads (MVTec AD, VisA).
pub const MASK_FOLDERS: &[&str] = &["ground_truth", "Masks"];

/// One image to score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Where to read it.
    pub path: PathBuf,
    /// The path as the user gave it (folder argument joined with the file's place in it): the
    /// `path` of its output record. Bytes that are not UTF-8 are written `\xNN`.
    pub given: String,
    /// Output name without extension, `/`-separated, relative to the output folder's `maps/`
    /// and `heatmaps/`; unique among the inputs of a run, ignoring case.
    pub key: String,
}

/// An input that named nothing readable (reported as a failed record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub given: String,
    pub error: String,
    /// A path named as an argument that does not exist (a typo: callers refuse the run rather
    /// than record it).
    pub argument_not_found: bool,
}

/// The arguments, expanded.
#[derive(Debug, Default)]
pub struct Expanded {
    pub inputs: Vec<Input>,
    pub missing: Vec<Missing>,
    /// Mask files left out of folder walks (see [`WalkOptions::include_masks`]).
    pub masks_skipped: usize,
    /// Folders reached a second time through a symbolic link (cycles included), walked once.
    pub links_skipped: usize,
    /// Folders left out of walks: the run's own output folder, and folders holding a zsad
    /// `run.json` (the outputs of other runs).
    pub runs_skipped: Vec<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct WalkOptions {
    /// Keep mask files (by default they are counted and left out).
    pub include_masks: bool,
    /// Folders never walked (canonical paths): the run's own output folder, so that a run
    /// whose output is inside its inputs does not score its own maps.
    pub exclude: Vec<PathBuf>,
}

/// What a folder walk found.
#[derive(Debug, Default)]
pub struct Walk {
    /// Image files, sorted.
    pub files: Vec<PathBuf>,
    /// Image-named entries that cannot be read as images (FIFOs, devices, broken links,
    /// unreadable folders), with why.
    pub problems: Vec<(PathBuf, String)>,
    pub masks_skipped: usize,
    pub links_skipped: usize,
    /// Output folders left out (see [`Expanded::runs_skipped`]).
    pub runs_skipped: Vec<PathBuf>,
}

/// Whether `dir` holds the outputs of a zsad run: a `run.json` that zsad wrote (it names its
/// record format), beside which the maps and heatmaps are not inputs.
pub fn is_run_folder(dir: &Path) -> bool {
    let rj = dir.join(crate::data::run_record::FILE_NAME);
    crate::fsio::read_text(&rj, crate::fsio::FileKind::Settings).is_ok_and(|t| {
        serde_json::from_str::<serde_json::Value>(&t)
            .is_ok_and(|v| v.get("record_format_version").is_some())
    })
}

pub fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// A path as text for records and messages: UTF-8 as is, any other byte as `\xNN`, so two
/// names that differ only in such bytes stay two names (a lossy conversion would merge them).
pub fn path_text(p: &Path) -> String {
    escape_bytes(p.as_os_str().as_bytes(), |_| false)
}

/// The path that [`path_text`] wrote as `text`: each `\xNN` of a byte that cannot start or
/// continue UTF-8 on its own (`NN` at least `80`, as `path_text` writes them) turned back into
/// that byte. A name that holds the characters `\xFF` itself reads the same text: try the
/// literal path first.
pub fn path_of_text(text: &str) -> PathBuf {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let byte = (b[i] == b'\\' && b.get(i + 1) == Some(&b'x'))
            .then(|| text.get(i + 2..i + 4))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .filter(|&v| v >= 0x80);
        match byte {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// `bytes` as UTF-8 text; invalid bytes become `\xNN`, and characters for which `escape` says
/// so become `%XX` per byte.
fn escape_bytes(bytes: &[u8], escape: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if escape(c) {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// One path component of an output name: `%`, `\` and invalid UTF-8 percent-encoded, so the
/// mapping from components to names is one-to-one (`back\slash.png` and `back/slash.jpg` get
/// different files) and every name is a plain file name on every system.
fn key_component(c: &OsStr) -> String {
    let text = escape_bytes(c.as_bytes(), |ch| matches!(ch, '%' | '\\' | ':'));
    // Invalid bytes came out as `\xNN`; in a file name they are spelled `%NN` instead.
    text.replace("\\x", "%")
}

/// Mask files among one folder's image files, by the rules of the side-by-side layout:
/// `X.png` beside a non-PNG `X.*`, and `X_mask.png` beside `X.*`.
fn masks_among(files: &[PathBuf]) -> HashSet<PathBuf> {
    let is_png = |f: &Path| f.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let stems: HashMap<Vec<u8>, Vec<&PathBuf>> = files.iter().fold(HashMap::new(), |mut m, f| {
        let stem = f.file_stem().unwrap_or_default().as_bytes().to_vec();
        m.entry(stem).or_default().push(f);
        m
    });
    let mut masks = HashSet::new();
    for f in files.iter().filter(|f| is_png(f)) {
        let stem = f.file_stem().unwrap_or_default().as_bytes();
        let beside_other = stems
            .get(stem)
            .is_some_and(|v| v.iter().any(|g| *g != f && !is_png(g)));
        let mask_of = stem
            .strip_suffix(b"_mask")
            .is_some_and(|s| stems.contains_key(s));
        if beside_other || mask_of {
            masks.insert(f.clone());
        }
    }
    masks
}

/// Image files under `dir`, recursively, sorted; hidden files and folders (`.name`) are
/// skipped; symbolic links are followed (as `find -L`) but every folder is walked once. Masks
/// are kept: this is the dataset readers' walk. See [`walk_with`].
pub fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(walk_with(
        dir,
        &WalkOptions {
            include_masks: true,
            ..Default::default()
        },
    )?
    .files)
}

/// Walks `dir` (see the module docs). Fails only when `dir` itself cannot be read; problems
/// below it are returned in [`Walk::problems`].
pub fn walk_with(dir: &Path, opts: &WalkOptions) -> Result<Walk> {
    let mut walk = Walk::default();
    let root = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    // Outputs named as the folder itself are never inputs.
    if opts
        .exclude
        .iter()
        .any(|x| dir.canonicalize().is_ok_and(|c| &c == x))
    {
        walk.runs_skipped.push(dir.to_path_buf());
        return Ok(walk);
    }
    let mut visited: HashSet<(u64, u64)> = HashSet::from([(root.dev(), root.ino())]);
    // A mask folder named on the command line is a mask folder too.
    let root_is_masks = dir
        .file_name()
        .is_some_and(|n| MASK_FOLDERS.iter().any(|f| n.as_bytes() == f.as_bytes()));
    let mut stack = vec![(dir.to_path_buf(), root_is_masks)];
    let mut first = true;
    while let Some((d, in_mask_folder)) = stack.pop() {
        let entries = match crate::fsio::list_dir(&d) {
            Ok(e) => e,
            Err(e) if first => return Err(Error::io(&d, e)),
            Err(e) => {
                walk.problems
                    .push((d.clone(), format!("cannot read this folder: {e}")));
                continue;
            }
        };
        first = false;
        let names: Vec<_> = entries
            .into_iter()
            .filter(|n| !n.as_bytes().starts_with(b"."))
            .collect();
        let mut files = Vec::new();
        let mut subdirs = Vec::new();
        for name in names {
            let p = d.join(&name);
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => {
                    let excluded = opts
                        .exclude
                        .iter()
                        .any(|x| p.canonicalize().is_ok_and(|c| &c == x))
                        || is_run_folder(&p);
                    if excluded {
                        walk.runs_skipped.push(p);
                    } else if visited.insert((m.dev(), m.ino())) {
                        let masks = in_mask_folder
                            || MASK_FOLDERS.iter().any(|f| name.as_bytes() == f.as_bytes());
                        subdirs.push((p, masks));
                    } else {
                        walk.links_skipped += 1;
                    }
                }
                Ok(m) if m.is_file() => {
                    if is_image_name(&p) {
                        files.push(p);
                    }
                }
                Ok(m) => {
                    if is_image_name(&p) {
                        let kind = crate::fsio::object_kind(&m.file_type());
                        walk.problems
                            .push((p, format!("{kind}: only regular files are read")));
                    }
                }
                Err(e) => unreadable_entry(p, e, &mut walk),
            }
        }
        if !opts.include_masks {
            let masks = if in_mask_folder {
                files.iter().cloned().collect()
            } else {
                masks_among(&files)
            };
            walk.masks_skipped += masks.len();
            files.retain(|f| !masks.contains(f));
        }
        walk.files.extend(files);
        // Popped in name order: which of two links to one folder is walked does not depend on
        // the order the file system lists them in.
        stack.extend(subdirs.into_iter().rev());
    }
    walk.files.sort();
    walk.problems.sort();
    Ok(walk)
}

/// A folder entry whose metadata cannot be read: a link loop (a problem when it is named as an
/// image, else a link walked once), a broken link, or another error, named.
fn unreadable_entry(p: PathBuf, e: std::io::Error, walk: &mut Walk) {
    let looped = e.raw_os_error() == Some(libc::ELOOP);
    if !is_image_name(&p) {
        walk.links_skipped += looped as usize;
        return;
    }
    let what = if looped {
        "a symbolic link that never ends (it points to itself or a cycle)".to_string()
    } else if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_symlink()) {
        "broken symbolic link".to_string()
    } else {
        format!("cannot read: {e}")
    };
    walk.problems.push((p, what));
}

/// A relative path safe to put under the output folder: no root, no `.`, `..` spelled `__`.
fn sanitize(p: &Path) -> Vec<String> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(key_component(s)),
            Component::ParentDir => Some("__".into()),
            Component::RootDir | Component::Prefix(_) | Component::CurDir => None,
        })
        .collect()
}

/// `rel` as an output name, without the extension when `strip`.
fn key_of(rel: &Path, strip: bool) -> String {
    let rel = if strip && rel.extension().is_some() {
        rel.with_extension("")
    } else {
        rel.to_path_buf()
    };
    let parts: Vec<String> = sanitize(&rel)
        .iter()
        .map(|c| crate::fsio::shorten(c, MAX_KEY_COMPONENT))
        .collect();
    if parts.is_empty() {
        return "_".into();
    }
    let key = parts.join("/");
    if key.len() <= MAX_KEY {
        return key;
    }
    // A path too deep for any file system once under the output folder: one hashed name.
    format!(
        "_long/{}",
        crate::fsio::shorten(&key.replace('/', "%2F"), MAX_KEY_COMPONENT)
    )
}

/// The longest component of an output name: room for `.png`, a `~N` suffix and the writer's
/// temporary `.NAME.tmp-PID` within a file system's 255 bytes.
const MAX_KEY_COMPONENT: usize = 180;

/// The longest output name: the output folder's own path and `heatmaps/` still fit in
/// `PATH_MAX` (4096).
const MAX_KEY: usize = 1024;

/// The longest line of a path list: Linux's `PATH_MAX`. Anything longer is not a path (a
/// binary file or `/dev/zero` on stdin) and is refused before it can take memory.
const MAX_LIST_LINE: usize = 4096;

/// Reads one path per line (any bytes but `\n`; a trailing `\r` is dropped), at most
/// [`MAX_LIST_LINE`] bytes a line and the bound of [`crate::fsio::FileKind::PathList`] in all.
fn read_list(stdin: &mut dyn BufRead) -> Result<Vec<PathBuf>> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut line = Vec::new();
    let mut total = 0u64;
    let limit = crate::fsio::FileKind::PathList.max_bytes();
    loop {
        line.clear();
        let n = stdin
            .take(MAX_LIST_LINE as u64 + 2)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io("<stdin>", e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        let t = line.strip_suffix(b"\n").unwrap_or(&line);
        let t = t.strip_suffix(b"\r").unwrap_or(t);
        if t.len() > MAX_LIST_LINE || total > limit {
            return Err(crate::error::OptionError::rule(format!(
                "`-` (paths on stdin): line {} is longer than {MAX_LIST_LINE} bytes (or the list passes {limit} bytes): stdin must be a list of paths, one per line",
                out.len() + 1
            )));
        }
        if !t.is_empty() {
            out.push(PathBuf::from(OsStr::from_bytes(t)));
        }
    }
    Ok(out)
}

/// Expands the arguments in order. Folders are walked ([`walk_with`]); files are taken
/// whatever their extension; `-` reads one path per line from `stdin`. The same path named
/// twice is one input. Output keys are the path inside the folder (for folder arguments) or
/// the path as given (files), without extension; where two inputs would share a key (ignoring
/// case, as some file systems do), they keep their extension; where that is not enough, the
/// full given path; then a `~N` suffix.
pub fn expand(args: &[String], stdin: &mut dyn BufRead, opts: &WalkOptions) -> Result<Expanded> {
    let mut ex = Expanded::default();
    let mut found: Vec<Found> = Vec::new();
    let add_file = |p: &Path, listed: bool, ex: &mut Expanded, found: &mut Vec<_>| {
        let given = path_text(p);
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() => found.push((p.to_path_buf(), given, p.to_path_buf())),
            Ok(m) if m.is_dir() => ex.missing.push(Missing {
                given,
                error: "a folder: name folders as arguments, not in a list".into(),
                argument_not_found: false,
            }),
            Ok(m) => ex.missing.push(Missing {
                given,
                error: format!(
                    "{}: only regular files are read",
                    crate::fsio::object_kind(&m.file_type())
                ),
                argument_not_found: false,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ex.missing.push(Missing {
                given,
                error: if listed {
                    "no such file".into()
                } else {
                    "no such file or folder".into()
                },
                argument_not_found: !listed,
            }),
            Err(e) => ex.missing.push(Missing {
                given,
                error: if e.raw_os_error() == Some(libc::ELOOP) {
                    "a symbolic link that never ends (it points to itself or a cycle)".into()
                } else {
                    format!("cannot read: {e}")
                },
                argument_not_found: false,
            }),
        }
    };
    let mut walked = HashSet::new();
    for arg in args {
        if arg == "-" {
            for p in read_list(stdin)? {
                add_file(&p, true, &mut ex, &mut found);
            }
            continue;
        }
        let p = Path::new(arg);
        if p.is_dir() {
            // The same folder named twice is walked once (its files would be one input each
            // anyway; this keeps the skipped counts true).
            if !walked.insert(std::fs::canonicalize(p).map_err(|e| Error::io(p, e))?) {
                continue;
            }
            let w = walk_with(p, opts)?;
            ex.masks_skipped += w.masks_skipped;
            ex.links_skipped += w.links_skipped;
            ex.runs_skipped.extend(w.runs_skipped);
            for (f, why) in w.problems {
                ex.missing.push(Missing {
                    given: path_text(&f),
                    error: why,
                    argument_not_found: false,
                });
            }
            for f in w.files {
                let rel = f.strip_prefix(p).unwrap_or(&f).to_path_buf();
                found.push((f, path_text(&p.join(&rel)), rel));
            }
        } else {
            add_file(p, false, &mut ex, &mut found);
        }
    }
    let found = unique(found, &mut ex.missing);
    ex.inputs = with_keys(found);
    Ok(ex)
}

/// `(path, given, path relative to its folder argument)` of a found file.
type Found = (PathBuf, String, PathBuf);

/// The same path named twice is one input; two different paths with one text (only possible
/// with a file literally named `\xNN` beside one with that byte) could not be told apart in
/// their records: the second is named in `missing`.
fn unique(mut found: Vec<Found>, missing: &mut Vec<Missing>) -> Vec<Found> {
    let mut seen_paths = HashSet::new();
    found.retain(|(path, _, _)| seen_paths.insert(path.clone()));
    let mut seen_given: HashMap<String, PathBuf> = HashMap::new();
    found.retain(|(path, given, _)| match seen_given.get(given) {
        Some(other) if other != path => {
            missing.push(Missing {
                given: given.clone(),
                error: format!(
                    "its name reads the same as another input's ({}): rename one of them",
                    path_text(other)
                ),
                argument_not_found: false,
            });
            false
        }
        _ => {
            seen_given.insert(given.clone(), path.clone());
            true
        }
    });
    found
}

/// Output keys, unique ignoring case: the path in its folder without extension; where two
/// would share one, with extension; where that is not enough, the full path; then `~N`.
fn with_keys(found: Vec<Found>) -> Vec<Input> {
    let fold = |k: &str| k.to_lowercase();
    let mut count: HashMap<String, usize> = HashMap::new();
    for (_, _, rel) in &found {
        *count.entry(fold(&key_of(rel, true))).or_default() += 1;
    }
    let mut taken = HashSet::new();
    let mut out = Vec::with_capacity(found.len());
    for (path, given, rel) in found {
        let stripped = key_of(&rel, true);
        let mut key = if count[&fold(&stripped)] > 1 {
            key_of(&rel, false)
        } else {
            stripped
        };
        if taken.contains(&fold(&key)) {
            key = key_of(
                Path::new(OsStr::from_bytes(path.as_os_str().as_bytes())),
                false,
            );
        }
        let base = key.clone();
        let mut n = 2;
        while taken.contains(&fold(&key)) {
            key = format!("{base}~{n}");
            n += 1;
        }
        taken.insert(fold(&key));
        out.push(Input { path, given, key });
    }
    out
}

/// `--shard K/N`: which of `n` shards (0-based `k`) an input belongs to, by a stable hash of the
/// path as given, so every machine agrees without sharing a list, whatever order it lists in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub k: u64,
    pub n: u64,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not K/N (e.g. 0/4)"))?;
        let k: u64 = k
            .trim()
            .parse()
            .map_err(|_| format!("`{k}` is not a number"))?;
        let n: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("`{n}` is not a number"))?;
        if n == 0 || k >= n {
            return Err(format!("shard {k}/{n}: K must be in 0..N (0-based)"));
        }
        Ok(Self { k, n })
    }
}

impl Shard {
    pub fn contains(&self, given: &str) -> bool {
        // FNV-1a 64
        let mut h: u64 = 0xcbf29ce484222325;
        for b in given.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        h % self.n == self.k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn folders_files_stdin_and_collisions() {
        let d = std::env::temp_dir().join(format!("zsad-inputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        touch(&d.join("a/good/0.tif"));
        touch(&d.join("a/good/0.jpg"));
        // A mask beside its image, and MVTec's mask folder: left out of the walk.
        touch(&d.join("a/good/m.jpg"));
        touch(&d.join("a/good/m.png"));
        touch(&d.join("a/ground_truth/bad/1_mask.png"));
        touch(&d.join("a/bad/1.PNG"));
        touch(&d.join("a/notes.txt"));
        touch(&d.join("a/.hidden/2.png"));
        touch(&d.join("b/good/0.jpg"));
        let a = d.join("a").display().to_string();
        let b = d.join("b").display().to_string();
        let extra = d.join("a/notes.txt").display().to_string();
        let mut stdin = std::io::Cursor::new(format!("{extra}\n\n/nonexistent/x.png\n"));
        let ex = expand(
            &[a.clone(), b, "-".into(), a.clone()],
            &mut stdin,
            &WalkOptions::default(),
        )
        .unwrap();
        assert_eq!(ex.masks_skipped, 2);
        let (inputs, missing) = (ex.inputs, ex.missing);
        let keys: Vec<String> = inputs.iter().map(|i| i.key.clone()).collect();
        assert_eq!(
            keys,
            vec![
                "bad/1".to_string(),
                "good/0.jpg".into(),
                "good/0.tif".into(),
                "good/m".into(),
                // b/good/0.jpg would take a's key: it falls back to its full path
                d.join("b/good/0.jpg")
                    .strip_prefix("/")
                    .unwrap()
                    .display()
                    .to_string(),
                // the explicitly named text file keeps its path
                d.join("a/notes")
                    .strip_prefix("/")
                    .unwrap()
                    .display()
                    .to_string(),
            ]
        );
        assert_eq!(inputs[0].given, format!("{a}/bad/1.PNG"));
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].error, "no such file");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn output_names_are_one_to_one() {
        assert_eq!(key_of(Path::new("back\\slash.png"), true), "back%5Cslash");
        assert_eq!(key_of(Path::new("back/slash.png"), true), "back/slash");
        assert_eq!(key_of(Path::new("100%.png"), true), "100%25");
        assert_eq!(
            key_of(Path::new(OsStr::from_bytes(b"a\xff.png")), true),
            "a%FF"
        );
        assert_eq!(key_of(Path::new("../x/./y.png"), true), "__/x/y");
        assert_eq!(
            path_text(Path::new(OsStr::from_bytes(b"a\xff\xfe.png"))),
            "a\\xFF\\xFE.png"
        );
        assert_eq!(path_text(Path::new("plain/ü.png")), "plain/ü.png");
        for bytes in [
            &b"a\xff\xfe.png"[..],
            b"d/\xc3(x\\xZZ\\x4.png",
            "ü\\x41".as_bytes(),
        ] {
            let p = Path::new(OsStr::from_bytes(bytes));
            assert_eq!(path_of_text(&path_text(p)), p, "{bytes:?}");
        }
        // Only bytes path_text escapes are read back: `\x41` stays text.
        assert_eq!(
            path_of_text("a\\x41\\xff"),
            Path::new(OsStr::from_bytes(b"a\\x41\xff"))
        );
    }

    #[test]
    fn shards_partition_the_inputs() {
        let names: Vec<String> = (0..1000).map(|i| format!("img/{i}.png")).collect();
        let shards: Vec<Shard> = (0..4).map(|k| format!("{k}/4").parse().unwrap()).collect();
        let mut sizes = [0usize; 4];
        for n in &names {
            let owners: Vec<usize> = (0..4).filter(|&k| shards[k].contains(n)).collect();
            assert_eq!(owners.len(), 1);
            sizes[owners[0]] += 1;
        }
        assert!(sizes.iter().all(|&s| (200..300).contains(&s)), "{sizes:?}");
        assert!("4/4".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }
}
