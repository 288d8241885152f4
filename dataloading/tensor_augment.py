"""Batched augmentation of small in-memory images on their own device (CPU or GPU): no per-sample loop.

Input `x` is a normalised batch (B, C, H, W) float. Every sample draws its own parameters from the
`generator` (on x's device), a fixed number of draws per call, so a batch's augmentation is a pure function
of (x, generator seed). One `grid_sample` does all geometry of a view.

- weak:   random translation by a whole number of pixels, up to `translate` of the side (12.5 %), the
          uncovered border filled with the background (the value a 0 pixel maps to after normalisation),
          and a horizontal flip with probability `hflip` (0 for digits: a flipped digit is another symbol).
- strong: an independent weak draw + a RandAugment-like policy for small grey images (`num_ops` ops per
          sample out of: rotate, shear-x, shear-y, zoom, brightness, contrast, sharpness/blur, gaussian
          noise (one of 8 patterns drawn per batch, random sign); each applied with probability `prob`;
          strength = level/10 of the op's maximum with timm's level noise `mstd` and a random sign), then
          random erasing (a box of 2 %..33 % of the area, aspect 0.3..3.3, filled with 0 = the mean) with
          probability `reprob`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dataloading.randaug import RandAugSpec

# The op maxima at level 10 (timm's ranges where timm has the op).
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_ZOOM = 0.3  # zoom factor 1 +- 0.3 (timm has no scale op; translations are already in weak)
MAX_ENHANCE = 0.9  # brightness / contrast / sharpness factor 1 +- 0.9
MAX_NOISE = 0.15  # gaussian noise std in pixel units ([0, 1] images)
OPS = ("rotate", "shear_x", "shear_y", "zoom", "brightness", "contrast", "sharpness", "noise")
NUM_OPS = len(OPS)
NOISE_POOL = 8
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


def _smooth(p: Tensor) -> Tensor:
    """PIL's SMOOTH filter [[1,1,1],[1,5,1],[1,1,1]] / 13, edges replicated; sums of shifted slices, because
    a depthwise conv2d on such small images costs far more in oneDNN's set-up than in arithmetic."""
    q = F.pad(p, (1, 1, 1, 1), mode="replicate")
    r = q[..., :, :-2] + q[..., :, 1:-1] + q[..., :, 2:]
    box = r[..., :-2, :] + r[..., 1:-1, :] + r[..., 2:, :]
    return (box + 4.0 * p) / 13.0


def _stats(x: Tensor, mean, std) -> tuple[Tensor, Tensor]:
    c = x.shape[1]
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    if m.shape[1] != c or s.shape[1] != c:
        raise ValueError(f"mean/std have {m.shape[1]}/{s.shape[1]} entries for {c} channels")
    return m, s


def _translation_flip(u: Tensor, h: int, w: int, translate: float, hflip: float) -> tuple[Tensor, Tensor]:
    """From 3 uniforms per sample: translation (B, 2) in grid units (whole pixels) and flip sign (B,)."""
    kx, ky = int(translate * w), int(translate * h)
    sx = torch.floor(u[:, 0] * (2 * kx + 1)) - kx  # pixels in -kx..kx, uniform
    sy = torch.floor(u[:, 1] * (2 * ky + 1)) - ky
    t = torch.stack((sx * (2.0 / w), sy * (2.0 / h)), dim=1)  # align_corners=False: 1 px = 2/side
    flip = 1.0 - 2.0 * (u[:, 2] < hflip).to(u.dtype)
    return t, flip


@functools.lru_cache(maxsize=16)
def _pixel_centres(h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Pixel centres in normalised coordinates (align_corners=False): x as (1, 1, 1, W), y as (1, H)."""
    xs = ((torch.arange(w, device=device, dtype=dtype) * 2 + 1) / w - 1).reshape(1, 1, 1, w)
    ys = ((torch.arange(h, device=device, dtype=dtype) * 2 + 1) / h - 1).reshape(1, h)
    return xs, ys


@functools.lru_cache(maxsize=16)
def _pixel_index(h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Row indices (1, H) and column indices (1, W) as floats."""
    return (torch.arange(h, device=device, dtype=dtype).reshape(1, h),
            torch.arange(w, device=device, dtype=dtype).reshape(1, w))


def _warp(x: Tensor, a: Tensor, t: Tensor, background: Tensor) -> Tensor:
    """out(p) = x(a p + t) in normalised coordinates; outside the image = background."""
    b, _, h, w = x.shape
    # F.affine_grid's grid, computed as (B, 2, H, W) planes by broadcasting and handed to grid_sample as
    # a (B, H, W, 2) view: affine_grid's bmm, or writing the interleaved layout, costs 2-3x more here
    xs, ys = _pixel_centres(h, w, x.device, x.dtype)
    rows = (a[:, :, 1:2] * ys + t.unsqueeze(2)).reshape(b, 2, h, 1)  # (B, 2, H, 1)
    grid = (rows + a[:, :, 0].reshape(b, 2, 1, 1) * xs).permute(0, 2, 3, 1)  # (B, H, W, 2)
    out = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + background


def weak(x: Tensor, generator: torch.Generator, *, mean: Sequence[float] | Tensor = (0.0,),
         std: Sequence[float] | Tensor = (1.0,), hflip: float = 0.0, translate: float = 0.125) -> Tensor:
    """Random whole-pixel translation (up to `translate` of the side) and flip with probability `hflip`."""
    b, _, h, w = x.shape
    m, s = _stats(x, mean, std)
    u = torch.rand(b, 3, generator=generator, device=x.device, dtype=x.dtype)
    t, flip = _translation_flip(u, h, w, translate, hflip)
    a = torch.zeros(b, 2, 2, dtype=x.dtype, device=x.device)
    a[:, 0, 0] = flip
    a[:, 1, 1] = 1.0
    return _warp(x, a, t, -m / s)


def strong(x: Tensor, generator: torch.Generator, magnitude: float = 9.0, *, mean: Sequence[float] | Tensor = (0.0,),
           std: Sequence[float] | Tensor = (1.0,), hflip: float = 0.0, translate: float = 0.125,
           reprob: float = 0.0, num_ops: int = 2, mstd: float = 0.0, prob: float = 0.5,
           mmax: float = 10.0, ops: Sequence[str] = OPS) -> Tensor:
    """Weak + RandAugment-like policy (level `magnitude` on timm's 0..10 scale) + random erasing.
    `ops` restricts the policy to a subset of OPS (the draws stay the same, so seeds stay comparable)."""
    b, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    m, s = _stats(x, mean, std)
    k = NUM_OPS
    u = torch.rand(b, 3 + 3 * k + 5 + 2, generator=generator, device=dev, dtype=dt)
    z = torch.randn(b, k, generator=generator, device=dev, dtype=dt)
    # unit gaussian noise: a pool of NOISE_POOL patterns, each sample takes one (random pick and sign);
    # a full (B, C, H, W) draw costs ~7 ns per number on CPU, more than the rest of the policy together
    pool = torch.randn(NOISE_POOL, c, h, w, generator=generator, device=dev, dtype=dt)

    # -- which ops each sample gets: `num_ops` distinct of the k, each kept with probability `prob`
    pick, keep, sign = u[:, 3:3 + k], u[:, 3 + k:3 + 2 * k], u[:, 3 + 2 * k:3 + 3 * k]
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; known: {OPS}")
    if len(set(ops)) < k:  # excluded ops score 2 > any uniform: never among the n picked
        allowed = torch.tensor([o in ops for o in OPS], device=dev)
        pick = torch.where(allowed, pick, torch.full_like(pick, 2.0))
    n = min(max(int(num_ops), 0), len(set(ops)))
    if n == 0:
        on = torch.zeros_like(pick, dtype=torch.bool)
    else:
        kth = pick.kthvalue(n, dim=1, keepdim=True).values
        on = (pick <= kth) & (keep < prob)
    # -- level per sample and op (timm: gaussian noise around the magnitude, clamped to [0, mmax])
    upper = min(mmax, 10.0)
    if math.isinf(mstd):
        level = magnitude * torch.special.ndtr(z)  # uniform in [0, magnitude]
    else:
        level = magnitude + mstd * z
    level = level.clamp(0.0, upper) / 10.0
    v = torch.where(on, level * (1.0 - 2.0 * (sign < 0.5).to(dt)), torch.zeros_like(level))  # (B, k) signed

    # -- geometry: one warp for translation/flip + rotate, shear, zoom
    t, flip = _translation_flip(u[:, :3], h, w, translate, hflip)
    ang = v[:, 0] * math.radians(MAX_ROTATE_DEG)
    cos, sin = torch.cos(ang), torch.sin(ang)
    shx, shy = v[:, 1] * MAX_SHEAR, v[:, 2] * MAX_SHEAR
    inv_zoom = 1.0 / (1.0 + v[:, 3] * MAX_ZOOM)
    # a = inv_zoom * R @ [[1, shx], [0, 1]] @ [[1, 0], [shy, 1]] @ diag(flip, 1)
    s00, s01, s10, s11 = 1.0 + shx * shy, shx, shy, torch.ones_like(shx)
    a = torch.stack((cos * s00 - sin * s10, cos * s01 - sin * s11,
                     sin * s00 + cos * s10, sin * s01 + cos * s11), dim=1).reshape(b, 2, 2)
    a = a * inv_zoom.reshape(b, 1, 1)
    a[:, :, 0] = a[:, :, 0] * flip.unsqueeze(1)
    out = _warp(x, a, t, -m / s)

    # -- photometric ops in pixel space [0, 1]
    p = out * s + m
    p = p * (1.0 + v[:, 4] * MAX_ENHANCE).reshape(b, 1, 1, 1)  # brightness: blend with black
    grey = p.mean(dim=(1, 2, 3), keepdim=True)
    p = grey + (1.0 + v[:, 5] * MAX_ENHANCE).reshape(b, 1, 1, 1) * (p - grey)  # contrast
    smooth = _smooth(p)
    p = smooth + (1.0 + v[:, 6] * MAX_ENHANCE).reshape(b, 1, 1, 1) * (p - smooth)  # sharpen (>1) / blur (<1)
    pick_noise = torch.clamp((u[:, -2] * NOISE_POOL).long(), max=NOISE_POOL - 1)
    noise_std = v[:, 7].abs() * MAX_NOISE * (1.0 - 2.0 * (u[:, -1] < 0.5).to(dt))
    p = p + noise_std.reshape(b, 1, 1, 1) * pool[pick_noise]  # gaussian noise
    out = (p.clamp(0.0, 1.0) - m) / s

    # -- random erasing: per sample, with probability reprob, a box filled with 0 (the mean)
    e = u[:, 3 + 3 * k:3 + 3 * k + 5]
    area = (ERASE_AREA[0] + e[:, 1] * (ERASE_AREA[1] - ERASE_AREA[0])) * (h * w)
    ratio = torch.exp(ERASE_LOG_RATIO[0] + e[:, 2] * (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]))
    bh = torch.sqrt(area * ratio).round().clamp(1, h)
    bw = torch.sqrt(area / ratio).round().clamp(1, w)
    y0 = torch.floor(e[:, 3] * (h - bh + 1))
    x0 = torch.floor(e[:, 4] * (w - bw + 1))
    ys, xs = _pixel_index(h, w, dev, dt)
    rows = (ys >= y0.unsqueeze(1)) & (ys < (y0 + bh).unsqueeze(1)) & (e[:, :1] < reprob)  # (B, H)
    cols = (xs >= x0.unsqueeze(1)) & (xs < (x0 + bw).unsqueeze(1))  # (B, W)
    box = rows.reshape(b, 1, h, 1) & cols.reshape(b, 1, 1, w)
    return out.masked_fill(box, 0.0)


class TensorAugment:
    """The views of one in-memory source, with its normalisation and policy bound (tensors on `device`)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, hflip: float, reprob: float,
                 policy: RandAugSpec | None, device: torch.device, translate: float = 0.125):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.hflip, self.reprob, self.translate = hflip, reprob, translate
        self.policy = policy or RandAugSpec(num_ops=0)  # randaug "": strong = weak + random erasing

    def weak(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return weak(x, generator, mean=self.mean, std=self.std, hflip=self.hflip, translate=self.translate)

    def strong(self, x: Tensor, generator: torch.Generator) -> Tensor:
        p = self.policy
        return strong(x, generator, p.magnitude, mean=self.mean, std=self.std, hflip=self.hflip,
                      translate=self.translate, reprob=self.reprob, num_ops=p.num_ops, mstd=p.mstd,
                      prob=p.prob, mmax=p.mmax)
