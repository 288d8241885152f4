"""The optimisation loop every training stage shares.

A stage supplies its micro-batches, its loss and what happens after an optimizer step (the EMA).
The loop owns the rest: lr schedule per iteration, gradient accumulation, clipping, skipping
non-finite steps without a host sync (fused AdamW's `found_inf`), logging, evaluation, the best
checkpoint (by the teacher when there is one), rolling checkpoints, exact resume, and SIGTERM/SIGINT.
Each part of a step runs inside a named phase (engine.profiling): free unless profiling is on.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Iterator, Protocol

import torch
from torch import nn
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.config import Config
from engine.errors import Interrupted, UserError
from engine.metrics import MetricLogger, input_hint
from engine.optim import CosineSchedule, absolute_lr, build_optimizer
from engine.profiling import SWITCHES, StepProfiler, phase
from engine.runtime import Runtime, restore_rng
from engine.stages.evaluate import evaluate_models
from engine.sharding import full_state_dict, is_sharded, replicated, skip_gradient_sync
from engine.stages.stopping import StopFlag, StopVote


class TrainStage(Protocol):
    name: str
    student: nn.Module  # the module whose parameters the optimizer updates (never DDP-wrapped)
    teacher: nn.Module | None

    def micro_batches_per_epoch(self) -> int: ...
    def batches(self, epoch: int, start: int) -> Iterator: ...
    def prepare(self, batch): ...  # the no-grad part before the student's forward (semi: teacher, pseudo labels)
    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]: ...
    def after_step(self) -> None: ...
    def derive(self, record: dict[str, float]) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def run_training(stage: TrainStage, cfg: Config, rt: Runtime, run_dir: Path, forward_model: nn.Module,
                 resume: dict | None = None) -> dict:
    """Train `stage` for cfg.schedule.epochs; returns the final and best evaluation metrics."""
    accum = cfg.optim.accum_steps
    steps_per_epoch = stage.micro_batches_per_epoch() // accum
    if steps_per_epoch < 1:
        raise UserError(f"stage {stage.name}: an epoch has fewer than one step ({stage.micro_batches_per_epoch()} "
                        f"batches, optim.accum_steps = {accum}): lower data.batch_size or accum_steps")
    total_steps = max(1, round(cfg.schedule.epochs * steps_per_epoch))
    if cfg.schedule.max_steps:
        total_steps = min(total_steps, cfg.schedule.max_steps)
    global_batch = cfg.data.batch_size * accum * rt.world_size
    base_lr = absolute_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(stage.student, cfg.optim, base_lr)
    schedule = CosineSchedule(base_lr, cfg.schedule)
    params = [p for p in stage.student.parameters() if p.requires_grad]
    logger = MetricLogger(run_dir, rt, cfg.logging, stage.name, input_hint(cfg.data))
    folder = run_dir / "checkpoints"
    skipped = torch.zeros((), device=rt.device)
    best = {"score": -math.inf}
    step = 0
    sharded = is_sharded(stage.student)
    if resume is not None:
        if "dcp" in resume:  # a folder of shards, from any number of ranks
            ckpt.load_sharded(resume["dcp"], stage.student, stage.teacher, optimizer)
        elif sharded:
            raise UserError(f"checkpoint of step {resume['step']} was written by a dist.strategy = 'ddp' run: "
                            f"resume it with --dist.strategy ddp")
        else:
            stage.student.load_state_dict(resume["model"])
            stage.load_state_dict(resume["stage"])
            optimizer.load_state_dict(resume["optimizer"])
        skipped.fill_(resume["skipped"])
        best = resume["best"]
        step = resume["step"]
        exact = restore_rng(resume["rng"], rt.rank, rt.world_size, reseed=cfg.run.seed + step)
        if rt.is_main:
            note = "" if exact else " (saved by another number of processes: random draws start afresh)"
            print(f"[{stage.name}] resumed at step {step}/{total_steps}{note}")

    def meta(step_now: int, rngs: list[dict]) -> dict:
        return {"stage_name": stage.name, "step": step_now, "skipped": float(skipped), "best": best, "rng": rngs,
                "steps_per_epoch": steps_per_epoch, "world_size": rt.world_size}

    def save(step_now: int) -> None:
        with phase("checkpoint"):
            rngs = rt.all_rng_states()  # collective: every rank's draws, for an exact resume
            epoch_now = step_now // steps_per_epoch
            if cfg.dist.strategy == "fsdp":  # a DCP folder (also on one rank: resumable on any number)
                ckpt.save_sharded(meta(step_now, rngs), stage.student, stage.teacher, optimizer, folder, stage.name,
                                  epoch_now, step_now, cfg.checkpoint.keep, rt)
                return
            state = {**meta(step_now, rngs), "model": stage.student.state_dict(), "stage": stage.state_dict(),
                     "optimizer": optimizer.state_dict()}
            rt.main_only(lambda: ckpt.save_rolling(state, folder, stage.name, epoch_now, step_now, cfg.checkpoint.keep))

    def weights() -> dict:
        """The weights a best checkpoint keeps, unsharded (a collective under FSDP2)."""
        if not sharded:
            return {"model": stage.student.state_dict(), "stage": stage.state_dict()}
        teacher = {"ema": full_state_dict(stage.teacher)} if stage.teacher is not None else {}
        return {"model": full_state_dict(stage.student), "stage": teacher}

    def evaluate(step_now: int) -> dict:
        with phase("eval"):
            if hasattr(stage, "evaluate"):  # e.g. MAE: reconstruction loss instead of accuracy
                metrics = stage.evaluate(rt)
            else:
                metrics = evaluate_models(stage.eval_models(), stage.eval_stream, rt)
        logger.write(step_now, step_now / steps_per_epoch, metrics, prefix="eval")
        # The teacher is what Semi-ViT deploys, so it picks the best checkpoint when there is one.
        score = metrics.get("score", metrics.get("teacher_top1", metrics.get("top1")))
        if score > best["score"]:
            best.update({**metrics, "score": score, "step": step_now})
            kept = {"stage_name": stage.name, **weights(), "metrics": metrics}
            rt.main_only(lambda: ckpt.atomic_save(kept, folder / f"{stage.name}-best.pt"))
        return metrics

    final: dict = {}
    profiler = None
    if cfg.profile.steps and rt.is_main:
        profiler = StepProfiler(cfg.profile.steps, cfg.profile.wait, cfg.profile.warmup, run_dir, stage.name, rt.device)
    SWITCHES.nvtx = cfg.profile.nvtx
    logger.start(step)
    vote = StopVote(rt)
    with StopFlag() as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(setattr, SWITCHES, "nvtx", False)
        cleanup.callback(vote.close)
        if profiler is not None:
            cleanup.callback(profiler.close)
        forward_model.train()
        bar = tqdm(total=total_steps, initial=step, desc=stage.name, disable=not (rt.is_main and cfg.logging.progress),
                   dynamic_ncols=True, leave=False)
        while step < total_steps:
            epoch = step // steps_per_epoch
            start = (step % steps_per_epoch) * accum
            batches = stage.batches(epoch, start)
            for _ in range(start // accum, steps_per_epoch):
                lr = schedule.apply(optimizer, step / steps_per_epoch)
                finite = optimizer_step(stage, forward_model, optimizer, params, batches, cfg, rt, logger)
                skipped += (~finite).float()
                with phase("ema"):
                    stage.after_step()
                if profiler is not None:
                    profiler.step()
                step += 1
                bar.update(1)
                log_now = step % cfg.logging.every_steps == 0 or step == total_steps
                if log_now:  # the only host sync of the loop
                    record = logger.flush(step, step / steps_per_epoch, {"lr": lr, "skipped": float(skipped)},
                                          derive=stage.derive)
                    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", img_s=f"{record['img_per_s']:.0f}",
                                    data_wait=f"{record['data_wait_ms']:.1f}ms")
                    check_nonfinite(record["skipped"], cfg, save, step)
                if vote.poll(stop.raised):  # every rank says yes after the same step
                    save(step)
                    raise Interrupted(f"stage {stage.name} stopped at step {step}")
                if step == total_steps or step % steps_per_epoch == 0:
                    break
            epoch_done = step // steps_per_epoch
            at_end = step == total_steps
            if at_end or epoch_done % cfg.eval.every_epochs == 0:
                final = evaluate(step)
                forward_model.train()
            if at_end or epoch_done % cfg.checkpoint.every_epochs == 0:
                save(step)
        bar.close()
    logger.close()
    if not final:
        final = evaluate(step)
    out = {"final": final, "best": best, "steps": step, "lr": base_lr, "global_batch": global_batch}
    if profiler is not None and profiler.table is not None:
        out["profile"] = profiler.table
    return out


def optimizer_step(stage, forward_model, optimizer, params, batches, cfg: Config, rt: Runtime,
                   logger: MetricLogger) -> torch.Tensor:
    """One optimizer step over `accum_steps` micro-batches; returns a device bool: was it finite."""
    accum = cfg.optim.accum_steps
    total = torch.zeros((), device=rt.device)
    for micro in range(accum):
        t0 = time.perf_counter()
        with phase("data"):
            batch = next(batches)
        waited = time.perf_counter() - t0  # host clock only: input-bound detection needs no device sync
        with rt.autocast():
            batch = stage.prepare(batch)
        sync = micro == accum - 1 or not rt.distributed
        with phase("student_forward_backward"), (contextlib.nullcontext() if sync else skip_gradient_sync(forward_model)):
            with rt.autocast():
                loss, metrics, images = stage.loss(batch)
            (loss / accum).backward()
        total = total + loss.detach().float()
        logger.accumulate(metrics, images, waited)
    with phase("optimizer"):
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
        grad_norm = replicated(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))  # FSDP2: a DTensor
        finite = torch.isfinite(total) & torch.isfinite(grad_norm)
        # Fused AdamW skips the update (and its step count) where found_inf is 1: no host sync needed.
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return finite


def check_nonfinite(skipped: float, cfg: Config, save, step: int) -> None:
    """Called on logging steps only. Skipped steps left the weights untouched, so saving keeps the last good state."""
    policy = cfg.logging
    if skipped > 0 and (policy.nonfinite == "stop" or skipped > policy.max_skips):
        save(step)
        raise UserError(f"non-finite loss or gradients in {int(skipped)} step(s) (logging.nonfinite = "
                        f"'{policy.nonfinite}', max_skips = {policy.max_skips}); the last good state was saved in "
                        f"checkpoints/: lower optim.blr or enable optim.clip_grad, then resume")
