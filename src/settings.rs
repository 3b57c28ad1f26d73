//! Run settings as JSON: flattened to `a.b[0]` leaves and compared leaf by leaf, so that a
//! refusal can name every setting that differs (`detector.preset: "zero-shot" then, "adaclip"
//! now`). `run.json`, thresholds files and reference banks all record their settings this way.

use std::collections::BTreeMap;

use serde_json::Value;

/// An `f32` setting as JSON, in the shortest decimal that reads back as it (`0.7`, not the
/// `0.699999988079071` of its widening to `f64`): what the user typed, shown as typed.
pub fn f32_value(v: f32) -> Value {
    v.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// Whether two leaves are the same setting: equal, or numbers of which one is fractional that
/// are the same `f32` (settings are `f32`s; files written before [`f32_value`] hold their
/// widened `f64` spelling).
fn same(x: Option<&Value>, y: Option<&Value>) -> bool {
    match (x, y) {
        (Some(Value::Number(a)), Some(Value::Number(b))) if a.is_f64() || b.is_f64() => {
            match (a.as_f64(), b.as_f64()) {
                (Some(a), Some(b)) => a as f32 == b as f32,
                _ => false,
            }
        }
        _ => x == y,
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
            (!same(x, y)).then(|| (k.clone(), x.cloned(), y.cloned()))
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
    use serde_json::json;

    #[test]
    fn differences_are_named_leaf_by_leaf() {
        let a = json!({"d": {"preset": "zero-shot", "layers": [6, 12]}, "t": 0.5});
        let b = json!({"d": {"preset": "adaclip", "layers": [6]}, "t": 0.5});
        assert_eq!(
            described_differences(&a, &b, "then", "now"),
            vec![
                r#"d.layers[1]: then 12, now (absent)"#.to_string(),
                r#"d.preset: then "zero-shot", now "adaclip""#.into(),
            ]
        );
        assert_eq!(flatten(&json!({"x": []})).get("x"), Some(&json!([])));
    }

    #[test]
    fn f32_settings_read_as_typed_and_compare_with_their_widening() {
        assert_eq!(f32_value(0.7).to_string(), "0.7");
        assert_eq!(json!(0.7f32).to_string(), "0.699999988079071");
        assert!(leaf_differences(
            &json!({"t": 0.699999988079071}),
            &json!({"t": f32_value(0.7)})
        )
        .is_empty());
        assert_eq!(
            leaf_differences(&json!({"t": 0.7}), &json!({"t": 0.8})).len(),
            1
        );
        assert_eq!(
            leaf_differences(&json!({"n": 1}), &json!({"n": 2})).len(),
            1
        );
        assert_eq!(f32_value(f32::NAN), Value::Null);
    }
}
