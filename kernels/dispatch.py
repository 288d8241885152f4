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

__all__ = ["BACKENDS", "KernelUnavailable", "OPS", "check_backend", "get_default", "ops_namespace", "report",
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


def _triton_ok(device: torch.device, dtype: torch.dtype | None) -> tuple[bool, str]:
    from kernels import triton_ops  # optional dependency: imported on first use, never with `kernels`

    if device.type not in ("cuda", "meta") and not triton_ops.interpreted():
        return False, f"triton: tensors on {device.type}, not CUDA (CPU runs Triton only under TRITON_INTERPRET=1)"
    if not triton_ops.available():
        return False, triton_ops.status()
    if dtype is not None and dtype not in _TRITON_DTYPES:
        return False, f"triton: {dtype} is not supported (float32, bfloat16, float16)"
    if not triton_ops.load():
        return False, triton_ops.status()
    return True, triton_ops.status()


def _native_ok(device: torch.device) -> tuple[bool, str]:
    from kernels import native

    if device.type not in ("cpu", "meta"):
        return False, f"native: tensors on {device.type}; the native ops are CPU ops"
    if not native.load():
        return False, native.status()
    return True, native.status()


@torch.compiler.assume_constant_result  # torch.compile evaluates it once while tracing, not in the graph
def resolve(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend (triton | native | torch | reference) for tensors on ``device``."""
    backend = _default if backend is None else backend
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and _triton_ok(device, dtype)[0]:
            return "triton"
        if device.type in ("cpu", "meta") and _native_ok(device)[0]:
            return "native"
        return "torch"
    if backend == "triton":
        ok, why = _triton_ok(device, dtype)
        if not ok:
            raise KernelUnavailable(f"kernels backend 'triton' cannot run: {why}; use 'auto' or 'torch'")
    elif backend == "native":
        ok, why = _native_ok(device)
        if not ok:
            raise KernelUnavailable(f"kernels backend 'native' cannot run: {why}; or use 'auto' or 'torch'")
    return backend


def ops_namespace(backend: str):
    """``torch.ops.semivit_triton`` or ``torch.ops.semivit_native``, for a resolved backend."""
    return torch.ops.semivit_triton if backend == "triton" else torch.ops.semivit_native


def describe(device: torch.device | str, backend: str | None = None) -> str:
    """'requested -> chosen (why)' for tensors on ``device``, e.g. for the run header."""
    device = torch.device(device)
    requested = _default if backend is None else backend
    chosen = resolve(requested, device)
    explained = requested == "auto" or chosen in ("triton", "native")
    why = _why(device, chosen) if explained else f"run.kernels = '{requested}'"
    return f"{requested} -> {chosen} ({why})"


def _why(device: torch.device, chosen: str) -> str:
    from kernels import native, triton_ops

    if chosen == "triton":
        return triton_ops.status()
    if chosen == "native":
        return native.status()
    return (_triton_ok(device, None) if device.type == "cuda" else _native_ok(device))[1]


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
        from kernels import triton_ops

        lines.append(f"cuda tensors: no CUDA device here; on a GPU 'auto' picks triton when installed ({triton_ops.status()})")
    return "\n".join(lines)
