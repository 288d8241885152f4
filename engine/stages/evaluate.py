"""Top-1 / top-5 evaluation of the student and the teacher, summed across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.runtime import Runtime
from engine.sharding import is_sharded


@torch.no_grad()
def evaluate(model: nn.Module, stream, rt: Runtime) -> dict[str, float]:
    was_training = model.training
    model.eval()
    # (correct@1, correct@5, loss sum, count) stay on the device until the end: one sync per evaluation.
    totals = torch.zeros(4, device=rt.device, dtype=torch.float64)
    extra = extra_forwards(model, stream, rt)  # before the first forward: collectives in the same order
    images = None
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
    for _ in range(extra):
        with rt.autocast():
            model(images[:1])  # FSDP2's all-gathers need every rank: a rank with one batch fewer joins them
    model.train(was_training)
    c1, c5, loss, n = rt.all_reduce_sum(totals).tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n}


def extra_forwards(model: nn.Module, stream, rt: Runtime) -> int:
    """Evaluation shards are uneven (no padded duplicates): under FSDP2 a rank with fewer batches runs
    this many extra forwards, whose outputs are discarded, so that every forward's collectives match."""
    if not (rt.distributed and is_sharded(model)):
        return 0
    most = torch.tensor([float(len(stream))], device=rt.device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item()) - len(stream)


def evaluate_models(models: dict[str, nn.Module], stream, rt: Runtime) -> dict[str, float]:
    """{"student": m, "teacher": t} -> {"top1", "top5", "loss", "teacher_top1", ...}."""
    out: dict[str, float] = {}
    for role, model in models.items():
        prefix = "" if role == "student" else f"{role}_"
        out.update({prefix + k: v for k, v in evaluate(model, stream, rt).items()})
    return out
