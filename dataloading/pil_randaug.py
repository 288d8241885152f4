"""timm's RandAugment and random erasing for the CPU (torch) loader, drawing from torch's RNG.

Semi-ViT built its transforms with timm's `create_transform`; these are the same operations, written
here so the engine does not need timm at run time (timm is a test dependency: tests/unit/test_augment_timm.py
compares every op with timm's own on fixed images). Randomness comes from torch's global RNG, which the
folder dataset seeds per sample, so a resumed epoch draws the same augmentations.

RandAugment ('rand-m9-mstd0.5-inc1'): `n` ops drawn with replacement from timm's set ('inc1': the
"increasing" set, where every op gets stronger with the magnitude), each applied with probability `p`,
its level drawn from N(m, mstd) clamped to [0, mmax], signed ops negated with probability 1/2;
geometric ops resample bicubic (the original passed interpolation='bicubic') and fill with the data mean.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor

from dataloading.randaug import LEVEL_DENOM, RandAugSpec

BICUBIC = Image.Resampling.BICUBIC

INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
PLAIN_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
             "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _coin() -> bool:
    return bool(torch.rand(()) < 0.5)


def _signed(v: float, negate: bool) -> float:
    return -v if negate else v


def op_argument(name: str, level: float, negate: bool) -> float | None:
    """timm's level -> argument mapping for op `name` at `level` (0..10); `negate` flips signed ops."""
    f = level / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return _signed(f * 30.0, negate)
    if name in ("ShearX", "ShearY"):
        return _signed(f * 0.3, negate)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _signed(f * 0.45, negate)
    if name == "Posterize":
        return int(f * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(f * 4)  # bits kept: 1 at m9
    if name == "Solarize":
        return min(256, int(f * 256))
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(f * 256))
    if name == "SolarizeAdd":
        return min(128, int(f * 110))
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/Sharpness: 1 +- 0.9 f, at least 0.1
        return max(0.1, 1.0 + _signed(f * 0.9, negate))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return f * 1.8 + 0.1
    raise ValueError(f"unknown RandAugment op '{name}'")


def _affine(img: Image.Image, matrix, fill) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=BICUBIC, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands())) if img.mode in ("L", "RGB") else img


def apply_op(img: Image.Image, name: str, arg, fill) -> Image.Image:
    """Op `name` with its argument (from op_argument) on a PIL image."""
    w, h = img.size
    base = name.removesuffix("Increasing")
    if base == "AutoContrast":
        return ImageOps.autocontrast(img)
    if base == "Equalize":
        return ImageOps.equalize(img)
    if base == "Invert":
        return ImageOps.invert(img)
    if base == "Rotate":
        return img.rotate(arg, resample=BICUBIC, fillcolor=fill)
    if base == "ShearX":
        return _affine(img, (1, arg, 0, 0, 1, 0), fill)
    if base == "ShearY":
        return _affine(img, (1, 0, 0, arg, 1, 0), fill)
    if base == "TranslateXRel":
        return _affine(img, (1, 0, arg * w, 0, 1, 0), fill)
    if base == "TranslateYRel":
        return _affine(img, (1, 0, 0, 0, 1, arg * h), fill)
    if base == "Posterize":  # 0 bits (level 10 of the increasing op): black, as Pillow did for timm 0.4.5
        if arg <= 0:
            return Image.new(img.mode, img.size)
        return img if arg >= 8 else ImageOps.posterize(img, arg)
    if base == "Solarize":
        return ImageOps.solarize(img, arg)
    if base == "SolarizeAdd":
        return _solarize_add(img, arg)
    enhance: dict[str, Callable] = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                                    "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    return enhance[base](img).enhance(arg)


class RandAugment:
    """timm's RandAugment for one PIL image (see the module docstring). A plain callable: picklable for
    spawn-started workers, usable inside torchvision's v2.Compose."""

    def __init__(self, spec: RandAugSpec, fill):
        self.spec, self.fill = spec, fill
        self.ops = INCREASING_OPS if spec.increasing else PLAIN_OPS

    def level(self) -> float:
        s = self.spec
        m = s.magnitude
        if math.isinf(s.mstd):
            m = float(torch.rand(())) * m
        elif s.mstd > 0:
            m = m + s.mstd * float(torch.randn(()))
        return max(0.0, min(m, s.mmax or LEVEL_DENOM))

    def __call__(self, img: Image.Image) -> Image.Image:
        picks = torch.randint(len(self.ops), (self.spec.num_ops,)).tolist()  # with replacement, as timm
        for k in picks:
            if self.spec.prob < 1.0 and float(torch.rand(())) > self.spec.prob:
                continue
            name = self.ops[k]
            img = apply_op(img, name, op_argument(name, self.level(), _coin()), self.fill)
        return img

    def __repr__(self) -> str:
        s = self.spec
        return f"RandAugment(n={s.num_ops}, m={s.magnitude}, mstd={s.mstd}, p={s.prob}, ops={len(self.ops)})"


class RandomErasingPixel:
    """timm's RandomErasing(mode='pixel', count 1) on one normalised (C, H, W) tensor: with probability
    `p`, one box of 2 %..1/3 of the area, aspect 0.3..3.3 (log-uniform; 10 tries to fit), filled with
    per-pixel N(0, 1) noise."""

    def __init__(self, p: float, min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
        self.p, self.min_area, self.max_area = p, min_area, max_area
        self.log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))

    def __call__(self, img: Tensor) -> Tensor:
        if float(torch.rand(())) > self.p:
            return img
        c, h, w = img.shape
        for _ in range(10):
            u = torch.rand(2).tolist()
            area = (self.min_area + u[0] * (self.max_area - self.min_area)) * h * w
            ratio = math.exp(self.log_ratio[0] + u[1] * (self.log_ratio[1] - self.log_ratio[0]))
            bh, bw = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if bw < w and bh < h:
                top = int(torch.randint(h - bh + 1, ()))
                left = int(torch.randint(w - bw + 1, ()))
                img = img.clone()
                img[:, top:top + bh, left:left + bw] = torch.randn(c, bh, bw, dtype=img.dtype)
                break
        return img

    def __repr__(self) -> str:
        return f"RandomErasingPixel(p={self.p})"
