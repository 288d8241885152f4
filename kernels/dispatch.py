"""Which implementation each fused op runs: Triton (CUDA), native C++ (CPU), torch, or the reference.

Every public function in ``kernels`` takes ``backend=`` (``"auto"``, ``"triton"``, ``"native"``,
``"torch"``, ``"reference"``); ``None`` means the process default, which the trainer sets from the
config key ``run.kernels`` (``set_default``). ``auto``: Triton for CUDA tensors, native for CPU (and
meta) tensors when the library is built, torch otherwise. An explicit backend that cannot run on the
given tensors raises ``KernelUnavailable`` naming the fix, never a silent fallback.

Resolution reads only host metadata (device type, dtype), so it costs nothing per call and is
constant-folded by ``torch.compile``.
"""

from __future__ import annotations

import torch

from kernels import native, triton_ops  # triton_ops imports Triton itself only in its load()

__all__ = ["BACKENDS", "KernelUnavailable", "OPS", "check_backend", "get_default", "op", "report",
           "resolve", "set_default", "describe"]

BACKENDS = ("auto", "triton", "native", "torch", "reference")
OPS = ("ema_update", "pseudo_label", "pseudo_mixup", "soft_target_cross_entropy")
# Triton kernels compute in float32; float64 inputs (gradchecks) go to native or torch under "auto".
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_default = "auto"


class KernelUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernels backend '{backend}': choose one of {', '.join(BACKENDS)}")


def set_default(backend: str) -> None:
    """The backend used when a call passes ``backend=None`` (the trainer: ``run.kernels``)."""
    global _default
    check_backend(backend)
    _default = backend


def get_default() -> str:
    return _default


def _triton_usable(device: torch.device, dtype: torch.dtype | None) -> bool:
    return ((device.type in ("cuda", "meta") or triton_ops.interpreted())
            and (dtype is None or dtype in _TRITON_DTYPES) and triton_ops.load())


def _native_usable(device: torch.device) -> bool:
    return device.type in ("cpu", "meta") and native.load()


def _triton_problem(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why Triton cannot run on these tensors, or None when it can. Cheap when it can (per call)."""
    if device.type not in ("cuda", "meta") and not triton_ops.interpreted():
        return f"triton: tensors on {device.type}, not CUDA (CPU runs Triton only under TRITON_INTERPRET=1)"
    if dtype is not None and dtype not in _TRITON_DTYPES:
        return f"triton: {dtype} is not supported (float32, bfloat16, float16)"
    if not triton_ops.load():
        return triton_ops.status()
    return None


def _native_problem(device: torch.device) -> str | None:
    """Why the native ops cannot run on these tensors, or None when they can."""
    if device.type not in ("cpu", "meta"):
        return f"native: tensors on {device.type}; the native ops are CPU ops"
    if not native.load():
        return native.status()
    return None


def constant_while_tracing(fn):
    """torch.compiler.assume_constant_result (torch.compile evaluates the call once while tracing, not in the
    graph) without importing torch._dynamo, which costs every start-up ~2 s: that decorator only sets this
    attribute (torch 2.11 to 2.14; tests/unit/test_kernel_dispatch.py holds it to the installed torch's)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_while_tracing
def resolve(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend (triton | native | torch | reference) for tensors on ``device``."""
    backend = _default if backend is None else backend
    check_backend(backend)
    if backend == "auto":  # booleans only: the reasons (file checks) are for reports and errors
        if device.type == "cuda" and _triton_usable(device, dtype):
            return "triton"
        if device.type in ("cpu", "meta") and _native_usable(device):
            return "native"
        return "torch"
    if backend == "triton" and not _triton_usable(device, dtype):
        why = _triton_problem(device, dtype)
        raise KernelUnavailable(f"kernels backend 'triton' cannot run: {why}; use 'auto' or 'torch'")
    if backend == "native" and not _native_usable(device):
        why = _native_problem(device)
        raise KernelUnavailable(f"kernels backend 'native' cannot run: {why}; or use 'auto' or 'torch'")
    return backend


_OP_CACHE: dict[tuple[str, str], object] = {}


def op(backend: str, name: str):
    """The registered op ``torch.ops.semivit_<backend>.<name>.default`` for a resolved backend
    (triton | native); cached, since the overload-packet lookup costs microseconds per call."""
    key = (backend, name)
    found = _OP_CACHE.get(key)
    if found is None:
        namespace = torch.ops.semivit_triton if backend == "triton" else torch.ops.semivit_native
        found = _OP_CACHE[key] = getattr(namespace, name).default
    return found


def describe(device: torch.device | str, backend: str | None = None) -> str:
    """'requested -> chosen (why)' for tensors on ``device``, e.g. for the run header."""
    device = torch.device(device)
    requested = _default if backend is None else backend
    chosen = resolve(requested, device)
    explained = requested == "auto" or chosen in ("triton", "native")
    why = _why(device, chosen) if explained else f"run.kernels = '{requested}'"
    return f"{requested} -> {chosen} ({why})"


def _why(device: torch.device, chosen: str) -> str:
    if chosen == "triton":
        return triton_ops.status()
    if chosen == "native":
        return native.status()
    return (_triton_problem(device, None) if device.type == "cuda" else _native_problem(device)) or "available"


def report() -> str:
    """What ``python -m kernels`` prints: per op and device kind, the implementation 'auto' picks and why."""
    lines = [f"default backend: {_default} (run.kernels sets it for a training run)"]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        chosen = resolve("auto", device)
        why = _why(device, chosen)
        lines.append(f"{device.type} tensors:")
        for op in OPS:
            lines.append(f"  {op:<26} {chosen:<7} {why}")
    if not torch.cuda.is_available():
        lines.append("cuda tensors: no CUDA device here; on a GPU 'auto' picks triton when installed "
                     f"({triton_ops.status()})")
    return "\n".join(lines)
