"""Content checksums of checkpoints: a digest of every value a checkpoint holds, written at save time and
checked at load, so that a file damaged after its write (disk, copy, bit rot) is caught even when it still
unpickles.

The digest is SHA-256 (hardware-accelerated on current x86 and ARM CPUs, in the standard library) over
each tensor's key path, dtype, shape and raw bytes, and the repr of every other value, in the order the
checkpoint holds them (torch.save keeps dict order). bench/RESULTS.md has its cost next to the save and
load times. Files written before checksums existed (the original MAE / Semi-ViT checkpoints) have none and
load as before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import torch

KEY = "checksum"  # the entry a checkpoint dict (or a safetensors file's metadata) carries it under
ALGORITHM = "sha256"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes, whatever its dtype (bfloat16 included) and device."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _feed(h, path: str, value) -> None:
    if isinstance(value, torch.Tensor):
        h.update(f"{path}|tensor|{value.dtype}|{tuple(value.shape)}|".encode())
        if value.numel():
            h.update(tensor_bytes(value))
    elif isinstance(value, dict):
        h.update(f"{path}|dict|{len(value)}|".encode())
        for key, item in value.items():
            _feed(h, f"{path}/{key!r}", item)
    elif isinstance(value, (list, tuple)):
        h.update(f"{path}|seq|{len(value)}|".encode())
        for i, item in enumerate(value):
            _feed(h, f"{path}/{i}", item)
    else:
        h.update(f"{path}|{type(value).__name__}|{value!r}|".encode())


def content_checksum(obj) -> str:
    """'sha256:<hex>' of a checkpoint's content (its own checksum entry left out)."""
    h = hashlib.new(ALGORITHM)
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != KEY}
    _feed(h, "", obj)
    return f"{ALGORITHM}:{h.hexdigest()}"


def with_checksum(obj):
    """The dict to save, with its checksum added (other objects are saved as they are)."""
    if not isinstance(obj, dict):
        return obj
    return {**{k: v for k, v in obj.items() if k != KEY}, KEY: content_checksum(obj)}


def mismatch(obj) -> str | None:
    """None when `obj` carries no checksum or its content matches it, else what went wrong (for the message).
    The checksum entry is removed from `obj`, so callers see the checkpoint as it was saved."""
    if not isinstance(obj, dict) or KEY not in obj:
        return None
    stored = obj.pop(KEY)
    return check(stored, content_checksum(obj))


def check(stored, actual: str) -> str | None:
    if not isinstance(stored, str) or ":" not in stored:
        return f"its checksum entry is unreadable ({stored!r})"
    if stored.split(":", 1)[0] != ALGORITHM:
        return f"its checksum uses an unknown algorithm ({stored.split(':', 1)[0]})"
    if stored != actual:
        return f"its content does not match the checksum written when it was saved ({stored[:19]}... != " \
               f"{actual[:19]}...)"
    return None


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """A flat {name: tensor} (safetensors), by name: the file's own order is by dtype and size."""
    return content_checksum({name: tensors[name] for name in sorted(tensors)})


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return f"{ALGORITHM}:{hashlib.file_digest(f, ALGORITHM).hexdigest()}"


def files_checksums(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """{name: digest} of files in a folder (a DCP checkpoint's shards and metadata)."""
    return {name: file_digest(folder / name) for name in sorted(names)}
