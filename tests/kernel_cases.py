"""What the per-op kernel tests share: the implementations, the awkward cases, one tolerance table.

Each ``tests/unit/test_op_*.py`` runs its op once per implementation (reference, torch, native, Triton;
``impl`` in conftest.py) x case x dtype and compares outputs and gradients with the reference, with
these tolerances; inputs are made on the CPU and moved to ``impl_device(impl)``.
"""

from __future__ import annotations

import pytest
import torch

import kernels.dispatch
from kernels import KernelUnavailable
from kernels.pseudo_mixup import MixDraws, random_derangement

IMPLEMENTATIONS = ("reference", "torch", "native", "triton")
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# results rounded once to each dtype (the kernels compute in float32, float64 for float64), plus the
# reference's own rounding
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}

# (B, C): one class, tiny, odd, ImageNet-1k and ImageNet-21k widths (no block size divides them)
LOGIT_CASES = [(1, 1), (5, 7), (3, 1000), (2, 21841)]
# (B, C, H, W): H x W that fit no block, a one-row image, one channel
IMAGE_CASES = [(2, 1, 13, 17), (6, 3, 7, 5), (6, 2, 1, 5)]
# EMA tensor sizes: empty, single elements, odd sizes, two spanning the threads' shares and chunks
EMA_SIZES = [1, 3, 70001, 7, 0, 65536, 5, 13 * 17]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def runs(impl: str, dtype: torch.dtype) -> bool:
    """The Triton kernels compute with float32 scalars: the dispatcher refuses float64 for them."""
    return not (impl == "triton" and dtype == torch.float64)


def awkward_logits(B: int, C: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random rows, plus (when there is room) a tie for the maximum, a uniform row and a -inf entry."""
    z = torch.randn(B, C, generator=gen(seed)) * 4
    if B >= 3 and C >= 3:
        z[0, 2] = z[0].max() + 1  # a tie: the first index wins
        z[0, C - 1] = z[0, 2]
        z[1] = z[1, 0]  # all equal: prob 1 / C, label 0
        z[2, 1] = -float("inf")
    return z.to(dtype)


def border_draws(B: int, H: int, W: int, seed: int, cut_every: int = 2) -> MixDraws:
    """Deterministic draws that put box centres on every border: cy, cx cycle 0, H-1 / W-1, middle."""
    g = gen(seed)
    use_cutmix = (torch.arange(B) % cut_every) == 0
    cy = torch.tensor([(0, H - 1, H // 2, min(1, H - 1))[i % 4] for i in range(B)])
    cx = torch.tensor([(W - 1, 0, W // 3, max(W - 2, 0))[(i // 2) % 4] for i in range(B)])
    return MixDraws(use_cutmix, cy, cx, random_derangement(B, "cpu", g))


def ce_inputs(B: int, C: int, dtype: torch.dtype, seed: int = 0):
    """logits, label_a, label_b, lam with a = b in the first row and the first and last class in the last."""
    g = gen(seed)
    logits = (torch.randn(B, C, generator=g) * 3).to(dtype)
    label_a = torch.randint(0, C, (B,), generator=g)
    label_b = torch.randint(0, C, (B,), generator=g)
    label_b[0] = label_a[0]  # a = b
    label_a[-1], label_b[-1] = 0, C - 1  # first and last class
    lam = torch.rand(B, generator=g)
    return logits, label_a, label_b, lam


def runs_float64(backend: str) -> bool:
    """Triton kernels compute in float32: for them a float64 test checks the clear refusal instead
    ('auto' sends float64 to native or torch)."""
    if backend != "triton":
        return True
    with pytest.raises(KernelUnavailable, match="float64 is not supported"):
        kernels.dispatch.resolve("triton", torch.device("cpu"), torch.float64)
    return False
