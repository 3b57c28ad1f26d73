"""Shared fixtures: the CLI binary the Python results are compared with, deterministic images
written as files, a small synthetic MVTec-AD-style dataset, and one tiny detector."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import zsad

REPO = Path(__file__).resolve().parents[2]


def zsad_bin() -> Path:
    """The `zsad` binary built by cargo: $ZSAD_BIN, else ../target/release/zsad."""
    return Path(os.environ.get("ZSAD_BIN", REPO / "target" / "release" / "zsad"))


@pytest.fixture(scope="session")
def cli():
    """Runs the zsad CLI; the tests that compare with it fail when it is missing in CI
    (ZSAD_REQUIRE_CLI=1, set by .ci/run) and skip, saying so, elsewhere."""
    exe = zsad_bin()
    if not exe.is_file():
        if os.environ.get("ZSAD_REQUIRE_CLI"):
            pytest.fail(f"the zsad binary is not at {exe} (cargo build --release, or set ZSAD_BIN)")
        pytest.skip(f"SKIP: no zsad binary at {exe} (cargo build --release, or set ZSAD_BIN)")

    def run(*args, check=True):
        p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                           timeout=600)
        if check and p.returncode != 0:
            raise AssertionError(f"zsad {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr}")
        return p

    return run


def records(folder: Path):
    """The records of a detect run's folder."""
    with open(folder / "scores.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A deterministic uint8 RGB image with structure (gradients, a bright blob, noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)),
                    ((x + y) * 3) % 256], axis=-1).astype(np.float64)
    img += rng.normal(0, 12, size=img.shape)
    cy, cx = h // 3, w // 2
    img[(y - cy) ** 2 + (x - cx) ** 2 < (min(h, w) // 6) ** 2] = 250
    return img.clip(0, 255).astype(np.uint8)


def save_png(path: Path, a: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(a).save(path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Three PNG files of different sizes (not squares, so resizing is exercised)."""
    d = tmp_path_factory.mktemp("images")
    out = []
    for i, (h, w) in enumerate([(61, 83), (48, 48), (97, 40)]):
        out.append(save_png(d / f"img{i}.png", rgb(h, w, seed=i)))
    return out


@pytest.fixture(scope="session")
def detector():
    return zsad.Detector("random:tiny", quiet=True)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """An MVTec-AD-style class folder: widget/test/{good,crack}/NNN.png with
    widget/ground_truth/crack/NNN_mask.png (a bright square where the mask is)."""
    root = tmp_path_factory.mktemp("mvtec") / "widget"
    for kind in ("good", "crack"):
        (root / "test" / kind).mkdir(parents=True)
    (root / "ground_truth" / "crack").mkdir(parents=True)
    for i in range(4):
        a = rgb(64, 64, seed=100 + i)
        save_png(root / "test" / "good" / f"{i:03d}.png", a)
        b = rgb(64, 64, seed=200 + i)
        m = np.zeros((64, 64), np.uint8)
        y0, x0 = 8 + 9 * i, 30 - 5 * i
        m[y0:y0 + 14, x0:x0 + 14] = 255
        b[m > 0] = [255, 40, 40]
        save_png(root / "test" / "crack" / f"{i:03d}.png", b)
        save_png(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", m)
    return root
