"""Content checksums of checkpoints: a digest of every value a checkpoint holds, written at save time and
checked at load, so that a file damaged after its write (disk, copy, bit rot) is caught even when it still
unpickles.

The digest is SHA-256 (hardware-accelerated on current x86 and ARM CPUs, in the standard library) over
each tensor's key path, dtype, shape and the digest of its raw bytes, and the repr of every other value, in
the order the checkpoint holds them (torch.save keeps dict order). bench/RESULTS.md has its cost next to
the save and load times. Files written before checksums existed (the original MAE / Semi-ViT checkpoints) have none and
load as before.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import torch

KEY = "checksum"  # the entry a checkpoint dict (or a safetensors file's metadata) carries it under
ALGORITHM = "sha256"
WORKERS = min(8, os.cpu_count() or 1)  # tensors hashed at once


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes, whatever its dtype (bfloat16 included) and device."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _leaves(path: str, value, out: list) -> None:
    """(header, tensor or None) for every value in order: the header names its place, type and shape."""
    if isinstance(value, torch.Tensor):
        out.append((f"{path}|tensor|{value.dtype}|{tuple(value.shape)}|", value if value.numel() else None))
    elif isinstance(value, dict):
        out.append((f"{path}|dict|{len(value)}|", None))
        for key, item in value.items():
            _leaves(f"{path}/{key!r}", item, out)
    elif isinstance(value, (list, tuple)):
        out.append((f"{path}|seq|{len(value)}|", None))
        for i, item in enumerate(value):
            _leaves(f"{path}/{i}", item, out)
    else:
        out.append((f"{path}|{type(value).__name__}|{value!r}|", None))


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.new(ALGORITHM, tensor_bytes(t)).digest()


def content_checksum(obj) -> str:
    """'sha256:<hex>' of a checkpoint's content (its own checksum entry left out): each tensor is hashed on its
    own, on several threads (hashlib releases the GIL), and the headers and tensor digests hashed in order."""
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != KEY}
    leaves: list = []
    _leaves("", obj, leaves)
    with ThreadPoolExecutor(WORKERS) as pool:
        digests = iter(pool.map(_digest, [t for _, t in leaves if t is not None]))
    h = hashlib.new(ALGORITHM)
    for header, t in leaves:
        h.update(header.encode())
        if t is not None:
            h.update(next(digests))
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
