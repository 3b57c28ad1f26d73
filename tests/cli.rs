//! End-to-end runs of the `zsad` binary: `features`, `info`, and the error paths users meet.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;

fn zsad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zsad"))
        .args(args)
        .output()
        .expect("runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zsad-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Image file -> PIL-exact resize -> model, and texts -> real tokenizer -> model, through the
/// CLI, against transformers (tolerance 1e-4).
#[test]
fn features_match_the_reference_end_to_end() {
    let tokenizer = std::path::PathBuf::from(tokenizer_file());
    let exp = load_expected("tiny-quickgelu.expected.safetensors");
    let meta = {
        let bytes = std::fs::read(fixtures().join("tiny-quickgelu.expected.safetensors")).unwrap();
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        m.metadata().clone().unwrap()
    };
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let out = tmp("features").join("f.safetensors");
    let img = fixtures().join("preprocess/rgb_50x37.png");
    let model = fixtures().join("models/tiny-quickgelu");
    let mut args = vec![
        "features".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--tokenizer".into(),
        tokenizer.display().to_string(),
        "--layers".into(),
        "1,3".into(),
        "--out".into(),
        out.display().to_string(),
    ];
    for t in &texts {
        args.push("--text".into());
        args.push(t.clone());
    }
    args.push(img.display().to_string());
    args.push(img.display().to_string());
    let o = zsad(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(got["image_embeds"].dims(), &[2, 24]);
    assert_eq!(got["layer_1"].dims(), &[2, 17, 32]);
    assert_eq!(got["layer_3"].dims(), &[2, 17, 32]);
    let want = exp["file_image_embeds"].broadcast_as((2, 24)).unwrap();
    assert_close("image_embeds (file)", &got["image_embeds"], &want, 1e-4);
    assert_close(
        "text_embeds",
        &got["text_embeds"],
        &exp["text_embeds"],
        1e-4,
    );
    // No temporary file is left beside the output.
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn features_name_a_corrupt_image_and_fail() {
    let d = tmp("corrupt");
    let bad = d.join("broken.png");
    std::fs::write(&bad, b"this is not a png").unwrap();
    let out = d.join("f.safetensors");
    let o = zsad(&[
        "features",
        "--model",
        "random:tiny",
        "--out",
        out.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("broken.png") && e.contains("not an image"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn features_reject_a_layer_beyond_the_depth() {
    let d = tmp("depth");
    let img = fixtures().join("preprocess/rgb_50x37.png");
    let out = d.join("f.safetensors");
    let o = zsad(&[
        "features",
        "-m",
        "random:tiny",
        "--layers",
        "9",
        "-o",
        out.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--layers 9: layers are 1-based, and the vision tower has 4"),
        "{}",
        stderr(&o)
    );
}

/// A larger input size resizes the position embedding: layer_i grows to the new grid.
#[test]
fn features_at_another_image_size() {
    let d = tmp("size");
    let img = fixtures().join("preprocess/grey_50x37.png");
    let out = d.join("f.safetensors");
    let o = zsad(&[
        "features",
        "-m",
        "random:tiny",
        "--image-size",
        "48",
        "--pos-interp",
        "bilinear",
        "--layers",
        "2",
        "-o",
        out.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(got["layer_2"].dims(), &[1, 37, 32]);
}

#[test]
fn info_reports_the_architecture() {
    let o = zsad(&["info", "--model", "random:ViT-B-32", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["grid"], 7);
    assert_eq!(j["config"]["vision_config"]["num_hidden_layers"], 12);
    assert_eq!(j["naming"], "random");
    assert!(
        j["gemm"].as_str() == Some(zsad::clip::kernels::gemm_backend()),
        "f32 runs on the f32 kernel: {j}"
    );

    let o = zsad(&[
        "info",
        "--model",
        fixtures().join("models/tiny-vitb-openai").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("openai names") && text.contains("14x14 grid"),
        "{text}"
    );
}

/// `--precision bf16` names the GEMM it runs: the CPU's best bf16 unit, or the emulation on a
/// CPU without one; `ZSAD_BF16_KERNEL` picks another for comparisons, and an unknown or absent
/// one falls back to the best.
#[test]
fn info_names_the_bf16_gemm() {
    let gemm = |env: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_zsad"));
        c.args([
            "info",
            "--model",
            "random:ViT-B-32",
            "--precision",
            "bf16",
            "--json",
        ]);
        c.env_remove("ZSAD_BF16_KERNEL");
        if let Some(v) = env {
            c.env("ZSAD_BF16_KERNEL", v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        j["gemm"].as_str().unwrap().to_string()
    };
    let units = zsad::clip::gemm_bf16::available();
    let best = units.first().map_or_else(
        || format!("{}+bf16-emulated", zsad::clip::kernels::gemm_backend()),
        |k| k.name().to_string(),
    );
    println!("bf16 units on this CPU: {:?}", units);
    assert_eq!(gemm(None), best);
    assert_eq!(gemm(Some("no-such-unit")), best);
    assert_eq!(
        gemm(Some("none")),
        format!("{}+bf16-emulated", zsad::clip::kernels::gemm_backend())
    );
    if units.contains(&zsad::clip::gemm_bf16::Kernel::Avx512Bf16) {
        assert_eq!(gemm(Some("avx512-bf16")), "avx512-bf16");
    }
}

/// A reader that goes away (`zsad info | head -c1`) ends zsad by SIGPIPE, as it does `cat`,
/// never with a panic about a broken pipe.
#[cfg(unix)]
#[test]
fn closed_stdout_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_zsad"))
        .args(["info", "--model", "random:ViT-B-32"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {err}",
        o.status
    );
}

/// Offline, a hub id that is not cached fails at once with one line that says what to fetch.
#[test]
fn uncached_hub_model_offline_is_one_clear_line() {
    let cache = tmp("hub-cache");
    let o = Command::new(env!("CARGO_BIN_EXE_zsad"))
        .args(["info", "--model", "openai/clip-vit-base-patch16"])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(
        e.contains("config.json and model.safetensors missing"),
        "{e}"
    );
    assert!(
        e.contains(
            "`hf download openai/clip-vit-base-patch16 config.json model.safetensors \
             tokenizer.json --local-dir DIR`"
        ) && e.contains("pass `--model DIR`"),
        "{e}"
    );
    assert!(e.contains(cache.to_str().unwrap()), "{e}");
}

/// A mistyped local folder is reported as such, not looked up (and not found) on the hub.
#[test]
fn mistyped_model_folder_says_no_such_folder() {
    for spec in ["./models/clip-vit-b16", "tests/fixtures/models/tiny-metod"] {
        let o = Command::new(env!("CARGO_BIN_EXE_zsad"))
            .args(["info", "--model", spec])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2));
        let e = stderr(&o);
        assert!(
            e.contains(&format!("no such model folder or file: {spec}")),
            "{e}"
        );
        assert!(!e.contains("Hugging Face cache"), "{e}");
    }
}

#[test]
fn help_documents_models_and_exit_status() {
    let o = zsad(&["--help"]);
    let h = String::from_utf8_lossy(&o.stdout);
    assert!(
        h.contains("random:ARCH") && h.contains("Exit status"),
        "{h}"
    );
    let o = zsad(&["features", "--help"]);
    let h = String::from_utf8_lossy(&o.stdout);
    assert!(
        h.contains("image_embeds") && h.contains("hidden_states"),
        "{h}"
    );
}

/// `--device cuda` in a build without CUDA is one line saying how to get it, for every command
/// that loads a model, before any work.
#[test]
fn cuda_without_cuda_support_is_one_clear_line() {
    if candle_core::utils::cuda_is_available() {
        skip(
            "cli::cuda_without_cuda_support_is_one_clear_line",
            "this build has CUDA",
        );
        return;
    }
    let dir = tmp("nocuda");
    common::write_png(&dir.join("a.png"), 32, 32, 1);
    let img = dir.join("a.png");
    let img = img.to_str().unwrap();
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    for args in [
        vec![
            "detect",
            img,
            "--model",
            "random:tiny",
            "--device",
            "cuda",
            "--out",
            out,
        ],
        vec!["info", "--model", "random:tiny", "--device", "cuda"],
        vec![
            "bench",
            "--model",
            "random:tiny",
            "--device",
            "cuda",
            "--images",
            dir.to_str().unwrap(),
        ],
        vec![
            "features",
            "--model",
            "random:tiny",
            "--device",
            "cuda",
            "--out",
            out,
            img,
        ],
    ] {
        let o = zsad(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = stderr(&o);
        assert_eq!(e.trim().lines().count(), 1, "{args:?}: {e}");
        assert!(
            e.contains("built without CUDA support") && e.contains("--features cuda"),
            "{e}"
        );
    }
}
