"""Run one stage end to end: data, model, initialisation, resume, training, final checkpoint.

Stages hand their weights to the next through `carry` ({"model": ..., "ema": ...}); a stage that
already finished (its `<stage>-final.pt` exists) is skipped on `--checkpoint.resume auto`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from dataloading import build_data
from engine import checkpoint as ckpt
from engine.config import Config
from engine.errors import UserError
from engine.models.build import build_model, init_from_checkpoint, load_weights
from engine.models.mae import DECODER_KEYS, build_mae
from engine.runtime import Runtime, seed_everything
from engine.sharding import full_state_dict, shard_module
from engine.stages.evaluate import evaluate_models
from engine.stages.finetune import FinetuneStage
from engine.stages.loop import run_training
from engine.stages.pretrain import PretrainStage
from engine.stages.semi import SemiStage

STREAMS = {"pretrain": ("pretrain", "evaluation"), "finetune": ("labelled", "evaluation"),
           "baseline": ("labelled", "evaluation"), "semi": ("labelled", "unlabelled", "evaluation"),
           "eval": ("evaluation",)}


def stage_data(cfg: Config, rt: Runtime, stage: str):
    data = build_data(cfg.data, cfg.augment, img_size=cfg.model.img_size, batch_size=cfg.data.batch_size,
                      unlabelled_batch_size=cfg.semi.mu * cfg.data.batch_size, seed=cfg.run.seed,
                      rank=rt.rank, world_size=rt.world_size, device=rt.device, need=STREAMS[stage])
    if data.num_classes != cfg.model.num_classes:
        raise UserError(f"the data has {data.num_classes} classes but model.num_classes = {cfg.model.num_classes}: "
                        f"set --model.num_classes {data.num_classes}")
    if data.in_chans != cfg.model.in_chans:
        raise UserError(f"the data has {data.in_chans} channels but model.in_chans = {cfg.model.in_chans}: "
                        f"set --model.in_chans {data.in_chans}")
    return data


def wrap_for_training(model: nn.Module, cfg: Config, rt: Runtime) -> nn.Module:
    """DDP across processes, then torch.compile when asked; the optimizer keeps the bare module."""
    forward = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if cfg.run.compile:
        forward = torch.compile(forward)
    return forward


def shard_stage(stage, cfg: Config, rt: Runtime) -> None:
    """FSDP2: the student and its teacher sharded alike (the teacher is copied from the unsharded student
    first), the EMA re-pointed at the local shards, then torch.compile when asked."""
    shard_module(stage.student, rt)
    if getattr(stage, "ema", None) is not None:
        shard_module(stage.ema.module, rt)
        stage.ema.refresh()
    stage.forward_model = torch.compile(stage.student) if cfg.run.compile else stage.student


def full_weights(stage) -> dict:
    """What the next stage starts from, unsharded on every rank (a collective under FSDP2)."""
    out = {"model": full_state_dict(stage.student)}
    if stage.name == "pretrain":  # fine-tuning starts from the encoder alone
        out["model"] = {k: v for k, v in out["model"].items() if not k.startswith(DECODER_KEYS)}
    if stage.teacher is not None:
        out["ema"] = full_state_dict(stage.teacher)
    return out


def build_student(name: str, cfg: Config, rt: Runtime, carry: dict | None) -> tuple[nn.Module, dict | None]:
    """The stage's starting weights: the previous stage's, else model.init, else a fresh init."""
    seed_everything(cfg.run.seed)  # identical init on every rank
    model = build_mae(cfg.model, cfg.mae) if name == "pretrain" else build_model(cfg.model)
    teacher_state = None
    if carry is not None:
        load_weights(model, carry["model"], "the previous stage", verbose=rt.is_main)
        teacher_state = carry.get("ema")
    elif cfg.model.init:
        teacher_state = init_from_checkpoint(model, cfg.model.init, verbose=rt.is_main)
    if name == "baseline":
        # The comparison must differ from the pre-trained path only in pre-training: MAE's encoder init
        # (xavier linears, as every fresh ViT here) includes the sin-cos position table, learnable or not.
        model.init_pos_embed("sincos")
    return model.to(rt.device), teacher_state


def run_stage(name: str, cfg: Config, rt: Runtime, run_dir: Path, carry: dict | None) -> tuple[dict, dict]:
    folder = run_dir / "checkpoints"
    final_path = folder / f"{name}-final.pt"
    if cfg.checkpoint.resume == "auto" and final_path.is_file():
        done = ckpt.safe_load(final_path)
        if rt.is_main:
            print(f"[{name}] already finished in this run folder: skipping (delete {final_path} to rerun)")
        if name == "baseline":
            return done["result"], carry
        return done["result"], {k: done[k] for k in ("model", "ema") if k in done}
    if name == "eval":
        return run_eval(cfg, rt, carry), carry or {}
    if name == "pseudo_label":
        return run_pseudo_label(cfg, rt, run_dir, carry), carry or {}

    if name == "baseline":  # from random weights; the next stage starts from what came before it
        summary, _ = train_stage(name, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init="")),
                                 rt, run_dir, None)
        return summary, carry
    return train_stage(name, cfg, rt, run_dir, carry)


def train_stage(name: str, cfg: Config, rt: Runtime, run_dir: Path, carry: dict | None) -> tuple[dict, dict]:
    folder = run_dir / "checkpoints"
    data = stage_data(cfg, rt, name)
    student, teacher_state = build_student(name, cfg, rt, carry)
    seed_everything(cfg.run.seed + 1000 * rt.rank)  # per-rank randomness for mixup and drop-path
    fsdp = cfg.dist.strategy == "fsdp" and rt.distributed
    forward = student if fsdp else wrap_for_training(student, cfg, rt)
    if name == "pretrain":
        stage = PretrainStage(cfg, data, student, forward, viz_dir=run_dir)
    elif name in ("finetune", "baseline"):
        stage = FinetuneStage(cfg, data, student, forward, name=name)
    else:
        stage = SemiStage(cfg, data, student, forward, teacher_state)
        if teacher_state is None and rt.is_main:
            print("[semi] no EMA in the starting checkpoint: the teacher starts as a copy of the student")
    if fsdp:
        shard_stage(stage, cfg, rt)
    resume = find_resume(cfg, folder, name)
    t0 = time.perf_counter()
    result = run_training(stage, cfg, rt, run_dir, stage.forward_model, resume)
    summary = {**result["final"], "best_score": result["best"]["score"], "best_step": result["best"].get("step"),
               "steps": result["steps"], "lr": result["lr"], "global_batch": result["global_batch"],
               "seconds": round(time.perf_counter() - t0, 2)}
    if "profile" in result:  # --profile.steps: the per-phase table (report.md shows it too)
        summary["profile"] = result["profile"]
    handoff = stage.handoff if not fsdp else full_weights(stage)
    rt.main_only(lambda: ckpt.atomic_save({"stage_name": name, "result": summary, **handoff}, folder / f"{name}-final.pt"))
    return summary, handoff


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


def run_eval(cfg: Config, rt: Runtime, carry: dict | None) -> dict:
    """Stage "eval": top-1/top-5 of the student and (when present) the teacher of any checkpoint."""
    if cfg.eval.checkpoint:
        state = ckpt.safe_load(cfg.eval.checkpoint)
        source = cfg.eval.checkpoint
    elif carry:
        state, source = carry, "the previous stage"
    else:
        raise UserError("stage 'eval' needs a checkpoint: set --eval.checkpoint PATH (or run it after another stage)")
    data = stage_data(cfg, rt, "eval")
    models = {}
    for role, key in (("student", "model"), ("teacher", "ema")):
        if isinstance(state.get(key), dict):
            model = build_model(cfg.model)
            load_weights(model, state[key], f"{source} [{key}]", verbose=rt.is_main)
            models[role] = model.to(rt.device)
    if not models:
        raise UserError(f"{source}: holds neither 'model' nor 'ema' weights: point eval.checkpoint at one of this "
                        f"engine's checkpoints (RUN/checkpoints/<stage>-final.pt) or a {{'model': state_dict}} file")
    return evaluate_models(models, data.evaluation, rt)


def run_pseudo_label(cfg: Config, rt: Runtime, run_dir: Path, carry: dict | None) -> dict:
    """Stage "pseudo_label": the teacher of the previous stage (or eval.checkpoint) labels the unlabelled pool
    into RUN/pseudo_labels.csv. Rank 0 does the work; the file is small next to a training run."""
    from engine.inference import load_classifier
    from engine.pseudo_label import describe, export_pseudo_labels

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
    return summary
