"""Metrics: summed on the device every step, read to the host only on logging steps.

Each logging step costs one host sync (one stacked tensor, one all-reduce across ranks); records go
to metrics.jsonl and TensorBoard on rank 0.

Input-bound detection: the loop times how long it waits for each batch on the host clock (no device
sync); each window logs `data_wait_ms` and `step_ms` per optimizer step, and a window where waiting
takes more than INPUT_BOUND of the time prints one warning line (again only after a window that was
not input-bound). The stage's first window is exempt: it holds start-up (workers, allocator, compile).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.config import DataConfig, LoggingConfig
from engine.config.sections import LOADERS
from engine.runtime import Runtime

INPUT_BOUND = 0.10  # share of the step spent waiting for data that earns a warning


def input_hint(data: DataConfig) -> str:
    """What to try when the loop waits for data (only options this engine has)."""
    if data.source == "digits":
        return "the digits demo augments on the main thread; expected on a CPU"
    hint = f"raise data.num_workers (now {data.num_workers})"
    if "dali" in LOADERS and data.loader != "dali":
        hint += ', or decode on the GPU with data.loader = "dali"'
    return hint


class MetricLogger:
    def __init__(self, run_dir: Path, runtime: Runtime, cfg: LoggingConfig, stage: str, hint: str = ""):
        self.runtime, self.cfg, self.stage, self.hint = runtime, cfg, stage, hint
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0
        self.data_wait = 0.0  # host seconds spent in next(batches) this window
        self.last_step, self.windows, self.input_bound = 0, 0, False
        self.t0 = time.perf_counter()
        self.jsonl = None
        self.tb = None
        if runtime.is_main:
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def start(self, step: int) -> None:
        """The first window starts now, at optimizer step `step` (after a resume, not at 0)."""
        self.last_step, self.t0 = step, time.perf_counter()

    def accumulate(self, metrics: dict[str, torch.Tensor], images: int, data_wait: float = 0.0) -> None:
        """Add this micro-batch's device tensors to the running sums (no host sync) and its host wait."""
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.steps += 1
        self.images += images
        self.data_wait += data_wait

    def flush(self, step: int, epoch: float, host: dict[str, float], derive=None) -> dict[str, float]:
        """The logging step: one sync, means over the steps since the last flush, written out."""
        record: dict[str, float] = {}
        if self.sums:
            keys = sorted(self.sums)
            stacked = torch.stack([self.sums[k] for k in keys])
            stacked = self.runtime.all_reduce_sum(stacked) / self.runtime.world_size
            record = {k: v / max(self.steps, 1) for k, v in zip(keys, stacked.tolist())}
        elapsed = max(time.perf_counter() - self.t0, 1e-9)  # after the sync above: the window's real time
        record["img_per_s"] = self.images * self.runtime.world_size / elapsed
        n = max(step - self.last_step, 1)  # optimizer steps in this window
        record["data_wait_ms"] = 1e3 * self.data_wait / n
        record["step_ms"] = 1e3 * elapsed / n
        record.update(host)
        if derive is not None:  # ratios of summed counts, e.g. pseudo-label precision
            record = derive(record)
        self.write(step, epoch, record)
        self.check_input_bound(self.data_wait / elapsed, record, n)
        self.sums, self.steps, self.images, self.data_wait = {}, 0, 0, 0.0
        self.last_step, self.windows, self.t0 = step, self.windows + 1, time.perf_counter()
        return record

    def check_input_bound(self, share: float, record: dict, n: int) -> None:
        bound = share > INPUT_BOUND and self.windows > 0
        if bound and not self.input_bound and self.runtime.is_main:
            tqdm.write(f"[{self.stage}] input-bound: waited for data {100 * share:.0f} % of the last {n} steps "
                       f"({record['data_wait_ms']:.1f} of {record['step_ms']:.1f} ms per step): {self.hint}")
        self.input_bound = bound

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
