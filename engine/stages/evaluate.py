"""Top-1 / top-5 evaluation of the student and the teacher, summed across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.runtime import Runtime


@torch.no_grad()
def evaluate(model: nn.Module, stream, rt: Runtime) -> dict[str, float]:
    was_training = model.training
    model.eval()
    # (correct@1, correct@5, loss sum, count) stay on the device until the end: one sync per evaluation.
    totals = torch.zeros(4, device=rt.device, dtype=torch.float64)
    for images, labels in stream.epoch(0):
        with rt.autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices  # (B, k)
        hits = topk.eq(labels[:, None])
        totals[0] += hits[:, 0].sum()
        totals[1] += hits.any(dim=1).sum()
        totals[2] += F.cross_entropy(logits, labels, reduction="sum")
        totals[3] += labels.numel()
    model.train(was_training)
    c1, c5, loss, n = rt.all_reduce_sum(totals).tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n}


def evaluate_models(models: dict[str, nn.Module], stream, rt: Runtime) -> dict[str, float]:
    """{"student": m, "teacher": t} -> {"top1", "top5", "loss", "teacher_top1", ...}."""
    out: dict[str, float] = {}
    for role, model in models.items():
        prefix = "" if role == "student" else f"{role}_"
        out.update({prefix + k: v for k, v in evaluate(model, stream, rt).items()})
    return out
