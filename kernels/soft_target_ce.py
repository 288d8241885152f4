"""Masked soft-target cross-entropy for mixed hard labels, without materialising the soft target.

Soft target t_i = (1 - s) (lam_i onehot(a_i) + (1 - lam_i) onehot(b_i)) + s / C. Since sum_c t_ic = 1:
    CE_i = -sum_c t_ic log softmax(z_i)_c
         = logsumexp(z_i) - (1 - s)(lam_i z_{i,a_i} + (1 - lam_i) z_{i,b_i}) - (s / C) sum_c z_ic
    loss = (1 / B) sum_i mask_i CE_i          (masked-out samples count as zeros in the mean)
    dloss / dz_i = mask_i / B (softmax(z_i) - t_i)
Computed in float32 (or float64 for float64 logits) whatever the logits' dtype.

Public API: ``soft_target_cross_entropy`` (dispatch: Triton / native / torch, see ``kernels.dispatch``),
``soft_target_cross_entropy_reference`` (spec).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels import dispatch

__all__ = ["soft_target_cross_entropy", "soft_target_cross_entropy_reference"]


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _check(logits: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    B = logits.shape[0]
    if label_a.shape != (B,) or label_b.shape != (B,):
        raise ValueError(f"labels must be ({B},), got {tuple(label_a.shape)}, {tuple(label_b.shape)}")
    if lam.dim() > 1 or (lam.dim() == 1 and lam.shape[0] != B):
        raise ValueError(f"lam must be ({B},) or a scalar tensor, got {tuple(lam.shape)}")


def soft_target_cross_entropy_reference(
    logits: Tensor,
    label_a: Tensor,
    label_b: Tensor,
    lam: Tensor,
    mask: Tensor | None = None,
    smoothing: float = 0.1,
) -> Tensor:
    """The spec: build the (B, C) soft target and take -sum t log_softmax(z); plain autograd."""
    _check(logits, label_a, label_b, lam)
    B, C = logits.shape
    dt = _compute_dtype(logits)
    lam = lam.to(dt).expand(B)[:, None]  # (B, 1)
    t = lam * torch.nn.functional.one_hot(label_a, C) + (1 - lam) * torch.nn.functional.one_hot(label_b, C)
    t = (1 - smoothing) * t + smoothing / C  # (B, C)
    ce = -(t * torch.log_softmax(logits.to(dt), dim=-1)).sum(-1)  # (B,)
    if mask is not None:
        ce = ce * mask.to(dt)
    return ce.mean()


class _SoftTargetCE(torch.autograd.Function):
    """CE_i written on the log-probabilities lp = z - logsumexp(z), same closed form (sum_c t_ic = 1):
    CE_i = -(1 - s)(lam_i lp_{i,a_i} + (1 - lam_i) lp_{i,b_i}) - (s / C) sum_c lp_ic.
    One log_softmax pass; lp is kept for the backward, where softmax = exp(lp)."""

    @staticmethod
    def forward(ctx, logits: Tensor, idx: Tensor, lam: Tensor, mask: Tensor, smoothing: float):
        B, C = logits.shape
        lp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)  # (B, C)
        lam = lam.to(lp.dtype).expand(B)  # (B,)
        wt = torch.stack((lam, 1 - lam), dim=1).mul_(1 - smoothing)  # (B, 2) target weight beyond s / C
        mask = mask.to(lp.dtype)  # (B,)
        neg_ce = (lp.gather(1, idx) * wt).sum(1).add_(lp.sum(1), alpha=smoothing / C)  # (B,) -CE_i
        ctx.save_for_backward(lp, idx, wt, mask)
        ctx.smoothing = smoothing
        ctx.logits_dtype = logits.dtype
        return -torch.dot(mask, neg_ce) / B

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        lp, idx, wt, mask = ctx.saved_tensors
        B, C = lp.shape
        g = lp.exp().sub_(ctx.smoothing / C)  # (B, C) softmax - s / C
        g.scatter_add_(1, idx, -wt)  # - (1 - s)(lam onehot(a) + (1 - lam) onehot(b))
        g.mul_((mask * (grad_out / B))[:, None])
        return g.to(ctx.logits_dtype), None, None, None, None


def soft_target_cross_entropy(
    logits: Tensor,
    label_a: Tensor,
    label_b: Tensor,
    lam: Tensor,
    mask: Tensor | None = None,
    smoothing: float = 0.1,
    backend: str | None = None,
) -> Tensor:
    """Masked mean soft-target cross-entropy; logits (B, C) any float dtype, label_a / label_b (B,)
    int64, lam (B,) weight of label_a, mask (B,) or None (all ones). Returns a 0-d float32 tensor
    (float64 for float64 logits). Gradient flows to ``logits`` only; closed form, no (B, C) target.
    ``backend``: see ``kernels.dispatch`` (None = the process default, ``run.kernels``). The fused
    ops compute the masked mean in the kernel and, when the logits need a gradient, write
    d loss / d logits in the same pass over each row (the softmax's exponentials are already there);
    their registered backward multiplies it by the upstream gradient: one autograd node, no
    exponential in the backward. The mask is used in float32 by the fused ops.
    """
    _check(logits, label_a, label_b, lam)
    impl = dispatch.resolve(backend, logits.device, logits.dtype)
    if impl == "reference":
        return soft_target_cross_entropy_reference(logits, label_a, label_b, lam, mask, smoothing)
    B = logits.shape[0]
    if impl != "torch":  # one op: loss and (when needed) the gradient; see kernels/csrc/soft_target_ce.cpp
        if lam.dim() == 0 or lam.dtype != torch.float32:
            lam = lam.float().expand(B)
        if mask is not None and mask.dtype != torch.float32:
            mask = mask.float()
        with_grad = logits.requires_grad and torch.is_grad_enabled()
        loss, _ = dispatch.op(impl, "soft_target_ce")(logits.contiguous(), label_a, label_b, lam.contiguous(),
                                                      None if mask is None else mask.contiguous(), smoothing,
                                                      with_grad)
        return loss
    if mask is None:
        mask = torch.ones(B, dtype=_compute_dtype(logits), device=logits.device)
    # the labels travel as one (B, 2) tensor: without mixup label_a is label_b, and torch.compile cannot
    # trace an autograd.Function given the same tensor twice (a graph break)
    return _SoftTargetCE.apply(logits, torch.stack((label_a, label_b), dim=1), lam, mask, smoothing)
