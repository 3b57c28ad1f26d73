#!/usr/bin/env python3
"""Writes the odd image files the bad-input tests need and Rust's `image` crate cannot encode:
tests/fixtures/images/cmyk.jpg (a 24x16 CMYK JPEG, as Photoshop and print workflows produce).

Usage: python3 scripts/make_image_fixtures.py   (needs pillow, numpy)
"""
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "images"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:16, 0:24]
    rgb = np.stack([x * 10, y * 15, (x + y) * 6], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").convert("CMYK").save(OUT / "cmyk.jpg", quality=95)
    print("wrote", OUT / "cmyk.jpg")


if __name__ == "__main__":
    main()
