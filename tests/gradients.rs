//! Gradient checks: for every kind of adapter tensor, the autograd gradient of the training
//! loss agrees with central finite differences, on a tiny random CLIP in f64. This is what
//! catches the silent zero gradients of candle's fused kernels (candle-nn's `softmax_last_dim`
//! and `layer_norm` are custom ops without a backward). Built with `--features cuda`, the same
//! checks also run on the first CUDA device, when there is one.

use candle_core::{DType, Device, Tensor};
use zsad::clip::{load_model, LoadOptions};
use zsad::method::config::Preset;
use zsad::method::{Adapter, DetectorConfig, TextInputs};
use zsad::train::{Example, TrainOptions, Trainer};

fn example(size: usize, x0: usize, anomalous: bool) -> Example {
    let mut pixels = Vec::with_capacity(3 * size * size);
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                pixels.push((((x * 7 + y * 3 + c * 11) % 23) as f32 / 11.5) - 1.0);
            }
        }
    }
    let mask: Vec<bool> = (0..size * size)
        .map(|i| anomalous && (i % size) >= x0 && (i % size) < x0 + 8 && (i / size) < 12)
        .collect();
    Example {
        pixels,
        mask,
        label: anomalous,
    }
}

fn check(preset: Preset, device: &Device) {
    let m = load_model(
        "random:tiny",
        &LoadOptions {
            dtype: DType::F64,
            device: device.clone(),
            ..Default::default()
        },
    )
    .unwrap()
    .model;
    let mut cfg = DetectorConfig::preset(preset, &m.config, "random:tiny");
    // fp16 rounding is a step function: finite differences cannot see through it.
    cfg.round_prompts_f16 = false;
    if let zsad::method::config::ImageScore::Hsf { clusters, .. } = &mut cfg.image_score {
        *clusters = 2;
    }
    let mut adapter = Adapter::init(cfg.clone(), &m.config, 5).unwrap();
    // Untrained head weights sit at w = 1 exactly; move them so their gradient is generic.
    if let Some(t) = adapter.tensors.get_mut("vision.head_weights") {
        *t = (t.clone() + 0.3).unwrap();
    }
    let opts = TrainOptions::for_preset(preset, cfg.layers.len());
    let trainer = Trainer::new(adapter, opts, device, DType::F64).unwrap();
    let mut sentence = vec![49406u32, 320, 1125, 539, 320, 14115, 269, 49407];
    sentence.resize(77, 0);
    let text = match cfg.text {
        zsad::method::config::TextPrompts::Ensemble { .. } => TextInputs::Ensemble {
            normal: vec![sentence.clone(); 2],
            abnormal: vec![sentence],
        },
        _ => TextInputs::Learned {
            normal_suffix: vec![14115, 269],
            abnormal_suffix: vec![13568, 14115, 269],
        },
    };
    let vision = m
        .vision
        .at_image_size(cfg.image_size, cfg.pos_interpolation)
        .unwrap();
    let batch = vec![example(32, 8, true), example(32, 0, false)];
    let loss = |t: &Trainer| -> f64 {
        t.loss(&m, &vision, &text, &batch)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let l0 = trainer.loss(&m, &vision, &text, &batch).unwrap();
    let grads = l0.backward().unwrap();
    let mut kinds = std::collections::BTreeSet::new();
    for (name, var) in trainer.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{preset:?}: no gradient for `{name}`"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let n = base.len();
        let mut worst = 0.0f64;
        let mut largest = 0.0f64;
        // A few elements spread over the tensor.
        for k in [0, n / 3, n / 2, n - 1] {
            let h = 1e-6;
            let set = |delta: f64| {
                let mut v = base.clone();
                v[k] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().shape(), device).unwrap())
                    .unwrap();
            };
            set(h);
            let up = loss(&trainer);
            set(-h);
            let down = loss(&trainer);
            set(0.0);
            let fd = (up - down) / (2.0 * h);
            worst = worst.max((fd - g[k]).abs());
            largest = largest.max(fd.abs()).max(g[k].abs());
        }
        assert!(
            worst <= 1e-6 + 1e-4 * largest,
            "{preset:?} `{name}`: autograd and finite differences differ by {worst} (scale {largest})"
        );
        assert!(largest > 0.0, "{preset:?} `{name}`: zero gradient");
        kinds.insert(name.split('.').take(2).collect::<Vec<_>>().join("."));
    }
    eprintln!("{preset:?} on {device:?}: checked {kinds:?}");
}

#[test]
fn zsad_preset_gradients() {
    // learned context, deep + dynamic prompts in both towers, patch/CLS projections, head weights
    check(Preset::Zsad, &Device::Cpu);
}

#[test]
fn headclip_preset_gradients() {
    // V-V path, ln_post + proj features, deep text prompts, head weights
    check(Preset::Headclip, &Device::Cpu);
}

#[test]
fn adaclip_preset_gradients() {
    // hand-made ensembles with static + dynamic deep prompts
    check(Preset::Adaclip, &Device::Cpu);
}

/// The three presets' checks on the first CUDA device (skipped without one): the training path
/// (the frozen linear and recomputing attention ops, the differentiable LayerNorm and softmax,
/// the losses) in f64 on the GPU.
#[cfg(feature = "cuda")]
#[test]
fn cuda_gradients() {
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("skipped: no CUDA device");
        return;
    };
    for preset in [Preset::Zsad, Preset::Headclip, Preset::Adaclip] {
        check(preset, &gpu);
    }
}
