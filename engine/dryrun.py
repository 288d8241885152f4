"""--dry-run: what a recipe will do, without allocating weights (meta device) or touching a GPU."""

from __future__ import annotations

import torch

from engine.config import Config, RunPlan
from engine.errors import UserError
from engine.models.build import build_model
from engine.models.mae import build_mae
from engine.models.flops import forward_gflops, param_count
from engine.optim import absolute_lr
from engine.runtime import env_world


def stage_summary(name: str, cfg: Config) -> list[str]:
    _, env_world_size, _ = env_world()
    world = env_world_size if env_world_size > 1 else cfg.dist.world_size
    with torch.device("meta"):
        model = build_mae(cfg.model, cfg.mae) if name == "pretrain" else build_model(cfg.model)
    params = param_count(model)
    gflops = forward_gflops(model, cfg.model.img_size)
    accum = cfg.optim.accum_steps
    labelled = cfg.data.batch_size * world * accum
    unlabelled = cfg.semi.mu * labelled if name == "semi" else 0
    lr = absolute_lr(cfg.optim, labelled)
    what = (f"MAE, mask ratio {cfg.mae.mask_ratio}, decoder {cfg.mae.decoder_depth} x {cfg.mae.decoder_dim}"
            if name == "pretrain" else f"{cfg.model.global_pool} pool")
    lines = [
        f"[{name}] model {cfg.model.arch} @ {cfg.model.img_size}px, {what}, attention {cfg.model.attn_backend}",
        f"  parameters        {params / 1e6:,.2f} M",
        f"  forward GFLOPs    {gflops:.4g} per image",
        f"  processes         {world}  (data.batch_size {cfg.data.batch_size} x accum {accum} per process)",
        f"  {'image batch' if name == 'pretrain' else 'labelled batch':<18}{labelled} global",
    ]
    if name == "semi":
        lines.append(f"  unlabelled batch  {unlabelled} global (mu = {cfg.semi.mu}), tau = {cfg.semi.threshold}, "
                     f"lambda_u = {cfg.semi.lambda_u}, EMA {cfg.ema.decay}")
    if name not in ("eval", "pseudo_label"):
        source = "optim.lr" if cfg.optim.lr > 0 else f"blr {cfg.optim.blr:g} x {labelled}/256"
        lines.append(f"  absolute lr       {lr:.4g}  ({source}), layer decay {cfg.optim.layer_decay}, "
                     f"{cfg.schedule.epochs:g} epochs, warm-up {cfg.schedule.warmup_epochs:g}")
        lines.append(f"  steps per epoch   {steps_per_epoch(name, cfg, world)}")
    return lines


def steps_per_epoch(name: str, cfg: Config, world: int) -> str:
    from dataloading import describe_data

    try:
        counts = describe_data(cfg.data)
    except UserError as err:
        return f"unknown: data not available here ({err})"
    per_step = cfg.data.batch_size * world * cfg.optim.accum_steps
    if name == "semi":
        per_step *= cfg.semi.mu
        n = counts["unlabelled"]
    elif name == "pretrain":
        n = counts["labelled"] + counts["unlabelled"]
    else:
        n = counts["labelled"]
    return f"{n // per_step}  ({n} images)"


def dry_run(plan: RunPlan) -> str:
    lines = [f"dry run of {plan.source}: stages {' -> '.join(plan.stages)}"]
    for name, cfg in plan.stages.items():
        lines += stage_summary(name, cfg)
    lines.append("nothing was trained; the config is valid.")
    return "\n".join(lines)
