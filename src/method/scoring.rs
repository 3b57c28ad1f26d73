//! The scoring functions every method is composed of, pure over tensors: patch–text logits,
//! the {normal, abnormal} softmax, the per-layer map fusions, AdaCLIP's hybrid semantic fusion,
//! the image probability and the post-processing (smoothing, joint score). Each is tested on
//! small hand-computed cases below.

use candle_core::{DType, IndexOp, Tensor};

use super::config::{JointScore, MapFusion};
use super::kmeans::kmeans;
use super::maps::{gaussian_filter, upsample_bilinear};
use super::text::normalize;
use crate::error::invalid;
use crate::Result;

/// Softmax over a pair `(a0, a1)` of equal-shape tensors, elementwise: `(p0, p1)`, written as
/// `p1 = 1 / (1 + e^(a0 − a1))` so that it has a backward.
///
/// Computed in f32 at least (f64 stays f64) and returned in the inputs' dtype, as PyTorch's
/// autocast runs softmax and `exp`: in f16 `e^(a0 − a1)` is infinite once `a0 − a1` exceeds
/// `ln 65504 ≈ 11.09` (a cosine gap of 0.111 at CLIP's logit scale 100), which the forward
/// survives (`p1 = 1/∞ = 0`) but the backward does not: the reciprocal's gradient `g / ∞²` is 0
/// and the exponential's `0 · e^(a0 − a1) = 0 · ∞` is NaN.
pub fn pair_softmax(a0: &Tensor, a1: &Tensor) -> Result<(Tensor, Tensor)> {
    let dtype = a0.dtype();
    let wide = crate::clip::wide(dtype);
    let (a0, a1) = (a0.to_dtype(wide)?, a1.to_dtype(wide)?);
    let p1 = ((a0 - a1)?.exp()? + 1.0)?.recip()?;
    let p0 = (1.0 - &p1)?;
    Ok((p0.to_dtype(dtype)?, p1.to_dtype(dtype)?))
}

/// Indices of the `k` largest values, ties broken by the lower index.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// `A_l = scale · F_l Tᵀ` per layer.
///
/// # Shapes
/// `feats`: per layer `[B, P, E]` (unit rows); `text_t: [B, E, 2]` (`T` transposed, unit
/// columns {normal, abnormal}) -> per layer `[B, P, 2]`.
pub fn patch_logits(feats: &[Tensor], text_t: &Tensor, scale: f64) -> Result<Vec<Tensor>> {
    feats
        .iter()
        .map(|f| Ok((f.matmul(text_t)? * scale)?))
        .collect()
}

/// `softmax(scale · cos(e, T))`: the {normal, abnormal} probabilities of an image embedding.
///
/// # Shapes
/// `embedding: [B, E]` (unit rows); `text_t: [B, E, 2]` -> `[B, 2]`.
pub fn text_probs(embedding: &Tensor, text_t: &Tensor, scale: f64) -> Result<Tensor> {
    let l = (embedding.unsqueeze(1)?.matmul(text_t)? * scale)?.squeeze(1)?;
    Ok(crate::clip::softmax_last_dim(&l)?)
}

/// The side of the square patch grid of `patches` tokens.
pub fn grid_side(patches: usize) -> Result<usize> {
    let g = (patches as f64).sqrt().round() as usize;
    if g * g != patches || g == 0 {
        return Err(invalid!("{patches} patch tokens do not form a square grid"));
    }
    Ok(g)
}

/// The per-layer logits fused into one anomaly map at `size × size`, per `fusion`
/// ([`MapFusion`] says how each method does it), and, when `with_layer_maps`, every layer's
/// upsampled {normal, abnormal} probability map (what AdaCLIP and AnomalyCLIP train on).
///
/// # Shapes
/// `logits`: per layer `[B, P, 2]` with `P = g²` patches in row-major order -> map `[B, S, S]`,
/// layer maps `[B, 2, S, S]`.
pub fn fuse_maps(
    logits: &[Tensor],
    fusion: MapFusion,
    size: usize,
    with_layer_maps: bool,
) -> Result<(Tensor, Vec<Tensor>)> {
    let Some(first) = logits.first() else {
        return Err(invalid!("a map needs at least one tapped layer"));
    };
    let (b, patches, _) = first.dims3()?;
    let grid = grid_side(patches)?;
    // [B, P, 2] -> [B*2, g, g]
    let to_grid = |a: &Tensor| -> Result<Tensor> {
        Ok(a.transpose(1, 2)?
            .contiguous()?
            .reshape((b * 2, grid, grid))?)
    };
    let up = |x: &Tensor, align_corners: bool| -> Result<Tensor> {
        Ok(upsample_bilinear(x, size, size, align_corners)?.reshape((b, 2, size, size))?)
    };
    let channels = |x: &Tensor| -> Result<(Tensor, Tensor)> { Ok((x.i((.., 0))?, x.i((.., 1))?)) };
    let n_layers = logits.len() as f64;
    let mut layer_maps = Vec::new();
    let mut sum: Option<Tensor> = None;
    let mut add = |x: Tensor| -> Result<()> {
        sum = Some(match sum.take() {
            Some(s) => (s + x)?,
            None => x,
        });
        Ok(())
    };
    match fusion {
        MapFusion::MeanLogits => {
            for a in logits {
                let u = up(&to_grid(a)?, true)?;
                if with_layer_maps {
                    let (a0, a1) = channels(&u)?;
                    let (p0, p1) = pair_softmax(&a0, &a1)?;
                    layer_maps.push(Tensor::stack(&[p0, p1], 1)?);
                }
                add(u)?;
            }
            let mean = (sum.expect("one layer or more") / n_layers)?;
            let (a0, a1) = channels(&mean)?;
            Ok((pair_softmax(&a0, &a1)?.1, layer_maps))
        }
        MapFusion::MeanProbs => {
            for a in logits {
                let (p0, p1) = pair_softmax(&a.i((.., .., 0))?, &a.i((.., .., 1))?)?;
                let probs = Tensor::stack(&[p0, p1], 2)?; // [B, P, 2]
                let u = up(&to_grid(&probs)?, false)?;
                let (q0, q1) = channels(&u)?;
                add((((q1 - q0)? + 1.0)? * 0.5)?)?;
                if with_layer_maps {
                    layer_maps.push(u);
                }
            }
            Ok(((sum.expect("one layer or more") / n_layers)?, layer_maps))
        }
    }
}

/// AdaCLIP's hybrid semantic fusion, as its code computes it: the `5·clusters` patches with the
/// highest mean-logit anomaly probability, k-means on their features (concatenated over
/// layers), and `h` = the normalised mean of the cluster centres, i.e. a fixed weighting of
/// the selected tokens' layer-mean features. The cluster assignment is a constant; the
/// gradient flows through the gathered tokens.
///
/// # Shapes
/// `feats`: per layer `[B, P, E]`; `logits`: per layer `[B, P, 2]` -> `[B, E]` (unit rows).
pub fn hsf_embedding(
    feats: &[Tensor],
    logits: &[Tensor],
    clusters: usize,
    seed: u64,
) -> Result<Tensor> {
    let n_layers = feats.len() as f64;
    let mean_logits = (Tensor::stack(logits, 0)?.sum(0)? / n_layers)?; // [B, P, 2]
    let (a0, a1) = (mean_logits.i((.., .., 0))?, mean_logits.i((.., .., 1))?);
    let p = pair_softmax(&a0, &a1)?.1.to_dtype(DType::F32)?; // [B, P]
    let (b, n_patch) = p.dims2()?;
    let k = n_patch.min(5 * clusters);
    let z_all = (Tensor::stack(feats, 0)?.sum(0)? / n_layers)?; // [B, P, E]
    let mut hs = Vec::with_capacity(b);
    for bi in 0..b {
        let idx = top_k(&p.i(bi)?.to_vec1::<f32>()?, k);
        let idx_t = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            k,
            p.device(),
        )?
        .to_device(z_all.device())?;
        let sel: Vec<Tensor> = feats
            .iter()
            .map(|f| f.i(bi)?.index_select(&idx_t, 0))
            .collect::<candle_core::Result<_>>()?;
        let data = Tensor::cat(&sel, 1)?.to_dtype(DType::F32)?;
        let d = data.dim(1)?;
        let flat = data.flatten_all()?.to_vec1::<f32>()?;
        let km = kmeans(&flat, k, d, clusters, seed);
        // Mean of the (non-empty) cluster centres = a fixed weighting of the tokens.
        let mut count = vec![0usize; km.k];
        for &l in &km.labels {
            count[l] += 1;
        }
        let used = count.iter().filter(|&&c| c > 0).count() as f64;
        let w: Vec<f32> = km
            .labels
            .iter()
            .map(|&l| (1.0 / (count[l] as f64 * used)) as f32)
            .collect();
        let z = z_all.i(bi)?.index_select(&idx_t, 0)?; // [k, E]
        let w = Tensor::from_vec(w, (1, k), z.device())?.to_dtype(z.dtype())?;
        hs.push(w.matmul(&z)?.squeeze(0)?);
    }
    normalize(&Tensor::stack(&hs, 0)?)
}

/// HSF's image embedding `normalize((1 − w)·h + w·c)` from the fused patches `h` and the
/// projected class token `c`.
///
/// # Shapes
/// `h, c: [B, E]` (unit rows) -> `[B, E]`.
pub fn hsf_fuse(h: &Tensor, c: &Tensor, cls_weight: f64) -> Result<Tensor> {
    normalize(&((h * (1.0 - cls_weight))? + (c * cls_weight)?)?)
}

/// How an image's score is made from its smoothed map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreRule {
    /// The method's global score with the map's peak fused per `joint` (the configuration's).
    Joint { global: f32, joint: JointScore },
    /// WinCLIP+'s few-shot score for methods without a joint score:
    /// `(1 − weight) · global + weight · reference_peak` (anomalib `winclip/torch_model.py`,
    /// `forward`), the reference map's peak after smoothing.
    Reference {
        global: f32,
        weight: f64,
        reference_peak: f32,
    },
    /// The map's peak alone (`--reference-only`: PatchCore's image score).
    Peak,
}

/// The post-processing of one image's map: the references' Gaussian smoothing (`sigma` 0:
/// none) and the image score per `rule`. Returns the smoothed map, the image score and the
/// global score (the peak itself where there is no method score).
///
/// # Shapes
/// `raw: [S·S]` row-major -> `([S·S], score, global)`.
pub fn postprocess(raw: &[f32], size: usize, sigma: f64, rule: ScoreRule) -> (Vec<f32>, f32, f32) {
    let map = gaussian_filter(raw, size, size, sigma);
    let peak = map_peak(&map);
    let (score, global) = match rule {
        ScoreRule::Joint { global, joint } => (joint.combine(global, peak), global),
        ScoreRule::Reference {
            global,
            weight,
            reference_peak,
        } => (
            ((1.0 - weight) * global as f64 + weight * reference_peak as f64) as f32,
            global,
        ),
        ScoreRule::Peak => (peak, peak),
    };
    (map, score, global)
}

/// The highest value of a map (`-inf` for an empty one).
pub fn map_peak(map: &[f32]) -> f32 {
    map.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < tol, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn pair_softmax_is_softmax_with_temperature() {
        let dev = Device::Cpu;
        let a0 = Tensor::new(&[0.3f32, -2.0], &dev).unwrap();
        let a1 = Tensor::new(&[0.1f32, 5.0], &dev).unwrap();
        let (p0, p1) = pair_softmax(&(&a0 * 100.0).unwrap(), &(&a1 * 100.0).unwrap()).unwrap();
        let (p0, p1) = (p0.to_vec1::<f32>().unwrap(), p1.to_vec1::<f32>().unwrap());
        // softmax([30, 10]) = [1/(1+e^-20), e^-20/(1+e^-20)]
        let e = (-20f64).exp();
        assert!((p1[0] as f64 - e / (1.0 + e)).abs() < 1e-12);
        assert!((p0[0] as f64 - 1.0 / (1.0 + e)).abs() < 1e-7);
        assert!((p1[1] - 1.0).abs() < 1e-7);
    }

    /// In f16, `e^(a0 − a1)` is infinite beyond `ln 65504 ≈ 11.09`; computed that way, the
    /// backward gave `0 · ∞ = NaN` there. In f32 and cast back, the probabilities are f32's
    /// rounded to f16, and the gradients `∂p1/∂a0 = −p0·p1 = −∂p1/∂a1` are finite and right.
    #[test]
    fn pair_softmax_in_f16_has_finite_gradients_beyond_the_f16_exp_range() {
        let dev = Device::Cpu;
        let d = [20.0, 11.5, 0.5, -20.0]; // a0 − a1
        let var = |v: &[f64]| {
            let t = Tensor::new(v, &dev).unwrap().to_dtype(DType::F16).unwrap();
            candle_core::Var::from_tensor(&t).unwrap()
        };
        let a0 = var(&d);
        let a1 = var(&[0.0; 4]);
        let (p0, p1) = pair_softmax(a0.as_tensor(), a1.as_tensor()).unwrap();
        assert_eq!((p0.dtype(), p1.dtype()), (DType::F16, DType::F16));
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let grads = p1.sum_all().unwrap().backward().unwrap();
        let g0 = f64s(grads.get(a0.as_tensor()).unwrap());
        let g1 = f64s(grads.get(a1.as_tensor()).unwrap());
        assert!(
            g0.iter().chain(&g1).all(|g| g.is_finite()),
            "gradients {g0:?} {g1:?}"
        );
        let want_p1: Vec<f64> = d.iter().map(|&x| sigmoid(-x)).collect();
        for (got, want) in f64s(&p1).iter().zip(&want_p1) {
            let f16_of = half::f16::from_f64(*want).to_f64();
            assert!(
                (got - f16_of).abs() <= 1e-3 * f16_of.abs().max(1e-4),
                "{got} {want}"
            );
        }
        let want_p0: Vec<f64> = want_p1.iter().map(|p| 1.0 - p).collect();
        for (got, want) in f64s(&p0).iter().zip(&want_p0) {
            assert!(
                (got - want).abs() <= 1e-3 * want.abs().max(1e-4),
                "{got} {want}"
            );
        }
        for i in 0..d.len() {
            let want = want_p1[i] * want_p0[i];
            assert!(
                (g0[i] + want).abs() < 1e-3 * want + 1e-7,
                "{g0:?} vs -{want}"
            );
            assert!(
                (g1[i] - want).abs() < 1e-3 * want + 1e-7,
                "{g1:?} vs {want}"
            );
        }
    }

    #[test]
    fn top_k_is_stable_on_ties() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.9, 0.2], 3), vec![3, 1, 2]);
        assert_eq!(top_k(&[1.0, 1.0], 5), vec![0, 1]);
    }

    /// `T` with `t_n = [1, 0]`, `t_a = [0.6, 0.8]`, transposed: `[1, E=2, 2]`.
    fn text_t() -> Tensor {
        Tensor::new(&[[[1f32, 0.6], [0.0, 0.8]]], &Device::Cpu).unwrap()
    }

    #[test]
    fn logits_and_probabilities_by_hand() {
        let f = Tensor::new(&[[[1f32, 0.0], [0.0, 1.0]]], &Device::Cpu).unwrap();
        let l = patch_logits(&[f], &text_t(), 10.0).unwrap();
        assert_eq!(
            l[0].to_vec3::<f32>().unwrap(),
            vec![vec![vec![10.0, 6.0], vec![0.0, 8.0]]]
        );
        let e = Tensor::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
        let p = text_probs(&e, &text_t(), 10.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // softmax([10, 6]) = [σ(4), σ(−4)]
        close(&p[0], &[sigmoid(4.0), sigmoid(-4.0)], 1e-6);
    }

    /// One patch, two layers with logits {normal, abnormal} = (0, 1) and (0, 3), upsampled to
    /// 2 × 2 (a constant stays constant):
    /// mean logits: σ(mean(1, 3)) = σ(2); mean probabilities: mean(σ(1), σ(3)), since
    /// (p_a + 1 − p_n) / 2 = p_a for a pair.
    #[test]
    fn fusions_by_hand_on_one_patch() {
        let dev = Device::Cpu;
        let layer = |a: f32| Tensor::new(&[[[0f32, a]]], &dev).unwrap();
        let logits = [layer(1.0), layer(3.0)];
        let (m, layers) = fuse_maps(&logits, MapFusion::MeanLogits, 2, true).unwrap();
        assert_eq!(m.dims(), &[1, 2, 2]);
        close(
            &m.flatten_all().unwrap().to_vec1().unwrap(),
            &[sigmoid(2.0); 4],
            1e-6,
        );
        assert_eq!(layers.len(), 2);
        let l1 = layers[1].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (n, a) = (sigmoid(-3.0), sigmoid(3.0));
        close(&l1, &[n, n, n, n, a, a, a, a], 1e-6);
        let (m, layers) = fuse_maps(&logits, MapFusion::MeanProbs, 2, false).unwrap();
        let want = (sigmoid(1.0) + sigmoid(3.0)) / 2.0;
        close(
            &m.flatten_all().unwrap().to_vec1().unwrap(),
            &[want; 4],
            1e-6,
        );
        assert!(layers.is_empty());
    }

    /// Patches are row-major on the grid: patch p lands at (p / g, p % g); at the grid's own
    /// size the upsampling is the identity in both conventions.
    #[test]
    fn fusions_keep_the_patch_layout() {
        let dev = Device::Cpu;
        let a = [0f32, 1.0, 2.0, -1.0];
        let pairs: Vec<f32> = a.iter().flat_map(|&x| [0.0, x]).collect();
        let l = Tensor::from_vec(pairs, (1, 4, 2), &dev).unwrap();
        for fusion in [MapFusion::MeanLogits, MapFusion::MeanProbs] {
            let (m, _) = fuse_maps(std::slice::from_ref(&l), fusion, 2, false).unwrap();
            let want: Vec<f64> = a.iter().map(|&x| sigmoid(x as f64)).collect();
            close(&m.flatten_all().unwrap().to_vec1().unwrap(), &want, 1e-6);
        }
        let bad = Tensor::zeros((1, 3, 2), DType::F32, &dev).unwrap();
        let e = fuse_maps(&[bad], MapFusion::MeanProbs, 4, false).unwrap_err();
        assert_eq!(e.to_string(), "3 patch tokens do not form a square grid");
        assert!(fuse_maps(&[], MapFusion::MeanProbs, 4, false).is_err());
    }

    /// Six patches, one cluster: the 5 most anomalous patches are kept (patch 4 has the lowest
    /// probability) and `h` is their normalised mean feature.
    #[test]
    fn hsf_keeps_the_top_patches() {
        let dev = Device::Cpu;
        let feats = Tensor::new(
            &[[
                [1f32, 0.0],
                [1.0, 0.0],
                [0.0, 1.0],
                [1.0, 0.0],
                [-1.0, 0.0],
                [0.0, 1.0],
            ]],
            &dev,
        )
        .unwrap();
        let abn = [2f32, 1.0, 3.0, 0.5, -4.0, 1.5];
        let pairs: Vec<f32> = abn.iter().flat_map(|&x| [0.0, x]).collect();
        let logits = Tensor::from_vec(pairs, (1, 6, 2), &dev).unwrap();
        let h = hsf_embedding(&[feats], &[logits], 1, 111).unwrap();
        // mean of (1,0),(1,0),(0,1),(1,0),(0,1) = (0.6, 0.4), normalised.
        let n = (0.36f64 + 0.16).sqrt();
        close(
            &h.flatten_all().unwrap().to_vec1().unwrap(),
            &[0.6 / n, 0.4 / n],
            1e-6,
        );
        let c = Tensor::new(&[[0f32, 1.0]], &dev).unwrap();
        let s = hsf_fuse(&h, &c, 0.5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (x, y) = (0.5 * 0.6 / n, 0.5 * 0.4 / n + 0.5);
        let m = (x * x + y * y).sqrt();
        close(&s, &[x / m, y / m], 1e-6);
    }

    #[test]
    fn postprocess_without_smoothing_is_the_rule_on_the_raw_map() {
        let raw = [0.1f32, 0.9, 0.3, 0.2];
        let joint = |j| ScoreRule::Joint {
            global: 0.5,
            joint: j,
        };
        let (map, score, global) =
            postprocess(&raw, 2, 0.0, joint(JointScore::Mean { alpha: 0.5 }));
        assert_eq!(map, raw);
        assert!((score - 0.7).abs() < 1e-7);
        assert_eq!(global, 0.5);
        assert_eq!(postprocess(&raw, 2, 0.0, joint(JointScore::None)).1, 0.5);
        assert_eq!(
            postprocess(&raw, 2, 0.0, joint(JointScore::Product)).1,
            0.45
        );
        // (1 − 0.25) · 0.5 + 0.25 · 0.3
        let mixed = ScoreRule::Reference {
            global: 0.5,
            weight: 0.25,
            reference_peak: 0.3,
        };
        assert!((postprocess(&raw, 2, 0.0, mixed).1 - 0.45).abs() < 1e-7);
        assert_eq!(
            postprocess(&raw, 2, 0.0, ScoreRule::Peak),
            (raw.to_vec(), 0.9, 0.9)
        );
        // Smoothing keeps the mass where it was: a symmetric blur of a centred spike.
        let mut spike = vec![0f32; 25];
        spike[12] = 1.0;
        let (m, peak, _) = postprocess(&spike, 5, 1.0, ScoreRule::Peak);
        assert_eq!(map_peak(&m), peak);
        assert!(m[12] < 1.0 && m[12] == peak && (m[11] - m[13]).abs() < 1e-7);
    }
}
