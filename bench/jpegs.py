"""Photo-like JPEGs of ImageNet's typical size for the loader benchmarks (smooth colour fields plus
texture, 500 x 375, quality 90), in an ImageFolder with two classes and an index file of every image."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(root: Path, n: int) -> Path:
    """``root/{train,val}/c{0,1}/NNNN.jpg`` (the same n images in both splits) and ``root/all.csv``."""
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(n):
        c = g.uniform(0, 1, (3, 3))
        field = (c[:, 0, None, None] * np.sin(xx / (20 + 40 * c[:, 1, None, None]))
                 + c[:, 2, None, None] * np.cos(yy / 35.0)) * 60 + 128
        arr = np.clip(field.transpose(1, 2, 0) + g.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
        for split in ("train", "val"):
            (root / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / split / f"c{i % 2}" / f"{i:04d}.jpg", quality=90)
    with open(root / "all.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Index"]] + [[i] for i in range(n)])
    return root
