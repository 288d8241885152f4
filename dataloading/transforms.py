"""torchvision.transforms.v2 pipelines for decoded (PIL) images: finetune, weak, strong, eval, pretrain.

The views follow timm's `create_transform`, which the original Semi-ViT code used: RandomResizedCrop
(bicubic) + flip, then RandAugment *instead of* colour jitter (timm jitters only without RandAugment), to
tensor, Normalize, random erasing in timm's 'pixel' mode (per-pixel N(0, 1) noise, one box).
RandAugment and the erasing are timm's own operations (pil_randaug.py), checked against timm in the tests.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from dataloading.pil_randaug import RandAugment, RandomErasingPixel
from dataloading.randaug import RandAugSpec

BICUBIC = InterpolationMode.BICUBIC
EVAL_CROP_PCT = 0.875  # Resize(img / 0.875) then CenterCrop(img), the ImageNet convention


def _fill(mean: Sequence[float]) -> tuple[int, ...] | int:
    values = tuple(min(255, int(round(255 * m))) for m in mean)
    return values[0] if len(values) == 1 else values


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _crop_flip(img_size: int, augment) -> list:
    out = [v2.RandomResizedCrop(img_size, scale=tuple(augment.crop_scale), interpolation=BICUBIC, antialias=True)]
    if augment.hflip > 0:
        out.append(v2.RandomHorizontalFlip(augment.hflip))
    return out


def make_randaug(policy: RandAugSpec, fill) -> RandAugment:
    """timm's RandAugment for `policy`, geometric ops filled with `fill` (timm's img_mean)."""
    return RandAugment(policy, fill)


def _randaug(policy: RandAugSpec | None, mean) -> list:
    return [make_randaug(policy, _fill(mean))] if policy is not None and policy.num_ops > 0 else []


def _erase(augment) -> list:
    return [RandomErasingPixel(augment.reprob)] if augment.reprob > 0 else []


def finetune(img_size: int, augment, policy: RandAugSpec | None, mean, std) -> v2.Compose:
    """Labelled view: RandomResizedCrop, flip, RandAugment, tensor, Normalize, random erasing (pixel mode)."""
    return v2.Compose(_crop_flip(img_size, augment) + _randaug(policy, mean) + _to_tensor(mean, std) + _erase(augment))


def _jitter(augment) -> list:
    cj = augment.color_jitter
    return [v2.ColorJitter(cj, cj, cj)] if cj > 0 else []


def weak(img_size: int, augment, mean, std) -> v2.Compose:
    """Unlabelled weak view: RandomResizedCrop, flip, ColorJitter."""
    return v2.Compose(_crop_flip(img_size, augment) + _jitter(augment) + _to_tensor(mean, std))


def strong(img_size: int, augment, policy: RandAugSpec | None, mean, std) -> v2.Compose:
    """Unlabelled strong view: its own crop and flip, RandAugment, random erasing (pixel mode). No colour jitter when
    RandAugment is on: timm's create_transform (the original's) applies jitter only without RandAugment."""
    jitter = _jitter(augment) if policy is None or policy.num_ops == 0 else []
    return v2.Compose(_crop_flip(img_size, augment) + jitter + _randaug(policy, mean)
                      + _to_tensor(mean, std) + _erase(augment))


def evaluation(img_size: int, mean, std) -> v2.Compose:
    """Resize(img / 0.875, bicubic) + CenterCrop(img); above 224 px no crop margin (crop 1.0), as the original."""
    crop_pct = EVAL_CROP_PCT if img_size <= 224 else 1.0
    return v2.Compose([v2.Resize(int(img_size / crop_pct), interpolation=BICUBIC, antialias=True),
                       v2.CenterCrop(img_size)] + _to_tensor(mean, std))


def pretrain(img_size: int, augment, mean, std) -> v2.Compose:
    """MAE view: RandomResizedCrop(scale=crop_scale, bicubic) + flip."""
    return v2.Compose(_crop_flip(img_size, augment) + _to_tensor(mean, std))
