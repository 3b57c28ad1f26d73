//! `zsad manifest`: write a manifest (image, mask, label, class) from any dataset layout, e.g.
//! a folder of images with their masks beside them (MTD), to edit, split or combine.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use crate::data::dataset;
use crate::data::outputs::write_atomic;

#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// Dataset root (MVTec AD, VisA, or images with `<stem>.png` / `<stem>_mask.png` masks beside
    /// them, the class being the top folder)
    #[arg(value_name = "ROOT")]
    pub root: PathBuf,
    /// Manifest to write: `.csv` or `.jsonl`; paths inside it are relative to its folder where
    /// possible
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: PathBuf,
}

fn relative(p: &Path, base: &Path) -> String {
    let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let (p, base) = (abs(p), abs(base));
    p.strip_prefix(&base).unwrap_or(&p).display().to_string()
}

pub fn run(args: ManifestArgs) -> anyhow::Result<()> {
    let (layout, samples) = dataset::read(&args.root)
        .with_context(|| format!("cannot read {}", args.root.display()))?;
    if samples.is_empty() {
        bail!("{}: no images", args.root.display());
    }
    let base = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(base)?;
    let csv = args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let mut out = if csv {
        String::from("image,mask,label,class\n")
    } else {
        String::new()
    };
    let mut anomalous = 0usize;
    for s in &samples {
        // Labels from the masks where the layout has none, so the manifest is explicit.
        let label = match s.label {
            Some(l) => l,
            None => match &s.mask {
                Some(m) => crate::data::image::to_luma8(&crate::data::image::decode(m)?)
                    .as_raw()
                    .iter()
                    .any(|&v| v > 127),
                None => false,
            },
        };
        anomalous += label as usize;
        let image = relative(&s.image, base);
        let mask = s
            .mask
            .as_ref()
            .map(|m| relative(m, base))
            .unwrap_or_default();
        if csv {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record([
                image.as_str(),
                mask.as_str(),
                if label { "1" } else { "0" },
                s.class.as_str(),
            ])?;
            out.push_str(std::str::from_utf8(&w.into_inner()?)?);
        } else {
            let mut v = serde_json::json!({"image": image, "label": label as u8, "class": s.class});
            if !mask.is_empty() {
                v["mask"] = serde_json::json!(mask);
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
    }
    write_atomic(&args.out, out.as_bytes())?;
    let classes: std::collections::BTreeSet<&str> =
        samples.iter().map(|s| s.class.as_str()).collect();
    eprintln!(
        "zsad: {} images ({} anomalous) in {} classes, read as {:?} -> {}",
        samples.len(),
        anomalous,
        classes.len(),
        layout,
        args.out.display()
    );
    Ok(())
}
