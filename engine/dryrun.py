"""--dry-run: what a recipe will do, without allocating weights (meta device) or touching a GPU, and
what it will cost on the chosen GPU (engine.costmodel): memory per GPU, FLOPs, projected wall time,
and the disk its run folder will hold."""

from __future__ import annotations

import torch

import kernels
from dataloading import describe_data
from engine import costmodel as cm
from engine.config import Config, RunPlan
from engine.errors import UserError
from engine.models.flops import forward_gflops, param_count
from engine.optim import absolute_lr
from engine.runtime import env_world
from engine.stages.specs import STAGE_SPECS, StageSpec, per_process_batch


def stage_summary(name: str, cfg: Config, gpu_key: str = cm.DEFAULT_GPU) -> list[str]:
    _, env_world_size, _ = env_world()
    world = env_world_size if env_world_size > 1 else cfg.dist.world_size
    spec = STAGE_SPECS[name]
    with torch.device("meta"):
        model = spec.model.build(cfg)
    params = param_count(model)
    gflops = forward_gflops(model, cfg.model.img_size)
    accum = cfg.optim.accum_steps
    labelled = cfg.data.batch_size * world * accum
    semi_step = spec.trains and "unlabelled" in spec.streams  # the teacher, pseudo labels and pseudo mixup
    lr = absolute_lr(cfg.optim, labelled)
    lines = [
        f"[{name}] model {cfg.model.arch} @ {cfg.model.img_size}px, {spec.model.describe(cfg)}, "
        f"attention {cfg.model.attn_backend}",
        f"  parameters        {params / 1e6:,.2f} M",
        f"  forward GFLOPs    {gflops:.4g} per image",
        f"  processes         {world}  (data.batch_size {cfg.data.batch_size} x accum {accum} per process)",
        f"  {'image batch' if 'pretrain' in spec.streams else 'labelled batch':<18}{labelled} global",
    ]
    if semi_step:
        lines.append(f"  unlabelled batch  {cfg.semi.mu * labelled} global (mu = {cfg.semi.mu}), tau = "
                     f"{cfg.semi.threshold}, lambda_u = {cfg.semi.lambda_u}, EMA {cfg.ema.decay}")
        lines.append(f"  fused ops         {trace_semi_ops(cfg)}")
    if spec.trains:
        source = "optim.lr" if cfg.optim.lr > 0 else f"blr {cfg.optim.blr:g} x {labelled}/256"
        lines.append(f"  absolute lr       {lr:.4g}  ({source}), layer decay {cfg.optim.layer_decay}, "
                     f"{cfg.schedule.epochs:g} epochs, warm-up {cfg.schedule.warmup_epochs:g}")
        steps, images, assumed = steps_per_epoch(spec, cfg, world)
        lines.append(f"  steps per epoch   {steps}  ({images} images{'; ' + assumed if assumed else ''})")
        lines.append(f"  compile           {compile_mode(cfg)}")
        lines += memory_lines(name, cfg, model, world, gpu_key)
        lines += disk_lines(name, cfg, model, world)
        lines += cost_lines(name, cfg, gflops, world, steps, gpu_key)
    return lines


def compile_mode(cfg: Config) -> str:
    """run.compile and run.cuda_graphs in words (the run header says the same)."""
    what = {"off": "eager", "model": "torch.compile of the model's forward",
            "step": "torch.compile of the whole micro-step (forward, losses, backward; fullgraph)"}[cfg.run.compile]
    graphs = ", replayed as a CUDA graph" if cfg.run.cuda_graphs else ""
    return f"run.compile = {cfg.run.compile}: {what}{graphs}"


def trace_semi_ops(cfg: Config) -> str:
    """Run the semi step's fused ops on meta tensors of the recipe's per-process shapes (their fake
    implementations), so a shape or dtype mismatch shows here, not an hour into a GPU job."""
    b = cfg.data.batch_size
    u, c, s = cfg.semi.mu * b, cfg.model.num_classes, cfg.model.img_size
    try:
        chosen = kernels.dispatch.resolve(cfg.run.kernels, torch.device("meta"))
    except kernels.KernelUnavailable as err:
        return f"run.kernels = {cfg.run.kernels}: not traced here ({err})"
    with torch.device("meta"):
        prob, label, _ = kernels.pseudo_label(torch.empty(u, c), cfg.semi.threshold, backend=chosen)
        draws = kernels.draw_mix_randomness(u, s, s, cfg.semi.cutmix_prob, "meta")
        mixed = kernels.pseudo_mixup(torch.empty(u, cfg.model.in_chans, s, s), prob, label, cfg.semi.threshold,
                                     draws=draws, backend=chosen)
        kernels.soft_target_cross_entropy(torch.empty(u, c), mixed.label_a, mixed.label_b, mixed.lam, mixed.mask,
                                          backend=chosen)
    return (f"run.kernels = {cfg.run.kernels}: pseudo label, pseudo mixup and soft-target CE traced on meta "
            f"tensors through the {chosen} ops")


def steps_per_epoch(spec: StageSpec, cfg: Config, world: int) -> tuple[int, int, str]:
    """(steps, images per epoch, the assumption made when the data is not on this machine, else "")."""
    assumed = ""
    try:
        counts = describe_data(cfg.data)
    except UserError as err:
        if cfg.data.source != "imagefolder":
            raise
        # A recipe is usually checked away from its data: assume ImageNet-1k and the recipe's split.
        labelled = (cfg.data.labels_per_class * 1000 if cfg.data.labels_per_class
                    else round(cfg.data.label_fraction * cm.IMAGENET_TRAIN))
        counts = {"labelled": labelled, "unlabelled": cm.IMAGENET_TRAIN - labelled}
        assumed = (f"assumed ImageNet-1k train, {cm.IMAGENET_TRAIN:,} images split by data.label_fraction: "
                   f"data not available here ({str(err).split(':')[0]})")
    per_step = per_process_batch(spec.epoch, cfg) * world * cfg.optim.accum_steps
    # pre-training reads every train image, labelled or not
    n = counts["labelled"] + counts["unlabelled"] if spec.epoch == "pretrain" else counts[spec.epoch]
    return n // per_step, n, assumed


def memory_lines(name: str, cfg: Config, model, world: int, gpu_key: str) -> list[str]:
    gpu = cm.GPUS[gpu_key]
    act = cm.precision_bytes(cfg)
    params, trainable = param_count(model), param_count(model, trainable_only=True)
    student, _ = cm.micro_batch(name, cfg)
    plain = cm.memory_rows(name, cfg, params, trainable, world, act, checkpointing=False)
    ckpt = cm.memory_rows(name, cfg, params, trainable, world, act, checkpointing=True)
    what = "bf16 autocast" if act == 2 else "fp32"
    mixed = "unlabelled" in STAGE_SPECS[name].streams  # labelled + unlabelled images in one forward
    images = f"{cfg.data.batch_size} + {student - cfg.data.batch_size}" if mixed else f"{student}"
    lines = [f"  memory per GPU    GiB, {what}, {images} images per micro-step, {world} process(es), "
             f"dist.strategy = {cfg.dist.strategy}; the totals add every row: an upper bound of the peak"]
    per_rank = []
    for strategy, shards in (("ddp", 1), ("fsdp", world)):
        state = cm.state_bytes(name, cfg, params, trainable, shards)
        parts = ", ".join(f"{k.split(' (')[0]} {v / cm.GIB:.3g}" for k, v in state.items())
        per_rank.append(f"{strategy}: {parts}")
    lines.append(f"  per-rank state    GiB over {world} rank(s): " + " | ".join(per_rank))
    key = "activations (saved for backward)"
    for row, value in plain.items():
        extra = f"   ({ckpt[key] / cm.GIB:.3g} with activation checkpointing)" if row == key else ""
        lines.append(f"    {row:<36}{value / cm.GIB:8.3g}{extra}")
    budget = cm.USABLE * gpu.memory_gib
    capacity = f"{gpu.memory_gib:g} GiB nominal, plan on {100 * cm.USABLE:.0f} %"
    uses = "" if cfg.model.grad_checkpointing else "  <- this recipe"
    for label, rows, mark in (("total", plain, uses), ("total with activation checkpointing", ckpt,
                                                       "  <- this recipe" if not uses else "")):
        total = sum(rows.values()) / cm.GIB
        verdict = "fits" if total <= budget else "does NOT fit"
        lines.append(f"    {label:<36}{total:8.3g}   {verdict} {gpu_key} ({capacity}){mark}")
    if cfg.run.cuda_graphs:
        held = (ckpt if cfg.model.grad_checkpointing else plain)[key] / cm.GIB
        lines.append(f"  CUDA graphs       hold the step's activations ({held:.3g} GiB, counted above) in their own "
                     f"memory pool for the whole stage: it stays reserved between steps, so evaluation and "
                     f"checkpointing get that much less")
    return lines


def disk_lines(name: str, cfg: Config, model, world: int) -> list[str]:
    shards = world if cfg.dist.strategy == "fsdp" else 1
    rows = cm.checkpoint_bytes(name, cfg, cm.size_of(model), world)
    parts = ", ".join(f"{k} {cm.human_bytes(v)}" for k, v in rows.items())
    line = f"  disk kept         {cm.human_bytes(sum(rows.values()))} in RUN/checkpoints: {parts}"
    if shards > 1:
        rolling = next(iter(rows.values())) // (cfg.checkpoint.keep + 1)
        line += f"; each rolling checkpoint is {shards} shards of {cm.human_bytes(rolling / shards)}, one per rank"
    return [line]


def cost_lines(name: str, cfg: Config, gflops: float, world: int, steps: int, gpu_key: str) -> list[str]:
    gpu = cm.GPUS[gpu_key]
    per_step = cm.stage_flops(name, cfg, gflops, world)
    total_steps = max(1, round(cfg.schedule.epochs * steps))
    if cfg.schedule.max_steps:
        total_steps = min(total_steps, cfg.schedule.max_steps)
    total = per_step * total_steps
    student, teacher = cm.micro_batch(name, cfg)
    passes = "4 (checkpointing recomputes the forward)" if cfg.model.grad_checkpointing else "3"
    recipe = f"student forward + backward {passes} x {gflops:.4g} GFLOP x {student} images"
    if teacher:
        recipe += f" + teacher forward {gflops:.4g} GFLOP x {teacher}"
    lines = [f"  training FLOPs    {cm.human_flops(per_step)} per step (all processes), "
             f"{cm.human_flops(per_step * steps)} per epoch, {cm.human_flops(total)} in total ({total_steps} steps)",
             f"                    per process and micro-step: {recipe}"]
    measured = cm.measured_throughput(gpu_key, cfg.model.arch)
    if measured:
        tflops, source = measured
    else:
        peak = gpu.tf32_tflops if cm.precision_bytes(cfg) == 4 else gpu.bf16_tflops
        tflops = cm.ASSUMED_MFU * peak
        source = (f"ASSUMED MFU {100 * cm.ASSUMED_MFU:.0f} % of the {peak:g} TFLOP/s "
                  f"{'tf32' if cm.precision_bytes(cfg) == 4 else 'bf16'} spec peak: no GPU-suite measurement for "
                  f"{gpu_key} in bench/results/")
    seconds = total / (world * tflops * 1e12)
    lines.append(f"  projected time    {cm.human_time(seconds)} on {world} x {gpu.name} at {tflops:.0f} TFLOP/s each, "
                 f"compute only ({source})")
    return lines


def dry_run(plan: RunPlan, gpu_key: str = cm.DEFAULT_GPU) -> str:
    cm.gpu(gpu_key)  # an unknown name is a one-line error before anything is built
    lines = [f"dry run of {plan.source}: stages {' -> '.join(plan.stages)}; costs for {gpu_key}"]
    for name, cfg in plan.stages.items():
        lines += stage_summary(name, cfg, gpu_key)
    _, env_world_size, _ = env_world()
    total, _ = cm.run_disk_bytes(plan, env_world_size if env_world_size > 1 else plan.base.dist.world_size)
    lines.append(f"disk: the run folder will hold about {cm.human_bytes(total)} (every stage's checkpoints"
                 f"{' and model.safetensors' if plan.base.checkpoint.export_safetensors else ''}); the start is "
                 f"refused when its filesystem has less free space")
    lines.append("nothing was trained; the config is valid.")
    return "\n".join(lines)
