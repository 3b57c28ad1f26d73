//! Threshold selection and defect regions against scikit-learn and scikit-image
//! (`scripts/make_decision_fixtures.py` writes the cases): every threshold and every region is
//! exact.

mod common;

use serde_json::Value;
use zsad::decision::regions::defect_regions;
use zsad::decision::thresholds::{select, select_normal, Rule};
use zsad::eval::metrics::Curve;

fn cases() -> Value {
    let p = common::fixtures().join("decision/cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// `null` in the fixture: the reference flags nothing (its threshold is infinite), which zsad
/// writes as the next float above the highest score.
fn want(v: &Value, highest: f32) -> f32 {
    match v.as_f64() {
        Some(t) => t as f32,
        None => highest.next_up(),
    }
}

#[test]
fn thresholds_match_sklearn() {
    let all = cases();
    let mut checked = 0;
    for case in all["thresholds"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let scores = f32s(&case["scores"]);
        let labels: Vec<bool> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() == 1)
            .collect();
        let mut pos: Vec<f32> = scores
            .iter()
            .zip(&labels)
            .filter(|p| *p.1)
            .map(|p| *p.0)
            .collect();
        let mut neg: Vec<f32> = scores
            .iter()
            .zip(&labels)
            .filter(|p| !*p.1)
            .map(|p| *p.0)
            .collect();
        let highest = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let curve = Curve::new(&mut pos.clone(), &mut neg.clone());
        if let Some(t) = case.get("f1_max") {
            let got = select(&curve, Rule::F1Max).unwrap().threshold;
            assert_eq!(got, want(t, highest), "{name}: f1_max");
            checked += 1;
        }
        for (key, rule) in [
            ("max_fpr", Rule::MaxFpr as fn(f64) -> Rule),
            ("min_recall", Rule::MinRecall),
        ] {
            for pair in case
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let target = pair[0].as_f64().unwrap();
                let got = select(&curve, rule(target)).unwrap().threshold;
                assert_eq!(got, want(&pair[1], highest), "{name}: {key} {target}");
                checked += 1;
            }
        }
        let neg_highest = neg.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for pair in case
            .get("normal")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let f = pair[0].as_f64().unwrap();
            let got = select_normal(&mut neg, f).unwrap().threshold;
            assert_eq!(got, want(&pair[1], neg_highest), "{name}: normal {f}");
            checked += 1;
        }
        pos.clear();
    }
    assert!(checked >= 80, "only {checked} thresholds checked");
}

#[test]
fn regions_match_skimage() {
    let all = cases();
    for case in all["regions"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (h, w) = (
            case["height"].as_u64().unwrap() as usize,
            case["width"].as_u64().unwrap() as usize,
        );
        let map = f32s(&case["map"]);
        let th = case["threshold"].as_f64().unwrap() as f32;
        let min_area = case["min_area"].as_u64().unwrap();
        let (mask, got) = defect_regions(&map, w, h, th, min_area);
        let want = case["regions"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{name}: {got:?}");
        for (g, e) in got.iter().zip(want) {
            let e = (
                e["area"].as_u64().unwrap(),
                e["x"].as_u64().unwrap() as u32,
                e["y"].as_u64().unwrap() as u32,
                e["width"].as_u64().unwrap() as u32,
                e["height"].as_u64().unwrap() as u32,
                e["peak"].as_f64().unwrap() as f32,
            );
            let g2 = (
                g.area,
                g.bbox.x,
                g.bbox.y,
                g.bbox.width,
                g.bbox.height,
                g.peak,
            );
            assert_eq!(g2, e, "{name}");
        }
        // The mask holds exactly the kept regions' pixels.
        let area: u64 = got.iter().map(|r| r.area).sum();
        assert_eq!(mask.iter().filter(|&&b| b).count() as u64, area, "{name}");
    }
}
