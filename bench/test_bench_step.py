"""Throughput of the real training steps of the demo (data augmentation, forward, backward, fused AdamW,
EMA), so a slower step shows up here before it shows up as a slower demo. Prints img/s."""

from __future__ import annotations

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
