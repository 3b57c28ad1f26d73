//! Where the report reads a record's input image, and whether it may. Records are data: a
//! crafted `scores.jsonl` could name `/home/x/secret.png`, and the page would show a thumbnail
//! of it. So an input is read only when its canonical path lies under one of the run's input
//! roots (`run.json`'s `info.input_roots`: the canonical paths of the arguments `zsad detect`
//! was given, and the folders of files listed on its stdin). Runs of versions that did not
//! record them are read as before, with a warning.
//!
//! Paths are text in records and `run.json`, with bytes that are not UTF-8 written `\xNN`
//! ([`crate::data::inputs::path_text`]): the literal path is tried first, then the one with
//! those bytes put back ([`crate::data::inputs::path_of_text`]).

use std::path::PathBuf;

use serde_json::Value;

use crate::data::inputs::path_of_text;
use crate::data::run_record::RunRecord;

/// The path written as `text`: the literal one when it exists, else the one with `\xNN` turned
/// back into bytes (when that differs).
pub fn path_from_text(text: &str) -> PathBuf {
    let literal = PathBuf::from(text);
    if std::fs::symlink_metadata(&literal).is_ok() {
        return literal;
    }
    path_of_text(text)
}

/// Where a run's input images are read from, and which may be read.
#[derive(Debug, Clone)]
pub struct InputPolicy {
    /// The folder relative record paths are read from (where `zsad detect` ran).
    pub from: PathBuf,
    /// The canonical input roots; `None` for runs that did not record them (anything is read).
    pub roots: Option<Vec<PathBuf>>,
}

impl InputPolicy {
    /// The policy of `run` (`None`: no `run.json`), with `here` (the current folder) for a run
    /// that does not say where it ran.
    pub fn of(run: Option<&RunRecord>, here: PathBuf) -> Self {
        let info = run.map(|r| &r.info);
        let from = info
            .and_then(|i| i.get("cwd")?.as_str())
            .map(path_from_text)
            .filter(|d| d.is_dir())
            .unwrap_or(here);
        let roots = info
            .and_then(|i| i.get("input_roots")?.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(path_from_text)
                    .collect()
            });
        Self { from, roots }
    }

    /// The file to read for the record path `record`: its canonical path, or why it is not
    /// read (it cannot be found, or lies outside every input root).
    pub fn locate(&self, record: &str) -> Result<PathBuf, String> {
        let literal = self.from.join(record);
        let path = match literal.canonicalize() {
            Ok(p) => p,
            Err(first) => {
                let decoded = self.from.join(path_of_text(record));
                match decoded.canonicalize() {
                    Ok(p) if decoded != literal => p,
                    _ => return Err(format!("{}: {first}", literal.display())),
                }
            }
        };
        match &self.roots {
            Some(roots) if !roots.iter().any(|r| path.starts_with(r)) => Err(format!(
                "not read: {} lies outside the run's input folders (run.json's info.input_roots)",
                path.display()
            )),
            _ => Ok(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn inputs_are_read_only_under_the_roots() {
        let d = std::env::temp_dir().join(format!("zsad-report-inputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("in/sub")).unwrap();
        std::fs::create_dir_all(d.join("other")).unwrap();
        let d = d.canonicalize().unwrap();
        std::fs::write(d.join("in/sub/a.png"), b"x").unwrap();
        std::fs::write(d.join("other/secret.png"), b"x").unwrap();
        std::fs::write(d.join("in2.png"), b"x").unwrap();
        let odd = d.join(OsStr::from_bytes(b"in/\xff\xfe.png"));
        std::fs::write(&odd, b"x").unwrap();
        let run = RunRecord::new(
            json!({}),
            json!({"cwd": d.join("in").to_str(), "input_roots": [d.join("in").to_str()]}),
        );
        let p = InputPolicy::of(Some(&run), PathBuf::from("/"));
        assert_eq!(p.from, d.join("in"));
        assert_eq!(p.locate("sub/a.png").unwrap(), d.join("in/sub/a.png"));
        let abs = d.join("in/sub/a.png");
        assert_eq!(p.locate(abs.to_str().unwrap()).unwrap(), abs);
        // Outside the roots, by an absolute path or by climbing out.
        for crafted in [
            d.join("other/secret.png").to_str().unwrap(),
            "../other/secret.png",
            "../in2.png",
        ] {
            let e = p.locate(crafted).unwrap_err();
            assert!(
                e.contains("outside the run's input folders"),
                "{crafted}: {e}"
            );
        }
        // A name that is not UTF-8, written as path_text writes it.
        let text = crate::data::inputs::path_text(&odd);
        assert!(text.ends_with("\\xFF\\xFE.png"));
        assert_eq!(p.locate(&text).unwrap(), odd);
        assert!(p.locate("missing.png").unwrap_err().contains("missing.png"));
        // A run of an older version: no roots, anything is read.
        let old = InputPolicy::of(Some(&RunRecord::new(json!({}), json!({}))), d.clone());
        assert!(old.roots.is_none());
        assert!(old.locate("other/secret.png").is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
