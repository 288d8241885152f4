"""Triton implementations of the four hot operations, registered as ``torch.ops.semivit_triton.*``.

Triton is optional (``pip install -e '.[gpu]'``): nothing here imports it until ``load()`` is called,
so ``import kernels`` works without it. The ops run on CUDA tensors; CPU tensors only under the
Triton interpreter (``TRITON_INTERPRET=1`` set in the environment before Triton is imported), which
is how the tests run them on a machine without a GPU.

    available() -> bool   Triton importable and (a CUDA device or TRITON_INTERPRET=1)
    status() -> str       one line saying which
    load() -> bool        imports the op modules (registering the ops) when available(); idempotent

Ops (schemas in docs/kernels.md): ``semivit_triton::ema_update_``, ``pseudo_label``,
``pseudo_mixup``, ``mix_batch``, ``soft_target_ce`` (autograd registered).
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["OPS", "available", "interpreted", "load", "status"]

OPS = ("ema_update_", "pseudo_label", "pseudo_mixup", "mix_batch", "soft_target_ce")
_MODULES = ("ema", "pseudo_label", "pseudo_mixup", "soft_target_ce")
_loaded = False


def interpreted() -> bool:
    """True when the Triton interpreter is requested (TRITON_INTERPRET set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _triton_version() -> str | None:
    try:
        if importlib.util.find_spec("triton") is None:
            return None
        import triton  # noqa: PLC0415 (optional dependency, imported on demand)
    except Exception:  # noqa: BLE001 (a broken or blocked install counts as missing)
        return None
    return getattr(triton, "__version__", "?")


def _cuda() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


def available() -> bool:
    """Triton importable and either a CUDA device present or TRITON_INTERPRET=1."""
    return _triton_version() is not None and (interpreted() or _cuda())


def status() -> str:
    """One line: which Triton, on what (or why not)."""
    version = _triton_version()
    if version is None:
        return "triton: not installed — pip install -e '.[gpu]'"
    if interpreted():
        return f"triton {version} interpreter (TRITON_INTERPRET=1)"
    if _cuda():
        return f"triton {version} on CUDA"
    return "triton: no CUDA device"


def load() -> bool:
    """Import the op modules, which registers ``torch.ops.semivit_triton.*``. Returns ``available()``;
    registers nothing when Triton is unavailable. Safe to call many times."""
    global _loaded
    if _loaded:
        return True
    if not available():
        return False
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")
    _loaded = True
    return True
