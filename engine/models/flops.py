"""Model cost: forward GFLOPs per image (counted on the meta device, no real memory) and parameter counts."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from .vit import build_vit


def forward_gflops(model: nn.Module | str, img_size: int | tuple[int, int]) -> float:
    """GFLOPs of one forward pass for ONE image (a multiply-add counts 2, as FlopCounterMode counts).

    ``model`` is a module on any device, or an arch name from ``ARCHS`` (built on the meta device at
    ``img_size``). The forward always runs on meta tensors: a real model's parameters are swapped for meta
    stand-ins with ``functional_call``, so nothing is copied. Attention is counted through the explicit
    ``math`` path (two batched matmuls), so the count does not depend on whether this torch version's
    flop counter sees fused SDPA / xformers kernels on meta tensors.
    """
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if isinstance(model, str):
        with torch.device("meta"):
            model = build_vit(model, img_size=hw)
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    in_chans = proj.in_channels if proj is not None else 3
    x = torch.empty(1, in_chans, *hw, device="meta")  # (1, C, H, W)
    meta = {n: torch.empty_like(t, device="meta") for n, t in [*model.named_parameters(), *model.named_buffers()]}

    backend = getattr(model, "attn_backend", None)
    was_training = model.training
    try:
        if backend is not None and backend != "math":
            model.set_attn_backend("math")
        model.eval()  # no drop path / checkpointing in the count
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            functional_call(model, meta, (x,))
    finally:
        model.train(was_training)
        if backend is not None and backend != "math":
            model.set_attn_backend(backend)
    return counter.get_total_flops() / 1e9


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once); frozen ones too unless ``trainable_only``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
