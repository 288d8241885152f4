"""The native CPU ops (C++ / OpenMP, ``kernels/csrc``), registered as ``torch.ops.semivit_native.*``.

Built by the top-level ``CMakeLists.txt`` into ``build/libsemivit_native.so``; nothing here runs at
import time of ``kernels``: ``load()`` is called lazily by the dispatchers (and by tests).
After loading, every op gets its fake (meta) implementation from ``kernels.contract``, so the ops run on
the meta device and trace under ``torch.compile(fullgraph=True)``; ``soft_target_ce``'s autograd formula
is registered in C++ (its forward writes the gradient; the backward scales it). Schemas:
``kernels.contract``; semantics: docs/kernels.md.

The hot loops are compiled for AVX-512, AVX2 and a baseline (x86-64-v2); ``instruction_set()`` names
the copy that runs. ``SEMIVIT_NATIVE_ISA`` (``avx512`` | ``avx2`` | ``baseline``, read on every call)
forces a narrower copy of the soft-target CE, e.g. to measure the AVX2 copy on an AVX-512 machine; the
other ops take the widest copy the CPU runs, chosen when the library loads.

Public API: ``load``, ``available``, ``status``, ``instruction_set``, ``library_path``, ``BUILD_COMMAND``,
``ISA_ENV``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kernels import contract

__all__ = ["BUILD_COMMAND", "ISA_ENV", "available", "instruction_set", "library_path", "load", "status"]

BUILD_COMMAND = "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2"
ISA_ENV = "SEMIVIT_NATIVE_ISA"
_REPO_ROOT = Path(__file__).resolve().parent.parent  # the parent of the kernels package

_loaded = False
_error: str | None = None  # first line of the load error, once a load has failed


def library_path() -> Path:
    """``$SEMIVIT_NATIVE_LIB`` if set, else ``<repo root>/build/libsemivit_native.so``."""
    env = os.environ.get("SEMIVIT_NATIVE_LIB")
    return Path(env) if env else _REPO_ROOT / "build" / "libsemivit_native.so"


def _shown(path: Path) -> str:
    """The path relative to the repo root when inside it (short status lines)."""
    try:
        return str(path.resolve().relative_to(_REPO_ROOT))
    except ValueError:
        return str(path)


def load() -> bool:
    """Load the library and register fake / autograd implementations, once. False if not built
    or not loadable (see ``status()``); a failed load is not retried (rebuild, then restart)."""
    global _loaded, _error
    if _loaded or _error is not None:
        return _loaded
    path = library_path()
    if not path.is_file():
        return False  # not built yet: retried on the next call, so a build later in the process counts
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:  # e.g. built against another torch (undefined symbols)
        _error = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return False
    _register_python_parts()
    _loaded = True
    return True


def available() -> bool:
    """True when the native ops are loaded (loading them if needed)."""
    return load()


def status() -> str:
    """One line for logs and skip messages: built and loaded, not built, or failed to load."""
    load()
    shown = _shown(library_path())
    if _loaded:
        return f"native: built ({shown})"
    if _error is not None:
        return f"native: failed to load {shown} ({_error}) — rebuild with: {BUILD_COMMAND}"
    return f"native: not built — run: {BUILD_COMMAND}"


def instruction_set() -> str:
    """The copy of the soft-target CE's loops that runs now: ``"avx512"``, ``"avx2"`` or ``"baseline"``
    (the widest this CPU runs, or the one ``$SEMIVIT_NATIVE_ISA`` names). Raises RuntimeError when the
    library is not loaded (the message is ``status()``) or when ``$SEMIVIT_NATIVE_ISA`` names an unknown
    set or one this CPU cannot run."""
    if not load():
        raise RuntimeError(status())
    return torch.ops.semivit_native.instruction_set()


def _register_python_parts() -> None:
    """The fake (meta) implementations of ``kernels.contract``; the autograd of soft_target_ce is
    registered in C++ (kernels/csrc/autograd.cpp), where it costs less host time per call."""
    contract.register_fakes("semivit_native")
