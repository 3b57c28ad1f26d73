//! `zsad manifest` as a library job: a manifest (image, mask, label, class) from any dataset
//! layout, to edit, split or combine; labels from the masks where the layout has none.

use std::path::Path;

use crate::data::dataset::{self, Layout};
use crate::error::{Error, OptionError, Result};
use crate::fsio::OutDir;

/// What a manifest holds.
pub struct ManifestSummary {
    pub images: usize,
    pub anomalous: usize,
    pub classes: usize,
    pub layout: Layout,
}

/// `p` relative to `base` where it is under it (both made absolute), else `p`.
fn relative(p: &Path, base: &Path) -> String {
    let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let (p, base) = (abs(p), abs(base));
    p.strip_prefix(&base).unwrap_or(&p).display().to_string()
}

fn csv_row(fields: [&str; 4]) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(fields)
        .map_err(|e| Error::output(format!("csv: {e}")))?;
    let bytes = w
        .into_inner()
        .map_err(|e| Error::output(format!("csv: {e}")))?;
    String::from_utf8(bytes).map_err(|e| Error::output(format!("csv: {e}")))
}

/// Writes the manifest of the dataset at `root` to `out` (`.csv`, else JSON Lines); paths in
/// it are relative to its folder where possible.
pub fn write_manifest(root: &Path, out: &Path) -> Result<ManifestSummary> {
    let (layout, samples) =
        dataset::read(root).map_err(|e| e.context(format!("cannot read {}", root.display())))?;
    if samples.is_empty() {
        return Err(OptionError::rule(format!("{}: no images", root.display())));
    }
    let (dir, name) = OutDir::for_file(out)?;
    let base = dir.root().to_path_buf();
    let csv = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let mut text = if csv {
        String::from("image,mask,label,class\n")
    } else {
        String::new()
    };
    let mut anomalous = 0usize;
    for s in &samples {
        let label = match (s.label, &s.mask) {
            (Some(l), _) => l,
            (None, Some(m)) => crate::data::image::decode_mask(m)?
                .as_raw()
                .iter()
                .any(|&v| v > 127),
            (None, None) => false,
        };
        anomalous += label as usize;
        let image = relative(&s.image, &base);
        let mask = s
            .mask
            .as_ref()
            .map(|m| relative(m, &base))
            .unwrap_or_default();
        if csv {
            text.push_str(&csv_row([
                &image,
                &mask,
                if label { "1" } else { "0" },
                &s.class,
            ])?);
        } else {
            let mut v = serde_json::json!({"image": image, "label": label as u8, "class": s.class});
            if !mask.is_empty() {
                v["mask"] = serde_json::json!(mask);
            }
            text.push_str(&v.to_string());
            text.push('\n');
        }
    }
    dir.write(&name, text.as_bytes())?;
    let classes: std::collections::BTreeSet<&str> =
        samples.iter().map(|s| s.class.as_str()).collect();
    Ok(ManifestSummary {
        images: samples.len(),
        anomalous,
        classes: classes.len(),
        layout,
    })
}
