//! Reference-guided detection: a memory bank of patch features from a few normal images of the
//! product, and each test patch's distance to its nearest bank patch as a second anomaly map.
//!
//! This is the few-shot half of WinCLIP+ (open-edge-platform/anomalib
//! `src/anomalib/models/image/winclip/torch_model.py`, `_compute_few_shot_scores`: per layer,
//! `(1 - max_j cos(x, b_j)) / 2`, averaged over layers, and the zero-shot and few-shot maps
//! averaged), on the very features each method compares with text, so it works with every
//! preset and adapter. Large banks are subsampled with PatchCore's greedy k-center coreset
//! (amazon-science/patchcore-inspection `src/patchcore/sampler.py`, `ApproximateGreedyCoresetSampler`:
//! a random projection to 128 dimensions, then farthest-point selection).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::MapFusion;
use super::maps::upsample_bilinear;
use crate::error::{Error, MismatchError, Result};

/// `zsad.reference` in a bank file's metadata.
pub const META_KEY: &str = "zsad.reference";
/// The bank file format this version writes and reads.
pub const FORMAT: &str = "zsad-reference/1";

/// Bank rows per similarity product: bounds the `[P, chunk]` score block (1369 × 4096 f32 is
/// 22 MB at ViT-L/14@518).
pub const CHUNK_ROWS: usize = 4096;

/// Dimensions the coreset's distances are computed in (PatchCore's
/// `dimension_to_project_features_to = 128`).
pub const CORESET_DIM: usize = 128;

/// How the reference map joins the method's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReferenceUse {
    /// Weight `w` of the reference map: `(1 − w) · method + w · reference` (WinCLIP+ averages
    /// the two: `w = 0.5`).
    pub weight: f64,
    /// The reference map alone: no text, the image score is the map's peak (PatchCore's).
    pub only: bool,
}

impl Default for ReferenceUse {
    fn default() -> Self {
        Self {
            weight: 0.5,
            only: false,
        }
    }
}

/// A normal image a bank was built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceImage {
    pub path: String,
    pub sha256: String,
}

/// What a bank was built with; a run with other features is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BankInfo {
    pub format: String,
    /// What makes the features: the backbone's files by content (or the random model), the
    /// adapter by content (or the preset and seed), and the detector settings the image pass
    /// reads (layers, image size, V-V start, patch features, position interpolation).
    pub features: Value,
    pub layers: Vec<usize>,
    pub image_size: usize,
    /// Patches each image gave per layer.
    pub patches_per_image: usize,
    pub sources: Vec<SourceImage>,
    /// Bank rows per layer before and after the coreset (equal without one).
    pub patches_total: usize,
    pub patches_kept: usize,
    /// `--reference-max-patches` and the coreset's seed, when a coreset was taken.
    pub max_patches: Option<usize>,
    pub coreset_seed: u64,
}

/// Per tapped layer, the unit patch features of the normal images.
#[derive(Debug, Clone)]
pub struct MemoryBank {
    /// Per layer `[N, E]`, unit rows.
    pub layers: Vec<Tensor>,
    pub info: BankInfo,
}

impl MemoryBank {
    /// Bytes the bank's features take.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The bank as safetensors bytes (`layer.{i}`, f32) with [`BankInfo`] as JSON metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let info = serde_json::to_string(&self.info)
            .map_err(|e| Error::output(format!("reference bank: {e}")))?;
        let tensors: HashMap<String, Tensor> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, t)| Ok((format!("layer.{i}"), t.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let meta = HashMap::from([(META_KEY.to_string(), info)]);
        crate::data::tensors::serialize(&tensors, meta)
    }

    /// Reads a bank written by [`Self::to_bytes`], checking every tensor against its record.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bad = |m: String| Error::adapter(format!("reference bank {}: {m}", path.display()));
        let (tensors, meta) = crate::data::tensors::read(path)?;
        let Some(info) = meta.get(META_KEY) else {
            return Err(bad(format!(
                "no `{META_KEY}` metadata: not a bank written by `zsad reference build`"
            )));
        };
        let info: BankInfo = serde_json::from_str(info).map_err(|e| bad(format!("{e}")))?;
        if info.format != FORMAT {
            return Err(bad(format!(
                "format `{}`, this zsad reads `{FORMAT}`",
                info.format
            )));
        }
        let mut layers = Vec::with_capacity(info.layers.len());
        let mut dim = None;
        for i in 0..info.layers.len() {
            let name = format!("layer.{i}");
            let t = tensors
                .get(&name)
                .ok_or_else(|| bad(format!("`{name}` is missing")))?;
            let (n, e) = t
                .dims2()
                .map_err(|_| bad(format!("`{name}` has shape {:?}, not [N, E]", t.dims())))?;
            if n != info.patches_kept || n == 0 {
                return Err(bad(format!(
                    "`{name}` has {n} rows, the record says {}",
                    info.patches_kept
                )));
            }
            if *dim.get_or_insert(e) != e {
                return Err(bad(format!("`{name}` is {e} wide, layer 0 is {dim:?}")));
            }
            let t = t.to_dtype(DType::F32)?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("`{name}` holds non-finite values")));
            }
            layers.push(t.to_device(device)?);
        }
        if tensors.len() != info.layers.len() {
            return Err(bad(format!(
                "{} tensors for {} layers",
                tensors.len(),
                info.layers.len()
            )));
        }
        Ok(Self { layers, info })
    }

    /// Refuses a bank whose features were made otherwise than `features` (what this run's
    /// image pass would give), naming each setting that differs.
    pub fn check_matches(&self, features: &Value, origin: &Path) -> Result<()> {
        let diffs =
            crate::settings::described_differences(&self.info.features, features, "bank", "run");
        if diffs.is_empty() {
            return Ok(());
        }
        Err(Error::Mismatch(MismatchError {
            what: "reference bank",
            file: origin.to_path_buf(),
            verb: "was built",
            differences: diffs,
            remedy: "rebuild it with `zsad reference build` for this model and adapter".into(),
        }))
    }
}

/// Each test patch's reference anomaly, `(1 − max_j cos(x, b_j)) / 2` in [0, 1], with the bank
/// taken `chunk` rows at a time.
///
/// # Shapes
/// `test: [M, E]`, `bank: [N, E]` (unit rows, `N ≥ 1`) -> `[M]`.
pub fn nearest_distance(test: &Tensor, bank: &Tensor, chunk: usize) -> Result<Tensor> {
    let n = bank.dim(0)?;
    if n == 0 {
        return Err(crate::error::invalid!("an empty reference bank"));
    }
    let chunk = chunk.max(1);
    let mut best: Option<Tensor> = None;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let b = bank.narrow(0, start, len)?;
        let sims = test.matmul(&b.t()?)?.max(D::Minus1)?; // [M]
        best = Some(match best {
            Some(m) => m.maximum(&sims)?,
            None => sims,
        });
        start += len;
    }
    let best = best.expect("n >= 1");
    // Rounding can put a unit vector's cosine with itself a hair above 1.
    Ok(((best.neg()? + 1.0)? * 0.5)?.clamp(0f32, 1f32)?)
}

/// The reference map at `size × size`: per layer the nearest-patch distance of every patch,
/// averaged over layers, upsampled as the method upsamples its own map (bilinear; AdaCLIP's
/// `align_corners=True`, AnomalyCLIP's `False`).
///
/// # Shapes
/// `patches`: per layer `[B, P, E]` (unit rows), `bank`: per layer `[N, E]` -> `[B, S, S]`.
pub fn reference_map(
    patches: &[Tensor],
    bank: &[Tensor],
    fusion: MapFusion,
    size: usize,
) -> Result<Tensor> {
    if patches.len() != bank.len() || patches.is_empty() {
        return Err(crate::error::invalid!(
            "{} tapped layers but the bank has {}",
            patches.len(),
            bank.len()
        ));
    }
    let (b, p, e) = patches[0].dims3()?;
    let grid = super::scoring::grid_side(p)?;
    let mut sum: Option<Tensor> = None;
    for (x, m) in patches.iter().zip(bank) {
        let x = x.to_dtype(DType::F32)?.reshape((b * p, e))?;
        let m = m.to_dtype(DType::F32)?;
        let d = nearest_distance(&x, &m, CHUNK_ROWS)?;
        sum = Some(match sum {
            Some(s) => (s + d)?,
            None => d,
        });
    }
    let mean = (sum.expect("one layer or more") / patches.len() as f64)?;
    let grid_maps = mean.reshape((b, grid, grid))?;
    let align_corners = matches!(fusion, MapFusion::MeanLogits);
    upsample_bilinear(&grid_maps, size, size, align_corners)
}

/// `(1 − w) · method + w · reference`.
///
/// # Shapes
/// `method, reference: [B, S, S]` -> `[B, S, S]`.
pub fn fuse_reference(method: &Tensor, reference: &Tensor, weight: f64) -> Result<Tensor> {
    let method = method.to_dtype(DType::F32)?;
    Ok(((method * (1.0 - weight))? + (reference * weight)?)?)
}

/// PatchCore's greedy k-center coreset: `m` rows of `points` (`n × dim`, row-major) such that
/// each next row is the one farthest (Euclidean) from those already chosen, starting at
/// `start`. Returns the chosen indices in selection order (all `n` when `m ≥ n`).
pub fn greedy_coreset(points: &[f32], dim: usize, m: usize, start: usize) -> Vec<usize> {
    use rayon::prelude::*;
    let n = points.len().checked_div(dim).unwrap_or(0);
    if n == 0 || m == 0 {
        return Vec::new();
    }
    if m >= n {
        return (0..n).collect();
    }
    let row = |i: usize| &points[i * dim..(i + 1) * dim];
    let dist2 = |a: &[f32], b: &[f32]| -> f32 {
        // Eight partial sums: a plain running sum cannot be reordered, so it would not be
        // vectorised (the coreset of 64 ViT-B/16 references took about 20 s that way, 4 s so).
        let mut acc = [0f32; 8];
        let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = a8
            .remainder()
            .iter()
            .zip(b8.remainder())
            .map(|(x, y)| (x - y) * (x - y))
            .sum();
        for (x, y) in a8.zip(b8) {
            for k in 0..8 {
                let d = x[k] - y[k];
                acc[k] += d * d;
            }
        }
        acc.iter().sum::<f32>() + tail
    };
    let mut chosen = Vec::with_capacity(m);
    let mut current = start.min(n - 1);
    let mut nearest = vec![f32::INFINITY; n];
    for _ in 0..m {
        chosen.push(current);
        let c = row(current);
        nearest
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = d.min(dist2(row(i), c)));
        // The farthest point from the chosen set; the lowest index on ties.
        let mut best = (0usize, f32::NEG_INFINITY);
        for (i, &d) in nearest.iter().enumerate() {
            if d > best.1 {
                best = (i, d);
            }
        }
        current = best.0;
    }
    chosen
}

/// The coreset of one layer's bank `[N, E]` with at most `max` rows: distances in a seeded
/// random projection to [`CORESET_DIM`] dimensions when the features are wider, the start row
/// drawn from the seed.
pub fn coreset_rows(bank: &Tensor, max: usize, seed: u64) -> Result<Vec<usize>> {
    let (n, e) = bank.dims2()?;
    if n <= max {
        return Ok((0..n).collect());
    }
    let mut rng = crate::rng::SplitMix64(seed);
    let points = if e > CORESET_DIM {
        // Gaussian entries with variance 1/k keep distances in expectation
        // (Johnson–Lindenstrauss); PatchCore projects with a default-initialised `nn.Linear`.
        let r = rng.normal(e * CORESET_DIM, 1.0 / (CORESET_DIM as f64).sqrt());
        let r = Tensor::from_vec(r, (e, CORESET_DIM), bank.device())?;
        bank.to_dtype(DType::F32)?.matmul(&r)?
    } else {
        bank.to_dtype(DType::F32)?
    };
    let dim = points.dim(1)?;
    let flat = points.flatten_all()?.to_vec1::<f32>()?;
    let start = (rng.next_u64() % n as u64) as usize;
    Ok(greedy_coreset(&flat, dim, max, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(v: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = v.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (v.len(), 2), &Device::Cpu).unwrap()
    }

    /// Unit vectors at 0°, 90° and 180°: the nearest bank patch of (1, 0) is itself (distance
    /// 0), of (0, 1) is at 90° (cos 0 -> 1/2), of (−1, 0) with a bank of only (1, 0) is opposite
    /// (cos −1 -> 1).
    #[test]
    fn nearest_distance_is_halved_one_minus_the_best_cosine() {
        let bank = t2(&[[1.0, 0.0], [0.0, -1.0]]);
        let test = t2(&[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]);
        for chunk in [1, 2, 100] {
            let d = nearest_distance(&test, &bank, chunk)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(d, [0.0, 0.5, 0.5], "chunk {chunk}");
        }
        let d = nearest_distance(&t2(&[[-1.0, 0.0]]), &t2(&[[1.0, 0.0]]), 4)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(d, [1.0]);
        // 60° apart: cos 1/2 -> 1/4.
        let s = 3f32.sqrt() / 2.0;
        let d = nearest_distance(&t2(&[[0.5, s]]), &t2(&[[1.0, 0.0]]), 4)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((d[0] - 0.25).abs() < 1e-6, "{d:?}");
        assert!(nearest_distance(
            &test,
            &Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap(),
            4
        )
        .is_err());
    }

    /// Points on a line at 0, 1, 2 and 10, starting from 0: the farthest is 10, then 2 (2 from
    /// 0, 8 from 10), then 1.
    #[test]
    fn coreset_takes_the_farthest_point_each_time() {
        let pts = [0.0f32, 1.0, 2.0, 10.0];
        assert_eq!(greedy_coreset(&pts, 1, 1, 0), [0]);
        assert_eq!(greedy_coreset(&pts, 1, 2, 0), [0, 3]);
        assert_eq!(greedy_coreset(&pts, 1, 3, 0), [0, 3, 2]);
        assert_eq!(greedy_coreset(&pts, 1, 4, 0), [0, 1, 2, 3]);
        assert_eq!(greedy_coreset(&pts, 1, 3, 3), [3, 0, 2]);
        // Two dimensions: the corners of a unit square and its centre, from the centre. Every
        // corner is 0.5 (squared) from the centre, so after the first corner the others tie
        // at 0.5 and the lowest index wins; a far point is taken before any of them.
        let sq = [0.5f32, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        assert_eq!(greedy_coreset(&sq, 2, 3, 0), [0, 1, 2]);
        let far = [0.5f32, 0.5, 0.0, 0.0, 1.0, 0.0, 5.0, 5.0];
        assert_eq!(greedy_coreset(&far, 2, 2, 0), [0, 3]);
        assert!(greedy_coreset(&sq, 2, 0, 0).is_empty());
    }

    #[test]
    fn coreset_rows_keeps_small_banks_whole_and_is_seeded() {
        let bank = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [-1.0, 0.0]], &Device::Cpu).unwrap();
        assert_eq!(coreset_rows(&bank, 3, 1).unwrap(), [0, 1, 2]);
        let a = coreset_rows(&bank, 2, 7).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a, coreset_rows(&bank, 2, 7).unwrap());
    }

    /// The reference map of a bank holding the test image's own patches is zero; one patch
    /// replaced by its opposite is 1 on that patch (one layer, a 2 × 2 grid at its own size).
    #[test]
    fn reference_map_marks_the_patch_unlike_the_bank() {
        let normal = t2(&[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]);
        let odd = t2(&[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]);
        let bank = [t2(&[[1.0, 0.0], [0.0, 1.0]])];
        let map = |x: &Tensor| {
            reference_map(&[x.unsqueeze(0).unwrap()], &bank, MapFusion::MeanProbs, 2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(map(&normal), [0.0; 4]);
        let m = map(&odd);
        // (−1, 0) is 180° from (1, 0) and 90° from (0, 1): the nearest is at cos 0 -> 1/2.
        assert_eq!(m, [0.0, 0.5, 0.0, 0.0]);
        let fused = fuse_reference(
            &Tensor::new(&[[[0.2f32, 0.4], [0.6, 0.8]]], &Device::Cpu).unwrap(),
            &Tensor::new(&[[[0.0f32, 1.0], [0.0, 0.0]]], &Device::Cpu).unwrap(),
            0.25,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        let want = [0.15f32, 0.55, 0.45, 0.6];
        for (g, w) in fused.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{fused:?}");
        }
    }

    #[test]
    fn differences_name_each_setting() {
        let a = serde_json::json!({"model": {"sha": "1"}, "layers": [1, 2]});
        let b = serde_json::json!({"model": {"sha": "2"}, "layers": [1, 2], "extra": 1});
        let bank = MemoryBank {
            layers: Vec::new(),
            info: BankInfo {
                format: FORMAT.into(),
                features: a.clone(),
                layers: vec![1, 2],
                image_size: 32,
                patches_per_image: 16,
                sources: Vec::new(),
                patches_total: 1,
                patches_kept: 1,
                max_patches: None,
                coreset_seed: 0,
            },
        };
        assert!(bank.check_matches(&a, Path::new("b.safetensors")).is_ok());
        let e = bank
            .check_matches(&b, Path::new("b.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("extra: bank (absent), run 1; model.sha: bank \"1\", run \"2\""),
            "{e}"
        );
    }
}
