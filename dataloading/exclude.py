"""The exclusion list: image files both loaders leave out (`python -m dataloading.validate ROOT --out FILE`).

One path per line (absolute, or relative to data.root); anything after a tab (the validator writes the
error there) and lines starting with '#' are ignored; the file is UTF-8 (a leading byte-order mark is
dropped). Excluded files are dropped after the label split is chosen, so the positions the community index
files list keep their meaning.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dataloading.textfile import read_text
from engine.errors import UserError


def _norm(path: str | Path) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))


def resolve(path: str, root: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file() and not p.is_absolute() and root and (Path(root).expanduser() / p).is_file():
        return Path(root).expanduser() / p
    return p


def read_exclusions(path: str, root: str) -> set[str]:
    """The normalised absolute paths listed in the exclusion file `path` (data.exclude)."""
    p = resolve(path, root)
    if not p.exists():
        raise UserError(f"data.exclude = '{path}': no such file (looked at {p.resolve()}); write it with "
                        f"python -m dataloading.validate {root or 'ROOT'} --out {path}, or set data.exclude = \"\"")
    out = set()
    for line in read_text(p, f"data.exclude = '{path}'").splitlines():
        entry = line.split("\t", 1)[0].strip()
        if entry and not entry.startswith("#"):
            q = Path(entry).expanduser()
            out.add(_norm(q if q.is_absolute() or not root else Path(root).expanduser() / q))
    return out


def excluded_positions(folder, excluded: set[str]) -> np.ndarray:
    """Sorted positions of `folder` (an imagefolder.Folder) whose file is in `excluded`."""
    if not excluded:
        return np.zeros(0, np.int64)
    base = _norm(folder.root)
    rel = [os.path.relpath(e, base).encode() for e in excluded if e.startswith(base + os.sep)]
    if not rel:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.isin(folder.paths, np.array(rel, dtype=np.bytes_))).astype(np.int64)


def keep(positions: np.ndarray, bad: np.ndarray) -> np.ndarray:
    return positions if len(bad) == 0 else np.setdiff1d(positions, bad, assume_unique=False)
