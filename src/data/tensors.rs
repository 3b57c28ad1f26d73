//! safetensors files of f32 tensors with string metadata (adapters, `zsad features` output).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// safetensors bytes of `tensors` (stored as f32, names sorted) with `meta`.
pub fn serialize(
    tensors: &HashMap<String, Tensor>,
    meta: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = v.iter().flat_map(|v| v.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    data.sort_by(|a, b| a.0.cmp(&b.0));
    let views = data
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::output(format!("cannot serialise tensors: {e}")))?;
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::output(format!("cannot serialise tensors: {e}")))
}

/// Every tensor of a safetensors file (on the CPU, in its stored dtype) and its metadata.
/// Only regular files are read (a FIFO named `x.safetensors` is an error, not a hang).
pub fn read(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = crate::fsio::read(path, crate::fsio::FileKind::Tensors)?;
    parse(&bytes, &path.display().to_string())
}

/// [`read`] on bytes in memory; `origin` names them in errors.
pub fn parse(
    bytes: &[u8],
    origin: &str,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bad = |m: String| Error::weights(origin.to_string(), m);
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    Ok((tensors, meta))
}
