//! Run settings as JSON: flattened to `a.b[0]` leaves and compared leaf by leaf, so that a
//! refusal can name every setting that differs (`detector.preset: "zero-shot" then, "adaclip"
//! now`). `run.json`, thresholds files and reference banks all record their settings this way.

use std::collections::BTreeMap;

use serde_json::Value;

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
