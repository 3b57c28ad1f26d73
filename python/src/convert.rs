//! Results into plain Python objects: JSON values (records, metrics, thresholds, settings) into
//! dicts, lists and numbers; maps and masks into NumPy arrays at the image's size.

use numpy::ndarray::Array2;
use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use zsad::jobs::single::ImageResult;

/// Anything serde serialises, as the Python object `json.loads` gives for the text zsad
/// writes: a record is the dict `json.loads` reads from a line of `scores.jsonl`, the metrics
/// those of `metrics.json`, number for number (f32 values as the CLI prints them).
pub fn serialised<'py, T: serde::Serialize + ?Sized>(
    py: Python<'py>,
    v: &T,
) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(v).map_err(|e| {
        crate::errors::exception(
            py,
            "ZsadError",
            format!("cannot convert a result: {e}"),
            None,
        )
    })?;
    py.import("json")?.getattr("loads")?.call1((text,))
}

/// An f32 as the Python float a record of the CLI holds: the shortest decimal that reads back
/// as the same f32 (as `scores.jsonl` prints it), read as a double.
fn record_float(x: f32) -> f64 {
    serde_json::to_string(&x)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(x as f64)
}

/// One image's result as the dict `zsad.Detection` is made from: `map` a float32 array and
/// `mask` a bool array, both `height x width`.
pub fn image_result<'py>(py: Python<'py>, r: ImageResult) -> PyResult<Bound<'py, PyDict>> {
    let (h, w) = (r.height as usize, r.width as usize);
    let shape_error = |e: numpy::ndarray::ShapeError| {
        crate::errors::exception(py, "ZsadError", format!("map of {w}x{h}: {e}"), None)
    };
    let d = PyDict::new(py);
    d.set_item("score", record_float(r.score))?;
    d.set_item("global_score", record_float(r.global_score))?;
    d.set_item("width", r.width)?;
    d.set_item("height", r.height)?;
    d.set_item(
        "map",
        Array2::from_shape_vec((h, w), r.map)
            .map_err(shape_error)?
            .into_pyarray(py),
    )?;
    d.set_item("map_max", record_float(r.stats.max))?;
    d.set_item("map_mean", record_float(r.stats.mean))?;
    d.set_item("map_min", record_float(r.stats.min))?;
    d.set_item("anomalous", r.anomalous)?;
    match r.mask {
        Some(m) => d.set_item(
            "mask",
            Array2::from_shape_vec((h, w), m)
                .map_err(shape_error)?
                .into_pyarray(py),
        )?,
        None => d.set_item("mask", py.None())?,
    }
    match &r.regions {
        Some(regions) => d.set_item("regions", serialised(py, &regions.items)?)?,
        None => d.set_item("regions", py.None())?,
    }
    Ok(d)
}
