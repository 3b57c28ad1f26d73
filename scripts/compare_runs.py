#!/usr/bin/env python3
"""Compare two `zsad detect --maps npy` output folders (e.g. --precision f32 vs bf16, or two
--batch-size values): the largest map and score differences and how well the score order agrees.

    python scripts/compare_runs.py out_f32 out_bf16      # prints one JSON object

Needs numpy and scipy. Failed inputs (records with `error`) are left out.
"""
import json
import sys

import numpy as np
from scipy.stats import kendalltau, spearmanr


def records(folder):
    with open(folder + "/scores.jsonl") as f:
        recs = (json.loads(line) for line in f if line.strip())
        return {r["path"]: r for r in recs if "error" not in r}


def main():
    a, b = sys.argv[1], sys.argv[2]
    ra, rb = records(a), records(b)
    keys = sorted(set(ra) & set(rb))
    sa = np.array([ra[k]["score"] for k in keys])
    sb = np.array([rb[k]["score"] for k in keys])
    map_diff, rel_diff = 0.0, 0.0
    for k in keys:
        ma, mb = np.load(a + "/" + ra[k]["map"]), np.load(b + "/" + rb[k]["map"])
        d = float(np.abs(ma - mb).max())
        map_diff = max(map_diff, d)
        rel_diff = max(rel_diff, d / (float(ma.max() - ma.min()) or 1.0))
    print(json.dumps({
        "images": len(keys),
        "max_map_abs_diff": map_diff,
        "max_map_diff_over_map_range": rel_diff,
        "max_score_abs_diff": float(np.abs(sa - sb).max()),
        "score_range": float(sa.max() - sa.min()),
        "spearman": float(spearmanr(sa, sb)[0]),
        "kendall": float(kendalltau(sa, sb)[0]),
        "same_order": bool((np.argsort(sa) == np.argsort(sb)).all()),
    }))


if __name__ == "__main__":
    main()
