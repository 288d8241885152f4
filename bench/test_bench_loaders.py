"""Input pipelines: images/s of the labelled view and of the two-view unlabelled pair at 224 px, on
generated JPEGs of ImageNet-like size (500 x 375, quality 90), through the engine's own streams: the torch
loader (DataLoader workers) and DALI (CPU-only here: device_id=None) with the same number of
workers/threads, same process. Plus a per-stage breakdown of each loader, one thread, cumulative:
decode; + crop and resize; + RandAugment; + normalise and erase (the full view).

    python -m pytest bench/test_bench_loaders.py -q -s            # prints img/s per case
    python -m pytest bench/test_bench_loaders.py --benchmark-disable -q   # smoke: each case once

BENCH_THREADS (default 2) sets the workers / DALI threads; BENCH_IMAGES (default 96) the set size.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.jpegs import make_jpegs
from dataloading import build_data
from dataloading.randaug import parse_randaug
from engine.config.sections import AugmentConfig, DataConfig

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
IMAGES = int(os.environ.get("BENCH_IMAGES", "96"))
SIZE, BATCH = 224, 32
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _dali_or_skip():
    from dataloading import dali

    if not dali.available():
        pytest.skip(f"NVIDIA DALI not installed: {dali.INSTALL}")


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    """IMAGES photo-like JPEGs (smooth colour fields + texture), 500 x 375, q90, in 2 classes."""
    return make_jpegs(tmp_path_factory.mktemp("bench_jpegs"), IMAGES)


def _streams(root: Path, loader: str):
    data = DataConfig(root=str(root), labelled_index="all.csv", unlabelled_index="all.csv", loader=loader,
                      num_workers=THREADS, mean=MEAN, std=STD)
    aug = AugmentConfig()  # the published fine-tune / strong recipe: rand-m9-mstd0.5-inc1, reprob 0.25
    return build_data(data, aug, img_size=SIZE, batch_size=BATCH, unlabelled_batch_size=BATCH, seed=0,
                      need=("labelled", "unlabelled"))


@pytest.mark.parametrize("view", ["labelled", "unlabelled"])
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_bench_loader(benchmark, jpeg_root, loader, view):
    if loader == "dali":
        _dali_or_skip()
    stream = getattr(_streams(jpeg_root, loader), view)
    epochs = iter(range(10**6))
    images = len(stream) * BATCH

    def one_epoch():
        for _ in stream.epoch(next(epochs)):
            pass

    one_epoch()  # warm-up: workers start, pipelines build
    benchmark.pedantic(one_epoch, rounds=3, iterations=1)
    if benchmark.stats is None:
        return
    rate = images / benchmark.stats.stats.median
    benchmark.extra_info.update(img_per_s=rate, threads=THREADS, views=2 if view == "unlabelled" else 1)
    print(f"\n{loader} {view}: {rate:.0f} {'two-view ' if view == 'unlabelled' else ''}img/s "
          f"({THREADS} {'threads' if loader == 'dali' else 'workers'}, {images} images per epoch)")


# ------------------------------------------------------------------------------- per-stage breakdown
def _torch_stages(files: list[Path]) -> dict[str, float]:
    from torchvision.transforms import v2

    from dataloading import transforms as T
    from dataloading.pil_randaug import RandAugment, RandomErasingPixel

    aug = AugmentConfig()
    crop = v2.Compose(T._crop_flip(SIZE, aug))
    ra = RandAugment(parse_randaug(aug.randaug), T._fill(MEAN))
    tail = v2.Compose(T._to_tensor(MEAN, STD) + [RandomErasingPixel(aug.reprob)])
    steps = {"decode": lambda im: im, "+ crop and resize": crop, "+ RandAugment": lambda im: ra(crop(im)),
             "+ normalise and erase": lambda im: tail(ra(crop(im)))}
    out = {}
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        for name, f in steps.items():
            t0 = time.perf_counter()
            for p in files:
                with Image.open(p) as im:
                    f(im.convert("RGB"))
            out[name] = len(files) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return out


def _dali_stages(files: list[Path]) -> dict[str, float]:
    from nvidia.dali import fn, pipeline_def, types

    from dataloading import dali

    aug, policy = AugmentConfig(), parse_randaug(AugmentConfig().randaug)
    fill = [min(255, round(255 * m)) for m in MEAN]
    steps = {"decode": lambda x: x, "+ crop and resize": lambda x: dali._crop(x, SIZE, aug.crop_scale),
             "+ RandAugment": lambda x: dali._randaug(dali._crop(x, SIZE, aug.crop_scale), policy, fill),
             "+ normalise and erase": lambda x: dali._erase(dali._normalise(
                 dali._randaug(dali._crop(x, SIZE, aug.crop_scale), policy, fill), MEAN, STD, aug.hflip), aug.reprob)}
    encoded = [np.fromfile(p, dtype=np.uint8) for p in files]
    out = {}
    for name, f in steps.items():
        @pipeline_def(enable_conditionals=True)
        def pipe():
            x = fn.decoders.image(fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1), output_type=types.RGB)
            return f(x)

        p = pipe(batch_size=BATCH, num_threads=1, device_id=None, seed=0, exec_pipelined=False, exec_async=False,
                 prefetch_queue_depth=1)
        p.build()
        batches = [encoded[i:i + BATCH] for i in range(0, len(encoded) - BATCH + 1, BATCH)]
        p.feed_input("jpegs", batches[0])
        p.run()  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            p.feed_input("jpegs", b)
            p.run()
        out[name] = len(batches) * BATCH / (time.perf_counter() - t0)
    return out


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_bench_stage_breakdown(benchmark, jpeg_root, loader):
    if loader == "dali":
        _dali_or_skip()
    files = sorted((jpeg_root / "train").rglob("*.jpg"))
    measure = _torch_stages if loader == "torch" else _dali_stages
    result = benchmark.pedantic(lambda: measure(files), rounds=1, iterations=1)
    if benchmark.stats is None:
        return
    benchmark.extra_info.update({f"img_per_s {k}": v for k, v in result.items()})
    print(f"\n{loader} per stage, 1 thread, cumulative img/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in result.items()))
