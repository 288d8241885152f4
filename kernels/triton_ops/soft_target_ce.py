"""``semivit_triton::soft_target_ce``: the masked mean soft-target cross-entropy, closed form, and its gradient.

Schema, input check and fake: ``kernels.contract``.

    lse_i = log sum_c exp(z_ic)
    ce_i  = lse_i - (1 - s)(lam_i z_{i,a_i} + (1 - lam_i) z_{i,b_i}) - (s / C) sum_c z_ic
    loss  = (1 / B) sum_i mask_i ce_i                                  (0-d float32)
    grad_ic = d loss / d z_ic
            = (mask_i / B)(exp(z_ic - lse_i) - s / C - (1 - s)(lam_i [c = a_i] + (1 - lam_i) [c = b_i]))
              ((B, C) float32 when with_grad, else shape (0,))

One program per row: tiles of BLOCK_C over C with a per-lane online max / sum of exp and a running sum
of z; the two label logits are loaded directly; with the gradient, a second sweep over the row (hot in
L2) writes it. The per-row masked CE is summed by torch in row order (deterministic). The (B, C) soft
target is never built.

Autograd: ``register_autograd``; the backward is the saved gradient times the upstream gradient,
rounded once to the logits' dtype (``grad`` is marked non-differentiable). A ``triton_op``, so
``torch.compile(fullgraph=True)`` traces forward and backward.

Dtypes: logits float32 / bf16 / fp16, computed in float32. float64 logits are rejected with a
ValueError (the contract wants float64 math; the kernel's scalar ``smoothing`` is float32): route
float64 to another backend. label_a, label_b int64 (B,), lam float32 (B,), mask float32 (B,) or None.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from kernels import contract
from kernels.triton_ops.launch import launchable

__all__ = ["CONFIG", "soft_target_ce"]

# (BLOCK_C, num_warps) for C <= large_c and for larger C (one program per row: few rows of a large C
# want wide programs). The GPU bench sweeps these.
CONFIG = {"block_c": 1024, "num_warps": 4, "large_c": 4096, "block_c_large": 4096, "num_warps_large": 8}


@triton.jit
def _soft_ce_kernel(z_ptr, a_ptr, b_ptr, lam_ptr, mask_ptr, wce_ptr, grad_ptr, C, inv_b, smoothing, uniform,
                    HAS_MASK: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * C
    lanes = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_C], tl.float32)
    zsum = tl.zeros([BLOCK_C], tl.float32)
    for c0 in tl.range(0, C, BLOCK_C):
        cols = c0 + lanes
        valid = cols < C
        z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, z)
        ref = tl.where(new_m == float("-inf"), 0.0, new_m)  # no NaN from -inf - -inf
        s = s * tl.exp(m - ref) + tl.exp(z - ref)
        m = new_m
        zsum += tl.where(valid, z, 0.0)
    zmax = tl.max(m, axis=0)
    lse = zmax + tl.log(tl.sum(s * tl.exp(m - zmax), axis=0))
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    za = tl.load(base + a).to(tl.float32)
    zb = tl.load(base + b).to(tl.float32)
    lam = tl.load(lam_ptr + row)
    # uniform = s / C, computed on the host (float64, rounded once to float32)
    ce = lse - (1.0 - smoothing) * (lam * za + (1.0 - lam) * zb) - uniform * tl.sum(zsum, axis=0)
    weight = tl.load(mask_ptr + row) if HAS_MASK else 1.0
    tl.store(wce_ptr + row, weight * ce)
    if WITH_GRAD:
        f = weight * inv_b  # d loss / d ce_i
        wa = (1.0 - smoothing) * lam
        wb = (1.0 - smoothing) * (1.0 - lam)
        out = grad_ptr + row.to(tl.int64) * C
        for c0 in tl.range(0, C, BLOCK_C):
            cols = c0 + lanes
            valid = cols < C
            z = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
            t = uniform + tl.where(cols == a, wa, 0.0) + tl.where(cols == b, wb, 0.0)  # the soft target
            tl.store(out + cols, f * (tl.exp(z - lse) - t), mask=valid)


@triton_op("semivit_triton::soft_target_ce", mutates_args=(), schema=contract.SCHEMAS["soft_target_ce"])
def soft_target_ce(logits: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor, mask: Tensor | None,
                   smoothing: float, with_grad: bool) -> tuple[Tensor, Tensor]:
    contract.check_soft_target_ce(logits, label_a, label_b, lam, mask, contract.FLOATS_32)
    logits = logits.contiguous()
    B, C = logits.shape
    wce = torch.empty(B, dtype=torch.float32, device=logits.device)  # mask_i ce_i
    grad = torch.empty((B, C) if with_grad else (0,), dtype=torch.float32, device=logits.device)
    if B:
        large = C > CONFIG["large_c"]
        block_c = min(CONFIG["block_c_large" if large else "block_c"], triton.next_power_of_2(max(C, 16)))
        launchable(_soft_ce_kernel)[(B,)](
            logits, label_a.contiguous(), label_b.contiguous(), lam.contiguous(),
            wce if mask is None else mask.contiguous(), wce, grad, C, 1.0 / B, smoothing, smoothing / C,
            HAS_MASK=mask is not None, WITH_GRAD=with_grad, BLOCK_C=block_c,
            num_warps=CONFIG["num_warps_large" if large else "num_warps"])
    return wce.sum() / B, grad


contract.register_fakes("semivit_triton", ("soft_target_ce",))


def _setup_context(ctx, inputs, output) -> None:
    logits, *_, with_grad = inputs
    _, grad = output
    if ctx.needs_input_grad[0] and not with_grad:
        raise RuntimeError("semivit_triton::soft_target_ce: the logits require a gradient; call it with "
                           "with_grad=True")
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)
    ctx.logits_dtype = logits.dtype


def _backward(ctx, grad_loss: Tensor, _grad_grad: Tensor | None):
    (grad,) = ctx.saved_tensors
    return (grad * grad_loss).to(ctx.logits_dtype), None, None, None, None, None, None


soft_target_ce.register_autograd(_backward, setup_context=_setup_context)
