"""What every training stage is to the loop: its batches, its loss, and defaults for the rest.

A stage names its data (`micro_batches_per_epoch`, `batches`), splits its step into a no-grad part
(`prepare`) and the student's loss (`loss`), and may keep an EMA of the student (`ema`, whose module is
`teacher`). The defaults below are what a plain supervised stage does; a stage overrides only what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from engine.config import Config
from engine.runtime import Runtime
from engine.sharding import full_state_dict
from engine.stages.common import EmaTeacher
from engine.stages.evaluate import evaluate_models


class Stage:
    name: str
    student: nn.Module  # the module whose parameters the optimizer updates (never DDP-wrapped)
    forward_model: nn.Module  # what the loss calls: the student, or its DDP / torch.compile wrapper
    eval_stream = None
    ema: EmaTeacher | None = None

    @classmethod
    def for_run(cls, name: str, cfg: Config, data, student: nn.Module, forward_model: nn.Module, *,
                teacher_state: dict | None, run_dir: Path, rt: Runtime) -> Stage:
        """The stage a run trains under `name`, from the weights it starts with (`teacher_state`: the EMA
        of the starting checkpoint, when it has one)."""
        return cls(cfg, data, student, forward_model)

    @property
    def teacher(self) -> nn.Module | None:
        return self.ema.module if self.ema is not None else None

    def micro_batches_per_epoch(self) -> int:
        raise NotImplementedError(f"stage {self.name}: say how many micro-batches make an epoch")

    def batches(self, epoch: int, start: int) -> Iterator:
        raise NotImplementedError(f"stage {self.name}: say which batches an epoch reads")

    def prepare(self, batch):
        """The no-grad part before the student's forward (semi: teacher, pseudo labels); none by default."""
        return batch

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """(loss, device metrics to log, images seen) for one micro-batch."""
        raise NotImplementedError(f"stage {self.name}: define its loss")

    def after_step(self) -> None:
        """After each optimizer step: the teacher follows the student."""
        if self.ema is not None:
            self.ema.update()

    def derive(self, record: dict[str, float]) -> dict[str, float]:
        """Metrics computed from a logging window's means (e.g. ratios of counts); none by default."""
        return record

    def eval_models(self) -> dict[str, nn.Module]:
        models = {"student": self.student}
        if self.teacher is not None:
            models["teacher"] = self.teacher
        return models

    def evaluate(self, rt: Runtime) -> dict[str, float]:
        """Top-1 / top-5 of every model in `eval_models`; a `score` key, when returned, picks the best."""
        return evaluate_models(self.eval_models(), self.eval_stream, rt)

    def state_dict(self) -> dict:
        """What a resumable checkpoint keeps besides the student and the optimizer."""
        return {"ema": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.teacher is not None and "ema" in state:
            self.teacher.load_state_dict(state["ema"])

    @property
    def handoff(self) -> dict:
        """What the next stage starts from: the weights and, when kept, their EMA, unsharded on every rank
        (a collective under FSDP2)."""
        out = {"model": full_state_dict(self.student)}
        if self.teacher is not None:
            out["ema"] = full_state_dict(self.teacher)
        return out
