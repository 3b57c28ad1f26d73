//! JSON values as the page shows them. Settings are `f32`s: runs of older versions stored them
//! widened to `f64` (`--pixel-threshold 0.7` as `0.699999988079071`), new runs in their
//! shortest form ([`crate::settings::f32_value`]). A number that is exactly an `f32` widened is
//! shown as that `f32`'s shortest form, so both read `0.7`, as the user typed it.

use serde_json::{Number, Value};

/// `n` as text: integers as they are; a fraction that is exactly an `f32` widened to `f64` in
/// the `f32`'s shortest form (Rust's `{}`); any other in the `f64`'s shortest form.
pub fn number(n: &Number) -> String {
    match n.as_f64() {
        Some(x) if n.is_f64() => {
            let f = x as f32;
            if f.is_finite() && f as f64 == x {
                format!("{f}")
            } else {
                n.to_string()
            }
        }
        _ => n.to_string(),
    }
}

/// A leaf of the settings as text: strings as they are, numbers by [`number`], arrays and
/// objects as JSON with their numbers so written.
pub fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => number(n),
        Value::Array(a) => format!("[{}]", a.iter().map(json).collect::<Vec<_>>().join(", ")),
        Value::Object(_) => json(v),
        other => other.to_string(),
    }
}

/// `v` as JSON text with its numbers written by [`number`].
fn json(v: &Value) -> String {
    match v {
        Value::Number(n) => number(n),
        Value::Array(a) => format!("[{}]", a.iter().map(json).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, x)| format!("{}: {}", Value::String(k.clone()), json(x)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn f32_settings_read_as_typed() {
        let n = |v: Value| shown(&v);
        // Older runs: the f32 widened; newer ones: its shortest form. Both show as typed.
        assert_eq!(n(json!(0.7f32 as f64)), "0.7");
        assert_eq!(0.7f32 as f64, 0.699999988079071);
        assert_eq!(n(json!(0.699999988079071)), "0.7");
        assert_eq!(n(json!(0.7)), "0.7");
        assert_eq!(n(json!(0.35f32 as f64)), "0.35");
        assert_eq!(n(json!(1e-6f32 as f64)), "0.000001");
        // Not an f32: an f64's own shortest form.
        assert_eq!(n(json!(0.1)), "0.1");
        assert_eq!(n(json!(0.123456789012)), "0.123456789012");
        assert_eq!(n(json!(1e300)), "1e+300");
        // Integers, and everything else.
        assert_eq!(n(json!(518)), "518");
        assert_eq!(n(json!(-3)), "-3");
        assert_eq!(n(json!(2.0)), "2");
        assert_eq!(n(json!("0.699999988079071")), "0.699999988079071");
        assert_eq!(n(json!(null)), "null");
        assert_eq!(n(json!(true)), "true");
        assert_eq!(
            n(json!([0.1f32 as f64, 0.9f32 as f64])),
            "[0.1, 0.9]",
            "a heatmap range"
        );
        assert_eq!(
            n(json!({"a": 0.25, "b\"": [1]})),
            r#"{"a": 0.25, "b\"": [1]}"#
        );
    }
}
