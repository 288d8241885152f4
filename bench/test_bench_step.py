"""Throughput of the real training steps of the demo (data augmentation, forward, backward, fused AdamW,
EMA), so a slower step shows up here before it shows up as a slower demo. Prints img/s."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.gpu_suite import MetricSink
from engine.config import load_plan
from engine.optim import build_optimizer
from engine.runtime import Runtime
from engine.stages.common import cycle
from engine.stages.finetune import FinetuneStage
from engine.stages.loop import optimizer_step
from engine.stages.runner import build_student, stage_data
from engine.stages.semi import SemiStage
from engine.stages.specs import STAGE_SPECS

DEMO = Path(__file__).resolve().parent.parent / "configs" / "digits.toml"


def _stage(name: str):
    cfg = load_plan(DEMO, [("run.stages", name)]).stages[name]
    rt = Runtime(device=torch.device("cpu"), dtype=None)
    data = stage_data(cfg, rt, STAGE_SPECS[name])
    student, _ = build_student(STAGE_SPECS[name], cfg, rt, None)
    stage = (SemiStage if name == "semi" else FinetuneStage)(cfg, data, student, student)
    optimizer = build_optimizer(student, cfg.optim, 1e-3)
    params = [p for p in student.parameters() if p.requires_grad]
    if name == "semi":
        batches = zip(cycle(data.labelled, 0), cycle(data.unlabelled, 0))
        images = cfg.data.batch_size * (1 + cfg.semi.mu)
    else:
        batches, images = cycle(data.labelled, 0), cfg.data.batch_size

    def step():
        optimizer_step(stage, student, optimizer, params, batches, cfg, rt, MetricSink())
        stage.after_step()

    return step, images


@pytest.mark.parametrize("name", ["finetune", "semi"])
def test_bench_demo_step(benchmark, name):
    step, images = _stage(name)
    for _ in range(3):  # warm-up: allocator, optimizer state
        step()
    benchmark.pedantic(step, rounds=20, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable (CI's smoke mode): the step ran once, nothing timed
        return
    img_per_s = images / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = img_per_s
    print(f"\ndemo {name} step: {benchmark.stats.stats.median * 1e3:.1f} ms median, {img_per_s:.0f} img/s "
          f"({images} images per step, {torch.get_num_threads()} threads)")
