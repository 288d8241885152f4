"""DALI on a GPU: images/s of the engine's labelled and two-view unlabelled DALI streams with
device="mixed" decoding, and torchvision.io.decode_jpeg(device="cuda") as a decode-only baseline.

    python -m bench.dali_gpu                 # on a CUDA machine with DALI installed: writes results JSON
    python -m bench.dali_gpu --smoke         # anywhere with DALI: CPU-only, a few images, checks it runs

Generated JPEGs of ImageNet-like size (500 x 375, quality 90), 224 px output, the published recipe.
The smoke form writes no throughput (it is not a measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from bench.jpegs import make_jpegs
from dataloading import build_data
from engine.config.sections import AugmentConfig, DataConfig


def loader_rate(root: Path, view: str, device: torch.device, batch: int, threads: int, epochs: int) -> float:
    data = DataConfig(root=str(root), labelled_index="all.csv", unlabelled_index="all.csv", loader="dali",
                      num_workers=threads)
    stream = getattr(build_data(data, AugmentConfig(), img_size=224, batch_size=batch, unlabelled_batch_size=batch,
                                seed=0, device=device, need=(view,)), view)
    for _ in stream.epoch(0):  # warm-up: builds the pipeline
        pass
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for e in range(1, epochs + 1):
        for _ in stream.epoch(e):
            pass
    sync()
    return epochs * len(stream) * batch / (time.perf_counter() - t0)


def decode_rate(root: Path, device: torch.device, repeats: int) -> float:
    from torchvision.io import decode_jpeg, read_file

    files = [read_file(str(p)) for p in sorted((root / "train").rglob("*.jpg"))]
    decode_jpeg(files[:8], device=device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        decode_jpeg(files, device=device)
    torch.cuda.synchronize()
    return repeats * len(files) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dali_gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU-only, a few images: check that it runs, no numbers")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=8, help="DALI CPU threads")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/dali-gpu-<date>.json)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("error: no CUDA device: run on a GPU machine, or use --smoke", file=sys.stderr)
        return 2
    n, batch, epochs = (8, 4, 1) if args.smoke else (args.images, args.batch, args.epochs)
    device = torch.device("cuda" if cuda else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpegs(Path(tmp), n)
        result = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "images": n, "batch": batch,
                  "threads": args.threads, "img_size": 224, "smoke": args.smoke}
        for view in ("labelled", "unlabelled"):
            rate = loader_rate(root, view, device, batch, args.threads, epochs)
            if not args.smoke:  # unlabelled: images per second, each with its weak and strong view
                result[f"dali_{view}_{'two_view_' if view == 'unlabelled' else ''}img_per_s"] = rate
        if cuda:
            result["torchvision_decode_jpeg_cuda_img_per_s"] = decode_rate(root, device, epochs)
    out = Path(args.out or f"bench/results/dali-gpu-{date.today()}.json")
    if not args.smoke or args.out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
