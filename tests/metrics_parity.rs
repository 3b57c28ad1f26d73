//! Metrics against scikit-learn / scikit-image / NumPy on random and adversarial cases
//! (`scripts/make_metric_fixtures.py`): ties, all-equal scores, one label only, signed zeros,
//! empty masks, regions touching diagonally, thresholds hit exactly, tiny value ranges.
//! Tolerance 1e-9 (the counts are exact; only the f64 summation order differs).

mod common;

use serde_json::Value;
use zsad::eval::metrics::{BinaryMetrics, Curve, PixelScores, ProGrid};

const TOL: f64 = 1e-9;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(common::fixtures().join("metrics/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[track_caller]
fn check(case: &str, what: &str, got: Option<f64>, want: &Value) {
    match (got, want.as_f64()) {
        (None, None) => {}
        (Some(g), Some(w)) => assert!((g - w).abs() <= TOL, "{case} {what}: {g} vs {w}"),
        (g, _) => panic!("{case} {what}: got {g:?}, reference {want}"),
    }
}

#[test]
fn image_metrics_match_sklearn() {
    let mut n = 0;
    for c in cases().iter().filter(|c| c["kind"] == "image") {
        let name = c["name"].as_str().unwrap();
        let scores = f32s(&c["scores"]);
        let labels: Vec<u64> = c["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let mut pos: Vec<f32> = scores
            .iter()
            .zip(&labels)
            .filter(|(_, &l)| l == 1)
            .map(|(&s, _)| s)
            .collect();
        let mut neg: Vec<f32> = scores
            .iter()
            .zip(&labels)
            .filter(|(_, &l)| l == 0)
            .map(|(&s, _)| s)
            .collect();
        let m = BinaryMetrics::from(&Curve::new(&mut pos, &mut neg));
        let e = &c["expected"];
        check(name, "auroc", m.auroc, &e["auroc"]);
        check(name, "ap", m.ap, &e["ap"]);
        check(name, "f1_max", m.f1_max, &e["f1_max"]);
        n += 1;
    }
    assert!(n >= 10);
}

#[test]
fn pixel_metrics_and_aupro_match_the_references() {
    let mut n = 0;
    for c in cases().iter().filter(|c| c["kind"] == "pixel") {
        let name = c["name"].as_str().unwrap();
        for (grid, key) in [
            (ProGrid::Numpy2, "aupro"),
            (ProGrid::Numpy1, "aupro_numpy1"),
        ] {
            let mut px = PixelScores::new();
            for (map, mask) in c["maps"]
                .as_array()
                .unwrap()
                .iter()
                .zip(c["masks"].as_array().unwrap())
            {
                let rows = map.as_array().unwrap();
                let (h, w) = (rows.len(), rows[0].as_array().unwrap().len());
                let values: Vec<f32> = rows.iter().flat_map(f32s).collect();
                let bits: Vec<bool> = mask
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|r| {
                        r.as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_u64().unwrap() != 0)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                px.add(&values, &bits, h, w);
            }
            let (m, aupro, _) = px.finish_with(grid);
            let e = &c["expected"];
            check(name, "auroc", m.auroc, &e["auroc"]);
            check(name, "ap", m.ap, &e["ap"]);
            check(name, "f1_max", m.f1_max, &e["f1_max"]);
            check(name, key, aupro, &e[key]);
        }
        n += 1;
    }
    assert!(n >= 10);
}
