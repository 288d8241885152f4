"""Resident memory over a long run: 3,000 demo semi steps (the real step with the real metric logger, flushed
every logging interval), resident set sampled every 100 steps. Growth after warm-up above 5 % is a leak: a
tensor kept per step (a graph held by a metric, a list that grows) shows up here long before it fills a node.

`pytest bench/ --benchmark-disable` (the smoke mode) runs a short form that only checks the step and the
sampling work; the growth bound needs the full length."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bench.test_bench_step import DEMO
from engine.config import load_plan
from engine.metrics import MetricLogger
from engine.runtime import Runtime
from engine.stages.standalone import stage_steps

STEPS, EVERY, WARM_UP, MAX_GROWTH = 3000, 100, 500, 0.05


def resident_bytes() -> int:
    """This process's resident set: psutil when installed, else /proc/self/statm (Linux)."""
    try:
        import psutil  # optional: psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def semi_steps(run_dir: Path, steps: int, every: int) -> list[tuple[int, int]]:
    """(step, resident bytes) after every `every` steps of the demo's semi stage."""
    cfg = load_plan(DEMO, [("run.stages", "semi")]).stages["semi"]
    rt = Runtime(device=torch.device("cpu"), dtype=None)
    logger = MetricLogger(run_dir, rt, cfg.logging, "semi")
    step_once = stage_steps(cfg, "semi", rt, logger=logger)
    logger.start(0)
    series = []
    try:
        for step in range(1, steps + 1):
            step_once()
            if step % cfg.logging.every_steps == 0:
                logger.flush(step, step / 100, {})
            if step % every == 0:
                series.append((step, resident_bytes()))
                print(f"step {step}: resident {series[-1][1] / 2**20:.1f} MiB", flush=True)
    finally:
        logger.close()
    return series


def growth_after(series: list[tuple[int, int]], warm_up: int) -> float:
    """The largest resident set after `warm_up` steps, relative to the one at `warm_up`."""
    after = [rss for step, rss in series if step >= warm_up]
    return max(after) / after[0] - 1.0


def test_resident_memory_does_not_grow_over_3000_semi_steps(request, tmp_path):
    smoke = request.config.getoption("benchmark_disable", default=False)
    steps, every = (40, 20) if smoke else (STEPS, EVERY)
    series = semi_steps(tmp_path, steps, every)
    print("\nresident MiB by step: " + ", ".join(f"{s}: {rss / 2**20:.1f}" for s, rss in series))
    assert len(series) == steps // every and all(rss > 0 for _, rss in series)
    if smoke:
        return
    growth = growth_after(series, WARM_UP)
    print(f"growth after step {WARM_UP}: {100 * growth:+.2f} % ({torch.get_num_threads()} threads)")
    assert growth <= MAX_GROWTH, (f"resident memory grew {100 * growth:.1f} % between step {WARM_UP} and step "
                                  f"{steps} (bound {100 * MAX_GROWTH:.0f} %): something is kept per step")
