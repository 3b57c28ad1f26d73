//! The library's errors, one type per concern, each carrying the data a caller needs to act on
//! it (a path, a setting, what was found): files ([`FileError`]), the model ([`ModelError`]),
//! adapters ([`AdapterError`]), datasets, inputs, outputs ([`OutputError`]), the device
//! ([`DeviceError`], with a typed out-of-memory), training and option values ([`OptionError`]).
//!
//! The library names options by their field in the job's options struct, in backticks
//! (`` `batch_size` ``): the command line shows them as flags (`--batch-size`), the Python
//! package as keyword arguments. A caller decides what to do from the variant, never from the
//! message text.

use std::fmt;
use std::path::PathBuf;

/// Errors raised by the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (a shape mismatch inside a forward pass, a device error that
    /// is not one of [`DeviceError`]'s).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),

    /// The model files could not be found or read, or do not describe a CLIP model.
    #[error(transparent)]
    Model(#[from] ModelError),

    /// An adapter file or detector configuration is unusable.
    #[error(transparent)]
    Adapter(#[from] AdapterError),

    /// A dataset folder or manifest cannot be read as a labelled dataset.
    #[error(transparent)]
    Dataset(#[from] DatasetError),

    /// An input image could not be decoded or is unusable.
    #[error(transparent)]
    Input(#[from] InputError),

    /// An output folder or file cannot take this run's results.
    #[error(transparent)]
    Output(#[from] OutputError),

    /// A file made for other settings than this run's (thresholds, a reference bank, an
    /// adapter), each differing setting named.
    #[error(transparent)]
    Mismatch(#[from] MismatchError),

    /// The device cannot run the work.
    #[error(transparent)]
    Device(#[from] DeviceError),

    /// Training cannot go on.
    #[error(transparent)]
    Training(#[from] TrainingError),

    /// An option's value is out of range, or options do not go together.
    #[error(transparent)]
    Option(#[from] OptionError),

    /// The user asked the run to stop (`progress::request_stop`); what was finished
    /// is written. `kept` says what, for the message (`12 records in out/scores.jsonl`).
    #[error("interrupted{}", if kept.is_empty() { String::new() } else { format!(": {kept}") })]
    Interrupted { kept: String },

    /// Library API misuse by a caller: an argument that does not fit the model (layer out of
    /// range, prompt width ...). User input is checked before it gets here.
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a file could not be read or written.
#[derive(Debug)]
pub enum FileProblem {
    /// Not a regular file (a folder, a FIFO, a device ...): never read.
    NotRegular(&'static str),
    /// Larger than the bound of its kind.
    TooLarge { bytes: u64, max_bytes: u64 },
    /// It grew past its bound while being read.
    Grew { max_bytes: u64 },
    /// A chain of symbolic links that never ends.
    LinkLoop,
    /// Text expected, other bytes found.
    NotUtf8,
    /// An output folder's place is taken by something else.
    NotAFolder(&'static str),
    /// A name zsad would not write (absolute, `..`, too long).
    BadName,
    /// Reading failed.
    Io(std::io::Error),
    /// Writing failed (disk full, permissions ...).
    Write(std::io::Error),
}

/// A file that could not be read or written, and what it was read as.
#[derive(Debug)]
pub struct FileError {
    pub path: PathBuf,
    /// What the file was read as: `a tokenizer`, `an image` (the reader's kind of file).
    pub what: &'static str,
    pub problem: FileProblem,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path.display();
        let what = self.what;
        match &self.problem {
            FileProblem::NotRegular(k) => {
                write!(f, "{p}: {k}: only regular files are read (as {what})")
            }
            FileProblem::TooLarge { bytes, max_bytes } => write!(
                f,
                "{p}: file of {bytes} bytes is larger than the {max_bytes} bytes allowed for {what}"
            ),
            FileProblem::Grew { max_bytes } => write!(
                f,
                "{p}: grew past the {max_bytes} bytes allowed for {what} while being read"
            ),
            FileProblem::LinkLoop => write!(
                f,
                "{p}: too many levels of symbolic links (a link that points to itself or a cycle)"
            ),
            FileProblem::NotUtf8 => write!(f, "{p}: not UTF-8 text (read as {what})"),
            FileProblem::NotAFolder(k) => write!(f, "{p}: exists and is {k}, not a folder"),
            FileProblem::BadName => write!(
                f,
                "{p}: not a name zsad writes (outputs stay inside their folder, with plain names)"
            ),
            FileProblem::Io(e) => write!(f, "{p}: {e}"),
            FileProblem::Write(e) => write!(f, "cannot write {p}: {e}"),
        }
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            FileProblem::Io(e) | FileProblem::Write(e) => Some(e),
            _ => None,
        }
    }
}

impl FileError {
    /// Whether the file was simply not there.
    pub fn is_not_found(&self) -> bool {
        matches!(&self.problem, FileProblem::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The model: its files, weights, config or tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `--model` names nothing zsad can load.
    #[error("{0}")]
    NotFound(String),
    /// A weight file is unreadable, or a tensor missing or of the wrong shape.
    #[error("weights {file}: {problem}")]
    Weights { file: String, problem: String },
    /// `config.json` or the architecture it describes.
    #[error("{0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// An adapter file, or a detector configuration that does not fit the backbone.
#[derive(Debug, thiserror::Error)]
#[error("{problem}")]
pub struct AdapterError {
    pub problem: String,
}

/// A dataset that cannot be read as labelled data (layout, masks, labels), every problem named.
#[derive(Debug, thiserror::Error)]
#[error("{problem}")]
pub struct DatasetError {
    pub problem: String,
}

/// One input image that cannot be scored.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct InputError {
    pub path: PathBuf,
    pub problem: String,
}

/// An output folder or file that cannot take this run's results.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Another process holds the folder's lock.
    #[error("another zsad process is writing to {} (give each run or shard its own `out`)", dir.display())]
    Locked { dir: PathBuf },
    /// The folder holds an earlier run's records: continue it (`resume`) or start again
    /// (`overwrite`).
    #[error("{} exists: pass `resume` to continue that run or `overwrite` to start again", files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and "))]
    RunExists { files: Vec<PathBuf> },
    /// A folder or file that would be replaced: only with `overwrite`.
    #[error("{}: {what}; set `overwrite` to replace it, or choose another `out`", path.display())]
    NotEmpty { path: PathBuf, what: String },
    /// The earlier run was made with other settings, each named.
    #[error("{} was made with other settings than this run; {consequence}:\n  {}\n{remedy}", file.display(), differences.join("\n  "))]
    SettingsDiffer {
        file: PathBuf,
        differences: Vec<String>,
        consequence: String,
        remedy: String,
    },
    /// Anything else about an output: an encoder failure, an unreadable run record.
    #[error("{0}")]
    Other(String),
}

/// A file made for other settings than this run's: `{what} {file} {verb} with other settings
/// than this run: {differences}; {remedy}`.
#[derive(Debug, thiserror::Error)]
#[error("{what} {} {verb} with other settings than this run: {}; {remedy}", file.display(), differences.join("; "))]
pub struct MismatchError {
    /// `thresholds`, `reference bank`, `adapter`.
    pub what: &'static str,
    pub file: PathBuf,
    /// `were calibrated`, `was built`, `was trained`.
    pub verb: &'static str,
    /// One line per setting: `model.seed: calibrated 0, run 1`.
    pub differences: Vec<String>,
    /// What to do: rebuild it, or the option that overrides the check.
    pub remedy: String,
}

/// The device cannot run the work.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `device = cuda` in a build without CUDA.
    #[error("`device` cuda: this zsad was built without CUDA support; build it with `cargo build --release --features cuda` where the CUDA toolkit is (docs/gpu.md), or use the cpu")]
    NoCudaInBuild,
    /// No GPU, or no driver.
    #[error("`device` cuda: no usable CUDA GPU {ordinal} ({detail}); check that `nvidia-smi` lists it and that the NVIDIA driver is loaded (CUDA_VISIBLE_DEVICES chooses the GPUs zsad sees)")]
    NoGpu { ordinal: usize, detail: String },
    /// The GPU ran out of memory (`CUDA_ERROR_OUT_OF_MEMORY`, `CUBLAS_STATUS_ALLOC_FAILED`).
    #[error("the GPU ran out of memory ({detail})")]
    OutOfMemory { detail: String },
    /// Out of memory with one image per pass: nothing smaller to try.
    #[error("the GPU ran out of memory with one image per pass ({detail}): this model at this `image_size` does not fit; use `dtype` f16 or bf16, a smaller `image_size`, or a GPU with more memory")]
    OneImageTooLarge { detail: String },
    /// Out of memory in a training step.
    #[error("the GPU ran out of memory in a training step at `batch_size` {batch_size}, `image_size` {image_size}{memory}: {}", if *batch_size > 1 { format!("try `batch_size` {} (halved)", batch_size / 2) } else { "one image per step does not fit: use `dtype` bf16, a smaller `image_size`, or a GPU with more memory".to_string() })]
    TrainingOutOfMemory {
        batch_size: usize,
        image_size: usize,
        /// ` (x of y free after the step)` where the driver says.
        memory: String,
    },
}

/// Training cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("{problem}")]
pub struct TrainingError {
    pub problem: String,
}

/// An option's value out of range, or options that do not go together. `option` is the field
/// name in the job's options (`batch_size`), which the CLI shows as its flag.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    /// `option value: problem`.
    #[error("`{option}` {value}: {problem}")]
    Value {
        option: &'static str,
        value: String,
        problem: String,
    },
    /// A rule between options, or about one option without a value (`problem` names them).
    #[error("{problem}")]
    Rule { problem: String },
}

impl OptionError {
    pub fn value(
        option: &'static str,
        value: impl fmt::Display,
        problem: impl Into<String>,
    ) -> Error {
        Error::Option(OptionError::Value {
            option,
            value: value.to_string(),
            problem: problem.into(),
        })
    }
    pub fn rule(problem: impl Into<String>) -> Error {
        Error::Option(OptionError::Rule {
            problem: problem.into(),
        })
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::File(FileError {
            path: path.into(),
            what: "a file",
            problem: FileProblem::Io(source),
        })
    }

    pub fn model(problem: impl Into<String>) -> Self {
        Error::Model(ModelError::NotFound(problem.into()))
    }
    pub fn weights(file: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Model(ModelError::Weights {
            file: file.into(),
            problem: problem.into(),
        })
    }
    pub fn tokenizer(problem: impl Into<String>) -> Self {
        Error::Model(ModelError::Tokenizer(problem.into()))
    }
    pub fn adapter(problem: impl Into<String>) -> Self {
        Error::Adapter(AdapterError {
            problem: problem.into(),
        })
    }
    pub fn dataset(problem: impl Into<String>) -> Self {
        Error::Dataset(DatasetError {
            problem: problem.into(),
        })
    }
    pub fn input(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Input(InputError {
            path: path.into(),
            problem: problem.into(),
        })
    }
    pub fn output(problem: impl Into<String>) -> Self {
        Error::Output(OutputError::Other(problem.into()))
    }
    pub fn training(problem: impl Into<String>) -> Self {
        Error::Training(TrainingError {
            problem: problem.into(),
        })
    }

    /// Whether this is a GPU running out of memory (typed: the device layer turns the CUDA
    /// driver's and cuBLAS's status codes into [`DeviceError::OutOfMemory`], see
    /// `device::classify`).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Device(DeviceError::OutOfMemory { .. }))
    }

    /// Prefixes the message with `context` where the concern keeps a free text (a model that
    /// does not load says which `--model`).
    pub fn context(self, context: impl fmt::Display) -> Self {
        match self {
            Error::Model(ModelError::NotFound(m)) => {
                Error::Model(ModelError::NotFound(format!("{context}: {m}")))
            }
            Error::Model(ModelError::Config(m)) => {
                Error::Model(ModelError::Config(format!("{context}: {m}")))
            }
            Error::Adapter(AdapterError { problem }) => Error::Adapter(AdapterError {
                problem: format!("{context}: {problem}"),
            }),
            Error::Dataset(DatasetError { problem }) => Error::Dataset(DatasetError {
                problem: format!("{context}: {problem}"),
            }),
            Error::Training(TrainingError { problem }) => Error::Training(TrainingError {
                problem: format!("{context}: {problem}"),
            }),
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{context}: {m}")),
            other => other,
        }
    }
}

/// `bail!`-style shorthand for [`Error::InvalidArgument`].
macro_rules! invalid {
    ($($arg:tt)*) => {
        $crate::error::Error::InvalidArgument(format!($($arg)*))
    };
}
pub(crate) use invalid;

/// `text` with each backticked word handed to `render` with the text after it: `Some((shown,
/// used))` replaces the word, its backticks and the first `used` bytes after it; `None` keeps
/// them. How the command line (flags) and the Python package (keyword arguments) spell the
/// option fields the library names, written once.
pub fn rewrite_backticked(
    text: &str,
    mut render: impl FnMut(&str, &str) -> Option<(String, usize)>,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('`') else {
            out.push('`');
            rest = after;
            continue;
        };
        let word = &after[..end];
        rest = &after[end + 1..];
        match render(word, rest) {
            Some((shown, used)) => {
                out.push_str(&shown);
                rest = &rest[used.min(rest.len())..];
            }
            None => {
                out.push('`');
                out.push_str(word);
                out.push('`');
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_named_by_field_and_files_by_kind() {
        let e = OptionError::value("batch_size", 300, "at most 256");
        assert_eq!(e.to_string(), "`batch_size` 300: at most 256");
        let e = Error::File(FileError {
            path: "t.json".into(),
            what: "a tokenizer",
            problem: FileProblem::TooLarge {
                bytes: 9,
                max_bytes: 8,
            },
        });
        assert_eq!(
            e.to_string(),
            "t.json: file of 9 bytes is larger than the 8 bytes allowed for a tokenizer"
        );
        let e = Error::Device(DeviceError::OutOfMemory { detail: "x".into() });
        assert!(e.is_out_of_memory());
        assert!(!Error::training("nan").is_out_of_memory());
        let e = Error::Device(DeviceError::TrainingOutOfMemory {
            batch_size: 8,
            image_size: 518,
            memory: String::new(),
        });
        assert!(e.to_string().contains("try `batch_size` 4 (halved)"), "{e}");
    }

    #[test]
    fn backticked_words_are_rewritten_or_kept() {
        let flags = |w: &str, _: &str| (w == "batch_size").then(|| ("--batch-size".into(), 0));
        assert_eq!(
            rewrite_backticked("`batch_size` 300 with `zsad train`, `open", flags),
            "--batch-size 300 with `zsad train`, `open"
        );
        let value = |w: &str, rest: &str| {
            let v = rest.trim_start().split(' ').next().unwrap_or("");
            (w == "dtype").then(|| (format!("dtype='{v}'"), 1 + v.len()))
        };
        assert_eq!(
            rewrite_backticked("`dtype` bf16 is slow", value),
            "dtype='bf16' is slow"
        );
        assert_eq!(rewrite_backticked("", value), "");
    }
}
