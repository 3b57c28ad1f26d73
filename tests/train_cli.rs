//! `zsad train` end to end on a synthetic dataset the test generates: striped textures of five
//! classes with pasted defects of known masks. Training on three classes must improve pixel
//! AUROC on the two held-out classes over the untrained adapter (zero-shot transfer), and the
//! adapter written is the adapter loaded.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::textures::make_class;
use common::*;
use serde_json::Value;

fn zsad(args: &[&str]) -> Output {
    run_zsad(args, "")
}

fn tmp(name: &str) -> PathBuf {
    fresh_dir("train", name)
}

fn err(o: &Output) -> String {
    stderr_of(o)
}

fn pixel_auroc(dir: &Path) -> f64 {
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
    m["mean"]["pixel_auroc"].as_f64().unwrap()
}

#[test]
fn training_transfers_to_held_out_classes_and_round_trips() {
    let Some(tok) = shared_tokenizer() else {
        return;
    };
    let model = fixtures().join("models/tiny-method").display().to_string();
    let dir = tmp("learn");
    let (train, held) = (dir.join("train"), dir.join("held"));
    for c in 0..3 {
        make_class(&train, c, 16, 1);
    }
    for c in 3..5 {
        make_class(&held, c, 16, 2);
    }
    // `zsad manifest` lists the folder layout with labels read from the masks.
    let man = dir.join("train.csv");
    let o = zsad(&[
        "manifest",
        train.to_str().unwrap(),
        "--out",
        man.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let text = std::fs::read_to_string(&man).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[0], "image,mask,label,class");
    assert_eq!(rows.len(), 1 + 48);
    assert_eq!(
        rows[1],
        "train/class0/000.png,train/class0/000_mask.png,0,class0"
    );
    assert_eq!(
        rows[2],
        "train/class0/001.png,train/class0/001_mask.png,1,class0"
    );

    let adapter = dir.join("a.safetensors");
    let a = adapter.display().to_string();
    let common = [
        "--model",
        model.as_str(),
        "--tokenizer",
        tok.as_str(),
        "--image-size",
        "64",
    ];
    let mut args = vec![
        "train",
        "--data",
        train.to_str().unwrap(),
        "--preset",
        "adaclip",
        "--epochs",
        "2",
        "--out",
        &a,
        "-q",
    ];
    args.extend(common);
    let o = zsad(&args);
    assert!(o.status.success(), "{}", err(&o));

    let eval = |name: &str, method: &[&str]| -> f64 {
        let out = dir.join(name);
        let mut args = vec![
            "eval",
            "--data",
            held.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-q",
        ];
        args.extend(common);
        args.extend(method);
        let o = zsad(&args);
        assert!(o.status.success(), "{}", err(&o));
        pixel_auroc(&out)
    };
    // The untrained adapter is exactly where training started (same preset, same init seed).
    let before = eval("before", &["--preset", "adaclip"]);
    let after = eval("after", &["--adapter", a.as_str()]);
    eprintln!("held-out pixel AUROC: untrained {before:.4}, trained {after:.4}");
    assert!(
        after > before + 0.15 && after > 0.8,
        "untrained {before}, trained {after}"
    );

    // The adapter carries its provenance; a checkpoint is beside it.
    let bytes = std::fs::read(&adapter).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cfg: Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["zsad.config"]).unwrap();
    assert_eq!(cfg["preset"], "adaclip");
    assert_eq!(cfg["provenance"]["epochs"], 2);
    assert_eq!(
        cfg["provenance"]["classes"],
        serde_json::json!(["class0", "class1", "class2"])
    );
    assert!(cfg["provenance"]["final_loss"]
        .as_f64()
        .unwrap()
        .is_finite());
    assert!(dir.join("a.ckpt.safetensors").exists());

    // Resume: one more epoch continues from the checkpoint instead of starting over.
    let mut args = vec![
        "train",
        "--data",
        train.to_str().unwrap(),
        "--preset",
        "adaclip",
        "--epochs",
        "3",
        "--out",
        &a,
        "--resume",
        "-q",
    ];
    args.extend(common);
    let o = zsad(&args);
    assert!(o.status.success(), "{}", err(&o));
    let bytes = std::fs::read(&adapter).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cfg: Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["zsad.config"]).unwrap();
    assert_eq!(cfg["provenance"]["epochs"], 3);
    assert_eq!(cfg["provenance"]["steps"], 3 * 48);

    // The adapter written is bit-equal to the trained variables (kept in the checkpoint) and
    // to what `zsad detect` loads.
    let adapter_tensors = zsad::method::Adapter::load(&adapter).unwrap().tensors;
    let (ckpt, _) = zsad::data::tensors::read(&dir.join("a.ckpt.safetensors")).unwrap();
    for (name, t) in &adapter_tensors {
        let c = &ckpt[&format!("param.{name}")];
        let (a, b) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}"
        );
    }
}

/// `zsad train ARGS` on the tiny model; `extra` after the common flags.
fn train_args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", "--model", model, "--out", out];
    v.extend(extra);
    v
}

#[track_caller]
fn refused(o: &Output, want: &str) {
    assert_eq!(o.status.code(), Some(2), "{}", err(o));
    assert!(err(o).contains(want), "missing `{want}` in\n{}", err(o));
}

/// Numeric flags out of range, the untrainable default preset, a folder as --out and an
/// existing adapter or checkpoint are refused before the data or the model is read.
#[test]
fn bad_flags_and_outputs_are_refused_up_front() {
    let dir = tmp("refuse");
    let model = fixtures().join("models/tiny-method").display().to_string();
    let out = dir.join("a.safetensors").display().to_string();
    // The data does not exist: each refusal must come before it is read.
    let data = ["--data", "no-such-data", "--preset", "adaclip"];
    for (flag, value, want) in [
        (
            "--lr",
            "nan",
            "must be a finite number (not NaN or infinity)",
        ),
        ("--lr", "0", "must be a finite number > 0"),
        ("--lr", "-0.01", "must be a finite number > 0"),
        ("--epochs", "-1", "must be an integer from 1 to 10000"),
        ("--lr", "inf", "not NaN or infinity"),
        ("--mosaic-rate", "1.5", "must be a number from 0 to 1"),
        ("--mosaic-rate", "NaN", "not NaN or infinity"),
        ("--epochs", "0", "must be an integer from 1 to 10000"),
        ("--batch-size", "0", "must be an integer from 1 to 1024"),
        ("--batch-size", "5000", "must be an integer from 1 to 1024"),
        ("--weight-decay", "-1", "must be a finite number >= 0"),
        ("--weight-decay", "nan", "not NaN or infinity"),
        ("--max-steps", "0", "must be an integer >= 1"),
        ("--joint-alpha", "2", "must be a number from 0 to 1"),
    ] {
        let mut extra = data.to_vec();
        extra.extend([flag, value]);
        let o = zsad(&train_args(&model, &out, &extra));
        refused(&o, &format!("invalid value '{value}' for '{flag} <"));
        refused(&o, want);
    }
    // The default preset learns nothing: the message lists those that do.
    let o = zsad(&train_args(&model, &out, &["--data", "no-such-data"]));
    refused(
        &o,
        "--preset zero-shot (the default) is training-free: there is nothing to train; give --preset P with P one of adaclip, anomalyclip, headclip, zsad, or --adapter A",
    );
    // A folder as --out.
    let folder = format!("{}/", dir.display());
    let o = zsad(&train_args(&model, &folder, &data));
    refused(
        &o,
        &format!(
            "names a folder; --out must be a file path like DIR/adapter.safetensors (e.g. --out {})",
            dir.join("adapter.safetensors").display()
        ),
    );
    let o = zsad(&train_args(&model, dir.to_str().unwrap(), &data));
    refused(&o, "--out must be a file path like DIR/adapter.safetensors");
    // An existing adapter, an existing checkpoint.
    std::fs::write(dir.join("a.safetensors"), b"precious").unwrap();
    let o = zsad(&train_args(&model, &out, &data));
    refused(&o, &format!("{out} exists: pass --overwrite to replace it"));
    std::fs::remove_file(dir.join("a.safetensors")).unwrap();
    std::fs::write(dir.join("a.ckpt.safetensors"), b"precious").unwrap();
    let o = zsad(&train_args(&model, &out, &data));
    refused(
        &o,
        "a.ckpt.safetensors exists: the checkpoint of an unfinished run writing",
    );
    refused(
        &o,
        "continue it with --resume, or start over with --overwrite",
    );
    assert_eq!(
        std::fs::read(dir.join("a.ckpt.safetensors")).unwrap(),
        b"precious"
    );
    // With --overwrite the checks pass and the (missing) data is what fails.
    let mut extra = data.to_vec();
    extra.push("--overwrite");
    let o = zsad(&train_args(&model, &out, &extra));
    refused(&o, "no-such-data: no such file or folder");
}

/// An image size that is not a multiple of the patch size is refused with the sizes near it.
#[test]
fn image_size_must_be_a_multiple_of_the_patch() {
    let dir = tmp("size");
    make_class(&dir.join("data"), 0, 2, 1);
    let model = fixtures().join("models/tiny-method").display().to_string();
    let out = dir.join("a.safetensors").display().to_string();
    let data = dir.join("data").display().to_string();
    let o = zsad(&train_args(
        &model,
        &out,
        &["--data", &data, "--preset", "adaclip", "--image-size", "60"],
    ));
    refused(
        &o,
        "--image-size 60 is not a multiple of the model's 8 px patch",
    );
    refused(&o, "use 56 or 64");
    assert!(!dir.join("a.safetensors").exists());
}

/// Without a terminal, training prints plain progress lines (every 10 steps and the last);
/// --quiet silences them; a second run refuses to replace the adapter unless --overwrite.
#[test]
fn progress_lines_when_not_a_terminal_and_overwrite() {
    let Some(tok) = shared_tokenizer() else {
        return;
    };
    let model = fixtures().join("models/tiny-method").display().to_string();
    let dir = tmp("lines");
    for c in 0..2 {
        make_class(&dir.join("data"), c, 3, 1);
    }
    let out = dir.join("a.safetensors").display().to_string();
    let data = dir.join("data").display().to_string();
    let common = [
        "--data",
        data.as_str(),
        "--preset",
        "adaclip",
        "--tokenizer",
        tok.as_str(),
        "--epochs",
        "2",
    ];
    let o = zsad(&train_args(&model, &out, &common));
    assert!(o.status.success(), "{}", err(&o));
    let e = err(&o);
    let lines: Vec<&str> = e
        .lines()
        .filter(|l| l.starts_with("zsad: train: "))
        .collect();
    assert_eq!(lines.len(), 2, "{e}");
    assert!(
        lines[0].starts_with("zsad: train: step 10/12 epoch 2/2 loss "),
        "{e}"
    );
    assert!(
        lines[1].starts_with("zsad: train: step 12/12 epoch 2/2 loss "),
        "{e}"
    );
    assert!(lines.iter().all(|l| l.contains(" s/step ETA ")), "{e}");
    assert!(lines[1].ends_with("ETA 0s"), "{e}");
    // The per-epoch lines are still there.
    assert!(e.contains("zsad: epoch 1/2: mean loss"), "{e}");
    let first = std::fs::read(&out).unwrap();

    let o = zsad(&train_args(&model, &out, &common));
    refused(&o, &format!("{out} exists: pass --overwrite to replace it"));
    assert_eq!(std::fs::read(&out).unwrap(), first);

    let mut extra = common.to_vec();
    extra.extend(["--overwrite", "-q", "--max-steps", "3"]);
    let o = zsad(&train_args(&model, &out, &extra));
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).is_empty(), "--quiet: {}", err(&o));
    let cfg = adapter_config(Path::new(&out));
    assert_eq!(cfg["provenance"]["steps"], 3);
}

/// Every tensor of the adapter at `path` is f32 and finite.
fn assert_finite(path: &Path, what: &str) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, t) in st.tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{what} {name}");
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert!(v.iter().all(|x| x.is_finite()), "{what} {name}");
    }
}

/// Half-precision training keeps f32 master variables and optimiser moments (as PyTorch's mixed
/// precision does): in f16, Adam's eps (1e-8) is 0, so a zero gradient would give 0/0 = NaN in
/// f16 moments; exponentials and norms are computed in f32 (`zsad`'s map softmax, whose logits
/// on this random model lie up to ~50 apart, and HeadCLIP's `2σ(θ)`, whose `e^−θ` is infinite
/// in f16 below θ = −11.09 with a backward of `0 · ∞`). Every preset trains a few steps in f16
/// to finite f32 tensors, and so does HeadCLIP started from head weights θ = −20. (A step whose
/// gradients are not finite is refused before it reaches the variables: `train::tests`.)
#[test]
fn half_precision_training_stays_finite() {
    let dir = tmp("f16");
    make_class(&dir.join("data"), 1, 6, 4);
    let data = dir.join("data");
    // `method`: `--preset P`, or `--adapter A` to start from.
    let train = |name: &str, method: &[&str]| {
        let out = dir.join(format!("{name}.safetensors"));
        let mut args = vec![
            "train",
            "--data",
            data.to_str().unwrap(),
            "--model",
            "random:tiny",
            "--dtype",
            "f16",
            "--max-steps",
            "4",
            "--image-size",
            "32",
            "-q",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(method);
        (zsad(&args), out)
    };
    for preset in ["anomalyclip", "adaclip", "headclip", "zsad"] {
        let (o, out) = train(preset, &["--preset", preset]);
        assert!(o.status.success(), "{preset}: {}", err(&o));
        assert_finite(&out, preset);
    }
    let mut off = zsad::method::Adapter::load(&dir.join("headclip.safetensors")).unwrap();
    let theta = off.tensors["vision.head_weights"].clone();
    off.tensors.insert(
        "vision.head_weights".into(),
        (theta.zeros_like().unwrap() - 20.0).unwrap(),
    );
    let start = dir.join("headclip-off.safetensors");
    std::fs::write(&start, off.to_bytes().unwrap()).unwrap();
    let (o, out) = train("from-theta", &["--adapter", start.to_str().unwrap()]);
    assert!(o.status.success(), "{}", err(&o));
    assert_finite(&out, "headclip from θ = −20");
}
