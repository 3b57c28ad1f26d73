//! The field's metrics exactly as the reference code computes them (caoyunkang/AdaCLIP@e27ee32
//! `tools/metrics.py`; zqhang/AnomalyCLIP@45ed4dd `metrics.py` `cal_pro_score` l.5-29): AUROC
//! (`sklearn.metrics.roc_auc_score`, ties grouped), average precision
//! (`average_precision_score`, step-wise), F1-max over `precision_recall_curve` (AdaCLIP) and
//! AUPRO (AnomalyCLIP's `cal_pro_score`: 200 thresholds, 8-connected regions, FPR < 0.3,
//! min-max rescaled FPR, trapezoid).
//!
//! Exactness and memory: scores are kept as f32 in two arrays, positives and negatives, and
//! sorted in place; walking both in descending order gives the true-/false-positive counts at
//! every distinct threshold, which is all that sklearn's `_binary_clf_curve` computes. Counts
//! are integers, so the curves are exact; the areas are summed in f64 (sklearn: f64 with a
//! different order, so results agree to ~1e-12). Memory is 4 bytes per pixel, no sorted copy of
//! the negatives; tens of millions of pixels per class fit comfortably.

/// True/false positives at each distinct threshold, thresholds descending (sklearn's
/// `_binary_clf_curve`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curve {
    pub thresholds: Vec<f32>,
    pub tps: Vec<u64>,
    pub fps: Vec<u64>,
}

impl Curve {
    /// Sorts both slices (descending) in place and merges them. NaN scores sort lowest.
    pub fn new(positives: &mut [f32], negatives: &mut [f32]) -> Self {
        // -0.0 and 0.0 are one tie group, as for NumPy's `==`.
        for v in positives.iter_mut().chain(negatives.iter_mut()) {
            *v += 0.0;
        }
        let desc = |a: &f32, b: &f32| b.total_cmp(a);
        positives.sort_unstable_by(desc);
        negatives.sort_unstable_by(desc);
        Self::from_sorted(positives, negatives)
    }

    /// The same for slices already sorted descending.
    pub fn from_sorted(positives: &[f32], negatives: &[f32]) -> Self {
        let mut c = Self::default();
        let (mut i, mut j) = (0usize, 0usize);
        while i < positives.len() || j < negatives.len() {
            let t = match (positives.get(i), negatives.get(j)) {
                (Some(&p), Some(&n)) => {
                    if p.total_cmp(&n).is_ge() {
                        p
                    } else {
                        n
                    }
                }
                (Some(&p), None) => p,
                (None, Some(&n)) => n,
                (None, None) => unreachable!(),
            };
            while i < positives.len() && positives[i].total_cmp(&t).is_eq() {
                i += 1;
            }
            while j < negatives.len() && negatives[j].total_cmp(&t).is_eq() {
                j += 1;
            }
            c.thresholds.push(t);
            c.tps.push(i as u64);
            c.fps.push(j as u64);
        }
        c
    }

    fn totals(&self) -> (u64, u64) {
        (
            self.tps.last().copied().unwrap_or(0),
            self.fps.last().copied().unwrap_or(0),
        )
    }

    /// `roc_auc_score`: `None` when only one class is present (sklearn raises).
    pub fn auroc(&self) -> Option<f64> {
        let (p, n) = self.totals();
        if p == 0 || n == 0 {
            return None;
        }
        // Trapezoids on integer counts: Σ Δfp · (tp_i + tp_{i-1}) / (2 P N), exact up to the
        // final division.
        let (mut area, mut tp0, mut fp0) = (0u128, 0u64, 0u64);
        for (&tp, &fp) in self.tps.iter().zip(&self.fps) {
            area += (fp - fp0) as u128 * (tp + tp0) as u128;
            tp0 = tp;
            fp0 = fp;
        }
        Some(area as f64 / (2.0 * p as f64 * n as f64))
    }

    /// `average_precision_score`: Σ (R_i − R_{i−1}) P_i over descending thresholds. With no
    /// positives sklearn warns and returns −0.0: `None` here.
    pub fn average_precision(&self) -> Option<f64> {
        let (p, _) = self.totals();
        if p == 0 {
            return None;
        }
        let mut ap = 0.0f64;
        let mut tp0 = 0u64;
        for (&tp, &fp) in self.tps.iter().zip(&self.fps) {
            if tp > tp0 {
                ap += (tp - tp0) as f64 / p as f64 * (tp as f64 / (tp + fp) as f64);
            }
            tp0 = tp;
        }
        Some(ap)
    }

    /// AdaCLIP's F1-max: the largest `2PR/(P+R)` over the points of `precision_recall_curve`
    /// (including its final (P=1, R=0) point), non-finite values dropped. `None` without
    /// positives.
    pub fn f1_max(&self) -> Option<f64> {
        let (p, _) = self.totals();
        if p == 0 {
            return None;
        }
        let mut best = 0.0f64; // the appended (1, 0) point
        for (&tp, &fp) in self.tps.iter().zip(&self.fps) {
            if tp == 0 {
                continue; // precision = recall = 0: 0/0, dropped
            }
            let prec = tp as f64 / (tp + fp) as f64;
            let rec = tp as f64 / p as f64;
            best = best.max(2.0 * prec * rec / (prec + rec));
        }
        Some(best)
    }

    /// ROC points (fpr, tpr) from (0, 0), for plots.
    pub fn roc_points(&self) -> Vec<(f64, f64)> {
        let (p, n) = self.totals();
        let mut v = vec![(0.0, 0.0)];
        v.extend(
            self.tps
                .iter()
                .zip(&self.fps)
                .map(|(&tp, &fp)| (fp as f64 / n.max(1) as f64, tp as f64 / p.max(1) as f64)),
        );
        v
    }

    /// PR points (recall, precision) in threshold order, for plots.
    pub fn pr_points(&self) -> Vec<(f64, f64)> {
        let (p, _) = self.totals();
        self.tps
            .iter()
            .zip(&self.fps)
            .map(|(&tp, &fp)| (tp as f64 / p.max(1) as f64, tp as f64 / (tp + fp) as f64))
            .collect()
    }
}

/// AUROC, AP and F1-max of one set of binary labels.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BinaryMetrics {
    pub auroc: Option<f64>,
    pub ap: Option<f64>,
    pub f1_max: Option<f64>,
}

impl From<&Curve> for BinaryMetrics {
    fn from(c: &Curve) -> Self {
        Self {
            auroc: c.auroc(),
            ap: c.average_precision(),
            f1_max: c.f1_max(),
        }
    }
}

/// Labels the 8-connected regions of a row-major `h x w` mask: region id per pixel (0 =
/// background, 1.. = regions) and the number of regions, as `skimage.measure.label` (default
/// full connectivity) numbers them, in raster order of their first pixel.
pub fn label_regions(mask: &[bool], h: usize, w: usize) -> (Vec<u32>, u32) {
    assert_eq!(mask.len(), h * w, "mask does not match {h}x{w}");
    let mut labels = vec![0u32; h * w];
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..h * w {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        next += 1;
        labels[start] = next;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (y, x) = ((i / w) as isize, (i % w) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (ny, nx) = (y + dy, x + dx);
                    if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if mask[j] && labels[j] == 0 {
                        labels[j] = next;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, next)
}

/// Pixel-level evidence of one class, added image by image: the scores of anomalous pixels
/// grouped by connected region (for AUPRO) and of normal pixels.
#[derive(Debug, Clone, Default)]
pub struct PixelScores {
    /// Anomalous pixels' scores, region after region.
    positives: Vec<f32>,
    /// `region_ends[k]`: end of region k in `positives`.
    region_ends: Vec<usize>,
    negatives: Vec<f32>,
    min: f32,
    max: f32,
    images: usize,
}

impl PixelScores {
    pub fn new() -> Self {
        Self {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            ..Default::default()
        }
    }

    /// Adds one image's map and ground-truth mask (same `h x w`, row-major).
    pub fn add(&mut self, map: &[f32], mask: &[bool], h: usize, w: usize) {
        assert_eq!(map.len(), h * w, "map does not match {h}x{w}");
        let (labels, n) = label_regions(mask, h, w);
        let mut regions: Vec<Vec<f32>> = vec![Vec::new(); n as usize];
        for (i, (&v, &l)) in map.iter().zip(&labels).enumerate() {
            let v = v + 0.0; // -0.0 and 0.0 are one value
            self.min = self.min.min(v);
            self.max = self.max.max(v);
            if l == 0 {
                debug_assert!(!mask[i]);
                self.negatives.push(v);
            } else {
                regions[l as usize - 1].push(v);
            }
        }
        for r in regions {
            self.positives.extend(r);
            self.region_ends.push(self.positives.len());
        }
        self.images += 1;
    }

    pub fn pixels(&self) -> usize {
        self.positives.len() + self.negatives.len()
    }

    /// Another image set's pixels added to these (for curves over several classes; AUPRO's
    /// regions stay apart).
    pub fn append(&mut self, mut other: PixelScores) {
        let base = self.positives.len();
        self.positives.append(&mut other.positives);
        self.region_ends
            .extend(other.region_ends.iter().map(|e| e + base));
        self.negatives.append(&mut other.negatives);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.images += other.images;
    }

    /// The pixel curve alone (no AUPRO); consumes the scores.
    pub fn into_curve(mut self) -> Curve {
        Curve::new(&mut self.positives, &mut self.negatives)
    }
    pub fn images(&self) -> usize {
        self.images
    }

    /// AUROC, AP, F1-max and AUPRO; consumes the scores (sorting them in place).
    pub fn finish(self) -> (BinaryMetrics, Option<f64>, Curve) {
        self.finish_with(ProGrid::default())
    }

    /// The same with a choice of AUPRO threshold grid.
    pub fn finish_with(mut self, grid: ProGrid) -> (BinaryMetrics, Option<f64>, Curve) {
        let desc = |a: &f32, b: &f32| b.total_cmp(a);
        self.negatives.sort_unstable_by(desc);
        // Regions sorted ascending each (for counts above a threshold); a sorted copy of all
        // positives for the curve (they are the small side).
        let mut start = 0;
        for &end in &self.region_ends {
            self.positives[start..end].sort_unstable_by(f32::total_cmp);
            start = end;
        }
        let mut pos_sorted = self.positives.clone();
        pos_sorted.sort_unstable_by(desc);
        let curve = Curve::from_sorted(&pos_sorted, &self.negatives);
        drop(pos_sorted);
        let aupro = self.aupro(grid);
        (BinaryMetrics::from(&curve), aupro, curve)
    }

    /// AnomalyCLIP's `cal_pro_score` (max_step 200, expect_fpr 0.3) over the whole class.
    fn aupro(&self, grid: ProGrid) -> Option<f64> {
        if self.region_ends.is_empty() || self.negatives.is_empty() {
            return None;
        }
        let thresholds = grid.thresholds(self.min, self.max, 200)?;
        let n_neg = self.negatives.len() as f64;
        let mut fprs = Vec::with_capacity(thresholds.len());
        let mut pros = Vec::with_capacity(thresholds.len());
        for &th in &thresholds {
            let above = |v: f32| grid.above(v, th);
            // negatives are sorted descending: count of values above th.
            let fp = self.negatives.partition_point(|&v| above(v));
            let mut sum = 0.0f64;
            let mut start = 0;
            for &end in &self.region_ends {
                let r = &self.positives[start..end]; // ascending
                let n_above = r.len() - r.partition_point(|&v| !above(v));
                sum += n_above as f64 / r.len() as f64;
                start = end;
            }
            fprs.push(fp as f64 / n_neg);
            pros.push(sum / self.region_ends.len() as f64);
        }
        let kept: Vec<(f64, f64)> = fprs
            .into_iter()
            .zip(pros)
            .filter(|(f, _)| *f < 0.3)
            .collect();
        let lo = kept.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let hi = kept.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        if kept.len() < 2 || hi <= lo {
            return None; // sklearn: nan (0/0 rescale) or an error (fewer than 2 points)
        }
        // sklearn.metrics.auc: trapezoid, direction from the (monotonic) x.
        let xs: Vec<f64> = kept.iter().map(|p| (p.0 - lo) / (hi - lo)).collect();
        let mut area = 0.0f64;
        for k in 1..kept.len() {
            area += (xs[k] - xs[k - 1]) * (kept[k].1 + kept[k - 1].1) / 2.0;
        }
        Some(area.abs())
    }
}

crate::choice::choice_enum! {
    /// AnomalyCLIP's threshold grid is `np.arange(min_th, max_th, (max_th - min_th) / 200)` over
    /// float32 scalars, and `amaps > th`. NumPy evaluates both differently across major versions;
    /// both are reproduced bit for bit (checked against NumPy 1.24 and 2.4). The results differ only
    /// when pixels sit exactly on a threshold or the value range is below float32 resolution.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ProGrid {
        /// NumPy 1.x (AnomalyCLIP's pinned numpy 1.24, the published numbers): step in f64,
        /// comparison against the threshold rounded to f32.
        Numpy1 = "numpy1",
        /// NumPy 2.x: step computed in f32, grid and comparison in f64.
        Numpy2 = "numpy2",
    }
}

// Written out: `#[default]` cannot pass through `choice_enum!`.
#[allow(clippy::derivable_impls)]
impl Default for ProGrid {
    fn default() -> Self {
        Self::Numpy1
    }
}

impl ProGrid {
    /// The thresholds (as f64); `None` where NumPy cannot build the grid (max <= min).
    pub fn thresholds(self, min: f32, max: f32, steps: u32) -> Option<Vec<f64>> {
        let r = max - min; // f32
        if !(r > 0.0) {
            return None;
        }
        let (len, first, second) = match self {
            Self::Numpy1 => {
                let delta = r as f64 / steps as f64;
                ((r as f64 / delta).ceil(), min as f64, min as f64 + delta)
            }
            Self::Numpy2 => {
                let delta = r / steps as f32;
                if !(delta > 0.0) {
                    return None;
                }
                ((r / delta).ceil() as f64, min as f64, (min + delta) as f64)
            }
        };
        let len = len.max(0.0) as usize;
        let step = second - first;
        Some(
            (0..len)
                .map(|i| match i {
                    0 => first,
                    1 => second,
                    _ => first + i as f64 * step,
                })
                .collect(),
        )
    }

    /// `amaps > th` as NumPy evaluates it.
    pub fn above(self, v: f32, th: f64) -> bool {
        match self {
            Self::Numpy1 => v > th as f32,
            Self::Numpy2 => v as f64 > th,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(scores: &[f32], labels: &[u8]) -> Curve {
        let mut p: Vec<f32> = scores
            .iter()
            .zip(labels)
            .filter(|(_, &l)| l == 1)
            .map(|(&s, _)| s)
            .collect();
        let mut n: Vec<f32> = scores
            .iter()
            .zip(labels)
            .filter(|(_, &l)| l == 0)
            .map(|(&s, _)| s)
            .collect();
        Curve::new(&mut p, &mut n)
    }

    #[test]
    fn hand_computed_small_case() {
        // scores 0.9(1) 0.8(0) 0.8(1) 0.3(0): thresholds 0.9, 0.8, 0.3
        let c = curve(&[0.9, 0.8, 0.8, 0.3], &[1, 0, 1, 0]);
        assert_eq!(c.tps, vec![1, 2, 2]);
        assert_eq!(c.fps, vec![0, 1, 2]);
        // ROC: (0,0) (0,.5) (.5,1) (1,1): area = 0 + .5*(.5+1)/2 + .5*1 = 0.875
        assert!((c.auroc().unwrap() - 0.875).abs() < 1e-15);
        // AP = .5*1 + .5*(2/3)
        assert!((c.average_precision().unwrap() - (0.5 + 1.0 / 3.0)).abs() < 1e-15);
        // F1 at 0.8: P = 2/3, R = 1 -> 0.8
        assert!((c.f1_max().unwrap() - 0.8).abs() < 1e-15);
    }

    #[test]
    fn single_label_is_undefined() {
        let c = curve(&[0.1, 0.2], &[0, 0]);
        assert_eq!(
            (c.auroc(), c.average_precision(), c.f1_max()),
            (None, None, None)
        );
        let c = curve(&[0.1, 0.2], &[1, 1]);
        assert_eq!(c.auroc(), None);
        assert_eq!(c.average_precision(), Some(1.0));
    }

    #[test]
    fn diagonal_neighbours_are_one_region() {
        #[rustfmt::skip]
        let m = [
            true, false, false,
            false, true, false,
            false, false, false,
            true, true, false,
        ];
        let (labels, n) = label_regions(&m, 4, 3);
        assert_eq!(n, 2);
        assert_eq!(labels, vec![1, 0, 0, 0, 1, 0, 0, 0, 0, 2, 2, 0]);
    }

    #[test]
    fn threshold_grids_have_numpy_lengths() {
        for g in [ProGrid::Numpy1, ProGrid::Numpy2] {
            let t = g.thresholds(0.0, 1.0, 200).unwrap();
            assert_eq!(t.len(), 200);
            assert_eq!(t[0], 0.0);
            assert!(t[199] < 1.0);
            assert!(g.thresholds(0.5, 0.5, 200).is_none());
        }
    }
}
