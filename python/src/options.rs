//! Keyword arguments into the library's option structs, with the CLI's names and defaults:
//! `zsad detect --batch-size 4` is `batch_size=4`. Only the conversion happens here (a value of
//! the wrong type, a name that is not a choice); every range and every rule between options
//! is checked by the library, as for the command line. The few rules clap enforces for the
//! CLI (`force_adapter` goes with `adapter`, `normal` excludes `data` ...) are repeated here
//! with the library's wording.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use zsad::choice::Choice;
use zsad::clip::Activation;
use zsad::data::image::DecodeLimits;
use zsad::data::inputs::Shard;
use zsad::jobs::calibrate::{CalibrateOptions, CalibrationData};
use zsad::jobs::detect::DetectOptions;
use zsad::jobs::evaluate::EvalOptions;
use zsad::jobs::prelude::{DetectorOptions, ModelOptions};
use zsad::jobs::reference::ReferenceOptions;
use zsad::jobs::render::OutputOptions;
use zsad::report::ReportOptions;

use crate::errors::{option_rule, option_value};

/// The keyword arguments of one call, taken one by one; what is left at the end was not
/// understood.
pub struct Kwargs<'py> {
    py: Python<'py>,
    function: &'static str,
    items: BTreeMap<String, Bound<'py, PyAny>>,
}

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

fn shown(v: &Bound<'_, PyAny>) -> String {
    v.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// `s` as Python shows a str (`'winclip'`).
fn repr_str(py: Python<'_>, s: &str) -> String {
    shown(PyString::new(py, s).as_any())
}

impl<'py> Kwargs<'py> {
    /// The keyword arguments in `dict` (`None` values count as not given, as the defaults of
    /// the Python signatures are `None`).
    pub fn new(
        py: Python<'py>,
        function: &'static str,
        dict: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Self> {
        let mut items = BTreeMap::new();
        if let Some(d) = dict {
            for (k, v) in d.iter() {
                let k: String = k.extract()?;
                if !v.is_none() {
                    items.insert(k, v);
                }
            }
        }
        Ok(Self {
            py,
            function,
            items,
        })
    }

    pub fn py(&self) -> Python<'py> {
        self.py
    }

    fn take(&mut self, name: &str) -> Option<Bound<'py, PyAny>> {
        self.items.remove(name)
    }

    fn wrong(&self, name: &'static str, v: &Bound<'py, PyAny>, expected: &str) -> PyErr {
        option_value(
            self.py,
            name,
            shown(v),
            &format!("must be {expected}, not {}", type_name(v)),
        )
    }

    pub fn string(&mut self, name: &'static str) -> PyResult<Option<String>> {
        match self.take(name) {
            None => Ok(None),
            Some(v) if v.is_instance_of::<PyString>() => Ok(Some(v.extract()?)),
            Some(v) => Err(self.wrong(name, &v, "a str")),
        }
    }

    /// A path: `str`, `bytes` or `os.PathLike`.
    pub fn path(&mut self, name: &'static str) -> PyResult<Option<PathBuf>> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => self.as_path(name, &v).map(|p| Some(PathBuf::from(p))),
        }
    }

    fn as_path(&self, name: &'static str, v: &Bound<'py, PyAny>) -> PyResult<String> {
        let os = self.py.import("os")?;
        let p = os
            .getattr("fspath")?
            .call1((v,))
            .map_err(|_| self.wrong(name, v, "a path (str or os.PathLike)"))?;
        let p = if p.is_instance_of::<PyString>() {
            p
        } else {
            os.getattr("fsdecode")?.call1((p,))?
        };
        p.extract()
    }

    /// One path or a list (tuple) of paths.
    pub fn paths(&mut self, name: &'static str) -> PyResult<Option<Vec<String>>> {
        let Some(v) = self.take(name) else {
            return Ok(None);
        };
        if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
            let mut out = Vec::new();
            for item in v.try_iter()? {
                out.push(self.as_path(name, &item?)?);
            }
            Ok(Some(out))
        } else {
            self.as_path(name, &v).map(|p| Some(vec![p]))
        }
    }

    pub fn flag(&mut self, name: &'static str) -> PyResult<bool> {
        match self.take(name) {
            None => Ok(false),
            Some(v) if v.is_instance_of::<PyBool>() => v.extract(),
            Some(v) => match v.extract::<bool>() {
                // NumPy's bool_.
                Ok(b) if !v.is_instance_of::<PyInt>() => Ok(b),
                _ => Err(self.wrong(name, &v, "True or False")),
            },
        }
    }

    /// A non-negative integer (`int` or a NumPy integer, not a bool).
    pub fn count(&mut self, name: &'static str) -> PyResult<Option<u64>> {
        let Some(v) = self.take(name) else {
            return Ok(None);
        };
        if v.is_instance_of::<PyBool>() || v.is_instance_of::<PyFloat>() {
            return Err(self.wrong(name, &v, "an integer"));
        }
        let Ok(i) = v
            .call_method0("__index__")
            .and_then(|i| i.extract::<i128>())
        else {
            return Err(self.wrong(name, &v, "an integer"));
        };
        u64::try_from(i)
            .map(Some)
            .map_err(|_| option_value(self.py, name, i.to_string(), "must be an integer >= 0"))
    }

    pub fn usize(&mut self, name: &'static str) -> PyResult<Option<usize>> {
        self.count(name).map(|c| c.map(|c| c as usize))
    }

    /// A real number (`int`, `float` or a NumPy scalar, not a bool); NaN passes, for the
    /// library to refuse with its range.
    pub fn number(&mut self, name: &'static str) -> PyResult<Option<f64>> {
        let Some(v) = self.take(name) else {
            return Ok(None);
        };
        if v.is_instance_of::<PyBool>() || v.is_instance_of::<PyString>() {
            return Err(self.wrong(name, &v, "a number"));
        }
        match v.extract::<f64>() {
            Ok(x) => Ok(Some(x)),
            Err(_) => Err(self.wrong(name, &v, "a number")),
        }
    }

    pub fn number32(&mut self, name: &'static str) -> PyResult<Option<f32>> {
        self.number(name).map(|x| x.map(|x| x as f32))
    }

    /// One of a [`Choice`]'s names.
    pub fn choice<C: Choice>(&mut self, name: &'static str) -> PyResult<Option<C>> {
        let Some(s) = self.string(name)? else {
            return Ok(None);
        };
        match C::from_name(&s) {
            Some(c) => Ok(Some(c)),
            None => Err(option_value(
                self.py,
                name,
                repr_str(self.py, &s),
                &format!(
                    "must be one of {}",
                    C::ALL
                        .iter()
                        .map(|c| c.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// What was given but not taken: a `TypeError`, as Python raises for an unknown keyword,
    /// with a hint where the option belongs elsewhere.
    pub fn finish(self, hint: &str) -> PyResult<()> {
        match self.items.keys().next() {
            None => Ok(()),
            Some(k) => {
                let known = crate::errors::KEYWORDS.contains(&k.as_str());
                let why = if known && !hint.is_empty() {
                    format!(" ({hint})")
                } else {
                    String::new()
                };
                Err(PyTypeError::new_err(format!(
                    "{}() got an unexpected keyword argument '{k}'{why}",
                    self.function
                )))
            }
        }
    }
}

/// `model`, `dtype`, `precision`, `device`, `activation`.
pub fn model_options(kw: &mut Kwargs, model: Option<String>) -> PyResult<ModelOptions> {
    let mut m = ModelOptions::new(&model.unwrap_or_default());
    if let Some(d) = kw.choice("dtype")? {
        m.dtype = d;
    }
    if let Some(p) = kw.choice("precision")? {
        m.precision = p;
    }
    if let Some(d) = kw.choice("device")? {
        m.device = d;
    }
    if let Some(a) = kw.string("activation")? {
        m.activation = Some(match a.as_str() {
            "quick-gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            _ => {
                return Err(option_value(
                    kw.py(),
                    "activation",
                    repr_str(kw.py(), &a),
                    "must be one of quick-gelu, gelu",
                ))
            }
        });
    }
    Ok(m)
}

/// The model plus `adapter` or `preset`, with the overrides.
pub fn detector_options(kw: &mut Kwargs, model: Option<String>) -> PyResult<DetectorOptions> {
    let mut d = DetectorOptions {
        model: model_options(kw, model)?,
        ..Default::default()
    };
    d.adapter = kw.path("adapter")?;
    d.force_adapter = kw.flag("force_adapter")?;
    if d.force_adapter && d.adapter.is_none() {
        return Err(option_rule(kw.py(), "`force_adapter` goes with `adapter`"));
    }
    if let Some(p) = kw.choice("preset")? {
        d.preset = p;
    }
    if let Some(s) = kw.count("init_seed")? {
        d.init_seed = s;
    }
    d.image_size = kw.usize("image_size")?;
    d.class_name = kw.string("class_name")?;
    d.joint = kw.choice("joint")?;
    d.joint_alpha = kw.number("joint_alpha")?;
    d.tokenizer = kw.path("tokenizer")?;
    Ok(d)
}

/// `reference` (images, folders or one bank file) and how it is used.
pub fn reference_options(kw: &mut Kwargs) -> PyResult<ReferenceOptions> {
    Ok(ReferenceOptions {
        reference: kw.paths("reference")?.unwrap_or_default(),
        reference_weight: kw.number("reference_weight")?,
        reference_only: kw.flag("reference_only")?,
        reference_max_patches: kw.usize("reference_max_patches")?,
    })
}

/// What `zsad.Detector` takes: detect's options that do not name files to write.
pub fn detector_run_options(kw: &mut Kwargs, model: String) -> PyResult<DetectOptions> {
    let mut o = DetectOptions::new(Vec::new(), &model, None);
    o.detector = detector_options(kw, Some(model))?;
    o.reference = reference_options(kw)?;
    decisions(kw, &mut o)?;
    if let Some(b) = kw.usize("batch_size")? {
        o.pipeline.batch_size = b;
    }
    if let Some(p) = kw.count("max_pixels")? {
        o.pipeline.limits = DecodeLimits::with_max_pixels(p);
    }
    Ok(o)
}

/// `threshold`, `pixel_threshold`, `thresholds`, `force_thresholds`, `min_region_area`.
fn decisions(kw: &mut Kwargs, o: &mut DetectOptions) -> PyResult<()> {
    o.threshold = kw.number32("threshold")?;
    o.output.pixel_threshold = kw.number32("pixel_threshold")?;
    o.thresholds = kw.path("thresholds")?;
    o.force_thresholds = kw.flag("force_thresholds")?;
    if let Some(a) = kw.count("min_region_area")? {
        o.output.min_region_area = a;
    }
    Ok(())
}

/// Everything `zsad detect` takes, for `zsad.detect_folder`.
pub fn detect_options(
    kw: &mut Kwargs,
    inputs: Vec<String>,
    model: String,
) -> PyResult<DetectOptions> {
    let out = kw.path("out")?;
    if out.as_deref() == Some(std::path::Path::new("-")) {
        return Err(option_rule(
            kw.py(),
            "`out` -: the records are returned; name a folder to write records, maps and heatmaps",
        ));
    }
    if inputs.is_empty() {
        return Err(option_rule(kw.py(), "no inputs: name images or folders"));
    }
    let mut o = DetectOptions::new(inputs, &model, out.clone());
    o.detector = detector_options(kw, Some(model))?;
    o.reference = reference_options(kw)?;
    decisions(kw, &mut o)?;
    if let Some(f) = kw.choice("format")? {
        o.format = f;
    }
    let base = if out.is_some() {
        OutputOptions::default()
    } else {
        OutputOptions::records_only()
    };
    o.output = OutputOptions {
        maps: kw.choice("maps")?.unwrap_or(base.maps),
        heatmaps: kw.choice("heatmaps")?.unwrap_or(base.heatmaps),
        heatmap_scale: kw.choice("heatmap_scale")?.unwrap_or(base.heatmap_scale),
        colorbar: kw.flag("colorbar")?,
        heatmap_alpha: kw.number32("heatmap_alpha")?.unwrap_or(base.heatmap_alpha),
        ..o.output
    };
    o.resume = kw.flag("resume")?;
    o.retry_failed = kw.flag("retry_failed")?;
    o.overwrite = kw.flag("overwrite")?;
    if let Some(s) = kw.string("shard")? {
        o.shard = Some(
            s.parse::<Shard>()
                .map_err(|e| option_value(kw.py(), "shard", repr_str(kw.py(), &s), &e))?,
        );
    }
    if let Some(b) = kw.usize("batch_size")? {
        o.pipeline.batch_size = b;
    }
    if let Some(p) = kw.count("max_pixels")? {
        o.pipeline.limits = DecodeLimits::with_max_pixels(p);
    }
    o.walk.include_masks = kw.flag("include_masks")?;
    let report = kw.flag("report")?;
    let defaults = ReportOptions::default();
    let thumbnail_size = kw.count("thumbnail_size")?;
    let page_size = kw.usize("page_size")?;
    if report {
        o.report = Some(ReportOptions {
            eval: None,
            thumbnail_size: thumbnail_size
                .map(|t| t.min(u32::MAX as u64) as u32)
                .unwrap_or(defaults.thumbnail_size),
            page_size: page_size.unwrap_or(defaults.page_size),
            limits: o.pipeline.limits,
        });
    }
    Ok(o)
}

/// One data path or several (`data`), as `Vec<PathBuf>`.
fn data_paths(kw: &mut Kwargs) -> PyResult<Vec<PathBuf>> {
    Ok(kw
        .paths("data")?
        .unwrap_or_default()
        .into_iter()
        .map(PathBuf::from)
        .collect())
}

/// Everything `zsad eval` takes, for `zsad.evaluate`; `out` is the folder to write to.
pub fn eval_options(kw: &mut Kwargs, model: Option<String>, out: PathBuf) -> PyResult<EvalOptions> {
    let data = data_paths(kw)?;
    if data.is_empty() {
        return Err(option_rule(
            kw.py(),
            "`data` is needed: an annotated dataset (an MVTec AD root or class folder, a VisA root, a manifest, or images with masks beside them)",
        ));
    }
    let predictions = kw.path("predictions")?;
    if predictions.is_some() && model.is_some() {
        return Err(option_rule(
            kw.py(),
            "`predictions` evaluates a finished detect run, `model` runs a detector: give one",
        ));
    }
    Ok(EvalOptions {
        data,
        predictions,
        detector: detector_options(kw, model)?,
        reference: reference_options(kw)?,
        out,
        resolution: kw.choice("resolution")?.unwrap_or_default(),
        single_label: kw.choice("single_label")?.unwrap_or_default(),
        aupro_grid: kw.choice("aupro_grid")?.unwrap_or_default(),
    })
}

/// Everything `zsad calibrate` takes, for `zsad.calibrate`; `out` is the file to write.
pub fn calibrate_options(
    kw: &mut Kwargs,
    model: Option<String>,
    out: PathBuf,
) -> PyResult<CalibrateOptions> {
    let data = data_paths(kw)?;
    let normal = kw.paths("normal")?.unwrap_or_default();
    let predictions = kw.path("predictions")?;
    let data = match (data.is_empty(), normal.is_empty()) {
        (true, true) => {
            return Err(option_rule(
                kw.py(),
                "give `data` (labelled data) or `normal` (normal images only) to choose thresholds on",
            ))
        }
        (false, false) => {
            return Err(option_rule(
                kw.py(),
                "`data` and `normal` exclude each other: thresholds are chosen on labelled data or on normal images",
            ))
        }
        (false, true) => CalibrationData::Labelled { data, predictions },
        (true, false) => {
            if predictions.is_some() {
                return Err(option_rule(
                    kw.py(),
                    "`predictions` goes with `data` (the labelled data it was run on), not `normal`",
                ));
            }
            CalibrationData::Normal(normal)
        }
    };
    Ok(CalibrateOptions {
        data,
        detector: detector_options(kw, model)?,
        reference: reference_options(kw)?,
        max_fpr: kw.number("max_fpr")?,
        min_recall: kw.number("min_recall")?,
        out,
    })
}
