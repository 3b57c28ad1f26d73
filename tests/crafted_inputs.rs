//! Crafted and corrupted model, adapter, checkpoint and map files: each is refused with a clear
//! error (exit status 2 through the CLI) naming the file and the field, never a panic or an
//! abort. The fuzz tests mutate valid files of every format with a seeded generator (byte
//! flips, interesting values, truncations, insertions, deletions, copied chunks) and require
//! every reader to return Ok or Err.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Output;
use std::time::Instant;

use common::*;
use serde_json::{json, Value};
use zsad::clip::{load_model, ClipConfig, LoadOptions};
use zsad::method::{Adapter, DetectorConfig, Preset};
use zsad::rng::SplitMix64;

fn zsad(args: &[&str]) -> Output {
    run_zsad(args, "")
}

fn tmp(name: &str) -> std::path::PathBuf {
    fresh_dir("crafted", name)
}

/// A stored (uncompressed) zip of `entries`, as torch.save writes them.
fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
    buf.into_inner()
}

fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut v = Vec::new();
            f.read_to_end(&mut v).unwrap();
            (f.name().unwrap().to_string(), v)
        })
        .collect()
}

fn zsad_adapter(clip: &ClipConfig) -> Adapter {
    Adapter::init(
        DetectorConfig::preset(Preset::Zsad, clip, "random:tiny"),
        clip,
        3,
    )
    .unwrap()
}

/// The bytes of `a` with its `zsad.config` edited.
fn edited(a: &Adapter, edit: impl Fn(&mut Value)) -> Vec<u8> {
    let mut j = serde_json::to_value(&a.config).unwrap();
    edit(&mut j);
    let meta = HashMap::from([
        ("zsad.format".to_string(), "zsad-adapter/1".to_string()),
        ("zsad.config".to_string(), j.to_string()),
    ]);
    zsad::data::tensors::serialize(&a.tensors, meta).unwrap()
}

// ---- through the CLI: exit status 2 and a message naming the file and the field ----------

#[test]
fn config_json_with_zero_heads_exits_2_naming_the_field() {
    let dir = tmp("heads");
    std::fs::copy(
        fixtures().join("models/tiny-method/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("models/tiny-method/config.json")).unwrap(),
    )
    .unwrap();
    cfg["vision_config"]["num_attention_heads"] = json!(0);
    cfg["vision_config"]["image_size"] = json!(1u64 << 40);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let o = zsad(&["info", "--model", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr_of(&o);
    assert!(
        e.contains(&format!("{}", dir.join("config.json").display())),
        "{e}"
    );
    assert!(
        e.contains("vision_config.num_attention_heads = 0 must divide hidden_size = 32 (1..=32)")
            && e.contains("vision_config.image_size = 1099511627776 is outside 8..=4096"),
        "{e}"
    );
}

#[test]
fn crafted_adapters_exit_2_naming_the_field() {
    let clip = ClipConfig::tiny();
    let a = zsad_adapter(&clip);
    let dir = tmp("adapters");
    let img = dir.join("x.png");
    image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 5, 77]))
        .save(&img)
        .unwrap();
    let mut nan = a.clone();
    let t = &nan.tensors["vision.deep.1"];
    let shape = t.dims().to_vec();
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[2] = f32::NAN;
    nan.tensors.insert(
        "vision.deep.1".into(),
        candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap(),
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "size",
            edited(&a, |j| j["image_size"] = json!(10_000_000)),
            "image_size = 10000000 is outside 8..=2048",
        ),
        (
            "sigma-huge",
            edited(&a, |j| j["sigma"] = json!(1e9)),
            "sigma = 1000000000 is outside [0, 64]",
        ),
        (
            "sigma-negative",
            edited(&a, |j| j["sigma"] = json!(-1.0)),
            "sigma = -1 is outside [0, 64]",
        ),
        (
            "nan",
            nan.to_bytes().unwrap(),
            "tensor `vision.deep.1` holds 1 NaN or infinite values",
        ),
    ];
    for (name, bytes, want) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let out = dir.join(format!("out-{name}"));
        let o = zsad(&[
            "detect",
            "--model",
            "random:tiny",
            "--adapter",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            img.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{name}: {}", stderr_of(&o));
        let e = stderr_of(&o);
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains(want),
            "{name}: {e}"
        );
    }
}

/// A .pth of a million nested lists overflowed the stack of candle's pickle reader.
#[test]
fn deeply_nested_pickle_exits_2() {
    let mut pickle = vec![0x80, 2];
    pickle.extend(std::iter::repeat_n(b']', 1_000_000));
    pickle.extend(std::iter::repeat_n(b'a', 999_999));
    pickle.push(b'.');
    let dir = tmp("nested");
    let pth = dir.join("nested.pth");
    std::fs::write(&pth, zip_of(&[("archive/data.pkl".into(), pickle)])).unwrap();
    let out = dir.join("a.safetensors");
    let o = zsad(&[
        "import-checkpoint",
        "--format",
        "adaclip",
        pth.to_str().unwrap(),
        "--model",
        "random:tiny",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    let e = stderr_of(&o);
    assert!(
        e.contains(pth.to_str().unwrap())
            && e.contains("archive/data.pkl: objects nested more than 100 deep"),
        "{e}"
    );
    assert!(!out.exists());
}

/// Tensors larger than their storages: refused before allocating, naming the tensor.
#[test]
fn oversized_tensor_in_a_checkpoint_exits_2() {
    let src = std::fs::read(fixtures().join("models/tiny-gelu-openai/open_clip_pytorch_model.bin"))
        .unwrap();
    // Every storage cut to 3 bytes: each tensor's size now exceeds its data.
    let mut entries = unzip(&src);
    for (name, bytes) in entries.iter_mut() {
        if name.contains("/data/") {
            bytes.truncate(3);
        }
    }
    let dir = tmp("oversized");
    let bin = dir.join("open_clip_pytorch_model.bin");
    std::fs::write(&bin, zip_of(&entries)).unwrap();
    let o = zsad(&["info", "--model", bin.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    let e = stderr_of(&o);
    assert!(
        e.contains(bin.to_str().unwrap()) && e.contains("which holds 3"),
        "{e}"
    );
}

// ---- fuzzing -------------------------------------------------------------------------------

/// Seeded mutations of valid bytes; `hot` (a header, a pickle) gets three in four of them.
struct Mutator(SplitMix64);

impl Mutator {
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n.max(1) as u64) as usize
    }

    fn pos(&mut self, len: usize, hot: &Range<usize>) -> usize {
        let hot_end = hot.end.min(len);
        if hot.start < hot_end && self.below(4) != 0 {
            hot.start + self.below(hot_end - hot.start)
        } else {
            self.below(len)
        }
    }

    fn mutate(&mut self, base: &[u8], hot: &Range<usize>) -> Vec<u8> {
        const INTERESTING: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'9', b'-', b'.', b'"', b'[', b'}'];
        let mut b = base.to_vec();
        for _ in 0..1 + self.below(4) {
            if b.is_empty() {
                break;
            }
            let p = self.pos(b.len(), hot);
            match self.below(7) {
                0 => b[p] ^= 1 << self.below(8),
                1 => b[p] = INTERESTING[self.below(INTERESTING.len())],
                2 => b[p] = self.0.next_u64() as u8,
                3 => b.truncate(p),
                4 => {
                    let n = 1 + self.below(16);
                    let bytes: Vec<u8> = (0..n).map(|_| self.0.next_u64() as u8).collect();
                    b.splice(p..p, bytes).for_each(drop);
                }
                5 => {
                    let end = (p + 1 + self.below(64)).min(b.len());
                    b.drain(p..end);
                }
                _ => {
                    let from = self.below(b.len());
                    let n = (1 + self.below(32)).min(b.len() - from).min(b.len() - p);
                    let chunk = b[from..from + n].to_vec();
                    b[p..p + n].copy_from_slice(&chunk);
                }
            }
        }
        b
    }
}

/// Runs `check` on `n` mutations of `base` and fails on any panic, naming the iteration.
fn fuzz(
    what: &str,
    seed: u64,
    base: &[u8],
    hot: Range<usize>,
    n: usize,
    mut check: impl FnMut(&[u8]) -> bool,
) {
    let mut m = Mutator(SplitMix64::keyed(seed, what));
    let started = Instant::now();
    let mut ok = 0;
    let mut panics = Vec::new();
    for i in 0..n {
        let bytes = m.mutate(base, &hot);
        match catch_unwind(AssertUnwindSafe(|| check(&bytes))) {
            Ok(true) => ok += 1,
            Ok(false) => {}
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panics.push(format!("iteration {i}: {msg}"));
            }
        }
    }
    eprintln!(
        "{what}: {n} mutations, {ok} accepted, {} refused, {:.1} s",
        n - ok - panics.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        panics.is_empty(),
        "{what}: {} panics: {:?}",
        panics.len(),
        &panics[..panics.len().min(5)]
    );
}

/// Replaces one numeric leaf of `v` with an interesting number.
fn poke_number(v: &mut Value, rng: &mut Mutator) {
    const NUMBERS: &[f64] = &[
        0.0, 1.0, -1.0, 2.0, 3.0, 7.0, 8.0, 1e9, 1e18, 1e300, 0.5, -0.0, 65536.0, 4097.0,
    ];
    // JSON pointers of the numeric leaves.
    fn walk(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Number(_) => out.push(at),
            Value::Object(m) => m
                .iter()
                .for_each(|(k, x)| walk(x, format!("{at}/{k}"), out)),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, x)| walk(x, format!("{at}/{i}"), out)),
            _ => {}
        }
    }
    let mut leaves = Vec::new();
    walk(v, String::new(), &mut leaves);
    if leaves.is_empty() {
        return;
    }
    let leaf = leaves[rng.below(leaves.len())].clone();
    let x = NUMBERS[rng.below(NUMBERS.len())];
    let new = if x.fract() == 0.0 && x.abs() < 1e19 && rng.below(2) == 0 {
        if x < 0.0 {
            json!(x as i64)
        } else {
            json!(x as u64)
        }
    } else {
        json!(x)
    };
    *v.pointer_mut(&leaf).unwrap() = new;
}

#[test]
fn fuzz_config_json() {
    let text = std::fs::read(fixtures().join("models/tiny-method/config.json")).unwrap();
    let json: Value = serde_json::from_slice(&text).unwrap();
    let mut rng = Mutator(SplitMix64::keyed(1, "config-fields"));
    let accept = |bytes: &[u8]| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return false;
        };
        match ClipConfig::from_hf_json(text) {
            Ok(cfg) => {
                // What validation vouches for: no division by zero downstream.
                let _ = (cfg.vision_config.head_dim(), cfg.text_config.head_dim());
                let _ = cfg.vision_config.grid();
                true
            }
            Err(_) => false,
        }
    };
    fuzz("config.json bytes", 1, &text, 0..text.len(), 20_000, accept);
    // Field-level: one to three numbers replaced by interesting values.
    let mut structured = 0;
    let started = Instant::now();
    for i in 0..20_000 {
        let mut j = json.clone();
        for _ in 0..1 + rng.below(3) {
            poke_number(&mut j, &mut rng);
        }
        let s = j.to_string();
        let r = catch_unwind(AssertUnwindSafe(|| accept(s.as_bytes())));
        assert!(r.is_ok(), "field mutation {i} panicked: {s}");
        structured += r.unwrap() as usize;
    }
    eprintln!(
        "config.json fields: 20000 mutations, {structured} accepted, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn fuzz_adapter_loader() {
    let clip = ClipConfig::tiny();
    let a = zsad_adapter(&clip);
    let base = a.to_bytes().unwrap();
    let header = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let model = load_model("random:tiny", &LoadOptions::default())
        .unwrap()
        .model;
    let mut accept = |bytes: &[u8]| {
        let Ok(ad) = Adapter::from_bytes(bytes, "fuzz.safetensors") else {
            return false;
        };
        if ad.check(&clip).is_err() {
            return false;
        }
        // A configuration that passes must be runnable without huge allocations.
        let c = &ad.config;
        model
            .vision
            .at_image_size(c.image_size, c.pos_interpolation)
            .unwrap();
        let _ = zsad::method::maps::gaussian_kernel(c.sigma, 4.0);
        true
    };
    fuzz("adapter bytes", 2, &base, 0..header, 20_000, &mut accept);
    // Field-level mutations of zsad.config, re-serialised so the safetensors stay valid.
    let mut rng = Mutator(SplitMix64::keyed(2, "adapter-fields"));
    let json = serde_json::to_value(&a.config).unwrap();
    let started = Instant::now();
    let mut accepted = 0;
    for i in 0..5000 {
        let mut j = json.clone();
        for _ in 0..1 + rng.below(3) {
            poke_number(&mut j, &mut rng);
        }
        let bytes = edited(&a, |v| *v = j.clone());
        let r = catch_unwind(AssertUnwindSafe(|| accept(&bytes)));
        assert!(r.is_ok(), "field mutation {i} panicked: {j}");
        accepted += r.unwrap() as usize;
    }
    eprintln!(
        "adapter fields: 5000 mutations, {accepted} accepted, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn fuzz_safetensors_weight_loader() {
    let base = std::fs::read(fixtures().join("models/tiny-gelu/model.safetensors")).unwrap();
    let config = std::fs::read(fixtures().join("models/tiny-gelu/config.json")).unwrap();
    let header = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    // Without config.json the architecture is inferred from the (mutated) shapes; with it the
    // shapes are checked against the config.
    let bare = tmp("fuzz-weights-bare");
    let with_config = tmp("fuzz-weights-config");
    std::fs::write(with_config.join("config.json"), config).unwrap();
    let mut i = 0usize;
    fuzz("safetensors weights", 3, &base, 0..header, 6000, |bytes| {
        i += 1;
        let dir = if i.is_multiple_of(2) {
            &bare
        } else {
            &with_config
        };
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        load_model(dir.to_str().unwrap(), &LoadOptions::default()).is_ok()
    });
}

#[test]
fn fuzz_pth_reader() {
    let base =
        std::fs::read(fixtures().join("models/tiny-gelu-openai/open_clip_pytorch_model.bin"))
            .unwrap();
    let read = |bytes: &[u8], key: Option<&str>| {
        zsad::clip::pth::read_bytes(bytes, key, "fuzz.pth").is_ok()
    };
    // The archive's own bytes (its first entry, data.pkl, is hot). Most break the zip's CRC.
    fuzz("pth archive bytes", 4, &base, 0..9000, 10_000, |b| {
        read(b, None)
    });
    // The pickle, re-zipped so that the CRCs hold and the pickle machine sees every mutation.
    for (fixture, key) in [
        ("models/tiny-gelu-openai/open_clip_pytorch_model.bin", None),
        ("anomalyclip_tiny.pth", Some("prompt_learner")),
    ] {
        let entries = unzip(&std::fs::read(fixtures().join(fixture)).unwrap());
        let at = entries
            .iter()
            .position(|(n, _)| n.ends_with("data.pkl"))
            .unwrap();
        let pickle = entries[at].1.clone();
        assert!(read(&zip_of(&entries), key), "{fixture} reads unmutated");
        fuzz(
            &format!("pickle of {fixture}"),
            5,
            &pickle,
            0..pickle.len(),
            10_000,
            |p| {
                let mut e = entries.clone();
                e[at].1 = p.to_vec();
                read(&zip_of(&e), key)
            },
        );
    }
}

#[test]
fn fuzz_npy_reader() {
    let values: Vec<f32> = (0..35).map(|i| i as f32 / 35.0).collect();
    let base = zsad::data::outputs::map_npy(&values, 7, 5);
    let path = Path::new("fuzz.npy");
    fuzz(
        "npy",
        6,
        &base,
        0..128,
        50_000,
        |b| match zsad::data::outputs::parse_map_npy(b, path) {
            Ok((v, w, h)) => {
                assert_eq!(v.len() as u64, w as u64 * h as u64);
                true
            }
            Err(_) => false,
        },
    );
}
