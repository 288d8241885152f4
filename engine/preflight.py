"""The whole plan checked before the first stage trains: a constraint that would fail in a later stage
(paths, index and exclusion files and their text, checkpoints, the loader, class and channel counts, batch
sizes against the set sizes, the free space for the checkpoints the run will keep) stops the run at start with
exit 2, having trained nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dataloading.build import describe_data, resolve_loader
from dataloading.exclude import resolve
from dataloading.splits import resolve_index_file as resolve_index
from dataloading.textfile import read_text
from engine import costmodel as cm
from engine.config import Config, RunPlan
from engine.errors import UserError
from engine.stages.specs import STAGE_SPECS, StageSpec, per_process_batch


def preflight(plan: RunPlan, run_dir: Path | None = None) -> None:
    """Every check; the disk one only when the run folder is known (`run_dir`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    counts: dict[str, dict] = {}  # describe_data per distinct data section (a folder scan each)
    for i, (name, cfg) in enumerate(plan.stages.items()):
        spec = STAGE_SPECS[name]
        check_paths(spec, cfg, first=i == 0)
        if spec.trains:
            key = repr(cfg.data)
            if key not in counts:
                counts[key] = describe_data(cfg.data)
            check_sizes(spec, cfg, counts[key], world)
    if run_dir is not None:
        check_disk(plan, Path(run_dir))


def check_paths(spec: StageSpec, cfg: Config, first: bool) -> None:
    d = cfg.data
    if d.source == "imagefolder":
        folders = [d.train_dir] if any(s != "evaluation" for s in spec.streams) else []  # its training streams
        folders += [d.val_dir] if "evaluation" in spec.streams else []
        for sub in folders:
            path = Path(d.root) / sub
            if not path.is_dir():
                raise UserError(f"data folder '{path}' not found: data.root must hold {d.train_dir}/ and "
                                f"{d.val_dir}/ with one sub-folder per class (see docs/data.md)")
        for key in ("labelled_index", "unlabelled_index"):
            value = getattr(d, key)
            if value and not resolve_index(value, d.root).exists():
                raise UserError(f"data.{key}: index file '{value}' not found (also looked under data.root): fix the "
                                f"path, or set it to \"\" to generate the split (data.label_fraction / "
                                f"data.labels_per_class)")
            if value:  # unreadable or not UTF-8: stop now, not when a later stage loads it
                read_text(resolve_index(value, d.root), f"data.{key} = '{value}'")
        if d.exclude and not resolve(d.exclude, d.root).exists():
            raise UserError(f"data.exclude: '{d.exclude}' not found: write it with python -m dataloading.validate "
                            f"{d.root} --out {d.exclude}, or set data.exclude = \"\"")
        if d.exclude:
            read_text(resolve(d.exclude, d.root), f"data.exclude = '{d.exclude}'")
        resolve_loader(d, "cpu")  # data.loader = 'dali' without DALI installed fails here
    uses_checkpoint = not spec.trains  # eval, pseudo_label: eval.checkpoint, not model.init
    if first and cfg.model.init and not uses_checkpoint and not Path(cfg.model.init).is_file():
        raise UserError(f"model.init: checkpoint '{cfg.model.init}' not found: fix the path, or set --model.init \"\" "
                        f"to start from random weights")
    if uses_checkpoint and cfg.eval.checkpoint and not Path(cfg.eval.checkpoint).is_file():
        raise UserError(f"eval.checkpoint: '{cfg.eval.checkpoint}' not found: fix the path "
                        f"(a run writes RUN/checkpoints/<stage>-final.pt)")
    resume = cfg.checkpoint.resume
    if resume and resume != "auto" and not Path(resume).is_file():
        raise UserError(f"checkpoint.resume: '{resume}' not found: give a checkpoint file, 'auto' (the newest in "
                        f"the run folder) or \"\"")


def check_sizes(spec: StageSpec, cfg: Config, n: dict, world: int) -> None:
    """Class count and, per stream the stage trains on, at least one full batch per process (the labelled
    stream repeats itself when smaller, so it only needs one image)."""
    stage = spec.name
    if n["num_classes"] != cfg.model.num_classes:
        raise UserError(f"[{stage}] the data has {n['num_classes']} classes but model.num_classes = "
                        f"{cfg.model.num_classes}: set --model.num_classes {n['num_classes']}")
    need = [(s, 1 if s == "labelled" else per_process_batch(s, cfg)) for s in spec.streams if s != "evaluation"]
    for stream, size in need:
        if n[stream] // world < size:
            knob = "semi.mu or data.batch_size" if stream == "unlabelled" else "data.batch_size"
            raise UserError(f"[{stage}] the {stream} set has {n[stream]} images: {n[stream] // world} per process "
                            f"for {world} process(es), fewer than one batch of {size}; lower {knob} (e.g. "
                            f"--stages.{stage}.data.batch_size) or use more data")


def check_disk(plan: RunPlan, run_dir: Path) -> None:
    """The run folder's filesystem must have room for what the run keeps (engine.costmodel.run_disk_bytes),
    less what the folder already holds (a resumed run replaces its own checkpoints). --out is one filesystem
    every rank writes to (a sharded checkpoint is resumable only where all its shards are), so the whole
    folder's bytes are checked, on every rank."""
    need, parts = cm.run_disk_bytes(plan, int(os.environ.get("WORLD_SIZE", "1")))
    need -= folder_bytes(run_dir)
    free = free_bytes(run_dir)
    if need > free:
        raise UserError(f"not enough disk for {run_dir}: the run will keep about {cm.human_bytes(need)} "
                        f"({need:,} bytes: {'; '.join(parts)}) but its filesystem has {cm.human_bytes(free)} "
                        f"({free:,} bytes) free; free space there, choose another --out, or keep fewer "
                        f"checkpoints (checkpoint.keep, checkpoint.export_safetensors = false)")


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged user on the filesystem that holds `path` (or would: its nearest existing
    parent when the folder is not made yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
