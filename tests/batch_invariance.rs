//! An image's results do not depend on which images share its model pass: `detect` on a batch
//! gives, bit for bit, what it gives on each image alone and on the same image among other
//! batch mates (so a sharded run matches a single run at any `--batch-size`). The f32 GEMMs
//! block `k` by a constant and every row of a product is summed the same way whatever the
//! number of rows; attention runs per image.

use candle_core::{Device, Tensor};
use zsad::clip::{load_model, ClipTokenizer, LoadOptions};
use zsad::method::{Adapter, Detection, Detector, DetectorConfig, Preset, TextInputs};

/// Deterministic pixels `[n, 3, s, s]` in about [-1, 1], image `i` varied by `seed + i`.
fn pixels(seeds: &[u64], s: usize) -> Tensor {
    let per = 3 * s * s;
    let v: Vec<f32> = seeds
        .iter()
        .flat_map(|&seed| {
            (0..per).map(move |j| ((j as f64 * (0.37 + seed as f64 * 0.11)).sin()) as f32)
        })
        .collect();
    Tensor::from_vec(v, (seeds.len(), 3, s, s), &Device::Cpu).unwrap()
}

fn bits(d: &Detection) -> (u32, u32, Vec<u32>) {
    (
        d.global.to_bits(),
        d.score.to_bits(),
        d.map.iter().map(|x| x.to_bits()).collect(),
    )
}

/// Detects images 0..5 as one batch, one at a time, and image 2 again among other batch mates
/// (in another position), at `precision` (`bf16` where the CPU has bf16 units).
fn check(model_name: &str, image_size: Option<usize>, bf16: bool) {
    let mut model = load_model(model_name, &LoadOptions::default())
        .unwrap()
        .model;
    if bf16 {
        model.use_bf16().unwrap();
    }
    let tok = ClipTokenizer::embedded().unwrap();
    let mut cfg = DetectorConfig::preset(Preset::ZeroShot, &model.config, model_name);
    if let Some(s) = image_size {
        cfg.image_size = s;
    }
    let adapter = Adapter::init(cfg, &model.config, 0).unwrap();
    let inputs = TextInputs::build(&adapter.config, &tok).unwrap();
    let det = Detector::new(&model, &adapter, inputs).unwrap();
    let s = det.image_size();
    let seeds = [1u64, 2, 3, 4, 5];
    let batch = det.detect(&pixels(&seeds, s)).unwrap();
    assert_eq!(batch.len(), 5);
    for (i, &seed) in seeds.iter().enumerate() {
        let alone = det.detect(&pixels(&[seed], s)).unwrap();
        assert_eq!(
            bits(&alone[0]),
            bits(&batch[i]),
            "{model_name} bf16={bf16}: image {i} alone differs from the batch of 5"
        );
    }
    let mates = det.detect(&pixels(&[9, 3, 8], s)).unwrap();
    assert_eq!(
        bits(&mates[1]),
        bits(&batch[2]),
        "{model_name} bf16={bf16}: image 2 among other batch mates differs"
    );
}

#[test]
fn tiny_model_results_do_not_depend_on_the_batch() {
    check("random:tiny", None, false);
    check("random:tiny", None, true);
}

/// ViT-B/16's real widths (768, 12 heads, 3072; 197 tokens), where the products are blocked
/// and split across threads as in a real run.
#[test]
fn vit_b16_results_do_not_depend_on_the_batch() {
    check("random:ViT-B-16", None, false);
    check("random:ViT-B-16", None, true);
}
