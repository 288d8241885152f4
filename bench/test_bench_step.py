"""Throughput of the real training steps of the demo (data augmentation, forward, backward, fused AdamW,
EMA), so a slower step shows up here before it shows up as a slower demo. Prints img/s."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch

from engine.config import load_plan
from engine.stages.standalone import stage_steps

DEMO = Path(__file__).resolve().parent.parent / "configs" / "digits.toml"


@pytest.mark.parametrize("name", ["finetune", "semi"])
def test_bench_demo_step(benchmark, name):
    step = stage_steps(load_plan(DEMO, [("run.stages", name)]).stages[name], name)
    images = step.images
    for _ in range(3):  # warm-up: allocator, optimizer state
        step()
    benchmark.pedantic(step, rounds=20, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable (CI's smoke mode): the step ran once, nothing timed
        return
    img_per_s = images / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = img_per_s
    print(f"\ndemo {name} step: {benchmark.stats.stats.median * 1e3:.1f} ms median, {img_per_s:.0f} img/s "
          f"({images} images per step, {torch.get_num_threads()} threads)")


@pytest.mark.parametrize("threads", [1, 2])
def test_bench_demo_attention_backends(request, threads):
    """The demo's 17-token attention (configs/digits.toml: model.attn_backend = "math"): the explicit product
    and softmax against scaled_dot_product_attention's CPU kernel, whose per-call cost dominates at this size.
    The semi step with each, alternated in one process; prints both medians and the ratio."""
    smoke = request.config.getoption("benchmark_disable", False)
    rounds, per_round = (1, 1) if smoke else (10, 5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    request.addfinalizer(lambda: torch.set_num_threads(before))
    steps = {backend: stage_steps(load_plan(DEMO, [("run.stages", "semi"), ("model.attn_backend", backend)])
                                  .stages["semi"], "semi", seed=0) for backend in ("math", "sdpa")}
    times = {backend: [] for backend in steps}
    for step in steps.values():
        for _ in range(3 * (not smoke)):  # warm-up: allocator, optimizer state
            step()
    for _ in range(rounds):
        for backend, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                step()
            times[backend].append((time.perf_counter() - t0) / per_round)
    math_s, sdpa_s = statistics.median(times["math"]), statistics.median(times["sdpa"])
    print(f"\ndemo semi step, {threads} thread{'s' if threads > 1 else ''}: {math_s * 1e3:.1f} ms with math attention, "
          f"{sdpa_s * 1e3:.1f} ms with sdpa ({sdpa_s / math_s:.2f}x)")
