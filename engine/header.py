"""The run header: one line, printed once at start-up, with what a user checks first when a run is slow or
fails (where it runs, in which precision, through which attention / kernels / data path, on how many processes)."""

from __future__ import annotations

import torch

from engine.config import Config
from engine.runtime import Runtime


def kernels_backend(cfg: Config) -> str:
    """Which implementation the hot ops of the semi step use. MERGE POINT: wire `run.kernels` /
    `kernels.dispatch.summary()` here; until then every op is the vectorised torch path."""
    return "torch"


def device_name(rt: Runtime) -> str:
    if rt.device.type == "cuda":
        return f"{rt.device} ({torch.cuda.get_device_name(rt.device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def data_path(cfg: Config) -> str:
    d = cfg.data
    if d.source == "digits":
        return "digits in memory, augmented on the training device"
    return f"{d.source} via loader '{d.loader}', {d.num_workers} worker(s) per process"


def run_header(cfg: Config, rt: Runtime) -> str:
    precision = "bf16 autocast" if rt.dtype == torch.bfloat16 else "fp32"
    fields = {"device": device_name(rt), "precision": precision, "attention": cfg.model.attn_backend,
              "kernels": kernels_backend(cfg), "data": data_path(cfg), "world size": rt.world_size}
    return "run: " + "; ".join(f"{k} {v}" for k, v in fields.items())
