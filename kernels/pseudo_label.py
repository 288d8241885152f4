"""Pseudo labels from the teacher's logits on the weak views.

p = max softmax probability, y_hat = argmax, mask = (p >= threshold). Softmax in float32 even for
bf16 logits. No gradient flows (the teacher runs without grad anyway).

Public API: ``pseudo_label`` (dispatch), ``pseudo_label_reference`` (the spec).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import dispatch

__all__ = ["pseudo_label", "pseudo_label_reference"]


def _check(logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")


@torch.no_grad()
def pseudo_label_reference(logits: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """The spec: full softmax, then max. Returns (prob (B,) f32, label (B,) i64, mask (B,) f32)."""
    _check(logits)
    probs = torch.softmax(logits.float(), dim=-1)  # (B, C)
    prob, label = probs.max(dim=-1)  # (B,), (B,)
    return prob, label, (prob >= threshold).float()


@torch.no_grad()
def pseudo_label(logits: Tensor, threshold: float, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (prob (B,) float32, label (B,) int64, mask (B,) float32); no host sync.

    The max probability is 1 / sum_c exp(z_c - max z), so the (B, C) probability tensor is never
    written: the fused kernels make one online pass over each row (running max and sum of
    exponentials); the torch version one max pass and one exp-sum pass.
    ``backend``: see ``kernels.dispatch`` (None = the process default, ``run.kernels``).
    """
    _check(logits)
    impl = dispatch.resolve(backend, logits.device, logits.dtype)
    if impl == "reference":
        return pseudo_label_reference(logits, threshold)
    if impl != "torch":
        return dispatch.op(impl, "pseudo_label")(logits.contiguous(), threshold)
    z = logits.float()  # (B, C)
    zmax, label = z.max(dim=-1)  # (B,), (B,)
    prob = (z - zmax.unsqueeze(1)).exp_().sum(dim=-1).reciprocal_()  # (B,)
    return prob, label, (prob >= threshold).float()
