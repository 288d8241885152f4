"""``semivit_triton::pseudo_mixup`` and ``semivit_triton::mix_batch``: one pass over the images.

Schemas, input check and fakes: ``kernels.contract``.

One kernel, grid (B, tiles of the C*H rows, tiles of the W columns): each program covers a BLOCK_H x BLOCK_W
tile of one sample (so an element's row and column need no integer division) and loads its sample's draws and
partner j, computes lam_i (pseudo: p_i / (p_i + p_j) in float32, 0.5 when p_i + p_j == 0) and the cutmix box
exactly as docs/kernels.md (r = sqrt(max(1 - lam, 0)) in float64, integer truncation, // 2, clamp), reads its
tile of x_i and x_j and writes the tile once: cutmix pixels are selected (exact copies), mixup pixels are x_j +
lam (x_i - x_j) in float32 (float64 for float64 images), rounded once, evaluated like ``torch.lerp`` (x_i - (x_i
- x_j)(1 - lam) when lam >= 0.5), so lam = 0 and lam = 1 give exact copies and float32 results match the torch
path bit for bit. The per-sample outputs (corrected lam, mask) are written by the first tile of each sample. No
host sync.

images float32 / bf16 / fp16 / float64, contiguous (B, C, H, W); prob / lam (B,) float32,
use_cutmix (B,) bool, cy, cx, partner (B,) int64. Registered with ``torch.library.triton_op``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from kernels import contract
from kernels.triton_ops.launch import launchable

__all__ = ["CONFIG", "mix_batch", "pseudo_mixup"]

CONFIG = {"block": 2048, "max_block_w": 1024, "num_warps": 8}


@triton.jit
def _mix_kernel(x_ptr, out_ptr, w_ptr, cut_ptr, cy_ptr, cx_ptr, partner_ptr, lam_out_ptr, mask_out_ptr,
                H, W, CH, CHW, threshold, PSEUDO: tl.constexpr, F64: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    i = tl.program_id(0)  # sample
    row_tile = tl.program_id(1)  # tile of the C * H rows of the sample
    col_tile = tl.program_id(2)  # tile of the W columns
    j = tl.load(partner_ptr + i)
    if PSEUDO:  # w = prob: lam = p_i / (p_i + p_j), 0.5 when both are 0
        p_i = tl.load(w_ptr + i)
        p_j = tl.load(w_ptr + j)
        total = p_i + p_j
        lam = tl.where(total == 0.0, 0.5, tl.math.div_rn(p_i, tl.where(total == 0.0, 1.0, total)))  # IEEE division
    else:  # w = lam
        lam = tl.load(w_ptr + i)
    cut = tl.load(cut_ptr + i) != 0
    # the box, in float64 like the spec's Python arithmetic
    r = tl.sqrt(tl.maximum(1.0 - lam.to(tl.float64), 0.0))
    half_h = (H * r).to(tl.int64) // 2
    half_w = (W * r).to(tl.int64) // 2
    cy = tl.load(cy_ptr + i)
    cx = tl.load(cx_ptr + i)
    y0 = tl.minimum(tl.maximum(cy - half_h, 0), H).to(tl.int32)
    y1 = tl.minimum(tl.maximum(cy + half_h, 0), H).to(tl.int32)
    x0 = tl.minimum(tl.maximum(cx - half_w, 0), W).to(tl.int32)
    x1 = tl.minimum(tl.maximum(cx + half_w, 0), W).to(tl.int32)

    rows = row_tile * BLOCK_H + tl.arange(0, BLOCK_H)  # (c, y) flattened: c * H + y
    cols = col_tile * BLOCK_W + tl.arange(0, BLOCK_W)  # x
    valid = (rows < CH)[:, None] & (cols < W)[None, :]
    offs = rows[:, None] * W + cols[None, :]  # (BLOCK_H, BLOCK_W) within the sample
    xi = tl.load(x_ptr + i.to(tl.int64) * CHW + offs, mask=valid, other=0.0)
    xj = tl.load(x_ptr + j.to(tl.int64) * CHW + offs, mask=valid, other=0.0)
    if cut:
        y = rows % H  # one division per row, none per element
        inside = ((y >= y0) & (y < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
        out = tl.where(inside, xj, xi)  # exact copies, no arithmetic
    else:
        # x_j + lam (x_i - x_j) evaluated like torch.lerp(x_j, x_i, lam): from the nearer end, so that
        # lam = 0 gives x_j and lam = 1 gives x_i exactly
        if F64:
            a = xi.to(tl.float64)
            b = xj.to(tl.float64)
            wt = lam.to(tl.float64)
        else:
            a = xi.to(tl.float32)
            b = xj.to(tl.float32)
            wt = lam
        d = a - b
        out = tl.where(wt < 0.5, b + wt * d, a - d * (1.0 - wt)).to(xi.dtype)
    tl.store(out_ptr + i.to(tl.int64) * CHW + offs, out, mask=valid)

    if (row_tile == 0) & (col_tile == 0):  # the sample's first tile writes its lam (and mask)
        area = ((y1 - y0) * (x1 - x0)).to(tl.float64)
        lam_box = (1.0 - area / tl.cast(H * W, tl.float64)).to(tl.float32)
        tl.store(lam_out_ptr + i, tl.where(cut, lam_box, lam))
        if PSEUDO:
            tl.store(mask_out_ptr + i, (tl.maximum(p_i, p_j) >= threshold).to(tl.float32))


def _check(op: str, images: Tensor, w: Tensor, use_cutmix: Tensor, cy: Tensor, cx: Tensor, partner: Tensor) -> None:
    contract.check_mix(op, images, w, use_cutmix, cy, cx, partner)
    if images[0].numel() >= 2**31:  # the kernel's offsets within a sample are int32
        raise ValueError("triton mix: one sample must have fewer than 2**31 elements")


def _launch(images: Tensor, w: Tensor, use_cutmix: Tensor, cy: Tensor, cx: Tensor, partner: Tensor,
            threshold: float, pseudo: bool) -> tuple[Tensor, Tensor, Tensor]:
    images = images.contiguous()
    B, C, H, W = images.shape
    out = torch.empty_like(images)
    lam = torch.empty(B, dtype=torch.float32, device=images.device)
    mask = torch.empty(B, dtype=torch.float32, device=images.device)
    CHW = C * H * W
    if B and CHW:
        # tiles of BLOCK_H rows x BLOCK_W columns (about CONFIG["block"] elements): the row / column of
        # an element is known without a per-element integer division
        block_w = min(triton.next_power_of_2(W), CONFIG["max_block_w"], CONFIG["block"])
        block_h = max(1, CONFIG["block"] // block_w)
        grid = (B, triton.cdiv(C * H, block_h), triton.cdiv(W, block_w))
        launchable(_mix_kernel)[grid](
            images, out, w.contiguous(), use_cutmix.contiguous(), cy.contiguous(), cx.contiguous(),
            partner.contiguous(), lam, mask, H, W, C * H, CHW, threshold, PSEUDO=pseudo,
            F64=images.dtype == torch.float64, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=CONFIG["num_warps"])
    return out, lam, mask


@triton_op("semivit_triton::pseudo_mixup", mutates_args=(), schema=contract.SCHEMAS["pseudo_mixup"])
def pseudo_mixup(images: Tensor, prob: Tensor, use_cutmix: Tensor, cy: Tensor, cx: Tensor, partner: Tensor,
                 threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    _check("pseudo_mixup", images, prob, use_cutmix, cy, cx, partner)
    return _launch(images, prob, use_cutmix, cy, cx, partner, threshold, pseudo=True)


@triton_op("semivit_triton::mix_batch", mutates_args=(), schema=contract.SCHEMAS["mix_batch"])
def mix_batch(images: Tensor, lam: Tensor, use_cutmix: Tensor, cy: Tensor, cx: Tensor,
              partner: Tensor) -> tuple[Tensor, Tensor]:
    _check("mix_batch", images, lam, use_cutmix, cy, cx, partner)
    out, lam_out, _ = _launch(images, lam, use_cutmix, cy, cx, partner, 0.0, pseudo=False)
    return out, lam_out


contract.register_fakes("semivit_triton", ("pseudo_mixup", "mix_batch"))
