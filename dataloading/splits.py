"""Label splits: the community index CSVs (column `Index`, positions into the sorted train samples), or a
per-class split generated from `split_seed` alone (never the rank or the run seed, unlike the original)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataloading.textfile import read_text
from engine.errors import UserError


@dataclass
class Split:
    labelled: np.ndarray  # sorted positions into the train samples (int64)
    unlabelled: np.ndarray  # sorted positions; disjoint from labelled unless an index file says otherwise

    @property
    def pretrain(self) -> np.ndarray:
        return np.union1d(self.labelled, self.unlabelled)


def per_class_split(targets: np.ndarray, num_classes: int, *, labels_per_class: int, label_fraction: float,
                    split_seed: int, class_names: list[str] | None = None) -> np.ndarray:
    """Sorted positions of the labelled samples: `labels_per_class` of every class when > 0, else
    round(label_fraction * class size) (at least 1). Class c's choice depends only on (split_seed, c)."""
    targets = np.asarray(targets)
    order = np.argsort(targets, kind="stable")  # positions grouped by class, ascending within a class
    bounds = np.concatenate(([0], np.cumsum(np.bincount(targets, minlength=num_classes))))
    chosen = []
    for c in range(num_classes):
        members = order[bounds[c]:bounds[c + 1]]
        name = class_names[c] if class_names else str(c)
        if labels_per_class > 0:
            k = labels_per_class
        else:
            k = max(1, int(math.floor(label_fraction * len(members) + 0.5)))
        if len(members) < k:
            raise UserError(f"class '{name}' has {len(members)} train images, fewer than the {k} to label: lower "
                            f"data.labels_per_class (or data.label_fraction), or give data.labelled_index")
        rng = np.random.default_rng(np.random.SeedSequence([int(split_seed) & (2**64 - 1), c, 0x5B17]))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def resolve_index_file(path: str, root: str) -> Path:
    """An index file named in the config: the path as given, or under data.root when only that exists."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and root and (Path(root) / p).exists():
        return Path(root) / p
    return p


def read_index_csv(path: str, num_samples: int, *, key: str, root: str = "") -> np.ndarray:
    """Positions listed in the `Index` column of a CSV, sorted; every problem raises UserError naming the
    file, the line and the valid range 0..num_samples-1."""
    p = resolve_index_file(path, root)
    where = f"{key} = '{path}'"
    if not p.exists():
        raise UserError(f"{where}: no such file (looked at {p.resolve()}); give the path of a CSV with a column "
                        f"'Index' of positions into the sorted train images, or \"\" to generate a split")
    text = read_text(p, where)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise UserError(f"{where}: cannot read {p} as CSV: {e}; expected a header with a column 'Index' and one "
                        f"position per row") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise UserError(f"{where}: {p} is empty; expected a header with a column 'Index' and one position per row")
    header = [h.strip() for h in rows[0]]
    col = header.index("Index") if "Index" in header else next(
        (i for i, h in enumerate(header) if h.lower() == "index"), None)
    if col is None:
        raise UserError(f"{where}: {p} has no column 'Index' (its header is {header}); the index files list "
                        f"positions into the train images sorted by class folder then file name, under 'Index'")
    values = []
    for line, row in enumerate(rows[1:], start=2):
        cell = row[col].strip() if col < len(row) else ""
        try:
            v = int(cell)
        except ValueError:
            raise UserError(f"{where}: {p} line {line}: '{cell}' in column 'Index' is not an integer") from None
        if not 0 <= v < num_samples:
            raise UserError(f"{where}: {p} line {line}: index {v} is out of range: valid positions are "
                            f"0..{num_samples - 1} ({num_samples} train images); is the file meant for another "
                            f"data set or train folder?")
        values.append(v)
    if not values:
        raise UserError(f"{where}: {p} lists no positions under 'Index'")
    out = np.asarray(values, dtype=np.int64)
    uniq, first, counts = np.unique(out, return_index=True, return_counts=True)
    if len(uniq) != len(out):
        dup = int(uniq[np.argmax(counts > 1)])
        lines = [i + 2 for i, v in enumerate(values) if v == dup][:3]
        raise UserError(f"{where}: {p} lists index {dup} more than once (lines {lines}); each position may appear once")
    return uniq


def choose_split(targets: np.ndarray, num_classes: int, data, *, class_names: list[str] | None = None,
                 root: str = "") -> Split:
    """The labelled / unlabelled positions into the train samples for `data` (a DataConfig)."""
    n = len(targets)
    if data.labelled_index:
        labelled = read_index_csv(data.labelled_index, n, key="data.labelled_index", root=root)
    else:
        labelled = per_class_split(targets, num_classes, labels_per_class=data.labels_per_class,
                                   label_fraction=data.label_fraction, split_seed=data.split_seed,
                                   class_names=class_names)
    if data.unlabelled_index:
        unlabelled = read_index_csv(data.unlabelled_index, n, key="data.unlabelled_index", root=root)
    else:
        unlabelled = np.setdiff1d(np.arange(n, dtype=np.int64), labelled, assume_unique=True)
    return Split(labelled=labelled, unlabelled=unlabelled)
