"""DALI on a GPU: images/s of the engine's labelled and two-view unlabelled DALI streams with
device="mixed" decoding, and torchvision.io.decode_jpeg(device="cuda") as a decode-only baseline.

    python -m bench.dali_gpu                 # on a CUDA machine: writes results JSON
    python -m bench.dali_gpu --smoke         # anywhere: CPU-only, a few images, checks it runs

Without DALI installed the torchvision baseline still runs and the JSON records DALI as not installed
(exit 0): the GPU machine lent to this project has no DALI.

Generated JPEGs of ImageNet-like size (500 x 375, quality 90), 224 px output, the published recipe.
The smoke form writes no throughput (it is not a measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import torch

from bench.jpegs import make_jpegs
from dataloading import build_data, dali
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
    with warnings.catch_warnings():  # torchvision >= 0.29 deprecates its codecs; they are this baseline
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        from torchvision.io import decode_jpeg, read_file

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        files = [read_file(str(p)) for p in sorted((root / "train").rglob("*.jpg"))]
        decode_jpeg(files[:8], device=device)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            decode_jpeg(files, device=device)
        sync()
        return repeats * len(files) / (time.perf_counter() - t0)


def _dali_version() -> str:
    import nvidia.dali

    return nvidia.dali.__version__


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
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "date": str(date.today()),
              "torch": torch.__version__, "images": n, "batch": batch, "threads": args.threads, "img_size": 224,
              "smoke": args.smoke, "dali": _dali_version() if dali.available() else f"not installed ({dali.INSTALL})"}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpegs(Path(tmp), n)
        rate = decode_rate(root, device, epochs)  # the baseline first: it needs nothing but torchvision
        if not args.smoke:
            result["torchvision_decode_jpeg_cuda_img_per_s"] = rate
        for view in ("labelled", "unlabelled") if dali.available() else ():
            rate = loader_rate(root, view, device, batch, args.threads, epochs)
            if not args.smoke:  # unlabelled: images per second, each with its weak and strong view
                result[f"dali_{view}_{'two_view_' if view == 'unlabelled' else ''}img_per_s"] = rate
    out = Path(args.out or f"bench/results/dali-gpu-{date.today()}.json")
    if not args.smoke or args.out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
