//! Turning command-line inputs (files, folders, `-` for a list on stdin) into the list of images
//! to score, each with the path the user gave and a collision-free output name, plus the
//! deterministic sharding that splits a dataset across machines.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// File extensions picked up when walking a folder (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"];

/// One image to score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Where to read it.
    pub path: PathBuf,
    /// The path as the user gave it (folder argument joined with the file's place in it): the
    /// `path` of its output record.
    pub given: String,
    /// Output name without extension, relative to the output folder's `maps/` and `heatmaps/`.
    pub key: PathBuf,
}

/// An input argument that named nothing usable (reported as a failed record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub given: String,
    pub error: String,
}

pub fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Image files under `dir`, recursively, sorted; hidden files and folders (`.name`) are skipped.
pub fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&d, e))?;
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ft = entry.file_type().map_err(|e| Error::io(&p, e))?;
            // Follow symlinks to files and folders, as `find -L` would.
            let is_dir = ft.is_dir() || (ft.is_symlink() && p.is_dir());
            if is_dir {
                stack.push(p);
            } else if is_image_name(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A relative path safe to put under the output folder: no root, no `.`, `..` spelled `__`.
fn sanitize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::ParentDir => out.push("__"),
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
        }
    }
    out
}

/// Expands the arguments in order. Folders are walked; files are taken whatever their
/// extension; `-` reads one path per line from `stdin`. Exact duplicates are dropped. Output
/// keys are the path inside the folder (for folder arguments) or the path as given (files),
/// without extension; where two inputs would share a key, they keep their extension.
pub fn expand(args: &[String], stdin: &mut dyn BufRead) -> Result<(Vec<Input>, Vec<Missing>)> {
    let mut found: Vec<(PathBuf, String, PathBuf)> = Vec::new(); // (path, given, rel)
    let mut missing = Vec::new();
    let add_file = |p: &Path, found: &mut Vec<_>| {
        found.push((p.to_path_buf(), p.display().to_string(), sanitize(p)));
    };
    for arg in args {
        if arg == "-" {
            let mut line = String::new();
            loop {
                line.clear();
                let n = stdin
                    .read_line(&mut line)
                    .map_err(|e| Error::io("<stdin>", e))?;
                if n == 0 {
                    break;
                }
                let t = line.trim_end_matches(['\n', '\r']);
                if t.is_empty() {
                    continue;
                }
                let p = Path::new(t);
                if p.is_file() {
                    add_file(p, &mut found);
                } else {
                    missing.push(Missing {
                        given: t.to_string(),
                        error: if p.exists() {
                            "not a file".into()
                        } else {
                            "no such file".into()
                        },
                    });
                }
            }
            continue;
        }
        let p = Path::new(arg);
        if p.is_dir() {
            for f in walk(p)? {
                let rel = f.strip_prefix(p).unwrap_or(&f).to_path_buf();
                found.push((
                    f.clone(),
                    p.join(&rel).display().to_string(),
                    sanitize(&rel),
                ));
            }
        } else if p.is_file() {
            add_file(p, &mut found);
        } else {
            missing.push(Missing {
                given: arg.clone(),
                error: if p.exists() {
                    "neither a file nor a folder".into()
                } else {
                    "no such file or folder".into()
                },
            });
        }
    }
    let mut seen = HashSet::new();
    found.retain(|(_, given, _)| seen.insert(given.clone()));
    // Keys: the relative path without extension, unless that collides.
    let stem = |rel: &Path| rel.with_extension("");
    let mut count: HashMap<PathBuf, usize> = HashMap::new();
    for (_, _, rel) in &found {
        *count.entry(stem(rel)).or_default() += 1;
    }
    let mut keys_seen = HashSet::new();
    let inputs = found
        .into_iter()
        .map(|(path, given, rel)| {
            let mut key = if count[&stem(&rel)] > 1 {
                rel.clone()
            } else {
                stem(&rel)
            };
            // Two folders with the same inner layout: fall back to the sanitised given path.
            if !keys_seen.insert(key.clone()) {
                key = sanitize(Path::new(&given));
                keys_seen.insert(key.clone());
            }
            Input { path, given, key }
        })
        .collect();
    Ok((inputs, missing))
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
        touch(&d.join("a/good/0.png"));
        touch(&d.join("a/good/0.jpg"));
        touch(&d.join("a/bad/1.PNG"));
        touch(&d.join("a/notes.txt"));
        touch(&d.join("a/.hidden/2.png"));
        touch(&d.join("b/good/0.png"));
        let a = d.join("a").display().to_string();
        let b = d.join("b").display().to_string();
        let extra = d.join("a/notes.txt").display().to_string();
        let mut stdin = std::io::Cursor::new(format!("{extra}\n\n/nonexistent/x.png\n"));
        let (inputs, missing) = expand(&[a.clone(), b, "-".into(), a.clone()], &mut stdin).unwrap();
        let keys: Vec<String> = inputs.iter().map(|i| i.key.display().to_string()).collect();
        assert_eq!(
            keys,
            vec![
                "bad/1".to_string(),
                "good/0.jpg".into(),
                "good/0.png".into(),
                // b/good/0.png would take a's key: it falls back to its full path
                d.join("b/good/0.png")
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
