"""The torch loader's RandAugment and random erasing against timm's own (the original's augmentation code).

Per op: the same argument for every level and sign, and identical output bytes on fixed images (both
run the same PIL operation, so the tolerance is zero). The sampling (ops per image, op choice, magnitude
noise) and the erasing are compared statistically over many draws.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dataloading import pil_randaug as P
from dataloading.randaug import parse_randaug

timm_aa = pytest.importorskip("timm.data.auto_augment")
FILL = (124, 116, 104)  # timm's img_mean for ImageNet's mean


def fixed_image(mode: str = "RGB", size=(40, 28), seed: int = 0) -> Image.Image:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([xx * 6, yy * 9, (xx + yy) * 4], -1) % 256
    arr = np.clip(base + g.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode)


def timm_args(name: str, level: float, negate: bool):
    fn = timm_aa.LEVEL_TO_ARG[name]
    if fn is None:
        return ()
    state = random.getstate()
    random.seed(0)
    orig = random.random
    random.random = lambda: 0.9 if negate else 0.1  # timm negates when random() > 0.5
    try:
        return fn(level, {"translate_const": 100, "img_mean": FILL})
    finally:
        random.random = orig
        random.setstate(state)


ALL_OPS = sorted(set(P.INCREASING_OPS) | set(P.PLAIN_OPS))


@pytest.mark.parametrize("name", ALL_OPS)
def test_each_op_matches_timm(name):
    for mode in ("RGB", "L"):
        img = fixed_image(mode)
        fill = FILL if mode == "RGB" else FILL[0]
        for level in (0.0, 3.0, 5.5, 9.0, 10.0):
            for negate in (False, True):
                args = timm_args(name, level, negate)
                ours = P.op_argument(name, level, negate)
                assert (() if ours is None else (ours,)) == pytest.approx(args), (name, level, negate)
                got = P.apply_op(img, name, ours, fill)
                if name.startswith("Posterize") and args == (0,):  # current Pillow refuses 0 bits; it was black
                    assert not np.asarray(got).any()
                    continue
                want = timm_aa.NAME_TO_OP[name](img, *args, fillcolor=fill, resample=Image.Resampling.BICUBIC)
                assert got.mode == want.mode and np.array_equal(np.asarray(got), np.asarray(want)), (name, level, mode)


def test_op_sets_and_posterize_at_m9():
    assert P.INCREASING_OPS == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert P.PLAIN_OPS == tuple(timm_aa._RAND_TRANSFORMS)
    assert "Identity" not in P.INCREASING_OPS and {"Invert", "SolarizeAdd"} <= set(P.INCREASING_OPS)
    assert P.op_argument("PosterizeIncreasing", 9.0, False) == 1  # 4 - int(0.4 * 9) bits kept


def record(n: int, spec: str, use_timm: bool) -> list[tuple[str, float]]:
    """(op, argument) of every op applied over n images of RandAugment(spec)."""
    seen: list[tuple[str, float]] = []
    img = fixed_image(size=(8, 8))
    if use_timm:
        ra = timm_aa.rand_augment_transform(spec, {"translate_const": 100, "img_mean": FILL,
                                                   "interpolation": Image.Resampling.BICUBIC})
        for op in ra.ops:
            op.aug_fn = (lambda name: lambda im, *a, **k: (seen.append((name, a[0] if a else 0.0)), im)[1])(op.name)
        random.seed(1)
        np.random.seed(1)
        for _ in range(n):
            ra(img)
        return seen
    ra = P.RandAugment(parse_randaug(spec), FILL)
    orig = P.apply_op
    P.apply_op = lambda im, name, arg, fill: (seen.append((name, arg if arg is not None else 0.0)), im)[1]
    try:
        torch.manual_seed(1)
        for _ in range(n):
            ra(img)
    finally:
        P.apply_op = orig
    return seen


def test_sampling_matches_timm_statistically():
    n = 3000
    ours, theirs = record(n, "rand-m9-mstd0.5-inc1", False), record(n, "rand-m9-mstd0.5-inc1", True)
    # ops applied per image: 2 draws x p 0.5 -> 1.0 on average (binomial sd of the mean ~0.013)
    assert len(ours) / n == pytest.approx(1.0, abs=0.05) and len(theirs) / n == pytest.approx(1.0, abs=0.05)
    # each of the 15 ops equally likely (expected 200 each of 3000)
    for table in (ours, theirs):
        counts = np.array([sum(1 for k, _ in table if k == name) for name in P.INCREASING_OPS])
        assert counts.min() > 140 and counts.max() < 270, counts
    # magnitude: |rotate| ~ 3 * N(9, 0.5) clamped to [0, 10] -> mean ~27 deg, sd ~1.5 deg
    rot = lambda t: np.abs([a for k, a in t if k == "Rotate"])  # noqa: E731
    assert rot(ours).mean() == pytest.approx(rot(theirs).mean(), abs=0.6)
    assert rot(ours).std() == pytest.approx(rot(theirs).std(), abs=0.5)
    sign = lambda t: np.mean([a > 0 for k, a in t if k == "ShearX"])  # noqa: E731
    assert sign(ours) == pytest.approx(0.5, abs=0.1) and sign(theirs) == pytest.approx(0.5, abs=0.1)


def test_pixel_erasing_matches_timm_statistically():
    from timm.data.random_erasing import RandomErasing

    n, shape = 400, (3, 24, 32)
    timm_re = RandomErasing(probability=0.5, mode="pixel", device="cpu")
    ours = P.RandomErasingPixel(0.5)
    torch.manual_seed(0)
    random.seed(0)
    stats = {}
    for name, f in (("ours", ours), ("timm", timm_re)):
        areas, values = [], []
        for _ in range(n):
            out = f(torch.zeros(shape))
            box = out[0] != 0
            areas.append(box.float().mean().item())
            values.append(out[:, box].flatten())
        values = torch.cat(values)
        stats[name] = (np.mean([a > 0 for a in areas]), np.mean([a for a in areas if a > 0]),
                       values.mean().item(), values.std().item())
    o, t = stats["ours"], stats["timm"]
    assert o[0] == pytest.approx(t[0], abs=0.1) and o[0] == pytest.approx(0.5, abs=0.08)  # erased share
    assert o[1] == pytest.approx(t[1], abs=0.03)  # mean erased area
    assert abs(o[2]) < 0.05 and o[3] == pytest.approx(1.0, abs=0.05)  # per-pixel N(0, 1) noise
    assert t[3] == pytest.approx(1.0, abs=0.05)


def test_folder_views_use_timm_ops():
    from dataloading import transforms as T
    from engine.config.sections import AugmentConfig

    policy = parse_randaug("rand-m9-mstd0.5-inc1")
    kinds = [type(t) for t in T.finetune(32, AugmentConfig(), policy, [0.5] * 3, [0.5] * 3).transforms]
    assert P.RandAugment in kinds and P.RandomErasingPixel in kinds
    strong = T.strong(32, AugmentConfig(), policy, [0.5] * 3, [0.5] * 3)
    assert P.RandAugment in [type(t) for t in strong.transforms]
