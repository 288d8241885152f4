"""Write the embedded digits as a JPEG ImageFolder, to try the ImageNet path without ImageNet:
`python -m dataloading.export_digits OUT [--size 32]`.

OUT/train/<class>/<nnnn>.jpg and OUT/val/<class>/<nnnn>.jpg (the digits' fixed held-out split as val),
RGB, quality 90, upscaled (bicubic) from 8x8 to --size px, plus index files in the community format:
OUT/train_1p_index.csv and OUT/train_10p_index.csv (column `Index`: positions into the train images sorted
by class folder then file name, as ImageFolder lists them), chosen per class with seed 0.
configs/digits_folder.toml trains every stage on it through the image-folder loaders.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dataloading.splits import per_class_split
from engine.config.sections import DataConfig
from engine.errors import EXIT_USAGE

PERCENTS = (1, 10)


def export(out: Path, size: int = 32, quality: int = 90) -> dict:
    """Write the folder; {"train": n, "val": n, "index": {percent: n}}."""
    from dataloading import digits  # lazy: start-up cost (torch), so --help and a bad OUT answer at once

    raw, targets = digits._load()  # (1797, 8, 8) in [0, 1]
    split = digits.split_indices(DataConfig(source="digits", labels_per_class=1, mean=[0.5], std=[0.5]))
    counts = {}
    for name, ids in (("train", split.train), ("val", split.test)):
        for i in ids:  # file name = position in load_digits(): sorted within a class as the ids are
            folder = out / name / str(int(targets[i]))
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray(np.round(raw[i] * 255).astype(np.uint8), mode="L")
            grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(
                folder / f"{int(i):04d}.jpg", quality=quality)
        counts[name] = len(ids)
    # ImageFolder order of train: class folders '0'..'9', then file names (= increasing digit id)
    train_targets = targets[split.train][np.argsort(targets[split.train], kind="stable")]
    counts["index"] = {}
    for pct in PERCENTS:
        chosen = per_class_split(train_targets, 10, labels_per_class=0, label_fraction=pct / 100, split_seed=0)
        with open(out / f"train_{pct}p_index.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Index"])
            w.writerows([int(v)] for v in chosen)
        counts["index"][pct] = len(chosen)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dataloading.export_digits", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to write (train/, val/, train_<p>p_index.csv)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    args = ap.parse_args(argv)
    out = Path(args.out).expanduser()
    if (out / "train").exists():
        print(f"error: {out / 'train'} already exists: choose an empty folder", file=sys.stderr)
        return EXIT_USAGE
    c = export(out, size=args.size)
    print(f"wrote {c['train']} train and {c['val']} val JPEGs under {out}, index files "
          + ", ".join(f"train_{p}p_index.csv ({n} labels)" for p, n in c["index"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
