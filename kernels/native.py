"""The native CPU ops (C++ / OpenMP, ``kernels/csrc``), registered as ``torch.ops.semivit_native.*``.

Built by the top-level ``CMakeLists.txt`` into ``build/libsemivit_native.so``; nothing here runs at
import time of ``kernels``: ``load()`` is called lazily by the dispatchers (and by tests).
After loading, every op gets a fake (meta) implementation, so the ops run on the meta device and
trace under ``torch.compile(fullgraph=True)``; ``soft_target_ce``'s autograd formula is registered in C++
(its forward writes the gradient; the backward scales it). Contract: docs/kernels.md.

Public API: ``load``, ``available``, ``status``, ``library_path``, ``BUILD_COMMAND``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["BUILD_COMMAND", "available", "library_path", "load", "status"]

BUILD_COMMAND = "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2"
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


# ------------------------------------------------------------------------ fake impls and autograd


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _register_python_parts() -> None:
    """Fake (meta) implementations: output shapes and dtypes only, as the C++ kernels make them."""
    ns = "semivit_native::"

    @torch.library.register_fake(ns + "ema_update_")
    def _(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
        torch._check(len(teacher) == len(student), lambda: "teacher and student lengths differ")

    @torch.library.register_fake(ns + "pseudo_label")
    def _(logits: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
        torch._check(logits.dim() == 2, lambda: "logits must be (N, C)")
        n = logits.shape[0]
        return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.int64),
                logits.new_empty(n, dtype=torch.float32))

    @torch.library.register_fake(ns + "pseudo_mixup")
    def _(images: Tensor, prob: Tensor, use_cutmix: Tensor, cy: Tensor, cx: Tensor, partner: Tensor,
          threshold: float) -> tuple[Tensor, Tensor, Tensor]:
        torch._check(images.dim() == 4, lambda: "images must be (B, C, H, W)")
        b = images.shape[0]
        return (torch.empty_like(images, memory_format=torch.contiguous_format),
                images.new_empty(b, dtype=torch.float32), images.new_empty(b, dtype=torch.float32))

    @torch.library.register_fake(ns + "mix_batch")
    def _(images: Tensor, lam: Tensor, use_cutmix: Tensor, cy: Tensor, cx: Tensor,
          partner: Tensor) -> tuple[Tensor, Tensor]:
        torch._check(images.dim() == 4, lambda: "images must be (B, C, H, W)")
        return torch.empty_like(images, memory_format=torch.contiguous_format), torch.empty_like(lam)

    @torch.library.register_fake(ns + "pseudo_mixup_")
    def _(images: Tensor, prob: Tensor, use_cutmix: Tensor, cy: Tensor, cx: Tensor, partner: Tensor,
          threshold: float) -> tuple[Tensor, Tensor]:
        torch._check(images.dim() == 4, lambda: "images must be (B, C, H, W)")
        b = images.shape[0]
        return images.new_empty(b, dtype=torch.float32), images.new_empty(b, dtype=torch.float32)

    @torch.library.register_fake(ns + "mix_batch_")
    def _(images: Tensor, lam: Tensor, use_cutmix: Tensor, cy: Tensor, cx: Tensor, partner: Tensor) -> Tensor:
        torch._check(images.dim() == 4, lambda: "images must be (B, C, H, W)")
        return torch.empty_like(lam)

    @torch.library.register_fake(ns + "soft_target_ce")
    def _(logits: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor, mask: Tensor | None, smoothing: float,
          with_grad: bool) -> tuple[Tensor, Tensor]:
        torch._check(logits.dim() == 2, lambda: "logits must be (B, C)")
        dt = _compute_dtype(logits)
        grad_shape = tuple(logits.shape) if with_grad else (0,)
        return logits.new_empty((), dtype=dt), logits.new_empty(grad_shape, dtype=dt)

    # The autograd of soft_target_ce is registered in C++ (kernels/csrc/autograd.cpp): ~30 us less host
    # time per forward + backward than torch.library.register_autograd from Python.
