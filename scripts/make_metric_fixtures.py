#!/usr/bin/env python3
"""Writes tests/fixtures/metrics/cases.json: inputs and reference values for the evaluation metrics.

Reference code (caoyunkang/AdaCLIP@e27ee32 tools/metrics.py, zqhang/AnomalyCLIP@45ed4dd metrics.py), re-written
here with the same semantics:
  auroc  = sklearn.metrics.roc_auc_score(labels, scores)          (pixel: all pixels of the case, .ravel())
  ap     = sklearn.metrics.average_precision_score(labels, scores)
  f1_max = AdaCLIP tools/metrics.py: p, r, _ = precision_recall_curve(labels, scores);
           f1 = 2*p*r/(p+r); max(f1[np.isfinite(f1)])
  aupro  = AnomalyCLIP metrics.py cal_pro_score(masks, maps, max_step=200, expect_fpr=0.3), maps a float32
           array [N,H,W], masks a float32 0/1 array [N,H,W] (what AnomalyCLIP's test.py passes).

A metric is null when the reference raises, returns a non-finite value, or sklearn warns while computing
it (one-class labels: roc_auc_score raises in sklearn 1.2 and warns + returns nan in 1.9;
average_precision_score / precision_recall_curve warn "No positive class found" and return 0 / -0.0).
The AdaCLIP "one class -> 0" rule is NOT applied here. The raw value is quoted in the case's note.

cal_pro_score's threshold grid depends on the numpy version (both give a float64 array, not float32):
  numpy >= 2 (NEP 50): delta = f32(f32(max-min)/200); n = ceil(f32(f32(max-min)/delta));
                       th[0] = f64(min); th[1] = f64(f32(min+delta)); th[i] = th[0] + f64(i)*(th[1]-th[0])
                       (f64 arithmetic, i >= 2); `maps > th` compares in f64.
  numpy 1.x          : delta = f64(f32(max-min))/200 (f64); n = ceil(f64(f32(max-min))/delta);
                       th[0] = f64(min); th[1] = f64(min) + delta; th[i] as above (f64);
                       `maps > th` rounds th to f32 and compares in f32 (value-based casting).
expected.aupro is the numpy >= 2 value (the environment that runs this script must have numpy >= 2;
it is checked); expected.aupro_numpy1 is the numpy 1.x value (AnomalyCLIP's pinned environment:
numpy 1.24, scikit-learn 1.2.2, scikit-image 0.20.0), computed by emulating that grid and comparison.
Both emulations are checked bit for bit against the running numpy's np.arange / comparison, and
`--verify` re-runs the whole reference (native np.arange included) in whatever environment runs it
and compares with the stored values (run it under a numpy-1.x environment to check aupro_numpy1).

All score/map values are float32 and written as float(np.float32(x)) (exact round trip).
Deterministic: every case draws from its own np.random.default_rng(seed).

Usage: python scripts/make_metric_fixtures.py            # writes the fixture (needs numpy >= 2)
       python scripts/make_metric_fixtures.py --verify   # recompute with this environment, compare
(needs numpy, scipy, scikit-learn, scikit-image)
"""
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import sklearn
import skimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "metrics" / "cases.json"
NP2 = int(np.__version__.split(".")[0]) >= 2
MAX_STEP = 200
EXPECT_FPR = 0.3


# ----------------------------------------------------------------------------------------------
# reference metrics
# ----------------------------------------------------------------------------------------------

def _guard(fn, warning_nulls=True):
    """(value or None, reason) -- None when fn raises, returns a non-finite value, or (warning_nulls) warns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            v = fn()
        except Exception as e:  # noqa: BLE001 - the reference raising is a legitimate outcome
            return None, f"raises {type(e).__name__}: {e}"
    msgs = "; ".join(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    v = float(v)
    if caught and warning_nulls:
        return None, f"warns ({msgs}) and returns {v!r}"
    if not math.isfinite(v):
        return None, f"returns {v!r}" + (f" (warnings: {msgs})" if caught else "")
    return v, None


def f1_max_ref(labels, scores):
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 at (p, r) = (0, 0) is part of the reference
        f1 = (2 * p * r) / (p + r)
    return np.max(f1[np.isfinite(f1)])


def classification_metrics(labels, scores):
    out, why = {}, {}
    for key, fn in (("auroc", lambda: roc_auc_score(labels, scores)),
                    ("ap", lambda: average_precision_score(labels, scores)),
                    ("f1_max", lambda: f1_max_ref(labels, scores))):
        out[key], reason = _guard(fn)
        if reason:
            why[key] = reason
    return out, why


def _regions(masks):
    """Per image, the pixel coordinates of each skimage-labelled region (full 8-connectivity)."""
    return [[(r.coords[:, 0], r.coords[:, 1], r.area) for r in measure.regionprops(measure.label(m))]
            for m in masks]


def _pro_from_thresholds(masks, amaps, ths, binarize):
    """cal_pro_score's loop body and tail, for a given threshold sequence and comparison rule."""
    regions = _regions(masks)
    inverse_masks = 1 - masks
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    pros, fprs = [], []
    for th in ths:
        binary_amaps[...] = binarize(amaps, th)
        pro = []
        for binary_amap, regs in zip(binary_amaps, regions):
            for rr, cc, area in regs:
                pro.append(binary_amap[rr, cc].sum() / area)
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fpr = fp_pixels / inverse_masks.sum()
        pros.append(np.array(pro).mean())
        fprs.append(fpr)
    pros, fprs = np.array(pros), np.array(fprs)
    idxes = fprs < EXPECT_FPR
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[idxes])


def cal_pro_score_native(masks, amaps, max_step=MAX_STEP):
    """AnomalyCLIP's cal_pro_score as written: np.arange over numpy scalars, `amaps > th` comparisons."""
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    ths = np.arange(min_th, max_th, delta)
    return _pro_from_thresholds(masks, amaps, ths, lambda a, th: a > th)


def grid_numpy2(mn, mx):
    """np.arange(min, max, (max-min)/200) under numpy >= 2, min/max np.float32 scalars (f64 result)."""
    mn, mx = np.float32(mn), np.float32(mx)
    rng = np.float32(mx - mn)
    delta = np.float32(rng / np.float32(MAX_STEP))
    with np.errstate(all="ignore"):
        q = float(np.float32(rng / delta))
    if math.isnan(q):
        raise ValueError("arange: cannot compute length")
    n = max(0, math.ceil(q))
    th = np.empty(n, np.float64)
    if n > 0:
        th[0] = float(mn)
    if n > 1:
        th[1] = float(np.float32(mn + delta))
    step = th[1] - th[0] if n > 2 else 0.0
    for i in range(2, n):
        th[i] = th[0] + float(i) * step
    return th


def grid_numpy1(mn, mx):
    """The same np.arange call under numpy 1.x: f32/int promotes to f64, so delta is a double."""
    mn, mx = np.float32(mn), np.float32(mx)
    rng = float(np.float32(mx - mn))
    delta = rng / float(MAX_STEP)
    if delta == 0.0:
        raise ValueError("arange: cannot compute length")
    n = max(0, math.ceil(rng / delta))
    th = np.empty(n, np.float64)
    if n > 0:
        th[0] = float(mn)
    if n > 1:
        th[1] = float(mn) + delta
    step = th[1] - th[0] if n > 2 else 0.0
    for i in range(2, n):
        th[i] = th[0] + float(i) * step
    return th


def grid_brief_f32(mn, mx):
    """The all-float32 formula proposed in the task brief (checked, does NOT match numpy)."""
    mn, mx = np.float32(mn), np.float32(mx)
    delta = np.float32((mx - mn) / np.float32(MAX_STEP))
    with np.errstate(all="ignore"):
        q = float(np.float32(np.float32(mx - mn) / delta))
    if math.isnan(q):
        raise ValueError("delta == 0")
    n = math.ceil(q)
    a1 = np.float32(mn + delta)
    step = np.float32(a1 - mn)
    th = [mn, a1] + [np.float32(mn + np.float32(np.float32(i) * step)) for i in range(2, n)]
    return np.array(th[:n], np.float32)


def aupro_emulated(masks, amaps, numpy1):
    grid = grid_numpy1 if numpy1 else grid_numpy2
    ths = grid(amaps.min(), amaps.max())
    if numpy1:  # th rounded to f32, compared in f32
        binarize = lambda a, th: a > np.float32(th)  # noqa: E731
    else:  # compared in f64
        binarize = lambda a, th: a.astype(np.float64) > th  # noqa: E731
    return _pro_from_thresholds(masks, amaps, ths, binarize)


def check_grid(amaps):
    """Bit-compare the running numpy's np.arange with the emulations; returns a report dict."""
    mn, mx = amaps.min(), amaps.max()
    delta = (mx - mn) / MAX_STEP
    rep = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            native = np.arange(mn, mx, delta)
        except Exception as e:  # noqa: BLE001
            native = e
    mine = grid_numpy2 if NP2 else grid_numpy1
    try:
        emu = mine(mn, mx)
    except ValueError as e:
        emu = e
    if isinstance(native, Exception) or isinstance(emu, Exception):
        rep["native_vs_emulation"] = (isinstance(native, Exception) and isinstance(emu, Exception))
        rep["n"] = None
        rep["brief_formula"] = "n/a (delta == 0)"
        return rep
    rep["native_dtype"] = str(native.dtype)
    rep["n"] = len(native)
    rep["native_vs_emulation"] = bool(native.dtype == np.float64 and len(native) == len(emu)
                                      and np.array_equal(native.view(np.uint64), emu.view(np.uint64)))
    brief = grid_brief_f32(mn, mx)
    if len(brief) != len(native):
        rep["brief_formula"] = f"length differs ({len(brief)} vs {len(native)})"
    else:
        diff = int(np.sum(brief.astype(np.float64) != native))
        rep["brief_formula"] = "equal as values" if diff == 0 else f"{diff}/{len(native)} values differ"
        rep["native_not_f32_representable"] = int(np.sum(native.astype(np.float32).astype(np.float64) != native))
    g1 = grid_numpy1(mn, mx)
    rep["numpy1_grid_equals_numpy2_grid"] = bool(len(g1) == len(native) and np.array_equal(g1, native)) if NP2 else None
    return rep


def pixel_expected(maps, masks):
    labels = masks.ravel().astype(np.int64)
    scores = maps.ravel()
    out, why = classification_metrics(labels, scores)
    masks_f = masks.astype(np.float32)  # AnomalyCLIP passes float32 0/1 masks
    out["aupro"], reason = _guard(lambda: cal_pro_score_native(masks_f, maps), False)
    if reason:
        why["aupro"] = reason
    # the emulation of this numpy's semantics must agree exactly with the native run
    this_emu, _ = _guard(lambda: aupro_emulated(masks_f, maps, numpy1=not NP2), False)
    assert this_emu == out["aupro"], (this_emu, out["aupro"])
    # int masks give the same as float masks
    int_masks, _ = _guard(lambda: cal_pro_score_native(masks.astype(np.int64), maps), False)
    assert int_masks == out["aupro"], (int_masks, out["aupro"])
    other, reason = _guard(lambda: aupro_emulated(masks_f, maps, numpy1=NP2), False)
    key_other = "aupro_numpy1" if NP2 else "aupro_numpy2"
    out[key_other] = other
    if reason:
        why[key_other] = reason
    return out, why


# ----------------------------------------------------------------------------------------------
# case generation
# ----------------------------------------------------------------------------------------------

def f32list(a):
    a = np.asarray(a, dtype=np.float32)
    return [float(x) for x in a.ravel()] if a.ndim == 1 else [f32list(x) for x in a]


def intlist(a):
    a = np.asarray(a)
    return [int(x) for x in a.ravel()] if a.ndim == 1 else [intlist(x) for x in a]


def image_cases():
    cases = []

    def add(name, scores, labels, note):
        scores = np.asarray(scores, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        assert scores.shape == labels.shape and scores.ndim == 1
        cases.append(dict(name=name, kind="image", scores=scores, labels=labels, note=note))

    rng = np.random.default_rng(101)
    y = (rng.random(200) < 0.3).astype(np.int64)
    s = (rng.random(200) + 0.35 * y).astype(np.float32)
    add("img_random_continuous", s, y, "n=200, ~30% positives, continuous f32 scores, moderately separated")

    rng = np.random.default_rng(102)
    y = (rng.random(150) < 0.3).astype(np.int64)
    s = np.round(np.clip(rng.normal(0.45 + 0.2 * y, 0.2), 0, 1), 1).astype(np.float32)
    add("img_ties_1decimal", s, y, "scores rounded to 1 decimal: heavy ties within and across classes")

    rng = np.random.default_rng(103)
    y = (rng.random(80) < 0.3).astype(np.int64)
    add("img_all_equal", np.full(80, 0.5, np.float32), y,
        "all scores equal: one ROC/PR step; auroc 0.5, ap = prevalence, f1 = 2p/(1+p)")

    rng = np.random.default_rng(104)
    y = np.zeros(100, np.int64)
    y[37] = 1
    add("img_one_positive", rng.random(100).astype(np.float32), y, "a single positive among 100")

    rng = np.random.default_rng(105)
    y = np.ones(100, np.int64)
    y[62] = 0
    add("img_one_negative", rng.random(100).astype(np.float32), y, "a single negative among 100")

    rng = np.random.default_rng(106)
    y = (rng.random(120) < 0.3).astype(np.int64)
    s = np.where(y == 1, 0.6 + 0.4 * rng.random(120), 0.5 * rng.random(120)).astype(np.float32)
    add("img_perfect", s, y, "perfect separation: auroc = ap = f1_max = 1")

    add("img_inverted", (1.0 - s).astype(np.float32), y, "perfectly inverted scores: auroc 0")

    rng = np.random.default_rng(108)
    add("img_only_positives", rng.random(60).astype(np.float32), np.ones(60, np.int64),
        "one class (all positive): auroc undefined -> null; ap/f1 = 1 without warnings")

    rng = np.random.default_rng(109)
    add("img_only_negatives", rng.random(60).astype(np.float32), np.zeros(60, np.int64),
        "one class (all negative): auroc undefined; sklearn warns 'No positive class' for ap/PR curve -> null")

    rng = np.random.default_rng(110)
    n = 300
    y = (rng.random(n) < 0.3).astype(np.int64)
    levels = np.array([0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95], np.float32)
    pneg = np.array([0.25, 0.25, 0.2, 0.15, 0.1, 0.04, 0.01])
    ppos = np.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.15, 0.15])
    s = np.where(y == 1, rng.choice(levels, n, p=ppos), rng.choice(levels, n, p=pneg)).astype(np.float32)
    add("img_cross_class_duplicates", s, y,
        "7 distinct values shared by both classes, incl. ties at the top score (tied groups straddle classes)")

    add("img_tiny_n2", [0.8, 0.2], [0, 1], "n=2, inverted: auroc 0, ap 0.5")
    add("img_tiny_n3", [0.5, 0.5, 0.9], [1, 0, 1], "n=3 with a cross-class tie at 0.5")

    rng = np.random.default_rng(113)
    n = 90
    y = (rng.random(n) < 0.35).astype(np.int64)
    base = np.array([-3.5e3, -1.0, -1e-30, -0.0, 0.0, 1e-40, 1e-30, 1e-7, 0.25, 7.0, 1e30, 3.0e38], np.float32)
    s = rng.choice(base, n).astype(np.float32)
    s[np.flatnonzero(y)[:3]] = np.float32(-0.0)
    s[np.flatnonzero(y == 0)[:3]] = np.float32(0.0)
    add("img_signed_zero_wide_range", s, y,
        "values over a huge range incl. negatives, a subnormal, and both -0.0 and 0.0 (equal: one tied group)")
    return cases


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def blob_masks(rng, n, h, w, k_range=(1, 3), empty=()):
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        if i in empty:
            continue
        for _ in range(rng.integers(k_range[0], k_range[1] + 1)):
            if rng.random() < 0.5:
                rh, rw = rng.integers(2, max(3, h // 3)), rng.integers(2, max(3, w // 3))
                y0, x0 = rng.integers(0, h - rh + 1), rng.integers(0, w - rw + 1)
                masks[i, y0:y0 + rh, x0:x0 + rw] = 1
            else:
                r = rng.integers(1, max(2, min(h, w) // 5))
                masks[i] |= _disc(h, w, rng.integers(0, h), rng.integers(0, w), r).astype(np.uint8)
    return masks


def smooth_noise(rng, shape, sigma):
    x = rng.random(shape)
    return np.stack([ndi.gaussian_filter(xi, sigma) for xi in x])


def detector_maps(rng, masks, strength, sigma=1.5, noise=1.0):
    m = noise * smooth_noise(rng, masks.shape, sigma) + strength * np.stack(
        [ndi.gaussian_filter(mi.astype(np.float64), 1.0) for mi in masks])
    return m.astype(np.float32)


def pixel_cases():
    cases = []

    def add(name, maps, masks, note):
        maps = np.asarray(maps, dtype=np.float32)
        masks = np.asarray(masks).astype(np.uint8)
        assert maps.shape == masks.shape and maps.ndim == 3 and set(np.unique(masks)) <= {0, 1}
        cases.append(dict(name=name, kind="pixel", maps=maps, masks=masks, note=note))

    rng = np.random.default_rng(201)
    masks = blob_masks(rng, 4, 24, 24, (1, 3))
    masks[2] = masks[1]  # the same blob in consecutive images: separate regions (label is per image)
    add("px_random_blobs", detector_maps(rng, masks, 0.4), masks,
        "rectangles/discs; images 1 and 2 share the same mask (regions are labelled per image, not in 3-D)")

    rng = np.random.default_rng(202)
    masks = blob_masks(rng, 3, 20, 28, (1, 3))
    m = detector_maps(rng, masks, 0.5)
    m = (m - m.min()) / (m.max() - m.min())
    add("px_quantized16", (np.round(m * 15) / 15).astype(np.float32), masks,
        "maps quantized to 16 levels k/15: ties, and grid thresholds that land on / near level values")

    rng = np.random.default_rng(203)
    masks = blob_masks(rng, 5, 12, 40, (1, 2), empty=(0, 3))
    add("px_some_empty_masks", detector_maps(rng, masks, 0.3), masks,
        "5 images of 12x40 (non-square, row-major), images 0 and 3 have empty masks (count in FPR only)")

    rng = np.random.default_rng(204)
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 2:5, 2:5] = 1     # 3x3 square ...
    masks[0, 5:11, 5:11] = 1   # ... touching a 6x6 square only at a corner: ONE 8-connected region
    masks[1, 9:12, 3:6] = 1
    masks[1, 12:14, 6:8] = 1   # again corner-touching
    maps = 0.3 * rng.random((2, 16, 16))
    maps[0, 2:5, 2:5] += 0.7   # detector fires on the small square only
    maps[1, 12:14, 6:8] += 0.6
    add("px_diagonal_touch", maps.astype(np.float32), masks,
        "squares touching only diagonally at a corner = one region under 8-connectivity (two under 4-conn)")

    rng = np.random.default_rng(205)
    masks = np.zeros((3, 18, 18), np.uint8)
    for i in range(3):
        ys, xs = np.mgrid[1:18:3, 1:18:3]
        keep = rng.random(ys.shape) < 0.6
        masks[i, ys[keep], xs[keep]] = 1
    masks[0, 2, 2] = 1  # diagonal neighbour of (1,1): merges with it if (1,1) is set
    maps = (0.6 * rng.random(masks.shape) + 0.5 * masks * rng.random(masks.shape)).astype(np.float32)
    add("px_single_pixel_regions", maps, masks, "many isolated 1-pixel regions (plus one diagonal pair)")

    rng = np.random.default_rng(206)
    masks = blob_masks(rng, 3, 24, 24, (2, 3))
    add("px_good_detector", detector_maps(rng, masks, 1.5, noise=0.5), masks,
        "map clearly higher inside the regions: high auroc/aupro")

    rng = np.random.default_rng(207)
    masks = blob_masks(rng, 3, 24, 24, (1, 3))
    add("px_random_detector", rng.random(masks.shape).astype(np.float32), masks,
        "map independent of the masks (i.i.d. uniform): everything near chance")

    rng = np.random.default_rng(208)
    add("px_all_masks_empty", rng.random((3, 10, 14)).astype(np.float32), np.zeros((3, 10, 14), np.uint8),
        "no anomalous pixel at all: auroc undefined, ap/f1 warn, aupro has no regions (mean of [] -> nan)")

    rng = np.random.default_rng(209)
    masks = blob_masks(rng, 2, 16, 16, (1, 2))
    add("px_all_equal_map", np.full(masks.shape, 0.25, np.float32), masks,
        "constant map: auroc 0.5, ap = prevalence; aupro null (delta = 0, np.arange raises)")

    rng = np.random.default_rng(210)
    masks = blob_masks(rng, 3, 16, 20, (1, 2))
    m = rng.random(masks.shape) * 2e-6 + 0.5 - 1e-6 + 8e-7 * masks
    add("px_tiny_range", m.astype(np.float32), masks,
        "values in 0.5 +- 1e-6 (~34 f32 ulps), delta < ulp/2: numpy 2 (f32 delta) gives 200 thresholds all == min, "
        "FPR ~1 everywhere, nothing kept < 0.3 -> raises -> aupro null; numpy 1 (f64 delta) gives a real grid and a value")

    rng = np.random.default_rng(211)
    masks = blob_masks(rng, 4, 64, 64, (1, 3))
    add("px_large_64", detector_maps(rng, masks, 0.35, sigma=2.0), masks,
        "4 x 64x64 smooth maps: ~200 thresholds all matter")

    rng = np.random.default_rng(212)
    masks = np.ones((2, 8, 12), np.uint8)
    add("px_all_anomalous", rng.random(masks.shape).astype(np.float32), masks,
        "every pixel anomalous: auroc undefined; aupro null (|not G| = 0 -> FPR nan -> no kept point)")

    rng = np.random.default_rng(213)
    masks = blob_masks(rng, 3, 16, 16, (1, 2))
    m = np.where(masks == 1, 0.5 + 0.5 * rng.random(masks.shape), 0.1).astype(np.float32)
    add("px_zero_fpr_constant_background", m, masks,
        "background constant at the map minimum: FPR = 0 at every threshold -> min-max rescale 0/0 -> aupro null; "
        "also the numpy-2 grid has n = ceil(f32(range/delta)) = 201 thresholds (numpy 1: 200)")

    # Pixels placed exactly on the f32-rounded thresholds of the numpy-2 grid where those thresholds are
    # not f32-representable: `maps > th` in f64 (numpy 2) and in f32 (numpy 1) disagree on them.
    rng = np.random.default_rng(214)
    masks = blob_masks(rng, 2, 16, 16, (1, 2))
    m = (0.05 + rng.random(masks.shape) * 0.85 + 0.1 * masks).astype(np.float32)
    m[0, 0, 0] = np.float32(3e-6)  # the minimum: makes the grid's th[i] need more than 24 bits
    m[1, 15, 15] = np.float32(1.0)
    ths = grid_numpy2(m.min(), m.max())
    rounded = ths.astype(np.float32)
    off = np.flatnonzero(rounded.astype(np.float64) > ths)  # rounded up: f32 compare says "not above"
    pos = rng.choice(m.size, size=min(40, len(off)), replace=False)
    flat = m.reshape(-1)
    for p, k in zip(pos, rng.choice(off, size=len(pos), replace=False)):
        if flat[p] not in (np.float32(3e-6), np.float32(1.0)):
            flat[p] = rounded[k]
    add("px_threshold_hits", m, masks,
        "pixels equal to f32-rounded (upwards) grid thresholds that are not f32 values: `map > th` in f64 "
        "(numpy 2, aupro) and in f32 (numpy 1, aupro_numpy1) disagree on them, so the two values differ")
    return cases


# ----------------------------------------------------------------------------------------------

def compute(case):
    if case["kind"] == "image":
        exp, why = classification_metrics(case["labels"], case["scores"])
        grid = None
    else:
        exp, why = pixel_expected(case["maps"], case["masks"])
        grid = check_grid(case["maps"])
    return exp, why, grid


def to_json(case, exp, why):
    d = {"name": case["name"], "kind": case["kind"]}
    if case["kind"] == "image":
        d["scores"] = f32list(case["scores"])
        d["labels"] = intlist(case["labels"])
    else:
        d["maps"] = f32list(case["maps"])
        d["masks"] = intlist(case["masks"])
    d["expected"] = exp
    note = case["note"]
    if why:
        note += " | null because: " + "; ".join(f"{k} {v}" for k, v in why.items())
    d["note"] = note
    return d


def main_write():
    assert NP2, "write mode needs numpy >= 2 (expected.aupro is the numpy >= 2 value); use --verify otherwise"
    np.seterr(all="ignore")
    out = []
    print(f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, scikit-image {skimage.__version__}")
    for case in image_cases() + pixel_cases():
        exp, why, grid = compute(case)
        # round-trip check of the inputs
        arr = case["scores"] if case["kind"] == "image" else case["maps"]
        assert np.array_equal(np.array(f32list(arr), np.float64).astype(np.float32).view(np.uint32),
                              arr.view(np.uint32))
        out.append(to_json(case, exp, why))
        print(f"{case['name']:34s} {json.dumps(exp)}")
        if grid is not None:
            print(f"{'':34s} grid: {grid}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = "[\n" + ",\n".join(json.dumps(c, separators=(",", ":"), allow_nan=False) for c in out) + "\n]\n"
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text)} bytes, {len(out)} cases)")


def main_verify():
    """Recompute every case from the stored inputs with this environment and compare."""
    np.seterr(all="ignore")
    print(f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, scikit-image {skimage.__version__}")
    cases = json.loads(OUT.read_text())
    bad = 0
    for c in cases:
        if c["kind"] == "image":
            case = dict(kind="image", scores=np.array(c["scores"], np.float32), labels=np.array(c["labels"]))
        else:
            case = dict(kind="pixel", maps=np.array(c["maps"], np.float32), masks=np.array(c["masks"], np.uint8))
        exp, why, grid = compute(case)
        stored = dict(c["expected"])
        if not NP2 and "aupro_numpy1" in stored:  # native aupro here is the numpy-1 value
            stored["aupro"], stored["aupro_numpy2"] = stored.pop("aupro_numpy1"), stored["aupro"]
        for k, v in exp.items():
            s = stored.get(k)
            ok = (v is None and s is None) or (v is not None and s is not None and abs(v - s) <= 1e-12)
            if not ok:
                bad += 1
            flag = "" if ok else "   <-- MISMATCH"
            print(f"{c['name']:34s} {k:13s} here={v!r} stored={s!r}{flag}"
                  + (f"  [{why[k]}]" if k in why else ""))
        if grid is not None:
            print(f"{'':34s} grid: {grid}")
    print("mismatches:", bad)
    return bad


if __name__ == "__main__":
    if "--verify" in sys.argv[1:]:
        sys.exit(1 if main_verify() else 0)
    main_write()
