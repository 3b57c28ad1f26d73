//! `zsad._zsad`: the native half of the `zsad` Python package, over the zsad library's jobs
//! (never the CLI). `zsad/__init__.py` holds the public API (signatures, docstrings, PIL and
//! NumPy conversion, the `Detection` class); this module converts keyword arguments into the
//! library's options, runs the jobs with the GIL released and Ctrl-C honoured, and turns
//! results into plain Python objects and errors into the exceptions of `zsad._errors`.

use std::path::PathBuf;

use numpy::ndarray::Array3;
use numpy::{IntoPyArray, PyArray3, PyReadonlyArray3, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use zsad::data::image::DecodeLimits;
use zsad::data::records::Record;
use zsad::jobs::detect::{DetectJob, DetectSummary};
use zsad::jobs::pipeline::MAX_BATCH_SIZE;
use zsad::jobs::single::ImageDetector;
use zsad::progress::Console;

mod convert;
mod errors;
mod interrupt;
mod options;

use interrupt::interruptible;
use options::Kwargs;

/// What `zsad.Detector` holds: a built detector with its thresholds.
#[pyclass(module = "zsad._zsad", name = "Detector", frozen)]
struct NativeDetector {
    inner: ImageDetector,
    console: Console,
}

/// One input of `detect`: a file, decoded on the worker thread, or pixels given in memory.
enum Source {
    File(PathBuf),
    Pixels(image::RgbImage),
}

fn console(quiet: bool) -> Console {
    Console::new(quiet, errors::keywords)
}

impl NativeDetector {
    /// Item `i` of the inputs: a path (`str`) or a C-ordered `uint8` array `(height, width, 3)`
    /// (the Python side has converted PIL images and checked dtypes and shapes, with messages
    /// that name NumPy's terms; this is the last check).
    fn source(&self, py: Python<'_>, item: &Bound<'_, PyAny>, name: &str) -> PyResult<Source> {
        if item.is_instance_of::<PyString>() {
            return Ok(Source::File(item.extract::<PathBuf>()?));
        }
        let bad = |problem: String| {
            errors::exception(py, "InputError", format!("{name}: {problem}"), None)
        };
        let Ok(untyped) = item.downcast::<PyUntypedArray>() else {
            return Err(PyTypeError::new_err(format!(
                "{name}: a path (str) or a numpy uint8 array is expected, not {}",
                item.get_type().name()?
            )));
        };
        let Ok(array) = item.extract::<PyReadonlyArray3<'_, u8>>() else {
            return Err(bad(format!(
                "a {}-dimensional {} array; zsad scores 8-bit RGB images: numpy uint8 of shape (height, width, 3)",
                untyped.ndim(),
                untyped.dtype().str()?
            )));
        };
        let view = array.as_array();
        let (h, w, c) = view.dim();
        if c != 3 {
            return Err(bad(format!(
                "an array of shape ({h}, {w}, {c}); zsad scores RGB images: (height, width, 3)"
            )));
        }
        let (w32, h32) = (
            u32::try_from(w).unwrap_or(u32::MAX),
            u32::try_from(h).unwrap_or(u32::MAX),
        );
        // An InputError without `filename`: the image is no file.
        self.inner
            .check_image(name, w32, h32)
            .map_err(|e| errors::exception(py, "InputError", errors::message(&e), None))?;
        let pixels: Vec<u8> = match array.as_slice() {
            Ok(s) => s.to_vec(),
            Err(_) => view.iter().copied().collect(),
        };
        image::RgbImage::from_raw(w32, h32, pixels)
            .map(Source::Pixels)
            .ok_or_else(|| bad(format!("{w}x{h} pixels do not fit the buffer")))
    }
}

#[pymethods]
impl NativeDetector {
    /// Checks the options as `zsad detect` does, plans and builds the model (GIL released,
    /// Ctrl-C honoured) and attaches the reference bank.
    #[new]
    #[pyo3(signature = (model, options=None, quiet=false))]
    fn new(
        py: Python<'_>,
        model: String,
        options: Option<Bound<'_, PyDict>>,
        quiet: bool,
    ) -> PyResult<Self> {
        let mut kw = Kwargs::new(py, "Detector", options.as_ref())?;
        let opts = options::detector_run_options(&mut kw, model)?;
        kw.finish("it names files to write: use zsad.detect_folder(..., out=...) for them")?;
        let console = console(quiet);
        let inner = interruptible(py, || ImageDetector::new(&opts, &console))?;
        Ok(Self { inner, console })
    }

    /// Scores `images` (paths and arrays), `batch_size` per model pass (None: the detector's;
    /// 0: as the CLI picks). `single`: the inputs are named `image`, else `images[first + i]`.
    #[pyo3(signature = (images, batch_size=None, single=false, first=0))]
    fn detect<'py>(
        &self,
        py: Python<'py>,
        images: Bound<'py, PyList>,
        batch_size: Option<i64>,
        single: bool,
        first: usize,
    ) -> PyResult<Bound<'py, PyList>> {
        let pass = self.pass_size(py, batch_size)?;
        let name = |i: usize| {
            if single {
                "image".to_string()
            } else {
                format!("images[{}]", first + i)
            }
        };
        let out = PyList::empty(py);
        let n = images.len();
        let mut start = 0;
        while start < n {
            let end = (start + pass).min(n);
            let mut sources = Vec::with_capacity(end - start);
            for i in start..end {
                sources.push(self.source(py, &images.get_item(i)?, &name(i))?);
            }
            let inner = &self.inner;
            let console = &self.console;
            let results = interruptible(py, move || {
                let rgbs = sources
                    .into_iter()
                    .map(|s| match s {
                        Source::File(p) => inner.decode(&p),
                        Source::Pixels(rgb) => Ok(rgb),
                    })
                    .collect::<zsad::Result<Vec<_>>>()?;
                inner.detect(&rgbs, rgbs.len(), console)
            })?;
            for (k, r) in results.into_iter().enumerate() {
                match r {
                    Ok(r) => out.append(convert::image_result(py, r)?)?,
                    Err(problem) => {
                        let item = images.get_item(start + k)?;
                        let label = if item.is_instance_of::<PyString>() {
                            item.extract::<String>()?
                        } else {
                            name(start + k)
                        };
                        return Err(errors::exception(
                            py,
                            "InputError",
                            format!("{label}: {problem}"),
                            None,
                        ));
                    }
                }
            }
            start = end;
        }
        Ok(out)
    }

    /// The model as `zsad info --json` describes it.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        convert::serialised(py, self.inner.info())
    }

    /// `run.json`'s settings of the model side.
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        convert::serialised(py, self.inner.settings())
    }

    #[getter]
    fn image_size(&self) -> usize {
        self.inner.image_size()
    }

    #[getter]
    fn gemm(&self) -> String {
        self.inner.info().gemm.clone()
    }

    /// `(image threshold, pixel threshold)`, each `None` when not set.
    #[getter]
    fn thresholds(&self) -> (Option<f32>, Option<f32>) {
        self.inner.thresholds()
    }

    /// The images per model pass for `batch_size` (None: the detector's own; 0: as the CLI
    /// picks), refused as `zsad detect` refuses it.
    #[pyo3(signature = (batch_size=None))]
    fn pass_size(&self, py: Python<'_>, batch_size: Option<i64>) -> PyResult<usize> {
        let requested = match batch_size {
            None => None,
            Some(b) if (0..=MAX_BATCH_SIZE as i64).contains(&b) => Some(b as usize),
            Some(b) => {
                let problem = if b < 0 {
                    "must be an integer >= 0".to_string()
                } else {
                    format!("at most {MAX_BATCH_SIZE} (0 picks about 1024 tokens per pass)")
                };
                return Err(errors::option_value(
                    py,
                    "batch_size",
                    b.to_string(),
                    &problem,
                ));
            }
        };
        Ok(self.inner.pass_size(requested))
    }
}

/// `zsad info`: the model described (architecture, parameters, the GEMM in use).
#[pyfunction]
#[pyo3(signature = (model, options=None))]
fn info<'py>(
    py: Python<'py>,
    model: String,
    options: Option<Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut kw = Kwargs::new(py, "info", options.as_ref())?;
    let opts = options::model_options(&mut kw, Some(model))?;
    kw.finish("info() describes the backbone alone")?;
    let described = interruptible(py, move || zsad::jobs::info::info(&opts))?;
    convert::serialised(py, &described)
}

fn summary_dict<'py>(
    py: Python<'py>,
    s: &DetectSummary,
    records: Vec<Record>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("records", convert::serialised(py, &records)?)?;
    d.set_item("scored", s.scored)?;
    d.set_item("failed", s.failed)?;
    d.set_item("already_done", s.already_done)?;
    d.set_item("prior_failed", s.prior_failed)?;
    d.set_item("masks_skipped", s.masks_skipped)?;
    d.set_item("links_skipped", s.links_skipped)?;
    d.set_item(
        "runs_skipped",
        s.runs_skipped
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>(),
    )?;
    d.set_item("seconds", s.seconds)?;
    d.set_item(
        "records_file",
        s.records.as_ref().map(|p| p.display().to_string()),
    )?;
    d.set_item("heatmap_range", s.heatmap_range.map(|r| (r.lo, r.hi)))?;
    d.set_item("heatmaps_failed", s.heatmaps_failed)?;
    d.set_item(
        "report",
        s.report.as_ref().map(|r| r.page.display().to_string()),
    )?;
    d.set_item("temporaries_removed", s.temporaries_removed)?;
    Ok(d)
}

/// `zsad detect` over files and folders: every record, and the run's summary; with `out`,
/// the CLI's files.
#[pyfunction]
#[pyo3(signature = (inputs, model, options=None, quiet=false, command=Vec::new()))]
fn detect_folder<'py>(
    py: Python<'py>,
    inputs: Bound<'py, PyAny>,
    model: String,
    options: Option<Bound<'py, PyDict>>,
    quiet: bool,
    command: Vec<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let all = PyDict::new(py);
    if let Some(o) = &options {
        all.update(o.as_mapping())?;
    }
    all.set_item("inputs", inputs)?;
    let mut kw = Kwargs::new(py, "detect_folder", Some(&all))?;
    let inputs = kw.paths("inputs")?.unwrap_or_default();
    let opts = options::detect_options(&mut kw, inputs, model)?;
    kw.finish("")?;
    let console = console(quiet);
    let (summary, records) = interruptible(py, || {
        let job = DetectJob::new(opts, &mut std::io::empty())?;
        let mut records: Vec<Record> = Vec::new();
        let summary = job.run(&console, command, &mut |r: &Record| {
            records.push(r.clone());
            Ok(())
        })?;
        Ok((summary, records))
    })?;
    summary_dict(py, &summary, records)
}

/// `zsad eval`: the metrics (as `metrics.json` holds them), written to `out`.
#[pyfunction]
#[pyo3(signature = (out, model=None, options=None, quiet=false, command=Vec::new()))]
fn evaluate<'py>(
    py: Python<'py>,
    out: PathBuf,
    model: Option<String>,
    options: Option<Bound<'py, PyDict>>,
    quiet: bool,
    command: Vec<String>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut kw = Kwargs::new(py, "evaluate", options.as_ref())?;
    let opts = options::eval_options(&mut kw, model, out)?;
    kw.finish("")?;
    let console = console(quiet);
    let summary = interruptible(py, || {
        zsad::jobs::evaluate::evaluate(&opts, &console, command)
    })?;
    let report = convert::serialised(py, &summary.report)?;
    report.set_item("images", summary.images)?;
    report.set_item("seconds", summary.seconds)?;
    Ok(report)
}

/// `zsad calibrate`: the thresholds file written to `out`, as a dict, and why no pixel
/// threshold could be chosen when none was.
#[pyfunction]
#[pyo3(signature = (out, model=None, options=None, quiet=false))]
fn calibrate<'py>(
    py: Python<'py>,
    out: PathBuf,
    model: Option<String>,
    options: Option<Bound<'py, PyDict>>,
    quiet: bool,
) -> PyResult<(Bound<'py, PyAny>, Option<String>)> {
    let mut kw = Kwargs::new(py, "calibrate", options.as_ref())?;
    let opts = options::calibrate_options(&mut kw, model, out)?;
    kw.finish("")?;
    let console = console(quiet);
    let summary = interruptible(py, || zsad::jobs::calibrate::calibrate(&opts, &console))?;
    Ok((
        convert::serialised(py, &summary.file)?,
        summary.no_pixel_threshold.map(|w| errors::keywords(&w)),
    ))
}

/// An image file decoded as `zsad detect` decodes its inputs (the guarded reader, within
/// `max_pixels`, EXIF orientation applied, 8-bit RGB), as a `uint8` array `(height, width, 3)`.
#[pyfunction]
#[pyo3(signature = (path, max_pixels=None))]
fn read_image<'py>(
    py: Python<'py>,
    path: PathBuf,
    max_pixels: Option<u64>,
) -> PyResult<Bound<'py, PyArray3<u8>>> {
    use zsad::jobs::detect::MAX_MAX_PIXELS;
    let limits = match max_pixels {
        None => DecodeLimits::default(),
        Some(p) if (1..=MAX_MAX_PIXELS).contains(&p) => DecodeLimits::with_max_pixels(p),
        Some(p) => {
            return Err(errors::option_value(
                py,
                "max_pixels",
                p.to_string(),
                &format!("must be in 1..={MAX_MAX_PIXELS}"),
            ))
        }
    };
    let rgb = interruptible(py, move || {
        zsad::data::image::decode_limited(&path, &limits)
            .map(|img| zsad::data::image::to_rgb8(&img))
    })?;
    let (w, h) = rgb.dimensions();
    let array = Array3::from_shape_vec((h as usize, w as usize, 3), rgb.into_raw())
        .map_err(|e| errors::exception(py, "ZsadError", format!("image of {w}x{h}: {e}"), None))?;
    Ok(array.into_pyarray(py))
}

/// `text` with option fields as keyword arguments (as the package's messages read).
#[pyfunction]
fn render_options(text: &str) -> String {
    errors::keywords(text)
}

/// The native half of the zsad package (use `zsad`, not this module).
#[pymodule]
fn _zsad(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", zsad::VERSION)?;
    m.add("MAX_BATCH_SIZE", MAX_BATCH_SIZE)?;
    m.add(
        "KEYWORDS",
        errors::KEYWORDS
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
    )?;
    m.add_class::<NativeDetector>()?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(detect_folder, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(calibrate, m)?)?;
    m.add_function(wrap_pyfunction!(render_options, m)?)?;
    m.add_function(wrap_pyfunction!(read_image, m)?)?;
    Ok(())
}
