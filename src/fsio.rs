//! One way in and one way out: every file zsad reads goes through [`read`] (or [`open`] for the
//! few readers that stream), every file it writes through [`OutDir`].
//!
//! **In.** Only regular files are read: a FIFO, a device or a socket is refused from its
//! metadata without a read (and opened non-blocking, so a FIFO swapped in after the check cannot
//! stall either), and each [`FileKind`] has a size bound checked before the first byte is read
//! and again while reading (a file that grows, `/dev/zero` behind a link). Errors name the file
//! and what it was read as.
//!
//! **Out.** An [`OutDir`] is a folder zsad writes into. Files are written whole or not at all
//! (a temporary file beside the target, synced, then renamed); names are relative, made of
//! plain components only, so nothing can be written outside the folder, and components too long
//! for a file system are shortened with a hash of the whole name ([`short_component`]).
//! Temporaries left by a killed run (`.NAME.tmp-PID` of a process that is gone) are removed
//! when the folder is next opened for a run. A test (`tests/architecture.rs`) fails when a
//! `std::fs` read or write appears outside this module.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, FileError, FileProblem, Result};

/// What a file is read as: its size bound and its name in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// An input image (its bound comes from `--max-pixels`, see [`read_image`]).
    Image,
    /// A ground-truth mask of a dataset.
    Mask,
    /// An anomaly map written by `zsad detect` (PNG or `.npy`).
    Map,
    /// A heatmap, mask or thumbnail PNG of a run, read back to copy or embed.
    RunPicture,
    /// A dataset manifest (CSV or JSON Lines) or VisA's split CSV.
    Manifest,
    /// `tokenizer.json`.
    Tokenizer,
    /// `config.json` beside a model, or a hub index.
    ModelConfig,
    /// Model weights (safetensors, `.bin`, `.pth`).
    Weights,
    /// An adapter, checkpoint, reference bank or feature file (safetensors).
    Tensors,
    /// A published `.pth` checkpoint to import.
    Checkpoint,
    /// `thresholds.json`.
    Thresholds,
    /// `run.json`, `metrics.json` and other small JSON files of zsad's.
    Settings,
    /// `scores.jsonl` / `scores.csv`.
    Records,
    /// A list of paths (stdin of `detect -`).
    PathList,
}

const KB: u64 = 1 << 10;
const MB: u64 = 1 << 20;
const GB: u64 = 1 << 30;

impl FileKind {
    /// The largest file of this kind that is read: far above any real one, so that a sparse
    /// or runaway file is refused instead of taking the machine's memory.
    pub const fn max_bytes(self) -> u64 {
        match self {
            // Images are bounded by their pixel budget (`DecodeLimits`); this is the ceiling.
            FileKind::Image => 64 * GB,
            FileKind::Mask => 2 * GB,
            // A float32 map of 4 gigapixels.
            FileKind::Map => 16 * GB + 4 * KB,
            FileKind::RunPicture => GB,
            FileKind::Manifest => GB,
            // CLIP's is 2.2 MB; any BPE vocabulary fits in 64 MB.
            FileKind::Tokenizer => 64 * MB,
            FileKind::ModelConfig => 16 * MB,
            FileKind::Weights => 64 * GB,
            FileKind::Tensors => 64 * GB,
            FileKind::Checkpoint => 64 * GB,
            FileKind::Thresholds => 64 * MB,
            FileKind::Settings => 256 * MB,
            FileKind::Records => 16 * GB,
            FileKind::PathList => GB,
        }
    }

    /// What the file is, for messages: `the tokenizer`.
    pub const fn what(self) -> &'static str {
        match self {
            FileKind::Image => "an image",
            FileKind::Mask => "a mask",
            FileKind::Map => "an anomaly map",
            FileKind::RunPicture => "a picture of the run",
            FileKind::Manifest => "a manifest",
            FileKind::Tokenizer => "a tokenizer",
            FileKind::ModelConfig => "a model config",
            FileKind::Weights => "model weights",
            FileKind::Tensors => "a tensor file",
            FileKind::Checkpoint => "a checkpoint",
            FileKind::Thresholds => "a thresholds file",
            FileKind::Settings => "a settings file",
            FileKind::Records => "a record file",
            FileKind::PathList => "a list of paths",
        }
    }
}

fn file_error(path: &Path, kind: FileKind, problem: FileProblem) -> Error {
    Error::File(FileError {
        path: path.to_path_buf(),
        what: kind.what(),
        problem,
    })
}

/// What kind of file system object `ft` is, for messages.
pub fn object_kind(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a folder"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// A regular file opened for reading, with its length.
pub struct Opened {
    pub file: std::fs::File,
    pub len: u64,
    pub path: PathBuf,
    pub kind: FileKind,
}

impl Opened {
    /// The whole file, bounded by `max_bytes` while reading.
    pub fn read_all(self, max_bytes: u64) -> Result<Vec<u8>> {
        let Opened {
            file,
            len,
            path,
            kind,
        } = self;
        let mut bytes = Vec::with_capacity(len.min(max_bytes) as usize);
        file.take(max_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| file_error(&path, kind, FileProblem::Io(e)))?;
        if bytes.len() as u64 > max_bytes {
            return Err(file_error(&path, kind, FileProblem::Grew { max_bytes }));
        }
        Ok(bytes)
    }
}

/// Opens `path` as a `kind` file: a regular file (checked before opening and again on the
/// opened handle) of at most `max_bytes` bytes.
pub fn open_bounded(path: &Path, kind: FileKind, max_bytes: u64) -> Result<Opened> {
    let regular = |meta: &std::fs::Metadata| {
        if meta.is_file() {
            Ok(())
        } else {
            Err(file_error(
                path,
                kind,
                FileProblem::NotRegular(object_kind(&meta.file_type())),
            ))
        }
    };
    let io = |e: std::io::Error| {
        let problem = if e.raw_os_error() == Some(libc::ELOOP) {
            FileProblem::LinkLoop
        } else {
            FileProblem::Io(e)
        };
        file_error(path, kind, problem)
    };
    regular(&std::fs::metadata(path).map_err(io)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    // The file may have been replaced between the two looks: trust only the opened handle.
    let meta = file.metadata().map_err(io)?;
    regular(&meta)?;
    if meta.len() > max_bytes {
        return Err(file_error(
            path,
            kind,
            FileProblem::TooLarge {
                bytes: meta.len(),
                max_bytes,
            },
        ));
    }
    Ok(Opened {
        file,
        len: meta.len(),
        path: path.to_path_buf(),
        kind,
    })
}

/// [`open_bounded`] with the kind's own bound.
pub fn open(path: &Path, kind: FileKind) -> Result<Opened> {
    open_bounded(path, kind, kind.max_bytes())
}

/// The bytes of a `kind` file (see the module docs).
pub fn read(path: &Path, kind: FileKind) -> Result<Vec<u8>> {
    read_bounded(path, kind, kind.max_bytes())
}

/// [`read`] with a tighter bound than the kind's (an image's from its pixel budget).
pub fn read_bounded(path: &Path, kind: FileKind, max_bytes: u64) -> Result<Vec<u8>> {
    let max_bytes = max_bytes.min(kind.max_bytes());
    open_bounded(path, kind, max_bytes)?.read_all(max_bytes)
}

/// A `kind` file as UTF-8 text.
pub fn read_text(path: &Path, kind: FileKind) -> Result<String> {
    String::from_utf8(read(path, kind)?).map_err(|_| file_error(path, kind, FileProblem::NotUtf8))
}

/// [`read_text`], `None` when the file does not exist.
pub fn read_text_if_exists(path: &Path, kind: FileKind) -> Result<Option<String>> {
    match read_text(path, kind) {
        Err(Error::File(FileError {
            problem: FileProblem::Io(e),
            ..
        })) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        other => other.map(Some),
    }
}

/// Lines read from `input` (stdin), at most `kind`'s bound in all.
pub fn read_stream(input: &mut dyn Read, name: &str, kind: FileKind) -> Result<Vec<u8>> {
    let max = kind.max_bytes();
    let mut bytes = Vec::new();
    input
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(Path::new(name), kind, FileProblem::Io(e)))?;
    if bytes.len() as u64 > max {
        return Err(file_error(
            Path::new(name),
            kind,
            FileProblem::Grew { max_bytes: max },
        ));
    }
    Ok(bytes)
}

/// Checks that `path` is a regular `kind` file within its bound, for readers that open it
/// themselves (candle's memory-mapped safetensors).
pub fn check_regular(path: &Path, kind: FileKind) -> Result<u64> {
    Ok(open(path, kind)?.len)
}

/// SHA-256 of a `kind` file, hex (the digest the Hugging Face hub shows for LFS files).
pub fn sha256(path: &Path, kind: FileKind) -> Result<String> {
    use sha2::{Digest, Sha256};
    let Opened { mut file, .. } = open(path, kind)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| file_error(path, kind, FileProblem::Io(e)))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Whether `path` names a regular file (following links).
pub fn is_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Whether `path` names a folder (following links).
pub fn is_dir(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_dir())
}

/// The entries of a folder, sorted by name (hidden ones included); `Err` when it cannot be
/// listed.
pub fn list_dir(dir: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    Ok(names)
}

// ---------------------------------------------------------------------------------------------
// Out

/// The longest file name component written (most file systems allow 255 bytes; the temporary
/// name adds `.` and `.tmp-PID`, up to 17 bytes, and a `~N` suffix may follow).
pub const MAX_COMPONENT_BYTES: usize = 200;

/// A file name component no longer than [`MAX_COMPONENT_BYTES`]: unchanged when it fits,
/// else its start (cut at a character boundary), `~`, and 16 hex digits of the SHA-256 of the
/// whole component, then its extension (so `x.png` stays a PNG). Deterministic, so a resumed or
/// merged run finds the same name again.
pub fn short_component(name: &str) -> String {
    shorten(name, MAX_COMPONENT_BYTES)
}

/// [`short_component`] to at most `max` bytes (at least 40).
pub fn shorten(name: &str, max: usize) -> String {
    let max = max.max(40);
    if name.len() <= max {
        return name.to_string();
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let (stem, ext) = match name.rfind('.') {
        Some(i) if name.len() - i <= 12 && i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let room = max - 1 - hash.len() - ext.len();
    let mut cut = room.min(stem.len());
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash}{ext}", &stem[..cut])
}

/// `rel` (a `/`-separated relative name zsad built) with every component shortened by
/// [`short_component`].
pub fn short_name(rel: &str) -> String {
    rel.split('/')
        .map(short_component)
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether `rel` is a name zsad may write under an output folder: relative, plain components
/// only (no `..`, no root, no `.`), each no longer than [`MAX_COMPONENT_BYTES`].
pub fn is_confined(rel: &str) -> bool {
    !rel.is_empty()
        && Path::new(rel).components().all(|c| match c {
            Component::Normal(s) => s.len() <= MAX_COMPONENT_BYTES,
            _ => false,
        })
}

/// A folder zsad writes into. Every write is confined to it (see the module docs).
#[derive(Debug, Clone)]
pub struct OutDir {
    root: PathBuf,
}

fn out_error(path: &Path, e: std::io::Error) -> Error {
    Error::File(FileError {
        path: path.to_path_buf(),
        what: FileKind::Settings.what(),
        problem: FileProblem::Write(e),
    })
}

impl OutDir {
    /// The folder `root`, created when missing. Refused when it exists as something else.
    pub fn create(root: &Path) -> Result<Self> {
        match std::fs::metadata(root) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::File(FileError {
                    path: root.to_path_buf(),
                    what: FileKind::Settings.what(),
                    problem: FileProblem::NotAFolder(object_kind(&m.file_type())),
                }))
            }
            _ => {}
        }
        std::fs::create_dir_all(root).map_err(|e| out_error(root, e))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The folder of a single output file (`--out thresholds.json`) and the file's name.
    pub fn for_file(path: &Path) -> Result<(Self, String)> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| is_confined(n))
            .ok_or_else(|| {
                Error::File(FileError {
                    path: path.to_path_buf(),
                    what: FileKind::Settings.what(),
                    problem: FileProblem::BadName,
                })
            })?
            .to_string();
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Ok((Self::create(dir)?, name))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `rel` is, when it is a confined name (a record's `map` read back may not be).
    pub fn path(&self, rel: &str) -> Option<PathBuf> {
        is_confined(rel).then(|| self.root.join(rel))
    }

    fn confined(&self, rel: &str) -> Result<PathBuf> {
        self.path(rel).ok_or_else(|| {
            Error::File(FileError {
                path: self.root.join(rel),
                what: FileKind::Settings.what(),
                problem: FileProblem::BadName,
            })
        })
    }

    /// Writes `bytes` to `rel` atomically: a temporary file beside it, synced, then renamed.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        let path = self.confined(rel)?;
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(|e| out_error(dir, e))?;
        let name = path.file_name().expect("a confined name has a file name");
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
            return Err(out_error(&path, e));
        }
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            out_error(&path, e)
        })
    }

    /// Writes and removes a probe file: whether the folder can be written at all, known before
    /// hours of work (a training run's first checkpoint).
    pub fn probe(&self) -> Result<()> {
        let name = format!(".zsad-probe-{}", std::process::id());
        self.write(&name, b"")?;
        self.remove(&name).map(|_| ())
    }

    /// Copies the `kind` file `from` (read through [`read`]) to `rel`.
    pub fn copy_in(&self, from: &Path, kind: FileKind, rel: &str) -> Result<()> {
        self.write(rel, &read(from, kind)?)
    }

    /// Removes `rel` when it is a regular file (never a folder, never outside); `Ok(false)`
    /// when there was none.
    pub fn remove(&self, rel: &str) -> Result<bool> {
        let path = self.confined(rel)?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() || m.is_symlink() => std::fs::remove_file(&path)
                .map(|()| true)
                .map_err(|e| out_error(&path, e)),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(out_error(&path, e)),
        }
    }

    /// Removes the folder `rel` when it is empty.
    pub fn remove_empty_dir(&self, rel: &str) {
        if let Ok(p) = self.confined(rel) {
            let _ = std::fs::remove_dir(p);
        }
    }

    /// The names in the folder `rel` (sorted; nothing when it does not exist).
    pub fn list(&self, rel: &str) -> Vec<String> {
        let dir = if rel.is_empty() {
            Some(self.root.clone())
        } else {
            self.path(rel)
        };
        dir.and_then(|d| list_dir(&d).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .collect()
    }

    /// Whether the folder holds anything but zsad's lock file.
    pub fn is_empty(&self) -> bool {
        self.list("").iter().all(|n| n == LOCK_NAME)
    }

    /// Opens `rel` for appending (the record log), creating it when missing.
    pub fn append(&self, rel: &str) -> Result<Appender> {
        let path = self.confined(rel)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| out_error(&path, e))?;
        let meta = file.metadata().map_err(|e| out_error(&path, e))?;
        if !meta.is_file() {
            return Err(Error::File(FileError {
                path,
                what: FileKind::Records.what(),
                problem: FileProblem::NotRegular(object_kind(&meta.file_type())),
            }));
        }
        Ok(Appender { file, path })
    }

    /// Holds an exclusive lock on `DIR/.zsad.lock` while a run writes there. The lock file is
    /// opened without following links and without blocking: a FIFO or a link in its place is
    /// refused, never waited on.
    pub fn lock(&self) -> Result<DirLock> {
        let path = self.root.join(LOCK_NAME);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| match std::fs::symlink_metadata(&path) {
                // A FIFO without a reader (ENXIO), a link (ELOOP): named, never waited on.
                Ok(m) if !m.is_file() => Error::File(FileError {
                    path: path.clone(),
                    what: "the lock file",
                    problem: FileProblem::NotRegular(object_kind(&m.file_type())),
                }),
                _ => out_error(&path, e),
            })?;
        let meta = f.metadata().map_err(|e| out_error(&path, e))?;
        if !meta.is_file() {
            return Err(Error::File(FileError {
                path,
                what: FileKind::Settings.what(),
                problem: FileProblem::NotRegular(object_kind(&meta.file_type())),
            }));
        }
        match f.try_lock() {
            Ok(()) => Ok(DirLock { _file: f }),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(Error::Output(crate::error::OutputError::Locked {
                    dir: self.root.clone(),
                }))
            }
            Err(std::fs::TryLockError::Error(e)) => Err(out_error(&path, e)),
        }
    }

    /// Removes the temporary files (`.NAME.tmp-PID`) that runs killed before their rename
    /// left anywhere under the folder, when their process is gone. Returns how many.
    pub fn clean_temporaries(&self) -> usize {
        let mut removed = 0;
        let mut stack = vec![self.root.clone()];
        let mut seen = 0usize;
        while let Some(dir) = stack.pop() {
            let Ok(names) = list_dir(&dir) else { continue };
            for n in names {
                seen += 1;
                if seen > 10_000_000 {
                    return removed;
                }
                let p = dir.join(&n);
                let Ok(m) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                if m.is_dir() {
                    stack.push(p);
                } else if m.is_file() && stale_temporary(&n.to_string_lossy()) {
                    removed += std::fs::remove_file(&p).is_ok() as usize;
                }
            }
        }
        removed
    }
}

/// The lock file's name in an output folder.
pub const LOCK_NAME: &str = ".zsad.lock";

/// Whether `name` is a temporary of [`OutDir::write`] whose process no longer runs.
fn stale_temporary(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some((_, pid)) = rest.rsplit_once(".tmp-") else {
        return false;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    if pid == std::process::id() as i32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    !alive
}

/// An open record log: each [`Appender::append`] writes whole lines and flushes.
pub struct Appender {
    file: std::fs::File,
    path: PathBuf,
}

impl Appender {
    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .and_then(|_| self.file.flush())
            .map_err(|e| out_error(&self.path, e))
    }
}

/// The lock of an output folder, released when dropped.
pub struct DirLock {
    _file: std::fs::File,
}

/// A temporary folder for work files (`zsad bench`), removed when dropped.
pub struct TempDir {
    out: OutDir,
}

impl TempDir {
    pub fn new(label: &str) -> Result<Self> {
        let root = std::env::temp_dir().join(format!("zsad-{label}-{}", std::process::id()));
        Ok(Self {
            out: OutDir::create(&root)?,
        })
    }
    pub fn out(&self) -> &OutDir {
        &self.out
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.out.root);
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    let s = read_text(Path::new("/proc/self/status"), FileKind::Settings).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("zsad-fsio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        let d = scratch("read");
        let f = d.join("t.json");
        std::fs::write(&f, b"{}").unwrap();
        assert_eq!(read(&f, FileKind::Tokenizer).unwrap(), b"{}");
        let e = read(&d, FileKind::Tokenizer).unwrap_err().to_string();
        assert!(e.contains("a folder") && e.contains("a tokenizer"), "{e}");
        let e = read(Path::new("/dev/zero"), FileKind::Tokenizer)
            .unwrap_err()
            .to_string();
        assert!(e.contains("character device"), "{e}");
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&fifo, FileKind::Manifest).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        let big = d.join("big");
        std::fs::write(&big, vec![0u8; 100]).unwrap();
        let e = read_bounded(&big, FileKind::Map, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("100 bytes") && e.contains("10"), "{e}");
        let looped = d.join("loop");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let e = read(&looped, FileKind::Image).unwrap_err().to_string();
        assert!(e.contains("symbolic links"), "{e}");
        assert!(read_text_if_exists(&d.join("none"), FileKind::Settings)
            .unwrap()
            .is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn long_names_are_shortened_deterministically() {
        assert_eq!(short_component("a.png"), "a.png");
        let long = format!("{}.png", "x".repeat(300));
        let s = short_component(&long);
        assert!(s.len() <= MAX_COMPONENT_BYTES && s.ends_with(".png"), "{s}");
        assert_eq!(s, short_component(&long));
        assert_ne!(s, short_component(&format!("{}y.png", "x".repeat(299))));
        let wide = "é".repeat(200);
        let s = short_component(&wide);
        assert!(s.len() <= MAX_COMPONENT_BYTES, "{}", s.len());
        assert!(is_confined("maps/a/b.png"));
        for bad in ["", "../x", "/etc/hostname", "a/../../x", "./a"] {
            assert!(!is_confined(bad), "{bad}");
        }
        assert!(!is_confined(&"x".repeat(201)));
    }

    #[test]
    fn writes_are_confined_atomic_and_temporaries_of_dead_runs_are_cleaned() {
        let d = scratch("write");
        let out = OutDir::create(&d.join("out")).unwrap();
        out.write("maps/a.png", b"1").unwrap();
        assert_eq!(std::fs::read(d.join("out/maps/a.png")).unwrap(), b"1");
        for bad in ["../x", "/tmp/x", "maps/../../x"] {
            let e = out.write(bad, b"2").unwrap_err().to_string();
            assert!(e.contains("not a name zsad writes"), "{e}");
        }
        // A temporary of a process that cannot exist (pid beyond the kernel's maximum).
        std::fs::write(d.join("out/maps/.b.png.tmp-2147483646"), b"x").unwrap();
        std::fs::write(
            d.join(format!("out/.c.tmp-{}", std::process::id())),
            b"mine",
        )
        .unwrap();
        assert_eq!(out.clean_temporaries(), 1);
        assert!(d
            .join(format!("out/.c.tmp-{}", std::process::id()))
            .exists());
        let _lock = out.lock().unwrap();
        let e = out.lock().err().unwrap().to_string();
        assert!(e.contains("another zsad process"), "{e}");
        // A FIFO in the lock's place is refused, not waited on.
        let other = OutDir::create(&d.join("other")).unwrap();
        let fifo = d.join("other").join(LOCK_NAME);
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = other.lock().err().unwrap().to_string();
        assert!(e.contains("FIFO"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
