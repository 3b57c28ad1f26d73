//! zsad's errors as Python exceptions. The classes are defined in Python (`zsad/_errors.py`,
//! where several also derive from a built-in: `OptionError` is a `ValueError`,
//! `MissingFileError` a `FileNotFoundError`); here each library error is matched to its class
//! by its variant, never by its text, and its message rendered with option fields as keyword
//! arguments (`` `batch_size` `` reads `batch_size=`).

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;
use zsad::error::{Error, OptionError};

/// The keyword arguments of the package's functions: the option fields a message may name.
pub const KEYWORDS: &[&str] = &[
    "activation",
    "adapter",
    "aupro_grid",
    "batch_size",
    "class_name",
    "colorbar",
    "data",
    "device",
    "dtype",
    "force_adapter",
    "force_thresholds",
    "format",
    "heatmap_alpha",
    "heatmap_scale",
    "heatmaps",
    "image_size",
    "include_masks",
    "init_seed",
    "joint",
    "joint_alpha",
    "maps",
    "max_fpr",
    "max_pixels",
    "min_recall",
    "min_region_area",
    "model",
    "normal",
    "out",
    "overwrite",
    "page_size",
    "pixel_threshold",
    "precision",
    "predictions",
    "preset",
    "quiet",
    "reference",
    "reference_max_patches",
    "reference_only",
    "reference_weight",
    "report",
    "resolution",
    "resume",
    "retry_failed",
    "shard",
    "single_label",
    "threshold",
    "thresholds",
    "thumbnail_size",
    "tokenizer",
];

/// The names a choice option takes (to tell a value from a word after the option's name).
fn choices(field: &str) -> Vec<&'static str> {
    use zsad::choice::Choice;
    fn names<C: Choice>() -> Vec<&'static str> {
        C::ALL.iter().map(|c| c.name()).collect()
    }
    use zsad::jobs::prelude as p;
    match field {
        "dtype" => names::<p::ModelDtype>(),
        "precision" => names::<p::GemmPrecision>(),
        "device" => names::<p::ComputeDevice>(),
        "joint" => names::<p::JointChoice>(),
        "preset" => names::<zsad::method::Preset>(),
        "maps" => names::<zsad::data::outputs::MapFormat>(),
        "heatmaps" => names::<zsad::data::heatmap::HeatmapKind>(),
        "heatmap_scale" => names::<zsad::data::heatmap::HeatmapScale>(),
        "format" => names::<zsad::data::records::RecordFormat>(),
        "resolution" => names::<zsad::jobs::evaluate::Resolution>(),
        "single_label" => names::<zsad::eval::SingleLabel>(),
        "aupro_grid" => names::<zsad::eval::metrics::ProGrid>(),
        "activation" => vec!["quick-gelu", "gelu"],
        _ => Vec::new(),
    }
}

/// The value written after an option's name in `rest` (`` `image_size` 33 is ... ``), as it
/// reads after `name=`: a number, a placeholder (`DIR`, `PATH...`) or one of the option's
/// choices (quoted, as Python shows a str); with the length of `rest` it takes.
fn value_after(field: &str, rest: &str) -> Option<(String, usize)> {
    let after = rest.strip_prefix(' ')?;
    let word: &str = after.split(char::is_whitespace).next().unwrap_or("");
    let core = word.trim_end_matches([':', ',', ';', ')', '.']);
    let core = if core.ends_with("..") { word } else { core };
    if core.is_empty() {
        return None;
    }
    let number = core.parse::<f64>().is_ok();
    let placeholder = core
        .trim_end_matches("...")
        .chars()
        .all(|c| c.is_ascii_uppercase())
        && !core.trim_end_matches("...").is_empty();
    let shown = if number || placeholder {
        core.to_string()
    } else if choices(field).contains(&core) {
        format!("'{core}'")
    } else {
        return None;
    };
    Some((shown, 1 + core.len()))
}

/// `text` with each backticked option field written as the keyword argument it is
/// (`` `batch_size` `` as `batch_size=`, `` `dtype` bf16 `` as `dtype='bf16'`); other
/// backticked words (`zsad train`, `run.json`) stay. The Python counterpart of the CLI's flags
/// (`--batch-size`).
pub fn keywords(text: &str) -> String {
    zsad::error::rewrite_backticked(text, |word, rest| {
        KEYWORDS
            .contains(&word)
            .then(|| match value_after(word, rest) {
                Some((value, used)) => (format!("{word}={value}"), used),
                None => (format!("{word}="), 0),
            })
    })
}

/// The message of `e` as Python callers read it.
pub fn message(e: &Error) -> String {
    match e {
        Error::Option(OptionError::Value {
            option,
            value,
            problem,
        }) => format!("{option}={value}: {}", keywords(problem)),
        other => keywords(&other.to_string()),
    }
}

/// The exception class of `zsad._errors` for an error, and the file it names (for `filename`).
fn class_of(e: &Error) -> (&'static str, Option<String>) {
    match e {
        Error::Option(_) => ("OptionError", None),
        Error::File(f) if f.is_not_found() => {
            ("MissingFileError", Some(f.path.display().to_string()))
        }
        Error::File(f) => ("FileError", Some(f.path.display().to_string())),
        Error::Input(i) => ("InputError", Some(i.path.display().to_string())),
        Error::Model(_) => ("ModelError", None),
        Error::Adapter(_) => ("AdapterError", None),
        Error::Dataset(_) => ("DatasetError", None),
        Error::Output(_) => ("OutputError", None),
        Error::Mismatch(m) => ("MismatchError", Some(m.file.display().to_string())),
        Error::Device(_) => ("DeviceError", None),
        Error::Training(_) | Error::Tensor(_) | Error::InvalidArgument(_) => ("ZsadError", None),
        Error::Interrupted { .. } => ("", None),
    }
}

/// An exception of `zsad._errors` by class name, with `message`.
pub fn exception(py: Python<'_>, class: &str, message: String, file: Option<String>) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let cls = py.import("zsad._errors")?.getattr(class)?;
        let exc = cls.call1((message.clone(),))?;
        if let Some(f) = file {
            exc.setattr("filename", f)?;
        }
        Ok(PyErr::from_value(exc))
    })();
    made.unwrap_or_else(|e| e)
}

/// A library error as the Python exception that stands for it (`KeyboardInterrupt` for a run
/// stopped by the user).
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    if let Error::Interrupted { .. } = &e {
        return PyKeyboardInterrupt::new_err(message(&e));
    }
    let (class, file) = class_of(&e);
    exception(py, class, message(&e), file)
}

/// An option's value refused by the binding itself (a type the option cannot take), as the
/// library refuses values: `OptionError` with `name=value: problem`.
pub fn option_value(py: Python<'_>, name: &'static str, value: String, problem: &str) -> PyErr {
    to_py(py, OptionError::value(name, value, problem))
}

/// A rule between options, worded as the library words them.
pub fn option_rule(py: Python<'_>, problem: &str) -> PyErr {
    to_py(py, OptionError::rule(problem))
}
