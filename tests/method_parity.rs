//! The methods end to end against the Python reference (`scripts/make_method_fixtures.py`, a
//! re-implementation of AdaCLIP's and AnomalyCLIP's forward on `transformers.CLIPModel`): the
//! published checkpoint layouts are imported, run on a tiny random CLIP at 64 px (position
//! embedding interpolated 4x4 -> 8x8), and the maps and scores compared.
//!
//! Tolerances: maps and scores 1e-5 absolute (f32 on both sides; what differs is summation
//! order).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use zsad::clip::{load_model, Activation, LoadOptions, LoadedModel};
use zsad::method::config::{DeepPrompts, HeadWeights, ImageScore, JointScore, Preset};
use zsad::method::import::{import_checkpoint, CheckpointFormat, ImportOptions};
use zsad::method::{Adapter, Detector, TextInputs};

const TOL: f32 = 1e-5;

fn model(act: Activation) -> LoadedModel {
    let dir = common::fixtures().join("models/tiny-method");
    load_model(
        dir.to_str().unwrap(),
        &LoadOptions {
            activation: Some(act),
            ..Default::default()
        },
    )
    .unwrap()
}

fn expected() -> HashMap<String, Tensor> {
    common::load_expected("methods.expected.safetensors")
}

fn ids(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

/// The BPE ids between the learned context (4 tokens after SOT) and EOT.
fn suffix(t: &Tensor) -> Vec<u32> {
    let seq = &ids(t)[0];
    let eot = seq.iter().position(|&i| i == 49407).unwrap();
    seq[5..eot].to_vec()
}

fn fixture(name: &str) -> PathBuf {
    common::fixtures().join(name)
}

/// Runs the detector on the fixture image: (map before smoothing, smoothed map, global score).
fn run(det: &Detector) -> (Tensor, Tensor, f32) {
    let px = common::pixels(1, 64);
    let fwd = det.forward(&px, false).unwrap();
    let raw = fwd.map.squeeze(0).unwrap();
    let d = det.detect(&px).unwrap().remove(0);
    let map = Tensor::from_vec(d.map, (64, 64), &Device::Cpu).unwrap();
    (raw, map, d.global)
}

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
}

#[test]
fn adaclip_matches_the_reference() {
    let m = model(Activation::Gelu);
    let want = expected();
    let opts = ImportOptions {
        image_size: Some(64),
        ..Default::default()
    };
    let mut adapter = import_checkpoint(
        CheckpointFormat::Adaclip,
        &fixture("adaclip_tiny.pth"),
        &m.model.config,
        "tiny-method",
        &opts,
    )
    .unwrap();
    let c = &adapter.config;
    assert_eq!(c.preset, Preset::Adaclip);
    assert_eq!(c.layers, vec![1, 2, 3, 4]);
    let deep = |p: Option<DeepPrompts>| p.map(|p| (p.depth, p.len, p.dynamic));
    assert_eq!(deep(c.visual_prompts), Some((3, 2, true)));
    assert_eq!(deep(c.text_prompts), Some((3, 2, true)));
    assert_eq!(c.activation, Some(Activation::Gelu));
    // The reference runs HSF with one cluster, where k-means is deterministic.
    adapter.config.image_score = ImageScore::Hsf {
        clusters: 1,
        cls_weight: 0.8,
    };
    let text = TextInputs::Ensemble {
        normal: ids(&want["adaclip.tokens_normal"]),
        abnormal: ids(&want["adaclip.tokens_abnormal"]),
    };
    let det = Detector::new(&m.model, &adapter, text).unwrap();
    let (raw, map, score) = run(&det);
    common::assert_close(
        "adaclip map before smoothing",
        &raw,
        &want["adaclip.map_raw"],
        TOL,
    );
    common::assert_close("adaclip map", &map, &want["adaclip.map"], TOL);
    let s = scalar(&want["adaclip.score"]);
    assert!((score - s).abs() < TOL, "adaclip score {score} vs {s}");
}

fn anomalyclip_adapter(m: &LoadedModel) -> Adapter {
    let opts = ImportOptions {
        image_size: Some(64),
        layers: Some(vec![2, 4]),
        vv_from: Some(2),
        ..Default::default()
    };
    let a = import_checkpoint(
        CheckpointFormat::Anomalyclip,
        &fixture("anomalyclip_tiny.pth"),
        &m.model.config,
        "tiny-method",
        &opts,
    )
    .unwrap();
    let c = &a.config;
    assert_eq!(c.preset, Preset::Anomalyclip);
    let deep = c.text_prompts.map(|p| (p.depth, p.len, p.dynamic));
    assert_eq!(deep, Some((3, 2, false)));
    assert_eq!(c.visual_prompts, None);
    assert_eq!(c.activation, Some(Activation::QuickGelu));
    a
}

fn learned_text(want: &HashMap<String, Tensor>) -> TextInputs {
    TextInputs::Learned {
        normal_suffix: suffix(&want["anomalyclip.tokens_normal"]),
        abnormal_suffix: suffix(&want["anomalyclip.tokens_abnormal"]),
    }
}

#[test]
fn anomalyclip_matches_the_reference() {
    let m = model(Activation::QuickGelu);
    let want = expected();
    let adapter = anomalyclip_adapter(&m);
    let det = Detector::new(&m.model, &adapter, learned_text(&want)).unwrap();
    let (raw, map, score) = run(&det);
    // The reference sums the two layers' maps; ours is their mean.
    let half = |t: &Tensor| (t * 0.5).unwrap();
    common::assert_close(
        "anomalyclip map before smoothing",
        &raw,
        &half(&want["anomalyclip.map_raw"]),
        TOL,
    );
    common::assert_close(
        "anomalyclip map",
        &map,
        &half(&want["anomalyclip.map"]),
        TOL,
    );
    let s = scalar(&want["anomalyclip.score"]);
    assert!((score - s).abs() < TOL, "anomalyclip score {score} vs {s}");
}

#[test]
fn headclip_head_weights_match_the_reference() {
    let m = model(Activation::QuickGelu);
    let want = expected();
    let mut adapter = anomalyclip_adapter(&m);
    adapter.config.preset = Preset::Headclip;
    adapter.config.head_weights = Some(HeadWeights::Raw);
    adapter.tensors.insert(
        "vision.head_weights".into(),
        want["headclip.head_weights"].clone(),
    );
    let det = Detector::new(&m.model, &adapter, learned_text(&want)).unwrap();
    let (raw, map, score) = run(&det);
    let half = |t: &Tensor| (t * 0.5).unwrap();
    common::assert_close(
        "headclip map before smoothing",
        &raw,
        &half(&want["headclip.map_raw"]),
        TOL,
    );
    common::assert_close("headclip map", &map, &half(&want["headclip.map"]), TOL);
    let s = scalar(&want["headclip.score"]);
    assert!((score - s).abs() < TOL, "headclip score {score} vs {s}");

    // The same weights through the sigmoid parametrisation: θ = logit(w / 2).
    let w = &want["headclip.head_weights"];
    let theta = ((w * 0.5).unwrap().log().unwrap()
        - (1.0 - (w * 0.5).unwrap()).unwrap().log().unwrap())
    .unwrap();
    adapter.config.head_weights = Some(HeadWeights::Sigmoid);
    adapter.tensors.insert("vision.head_weights".into(), theta);
    adapter.config.joint = JointScore::Mean { alpha: 0.5 };
    let det = Detector::new(&m.model, &adapter, learned_text(&want)).unwrap();
    let d = det.detect(&common::pixels(1, 64)).unwrap().remove(0);
    assert!(
        (d.global - s).abs() < 1e-4,
        "sigmoid head weights: {} vs {s}",
        d.global
    );
    // Joint score: the mean of the global score and the map's maximum.
    assert!((d.score - 0.5 * (d.global + d.map_max())).abs() < 1e-6);
}

/// Text that does not depend on the image is encoded once per run; every preset runs a batch.
#[test]
fn text_is_encoded_once_unless_prompts_are_dynamic() {
    let m = model(Activation::QuickGelu);
    let clip = &m.model.config;
    let mut sentence = vec![49406u32, 320, 1125, 539, 320, 14115, 269, 49407];
    sentence.resize(77, 0);
    for (preset, cached) in [
        (Preset::ZeroShot, true),
        (Preset::Adaclip, false),
        (Preset::Anomalyclip, true),
        (Preset::Headclip, true),
        (Preset::Zsad, false),
    ] {
        let cfg = zsad::method::DetectorConfig::preset(preset, clip, "tiny-method");
        let text = match cfg.text {
            zsad::method::config::TextPrompts::Ensemble { .. } => TextInputs::Ensemble {
                normal: vec![sentence.clone(); 2],
                abnormal: vec![sentence.clone()],
            },
            _ => TextInputs::Learned {
                normal_suffix: vec![14115, 269],
                abnormal_suffix: vec![13568, 14115, 269],
            },
        };
        let adapter = Adapter::init(cfg, clip, 3).unwrap();
        let det = Detector::new(&m.model, &adapter, text).unwrap();
        assert_eq!(det.text_is_cached(), cached, "{preset:?}");
        let dets = det.detect(&common::pixels(2, 32)).unwrap();
        assert_eq!(dets.len(), 2);
        assert!(dets
            .iter()
            .all(|d| d.map.len() == 32 * 32 && (0.0..=1.0).contains(&d.score)));
    }
}
