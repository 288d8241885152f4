"""The CPU a benchmark ran on, named beside every CPU figure: CPUs here differ (AVX-512 vs AVX2-only)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_label(threads: int | None = None) -> str:
    """e.g. 'AMD EPYC, torch CPU capability AVX2, 2 threads, torch 2.14.1'."""
    threads = torch.get_num_threads() if threads is None else threads
    return (f"{cpu_name()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {threads} threads, "
            f"torch {torch.__version__}")
