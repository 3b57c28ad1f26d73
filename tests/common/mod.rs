//! Helpers shared by the integration tests: fixture paths, the deterministic pixel input that
//! `scripts/make_fixtures.py` also computes, and tensor comparison.
#![allow(dead_code)]

pub mod browser;
pub mod textures;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `../shared` beside the project, if present.
pub fn shared() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    p.exists().then_some(p)
}

/// x[n,c,h,w] = ((7n + 13c + 17h + 31w) mod 97) / 48.5 - 1, in f32 as in the fixture script.
pub fn pixels(n: usize, size: usize) -> Tensor {
    let mut v = Vec::with_capacity(n * 3 * size * size);
    for b in 0..n {
        for c in 0..3 {
            for h in 0..size {
                for w in 0..size {
                    let k = (7 * b + 13 * c + 17 * h + 31 * w) % 97;
                    v.push(k as f32 / 48.5f32 - 1.0f32);
                }
            }
        }
    }
    Tensor::from_vec(v, (n, 3, size, size), &Device::Cpu).unwrap()
}

pub fn load_expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = max_abs_diff(got, want);
    assert!(d <= tol, "{what}: max abs error {d} > {tol}");
}

/// Token ids stored as i64 `[N, L]` -> rows of u32.
pub fn ids(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

/// Runs the `zsad` binary with `args`, feeding `stdin`; a run past 20 minutes is a hang.
pub fn run_zsad(args: &[&str], stdin: &str) -> Output {
    run_zsad_timed(args, stdin, std::time::Duration::from_secs(1200))
}

/// Runs the `zsad` binary, killing it and failing the test after `limit`: a hang is a
/// failure, not a stuck test. The pipes are drained while it runs, so a chatty run cannot
/// block on a full pipe.
pub fn run_zsad_timed(args: &[&str], stdin: &str, limit: std::time::Duration) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_zsad"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: `kill` has no memory effects; `pid` is our child, not yet reaped
            // (its waiting thread has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("zsad {args:?} ran past {limit:?} (hung)");
        }
    }
}

/// `zsad detect INPUTS --model random:tiny -q --out OUT EXTRA...`.
pub fn detect_tiny(inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "detect",
        inputs.to_str().unwrap(),
        "--model",
        "random:tiny",
        "-q",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    run_zsad(&args, "")
}

/// A fresh, empty folder under the system temp dir, unique to this test process.
pub fn fresh_dir(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zsad-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `zsad.config` metadata of an adapter file.
pub fn adapter_config(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    serde_json::from_str(&header.metadata().as_ref().unwrap()["zsad.config"]).unwrap()
}

/// Runs the `zsad` binary in the folder `cwd` (relative paths in `args` are relative to it).
pub fn run_zsad_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zsad"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("runs")
}

/// A deterministic RGB test image.
pub fn write_png(path: &Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 7 + y * 3 + seed * 11) % 256) as u8,
            ((x * y + seed) % 256) as u8,
            ((x + 2 * y + seed * 5) % 256) as u8,
        ])
    });
    img.save(path).unwrap();
}

/// The records of `DIR/scores.jsonl`.
pub fn records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("scores.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Records by their `path`.
pub fn by_path(
    recs: &[serde_json::Value],
) -> std::collections::BTreeMap<String, serde_json::Value> {
    recs.iter()
        .map(|r| (r["path"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

/// A CLIP `tokenizer.json` to pass as `--tokenizer`: `../shared/clip-tokenizer`'s when present,
/// else the vocabulary compiled into zsad written to a file once (the two are byte for byte the
/// same file, which `tokenizer_parity` checks), so that tests needing only the tokenizer
/// always run.
pub fn tokenizer_file() -> String {
    if let Some(p) = shared().map(|s| s.join("clip-tokenizer/tokenizer.json")) {
        if p.exists() {
            return p.display().to_string();
        }
    }
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("zsad-tokenizer-{}.json", std::process::id()));
        std::fs::write(&p, zsad::clip::tokenizer::embedded_json().unwrap()).unwrap();
        p
    })
    .display()
    .to_string()
}

/// `tokenizer_file()` as an `Option`, for tests written before it.
pub fn shared_tokenizer() -> Option<String> {
    Some(tokenizer_file())
}

/// Says that `test` is skipped and why, on stderr and in `skipped.txt` of the tests' temporary
/// folder, which `.ci/run` sums up in one line (cargo hides a passing test's stderr).
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIP {test}: {reason}");
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        use std::io::Write;
        let _ = writeln!(f, "{test}: {reason}");
    }
}

/// A FIFO at `p` (reading it would block until a writer comes).
pub fn mkfifo(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {}",
        p.display()
    );
}
