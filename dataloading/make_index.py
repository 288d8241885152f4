"""Write a label-split index file (column `Index`: positions into the sorted train images):

    python -m dataloading.make_index ROOT --names 1percent.txt --out ROOT/train_1p_index.csv
    python -m dataloading.make_index ROOT --fraction 0.01 [--seed 0] --out ROOT/my_1p_index.csv
    python -m dataloading.make_index ROOT --per-class 2 --out ROOT/two_per_class_index.csv

--names converts a list of file names, one per line (e.g. SimCLR's published ImageNet subsets,
imagenet_subsets/1percent.txt and 10percent.txt in google-research/simclr), into positions in
ImageFolder order of ROOT/train. --fraction and
--per-class draw a per-class split from --seed alone (the engine's own generated split for that seed).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

from dataloading.splits import per_class_split
from dataloading.textfile import read_text
from engine.errors import EXIT_USAGE, UserError


def positions_of_names(paths: np.ndarray, names: list[str], source: str) -> np.ndarray:
    """Sorted positions of the files whose base name is in `names`; UserError naming any not found."""
    where: dict[str, list[int]] = {}  # ImageNet's names are unique; elsewhere a name may recur per class
    for i, p in enumerate(paths):
        where.setdefault(os.path.basename(p.decode()), []).append(i)
    missing = [n for n in names if n not in where]
    if missing:
        raise UserError(f"{source}: {len(missing)} name(s) not among the train images, e.g. {missing[:3]}; is it "
                        f"the list for this data set and train folder?")
    return np.unique(np.asarray([i for n in names for i in where[n]], dtype=np.int64))


def write_index(path: Path, positions: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index"])
        w.writerows([int(v)] for v in positions)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dataloading.make_index", description=__doc__.splitlines()[0])
    ap.add_argument("root", help="data set folder holding train/ (data.root)")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--names", help="text file: one train file name per line (e.g. SimCLR's 1percent.txt)")
    how.add_argument("--fraction", type=float, help="label this fraction of every class (at least 1 image)")
    how.add_argument("--per-class", type=int, help="label exactly this many images of every class")
    ap.add_argument("--seed", type=int, default=0, help="split seed for --fraction / --per-class (data.split_seed)")
    ap.add_argument("--train-dir", default="train")
    ap.add_argument("--out", required=True, help="CSV to write, e.g. ROOT/train_1p_index.csv")
    args = ap.parse_args(argv)
    from dataloading.imagefolder import scan  # lazy: start-up cost (torch), so --help answers at once

    try:
        train = scan(Path(args.root).expanduser() / args.train_dir, "train")
        if args.names:
            names = [line.strip().split()[0] for line in read_text(args.names, "--names").splitlines() if line.strip()]
            chosen = positions_of_names(train.paths, names, args.names)
        else:
            if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
                raise UserError(f"--fraction must be in (0, 1], got {args.fraction}")
            if args.per_class is not None and args.per_class < 1:
                raise UserError(f"--per-class must be >= 1, got {args.per_class}")
            chosen = per_class_split(train.targets, len(train.classes), labels_per_class=args.per_class or 0,
                                     label_fraction=args.fraction or 1.0, split_seed=args.seed,
                                     class_names=train.classes)
    except (UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    write_index(Path(args.out).expanduser(), chosen)
    print(f"wrote {len(chosen)} positions of {len(train)} train images to {args.out} (data.labelled_index)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
