//! `DIR/run.json`: what made the records in an output folder. Written when a run starts, before
//! the first record; `--resume` compares it with the new run's settings and refuses to add a
//! single line made with other settings, naming each one that differs.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::fsio::{FileKind, OutDir};
use crate::settings::{leaf_differences, show};

pub const FILE_NAME: &str = "run.json";

/// The version of the record format (`scores.jsonl` keys, map encoding, output names).
pub const RECORD_FORMAT_VERSION: u32 = 2;

/// Settings keys that name where things were rather than what they were: shown, not compared
/// (a model folder moved to another disk is the same model when its files hash the same).
const NOT_COMPARED: &[&str] = &["model.spec", "adapter.path", "tokenizer.path"];

/// `{name, bytes, sha256}` of a model file, as `run.json` records it.
pub fn file_entry(path: &Path, kind: FileKind) -> Result<Value> {
    let bytes = crate::fsio::check_regular(path, kind)?;
    Ok(json!({
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "bytes": bytes,
        "sha256": crate::fsio::sha256(path, kind)?,
    }))
}

/// Sets `info.KEY` in `DIR/run.json` (what a run learns at its end, such as the range of
/// `--heatmap-scale run`); nothing when the folder has no `run.json`.
pub fn note_info(dir: &OutDir, key: &str, value: Value) -> Result<()> {
    let Some(mut r) = RunRecord::read(dir.root())? else {
        return Ok(());
    };
    match &mut r.info {
        Value::Object(m) => {
            m.insert(key.to_string(), value);
        }
        other => *other = json!({ key: value }),
    }
    // `read` copies the format version into the settings for comparing; the file keeps it once.
    if let Value::Object(m) = &mut r.settings {
        m.remove("record_format_version");
    }
    r.write(dir)
}

/// The record of a run: `settings` (compared on `--resume`) and `info` (not compared).
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub settings: Value,
    pub info: Value,
}

impl RunRecord {
    pub fn new(settings: Value, info: Value) -> Self {
        Self { settings, info }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "zsad_version": env!("CARGO_PKG_VERSION"),
            "record_format_version": RECORD_FORMAT_VERSION,
            "settings": self.settings,
            "info": self.info,
        })
    }

    pub fn write(&self, dir: &OutDir) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(&self.to_json())
            .map_err(|e| Error::output(format!("run.json: {e}")))?;
        bytes.push(b'\n');
        dir.write(FILE_NAME, &bytes)
    }

    /// Reads `DIR/run.json`; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(FILE_NAME);
        let Some(text) = crate::fsio::read_text_if_exists(&path, FileKind::Settings)? else {
            return Ok(None);
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            Error::output(format!(
                "{}: not readable ({e}); it records what made this folder: restore it, or start again with --overwrite",
                path.display()
            ))
        })?;
        let version = v.get("record_format_version").and_then(Value::as_u64);
        let mut settings = v.get("settings").cloned().unwrap_or(Value::Null);
        if let Value::Object(m) = &mut settings {
            // Compared like any setting: records of another format version must not be mixed.
            m.insert("record_format_version".into(), json!(version));
        }
        Ok(Some(Self {
            settings,
            info: v.get("info").cloned().unwrap_or(Value::Null),
        }))
    }

    /// The settings as compared (with the record format version, as [`Self::read`] gives it).
    fn comparable(&self) -> Value {
        let mut s = self.settings.clone();
        if let Value::Object(m) = &mut s {
            m.entry("record_format_version")
                .or_insert(json!(RECORD_FORMAT_VERSION));
        }
        s
    }

    /// The settings that differ between `self` (the earlier run) and `now`, one line each:
    /// `detector.preset: "zero-shot" then, "adaclip" now`.
    pub fn differences(&self, now: &RunRecord) -> Vec<String> {
        self.differences_named(now, "then", "now")
    }

    /// [`Self::differences`] with each side named (`"bottle" in shard-0, "object" in shard-1`).
    pub fn differences_named(&self, other: &RunRecord, mine: &str, theirs: &str) -> Vec<String> {
        leaf_differences(&self.comparable(), &other.comparable())
            .into_iter()
            .filter(|(k, _, _)| !NOT_COMPARED.contains(&k.as_str()))
            .map(|(k, x, y)| format!("{k}: {} {mine}, {} {theirs}", show(x), show(y)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_setting_and_ignore_locations() {
        let then = RunRecord::new(
            json!({"model": {"spec": "/a/clip", "files": [{"sha256": "aa"}]}, "detector": {"preset": "zero-shot", "sigma": 4}}),
            json!({"batch_size": 5}),
        );
        let same_elsewhere = RunRecord::new(
            json!({"model": {"spec": "/b/clip", "files": [{"sha256": "aa"}]}, "detector": {"preset": "zero-shot", "sigma": 4}}),
            json!({"batch_size": 1}),
        );
        assert!(then.differences(&same_elsewhere).is_empty());
        let other = RunRecord::new(
            json!({"model": {"spec": "/a/clip", "files": [{"sha256": "bb"}]}, "detector": {"preset": "adaclip", "sigma": 4}, "threshold": 0.5}),
            json!({}),
        );
        let d = then.differences(&other);
        assert_eq!(
            d,
            vec![
                r#"detector.preset: "zero-shot" then, "adaclip" now"#.to_string(),
                r#"model.files[0].sha256: "aa" then, "bb" now"#.into(),
                "threshold: (absent) then, 0.5 now".into(),
            ]
        );
    }

    #[test]
    fn round_trips_through_the_file() {
        let d = std::env::temp_dir().join(format!("zsad-runjson-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        assert!(RunRecord::read(&d).unwrap().is_none());
        let r = RunRecord::new(json!({"x": [1, {"y": "z"}]}), json!({"n": 1}));
        r.write(&OutDir::create(&d).unwrap()).unwrap();
        let back = RunRecord::read(&d).unwrap().unwrap();
        assert!(back.differences(&r).is_empty());
        // An older record format is a difference.
        let old = r#"{"record_format_version": 1, "settings": {"x": [1, {"y": "z"}]}}"#;
        std::fs::write(d.join(FILE_NAME), old).unwrap();
        let back = RunRecord::read(&d).unwrap().unwrap();
        assert_eq!(
            back.differences(&r),
            vec!["record_format_version: 1 then, 2 now".to_string()]
        );
        std::fs::write(d.join(FILE_NAME), "{ torn").unwrap();
        let e = RunRecord::read(&d).unwrap_err().to_string();
        assert!(e.contains("run.json") && e.contains("--overwrite"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
        // Only regular files are hashed.
        assert!(file_entry(Path::new("/dev/null"), FileKind::Weights).is_err());
    }
}
