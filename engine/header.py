"""The run header: one line, printed once at start-up, with what a user checks first when a run is slow or
fails (where it runs, in which precision, through which attention / kernels / data path, on how many processes)."""

from __future__ import annotations

import torch

import kernels
from dataloading.build import resolve_loader
from engine.config import Config
from engine.runtime import Runtime


def kernels_backend(cfg: Config, rt: Runtime) -> str:
    """Which implementation the hot ops of the semi step use on this device, and why (e.g. the build
    command when the native ops are not built)."""
    return kernels.dispatch.describe(rt.device, cfg.run.kernels)


def device_name(rt: Runtime) -> str:
    if rt.device.type == "cuda":
        return f"{rt.device} ({torch.cuda.get_device_name(rt.device)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


def data_path(cfg: Config, rt: Runtime) -> str:
    d = cfg.data
    if d.source == "digits":
        return "digits in memory, augmented on the training device"
    loader = resolve_loader(d, rt.device)
    chosen = f"'{d.loader}' -> {loader}" if d.loader == "auto" else f"'{loader}'"
    where = f"DALI {'GPU (mixed) decode' if rt.device.type == 'cuda' else 'CPU'}" if loader == "dali" else "CPU decode"
    unit = "thread(s)" if loader == "dali" else "worker(s)"
    return f"{d.source} via loader {chosen} ({where}), {d.num_workers} {unit} per process"


def compile_words(cfg: Config) -> str:
    return cfg.run.compile + (" + CUDA graphs" if cfg.run.cuda_graphs else "")


def run_header(cfg: Config, rt: Runtime) -> str:
    precision = "bf16 autocast" if rt.dtype == torch.bfloat16 else "fp32"
    fields = {"device": device_name(rt), "precision": precision, "attention": cfg.model.attn_backend,
              "kernels": kernels_backend(cfg, rt), "compile": compile_words(cfg), "data": data_path(cfg, rt),
              "world size": rt.world_size}
    return "run: " + "; ".join(f"{k} {v}" for k, v in fields.items())
