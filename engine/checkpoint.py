"""Checkpoints that survive crashes: write to a temporary name, fsync, rename; keep the newest N.

A checkpoint file is valid only once complete (the rename is atomic), so `--checkpoint.resume auto` always finds
a loadable one. Sharded runs (FSDP2) write a torch.distributed.checkpoint folder the same way: into a temporary
name, renamed once complete. A write that fails (full disk, quota, permissions) removes its temporary file and
raises WriteError: the previous checkpoints are never touched. Loading never unpickles arbitrary objects
(weights_only=True). Every checkpoint carries a content checksum (engine.checksums), checked at load: a file
damaged after its write is reported by name, and `--checkpoint.resume auto` skips it like a truncated one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from engine import checksums
from engine.errors import UserError, WriteError

# <stage>-eNNNN-sNNNNNN.pt (one file) or .dcp (a torch.distributed.checkpoint folder: sharded runs)
NAME = re.compile(r"^(?P<stage>[a-z]+)-(?P<kind>e(?P<epoch>\d+)-s(?P<step>\d+)|final)\.(?P<ext>pt|dcp)$")


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(checksums.with_checksum(obj), f)
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
    """Load a checkpoint with weights_only=True (the allow-list covers what public MAE checkpoints hold) and
    check its content checksum when it has one. A .safetensors file loads as {"model": its tensors}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' not found: check the path "
                        "(model.init / checkpoint.resume / eval.checkpoint)")
    if path.suffix == ".safetensors":
        return {"model": load_safetensors(path)}
    # MAE's checkpoints store the training script's argparse.Namespace next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure here means the file is not a usable checkpoint
            raise UserError(f"checkpoint '{path}' could not be loaded safely ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}); it may be truncated or hold objects we refuse to "
                            f"unpickle: use an older checkpoint, or re-save the weights alone "
                            f"(torch.save({{'model': state_dict}}))") from None
    problem = checksums.mismatch(state)
    if problem:
        raise damaged(path, problem)
    return state


def damaged(path: Path, problem: str) -> UserError:
    return UserError(f"checkpoint '{path}' is damaged: {problem}; it changed after it was written (disk or "
                     f"copy): use an older checkpoint, or copy it again from where it came")


def load_safetensors(path: Path) -> dict:
    """A safetensors file's tensors, checked against the checksum its metadata carries (when it has one)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get(checksums.KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"checkpoint '{path}' is not a readable safetensors file ({err}): "
                        f"give RUN/model.safetensors as the run wrote it") from None
    if stored is not None:
        problem = checksums.check(stored, checksums.tensors_checksum(tensors))
        if problem:
            raise damaged(path, problem)
    return tensors


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
            found.append((int(m["step"]), int(m["epoch"]), p))  # by step: epochs depend on the number of ranks
    return [p for _, _, p in sorted(found)]


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clear_stale(folder: Path, stage: str) -> None:
    for stale in folder.glob(f".{stage}-*.tmp"):  # left by a save that was killed midway
        remove(stale)


def save_rolling(obj, folder: Path, stage: str, epoch: int, step: int, keep: int) -> Path:
    path = folder / checkpoint_name(stage, epoch, step)
    clear_stale(folder, stage)
    atomic_save(obj, path)
    for old in list_checkpoints(folder, stage)[:-keep]:  # only once the new one is complete
        remove(old)
    return path


def save_sharded(meta: dict, student, teacher, optimizer, folder: Path, stage: str, epoch: int, step: int,
                 keep: int, rt) -> Path:
    """A torch.distributed.checkpoint folder: every rank writes its own shards into `.NAME.tmp/`, rank 0
    adds meta.pt (step, RNG states, ...) last and renames the folder: complete or invisible, like a file.
    Loads on any number of ranks (DCP reshards), also into an unsharded model."""
    import torch.distributed.checkpoint as dcp

    path = folder / checkpoint_name(stage, epoch, step).replace(".pt", ".dcp")
    tmp, damaged_copy = folder / f".{path.name}.tmp", folder / f".{path.name}.damaged.tmp"

    def prepare():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(f"could not create '{folder}' ({err.strerror or err})") from None
        clear_stale(folder, stage)

    rt.main_only(prepare)
    failure = None
    try:
        with single_process_ok():
            dcp.save(sharded_state(student, teacher, optimizer), checkpoint_id=str(tmp))
    except Exception as err:  # noqa: BLE001 - DCP reports any rank's failure to every rank
        failure = err

    def commit():
        if failure is not None:
            remove(tmp)
            raise WriteError(f"could not write checkpoint '{path}' ({str(failure).splitlines()[0][:200]}); earlier "
                             f"checkpoints in {folder} are untouched: free space (or fix permissions) and rerun "
                             f"with --checkpoint.resume auto --out <the same folder>")
        shards = checksums.files_checksums(tmp, [p.name for p in tmp.iterdir() if p.name != "meta.pt"])
        atomic_save({**meta, "shards": shards}, tmp / "meta.pt")
        try:
            if path.exists():  # a damaged folder of this step that resume skipped: a folder cannot be renamed over
                os.replace(path, damaged_copy)
            os.replace(tmp, path)
        except OSError as err:
            remove(tmp)
            raise WriteError(f"could not commit checkpoint '{path}' ({err.strerror or err})") from None
        remove(damaged_copy)
        for old in list_checkpoints(folder, stage)[:-keep]:
            remove(old)

    rt.main_only(commit)
    return path


@contextlib.contextmanager
def single_process_ok():
    """DCP warns when it runs without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def sharded_state(student, teacher, optimizer) -> dict:
    """The state DCP saves and loads: fully-qualified names, each rank's shards (or whole tensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(student), "optimizer": get_optimizer_state_dict(student, optimizer)}
    if teacher is not None:
        state["ema"] = get_model_state_dict(teacher)
    return state


def load_sharded(path: Path, student, teacher, optimizer) -> None:
    """Into this run's (sharded or not) modules and optimizer, whatever the number of ranks that saved it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = sharded_state(student, teacher, optimizer)
    try:
        with single_process_ok():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"checkpoint '{path}' could not be loaded ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}): use an older checkpoint") from None
    set_model_state_dict(student, state["model"])
    set_optimizer_state_dict(student, optimizer, state["optimizer"])
    if teacher is not None:
        set_model_state_dict(teacher, state["ema"])


def newest_valid(folder: Path, stage: str) -> tuple[Path, dict] | None:
    """The newest checkpoint of `stage` that loads; a damaged newer one is skipped with a warning."""
    for path in reversed(list_checkpoints(folder, stage)):
        try:
            return path, load_resumable(path)
        except UserError as err:
            print(f"warning: skipping {err}")
    return None


def load_resumable(path: Path) -> dict:
    """A file's whole state, or a DCP folder's meta.pt with "dcp": the folder (the tensors load later,
    into the built model: engine.stages.loop)."""
    if path.is_dir():
        meta = safe_load(path / "meta.pt")
        check_shards(path, meta.pop("shards", {}))
        return {**meta, "dcp": path}
    return safe_load(path)


def check_shards(folder: Path, expected: dict[str, str]) -> None:
    """Every file meta.pt lists, present and as written (folders saved before checksums list none)."""
    for name, digest in expected.items():
        shard = folder / name
        if not shard.is_file():
            raise UserError(f"checkpoint '{folder}' is incomplete: its file '{name}' is missing: use an older "
                            f"checkpoint")
        problem = checksums.check(digest, checksums.file_digest(shard))
        if problem:
            raise damaged(shard, problem)


def export_safetensors(state_dict: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={checksums.KEY: checksums.tensors_checksum(tensors)})
    os.replace(tmp, path)
