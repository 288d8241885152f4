"""Classify image files with a trained model:

    python -m engine.predict --checkpoint RUN/model.safetensors --cfg RUN/config.toml PATH... [--out FILE.csv]

PATH is an image file or a folder (searched recursively for image files). Each image gets the evaluation view
of the run's data (resize + centre crop for image folders; the whole image resized for the digits demo) and
the top-5 classes with their probabilities, as a table on stdout and, with --out, as CSV. Batched; on the GPU
when there is one. Exit codes: 0 done, 2 bad input (a missing path, an unreadable image, a checkpoint that does
not fit the config), with one line that names it.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from engine.config import Config, load_plan
from engine.errors import EXIT_USAGE, UserError
from engine.inference import class_names, device_and_dtype, file_transform, load_classifier, probabilities

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def collect(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted); a missing path is a UserError."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"folder '{p}' holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"'{p}' not found: give image files or folders of them")
    return files


def decode(path: Path, transform, mode: str) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            return transform(img.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"'{path}' is not a readable image ({type(err).__name__}): remove it or convert it "
                        f"to PNG/JPEG") from None


def predict(files: list[Path], cfg: Config, checkpoint: str, batch_size: int = 64, top_k: int = 5,
            progress: bool = True) -> list[dict]:
    """[{"file", "classes": [name, ...], "probs": [p, ...]}], best class first, in the order of `files`."""
    device, dtype = device_and_dtype(cfg)
    model, _ = load_classifier(checkpoint, cfg, device)
    names = class_names(cfg)
    transform, mode = file_transform(cfg)
    k = min(top_k, cfg.model.num_classes)
    rows = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress or len(files) < 2 * batch_size)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = torch.stack([decode(f, transform, mode) for f in chunk]).to(device)  # (b, C, H, W)
        probs, idx = probabilities(model, images, dtype).topk(k, dim=1)  # (b, k) each
        for f, p, i in zip(chunk, probs.tolist(), idx.tolist()):
            rows.append({"file": str(f), "classes": [names[c] for c in i], "probs": p})
        bar.update(len(chunk))
    bar.close()
    return rows


def table(rows: list[dict]) -> str:
    k = len(rows[0]["classes"]) if rows else 0
    head = ["file"] + [f"top-{j + 1}" for j in range(k)]
    body = [[r["file"]] + [f"{c} ({p:.3f})" for c, p in zip(r["classes"], r["probs"])] for r in rows]
    widths = [max(len(x[j]) for x in [head, *body]) for j in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])


def write_csv(rows: list[dict], path: Path) -> None:
    k = len(rows[0]["classes"]) if rows else 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file"] + [x for j in range(k) for x in (f"class_{j + 1}", f"prob_{j + 1}")])
        for r in rows:
            w.writerow([r["file"]] + [x for c, p in zip(r["classes"], r["probs"]) for x in (c, f"{p:.6f}")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.predict", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of them")
    parser.add_argument("--checkpoint", required=True, help="RUN/model.safetensors or a .pt checkpoint")
    parser.add_argument("--cfg", required=True, help="the run's config (RUN/config.toml): architecture, classes, view")
    parser.add_argument("--out", help="also write the predictions as CSV to this file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=5)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code else 0
    try:
        if args.batch_size < 1 or args.top_k < 1:
            raise UserError("--batch-size and --top-k must be >= 1")
        cfg = load_plan(args.cfg, []).base
        files = collect(args.paths)
        rows = predict(files, cfg, args.checkpoint, args.batch_size, args.top_k)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(table(rows))
    if args.out:
        write_csv(rows, Path(args.out))
        print(f"{len(rows)} predictions written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
