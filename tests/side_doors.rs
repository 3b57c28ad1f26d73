//! Every door guarded: the side files and side doors of each command (tokenizers, model
//! folders, manifests, shard records, lock files, stdin lists, long names, strips of pixels,
//! other spellings of the same input, output folders inside the inputs, signals), each made
//! hostile here and checked for its exit status, message and records: never a hang, an abort
//! or a file written outside the output folder.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn tmp(name: &str) -> PathBuf {
    fresh_dir("doors", name)
}

/// A run past 60 s is a hang.
fn zsad(args: &[&str]) -> Output {
    run_zsad_timed(args, "", Duration::from_secs(60))
}

fn tiny_detect(inputs: &[&str], out: &Path, extra: &[&str]) -> Output {
    let o = out.display().to_string();
    let mut args = vec!["detect", "--model", "random:tiny", "--out", &o];
    args.extend_from_slice(extra);
    args.extend_from_slice(inputs);
    zsad(&args)
}

#[track_caller]
fn refused(o: &Output, want: &str) {
    let e = stderr_of(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2: {e}");
    assert!(e.contains(want), "missing `{want}` in:\n{e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// A strip of 200,000 x 1 pixels (inside the pixel budget), a 250-byte name, a name that is
/// 300 bytes once percent-encoded, and a path 3,000 bytes deep: the strip is a failed record,
/// every other image is scored with its files written under names the file system takes, and
/// `--resume` finds nothing left to do.
#[test]
fn strips_and_long_names_do_not_end_the_run() {
    let d = tmp("names");
    let data = d.join("data");
    let strip = image::RgbImage::from_pixel(200_000, 1, image::Rgb([9, 9, 9]));
    std::fs::create_dir_all(&data).unwrap();
    strip.save(data.join("strip.png")).unwrap();
    write_png(&data.join(format!("{}.png", "n".repeat(250))), 20, 20, 1);
    write_png(&data.join(format!("{}.png", "%".repeat(100))), 20, 20, 2);
    let mut deep = data.clone();
    for i in 0..12 {
        deep = deep.join(format!("{i}{}", "d".repeat(239)));
    }
    write_png(&deep.join("x.png"), 20, 20, 3);
    write_png(&data.join("plain.png"), 20, 20, 4);
    let out = d.join("out");
    let o = tiny_detect(&[data.to_str().unwrap()], &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let recs = records(&out);
    assert_eq!(recs.len(), 5, "{recs:?}");
    for r in &recs {
        let p = r["path"].as_str().unwrap();
        if p.ends_with("strip.png") {
            let e = r["error"].as_str().unwrap();
            assert!(e.contains("more elongated than 100:1"), "{e}");
            continue;
        }
        assert!(r["score"].is_number(), "{r}");
        for key in ["map", "heatmap"] {
            let rel = r[key].as_str().unwrap();
            assert!(out.join(rel).is_file(), "{rel}");
            for c in Path::new(rel).components() {
                assert!(c.as_os_str().len() <= 200, "{rel}");
            }
        }
    }
    let o = tiny_detect(&[data.to_str().unwrap()], &out, &["--resume"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the earlier failure: {}",
        stderr_of(&o)
    );
    assert_eq!(records(&out).len(), 5);
}

/// `--tokenizer` and the files of a model folder are read through the guarded reader: a
/// device, a FIFO and a runaway file are refused at once, by name.
#[test]
fn tokenizers_and_model_files_that_never_end_are_refused() {
    let d = tmp("tokenizer");
    write_png(&d.join("a.png"), 20, 20, 1);
    let img = d.join("a.png").display().to_string();
    let fifo = d.join("fifo.json");
    mkfifo(&fifo);
    let big = d.join("big.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    for (tok, want) in [
        ("/dev/zero".to_string(), "character device"),
        (fifo.display().to_string(), "FIFO"),
        (big.display().to_string(), "larger than"),
    ] {
        let o = tiny_detect(&[&img], &d.join("out"), &["--tokenizer", &tok]);
        refused(&o, want);
        assert!(!d.join("out").exists(), "nothing written before the checks");
    }
    // A model folder whose config.json is a FIFO.
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let src = fixtures().join("models/tiny-method");
    std::fs::copy(
        src.join("model.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    mkfifo(&model.join("config.json"));
    let o = zsad(&["info", "--model", model.to_str().unwrap()]);
    refused(&o, "FIFO");
    // A checkpoint that is a folder.
    let o = zsad(&[
        "import-checkpoint",
        d.to_str().unwrap(),
        "--format",
        "adaclip",
        "--model",
        "random:tiny",
        "--out",
        d.join("a.safetensors").to_str().unwrap(),
    ]);
    refused(&o, "a folder: only regular files are read");
}

/// A manifest row naming a FIFO and one naming /dev/urandom: refused by row, at once.
#[test]
fn manifest_rows_that_never_end_are_refused() {
    let d = tmp("manifest");
    write_png(&d.join("a.png"), 20, 20, 1);
    mkfifo(&d.join("fifo.png"));
    let m = d.join("m.csv");
    std::fs::write(
        &m,
        "image,mask,label,class\na.png,,0,x\nfifo.png,,0,x\na.png,/dev/urandom,1,x\n",
    )
    .unwrap();
    let o = zsad(&[
        "eval",
        "--data",
        m.to_str().unwrap(),
        "--model",
        "random:tiny",
        "--out",
        d.join("e").to_str().unwrap(),
    ]);
    refused(&o, "FIFO");
    refused(&o, "character device");
}

/// A shard folder of two scored images, to be made hostile.
fn shard(d: &Path, name: &str) -> PathBuf {
    let data = d.join(format!("{name}-data"));
    write_png(&data.join("a.png"), 20, 20, 1);
    write_png(&data.join("b.png"), 24, 20, 2);
    let out = d.join(name);
    let o = tiny_detect(&[data.to_str().unwrap()], &out, &[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    out
}

fn edit_records(dir: &Path, edit: impl Fn(&mut Value)) {
    let mut recs = records(dir);
    edit(&mut recs[0]);
    let text: String = recs.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("scores.jsonl"), text).unwrap();
}

/// `merge` reads files only inside each shard and writes only inside `--out`: a record naming
/// `../../x/maps/p.png` or `/etc/hostname` is refused by name, as are map files that are FIFOs
/// or links to /dev/zero; nothing appears outside the output folder.
#[test]
fn merge_stays_inside_its_folders() {
    let d = tmp("merge");
    let hostname = std::fs::read("/etc/hostname").ok();
    for (case, edit) in [
        (
            "up",
            Box::new(|r: &mut Value| r["map"] = "../../x/maps/p.png".into())
                as Box<dyn Fn(&mut Value)>,
        ),
        (
            "abs",
            Box::new(|r: &mut Value| r["heatmap"] = "/etc/hostname".into()),
        ),
    ] {
        let s = shard(&d, case);
        edit_records(&s, edit);
        let out = d.join(format!("{case}-merged"));
        let o = zsad(&["merge", s.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        refused(&o, "not a name zsad writes");
        let escape = format!("zsad-escape-{}", std::process::id());
        assert!(!d.join(&escape).exists() && !d.parent().unwrap().join(&escape).exists());
    }
    assert_eq!(std::fs::read("/etc/hostname").ok(), hostname);
    // A map that is a FIFO, a map linked to an endless device.
    for (case, make) in [
        ("fifo", Box::new(|p: &Path| mkfifo(p)) as Box<dyn Fn(&Path)>),
        (
            "zero",
            Box::new(|p: &Path| std::os::unix::fs::symlink("/dev/zero", p).unwrap()),
        ),
    ] {
        let s = shard(&d, case);
        let map = s.join(records(&s)[0]["map"].as_str().unwrap());
        std::fs::remove_file(&map).unwrap();
        make(&map);
        let out = d.join(format!("{case}-merged"));
        let o = zsad(&["merge", s.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        refused(&o, "only regular files are read");
    }
}

/// A FIFO in the lock file's place, and stdin that is no list of paths: refused, not waited on.
#[test]
fn a_fifo_lock_and_endless_stdin_are_refused() {
    let d = tmp("lock");
    write_png(&d.join("a.png"), 20, 20, 1);
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    mkfifo(&out.join(".zsad.lock"));
    let o = tiny_detect(&[d.join("a.png").to_str().unwrap()], &out, &[]);
    refused(&o, "FIFO");
    let o = run_zsad_timed(
        &["detect", "--model", "random:tiny", "-"],
        &"\0".repeat(10_000),
        Duration::from_secs(60),
    );
    refused(&o, "longer than 4096 bytes");
}

/// `in/x`, `./in/x` and the absolute path are one input: resuming under another spelling adds
/// no record.
#[test]
fn resume_under_other_spellings_adds_nothing() {
    let d = tmp("spell");
    for i in 0..3 {
        write_png(&d.join(format!("in/{i}.png")), 20, 20, i);
    }
    let abs = d.join("in").display().to_string();
    for (i, input) in ["in", "./in", abs.as_str()].into_iter().enumerate() {
        let mut args = vec!["detect", "--model", "random:tiny", "--out", "out", input];
        if i > 0 {
            args.push("--resume");
        }
        let o = run_zsad_in(&d, &args);
        assert!(o.status.success(), "{input}: {}", stderr_of(&o));
        let recs = records(&d.join("out"));
        assert_eq!(recs.len(), 3, "{input}: {recs:?}");
    }
}

/// `--out` inside the input folder: its maps and heatmaps are never inputs, however often the
/// run is resumed, and `--overwrite` starts afresh without touching the inputs.
#[test]
fn an_output_folder_inside_the_inputs_is_left_out() {
    let d = tmp("inside");
    for i in 0..3 {
        write_png(&d.join(format!("{i}.png")), 20, 20, i);
    }
    let out = d.join("out");
    let data = d.to_str().unwrap();
    for extra in [&[][..], &["--resume"], &["--resume"], &["--overwrite"]] {
        let o = tiny_detect(&[data], &out, extra);
        assert!(o.status.success(), "{extra:?}: {}", stderr_of(&o));
        assert_eq!(records(&out).len(), 3, "{extra:?}");
    }
    // Another run's folder among the inputs is left out too, and said so.
    let o = tiny_detect(&[data], &d.join("second"), &[]);
    assert!(
        stderr_of(&o).contains("left out of the inputs"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(records(&d.join("second")).len(), 3);
}

/// Links that never end get a record; a temporary file a killed run left is removed on the
/// next run; decoder messages are one line.
#[test]
fn link_loops_temporaries_and_decoder_messages() {
    let d = tmp("loops");
    let data = d.join("data");
    write_png(&data.join("a.png"), 20, 20, 1);
    std::os::unix::fs::symlink("self.png", data.join("self.png")).unwrap();
    let png = std::fs::read(data.join("a.png")).unwrap();
    let jpg = {
        let mut b = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::new(32, 32))
            .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Jpeg)
            .unwrap();
        b
    };
    std::fs::write(data.join("cut.jpg"), &jpg[..jpg.len() - 40]).unwrap();
    std::fs::write(data.join("cut.png"), &png[..png.len() - 30]).unwrap();
    let out = d.join("out");
    let o = tiny_detect(&[data.to_str().unwrap()], &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let by = by_path(&records(&out));
    let looped = by.iter().find(|(p, _)| p.ends_with("self.png")).unwrap().1;
    assert!(
        looped["error"].as_str().unwrap().contains("never ends"),
        "{looped}"
    );
    for r in by.values() {
        assert!(!r["error"].as_str().unwrap_or("").contains('\n'), "{r}");
    }
    assert!(!stderr_of(&o).contains("\n\n"), "{}", stderr_of(&o));
    // A killed run's temporary (its process long gone) is cleaned up on the next start.
    let stale = out.join("maps/.zz.png.tmp-2147483646");
    std::fs::write(&stale, b"half").unwrap();
    let o = tiny_detect(&[data.to_str().unwrap()], &out, &["--resume"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(!stale.exists());
    assert!(
        stderr_of(&o).contains("removed 1 temporary file"),
        "{}",
        stderr_of(&o)
    );
}

/// Peak memory is bounded by the images in flight, not by how many large images a folder
/// holds: 8 large images cost about what 3 do.
#[test]
fn memory_is_flat_in_the_number_of_large_images() {
    let d = tmp("memory");
    let src = d.join("src.png");
    let big = image::RgbImage::from_fn(6000, 4000, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])
    });
    big.save(&src).unwrap();
    let peak = |n: usize| -> f64 {
        let data = d.join(format!("data{n}"));
        std::fs::create_dir_all(&data).unwrap();
        for i in 0..n {
            std::fs::hard_link(&src, data.join(format!("{i}.png"))).unwrap();
        }
        let out = d.join(format!("out{n}"));
        let o = run_zsad_timed(
            &[
                "detect",
                "--model",
                "random:tiny",
                "-q",
                "--out",
                out.to_str().unwrap(),
                data.to_str().unwrap(),
            ],
            "",
            Duration::from_secs(600),
        );
        assert!(o.status.success(), "{}", stderr_of(&o));
        let run: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        run["info"]["peak_rss_mb"].as_f64().unwrap()
    };
    let (three, eight) = (peak(3), peak(8));
    assert!(
        eight < three * 1.25 + 64.0,
        "3 images: {three} MB, 8 images: {eight} MB"
    );
}

/// Ctrl-C: the run stops after the images in flight, says what it kept and that --resume goes
/// on (exit 130); --resume then finishes with every input recorded once.
#[test]
fn an_interrupted_run_says_what_it_kept_and_resumes() {
    use std::io::{BufRead, BufReader};
    let d = tmp("sigint");
    for i in 0..200 {
        write_png(&d.join(format!("in/{i:03}.png")), 32, 32, i);
    }
    let out = d.join("out");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_zsad"))
        .args([
            "detect",
            "--model",
            "random:ViT-B-32",
            "--batch-size",
            "1",
            "--out",
            out.to_str().unwrap(),
            d.join("in").to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first record, then interrupt.
    let log = out.join("scores.jsonl");
    let started = std::time::Instant::now();
    while std::fs::metadata(&log).map_or(true, |m| m.len() == 0) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no record written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: `kill` has no memory effects; the pid is our running child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let stderr: Vec<String> = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{stderr:?}");
    let last = stderr.last().cloned().unwrap_or_default();
    assert!(
        last.contains("interrupted") && last.contains("--resume"),
        "{last}"
    );
    let kept = records(&out).len();
    assert!(kept > 0 && kept < 200, "{kept}");
    let o = run_zsad_timed(
        &[
            "detect",
            "--model",
            "random:ViT-B-32",
            "-q",
            "--resume",
            "--out",
            out.to_str().unwrap(),
            d.join("in").to_str().unwrap(),
        ],
        "",
        Duration::from_secs(600),
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    let paths: BTreeSet<String> = records(&out)
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(paths.len(), 200);
    assert_eq!(records(&out).len(), 200);
}
