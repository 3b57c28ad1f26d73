#!/usr/bin/env python3
"""Writes tests/fixtures/decision/cases.json: threshold selection against scikit-learn's curves
and defect regions against scikit-image, for src/decision (tests/decision_parity.rs).

Thresholds (flagged = score >= threshold, sklearn's convention):
  f1_max     p, r, t = precision_recall_curve(y, s); f1 = 2pr/(p+r); t[nanargmax(f1[:-1])]
  max_fpr    fpr, tpr, t = roc_curve(y, s, drop_intermediate=False);
             t[searchsorted(fpr, f, side="right") - 1]       (inf: flag nothing -> null)
  min_recall t[argmax(tpr >= r)]                             (inf -> null)
  normal     min{ v in negatives : mean(negatives >= v) <= f } (none -> null)
Regions: skimage.measure.label(map >= th, connectivity=2) and regionprops(area, bbox,
intensity_max), regions with area < min_area dropped, sorted by (-area, -peak, label).

    python3 -m venv /tmp/skv && /tmp/skv/bin/pip install numpy scikit-learn scikit-image
    /tmp/skv/bin/python scripts/make_decision_fixtures.py
"""
import json
import pathlib

import numpy as np
import sklearn
import skimage
from sklearn.metrics import precision_recall_curve, roc_curve
from skimage.measure import label, regionprops

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/decision/cases.json"
FPRS = [0.0, 0.05, 0.1, 0.3, 1.0]
RECALLS = [0.25, 0.5, 0.9, 1.0]


def thr(v):
    return None if not np.isfinite(v) else float(np.float32(v))


def threshold_case(name, scores, labels):
    s = np.asarray(scores, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    case = {"name": name, "scores": [float(v) for v in s], "labels": [int(v) for v in y]}
    if y.any():
        p, r, t = precision_recall_curve(y, s)
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = 2 * p * r / (p + r)
        case["f1_max"] = thr(t[np.nanargmax(f1[:-1])])
    if y.any() and (~y.astype(bool)).any():
        fpr, tpr, t = roc_curve(y, s, drop_intermediate=False)
        case["max_fpr"] = [[f, thr(t[np.searchsorted(fpr, f, side="right") - 1])] for f in FPRS]
        case["min_recall"] = [[r_, thr(t[np.argmax(tpr >= r_)])] for r_ in RECALLS]
    neg = s[y == 0]
    if len(neg):
        normal = []
        for f in FPRS:
            ok = [v for v in np.unique(neg) if np.mean(neg >= v) <= f]
            normal.append([f, float(min(ok)) if ok else None])
        case["normal"] = normal
    return case


def region_case(name, m, th, min_area):
    m = np.asarray(m, dtype=np.float32)
    lab = label(m >= np.float32(th), connectivity=2)
    regs = []
    for p in regionprops(lab, intensity_image=m):
        if p.area < min_area:
            continue
        r0, c0, r1, c1 = p.bbox
        regs.append({"label": int(p.label), "area": int(p.area), "x": int(c0), "y": int(r0),
                     "width": int(c1 - c0), "height": int(r1 - r0),
                     "peak": float(np.float32(p.intensity_max))})
    regs.sort(key=lambda r: (-r["area"], -r["peak"], r["label"]))
    for r in regs:
        del r["label"]
    return {"name": name, "height": int(m.shape[0]), "width": int(m.shape[1]),
            "map": [float(v) for v in m.ravel()], "threshold": float(np.float32(th)),
            "min_area": int(min_area), "regions": regs}


def main():
    rng = np.random.default_rng(20261203)
    thresholds = []
    for i in range(6):
        n = int(rng.integers(8, 60))
        y = rng.random(n) < 0.4
        s = np.clip(rng.normal(0.4, 0.2, n) + 0.3 * y, 0, 1)
        if i % 2 == 0:
            s = np.round(s, 1)  # ties
        thresholds.append(threshold_case(f"random{i}", s, y))
    thresholds.append(threshold_case("separable", [0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]))
    thresholds.append(threshold_case("inverted", [0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]))
    thresholds.append(threshold_case("all_tied", [0.5] * 5, [1, 0, 1, 0, 0]))
    thresholds.append(threshold_case("normal_only", list(np.round(rng.random(25), 2)), [0] * 25))
    regions = []
    for i in range(5):
        h, w = int(rng.integers(5, 20)), int(rng.integers(5, 20))
        m = rng.random((h, w))
        if i % 2:
            m = np.round(m, 1)
        for th, min_area in [(0.7, 1), (0.5, 3), (0.9, 1)]:
            regions.append(region_case(f"random{i}_t{th}_a{min_area}", m, th, min_area))
    ring = np.zeros((7, 7))
    ring[1:6, 1] = ring[1:6, 5] = ring[1, 1:6] = ring[5, 1:6] = 0.8
    ring[3, 3] = 0.9
    regions.append(region_case("ring_and_centre", ring, 0.5, 1))
    diag = np.eye(6)[::-1] * 0.6
    regions.append(region_case("anti_diagonal_is_one_region", diag, 0.5, 1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "generator": "scripts/make_decision_fixtures.py",
        "versions": {"numpy": np.__version__, "scikit-learn": sklearn.__version__,
                     "scikit-image": skimage.__version__},
        "thresholds": thresholds, "regions": regions}, indent=None) + "\n")
    print(f"wrote {OUT}: {len(thresholds)} threshold cases, {len(regions)} region cases")


if __name__ == "__main__":
    main()
