"""The Semi-ViT step as the original code runs it, for the GPU suite to measure the engine's step against.

Benchmark-only: the engine never imports this. The same model, batch and precision as the real step;
what differs is how the step is carried out, as in the original Semi-ViT / MAE / timm code:
  - labelled mixup with lam drawn on the host and materialised one-hot soft targets;
  - pseudo labels by softmax + max; pseudo mixup in a per-sample Python loop over a host copy of the
    mixing ratios (each read with `.item()`), cutmix boxes cut on the host;
  - soft targets materialised as (B, classes) tensors, loss = sum(-target * log_softmax) per sample;
  - `loss.item()` every step (the original's non-finite check) and `torch.cuda.synchronize()`;
  - torch.optim.AdamW with its default (non-fused) implementation;
  - the EMA teacher updated tensor by tensor with `mul_` / `add_` over the state dict (timm ModelEma).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def one_hot_smoothed(labels: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / classes
    return torch.full((labels.shape[0], classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)  # (B, classes)


def rand_bbox(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's cutmix box: side ratio sqrt(1 - lam), centre uniform, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y1, y2, x1, x2


class OriginalStep:
    def __init__(self, student: nn.Module, classes: int, threshold: float = 0.6, lambda_u: float = 5.0,
                 smoothing: float = 0.1, decay: float = 0.9999, lr: float = 1e-4, dtype=torch.bfloat16):
        self.student, self.classes = student, classes
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        self.threshold, self.lambda_u, self.smoothing = threshold, lambda_u, smoothing
        self.decay, self.dtype = decay, dtype
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.05)
        self.rng = np.random.default_rng(0)

    def pseudo_mixup(self, images: torch.Tensor, conf: torch.Tensor, labels: torch.Tensor):
        n, _, h, w = images.shape
        perm = torch.randperm(n, device=images.device)
        lam_host = (conf / (conf + conf[perm])).cpu()  # the host copy
        mixed = images.clone()
        lams = []
        for i in range(n):  # one sample at a time
            lam = lam_host[i].item()
            j = perm[i]
            if self.rng.random() < 0.5:
                y1, y2, x1, x2 = rand_bbox(h, w, lam, self.rng)
                mixed[i, :, y1:y2, x1:x2] = images[j, :, y1:y2, x1:x2]
                lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
            else:
                mixed[i] = lam * images[i] + (1.0 - lam) * images[j]
            lams.append(lam)
        lam_t = torch.tensor(lams, device=images.device)[:, None]  # (n, 1)
        target = lam_t * one_hot_smoothed(labels, self.classes, self.smoothing) + \
            (1.0 - lam_t) * one_hot_smoothed(labels[perm], self.classes, self.smoothing)
        mask = (torch.maximum(conf, conf[perm]) >= self.threshold).float()
        return mixed, target, mask

    def __call__(self, x: torch.Tensor, y: torch.Tensor, u_weak: torch.Tensor, u_strong: torch.Tensor) -> float:
        b = x.shape[0]
        device = x.device
        with torch.autocast(device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            lam = float(self.rng.beta(0.8, 0.8))  # labelled mixup, timm batch mode
            x_mixed = lam * x + (1.0 - lam) * x.flip(0)
            target_x = lam * one_hot_smoothed(y, self.classes, 0.1) + \
                (1.0 - lam) * one_hot_smoothed(y.flip(0), self.classes, 0.1)
            with torch.no_grad():
                probs = self.teacher(u_weak).float().softmax(-1)
                conf, pseudo = probs.max(-1)
            u_mixed, target_u, mask = self.pseudo_mixup(u_strong, conf, pseudo)
            logits = self.student(torch.cat([x_mixed, u_mixed])).float()
            loss_x = torch.sum(-target_x * F.log_softmax(logits[:b], dim=-1), dim=-1).mean()
            loss_u = (torch.sum(-target_u * F.log_softmax(logits[b:], dim=-1), dim=-1) * mask).mean()
            loss = loss_x + self.lambda_u * loss_u
        loss_value = loss.item()  # the per-step host sync of the original's non-finite check
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value}")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with torch.no_grad():  # EMA, one tensor at a time
            for t, s in zip(self.teacher.state_dict().values(), self.student.state_dict().values()):
                if t.dtype.is_floating_point:
                    t.mul_(self.decay).add_(s.detach(), alpha=1.0 - self.decay)
        return loss_value
