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

use serde::{Deserialize, Serialize};

use crate::eval::metrics::Curve;

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

    /// `tp / (tp + fp)`; `None` when nothing is flagged.
    pub fn precision(&self) -> Option<f64> {
        let flagged = self.true_positives + self.false_positives;
        (flagged > 0).then(|| self.true_positives as f64 / flagged as f64)
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
