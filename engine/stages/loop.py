"""The optimisation loop every training stage shares, read top to bottom in `train_steps`.

A stage supplies its micro-batches, its loss and what follows an optimizer step (the EMA). Components own
the rest, each on its own cadence: `Progress` the log, progress bar and profiler; `Checkpointer` resume,
rolling saves and the non-finite stop; `Evaluator` the evaluations and the best checkpoint; `StopVote`
SIGTERM/SIGINT. `optimizer_step` is one step: gradient accumulation, clipping, and skipping a non-finite
step without a host sync (fused AdamW's `found_inf`). Each part of a step runs inside a named phase
(engine.profiling): free unless profiling is on.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import Config
from engine.errors import Interrupted, UserError
from engine.metrics import MetricLogger
from engine.optim import CosineSchedule, absolute_lr, build_optimizer
from engine.profiling import phase
from engine.runtime import Runtime
from engine.sharding import replicated, skip_gradient_sync
from engine.stages.base import Stage
from engine.stages.checkpointer import Checkpointer
from engine.stages.compiled import MicroStep
from engine.stages.evaluator import Evaluator
from engine.stages.progress import Progress
from engine.stages.stopping import StopFlag, StopVote


@dataclass(frozen=True)
class Steps:
    """How long a stage trains, in optimizer steps, and where a step falls in its epochs."""

    per_epoch: int
    total: int
    accum: int

    @classmethod
    def of(cls, stage: Stage, cfg: Config) -> Steps:
        accum = cfg.optim.accum_steps
        per_epoch = stage.micro_batches_per_epoch() // accum
        if per_epoch < 1:
            raise UserError(f"stage {stage.name}: an epoch has fewer than one step ({stage.micro_batches_per_epoch()} "
                            f"batches, optim.accum_steps = {accum}): lower data.batch_size or accum_steps")
        total = max(1, round(cfg.schedule.epochs * per_epoch))
        if cfg.schedule.max_steps:
            total = min(total, cfg.schedule.max_steps)
        return cls(per_epoch, total, accum)

    def epoch_starts(self, step: int) -> bool:
        return step % self.per_epoch == 0

    def due(self, step: int, every_epochs: int) -> bool:
        """At the stage's end, or at the end of every `every_epochs`-th epoch."""
        return step == self.total or (step % self.per_epoch == 0 and (step // self.per_epoch) % every_epochs == 0)


@dataclass
class TrainState:
    """What a resumable checkpoint carries besides the weights, the optimizer and the RNG states."""

    skipped: torch.Tensor  # non-finite steps skipped so far, on the device (read on logging steps only)
    step: int = 0
    best: dict = field(default_factory=lambda: {"score": -math.inf})  # the best evaluation so far


def train_steps(stage: Stage, cfg: Config, rt: Runtime, run_dir: Path, resume: dict | None = None) -> dict:
    """Train `stage` for cfg.schedule.epochs (at most schedule.max_steps); returns the final and best evaluation."""
    steps = Steps.of(stage, cfg)
    global_batch = cfg.data.batch_size * steps.accum * rt.world_size
    base_lr = absolute_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(stage.student, cfg.optim, base_lr)
    schedule = CosineSchedule(base_lr, cfg.schedule)
    params = [p for p in stage.student.parameters() if p.requires_grad]
    state = TrainState(skipped=torch.zeros((), device=rt.device))
    checkpointer = Checkpointer(stage, optimizer, state, steps, cfg, rt, run_dir)
    progress = Progress(stage, state, steps, cfg, rt, run_dir)
    checkpointer.resume(resume)
    evaluator = Evaluator(stage, state, steps, cfg, rt, run_dir, progress.logger)
    micro_step = MicroStep(stage, cfg, rt)  # eager, or the compiled step (run.compile = step)
    with StopFlag() as stop, StopVote(rt) as vote, progress.running():
        batches = None
        while state.step < steps.total:
            if batches is None or steps.epoch_starts(state.step):
                batches = stage.batches(state.step // steps.per_epoch, (state.step % steps.per_epoch) * steps.accum)
            lr = schedule.apply(optimizer, state.step / steps.per_epoch)
            finite = optimizer_step(stage, stage.forward_model, optimizer, params, batches, cfg, rt, progress.logger,
                                    step=state.step + 1, micro_step=micro_step)
            state.skipped += (~finite).float()
            with phase("ema"):
                stage.after_step()
            state.step += 1
            record = progress.after_step(lr)
            checkpointer.stop_if_nonfinite(record)
            if vote.poll(stop.raised):  # every rank says yes after the same step
                with rt.collective(f"the checkpoint save of step {state.step} (after a signal)"):
                    checkpointer.save()
                raise Interrupted(f"stage {stage.name} stopped at step {state.step}")
            with rt.collective(f"the evaluation after step {state.step}"):
                evaluator.after_step()  # before the save: the checkpoint records the best score
            with rt.collective(f"the checkpoint save of step {state.step}"):
                checkpointer.after_step()
    final = evaluator.final()
    progress.close()
    return {"final": final, "best": state.best, "steps": state.step, "lr": base_lr, "global_batch": global_batch,
            **progress.profile()}


def optimizer_step(stage, forward_model, optimizer, params, batches, cfg: Config, rt: Runtime,
                   logger: MetricLogger, step: int = 0, micro_step: MicroStep | None = None) -> torch.Tensor:
    """One optimizer step over `accum_steps` micro-batches (`step`: its number, for error messages;
    `micro_step`: the stage's micro-step, eager when not given); returns a device bool: was it finite."""
    accum = cfg.optim.accum_steps
    micro_step = micro_step or MicroStep(stage, cfg, rt)
    syncs = ("the FSDP2 all-gather / reduce-scatter" if cfg.dist.strategy == "fsdp"
             else "the gradient all-reduce (DDP)")
    total = torch.zeros((), device=rt.device)
    for micro in range(accum):
        t0 = time.perf_counter()
        with phase("data"):
            batch = next(batches)
        waited = time.perf_counter() - t0  # host clock only: input-bound detection needs no device sync
        batch = micro_step.prepare(batch)
        sync = micro == accum - 1 or not rt.distributed
        no_sync = contextlib.nullcontext() if sync else skip_gradient_sync(forward_model)
        with phase(micro_step.phase), rt.collective(f"{syncs} of step {step}"), no_sync:
            loss, metrics, images = micro_step.loss(batch)
            (loss / accum).backward()
        total = total + loss.detach().float()
        logger.accumulate(metrics, images, waited)
    with phase("optimizer"), rt.collective(f"the gradient-norm all-reduce of step {step}"):
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
        grad_norm = replicated(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))  # FSDP2: a DTensor
        finite = torch.isfinite(total) & torch.isfinite(grad_norm)
        # Fused AdamW skips the update (and its step count) where found_inf is 1: no host sync needed.
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return finite
