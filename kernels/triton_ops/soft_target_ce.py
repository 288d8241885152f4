"""``semivit_triton::soft_target_ce`` (+ its backward): soft-target cross-entropy, closed form.

    soft_target_ce(Tensor logits, Tensor label_a, Tensor label_b, Tensor lam, float smoothing)
        -> (Tensor ce, Tensor lse)
    soft_target_ce_backward(Tensor grad_ce, Tensor logits, Tensor lse, Tensor label_a, Tensor label_b,
                            Tensor lam, float smoothing) -> Tensor

    lse_i = log sum_c exp(z_ic)
    ce_i  = lse_i - (1 - s)(lam_i z_{i,a_i} + (1 - lam_i) z_{i,b_i}) - (s / C) sum_c z_ic
    grad_z_ic = grad_ce_i (exp(z_ic - lse_i) - s / C - (1 - s)(lam_i [c = a_i] + (1 - lam_i) [c = b_i]))

Forward: one program per row, tiles of BLOCK_C over C with a per-lane online max / sum of exp and a
running sum of z; the two label logits are loaded directly. Backward: every element is independent
given lse, so the grid is (row, tile of C) (more parallel than one program per row when B is small:
80 rows of 21841 classes), one pass writing the gradient in the logits' dtype. The (B, C) soft target is never built.

Autograd: ``register_autograd`` makes ``soft_target_ce_backward`` the backward of ``soft_target_ce``
(gradient for ``logits`` only; ``lse`` is marked non-differentiable: it is saved for the backward).
Both are ``triton_op``s, so ``torch.compile(fullgraph=True)`` traces forward and backward.

Dtypes: logits float32 / bf16 / fp16, computed in float32; outputs ce, lse float32. float64 logits
are rejected with a ValueError (the contract wants float64 math; the kernel's scalar ``smoothing`` is
float32): route float64 to another backend. label_a, label_b int64 (B,), lam float32 (B,),
grad_ce float32 (B,).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

__all__ = ["CONFIG", "soft_target_ce", "soft_target_ce_backward"]

# forward: (BLOCK_C, num_warps) for C <= large_c and for larger C (one program per row: few rows of a
# large C want wide programs); backward: grid (B, cdiv(C, bwd_block_c)). The GPU bench sweeps these.
CONFIG = {"block_c": 1024, "num_warps": 4, "large_c": 4096, "block_c_large": 4096, "num_warps_large": 8,
          "bwd_block_c": 2048, "bwd_num_warps": 4}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _soft_ce_fwd_kernel(z_ptr, a_ptr, b_ptr, lam_ptr, ce_ptr, lse_ptr, C, smoothing, uniform,
                        BLOCK_C: tl.constexpr):
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
    za = tl.load(base + tl.load(a_ptr + row)).to(tl.float32)
    zb = tl.load(base + tl.load(b_ptr + row)).to(tl.float32)
    lam = tl.load(lam_ptr + row)
    # uniform = s / C, computed on the host (float64, rounded once to float32)
    ce = lse - (1.0 - smoothing) * (lam * za + (1.0 - lam) * zb) - uniform * tl.sum(zsum, axis=0)
    tl.store(ce_ptr + row, ce)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _soft_ce_bwd_kernel(g_ptr, z_ptr, lse_ptr, a_ptr, b_ptr, lam_ptr, out_ptr, C, smoothing, uniform,
                        BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offset = row.to(tl.int64) * C
    g = tl.load(g_ptr + row)
    lse = tl.load(lse_ptr + row)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    lam = tl.load(lam_ptr + row)
    valid = cols < C
    z = tl.load(z_ptr + offset + cols, mask=valid, other=0.0)
    wa = (1.0 - smoothing) * lam
    wb = (1.0 - smoothing) * (1.0 - lam)
    t = uniform + tl.where(cols == a, wa, 0.0) + tl.where(cols == b, wb, 0.0)  # the soft target
    grad = g * (tl.exp(z.to(tl.float32) - lse) - t)
    tl.store(out_ptr + offset + cols, grad.to(z.dtype), mask=valid)


def _check(logits: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor, name: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"triton {name}: logits must be float32/bf16/fp16 (float64 goes to another "
                         f"backend), got {logits.dtype}")
    B = logits.shape[0]
    for arg, t, dtype in (("label_a", label_a, torch.int64), ("label_b", label_b, torch.int64),
                          ("lam", lam, torch.float32)):
        if t.shape != (B,) or t.dtype != dtype:
            raise ValueError(f"triton {name}: {arg} must be ({B},) {dtype}, got {tuple(t.shape)} {t.dtype}")


@triton_op("semivit_triton::soft_target_ce", mutates_args=(),
           schema="(Tensor logits, Tensor label_a, Tensor label_b, Tensor lam, float smoothing) "
                  "-> (Tensor ce, Tensor lse)")
def soft_target_ce(logits: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor,
                   smoothing: float) -> tuple[Tensor, Tensor]:
    _check(logits, label_a, label_b, lam, "soft_target_ce")
    logits = logits.contiguous()
    B, C = logits.shape
    ce = torch.empty(B, dtype=torch.float32, device=logits.device)
    lse = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B:
        large = C > CONFIG["large_c"]
        block_c = min(CONFIG["block_c_large" if large else "block_c"], triton.next_power_of_2(max(C, 16)))
        wrap_triton(_soft_ce_fwd_kernel)[(B,)](logits, label_a.contiguous(), label_b.contiguous(),
                                               lam.contiguous(), ce, lse, C, smoothing, smoothing / C,
                                               BLOCK_C=block_c,
                                               num_warps=CONFIG["num_warps_large" if large else "num_warps"])
    return ce, lse


@triton_op("semivit_triton::soft_target_ce_backward", mutates_args=(),
           schema="(Tensor grad_ce, Tensor logits, Tensor lse, Tensor label_a, Tensor label_b, Tensor lam, "
                  "float smoothing) -> Tensor")
def soft_target_ce_backward(grad_ce: Tensor, logits: Tensor, lse: Tensor, label_a: Tensor, label_b: Tensor,
                            lam: Tensor, smoothing: float) -> Tensor:
    _check(logits, label_a, label_b, lam, "soft_target_ce_backward")
    logits = logits.contiguous()
    B, C = logits.shape
    grad = torch.empty_like(logits)
    if B and C:
        block_c = min(CONFIG["bwd_block_c"], triton.next_power_of_2(max(C, 16)))
        grid = (B, triton.cdiv(C, block_c))
        wrap_triton(_soft_ce_bwd_kernel)[grid](grad_ce.float().contiguous(), logits, lse.float().contiguous(),
                                               label_a.contiguous(), label_b.contiguous(), lam.contiguous(),
                                               grad, C, smoothing, smoothing / C, BLOCK_C=block_c,
                                               num_warps=CONFIG["bwd_num_warps"])
    return grad


@soft_target_ce.register_fake
def _(logits, label_a, label_b, lam, smoothing):
    _check(logits, label_a, label_b, lam, "soft_target_ce")
    B = logits.shape[0]
    return logits.new_empty(B, dtype=torch.float32), logits.new_empty(B, dtype=torch.float32)


@soft_target_ce_backward.register_fake
def _(grad_ce, logits, lse, label_a, label_b, lam, smoothing):
    _check(logits, label_a, label_b, lam, "soft_target_ce_backward")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    logits, label_a, label_b, lam, smoothing = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, lse, label_a, label_b, lam)
    ctx.smoothing = smoothing


def _backward(ctx, grad_ce: Tensor, grad_lse: Tensor | None):
    logits, lse, label_a, label_b, lam = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.semivit_triton.soft_target_ce_backward(grad_ce, logits, lse, label_a, label_b, lam,
                                                                ctx.smoothing)
    return grad, None, None, None, None


soft_target_ce.register_autograd(_backward, setup_context=_setup_context)
