//! Threshold selection on the exact true/false-positive counts of [`Curve`] (scikit-learn's
//! `_binary_clf_curve`). An input is flagged when `score >= threshold`, the convention of
//! `roc_curve` and `precision_recall_curve`, so each rule picks one of the curve's thresholds:
//!
//! - [`Rule::F1Max`]: the threshold of `precision_recall_curve` with the largest
//!   `2PR / (P + R)` (the lowest threshold among equal values: NumPy's `nanargmax` on the
//!   ascending thresholds, as anomalib's `F1AdaptiveThreshold` picks it);
//! - [`Rule::MaxFpr`]: the lowest threshold of `roc_curve` whose false-positive rate is at most
//!   the budget (the most recall within it);
//! - [`Rule::MinRecall`]: the highest threshold whose recall is at least the target (the fewest
//!   false positives that reach it).
//!
//! With normal data only ([`select_normal`]) the threshold is the lowest normal score at which
//! at most `max_fpr` of the normal scores are flagged. Where no threshold of the curve meets a
//! rule by flagging nothing, the threshold is the next float above the highest score.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, MismatchError, Result};
use crate::eval::metrics::Curve;

/// `format` of the thresholds files this version writes and reads.
pub const FORMAT: &str = "zsad-thresholds/1";

/// `thresholds.json`: the image and pixel thresholds, how they were chosen, and the data and
/// model they came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdFile {
    pub format: String,
    /// `score >= image.threshold`: anomalous.
    pub image: Option<Chosen>,
    /// `map >= pixel.threshold`: in the defect mask.
    pub pixel: Option<Chosen>,
    /// What made the scores (see [`ThresholdFile::identity`]); a run with other settings is
    /// refused unless forced.
    pub model: Value,
    /// Where the thresholds were chosen: the data, its counts, the command.
    pub data: Value,
}

/// One chosen threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chosen {
    pub threshold: f32,
    /// `f1-max`, `max-fpr`, `min-recall` (labelled data) or `normal-max-fpr` (normal data).
    pub rule: String,
    /// The rule's target: the FPR budget or the recall.
    pub target: Option<f64>,
    /// What the threshold achieves on the data it was chosen on.
    pub achieved: Achieved,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Achieved {
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub fpr: Option<f64>,
    pub f1: Option<f64>,
    pub true_positives: u64,
    pub false_positives: u64,
    pub positives: u64,
    pub negatives: u64,
}

impl Chosen {
    pub fn new(s: &Selected, rule: &str, target: Option<f64>) -> Self {
        Self {
            threshold: s.threshold,
            rule: rule.to_string(),
            target,
            achieved: Achieved {
                precision: s.precision(),
                recall: s.recall(),
                fpr: s.fpr(),
                f1: s.f1(),
                true_positives: s.true_positives,
                false_positives: s.false_positives,
                positives: s.positives,
                negatives: s.negatives,
            },
        }
    }
}

impl ThresholdFile {
    /// What of a run's settings (`run.json`'s `settings`, or the model side of it, see
    /// the model settings of a run) decides its scores: the model's files, the CLIP
    /// configuration, the adapter, the detector configuration and the references, each without
    /// where it was read from (the model's spec, the adapter's path, the backbone's name, the
    /// references' paths). Output options, the tokenizer (one vocabulary) and the GEMM
    /// precision are left out.
    pub fn identity(settings: &Value) -> Value {
        let without = |v: &Value, key: &str| {
            let mut v = v.clone();
            if let Value::Object(m) = &mut v {
                m.remove(key);
            }
            v
        };
        let mut id = serde_json::json!({
            "model": without(&settings["model"], "spec"),
            "clip": settings["clip"],
            "adapter": without(&settings["adapter"], "path"),
            "detector": without(&settings["detector"], "backbone"),
        });
        // References by content and use.
        if let Some(r) = settings.get("reference") {
            let shas: Vec<Value> = r["sources"]
                .as_array()
                .map(|a| a.iter().map(|s| s["sha256"].clone()).collect())
                .unwrap_or_default();
            id["reference"] = serde_json::json!({
                "sources_sha256": shas,
                "patches_kept": r["patches_kept"],
                "max_patches": r["max_patches"],
                "weight": r["weight"],
                "only": r["only"],
            });
        }
        id
    }

    /// Reads and checks a thresholds file.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |m: String| Error::output(format!("thresholds file {}: {m}", path.display()));
        let bytes = crate::fsio::read(path, crate::fsio::FileKind::Thresholds)?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        let f: Self = serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "not a thresholds file written by `zsad calibrate` ({e})"
            ))
        })?;
        if f.format != FORMAT {
            return Err(bad(format!(
                "format `{}`, this zsad reads `{FORMAT}`",
                f.format
            )));
        }
        for (what, c) in [("image", &f.image), ("pixel", &f.pixel)] {
            if let Some(c) = c {
                if !(c.threshold.is_finite() && (0.0..=1.0f32.next_up()).contains(&c.threshold)) {
                    return Err(bad(format!(
                        "the {what} threshold {} is outside [0, 1]",
                        c.threshold
                    )));
                }
            }
        }
        if f.image.is_none() && f.pixel.is_none() {
            return Err(bad("it holds neither an image nor a pixel threshold".into()));
        }
        Ok(f)
    }

    /// Refuses thresholds chosen on the scores of other settings than `settings` (a run's),
    /// naming each that differs.
    pub fn check_matches(&self, settings: &Value, origin: &Path) -> Result<()> {
        let diffs = crate::settings::described_differences(
            &self.model,
            &Self::identity(settings),
            "calibrated",
            "run",
        );
        if diffs.is_empty() {
            return Ok(());
        }
        Err(Error::Mismatch(MismatchError {
            what: "thresholds",
            file: origin.to_path_buf(),
            verb: "were calibrated",
            differences: diffs,
            remedy: "calibrate again (`zsad calibrate`) or set `force_thresholds`".into(),
        }))
    }
}

/// How a threshold is chosen from labelled scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    F1Max,
    /// False-positive rate at most this, in [0, 1].
    MaxFpr(f64),
    /// Recall (true-positive rate) at least this, in (0, 1].
    MinRecall(f64),
}

/// A chosen threshold and what it achieves on the data it was chosen on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Selected {
    pub threshold: f32,
    /// Flagged anomalous / normal inputs (or pixels) at the threshold.
    pub true_positives: u64,
    pub false_positives: u64,
    pub positives: u64,
    pub negatives: u64,
}

impl Selected {
    fn at(curve: &Curve, i: Option<usize>) -> Self {
        let (p, n) = totals(curve);
        match i {
            Some(i) => Self {
                threshold: curve.thresholds[i],
                true_positives: curve.tps[i],
                false_positives: curve.fps[i],
                positives: p,
                negatives: n,
            },
            // Flag nothing: just above the highest score.
            None => Self {
                threshold: curve
                    .thresholds
                    .first()
                    .map_or(f32::INFINITY, |t| t.next_up()),
                true_positives: 0,
                false_positives: 0,
                positives: p,
                negatives: n,
            },
        }
    }

    /// `tp / (tp + fp)`; `None` when nothing is flagged or there are no positives to find
    /// (normal data only).
    pub fn precision(&self) -> Option<f64> {
        let flagged = self.true_positives + self.false_positives;
        (flagged > 0 && self.positives > 0).then(|| self.true_positives as f64 / flagged as f64)
    }
    /// `tp / P`; `None` without positives.
    pub fn recall(&self) -> Option<f64> {
        (self.positives > 0).then(|| self.true_positives as f64 / self.positives as f64)
    }
    /// `fp / N`; `None` without negatives.
    pub fn fpr(&self) -> Option<f64> {
        (self.negatives > 0).then(|| self.false_positives as f64 / self.negatives as f64)
    }
    pub fn f1(&self) -> Option<f64> {
        let (p, r) = (self.precision()?, self.recall()?);
        (p + r > 0.0).then(|| 2.0 * p * r / (p + r))
    }
}

fn totals(c: &Curve) -> (u64, u64) {
    (
        c.tps.last().copied().unwrap_or(0),
        c.fps.last().copied().unwrap_or(0),
    )
}

/// The threshold `rule` picks on `curve`; `None` when the data cannot decide it (F1 and recall
/// without anomalous samples, a false-positive rate without normal ones).
pub fn select(curve: &Curve, rule: Rule) -> Option<Selected> {
    let (p, n) = totals(curve);
    let pick = match rule {
        Rule::F1Max => {
            if p == 0 {
                return None;
            }
            // Descending thresholds: on equal F1 the later (lower) one wins, as `nanargmax`
            // over sklearn's ascending order picks the first.
            let mut best: Option<(usize, f64)> = None;
            for (i, (&tp, &fp)) in curve.tps.iter().zip(&curve.fps).enumerate() {
                if tp == 0 {
                    continue; // 0/0: NaN, skipped by nanargmax
                }
                let prec = tp as f64 / (tp + fp) as f64;
                let rec = tp as f64 / p as f64;
                let f1 = 2.0 * prec * rec / (prec + rec);
                if best.is_none_or(|(_, b)| f1 >= b) {
                    best = Some((i, f1));
                }
            }
            best.map(|(i, _)| i)
        }
        Rule::MaxFpr(budget) => {
            if n == 0 {
                return None;
            }
            // fpr is non-decreasing down the thresholds: the last one within the budget.
            curve
                .fps
                .iter()
                .rposition(|&fp| fp as f64 / n as f64 <= budget)
        }
        Rule::MinRecall(target) => {
            if p == 0 {
                return None;
            }
            curve
                .tps
                .iter()
                .position(|&tp| tp as f64 / p as f64 >= target)
        }
    };
    Some(Selected::at(curve, pick))
}

/// The threshold from normal scores only: the lowest at which at most `max_fpr` of them are
/// flagged (`None` without scores).
pub fn select_normal(normal: &mut [f32], max_fpr: f64) -> Option<Selected> {
    if normal.is_empty() {
        return None;
    }
    let curve = Curve::new(&mut [], normal);
    select(&curve, Rule::MaxFpr(max_fpr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(pos: &[f32], neg: &[f32]) -> Curve {
        Curve::new(&mut pos.to_vec(), &mut neg.to_vec())
    }

    /// Scores 0.9 (a), 0.8 (n), 0.7 (a), 0.4 (n), 0.3 (a), 0.1 (n). Flagging `>= t`:
    /// t = 0.9: tp 1 fp 0, F1 = 2·1·(1/3)/(4/3) = 0.5; t = 0.7: tp 2 fp 1, P = R = 2/3,
    /// F1 = 2/3; t = 0.3: tp 3 fp 2, P = 3/5, R = 1, F1 = 0.75 (the best).
    #[test]
    fn rules_by_hand() {
        let c = curve(&[0.9, 0.7, 0.3], &[0.8, 0.4, 0.1]);
        let f1 = select(&c, Rule::F1Max).unwrap();
        assert_eq!(f1.threshold, 0.3);
        assert!((f1.f1().unwrap() - 0.75).abs() < 1e-12);
        // FPR budget 1/3: t = 0.7 (fp 1 of 3); the lower 0.4 would be 2/3.
        let fpr = select(&c, Rule::MaxFpr(1.0 / 3.0)).unwrap();
        assert_eq!((fpr.threshold, fpr.true_positives), (0.7, 2));
        // Budget 0: only 0.9 keeps every normal one below.
        assert_eq!(select(&c, Rule::MaxFpr(0.0)).unwrap().threshold, 0.9);
        // Recall 2/3: 0.7 (the highest reaching it); recall 1: 0.3.
        assert_eq!(select(&c, Rule::MinRecall(0.6)).unwrap().threshold, 0.7);
        assert_eq!(select(&c, Rule::MinRecall(1.0)).unwrap().threshold, 0.3);
    }

    /// A normal score above every anomalous one with budget 0: nothing can be flagged but
    /// by going above the highest score.
    #[test]
    fn flag_nothing_goes_above_the_highest_score() {
        let c = curve(&[0.5], &[0.9]);
        let s = select(&c, Rule::MaxFpr(0.0)).unwrap();
        assert_eq!(s.threshold, 0.9f32.next_up());
        assert_eq!((s.true_positives, s.false_positives), (0, 0));
        assert_eq!(s.precision(), None);
    }

    /// Ties on F1: the lowest threshold wins (nanargmax over ascending thresholds).
    #[test]
    fn f1_ties_take_the_lowest_threshold() {
        // t = 0.8: tp 1, fp 0, P = 2: F1 = 2/3. t = 0.6: tp 2, fp 2: P = 1/2, R = 1, F1 = 2/3.
        let c = curve(&[0.8, 0.6], &[0.7, 0.6]);
        assert_eq!(select(&c, Rule::F1Max).unwrap().threshold, 0.6);
    }

    #[test]
    fn normal_only_quantile() {
        // 10 normal scores 0.0..0.9: budget 0.2 flags 0.8 and 0.9; 0.25 too (not 3 of 10).
        let mut v: Vec<f32> = (0..10).map(|i| i as f32 / 10.0).collect();
        assert_eq!(select_normal(&mut v, 0.2).unwrap().threshold, 0.8);
        assert_eq!(select_normal(&mut v, 0.25).unwrap().threshold, 0.8);
        assert_eq!(
            select_normal(&mut v, 0.0).unwrap().threshold,
            0.9f32.next_up()
        );
        assert_eq!(select_normal(&mut [], 0.1), None);
    }

    #[test]
    fn undecidable_without_the_class() {
        assert_eq!(select(&curve(&[], &[0.1]), Rule::F1Max), None);
        assert_eq!(select(&curve(&[0.2], &[]), Rule::MaxFpr(0.1)), None);
        assert_eq!(select(&curve(&[], &[0.1]), Rule::MinRecall(0.5)), None);
    }
}
