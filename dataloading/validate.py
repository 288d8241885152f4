"""List every unreadable image under a folder: `python -m dataloading.validate ROOT [--out FILE] [--workers N]`.

Checks each file the loader would read (torchvision's image extensions) with PIL: verify(), then a full
decode (load()), which also catches truncated files. Prints one line per unreadable file
(`path<TAB>error`) and a summary; exit status 1 if any file is unreadable, 0 if all are fine, 2 if ROOT
is not a folder. `--out FILE` also writes the list as an exclusion file (absolute paths): set
`data.exclude = "FILE"` and both loaders leave those files out.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dataloading.readable import check_image
from engine.errors import EXIT_USAGE

# torchvision.datasets.folder.IMG_EXTENSIONS, copied so the validator starts without importing torch
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return out


def find_unreadable(root: Path, workers: int = 1, progress: bool = False) -> tuple[int, list[tuple[str, str]]]:
    """(number of images checked, [(path, error)] for the unreadable ones, in path order)."""
    files = image_files(root)
    if workers > 1 and len(files) >= 256:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(check_image, files, chunksize=256)
            errors = []
            for n, (path, err) in enumerate(zip(files, results), start=1):
                if err is not None:
                    errors.append((path, err))
                if progress and n % 50_000 == 0:
                    print(f"checked {n}/{len(files)}", file=sys.stderr, flush=True)
    else:
        errors = [(p, e) for p in files if (e := check_image(p)) is not None]
    return len(files), errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dataloading.validate", description=__doc__.splitlines()[0])
    ap.add_argument("root", help="folder to check recursively, e.g. /data/imagenet (train and val)")
    ap.add_argument("--out", help="also write the unreadable files here, for data.exclude (e.g. ROOT/exclude.txt)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all cores)")
    args = ap.parse_args(argv)
    root = Path(args.root).expanduser()
    if not root.is_dir():
        print(f"error: {root} is not a folder; give the data set folder, e.g. /data/imagenet", file=sys.stderr)
        return EXIT_USAGE
    checked, errors = find_unreadable(root, workers=max(1, args.workers), progress=sys.stderr.isatty())
    for path, err in errors:
        print(f"{path}\t{err}")
    if args.out:
        lines = [f"{os.path.abspath(path)}\t{err}" for path, err in errors]
        Path(args.out).expanduser().write_text(f"# unreadable images under {root.resolve()} (python -m "
                                               f"dataloading.validate); data.exclude skips them\n"
                                               + "".join(line + "\n" for line in lines))
        print(f"exclusion list: {args.out} (set data.exclude = \"{args.out}\")", file=sys.stderr)
    if checked == 0:
        print(f"no image files under {root}", file=sys.stderr)
    print(f"{len(errors)} unreadable of {checked} images under {root}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
