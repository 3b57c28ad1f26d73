//! `DIR/run.json`: what made the records in an output folder. Written when a run starts, before
//! the first record; `--resume` compares it with the new run's settings and refuses to add a
//! single line made with other settings, naming each one that differs.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

pub const FILE_NAME: &str = "run.json";

/// The version of the record format (`scores.jsonl` keys, map encoding, output names).
pub const RECORD_FORMAT_VERSION: u32 = 2;

/// Settings keys that name where things were rather than what they were: shown, not compared
/// (a model folder moved to another disk is the same model when its files hash the same).
const NOT_COMPARED: &[&str] = &["model.spec", "adapter.path", "tokenizer.path"];

/// SHA-256 of a file, hex (the digest the Hugging Face hub shows for LFS files).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// `{name, bytes, sha256}` of a file.
pub fn file_entry(path: &Path) -> Result<Value> {
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    Ok(json!({
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "bytes": bytes,
        "sha256": sha256_file(path)?,
    }))
}

/// Sets `info.KEY` in `DIR/run.json` (what a run learns at its end, such as the range of
/// `--heatmap-scale run`); nothing when the folder has no `run.json`.
pub fn note_info(dir: &Path, key: &str, value: Value) -> Result<()> {
    let Some(mut r) = RunRecord::read(dir)? else {
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

    pub fn write(&self, dir: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(&self.to_json())
            .map_err(|e| Error::Output(format!("run.json: {e}")))?;
        bytes.push(b'\n');
        crate::data::outputs::write_atomic(&dir.join(FILE_NAME), &bytes)
    }

    /// Reads `DIR/run.json`; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            Error::Output(format!(
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
        leaf_differences(&self.comparable(), &now.comparable())
            .into_iter()
            .filter(|(k, _, _)| !NOT_COMPARED.contains(&k.as_str()))
            .map(|(k, x, y)| format!("{k}: {} then, {} now", show(x), show(y)))
            .collect()
    }
}

/// The leaves (`a.b[0]`) where two JSON values differ, with each side's value (`None`:
/// absent), in key order.
pub fn leaf_differences(a: &Value, b: &Value) -> Vec<(String, Option<Value>, Option<Value>)> {
    let (a, b) = (flatten(a), flatten(b));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k), b.get(k));
            (x != y).then(|| (k.clone(), x.cloned(), y.cloned()))
        })
        .collect()
}

/// [`leaf_differences`] as message lines: `key: {a_word} X, {b_word} Y`.
pub fn described_differences(a: &Value, b: &Value, a_word: &str, b_word: &str) -> Vec<String> {
    leaf_differences(a, b)
        .into_iter()
        .map(|(k, x, y)| format!("{k}: {a_word} {}, {b_word} {}", show(x), show(y)))
        .collect()
}

/// A value in a message: cut when long, `(absent)` when missing.
pub fn show(v: Option<Value>) -> String {
    v.as_ref().map(short).unwrap_or_else(|| "(absent)".into())
}

/// Long values (hashes, sentences) cut for messages.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

/// `{"a": {"b": [1, 2]}}` as `a.b[0] = 1, a.b[1] = 2`.
pub fn flatten(v: &Value) -> BTreeMap<String, Value> {
    fn go(prefix: String, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    go(p, x, out);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                for (i, x) in a.iter().enumerate() {
                    go(format!("{prefix}[{i}]"), x, out);
                }
            }
            other => {
                out.insert(prefix, other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    go(String::new(), v, &mut out);
    out
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
        r.write(&d).unwrap();
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
        assert_eq!(
            sha256_file(Path::new("/dev/null")).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
