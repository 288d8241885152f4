"""AdamW with layer-wise lr decay, and the per-iteration cosine schedule with linear warm-up."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from engine.config import OptimConfig, ScheduleConfig


def absolute_lr(optim: OptimConfig, global_batch: int) -> float:
    """lr = blr * global batch / 256 (the linear scaling rule), unless an absolute lr is given."""
    return optim.lr if optim.lr > 0 else optim.blr * global_batch / 256


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Groups by (layer, decay/no-decay). Each carries `lr_scale` = layer_decay ** (num_layers - layer_id):
    the head learns at the full lr, the patch embedding at layer_decay ** num_layers of it (BEiT/MAE rule).
    Biases, norms and the tokens/position embedding get no weight decay."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    num_layers = getattr(model, "num_layers", 0)
    layer_of = getattr(model, "layer_id", None)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in skip
        layer = layer_of(name) if (layer_of and num_layers) else num_layers
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (num_layers - layer), "layer": layer}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.AdamW:
    groups = param_groups(model, optim.weight_decay, optim.layer_decay)
    # The fused kernel (CPU and CUDA) is one launch for all tensors and honours `found_inf`, which lets
    # the trainer skip a non-finite step without a host sync.
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)


class CosineSchedule:
    """lr at a fractional epoch: linear warm-up from 0, then half-cosine down to min_lr (per iteration)."""

    def __init__(self, base_lr: float, schedule: ScheduleConfig):
        self.base_lr = base_lr
        self.min_lr = min(schedule.min_lr, base_lr)
        self.warmup = schedule.warmup_epochs
        self.epochs = schedule.epochs

    def __call__(self, epoch: float) -> float:
        if epoch < self.warmup:
            return self.base_lr * epoch / self.warmup
        span = max(self.epochs - self.warmup, 1e-12)
        progress = min((epoch - self.warmup) / span, 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, epoch: float) -> float:
        lr = self(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
