//! Numerical parity of the CLIP backbone with Hugging Face `transformers.CLIPModel` on tiny random
//! models (fixtures from `scripts/make_fixtures.py`). Tolerance: max abs error <= 1e-4 in f32.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use zsad::clip::weights::Checkpoint;
use zsad::clip::{
    load_model, vision::resize_positions, Activation, ClipConfig, ClipModel, Hooks, LoadOptions,
    PosInterpolation,
};

const TOL: f32 = 1e-4;

fn model_dir(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

/// Compares image/text embeddings and every hidden state of `model` with `<name>.expected`.
fn check(model: &ClipModel, expected: &str, n_images: usize) {
    let exp = load_expected(expected);
    let vision = &model.vision;
    let depth = vision.depth();
    let taps: Vec<usize> = (0..=depth).collect();
    let out = vision
        .forward(
            &pixels(n_images, vision.image_size()),
            &Hooks {
                taps: &taps,
                ..Default::default()
            },
        )
        .unwrap();
    assert_close("image_embeds", &out.pooled, &exp["image_embeds"], TOL);
    for (i, t) in out.taps.iter().enumerate() {
        assert_close(
            &format!("vision hidden_states[{i}]"),
            t,
            &exp[&format!("vision_hidden_{i}")],
            TOL,
        );
    }

    let ids = ids(&exp["input_ids"]);
    let ttaps: Vec<usize> = (0..=model.text.depth()).collect();
    let t = model
        .text
        .forward_ids(
            &ids,
            &Hooks {
                taps: &ttaps,
                ..Default::default()
            },
        )
        .unwrap();
    assert_close("text_embeds", &t.pooled, &exp["text_embeds"], TOL);
    // The text pass stops at the longest EOT (exact under the causal mask): compare that prefix.
    for (i, h) in t.taps.iter().enumerate() {
        let len = h.dim(1).unwrap();
        let want = exp[&format!("text_hidden_{i}")].narrow(1, 0, len).unwrap();
        assert_close(&format!("text hidden_states[{i}]"), h, &want, TOL);
    }
}

fn load(name: &str) -> ClipModel {
    load_model(&model_dir(name), &LoadOptions::default())
        .unwrap()
        .model
}

#[test]
fn quickgelu_model_matches_transformers() {
    check(
        &load("tiny-quickgelu"),
        "tiny-quickgelu.expected.safetensors",
        2,
    );
}

#[test]
fn gelu_model_matches_transformers() {
    let m = load("tiny-gelu");
    assert_eq!(
        m.config.vision_config.activation().unwrap(),
        Activation::Gelu
    );
    check(&m, "tiny-gelu.expected.safetensors", 2);
}

#[test]
fn vit_b_shaped_model_matches_transformers() {
    check(&load("tiny-vitb"), "tiny-vitb.expected.safetensors", 2);
}

/// 32 px -> 48 px: HF `interpolate_pos_encoding=True` (bicubic, A = -0.75).
#[test]
fn interpolated_position_embedding_matches_transformers() {
    let m = load("tiny-gelu");
    let exp = load_expected("tiny-gelu.expected.safetensors");
    let v = m
        .vision
        .at_image_size(48, PosInterpolation::Bicubic)
        .unwrap();
    assert_eq!(v.grid(), 6);
    let taps: Vec<usize> = (0..=v.depth()).collect();
    let out = v
        .forward(
            &pixels(2, 48),
            &Hooks {
                taps: &taps,
                ..Default::default()
            },
        )
        .unwrap();
    assert_close("image_embeds@48", &out.pooled, &exp["image_embeds@48"], TOL);
    for (i, t) in out.taps.iter().enumerate() {
        assert_close(
            &format!("hidden_states[{i}]@48"),
            t,
            &exp[&format!("vision_hidden_{i}@48")],
            TOL,
        );
    }
}

/// Both interpolation modes against `F.interpolate` on the trained 4x4 grid -> 7x7.
#[test]
fn position_resize_matches_torch_interpolate() {
    let exp = load_expected("tiny-gelu.expected.safetensors");
    let vb = Checkpoint::open(&[fixtures().join("models/tiny-gelu/model.safetensors")])
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let pos = vb
        .get(
            (17, 32),
            "vision_model.embeddings.position_embedding.weight",
        )
        .unwrap();
    for (mode, key) in [
        (PosInterpolation::Bilinear, "pos_bilinear_7"),
        (PosInterpolation::Bicubic, "pos_bicubic_7"),
    ] {
        let got = resize_positions(&pos, 7, mode).unwrap();
        assert_close(key, &got, &exp[key], 1e-5);
    }
}

/// OpenAI/open_clip naming (packed in_proj, `proj` as [width, embed]) from safetensors, with the
/// architecture inferred from the shapes alone (no config.json).
#[test]
fn openai_named_safetensors_load_the_same_model() {
    let loaded = load_model(&model_dir("tiny-vitb-openai"), &LoadOptions::default()).unwrap();
    assert_eq!(loaded.naming, Some(zsad::clip::weights::Naming::OpenAi));
    let hf = load("tiny-vitb");
    assert_eq!(loaded.model.config, hf.config);
    check(&loaded.model, "tiny-vitb.expected.safetensors", 2);
}

/// OpenAI naming from a torch pickle (`.bin`), with the config given (24-wide text heads cannot
/// be inferred as width / 64).
#[test]
fn openai_named_pickle_loads_the_same_model() {
    let cfg = load("tiny-gelu").config;
    let ckpt =
        Checkpoint::open(&[fixtures().join("models/tiny-gelu-openai/open_clip_pytorch_model.bin")])
            .unwrap();
    let m = ClipModel::load(ckpt.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    check(&m, "tiny-gelu.expected.safetensors", 2);
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let mut cfg = load("tiny-vitb").config;
    cfg.vision_config.intermediate_size = 300;
    let ckpt = Checkpoint::open(&[fixtures().join("models/tiny-vitb/model.safetensors")]).unwrap();
    let err = ClipModel::load(ckpt.var_builder(DType::F32, &Device::Cpu), &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("vision_model.encoder.layers.0.mlp.fc1.weight"),
        "{err}"
    );
    assert!(
        err.contains("[256, 128]") && err.contains("[300, 128]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_names_the_tensor() {
    let cfg = ClipConfig {
        projection_dim: 32,
        ..load("tiny-vitb").config
    };
    let mut deeper = cfg.clone();
    deeper.vision_config.num_hidden_layers = 3;
    let ckpt =
        Checkpoint::open(&[fixtures().join("models/tiny-vitb-openai/open_clip_model.safetensors")])
            .unwrap();
    let err = ClipModel::load(ckpt.var_builder(DType::F32, &Device::Cpu), &deeper)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("visual.transformer.resblocks.2.ln_1.weight") && err.contains("missing"),
        "{err}"
    );
}

/// Head weights of 1 are exactly the plain model.
#[test]
fn unit_head_weights_are_the_plain_model() {
    let m = load("tiny-vitb");
    let v = &m.vision;
    let heads = v.config().num_attention_heads;
    let ones = Tensor::ones((v.depth(), heads), DType::F32, &Device::Cpu).unwrap();
    let px = pixels(2, v.image_size());
    let taps = [1, 2];
    let plain = v
        .forward(
            &px,
            &Hooks {
                taps: &taps,
                ..Default::default()
            },
        )
        .unwrap();
    let weighted = v
        .forward(
            &px,
            &Hooks {
                taps: &taps,
                head_weights: Some(&ones),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(max_abs_diff(&plain.pooled, &weighted.pooled), 0.0);
    for (a, b) in plain.taps.iter().zip(&weighted.taps) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
}

/// A zero weight on head h of layer l equals a model whose `out_proj` ignores that head.
#[test]
fn zero_head_weight_removes_the_head() {
    let dir = fixtures().join("models/tiny-vitb");
    let cfg = load("tiny-vitb").config;
    let (layer, head, hd) = (1usize, 0usize, cfg.vision_config.head_dim());
    let mut tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let key = format!("vision_model.encoder.layers.{layer}.self_attn.out_proj.weight");
    let w = tensors[&key].to_dtype(DType::F32).unwrap();
    let d = w.dim(1).unwrap();
    let mask: Vec<f32> = (0..d)
        .map(|j| if j / hd == head { 0.0 } else { 1.0 })
        .collect();
    let mask = Tensor::from_vec(mask, (1, d), &Device::Cpu).unwrap();
    tensors.insert(key, w.broadcast_mul(&mask).unwrap());
    let pruned = ClipModel::load(
        candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();

    let full = load("tiny-vitb");
    let heads = cfg.vision_config.num_attention_heads;
    let mut w = vec![1f32; full.vision.depth() * heads];
    w[layer * heads + head] = 0.0;
    let w = Tensor::from_vec(w, (full.vision.depth(), heads), &Device::Cpu).unwrap();
    let px = pixels(2, 224);
    let a = full
        .vision
        .forward(
            &px,
            &Hooks {
                head_weights: Some(&w),
                ..Default::default()
            },
        )
        .unwrap();
    let b = pruned.vision.forward(&px, &Hooks::default()).unwrap();
    assert_close("pooled", &a.pooled, &b.pooled, 1e-6);
    let plain = full.image_features(&px).unwrap();
    assert!(
        max_abs_diff(&plain, &a.pooled) > 1e-3,
        "removing a head must change the output"
    );
}

/// f16 weights and activations stay close to the f32 reference (tolerance 1e-2 on embeddings of
/// magnitude ~2; measured 2e-3).
#[test]
fn f16_is_close_to_the_reference() {
    let opts = LoadOptions {
        dtype: DType::F16,
        ..Default::default()
    };
    let m = load_model(&model_dir("tiny-vitb"), &opts).unwrap().model;
    let exp = load_expected("tiny-vitb.expected.safetensors");
    let got = m.image_features(&pixels(2, 224)).unwrap();
    assert_eq!(got.dtype(), DType::F16);
    assert_close("image_embeds (f16)", &got, &exp["image_embeds"], 1e-2);
}
