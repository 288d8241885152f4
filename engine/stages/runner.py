"""How a stage of the plan runs (each row of engine.stages.specs names one of these): `train_stage` (data,
model, initialisation, resume, the steps, the final checkpoint), `run_eval`, `run_pseudo_label`.

Stages hand their weights to the next through `carry` ({"model": ..., "ema": ...}); a stage that
already finished (its `<stage>-final.pt` exists) is skipped on `--checkpoint.resume auto` (`finished_stage`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from torch import nn

from dataloading import build_data
from engine import checkpoint as ckpt
from engine.config import Config
from engine.errors import UserError
from engine.models.build import build_model, init_from_checkpoint, load_weights
from engine.runtime import Runtime, seed_everything
from engine.sharding import shard_module
from engine.stages.base import Stage
from engine.stages.compiled import compile_model
from engine.stages.evaluate import evaluate_models
from engine.stages.loop import train_steps


def stage_data(cfg: Config, rt: Runtime, spec):
    """The data streams `spec` reads, checked against the model's classes and channels."""
    data = build_data(cfg.data, cfg.augment, img_size=cfg.model.img_size, batch_size=cfg.data.batch_size,
                      unlabelled_batch_size=cfg.semi.mu * cfg.data.batch_size, seed=cfg.run.seed,
                      rank=rt.rank, world_size=rt.world_size, device=rt.device, need=spec.streams)
    if data.num_classes != cfg.model.num_classes:
        raise UserError(f"the data has {data.num_classes} classes but model.num_classes = {cfg.model.num_classes}: "
                        f"set --model.num_classes {data.num_classes}")
    if data.in_chans != cfg.model.in_chans:
        raise UserError(f"the data has {data.in_chans} channels but model.in_chans = {cfg.model.in_chans}: "
                        f"set --model.in_chans {data.in_chans}")
    return data


def wrap_for_training(model: nn.Module, cfg: Config, rt: Runtime) -> nn.Module:
    """DDP across processes, then torch.compile under run.compile = model; the optimizer keeps the bare module."""
    forward = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return compile_model(forward, cfg)


def shard_stage(stage: Stage, cfg: Config, rt: Runtime) -> None:
    """FSDP2: the student and its teacher sharded alike (the teacher is copied from the unsharded student
    first), the EMA re-pointed at the local shards, then torch.compile under run.compile = model."""
    shard_module(stage.student, rt)
    if stage.ema is not None:
        shard_module(stage.ema.module, rt)
        stage.ema.refresh()
    stage.forward_model = compile_model(stage.student, cfg)


def build_student(spec, cfg: Config, rt: Runtime, carry: dict | None) -> tuple[nn.Module, dict | None]:
    """The stage's starting weights: the previous stage's, else model.init, else a fresh init."""
    seed_everything(cfg.run.seed)  # identical init on every rank
    model = spec.model.build(cfg)
    teacher_state = None
    if carry is not None:
        load_weights(model, carry["model"], "the previous stage", verbose=rt.is_main)
        teacher_state = carry.get("ema")
    elif cfg.model.init:
        teacher_state = init_from_checkpoint(model, cfg.model.init, verbose=rt.is_main)
    return model.to(rt.device), teacher_state


def finished_stage(spec, cfg: Config, rt: Runtime, run_dir: Path, carry: dict | None) -> tuple[dict, dict] | None:
    """On --checkpoint.resume auto, a stage whose <stage>-final.pt exists: its summary and what it handed on."""
    final_path = run_dir / "checkpoints" / f"{spec.name}-final.pt"
    if cfg.checkpoint.resume != "auto" or not final_path.is_file():
        return None
    done = ckpt.safe_load(final_path)
    if rt.is_main:
        print(f"[{spec.name}] already finished in this run folder: skipping (delete {final_path} to rerun)")
    if spec.side_run:
        return done["result"], carry
    return done["result"], {k: done[k] for k in ("model", "ema") if k in done}


def train_stage(spec, cfg: Config, rt: Runtime, run_dir: Path, carry: dict | None) -> tuple[dict, dict]:
    """One training stage: data, model, the stage object, resume, the steps, the final checkpoint."""
    if spec.side_run:  # from random weights; the next stage starts from what came before it
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=""))
    data = stage_data(cfg, rt, spec)
    student, teacher_state = build_student(spec, cfg, rt, None if spec.side_run else carry)
    seed_everything(cfg.run.seed + 1000 * rt.rank)  # per-rank randomness for mixup and drop-path
    fsdp = cfg.dist.strategy == "fsdp" and rt.distributed
    forward = student if fsdp else wrap_for_training(student, cfg, rt)
    stage = spec.stage.for_run(spec.name, cfg, data, student, forward, teacher_state=teacher_state, run_dir=run_dir,
                               rt=rt)
    if fsdp:
        shard_stage(stage, cfg, rt)
    resume = find_resume(cfg, run_dir / "checkpoints", spec.name)
    t0 = time.perf_counter()
    result = train_steps(stage, cfg, rt, run_dir, resume)
    summary = {**result["final"], "best_score": result["best"]["score"], "best_step": result["best"].get("step"),
               "steps": result["steps"], "lr": result["lr"], "global_batch": result["global_batch"],
               "seconds": round(time.perf_counter() - t0, 2)}
    if "profile" in result:  # --profile.steps: the per-phase table (report.md shows it too)
        summary["profile"] = result["profile"]
    handoff = stage.handoff
    final = {"stage_name": spec.name, "result": summary, **handoff}
    rt.main_only(lambda: ckpt.atomic_save(final, run_dir / "checkpoints" / f"{spec.name}-final.pt"))
    return summary, (carry if spec.side_run else handoff)


def find_resume(cfg: Config, folder: Path, name: str) -> dict | None:
    how = cfg.checkpoint.resume
    if not how:
        return None
    if how == "auto":
        found = ckpt.newest_valid(folder, name)
        return found[1] if found else None
    state = ckpt.load_resumable(Path(how))
    if state.get("stage_name") != name:
        return None  # a checkpoint of another stage: this stage starts fresh
    if "optimizer" not in state and "dcp" not in state:
        raise UserError(f"checkpoint.resume: '{how}' holds weights only (a final or best checkpoint), not a "
                        f"resumable state: start from it with --model.init {how}, or resume from a "
                        f"{name}-eNNNN-sNNNNNN.pt file")
    return state


def run_eval(spec, cfg: Config, rt: Runtime, run_dir: Path, carry: dict | None) -> tuple[dict, dict]:
    """Stage "eval": top-1/top-5 of the student and (when present) the teacher of any checkpoint."""
    if cfg.eval.checkpoint:
        state = ckpt.safe_load(cfg.eval.checkpoint)
        source = cfg.eval.checkpoint
    elif carry:
        state, source = carry, "the previous stage"
    else:
        raise UserError("stage 'eval' needs a checkpoint: set --eval.checkpoint PATH (or run it after another stage)")
    data = stage_data(cfg, rt, spec)
    models = {}
    for role, key in (("student", "model"), ("teacher", "ema")):
        if isinstance(state.get(key), dict):
            model = build_model(cfg.model)
            load_weights(model, state[key], f"{source} [{key}]", verbose=rt.is_main)
            models[role] = model.to(rt.device)
    if not models:
        raise UserError(f"{source}: holds neither 'model' nor 'ema' weights: point eval.checkpoint at one of this "
                        f"engine's checkpoints (RUN/checkpoints/<stage>-final.pt) or a {{'model': state_dict}} file")
    return evaluate_models(models, data.evaluation, rt), carry or {}


def run_pseudo_label(spec, cfg: Config, rt: Runtime, run_dir: Path, carry: dict | None) -> tuple[dict, dict]:
    """Stage "pseudo_label": the teacher of the previous stage (or eval.checkpoint) labels the unlabelled pool
    into RUN/pseudo_labels.csv. Rank 0 does the work; the file is small next to a training run."""
    from engine.inference import load_classifier  # lazy: only this stage reads image files
    from engine.pseudo_label import (  # lazy: it loads the config loader, which loads this module
        describe,
        export_pseudo_labels,
    )

    summary: dict = {}
    if rt.is_main:
        if cfg.eval.checkpoint:
            model, what = load_classifier(cfg.eval.checkpoint, cfg, rt.device)
        elif carry and (carry.get("ema") or carry.get("model")):
            what = "teacher" if carry.get("ema") else "model"
            model = build_model(cfg.model)
            load_weights(model, carry.get("ema") or carry["model"], "the previous stage", verbose=False)
            model = model.to(rt.device).eval()
        else:
            raise UserError("stage 'pseudo_label' needs a teacher: set --eval.checkpoint PATH (e.g. "
                            "RUN/model.safetensors), or list it after 'semi' in run.stages")
        summary = export_pseudo_labels(model, cfg, cfg.semi.threshold, run_dir / "pseudo_labels.csv",
                                       rt.device, rt.dtype)
        print(f"[pseudo_label] {describe(summary, what)}")
    rt.barrier()
    return summary, carry or {}
