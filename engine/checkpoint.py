"""Checkpoints that survive crashes: write to a temporary name, fsync, rename; keep the newest N.

A checkpoint file is valid only once complete (the rename is atomic), so `--checkpoint.resume auto`
always finds a loadable one. A write that fails (full disk, quota, permissions) removes its temporary
file and raises WriteError: the previous checkpoints are never touched. Loading never unpickles arbitrary
objects (weights_only=True).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from engine.errors import UserError, WriteError

NAME = re.compile(r"^(?P<stage>[a-z]+)-(?P<kind>e(?P<epoch>\d+)-s(?P<step>\d+)|final)\.pt$")


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as err:  # ENOSPC, EDQUOT, EACCES, EROFS, ...: the old files stay as they were
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write checkpoint '{path}' ({err.strerror or err}); earlier checkpoints in "
                         f"{path.parent} are untouched: free space (or fix permissions) and rerun with "
                         f"--checkpoint.resume auto --out <the same folder>") from None


def check_writable(run_dir: Path) -> None:
    """Create the run folder and write a probe file in it, so an unusable --out fails before any work."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise WriteError(f"--out '{run_dir}' cannot be created or written ({err.strerror or err}): choose a "
                         f"folder you can write to, on a disk with free space") from None


def safe_load(path: str | Path) -> dict:
    """Load a checkpoint with weights_only=True; the allow-list covers what public MAE checkpoints hold."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' not found: check the path (model.init / checkpoint.resume / eval.checkpoint)")
    # MAE's checkpoints store the training script's argparse.Namespace next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure here means the file is not a usable checkpoint
            raise UserError(f"checkpoint '{path}' could not be loaded safely ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}); it may be truncated or hold objects we refuse to "
                            f"unpickle: use an older checkpoint, or re-save the weights alone "
                            f"(torch.save({{'model': state_dict}}))") from None


def checkpoint_name(stage: str, epoch: int, step: int) -> str:
    return f"{stage}-e{epoch:04d}-s{step:06d}.pt"


def list_checkpoints(folder: Path, stage: str) -> list[Path]:
    """This stage's resumable checkpoints, oldest first (temporary files are never listed)."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = NAME.match(p.name)
        if m and m["stage"] == stage and m["kind"] != "final":
            found.append((int(m["epoch"]), int(m["step"]), p))
    return [p for _, _, p in sorted(found)]


def save_rolling(obj, folder: Path, stage: str, epoch: int, step: int, keep: int) -> Path:
    path = folder / checkpoint_name(stage, epoch, step)
    for stale in folder.glob(f".{stage}-*.pt.tmp"):  # left by a save that was killed midway
        stale.unlink(missing_ok=True)
    atomic_save(obj, path)
    for old in list_checkpoints(folder, stage)[:-keep]:  # only once the new one is complete
        old.unlink(missing_ok=True)
    return path


def newest_valid(folder: Path, stage: str) -> tuple[Path, dict] | None:
    """The newest checkpoint of `stage` that loads; a damaged newer one is skipped with a warning."""
    for path in reversed(list_checkpoints(folder, stage)):
        try:
            return path, safe_load(path)
        except UserError as err:
            print(f"warning: skipping {err}")
    return None


def export_safetensors(state_dict: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
