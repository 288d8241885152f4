"""A training stage's optimizer steps outside a run, wired as `train_steps` wires them (fused AdamW over the
trainable parameters, the micro-step eager or compiled, then the EMA), without a run folder, a schedule or
evaluations: what benchmarks and tests time, trace and compare."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import torch

from engine.config import Config
from engine.optim import build_optimizer
from engine.runtime import Runtime
from engine.stages.base import Stage
from engine.stages.compiled import MicroStep
from engine.stages.loop import optimizer_step
from engine.stages.runner import build_student, stage_data
from engine.stages.specs import STAGE_SPECS


class DiscardMetrics:
    """Takes the step's metrics and keeps nothing (the loop's MetricLogger accumulates them for the log)."""

    def accumulate(self, metrics, images, data_wait=0.0):
        pass


def endless(stage: Stage) -> Iterator:
    """The stage's micro-batches, epoch after epoch."""
    return itertools.chain.from_iterable(stage.batches(epoch, 0) for epoch in itertools.count())


@dataclass
class StageSteps:
    """Call it for one optimizer step and the EMA after it; returns the step's device bool: was it finite."""

    stage: Stage
    cfg: Config
    rt: Runtime
    batches: Iterator
    micro_step: MicroStep
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # what the optimizer updates, whose gradient norm is clipped
    logger: object

    @classmethod
    def of(cls, stage: Stage, cfg: Config, rt: Runtime, batches: Iterator | None = None, *, lr: float = 1e-3,
           compiler: str = "inductor", logger=None) -> StageSteps:
        """`compiler`: the backend of the compiled micro-step (cfg.run.compile = step); `batches`: the
        stage's own, endlessly, when not given."""
        params = [p for p in stage.student.parameters() if p.requires_grad]
        return cls(stage, cfg, rt, endless(stage) if batches is None else batches,
                   MicroStep(stage, cfg, rt, compiler=compiler), build_optimizer(stage.student, cfg.optim, lr),
                   params, DiscardMetrics() if logger is None else logger)

    def __call__(self) -> torch.Tensor:
        finite = optimizer_step(self.stage, self.stage.forward_model, self.optimizer, self.params, self.batches,
                                self.cfg, self.rt, self.logger, micro_step=self.micro_step)
        self.stage.after_step()
        return finite

    @property
    def images(self) -> int:
        """Training images per optimizer step (semi: the labelled and the unlabelled ones)."""
        per_micro = self.cfg.data.batch_size * (1 + self.cfg.semi.mu if self.stage.name == "semi" else 1)
        return per_micro * self.cfg.optim.accum_steps


def stage_steps(cfg: Config, name: str, rt: Runtime | None = None, *, seed: int | None = None,
                compile_model: bool = False, **options) -> StageSteps:
    """Stage `name` of a loaded plan (`plan.stages[name]`) on its own data, from fresh weights (`seed`:
    torch's seed just before the stage is built, for draws to repeat); `compile_model`: torch.compile the
    student's forward (cfg.run.compile = model). `options` go to StageSteps.of."""
    rt = rt or Runtime(device=torch.device("cpu"), dtype=None)
    spec = STAGE_SPECS[name]
    data = stage_data(cfg, rt, spec)
    student, _ = build_student(spec, cfg, rt, None)
    if seed is not None:
        torch.manual_seed(seed)
    forward = torch.compile(student) if compile_model else student
    return StageSteps.of(spec.stage(cfg, data, student, forward), cfg, rt, **options)
