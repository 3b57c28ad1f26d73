//! What makes text safe to put in the page: HTML escaping, relative URLs of file paths, and JSON
//! inside a `<script>` element. Paths and error messages come from hostile folders (`<b>.png`,
//! `a#b?.png`, `%41.png`, names that are not UTF-8), so nothing reaches the page unescaped.

use std::path::{Component, Path, PathBuf};

/// `s` with `& < > " '` escaped, for text and attribute values: the escaping of the eval plots,
/// which the page embeds, so both escape alike.
pub use crate::eval::plot::escape;

/// The unreserved bytes of RFC 3986 (letters, digits, `-._~`), which URLs carry as they are.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// `bytes` with every byte but the unreserved ones (and `/` where `slash` says so)
/// percent-encoded.
fn percent(bytes: &[u8], slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if unreserved(b) || (slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A relative `/`-separated file path as a relative URL: every byte but the unreserved ones
/// and the separators is percent-encoded, so `#`, `?`, `%` and a `:` that would read as a
/// scheme (`javascript:x.png`) stay part of the name.
pub fn url_path(rel: &str) -> String {
    percent(rel.as_bytes(), true)
}

/// [`url_path`] of a relative path's bytes (a file name that is not UTF-8 is still reachable).
pub fn url_of_path(rel: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    rel.components()
        .filter_map(|c| match c {
            Component::ParentDir => Some("..".to_string()),
            Component::Normal(n) => Some(percent(n.as_bytes(), false)),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The path from folder `from` to `to`, both absolute and free of `.`/`..` (canonical):
/// `../../data/x.png`.
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// `v` as JSON that can sit inside `<script type="application/json">`: `<`, `>` and `&` are
/// written as `\u003c`, `\u003e`, `\u0026` (they occur only inside strings, where these escapes
/// mean the same), so no `</script>` or `<!--` in a file name can end the element early.
pub fn script_json(v: &serde_json::Value) -> String {
    let s = serde_json::to_string(v).expect("JSON values serialise");
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape(r#"<img src=x onerror='a'>&"#),
            "&lt;img src=x onerror=&#39;a&#39;&gt;&amp;"
        );
        assert_eq!(escape("plain/ü.png"), "plain/ü.png");
    }

    #[test]
    fn urls_keep_names_whole() {
        assert_eq!(url_path("maps/a b/c.png"), "maps/a%20b/c.png");
        assert_eq!(url_path("x/%41#?.png"), "x/%2541%23%3F.png");
        assert_eq!(url_path("javascript:alert(1)"), "javascript%3Aalert%281%29");
        assert_eq!(url_path("ü.png"), "%C3%BC.png");
        use std::os::unix::ffi::OsStrExt;
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"../d/\xff x.png"));
        assert_eq!(url_of_path(odd), "../d/%FF%20x.png");
    }

    #[test]
    fn relative_paths_climb_to_the_common_folder() {
        let r = |a: &str, b: &str| relative(Path::new(a), Path::new(b));
        assert_eq!(r("/w/out", "/w/data/x.png"), Path::new("../data/x.png"));
        assert_eq!(r("/w/out", "/w/out/maps/x.png"), Path::new("maps/x.png"));
        assert_eq!(r("/a/b/c", "/x.png"), Path::new("../../../x.png"));
    }

    #[test]
    fn script_json_cannot_close_the_element() {
        let v = serde_json::json!({"p": "</script><script>alert(1)</script>&\u{2028}"});
        let s = script_json(&v);
        assert!(!s.contains('<') && !s.contains('>') && !s.contains('&'));
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }
}
