"""torchvision.transforms.v2 pipelines for decoded (PIL) images: finetune, weak, strong, eval, pretrain.

RandAugment: `TimmRandAugment` runs torchvision's RandAugment ops the way timm's `rand-m9-mstd0.5-inc1`
drives its own: level m on timm's 0..10 scale (m9 = 90 % of each op's maximum; torchvision's default 31
bins would make magnitude 9 only 30 %), `n` ops drawn with replacement, each applied with probability `p`
(timm's 0.5), the level redrawn per op from N(m, mstd) clamped to [0, mmax], random sign, geometric ops
filled with the data mean (timm's img_mean) and bilinear. What torchvision's op set does NOT reproduce:
- the op list: torchvision has Identity and Color(saturation), timm's 'inc' set has Invert and SolarizeAdd
  instead of Identity (Color is there as ColorIncreasing);
- PosterizeIncreasing: timm keeps 4 - int(0.4 m) bits (1 bit at m9), torchvision 8 - round(0.4 m) (4 bits);
- timm picks bilinear or bicubic at random per geometric op, here always bilinear;
- timm's TranslateRel is 0.45 x level/10 of the side, torchvision's 150/331 = 0.453: the same within 1 %.
Random erasing fills with 0 after Normalize (the mean colour); timm's Semi-ViT recipe uses mode 'pixel'
(per-pixel gaussian noise).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from dataloading.randaug import LEVEL_DENOM, RandAugSpec

BICUBIC = InterpolationMode.BICUBIC
EVAL_CROP_PCT = 0.875  # Resize(img / 0.875) then CenterCrop(img), the ImageNet convention


class TimmRandAugment(v2.RandAugment):
    """torchvision's RandAugment ops sampled timm-style (see the module docstring)."""

    _BINS = 101  # level resolution 0.1 on the 0..10 scale

    def __init__(self, spec: RandAugSpec, fill: Sequence[int] | int | None = None):
        super().__init__(num_ops=spec.num_ops, magnitude=0, num_magnitude_bins=self._BINS,
                         interpolation=InterpolationMode.BILINEAR, fill=fill)
        self.spec = spec

    def _level(self) -> float:
        s = self.spec
        level = s.magnitude
        if math.isinf(s.mstd):
            level = float(torch.rand(())) * level
        elif s.mstd > 0:
            level = level + s.mstd * float(torch.randn(()))
        return min(max(level, 0.0), min(s.mmax, LEVEL_DENOM))

    def forward(self, *inputs: Any) -> Any:
        flat_inputs_with_spec, image = self._flatten_and_extract_image_or_video(inputs)
        height, width = v2.functional.get_size(image)
        ops = list(self._AUGMENTATION_SPACE.items())
        for _ in range(self.num_ops):
            name, (magnitudes_fn, signed) = ops[int(torch.randint(len(ops), ()))]  # with replacement, as timm
            if torch.rand(()) >= self.spec.prob:
                continue
            magnitudes = magnitudes_fn(self._BINS, height, width)
            magnitude = 0.0
            if magnitudes is not None:
                magnitude = float(magnitudes[round(self._level() / LEVEL_DENOM * (self._BINS - 1))])
                if signed and torch.rand(()) < 0.5:
                    magnitude = -magnitude
            image = self._apply_image_or_video_transform(image, name, magnitude, interpolation=self.interpolation,
                                                         fill=self._fill)
        return self._unflatten_and_insert_image_or_video(flat_inputs_with_spec, image)


def _fill(mean: Sequence[float]) -> tuple[int, ...] | int:
    values = tuple(int(round(255 * m)) for m in mean)
    return values[0] if len(values) == 1 else values


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _crop_flip(img_size: int, augment) -> list:
    out = [v2.RandomResizedCrop(img_size, scale=tuple(augment.crop_scale), interpolation=BICUBIC, antialias=True)]
    if augment.hflip > 0:
        out.append(v2.RandomHorizontalFlip(augment.hflip))
    return out


_PRIVATE = ("_flatten_and_extract_image_or_video", "_unflatten_and_insert_image_or_video",
            "_apply_image_or_video_transform", "_AUGMENTATION_SPACE")


def make_randaug(policy: RandAugSpec, fill) -> v2.Transform:
    """TimmRandAugment; if a torchvision release lacks the internals it drives, plain RandAugment with
    timm's 0..10 magnitude scale (11 bins), every op applied, no magnitude noise."""
    if all(hasattr(v2.RandAugment, a) for a in _PRIVATE):
        return TimmRandAugment(policy, fill=fill)
    return v2.RandAugment(num_ops=policy.num_ops, magnitude=int(round(policy.level() * LEVEL_DENOM)),
                          num_magnitude_bins=int(LEVEL_DENOM) + 1, interpolation=InterpolationMode.BILINEAR,
                          fill=fill)


def _randaug(policy: RandAugSpec | None, mean) -> list:
    return [make_randaug(policy, _fill(mean))] if policy is not None and policy.num_ops > 0 else []


def _erase(augment) -> list:
    return [v2.RandomErasing(p=augment.reprob, value=0)] if augment.reprob > 0 else []


def finetune(img_size: int, augment, policy: RandAugSpec | None, mean, std) -> v2.Compose:
    """Labelled view: RandomResizedCrop, flip, RandAugment, tensor, Normalize, RandomErasing."""
    return v2.Compose(_crop_flip(img_size, augment) + _randaug(policy, mean) + _to_tensor(mean, std) + _erase(augment))


def _jitter(augment) -> list:
    cj = augment.color_jitter
    return [v2.ColorJitter(cj, cj, cj)] if cj > 0 else []


def weak(img_size: int, augment, mean, std) -> v2.Compose:
    """Unlabelled weak view: RandomResizedCrop, flip, ColorJitter."""
    return v2.Compose(_crop_flip(img_size, augment) + _jitter(augment) + _to_tensor(mean, std))


def strong(img_size: int, augment, policy: RandAugSpec | None, mean, std) -> v2.Compose:
    """Unlabelled strong view: its own crop and flip, RandAugment, RandomErasing. No colour jitter when
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
