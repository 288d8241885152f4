"""Metrics: summed on the device every step, read to the host only on logging steps.

Each logging step costs one host sync (one stacked tensor, one all-reduce across ranks); records go
to metrics.jsonl and TensorBoard on rank 0.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from engine.config import LoggingConfig
from engine.runtime import Runtime


class MetricLogger:
    def __init__(self, run_dir: Path, runtime: Runtime, cfg: LoggingConfig, stage: str):
        self.runtime, self.cfg, self.stage = runtime, cfg, stage
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0
        self.t0 = time.perf_counter()
        self.jsonl = None
        self.tb = None
        if runtime.is_main:
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def accumulate(self, metrics: dict[str, torch.Tensor], images: int) -> None:
        """Add this step's device tensors to the running sums (no host sync)."""
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.steps += 1
        self.images += images

    def flush(self, step: int, epoch: float, host: dict[str, float], derive=None) -> dict[str, float]:
        """The logging step: one sync, means over the steps since the last flush, written out."""
        record: dict[str, float] = {}
        if self.sums:
            keys = sorted(self.sums)
            stacked = torch.stack([self.sums[k] for k in keys])
            stacked = self.runtime.all_reduce_sum(stacked) / self.runtime.world_size
            record = {k: v / max(self.steps, 1) for k, v in zip(keys, stacked.tolist())}
        elapsed = time.perf_counter() - self.t0
        record["img_per_s"] = self.images * self.runtime.world_size / max(elapsed, 1e-9)
        record.update(host)
        if derive is not None:  # ratios of summed counts, e.g. pseudo-label precision
            record = derive(record)
        self.write(step, epoch, record)
        self.sums, self.steps, self.images, self.t0 = {}, 0, 0, time.perf_counter()
        return record

    def write(self, step: int, epoch: float, record: dict[str, float], prefix: str = "train") -> None:
        if not self.runtime.is_main:
            return
        row = {"stage": self.stage, "kind": prefix, "step": step, "epoch": round(epoch, 4), **record}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                self.tb.add_scalar(f"{self.stage}/{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
