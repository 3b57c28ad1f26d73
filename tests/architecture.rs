//! The house's rules, read from `src/` (non-test code):
//! - the top-level modules form the layers that `src/lib.rs` lists, and a module imports only
//!   modules listed before it;
//! - no two files import each other, nor does any chain of files lead back to where it began;
//! - every file zsad reads goes through `fsio` (one guarded reader) and every file it writes
//!   through `fsio::OutDir` (one confined writer): `std::fs` reads, writes, opens and renames
//!   appear nowhere else;
//! - `src/cli/` stays thin: no command's `run` is longer than 80 lines, and at most five
//!   functions anywhere are longer than 100.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The layers, bottom up: a module may use only those before it.
const LAYERS: &[&str] = &[
    "error", "fsio", "rng", "choice", "progress", "interp", "settings", "device", "data", "clip",
    "method", "eval", "decision", "train", "report", "jobs", "cli",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, relative (`jobs/detect.rs`), with its text.
fn files() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src()).unwrap().display().to_string();
                out.insert(rel, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    out
}

/// The text without `#[cfg(test)]` items, comments and string contents.
fn code(text: &str) -> String {
    let mut t = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("#[cfg(test)]") {
        t.push_str(&rest[..i]);
        let after = &rest[i..];
        let (brace, semi) = (after.find('{'), after.find(';'));
        let end = match (brace, semi) {
            (Some(b), Some(s)) if s < b => s + 1,
            (Some(b), _) => {
                let mut depth = 0;
                let mut end = after.len();
                for (k, c) in after[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            _ => after.len(),
        };
        rest = &after[end..];
    }
    t.push_str(rest);
    strip_comments_and_strings(&t)
}

fn strip_comments_and_strings(t: &str) -> String {
    let b = t.as_bytes();
    let mut out = String::with_capacity(t.len());
    // Skipped text keeps its line breaks, so that line numbers and lengths stay true.
    let skip = |out: &mut String, from: usize, to: usize| {
        out.extend(t[from..to.min(t.len())].chars().filter(|&c| c == '\n'));
    };
    let mut i = 0;
    while i < b.len() {
        let prev_ident = i > 0 && is_ident(b[i - 1] as char);
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = t[i + 2..].find("*/").map_or(b.len(), |k| i + 2 + k + 2);
            skip(&mut out, i, end);
            i = end;
        } else if b[i] == b'r' && !prev_ident && matches!(b.get(i + 1), Some(b'"' | b'#')) {
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close = format!("\"{}", "#".repeat(hashes));
            let start = i + 2 + hashes;
            let end = t[start..]
                .find(&close)
                .map_or(b.len(), |k| start + k + close.len());
            out.push_str("\"\"");
            skip(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                if b[j] == b'\\' {
                    j += 1;
                }
                j += 1;
            }
            out.push_str("\"\"");
            skip(&mut out, i, j);
            i = j + 1;
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal ('"', '\'', '{'): skipped whole.
            let from = if b[i + 1] == b'\\' { i + 3 } else { i + 1 };
            let close = t[from..].find('\'').map_or(b.len(), |k| from + k);
            i = close + 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The module path of a file: `jobs/detect.rs` is `[jobs, detect]`, `jobs/mod.rs` `[jobs]`.
fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The file a module path lands in: the longest prefix that is a file.
fn resolve(files: &BTreeMap<String, String>, path: &[String]) -> String {
    for n in (0..=path.len()).rev() {
        let m = path[..n].join("/");
        if n == 0 {
            return "lib.rs".into();
        }
        for cand in [format!("{m}.rs"), format!("{m}/mod.rs")] {
            if files.contains_key(&cand) {
                return cand;
            }
        }
    }
    "lib.rs".into()
}

/// `use a::{b, c::{d, e}}` as `[[a, b], [a, c, d], [a, c, e]]`.
fn expand_use(s: &str) -> Vec<Vec<String>> {
    fn split_top(s: &str) -> Vec<String> {
        let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
        for c in s.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if c == ',' && depth == 0 {
                out.push(std::mem::take(&mut cur));
            } else {
                cur.push(c);
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
    fn go(prefix: &[String], s: &str, out: &mut Vec<Vec<String>>) {
        for item in split_top(s) {
            if let Some(open) = item.find('{') {
                let head: Vec<String> = item[..open]
                    .split("::")
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect();
                let inner = &item[open + 1..item.rfind('}').unwrap_or(item.len())];
                let p: Vec<String> = prefix.iter().cloned().chain(head).collect();
                go(&p, inner, out);
            } else {
                let item = item.split(" as ").next().unwrap_or("");
                let mut p = prefix.to_vec();
                p.extend(item.split("::").filter(|x| !x.is_empty()).map(String::from));
                out.push(p);
            }
        }
    }
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let s = s.replace(" ::", "::").replace(":: ", "::");
    let mut out = Vec::new();
    go(&[], &s.replace(", ", ","), &mut out);
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The modules a file declares in files of their own (`mod name;`).
fn child_modules(code: &str) -> Vec<String> {
    code.split("mod ")
        .skip(1)
        .filter_map(|s| {
            let name: String = s.chars().take_while(|&c| is_ident(c)).collect();
            s[name.len()..]
                .trim_start()
                .starts_with(';')
                .then_some(name)
        })
        .collect()
}

/// The module paths a file's code names: `use` items, and `crate::`/`super::`/`self::` paths
/// and declared child modules anywhere in the code.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let ok = i == 0 || !is_ident(rest[..i].chars().last().unwrap());
        let after = &rest[i + 4..];
        let end = after.find(';').unwrap_or(after.len());
        if ok {
            out.extend(expand_use(&after[..end]));
        }
        rest = &after[end.min(after.len())..];
    }
    let heads: Vec<String> = ["crate", "super", "self"]
        .iter()
        .map(|s| s.to_string())
        .chain(child_modules(code))
        .collect();
    for head in &heads {
        let pat = format!("{head}::");
        let mut from = 0;
        while let Some(k) = code[from..].find(&pat) {
            let at = from + k;
            from = at + pat.len();
            if at > 0
                && (is_ident(code[..at].chars().last().unwrap()) || code[..at].ends_with("::"))
            {
                continue;
            }
            let tail: String = code[at..]
                .chars()
                .take_while(|&c| is_ident(c) || c == ':')
                .collect();
            out.push(
                tail.split("::")
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect(),
            );
        }
    }
    out
}

/// File -> the files it imports.
fn file_graph(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in files {
        let code = code(text);
        let here = module_of(rel);
        let children: BTreeSet<String> = child_modules(&code).into_iter().collect();
        for p in named_paths(&code) {
            let Some(first) = p.first() else { continue };
            let target: Vec<String> = match first.as_str() {
                "crate" => p[1..].to_vec(),
                "super" => {
                    let ups = p.iter().take_while(|x| *x == "super").count();
                    let base = &here[..here.len().saturating_sub(ups)];
                    base.iter()
                        .cloned()
                        .chain(p[ups..].iter().cloned())
                        .collect()
                }
                "self" => here.iter().cloned().chain(p[1..].iter().cloned()).collect(),
                c if children.contains(c) => {
                    here.iter().cloned().chain(p.iter().cloned()).collect()
                }
                _ => continue,
            };
            let target: Vec<String> = target.into_iter().filter(|x| x != "self").collect();
            let f = resolve(files, &target);
            if &f != rel {
                g.entry(rel.clone()).or_default().insert(f);
            }
        }
    }
    g
}

/// The strongly connected components with more than one file (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>, nodes: &[String]) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: HashMap<String, usize>,
        low: HashMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit(t: &mut T, v: &str) {
        t.index.insert(v.into(), t.next);
        t.low.insert(v.into(), t.next);
        t.next += 1;
        t.stack.push(v.into());
        t.on.insert(v.into());
        let next: Vec<String> =
            t.g.get(v)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
        for w in next {
            if !t.index.contains_key(&w) {
                visit(t, &w);
                let lw = t.low[&w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(&w) {
                let iw = t.index[&w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(&w);
                let done = w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for n in nodes {
        if !t.index.contains_key(n) {
            visit(&mut t, n);
        }
    }
    t.out
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let files = files();
    let g = file_graph(&files);
    let rank = |rel: &str| -> Option<usize> {
        let top = module_of(rel).into_iter().next()?;
        LAYERS.iter().position(|l| *l == top)
    };
    let mut upward = Vec::new();
    for (a, targets) in &g {
        let Some(ra) = rank(a) else { continue };
        for b in targets {
            if let Some(rb) = rank(b) {
                if rb > ra {
                    upward.push(format!(
                        "{a} imports {b} ({} is above {})",
                        LAYERS[rb], LAYERS[ra]
                    ));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point up:\n  {}",
        upward.join("\n  ")
    );
    // Every top-level module is placed in a layer, and lib.rs says the same order.
    let lib = &files["lib.rs"];
    for rel in files.keys() {
        if let Some(top) = module_of(rel).first() {
            assert!(
                LAYERS.contains(&top.as_str()),
                "{rel}: module `{top}` is in no layer"
            );
            assert!(
                lib.contains(&format!("[`{top}`]")),
                "lib.rs does not describe `{top}`"
            );
        }
    }
}

#[test]
fn no_files_import_each_other() {
    let files = files();
    let g = file_graph(&files);
    let nodes: Vec<String> = files.keys().cloned().collect();
    let found = cycles(&g, &nodes);
    assert!(
        found.is_empty(),
        "files that import each other (directly or through others): {found:?}"
    );
    // The checker itself: a cycle it must see.
    let mut toy: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    toy.entry("a".into()).or_default().insert("b".into());
    toy.entry("b".into()).or_default().insert("a".into());
    assert_eq!(cycles(&toy, &["a".into(), "b".into()]).len(), 1);
    assert!(g
        .get("jobs/detect.rs")
        .is_some_and(|t| t.contains("fsio.rs")));
}

#[test]
fn files_are_read_and_written_only_through_fsio() {
    let forbidden = [
        "fs::read(",
        "fs::read_to_string(",
        "fs::read_dir(",
        "fs::write(",
        "File::open(",
        "File::create(",
        "OpenOptions::new(",
        "fs::rename(",
        "fs::copy(",
        "ImageReader::open(",
        "image::open(",
        ".from_path(",
    ];
    let mut found = Vec::new();
    for (rel, text) in files() {
        if rel == "fsio.rs" {
            continue;
        }
        let code = code(&text);
        for f in forbidden {
            // Whole names only: `PthFile::open(` is not `File::open(`.
            let hit = code.match_indices(f).any(|(i, _)| {
                !f.starts_with(|c: char| c.is_alphanumeric())
                    || !code[..i].ends_with(|c: char| is_ident(c))
            });
            if hit {
                found.push(format!("{rel}: {f}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "file access outside src/fsio.rs:\n  {}",
        found.join("\n  ")
    );
}

/// `(lines, file, name)` of every non-test function.
fn functions() -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    for (rel, text) in files() {
        let code = code(&text);
        let lines: Vec<&str> = code.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            let t = t
                .strip_prefix("pub ")
                .or_else(|| t.strip_prefix("pub(crate) "))
                .unwrap_or(t);
            let t = t.trim_start_matches("const ").trim_start_matches("unsafe ");
            let t = t.trim_start_matches("extern \"\" ");
            let Some(rest) = t.strip_prefix("fn ") else {
                continue;
            };
            let name: String = rest.chars().take_while(|&c| is_ident(c)).collect();
            let (mut depth, mut started) = (0i32, false);
            for (k, l) in lines[n..].iter().enumerate() {
                if !started && k == 0 && l.contains(';') && !l.contains('{') {
                    break;
                }
                for c in l.chars() {
                    match c {
                        '{' => {
                            depth += 1;
                            started = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if started && depth == 0 {
                    out.push((k + 1, rel.clone(), name.clone()));
                    break;
                }
            }
        }
    }
    out
}

#[test]
fn commands_stay_thin_and_functions_short() {
    let fns = functions();
    let long_runs: Vec<_> = fns
        .iter()
        .filter(|(n, f, name)| f.starts_with("cli/") && name == "run" && *n > 80)
        .collect();
    assert!(
        long_runs.is_empty(),
        "`run` over 80 lines in src/cli/: {long_runs:?}"
    );
    let mut long: Vec<_> = fns.iter().filter(|(n, _, _)| *n > 100).collect();
    long.sort();
    assert!(
        long.len() <= 5,
        "{} functions over 100 lines: {long:?}",
        long.len()
    );
    assert!(
        fns.iter()
            .any(|(_, f, n)| f == "cli/detect.rs" && n == "run"),
        "the checker finds functions"
    );
}
