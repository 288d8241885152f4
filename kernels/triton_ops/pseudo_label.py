"""``semivit_triton::pseudo_label``: max softmax probability, argmax and confidence mask in one pass.

Schema, input check and fake: ``kernels.contract``.

One program per row walks C in tiles of BLOCK_C, keeping per lane a running max, a running sum of
exp(z - max) (rescaled by exp(old max - new max) when the max grows) and the first index of the max.
At the end the lanes are merged: prob = 1 / sum exp(z - max z) (float32), label = smallest index
holding the max (int64), mask = float32(prob >= threshold). The softmax is never written.

Logits float32 / bf16 / fp16 / float64 (all computed in float32, like the reference); contiguous
(B, C). Registered with ``torch.library.triton_op``: ``torch.compile`` sees the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from kernels import contract
from kernels.triton_ops.launch import launchable

__all__ = ["CONFIG", "pseudo_label"]

# (BLOCK_C, num_warps) for C <= large_c and for larger C; the GPU bench sweeps these
CONFIG = {"block_c": 1024, "num_warps": 4, "large_c": 4096, "block_c_large": 4096, "num_warps_large": 8}


@triton.jit
def _pseudo_label_kernel(z_ptr, prob_ptr, label_ptr, mask_ptr, C, threshold, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * C
    lanes = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)  # running max per lane
    s = tl.zeros([BLOCK_C], tl.float32)  # running sum of exp(z - m) per lane
    idx = tl.zeros([BLOCK_C], tl.int32)  # first index of the lane's max
    for c0 in tl.range(0, C, BLOCK_C):
        cols = c0 + lanes
        z = tl.load(base + cols, mask=cols < C, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, z)
        ref = tl.where(new_m == float("-inf"), 0.0, new_m)  # lanes still at -inf: s stays 0, no NaN
        s = s * tl.exp(m - ref) + tl.exp(z - ref)
        idx = tl.where(z > m, cols, idx)  # strict: an equal later value keeps the first index
        m = new_m
    zmax = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - zmax), axis=0)  # lanes at -inf have s = 0 (zmax is finite)
    label = tl.min(tl.where(m == zmax, idx, C), axis=0)
    prob = tl.math.div_rn(1.0, total)  # IEEE division: the mask compares it with the threshold
    tl.store(prob_ptr + row, prob)
    tl.store(label_ptr + row, label.to(tl.int64))
    tl.store(mask_ptr + row, (prob >= threshold).to(tl.float32))


@triton_op("semivit_triton::pseudo_label", mutates_args=(), schema=contract.SCHEMAS["pseudo_label"])
def pseudo_label(logits: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    contract.check_pseudo_label(logits)
    logits = logits.contiguous()
    B, C = logits.shape
    prob = torch.empty(B, dtype=torch.float32, device=logits.device)
    label = torch.empty(B, dtype=torch.int64, device=logits.device)
    mask = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B:
        large = C > CONFIG["large_c"]
        block_c = min(CONFIG["block_c_large" if large else "block_c"], triton.next_power_of_2(max(C, 16)))
        launchable(_pseudo_label_kernel)[(B,)](logits, prob, label, mask, C, threshold, BLOCK_C=block_c,
                                                num_warps=CONFIG["num_warps_large" if large else "num_warps"])
    return prob, label, mask


contract.register_fakes("semivit_triton", ("pseudo_label",))
